"""DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"): patchify, 2-D sin-cos
position embedding, adaLN-Zero transformer blocks conditioned on the noise (+ class + extra)
embedding, a final adaLN layer and unpatchify. The output has the data's channels only (no learned
sigma); the optional log-variance head is the shared one in layers.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.nets.attention import attention
from harness.nets.layers import Dropout, Linear, NetBase, NetConfig, PositionalEmbedding, TorchLinear


@dataclass
class DiTConfig(NetConfig):
    arch: str = "dit"
    hidden_size: int = 384  # token width (DiT-S)
    depth: int = 12  # number of transformer blocks
    heads: int = 6  # attention heads
    patch_size: int = 2  # p in DiT-*/p
    mlp_ratio: float = 4.0  # MLP hidden width / hidden_size (DiT: 4)
    learned_pos_embed: bool = False  # DiT uses a fixed 2-D sin-cos table; True makes it a parameter
    frequency_embedding_size: int = 256  # sinusoid width of the noise/extra embedders (DiT: 256)


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """[grid*grid, dim] table: half the channels encode the row, half the column (DiT / MAE)."""
    if dim % 4:
        raise ValueError(f"dit hidden_size must be divisible by 4 for the 2-D sin-cos table, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def layer_norm(x: Tensor) -> Tensor:
    # Affine-free LayerNorm, eps 1e-6 (DiT), statistics in float32.
    return F.layer_norm(x.float(), x.shape[-1:], eps=1e-6).to(x.dtype)


class ScalarEmbedder(nn.Module):
    """Sinusoids of each scalar -> Linear -> SiLU -> Linear (DiT's TimestepEmbedder), in float32."""

    def __init__(self, hidden: int, freq_size: int, num_inputs: int = 1, zero_out: bool = False):
        super().__init__()
        self.embed = PositionalEmbedding(freq_size)
        self.fc0 = Linear(freq_size * num_inputs, hidden)
        self.fc1 = Linear(hidden, hidden)
        nn.init.normal_(self.fc0.weight, std=0.02)  # DiT's init of the timestep MLP
        nn.init.normal_(self.fc1.weight, std=0.02)
        if zero_out:  # zero init: a newly added input leaves F unchanged (sCM App. G.2 default)
            nn.init.zeros_(self.fc1.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc1(F.silu(self.fc0(self.embed(x))))


class DiTBlock(nn.Module):
    """Pre-norm attention + MLP, each modulated (shift, scale) and gated by adaLN-Zero."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        hidden = cfg.hidden_size
        self.heads, self.backend = cfg.heads, cfg.attention
        self.qkv = TorchLinear(hidden, hidden * 3)
        self.proj = TorchLinear(hidden, hidden)
        self.fc1 = TorchLinear(hidden, int(hidden * cfg.mlp_ratio))
        self.fc2 = TorchLinear(int(hidden * cfg.mlp_ratio), hidden)
        self.dropout = Dropout(cfg.dropout)
        self.ada_ln = Linear(hidden, hidden * 6)  # adaLN-Zero: zeroed in DiT._init_weights

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        mods = self.ada_ln(F.silu(cond).to(x.dtype)).chunk(6, dim=1)  # body dtype: adaLN is 1/3 of DiT
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_attn[:, None] * self.dropout(self._attention(modulate(layer_norm(x), shift_attn, scale_attn)))
        y = F.gelu(self.fc1(modulate(layer_norm(x), shift_mlp, scale_mlp)), approximate="tanh")
        return x + gate_mlp[:, None] * self.fc2(self.dropout(y))

    def _attention(self, x: Tensor) -> Tensor:
        batch, tokens, hidden = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, hidden // self.heads).permute(2, 0, 3, 1, 4)
        y = attention(qkv[0], qkv[1], qkv[2], backend=self.backend)  # [B, heads, N, head_dim]
        return self.proj(y.transpose(1, 2).reshape(batch, tokens, hidden))


class DiT(NetBase):
    """DiT body; see NetBase for the forward contract."""

    data_rank = 3

    def __init__(self, cfg: DiTConfig, data_shape: tuple[int, ...], num_classes: int):
        super().__init__(cfg, data_shape, num_classes)
        channels, height, width = self.data_shape
        patch, hidden = cfg.patch_size, cfg.hidden_size
        if height != width or height % patch:
            raise ValueError(f"dit needs square images divisible by patch_size={patch}, got {height}x{width}")
        if hidden % cfg.heads:
            raise ValueError(f"dit hidden_size ({hidden}) must be divisible by heads ({cfg.heads})")
        self.grid = height // patch
        self.patch_embed = nn.Conv2d(channels, hidden, kernel_size=patch, stride=patch)
        pos = sincos_pos_embed_2d(hidden, self.grid)[None]
        if cfg.learned_pos_embed:
            self.pos_embed = nn.Parameter(pos)
        else:
            self.register_buffer("pos_embed", pos, persistent=False)
        self.noise_embed = ScalarEmbedder(hidden, cfg.frequency_embedding_size)
        # One-hot @ weight is DiT's label table; an all-zero row gives the zero ("null") embedding.
        self.label_embed = Linear(num_classes, hidden, bias=False) if num_classes else None
        if cfg.extra_cond_dim:
            self.extra_embed = ScalarEmbedder(hidden, cfg.frequency_embedding_size, cfg.extra_cond_dim, zero_out=True)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_ada_ln = Linear(hidden, hidden * 2)
        self.final_linear = TorchLinear(hidden, patch * patch * channels)
        self._init_weights()

    def _init_weights(self) -> None:
        # DiT's initialization: xavier-uniform linears, zero adaLN modulations and zero output layer.
        for block in self.blocks:
            for layer in (block.qkv, block.proj, block.fc1, block.fc2):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
            nn.init.zeros_(block.ada_ln.weight)
            nn.init.zeros_(block.ada_ln.bias)
        weight = self.patch_embed.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.weight, std=0.02)
        for layer in (self.final_ada_ln, self.final_linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _forward(self, x: Tensor, noise_labels: Tensor, class_onehot: Tensor | None, extra: Tensor | None) -> Tensor:
        cond = self.noise_embed(noise_labels)  # float32 [B, hidden]
        if class_onehot is not None:
            cond = cond + self.label_embed(class_onehot)
        if extra is not None:
            cond = cond + self.extra_embed(extra)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            tokens = block(tokens, cond)
        shift, scale = self.final_ada_ln(F.silu(cond).to(tokens.dtype)).chunk(2, dim=1)
        out = self.final_linear(modulate(layer_norm(tokens), shift, scale))
        return self._unpatchify(out)

    def _unpatchify(self, tokens: Tensor) -> Tensor:
        batch, grid, patch = tokens.shape[0], self.grid, self.cfg.patch_size
        channels = self.data_shape[0]
        out = tokens.reshape(batch, grid, grid, patch, patch, channels)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, grid * patch, grid * patch)
