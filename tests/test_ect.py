"""ECT, the EDM parameterization and the shared method math, against hand-computed values and a
straight-line re-implementation of the loss written here."""
import math

import pytest
import torch
from torch import nn

import methods
from methods.base import StepContext
from methods.common import adaptive_distance, karras_sigmas, pseudo_huber
from methods.ect import ECT, ECTConfig
from methods.edm import EDM, EDMConfig
from methods.parameterization import EDMParam
from methods.sampling import consistency_sample, consistency_times, heun_sample


def test_registry_names_and_errors():
    assert {"ect", "edm"} <= set(methods.names())
    assert methods.get("ect") is ECT
    with pytest.raises(ValueError, match="unknown method 'nope'; valid: .*ect"):
        methods.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        methods.register("ect")(type("Other", (), {}))


def test_edm_parameterization_values():
    p = EDMParam(sigma_data=0.5)
    t0 = torch.tensor([0.0])
    assert p.c_skip(t0).item() == 1.0 and p.c_out(t0).item() == 0.0     # boundary f(x, 0) = x
    t = torch.tensor([0.5, 1.0, 80.0], dtype=torch.float64)
    # c_skip = sd^2/(t^2+sd^2), c_out = t sd/sqrt(t^2+sd^2), c_in = 1/sqrt(t^2+sd^2), c_noise = ln t / 4
    assert p.c_skip(t).tolist() == pytest.approx([0.5, 0.2, 0.25 / 6400.25])
    assert p.c_out(t).tolist() == pytest.approx([0.25 / math.sqrt(0.5), 0.5 / math.sqrt(1.25), 40 / math.sqrt(6400.25)])
    assert p.c_in(t).tolist() == pytest.approx([1 / math.sqrt(0.5), 1 / math.sqrt(1.25), 1 / math.sqrt(6400.25)])
    assert p.c_noise(t).tolist() == pytest.approx([math.log(0.5) / 4, 0.0, math.log(80) / 4])
    # ECT spec 1.1: the CIFAR eval-mode shift (sigma_min 0.003) moves c_skip(0.821) from 0.2706 to 0.2720
    t_mid = torch.tensor([0.821])
    assert p.c_skip(t_mid).item() == pytest.approx(0.2706, abs=1e-4)
    assert EDMParam(0.5, shift_sigma_min=0.003).c_skip(t_mid).item() == pytest.approx(0.2720, abs=1e-4)


def test_ect_mapping_hand_computed():
    ect = ECT(ECTConfig(), (1, 8, 8), 0)
    t = torch.tensor([80.0, 1.0, 0.002, 1.9], dtype=torch.float64)
    # q^a = 2: r/t = 1 - n/2 with n(80) = 1 + 8/(1 + e^80) ~ 1 -> 0.5; t < ln 7 = 1.946 is clamped to 0
    r = ect.r_of_t(t, 1)
    assert (r[0] / t[0]).item() == pytest.approx(0.5, abs=1e-12)
    assert r[1].item() == 0.0 and r[2].item() == 0.0 and r[3].item() == 0.0
    # q^a = 16 at t = 1: n = 1 + 8/(1 + e) = 3.151530...; r = 1 - n/16
    n1 = 1 + 8 / (1 + math.e)
    assert ect.r_of_t(t, 4)[1].item() == pytest.approx(1 - n1 / 16, rel=1e-12)
    # spec table: q^a = 256 gives r/t = 0.98048 at t = 0.002 and 0.99609 at t = 80
    r8 = ect.r_of_t(t, 8) / t
    assert r8[2].item() == pytest.approx(0.98048, abs=1e-5)
    assert r8[0].item() == pytest.approx(0.99609, abs=1e-5)
    const = ECT(ECTConfig(mapping="const"), (1, 8, 8), 0)
    assert (const.r_of_t(t, 8) / t).tolist() == pytest.approx([1 - 1 / 256] * 4)


