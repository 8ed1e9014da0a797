"""CIFAR-10 and ImageNet-64 style image datasets read from user paths (nothing is ever downloaded).

`data.path` may be any of:
- the CIFAR-10 python release: `cifar-10-python.tar.gz` (read in place with tarfile) or its extracted
  `cifar-10-batches-py/` folder (or its parent); data_batch_1..5 train, test_batch is held out;
- an image folder: PNG/JPEG files found recursively; labels from EDM's `dataset.json` at the root
  when present, else from first-level class subfolders (`<class>/.../x.png`, classes sorted by name);
- an EDM dataset_tool zip (`*.zip` of PNGs, labels from its `dataset.json`);
- an `.npz` with uint8 images under `x` (or `arr_0`), NHWC or NCHW, and optional labels `y` (or `arr_1`).

Held-out set: `data.heldout_path` (folder/zip/.npz, all of it) when set; else the CIFAR pickles' test_batch;
else `data.heldout` images split off the training source by the fixed permutation of config.fixed_split
(the presets use 0: EDM/ECT train on all 50k CIFAR-10 images and measure FID against training statistics).

Pixels map to float32 by img / 127.5 - 1. Images must already have the dataset's resolution (no silent
resizing) and are converted to RGB. Everything is held in memory: ImageNet-64's 1.28M training images
are 15.7 GB as uint8 while decoding and 63 GB as the float32 `Dataset.x` (twice that with xflip), so
use `data.max_images` for anything short of a big-memory node.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from harness.data.config import DataConfig, DataError, Dataset, check_counts, fixed_split, make_dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"
PICKLE_KINDS = ("cifar-tar", "cifar-dir")
# What a truncated, corrupt or foreign file raises while being read.
_READ_ERRORS = (OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError, tarfile.TarError, zipfile.BadZipFile)


@dataclass(frozen=True)
class ImageSpec:
    resolution: int  # images are resolution x resolution RGB
    num_classes: int  # label count when class-conditional
    get_it: str  # what to download and how to point at it, for error messages


SPECS: dict[str, ImageSpec] = {
    "cifar10": ImageSpec(
        32,
        10,
        "download the 'CIFAR-10 python version' cifar-10-python.tar.gz from the official CIFAR page "
        "(Krizhevsky, https://www.cs.toronto.edu/~kriz/cifar.html) or build a zip with EDM's dataset_tool.py, "
        "then set data.path=/path/to/cifar-10-python.tar.gz (or the extracted cifar-10-batches-py/, an image folder, "
        "the zip or an .npz)",
    ),
    "imagenet64": ImageSpec(
        64,
        1000,
        "download ImageNet-1k (ILSVRC2012 train) from image-net.org and convert it with EDM's dataset_tool.py "
        "--resolution=64x64 into a zip, or provide a folder of 64x64 PNG/JPEG images in class subfolders or an .npz "
        "with x uint8 [N, 64, 64, 3] and y, then set data.path=/path/to/that",
    ),
}


@dataclass
class _Source:
    """Images addressable by index; `take` returns uint8 NHWC (channels_last) or NCHW arrays."""

    where: str  # path shown in errors
    count: int
    labels: np.ndarray | None
    take: Callable[[np.ndarray], np.ndarray]
    channels_last: bool


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches, which hold only numpy arrays, lists and bytes: any other global is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),  # numpy integer labels in home-made batches
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module.replace("numpy.core.", "numpy._core."), name)


def _fail(cfg_name: str, problem: str) -> DataError:
    return DataError(f"{cfg_name}: {problem}; {SPECS[cfg_name].get_it}")


def _kind(path: Path) -> str | None:
    """The source format at `path` from its name and layout (cheap), or None when unrecognised."""
    if path.is_dir():
        if (path / CIFAR_TEST_BATCH).is_file() or (path / "cifar-10-batches-py").is_dir():
            return "cifar-dir"
        return "folder"
    suffix = path.name.lower()
    if suffix.endswith(".npz"):
        return "npz"
    if suffix.endswith(".zip"):
        return "zip"
    if suffix.endswith((".tar.gz", ".tgz", ".tar")) or (path.is_file() and tarfile.is_tarfile(path)):
        return "cifar-tar"
    return None


def _check_path(cfg_name: str, field: str, value: str, allow_pickles: bool) -> str:
    """Existence and format of one path (cheap: no decoding); returns its kind."""
    if not value:
        raise _fail(cfg_name, f"data.{field} is not set")
    path = Path(value).expanduser()
    if not path.exists():
        raise _fail(cfg_name, f"data.{field}={value} does not exist")
    try:
        kind = _kind(path)
    except OSError as err:
        raise _fail(cfg_name, f"data.{field}={value} is unreadable ({err})") from None
    if kind is None or (kind in PICKLE_KINDS and not allow_pickles):
        allowed = "a .tar.gz, a folder, a .zip or an .npz" if allow_pickles else "a folder, a .zip or an .npz"
        raise _fail(cfg_name, f"data.{field}={value} is not a recognised format (expected {allowed})")
    try:
        if kind == "cifar-tar" and not tarfile.is_tarfile(path):
            raise DataError("not a tar archive")
        if kind in ("zip", "npz") and not zipfile.is_zipfile(path):
            raise DataError(f"not a valid {kind} archive")
        if kind == "cifar-dir":
            root = path if (path / CIFAR_TEST_BATCH).is_file() else path / "cifar-10-batches-py"
            missing = [n for n in (*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH) if not (root / n).is_file()]
            if missing:
                raise DataError(f"missing {', '.join(missing)}")
        if kind == "folder" and next(_walk_images(path), None) is None:
            raise DataError(f"no {'/'.join(IMAGE_SUFFIXES)} images inside")
    except (DataError, OSError) as err:
        raise _fail(cfg_name, f"data.{field}={value} is unreadable ({err})") from None
    return kind


def check_images(cfg: DataConfig) -> None:
    """Validate name, counts and paths up front so a run fails before any work."""
    if cfg.name not in SPECS:
        raise DataError(f"unknown image dataset '{cfg.name}'; valid names: {', '.join(sorted(SPECS))}")
    check_counts(cfg)
    _check_path(cfg.name, "path", cfg.path, allow_pickles=True)
    if cfg.heldout_path:
        _check_path(cfg.name, "heldout_path", cfg.heldout_path, allow_pickles=False)


# --- readers ---------------------------------------------------------------------------------------------


def _walk_images(root: Path):
    """Image files under root, depth-first with sorted names, as posix paths relative to root."""
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("."):
                yield (Path(folder) / name).relative_to(root).as_posix()


def _edm_labels(raw: bytes, names: list[str], where: str) -> np.ndarray | None:
    """Labels from EDM's dataset.json ({"labels": [[fname, label], ...]} or {"labels": null})."""
    table = json.loads(raw).get("labels")
    if table is None:
        return None
    by_name = {str(fname).replace("\\", "/"): label for fname, label in table}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise DataError(f"dataset.json in {where} has no label for {missing[0]} ({len(missing)} images unlabelled)")
    return np.array([by_name[n] for n in names], dtype=np.int64)


