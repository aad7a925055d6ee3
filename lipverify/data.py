"""Datasets for training and certification: CIFAR-10/100, image folders, digits, synthetic.

Guarantees:

* Every loader returns pixels in [0, 1], NCHW, with int64 labels in ``[0, num_classes)``; the
  caller's model normalizes inside (``DatasetInfo.mean``/``std`` are the defaults for it).
* Data directories are only read. Decoded image folders are cached under ``cache_dir``
  (default ``$LIPVERIFY_CACHE_DIR`` or ``~/.cache/lipverify``), never inside the data dir; the
  cache key hashes the resolved data path, the split and the file list (names, sizes,
  modification times), so a changed folder is decoded again. Cache files are written
  atomically and read with ``weights_only=True``; an unreadable cache entry is rebuilt.
* The digits split and the synthetic data are fixed (seeded), independent of the training
  seed.

Two entry points:

* :func:`load_dataset` ``(name, split, ...) -> (x, y, info)`` with ``x`` float32 in [0, 1].
* :func:`load_raw` returns the stored form, ``uint8`` (0..255) for decoded images and float32
  for digits/synthetic, to keep memory low (CIFAR train: 150 MB instead of 600 MB);
  :func:`to_float` converts a batch.

Augmentation (:func:`augment_batch`): random crop with zero padding 4 plus a horizontal flip for
the CIFAR-style datasets (``cifar10``, ``cifar100``, ``imagefolder``), as in the reference
recipe. ``digits`` and ``synthetic`` get none: digits are not flip-invariant (a mirrored 2, 3,
4, 5, 7 or 9 is not the same digit) and a 4-pixel shift of the upsampled 8x8 image moves the
digit by half of its stroke-free border.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lipverify.atomic import atomic_write_bytes
from lipverify.errors import InputError

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "load_dataset",
    "load_raw",
    "to_float",
    "augment_batch",
    "default_cache_dir",
    "holdout_split",
    "IMAGE_EXTENSIONS",
]

DATASETS = ("cifar10", "cifar100", "imagefolder", "digits", "synthetic")
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".webp", ".tif", ".tiff")
CACHE_VERSION = 1

# Normalization defaults. CIFAR values are the reference code's (the compat checkpoints of
# both CIFAR-10 and CIFAR-100 use them); digits values are the statistics of the upsampled
# digits; image folders default to the CIFAR values (override with --mean/--std).
_CIFAR_MEAN, _CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2507, 0.2507, 0.2507)
NORMALIZATION = {
    "cifar10": (_CIFAR_MEAN, _CIFAR_STD),
    "cifar100": (_CIFAR_MEAN, _CIFAR_STD),
    "imagefolder": (_CIFAR_MEAN, _CIFAR_STD),
    "digits": ((0.3053,) * 3, (0.3236,) * 3),
    "synthetic": ((0.5,) * 3, (0.25,) * 3),
}
AUGMENTATION = {
    "cifar10": "crop-flip",
    "cifar100": "crop-flip",
    "imagefolder": "crop-flip",
    "digits": "none",
    "synthetic": "none",
}
DIGITS_SPLIT_SEED = 20220
SYNTHETIC_SIZES = {"train": 384, "test": 128}
SYNTHETIC_CLASSES = 4


@dataclass
class DatasetInfo:
    """What a split holds: classes, normalization defaults and augmentation policy."""

    name: str
    split: str
    num_classes: int
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str
    source: str = ""
    size: int = 0
    image_size: int = 32
    channels: int = 3
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def default_cache_dir() -> Path:
    """``$LIPVERIFY_CACHE_DIR``, else ``$XDG_CACHE_HOME/lipverify``, else ``~/.cache/lipverify``."""
    env = os.environ.get("LIPVERIFY_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lipverify"


def to_float(x: torch.Tensor) -> torch.Tensor:
    """Stored pixels (uint8 0..255 or float in [0, 1]) -> float32 in [0, 1]."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


def load_dataset(
    name: str,
    split: str = "test",
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
    workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, DatasetInfo]:
    """Load ``split`` ("train" or "test") of dataset ``name`` as float32 pixels in [0, 1].

    Returns ``(x, y, info)``: ``x`` of shape (N, 3, H, W), ``y`` int64 of shape (N,). See
    :func:`load_raw` for the arguments.
    """
    x, y, info = load_raw(name, split, data_dir, cache_dir, download, workers)
    return to_float(x), y, info


