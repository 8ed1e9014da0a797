"""Exponential moving averages of the weights: traditional and EDM2 power-function EMAs."""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn


def std_to_exp(std: float) -> float:
    """EDM2 eq. 3 inverted: gamma with sigma_rel^2 = (g + 1) / ((g + 2)^2 (g + 3)), the real root of
    g^3 + 7 g^2 + (16 - 1/s^2) g + (12 - 1/s^2) = 0."""
    inv = std ** -2
    return float(np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv]).real.max())


def ema_name(beta: float | None = None, std: float | None = None) -> str:
    return f"ema_beta{beta:g}" if beta is not None else f"ema_std{std:g}"


class EMA:
    """One EMA of a network, kept as an fp32 copy of the module (usable directly for sampling).

    Traditional: p_ema <- beta p_ema + (1 - beta) p [ECT App. C].
    Power function: beta_t = (1 - 1/t)^(gamma + 1) at update t = step + 1 [EDM2 eq. 2, phema].
    """

    def __init__(self, net: nn.Module, beta: float | None = None, std: float | None = None):
        if (beta is None) == (std is None):
            raise ValueError("an EMA has either a beta (traditional) or a std (power function)")
        self.beta, self.std = beta, std
        self.gamma = std_to_exp(std) if std is not None else None
        self.name = ema_name(beta=beta, std=std)
        self.module = copy.deepcopy(net).float().eval().requires_grad_(False)
        self._params = list(self.module.parameters())
        self._buffers = list(self.module.buffers())

    def beta_at(self, step: int) -> float:
        if self.beta is not None:
            return self.beta
        return (1.0 - 1.0 / (step + 1)) ** (self.gamma + 1.0)

    @torch.no_grad()
    def update(self, net: nn.Module, step: int) -> None:
        """Blend in the weights after optimizer step `step` (0-based)."""
        src = [p.detach().float() for p in net.parameters()]
        torch._foreach_lerp_(self._params, src, 1.0 - self.beta_at(step))
        for b_ema, b in zip(self._buffers, net.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


def make_emas(net: nn.Module, betas, stds) -> list[EMA]:
    return [EMA(net, beta=float(b)) for b in betas] + [EMA(net, std=float(s)) for s in stds]
