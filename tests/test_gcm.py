"""GCM (A Guide to Training Consistency Models): its time functions against hand-computed values, its
samplers against their densities, and its losses against straight-line implementations written here."""
import math

import pytest
import torch
from torch import nn

import methods
from harness.config import compose
from methods.base import StepContext
from methods.gcm import GCM, GCMConfig, eq39_residual, eq40_particles
from methods.gcm_schedules import (loss_weight, step_h, tau_cdf, tau_icdf, tau_pdf, time_cond,
                                   uniform_power_unit)
from methods.mmd import time_aware_mmd

T0, TT = 0.006, 0.994
# Config A of G Tab. 1 / Tab. 2 (CU): constant h, c(t) = t, w = 1, uniform t, the l2-norm loss
BASELINE = dict(discretization="const", time_cond="identity", weighting="uniform", t_sampling="uniform", loss="l2")


class TinyNet(nn.Module):
    """A small conv net standing in for a U-Net: F(x_in, c_noise, labels, extra)."""

    def __init__(self, extra_dim=0):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.out = nn.Conv2d(4, 1, 3, padding=1)
        self.emb = nn.Linear(1 + extra_dim, 4)

    def forward(self, x, noise, labels=None, extra=None):
        cond = noise.reshape(-1, 1) if extra is None else torch.cat([noise.reshape(-1, 1), extra], 1)
        return self.out(torch.tanh(self.conv(x) + self.emb(cond.to(x.dtype))[:, :, None, None]))


def _ctx(net, seed):
    gen = torch.Generator().manual_seed(seed)
    return StepContext(net=net, net_nograd=net, teacher=None, step=0, total_steps=100, generator=gen)


def as_column(v):
    return v.reshape(-1, 1, 1, 1)


# -- the time functions ---------------------------------------------------------------------------
def test_h_c_w_hand_computed():
    t = torch.tensor([T0, 1 / 6, 0.6, TT], dtype=torch.float64)
    # h(t) = 0.005 exp(-3.5 t): 0.004896 at t0, 0.000154 at tT [spec A.3]
    h = step_h(t, "exp", 0.005, 3.5)
    assert h[0].item() == pytest.approx(0.005 * math.exp(-0.021), rel=1e-12)
    assert h[0].item() == pytest.approx(0.004896, abs=5e-7) and h[3].item() == pytest.approx(0.000154, abs=5e-7)
    assert step_h(t, "const", 0.005, 3.5).tolist() == [0.005] * 4
    # c(t) = (e^{3.5t} - 1)/3.5: 0.00606 at t0, 8.979 at tT; c'(t) h(t) = eps exactly [spec A.4]
    c = time_cond(t, "exp", 3.5)
    assert c[0].item() == pytest.approx(0.00606, abs=5e-6) and c[3].item() == pytest.approx(8.979, abs=5e-4)
    assert (torch.exp(3.5 * t) * h).tolist() == pytest.approx([0.005] * 4, rel=1e-12)
    assert torch.equal(time_cond(t, "identity", 3.5), t)
    # w(t) = t e^{-6t}: 0.00579, 0.0613 (peak at 1/6), 0.0164, 0.00255 [spec A.5]
    w = loss_weight(t, "gamma", 1.0, 6.0)
    assert w.tolist() == pytest.approx([0.00579, 0.0613, 0.0164, 0.00255], abs=5e-5)
    assert w[1].item() == pytest.approx(math.exp(-1) / 6, rel=1e-12)
    assert loss_weight(t, "uniform", 1.0, 6.0).tolist() == [1.0] * 4


