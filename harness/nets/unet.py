"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", config G): MP convs with forced weight normalization, MP-SiLU/Sum/Cat,
pixel norm, Fourier noise embedding, cosine attention, no biases, learned output gain."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from harness.nets.attention import attention
from harness.nets.layers import (
    Dropout,
    MPConv,
    MPFourier,
    NetBase,
    NetConfig,
    PositionalEmbedding,
    pixel_norm,
    mp_cat,
    mp_silu,
    mp_sum,
    normalize,
    resample,
    resample_kernel,
)


@dataclass
class UNetConfig(NetConfig):
    arch: str = "unet"
    channels: int = 192  # model_channels (EDM2 S=192, M=256, L=320, XL=384)
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 3, 4])  # per-level width multipliers
    channel_mult_noise: int = 0  # noise-embedding width = channels * this; 0: channels * channel_mult[0]
    channel_mult_emb: int = 0  # conditioning-embedding width = channels * this; 0: channels * max(mult)
    num_blocks: int = 3  # residual blocks per level in the encoder (decoder has one more)
    attn_resolutions: list[int] = field(default_factory=lambda: [16, 8])  # resolutions with self-attention
    mid_attention: bool = True  # attention in the first decoder block (EDM2 always has it)
    channels_per_head: int = 64  # attention head width (EDM2: 64)
    label_balance: float = 0.5  # MP-Sum weight of the class embedding (EDM2)
    concat_balance: float = 0.5  # MP-Cat weight of the skip connection (EDM2)
    res_balance: float = 0.3  # MP-Sum weight of the residual branch (EDM2)
    attn_balance: float = 0.3  # MP-Sum weight of the attention branch (EDM2)
    clip_act: float = 256.0  # clamp block outputs to +-clip_act (EDM2); 0 disables
    dropout_res: int = 0  # dropout only in blocks at resolution <= this (ECT ImageNet: 16); 0: all
    noise_embedding: str = "fourier"  # "fourier" (EDM2) or "positional" (sCM Sec. 4.1)
    # Adaptive double normalization [sCM §4.1]: y = pixel_norm(y) * pnorm(s(emb)) + pnorm(b(emb)) in place of
    # EDM2's y * (1 + gain s(emb)); EDM2 has no GroupNorm, so norm() is its channel pixel norm; no "+1".
    double_norm: bool = False
    resample_filter: list[int] = field(default_factory=lambda: [1, 1])  # FIR taps of down/up-sampling


def _embedding(kind: str, channels: int, num_inputs: int) -> nn.Module:
    if kind == "fourier":
        return MPFourier(channels, num_inputs)
    if kind == "positional":
        return PositionalEmbedding(channels, gain=math.sqrt(2))  # sqrt(2): unit mean square, like MPFourier
    raise ValueError(f"unknown noise_embedding {kind!r}; valid: fourier, positional")


