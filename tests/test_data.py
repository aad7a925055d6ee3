"""Datasets: shapes, ranges, fixed splits, image folders and their cache, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lipverify.data import (
    DATASETS,
    augment_batch,
    holdout_split,
    load_dataset,
    load_raw,
    to_float,
)
from lipverify.errors import InputError


def _check_split(x: torch.Tensor, y: torch.Tensor, n: int, classes: int) -> None:
    assert x.shape == (n, 3, 32, 32)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.shape == (n,)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert int(y.min()) >= 0 and int(y.max()) < classes


@pytest.mark.parametrize("split,n", [("train", 1438), ("test", 359)])
def test_digits_shapes_range_and_fixed_split(split: str, n: int) -> None:
    x, y, info = load_dataset("digits", split)
    _check_split(x, y, n, 10)
    assert info.num_classes == 10 and info.augment == "none" and info.size == n
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    assert float(x.max()) == pytest.approx(1.0)  # /16 scaling keeps full-ink pixels at 1
    x2, y2, _ = load_dataset("digits", split)
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_digits_split_is_a_partition_of_sklearn_digits() -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    xtr, ytr, _ = load_dataset("digits", "train")
    xte, yte, _ = load_dataset("digits", "test")
    assert xtr.shape[0] + xte.shape[0] == len(d.target)
    assert torch.equal(
        torch.bincount(torch.cat([ytr, yte]), minlength=10),
        torch.bincount(torch.tensor(d.target), minlength=10),
    )
    # Each digit image, downsampled back to 8x8 by averaging 4x4 blocks, matches sklearn's
    # image up to the bilinear blur: the nearest sklearn image is a same-label one.
    ref = torch.tensor(d.images, dtype=torch.float32) / 16
    small = torch.nn.functional.avg_pool2d(xte[:, :1], 4)[:, 0]
    nearest = torch.cdist(small.flatten(1), ref.flatten(1)).argmin(1)
    assert (torch.tensor(d.target)[nearest] == yte).float().mean() > 0.97


@pytest.mark.parametrize("split,n", [("train", 384), ("test", 128)])
def test_synthetic_is_deterministic(split: str, n: int) -> None:
    x, y, info = load_dataset("synthetic", split)
    _check_split(x, y, n, info.num_classes)
    x2, y2, _ = load_dataset("synthetic", split)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert len(torch.unique(y)) == info.num_classes


def _make_folder(root, sizes=((2, 3), (2, 2)), image_size=32, rng=None):
    """root/train|test/<class>/*.png|jpg; returns {relpath: uint8 array} of the PNG files."""
    rng = rng or np.random.default_rng(0)
    written = {}
    for split, (per_class_png, per_class_jpg) in zip(("train", "test"), sizes, strict=True):
        for cls in ("cat", "dog", "emu"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class_png):
                arr = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"p{i}.png")
                written[f"{split}/{cls}/p{i}.png"] = arr
            for i in range(per_class_jpg):
                arr = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"j{i}.jpg", quality=95)
    return written


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_imagefolder_decodes_labels_and_caches_outside(tmp_path, monkeypatch) -> None:
    data, cache = tmp_path / "data", tmp_path / "cache"
    written = _make_folder(data)
    before = _tree(data)
    x, y, info = load_raw("imagefolder", "train", data_dir=data, cache_dir=cache)
    assert x.dtype == torch.uint8 and x.shape == (15, 3, 32, 32)
    assert info.classes == ["cat", "dog", "emu"] and info.num_classes == 3
    assert info.augment == "crop-flip"
    # Sorted file order inside each sorted class: j0, j1, j2, p0, p1.
    assert y.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    png = written["train/dog/p1.png"]
    assert torch.equal(x[9], torch.from_numpy(png).permute(2, 0, 1))  # PNG is lossless
    assert _tree(data) == before  # nothing written into the data dir
    cached = list(cache.glob("imagefolder-train-*.pt"))
    assert len(cached) == 1
    # A second load reads the cache and never decodes.
    monkeypatch.setattr("lipverify.data._decode", lambda p: (_ for _ in ()).throw(AssertionError))
    x2, y2, _ = load_raw("imagefolder", "train", data_dir=data, cache_dir=cache)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    xf, _, _ = load_dataset("imagefolder", "train", data_dir=data, cache_dir=cache)
    assert torch.equal(xf, to_float(x)) and xf.dtype == torch.float32
    assert float(xf.max()) <= 1.0


def test_imagefolder_cache_follows_the_file_list(tmp_path) -> None:
    data, cache = tmp_path / "data", tmp_path / "cache"
    _make_folder(data)
    x, _, _ = load_raw("imagefolder", "test", data_dir=data, cache_dir=cache)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(data / "test" / "cat" / "z.png")
    x2, y2, _ = load_raw("imagefolder", "test", data_dir=data, cache_dir=cache)
    assert x2.shape[0] == x.shape[0] + 1 and int(x2[4].max()) == 0 and y2[4] == 0
    assert len(list(cache.glob("imagefolder-test-*.pt"))) == 2
    # A damaged cache entry is rebuilt, not trusted.
    for p in cache.glob("*.pt"):
        p.write_bytes(b"garbage")
    x3, _, _ = load_raw("imagefolder", "test", data_dir=data, cache_dir=cache)
    assert torch.equal(x3, x2)


def test_imagefolder_refuses_cache_inside_data_dir(tmp_path) -> None:
    data = tmp_path / "data"
    _make_folder(data)
    with pytest.raises(InputError, match="inside the data dir"):
        load_raw("imagefolder", "train", data_dir=data, cache_dir=data / "cache")


@pytest.mark.parametrize("layout", ["missing", "no_test", "empty_class", "no_data_dir"])
def test_imagefolder_errors_point_to_data_dir(tmp_path, layout: str) -> None:
    data = tmp_path / "data"
    if layout == "no_test":
        (data / "train" / "a").mkdir(parents=True)
    elif layout == "empty_class":
        (data / "train" / "a").mkdir(parents=True)
        (data / "test" / "a").mkdir(parents=True)
    kwargs = {} if layout == "no_data_dir" else {"data_dir": data}
    with pytest.raises(InputError, match="data-dir|no images"):
        load_dataset("imagefolder", "test", cache_dir=tmp_path / "c", **kwargs)


def test_imagefolder_mixed_sizes_and_bad_files(tmp_path) -> None:
    data = tmp_path / "data"
    _make_folder(data)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(data / "train" / "cat" / "small.png")
    with pytest.raises(InputError, match="differ in size"):
        load_dataset("imagefolder", "train", data_dir=data, cache_dir=tmp_path / "c")
    (data / "test" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot decode"):
        load_dataset("imagefolder", "test", data_dir=data, cache_dir=tmp_path / "c")


def test_cifar_offline_without_data_points_to_data_dir(tmp_path) -> None:
    for name in ("cifar10", "cifar100"):
        with pytest.raises(InputError, match="--data-dir"):
            load_dataset(name, "test", data_dir=tmp_path / "none", download=False)


def test_unknown_dataset_and_split() -> None:
    with pytest.raises(InputError, match="unknown dataset"):
        load_dataset("mnist", "test")
    with pytest.raises(InputError, match="unknown split"):
        load_dataset("digits", "val")
    assert "digits" in DATASETS


@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("channels,size", [(3, 32), (1, 8)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augment_batch_crops_and_flips(n: int, channels: int, size: int, dtype) -> None:
    x = (torch.rand(n, channels, size, size) * 255).to(dtype)
    assert augment_batch(x, "none", torch.Generator()) is x
    for mode in ("crop", "crop-flip"):
        out = augment_batch(x, mode, torch.Generator().manual_seed(3))
        assert out.shape == x.shape and out.dtype == x.dtype
        again = augment_batch(x, mode, torch.Generator().manual_seed(3))
        assert torch.equal(out, again)
        padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
        for i in range(n):
            crops = [padded[i, :, a : a + size, b : b + size]
                     for a in range(9) for b in range(9)]
            if mode == "crop-flip":
                crops += [c.flip(-1) for c in crops]
            assert any(torch.equal(out[i], c) for c in crops)


def test_augment_batch_uses_all_offsets_and_flips() -> None:
    x = torch.arange(32.0).repeat(256, 1, 32, 1)  # column index as the pixel value
    out = augment_batch(x, "crop-flip", torch.Generator().manual_seed(0))
    # Output column 16 reads padded column ox + 16 (value ox + 12), or ox + 15 when flipped
    # (value ox + 11), for shifts ox in 0..8: every value 11..20 must appear.
    centre = out[:, 0, 16, 16]
    assert set(torch.unique(centre).tolist()) == set(range(11, 21))
    with pytest.raises(InputError):
        augment_batch(x, "rotate", torch.Generator())


def test_holdout_split() -> None:
    keep, held = holdout_split(100, 0.2, seed=3)
    assert held.numel() == 20 and keep.numel() == 80
    assert torch.equal(torch.cat([keep, held]).sort().values, torch.arange(100))
    k2, h2 = holdout_split(100, 0.2, seed=3)
    assert torch.equal(keep, k2) and torch.equal(held, h2)
    assert not torch.equal(holdout_split(100, 0.2, seed=4)[1], held)
    for bad in (0.0, 1.0, 0.001):
        with pytest.raises(InputError):
            holdout_split(100, bad, seed=0)
