"""scikit-learn's bundled 8x8 digits (1797 images, grey levels 0..16, 10 classes): no download.

Split: a fixed permutation of the 1797 images (numpy RandomState(0), independent of the run seed);
its last `heldout` (default 297) images are held out for evaluation and the remaining 1500 train.
Pixels map to [-1, 1] by x / 8 - 1, so 0 -> -1, 8 -> 0 and 16 -> 1 exactly.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from harness.data.config import DataConfig, DataError, Dataset, check_counts, fixed_split, make_dataset

NUM_DIGITS = 1797  # images in sklearn's digits set
NUM_CLASSES = 10
SHAPE = (1, 8, 8)


def digits_split(heldout: int, max_images: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, heldout) row indices into sklearn's load_digits(); see the module docstring."""
    return fixed_split(NUM_DIGITS, heldout, max_images)


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    """(pixels [1797, 64] in 0..16, labels [1797]), the arrays behind sklearn.datasets.load_digits."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is not None and csv.is_file():
        # Reading the bundled CSV directly skips sklearn.datasets' ~1 s import.
        table = np.loadtxt(csv, delimiter=",")
        return table[:, :64], table[:, 64].astype(np.int64)
    from sklearn.datasets import load_digits  # the file moved in some sklearn release: take the slow road

    bunch = load_digits()
    return bunch.data, bunch.target.astype(np.int64)


def check_digits(cfg: DataConfig) -> None:
    check_counts(cfg)
    if cfg.heldout >= NUM_DIGITS:
        raise DataError(f"digits: data.heldout={cfg.heldout} must be below {NUM_DIGITS}, the number of images")


def load_digits(cfg: DataConfig) -> Dataset:
    check_digits(cfg)
    pixels, labels = _read_digits()
    if pixels.shape != (NUM_DIGITS, 64):
        raise DataError(f"digits: expected scikit-learn's {NUM_DIGITS} 8x8 images, found an array {pixels.shape}")
    x = torch.from_numpy(pixels / 8.0 - 1.0).float().reshape(-1, *SHAPE)  # 0..16 grey levels -> [-1, 1]
    train, held = digits_split(cfg.heldout, cfg.max_images)
    return make_dataset(cfg, x[train], labels[train], x[held], labels[held], NUM_CLASSES)
