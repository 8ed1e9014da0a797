"""SCT, Stable Consistency Tuning (Wang, Geng, Li 2024): ECT with a variance-reduced target.

The single-sample score (x_t - x0)/t of ECT is replaced by its self-normalized importance-sampling
estimate over a reference set (SCT Theorem 1, the score identity of Xu et al. 2023's STF):
W_j = softmax_j(-||x_t - x0_j||^2 / (2 t^2)), xbar0 = sum_j W_j x0_j, and the Euler step along the
estimated ODE gives x_r = (r/t) x_t + (1 - r/t) xbar0 (spec 4.2 [DERIVED], ambiguity B2). Everything
else (t ~ LogNormal, the r(t) mapping and its stages, adaptive weighting, shared dropout mask, the
stop-gradient online target, sampling) is ECT's, reused by subclassing.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable

import torch

from methods import register
from methods.ect import ECT, ECTConfig
from methods.parameterization import as_column

REFERENCES = ("batch", "bank")
R0_TARGETS = ("xbar0", "x0")


@dataclass
class StableCTConfig(ECTConfig):
    name: str = "stable_ct"
    weighting: str = "inv_dt_delta"  # wbar = 1/(t - r + delta) [SCT §3.3]
    delta: float = 1e-3              # delta > 0 is not given [spec B6]; harness choice: caps wbar at 1000
    reference: str = "batch"         # batch (SCT §4.2 default) | bank: the whole training set [SCT Fig. 3]
    same_class: bool = True          # labelled data: reference only same-class samples [SCT §3.2; spec B4]
    bank_chunk: int = 4096           # bank rows per matmul, streamed with an online log-sum-exp (result unchanged)
    bank_on_device: bool = True      # copy the bank to the batch's device once; false: stream it from host each step
    r0_target: str = "xbar0"         # target where r = 0: xbar0 (the STF denoising target, spec B2 default) | x0 (ECT)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).float()


@contextlib.contextmanager
def _full_fp32_matmul():
    """The logits need true fp32 products (TF32's 10-bit mantissa would blur them at small t)."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def chunk_logits(x_t: torch.Tensor, t: torch.Tensor, ref: torch.Tensor, y: torch.Tensor | None = None,
                 ref_y: torch.Tensor | None = None) -> torch.Tensor:
    """log P(x_t | x0_j) = -||x_t - x0_j||^2 / (2 t^2) + const(i) [SCT eq. 13, EDM form; spec 4.2], [B, n].

    ||x_t - x0_j||^2 = ||x_t||^2 - 2 x_t.x0_j + ||x0_j||^2 by one matrix product; the row constant
    ||x_t||^2 cancels in the softmax and is dropped (it would only cost fp32 precision). References of
    another class get -inf when labels are given."""
    logits = (x_t @ ref.T - 0.5 * ref.pow(2).sum(dim=1)) / t[:, None] ** 2
    if y is not None:
        logits = logits.masked_fill(y[:, None] != ref_y[None, :], float("-inf"))
    return logits


def posterior_mean(x_t: torch.Tensor, t: torch.Tensor, chunks: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
                   y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """xbar0 = sum_j W_j x0_j with W = softmax over all chunks' references [SCT Theorem 1, without the
    spurious 1/n, spec B1], streamed with an online log-sum-exp so one chunk or many give the same result.

    x_t: [B, D] (flattened), t: [B]; chunks yield (ref [n, D], ref_y [n] or None). Returns xbar0 [B, D],
    the effective sample size (sum W)^2 / sum W^2 [B] and the reference count per row [B]."""
    B, D = x_t.shape
    m = x_t.new_full((B,), float("-inf"))          # running max logit
    s, s2, count = x_t.new_zeros(B), x_t.new_zeros(B), x_t.new_zeros(B)
    acc = x_t.new_zeros(B, D)
    with _full_fp32_matmul():
        for ref, ref_y in chunks:
            ref = ref.to(x_t.device, torch.float32)
            ref_y = ref_y.to(x_t.device) if ref_y is not None else None
            logits = chunk_logits(x_t, t, ref, y if ref_y is not None else None, ref_y)
            m_new = torch.maximum(m, logits.max(dim=1).values)
            base = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))   # rows with no reference yet
            scale = torch.exp(m - base)
            p = torch.exp(logits - base[:, None])
            s = s * scale + p.sum(dim=1)
            s2 = s2 * scale ** 2 + p.pow(2).sum(dim=1)
            acc = acc * scale[:, None] + p @ ref
            count = count + torch.isfinite(logits).sum(dim=1)
            m = m_new
    return acc / s[:, None], s ** 2 / s2, count


