"""GCM's full recipe, and each of its six module switches, against a straight-line implementation of the
guide's equations written here [spec gcm_ct_ict_cd.md A.1-A.10], in float64. Nothing is imported from
methods.gcm_schedules or methods.mmd: only GCM and its config, to build and call the object under test."""
import math

import pytest
import torch
from torch import nn

from methods.base import StepContext
from methods.gcm import GCM, GCMConfig

T0, TT = 0.006, 0.994            # time range [G Tab. 1, App. G.1; spec A.9]
SIGMA_D = 0.5                    # c_in, c_out [G App. C.2; spec A.2]
EPS, MU = 0.005, 3.5             # h(t) = eps e^{-mu t} (Eq. 36), c(t) = (e^{mu t} - 1)/mu (Eq. 9) [spec A.3-A.4]
GAMMA, LAM = 1.0, 6.0            # w(t) = t^gamma e^{-lambda t} [G Eq. 14, Tab. 1; spec A.5]
SINE_A, SINE_B = 1.0, 0.01       # p_sine(tau; a, b) [G Tab. 1; spec A.6]
NU = 4.0                         # uniform-power intensity of s (VU) [G Tab. 1; spec A.7]
MMD = {"cu": (4, 0.05), "vu": (2, 0.1)}   # group size M and kernel time scale sigma [G Tab. 1; spec A.8]
SHAPE = (1, 4, 4)                # one 4x4 channel: D = 16
BATCH = 8                        # two CU groups of 4, four VU groups of 2

# The six modules [spec A.0, A.9]: the recipe's value, then the alternative (the baselines, Tab. 2 A / Tab. 3 G).
RECIPE = dict(discretization="exp", time_cond="exp", weighting="gamma", t_sampling="sine", variant="cu", loss="mmd")
ALTERNATIVE = dict(discretization="const", time_cond="identity", weighting="uniform", t_sampling="uniform",
                   variant="vu", loss="l2")


@pytest.fixture(autouse=True)
def float64_default():
    """draw_times builds CU's s = t0 with torch.full, which takes the default dtype: float64 keeps the step exact."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class TinyNet(nn.Module):
    """A deterministic stand-in for the U-Net, F(x_in, c_noise, labels, extra): tanh of a linear map of the
    pixels plus a linear map of the time inputs (c(t), and c(s) for VU)."""

    def __init__(self, extra_dim=0):
        super().__init__()
        dim = math.prod(SHAPE)
        self.extra_dim = extra_dim
        self.pix = nn.Linear(dim, dim)
        self.emb = nn.Linear(1 + extra_dim, dim)
        gen = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.4 * torch.randn(p.shape, generator=gen, dtype=torch.float64))

    def forward(self, x, noise, labels=None, extra=None):
        assert (extra is None) == (self.extra_dim == 0)
        cond = noise.reshape(-1, 1) if extra is None else torch.cat([noise.reshape(-1, 1), extra], 1)
        return torch.tanh(self.pix(x.flatten(1)) + self.emb(cond)).reshape(x.shape)


class Float64Context(StepContext):
    """The trainer's context, its draws promoted to float64; `script`, when set, replaces them (in order)."""
    script = None

    def rand(self, *shape):
        return self.script.pop(0) if self.script else super().rand(*shape).double()

    def randn_like(self, x):
        return self.script.pop(0) if self.script else super().randn_like(x).double()


def _ctx(net, seed, script=None):
    ctx = Float64Context(net=net, net_nograd=net, teacher=None, step=0, total_steps=1,
                         generator=torch.Generator().manual_seed(seed))
    ctx.script = None if script is None else list(script)
    return ctx


def _inputs(seed):
    gen = torch.Generator().manual_seed(1000 + seed)
    return torch.rand((BATCH, *SHAPE), generator=gen, dtype=torch.float64) * 2 - 1


def seeded_draws(seed, variant):
    """The step's draws from a generator seeded as the method's: (u, v) of s for VU, the uniform of tau, then z
    (float32 like StepContext.rand / randn_like, promoted)."""
    gen = torch.Generator().manual_seed(seed)
    uniform = lambda: torch.rand(BATCH, generator=gen, dtype=torch.float32).double()   # noqa: E731
    u, v = (uniform(), uniform()) if variant == "vu" else (None, None)
    w = uniform()
    z = torch.randn((BATCH, *SHAPE), generator=gen, dtype=torch.float32).double()
    return dict(u=u, v=v, w=w, z=z)


def as_column(v):
    return v.reshape(-1, 1, 1, 1)


