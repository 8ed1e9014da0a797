"""Networks: one config dataclass + module per arch, named size presets, and `build_net`.

Every net has the same forward (see layers.NetBase):
    net(x, noise_labels, class_labels=None, extra=None, return_logvar=False) -> F  (or (F, logvar))
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from torch import nn

from harness.nets.ddpmpp import DDPMpp, DDPMppConfig
from harness.nets.dit import DiT, DiTConfig
from harness.nets.layers import ARCH_NAMES, NetBase, NetConfig, count_params
from harness.nets.mlp import MLP, MLPConfig
from harness.nets.unet import UNet, UNetConfig

__all__ = [
    "ARCHS", "MODEL_PRESETS", "NetBase", "NetConfig", "UNetConfig", "DDPMppConfig", "DiTConfig", "MLPConfig",
    "build_net", "check_model_config", "count_params", "get_preset",
]

# arch name -> (config dataclass, module class)
ARCHS: dict[str, tuple[type[NetConfig], type[NetBase]]] = {
    "unet": (UNetConfig, UNet),
    "ddpmpp": (DDPMppConfig, DDPMpp),
    "dit": (DiTConfig, DiT),
    "mlp": (MLPConfig, MLP),
}
assert tuple(ARCHS) == ARCH_NAMES


def _edm2_img64(size: str, channels: int, dropout: float) -> UNetConfig:
    # EDM2 ImageNet-64 config G sizes (train_edm2.py presets edm2-img64-{s,m,l,xl}).
    return UNetConfig(name=f"edm2-img64-{size}", channels=channels, dropout=dropout)


def _small_unet(size: str, channels: int, attn: list[int], num_blocks: int) -> UNetConfig:
    # 8x8 digits: two levels (8x8, 4x4); 16-channel heads so attention fits the narrow widths.
    return UNetConfig(
        name=f"unet-{size}", channels=channels, channel_mult=[1, 2], num_blocks=num_blocks,
        attn_resolutions=attn, mid_attention=bool(attn), channels_per_head=16,
    )


def _small_ddpmpp(size: str, channels: int, attn: list[int], num_blocks: int) -> DDPMppConfig:
    return DDPMppConfig(
        name=f"ddpmpp-{size}", channels=channels, channel_mult=[1, 2], num_blocks=num_blocks,
        attn_resolutions=attn, dropout=0.1,
    )


def _dit(name: str, hidden: int, depth: int, heads: int, patch: int = 2) -> DiTConfig:
    return DiTConfig(name=name, hidden_size=hidden, depth=depth, heads=heads, patch_size=patch)


_PRESET_LIST: list[NetConfig] = [
    _edm2_img64("s", 192, 0.0),
    _edm2_img64("m", 256, 0.1),
    _edm2_img64("l", 320, 0.1),
    _edm2_img64("xl", 384, 0.1),
    _small_unet("xs", 16, [], 1),
    _small_unet("s", 32, [4], 1),
    _small_unet("m", 48, [4], 2),
    DDPMppConfig(name="ddpmpp-cifar10"),  # EDM's DDPM++ for 32x32x3 (EDM dropout 0.13; ECT 0.2)
    _small_ddpmpp("xs", 16, [], 1),
    _small_ddpmpp("s", 32, [4], 1),
    _small_ddpmpp("m", 48, [4], 2),
    _dit("dit-xs", 64, 2, 2),
    _dit("dit-s", 128, 4, 4),
    _dit("dit-m", 192, 6, 6),
    _dit("dit-s2", 384, 12, 6),  # DiT paper sizes (Table 1), build-only here
    _dit("dit-b2", 768, 12, 12),
    _dit("dit-l2", 1024, 24, 16),
    _dit("dit-xl2", 1152, 28, 16),
    MLPConfig(name="mlp-xs", hidden=64, depth=3),
    MLPConfig(name="mlp-s", hidden=128, depth=4),
    MLPConfig(name="mlp-m", hidden=256, depth=4),
]
MODEL_PRESETS: dict[str, NetConfig] = {cfg.name: cfg for cfg in _PRESET_LIST}
assert len(MODEL_PRESETS) == len(_PRESET_LIST), "duplicate preset name"


def get_preset(name: str) -> NetConfig:
    """A fresh copy of preset `name` (editing it leaves MODEL_PRESETS untouched)."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid: {', '.join(MODEL_PRESETS)}")
    return copy.deepcopy(MODEL_PRESETS[name])


def _as_config(cfg: Any) -> NetConfig:
    """Accept a config dataclass, an OmegaConf/Hydra node or a plain mapping; return the arch's dataclass."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        values = dataclasses.asdict(cfg)
    else:
        try:
            from omegaconf import OmegaConf

            values = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
        except ImportError:
            values = dict(cfg)
    arch = values.get("arch")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    config_cls = ARCHS[arch][0]
    if isinstance(cfg, config_cls):
        return cfg
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} for arch {arch!r}; valid: {sorted(known)}")
    return config_cls(**values)


def build_net(cfg: Any, data_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the net that `cfg.arch` names for data of shape (C, H, W) or (D,), with `num_classes` classes
    (0 = unconditional). Use `with torch.device("meta"):` to build without allocating."""
    cfg = _as_config(cfg)
    return ARCHS[cfg.arch][1](cfg, tuple(data_shape), int(num_classes))


# Size fields that must be positive integers, in any arch that has them.
_POSITIVE = ("channels", "hidden_size", "hidden", "depth", "heads", "patch_size", "num_blocks", "channels_per_head")


def check_model_config(cfg: Any, data_shape: tuple[int, ...], num_classes: int, data_name: str) -> None:
    """Raise ValueError (one line) when `cfg` cannot be built for this data: an arch for the other kind of
    data, a size below 1, a dropout outside [0, 1), or anything else the constructor refuses (it is built
    on the meta device, allocating nothing)."""
    import torch
    cfg = _as_config(cfg)
    points = len(data_shape) == 1
    if points != (cfg.arch == "mlp"):
        fits = [n for n, c in MODEL_PRESETS.items() if (c.arch == "mlp") == points]
        kind = "2-D points" if points else f"{'x'.join(map(str, data_shape))} images"
        raise ValueError(f"model={cfg.name} ({cfg.arch}) cannot take {data_name}'s {kind}; "
                         f"valid for it: {', '.join(fits)}")
    for key in _POSITIVE:
        value = getattr(cfg, key, None)
        if value is not None and value < 1:
            raise ValueError(f"model.{key} must be >= 1, got {value}")
    mult = getattr(cfg, "channel_mult", None)
    if mult is not None and (not mult or min(mult) < 1):
        raise ValueError(f"model.channel_mult must be a non-empty list of values >= 1, got {list(mult)}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"model.dropout must lie in [0, 1), got {cfg.dropout}")
    try:
        with torch.device("meta"):
            build_net(cfg, data_shape, num_classes)
    except Exception as exc:   # the constructor's own objection, whatever it is, before any work
        raise ValueError(f"model={cfg.name} cannot be built for {data_name}: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'no reason given'}") from None


def uses_forced_weight_norm(net: nn.Module) -> bool:
    """True when the net renormalizes its stored weights (EDM2's MPConv, forced weight normalization)."""
    from harness.nets.layers import MPConv
    return any(isinstance(m, MPConv) for m in net.modules())
