"""Exact sample-based distances for 2-D data: the energy distance and the sliced Wasserstein distance.

Both compare the generated points with the held-out points directly (no features, no Gaussian
assumption, no Monte Carlo): the energy distance from all pairwise distances, the sliced Wasserstein
distance from exact 1-D optimal transport on evenly spaced projection angles.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from harness.eval.metrics import Metric, MetricError, training_subset

_BLOCK = 2048   # rows per block of pairwise distances (bounds memory at _BLOCK x m doubles)


def mean_pairwise_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """E ||a_i - b_j|| over all pairs (i, j), in float64, blockwise."""
    a, b = a.double().reshape(len(a), -1), b.double().reshape(len(b), -1)
    total = 0.0
    for start in range(0, len(a), _BLOCK):
        d = torch.cdist(a[start:start + _BLOCK], b, compute_mode="donot_use_mm_for_euclid_dist")
        total += float(d.sum())
    return total / (len(a) * len(b))


def energy_distance(a: torch.Tensor, b: torch.Tensor, bb: float | None = None) -> float:
    """D^2 = 2 E||X - Y|| - E||X - X'|| - E||Y - Y'|| [Szekely & Rizzo 2013, eq. 2], V-statistics (all
    pairs, self-pairs included), so D^2 >= 0 and D^2(a, a) = 0; `bb` = E||Y - Y'|| when precomputed."""
    bb = mean_pairwise_distance(b, b) if bb is None else bb
    return 2.0 * mean_pairwise_distance(a, b) - mean_pairwise_distance(a, a) - bb


def wasserstein_1d(u: np.ndarray, v: np.ndarray, p: int = 2) -> np.ndarray:
    """Exact W_p^p between empirical distributions (uniform weights) along the last axis, rows batched:
    the integral over q in (0, 1) of |F_u^-1(q) - F_v^-1(q)|^p, piecewise constant between the
    breakpoints {i/n} and {j/m} of the two quantile functions."""
    u, v = np.sort(u, axis=-1), np.sort(v, axis=-1)
    n, m = u.shape[-1], v.shape[-1]
    q = np.union1d(np.arange(n + 1) / n, np.arange(m + 1) / m)
    mid, width = (q[:-1] + q[1:]) / 2, np.diff(q)
    iu = np.minimum((mid * n).astype(np.int64), n - 1)
    iv = np.minimum((mid * m).astype(np.int64), m - 1)
    return (np.abs(u[..., iu] - v[..., iv]) ** p * width).sum(axis=-1)


def projection_angles(num: int) -> np.ndarray:
    """`num` unit directions at angles pi k / num, k = 0..num-1: an even quadrature of the half circle."""
    theta = math.pi * np.arange(num) / num
    return np.stack([np.cos(theta), np.sin(theta)], axis=1)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, num_projections: int = 256) -> float:
    """SW_2 = (mean over directions w of W_2^2(<a, w>, <b, w>))^(1/2) [Bonneel et al. 2015, eq. 4]."""
    a, b = a.double().numpy(), b.double().numpy()
    w = projection_angles(num_projections)
    return float(math.sqrt(wasserstein_1d(w @ a.T, w @ b.T, p=2).mean()))


class _PointMetric(Metric):
    """A distance between generated and held-out 2-D points; floor: as many training points as samples
    against the same held-out set."""

    def _distance(self, x: torch.Tensor) -> float:
        raise NotImplementedError

    def _check(self) -> None:
        if self.data.heldout_x.ndim != 2 or len(self.data.heldout_x) < 2:
            raise MetricError(f"{self.name} needs 2-D points with a held-out set; {self.data.name} has "
                              f"held-out {list(self.data.heldout_x.shape)}: set data.heldout")

    def _prepare(self) -> None:
        self.ref = self.data.heldout_x.double()
        self.reference_size = len(self.ref)
        self._setup()
        self.floor_size = min(self.ecfg.num_samples, len(self.data.x))
        self.floor = self._distance(training_subset(self.data, self.floor_size))

    def _setup(self) -> None:
        pass

    def __call__(self, x: torch.Tensor) -> float:
        self.prepare()
        return self._distance(x.reshape(len(x), -1))

    def protocol(self) -> dict:
        return {"metric": self.name, "feature_extractor": "none (2-D points)", "mode": None,
                "reference": f"{self.data.name} held-out ({self.reference_size})",
                "reference_size": self.reference_size,
                "floor_set": f"{self.floor_size} training points (fixed subset, seed 0) vs the reference"}


class EnergyDistance(_PointMetric):
    name = "energy"

    def _setup(self) -> None:
        self.bb = mean_pairwise_distance(self.ref, self.ref)   # the reference's term, once

    def _distance(self, x: torch.Tensor) -> float:
        return energy_distance(x, self.ref, self.bb)

    def protocol(self) -> dict:
        return {**super().protocol(), "estimator": "V-statistic, all pairs, Euclidean, squared energy distance"}


class SlicedWasserstein(_PointMetric):
    name = "sliced_wasserstein"

    def _distance(self, x: torch.Tensor) -> float:
        return sliced_wasserstein(x, self.ref, self.ecfg.sw_projections)

    def protocol(self) -> dict:
        return {**super().protocol(), "estimator": f"SW_2, exact 1-D transport on {self.ecfg.sw_projections} "
                                                   f"evenly spaced directions in [0, pi)"}