class Block(nn.Module):
    """EDM2 encoder/decoder block: [resample] -> residual branch -> MP-Sum -> [cosine attention]."""

    def __init__(
        self,
        cfg: UNetConfig,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        resolution: int,
        flavor: str,
        resample_mode: str = "keep",
        use_attention: bool = False,
        takes_skip: bool = False,
    ):
        super().__init__()
        self.out_channels, self.flavor, self.takes_skip = out_channels, flavor, takes_skip
        self.resample_mode = resample_mode
        self.res_balance, self.attn_balance, self.clip_act = cfg.res_balance, cfg.attn_balance, cfg.clip_act
        self.backend = cfg.attention
        self.num_heads = 0
        if use_attention:
            if out_channels % cfg.channels_per_head:
                raise ValueError(
                    f"attention at {resolution}x{resolution} needs channels ({out_channels}) divisible by "
                    f"channels_per_head ({cfg.channels_per_head})"
                )
            self.num_heads = out_channels // cfg.channels_per_head
        self.double_norm = cfg.double_norm
        if not cfg.double_norm:
            self.emb_gain = nn.Parameter(torch.zeros(1))  # shape [1], not []: DeepSpeed views params as bytes
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, (3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels * (2 if cfg.double_norm else 1))
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        active = cfg.dropout_res == 0 or resolution <= cfg.dropout_res
        self.dropout = Dropout(cfg.dropout if active else 0.0)
        if self.num_heads:
            self.attn_qkv = MPConv(out_channels, out_channels * 3, (1, 1))
            self.attn_proj = MPConv(out_channels, out_channels, (1, 1))
        if resample_mode != "keep":
            self.register_buffer("resample_kernel", resample_kernel(cfg.resample_filter), persistent=False)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.resample_mode != "keep":
            x = resample(x, self.resample_kernel, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm on the encoder's main path (EDM2 config F)
        y = self.conv_res0(mp_silu(x))
        if self.double_norm:
            scale, shift = (pixel_norm(v)[:, :, None, None].to(y.dtype) for v in self.emb_linear(emb).chunk(2, dim=1))
            y = mp_silu(normalize(y, dim=1) * scale + shift)
        else:
            scale = self.emb_linear(emb, gain=self.emb_gain) + 1  # scale-only modulation (EDM2 config G)
            y = mp_silu(y * scale[:, :, None, None].to(y.dtype))
        y = self.conv_res1(self.dropout(y))
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            x = mp_sum(x, self._attention(x), t=self.attn_balance)
        if self.clip_act > 0:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x

    def _attention(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        qkv = self.attn_qkv(x).reshape(batch, 3, self.num_heads, channels // self.num_heads, height * width)
        qkv = normalize(qkv, dim=3)  # cosine attention: pixel-normed q, k, v per head (EDM2 config C)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(1))  # [B, heads, N, head_dim]
        y = attention(q, k, v, backend=self.backend)
        return self.attn_proj(y.transpose(-1, -2).reshape(batch, channels, height, width))


class UNet(NetBase):
    """EDM2 U-Net body; see NetBase for the forward contract."""

    data_rank = 3

    def __init__(self, cfg: UNetConfig, data_shape: tuple[int, ...], num_classes: int):
        super().__init__(cfg, data_shape, num_classes)
        img_channels, height, width = self.data_shape
        levels = len(cfg.channel_mult)
        if height != width or height % (1 << (levels - 1)):
            raise ValueError(f"unet needs square images divisible by {1 << (levels - 1)}, got {height}x{width}")
        cblock = [cfg.channels * mult for mult in cfg.channel_mult]
        cnoise = cfg.channels * cfg.channel_mult_noise if cfg.channel_mult_noise else cblock[0]
        cemb = cfg.channels * cfg.channel_mult_emb if cfg.channel_mult_emb else max(cblock)
        self.label_balance, self.concat_balance = cfg.label_balance, cfg.concat_balance

        # Conditioning embedding.
        self.emb_fourier = _embedding(cfg.noise_embedding, cnoise, 1)
        self.emb_noise = MPConv(cnoise, cemb)
        self.emb_label = MPConv(num_classes, cemb) if num_classes else None
        if cfg.extra_cond_dim:
            self.emb_extra_fourier = _embedding(cfg.noise_embedding, cnoise, cfg.extra_cond_dim)
            self.emb_extra = MPConv(cnoise * cfg.extra_cond_dim, cemb)
            self.extra_gain = nn.Parameter(torch.zeros(1))  # zero: adding the input leaves F unchanged at init

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = img_channels + 1  # + a constant-one channel, standing in for biases (EDM2 config C)
        for level, channels in enumerate(cblock):
            res = height >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(cout, channels, (3, 3))
                cout = channels
            else:
                self.enc[f"{res}x{res}_down"] = Block(cfg, cout, cout, cemb, res, "enc", resample_mode="down")
            for idx in range(cfg.num_blocks):
                use_attn = res in cfg.attn_resolutions
                self.enc[f"{res}x{res}_block{idx}"] = Block(
                    cfg, cout, channels, cemb, res, "enc", use_attention=use_attn
                )
                cout = channels

        # Decoder.
        self.dec = nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = height >> level
            if level == levels - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cfg, cout, cout, cemb, res, "dec", use_attention=cfg.mid_attention)
                self.dec[f"{res}x{res}_in1"] = Block(cfg, cout, cout, cemb, res, "dec")
            else:
                self.dec[f"{res}x{res}_up"] = Block(cfg, cout, cout, cemb, res, "dec", resample_mode="up")
            for idx in range(cfg.num_blocks + 1):
                cin = cout + skips.pop()
                use_attn = res in cfg.attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = Block(
                    cfg, cin, channels, cemb, res, "dec", use_attention=use_attn, takes_skip=True
                )
                cout = channels
        self.out_conv = MPConv(cout, img_channels, (3, 3))
        self.out_gain = nn.Parameter(torch.zeros(1))  # zero-init output (EDM2): F = 0 at init

    def _forward(self, x: Tensor, noise_labels: Tensor, class_onehot: Tensor | None, extra: Tensor | None) -> Tensor:
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if extra is not None:
            emb = emb + self.emb_extra(self.emb_extra_fourier(extra), gain=self.extra_gain)
        if class_onehot is not None:
            label = self.emb_label(class_onehot * math.sqrt(class_onehot.shape[1]))  # unit-magnitude one-hot
            emb = mp_sum(emb, label, t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for block in self.enc.values():
            x = block(x) if isinstance(block, MPConv) else block(x, emb)
            skips.append(x)
        for block in self.dec.values():
            if block.takes_skip:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)
