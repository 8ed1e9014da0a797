"""Tests of harness/data: bundled datasets, every image-file format on tiny fakes, and the errors."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from sklearn.datasets import load_digits as sk_load_digits

from harness.data import DATASETS, DataConfig, DataError, check_data_config, digits_split, load_dataset

TOYS = ["swissroll", "gaussians8", "moons", "checkerboard"]


def expected(u8: np.ndarray) -> torch.Tensor:
    """The reference scaling k / 127.5 - 1 of uint8 values, in float32."""
    return torch.from_numpy(u8.astype(np.float32)) / 127.5 - 1


# --- digits ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sk_digits():
    return sk_load_digits()


def test_digits_shapes_range_and_split():
    data = load_dataset(DataConfig(name="digits"))
    assert data.x.shape == (1500, 1, 8, 8) and data.heldout_x.shape == (297, 1, 8, 8)
    assert data.shape == (1, 8, 8) and data.x.dtype == torch.float32
    assert data.x.min().item() == -1.0 and data.x.max().item() == 1.0
    assert data.heldout_x.min().item() == -1.0 and data.heldout_x.max().item() == 1.0
    train, held = digits_split(297)
    assert len(train) == 1500 and len(held) == 297
    assert not set(train.tolist()) & set(held.tolist())
    assert sorted(train.tolist() + held.tolist()) == list(range(1797))


def test_digits_scaling_matches_sklearn(sk_digits):
    data = load_dataset(DataConfig(name="digits"))
    train, held = digits_split(297)
    ref = torch.from_numpy(sk_digits.images).float()
    assert torch.equal(data.x[:, 0], ref[train] / 8 - 1)
    assert torch.equal(data.heldout_x[:, 0], ref[held] / 8 - 1)
    row, i, j = np.argwhere(sk_digits.images[train] == 16)[0]
    assert data.x[row, 0, i, j].item() == 1.0
    row, i, j = np.argwhere(sk_digits.images[train] == 8)[0]
    assert data.x[row, 0, i, j].item() == 0.0
    row, i, j = np.argwhere(sk_digits.images[train] == 0)[0]
    assert data.x[row, 0, i, j].item() == -1.0


def test_digits_deterministic_and_fast():
    start = time.perf_counter()
    a = load_dataset(DataConfig(name="digits"))
    assert time.perf_counter() - start < 1.0
    torch.manual_seed(123)  # the global RNG must not matter
    b = load_dataset(DataConfig(name="digits"))
    assert torch.equal(a.x, b.x) and torch.equal(a.heldout_x, b.heldout_x)


def test_digits_labels_only_when_conditional(sk_digits):
    plain = load_dataset(DataConfig(name="digits"))
    assert plain.y is None and plain.heldout_y is None and plain.num_classes == 0
    cond = load_dataset(DataConfig(name="digits", class_conditional=True))
    train, held = digits_split(297)
    assert cond.num_classes == 10 and cond.y.dtype == torch.int64
    assert torch.equal(cond.y, torch.from_numpy(sk_digits.target[train]).long())
    assert torch.equal(cond.heldout_y, torch.from_numpy(sk_digits.target[held]).long())


def test_digits_xflip_and_max_images():
    data = load_dataset(DataConfig(name="digits", xflip=True, max_images=100, class_conditional=True))
    assert data.x.shape == (200, 1, 8, 8) and data.y.shape == (200,)
    assert torch.equal(data.x[100:], data.x[:100].flip(-1)) and torch.equal(data.y[100:], data.y[:100])
    assert data.heldout_x.shape == (297, 1, 8, 8)


def test_structured_config_and_presets(tmp_path):
    from omegaconf import OmegaConf

    node = OmegaConf.structured(DataConfig)
    assert node.name == "digits" and node.heldout == 297
    assert load_dataset(node).x.shape == (1500, 1, 8, 8)
    assert set(DATASETS) == {"digits", "cifar10", "imagenet64", *TOYS}
    for name, preset in DATASETS.items():
        assert preset.name == name and OmegaConf.structured(preset).name == name


# --- 2-D toys --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TOYS)
def test_toy_shapes_determinism_and_scale(name):
    cfg = replace(DATASETS[name], num_points=4000, heldout=1000, class_conditional=True)
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert a.x.shape == (4000, 2) and a.heldout_x.shape == (1000, 2) and a.shape == (2,)
    assert a.x.dtype == torch.float32 and a.y is None and a.num_classes == 0
    assert torch.equal(a.x, b.x) and torch.equal(a.heldout_x, b.heldout_x)
    assert not torch.isin(a.heldout_x[:, 0], a.x[:, 0]).any()  # independent draws, no shared points
    assert a.x.abs().max() < 1.3
    assert ((a.x.std(0) > 0.25) & (a.x.std(0) < 0.65)).all()


def test_gaussians8_has_eight_clusters():
    x = load_dataset(replace(DATASETS["gaussians8"], num_points=8000)).x.double()
    angle = torch.atan2(x[:, 1], x[:, 0])
    sector = torch.round(angle / (torch.pi / 4)).remainder(8).long()
    off = angle - sector * (torch.pi / 4)
    off = torch.remainder(off + torch.pi, 2 * torch.pi) - torch.pi
    assert off.abs().max() < 0.45  # every point lies near one of the 8 centre directions
    share = torch.bincount(sector, minlength=8).double() / len(x)
    assert ((share > 0.1) & (share < 0.15)).all()
    assert abs(x.norm(dim=1).mean().item() - 0.7) < 0.02


def test_checkerboard_fills_dark_squares_only():
    x = load_dataset(replace(DATASETS["checkerboard"], num_points=5000)).x
    assert x.min() >= -1 and x.max() <= 1
    cell = torch.floor((x + 1) * 2).long().clamp(max=3)
    assert ((cell[:, 0] + cell[:, 1]) % 2 == 0).all()
    assert len(torch.unique(cell[:, 0] * 4 + cell[:, 1])) == 8


def test_toy_rejects_xflip():
    with pytest.raises(DataError, match="xflip"):
        check_data_config(replace(DATASETS["moons"], xflip=True))


# --- CIFAR-10 fakes --------------------------------------------------------------------------------------


def fake_images(n: int, seed: int, size: int = 32) -> np.ndarray:
    """n known uint8 images [n, H, W, 3]; image 0 has one pure-red pixel at (2, 5) on black."""
    images = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    images[0] = 0
    images[0, 2, 5] = (255, 0, 0)
    return images


def pickle_batch(images: np.ndarray, labels: list[int]) -> bytes:
    rows = np.zeros((len(images), 3072), dtype=np.uint8)
    for c in range(3):  # CIFAR rows: the R plane, then G, then B, each 32x32 row-major
        for h in range(32):
            rows[:, c * 1024 + h * 32 : c * 1024 + h * 32 + 32] = images[:, h, :, c]
    batch = {b"batch_label": b"fake", b"labels": labels, b"data": rows, b"filenames": [b"f"] * len(images)}
    # The real files were pickled under numpy 1.x, which names the array rebuilder numpy.core.multiarray.
    return pickle.dumps(batch, protocol=2).replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


@pytest.fixture
def cifar_pickles():
    """{batch name: (images NHWC, labels)}: 4 images per batch."""
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {n: (fake_images(4, seed=k), [(k + i) % 10 for i in range(4)]) for k, n in enumerate(names)}


def write_cifar_tar(path: Path, batches) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, (images, labels) in batches.items():
            raw = pickle_batch(images, labels)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


def write_cifar_dir(root: Path, batches) -> None:
    root.mkdir(parents=True)
    for name, (images, labels) in batches.items():
        (root / name).write_bytes(pickle_batch(images, labels))


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def check_pickle_data(data, batches) -> None:
    train = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_y = sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    test, test_y = batches["test_batch"]
    assert data.x.shape == (20, 3, 32, 32) and data.heldout_x.shape == (4, 3, 32, 32)
    assert torch.equal(data.x, expected(train).permute(0, 3, 1, 2))
    assert torch.equal(data.heldout_x, expected(test).permute(0, 3, 1, 2))
    assert data.x[0, :, 2, 5].tolist() == [1.0, -1.0, -1.0]  # red is channel 0
    assert data.x[0].sum().item() == -3 * 1024 + 2  # the rest of image 0 is black
    assert data.y.tolist() == train_y and data.heldout_y.tolist() == test_y and data.num_classes == 10


@pytest.mark.parametrize("layout", ["tarball", "folder", "parent_folder"])
def test_cifar_pickles(tmp_path, cifar_pickles, layout):
    if layout == "tarball":
        path = tmp_path / "cifar-10-python.tar.gz"
        write_cifar_tar(path, cifar_pickles)
    else:
        write_cifar_dir(tmp_path / "cifar-10-batches-py", cifar_pickles)
        path = tmp_path / "cifar-10-batches-py" if layout == "folder" else tmp_path
    cfg = DataConfig(name="cifar10", path=str(path), heldout=0, class_conditional=True)
    check_data_config(cfg)
    check_pickle_data(load_dataset(cfg), cifar_pickles)
    plain = load_dataset(replace(cfg, class_conditional=False))
    assert plain.y is None and plain.heldout_y is None and plain.num_classes == 0


def test_cifar_image_folder_with_class_subfolders(tmp_path):
    images = fake_images(6, seed=7)
    classes = ["cat", "airplane", "truck"]  # sorted: airplane 0, cat 1, truck 2
    for i, image in enumerate(images):
        folder = tmp_path / "train" / classes[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(image).save(folder / f"{i:03d}.png")
    cfg = DataConfig(name="cifar10", path=str(tmp_path / "train"), heldout=0, class_conditional=True)
    data = load_dataset(cfg)
    order = sorted(range(6), key=lambda i: f"{classes[i % 3]}/{i:03d}.png")  # files are read in sorted order
    assert torch.equal(data.x, expected(images[order]).permute(0, 3, 1, 2))
    assert data.y.tolist() == [sorted(classes).index(classes[i % 3]) for i in order]
    assert data.heldout_x.shape == (0, 3, 32, 32) and data.heldout_y.shape == (0,)
    # heldout > 0 splits images off deterministically; together the two sets are the folder.
    split = load_dataset(replace(cfg, heldout=2))
    assert split.x.shape[0] == 4 and split.heldout_x.shape[0] == 2
    assert torch.equal(split.x, load_dataset(replace(cfg, heldout=2)).x)
    both = torch.cat([split.x, split.heldout_x])
    assert sorted(map(tuple, both.flatten(1).tolist())) == sorted(map(tuple, data.x.flatten(1).tolist()))


def write_edm_zip(path: Path, images: np.ndarray, labels: list[int] | None) -> list[str]:
    names = [f"{i // 3:05d}/img{i:08d}.png" for i in range(len(images))]
    with zipfile.ZipFile(path, "w") as zf:
        for name, image in zip(names, images):
            zf.writestr(name, png_bytes(image))
        table = None if labels is None else [[n, lab] for n, lab in zip(names, labels)]
        zf.writestr("dataset.json", json.dumps({"labels": table}))
    return names


def test_cifar_edm_zip_and_heldout_path(tmp_path):
    images, labels = fake_images(5, seed=3), [9, 0, 4, 4, 1]
    write_edm_zip(tmp_path / "cifar10-32x32.zip", images, labels)
    held_images = fake_images(3, seed=4)
    write_edm_zip(tmp_path / "test.zip", held_images, [2, 2, 8])
    cfg = DataConfig(name="cifar10", path=str(tmp_path / "cifar10-32x32.zip"), heldout=0, class_conditional=True)
    data = load_dataset(cfg)
    assert torch.equal(data.x, expected(images).permute(0, 3, 1, 2))
    assert data.x[0, :, 2, 5].tolist() == [1.0, -1.0, -1.0]
    assert data.y.tolist() == labels and data.num_classes == 10
    held = load_dataset(replace(cfg, heldout_path=str(tmp_path / "test.zip"), heldout=3))
    assert held.x.shape[0] == 5  # heldout_path wins: no images are split off the training source
    assert torch.equal(held.heldout_x, expected(held_images).permute(0, 3, 1, 2))
    assert held.heldout_y.tolist() == [2, 2, 8]


def test_unlabelled_zip_rejects_class_conditional(tmp_path):
    write_edm_zip(tmp_path / "u.zip", fake_images(2, seed=0), None)
    cfg = DataConfig(name="cifar10", path=str(tmp_path / "u.zip"), heldout=0)
    assert load_dataset(cfg).y is None
    with pytest.raises(DataError, match="no labels"):
        load_dataset(replace(cfg, class_conditional=True))


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_imagenet64_npz(tmp_path, layout):
    images = fake_images(3, seed=5, size=64)
    stored = images if layout == "nhwc" else images.transpose(0, 3, 1, 2)
    np.savez(tmp_path / "in64.npz", x=stored, y=np.array([999, 0, 5]))
    cfg = DataConfig(name="imagenet64", path=str(tmp_path / "in64.npz"), heldout=1, class_conditional=True)
    data = load_dataset(cfg)
    assert data.shape == (3, 64, 64) and data.num_classes == 1000
    everything = torch.cat([data.x, data.heldout_x]).flatten(1)
    ref = expected(images).permute(0, 3, 1, 2).flatten(1)
    assert sorted(map(tuple, everything.tolist())) == sorted(map(tuple, ref.tolist()))
    assert sorted(data.y.tolist() + data.heldout_y.tolist()) == [0, 5, 999]


# --- errors ----------------------------------------------------------------------------------------------


def one_line_error(fn, *args) -> str:
    with pytest.raises(DataError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message and message
    return message


@pytest.mark.parametrize("path", ["", "/nonexistent/cifar-10-python.tar.gz"])
@pytest.mark.parametrize("fn", [check_data_config, load_dataset])
def test_missing_path_says_what_to_download(fn, path):
    message = one_line_error(fn, DataConfig(name="cifar10", path=path))
    assert "cifar10" in message and "data.path" in message and "cifar-10-python.tar.gz" in message
    assert "data.path" in one_line_error(fn, DataConfig(name="imagenet64", path=path))


def test_unknown_name_lists_valid_names():
    message = one_line_error(load_dataset, DataConfig(name="mnist"))
    assert "mnist" in message
    for name in DATASETS:
        assert name in message
    one_line_error(check_data_config, DataConfig(name="mnist"))


def test_wrong_image_size_is_rejected(tmp_path, cifar_pickles):
    (tmp_path / "small").mkdir()
    PIL.Image.fromarray(fake_images(1, seed=0, size=28)[0]).save(tmp_path / "small" / "a.png")
    message = one_line_error(load_dataset, DataConfig(name="cifar10", path=str(tmp_path / "small"), heldout=0))
    assert "28x28" in message and "32x32" in message
    np.savez(tmp_path / "c.npz", x=fake_images(2, seed=0))  # 32x32 images given to imagenet64
    message = one_line_error(load_dataset, DataConfig(name="imagenet64", path=str(tmp_path / "c.npz"), heldout=0))
    assert "32x32" in message and "64x64" in message
    write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", cifar_pickles)
    message = one_line_error(load_dataset, DataConfig(name="imagenet64", path=str(tmp_path / "cifar-10-python.tar.gz")))
    assert "64x64" in message


def test_unreadable_files_are_clear_errors(tmp_path, cifar_pickles):
    (tmp_path / "broken.zip").write_bytes(b"not a zip at all")
    message = one_line_error(check_data_config, DataConfig(name="cifar10", path=str(tmp_path / "broken.zip")))
    assert "broken.zip" in message and "data.path" in message
    (tmp_path / "notes.txt").write_text("hello")
    assert "format" in one_line_error(check_data_config, DataConfig(name="cifar10", path=str(tmp_path / "notes.txt")))
    (tmp_path / "empty").mkdir()
    assert "no " in one_line_error(check_data_config, DataConfig(name="cifar10", path=str(tmp_path / "empty")))
    # A pickle that names any global beyond numpy arrays is refused, never executed.
    write_cifar_dir(tmp_path / "evil", cifar_pickles)
    (tmp_path / "evil" / "test_batch").write_bytes(pickle.dumps({b"data": print}, protocol=2))
    message = one_line_error(load_dataset, DataConfig(name="cifar10", path=str(tmp_path / "evil")))
    assert "refusing to unpickle" in message
    one_line_error(check_data_config, DataConfig(name="digits", heldout=-1))