def _decoder(read: Callable[[str], bytes], names: list[str], res: int, where: str):
    """take(idx): decode the selected images into one uint8 NHWC array, checking each one's size."""

    def take(idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), res, res, 3), dtype=np.uint8)
        for row, i in enumerate(idx):
            try:
                with PIL.Image.open(io.BytesIO(read(names[i]))) as img:
                    if img.size != (res, res):
                        raise DataError(
                            f"image {names[i]} in {where} is {img.size[0]}x{img.size[1]}, not {res}x{res} "
                            f"(resize first, e.g. with EDM's dataset_tool.py --resolution={res}x{res})"
                        )
                    out[row] = np.asarray(img.convert("RGB"))
            except (OSError, PIL.UnidentifiedImageError) as err:
                raise DataError(f"cannot decode image {names[i]} in {where}: {err}") from None
        return out

    return take


def _folder_source(root: Path, res: int) -> _Source:
    names = list(_walk_images(root))
    if (root / "dataset.json").is_file():  # EDM layout: its subfolders are shards, not classes
        labels = _edm_labels((root / "dataset.json").read_bytes(), names, str(root))
    elif names and all("/" in n for n in names):
        classes = sorted({n.split("/", 1)[0] for n in names})
        index = {c: i for i, c in enumerate(classes)}
        labels = np.array([index[n.split("/", 1)[0]] for n in names], dtype=np.int64)
    else:
        labels = None
    take = _decoder(lambda n: (root / n).read_bytes(), names, res, str(root))
    return _Source(str(root), len(names), labels, take, channels_last=True)


def _zip_source(path: Path, res: int) -> _Source:
    with zipfile.ZipFile(path) as zf:
        members = set(zf.namelist())
        names = sorted(
            n for n in members if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith("__MACOSX/")
        )
        labels = _edm_labels(zf.read("dataset.json"), names, str(path)) if "dataset.json" in members else None

    def read_all(idx: np.ndarray) -> np.ndarray:
        with zipfile.ZipFile(path) as zf:
            return _decoder(zf.read, names, res, str(path))(idx)

    return _Source(str(path), len(names), labels, read_all, channels_last=True)