def reference_loss(net, x, draws, sw):
    """The step of spec A.10 written out, with the switches `sw`; returns (loss, t, s, r)."""
    # step 2: s (CU: t0; VU: uniform-power, Eq. 17's sampler mapped onto [t0, tT], AMBIG-9)
    if sw["variant"] == "vu":
        s = T0 + (TT - T0) * draws["u"] * (1 - (1 - draws["v"]) ** (1 / NU))
    else:
        s = torch.full((BATCH,), T0, dtype=torch.float64)
    # tau ~ p_sine by its inverse CDF (Eq. 41) with density Eq. 15, or uniform; t = s + (tT - s) tau
    if sw["t_sampling"] == "sine":
        cb, ca = math.cos(math.pi * SINE_B / 2), math.cos(math.pi * SINE_A / 2)
        tau = 2 / (math.pi * (SINE_A - SINE_B)) * (torch.arccos(cb - draws["w"] * (cb - ca)) - math.pi * SINE_B / 2)
        p_tau = math.pi * (SINE_A - SINE_B) / (2 * (cb - ca)) * torch.sin(
            math.pi / 2 * (SINE_A * tau + SINE_B * (1 - tau)))
    else:
        tau, p_tau = draws["w"], torch.ones(BATCH)
    t = s + (TT - s) * tau
    p_t = p_tau / (TT - s)                                      # the density rescaled to [s, tT] [spec A.6]
    h = EPS * torch.exp(-MU * t) if sw["discretization"] == "exp" else torch.full((BATCH,), EPS)
    r = torch.maximum(t - h, s)                                 # r = max(t - h(t), s) [AMBIG-10]
    w_t = t ** GAMMA * torch.exp(-LAM * t) if sw["weighting"] == "gamma" else torch.ones(BATCH)
    omega = w_t / p_t                                           # w(t)/p(t | s) [G Eq. 10, AMBIG-8]
    z = draws["z"]
    x_t = (1 - as_column(t)) * x + as_column(t) * z                       # OT-FM interpolant [G §2]
    u_t = z - x
    x_r = x_t + as_column(r - t) * u_t                               # Euler step [spec A.1]

    def f(x_in, tt, ss):                                        # f = c_out F(c_in x, c(t)[, c(s)]) [spec A.2]
        c_in = 1 / (SIGMA_D * ((1 - tt) ** 2 + tt ** 2).sqrt())
        cond = (lambda v: (torch.exp(MU * v) - 1) / MU) if sw["time_cond"] == "exp" else (lambda v: v)
        kwargs = {"extra": cond(ss).reshape(-1, 1)} if sw["variant"] == "vu" else {}
        return SIGMA_D * math.sqrt(2) * net(as_column(c_in) * x_in, cond(tt), None, **kwargs)

    F_s = f(x_t, t, s)
    with torch.no_grad():
        F_r = f(x_r, r, s)
    if sw["loss"] == "l2":                                      # step 4a, Eq. 39
        e = u_t - F_s + as_column((s - r) / (t - r)) * (F_s.detach() - F_r)
        return (omega * e.flatten(1).norm(dim=1)).mean(), t, s, r
    # step 4b, Eq. 46 in Eq. 40's form: a = x_t + (r - t) F + (s - r) sg F, b = sg(x^_r + (s - r) F_r)
    a = x_t + as_column(r - t) * F_s + as_column(s - r) * F_s.detach()
    b = (x_r + as_column(s - r) * F_r).detach()
    row_w = omega / (t - r)                                     # omega_j / (t_j - r_j) [AMBIG-13]
    M, sigma = MMD[sw["variant"]]
    dist = lambda p, q: (p - q).flatten().norm()                # noqa: E731
    kern = lambda tj, tk, j, k: math.exp(-(abs(tj - tk) + abs(s[j] - s[k])) / sigma)   # noqa: E731
    groups = []
    for g in range(BATCH // M):
        total = 0.0
        for j in range(g * M, (g + 1) * M):
            row = 0.0
            for k in range(g * M, (g + 1) * M):
                row = row + 2 * dist(a[j], b[k]) * kern(t[j], r[k], j, k)
                if k != j:                                      # ||a_j - a_j|| = ||b_j - b_j|| = 0
                    row = row - dist(a[j], a[k]) * kern(t[j], t[k], j, k) - dist(b[j], b[k]) * kern(r[j], r[k], j, k)
            total = total + row_w[j] * row
        groups.append(total / M ** 2)
    return sum(groups) / len(groups), t, s, r


def _check(sw, seed, cfg_extra=None, draws=None, scripted=False):
    """The method's loss, logged t/s means and gradients against the reference's, tight float64 tolerances."""
    net = TinyNet(extra_dim=1 if sw["variant"] == "vu" else 0)
    params = list(net.parameters())
    x = _inputs(seed)
    draws = draws or seeded_draws(seed, sw["variant"])
    ref, t, s, r = reference_loss(net, x, draws, sw)
    assert ((t - r) > 1e-4).all()                               # the MMD's t - r floor (not in the guide) idle
    ref_grads = torch.autograd.grad(ref, params)
    m = GCM(GCMConfig(**sw, **(cfg_extra or {})), SHAPE, 0)
    script = [draws[k] for k in ("u", "v", "w", "z") if draws[k] is not None] if scripted else None
    out = m.loss(_ctx(net, seed, script), {"x": x, "y": None})
    grads = torch.autograd.grad(out["loss"], params)
    assert out["gcm/t_mean"].item() == pytest.approx(t.mean().item(), rel=1e-14)   # the same draws
    assert out["gcm/s_mean"].item() == pytest.approx(s.mean().item(), rel=1e-14)
    assert out["loss"].dtype == torch.float64
    # the l2 form takes its norm in float32 (methods.common.per_sample_sq: losses in fp32, STYLE.md)
    rel = 1e-6 if sw["loss"] == "l2" else 1e-10
    assert out["loss"].item() == pytest.approx(ref.item(), rel=rel, abs=0)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=10 * rel, atol=10 * rel * want.abs().max().item())
    return out