def test_sine_density_values_and_integral():
    tau = torch.linspace(0, 1, 20001, dtype=torch.float64)
    p = tau_pdf(tau, "sine", 1.0, 0.01)
    # normalizing constant 1.55528, p(0) = 0.02443, p(1) = 1.55528, mean 0.633 [spec A.6]
    assert p[0].item() == pytest.approx(0.02443, abs=5e-5) and p[-1].item() == pytest.approx(1.55528, abs=5e-5)
    assert torch.trapezoid(p, tau).item() == pytest.approx(1.0, abs=1e-8)
    assert torch.trapezoid(p * tau, tau).item() == pytest.approx(0.633, abs=5e-4)
    # the CDF is the integral of the density, and the inverse CDF inverts it
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumulative_trapezoid(p, tau)])
    torch.testing.assert_close(tau_cdf(tau, "sine", 1.0, 0.01), cum, atol=1e-9, rtol=0)
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(tau_cdf(tau_icdf(u, "sine", 1.0, 0.01), "sine", 1.0, 0.01), u, atol=1e-9, rtol=0)
    # cosh(1.5, 0): integrates to 1, mean 0.577 [spec A.6]
    q = tau_pdf(tau, "cosh", 1.5, 0.0)
    assert torch.trapezoid(q, tau).item() == pytest.approx(1.0, abs=1e-8)
    assert torch.trapezoid(q * tau, tau).item() == pytest.approx(0.577, abs=5e-4)


@pytest.mark.parametrize("kind,a,b", [("sine", 1.0, 0.01), ("cosh", 1.5, 0.0)])
def test_tau_sampler_matches_density_ks(kind, a, b):
    gen = torch.Generator().manual_seed(0)
    n = 10000
    draws = tau_icdf(torch.rand(n, generator=gen, dtype=torch.float64), kind, a, b).sort().values
    cdf = tau_cdf(draws, kind, a, b)
    k = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(k / n - cdf, cdf - (k - 1) / n).max().item()
    assert ks < 1.63 / math.sqrt(n)                # Kolmogorov-Smirnov, alpha = 0.01
    # and the test has power: uniform draws are rejected against the sine density
    uni = torch.rand(n, generator=gen, dtype=torch.float64).sort().values
    assert (k / n - tau_cdf(uni, kind, a, b)).abs().max().item() > 1.63 / math.sqrt(n)


def test_uniform_power_mean_closed_form():
    gen = torch.Generator().manual_seed(1)
    n = 400000
    for nu in (1.0, 4.0):
        s = uniform_power_unit(torch.rand(n, generator=gen, dtype=torch.float64),
                               torch.rand(n, generator=gen, dtype=torch.float64), nu)
        assert s.mean().item() == pytest.approx(1 / (2 * (nu + 1)), abs=1.5e-3)     # E[s] = 1/(2(nu + 1))
        assert s.min().item() >= 0 and s.max().item() <= 1
    # VU through the method: s = t0 + (tT - t0) s_unit [AMBIG-9], t in [s, tT], r = max(t - h, s)
    m = GCM(GCMConfig(variant="vu"), (1, 8, 8), 0)
    tm = m.draw_times(_ctx(None, 2), 100000, "cpu")
    assert tm["s"].mean().item() == pytest.approx(T0 + (TT - T0) * 0.1, abs=2e-3)
    assert (tm["t"] >= tm["s"]).all() and (tm["r"] >= tm["s"]).all() and (tm["t"] <= TT + 1e-6).all()
    h = 0.005 * torch.exp(-3.5 * tm["t"])
    torch.testing.assert_close(tm["r"], torch.maximum(tm["t"] - h, tm["s"]))


def test_weight_divides_by_rescaled_density():
    m = GCM(GCMConfig(variant="vu"), (1, 8, 8), 0)
    gen = torch.Generator().manual_seed(5)
    u, v, w = (torch.rand(64, generator=gen) for _ in range(3))
    s = T0 + (TT - T0) * u * (1 - (1 - v) ** 0.25)
    tau = tau_icdf(w, "sine", 1.0, 0.01)
    t = s + (TT - s) * tau
    p = math.pi * 0.99 / (2 * (math.cos(math.pi * 0.005) - math.cos(math.pi / 2))) * \
        torch.sin(math.pi / 2 * (tau + 0.01 * (1 - tau))) / (TT - s)
    tm = m.draw_times(_ctx(None, 5), 64, "cpu")
    torch.testing.assert_close(tm["t"], t)
    torch.testing.assert_close(tm["omega"], t * torch.exp(-6 * t) / p, rtol=1e-5, atol=0)


