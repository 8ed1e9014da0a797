"""sCT / sCD: the spec's sanity check (at r = 0, unnormalized, unweighted: the sCT gradient is cos^2 t /
(D sigma_d) times the TrigFlow diffusion-loss gradient), the rearranged tangent against the formula with a
finite difference, tangent normalizations, and config errors."""
import math

import pytest
import torch
from torch import nn

from harness.config import ConfigError, compose
from methods.base import StepContext
from methods.scm import SCT, SCMConfig

SD, SHAPE = 0.5, (1, 4, 4)


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(17, 16)

    def forward(self, x, c_noise, labels=None, return_logvar=False):
        h = torch.cat([x.flatten(1), c_noise.reshape(-1, 1)], 1)
        return torch.tanh(self.lin(h)).reshape(x.shape) * (1 + c_noise.reshape(-1, 1, 1, 1) ** 2)


def _ctx(net, step):
    return StepContext(net=net, net_nograd=net, teacher=None, step=step, total_steps=100,
                       generator=torch.Generator().manual_seed(4))


def test_sct_at_warmup_start_is_weighted_diffusion_finetuning():
    net, x0 = SmallNet(), torch.rand(5, *SHAPE) * 2 - 1
    sct = SCT(SCMConfig(tangent_norm="none", adaptive_weight=False, warmup_steps=10), SHAPE, 0)
    loss = sct.loss(_ctx(net, step=0), {"x": x0, "y": None})["loss"]
    grads = torch.autograd.grad(loss, list(net.parameters()))

    gen = torch.Generator().manual_seed(4)
    t = torch.atan((-1.0 + 1.4 * torch.randn(5, generator=gen)).exp() / SD)
    z = torch.randn(x0.shape, generator=gen) * SD
    c, s = t.cos().reshape(-1, 1, 1, 1), t.sin().reshape(-1, 1, 1, 1)
    x_t, v = c * x0 + s * z, c * z - s * x0
    diffusion = ((SD * net(x_t / SD, t) - v) ** 2).sum(dim=(1, 2, 3))          # TrigFlow loss, target dx_t/dt
    weighted = (c.flatten() ** 2 / (16 * SD) * diffusion).mean()
    expected = torch.autograd.grad(weighted, list(net.parameters()))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_rearranged_tangent_matches_the_formula_by_finite_differences():
    # sCM eq. 6: g/cos t = -cos t (sd F - dx/dt) - sin t (x_t + sd dF/dt), dF/dt along (dx/dt, 1)
    net = SmallNet().double()
    x_t, t = torch.randn(3, *SHAPE, dtype=torch.float64), torch.tensor([0.3, 0.9, 1.4], dtype=torch.float64)
    v = torch.randn(3, *SHAPE, dtype=torch.float64)
    c, s = t.cos().reshape(-1, 1, 1, 1), t.sin().reshape(-1, 1, 1, 1)
    _, jvp_out = torch.func.jvp(lambda u, tt: net(u, tt), (x_t / SD, t), (c * s * v, SD * t.cos() * t.sin()))
    h = 1e-6
    dF = (net((x_t + h * v) / SD, t + h) - net((x_t - h * v) / SD, t - h)) / (2 * h)
    torch.testing.assert_close(jvp_out, SD * c * s * dF, rtol=1e-6, atol=1e-9)   # = sigma_d cos t sin t dF/dt


def test_tangent_normalizations():
    g = torch.tensor([[3.0, 4.0], [0.0, 0.5]]).reshape(2, 1, 1, 2)
    l2 = SCT(SCMConfig(adaptive_weight=False), SHAPE, 0).normalize(g)
    torch.testing.assert_close(l2[0].flatten(), torch.tensor([3.0, 4.0]) / 5.1)
    rms = SCT(SCMConfig(adaptive_weight=False, tangent_norm="rms"), SHAPE, 0).normalize(g)
    torch.testing.assert_close(rms[0].flatten(), torch.tensor([3.0, 4.0]) / (5 / math.sqrt(2) + 0.1))
    clip = SCT(SCMConfig(adaptive_weight=False, tangent_norm="clip"), SHAPE, 0).normalize(g)
    assert clip.flatten().tolist() == [1.0, 1.0, 0.0, 0.5]


def test_config_errors():
    # the method sets the head it needs (harness.config.apply_network_requirements); built directly on a
    # network config without one, it refuses
    assert compose(["method=sct"]).model.logvar is True
    assert compose(["method=sct", "method.adaptive_weight=false"]).model.logvar is False
    with pytest.raises(ValueError, match="needs the network's log-variance head: set model.logvar=true"):
        SCT.check_model(SCMConfig(), {"logvar": False})
    with pytest.raises(ConfigError, match="method scd distills a teacher"):
        compose(["method=scd", "model.logvar=true"])
    with pytest.raises(ConfigError, match="unknown method.tangent_norm 'l3'"):
        compose(["method=sct", "model.logvar=true", "method.tangent_norm=l3"])
    assert compose(["method=sct", "model.logvar=true"]).method.warmup_fraction == 0.25  # tiny preset on digits
    with pytest.raises(ConfigError, match=r"0 <= method.warmup_fraction <= 1"):
        compose(["method=sct", "model.logvar=true", "method.warmup_fraction=1.5"])


def test_tangent_warmup_length_follows_the_run_or_the_fixed_steps():
    """r = min(1, step / H): H = warmup_fraction x trainer.steps when set (every budget warms up over the
    same share of its run), else warmup_steps [sCM §4.2]."""
    budget = SCT(SCMConfig(warmup_fraction=0.25, warmup_steps=10000), SHAPE, 0)
    assert [budget.warmup_length(n) for n in (20, 320)] == [5.0, 80.0]
    assert SCT(SCMConfig(warmup_steps=100), SHAPE, 0).warmup_length(20) == 100
