"""ECT, Easy Consistency Tuning (Geng et al. 2024): consistency tuning from a diffusion model."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from methods import register
from methods.base import Method, StepContext
from methods.common import (WEIGHTINGS, adaptive_distance, check_choice, huber_c_for_dim, lognormal_t,
                            weighting)
from methods.parameterization import EDMParam, as_column
from methods.sampling import consistency_sample, consistency_times

MAPPINGS = ("sigmoid", "const")


@dataclass
class ECTConfig:
    name: str = "ect"
    preset: str = "auto"            # auto | tiny | cifar10 | imagenet64
    sigma_data: float = 0.5         # ECT App. C
    p_mean: float = -1.1            # ECT Table 7, CIFAR-10
    p_std: float = 2.0
    q: float = 2.0                  # Delta t shrink factor per stage [ECT App. B]
    stages: int = 8                 # d = steps / stages when stage_steps = 0 [ECT App. B: total/8 on CIFAR-10]
    stage_steps: int = 0            # d, steps per stage; 0 = trainer steps // stages (either way, at most `stages`)
    stage_offset: int = 1           # a = floor(step/d) + offset: 1 when tuning from a DM [spec A1, ECT code]
    k: float = 8.0                  # n(t) = 1 + k sigmoid(-b t) [ECT eq. 15]
    b: float = 1.0
    mapping: str = "sigmoid"        # sigmoid: n(t) as above; const: n(t) = 1 [ECT eq. 17]
    huber_c: float = 0.0            # adaptive weighting smoothing c [ECT Table 7]
    adaptive_p: float = 0.5         # w(Delta) = 1/(||Delta||^2 + c^2)^p; 0.5 = pseudo-Huber [ECT eq. 16]
    weighting: str = "inv_dt"       # wbar(t, r) [ECT Table 7: 1/(t - r) on CIFAR-10]
    delta: float = 0.0              # only for weighting inv_dt_delta
    shared_dropout_mask: bool = True  # target pass replays the student's dropout mask [ECT code]
    sigma_max: float = 80.0         # T, first sampling time [ECT code]
    mid_t: list[float] = field(default_factory=lambda: [0.821])   # 2-step mid-point [iCT; ECT App. C]
    eval_shift_sigma_min: float = 0.0   # CIFAR code's shifted c_skip/c_out at sampling (0.003), 0 = off [spec 1.1]


@register("ect")
class ECT(Method):
    Config = ECTConfig
    PRESETS = {
        "cifar10": {},
        "imagenet64": {   # ECT Table 7, ECM-S..XL; App. B (q = 4, d = total/4)
            "p_mean": -0.8, "p_std": 1.6, "q": 4.0, "stages": 4, "huber_c": 0.06,
            "weighting": "inv_t2_plus_inv_sd2", "mid_t": [1.526],
        },
        # CPU digits (1x8x8): iCT's c = 0.00054 sqrt(d), d = 64; CIFAR-10 schedule otherwise.
        "tiny": {"huber_c": huber_c_for_dim(64)},
    }

    @classmethod
    def check_config(cls, cfg: ECTConfig) -> None:
        check_choice("method.mapping", cfg.mapping, MAPPINGS)
        check_choice("method.weighting", cfg.weighting, WEIGHTINGS)
        if cfg.q <= 1 or cfg.stages < 1 or cfg.stage_steps < 0 or cfg.stage_offset < 0:
            raise ValueError(f"ECT needs method.q > 1, method.stages >= 1, method.stage_steps >= 0 and "
                             f"method.stage_offset >= 0 (got {cfg.q}, {cfg.stages}, {cfg.stage_steps}, {cfg.stage_offset})")

    def __init__(self, cfg: ECTConfig, data_shape, num_classes):
        super().__init__(cfg, data_shape, num_classes)
        self.param = EDMParam(sigma_data=cfg.sigma_data)
        self.eval_param = EDMParam(sigma_data=cfg.sigma_data, shift_sigma_min=cfg.eval_shift_sigma_min)

    def stage(self, step: int, total_steps: int) -> int:
        """a = min(floor(step / d), stages - 1) + offset: d = stage_steps, or the run length / stages."""
        c = self.cfg
        d = c.stage_steps or max(total_steps // c.stages, 1)
        return min(step // d, c.stages - 1) + c.stage_offset      # capped at the last of `stages` stages

    def r_of_t(self, t: torch.Tensor, stage: int) -> torch.Tensor:
        """r = max(0, t (1 - n(t) / q^a)) [ECT eq. 15/18]."""
        c = self.cfg
        n = 1 + c.k * torch.sigmoid(-c.b * t) if c.mapping == "sigmoid" else torch.ones_like(t)
        return (t * (1 - n / c.q ** stage)).clamp(min=0)

    def loss(self, ctx: StepContext, batch):
        c = self.cfg
        x0, y = batch["x"], batch.get("y")
        t = lognormal_t(x0.shape[0], c.p_mean, c.p_std, ctx.generator, x0.device)
        stage = self.stage(ctx.step, ctx.total_steps)
        r = self.r_of_t(t, stage)
        eps = ctx.randn_like(x0)
        x_t = x0 + as_column(t, x0) * eps
        x_r, target, extra = self.target_inputs(x0, y, eps, x_t, t, r)

        tape = ctx.shared_dropout(c.shared_dropout_mask)
        with tape.record():
            pred = self.param.denoise(ctx.net, x_t, t, y)
        mask = r > 0
        if mask.any():
            with tape.replay(), torch.no_grad():
                f_r = self.param.denoise(ctx.net_nograd, x_r, torch.where(mask, r, torch.ones_like(r)), y)
            target = torch.where(as_column(mask, x0), torch.nan_to_num(f_r), target)
        per = adaptive_distance(pred - target, c.huber_c, c.adaptive_p)
        loss = (weighting(c.weighting, t, r, c.sigma_data, c.delta) * per).mean()
        return {"loss": loss, f"{self.name}/stage": float(stage), f"{self.name}/r_over_t": (r / t).mean(),
                f"{self.name}/frac_r0": (~mask).float().mean(), **extra}

    def target_inputs(self, x0, y, eps, x_t, t, r) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """x_r, the r = 0 target and extra scalars to log: shared noise x_r = x0 + r eps [ECT eq. 12], and
        the boundary f(x0, 0) = x0 [ECT eq. 14]. SCT replaces both by its variance-reduced estimate."""
        return x0 + as_column(r, x0) * eps, x0, {}

    def default_steps(self) -> int:
        return len(self.cfg.mid_t) + 1

    @torch.no_grad()
    def sample(self, net, noise, steps, class_labels=None, generator=None):
        times = consistency_times(steps, self.cfg.sigma_max, self.cfg.mid_t)
        return consistency_sample(lambda x, t: self.eval_param.denoise(net, x, t, class_labels),
                                  noise, times, generator)
