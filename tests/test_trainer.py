"""The shared trainer: exact resume, checkpoint fallback, non-finite handling, EMA, lr schedule, seeding."""
import dataclasses
import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import methods
from harness.train import checkpoint
from harness.train.ema import EMA, std_to_exp
from harness.train.engine import lr_factor, setup_distributed
from harness.train.seeding import EpochSampler
from harness.train.cli import run
from harness.train.rundir import RunDir
from harness.train.trainer import Trainer
from methods.base import Method
from methods.ect import ECTConfig


def _module_weights(ckpt: Path) -> dict:
    return torch.load(ckpt / "engine" / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def _final_state(run_dir: Path):
    newest = checkpoint.list_checkpoints(run_dir)[0]
    return newest.name, _module_weights(newest), torch.load(newest / "harness.pt", weights_only=False)


@pytest.mark.parametrize("method", ["ect", "ct"])
def test_exact_resume_is_bitwise(method, compose_run, monkeypatch, tmp_path):
    """2k steps straight == k steps, interrupted, resumed for k more: same weights, EMAs, optimizer, and
    the method's state (CT's target EMA network)."""
    k = 6
    common = (f"method={method}", f"trainer.steps={2 * k}", f"trainer.checkpoint_every_steps={k}",
              "trainer.ema_betas=[0.9]", "trainer.ema_stds=[0.1]", "model.dropout=0.1")
    straight = compose_run(*common, run_dir="straight")
    assert run(straight)["status"] == "completed"

    resumed = compose_run(*common, run_dir="resumed")
    original_step = Trainer.step

    def interrupted(self, step):
        if step == k:
            raise KeyboardInterrupt          # a kill right after the step-k checkpoint
        return original_step(self, step)

    monkeypatch.setattr(Trainer, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(resumed)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "resumed")] == [f"step-{k:07d}"]
    monkeypatch.setattr(Trainer, "step", original_step)
    result = run(resumed)
    assert result["status"] == "completed" and result["steps"] == 2 * k

    name_a, w_a, h_a = _final_state(tmp_path / "straight")
    name_b, w_b, h_b = _final_state(tmp_path / "resumed")
    assert name_a == name_b == f"step-{2 * k:07d}"
    for key in w_a:
        assert torch.equal(w_a[key], w_b[key]), key
    target_a, target_b = h_a["method"].get("target"), h_b["method"].get("target")
    assert (target_a is not None) == (method == "ct")
    for key in target_a or {}:
        assert torch.equal(target_a[key], target_b[key]), key
    for ema in h_a["emas"]:
        for key in h_a["emas"][ema]:
            assert torch.equal(h_a["emas"][ema][key], h_b["emas"][ema][key]), (ema, key)
    assert h_a["counters"]["flops_total"] == h_b["counters"]["flops_total"] > 0
    # metrics.jsonl reads as one run: each logged step once
    steps = [r["step"] for r in __import__("harness.train.rundir", fromlist=["RunDir"]).RunDir(tmp_path / "resumed").read_metrics()]
    assert steps == sorted(set(steps))


def test_rerun_of_completed_run_returns_its_result(compose_run):
    cfg = compose_run("method=edm", "trainer.steps=3")
    first = run(cfg)
    assert first["status"] == "completed"
    assert run(cfg) == first


def test_corrupt_newest_checkpoint_falls_back(compose_run, tmp_path, caplog):
    cfg = compose_run("method=edm", "trainer.steps=4", "trainer.checkpoint_every_steps=2", "trainer.keep_checkpoints=3")
    assert run(cfg)["status"] == "completed"
    ckpts = checkpoint.list_checkpoints(tmp_path / "run")
    assert [p.name for p in ckpts] == ["step-0000004", "step-0000002"]
    (ckpts[0] / "harness.pt").write_bytes(b"not a checkpoint")
    from harness.train import engine as eng
    from harness.train.rundir import RunDir
    trainer = Trainer(cfg, RunDir(tmp_path / "run"), eng.setup_distributed("cpu"))
    with caplog.at_level(logging.WARNING):
        assert trainer.resume()
    assert trainer.counters.step == 2
    assert "step-0000004 is unreadable" in caplog.text
    # weights equal those saved at step 2
    for key, value in _module_weights(ckpts[1]).items():
        assert torch.equal(trainer.engine.module.state_dict()[key], value)


