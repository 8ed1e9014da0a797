"""The CT / iCT / CD sampler (methods/cm.py DiscreteCM.sample) against a 1- and 2-step sample written out by
hand on a stand-in network whose raw output is a fixed affine function of its input, so that every
denoiser output is a closed-form expression of the noise.

The hand version (float64) follows CM Alg. 1 and CM App. C directly: x_T = T z_0; x0 = clip(f(x_T, T));
x_tau = x0 + sqrt(tau^2 - eps^2) z_1; x0 = clip(f(x_tau, tau)), with the boundary-shifted
f(x, t) = c_skip(t) x + c_out(t) F(c_in(t) x, c_noise(t)). The sampler runs the network in fp32, so the
two agree to fp32 rounding, not bit for bit.
"""
import math

import pytest
import torch
from torch import nn

import methods

SHAPE = (1, 4, 4)
BATCH = 8
SIGMA_DATA = 0.5        # CM App. C
SIGMA_MIN = 0.002       # epsilon, the boundary [CM App. C]
SIGMA_MAX = 80.0        # T [CM App. C]
MID_T = 0.821           # the 2-step mid-point, the CMConfig default (iCT, CIFAR-10)
# A mid-point near sigma_min, where sqrt(tau^2 - eps^2) and tau differ by 2% (at 0.821 only by 2.4e-6, below fp32
# rounding): pins the re-noising scale of CM Alg. 1.
MID_NEAR_EPS = 0.01
# The stand-in F(x_in, c_noise) = A x_in + B + C c_noise: with A = 3 the denoised value is ~1.5 z at T and
# ~1.6 x at tau, so a good share of the entries leave [-1, 1] at both steps and the clamp changes them.
A, B, C = 3.0, 0.2, -0.4
NOISE_SEED, SAMPLER_SEED = 11, 12


class AffineNet(nn.Module):
    """F(x_in, c_noise) = A x_in + B + C c_noise per entry: no parameters, known output."""

    def forward(self, x, c_noise, class_labels=None):
        return A * x + B + C * c_noise.reshape(-1, *([1] * (x.ndim - 1)))


def f_by_hand(x: torch.Tensor, t: float, shift: float) -> torch.Tensor:
    """f(x, t) = c_skip x + c_out F(c_in x, c_noise), CM App. C (shift = sigma_min) / EDM Table 1 (shift = 0)."""
    sd2 = SIGMA_DATA ** 2
    c_skip = sd2 / ((t - shift) ** 2 + sd2)
    c_out = (t - shift) * SIGMA_DATA / math.sqrt(t ** 2 + sd2)
    c_in = 1.0 / math.sqrt(t ** 2 + sd2)
    c_noise = math.log(t) / 4
    return c_skip * x + c_out * (A * (c_in * x) + B + C * c_noise)


def sample_by_hand(noise: torch.Tensor, steps: int, clip: bool, shift: float, seed: int,
                   mid: float = MID_T) -> torch.Tensor:
    """CM Alg. 1 with times [T] (1 step) or [T, mid] (2 steps), in float64."""
    times = [SIGMA_MAX] if steps == 1 else [SIGMA_MAX, mid]
    renoise = torch.Generator().manual_seed(seed)       # the sampler draws z_1 .. z_{n-1} from its generator
    x = noise.double() * times[0]
    for k, t in enumerate(times):
        if k > 0:
            z = torch.randn(noise.shape, generator=renoise, dtype=torch.float32).double()
            x = x + math.sqrt(t ** 2 - SIGMA_MIN ** 2) * z
        x = f_by_hand(x, t, shift)
        if clip:
            x = x.clamp(-1.0, 1.0)
    return x


def _method(name: str, **overrides):
    cls = methods.get(name)
    cfg = cls.Config(**{**cls.PRESETS["tiny"], "distance": "l2", **overrides})
    assert cfg.sigma_min == SIGMA_MIN and cfg.sigma_max == SIGMA_MAX
    assert cfg.mid_t == overrides.get("mid_t", [MID_T])
    return cls(cfg, SHAPE, 0)


