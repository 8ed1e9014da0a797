"""Issue 16: the trainer shares a step's dropout masks between its two passes by handing them back
(harness.nets.layers.DropoutTape) instead of replaying the RNG and drawing them again. That is a
speed-up only: for every method that shares masks, a few steps give bit-identical weights either way."""
import pytest
import torch

from harness.config import compose
from harness.train import engine as eng
from harness.train.rundir import RunDir
from harness.train.trainer import Trainer
from methods.base import RngReplay


def _weights_after_steps(tmp_path, method, name, steps=3):
    cfg = compose([f"method={method}", "model=unet-xs", "model.dropout=0.2", "data=digits", "trainer.batch_size=16",
                   "trainer.threads=1", f"trainer.steps={steps}", "eval.at_end=false", "log.console=quiet",
                   "log.tensorboard=false", f"run_dir={tmp_path / name}"])
    run_dir = RunDir(cfg.run_dir)
    run_dir.prepare(cfg)
    trainer = Trainer(cfg, run_dir, eng.setup_distributed("cpu"))
    try:
        start = [p.detach().clone() for p in trainer.engine.module.parameters()]
        losses = [trainer.step(i)["loss"] for i in range(steps)]
        weights = [p.detach().clone() for p in trainer.engine.module.parameters()]
        assert any(not torch.equal(a, b) for a, b in zip(start, weights))     # it trained
        return losses, weights, torch.get_rng_state()
    finally:
        trainer.close()


@pytest.mark.parametrize("method", ["ect", "ict", "ct", "sct", "gcm"])
def test_masks_handed_back_train_the_same_weights_as_the_rng_replay(tmp_path, monkeypatch, method):
    torch.manual_seed(0)
    tape_losses, tape_weights, tape_rng = _weights_after_steps(tmp_path, method, "tape")
    monkeypatch.setattr("harness.train.trainer.DropoutTape", RngReplay)
    torch.manual_seed(0)
    rng_losses, rng_weights, rng_rng = _weights_after_steps(tmp_path, method, "rng")
    assert tape_losses == rng_losses
    assert all(torch.equal(a, b) for a, b in zip(tape_weights, rng_weights))
    assert torch.equal(tape_rng, rng_rng)
