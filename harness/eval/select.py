"""The sampler protocol's selection set: choices made per scored checkpoint, never on the reported data.

One rule for every method (the study's fairness contract, docs/architecture.md):

- the selection set is a fixed subset of the *training* items (seed 1, as many as the held-out set the
  reported score uses, mirrored copies left out), so a choice never sees the held-out data;
- its samples use their own noise (`eval.seed + SELECTION_SEED_OFFSET`), not the reported score's;
- the 2-step mid-point is searched over one grid of EDM noise levels sigma (x = x0 + sigma z),
  `eval.mid_sigma_grid`, which each method maps to its own time (`Method.time_of_sigma`): sigma for the
  EDM-time CM family, arctan(sigma / sigma_d) for TrigFlow, sigma / (sigma + noise_std) for GCM's
  linear path; the grid point with the lowest selection score wins (ties: the first);
- the selection score of every (EMA, steps) is recorded, and the collector's `ema=best` picks the EMA
  by it, not by the reported score.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Iterator, Sequence

import torch

from harness.eval.metrics import Metric, MetricError, build_metric

SELECTION_SEED = 1            # the training subset (the held-out split and the floor use seed 0)
SELECTION_SEED_OFFSET = 1000  # sampling noise of the selection scores: eval.seed + this


def selection_data(data, size: int = 0, xflip: bool = False):
    """`data` with its held-out set replaced by `size` training items (0 = as many as are held out): a
    fixed random subset (SELECTION_SEED), independent of the run's seed, the mirrored half left out."""
    n_real = len(data.x) // 2 if xflip else len(data.x)
    size = size or len(data.heldout_x) or min(n_real, 1000)
    if not 2 <= size <= n_real:
        raise ValueError(f"eval.selection_size={size} must be in [2, {n_real}] (the real training items)")
    idx = torch.randperm(n_real, generator=torch.Generator().manual_seed(SELECTION_SEED))[:size]
    labels = data.y[idx] if data.y is not None else None
    return dataclasses.replace(data, heldout_x=data.x[idx], heldout_y=labels)


def build_selection_metric(ecfg, data, device, data_cfg=None) -> Metric:
    """The reported metric (same features, same sample count) against the selection set instead."""
    xflip = bool(getattr(data_cfg, "xflip", False))
    sel_cfg = copy.deepcopy(ecfg)
    sel_cfg.selection = False
    if hasattr(sel_cfg, "fid_reference"):
        sel_cfg.fid_reference = "heldout"          # FID: statistics of the selection images themselves
    try:
        sel_data = selection_data(data, int(getattr(ecfg, "selection_size", 0)), xflip)
    except ValueError as exc:
        raise MetricError(str(exc)) from None
    return build_metric(sel_cfg, sel_data, device, data_cfg)


def selection_reference(selection: Metric) -> str:
    """What a selection metric (build_selection_metric) scores against, for the record."""
    return (f"{len(selection.data.heldout_x)} training items (fixed subset, seed {SELECTION_SEED}"
            f"{', mirrored copies left out' if selection.xflip else ''}), samples seeded eval.seed + "
            f"{SELECTION_SEED_OFFSET}")


def searchable(method, steps: int) -> bool:
    """Whether the 2-step mid-point search applies: a consistency sampler with a mid-point list."""
    return steps == 2 and isinstance(getattr(getattr(method, "cfg", None), "mid_t", None), (list, tuple))


@contextlib.contextmanager
def mid_times(method, mid_t: Sequence[float] | None) -> Iterator[None]:
    """Sample with `mid_t` as the method's mid-points for the duration (None: leave them alone)."""
    if mid_t is None:
        yield
        return
    saved = method.cfg
    method.cfg = dataclasses.replace(saved, mid_t=[float(t) for t in mid_t])
    try:
        yield
    finally:
        method.cfg = saved


def finite_or_inf(value: float) -> float:
    return value if math.isfinite(value) else math.inf
