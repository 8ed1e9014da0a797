"""EDM's DDPM++ network ("SongUNet" in Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", App. F.2; config F): positional noise embedding + 2-layer mapping
MLP, GroupNorm residual blocks with skip scale 1/sqrt(2), single-head attention, standard encoder and
decoder, [1, 1] resampling filter."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.nets.attention import attention
from harness.nets.layers import (
    Dropout,
    Linear,
    MPFourier,
    NetBase,
    NetConfig,
    PositionalEmbedding,
    pixel_norm,
    resample,
    resample_kernel,
    weight_op,
)


@dataclass
class DDPMppConfig(NetConfig):
    arch: str = "ddpmpp"
    dropout: float = 0.13  # EDM CIFAR-10 (ECT uses 0.2)
    channels: int = 128  # model_channels
    channel_mult: list[int] = field(default_factory=lambda: [2, 2, 2])  # per-level width multipliers
    channel_mult_noise: int = 1  # noise-embedding width = channels * this
    channel_mult_emb: int = 4  # mapping-network width = channels * this
    num_blocks: int = 4  # residual blocks per level in the encoder (decoder has one more)
    attn_resolutions: list[int] = field(default_factory=lambda: [16])  # resolutions with attention
    dropout_res: int = 0  # dropout only in blocks at resolution <= this; 0: all
    resample_filter: list[int] = field(default_factory=lambda: [1, 1])  # FIR taps (DDPM++: [1, 1])
    embedding_type: str = "positional"  # "positional" (DDPM++) or "fourier" (NCSN++)
    fourier_scale: float = 16.0  # bandwidth of the "fourier" embedding (NCSN++: 16)
    # Adaptive double normalization [sCM §4.1]: GroupNorm(x) * pnorm(s(emb)) + pnorm(b(emb)) in place of
    # DDPM++'s additive embedding GroupNorm(x + b(emb)); no "+1" on the scale.
    double_norm: bool = False


class Conv2d(nn.Module):
    """Conv with optional 2x up/down-sampling before it; xavier-uniform init * init_weight (EDM)."""

    def __init__(self, cin: int, cout: int, kernel: int, up: bool = False, down: bool = False,
                 resample_filter: list[int] | None = None, init_weight: float = 1.0):
        super().__init__()
        self.mode = "up" if up else "down" if down else "keep"
        self.weight = self.bias = None
        if kernel:
            fan_in, fan_out = cin * kernel * kernel, cout * kernel * kernel
            bound = math.sqrt(6 / (fan_in + fan_out)) * init_weight
            self.weight = nn.Parameter((torch.rand(cout, cin, kernel, kernel) * 2 - 1) * bound)
            self.bias = nn.Parameter(torch.zeros(cout))
        if self.mode != "keep":
            self.register_buffer("resample_kernel", resample_kernel(resample_filter or [1, 1]), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode != "keep":
            x = resample(x, self.resample_kernel, self.mode)
        if self.weight is not None:
            x = weight_op(F.conv2d, x, self.weight.to(x.dtype), self.bias.to(x.dtype), of=(self.weight, self.bias),
                          padding=self.weight.shape[-1] // 2)
        return x


class GroupNorm(nn.Module):
    """GroupNorm with min(32, C/4) groups (EDM; the largest divisor of C below that if it does not
    divide C); statistics in float32."""

    def __init__(self, channels: int, eps: float = 1e-6):  # eps 1e-6 as in DDPM++
        super().__init__()
        groups = max(min(32, channels // 4), 1)
        while channels % groups:
            groups -= 1
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x.float(), self.groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class UNetBlock(nn.Module):
    """Residual block: GN-SiLU-conv, add embedding, GN-SiLU-dropout-conv, skip, [attention]."""

    def __init__(self, cfg: DDPMppConfig, cin: int, cout: int, emb_channels: int, resolution: int,
                 up: bool = False, down: bool = False, use_attention: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.backend = cin, cout, cfg.attention
        self.skip_scale = math.sqrt(0.5)  # DDPM++ skip scale 1/sqrt(2)
        self.norm0 = GroupNorm(cin)
        self.conv0 = Conv2d(cin, cout, 3, up=up, down=down, resample_filter=cfg.resample_filter)
        self.double_norm = cfg.double_norm
        self.affine = Linear(emb_channels, cout * (2 if cfg.double_norm else 1))
        self.norm1 = GroupNorm(cout)
        active = cfg.dropout_res == 0 or resolution <= cfg.dropout_res
        self.dropout = Dropout(cfg.dropout if active else 0.0)
        self.conv1 = Conv2d(cout, cout, 3, init_weight=1e-5)  # EDM's near-zero init of the last conv
        self.skip = None
        if cout != cin or up or down:
            self.skip = Conv2d(cin, cout, 1, up=up, down=down, resample_filter=cfg.resample_filter)
        self.use_attention = use_attention
        if use_attention:
            self.norm2 = GroupNorm(cout)
            self.qkv = Conv2d(cout, cout * 3, 1, init_weight=math.sqrt(0.2))  # EDM's init_attn
            self.proj = Conv2d(cout, cout, 1, init_weight=1e-5)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        if self.double_norm:
            scale, shift = (pixel_norm(v)[:, :, None, None].to(x.dtype) for v in self.affine(emb).chunk(2, dim=1))
            x = F.silu(self.norm1(x) * scale + shift)
        else:
            x = F.silu(self.norm1(x + self.affine(emb)[:, :, None, None].to(x.dtype)))
        x = self.conv1(self.dropout(x))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.use_attention:
            batch, channels, height, width = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(batch, 3, 1, channels, height * width).unbind(1)
            y = attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2), backend=self.backend)
            x = (self.proj(y.transpose(-1, -2).reshape(batch, channels, height, width)) + x) * self.skip_scale
        return x


class DDPMpp(NetBase):
    """DDPM++ body; see NetBase for the forward contract."""

    data_rank = 3

    def __init__(self, cfg: DDPMppConfig, data_shape: tuple[int, ...], num_classes: int):
        super().__init__(cfg, data_shape, num_classes)
        img_channels, height, width = self.data_shape
        levels = len(cfg.channel_mult)
        if height != width or height % (1 << (levels - 1)):
            raise ValueError(f"ddpmpp needs square images divisible by {1 << (levels - 1)}, got {height}x{width}")
        emb_channels = cfg.channels * cfg.channel_mult_emb
        noise_channels = cfg.channels * cfg.channel_mult_noise

        # Mapping network.
        self.map_noise = self._embedding(cfg, noise_channels, 1)
        self.map_label = Linear(num_classes, noise_channels) if num_classes else None
        if cfg.extra_cond_dim:
            self.map_extra_embed = self._embedding(cfg, noise_channels, cfg.extra_cond_dim)
            # Zero init: adding the extra input leaves F unchanged at init (sCM App. G.2 default).
            self.map_extra = Linear(noise_channels * cfg.extra_cond_dim, noise_channels, init_weight=0.0)
        self.map_layer0 = Linear(noise_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)

        def block(cin: int, cout: int, res: int, **kwargs) -> UNetBlock:
            return UNetBlock(cfg, cin, cout, emb_channels, res, **kwargs)

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = img_channels
        for level, mult in enumerate(cfg.channel_mult):
            res = height >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, cfg.channels, 3)
                cout = cfg.channels
            else:
                self.enc[f"{res}x{res}_down"] = block(cout, cout, res, down=True)
            for idx in range(cfg.num_blocks):
                self.enc[f"{res}x{res}_block{idx}"] = block(
                    cout, cfg.channels * mult, res, use_attention=res in cfg.attn_resolutions
                )
                cout = cfg.channels * mult
        skips = [cfg.channels] + [b.out_channels for b in self.enc.values() if isinstance(b, UNetBlock)]

        # Decoder.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            res = height >> level
            if level == levels - 1:
                self.dec[f"{res}x{res}_in0"] = block(cout, cout, res, use_attention=True)
                self.dec[f"{res}x{res}_in1"] = block(cout, cout, res)
            else:
                self.dec[f"{res}x{res}_up"] = block(cout, cout, res, up=True)
            for idx in range(cfg.num_blocks + 1):
                use_attn = idx == cfg.num_blocks and res in cfg.attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = block(cout + skips.pop(), cfg.channels * mult, res,
                                                            use_attention=use_attn)
                cout = cfg.channels * mult
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, img_channels, 3, init_weight=1e-5)  # EDM's near-zero output init

    @staticmethod
    def _embedding(cfg: DDPMppConfig, channels: int, num_inputs: int) -> nn.Module:
        if cfg.embedding_type == "positional":
            return PositionalEmbedding(channels, endpoint=True)
        if cfg.embedding_type == "fourier":
            # Random Fourier features with f ~ N(0, scale^2), as NCSN++ (here in EDM2's cos-with-phase form).
            return MPFourier(channels, num_inputs, bandwidth=cfg.fourier_scale)
        raise ValueError(f"unknown embedding_type {cfg.embedding_type!r}; valid: positional, fourier")

    def _forward(self, x: Tensor, noise_labels: Tensor, class_onehot: Tensor | None, extra: Tensor | None) -> Tensor:
        emb = self.map_noise(noise_labels)
        if class_onehot is not None:
            emb = emb + self.map_label(class_onehot * math.sqrt(class_onehot.shape[1]))
        if extra is not None:
            emb = emb + self.map_extra(self.map_extra_embed(extra))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        skips = []
        for layer in self.enc.values():
            x = layer(x, emb) if isinstance(layer, UNetBlock) else layer(x)
            skips.append(x)
        for layer in self.dec.values():
            if x.shape[1] != layer.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = layer(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))
