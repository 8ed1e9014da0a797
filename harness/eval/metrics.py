"""Evaluation metrics: one object per (metric, dataset), built once and reused for every score.

    metric = build_metric(cfg.eval, data, device)    # cheap: checks names and files, one-line errors
    metric.prepare()                                 # once: reference statistics, floor (before sampling)
    value = metric(samples)                          # samples in the dataset's layout, [-1, 1]
    record.update(metric.protocol())                 # feature extractor, mode, reference and its size, ...

`eval.metric=auto` picks digits_fd on the digits, fid on the image datasets (cifar10, imagenet64) and
the energy distance on 2-D data. Lower is better for every metric; `floor` is the metric of real
data that training did not produce (see each class), the best value a model can be expected to reach.
"""
from __future__ import annotations

import numpy as np
import torch

from harness.eval.frechet import frechet_from_stats, stats

METRIC_NAMES = ("auto", "pixel_fd", "digits_fd", "fid", "energy", "sliced_wasserstein")
FID_MODES = ("clean", "legacy_tensorflow")   # clean-fid's modes that use its torchscript Inception


class MetricError(ValueError):
    """A metric that cannot run as configured (missing file, wrong data); the message is one line."""


def data_kind(name: str) -> str:
    """'digits', 'points' (2-D toys) or 'images' (cifar10, imagenet64, ...)."""
    from harness.data.toy2d import TOYS
    if name == "digits":
        return "digits"
    return "points" if name in TOYS else "images"


# Metrics each kind of data admits; the first is `auto`'s choice.
ALLOWED = {"digits": ("digits_fd", "pixel_fd", "fid"),
           "images": ("fid", "pixel_fd"),
           "points": ("energy", "sliced_wasserstein", "pixel_fd")}


def resolve_metric(metric: str, data_name: str) -> str:
    """The metric `eval.metric` names for this dataset (auto resolved), or a one-line MetricError."""
    if metric not in METRIC_NAMES:
        raise MetricError(f"eval.metric='{metric}' is not valid; valid: {', '.join(METRIC_NAMES)}")
    allowed = ALLOWED[data_kind(data_name)]
    if metric == "auto":
        return allowed[0]
    if metric not in allowed:
        raise MetricError(f"eval.metric={metric} does not apply to data={data_name}; valid there: "
                          f"auto, {', '.join(allowed)}")
    return metric


def check_eval_config(ecfg, data_name: str) -> None:
    """Names and values only (no file access): called by the config validation."""
    resolve_metric(ecfg.metric, data_name)
    if ecfg.fid_mode not in FID_MODES:
        raise MetricError(f"eval.fid_mode='{ecfg.fid_mode}' is not valid; valid: {', '.join(FID_MODES)} "
                          f"(legacy_pytorch needs a second, separately downloaded Inception and is not supported)")
    ref = ecfg.fid_reference
    if ref not in ("auto", "registry", "train", "heldout") and not ref.startswith("custom:") \
            and not ref.endswith(".npz"):
        raise MetricError(f"eval.fid_reference='{ref}' is not valid; valid: auto, registry, train, heldout, "
                          f"custom:NAME (clean-fid custom statistics) or a path to an .npz with mu and sigma")
    if ecfg.sw_projections < 1:
        raise MetricError(f"eval.sw_projections must be >= 1, got {ecfg.sw_projections}")
    grid = list(getattr(ecfg, "mid_sigma_grid", []) or [])
    if grid and not getattr(ecfg, "selection", False):
        raise MetricError("eval.mid_sigma_grid needs eval.selection=true: the mid-point is chosen on the "
                          "selection set, never on the reported one")
    if any(not (isinstance(v, (int, float)) and 0 < v < float("inf")) for v in grid):
        raise MetricError(f"eval.mid_sigma_grid must hold positive finite EDM noise levels, got {grid}")
    if getattr(ecfg, "selection_samples", 0) < 0 or getattr(ecfg, "selection_samples", 0) == 1:
        raise MetricError(f"eval.selection_samples must be 0 (as many as eval.num_samples) or >= 2, "
                          f"got {ecfg.selection_samples}")
    if getattr(ecfg, "selection_size", 0) < 0 or getattr(ecfg, "selection_size", 0) == 1:
        raise MetricError(f"eval.selection_size must be 0 (as many as held out) or >= 2, "
                          f"got {ecfg.selection_size}")


