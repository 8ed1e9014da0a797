"""sCT and sCD: continuous-time consistency models in TrigFlow (Lu & Song 2024, Algorithm 1).

Per step [spec scm.md 2.10]: t from the proposal, x_t = cos t x0 + sin t z, the velocity v = dx_t/dt
(sCT: cos t z - sin t x0; sCD: the frozen TrigFlow teacher's), one no-grad torch.func.jvp of F on the
unwrapped module at primal (x_t/sigma_d, t) with the rearranged tangent (cos t sin t v, sigma_d cos t sin t)
[sCM §5.1], then
    g = -cos^2 t (sigma_d F- - v) - r (cos t sin t x_t + JVP),   r = min(1, step/H)        [sCM eq. 6, 2.5]
    g <- g / (||g|| + c)                                                                    [sCM 2.4]
    loss = e^{w(t)}/D ||F - F- - g||^2 - w(t),  w = -logvar head of the network            [sCM eq. 8]
with the gradient pass through the engine, replaying the JVP pass's dropout mask. No extra 1/sigma prior
weight: it is already the cos t factor of g [spec 2.3].
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from methods import register
from methods.base import Method, StepContext
from methods.common import check_choice, per_sample_sq
from methods.parameterization import as_column
from methods.trigflow import TrigParam, proposal_t

TANGENT_NORMS = ("l2", "rms", "clip", "none")


@dataclass
class SCMConfig:
    name: str = "sct"
    preset: str = "auto"            # auto | tiny | cifar10 | imagenet64
    sigma_data: float = 0.5         # sCM (as EDM)
    p_mean: float = -1.0            # proposal [sCM App. G.2, CIFAR-10 CM]
    p_std: float = 1.4
    warmup_steps: int = 10000       # H of the tangent warmup r = min(1, step/H) [sCM §4.2]
    warmup_fraction: float = 0.0    # > 0: H = this x the run's steps instead (budget-scaled; not in the paper)
    tangent_norm: str = "l2"        # l2: g/(||g|| + c) per sample [sCM Alg. 1] | rms: ||g||/sqrt(D) | clip: [-1, 1] | none
    norm_c: float = 0.1             # c of the tangent normalization [sCM §4.2]
    adaptive_weight: bool = True    # learned w(t) = -logvar head (needs model.logvar=true) [sCM §4.2, App. D]
    shared_dropout_mask: bool = True  # gradient pass replays the JVP pass's dropout mask [spec 2.9]
    sigma_max: float = 80.0         # sampling starts at t = arctan(sigma_max / sigma_d) [spec 6]
    mid_t: list[float] = field(default_factory=lambda: [1.1])   # 2-step intermediate TrigFlow time [sCM §6]


@dataclass
class SCDConfig(SCMConfig):
    name: str = "scd"
    # Classifier-free guidance as a student input [sCM App. G.2, ImageNet 512]: per sample s ~ U[1, guidance_max],
    # the teacher's velocity is v_uncond + s (v_cond - v_uncond) (null label = all-zero row; the teacher needs
    # method.label_dropout > 0), and the student reads s through model.extra_cond_dim=1. 1: no guidance.
    guidance_max: float = 1.0
    guidance_scale: float = 1.0     # s fed to the student when sampling (in [1, guidance_max])


class SCM(Method):
    uses_jvp = True                 # the tangent dF/dt by torch.func.jvp [sCM eq. 8]
    PRESETS = {
        "cifar10": {},
        "imagenet64": {"p_std": 1.6},                # sCM Table 3
        # CPU runs of a few hundred steps. 2-step mid-point 0.4 (sigma 0.21): on the digits (unet-xs, 400 steps
        # from a 600-step teacher) 2-step pixel FD for t_mid 0.2/0.4/0.6/0.8/1.1 was sCT 2.09/1.96/2.01/2.51/2.70
        # and sCD 3.88/3.14/3.08/4.56/4.69 against 1-step 2.52 and 4.95: the paper's 1.1 suits 32x32 and up.
        # Warmup: a quarter of the run (the 100 of 400 steps measured above), so every budget warms up alike.
        "tiny": {"warmup_fraction": 0.25, "mid_t": [0.4]},
    }

    @classmethod
    def check_config(cls, cfg: SCMConfig) -> None:
        check_choice("method.tangent_norm", cfg.tangent_norm, TANGENT_NORMS)
        if cfg.warmup_steps < 0 or not 0 <= cfg.warmup_fraction <= 1 or cfg.norm_c <= 0 or cfg.p_std <= 0:
            raise ValueError(f"{cfg.name} needs method.warmup_steps >= 0, 0 <= method.warmup_fraction <= 1, "
                             f"method.norm_c > 0, method.p_std > 0 (got {cfg.warmup_steps}, {cfg.warmup_fraction}, "
                             f"{cfg.norm_c}, {cfg.p_std})")

    @classmethod
    def network_requirements(cls, cfg: SCMConfig, model, device: str = "cpu") -> dict[str, tuple[Any, str]]:
        needs = super().network_requirements(cfg, model, device)
        if cfg.adaptive_weight:
            needs["logvar"] = (True, "method.adaptive_weight=true learns w(t) as the network's log-variance head")
        return needs

    @classmethod
    def check_model(cls, cfg: SCMConfig, model) -> None:
        if cfg.adaptive_weight and not model.get("logvar"):
            raise ValueError(f"method.adaptive_weight=true ({cfg.name}) needs the network's log-variance head: "
                             f"set model.logvar=true, or method.adaptive_weight=false")

    def __init__(self, cfg: SCMConfig, data_shape, num_classes):
        super().__init__(cfg, data_shape, num_classes)
        self.param = TrigParam(cfg.sigma_data)

    def velocity(self, ctx: StepContext, x0, z, x_t, t, y, extra) -> torch.Tensor:
        """dx_t/dt: the single-sample estimate cos t z - sin t x0 (sCT)."""
        tc = as_column(t, x0)
        return torch.cos(tc) * z - torch.sin(tc) * x0

    def student_extra(self, ctx: StepContext | None, batch: int, device) -> torch.Tensor | None:
        """The student's extra input for a training step (ctx) or for sampling (ctx None); None: no input."""
        return None

    def normalize(self, g: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if c.tangent_norm == "clip":
            return g.clamp(-1, 1)
        if c.tangent_norm == "none":
            return g
        norm = per_sample_sq(g).sqrt()
        if c.tangent_norm == "rms":
            norm = norm / math.sqrt(g[0].numel())
        return g / as_column(norm + c.norm_c, g)

    def loss(self, ctx: StepContext, batch):
        c, sd = self.cfg, self.cfg.sigma_data
        x0, y = batch["x"], batch.get("y")
        t = proposal_t(x0.shape[0], c.p_mean, c.p_std, sd, ctx.generator, x0.device)
        z = ctx.randn_like(x0) * sd
        cos, sin = torch.cos(as_column(t, x0)), torch.sin(as_column(t, x0))
        x_t = cos * x0 + sin * z
        extra = self.student_extra(ctx, x0.shape[0], x0.device)
        with torch.no_grad():
            v = self.velocity(ctx, x0, z, x_t, t, y, extra)
        r = min(1.0, ctx.step / h) if (h := self.warmup_length(ctx.total_steps)) else 1.0
        tape = ctx.shared_dropout(c.shared_dropout_mask)
        with tape.record(), torch.no_grad():      # the extra input is a constant of the trajectory: no tangent
            f_minus, jvp_out = torch.func.jvp(lambda u, tt: ctx.net_nograd(u, tt, y, extra), (x_t / sd, t),
                                              (cos * sin * v, sd * torch.cos(t) * torch.sin(t)))
            f_minus, jvp_out = f_minus.float(), jvp_out.float()
            g_raw = -cos ** 2 * (sd * f_minus - v) - r * (cos * sin * x_t + jvp_out)
            g = self.normalize(g_raw)
        with tape.replay():
            if c.adaptive_weight:
                F, logvar = ctx.net(x_t / sd, t, y, extra, return_logvar=True)
                w = -logvar.float().reshape(-1)
            else:
                F, w = ctx.net(x_t / sd, t, y, extra), torch.zeros_like(t)
        per = per_sample_sq(F.float() - f_minus - g) / g[0].numel()
        loss = (torch.exp(w) * per - w).mean()
        return {"loss": loss, f"{self.name}/r": r, f"{self.name}/g_raw_norm": per_sample_sq(g_raw).sqrt().mean(),
                f"{self.name}/jvp_finite": torch.isfinite(jvp_out).all().float(), f"{self.name}/w_mean": w.mean()}

    def default_steps(self) -> int:
        return len(self.cfg.mid_t) + 1

    def warmup_length(self, total_steps: int) -> float:
        """H of the tangent warmup: warmup_fraction x the run's steps when set, else warmup_steps."""
        c = self.cfg
        return c.warmup_fraction * total_steps if c.warmup_fraction > 0 else c.warmup_steps

    def time_of_sigma(self, sigma: float) -> float:
        return math.atan(sigma / self.cfg.sigma_data)      # TrigFlow: sigma = sigma_d tan t [sCM §2]

    @torch.no_grad()
    def sample(self, net, noise, steps, class_labels=None, generator=None):
        """1 step from t_max = arctan(sigma_max/sigma_d); then re-noise x = cos s x0 + sin s z' [sCM §6]."""
        c, sd = self.cfg, self.cfg.sigma_data
        if steps == 1 or steps - 1 == len(c.mid_t):
            times = [math.atan(c.sigma_max / sd), *c.mid_t[: steps - 1]]
        else:      # evenly spaced in t below t_max (no paper grid beyond 2 steps)
            t_max = math.atan(c.sigma_max / sd)
            times = [t_max * (1 - i / steps) for i in range(steps)]
        batch = noise.shape[0]
        extra = self.student_extra(None, batch, noise.device)
        x = self.param.denoise(net, noise.float() * sd, torch.full((batch,), times[0], device=noise.device),
                               class_labels, extra=extra)
        for s in times[1:]:
            z = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=torch.float32) * sd
            x = math.cos(s) * x + math.sin(s) * z
            x = self.param.denoise(net, x, torch.full((batch,), s, device=noise.device), class_labels, extra=extra)
        return x


