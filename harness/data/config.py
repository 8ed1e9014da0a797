"""The data config schema, its named presets, and the in-memory dataset every loader returns.

Every dataset lives in memory as float32 in [-1, 1]; the trainer draws batches from `Dataset.x`.
Loaders are pure functions of the config: splits and toy samples come from fixed seeds and local
generators, never from the global RNG, so the same config always yields the same tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

SPLIT_SEED = 0  # the fixed permutation behind every train / held-out split (seed-independent on purpose)


class DataError(ValueError):
    """A data problem the user must fix (name, path, format, image size); the message is one line."""

    def __init__(self, message: str):
        super().__init__(re.sub(r"\s*\n\s*", " ", str(message)).strip())


@dataclass
class DataConfig:
    """Which data to train on; OmegaConf structured-config friendly (plain typed fields, defaults)."""

    name: str = "digits"  # one of DATASETS
    path: str = ""  # cifar10/imagenet64: tarball, folder, EDM zip or .npz of training images; others ignore it
    heldout_path: str = ""  # cifar10/imagenet64: optional folder/zip/.npz of held-out images (all of it is held out)
    class_conditional: bool = False  # train with labels (num_classes > 0) when the dataset has them
    heldout: int = 297  # held out for eval: digits images; toy points; images split off a source with no test split
    num_points: int = 50000  # 2-D toys: training points
    max_images: int = 0  # digits/images: keep a fixed subset of this many training images (0 = all), for smoke runs
    xflip: bool = False  # digits/images: append mirrored training copies (EDM's --xflip); ECT's CIFAR-10 uses none


def _preset(name: str, **overrides) -> DataConfig:
    return DataConfig(name=name, **overrides)


# Named presets, one line each; registered as the options of Hydra's `data` group.
DATASETS: dict[str, DataConfig] = {
    "digits": _preset("digits"),  # sklearn's 8x8 digits: 1500 train / 297 held out
    "cifar10": _preset("cifar10", heldout=0),  # 50k train; held out = test_batch, heldout_path, or none
    "imagenet64": _preset("imagenet64", heldout=0, class_conditional=True),  # the CM papers' ImageNet-64 is conditional
    "swissroll": _preset("swissroll", heldout=5000),
    "gaussians8": _preset("gaussians8", heldout=5000),
    "moons": _preset("moons", heldout=5000),
    "checkerboard": _preset("checkerboard", heldout=5000),
}


@dataclass
class Dataset:
    """A whole dataset in memory: training tensors plus a held-out set that training never sees."""

    name: str
    x: torch.Tensor  # float32 training data in [-1, 1]: [N, C, H, W] for images, [N, 2] for 2-D toys
    y: torch.Tensor | None  # int64 [N] labels, or None when unconditional
    heldout_x: torch.Tensor  # float32 held-out real data for evaluation, same layout (may have 0 rows)
    heldout_y: torch.Tensor | None  # int64 labels of heldout_x, or None when unconditional
    num_classes: int  # 0 when unconditional
    shape: tuple[int, ...]  # per-sample shape, e.g. (1, 8, 8), (3, 32, 32), (2,)

    def __len__(self) -> int:
        return int(self.x.shape[0])


def fixed_split(n: int, heldout: int, max_images: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split indices 0..n-1 independently of any run seed: permute with RandomState(SPLIT_SEED), hold out
    the permutation's last `heldout`, keep the first `max_images` of the rest (0 = all); both sorted."""
    if not 0 <= heldout < n:
        raise DataError(f"data.heldout={heldout} must be in [0, {n - 1}]: the source holds {n} items")
    perm = np.random.RandomState(SPLIT_SEED).permutation(n)
    train, held = perm[: n - heldout], perm[n - heldout :]
    if max_images > 0:
        train = train[:max_images]
    return np.sort(train), np.sort(held)


def check_counts(cfg: DataConfig) -> None:
    """Reject negative counts, which every loader would otherwise misread."""
    for field in ("heldout", "max_images"):
        if int(getattr(cfg, field)) < 0:
            raise DataError(f"{cfg.name}: data.{field}={getattr(cfg, field)} must be >= 0")


def make_dataset(
    cfg: DataConfig,
    x: torch.Tensor,
    y: np.ndarray | None,
    heldout_x: torch.Tensor,
    heldout_y: np.ndarray | None,
    num_classes: int,
) -> Dataset:
    """Apply the shared label policy and xflip, and wrap the tensors.

    Labels are kept only when cfg.class_conditional; a labelled dataset (digits, cifar10, imagenet64)
    whose files carry no labels is then an error rather than a silent switch to unconditional.
    """
    if cfg.class_conditional:
        for labels, what in ((y, "training"), (heldout_y, "held-out")):
            if labels is None:
                raise DataError(
                    f"{cfg.name}: data.class_conditional=true but the {what} images have no labels "
                    f"(use class subfolders or EDM's dataset.json, or set data.class_conditional=false)"
                )
            if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
                raise DataError(
                    f"{cfg.name}: {what} labels span [{labels.min()}, {labels.max()}], outside [0, {num_classes - 1}]"
                )
        y_t = torch.from_numpy(np.asarray(y, dtype=np.int64))
        heldout_y_t = torch.from_numpy(np.asarray(heldout_y, dtype=np.int64))
    else:
        y_t, heldout_y_t, num_classes = None, None, 0
    if cfg.xflip:  # EDM's --xflip: the mirrored copy is a second half of the training set
        x = torch.cat([x, x.flip(-1)])
        y_t = None if y_t is None else torch.cat([y_t, y_t])
    return Dataset(
        name=cfg.name,
        x=x,
        y=y_t,
        heldout_x=heldout_x,
        heldout_y=heldout_y_t,
        num_classes=num_classes,
        shape=tuple(x.shape[1:]),
    )
