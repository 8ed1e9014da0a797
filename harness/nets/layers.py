"""Pieces shared by every network: the common config and forward contract (`NetConfig`, `NetBase`),
time/extra embeddings, the log-variance head, and EDM2's magnitude-preserving (MP) primitives.

Dtype convention: the body runs in the parameters' dtype (after `.bfloat16()` too); the noise, class
and extra embeddings and the log-variance head run in float32, and the output is float32.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.nets.attention import BACKENDS

ARCH_NAMES = ("unet", "ddpmpp", "dit", "mlp")

# True inside torch.func transforms (jvp, vmap, grad); private in torch, hence the fallback.
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
# True for a tensor a torch.func transform tracks (a dual or batched input, or what is computed from one).
_transformed = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)


@dataclass
class NetConfig:
    """Fields every architecture has; each arch subclasses this beside its module."""

    name: str = ""  # preset name, e.g. "unet-s"
    arch: str = ""  # one of ARCH_NAMES; fixed by each subclass
    dropout: float = 0.0  # dropout probability (nn.Dropout: global torch RNG, replayable)
    attention: str = "sdpa"  # backend name in harness.nets.attention.BACKENDS
    logvar: bool = False  # learned log-variance head u(c_noise) (EDM2 config B loss weighting)
    extra_cond_dim: int = 0  # extra scalar conditioning inputs (GCM's s, sCD's guidance scale)


def count_params(net: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in net.parameters())


# ---------------------------------------------------------------- EDM2 magnitude-preserving primitives


def normalize(x: Tensor, dim: int | list[int] | None = None, eps: float = 1e-4) -> Tensor:
    """Scale x so its mean square over `dim` is 1 (EDM2 configs D-F; eps 1e-4 as in EDM2)."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm_dtype = torch.promote_types(x.dtype, torch.float32)  # at least float32 (float64 stays float64)
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=norm_dtype)
    norm = eps + norm * math.sqrt(norm.numel() / x.numel())
    return x / norm.to(x.dtype)


def pixel_norm(v: Tensor, eps: float = 1e-8) -> Tensor:
    """v / sqrt(mean over channels (dim 1) of v^2 + eps), in float32 (PGGAN pixel norm; eps as PGGAN)."""
    v = v.float()
    return v * torch.rsqrt(v.square().mean(dim=1, keepdim=True) + eps)


def mp_silu(x: Tensor) -> Tensor:
    # 0.596 = E[silu(z)^2]^(1/2) for z ~ N(0, 1) (EDM2 config G, MP-SiLU).
    return F.silu(x) / 0.596


