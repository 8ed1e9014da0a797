"""Frechet distance between sample sets, through clean-fid's Frechet code."""
from __future__ import annotations

import numpy as np
import torch


def stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(a, b) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets (rows = samples)."""
    from cleanfid.fid import frechet_distance as fd
    mu_a, s_a = stats(a)
    mu_b, s_b = stats(b)
    return float(fd(mu_a, s_a, mu_b, s_b))
