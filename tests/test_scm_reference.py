"""sCT / sCD past the tangent warmup (0 < r <= 1), with tangent normalization and the learned adaptive
weighting on: the method's loss and parameter gradients against a straight-line float64 implementation of
the spec's Algorithm 1 [spec scm.md 2.10, 10.1], with its own naive JVP (tangent (dx_t/dt, 1), spec 2.8).

The method's random draws are intercepted: t from the proposal (methods.scm.proposal_t, replaced by the
spec's formula on fixed normals), z and sCD's guidance scale from a step context that returns fixed
normals / uniforms. The method's float32 casts (`.float()`, its fp32 loss policy) are made no-ops on
float64 tensors, so both sides run in float64 and agree to rounding."""
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from methods.base import StepContext
from methods.scm import SCD, SCT, SCDConfig, SCMConfig

SD = 0.5                          # sigma_d [spec 1.1]
P_MEAN, P_STD = -1.0, 1.4         # CIFAR-10 CM proposal [spec 2.7]
NORM_C = 0.1                      # c of g / (||g|| + c) [spec 2.4]
GUIDANCE_MAX = 2.0                # s ~ U[1, 2] for sCD-512 [spec 3, sCM Table 4]
WARMUP = 8                        # H of r = min(1, step / H) [spec 2.5], small for the test
SHAPE, CLASSES, BATCH = (2, 3, 3), 3, 5
D = math.prod(SHAPE)
# tau = P_mean + P_std eps [spec 2.7]: t from 0.08 to 1.41
EPS_T = torch.tensor([-1.6, -0.7, 0.0, 0.8, 1.5], dtype=torch.float64)
# (step, r): half-way through the warmup, its end, and past it (r is capped at 1)
STEPS = [(4, 0.5), (8, 1.0), (30, 1.0)]
RTOL, ATOL = 1e-10, 1e-12


class StandIn(nn.Module):
    """Tiny float64 F(x, c_noise, labels, extra) with a log-variance head; nonlinear in x and t, so the
    JVP's x and t parts both matter, and logvar varies with t so e^{w} is not 1."""

    def __init__(self, seed: int, labels: bool = True, extra_dim: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        rnd = lambda *s, scale=1.0: nn.Parameter(scale * torch.randn(*s, generator=gen, dtype=torch.float64))
        self.w_x, self.w_t, self.w_t3, self.b = rnd(D, D, scale=0.4), rnd(D), rnd(D), rnd(D, scale=0.3)
        self.w_y = rnd(CLASSES, D) if labels else None
        self.w_e = rnd(extra_dim, D) if extra_dim else None
        self.lv = rnd(3)

    def forward(self, x, c_noise, labels=None, extra=None, return_logvar=False):
        t = c_noise.to(x.dtype).reshape(-1, 1)
        h = x.flatten(1) @ self.w_x + t * self.w_t + torch.sin(3 * t) * self.w_t3 + self.b
        if self.w_y is not None:    # integer classes or one-hot rows (all-zero = the null label)
            onehot = labels if labels.is_floating_point() else nn.functional.one_hot(labels, CLASSES)
            h = h + onehot.to(x.dtype) @ self.w_y
        if self.w_e is not None:
            h = h + extra.to(x.dtype).reshape(-1, self.w_e.shape[0]) @ self.w_e
        out = (torch.tanh(h) * (1 + t ** 2)).reshape(x.shape)
        if not return_logvar:
            return out
        logvar = self.lv[0] + self.lv[1] * torch.cos(t.flatten()) + self.lv[2] * t.flatten()
        return out, logvar


@dataclass
class FixedDraws(StepContext):
    """A step context whose z (unit normals) and U[0, 1] draws are fixed float64 tensors."""

    eps_z: torch.Tensor | None = None
    u: torch.Tensor | None = None

    def randn_like(self, x):
        assert tuple(x.shape) == tuple(self.eps_z.shape)
        return self.eps_z.clone()

    def rand(self, *shape):
        return self.u.reshape(shape).clone()


@pytest.fixture
def float64_method(monkeypatch):
    """Intercept the proposal draw (spec 2.7 formula on EPS_T, in float64) and keep float64 through the
    method's `.float()` casts. Returns the list of proposal calls, to check the draw was intercepted."""
    calls = []

    def proposal(n, p_mean, p_std, sigma_data, generator, device="cpu"):
        calls.append((n, p_mean, p_std, sigma_data))
        return torch.atan(torch.exp(p_mean + p_std * EPS_T[:n]) / sigma_data)

    monkeypatch.setattr("methods.scm.proposal_t", proposal)
    to_float32 = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float",
                        lambda self, *a, **k: self if self.dtype == torch.float64 else to_float32(self, *a, **k))
    return calls


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(BATCH, *SHAPE, generator=gen, dtype=torch.float64) * 2 - 1
    eps_z = torch.randn(BATCH, *SHAPE, generator=gen, dtype=torch.float64)
    u = torch.rand(BATCH, 1, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0])
    return x0, eps_z, u, y