def mp_sum(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    """Interpolate a -> b by t and renormalize to unit magnitude (EDM2 config G, MP-Sum)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: Tensor, b: Tensor, dim: int = 1, t: float = 0.5) -> Tensor:
    """Concatenate with per-part weights so the result has unit magnitude (EDM2 config G, MP-Cat)."""
    n_a, n_b = a.shape[dim], b.shape[dim]
    scale = math.sqrt((n_a + n_b) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (scale / math.sqrt(n_a) * (1 - t)), b * (scale / math.sqrt(n_b) * t)], dim=dim)


class MPConv(nn.Module):
    """Bias-free linear (kernel=()) or conv layer with normalized weights (EDM2 configs D-E)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, ...] = ()):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))
        self._normalized_version = -1  # weight._version right after the last forced normalization

    def forward(self, x: Tensor, gain: float | Tensor = 1.0) -> Tensor:
        weight = self.weight
        # Forced weight normalization (EDM2 config E), once per weight update, so every pass of one step
        # (RNG-replayed dropout, targets, JVP) sees bit-identical weights.
        stale = self.training and isinstance(weight, nn.Parameter) and weight._version != self._normalized_version
        if stale and not _functorch_active():
            with torch.no_grad():
                weight.copy_(normalize(weight.float()))
            self._normalized_version = weight._version
            stale = False
        w = weight.float()
        if stale:  # inside torch.func (no mutation allowed): use the value the next plain pass will store
            w = normalize(w).to(weight.dtype).float()
        w = normalize(w)  # traditional weight normalization, inside the graph
        w = w * (gain / math.sqrt(w[0].numel()))  # unit-magnitude output for unit-magnitude input
        w = w.to(x.dtype)
        if w.ndim == 2:
            return weight_op(F.linear, x, w, of=(weight,))
        return weight_op(F.conv2d, x, w, of=(weight,), padding=w.shape[-1] // 2)


def weight_op(op, x: Tensor, weight: Tensor, bias: Tensor | None = None, *, of: tuple = (), **kwargs) -> Tensor:
    """op(x, weight, bias, **kwargs) for an op linear in x with an additive bias (F.linear, F.conv2d,
    F.conv_transpose2d); `of`: the module tensors (parameters, buffers) that weight and bias are computed
    from, when they are not those tensors themselves (a cast, a normalization, a tiled kernel).

    In a no-grad torch.func pass that does not track those tensors (the JVP pass of sCT / sCD, where the
    network's parameters are constants), the op goes through `_ConstantWeights`, whose tangent is
    op(x_t, weight) alone; functorch's own rules for these ops also apply the op to the (zero) tangents of
    the weight and bias, a third more convolution or matmul work in that pass. The same values: the terms
    left out are exact zeros. (A tensor computed inside the transform is tracked even when it has no
    tangent, hence `of`.)"""
    if _transformed is not None and not torch.is_grad_enabled() and _functorch_active() and _transformed(x):
        sources = of or (weight, bias)
        if not any(t is not None and _transformed(t) for t in sources):
            return _ConstantWeights.apply(x, (op, weight, bias, kwargs))
    return op(x, weight, bias, **kwargs)


class _ConstantWeights(torch.autograd.Function):
    """y = op(x, weight, bias) with (op, weight, bias, kwargs) handed in as one constant: forward-mode
    tangent op(x_t, weight, None); no backward (it is used only where grad mode is off)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, spec: tuple) -> Tensor:
        op, weight, bias, kwargs = spec
        return op(x, weight, bias, **kwargs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.spec = inputs[1]

    @staticmethod
    def jvp(ctx, x_t: Tensor, _spec_t) -> Tensor:
        op, weight, _, kwargs = ctx.spec
        return op(x_t, weight, None, **kwargs)


class Dropout(nn.Dropout):
    """nn.Dropout on a contiguous input (the mask fills it in memory order, and eager and torch.func passes
    order non-contiguous tensors differently, so a canonical layout makes the mask a function of the RNG
    state alone: replayable between the JVP pass and the grad pass). Under a `DropoutTape` a pass records
    its masks and a second pass takes them back (no second draw).

    Masks come from the global torch RNG. On a GPU they are F.dropout's (its fused kernel); on the CPU they
    are `cpu_keep_mask`'s, which is 2.6x faster to draw than F.dropout's (see there)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        x = x.contiguous()
        tape = DropoutTape.active           # set only while recording or replaying
        if tape is not None and tape.state == "replay":
            return x * tape.take(x)
        if x.device.type == "cpu":
            noise = cpu_keep_mask(x, 1.0 - self.p)
            out = x * noise
        elif tape is None:
            return super().forward(x)
        else:                        # the fused kernel F.dropout runs; its mask, scaled
            out, mask = torch.native_dropout(x, self.p, True)
            noise = mask.to(x.dtype) * (1.0 / (1.0 - self.p))
        if tape is not None:
            tape.masks.append(noise)
        return out


def cpu_keep_mask(x: Tensor, keep: float) -> Tensor:
    """1/keep where a float32 uniform from the global CPU RNG is below `keep`, else 0, in x's shape and dtype.
    torch's CPU dropout draws a float64 uniform per element (two 32-bit Mersenne Twister draws, serially);
    one float32 uniform (one draw, 24 bits) is 2.6x faster. The keep probability is `keep` rounded up to a
    multiple of 2^-24 (0.8 -> 0.8 + 1.2e-8). A different stream from F.dropout's, with the same law."""
    return torch.rand(x.shape, device=x.device).lt_(keep).to(x.dtype).div_(keep)


class DropoutTape:
    """The same dropout masks in two passes of a network (or of a copy with the same layers): what
    replaying the RNG state before the second pass gives, bit for bit, without drawing the masks again
    (on the CPU, drawing F.dropout's masks again was a fifth of a consistency step). The RNG ends where the
    first pass left it, as with the replay. Disabled (`share=False`), each pass draws its own masks.

        tape = DropoutTape(share=cfg.shared_dropout_mask)
        with tape.record():
            pred = net(x_t, t)
        with tape.replay(), torch.no_grad():
            target = net(x_r, r)
    """

    active: DropoutTape | None = None      # the tape the Dropout layers of this process use now

    def __init__(self, share: bool = True):
        self.share = share
        self.masks: list[Tensor] = []
        self.state = "off"
        self.used = 0

    def record(self):
        return self._as("record")

    def replay(self):
        return self._as("replay")

    def take(self, x: Tensor) -> Tensor:
        if self.used == len(self.masks):
            raise RuntimeError(f"DropoutTape: the replayed pass has more dropout layers than the recorded one "
                               f"({len(self.masks)})")
        noise = self.masks[self.used]
        if noise.shape != x.shape:
            raise RuntimeError(f"DropoutTape: dropout layer {self.used} of the replayed pass sees {tuple(x.shape)}, "
                               f"the recorded pass {tuple(noise.shape)}")
        self.used += 1
        return noise

    @contextlib.contextmanager
    def _as(self, state: str):
        if not self.share:
            yield self
            return
        if DropoutTape.active is not None:
            raise RuntimeError("DropoutTape: one tape at a time")
        if state == "record":
            self.masks, self.used = [], 0
        self.state, DropoutTape.active = state, self
        try:
            yield self
        finally:
            self.state, DropoutTape.active = "off", None


class Float32Buffers(nn.Module):
    """Keeps floating buffers in float32 under `.to(dtype)` / `.bfloat16()`, so the embedding
    frequencies of a bf16 copy equal those of the fp32 one (time embeddings stay fp32)."""

    def _apply(self, fn, recurse=True):
        saved = dict(self._buffers)
        super()._apply(fn, recurse)
        for key, buf in saved.items():
            if buf is not None and buf.is_floating_point() and self._buffers[key].dtype != buf.dtype:
                self._buffers[key] = buf.to(device=self._buffers[key].device)
        return self


class MPFourier(Float32Buffers):
    """Random Fourier features sqrt(2) cos(2 pi (f x + phi)) of each input scalar (EDM2 config G)."""

    def __init__(self, num_channels: int, num_inputs: int = 1, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_inputs, num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_inputs, num_channels))

    def forward(self, x: Tensor) -> Tensor:
        """[B] or [B, num_inputs] -> float32 [B, num_inputs * num_channels]."""
        x = x.float().reshape(x.shape[0], -1, 1)
        y = torch.cos(x * self.freqs.float() + self.phases.float()) * math.sqrt(2)
        return y.flatten(1)


