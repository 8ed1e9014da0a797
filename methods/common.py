"""Shared math for the methods: time samplers, discretizations, distances and weightings."""
from __future__ import annotations

import math
from typing import Callable

import torch


def lognormal_t(n: int, p_mean: float, p_std: float, generator: torch.Generator,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """ln t ~ N(P_mean, P_std^2), not clipped [EDM; ECT §3.2]."""
    z = torch.randn(n, generator=generator, device=device, dtype=torch.float32)
    return (p_mean + p_std * z).exp()


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0, descending: bool = True) -> torch.Tensor:
    """Karras et al. 2022 eq. 5 grid with n points (float64); ascending on request [ECT spec A3]."""
    i = torch.arange(n, dtype=torch.float64)
    frac = i / max(n - 1, 1)
    inv = 1.0 / rho
    sig = (sigma_max ** inv + frac * (sigma_min ** inv - sigma_max ** inv)) ** rho
    return sig if descending else sig.flip(0)


def per_sample_sq(delta: torch.Tensor) -> torch.Tensor:
    """||delta||_2^2 per sample: the sum over all non-batch elements, not the mean [ECT code]."""
    return delta.float().pow(2).reshape(delta.shape[0], -1).sum(dim=1)


def pseudo_huber(delta: torch.Tensor, c: float) -> torch.Tensor:
    """sqrt(||delta||^2 + c^2) - c per sample [iCT; ECT eq. 19 corrected, spec A5]; c = 0 gives ||delta||."""
    sq = per_sample_sq(delta)
    return (sq + c * c).sqrt() - c if c > 0 else sq.sqrt()


def adaptive_distance(delta: torch.Tensor, c: float, p: float) -> torch.Tensor:
    """ECT eq. 16: w(delta) ||delta||^2 with w = 1/(||delta||^2 + c^2)^p, w held constant.

    p = 1/2 is computed as pseudo-Huber, whose gradient is the same (ECT eq. 20); other p use
    (1/2)||delta||^2 / sg(||delta||^2 + c^2)^p, the form with that same gradient (p = 0: (1/2) l2^2).
    """
    if p == 0.5:
        return pseudo_huber(delta, c)
    sq = per_sample_sq(delta)
    return 0.5 * sq / (sq.detach() + c * c).pow(p)


def huber_c_for_dim(dim: int) -> float:
    """iCT's pseudo-Huber constant c = 0.00054 sqrt(d) [iCT §3.3]."""
    return 0.00054 * math.sqrt(dim)


# Timestep weightings wbar(t, r) studied by ECT (Table E3) plus 1/(t - r + delta) of SCT.
WEIGHTINGS: dict[str, Callable[..., torch.Tensor]] = {
    "uniform": lambda t, r, sd, delta: torch.ones_like(t),
    "inv_t": lambda t, r, sd, delta: 1.0 / t,
    "inv_dt": lambda t, r, sd, delta: 1.0 / (t - r),
    "inv_dt_delta": lambda t, r, sd, delta: 1.0 / (t - r + delta),
    "inv_t_plus_inv_sd": lambda t, r, sd, delta: 1.0 / t + 1.0 / sd,
    "inv_t2": lambda t, r, sd, delta: 1.0 / t ** 2,
    "inv_t2_plus_one": lambda t, r, sd, delta: 1.0 / t ** 2 + 1.0,
    "inv_t2_plus_inv_sd2": lambda t, r, sd, delta: 1.0 / t ** 2 + 1.0 / sd ** 2,   # EDM weighting
    "inv_t2_sd2": lambda t, r, sd, delta: 1.0 / (t ** 2 + sd ** 2),
}


def weighting(name: str, t: torch.Tensor, r: torch.Tensor, sigma_data: float,
              delta: float = 0.0) -> torch.Tensor:
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting '{name}'; valid: {', '.join(WEIGHTINGS)}")
    return WEIGHTINGS[name](t, r, sigma_data, delta)


def check_choice(what: str, value: str, valid) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} '{value}'; valid: {', '.join(valid)}")


def drop_labels(y: torch.Tensor | None, num_classes: int, p: float,
                generator: torch.Generator) -> torch.Tensor | None:
    """Labels as float one-hot rows, each replaced by the all-zero "no class" row with probability p:
    classifier-free guidance training (Ho & Salimans 2022; sCM App. G.2 teachers use p = 0.1)."""
    if y is None or p == 0:
        return y
    onehot = torch.nn.functional.one_hot(y.long(), num_classes).float()
    keep = torch.rand(y.shape[0], generator=generator, device=generator.device) >= p
    return onehot * keep.to(onehot.device, onehot.dtype)[:, None]


def check_label_dropout(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"method.label_dropout must lie in [0, 1), got {p}")
