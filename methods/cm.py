"""Discrete-time consistency models on a Karras grid: CT and CD (Song et al. 2023), iCT (Song & Dhariwal 2023).

All three train f_theta(x_{t_{i+1}}, t_{i+1}) toward a no-grad target f_{theta^-}(x^_{t_i}, t_i) at the
adjacent, smaller grid point [CM eq. 7 and 10; spec gcm_ct_ict_cd.md B.3-B.5]. They differ in
  - x^_{t_i}: shared noise x0 + t_i z (CT, iCT) or one teacher ODE step from x_{t_{i+1}} (CD);
  - theta^-: an EMA of theta (CT: mu(k) from mu0; CD: a fixed rate) or theta itself (iCT, CD on CIFAR-10);
  - N(k) and how i is drawn: CT's square-root curriculum with uniform i, iCT's doubling curriculum with a
    discretized lognormal over i, CD's fixed N with uniform i;
  - the distance (l2, l1, pseudo-Huber, LPIPS) and the weighting (1, or iCT's 1/(t_{i+1} - t_i)).
Grids ascend, t_1 = sigma_min < ... < t_N = sigma_max [ECT spec A3]; i is 1-based in formulas and
0-based in code (the pair is grid[i], grid[i + 1]).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from methods import register
from methods.base import Method, StepContext
from methods.common import check_choice, huber_c_for_dim, karras_sigmas, per_sample_sq, pseudo_huber
from methods.parameterization import EDMParam, as_column
from methods.sampling import consistency_sample, consistency_times

DISTANCES = ("l2", "l1", "pseudo_huber", "lpips")
CM_WEIGHTINGS = ("uniform", "inv_dt")
SOLVERS = ("heun", "euler")
MU_DIVISORS = ("n", "n_minus_1")


# -- curricula and index distributions ---------------------------------------------------------------
def ct_num_scales(k: int, total: int, s0: int, s1: int) -> int:
    """N(k) = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1 [CM App. C; spec B.4]."""
    frac = k / max(total, 1)
    # at least one interval (s0 = 1 gives ceil(0) = 0 at k = 0), as the CM code's max(., 1)
    return max(int(math.ceil(math.sqrt(frac * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1)), 1) + 1


def ct_target_mu(n: int, s0: int, mu0: float, divisor: str = "n") -> float:
    """mu(k) = exp(s0 ln(mu0) / N(k)) [CM paper; spec B.4]; the official code divides by N(k) - 1 [S-AMBIG-4]."""
    if mu0 == 0:
        return 0.0                                       # no target EMA: theta^- = sg(theta)
    return math.exp(s0 * math.log(mu0) / (n if divisor == "n" else max(n - 1, 1)))


def ict_num_scales(k: int, total: int, s0: int, s1: int) -> int:
    """N(k) = min(s0 2^floor(k/K'), s1) + 1, K' = floor(K / (log2 floor(s1/s0) + 1)) [iCT eq. 9; spec A4]."""
    k_prime = max(math.floor(total / (math.log2(s1 // s0) + 1)), 1)
    return min(s0 * 2 ** (k // k_prime), s1) + 1


def ict_index_probs(grid: torch.Tensor, p_mean: float, p_std: float) -> torch.Tensor:
    """p(i) proportional to erf((ln t_{i+1} - P_mean)/(sqrt 2 P_std)) - erf((ln t_i - P_mean)/(sqrt 2 P_std)),
    i = 1..N-1 over an ascending grid [iCT §3.5; spec B.5]; float64, sums to 1."""
    cdf = torch.erf((grid.double().log() - p_mean) / (math.sqrt(2.0) * p_std))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


# -- configs -----------------------------------------------------------------------------------------
@dataclass
class CMConfig:
    """Fields shared by CT, iCT and CD (CM App. C; spec B.2)."""

    name: str = ""
    preset: str = "auto"            # auto | tiny | cifar10 | imagenet64
    sigma_data: float = 0.5         # CM App. C
    sigma_min: float = 0.002        # epsilon = t_1, the boundary [CM App. C]
    sigma_max: float = 80.0         # T = t_N [CM App. C]
    rho: float = 7.0                # Karras grid [CM App. C]
    boundary_shift: bool = True     # c_skip, c_out with (t - sigma_min), so f(x, sigma_min) = x [CM App. C]
    distance: str = "l2"            # l2: squared norm summed per sample (the CM code averages; Adam does
                                    # not care, but grad_clip thresholds scale by d) | l1 | pseudo_huber | lpips
    huber_c: float = -1.0           # pseudo-Huber c; < 0: iCT's 0.00054 sqrt(d) [iCT §3.3]
    lpips_weights: str = ""         # folder holding vgg16-397923af.pth and vgg.pth, for distance=lpips
    lpips_resize: int = 224         # bilinear resize before LPIPS [CM code]
    weighting: str = "uniform"      # uniform: lambda = 1 [CM]; inv_dt: 1/(t_{i+1} - t_i) [iCT §3.2]
    shared_dropout_mask: bool = True  # the target pass replays the student's dropout RNG [iCT]
    # 2-step mid-point: iCT's CIFAR-10 value; for CT and CD on CIFAR-10 a stand-in (the CM paper tuned its
    # own by ternary search and does not print it)
    mid_t: list[float] = field(default_factory=lambda: [0.821])
    clip_denoised: bool = True      # clamp each denoised sample to [-1, 1] before re-noising [CM code sampler]


@dataclass
class CTConfig(CMConfig):
    name: str = "ct"
    distance: str = "lpips"         # CM Table 3 (CIFAR-10 CT, LPIPS)
    s0: int = 2                     # N(k) curriculum [CM App. C, CIFAR-10]
    s1: int = 150
    mu0: float = 0.9                # target EMA at k = 0 [CM App. C, CIFAR-10]
    mu_divisor: str = "n"           # n: exp(s0 ln mu0 / N(k)) (paper); n_minus_1: the official code


@dataclass
class ICTConfig(CMConfig):
    name: str = "ict"
    distance: str = "pseudo_huber"  # iCT §3.3
    weighting: str = "inv_dt"       # iCT §3.2
    s0: int = 10                    # doubling curriculum [iCT §3.4]
    s1: int = 1280
    p_mean: float = -1.1            # discretized lognormal over i [iCT §3.5]
    p_std: float = 2.0


@dataclass
class CDConfig(CMConfig):
    name: str = "cd"
    distance: str = "lpips"         # CM Table 3 (CIFAR-10 CD, LPIPS)
    num_scales: int = 18            # N [CM code, CIFAR-10]
    solver: str = "heun"            # heun (EDM 2nd order) | euler: one teacher PF-ODE step [CM §3]
    target_mu: float = 0.0          # target EMA rate; 0 = the online weights (CIFAR-10 code) [spec B.3]


# -- the shared method -------------------------------------------------------------------------------
class DiscreteCM(Method):
    """CT / iCT / CD skeleton: a pair of adjacent grid points, a target, a distance, a weighting."""

    def __init__(self, cfg: CMConfig, data_shape, num_classes):
        super().__init__(cfg, data_shape, num_classes)
        shift = cfg.sigma_min if cfg.boundary_shift else 0.0
        self.param = EDMParam(sigma_data=cfg.sigma_data, shift_sigma_min=shift)
        self.huber_c = cfg.huber_c if cfg.huber_c >= 0 else huber_c_for_dim(math.prod(self.data_shape))
        self.target: nn.Module | None = None       # EMA target network, when theta^- is not theta
        self._lpips: nn.Module | None = None

    @classmethod
    def check_config(cls, cfg: CMConfig) -> None:
        check_choice("method.distance", cfg.distance, DISTANCES)
        check_choice("method.weighting", cfg.weighting, CM_WEIGHTINGS)
        if not 0 < cfg.sigma_min < cfg.sigma_max:
            raise ValueError(f"need 0 < method.sigma_min < method.sigma_max (got {cfg.sigma_min}, {cfg.sigma_max})")
        if cfg.distance == "lpips":
            from methods.lpips import missing_weights
            problem = missing_weights(cfg.lpips_weights)
            if problem:
                raise ValueError(problem)

    # subclasses: the curriculum, the index distribution, the target EMA rate and the target point
    def num_scales(self, step: int, total: int) -> int:
        raise NotImplementedError

    def index_probs(self, grid: torch.Tensor) -> torch.Tensor | None:
        """Probabilities of i over the N - 1 intervals; None = uniform."""
        return None

    def target_mu(self, step: int, total: int) -> float:
        return 0.0

    def uses_ema_target(self) -> bool:
        return False

    def target_point(self, ctx: StepContext, x0, eps, x_next, t_next, t_cur, y) -> torch.Tensor:
        """x^_{t_i}: shared noise x0 + t_i z [CM eq. 10 with the single-sample score]."""
        return x0 + as_column(t_cur, x0) * eps

    # -- pieces --------------------------------------------------------------------------------
    def grid(self, n: int, device) -> torch.Tensor:
        """Ascending Karras grid t_1..t_n (float64 math, float32 out)."""
        c = self.cfg
        return karras_sigmas(n, c.sigma_min, c.sigma_max, c.rho, descending=False).float().to(device)

    def draw_index(self, ctx: StepContext, grid: torch.Tensor, batch: int) -> torch.Tensor:
        n = grid.shape[0]
        probs = self.index_probs(grid)
        if probs is None:
            i = torch.randint(0, n - 1, (batch,), generator=ctx.generator, device=ctx.generator.device)
        else:
            i = torch.multinomial(probs.float().to(ctx.generator.device), batch, replacement=True,
                                  generator=ctx.generator)
        return i.to(grid.device)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = self.cfg.distance
        if d == "l2":
            return per_sample_sq(a - b)
        if d == "l1":
            return (a - b).float().abs().reshape(a.shape[0], -1).sum(dim=1)
        if d == "pseudo_huber":
            return pseudo_huber(a - b, self.huber_c)
        if self._lpips is None:
            from methods.lpips import load_lpips
            self._lpips = load_lpips(self.cfg.lpips_weights, self.cfg.lpips_resize)
        self._lpips.to(a.device)
        return self._lpips(a, b)

    def target_net(self, ctx: StepContext) -> nn.Module:
        return self.target if self.target is not None else ctx.net_nograd

    # -- the step ------------------------------------------------------------------------------
    def loss(self, ctx: StepContext, batch):
        c = self.cfg
        x0, y = batch["x"], batch.get("y")
        n = self.num_scales(ctx.step, ctx.total_steps)
        grid = self.grid(n, x0.device)
        i = self.draw_index(ctx, grid, x0.shape[0])
        t_cur, t_next = grid[i], grid[i + 1]
        eps = ctx.randn_like(x0)
        x_next = x0 + as_column(t_next, x0) * eps
        with torch.no_grad():
            x_cur = self.target_point(ctx, x0, eps, x_next, t_next, t_cur, y)
        tape = ctx.shared_dropout(c.shared_dropout_mask)
        with tape.record():
            pred = self.param.denoise(ctx.net, x_next, t_next, y)
        with tape.replay(), torch.no_grad():
            target = self.param.denoise(self.target_net(ctx), x_cur, t_cur, y)
        per = self.distance(pred, target)
        w = 1.0 / (t_next - t_cur) if c.weighting == "inv_dt" else torch.ones_like(t_next)
        return {"loss": (w * per).mean(), f"{self.name}/num_scales": float(n),
                f"{self.name}/target_mu": self.target_mu(ctx.step, ctx.total_steps)}

    # -- the target EMA ------------------------------------------------------------------------
    def attach(self, net: nn.Module) -> None:
        if self.uses_ema_target():
            self.target = copy.deepcopy(net).float().requires_grad_(False)

    @torch.no_grad()
    def after_step(self, net: nn.Module, step: int, total_steps: int) -> None:
        """theta^- <- mu theta^- + (1 - mu) theta, with mu at the step just taken [CM Alg. 2/3]."""
        if self.target is None:
            return
        mu = self.target_mu(step, total_steps)
        mine, src = list(self.target.parameters()), [p.detach().float() for p in net.parameters()]
        torch._foreach_lerp_(mine, src, 1.0 - mu)
        for b_t, b in zip(self.target.buffers(), net.buffers()):
            b_t.copy_(b)

    def state_dict(self):
        return {"target": self.target.state_dict()} if self.target is not None else {}

    def load_state_dict(self, state):
        if self.target is None:
            super().load_state_dict(state)
        elif "target" not in state:
            raise ValueError(f"method {self.name} keeps a target network but the checkpoint has none")
        else:
            self.target.load_state_dict(state["target"])

    # -- sampling ------------------------------------------------------------------------------
    def default_steps(self) -> int:
        return len(self.cfg.mid_t) + 1

    @torch.no_grad()
    def sample(self, net, noise, steps, class_labels=None, generator=None):
        """CM Alg. 1: 1 step from T, re-noising to the next time with sqrt(t^2 - sigma_min^2)."""
        c = self.cfg
        times = consistency_times(steps, c.sigma_max, c.mid_t, c.sigma_min, c.rho)

        def f(x, t):
            x0 = self.param.denoise(net, x, t, class_labels)
            return x0.clamp(-1, 1) if c.clip_denoised else x0
        return consistency_sample(f, noise, times, generator, sigma_min=c.sigma_min)


@register("ct")
class CT(DiscreteCM):
    """Consistency training [CM §5]: EMA target with mu(k), square-root N(k), uniform i, LPIPS."""

    Config = CTConfig
    PRESETS = {
        "cifar10": {},
        "imagenet64": {"s1": 200, "mu0": 0.95, "mid_t": [1.9128]},   # CM code launch.sh; tau_1 of ts 0,106,200
        # CPU runs of a few hundred steps: l2 (no LPIPS weights on a CPU box), and s1 = 20, so that the
        # target EMA's horizon 1/(1 - mu(k)) stays ~100 steps (s1 = 150 puts it at ~700, past the run).
        "tiny": {"distance": "l2", "s1": 20},
    }

    @classmethod
    def check_config(cls, cfg: CTConfig) -> None:
        super().check_config(cfg)
        check_choice("method.mu_divisor", cfg.mu_divisor, MU_DIVISORS)
        if not (1 <= cfg.s0 <= cfg.s1 and 0 <= cfg.mu0 < 1):
            raise ValueError(f"CT needs 1 <= method.s0 <= method.s1 and 0 <= method.mu0 < 1 "
                             f"(got {cfg.s0}, {cfg.s1}, {cfg.mu0})")

    def num_scales(self, step, total):
        return ct_num_scales(step, total, self.cfg.s0, self.cfg.s1)

    def target_mu(self, step, total):
        c = self.cfg
        return ct_target_mu(self.num_scales(step, total), c.s0, c.mu0, c.mu_divisor)

    def uses_ema_target(self):
        return True


@register("ict")
class ICT(DiscreteCM):
    """Improved consistency training [iCT]: theta^- = sg(theta), pseudo-Huber, 1/(t_{i+1} - t_i),
    doubling N(k), discretized lognormal i."""

    Config = ICTConfig
    PRESETS = {
        "cifar10": {},
        "imagenet64": {"mid_t": [1.526]},     # iCT; ECT App. C
        "tiny": {},
    }

    @classmethod
    def check_config(cls, cfg: ICTConfig) -> None:
        super().check_config(cfg)
        if not (1 <= cfg.s0 <= cfg.s1 and cfg.p_std > 0):
            raise ValueError(f"iCT needs 1 <= method.s0 <= method.s1 and method.p_std > 0 "
                             f"(got {cfg.s0}, {cfg.s1}, {cfg.p_std})")

    def num_scales(self, step, total):
        return ict_num_scales(step, total, self.cfg.s0, self.cfg.s1)

    def index_probs(self, grid):
        return ict_index_probs(grid, self.cfg.p_mean, self.cfg.p_std)


@register("cd")
class CD(DiscreteCM):
    """Consistency distillation [CM §4]: the target point is one Heun (or Euler) step of a frozen EDM
    teacher's PF-ODE from t_{i+1} to t_i; fixed N; target EMA at a fixed rate (0 on CIFAR-10)."""

    Config = CDConfig
    needs_teacher = True
    teacher_methods = ("edm",)      # the teacher is read as an EDM denoiser
    PRESETS = {
        "cifar10": {},
        "imagenet64": {"num_scales": 40, "target_mu": 0.95, "mid_t": [1.3824]},   # CM code launch.sh
        "tiny": {"distance": "l2"},
    }

    def __init__(self, cfg: CDConfig, data_shape, num_classes):
        super().__init__(cfg, data_shape, num_classes)
        self.teacher_param = EDMParam(sigma_data=cfg.sigma_data)     # the teacher is an EDM denoiser

    @classmethod
    def check_config(cls, cfg: CDConfig) -> None:
        super().check_config(cfg)
        check_choice("method.solver", cfg.solver, SOLVERS)
        if cfg.num_scales < 2 or not 0 <= cfg.target_mu < 1:
            raise ValueError(f"CD needs method.num_scales >= 2 and 0 <= method.target_mu < 1 "
                             f"(got {cfg.num_scales}, {cfg.target_mu})")

    def num_scales(self, step, total):
        return self.cfg.num_scales

    def target_mu(self, step, total):
        return self.cfg.target_mu

    def uses_ema_target(self):
        return self.cfg.target_mu > 0

    def target_point(self, ctx, x0, eps, x_next, t_next, t_cur, y):
        if ctx.teacher is None:
            raise ValueError("cd needs a teacher: set teacher=RUN_DIR (a finished edm run on this data)")
        return ode_step(lambda x, t: self.teacher_param.denoise(ctx.teacher, x, t, y),
                        x_next, t_next, t_cur, self.cfg.solver)


def ode_step(denoise, x: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor, solver: str) -> torch.Tensor:
    """One step of the PF-ODE dx/dt = (x - D(x, t))/t from t_from to t_to (per-sample times, t_to > 0):
    Euler, or Heun's second-order correction [EDM Alg. 1; CM §4]."""
    h = as_column(t_to - t_from, x)
    d = (x - denoise(x, t_from)) / as_column(t_from, x)
    x_euler = x + h * d
    if solver == "euler":
        return x_euler
    d_next = (x_euler - denoise(x_euler, t_to)) / as_column(t_to, x)
    return x + h * 0.5 * (d + d_next)