class PositionalEmbedding(nn.Module):
    """Sinusoidal [cos(x w_i), sin(x w_i)], w_i = max_positions^(-i / (C/2 - endpoint)) (DDPM/EDM/DiT)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False, gain: float = 1.0):
        super().__init__()
        if num_channels % 2:
            raise ValueError(f"positional embedding needs an even channel count, got {num_channels}")
        self.num_channels, self.max_positions, self.endpoint, self.gain = num_channels, max_positions, endpoint, gain

    def forward(self, x: Tensor) -> Tensor:
        """[B] or [B, k] -> float32 [B, k * num_channels]."""
        half = self.num_channels // 2
        exponent = torch.arange(half, dtype=torch.float32, device=x.device) / max(half - int(self.endpoint), 1)
        freqs = (1.0 / self.max_positions) ** exponent
        y = x.float().reshape(x.shape[0], -1, 1) * freqs
        return (torch.cat([y.cos(), y.sin()], dim=-1) * self.gain).flatten(1)


class Linear(nn.Module):
    """Linear layer that computes in its input's dtype (EDM convention), xavier-uniform init * init_weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_weight: float = 1.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        bound = math.sqrt(6 / (in_features + out_features))
        self.weight = nn.Parameter((torch.rand(out_features, in_features) * 2 - 1) * bound * init_weight)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return weight_op(F.linear, x, self.weight.to(x.dtype), bias, of=(self.weight, self.bias))


class TorchLinear(nn.Linear):
    """nn.Linear (its initialization and state dict) through `weight_op`."""

    def forward(self, x: Tensor) -> Tensor:
        return weight_op(F.linear, x, self.weight, self.bias)


class LogvarHead(nn.Module):
    """u(c_noise) = Linear(MPFourier(c_noise)): EDM2's learned loss-weighting head (sCM's w_phi)."""

    def __init__(self, channels: int = 128):  # 128 Fourier channels as in EDM2's Precond
        super().__init__()
        self.fourier = MPFourier(channels)
        self.linear = MPConv(channels, 1)

    def forward(self, noise_labels: Tensor) -> Tensor:
        return self.linear(self.fourier(noise_labels)).reshape(-1).float()


def resample(x: Tensor, kernel: Tensor, mode: str) -> Tensor:
    """Depthwise 2x down/up-sampling with a normalized 2-D FIR kernel (EDM's resample_filter)."""
    if mode == "keep":
        return x
    channels = x.shape[1]
    weight = kernel.to(x.dtype).tile(channels, 1, 1, 1)
    pad = (kernel.shape[-1] - 1) // 2
    if mode == "down":
        return weight_op(F.conv2d, x, weight, of=(kernel,), groups=channels, stride=2, padding=pad)
    if mode == "up":
        return weight_op(F.conv_transpose2d, x, weight * 4, of=(kernel,), groups=channels, stride=2, padding=pad)
    raise ValueError(f"unknown resample mode {mode!r}; valid: keep, down, up")