class _NaNAt(Method):
    """EDM's loss, replaced by NaN at the steps listed in `bad`, or scaled by 1e9 from step `blow_up_from`
    on (stand-ins for a diverging method)."""
    bad: set = set()
    blow_up_from: int | None = None

    def __init__(self, cfg, data_shape, num_classes):
        super().__init__(cfg, data_shape, num_classes)
        self.inner = methods.get("edm")(methods.get("edm").Config(), data_shape, num_classes)

    def loss(self, ctx, batch):
        out = self.inner.loss(ctx, batch)
        if ctx.step in self.bad or "all" in self.bad:
            out["loss"] = out["loss"] * float("nan")
        if self.blow_up_from is not None and ctx.step >= self.blow_up_from:   # finite, and far too large
            out["loss"] = out["loss"] * 1e9
        return out


@pytest.fixture
def nan_method():
    """`method=test_nan`, registered for the test only."""
    @methods.register("test_nan")
    class TestNaN(_NaNAt):
        Config = dataclasses.make_dataclass("NaNConfig", [("name", str, "test_nan")],
                                            bases=(methods.get("edm").Config,))
        PRESETS = {"tiny": {}}
    yield TestNaN
    methods.unregister("test_nan")


def test_nonfinite_loss_is_skipped_and_counted(compose_run, nan_method, tmp_path):
    nan_method.bad = {2, 3}
    cfg = compose_run("method=test_nan", "trainer.steps=6", "trainer.log_every_steps=1")
    result = run(cfg)
    assert result["status"] == "completed"
    assert result["nonfinite_skipped"] == 2
    _, weights, _ = _final_state(tmp_path / "run")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_nonfinite_run_fails_after_n_in_a_row(compose_run, nan_method, tmp_path):
    nan_method.bad = {"all"}
    cfg = compose_run("method=test_nan", "trainer.steps=50", "trainer.max_nonfinite_steps=4",
                      "trainer.checkpoint_every_steps=2")
    result = run(cfg)
    assert result["status"].startswith("failed: non-finite loss")
    # steps were skipped, never applied: any checkpoint written holds finite weights
    for ckpt in checkpoint.list_checkpoints(tmp_path / "run"):
        assert all(torch.isfinite(v).all() for v in _module_weights(ckpt).values())


def test_a_finite_blow_up_fails_the_run(compose_run, nan_method, tmp_path):
    """The divergence guard: a loss 1e9x its usual size from step 60 fails the run after
    trainer.divergence_steps steps of it (and only then); with the guard off the same run completes."""
    nan_method.bad, nan_method.blow_up_from = set(), 60
    result = run(compose_run("method=test_nan", "trainer.steps=200", "trainer.divergence_steps=5",
                             "trainer.log_every_steps=1"))
    assert result["status"].startswith("failed: loss diverged: ") and " at step 65, above 1000x " in result["status"]
    assert result["status"].endswith("for 5 steps in a row (trainer.divergence_factor / divergence_steps; 0 = off)")
    assert max(r["step"] for r in RunDir(tmp_path / "run").read_metrics()) == 65      # it stops there
    off = run(compose_run("method=test_nan", "trainer.steps=70", "trainer.divergence_factor=0", run_dir="off"))
    assert off["status"] == "completed"


def test_nothing_readable_restarts_from_zero_and_says_so(compose_run, tmp_path):
    """Every checkpoint unreadable: the run starts again, records why in result.json, and metrics.jsonl
    holds each step once (the first attempt's lines are dropped)."""
    cfg = compose_run("method=edm", "trainer.steps=4", "trainer.checkpoint_every_steps=2",
                      "trainer.log_every_steps=1", "eval.every_steps=2")
    run(cfg)
    for ckpt in checkpoint.list_checkpoints(tmp_path / "run"):
        (ckpt / "harness.pt").write_bytes(b"garbage")
    (tmp_path / "run" / "result.json").unlink()
    result = run(cfg)
    assert result["status"] == "completed"
    assert result["restarted"] == ("none of its 2 checkpoints (step-0000004 newest) was readable: "
                                   "started again from step 0")
    steps = [r["step"] for r in RunDir(tmp_path / "run").read_metrics() if "loss" in r]
    assert steps == [1, 2, 3, 4]


