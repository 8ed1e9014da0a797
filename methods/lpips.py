"""LPIPS (Zhang et al. 2018, v0.1 "vgg"): the perceptual distance of the CM paper's CT and CD.

d(x, y) = sum_l mean_hw( w_l . (phi_l(x)/|phi_l(x)| - phi_l(y)/|phi_l(y)|)^2 ), phi_l the VGG16 relu1_2,
relu2_2, relu3_3, relu4_3 and relu5_3 activations of inputs in [-1, 1] after LPIPS's scaling layer, w_l
the learned non-negative 1x1 linear weights. Images smaller than 256 are bilinearly resized to 224 first,
as the CM code does. Weights are read from local files only (no download):

- `vgg16-397923af.pth`: torchvision's ImageNet VGG16 (https://download.pytorch.org/models/vgg16-397923af.pth)
- `vgg.pth`: LPIPS v0.1 linear layers (richzhang/PerceptualSimilarity, lpips/weights/v0.1/vgg.pth)
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

VGG_FILE = "vgg16-397923af.pth"
LIN_FILE = "vgg.pth"
VGG_TAPS = (3, 8, 15, 22, 29)              # indices in vgg16().features of relu1_2 ... relu5_3
SHIFT = (-0.030, -0.088, -0.188)           # LPIPS scaling layer (inputs in [-1, 1])
SCALE = (0.458, 0.448, 0.450)


def missing_weights(folder: str) -> str | None:
    """One-line message naming what to fetch and which key to set, or None when both files are there."""
    if not folder:
        return (f"distance=lpips needs the LPIPS weights: put {VGG_FILE} (torchvision VGG16) and {LIN_FILE} "
                f"(LPIPS v0.1 linear layers) in a folder and set method.lpips_weights=FOLDER")
    for name in (VGG_FILE, LIN_FILE):
        if not (Path(folder) / name).is_file():
            return (f"LPIPS weight file {Path(folder) / name} is missing: fetch {name} "
                    f"({'torchvision VGG16' if name == VGG_FILE else 'LPIPS v0.1 linear layers'}) into "
                    f"method.lpips_weights={folder}")
    return None


class LPIPS(nn.Module):
    """LPIPS over any feature stack: `features` run in order, activations taken after `taps`."""

    def __init__(self, features: nn.Sequential, taps: Sequence[int], lin_weights: Sequence[torch.Tensor],
                 resize: int = 224):
        super().__init__()
        self.features, self.taps, self.resize = features, tuple(taps), resize
        self.lins = nn.ParameterList([nn.Parameter(w.reshape(1, -1, 1, 1).float(), requires_grad=False)
                                      for w in lin_weights])
        self.register_buffer("shift", torch.tensor(SHIFT).reshape(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).reshape(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    def _feats(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)                        # grayscale digits: the same image in RGB
        if self.resize and x.shape[-1] < 256:                  # the CM code resizes images below 256
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        h, out = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.features[: self.taps[-1] + 1]):
            h = layer(h)
            if i in self.taps:
                out.append(h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample distance [B] between image batches in [-1, 1]; differentiable in x and y."""
        total = 0.0
        for w, fx, fy in zip(self.lins, self._feats(x.float()), self._feats(y.float())):
            total = total + ((fx - fy).pow(2) * w).sum(dim=1).mean(dim=(1, 2))
        return total


def load_lpips(folder: str, resize: int = 224) -> LPIPS:
    """The real LPIPS-VGG from local weight files (see the module docstring)."""
    problem = missing_weights(folder)
    if problem:
        raise FileNotFoundError(problem)
    from torchvision.models import vgg16

    features = vgg16(weights=None).features
    vgg = torch.load(Path(folder) / VGG_FILE, map_location="cpu", weights_only=True)
    features.load_state_dict({k[len("features."):]: v for k, v in vgg.items() if k.startswith("features.")})
    lin = torch.load(Path(folder) / LIN_FILE, map_location="cpu", weights_only=True)
    weights = [lin[f"lin{i}.model.1.weight"] for i in range(len(VGG_TAPS))]
    return LPIPS(features, VGG_TAPS, weights, resize)
