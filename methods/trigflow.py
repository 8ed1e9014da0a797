"""TrigFlow (Lu & Song 2024, sCM §2-3): the parameterization of sCT / sCD and its diffusion teacher.

x_t = cos(t) x0 + sin(t) z, z ~ N(0, sigma_d^2 I), t in [0, pi/2]; the network predicts the velocity
sigma_d F(x_t / sigma_d, c_noise(t)) of the PF-ODE dx_t/dt, whose target is v_t = cos(t) z - sin(t) x0.
The consistency function is f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, c_noise(t))
(sCM eq. 5, also the data prediction D of eq. 23), so f(x, 0) = x. c_noise(t) = t [sCM §4.1].
To and from EDM: sigma = sigma_d tan(t), x_sigma = x_t / cos(t) [sCM eq. 30].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from methods import register
from methods.base import Method, StepContext
from methods.common import check_label_dropout, drop_labels, per_sample_sq
from methods.parameterization import as_column
from methods.sampling import heun_sample


def t_from_sigma(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """t = arctan(sigma / sigma_d) [sCM eq. 30]."""
    return torch.atan(sigma / sigma_data)


def sigma_from_t(t: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """sigma = sigma_d tan(t) [sCM eq. 30]."""
    return sigma_data * torch.tan(t)


def proposal_t(n: int, p_mean: float, p_std: float, sigma_data: float, generator: torch.Generator,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """t = arctan(e^tau / sigma_d), tau ~ N(P_mean, P_std^2) [sCM §4.1, Alg. 1; spec scm.md 2.7]."""
    tau = p_mean + p_std * torch.randn(n, generator=generator, device=device, dtype=torch.float32)
    return torch.atan(tau.exp() / sigma_data)


@dataclass(frozen=True)
class TrigParam:
    sigma_data: float = 0.5

    def velocity(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                 class_labels: torch.Tensor | None = None, **net_kwargs) -> torch.Tensor:
        """sigma_d F(x_t / sigma_d, c_noise(t) = t) in fp32; t per sample [B]."""
        sd = self.sigma_data
        return sd * net(x_t.float() / sd, t.float(), class_labels, **net_kwargs).float()

    def denoise(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                class_labels: torch.Tensor | None = None, **net_kwargs) -> torch.Tensor:
        """f(x_t, t) = cos(t) x_t - sin(t) sigma_d F  [sCM eq. 5 / 23]."""
        tc = as_column(t.float(), x_t)
        return torch.cos(tc) * x_t.float() - torch.sin(tc) * self.velocity(net, x_t, t, class_labels, **net_kwargs)

    def edm_denoiser(self, net: nn.Module, class_labels: torch.Tensor | None = None):
        """The same network as an EDM denoiser D(x_sigma, sigma), for EDM's samplers [sCM eq. 30]."""
        def denoise(x_sigma: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            t = t_from_sigma(sigma.float(), self.sigma_data)
            return self.denoise(net, torch.cos(as_column(t, x_sigma)) * x_sigma, t, class_labels)
        return denoise


@dataclass
class TrigFlowConfig:
    name: str = "trigflow"
    preset: str = "auto"        # auto | tiny | cifar10 | imagenet64
    sigma_data: float = 0.5     # sCM §2 (as EDM)
    p_mean: float = -1.2        # proposal in EDM sigma space; CIFAR-10 teacher follows EDM [spec scm.md 7.1]
    p_std: float = 1.2
    sigma_min: float = 0.002    # Heun sampler grid, EDM's, mapped to t by arctan(sigma / sigma_d) [spec 1.6]
    sigma_max: float = 80.0
    rho: float = 7.0
    sample_steps: int = 18      # Heun points (35 NFE, CIFAR-10) [sCM App. G.1]
    label_dropout: float = 0.0  # P(null label) per sample, for classifier-free guidance [sCM App. G.2: 0.1]


@register("trigflow")
class TrigFlow(Method):
    """TrigFlow diffusion teacher: ||sigma_d F - v_t||^2 / sigma_d^2 under the lognormal proposal.

    With sigma = sigma_d tan t, EDM's lambda(sigma) ||D - x0||^2 equals ||sigma_d F - v_t||^2 / sigma_d^2
    (D - x0 = -sin(t) (sigma_d F - v_t) and lambda = 1 / (sigma_d sin t)^2), so this teacher is trained
    exactly as the EDM teacher, in TrigFlow's variables (the paper's CIFAR-10 teacher "follows EDM")."""

    Config = TrigFlowConfig
    PRESETS = {
        "tiny": {},
        "cifar10": {},
        "imagenet64": {"p_mean": -0.8, "p_std": 1.6, "sample_steps": 32},   # sCM Table 3 / App. G.1
    }

    @classmethod
    def check_config(cls, cfg: TrigFlowConfig) -> None:
        if cfg.sample_steps < 1 or cfg.p_std <= 0 or cfg.sigma_data <= 0:
            raise ValueError(f"trigflow needs method.sample_steps >= 1, method.p_std > 0, method.sigma_data > 0 "
                             f"(got {cfg.sample_steps}, {cfg.p_std}, {cfg.sigma_data})")
        check_label_dropout(cfg.label_dropout)

    def __init__(self, cfg: TrigFlowConfig, data_shape, num_classes):
        super().__init__(cfg, data_shape, num_classes)
        self.param = TrigParam(cfg.sigma_data)

    def loss(self, ctx: StepContext, batch):
        c = self.cfg
        x0, y = batch["x"], batch.get("y")
        t = proposal_t(x0.shape[0], c.p_mean, c.p_std, c.sigma_data, ctx.generator, x0.device)
        y = drop_labels(y, self.num_classes, self.cfg.label_dropout, ctx.generator)
        z = ctx.randn_like(x0) * c.sigma_data
        tc = as_column(t, x0)
        x_t = torch.cos(tc) * x0 + torch.sin(tc) * z
        v_t = torch.cos(tc) * z - torch.sin(tc) * x0
        per = per_sample_sq(self.param.velocity(ctx.net, x_t, t, y) - v_t) / c.sigma_data ** 2
        return {"loss": per.mean(), "trigflow/t_median": t.median()}

    @torch.no_grad()
    def sample(self, net, noise, steps, class_labels=None, generator=None):
        c = self.cfg
        return heun_sample(self.param.edm_denoiser(net, class_labels), noise, steps, c.sigma_min, c.sigma_max, c.rho)

    def nfe(self, steps: int) -> int:
        return 2 * steps - 1

    def default_steps(self) -> int:
        return self.cfg.sample_steps