@register("sct")
class SCT(SCM):
    """sCT: v is the single-sample estimate; the paper initializes from a TrigFlow teacher (init_from)."""

    Config = SCMConfig


@register("scd")
class SCD(SCM):
    """sCD: v is the frozen TrigFlow teacher's velocity sigma_d F_teacher(x_t/sigma_d, t) (a `trigflow` run)."""

    Config = SCDConfig
    needs_teacher = True
    teacher_methods = ("trigflow",)     # its output is read as a TrigFlow velocity

    @classmethod
    def check_config(cls, cfg: SCDConfig) -> None:
        super().check_config(cfg)
        if not 1.0 <= cfg.guidance_scale <= max(cfg.guidance_max, 1.0):
            raise ValueError(f"scd needs 1 <= method.guidance_scale <= max(method.guidance_max, 1) "
                             f"(got {cfg.guidance_scale}, {cfg.guidance_max})")

    @classmethod
    def network_requirements(cls, cfg: SCDConfig, model, device: str = "cpu") -> dict[str, tuple[Any, str]]:
        needs = super().network_requirements(cfg, model, device)
        if cfg.guidance_max > 1:
            needs["extra_cond_dim"] = (1, f"method.guidance_max={cfg.guidance_max} feeds the guidance scale "
                                          f"to the student as a second input")
        return needs

    @classmethod
    def check_model(cls, cfg: SCDConfig, model) -> None:
        super().check_model(cfg, model)
        if cfg.guidance_max > 1 and model.get("extra_cond_dim") != 1:
            raise ValueError(f"method.guidance_max={cfg.guidance_max} feeds the guidance scale to the student: "
                             f"set model.extra_cond_dim=1 (got {model.get('extra_cond_dim')})")

    @classmethod
    def check_data(cls, cfg: SCDConfig, data) -> None:
        if cfg.guidance_max > 1 and not data.get("class_conditional"):
            raise ValueError("method.guidance_max > 1 (classifier-free guidance) needs class-conditional data: "
                             "set data.class_conditional=true")

    @property
    def guided(self) -> bool:
        return self.cfg.guidance_max > 1

    def student_extra(self, ctx, batch, device):
        if not self.guided:
            return None
        if ctx is None:
            return torch.full((batch, 1), self.cfg.guidance_scale, device=device)
        return 1.0 + (self.cfg.guidance_max - 1.0) * ctx.rand(batch, 1).to(device)     # s ~ U[1, s_max]

    def velocity(self, ctx, x0, z, x_t, t, y, extra):
        if ctx.teacher is None:
            raise ValueError("scd needs a teacher: set teacher=RUN_DIR (a finished trigflow run on this data)")
        v_cond = self.param.velocity(ctx.teacher, x_t, t, y)
        if extra is None:
            return v_cond
        null = torch.zeros(y.shape[0], self.num_classes, device=x_t.device)       # the "no class" label
        v_uncond = self.param.velocity(ctx.teacher, x_t, t, null)
        return v_uncond + as_column(extra.reshape(-1), x_t) * (v_cond - v_uncond)     # CFG at scale s [spec 3]