def load_raw(
    name: str,
    split: str = "test",
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
    workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, DatasetInfo]:
    """Like :func:`load_dataset`, but pixels stay in their stored dtype (uint8 or float32).

    * ``cifar10``/``cifar100``: torchvision's files under ``data_dir`` (default
      ``<cache_dir>/datasets``), downloaded there when missing and ``download`` is true.
    * ``imagefolder``: ``data_dir/<split>/<class>/<image>``; class indices follow the sorted
      class folders of ``data_dir/train``. Decoded once, then cached under ``cache_dir``.
    * ``digits``: scikit-learn's 8x8 digits / 16, bilinearly upsampled to 32x32, 3 channels;
      a fixed 80/20 split (1438 train, 359 test).
    * ``synthetic``: 4 classes of noisy smooth patterns (384 train, 128 test), for tests.

    ``workers`` > 1 decodes image folders in that many processes.
    """
    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose 'train' or 'test'")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if name == "digits":
        x, y, classes, source = _digits(split)
    elif name == "synthetic":
        x, y, classes, source = _synthetic(split)
    elif name in ("cifar10", "cifar100"):
        root = Path(data_dir).expanduser() if data_dir is not None else cache / "datasets"
        x, y, classes, source = _cifar(name, split, root, download)
    else:
        if data_dir is None:
            raise InputError(
                "imagefolder needs --data-dir D holding D/train/<class>/* and D/test/<class>/*"
            )
        x, y, classes, source = _imagefolder(Path(data_dir).expanduser(), split, cache, workers)
    if x.shape[0] == 0:
        raise InputError(f"{name} {split}: the split is empty")
    mean, std = NORMALIZATION[name]
    info = DatasetInfo(
        name=name, split=split, num_classes=len(classes), classes=list(classes),
        mean=tuple(mean), std=tuple(std), augment=AUGMENTATION[name], source=source,
        size=int(x.shape[0]), image_size=int(x.shape[-1]), channels=int(x.shape[1]),
    )
    return x, y, info