def test_power_ema_exponent_and_updates():
    # EDM2: sigma_rel = 0.10 <-> gamma = 6.94; the root satisfies sigma^2 = (g+1)/((g+2)^2 (g+3))
    g = std_to_exp(0.10)
    assert g == pytest.approx(6.94, abs=0.01)
    assert (g + 1) / ((g + 2) ** 2 * (g + 3)) == pytest.approx(0.01, rel=1e-9)
    net = nn.Linear(3, 1)
    w0 = net.weight.detach().clone()
    trad, power = EMA(net, beta=0.9), EMA(net, std=0.10)
    with torch.no_grad():
        net.weight.fill_(1.0)
    for step in range(5):
        trad.update(net, step)
        power.update(net, step)
    # traditional: 1 + (w0 - 1) 0.9^5; power: the first update (beta_1 = 0) copies the net
    torch.testing.assert_close(trad.module.weight, 1 + (w0 - 1) * 0.9 ** 5)
    torch.testing.assert_close(power.module.weight, torch.ones(1, 3))
    assert power.beta_at(0) == 0.0
    assert power.beta_at(9) == pytest.approx((1 - 1 / 10) ** (g + 1))


def test_lr_schedules():
    class T:
        lr_schedule, lr_ref_steps, lr_warmup_steps = "inverse_sqrt", 100, 0
    assert [lr_factor(s, T) for s in (0, 100, 400, 10000)] == pytest.approx([1, 1, 0.5, 0.1])
    T.lr_schedule, T.lr_warmup_steps = "constant", 10
    assert [lr_factor(s, T) for s in (0, 5, 10, 50)] == pytest.approx([0, 0.5, 1, 1])


def test_epoch_sampler_order_and_rank_slices():
    s = EpochSampler(10, seed=3)
    epoch0 = s.indices(0, 10)
    assert sorted(epoch0.tolist()) == list(range(10))            # every sample once per epoch
    assert torch.equal(EpochSampler(10, seed=3).indices(0, 10), epoch0)
    assert not torch.equal(EpochSampler(10, seed=4).indices(0, 10), epoch0)
    # batch 4 of step 2 spans the epoch boundary (positions 8..11)
    glob = s.batch(2, 4, 0, 1)
    assert glob.tolist() == [*epoch0[8:10].tolist(), *s.indices(10, 2).tolist()]
    halves = torch.cat([s.batch(2, 4, r, 2) for r in range(2)])
    assert torch.equal(halves, glob)                             # ranks split the global batch


def test_method_state_and_presets_resolve(compose_run):
    cfg = compose_run("method=ect")
    assert cfg.method.preset == "tiny" and cfg.method.huber_c == pytest.approx(0.00054 * math.sqrt(64), abs=1e-5)
    cfg = compose_run("method=ect", "preset=imagenet64", "method.q=8")
    assert cfg.method.p_mean == -0.8 and cfg.method.weighting == "inv_t2_plus_inv_sd2"
    assert cfg.method.q == 8.0                                   # the command line wins over the preset
    assert ECTConfig().q == 2.0


def test_init_from_loads_the_source_ema_and_refuses_another_network(compose_run, tmp_path):
    source = run(compose_run("method=edm", "trainer.steps=3", "trainer.ema_betas=[0.9]", "trainer.ema_stds=[0.05]", run_dir="src"))
    assert source["status"] == "completed"
    _, _, harness_state = _final_state(tmp_path / "src")
    cfg = compose_run("method=ect", f"init_from={tmp_path / 'src'}", "init_ema=ema_std0.05", "trainer.steps=1",
                      run_dir="t")
    tuned = Trainer(cfg, None, setup_distributed("cpu"))
    loaded = tuned.engine.module.state_dict()
    for key, value in harness_state["emas"]["ema_std0.05"].items():
        assert torch.equal(loaded[key], value), key
    wrong = run(compose_run("method=ect", "model=unet-s", f"init_from={tmp_path / 'src'}", "trainer.steps=1",
                            run_dir="wrong"))
    assert wrong["status"].startswith("failed: ValueError: ") and "does not match this model" in wrong["status"]
    unfinished = run(compose_run("method=ect", f"init_from={tmp_path / 'wrong'}", "trainer.steps=1", run_dir="u"))
    assert "has not completed (status: failed: ValueError" in unfinished["status"]
