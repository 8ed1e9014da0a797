"""2-D toy distributions, generated offline from fixed seeds (no labels: always unconditional).

Scale convention: every toy lies inside about [-1, 1]^2 with a per-coordinate std near 0.5, the
sigma_data the EDM/CM parameterizations assume, so the same method defaults work on toys and images.

- swissroll:    (t cos t, t sin t) / 14, t ~ U[1.5 pi, 4.5 pi], plus N(0, 0.03^2) noise; std ~ (0.47, 0.50),
                mean ~ (0.14, 0.01) (not re-centred), inside about [-0.8, 1.1]^2.
- gaussians8:   8 equal-weight Gaussians, std 0.05, centred at radius 0.7 and angles k pi / 4; std ~ 0.5.
- moons:        sklearn-style two half-circles, noise std 0.08, centred on (0.5, 0.25) and scaled by 0.6;
                inside about [-1.05, 1.05] x [-0.65, 0.65], std ~ (0.52, 0.30).
- checkerboard: uniform on the 8 dark squares of a 4x4 board covering [-1, 1]^2; std ~ 0.58.

Training points come from numpy's default_rng(TRAIN_SEED) and the held-out set (`heldout` points,
5000 in the presets) from default_rng(HELDOUT_SEED), so the two sets are independent draws.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from harness.data.config import DataConfig, DataError, Dataset, make_dataset

TRAIN_SEED = 0  # generator of the training points
HELDOUT_SEED = 1  # generator of the held-out points, distinct from training

SWISSROLL_SCALE = 14.0  # divides the roll's outer radius 4.5 pi ~ 14.1 down to ~1
SWISSROLL_NOISE = 0.03  # isotropic noise std after scaling
GAUSSIANS8_RADIUS = 0.7  # circle the 8 centres sit on
GAUSSIANS8_STD = 0.05  # per-component std; sqrt(0.7^2 / 2 + 0.05^2) ~ 0.5 per coordinate
MOONS_NOISE = 0.08  # noise std before scaling, as in sklearn's make_moons(noise=...)
MOONS_SCALE = 0.6  # maps the moons' x-span [-1.5, 1.5] (after centring) to [-0.9, 0.9]


def swissroll(n: int, rng: np.random.Generator) -> np.ndarray:
    t = 1.5 * np.pi * (1.0 + 2.0 * rng.random(n))
    points = np.stack([t * np.cos(t), t * np.sin(t)], axis=1) / SWISSROLL_SCALE
    return points + SWISSROLL_NOISE * rng.standard_normal((n, 2))


def gaussians8(n: int, rng: np.random.Generator) -> np.ndarray:
    angle = rng.integers(0, 8, n) * (np.pi / 4)
    centres = GAUSSIANS8_RADIUS * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return centres + GAUSSIANS8_STD * rng.standard_normal((n, 2))


def moons(n: int, rng: np.random.Generator) -> np.ndarray:
    theta = np.pi * rng.random(n)
    upper = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    lower = np.stack([1.0 - np.cos(theta), 0.5 - np.sin(theta)], axis=1)
    points = np.where((rng.random(n) < 0.5)[:, None], upper, lower)
    points = points + MOONS_NOISE * rng.standard_normal((n, 2))
    return (points - np.array([0.5, 0.25])) * MOONS_SCALE


def checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    column = rng.integers(0, 4, n)
    row = 2 * rng.integers(0, 2, n) + column % 2  # dark squares: column + row even
    cell = np.stack([column, row], axis=1) + rng.random((n, 2))
    return cell / 2.0 - 1.0  # [0, 4]^2 -> [-1, 1]^2


TOYS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "swissroll": swissroll,
    "gaussians8": gaussians8,
    "moons": moons,
    "checkerboard": checkerboard,
}


def check_toy(cfg: DataConfig) -> None:
    if cfg.name not in TOYS:
        raise DataError(f"unknown 2-D toy '{cfg.name}'; valid names: {', '.join(sorted(TOYS))}")
    if cfg.num_points < 1 or cfg.heldout < 0:
        raise DataError(f"{cfg.name}: need num_points >= 1, heldout >= 0; got {cfg.num_points}, {cfg.heldout}")
    if cfg.xflip:
        raise DataError(f"{cfg.name}: data.xflip applies to images only; a 2-D toy is not mirror-symmetric")


def load_toy(cfg: DataConfig) -> Dataset:
    check_toy(cfg)
    sample = TOYS[cfg.name]
    x = sample(cfg.num_points, np.random.default_rng(TRAIN_SEED))
    heldout_x = sample(cfg.heldout, np.random.default_rng(HELDOUT_SEED))
    # Toys carry no labels, so class_conditional has nothing to condition on: unconditional by nature.
    plain = DataConfig(name=cfg.name, class_conditional=False)
    return make_dataset(
        plain, torch.from_numpy(x).float(), None, torch.from_numpy(heldout_x).float(), None, num_classes=0
    )
