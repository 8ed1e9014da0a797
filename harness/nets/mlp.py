"""A small residual MLP for low-dimensional (e.g. 2-D toy) data: Fourier noise embedding, residual
pre-LayerNorm SiLU blocks with the conditioning embedding added inside each block."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from harness.nets.layers import Dropout, Linear, MPFourier, NetBase, NetConfig, TorchLinear


@dataclass
class MLPConfig(NetConfig):
    arch: str = "mlp"
    hidden: int = 128  # width of the residual stream and of the conditioning embedding
    depth: int = 4  # number of residual blocks
    fourier_channels: int = 64  # Fourier features per conditioning scalar
    fourier_bandwidth: float = 1.0  # std of the Fourier frequencies (EDM2 MPFourier: 1)


def layer_norm(x: Tensor) -> Tensor:
    return F.layer_norm(x.float(), x.shape[-1:]).to(x.dtype)  # statistics in float32


class ResBlock(nn.Module):
    """h + fc2(dropout(silu(fc1(LN(h)) + emb_proj(emb))))."""

    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = TorchLinear(hidden, hidden)
        self.emb_proj = Linear(hidden, hidden)
        self.dropout = Dropout(dropout)
        self.fc2 = TorchLinear(hidden, hidden)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        y = F.silu(self.fc1(layer_norm(h)) + self.emb_proj(emb).to(h.dtype))
        return h + self.fc2(self.dropout(y))


class MLP(NetBase):
    """Residual MLP body; see NetBase for the forward contract."""

    data_rank = 1

    def __init__(self, cfg: MLPConfig, data_shape: tuple[int, ...], num_classes: int):
        super().__init__(cfg, data_shape, num_classes)
        (dim,) = self.data_shape
        hidden, fourier = cfg.hidden, cfg.fourier_channels
        self.noise_fourier = MPFourier(fourier, bandwidth=cfg.fourier_bandwidth)
        self.noise_linear = Linear(fourier, hidden)
        self.label_linear = Linear(num_classes, hidden) if num_classes else None
        if cfg.extra_cond_dim:
            self.extra_fourier = MPFourier(fourier, cfg.extra_cond_dim, bandwidth=cfg.fourier_bandwidth)
            # Zero init: adding the extra input leaves F unchanged at init (sCM App. G.2 default).
            self.extra_linear = Linear(fourier * cfg.extra_cond_dim, hidden, init_weight=0.0)
        self.emb_linear = Linear(hidden, hidden)
        self.input = TorchLinear(dim, hidden)
        self.blocks = nn.ModuleList(ResBlock(hidden, cfg.dropout) for _ in range(cfg.depth))
        self.output = TorchLinear(hidden, dim)
        nn.init.zeros_(self.output.weight)  # zero-init output: F = 0 at init
        nn.init.zeros_(self.output.bias)

    def _forward(self, x: Tensor, noise_labels: Tensor, class_onehot: Tensor | None, extra: Tensor | None) -> Tensor:
        emb = self.noise_linear(self.noise_fourier(noise_labels))  # float32
        if class_onehot is not None:
            emb = emb + self.label_linear(class_onehot)
        if extra is not None:
            emb = emb + self.extra_linear(self.extra_fourier(extra))
        emb = F.silu(self.emb_linear(F.silu(emb)))
        h = self.input(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.output(F.silu(layer_norm(h)))
