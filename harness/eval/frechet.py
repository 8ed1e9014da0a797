"""Frechet distance between feature sets or their Gaussian statistics, through clean-fid's Frechet code."""
from __future__ import annotations

import numpy as np
import torch


def stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of a feature set (rows = samples), in float64 as clean-fid's fid_from_feats."""
    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_from_stats(mu_a, s_a, mu_b, s_b) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) [Heusel et al. 2017, eq. 6], clean-fid's code."""
    from cleanfid.fid import frechet_distance as fd
    return float(fd(np.asarray(mu_a, np.float64), np.asarray(s_a, np.float64),
                    np.asarray(mu_b, np.float64), np.asarray(s_b, np.float64)))


def frechet_distance(a, b) -> float:
    """The Frechet distance of two feature sets (rows = samples)."""
    return frechet_from_stats(*stats(a), *stats(b))
