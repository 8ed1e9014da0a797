"""TrigFlow: the boundary condition, conversions to EDM, the proposal, the teacher loss against a
straight-line implementation, and its equivalence with EDM's weighted denoising loss."""
import math

import pytest
import torch
from torch import nn

from methods.base import StepContext
from methods.parameterization import EDMParam
from methods.trigflow import (TrigFlow, TrigFlowConfig, TrigParam, proposal_t, sigma_from_t, t_from_sigma)

SD = 0.5


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, c_noise, labels=None):
        return self.conv(x) + 0.3 * c_noise.reshape(-1, 1, 1, 1)


def test_boundary_condition_f_x_0_is_x():
    x = torch.randn(4, 1, 8, 8)
    f = TrigParam(SD).denoise(TinyNet(), x, torch.zeros(4))
    assert torch.equal(f, x)


def test_edm_conversions_round_trip():
    sigma = torch.tensor([0.002, 0.1, 0.982, 80.0], dtype=torch.float64)
    t = t_from_sigma(sigma, SD)
    assert torch.allclose(sigma_from_t(t, SD), sigma, rtol=1e-12)
    assert t[-1].item() == pytest.approx(1.564546, abs=1e-6)                 # spec 6: arctan(160)
    assert t_from_sigma(torch.tensor(SD * math.tan(1.1)), SD).item() == pytest.approx(1.1)


def test_proposal_is_arctan_of_lognormal_sigma():
    t = proposal_t(5, -1.0, 1.4, SD, torch.Generator().manual_seed(3))
    tau = -1.0 + 1.4 * torch.randn(5, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(t, torch.atan(tau.exp() / SD))
    # spec 2.7 quantiles for (-1.0, 1.4) at z = 0 and +1: 0.634, 1.247
    assert math.atan(math.exp(-1.0) / SD) == pytest.approx(0.634, abs=5e-4)
    assert math.atan(math.exp(-1.0 + 1.4) / SD) == pytest.approx(1.247, abs=5e-4)


def test_teacher_loss_matches_straight_line_and_edm_weighting():
    net, x0 = TinyNet(), torch.rand(6, 1, 8, 8) * 2 - 1
    method = TrigFlow(TrigFlowConfig(), (1, 8, 8), 0)
    ctx = StepContext(net=net, net_nograd=net, teacher=None, step=0, total_steps=1,
                      generator=torch.Generator().manual_seed(11))
    out = method.loss(ctx, {"x": x0, "y": None})
    gen = torch.Generator().manual_seed(11)
    t = torch.atan((-1.2 + 1.2 * torch.randn(6, generator=gen)).exp() / SD)
    z = torch.randn(x0.shape, generator=gen) * SD
    c, s = t.cos().reshape(-1, 1, 1, 1), t.sin().reshape(-1, 1, 1, 1)
    x_t = c * x0 + s * z
    v_pred = SD * net(x_t / SD, t)
    per = ((v_pred - (c * z - s * x0)) ** 2).sum(dim=(1, 2, 3)) / SD ** 2
    assert out["loss"].item() == pytest.approx(per.mean().item(), rel=1e-5)
    # the same number is EDM's lambda(sigma) ||D - x0||^2 at sigma = sigma_d tan t (the teacher "follows EDM")
    sigma = SD * t.tan()
    d = c * x_t - s * v_pred
    lam = (sigma ** 2 + SD ** 2) / (sigma * SD) ** 2
    edm = (lam * ((d - x0) ** 2).sum(dim=(1, 2, 3))).mean()
    assert edm.item() == pytest.approx(out["loss"].item(), rel=1e-4)


def test_edm_denoiser_view_agrees_with_the_trigflow_denoiser():
    net, x_sigma = TinyNet(), torch.randn(3, 1, 8, 8)
    sigma = torch.tensor([0.05, 1.0, 20.0])
    param = TrigParam(SD)
    t = t_from_sigma(sigma, SD)
    via_edm = param.edm_denoiser(net)(x_sigma, sigma)
    direct = param.denoise(net, torch.cos(t).reshape(-1, 1, 1, 1) * x_sigma, t)
    assert torch.allclose(via_edm, direct)
    # a perfect velocity makes the denoiser return the data exactly
    x0, z = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8) * SD
    c, s = t.cos().reshape(-1, 1, 1, 1), t.sin().reshape(-1, 1, 1, 1)
    x_t, v = c * x0 + s * z, c * z - s * x0
    assert torch.allclose(c * x_t - s * v, x0, atol=1e-6)
    assert EDMParam(SD).c_skip(torch.tensor(0.0)) == 1                       # both boundaries at 0