# -- the losses ---------------------------------------------------------------------------------
def _baseline_straight_line(net, x, seed, scale=1.0):
    """Config A from G Eq. 5 directly: (1/(t - s)) || g(x_t, t, s) - sg g(x^_r, r, s) ||, s = t0, h = 0.005.
    Returns (Eq. 5's loss, for its gradient; the value of the Eq. 39 form, ||g - sg g|| / (t - r))."""
    gen = torch.Generator().manual_seed(seed)
    t = T0 + (TT - T0) * torch.rand(x.shape[0], generator=gen)
    r = t - 0.005
    z = torch.randn(x.shape, generator=gen)
    x_t = (1 - as_column(t)) * x + as_column(t) * z
    x_r = (1 - as_column(r)) * x + as_column(r) * z                      # the interpolant at r, same (x, z)

    def g(xx, tt):
        f = 0.5 * math.sqrt(2) * net(xx / (0.5 * ((1 - as_column(tt)) ** 2 + as_column(tt) ** 2).sqrt()), tt)
        return xx + (T0 - as_column(tt)) * f
    with torch.no_grad():
        target = g(x_r, r)
    dist = ((g(x_t, t) - target) ** 2).sum(dim=(1, 2, 3)).sqrt()
    return (scale * dist / (t - T0)).mean(), (scale * dist.detach() / (t - r)).mean()


@pytest.mark.parametrize("divide", [False, True])
def test_baseline_loss_matches_eq5_straight_line(divide):
    torch.manual_seed(0)
    net = TinyNet()
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    m = GCM(GCMConfig(**BASELINE, divide_by_pdf=divide), (1, 8, 8), 0)
    out = m.loss(_ctx(net, 7), {"x": x, "y": None})
    grads = torch.autograd.grad(out["loss"], list(net.parameters()))
    # with uniform t the density on [t0, tT] is 1/(tT - t0): dividing by it scales the loss by 0.988
    ref, ref_value = _baseline_straight_line(net, x, 7, scale=(TT - T0) if divide else 1.0)
    ref_grads = torch.autograd.grad(ref, list(net.parameters()))
    # Eq. 39's value is Eq. 5's times (t - s)/(t - r); the gradients are equal [G App. D.1]
    assert out["loss"].item() == pytest.approx(ref_value.item(), rel=2e-3)   # fp32 cancellation in g - g
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=5e-3, atol=1e-5)
    assert out["gcm/frac_r_at_s"] == 0


def test_unit_pdf_scale_gives_w_exactly():
    m = GCM(GCMConfig(**BASELINE, pdf_scale="unit"), (1, 8, 8), 0)
    assert torch.equal(m.draw_times(_ctx(None, 0), 32, "cpu")["omega"], torch.ones(32))


def _forms(seed=0, batch=6):
    torch.manual_seed(seed)
    net = TinyNet(extra_dim=1).double()
    m = GCM(GCMConfig(variant="vu"), (1, 8, 8), 0)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, 8, 8, dtype=torch.float64, generator=gen) * 2 - 1
    z = torch.randn(x.shape, dtype=torch.float64, generator=gen)
    tm = {k: v.double() for k, v in m.draw_times(_ctx(None, seed), batch, "cpu").items()}
    s, t, r = tm["s"], tm["t"], tm["r"]
    x_t, u_t = (1 - as_column(t)) * x + as_column(t) * z, z - x
    x_r = x_t + as_column(r - t) * u_t
    with torch.no_grad():
        F_r = m.f(net, x_r, r, s)
    return net, m, x_t, x_r, u_t, F_r, s, t, r, tm["omega"]