def test_ect_stage_schedule():
    ect = ECT(ECTConfig(stages=8), (1, 8, 8), 0)
    assert [ect.stage(s, 800) for s in (0, 99, 100, 250, 799)] == [1, 1, 2, 3, 8]   # a = floor(s/d) + 1
    scratch = ECT(ECTConfig(stage_offset=0, stage_steps=50), (1, 8, 8), 0)
    assert [scratch.stage(s, 800) for s in (0, 49, 50)] == [0, 0, 1]
    # a fixed d is capped at the last stage too: d = 20 over 320 steps stops at a = 8, not 16
    fixed = ECT(ECTConfig(stage_steps=20, stages=8), (1, 8, 8), 0)
    assert [fixed.stage(s, 320) for s in (0, 20, 139, 140, 319)] == [1, 2, 7, 8, 8]
    # stage 0 (a = 0): q^0 = 1 < n(t), every r is 0: plain denoising [ECT eq. 14]
    assert scratch.r_of_t(torch.logspace(-3, 2, 50), 0).eq(0).all()


def test_pseudo_huber_and_adaptive_gradient():
    delta = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert pseudo_huber(delta, 0.0).tolist() == pytest.approx([5.0, 1.0])
    c = 0.5
    assert pseudo_huber(delta, c).tolist() == pytest.approx([math.sqrt(25.25) - 0.5, math.sqrt(1.25) - 0.5])
    # ECT eq. 20: d sqrt(|D|^2 + c^2) = d(1/2 |D|^2) / sqrt(|D|^2 + c^2), the p = 1/2 adaptive weight
    d1 = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    d2 = d1.detach().clone().requires_grad_(True)
    adaptive_distance(d1, 0.1, 0.5).sum().backward()
    sq = d2.pow(2).sum(dim=(1, 2))
    (0.5 * sq / (sq.detach() + 0.01).sqrt()).sum().backward()
    torch.testing.assert_close(d1.grad, d2.grad)


def test_karras_grid():
    s = karras_sigmas(18)
    assert s[0].item() == pytest.approx(80.0) and s[-1].item() == pytest.approx(0.002)
    assert (s[1:] < s[:-1]).all()
    asc = karras_sigmas(18, descending=False)
    assert torch.equal(asc, s.flip(0))


class TinyNet(nn.Module):
    """A small conv net with dropout standing in for a U-Net: F(x_in, c_noise, labels)."""

    def __init__(self, p=0.0):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.out = nn.Conv2d(4, 1, 3, padding=1)
        self.emb = nn.Linear(1, 4)
        self.drop = nn.Dropout(p)

    def forward(self, x, noise, labels=None):
        h = torch.tanh(self.conv(x) + self.emb(noise.reshape(-1, 1))[:, :, None, None])
        return self.out(self.drop(h))


def _ctx(net, seed, step=0, total=800):
    gen = torch.Generator().manual_seed(seed)
    return StepContext(net=net, net_nograd=net, teacher=None, step=step, total_steps=total, generator=gen)


@pytest.mark.parametrize("weighting,c,stage_step", [("inv_dt", 0.0, 0), ("inv_t", 0.03, 300),
                                                    ("inv_t2_plus_inv_sd2", 0.06, 700)])
def test_ect_loss_matches_straight_line(weighting, c, stage_step):
    torch.manual_seed(0)
    net = TinyNet().double()
    net.float()
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    cfg = ECTConfig(weighting=weighting, huber_c=c, p_mean=0.5, p_std=1.0)
    out = ECT(cfg, (1, 8, 8), 0).loss(_ctx(net, 7, stage_step), {"x": x0, "y": None})
    grads = torch.autograd.grad(out["loss"], list(net.parameters()))

    # straight line: same draws in the same order (t first, then the shared noise)
    gen = torch.Generator().manual_seed(7)
    t = (0.5 + 1.0 * torch.randn(16, generator=gen)).exp()
    eps = torch.randn(x0.shape, generator=gen)
    a = stage_step // 100 + 1
    n = 1 + 8 / (1 + torch.exp(t))
    r = torch.clamp(t * (1 - n / 2.0 ** a), min=0)
    sd = 0.5

    def f(x, s):
        s4 = s.reshape(-1, 1, 1, 1)
        F = net(x / (s4 ** 2 + sd ** 2).sqrt(), torch.log(s) / 4)
        return sd ** 2 / (s4 ** 2 + sd ** 2) * x + s4 * sd / (s4 ** 2 + sd ** 2).sqrt() * F

    pred = f(x0 + t.reshape(-1, 1, 1, 1) * eps, t)
    with torch.no_grad():
        safe_r = torch.where(r > 0, r, torch.ones_like(r))
        tgt = torch.where((r > 0).reshape(-1, 1, 1, 1), f(x0 + r.reshape(-1, 1, 1, 1) * eps, safe_r), x0)
    sq = ((pred - tgt) ** 2).sum(dim=(1, 2, 3))
    dist = (sq + c * c).sqrt() - c
    w = {"inv_dt": 1 / (t - r), "inv_t": 1 / t, "inv_t2_plus_inv_sd2": 1 / t ** 2 + 1 / sd ** 2}[weighting]
    ref = (w * dist).mean()
    ref_grads = torch.autograd.grad(ref, list(net.parameters()))
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
    for g, h in zip(grads, ref_grads):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)
    assert 0 < out["ect/frac_r0"] < 1 if stage_step == 0 else True