def resample_kernel(taps: list[int] | list[float]) -> Tensor:
    """Outer product of 1-D taps, normalized to sum 1, as a [1, 1, k, k] kernel."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    return (torch.outer(f, f) / f.sum().square()).reshape(1, 1, len(taps), len(taps))


# ---------------------------------------------------------------- the common forward contract


class NetBase(nn.Module):
    """Validates the forward arguments identically for every arch, then calls `_forward`.

    `_forward(x, noise_labels, class_onehot, extra)` gets x in the parameters' dtype, noise_labels as
    float32 [B], class_onehot float32 [B, num_classes] (or None), extra float32 [B, extra_cond_dim]
    (or None), and returns [B, *data_shape].
    """

    data_rank = 3  # 3 for (C, H, W) images, 1 for (D,) vectors

    def __init__(self, cfg: NetConfig, data_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        data_shape = tuple(int(d) for d in data_shape)
        kind = "an image shape (C, H, W)" if self.data_rank == 3 else "a vector shape (D,)"
        if len(data_shape) != self.data_rank or min(data_shape) < 1:
            raise ValueError(f"arch {cfg.arch!r} needs {kind}, got data_shape={data_shape}")
        if num_classes < 0 or cfg.extra_cond_dim < 0:
            raise ValueError(f"num_classes and extra_cond_dim must be >= 0, got {num_classes}, {cfg.extra_cond_dim}")
        if not 0.0 <= cfg.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
        if cfg.attention not in BACKENDS:
            raise ValueError(f"unknown attention backend {cfg.attention!r}; valid: {', '.join(BACKENDS)}")
        self.cfg = cfg
        self.data_shape = data_shape
        self.num_classes = num_classes
        self.extra_cond_dim = cfg.extra_cond_dim
        self.logvar_head = LogvarHead() if cfg.logvar else None

    @property
    def body_dtype(self) -> torch.dtype:
        """dtype of the network body (the logvar head may differ), which x is cast to."""
        for name, param in self.named_parameters():
            if not name.startswith("logvar_head."):
                return param.dtype
        return torch.float32

    def _forward(self, x: Tensor, noise_labels: Tensor, class_onehot: Tensor | None, extra: Tensor | None) -> Tensor:
        raise NotImplementedError

    def forward(
        self,
        x: Tensor,
        noise_labels: Tensor,
        class_labels: Tensor | None = None,
        extra: Tensor | None = None,
        return_logvar: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """F(x, c_noise[, class][, extra]) as float32 [B, *data_shape]; with return_logvar, (F, logvar [B])."""
        if return_logvar and self.logvar_head is None:
            raise ValueError("return_logvar=True but this net was built with logvar=False")
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, self.data_shape))}], got {tuple(x.shape)}")
        batch = x.shape[0]
        noise_labels = self._check_noise(noise_labels, batch)
        class_onehot = self._check_classes(class_labels, batch)
        extra = self._check_extra(extra, batch)
        out = self._forward(x.to(self.body_dtype), noise_labels, class_onehot, extra).float()
        if return_logvar:
            return out, self.logvar_head(noise_labels)
        return out

    @staticmethod
    def _check_noise(noise_labels: Tensor, batch: int) -> Tensor:
        if not torch.is_tensor(noise_labels) or not noise_labels.is_floating_point():
            raise ValueError("noise_labels must be a float tensor of shape [B]")
        noise_labels = noise_labels.reshape(-1).float()  # [B] or e.g. [B, 1, 1, 1]: one label per sample
        if noise_labels.numel() != batch:
            raise ValueError(f"noise_labels must have {batch} elements (one per sample), got {noise_labels.numel()}")
        return noise_labels

    def _check_classes(self, class_labels: Tensor | None, batch: int) -> Tensor | None:
        if self.num_classes == 0:
            if class_labels is not None:
                raise ValueError("this net is unconditional (num_classes=0); class_labels must be None")
            return None
        if class_labels is None:
            raise ValueError(
                f"this net is class-conditional (num_classes={self.num_classes}); pass class_labels "
                "(int [B] or float [B, num_classes]; an all-zero row means 'no class')"
            )
        if not class_labels.is_floating_point():
            if tuple(class_labels.shape) != (batch,):
                raise ValueError(f"integer class_labels must have shape [{batch}], got {tuple(class_labels.shape)}")
            return F.one_hot(class_labels.long(), self.num_classes).float()
        if tuple(class_labels.shape) != (batch, self.num_classes):
            raise ValueError(
                f"float class_labels must have shape [{batch}, {self.num_classes}], got {tuple(class_labels.shape)}"
            )
        return class_labels.float()

    def _check_extra(self, extra: Tensor | None, batch: int) -> Tensor | None:
        if self.extra_cond_dim == 0:
            if extra is not None:
                raise ValueError("this net has extra_cond_dim=0; extra must be None")
            return None
        if extra is None or tuple(extra.shape) != (batch, self.extra_cond_dim) or not extra.is_floating_point():
            got = None if extra is None else tuple(extra.shape)
            raise ValueError(f"extra must be a float tensor of shape [{batch}, {self.extra_cond_dim}], got {got}")
        return extra.float()
