"""Sample grids as PNG: image tiles, or a scatter plot for 2-D data."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def save_grid(x: torch.Tensor, path: Path, scale: int = 4) -> None:
    """x in [-1, 1]: [N, C, H, W] images (tiled, nearest-neighbour upscaled) or [N, 2] points."""
    path = Path(path)
    if x.ndim == 2:
        return _save_scatter(x, path)
    from PIL import Image
    n, c, h, w = x.shape
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    img = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    canvas = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = img[i].transpose(1, 2, 0)
    canvas = canvas.repeat(scale, 0).repeat(scale, 1)
    Image.fromarray(canvas[..., 0] if c == 1 else canvas).save(path)


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
