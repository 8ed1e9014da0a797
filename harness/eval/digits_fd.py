"""The digits metric: Frechet distance in the penultimate features of a small digits classifier.

The MNIST-FID convention (a domain classifier instead of Inception, whose 299x299 ImageNet features
mean little on 8x8 grey digits). The classifier is trained once on the training split, on the CPU,
from fixed seeds, and cached under eval.cache_dir as `digits_classifier-<recipe hash>.pt`; its test
accuracy (on the held-out digits, which it never trains on) is recorded with every score.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from harness.eval.metrics import FrechetMetric, MetricError

log = logging.getLogger(__name__)
RECIPE_VERSION = 1   # bump when the architecture or the training loop below changes


@dataclass(frozen=True)
class ClassifierRecipe:
    heldout: int = 297          # digits held out (data.heldout): the classifier never trains on them
    seed: int = 0               # initialization, batch order and augmentation
    width: int = 32             # channels of the first conv layer
    feature_dim: int = 64       # penultimate features (the metric's space)
    epochs: int = 15
    batch_size: int = 64
    lr: float = 2e-3            # Adam
    shift: int = 1              # random translation augmentation, pixels each way

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "version": RECIPE_VERSION}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


class DigitsNet(nn.Module):
    """conv 3x3 (w) - conv 3x3 stride 2 (2w) - conv 3x3 (2w) - linear (features) - ReLU - linear (10).
    The features are the penultimate layer before its ReLU: no unit is dead, so no covariance row is 0."""

    def __init__(self, width: int, feature_dim: int):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.Flatten(),
            nn.Linear(2 * w * 16, feature_dim))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _digits(heldout: int):
    from harness.data import DataConfig, load_dataset
    return load_dataset(DataConfig(name="digits", heldout=heldout, class_conditional=True))


def _shifted(x: torch.Tensor, gen: torch.Generator, shift: int) -> torch.Tensor:
    """Each image translated by a random (dy, dx) in [-shift, shift]^2, background (-1) filled in."""
    if shift == 0:
        return x
    pad = torch.nn.functional.pad(x, (shift,) * 4, value=-1.0)
    d = torch.randint(0, 2 * shift + 1, (len(x), 2), generator=gen)
    h, w = x.shape[-2:]
    rows = (d[:, :1] + torch.arange(h))[:, None, :, None]           # [B, 1, h, 1]
    cols = (d[:, 1:] + torch.arange(w))[:, None, None, :]           # [B, 1, 1, w]
    batch = torch.arange(len(x))[:, None, None, None]
    chan = torch.arange(x.shape[1])[None, :, None, None]
    return pad[batch, chan, rows, cols]


def train_classifier(recipe: ClassifierRecipe) -> dict:
    """Train on the digits' training split (CPU, one thread, seeded): the same weights on every machine
    that runs the same torch build. Returns {state_dict, accuracy, train_sec, recipe, num_test}."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)           # one fixed reduction order; also the fastest for this tiny net
    try:
        return _train(recipe)
    finally:
        torch.set_num_threads(threads)


def _train(recipe: ClassifierRecipe) -> dict:
    t0 = time.perf_counter()
    data = _digits(recipe.heldout)
    gen = torch.Generator().manual_seed(recipe.seed)
    with torch.random.fork_rng(devices=[]):                # leave the caller's global RNG alone
        torch.manual_seed(recipe.seed)
        net = DigitsNet(recipe.width, recipe.feature_dim)
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr)
    for _ in range(recipe.epochs):
        order = torch.randperm(len(data.x), generator=gen)
        for start in range(0, len(order), recipe.batch_size):
            idx = order[start:start + recipe.batch_size]
            loss = nn.functional.cross_entropy(net(_shifted(data.x[idx], gen, recipe.shift)), data.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = float((net(data.heldout_x).argmax(1) == data.heldout_y).float().mean())
    return {"recipe": asdict(recipe), "state_dict": net.state_dict(), "accuracy": accuracy,
            "train_sec": time.perf_counter() - t0, "num_test": len(data.heldout_x)}


def cache_root(cache_dir: str) -> Path:
    """eval.cache_dir, or <repo>/results/cache when it is empty."""
    return Path(cache_dir).expanduser() if cache_dir else Path(__file__).resolve().parents[2] / "results" / "cache"


def load_classifier(recipe: ClassifierRecipe, cache_dir: str) -> tuple[DigitsNet, dict]:
    """The cached classifier for `recipe`, training (and caching, atomically) it on first use."""
    path = cache_root(cache_dir) / f"digits_classifier-{recipe.key()}.pt"
    info = None
    if path.exists():
        try:
            info = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:     # a corrupt cache entry is retrained, not trusted
            log.warning("ignoring unreadable %s (%s)", path, type(exc).__name__)
    if info is None:
        info = train_classifier(recipe)
        log.info("digits classifier trained in %.1f s: test accuracy %.4f; cached at %s",
                 info["train_sec"], info["accuracy"], path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            torch.save(info, tmp)
            os.replace(tmp, path)
        except OSError as exc:
            raise MetricError(f"cannot write the digits classifier cache {path} ({exc}); "
                              f"set eval.cache_dir to a writable folder") from None
    net = DigitsNet(recipe.width, recipe.feature_dim)
    net.load_state_dict(info["state_dict"])
    return net.eval().requires_grad_(False), {**info, "path": str(path)}


class DigitsFD(FrechetMetric):
    """Frechet distance in the digits classifier's penultimate features, against the held-out digits."""
    name = "digits_fd"

    def _prepare(self) -> None:
        heldout = self.data_cfg.heldout if self.data_cfg is not None else len(self.data.heldout_x)
        self.recipe = ClassifierRecipe(heldout=int(heldout))
        self.net, self.info = load_classifier(self.recipe, self.ecfg.cache_dir)
        self.feature_extractor = (f"digits classifier {self.recipe.key()} (penultimate features, pre-ReLU, "
                                  f"{self.recipe.feature_dim}-d)")
        super()._prepare()

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> np.ndarray:
        x = x.float().cpu().clamp(-1, 1).reshape(-1, 1, 8, 8)
        return torch.cat([self.net.body(x[i:i + 1000]) for i in range(0, len(x), 1000)]).double().numpy()

    def protocol(self) -> dict:
        return {**super().protocol(), "classifier_accuracy": self.info["accuracy"],
                "classifier_key": self.recipe.key(), "classifier_test_size": self.info["num_test"],
                "classifier_train_sec": self.info["train_sec"], "preprocess": "clamp to [-1, 1]"}