def test_defaults_are_the_guides_recipe():
    """GCMConfig's defaults are Tab. 1's GCM (CU) recipe [spec A.9]; MMD m = 4, sigma = 0.05 (CU), 2, 0.1 (VU)."""
    c = GCMConfig()
    assert {k: getattr(c, k) for k in RECIPE} == RECIPE
    assert (c.t0, c.tT, c.sigma_data, c.noise_std) == (T0, TT, SIGMA_D, 1.0)
    assert (c.eps, c.mu, c.gamma, c.lam, c.density_a, c.density_b, c.nu) == (EPS, MU, GAMMA, LAM, SINE_A, SINE_B, NU)
    assert c.divide_by_pdf and c.pdf_scale == "rescaled" and c.r_clamp_to_s and not c.literal_eq46
    for variant, (M, sigma) in MMD.items():
        m = GCM(GCMConfig(variant=variant), SHAPE, 0)
        assert (m.mmd_group, m.mmd_sigma) == (M, sigma)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_recipe_matches_straight_line(seed):
    """The default step (exp h, c(t), Gamma w / rescaled p_sine, CU, time-aware MMD: spec A.10 steps 2, 3, 4b,
    Eq. 40/46) has the reference's loss and gradients."""
    _check(RECIPE, seed)


@pytest.mark.parametrize("module", list(RECIPE))
def test_each_module_switch_follows_its_equation(module):
    """One module switched to its alternative (const h Eq. 26, c(t) = t, w = 1, uniform tau, VU's p_up s Eq. 17
    with m = 2, sigma = 0.1, or the l2-norm loss Eq. 39), the rest as the recipe: the method follows that
    alternative's equation, and the loss moves off the recipe's."""
    sw = {**RECIPE, module: ALTERNATIVE[module]}
    out = _check(sw, seed=4)
    recipe_loss, *_ = reference_loss(TinyNet(), _inputs(4), seeded_draws(4, "cu"), RECIPE)
    assert abs(out["loss"].item() - recipe_loss.item()) > 1e-3 * abs(recipe_loss.item())


@pytest.mark.parametrize("variant", ["cu", "vu"])
def test_baselines_with_every_module_off(variant):
    """Config A (CU) and Config G (VU) of G Tab. 2/3: const h, c(t) = t, w = 1, uniform t, Eq. 39 [spec A.2]."""
    _check({**ALTERNATIVE, "variant": variant}, seed=5)


@pytest.mark.parametrize("variant", ["cu", "vu"])
def test_r_clamped_to_s_row(variant):
    """A member with t - s < h(t) has r = s [AMBIG-10]; its MMD row weight is omega/(t - s) [spec A.10 4b]."""
    draws = seeded_draws(6, variant)
    draws["w"][0] = 1e-4            # tau ~ 0.004: t - s ~ 0.004 (< h(t) ~ 0.0049, > the 1e-4 floor)
    net = TinyNet(extra_dim=1 if variant == "vu" else 0)
    _, t, s, r = reference_loss(net, _inputs(6), draws, {**RECIPE, "variant": variant})
    assert r[0] == s[0] and (r[1:] > s[1:]).all()
    _check({**RECIPE, "variant": variant}, seed=6, draws=draws, scripted=True)