class MaskRecorder(TinyNet):
    def __init__(self):
        super().__init__(p=0.5)
        self.masks = []

    def forward(self, x, noise, labels=None):
        mask = (torch.rand(x.shape[0], 4, *x.shape[2:]) > 0.5)     # global RNG, like nn.Dropout
        self.masks.append(mask)
        return super().forward(x, noise) * 0 + mask[:, :1].float()


@pytest.mark.parametrize("shared", [True, False])
def test_ect_target_replays_dropout_mask(shared):
    net = MaskRecorder()
    x0 = torch.zeros(8, 1, 8, 8)
    torch.manual_seed(3)
    ECT(ECTConfig(shared_dropout_mask=shared, q=256.0), (1, 8, 8), 0).loss(_ctx(net, 1), {"x": x0, "y": None})
    assert len(net.masks) == 2
    assert torch.equal(net.masks[0], net.masks[1]) == shared


def test_edm_loss_matches_formula():
    torch.manual_seed(0)
    net = TinyNet()
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    out = EDM(EDMConfig(), (1, 8, 8), 0).loss(_ctx(net, 5), {"x": x0, "y": None})
    gen = torch.Generator().manual_seed(5)
    t = (-1.2 + 1.2 * torch.randn(8, generator=gen)).exp()
    x_t = x0 + t.reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen)
    D = EDMParam(0.5).denoise(net, x_t, t)
    lam = (t ** 2 + 0.25) / (t * 0.5) ** 2
    ref = (lam * ((D - x0) ** 2).sum(dim=(1, 2, 3))).mean()
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-6)


def test_consistency_time_grids():
    assert consistency_times(1, 80.0, [0.821]) == [80.0]
    assert consistency_times(2, 80.0, [0.821]) == [80.0, 0.821]
    grid = consistency_times(4, 80.0, [0.821])
    assert grid[0] == pytest.approx(80.0) and len(grid) == 4 and grid == sorted(grid, reverse=True)
    with pytest.raises(ValueError):
        consistency_times(0, 80.0, [])


def test_consistency_sample_uses_fresh_noise_at_mid_point():
    calls = []

    def f(x, t):
        calls.append((x.clone(), t.clone()))
        return torch.zeros_like(x)          # always predicts 0

    noise = torch.randn(5, 2)
    gen = torch.Generator().manual_seed(0)
    out = consistency_sample(f, noise, [80.0, 0.821], gen)
    assert torch.equal(calls[0][0], noise * 80.0) and calls[0][1].tolist() == [80.0] * 5
    z = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(calls[1][0], 0.821 * z)       # x_mid = f(...) + t_mid z', z' fresh
    assert out.abs().sum() == 0


def test_heun_sampler_on_gaussian_data():
    """Data N(0, s^2): D(x, t) = s^2/(s^2+t^2) x and the PF-ODE maps x_T to x_T s/sqrt(s^2+T^2)."""
    s = 0.7
    noise = torch.randn(64, 3, dtype=torch.float64)

    def denoise(x, t):
        return s ** 2 / (s ** 2 + t.reshape(-1, 1) ** 2) * x

    exact = noise * 80.0 * s / math.sqrt(s ** 2 + 80.0 ** 2)
    torch.testing.assert_close(heun_sample(denoise, noise, 160).double(), exact, rtol=1e-3, atol=1e-5)
    # second order: halving the step size divides the error by about 4
    errs = [(heun_sample(denoise, noise, n).double() - exact).abs().max().item() for n in (40, 80)]
    assert 3.0 < errs[0] / errs[1] < 5.0
