"""EDM-sigma parameterization of a consistency function / denoiser.

f(x_t, t) = c_skip(t) x_t + c_out(t) F(c_in(t) x_t, c_noise(t))   [ECT eq. 7; EDM Table 1]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def as_column(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample t [B] to broadcast against x [B, ...]."""
    return t.reshape(-1, *([1] * (like.ndim - 1)))


@dataclass(frozen=True)
class EDMParam:
    sigma_data: float = 0.5          # ECT App. C
    shift_sigma_min: float = 0.0     # CM's boundary-shifted form at sigma_min (0 = unshifted)

    def c_skip(self, t: torch.Tensor) -> torch.Tensor:
        sd2 = self.sigma_data ** 2
        return sd2 / ((t - self.shift_sigma_min) ** 2 + sd2)

    def c_out(self, t: torch.Tensor) -> torch.Tensor:
        # ECT App. C: c_out = t sd / sqrt(t^2 + sd^2); EDM's denoiser uses the same expression.
        # The shifted CM form replaces the leading t by (t - sigma_min) [CM App. C].
        return (t - self.shift_sigma_min) * self.sigma_data / (t ** 2 + self.sigma_data ** 2).sqrt()

    def c_in(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 / (t ** 2 + self.sigma_data ** 2).sqrt()     # EDM

    def c_noise(self, t: torch.Tensor) -> torch.Tensor:
        return t.log() / 4                                     # EDM

    def denoise(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                class_labels: torch.Tensor | None = None, **net_kwargs) -> torch.Tensor:
        """f_theta(x_t, t) in fp32; t is per-sample [B] and must be > 0."""
        x_t = x_t.float()
        t = t.float()
        tc = as_column(t, x_t)
        F = net(self.c_in(tc) * x_t, self.c_noise(t), class_labels, **net_kwargs)
        return self.c_skip(tc) * x_t + self.c_out(tc) * F.float()