def as_column(a):
    return a.reshape(-1, 1, 1, 1)


def reference_tangent(student, x0, eps_z, v_fn, r, y=None, extra=None):
    """Algorithm 1 steps 1-4 [spec 10.1]: t, x_t, v, and the warmed-up g before normalization, with dF/dt
    from the naive JVP of (x, t) -> F(x / sigma_d, t) at (x_t, t), tangent (dx_t/dt, 1) [spec 2.8].
    Returns (t, x_t, F_minus, g_raw)."""
    t = torch.atan(torch.exp(P_MEAN + P_STD * EPS_T) / SD)             # spec 2.7
    z = eps_z * SD                                                      # z ~ N(0, sigma_d^2 I) [spec 1.1]
    cos, sin = as_column(torch.cos(t)), as_column(torch.sin(t))
    x_t = cos * x0 + sin * z
    v = v_fn(x0, z, x_t, t)
    with torch.no_grad():
        F_minus, dF_dt = torch.func.jvp(lambda x, tt: student(x / SD, tt, y, extra), (x_t, t),
                                        (v, torch.ones_like(t)))
    g_raw = -cos ** 2 * (SD * F_minus - v) - r * cos * sin * (x_t + SD * dF_dt)   # Alg. 1 step 4 (eq. 6, 2.5)
    return t, x_t, F_minus, g_raw


def reference_loss(student, t, x_t, F_minus, g_raw, y=None, extra=None):
    """Algorithm 1 steps 5-6: g / (||g|| + c) per sample [spec 2.4], then
    mean of e^{w}/D ||F - F_minus - g||^2 - w, w = -logvar [sCM eq. 8, spec 2.3 / 2.6]."""
    norm = g_raw.pow(2).sum(dim=(1, 2, 3)).sqrt()
    g = g_raw / as_column(norm + NORM_C)
    F, logvar = student(x_t / SD, t, y, extra, return_logvar=True)
    w = -logvar
    per = (F - F_minus - g).pow(2).sum(dim=(1, 2, 3))
    return (torch.exp(w) / D * per - w).mean()


def sct_velocity(x0, z, x_t, t):
    """sCT: dx_t/dt = cos t z - sin t x0 [spec 3]."""
    return as_column(torch.cos(t)) * z - as_column(torch.sin(t)) * x0


def scd_velocity(teacher, y, s=None):
    """sCD: sigma_d F_teacher(x_t / sigma_d, t, y); guided: v_uncond + s (v_cond - v_uncond), null label
    = all-zero row [spec 3]."""
    def v(x0, z, x_t, t):
        v_cond = SD * teacher(x_t / SD, t, y)
        if s is None:
            return v_cond
        v_uncond = SD * teacher(x_t / SD, t, torch.zeros(y.shape[0], CLASSES, dtype=torch.float64))
        return v_uncond + as_column(s) * (v_cond - v_uncond)
    return v


def _check(method, ctx, batch, student, expected_loss, calls, r):
    """The method's loss, its r, and its gradients w.r.t. every student parameter equal the reference."""
    params = list(student.parameters())
    expected_grads = torch.autograd.grad(expected_loss, params)
    out = method.loss(ctx, batch)
    assert calls == [(BATCH, P_MEAN, P_STD, SD)]          # the proposal draw was the intercepted one
    assert out[f"{method.name}/r"] == r
    assert out["loss"].dtype == torch.float64
    torch.testing.assert_close(out["loss"], expected_loss.detach(), rtol=RTOL, atol=ATOL)
    for got, want in zip(torch.autograd.grad(out["loss"], params), expected_grads):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def _config(cls, **kw):
    return cls(sigma_data=SD, p_mean=P_MEAN, p_std=P_STD, warmup_steps=WARMUP, tangent_norm="l2",
               norm_c=NORM_C, adaptive_weight=True, **kw)


