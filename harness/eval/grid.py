"""Sample grids as PNG: image tiles, or a scatter plot for 2-D data."""
from __future__ import annotations

import math
from pathlib import Path

import torch


def save_grid(x: torch.Tensor, path: Path, scale: int = 4) -> None:
    """x in [-1, 1]: [N, C, H, W] images (tiled by torchvision, nearest-neighbour upscaled) or [N, 2] points."""
    path = Path(path)
    if x.ndim == 2:
        return _save_scatter(x, path)
    from torchvision.utils import make_grid, save_image
    images = (x.detach().float().cpu().clamp(-1, 1) + 1) / 2
    grid = make_grid(images, nrow=int(math.ceil(math.sqrt(len(images)))), padding=1, pad_value=1.0)
    save_image(grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2), path)


def _save_scatter(x: torch.Tensor, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = x.float().cpu().numpy()
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5)
    ax.set_aspect("equal")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
