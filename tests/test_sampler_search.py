"""The sampler protocol (harness.eval.select): the selection set, the shared sigma unit and the search.

What a user relies on: the 2-step mid-point and the EMA are chosen on training items, never on the
held-out set the reported score uses; the grid means the same noise level for every method; the chosen
value, the grid and every tried score are in the record."""
import dataclasses
import math

import pytest
import torch
from omegaconf import OmegaConf

import methods
from harness.config import ConfigError, EvalConfig, compose
from harness.data import DataConfig, load_dataset
from harness.eval.metrics import MetricError, build_metric
from harness.eval.score import score
from harness.eval.select import SELECTION_SEED_OFFSET, build_selection_metric, selection_data


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig(name="digits"))


def _rows(t):
    return {tuple(r) for r in t.reshape(len(t), -1).tolist()}


def test_selection_set_is_training_items_disjoint_from_the_heldout_set(digits):
    sel = selection_data(digits)
    assert len(sel.heldout_x) == len(digits.heldout_x) == 297                  # as many as the report uses
    assert _rows(sel.heldout_x) <= _rows(digits.x)                              # training items ...
    assert not _rows(sel.heldout_x) & _rows(digits.heldout_x)                   # ... none of them held out
    assert torch.equal(selection_data(digits).heldout_x, sel.heldout_x)         # fixed, whatever the run
    assert len(selection_data(digits, 50).heldout_x) == 50
    mirrored = dataclasses.replace(digits, x=torch.cat([digits.x, digits.x.flip(-1)]))
    real = _rows(digits.x)
    assert _rows(selection_data(mirrored, 400, xflip=True).heldout_x) <= real   # mirrored copies left out
    with pytest.raises(ValueError, match=r"eval.selection_size=5000 must be in \[2, 1500\]"):
        selection_data(digits, 5000)


@pytest.mark.parametrize("name,sigma_of_t", [
    ("ect", lambda m, t: t),                                                   # EDM: x = x0 + t z
    ("sct", lambda m, t: m.cfg.sigma_data * math.tan(t)),                      # TrigFlow: x/cos t = x0 + sd tan t z
    ("gcm", lambda m, t: m.cfg.noise_std * t / (1 - t)),                       # linear: x/(1-t) = x0 + ns t/(1-t) z
])
def test_time_of_sigma_is_the_time_with_that_noise_level(name, sigma_of_t):
    cls = methods.get(name)
    m = cls(cls.Config(), (1, 8, 8), 0)
    for sigma in (0.05, 0.4, 1.5, 6.4):
        assert sigma_of_t(m, m.time_of_sigma(sigma)) == pytest.approx(sigma, rel=1e-12)


@dataclasses.dataclass
class _Cfg:
    mid_t: list


class _StandIn:
    """A 'method' whose 2-step samples are held-out digits plus noise of std |log2(mid_t / best)|: the
    selection score is lowest at mid_t = best, so the search must pick it. Records the seeds it saw."""
    name = "stand_in"

    def __init__(self, data, best):
        self.cfg, self.data, self.best, self.seeds = _Cfg([0.821]), data, best, []

    def default_steps(self):
        return 2

    def nfe(self, steps):
        return steps

    def time_of_sigma(self, sigma):
        return 2.0 * sigma                    # a method whose time is twice the EDM sigma

    def sample(self, net, noise, steps, labels=None, generator=None):
        self.seeds.append(len(noise))
        spread = abs(math.log2(self.cfg.mid_t[0] / self.best)) if steps == 2 else 1.0
        base = self.data.x[: len(noise)]
        return base + spread * noise


def test_search_picks_the_grid_point_with_the_best_selection_score(digits):
    ecfg = OmegaConf.structured(EvalConfig(num_samples=300, batch_size=300, metric="pixel_fd", selection=True,
                                           mid_sigma_grid=[0.25, 0.5, 1.0, 2.0], steps=[1, 2]))
    method = _StandIn(digits, best=2.4)       # grid times 0.5, 1, 2, 4: t = 2 (sigma 1) is nearest in log
    recs = {r["steps"]: r for r in score(method, {"ema": torch.nn.Identity()}, digits, ecfg, "cpu", 7)}
    two = recs[2]
    assert two["mid_sigma"] == 1.0 and two["mid_t"] == [2.0]
    assert two["mid_sigma_grid"] == [0.25, 0.5, 1.0, 2.0]
    tried = two["mid_sigma_tried"]
    assert len(tried) == 4 and tried.index(min(tried)) == 2 and two["selection_value"] == min(tried)
    assert method.cfg.mid_t == [0.821]                                   # the method is left as it was
    # the reported value is the held-out score of the chosen sampler with the reported seed: recompute it
    metric = build_metric(ecfg, digits)
    noise = torch.randn((300, 1, 8, 8), generator=torch.Generator().manual_seed(ecfg.seed))
    expect = metric(digits.x[:300] + abs(math.log2(2.0 / 2.4)) * noise)
    assert two["value"] == pytest.approx(expect, rel=1e-9)
    assert "mid_sigma" not in recs[1] and "mid_t" not in recs[1]          # nothing to choose at 1 step
    # the selection score: the selection set's metric, on samples of their own noise (eval.seed + 1000)
    sel_noise = torch.randn((300, 1, 8, 8), generator=torch.Generator().manual_seed(ecfg.seed + 1000))
    selection = build_selection_metric(ecfg, digits, "cpu")
    assert recs[1]["selection_value"] == pytest.approx(selection(digits.x[:300] + sel_noise), rel=1e-9)
    assert recs[1]["selection_value"] != pytest.approx(metric(digits.x[:300] + sel_noise), rel=1e-3)
    assert f"eval.seed + {SELECTION_SEED_OFFSET}" in two["selection_reference"]


def test_selection_scores_use_eval_selection_samples(digits):
    ecfg = OmegaConf.structured(EvalConfig(num_samples=400, batch_size=400, metric="pixel_fd", selection=True,
                                           selection_samples=150, mid_sigma_grid=[0.5, 1.0], steps=[2]))
    method = _StandIn(digits, best=2.0)
    (rec,) = score(method, {"ema": torch.nn.Identity()}, digits, ecfg, "cpu", 0)
    assert method.seeds == [150, 150, 400] and rec["selection_samples"] == 150 and rec["num_samples"] == 400


def test_without_a_grid_the_fixed_mid_point_is_used_and_recorded(digits):
    ecfg = OmegaConf.structured(EvalConfig(num_samples=200, metric="pixel_fd", steps=[2]))
    (rec,) = score(_StandIn(digits, best=0.821), {"ema": torch.nn.Identity()}, digits, ecfg, "cpu", 0)
    assert rec["mid_t"] == [0.821] and "selection_value" not in rec and "mid_sigma" not in rec


def test_grid_without_selection_and_bad_grids_are_refused_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises((ConfigError, MetricError), match="eval.mid_sigma_grid needs eval.selection=true"):
        compose(["method=ect", "model=unet-xs", "eval.mid_sigma_grid=[0.5,1.0]", f"run_dir={run_dir}"])
    with pytest.raises((ConfigError, MetricError), match="positive finite EDM noise levels"):
        compose(["method=ect", "model=unet-xs", "eval.selection=true", "eval.mid_sigma_grid=[0.5,-1.0]",
                 f"run_dir={run_dir}"])
    assert not run_dir.exists()