def _noise() -> torch.Tensor:
    return torch.randn(BATCH, *SHAPE, generator=torch.Generator().manual_seed(NOISE_SEED))


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("name", ["ct", "ict", "cd"])
def test_sample_equals_the_hand_written_sample(name, steps):
    """1- and 2-step samples with the default clamp equal the hand computation (boundary-shifted c_skip,
    c_out; re-noising with sqrt(tau^2 - eps^2) and the generator's next draw); the clamp is active."""
    method = _method(name)
    noise = _noise()
    got = method.sample(AffineNet(), noise, steps, None, torch.Generator().manual_seed(SAMPLER_SEED))
    want = sample_by_hand(noise, steps, clip=True, shift=SIGMA_MIN, seed=SAMPLER_SEED)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    unclipped = sample_by_hand(noise, steps, clip=False, shift=SIGMA_MIN, seed=SAMPLER_SEED)
    outside = unclipped.abs() > 1.0 + 1e-3
    assert 0.2 < outside.double().mean() < 0.8           # the stand-in makes the clamp matter, not saturate
    assert got.abs().max() <= 1.0


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("name", ["ct", "ict", "cd"])
def test_sample_without_clip_equals_the_unclipped_hand_sample(name, steps):
    """clip_denoised=False: the same sample without the clamp (so values outside [-1, 1] survive)."""
    method = _method(name, clip_denoised=False)
    noise = _noise()
    got = method.sample(AffineNet(), noise, steps, None, torch.Generator().manual_seed(SAMPLER_SEED))
    want = sample_by_hand(noise, steps, clip=False, shift=SIGMA_MIN, seed=SAMPLER_SEED)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert got.abs().max() > 1.5


def test_two_step_sample_uses_the_unshifted_form_when_boundary_shift_is_off():
    """boundary_shift=False: c_skip and c_out without the sigma_min shift (EDM form), and the hand sample with
    the shifted form is measurably different, so the shift is what the 2-step comparison pins."""
    method = _method("ct", boundary_shift=False, clip_denoised=False)
    noise = _noise()
    got = method.sample(AffineNet(), noise, 2, None, torch.Generator().manual_seed(SAMPLER_SEED))
    want = sample_by_hand(noise, 2, clip=False, shift=0.0, seed=SAMPLER_SEED)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    shifted = sample_by_hand(noise, 2, clip=False, shift=SIGMA_MIN, seed=SAMPLER_SEED)
    assert (shifted - want).abs().max() > 1e-3


@pytest.mark.parametrize("clip", [True, False])
def test_two_step_sample_renoises_with_sqrt_tau2_minus_eps2(clip):
    """A mid-point near sigma_min (0.01): the 2-step sample equals the hand one re-noised with
    sqrt(tau^2 - eps^2), and differs measurably from one re-noised with plain tau."""
    method = _method("cd", mid_t=[MID_NEAR_EPS], clip_denoised=clip)
    noise = _noise()
    got = method.sample(AffineNet(), noise, 2, None, torch.Generator().manual_seed(SAMPLER_SEED))
    want = sample_by_hand(noise, 2, clip=clip, shift=SIGMA_MIN, seed=SAMPLER_SEED, mid=MID_NEAR_EPS)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    z = torch.randn(noise.shape, generator=torch.Generator().manual_seed(SAMPLER_SEED), dtype=torch.float32)
    gap = (MID_NEAR_EPS - math.sqrt(MID_NEAR_EPS ** 2 - SIGMA_MIN ** 2)) * z.double()
    assert gap.abs().max() > 1e-4                        # the plain-tau sampler would miss by this much


def test_two_step_sample_depends_on_the_renoising_draw():
    """Another sampler seed changes the 2-step sample (re-noising draws fresh noise) and not the 1-step one."""
    method, noise = _method("ict"), _noise()
    a2, b2 = (method.sample(AffineNet(), noise, 2, None, torch.Generator().manual_seed(s)) for s in (1, 2))
    a1, b1 = (method.sample(AffineNet(), noise, 1, None, torch.Generator().manual_seed(s)) for s in (1, 2))
    assert not torch.allclose(a2, b2) and torch.equal(a1, b1)
