"""Samplers shared by the methods: multistep consistency sampling and EDM's Heun solver."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from methods.common import karras_sigmas

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (x [B, ...], t [B]) -> x0 estimate


def consistency_times(steps: int, sigma_max: float, mid_t: Sequence[float],
                      sigma_min: float = 0.002, rho: float = 7.0) -> list[float]:
    """Time grid of an n-step consistency sampler.

    1 step: [T]; n - 1 == len(mid_t): [T, *mid_t] (the paper's mid-points, e.g. 0.821 on CIFAR-10);
    otherwise the first n points of a Karras (rho) grid of n + 1 points from T to sigma_min.
    """
    if steps < 1:
        raise ValueError(f"sampler steps must be >= 1, got {steps}")
    if steps == 1:
        return [sigma_max]
    if steps - 1 == len(mid_t):
        return [sigma_max, *mid_t]
    return karras_sigmas(steps + 1, sigma_min, sigma_max, rho).tolist()[:steps]


@torch.no_grad()
def consistency_sample(f: Denoiser, noise: torch.Tensor, times: Sequence[float],
                       generator: torch.Generator | None = None, sigma_min: float = 0.0) -> torch.Tensor:
    """CM multistep sampling [CM Alg. 1]: denoise, re-noise to the next time with fresh noise, repeat.

    Re-noising uses sqrt(t^2 - sigma_min^2) (sigma_min = 0: plain t, as ECT's code does).
    """
    batch = noise.shape[0]
    x = f(noise.float() * times[0], torch.full((batch,), times[0], device=noise.device))
    for t in times[1:]:
        z = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=torch.float32)
        x = x + (t * t - sigma_min * sigma_min) ** 0.5 * z
        x = f(x, torch.full((batch,), t, device=noise.device))
    return x


@torch.no_grad()
def heun_sample(denoise: Denoiser, noise: torch.Tensor, steps: int, sigma_min: float = 0.002,
                sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM's deterministic Heun sampler [EDM Alg. 1] over `steps` Karras points (2 steps - 1 NFE).

    The ODE dx/dt = (x - D(x, t)) / t is solved in float64 between network calls.
    """
    batch = noise.shape[0]
    sig = karras_sigmas(steps, sigma_min, sigma_max).tolist() + [0.0]
    x = noise.double() * sig[0]

    def d(x, t):
        return (x - denoise(x.float(), torch.full((batch,), t, device=x.device)).double()) / t

    for t_cur, t_next in zip(sig[:-1], sig[1:]):
        slope = d(x, t_cur)
        x_next = x + (t_next - t_cur) * slope
        if t_next > 0:
            x_next = x + (t_next - t_cur) * 0.5 * (slope + d(x_next, t_next))
        x = x_next
    return x.float()
