"""EDM diffusion pretraining (Karras et al. 2022): the teacher ECT, SCT and CD start from."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from methods import register
from methods.base import Method, StepContext
from methods.common import check_label_dropout, drop_labels, check_choice, lognormal_t, per_sample_sq, pseudo_huber
from methods.parameterization import EDMParam, as_column
from methods.sampling import heun_sample

LOSSES = ("edm", "ect")


@dataclass
class EDMConfig:
    name: str = "edm"
    preset: str = "auto"        # auto | tiny | cifar10 | imagenet64
    sigma_data: float = 0.5     # EDM Table 1
    p_mean: float = -1.2        # EDM Table 1 (training noise distribution)
    p_std: float = 1.2          # EDM Table 1
    loss: str = "edm"           # edm: lambda(t) ||D - x0||^2 [EDM eq. 8]; ect: ||D - x0|| / t [ECT App. B pretraining]
    sigma_min: float = 0.002    # sampler grid [EDM Table 1]
    sigma_max: float = 80.0
    rho: float = 7.0
    sample_steps: int = 18      # Heun points for the N-step sampler (35 NFE, EDM's CIFAR-10 setting)
    label_dropout: float = 0.0  # P(null label) per sample, for classifier-free guidance [sCM App. G.2: 0.1]


@register("edm")
class EDM(Method):
    Config = EDMConfig
    PRESETS = {
        "tiny": {},
        "cifar10": {},
        "imagenet64": {"p_mean": -0.8, "p_std": 1.6},   # EDM2's img64 presets (as ECT Table 7)
    }

    @classmethod
    def check_config(cls, cfg: EDMConfig) -> None:
        check_choice("method.loss", cfg.loss, LOSSES)
        if cfg.sample_steps < 1:
            raise ValueError(f"method.sample_steps must be >= 1, got {cfg.sample_steps}")
        check_label_dropout(cfg.label_dropout)

    def __init__(self, cfg: EDMConfig, data_shape, num_classes):
        super().__init__(cfg, data_shape, num_classes)
        self.param = EDMParam(sigma_data=cfg.sigma_data)

    def loss(self, ctx: StepContext, batch):
        x0, y = batch["x"], batch.get("y")
        t = lognormal_t(x0.shape[0], self.cfg.p_mean, self.cfg.p_std, ctx.generator, x0.device)
        y = drop_labels(y, self.num_classes, self.cfg.label_dropout, ctx.generator)
        x_t = x0 + as_column(t, x0) * ctx.randn_like(x0)
        D = self.param.denoise(ctx.net, x_t, t, y)
        if self.cfg.loss == "edm":
            sd = self.cfg.sigma_data
            lam = (t ** 2 + sd ** 2) / (t * sd) ** 2                         # EDM eq. 8 lambda(sigma)
            per = lam * per_sample_sq(D - x0)
        else:
            per = pseudo_huber(D - x0, 0.0) / t                              # ECT App. B: p = 1/2, c = 0, 1/t
        return {"loss": per.mean(), "edm/t_median": t.median()}

    @torch.no_grad()
    def sample(self, net, noise, steps, class_labels=None, generator=None):
        def denoise(x, t):
            return self.param.denoise(net, x, t, class_labels)
        return heun_sample(denoise, noise, steps, self.cfg.sigma_min, self.cfg.sigma_max, self.cfg.rho)

    def nfe(self, steps: int) -> int:
        return 2 * steps - 1

    def default_steps(self) -> int:
        return self.cfg.sample_steps
