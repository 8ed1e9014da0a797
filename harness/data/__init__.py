"""The data layer: named datasets loaded whole into memory as float32 in [-1, 1].

    cfg = DATASETS["cifar10"]            # or a Hydra/OmegaConf node with the same fields
    check_data_config(cfg)               # cheap: name, counts, path existence and format
    data = load_dataset(cfg)             # Dataset(x, y, heldout_x, heldout_y, num_classes, shape)

Bundled: digits (sklearn), the 2-D toys (swissroll, gaussians8, moons, checkerboard).
From `data.path`: cifar10, imagenet64 (see harness/data/images.py for the accepted formats).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from harness.data.config import DATASETS, DataConfig, DataError, Dataset, fixed_split
from harness.data.digits import NUM_CLASSES as DIGITS_CLASSES, SHAPE as DIGITS_SHAPE, check_digits, digits_split, load_digits
from harness.data.images import SPECS, check_images, load_images
from harness.data.toy2d import TOYS, check_toy, load_toy

__all__ = [
    "DATASETS",
    "DataConfig",
    "DataError",
    "Dataset",
    "check_data_config",
    "data_shape",
    "digits_split",
    "fixed_split",
    "load_dataset",
    "register_dataset",
]


@dataclass(frozen=True)
class _Entry:
    load: Callable[[DataConfig], Dataset]  # the loader, a pure function of the config
    check: Callable[[DataConfig], None]  # cheap up-front validation, raising DataError
    shape: tuple[int, ...]  # one item: (C, H, W) for images, (D,) for points
    classes: int  # labels it has (0: none)


_REGISTRY: dict[str, _Entry] = {}


def register_dataset(name: str, load: Callable[[DataConfig], Dataset], check: Callable[[DataConfig], None],
                     shape: tuple[int, ...], classes: int = 0) -> None:
    """Add a dataset under `name` (items of `shape`, `classes` labels); a name can be registered once only."""
    if name in _REGISTRY:
        raise ValueError(f"dataset '{name}' is already registered")
    _REGISTRY[name] = _Entry(load, check, tuple(shape), classes)


register_dataset("digits", load_digits, check_digits, DIGITS_SHAPE, DIGITS_CLASSES)
for _name, _spec in SPECS.items():
    register_dataset(_name, load_images, check_images, (3, _spec.resolution, _spec.resolution), _spec.num_classes)
for _name in TOYS:
    register_dataset(_name, load_toy, check_toy, (2,))
if set(_REGISTRY) != set(DATASETS):
    raise RuntimeError(f"presets {sorted(DATASETS)} and loaders {sorted(_REGISTRY)} must name the same datasets")


def _entry(cfg: DataConfig) -> _Entry:
    entry = _REGISTRY.get(str(cfg.name))
    if entry is None:
        raise DataError(f"unknown dataset '{cfg.name}'; valid names: {', '.join(sorted(_REGISTRY))}")
    return entry


def check_data_config(cfg: DataConfig) -> None:
    """Fail fast, before any work, on a bad name, count or path (checks existence and format only)."""
    _entry(cfg).check(cfg)


def data_shape(cfg: DataConfig) -> tuple[tuple[int, ...], int]:
    """(item shape, number of classes the network is conditioned on) without loading anything."""
    entry = _entry(cfg)
    return entry.shape, entry.classes if cfg.class_conditional else 0


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load the dataset `cfg` names; deterministic in cfg alone (fixed seeds, no global RNG)."""
    return _entry(cfg).load(cfg)
