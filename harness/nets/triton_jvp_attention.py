"""Triton kernel for the attention JVP (GPU path of `jvp_flash`; runs on CPU under TRITON_INTERPRET=1).

One program per (batch x head, block of BLOCK_M queries) walks the keys BLOCK_N at a time with the
online-softmax accumulators of harness/nets/jvp_attention.py (m, l, O, O_t, G, mu) and writes, in one pass,
the output y, its tangent t_y and the log-sum-exp m + ln l of every query row [spec scm.md 5.2].
Shapes: [B, H, N, D] for q, k, v and their tangents; D is padded to a power of two inside the kernel.
Products run in full fp32 (input_precision="ieee", not TF32), so the tangent matches the math path.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _jvp_attention_kernel(Q, K, V, TQ, TK, TV, Y, TY, LSE, n_ctx, head_dim, kappa,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    start_m = tl.program_id(1) * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    base = bh * n_ctx * head_dim
    row_ok = rows < n_ctx
    dim_ok = dims < head_dim
    q_off = base + rows[:, None] * head_dim + dims[None, :]
    q_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)
    tq = tl.load(TQ + q_off, mask=q_mask, other=0.0)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    ell = tl.zeros([BLOCK_M], tl.float32)
    mu = tl.zeros([BLOCK_M], tl.float32)
    out = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    out_t = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc_g = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, n_ctx, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < n_ctx
        kv_off = base + cols[:, None] * head_dim + dims[None, :]
        kv_mask = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        tk = tl.load(TK + kv_off, mask=kv_mask, other=0.0)
        tv = tl.load(TV + kv_off, mask=kv_mask, other=0.0)
        x = tl.dot(q, tl.trans(k), input_precision="ieee") * kappa
        tx = (tl.dot(tq, tl.trans(k), input_precision="ieee")
              + tl.dot(q, tl.trans(tk), input_precision="ieee")) * kappa
        x = tl.where(col_ok[None, :], x, float("-inf"))
        tx = tl.where(col_ok[None, :], tx, 0.0)
        m_new = tl.maximum(m, tl.max(x, 1))
        a = tl.exp(m - m_new)
        p = tl.exp(x - m_new[:, None])
        ptx = p * tx
        ell = a * ell + tl.sum(p, 1)
        mu = a * mu + tl.sum(ptx, 1)
        out = a[:, None] * out + tl.dot(p, v, input_precision="ieee")
        out_t = a[:, None] * out_t + tl.dot(p, tv, input_precision="ieee")
        acc_g = a[:, None] * acc_g + tl.dot(ptx, v, input_precision="ieee")
        m = m_new
    y = out / ell[:, None]
    ty = out_t / ell[:, None] + acc_g / ell[:, None] - (mu / ell)[:, None] * y
    tl.store(Y + q_off, y, mask=q_mask)
    tl.store(TY + q_off, ty, mask=q_mask)
    tl.store(LSE + bh * n_ctx + rows, m + tl.log(ell), mask=row_ok)


def attention_jvp_triton(q, k, v, tq, tk, tv, block_m: int = 32, block_n: int = 32):
    """(y, t_y, lse) in float32 for [B, H, N, D] inputs (same N for queries and keys)."""
    b, h, n, d = q.shape
    args = [t.float().contiguous() for t in (q, k, v, tq, tk, tv)]
    y = torch.empty((b, h, n, d), dtype=torch.float32, device=q.device)
    ty = torch.empty_like(y)
    lse = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(d))
    grid = (b * h, triton.cdiv(n, block_m))
    _jvp_attention_kernel[grid](*args, y, ty, lse, n, d, 1.0 / math.sqrt(d),
                                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
    return y, ty, lse
