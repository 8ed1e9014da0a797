"""The method contract and the step context the trainer hands to a method."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn


class RngReplay:
    """Shared dropout masks by replaying the global RNG that dropout draws from: the second pass draws
    the first pass's masks again."""

    def __init__(self, share: bool = True):
        self.share, self.state = share, None

    @contextlib.contextmanager
    def record(self):
        cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
        self.state = (torch.get_rng_state(), cuda)
        yield self

    @contextlib.contextmanager
    def replay(self):
        if self.share:
            cpu, cuda = self.state
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda)
        yield self


@dataclass
class StepContext:
    """Everything a method may use for one training step (built by the trainer)."""

    net: Callable[..., Any]        # training module: call it for every output that needs gradients
    net_nograd: nn.Module          # the same weights, unwrapped: for targets and JVPs under no_grad
    teacher: nn.Module | None      # frozen teacher (eval mode) for distillation methods, else None
    step: int                      # optimizer step being computed, 0-based
    total_steps: int               # trainer.steps of the run
    generator: torch.Generator     # seeded from (seed, step, rank): all of the method's own randomness

    # the same dropout masks in two passes (method.shared_dropout_mask): `tape = ctx.shared_dropout(share)`,
    # a pass under `tape.record()`, the other under `tape.replay()`. The trainer gives
    # harness.nets.layers.DropoutTape (hands the masks back); by default the RNG is replayed (same bits).
    shared_dropout: Callable[[bool], Any] = RngReplay

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=self.generator, device=x.device, dtype=torch.float32)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=self.generator.device, dtype=torch.float32)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, device=self.generator.device, dtype=torch.float32)


NO_JVP_BACKENDS = ("sdpa", "xformers")   # fused attention kernels without forward-mode AD


class Method:
    """Base class. Subclasses set `Config` (a dataclass with a `preset` field) and `PRESETS`."""

    name: ClassVar[str]
    Config: ClassVar[type]
    # preset name -> field overrides, applied over the Config defaults ("auto" picks by dataset).
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    # The method needs a frozen teacher run (`teacher=RUN_DIR`).
    needs_teacher: ClassVar[bool] = False
    # Methods whose finished runs can serve as this method's teacher (empty: any); checked before any work.
    teacher_methods: ClassVar[tuple[str, ...]] = ()
    # The loss takes a forward-mode derivative (torch.func.jvp) of the network: its attention needs a
    # backend with one (sdpa's and xformers' fused kernels have none; jvp_flash and math do).
    uses_jvp: ClassVar[bool] = False

    def __init__(self, cfg, data_shape: tuple[int, ...], num_classes: int):
        self.check_config(cfg)
        self.cfg = cfg
        self.data_shape = tuple(data_shape)
        self.num_classes = num_classes

    @classmethod
    def preset_for(cls, dataset: str) -> str:
        """The preset `preset=auto` resolves to for a dataset."""
        return dataset if dataset in cls.PRESETS else "tiny"

    def loss(self, ctx: StepContext, batch: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """Return {"loss": scalar tensor with grad, other scalars to log...}."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, net: nn.Module, noise: torch.Tensor, steps: int,
               class_labels: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Map N(0, I) noise to data in `steps` network evaluations (or sampler steps)."""
        raise NotImplementedError

    def nfe(self, steps: int) -> int:
        """Network evaluations used by `sample(..., steps)`."""
        return steps

    def default_steps(self) -> int:
        """The method's own N for `eval.steps=[0]` (its paper's multistep setting)."""
        return 2

    def time_of_sigma(self, sigma: float) -> float:
        """This method's sampler time at which x = x0 + sigma z (EDM noise level sigma): the one unit of
        the shared 2-step mid-point search (harness.eval.select). EDM time (t = sigma) by default."""
        return float(sigma)

    @classmethod
    def check_config(cls, cfg) -> None:
        """Raise ValueError (one line) for a bad value; called before any work starts (by the config
        check, and again by __init__ for a method built directly)."""

    @classmethod
    def network_requirements(cls, cfg, model, device: str = "cpu") -> dict[str, tuple[Any, str]]:
        """model key -> (the value this method config needs, why) on `device` (cpu | cuda): applied to the
        network config by the harness before the checks (and logged), so a user never has to learn them.
        By default, a method that `uses_jvp` moves attention off a fused kernel without forward-mode AD:
        sdpa's and xformers' on CUDA; on the CPU, sdpa's flash kernel, which it picks for the DiT's
        attention (the U-Nets' small heads get its math kernel, which has one)."""
        has_attention = model.get("arch") == "dit" or bool(model.get("attn_resolutions")) \
            or bool(model.get("mid_attention"))
        fused = device == "cuda" or model.get("arch") == "dit" or model.get("attention") == "xformers"
        if cls.uses_jvp and has_attention and fused and model.get("attention") in NO_JVP_BACKENDS:
            return {"attention": ("jvp_flash", f"{cls.name}'s loss differentiates the network forward "
                                               f"(torch.func.jvp), which {model.get('attention')} cannot")}
        return {}

    @classmethod
    def check_model(cls, cfg, model) -> None:
        """Raise ValueError (one line) when the network config `model` cannot serve this method config."""

    @classmethod
    def check_data(cls, cfg, data) -> None:
        """Raise ValueError (one line) when the data config `data` cannot serve this method config."""

    def attach(self, net: nn.Module) -> None:
        """Called once with the network at its starting weights (after init_from, before resume), e.g.
        to copy a target network from it."""

    def attach_data(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        """Called once with the whole training set (host tensors, read-only; labels or None), e.g. for a
        reference bank that targets are computed from. Most methods ignore it."""

    def after_step(self, net: nn.Module, step: int, total_steps: int) -> None:
        """Called after optimizer step `step` with the updated network (e.g. to move a target EMA)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"method {self.name} has no state but the checkpoint holds {sorted(state)}")