def training_subset(data, num: int, xflip: bool = False) -> torch.Tensor:
    """`num` training items, a fixed random choice (seed 0), independent of the run's seed; with xflip
    the mirrored second half of data.x is left out (only the real images)."""
    n_real = len(data.x) // 2 if xflip else len(data.x)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(n_real, generator=gen)[:num]
    return data.x[idx]


class Metric:
    """A score of generated samples against a fixed reference set; lower is better."""
    name = ""

    def __init__(self, ecfg, data, device, data_cfg=None):
        self.ecfg, self.data, self.device, self.data_cfg = ecfg, data, torch.device(device), data_cfg
        self.floor = float("nan")
        self._prepared = False
        self._selection: Metric | None = None
        self._check()

    def selection(self) -> Metric:
        """The same metric against the selection set (harness.eval.select), built once."""
        if self._selection is None:
            from harness.eval.select import build_selection_metric
            self._selection = build_selection_metric(self.ecfg, self.data, self.device, self.data_cfg)
        return self._selection

    def _check(self) -> None:
        """Cheap checks (files, held-out set) at construction, so a run fails before it trains."""

    @property
    def xflip(self) -> bool:
        """Whether data.x ends in mirrored copies (data.xflip), which floors and references leave out."""
        return bool(getattr(self.data_cfg, "xflip", False))    # a DictConfig, a DataConfig or None

    def prepare(self) -> None:
        """One-time work (reference statistics, the floor); every later call is free."""
        if not self._prepared:
            self._prepare()
            self._prepared = True

    def _prepare(self) -> None:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> float:
        raise NotImplementedError

    def protocol(self) -> dict:
        """What a reader needs to reproduce the number, recorded with every score."""
        raise NotImplementedError


class FrechetMetric(Metric):
    """Frechet distance in some feature space against the held-out set; floor: as many training items
    as samples against the same held-out set. Subclasses define `features` and describe them."""
    feature_extractor = ""

    def features(self, x: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def _check(self) -> None:
        if len(self.data.heldout_x) < 2:
            raise MetricError(f"{self.name} scores against the held-out set and {self.data.name} has "
                              f"{len(self.data.heldout_x)} held-out items: set data.heldout or data.heldout_path, "
                              f"or eval.at_end=false")

    def _prepare(self) -> None:
        held = self.data.heldout_x
        self.ref_mu, self.ref_sigma = stats(self.features(held))
        self.reference_size = len(held)
        num = min(self.ecfg.num_samples, len(self.data.x))
        self.floor_size = num
        self.floor = self._fd(training_subset(self.data, num, self.xflip))

    def _fd(self, x: torch.Tensor) -> float:
        mu, sigma = stats(self.features(x))
        return frechet_from_stats(mu, sigma, self.ref_mu, self.ref_sigma)

    def __call__(self, x: torch.Tensor) -> float:
        self.prepare()
        return self._fd(x)

    def protocol(self) -> dict:
        return {"metric": self.name, "feature_extractor": self.feature_extractor, "mode": None,
                "reference": f"{self.data.name} held-out ({self.reference_size})",
                "reference_size": self.reference_size,
                "floor_set": f"{self.floor_size} training items (fixed subset, seed 0) vs the reference",
                "frechet": "cleanfid.fid.frechet_distance"}


class PixelFD(FrechetMetric):
    """Frechet distance of the raw values (pixels, or 2-D points) to the held-out set."""
    name = "pixel_fd"
    feature_extractor = "identity (flattened values in [-1, 1])"

    def features(self, x: torch.Tensor) -> np.ndarray:
        return x.reshape(len(x), -1).double().numpy()


def metric_classes() -> dict[str, type[Metric]]:
    from harness.eval.digits_fd import DigitsFD
    from harness.eval.fid import FID
    from harness.eval.toy import EnergyDistance, SlicedWasserstein
    return {"pixel_fd": PixelFD, "digits_fd": DigitsFD, "fid": FID, "energy": EnergyDistance,
            "sliced_wasserstein": SlicedWasserstein}


def build_metric(ecfg, data, device="cpu", data_cfg=None, metric: str | None = None) -> Metric:
    """The metric for `data` (eval.metric unless `metric` is given; `data_cfg` keys cached reference
    statistics to the data source); missing files fail here, in one line, before any sampling."""
    name = resolve_metric(metric or ecfg.metric, data.name)
    built = metric_classes()[name](ecfg, data, device, data_cfg)
    if getattr(ecfg, "selection", False):
        built.selection()                        # a selection set that cannot be built fails now too
    return built