def test_eq39_eq40_and_eq5_have_the_same_gradient_float64():
    net, m, x_t, x_r, u_t, F_r, s, t, r, omega = _forms()
    params = list(net.parameters())

    def grad(loss):
        return torch.autograd.grad(loss, params)
    F = m.f(net, x_t, t, s)
    l39 = (omega * eq39_residual(u_t, F, F_r, t, r, s).pow(2).sum(dim=(1, 2, 3)).sqrt()).mean()
    a, b = eq40_particles(x_t, x_r, m.f(net, x_t, t, s), F_r, t, r, s)
    l40 = (omega / (t - r) * (a - b).pow(2).sum(dim=(1, 2, 3)).sqrt()).mean()
    g5 = x_t + as_column(s - t) * m.f(net, x_t, t, s)                  # Eq. 5: 1/(t - s) ||g(x_t) - sg g(x^_r)||
    l5 = (omega / (t - s) * (g5 - (x_r + as_column(s - r) * F_r)).pow(2).sum(dim=(1, 2, 3)).sqrt()).mean()
    assert l39.item() == pytest.approx(l40.item(), rel=1e-10)       # equal values; Eq. 5's differs, its gradient not
    for g39, g40, g_5 in zip(grad(l39), grad(l40), grad(l5)):
        torch.testing.assert_close(g39, g40, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(g39, g_5, rtol=1e-9, atol=1e-12)


def test_mmd_group_one_is_the_particle_loss_times_two_exp():
    net, m, x_t, x_r, u_t, F_r, s, t, r, omega = _forms(seed=3)
    params = list(net.parameters())
    sigma = 0.1
    F = m.f(net, x_t, t, s)
    a, b = eq40_particles(x_t, x_r, F, F_r, t, r, s)
    mmd = time_aware_mmd(a, b, t, r, s, omega / (t - r), 1, sigma)
    particle = omega * eq39_residual(u_t, F, F_r, t, r, s).pow(2).sum(dim=(1, 2, 3)).sqrt()
    factor = 2 * torch.exp(-(t - r) / sigma)                          # spec A.8: L = 2 w e^{-h/sigma} ||a - b||
    torch.testing.assert_close(mmd, factor * particle, rtol=1e-10, atol=0)
    for g1, g2 in zip(torch.autograd.grad(mmd.sum(), params, retain_graph=True),
                      torch.autograd.grad((factor * particle).sum(), params)):
        torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)


def test_mmd_two_member_group_hand_computed():
    a = torch.tensor([[0.0], [1.0]], requires_grad=True)
    b = torch.tensor([[0.5], [3.0]])
    t, r, s = torch.tensor([0.3, 0.5]), torch.tensor([0.29, 0.48]), torch.tensor([0.1, 0.2])
    w = torch.tensor([2.0, 1.0])
    sig = 0.1

    def k(x, y):
        return math.exp(-x / sig - y / sig)
    # rows j = 0, 1 of 2||a_j - b_k|| K^tr - ||a_j - a_k|| K^tt - ||b_j - b_k|| K^rr (Eq. 46), times w_j / M^2
    row0 = 2 * (0.5 * k(0.01, 0) + 3.0 * k(0.18, 0.1)) - 1.0 * k(0.2, 0.1) - 2.5 * k(0.19, 0.1)
    row1 = 2 * (0.5 * k(0.21, 0.1) + 2.0 * k(0.02, 0)) - 1.0 * k(0.2, 0.1) - 2.5 * k(0.19, 0.1)
    out = time_aware_mmd(a, b, t, r, s, w, 2, sig)
    assert out.item() == pytest.approx((2 * row0 + 1 * row1) / 4, rel=1e-5)
    lit = time_aware_mmd(a, b, t, r, s, w, 2, sig, literal_eq46=True)      # |t_j - r_k| in every term
    row0l = 2 * (0.5 * k(0.01, 0) + 3.0 * k(0.18, 0.1)) - 1.0 * k(0.18, 0.1) - 2.5 * k(0.18, 0.1)
    row1l = 2 * (0.5 * k(0.21, 0.1) + 2.0 * k(0.02, 0)) - 1.0 * k(0.21, 0.1) - 2.5 * k(0.21, 0.1)
    assert lit.item() == pytest.approx((2 * row0l + row1l) / 4, rel=1e-5)
    out.backward()
    assert torch.isfinite(a.grad).all()                              # the zero diagonal ||a_j - a_j||
    assert time_aware_mmd(a, b, t, r, s, w, 2, math.inf).item() == pytest.approx(
        (2 * (2 * 3.5 - 1 - 2.5) + (2 * 2.5 - 1 - 2.5)) / 4, rel=1e-5)      # sigma = inf: IMM's shared kernel
    with pytest.raises(ValueError, match="multiple of method.mmd_group"):
        time_aware_mmd(a, b, t, r, s, w, 4, sig)


