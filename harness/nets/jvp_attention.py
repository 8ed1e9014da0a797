"""Attention whose forward-mode JVP is computed blockwise with an online softmax (sCM App. F).

Forward: ordinary attention y = softmax(kappa q k^T) v. JVP (torch.func.jvp reaches it through
torch.autograd.Function.jvp): per query row, with scores x_j = kappa q.k_j, their tangents
t_x_j = kappa (t_q.k_j + q.t_k_j) and p = softmax(x),

    t_y = (p * t_x) V - <p, t_x> y + p t_V                       [spec scm.md 5.2]

accumulated over key blocks with a running max m, normalizer l, O_t = sum e^(x - m) t_V,
G = sum e^(x - m) t_x V and mu = sum e^(x - m) t_x, so no N x N score matrix or its tangent is
ever held; memory is O(N * block). Gradients reach q, k and v through the primal output (the backward
recomputes ordinary attention). This file holds the PyTorch path (CPU); on CUDA the JVP runs the Triton
kernel of harness/nets/triton_jvp_attention.py, which computes the same accumulators in one pass.
"""
from __future__ import annotations

import math
import os

import torch
from torch import Tensor

BLOCK = 64           # keys per block of the online softmax (64: lowest peak memory on CPU at N = 4096)


def use_triton(q: Tensor) -> bool:
    """The Triton kernel on CUDA tensors, and on CPU when TRITON_INTERPRET=1 (its test mode)."""
    return q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _unwrap(t: Tensor) -> Tensor:
    from torch._C._functorch import get_unwrapped, is_functorch_wrapped_tensor
    while is_functorch_wrapped_tensor(t):
        t = get_unwrapped(t)
    return t


def _attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def attention_jvp_blockwise(q: Tensor, k: Tensor, v: Tensor, tq: Tensor, tk: Tensor, tv: Tensor,
                            block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """(y, t_y) of softmax(kappa q k^T) v and its tangent, over [B, H, N, D] tensors, in float32 or wider;
    keys are visited `block` at a time."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k, v, tq, tk, tv = (t.to(dtype) for t in (q, k, v, tq, tk, tv))
    kappa = 1.0 / math.sqrt(q.shape[-1])
    shape = (*q.shape[:-1], 1)
    m = torch.full(shape, -math.inf, dtype=dtype, device=q.device)
    ell = torch.zeros(shape, dtype=dtype, device=q.device)
    mu = torch.zeros(shape, dtype=dtype, device=q.device)
    out = torch.zeros((*q.shape[:-1], v.shape[-1]), dtype=dtype, device=q.device)
    out_t, acc_g = torch.zeros_like(out), torch.zeros_like(out)
    for start in range(0, k.shape[-2], block):
        kb, vb = k[..., start:start + block, :], v[..., start:start + block, :]
        tkb, tvb = tk[..., start:start + block, :], tv[..., start:start + block, :]
        x = kappa * q @ kb.transpose(-2, -1)                                   # [B, H, N, blk]
        tx = kappa * (tq @ kb.transpose(-2, -1) + q @ tkb.transpose(-2, -1))
        m_new = torch.maximum(m, x.amax(dim=-1, keepdim=True))
        a = torch.exp(m - m_new)
        p = torch.exp(x - m_new)
        ptx = p * tx
        ell = a * ell + p.sum(dim=-1, keepdim=True)
        mu = a * mu + ptx.sum(dim=-1, keepdim=True)
        out = a * out + p @ vb
        out_t = a * out_t + p @ tvb
        acc_g = a * acc_g + ptx @ vb
        m = m_new
    y = out / ell
    return y, out_t / ell + acc_g / ell - (mu / ell) * y


class _JVPFlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return _attention(q, k, v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v = inputs
        ctx.save_for_backward(q, k, v)
        ctx.save_for_forward(q, k, v)

    @staticmethod
    def jvp(ctx, tq: Tensor | None, tk: Tensor | None, tv: Tensor | None) -> Tensor:
        q, k, v = ctx.saved_tensors
        tq, tk, tv = (torch.zeros_like(p) if t is None else t for p, t in ((q, tq), (k, tk), (v, tv)))
        if use_triton(q):
            from harness.nets.triton_jvp_attention import attention_jvp_triton
            # a kernel reads raw memory: hand it the plain tensors under torch.func's wrappers
            with torch._C._DisableFuncTorch():
                _, t_y, _ = attention_jvp_triton(*(_unwrap(t) for t in (q, k, v, tq, tk, tv)))
        else:
            _, t_y = attention_jvp_blockwise(q, k, v, tq, tk, tv)
        return t_y.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
            y = _attention(*leaves)
        return torch.autograd.grad(y, leaves, grad_out)


def jvp_flash_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Backend `jvp_flash`: ordinary attention forward; blockwise online-softmax JVP."""
    return _JVPFlashAttention.apply(q, k, v)
