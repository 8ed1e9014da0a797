"""FID through clean-fid, offline: local Inception weights, registry or cached reference statistics.

- Feature extractor: clean-fid's torchscript Inception-V3 (`inception-2015-12-05.pt`, pool3, 2048-d),
  read from eval.inception_path (the file or its folder) or clean-fid's own cache (/tmp, where
  cleanfid.features puts it). It is built with download=False, so clean-fid's download code is never
  reached; a missing file is a one-line error before any sampling. Tests pass a stand-in extractor,
  a callable with the same contract as clean-fid's `custom_feat_extractor` (float [B, 3, 299, 299] in
  [0, 255] -> [B, D]).
- Preprocessing: samples -> uint8 (as if saved to PNG), then clean-fid's own resizer for the mode and
  the tensor conversion of its ResizeDataset, so a batch is exactly what compute_fid would feed.
- Reference (eval.fid_reference): `registry` = clean-fid's precomputed statistics in its stats folder
  (`<data>_<mode>_train_<res>.npz`, e.g. cifar10_clean_train_32.npz); `custom:NAME` = clean-fid custom
  statistics (make_custom_stats; test_stats_exists); `train` / `heldout` = computed from this dataset
  once and cached under eval.cache_dir; a path to an .npz with mu and sigma; `auto` = registry when
  present, else train.
- Floor: the held-out images (when the reference is the training set), else a fixed subset of the
  training images, as many as samples, against the reference.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from harness.eval.frechet import frechet_from_stats, stats
from harness.eval.metrics import Metric, MetricError, training_subset

log = logging.getLogger(__name__)
INCEPTION_FILE = "inception-2015-12-05.pt"   # clean-fid's name for the StyleGAN2-ADA torchscript Inception
CLEANFID_CACHE = "/tmp"                      # where cleanfid.features.feature_extractor keeps it (non-Windows)
_BATCH = 100                                 # images per feature-extractor call


def inception_file(ecfg) -> Path:
    """The Inception weights this config reads (eval.inception_path, or clean-fid's cache)."""
    path = Path(ecfg.inception_path).expanduser() if ecfg.inception_path else Path(CLEANFID_CACHE)
    return path / INCEPTION_FILE if path.is_dir() or not ecfg.inception_path else path


def check_inception(ecfg) -> Path:
    path = inception_file(ecfg)
    if not path.is_file():
        raise MetricError(f"FID needs clean-fid's Inception weights {INCEPTION_FILE}, not found at {path}: download "
                          f"it (https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                          f"{INCEPTION_FILE}) and set eval.inception_path=/path/to/{INCEPTION_FILE}")
    if path.name != INCEPTION_FILE:
        raise MetricError(f"eval.inception_path={path} must be named {INCEPTION_FILE} (clean-fid loads it by "
                          f"that name) or be the folder holding it")
    return path


def load_inception(path: Path, mode: str, device: torch.device):
    """clean-fid's InceptionV3W from a local file; legacy_tensorflow resizes inside the network."""
    from cleanfid.inception_torchscript import InceptionV3W
    model = InceptionV3W(str(path.parent), download=False, resize_inside=(mode == "legacy_tensorflow"))
    return model.to(device).eval()


def registry_file(name: str, mode: str, split: str = "train", res: int | str = 32) -> Path:
    """A precomputed statistics file in clean-fid's stats folder (its get_reference_statistics naming)."""
    import cleanfid
    fname = f"{name}_{mode}_{split}_{res}.npz".lower()
    return Path(os.path.dirname(cleanfid.__file__)) / "stats" / fname


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW -> uint8 NHWC RGB (x + 1) * 127.5, rounded: the inverse of the data loaders' map."""
    x = x.float().clamp(-1, 1)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def cleanfid_batch(images: np.ndarray, mode: str) -> torch.Tensor:
    """uint8 NHWC -> the float NCHW batch clean-fid's ResizeDataset yields (its resizer for `mode`)."""
    from cleanfid.resize import build_resizer
    resize = build_resizer(mode)
    out = []
    for img in images:
        r = resize(img)
        t = torch.from_numpy(np.ascontiguousarray(r.transpose(2, 0, 1)))
        out.append(t.float() if r.dtype == np.uint8 else t)    # ToTensor()*255 (uint8) / ToTensor (float32)
    return torch.stack(out)


def extract(model, x: torch.Tensor, mode: str, device: torch.device) -> np.ndarray:
    """Features of samples in [-1, 1], batch by batch, through cleanfid.fid.get_batch_features."""
    from cleanfid.fid import get_batch_features
    feats = [get_batch_features(cleanfid_batch(to_uint8(x[i:i + _BATCH]), mode), model, device)
             for i in range(0, len(x), _BATCH)]
    return np.concatenate(feats).astype(np.float64)


def _as_dict(cfg) -> dict:
    if cfg is None:
        return {}
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    from omegaconf import OmegaConf
    return OmegaConf.to_container(cfg, resolve=True)


class FID(Metric):
    name = "fid"

    def __init__(self, ecfg, data, device, data_cfg=None, extractor=None, extractor_name: str = ""):
        super().__init__(ecfg, data, device, data_cfg)
        self.mode = ecfg.fid_mode
        self.model = extractor
        if extractor is None:
            self.weights = check_inception(ecfg)
            self.extractor_name = f"inception-v3 torchscript ({self.weights.name}, pool3 2048-d)"
        else:
            self.weights, self.extractor_name = None, extractor_name or type(extractor).__name__
        self.reference_kind, self.reference_file = self._reference_source()   # missing file: fail now

    def _reference_source(self) -> tuple[str, Path | None]:
        ref, res = self.ecfg.fid_reference, self.data.shape[-1]
        if ref in ("auto", "registry"):
            path = registry_file(self.data.name, self.mode, "train", res)
            if path.is_file():
                return "registry", path
            if ref == "registry":
                raise MetricError(f"clean-fid reference statistics {path} are missing: place that file there, or set "
                                  f"eval.fid_reference=train to compute them from the dataset (cached)")
            return "train", None
        if ref.startswith("custom:"):
            from cleanfid.fid import test_stats_exists
            name = ref.split(":", 1)[1]
            path = registry_file(name, self.mode, "custom", "na")
            if not test_stats_exists(name, self.mode):
                raise MetricError(f"clean-fid custom statistics {path} are missing: create them with "
                                  f"cleanfid.fid.make_custom_stats('{name}', FOLDER, mode='{self.mode}') or set "
                                  f"eval.fid_reference=train")
            return "custom", path
        if ref.endswith(".npz"):
            path = Path(ref).expanduser()
            if not path.is_file():
                raise MetricError(f"reference statistics {path} (eval.fid_reference) do not exist; give an .npz "
                                  f"with mu and sigma, or set eval.fid_reference=train")
            return "file", path
        if ref == "heldout" and len(self.data.heldout_x) < 2:
            raise MetricError(f"eval.fid_reference=heldout but {self.data.name} has no held-out images; set "
                              f"data.heldout_path or eval.fid_reference=train")
        return ref, None

    # -- one-time work -------------------------------------------------------------------------------
    def _prepare(self) -> None:
        if self.model is None:
            self.model = load_inception(self.weights, self.mode, self.device)
        if self.reference_file is not None:
            with np.load(self.reference_file) as f:
                self.ref_mu, self.ref_sigma = f["mu"], f["sigma"]
                self.reference_size = int(f["num"]) if "num" in f.files else None
        else:
            self.ref_mu, self.ref_sigma, self.reference_size = self._computed_reference()
        floor_x = self._floor_images()
        self.floor_size = len(floor_x)
        self.floor = self._fd(floor_x)

    def _reference_images(self) -> torch.Tensor:
        if self.reference_kind == "heldout":
            return self.data.heldout_x
        return self.data.x[: len(self.data.x) // 2] if self.xflip else self.data.x   # the real images only

    def _floor_images(self) -> torch.Tensor:
        num = min(self.ecfg.num_samples, len(self.data.x))
        if self.reference_kind in ("registry", "train") and len(self.data.heldout_x):
            self.floor_set = "held-out images vs the reference"
            return self.data.heldout_x[:num]
        self.floor_set = f"{num} training images (fixed subset, seed 0) vs the reference"
        return training_subset(self.data, num, self.xflip)

    def _cache_path(self, num: int) -> Path:
        from harness.eval.digits_fd import cache_root
        source = {k: str(v) for k, v in _as_dict(self.data_cfg).items()}
        for key in ("path", "heldout_path"):                # the files' identity, not just their names
            if source.get(key) and Path(source[key]).exists():
                st = Path(source[key]).stat()
                source[key] = f"{Path(source[key]).resolve()}:{st.st_size}:{int(st.st_mtime)}"
        blob = json.dumps({"data": source, "name": self.data.name, "split": self.reference_kind, "num": num,
                           "mode": self.mode, "extractor": self.extractor_name}, sort_keys=True).encode()
        key = hashlib.sha256(blob).hexdigest()[:12]
        return cache_root(self.ecfg.cache_dir) / f"fid_stats-{self.data.name}-{self.reference_kind}-{self.mode}-{key}.npz"

    def _computed_reference(self) -> tuple[np.ndarray, np.ndarray, int]:
        x = self._reference_images()
        path = self._cache_path(len(x))
        if path.is_file():
            with np.load(path) as f:
                return f["mu"], f["sigma"], int(f["num"])
        log.info("computing FID reference statistics of %d %s images (once; cached at %s)", len(x),
                 self.reference_kind, path)
        mu, sigma = stats(extract(self.model, x, self.mode, self.device))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
        np.savez(tmp, mu=mu, sigma=sigma, num=len(x))
        os.replace(tmp, path)
        self.reference_file = path
        return mu, sigma, len(x)

    def _fd(self, x: torch.Tensor) -> float:
        mu, sigma = stats(extract(self.model, x, self.mode, self.device))
        if mu.shape != np.shape(self.ref_mu):
            raise MetricError(f"reference statistics {self.reference_file} have {np.shape(self.ref_mu)[0]}-d features, "
                              f"{self.extractor_name} gives {mu.shape[0]}-d: check eval.fid_reference")
        return frechet_from_stats(mu, sigma, self.ref_mu, self.ref_sigma)

    def __call__(self, x: torch.Tensor) -> float:
        self.prepare()
        return self._fd(x)

    def protocol(self) -> dict:
        import importlib.metadata
        size = self.reference_size if self.reference_size is not None else "?"
        return {"metric": self.name, "feature_extractor": self.extractor_name, "mode": self.mode,
                "inception_path": str(self.weights) if self.weights else None,
                "reference": f"{self.data.name} {self.reference_kind} ({size})",
                "reference_size": self.reference_size,
                "reference_stats": str(self.reference_file) if self.reference_file else None,
                "floor_set": self.floor_set, "preprocess": "uint8 quantization, clean-fid resizer",
                "frechet": "cleanfid.fid.frechet_distance",
                "cleanfid_version": importlib.metadata.version("clean-fid")}
