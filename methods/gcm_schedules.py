"""GCM's time functions [spec gcm_ct_ict_cd.md A.3-A.7]: the step h(t) = t - r, the time conditioning
c(t), the loss weight w(t), and the samplers of t (sine, cosh, uniform on [0, 1]) and of the upper limit s
(uniform-power). Densities and inverse CDFs are computed in float64 (arccos near 1 loses digits in
float32) and returned as float32."""
from __future__ import annotations

import math

import torch

DISCRETIZATIONS = ("const", "exp")
TIME_CONDS = ("identity", "exp")
LOSS_WEIGHTS = ("uniform", "gamma")
T_SAMPLERS = ("uniform", "sine", "cosh")


def step_h(t: torch.Tensor, kind: str, eps: float, mu: float) -> torch.Tensor:
    """h(t) = t - r: constant eps (Config A, Eq. 26) or eps exp(-mu t) (Eq. 36, G §3.2)."""
    if kind == "const":
        return torch.full_like(t, eps)
    return eps * torch.exp(-mu * t)


def time_cond(t: torch.Tensor, kind: str, mu: float) -> torch.Tensor:
    """The network's time input: t (Config A) or c(t) = (exp(mu t) - 1)/mu (G §3.2 Eq. 9, App. C.4)."""
    if kind == "identity":
        return t
    return torch.expm1(mu * t) / mu


def loss_weight(t: torch.Tensor, kind: str, gamma: float, lam: float) -> torch.Tensor:
    """w(t) = 1 (Config A) or the Gamma shape t^gamma exp(-lambda t) (G Eq. 14)."""
    if kind == "uniform":
        return torch.ones_like(t)
    return t.pow(gamma) * torch.exp(-lam * t)


# -- the density of tau in [0, 1] (t = s + (tT - s) tau) -------------------------------------------
def _sine_consts(a: float, b: float) -> tuple[float, float]:
    cb, ca = math.cos(math.pi * b / 2), math.cos(math.pi * a / 2)
    return cb, cb - ca


def tau_pdf(tau: torch.Tensor, kind: str, a: float, b: float) -> torch.Tensor:
    """p(tau) on [0, 1]: uniform, p_sine (G Eq. 15) or p_cosh (G Eq. 16)."""
    x = tau.double()
    if kind == "uniform":
        return torch.ones_like(tau)
    if kind == "sine":
        _, span = _sine_consts(a, b)
        p = math.pi * (a - b) / (2 * span) * torch.sin(math.pi / 2 * (a * x + b * (1 - x)))
    else:
        p = (a - b) / (math.sinh(a) - math.sinh(b)) * torch.cosh(a * x + b * (1 - x))
    return p.to(tau.dtype)


def tau_cdf(tau: torch.Tensor, kind: str, a: float, b: float) -> torch.Tensor:
    """F(tau), the integral of tau_pdf from 0 (G App. E.1)."""
    x = tau.double()
    if kind == "uniform":
        return tau.clone()
    if kind == "sine":
        cb, span = _sine_consts(a, b)
        f = (cb - torch.cos(math.pi / 2 * ((a - b) * x + b))) / span
    else:
        f = (torch.sinh(a * x + b * (1 - x)) - math.sinh(b)) / (math.sinh(a) - math.sinh(b))
    return f.to(tau.dtype)


def tau_icdf(u: torch.Tensor, kind: str, a: float, b: float) -> torch.Tensor:
    """tau = F^{-1}(u): the sine inverse CDF (G Eq. 41) or the cosh one (G Eq. 42)."""
    x = u.double()
    if kind == "uniform":
        return u.clone()
    if kind == "sine":
        cb, span = _sine_consts(a, b)
        tau = 2 / (math.pi * (a - b)) * (torch.arccos((cb - x * span).clamp(-1, 1)) - math.pi * b / 2)
    else:
        sa, sb = math.sinh(a), math.sinh(b)
        tau = (torch.arcsinh(sb + x * (sa - sb)) - b) / (a - b)
    return tau.clamp(0, 1).to(u.dtype)


def uniform_power_unit(u: torch.Tensor, v: torch.Tensor, nu: float) -> torch.Tensor:
    """s in [0, 1] from p_up(s; nu) = nu int_s^1 (1/tau)(1 - s/tau)^(nu - 1) dtau: s = u (1 - (1 - v)^(1/nu)),
    i.e. u times a Beta(1, nu) draw (G Eq. 17, App. E.2); E[s] = 1/(2 (nu + 1))."""
    return u * (1 - (1 - v).pow(1.0 / nu))
