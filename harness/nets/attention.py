"""One attention function with named backends; every network in harness/nets goes through it.

Layout everywhere: q, k, v and the output are [B, heads, N, head_dim]; the scale is 1/sqrt(head_dim).
Backends are plain functions in `BACKENDS`; `register_backend` adds more (e.g. `jvp_flash`) and
refuses a name that is already taken. A backend that cannot run here fails loudly, never falls back.
"""

from __future__ import annotations

import math as _math
from typing import Callable

import torch
from torch import Tensor

AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]

BACKENDS: dict[str, AttentionFn] = {}
# Optional availability checks, name -> callable that raises if the backend cannot run here.
_AVAILABILITY_CHECKS: dict[str, Callable[[], None]] = {}


def register_backend(name: str, fn: AttentionFn, check: Callable[[], None] | None = None) -> None:
    """Add backend `name`; `check()` (optional) raises when the backend cannot run on this machine."""
    if not name or not isinstance(name, str):
        raise ValueError(f"attention backend name must be a non-empty string, got {name!r}")
    if name in BACKENDS:
        raise ValueError(f"attention backend {name!r} is already registered")
    BACKENDS[name] = fn
    if check is not None:
        _AVAILABILITY_CHECKS[name] = check


def _valid() -> str:
    return ", ".join(BACKENDS)


def check_backend(name: str) -> None:
    """Raise (ValueError / RuntimeError, one line) unless backend `name` exists and can run here."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: {_valid()}")
    check = _AVAILABILITY_CHECKS.get(name)
    if check is not None:
        check()


def attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "sdpa") -> Tensor:
    """softmax(q k^T / sqrt(head_dim)) v over [B, heads, N, head_dim] tensors, by `backend`."""
    fn = BACKENDS.get(backend)
    if fn is None:
        raise ValueError(f"unknown attention backend {backend!r}; valid: {_valid()}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention expects [B, heads, N, head_dim] tensors, got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    return fn(q, k, v)


def _math_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    # Reference: plain ops in float32 (so forward- and reverse-mode autodiff both work through it).
    scale = 1.0 / _math.sqrt(q.shape[-1])
    q32, k32, v32 = q.float(), k.float(), v.float()
    weights = torch.softmax(torch.matmul(q32, k32.transpose(-2, -1)) * scale, dim=-1)
    return torch.matmul(weights, v32).to(q.dtype)


def _sdpa_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def _xformers_unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "it needs CUDA, but torch.cuda.is_available() is False"
    try:
        import xformers.ops  # noqa: F401  (lazy: optional GPU-only dependency)
    except ImportError as err:
        return f"the xformers package cannot be imported ({err})"
    return None


def _check_xformers() -> None:
    reason = _xformers_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"attention backend 'xformers' is unavailable: {reason}; valid: {_valid()}")


def _xformers_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    _check_xformers()
    if not (q.is_cuda and k.is_cuda and v.is_cuda):
        raise RuntimeError(
            f"attention backend 'xformers' needs CUDA tensors, got device {q.device}; valid: {_valid()}"
        )
    import xformers.ops

    # xformers takes [B, N, heads, D]; its default scale is 1/sqrt(D), the same as ours.
    out = xformers.ops.memory_efficient_attention(
        q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    )
    return out.transpose(1, 2)


register_backend("math", _math_attention)
register_backend("sdpa", _sdpa_attention)
register_backend("xformers", _xformers_attention, check=_check_xformers)


def _register_jvp_flash() -> None:
    from harness.nets.jvp_attention import jvp_flash_attention
    register_backend("jvp_flash", jvp_flash_attention)


_register_jvp_flash()