def test_reference_g_at_r_1_is_cos_t_times_df_dt():
    """The reference's Algorithm-1 g (r = 1, unnormalized) equals cos t df/dt, f(x_t, t) = cos t x_t
    - sin t sigma_d F(x_t / sigma_d, t) differentiated along x_t = cos t x0 + sin t z [spec 13 test 3,
    eq. 5 / 6], by a central difference in t (sCT: dx_t/dt is the trajectory's own velocity)."""
    student, (x0, eps_z, _, _) = StandIn(seed=1, labels=False), _inputs()
    t, _, _, g_raw = reference_tangent(student, x0, eps_z, sct_velocity, r=1.0)
    z, h = eps_z * SD, 1e-5

    def f(tt):
        c, s = as_column(torch.cos(tt)), as_column(torch.sin(tt))
        x = c * x0 + s * z
        return c * x - s * SD * student(x / SD, tt)
    with torch.no_grad():
        df_dt = (f(t + h) - f(t - h)) / (2 * h)
    torch.testing.assert_close(g_raw, as_column(torch.cos(t)) * df_dt, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("step,r", STEPS)
def test_sct_loss_past_warmup_matches_reference(float64_method, step, r):
    """sCT, l2 tangent normalization, learned w = -logvar, 0 < r <= 1: loss and gradients equal the
    straight-line Algorithm 1 [spec 10.1 / 2.10, sCM eq. 6 and 8]."""
    student, (x0, eps_z, _, _) = StandIn(seed=1, labels=False), _inputs()
    expected = reference_loss(student, *reference_tangent(student, x0, eps_z, sct_velocity, r))
    sct = SCT(_config(SCMConfig), SHAPE, 0)
    ctx = FixedDraws(net=student, net_nograd=student, teacher=None, step=step, total_steps=100,
                     generator=torch.Generator().manual_seed(0), eps_z=eps_z)
    _check(sct, ctx, {"x": x0, "y": None}, student, expected, float64_method, r)


@pytest.mark.parametrize("step,r", STEPS)
def test_scd_loss_past_warmup_matches_reference(float64_method, step, r):
    """sCD without guidance: dx_t/dt is the frozen teacher's sigma_d F_teacher(x_t / sigma_d, t, y), then
    the same normalized, adaptively weighted loss as the reference [spec 3, 10.1]."""
    student, teacher, (x0, eps_z, _, y) = StandIn(seed=1), StandIn(seed=2), _inputs()
    expected = reference_loss(student, *reference_tangent(student, x0, eps_z, scd_velocity(teacher, y), r, y), y)
    scd = SCD(_config(SCDConfig), SHAPE, CLASSES)
    ctx = FixedDraws(net=student, net_nograd=student, teacher=teacher, step=step, total_steps=100,
                     generator=torch.Generator().manual_seed(0), eps_z=eps_z)
    _check(scd, ctx, {"x": x0, "y": y}, student, expected, float64_method, r)


@pytest.mark.parametrize("step,r", STEPS[:2])
def test_scd_guided_loss_matches_reference(float64_method, step, r):
    """sCD with classifier-free guidance [sCM App. G.2, spec 3]: s = 1 + (s_max - 1) u per sample, the
    teacher's velocity is v_uncond + s (v_cond - v_uncond), and the student reads s as its extra input
    in the JVP and the gradient pass (the scale gets no tangent, spec 2.8)."""
    student, teacher, (x0, eps_z, u, y) = StandIn(seed=1, extra_dim=1), StandIn(seed=2), _inputs()
    s = (1 + (GUIDANCE_MAX - 1) * u).reshape(-1)
    extra = s.reshape(-1, 1)
    parts = reference_tangent(student, x0, eps_z, scd_velocity(teacher, y, s), r, y, extra)
    expected = reference_loss(student, *parts, y, extra)
    scd = SCD(_config(SCDConfig, guidance_max=GUIDANCE_MAX), SHAPE, CLASSES)
    ctx = FixedDraws(net=student, net_nograd=student, teacher=teacher, step=step, total_steps=100,
                     generator=torch.Generator().manual_seed(0), eps_z=eps_z, u=u)
    _check(scd, ctx, {"x": x0, "y": y}, student, expected, float64_method, r)
    # the guidance is visible: the unguided teacher velocity gives a different tangent
    g_unguided = reference_tangent(student, x0, eps_z, scd_velocity(teacher, y), r, y, extra)[3]
    assert (parts[3] - g_unguided).norm() > 0.05 * parts[3].norm()