@pytest.mark.parametrize("variant,loss", [("cu", "l2"), ("cu", "mmd"), ("vu", "l2"), ("vu", "mmd")])
def test_loss_finite_with_gradients(variant, loss):
    torch.manual_seed(0)
    net = TinyNet(extra_dim=1 if variant == "vu" else 0)
    m = GCM(GCMConfig(variant=variant, loss=loss), (1, 8, 8), 0)
    out = m.loss(_ctx(net, 1), {"x": torch.rand(8, 1, 8, 8) * 2 - 1, "y": None})
    grads = torch.autograd.grad(out["loss"], list(net.parameters()))
    assert torch.isfinite(out["loss"]) and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


# -- sampling ------------------------------------------------------------------------------------
class Recorder(TinyNet):
    def __init__(self, extra_dim=0):
        super().__init__(extra_dim)
        self.calls = []

    def forward(self, x, noise, labels=None, extra=None):
        self.calls.append((x.clone(), noise.clone(), None if extra is None else extra.clone()))
        return torch.zeros_like(x)                                   # f = 0: g(x, t, s) = x


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_restart_sampler_cu(steps):
    m = GCM(GCMConfig(), (1, 8, 8), 0)
    net = Recorder()
    noise = torch.randn(5, 1, 8, 8)
    out = m.sample(net, noise, steps, generator=torch.Generator().manual_seed(0))
    assert out.shape == noise.shape and len(net.calls) == steps == m.nfe(steps)
    c = lambda v: (math.exp(3.5 * v) - 1) / 3.5
    assert net.calls[0][1].tolist() == pytest.approx([c(TT)] * 5) and net.calls[0][2] is None
    c_in = 1 / (0.5 * math.sqrt((1 - TT) ** 2 + TT ** 2))
    torch.testing.assert_close(net.calls[0][0], c_in * TT * noise)       # x_tT = tT z [AMBIG-16]
    if steps == 2:
        z = torch.randn(noise.shape, generator=torch.Generator().manual_seed(0))
        x_t1 = 0.4 * TT * noise + 0.6 * z                              # restart: (1 - t1) x0 + t1 z'
        torch.testing.assert_close(out, x_t1)
        assert net.calls[1][1].tolist() == pytest.approx([c(0.6)] * 5)
    assert m.default_steps() == 2 and m.sample_times(2) == [TT, 0.6, T0]


def test_pushforward_sampler_vu():
    m = GCM(GCMConfig(variant="vu"), (1, 8, 8), 0)
    net = Recorder(extra_dim=1)
    noise = torch.randn(3, 1, 8, 8)
    out = m.sample(net, noise, 2)
    assert out.shape == noise.shape and len(net.calls) == 2
    c = lambda v: (math.exp(3.5 * v) - 1) / 3.5
    # g(x_tT, tT, t1) then g(x_t1, t1, t0), c(s) as the second time input; deterministic
    assert net.calls[0][1].tolist() == pytest.approx([c(TT)] * 3) and net.calls[0][2].flatten().tolist() == \
        pytest.approx([c(0.6)] * 3)
    assert net.calls[1][1].tolist() == pytest.approx([c(0.6)] * 3) and net.calls[1][2].flatten().tolist() == \
        pytest.approx([c(T0)] * 3)
    torch.testing.assert_close(out, TT * noise)                        # f = 0 carries x_tT through
    assert torch.equal(m.sample(Recorder(1), noise, 2), out)