@register("stable_ct")
class StableCT(ECT):
    Config = StableCTConfig
    PRESETS = {
        "cifar10": {**ECT.PRESETS["cifar10"]},          # SCT §4.1: ECT's CIFAR-10 configuration
        # ECT's ECM setup [SCT §4.1]; SCT's 1/(t - r + delta) instead of EDM's weighting is unstated (spec B6)
        "imagenet64": {**ECT.PRESETS["imagenet64"], "weighting": "inv_dt_delta"},
        "tiny": {**ECT.PRESETS["tiny"]},                # CPU digits (1x8x8), as ECT's tiny
    }

    @classmethod
    def check_config(cls, cfg: StableCTConfig) -> None:
        super().check_config(cfg)
        if cfg.reference not in REFERENCES:
            raise ValueError(f"unknown method.reference '{cfg.reference}'; valid: {', '.join(REFERENCES)}")
        if cfg.r0_target not in R0_TARGETS:
            raise ValueError(f"unknown method.r0_target '{cfg.r0_target}'; valid: {', '.join(R0_TARGETS)}")
        if cfg.bank_chunk < 1:
            raise ValueError(f"method.bank_chunk must be >= 1, got {cfg.bank_chunk}")
        if cfg.weighting == "inv_dt_delta" and cfg.delta <= 0:
            raise ValueError(f"SCT's weighting 1/(t - r + delta) needs method.delta > 0, got {cfg.delta}")

    def __init__(self, cfg: StableCTConfig, data_shape, num_classes):
        super().__init__(cfg, data_shape, num_classes)
        self.bank_x: torch.Tensor | None = None
        self.bank_y: torch.Tensor | None = None

    def attach_data(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        """Keep the training set as the reference bank (reference=bank); it never enters the network."""
        if self.cfg.reference == "bank":
            self.bank_x, self.bank_y = _flat(x), y

    def references(self, x0: torch.Tensor, y: torch.Tensor | None):
        """Chunks (ref, ref_y) of the reference set; labels only when restricting to the same class."""
        use_y = self.cfg.same_class and y is not None
        if self.cfg.reference == "batch":
            return [(_flat(x0), y if use_y else None)]
        if self.bank_x is None:
            raise ValueError("method.reference=bank needs the training set: the trainer hands it over by attach_data")
        if self.cfg.bank_on_device and self.bank_x.device != x0.device:
            self.bank_x = self.bank_x.to(x0.device)
            self.bank_y = self.bank_y.to(x0.device) if self.bank_y is not None else None
        if use_y and self.bank_y is None:
            raise ValueError("method.same_class needs labels for the bank, but the training set has none")
        n, size = self.bank_x.shape[0], self.cfg.bank_chunk
        return ((self.bank_x[i:i + size], self.bank_y[i:i + size] if use_y else None) for i in range(0, n, size))

    @torch.no_grad()
    def target_inputs(self, x0, y, eps, x_t, t, r):
        """x_r = (r/t) x_t + (1 - r/t) xbar0 and the r = 0 target xbar0 [spec 4.2, 4.4].

        Written as ECT's x0 + r eps plus (1 - r/t)(xbar0 - x0), the same value, so that a reference set
        holding only the sample's own x0 gives ECT's x_r bit for bit."""
        xbar0, ess, count = posterior_mean(_flat(x_t), t.float(), self.references(x0, y), y)
        xbar0 = xbar0.reshape(x0.shape)
        x_r = x0 + as_column(r, x0) * eps + as_column(1 - r / t, x0) * (xbar0 - x0)
        boundary = xbar0 if self.cfg.r0_target == "xbar0" else x0
        logs = {f"{self.name}/ess": (ess / count).mean(),          # normalized: 1 = uniform weights, 1/n = one-hot
                f"{self.name}/ess_samples": ess.mean(),          # effective references per sample (ECT: 1)
                f"{self.name}/xbar0_shift": (xbar0 - x0).pow(2).flatten(1).sum(1).sqrt().mean()}
        return x_r, boundary, logs