# -- digits and synthetic ----------------------------------------------------------------------
def _digits(split: str) -> tuple[torch.Tensor, torch.Tensor, list[str], str]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = x.clamp_(0.0, 1.0).repeat(1, 3, 1, 1).contiguous()
    y = torch.tensor(d.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(DIGITS_SPLIT_SEED)
    perm = torch.randperm(x.shape[0], generator=g)
    n_test = x.shape[0] // 5
    idx = perm[n_test:] if split == "train" else perm[:n_test]
    idx = idx.sort().values
    return x[idx].contiguous(), y[idx].contiguous(), [str(i) for i in range(10)], "sklearn"


def _synthetic(split: str) -> tuple[torch.Tensor, torch.Tensor, list[str], str]:
    """Class prototypes are fixed smooth patterns; samples add bounded noise. Learnable in a
    few steps by a tiny LipConvNet, and deterministic."""
    g = torch.Generator().manual_seed(12345)
    k = SYNTHETIC_CLASSES
    protos = torch.rand(k, 3, 4, 4, generator=g)
    protos = F.interpolate(protos, size=(32, 32), mode="bilinear", align_corners=False)
    n = SYNTHETIC_SIZES[split]
    g = torch.Generator().manual_seed(1 if split == "train" else 2)
    y = torch.arange(n) % k
    y = y[torch.randperm(n, generator=g)]
    noise = 0.15 * torch.randn(n, 3, 32, 32, generator=g)
    x = (0.25 + 0.5 * protos[y] + noise).clamp(0.0, 1.0)
    return x.contiguous(), y.long(), [f"class{i}" for i in range(k)], "synthetic"


# -- CIFAR through torchvision -----------------------------------------------------------------
def _cifar(
    name: str, split: str, root: Path, download: bool
) -> tuple[torch.Tensor, torch.Tensor, list[str], str]:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    train = split == "train"
    hint = (
        f"{name} is not under {root}; pass --data-dir D where D holds "
        f"{cls.base_folder}/ (torchvision layout), or run once online to download it"
    )
    try:
        ds = cls(root=str(root), train=train, download=False)
    except RuntimeError:
        if not download:
            raise InputError(hint) from None
        try:
            root.mkdir(parents=True, exist_ok=True)
            ds = cls(root=str(root), train=train, download=True)
        except Exception as e:  # noqa: BLE001 - offline, DNS, HTTP, disk: all mean "no data"
            raise InputError(f"{hint} (download failed: {type(e).__name__})") from None
    # torchvision verified the MD5 of each batch file before unpickling it.
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
    y = torch.tensor(ds.targets, dtype=torch.int64)
    return x, y, list(ds.classes), str(root)


# -- image folders -----------------------------------------------------------------------------
def _list_folder(data_dir: Path, split: str) -> tuple[list[str], list[tuple[str, int]]]:
    if not data_dir.is_dir():
        raise InputError(f"--data-dir {data_dir}: no such directory")
    train_dir, split_dir = data_dir / "train", data_dir / split
    if not train_dir.is_dir() or not split_dir.is_dir():
        raise InputError(
            f"--data-dir {data_dir} must hold train/<class>/* and test/<class>/* "
            f"(missing {split_dir if train_dir.is_dir() else train_dir})"
        )
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise InputError(f"{train_dir}: no class folders")
    index = {c: i for i, c in enumerate(classes)}
    files: list[tuple[str, int]] = []
    for c in sorted(p.name for p in split_dir.iterdir() if p.is_dir()):
        if c not in index:
            raise InputError(f"{split_dir / c}: class {c!r} has no folder under {train_dir}")
        for f in sorted((split_dir / c).iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append((f"{c}/{f.name}", index[c]))
    if not files:
        raise InputError(f"{split_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return classes, files


def _folder_key(data_dir: Path, split: str, files: list[tuple[str, int]]) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}\0{data_dir.resolve()}\0{split}\0".encode())
    base = data_dir / split
    for rel, label in files:
        st = (base / rel).stat()
        h.update(f"{rel}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def _decode_bytes(path: str) -> tuple[int, int, bytes]:
    """(height, width, RGB bytes) of one image file; picklable for worker processes."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            return h, w, im.convert("RGB").tobytes()
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad image file
        raise InputError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


def _decode(path: str) -> torch.Tensor:
    return _to_tensor(_decode_bytes(path))


def _to_tensor(decoded: tuple[int, int, bytes]) -> torch.Tensor:
    h, w, raw = decoded
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1)


def _decode_all(paths: list[str], workers: int) -> list[torch.Tensor]:
    if workers <= 1 or len(paths) <= 256:
        return [_decode(p) for p in paths]
    import multiprocessing as mp

    # Workers only run PIL; fork avoids re-importing torch in each of them.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(workers) as pool:
        return [_to_tensor(d) for d in pool.imap(_decode_bytes, paths, chunksize=512)]


def _imagefolder(
    data_dir: Path, split: str, cache: Path, workers: int
) -> tuple[torch.Tensor, torch.Tensor, list[str], str]:
    classes, files = _list_folder(data_dir, split)
    if _inside(cache, data_dir):
        raise InputError(
            f"--cache-dir {cache} lies inside the data dir {data_dir}; choose a cache outside it"
        )
    key = _folder_key(data_dir, split, files)
    path = cache / f"imagefolder-{split}-{key}.pt"
    labels = torch.tensor([lbl for _, lbl in files], dtype=torch.int64)
    cached = _read_cache(path, len(files))
    if cached is not None and torch.equal(cached[1], labels):
        return cached[0], labels, classes, str(data_dir)
    images = _decode_all([str(data_dir / split / rel) for rel, _ in files], workers)
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        raise InputError(
            f"{data_dir / split}: images differ in size ({sorted(shapes)[:3]}...); "
            "resize them to one square size first"
        )
    x = torch.stack(images)
    if x.shape[-1] != x.shape[-2]:
        raise InputError(f"{data_dir / split}: images must be square, got {tuple(x.shape[2:])}")
    _write_cache(path, x, labels, classes)
    return x, labels, classes, str(data_dir)


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def _read_cache(path: Path, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not path.is_file():
        return None
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        x, y = d["x"], d["y"]
        if (
            d.get("version") != CACHE_VERSION
            or not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4
            or x.shape[0] != n or not isinstance(y, torch.Tensor) or y.shape != (n,)
        ):
            return None
        return x, y.long()
    except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt, never trusted
        return None


def _write_cache(path: Path, x: torch.Tensor, y: torch.Tensor, classes: list[str]) -> None:
    buf = io.BytesIO()
    torch.save({"version": CACHE_VERSION, "x": x, "y": y, "classes": list(classes)}, buf)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:  # a read-only cache only costs speed
        import warnings

        warnings.warn(f"could not write the image cache {path}: {e}", stacklevel=2)


# -- splits and augmentation -------------------------------------------------------------------
def holdout_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of ``range(n)`` into (kept, held out) index tensors, each sorted."""
    if not 0.0 < fraction < 1.0:
        raise InputError(f"--val-split must lie strictly between 0 and 1, got {fraction}")
    n_val = int(round(n * fraction))
    if n_val < 1 or n_val >= n:
        raise InputError(f"--val-split {fraction} leaves no validation or no training images")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def augment_batch(
    x: torch.Tensor, mode: str, generator: torch.Generator, padding: int = 4
) -> torch.Tensor:
    """Random crop (zero padding ``padding``) and, for ``"crop-flip"``, a horizontal flip with
    probability 1/2, per sample. Random numbers come from ``generator`` (CPU), so the result
    does not depend on the device. ``mode="none"`` returns ``x`` unchanged."""
    if mode == "none":
        return x
    if mode not in ("crop", "crop-flip"):
        raise InputError(f"unknown augmentation {mode!r}; choose none, crop or crop-flip")
    n, _, h, w = x.shape
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = (oy[:, None] + torch.arange(h)).to(x.device)  # (n, h)
    cols = (ox[:, None] + torch.arange(w)).to(x.device)  # (n, w)
    if mode == "crop-flip":
        cols = torch.where(flip[:, None].to(x.device), cols.flip(1), cols)
    b = torch.arange(n, device=x.device)[:, None, None, None]
    c = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]
