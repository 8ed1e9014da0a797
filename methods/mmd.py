"""The time-aware MMD of GCM [G §3.5, App. F Eq. 44-46; spec gcm_ct_ict_cd.md A.8].

Kernel on the augmented space (x, t, s): k = -||x1 - x2|| exp(-(|t1 - t2| + |s1 - s2|)/sigma) (Eq. 44), an
energy distance weighted down for pairs whose times differ. Over groups of M consecutive samples,

    L_group = (1/M^2) sum_j w_j sum_k [2 ||a_j - b_k|| K^tr_jk - ||a_j - a_k|| K^tt_jk - ||b_j - b_k|| K^rr_jk]

(Eq. 46's signs), with student particles a (at t) and teacher particles b (at r). K^tt, K^rr, K^tr pair each
term with its own time coordinates (the kernel on the augmented space, spec AMBIG-12's recommendation);
`literal_eq46` uses Eq. 46's printed |t_j - r_k| in all three terms.
"""
from __future__ import annotations

import torch


def _pdist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||x_j - y_k|| for [G, M, D] inputs -> [G, M, M]. The norm is clamped below so that the zero diagonal
    of ||a_j - a_j|| has gradient 0 instead of NaN (spec A.8: use a safe norm)."""
    sq = (x[:, :, None, :] - y[:, None, :, :]).pow(2).sum(-1)
    return sq.clamp_min(1e-30).sqrt()


def _time_factor(ti: torch.Tensor, tk: torch.Tensor, s: torch.Tensor, sigma: float) -> torch.Tensor:
    """exp(-(|t_j - t_k| + |s_j - s_k|)/sigma) for [G, M] times -> [G, M, M]; sigma = inf gives 1 (IMM)."""
    gap = (ti[:, :, None] - tk[:, None, :]).abs() + (s[:, :, None] - s[:, None, :]).abs()
    return torch.exp(-gap / sigma)


def time_aware_mmd(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, r: torch.Tensor, s: torch.Tensor,
                   row_weight: torch.Tensor, group: int, sigma: float, literal_eq46: bool = False) -> torch.Tensor:
    """Eq. 46 per group: a, b [B, ...] particles, t, r, s, row_weight [B]; returns [B // group]."""
    batch = a.shape[0]
    if group < 1 or batch % group:
        raise ValueError(f"time-aware MMD needs the per-rank batch ({batch}) to be a multiple of "
                         f"method.mmd_group ({group})")
    g = batch // group
    a, b = a.reshape(g, group, -1), b.reshape(g, group, -1)
    t, r, s, w = (v.reshape(g, group) for v in (t, r, s, row_weight))
    k_tr = _time_factor(t, r, s, sigma)
    k_tt = k_tr if literal_eq46 else _time_factor(t, t, s, sigma)
    k_rr = k_tr if literal_eq46 else _time_factor(r, r, s, sigma)
    terms = 2 * _pdist(a, b) * k_tr - _pdist(a, a) * k_tt - _pdist(b, b) * k_rr
    return (w[:, :, None] * terms).sum(dim=(1, 2)) / group ** 2