def _array_source(images: np.ndarray, labels: np.ndarray | None, res: int, where: str) -> _Source:
    """Wrap a uint8 NHWC or NCHW array, rejecting any other dtype, layout or resolution."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"{where} holds {images.dtype} {list(images.shape)}, not uint8 [N, H, W, 3] or [N, 3, H, W]")
    channels_last = images.shape[-1] == 3 and images.shape[1] != 3
    height, width = images.shape[1:3] if channels_last else images.shape[2:4]
    if not channels_last and images.shape[1] != 3:
        raise DataError(f"{where} holds images {list(images.shape)} with no 3-channel axis")
    if (height, width) != (res, res):
        raise DataError(f"{where} holds {height}x{width} images, not {res}x{res}")
    if labels is not None and labels.shape != (len(images),):
        raise DataError(f"{where} has labels of shape {list(labels.shape)} for {len(images)} images")
    # A full, sorted selection is the array itself: no second copy of a large dataset.
    take = lambda idx: images if len(idx) == len(images) else images[idx]  # noqa: E731
    return _Source(where, len(images), labels, take, channels_last)


def _npz_source(path: Path, res: int) -> _Source:
    with np.load(path, allow_pickle=False) as arrays:
        key = next((k for k in ("x", "arr_0") if k in arrays.files), None)
        if key is None:
            raise DataError(f"{path} has arrays {arrays.files}, none named x or arr_0")
        label_key = "y" if key == "x" else "arr_1"
        labels = arrays[label_key].astype(np.int64) if label_key in arrays.files else None
        return _array_source(arrays[key], labels, res, str(path))


def _cifar_sources(path: Path, res: int) -> tuple[_Source, _Source]:
    """(training, test_batch) from the CIFAR-10 python tarball or its extracted folder."""
    wanted = (*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH)
    batches: dict[str, dict] = {}
    if path.is_dir():
        root = path if (path / CIFAR_TEST_BATCH).is_file() else path / "cifar-10-batches-py"
        for name in wanted:
            with open(root / name, "rb") as f:
                batches[name] = _ArrayUnpickler(f, encoding="bytes").load()
    else:
        with tarfile.open(path, "r|*") as tar:  # one streaming pass: seeking back in a .gz re-inflates it
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted:
                    batches[base] = _ArrayUnpickler(tar.extractfile(member), encoding="bytes").load()
    missing = [n for n in wanted if n not in batches]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}")

    def source(names: tuple[str, ...], where: str) -> _Source:
        data = np.concatenate([np.asarray(batches[n][b"data"]) for n in names])
        labels = np.concatenate([np.asarray(batches[n][b"labels"], dtype=np.int64) for n in names])
        if data.ndim != 2 or data.shape[1] != 3 * res * res:
            side = int(round((data.shape[-1] / 3) ** 0.5))
            raise DataError(f"{where} holds {side}x{side} images, not {res}x{res}")
        # Each row is the R, G and B planes in turn, each 32x32 row-major: a plain CHW reshape.
        return _array_source(data.reshape(-1, 3, res, res), labels, res, where)

    return source(CIFAR_TRAIN_BATCHES, f"{path} (data_batch_1..5)"), source((CIFAR_TEST_BATCH,), f"{path} (test_batch)")


def _open(path_str: str, res: int) -> _Source:
    path = Path(path_str).expanduser()
    kind = _kind(path)
    source = {"folder": _folder_source, "zip": _zip_source, "npz": _npz_source}[kind](path, res)
    if source.count == 0:
        raise DataError(f"{path} holds no images")
    return source


# --- assembly --------------------------------------------------------------------------------------------


def to_float(images: np.ndarray, channels_last: bool, chunk: int = 4096) -> torch.Tensor:
    """uint8 images -> float32 NCHW in [-1, 1] by img / 127.5 - 1, a chunk at a time to bound peak memory."""
    n = images.shape[0]
    shape = (n, images.shape[3], images.shape[1], images.shape[2]) if channels_last else images.shape
    out = torch.empty(shape, dtype=torch.float32)
    for start in range(0, n, chunk):
        block = torch.from_numpy(np.ascontiguousarray(images[start : start + chunk]))
        block = block.permute(0, 3, 1, 2) if channels_last else block
        out[start : start + chunk] = block.float().div_(127.5).sub_(1.0)
    return out


def _pick(source: _Source, idx: np.ndarray) -> tuple[torch.Tensor, np.ndarray | None]:
    labels = None if source.labels is None else source.labels[idx]
    return to_float(source.take(idx), source.channels_last), labels


def load_images(cfg: DataConfig) -> Dataset:
    """Read cfg.path (and cfg.heldout_path) into memory; see the module docstring for formats and splits."""
    check_images(cfg)
    spec = SPECS[cfg.name]
    try:
        if _kind(Path(cfg.path).expanduser()) in PICKLE_KINDS:
            train, held = _cifar_sources(Path(cfg.path).expanduser(), spec.resolution)
            train_idx = fixed_split(train.count, 0, cfg.max_images)[0]
            held_idx = np.arange(held.count)
        else:
            train = held = _open(cfg.path, spec.resolution)
            train_idx, held_idx = fixed_split(train.count, 0 if cfg.heldout_path else cfg.heldout, cfg.max_images)
        if cfg.heldout_path:
            held = _open(cfg.heldout_path, spec.resolution)
            held_idx = np.arange(held.count)
        x, y = _pick(train, train_idx)
        heldout_x, heldout_y = _pick(held, held_idx)
    except DataError as err:
        raise DataError(f"{cfg.name}: {err}") from None
    except _READ_ERRORS as err:
        paths = f"data.path={cfg.path}" + (f" or data.heldout_path={cfg.heldout_path}" if cfg.heldout_path else "")
        raise _fail(cfg.name, f"cannot read {paths} ({type(err).__name__}: {err})") from None
    return make_dataset(cfg, x, y, heldout_x, heldout_y, spec.num_classes)
