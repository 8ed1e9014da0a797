"""The trainer's wiring on one tiny CPU run (digits, unet-xs, a checkpoint every step): (a) every EMA it
keeps equals, after every step, the EMA recomputed here from the weights captured after each optimizer
step, with the formulas written from the papers; (b) with keep_checkpoints = k and more than k
checkpoints written, exactly the k newest remain."""
import math

import pytest
import torch

from harness.train import checkpoint
from harness.config import compose
from harness.train.cli import run
from harness.train.trainer import Trainer

STEPS = 5
KEEP = 2                # keep_checkpoints; STEPS checkpoints are written (one per step), so STEPS > KEEP
# Traditional EMA p_ema <- beta p_ema + (1 - beta) p [ECT App. C; spec ect_sct.md 3.5]; 0.9 and 0.5 are short
# enough to move visibly within STEPS steps.
BETAS = (0.9, 0.5)
# EDM2 power-function EMAs by sigma_rel: 0.05 is the trainer default (harness/config/__init__.py); 0.2 gives gamma ~ 1.8,
# where beta_t = (1 - 1/t)^(gamma + 1) is far from 0 at t = 2..5, so the exponent shows in a 5-step run.
STDS = (0.05, 0.2)
NAMES = {"ema_beta0.9", "ema_beta0.5", "ema_std0.05", "ema_std0.2"}
TOL = {"rtol": 1e-5, "atol": 1e-6}          # the trainer's EMAs are fp32, the recomputation float64


def gamma_for_std(std: float) -> float:
    """EDM2 eq. 3, sigma_rel = sqrt((g + 1) / ((g + 2)^2 (g + 3))), solved for g >= 0 by bisection (it
    decreases in g there)."""
    def sigma_rel(g):
        return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))
    lo, hi = 0.0, 1e4
    assert sigma_rel(hi) < std < sigma_rel(lo)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if sigma_rel(mid) > std else (lo, mid)
    return 0.5 * (lo + hi)


def power_beta(update: int, gamma: float) -> float:
    """EDM2 eq. 2 (phema): beta_t = (1 - 1/t)^(gamma + 1) at update t = 1, 2, ... (t = step + 1)."""
    return (1.0 - 1.0 / update) ** (gamma + 1.0)


def _params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().double().clone() for k, v in module.named_parameters()}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One STEPS-step CT run with every EMA kind, a checkpoint every step and keep_checkpoints = KEEP;
    records the initial weights, the weights and EMAs after each step, and checkpoints/ after each save."""
    run_dir = tmp_path_factory.mktemp("wiring") / "run"
    rec = {"init": None, "weights": [], "emas": [], "after_save": [], "trainer": None, "run_dir": run_dir}
    original_step, original_save = Trainer.step, checkpoint.save

    def recording_step(self, step):
        if rec["init"] is None:
            rec["init"], rec["trainer"] = _params(self.engine.module), self
        out = original_step(self, step)
        assert out is not None, f"step {step} was skipped"
        rec["weights"].append(_params(self.engine.module))
        rec["emas"].append({e.name: _params(e.module) for e in self.emas})
        return out

    def recording_save(*args, **kwargs):
        final = original_save(*args, **kwargs)
        rec["after_save"].append(sorted(p.name for p in checkpoint.checkpoint_dir(run_dir).iterdir()))
        return final

    # the conftest compose_run setup, with a smaller batch; adam at lr 1e-2 so that the weights move
    cfg = compose(["data=digits", "model=unet-xs", "trainer.batch_size=16", "trainer.threads=1",
                   "eval.at_end=false", f"run_dir={run_dir}", "method=ct", "trainer.optimizer=adam",
                   "trainer.lr=1e-2", f"trainer.steps={STEPS}", "trainer.checkpoint_every_steps=1",
                   f"trainer.keep_checkpoints={KEEP}", f"trainer.ema_betas=[{','.join(map(str, BETAS))}]",
                   f"trainer.ema_stds=[{','.join(map(str, STDS))}]"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "step", recording_step)
        mp.setattr(checkpoint, "save", recording_save)
        assert run(cfg)["status"] == "completed"
    return rec


def _reference_emas(rec) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Each EMA after each step, recomputed in float64 from the initial and the per-step weights."""
    blend = {f"ema_beta{b:g}": (lambda step, b=b: b) for b in BETAS}
    blend |= {f"ema_std{s:g}": (lambda step, g=gamma_for_std(s): power_beta(step + 1, g)) for s in STDS}
    out = {}
    for name, beta_at in blend.items():
        ref, out[name] = dict(rec["init"]), []         # every EMA starts as a copy of the initial network
        for step, w in enumerate(rec["weights"]):
            beta = beta_at(step)
            ref = {k: beta * ref[k] + (1.0 - beta) * w[k] for k in ref}
            out[name].append(ref)
    return out


def test_each_ema_equals_the_ema_recomputed_from_the_trained_weights(tiny_run):
    """After every step, each traditional and power-function EMA equals the recurrence recomputed from the
    initial weights and the weights after each step; the EMA buffers follow the network's."""
    weights, init = tiny_run["weights"], tiny_run["init"]
    assert len(weights) == STEPS and {e.name for e in tiny_run["trainer"].emas} == NAMES
    assert max((weights[-1][k] - init[k]).abs().max().item() for k in init) > 1e-2   # the weights moved
    for name, per_step in _reference_emas(tiny_run).items():
        for step, ref in enumerate(per_step):
            got = tiny_run["emas"][step][name]
            for k in ref:
                torch.testing.assert_close(got[k], ref[k], **TOL, msg=f"{name} {k} after step {step}")
    trainer = tiny_run["trainer"]
    net_buffers = dict(trainer.engine.module.named_buffers())
    for e in trainer.emas:
        for k, b in e.module.named_buffers():
            assert torch.equal(b, net_buffers[k]), (e.name, k)


def test_saved_emas_equal_the_recomputed_ema_of_their_step(tiny_run):
    """Each kept checkpoint's harness.pt holds, for every EMA, the recomputed EMA after its own step."""
    refs = _reference_emas(tiny_run)
    for path in checkpoint.list_checkpoints(tiny_run["run_dir"]):
        state = torch.load(path / "harness.pt", weights_only=True)
        step = state["counters"]["step"]
        assert checkpoint.step_name(step) == path.name and set(state["emas"]) == NAMES
        for name, per_step in refs.items():
            for k, ref in per_step[step - 1].items():
                torch.testing.assert_close(state["emas"][name][k].double(), ref, **TOL)


def test_power_ema_exponent_matches_edm2():
    """The bisection above recovers EDM2's tabulated sigma_rel = 0.10 <-> gamma = 6.94 (EDM2 Sec. 3)."""
    assert gamma_for_std(0.10) == pytest.approx(6.94, abs=0.01)


def test_checkpoint_retention_keeps_exactly_the_newest(tiny_run):
    """With a checkpoint every step and keep_checkpoints = KEEP < STEPS, after each save exactly the
    min(saves, KEEP) newest checkpoints remain, and nothing else is left in checkpoints/."""
    after_save = tiny_run["after_save"]
    assert len(after_save) == STEPS > KEEP               # one save per step (the last one by run())
    for written, names in enumerate(after_save, start=1):
        newest = range(written, max(written - KEEP, 0), -1)
        assert names == sorted(checkpoint.step_name(s) for s in newest), f"after save {written}"
    kept = checkpoint.list_checkpoints(tiny_run["run_dir"])
    assert [p.name for p in kept] == [checkpoint.step_name(s) for s in range(STEPS, STEPS - KEEP, -1)]