# -- config, model, state --------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,match", [
    ("variant", "xu", "unknown method.variant 'xu'; valid: cu, vu"),
    ("loss", "l1", "unknown method.loss"),
    ("t_sampling", "beta", "unknown method.t_sampling"),
    ("t0", 0.0, "0 < method.t0 < method.tT"),
    ("eps", -1.0, "method.eps"),
    ("mmd_group", -1, "mmd_group"),
    ("mmd_min_dt", 0.0, "mmd_min_dt > 0"),
    ("density_a", 0.01, "density_a != method.density_b"),
    ("sampler", "pushforward", "needs g\\(x, t, s\\) with s != t0"),
    ("mid_t", [0.2, 0.6], "method.mid_t must descend"),
])
def test_config_errors_are_one_line(field, value, match):
    with pytest.raises(ValueError, match=match) as err:
        GCM(GCMConfig(**{field: value}), (1, 8, 8), 0)
    assert "\n" not in str(err.value)


def test_model_requirements_and_compose():
    assert "gcm" in methods.names() and methods.get("gcm") is GCM
    # the variant sets the network's second time input (harness.config.apply_network_requirements) ...
    assert compose(["method=gcm", "method.variant=vu", "model=unet-xs"]).model.extra_cond_dim == 1
    assert compose(["method=gcm", "model=unet-xs", "model.extra_cond_dim=1"]).model.extra_cond_dim == 0
    # ... and refuses a network config that lacks it when built directly
    with pytest.raises(ValueError, match="set model.extra_cond_dim=1") as err:
        GCM.check_model(GCMConfig(variant="vu"), {"extra_cond_dim": 0})
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="set model.extra_cond_dim=0"):
        GCM.check_model(GCMConfig(), {"extra_cond_dim": 1})
    cfg = compose(["method=gcm", "method.variant=vu", "model=unet-xs", "model.extra_cond_dim=1"])
    assert cfg.method.preset == "tiny" and cfg.method.loss == "mmd"
    assert compose(["method=gcm", "preset=cifar10", "model=unet-xs"]).method.eps == 0.005


def test_mmd_defaults_follow_variant():
    assert (GCM(GCMConfig(), (1, 8, 8), 0).mmd_group, GCM(GCMConfig(), (1, 8, 8), 0).mmd_sigma) == (4, 0.05)
    vu = GCM(GCMConfig(variant="vu"), (1, 8, 8), 0)
    assert (vu.mmd_group, vu.mmd_sigma) == (2, 0.1)
    assert GCM(GCMConfig(mmd_group=8, mmd_sigma=0.2), (1, 8, 8), 0).mmd_group == 8


def test_state_round_trip():
    m = GCM(GCMConfig(), (1, 8, 8), 0)
    state = m.state_dict()
    assert state == {}                     # stop-gradient teacher, no curriculum: nothing to carry
    other = GCM(GCMConfig(), (1, 8, 8), 0)
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="has no state"):
        other.load_state_dict({"target": {}})


def test_ablation_sweep_is_the_guides_ladder():
    """sweeps/gcm_ablation.yaml: Tab. 2 (A-F, CU) and Tab. 3 (G-L, VU), each rung switching on one module."""
    import pathlib

    import yaml
    spec = yaml.safe_load((pathlib.Path(__file__).parents[1] / "sweeps" / "gcm_ablation.yaml").read_text())
    stages = spec["stages"]
    assert [s["name"][0] for s in stages] == list("ABCDEFGHIJKL")
    rungs = [dict(o.split("=", 1) for o in s["overrides"]) for s in stages]
    full = {"method.discretization": "exp", "method.time_cond": "exp", "method.weighting": "gamma",
            "method.t_sampling": "sine", "method.loss": "mmd"}
    for ladder in (rungs[:6], rungs[6:]):
        assert all(ladder[0][k] != v for k, v in full.items())                  # the baseline: every module off
        for before, after in zip(ladder, ladder[1:]):
            changed = [k for k in after if after[k] != before[k]]
            assert len(changed) == 1 and after[changed[0]] == full[changed[0]]  # one module switched on
        assert all(ladder[-1][k] == v for k, v in full.items())                 # the last rung: the recipe
    assert {r["method.variant"] for r in rungs[:6]} == {"cu"} and {r["method.variant"] for r in rungs[6:]} == {"vu"}
    for stage in stages:                                                         # every rung is a valid config
        cfg = compose([*spec["base"], *stage["overrides"]])
        assert cfg.method.name == "gcm" and cfg.method.preset == "tiny"
