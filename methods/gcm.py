"""GCM, the recipe of "A Guide to Training Consistency Models" [G; spec gcm_ct_ict_cd.md part A].

Discrete-time consistency training from scratch on the OT flow-matching interpolant x_t = (1 - t) x + t z,
t in [t0, tT], with g(x_t, t, s) = x_t + (s - t) f(x_t, t, s) (G Eq. 3) and a stop-gradient teacher (the same
weights, no EMA). Per step [spec A.10]: s (CU: t0; VU: uniform-power), t | s in [s, tT], r = max(t - h(t), s),
x^_r = x_t + (r - t) u_t with u_t = z - x, one student pass f(x_t, t, s) and one no-grad pass f(x^_r, r, s),
then the non-squared l2 loss in its Eq. 39 form, or the time-aware MMD in the Eq. 40 form.

The guide's six modules are switches, so its ablation ladders (Tab. 2 A-F for CU, Tab. 3 G-L for VU) are
config variants: discretization (const | exp), time_cond (identity | exp), weighting (uniform | gamma),
t_sampling (uniform | sine), variant (cu | vu: the upper-limit sampling), loss (l2 | mmd). The defaults are
the full recipe (Tab. 1, "GCM").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from methods import register
from methods.base import Method, StepContext
from methods.common import check_choice, per_sample_sq
from methods.gcm_schedules import (DISCRETIZATIONS, LOSS_WEIGHTS, T_SAMPLERS, TIME_CONDS, loss_weight,
                                   step_h, tau_icdf, tau_pdf, time_cond, uniform_power_unit)
from methods.mmd import time_aware_mmd
from methods.parameterization import as_column

VARIANTS = ("cu", "vu")
LOSSES = ("l2", "mmd")
SAMPLERS = ("auto", "restart", "pushforward")
PDF_SCALES = ("rescaled", "unit")
START_NOISES = ("sigma_T", "unit")
# Tab. 1: CU m = 4, sigma = 0.05; VU m = 2, sigma = 0.1.
MMD_DEFAULTS = {"cu": (4, 0.05), "vu": (2, 0.1)}


@dataclass
class GCMConfig:
    name: str = "gcm"
    preset: str = "auto"            # auto | tiny | cifar10
    variant: str = "cu"             # cu: s = t0 (one time input); vu: s ~ p_up, network gets c(s) [G §3.4]
    t0: float = 0.006               # image end of the time range [G Tab. 1, App. G.1]
    tT: float = 0.994               # noise end [G App. G.1]
    sigma_data: float = 0.5         # c_in, c_out of the preconditioning [G App. C.2]
    noise_std: float = 1.0          # z ~ N(0, noise_std^2 I): 1 as G §2 writes; 0.5 = IMM's convention [AMBIG-1]
    discretization: str = "exp"     # h(t): const (Config A) | exp: eps exp(-mu t) [G §3.2, Eq. 36]
    eps: float = 0.005              # h's scale [G App. C.2]; Config A's constant h uses it too [AMBIG-2]
    mu: float = 3.5                 # decay of h and of c(t) [G §3.2]
    time_cond: str = "exp"          # network time input: identity (t) | exp: (exp(mu t) - 1)/mu [G Eq. 9]
    weighting: str = "gamma"        # w(t): uniform | gamma: t^gamma exp(-lambda t) [G Eq. 14]
    gamma: float = 1.0              # [G Tab. 1]
    lam: float = 6.0                # lambda [G Tab. 1]
    t_sampling: str = "sine"        # tau ~ uniform | sine | cosh, t = s + (tT - s) tau [G §3.3, Tab. 7g]
    density_a: float = 1.0          # a of p_sine(a, b) [G Tab. 1]; for cosh the guide's option is (1.5, 0)
    density_b: float = 0.01         # b [G Tab. 1]
    divide_by_pdf: bool = True      # per-sample weight w(t)/p(t | s) [G §3.3 Eq. 10]; false: w(t) alone
    pdf_scale: str = "rescaled"     # rescaled: p(t | s) = p(tau)/(tT - s) on [s, tT] [spec A.6, AMBIG-8] | unit: p(tau)
    nu: float = 4.0                 # uniform-power intensity of s (VU) [G Tab. 1]
    r_clamp_to_s: bool = True       # r = max(t - h(t), s): r never passes the upper limit [AMBIG-10]
    loss: str = "mmd"               # l2: the l2-norm loss, Eq. 39 form | mmd: time-aware MMD, Eq. 40 form [G Tab. 1]
    mmd_group: int = 0              # group size m; 0 = the variant's (CU 4, VU 2) [G Tab. 1]; 1 = l2 times 2e^(-h/sigma)
    mmd_sigma: float = 0.0          # kernel time scale; 0 = the variant's (CU 0.05, VU 0.1) [G Tab. 1]; .inf = IMM-style
    literal_eq46: bool = False      # every MMD term uses |t_j - r_k| as Eq. 46 prints [AMBIG-12]
    # floor of t_j - r_j in the MMD row weight w_j/(t_j - r_j) [AMBIG-13]: that weight diverges as t_j -> s_j
    # (r = s there); 1e-4 is below h(tT) = 1.5e-4, so only rows with t - s < 1e-4 are capped (not in the guide)
    mmd_min_dt: float = 1e-4
    shared_dropout_mask: bool = True  # the teacher pass replays the student's dropout mask (unstated; iCT does)
    sampler: str = "auto"           # auto (CU restart, VU pushforward) | restart | pushforward (VU only) [G App. G.1]
    mid_t: list[float] = field(default_factory=lambda: [0.6])   # 2-step intermediate time t1 [G App. G.1]
    start_noise: str = "sigma_T"    # x_tT = tT z (sigma_T) or z (unit) at sampling [AMBIG-16]


@register("gcm")
class GCM(Method):
    Config = GCMConfig
    PRESETS = {
        "cifar10": {},            # G Tab. 1 (the network, dropout 0.2, optimizer: recipe gcm-cifar10-*)
        # 8x8 digits on CPU: the guide's constants as they are. Its h and c are functions of t on [0, 1] and do
        # not depend on the image size; a batch of 128 splits into MMD groups of 4 or 2 evenly.
        "tiny": {},
    }

    @classmethod
    def check_config(cls, cfg: GCMConfig) -> None:
        for key, valid in (("variant", VARIANTS), ("discretization", DISCRETIZATIONS), ("time_cond", TIME_CONDS),
                           ("weighting", LOSS_WEIGHTS), ("t_sampling", T_SAMPLERS), ("loss", LOSSES),
                           ("sampler", SAMPLERS), ("pdf_scale", PDF_SCALES), ("start_noise", START_NOISES)):
            check_choice(f"method.{key}", getattr(cfg, key), valid)
        if not 0 < cfg.t0 < cfg.tT <= 1:
            raise ValueError(f"GCM needs 0 < method.t0 < method.tT <= 1 (got {cfg.t0}, {cfg.tT})")
        if cfg.eps <= 0 or cfg.mu <= 0 or cfg.nu <= 0 or cfg.noise_std <= 0 or cfg.sigma_data <= 0:
            raise ValueError(f"GCM needs method.eps, mu, nu, noise_std, sigma_data > 0 "
                             f"(got {cfg.eps}, {cfg.mu}, {cfg.nu}, {cfg.noise_std}, {cfg.sigma_data})")
        if cfg.mmd_group < 0 or cfg.mmd_sigma < 0 or cfg.mmd_min_dt <= 0:
            raise ValueError(f"method.mmd_group and method.mmd_sigma must be >= 0 (0 = the variant's default) and "
                             f"method.mmd_min_dt > 0, got {cfg.mmd_group}, {cfg.mmd_sigma}, {cfg.mmd_min_dt}")
        if cfg.t_sampling != "uniform" and cfg.density_a == cfg.density_b:
            raise ValueError(f"method.t_sampling={cfg.t_sampling} needs method.density_a != method.density_b "
                             f"(both {cfg.density_a})")
        if cfg.t_sampling == "sine" and not (0 <= cfg.density_b <= 1 and 0 <= cfg.density_a <= 1):
            raise ValueError(f"p_sine needs method.density_a, density_b in [0, 1] so that it stays positive "
                             f"(got {cfg.density_a}, {cfg.density_b})")
        if cfg.sampler == "pushforward" and cfg.variant != "vu":
            raise ValueError("method.sampler=pushforward needs g(x, t, s) with s != t0: set method.variant=vu, "
                             "or method.sampler=restart")
        if any(not cfg.t0 < m < cfg.tT for m in cfg.mid_t) or list(cfg.mid_t) != sorted(cfg.mid_t, reverse=True):
            raise ValueError(f"method.mid_t must descend inside (t0, tT) = ({cfg.t0}, {cfg.tT}), got {list(cfg.mid_t)}")

    @classmethod
    def network_requirements(cls, cfg: GCMConfig, model, device: str = "cpu") -> dict[str, tuple[Any, str]]:
        needs = super().network_requirements(cfg, model, device)
        needs["extra_cond_dim"] = ((1, "method.variant=vu feeds the upper limit c(s) to the network as a "
                                       "second time input") if cfg.variant == "vu" else
                                   (0, "method.variant=cu has one time input"))
        return needs

    @classmethod
    def check_model(cls, cfg: GCMConfig, model) -> None:
        dim = model.get("extra_cond_dim", 0)
        if cfg.variant == "vu" and dim != 1:
            raise ValueError(f"method.variant=vu feeds the upper limit c(s) to the network as a second time input: "
                             f"set model.extra_cond_dim=1 (got {dim})")
        if cfg.variant == "cu" and dim != 0:
            raise ValueError(f"method.variant=cu has one time input: set model.extra_cond_dim=0 (got {dim}), "
                             f"or method.variant=vu")

    def __init__(self, cfg: GCMConfig, data_shape, num_classes):
        super().__init__(cfg, data_shape, num_classes)
        group, sigma = MMD_DEFAULTS[cfg.variant]
        self.mmd_group = cfg.mmd_group or group
        self.mmd_sigma = cfg.mmd_sigma or sigma

    # -- the pieces ----------------------------------------------------------------------------
    def f(self, net, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, y=None) -> torch.Tensor:
        """f = c_out F(c_in x_t, c(t)[, c(s)]), c_in = 1/(sigma_d sqrt(alpha^2 + sigma^2)), c_out =
        sigma_d sqrt(alpha'^2 + sigma'^2) = sigma_d sqrt 2 for OT-FM [G §3.1, AMBIG-1: the literal formulas]."""
        c = self.cfg
        c_in = 1.0 / (c.sigma_data * ((1 - t) ** 2 + t ** 2).sqrt())
        c_out = c.sigma_data * math.sqrt(2.0)
        kwargs = {}
        if c.variant == "vu":
            kwargs["extra"] = time_cond(s, c.time_cond, c.mu).reshape(-1, 1)   # c(.) on s too [AMBIG-5]
        F = net(as_column(c_in, x_t) * x_t, time_cond(t, c.time_cond, c.mu), y, **kwargs)
        return c_out * F.to(x_t.dtype)

    def g(self, net, x_t, t, s, y=None) -> torch.Tensor:
        """g(x_t, t, s) = x_t + (s - t) f(x_t, t, s) [G Eq. 3]."""
        return x_t + as_column(s - t, x_t) * self.f(net, x_t, t, s, y)

    def draw_times(self, ctx: StepContext, batch: int, device) -> dict[str, torch.Tensor]:
        """s, t | s, r and the per-sample weight omega = w(t)/p(t | s) [spec A.10 step 2]. Draw order: (u, v) of s
        (VU only), then tau."""
        c = self.cfg
        if c.variant == "vu":
            u, v = ctx.rand(batch), ctx.rand(batch)
            s = c.t0 + (c.tT - c.t0) * uniform_power_unit(u, v, c.nu)       # affine map to [t0, tT] [AMBIG-9]
        else:
            s = torch.full((batch,), c.t0, device=ctx.generator.device)
        tau = tau_icdf(ctx.rand(batch), c.t_sampling, c.density_a, c.density_b)
        t = s + (c.tT - s) * tau
        r = t - step_h(t, c.discretization, c.eps, c.mu)
        if c.r_clamp_to_s:
            r = torch.maximum(r, s)
        omega = loss_weight(t, c.weighting, c.gamma, c.lam)
        if c.divide_by_pdf:
            p = tau_pdf(tau, c.t_sampling, c.density_a, c.density_b)
            omega = omega / (p / (c.tT - s) if c.pdf_scale == "rescaled" else p)
        return {k: v.to(device) for k, v in (("s", s), ("t", t), ("r", r), ("omega", omega))}

    # -- the step ------------------------------------------------------------------------------
    def loss(self, ctx: StepContext, batch):
        c = self.cfg
        x, y = batch["x"], batch.get("y")
        tm = self.draw_times(ctx, x.shape[0], x.device)
        s, t, r, omega = tm["s"], tm["t"], tm["r"], tm["omega"]
        z = ctx.randn_like(x) * c.noise_std
        x_t = as_column(1 - t, x) * x + as_column(t, x) * z                     # OT-FM interpolant [G §2]
        u_t = z - x
        x_r = x_t + as_column(r - t, x) * u_t                              # Euler step = the interpolant at r [spec A.1]
        tape = ctx.shared_dropout(c.shared_dropout_mask)
        with tape.record():
            F = self.f(ctx.net, x_t, t, s, y)
        with tape.replay(), torch.no_grad():
            F_r = self.f(ctx.net_nograd, x_r, r, s, y)
        if c.loss == "l2":
            per = eq39_residual(u_t, F, F_r, t, r, s)
            loss = (omega * per_sample_sq(per).sqrt()).mean()
            particle = per_sample_sq(per.detach()).sqrt()
        else:
            a, b = eq40_particles(x_t, x_r, F, F_r, t, r, s)
            dt = (t - r).clamp_min(c.mmd_min_dt)
            loss = time_aware_mmd(a, b, t, r, s, omega / dt, self.mmd_group, self.mmd_sigma, c.literal_eq46).mean()
            particle = per_sample_sq(a.detach() - b).sqrt() / dt
        return {"loss": loss, "gcm/l2": (omega * particle).mean(), "gcm/t_mean": t.mean(),
                "gcm/s_mean": s.mean(), "gcm/h_mean": (t - r).mean(), "gcm/omega_mean": omega.mean(),
                "gcm/frac_r_at_s": (r <= s).float().mean()}

    # -- sampling ------------------------------------------------------------------------------
    def default_steps(self) -> int:
        return len(self.cfg.mid_t) + 1

    def time_of_sigma(self, sigma: float) -> float:
        # x_t = (1 - t) x0 + t noise_std z = (1 - t)(x0 + sigma z) with sigma = t noise_std / (1 - t) [G §2]
        return sigma / (sigma + self.cfg.noise_std)

    def sample_times(self, steps: int) -> list[float]:
        """[tT, t1, ..., t0]: the paper's t1 = 0.6 for 2 steps, else evenly spaced in t (no paper grid)."""
        c = self.cfg
        if steps < 1:
            raise ValueError(f"sampler steps must be >= 1, got {steps}")
        mids = list(c.mid_t) if steps - 1 == len(c.mid_t) else \
            [c.tT + (c.t0 - c.tT) * i / steps for i in range(1, steps)]
        return [c.tT, *mids, c.t0]

    @torch.no_grad()
    def sample(self, net, noise, steps, class_labels=None, generator=None):
        """Restart (CU): x0 = g(x, t_i, t0), re-noised to t_{i+1} with fresh z; pushforward (VU): x = g(x, t_i,
        t_{i+1}), deterministic [G App. G.1, spec A.11]. 1 step: g(x_tT, tT, t0) either way."""
        c = self.cfg
        kind = c.sampler if c.sampler != "auto" else ("pushforward" if c.variant == "vu" else "restart")
        times = self.sample_times(steps)
        scale = c.tT if c.start_noise == "sigma_T" else 1.0
        x = noise.float() * c.noise_std * scale
        batch = x.shape[0]

        def full(v):
            return torch.full((batch,), v, device=x.device)
        for i, (t_cur, t_next) in enumerate(zip(times[:-1], times[1:])):
            if kind == "pushforward":
                x = self.g(net, x, full(t_cur), full(t_next), class_labels)
                continue
            x0 = self.g(net, x, full(t_cur), full(c.t0), class_labels)
            if i == len(times) - 2:
                return x0
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32) * c.noise_std
            x = (1 - t_next) * x0 + t_next * z                        # restart at t1: 0.4 x0 + 0.6 z'
        return x


def eq39_residual(u_t, F, F_r, t, r, s) -> torch.Tensor:
    """e = u_t - f(x_t,t,s) + (s - r)(sg f(x_t,t,s) - f-(x^_r,r,s))/(t - r) [G Eq. 39]; 0/0 -> 0 when r = t = s."""
    ratio = torch.where(t > r, (s - r) / (t - r).clamp_min(1e-12), torch.zeros_like(t))
    return u_t - F + as_column(ratio, F) * (F.detach() - F_r)


def eq40_particles(x_t, x_r, F, F_r, t, r, s) -> tuple[torch.Tensor, torch.Tensor]:
    """a = x_t + (r - t) f + (s - r) sg f (value g(x_t,t,s), gradient scaled by r - t), b = sg(x^_r + (s - r) f-)
    [G Eq. 40, App. G.1]; ||a - b|| / (t - r) has Eq. 5's gradient."""
    a = x_t + as_column(r - t, F) * F + as_column(s - r, F) * F.detach()
    b = (x_r + as_column(s - r, F_r) * F_r).detach()
    return a, b
