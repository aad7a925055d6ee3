"""``lipverify train``: the ICLR 2022 recipe for LipConvNets (SOC + HH + LLN + CR), resumable.

The recipe (Singla, Singla & Feizi 2022, Sec. 7; their reference code): SGD with momentum 0.9,
lr 0.1, weight decay 5e-4 on every parameter except the activation angles (none), the lr
multiplied by 0.1 after 50% and 75% of the steps, batch 128, 200 epochs, and the certificate
regularization (CR) loss ``CE - gamma * mean_batch relu(cert_y)`` (Sec. 6), where ``cert_y`` is
the certified radius of the true label (negative when misclassified), by the model's own
formula (``"ortho"`` or ``"lln"``, see :mod:`lipverify.certificates`). Evaluation picks
``best.pt`` by certified accuracy at 36/255 on the evaluation split, as the reference does.

Guarantees:

* Reproducible: the same config and seed give the same weights and metrics on the same
  machine. Initialization is seeded; the sample order and augmentation of epoch ``e`` come from
  a generator seeded by ``(seed, e)``, so they do not depend on how the run was interrupted.
* Resumable: after every epoch ``last.pt`` holds the weights, optimizer, schedule position,
  RNG states and SOC power-iteration counters. ``--resume`` continues from it and reaches the
  same final weights and metrics as an uninterrupted run (wall-clock ``seconds`` aside). A
  ``kill -9`` loses at most the current epoch; every file is written atomically, so none is ever
  partial.
* Evaluation and certification run in float32, eval mode (``--amp`` only affects training).
* Under ``torchrun`` (DistributedDataParallel: gloo on CPU, nccl on GPU) each global batch is
  split across ranks and the loss is scaled so the averaged gradient equals the gradient of the
  single-process loss on the same global batch. Only rank 0 writes files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lipverify.atomic import atomic_write, atomic_write_text
from lipverify.cli import finite_float, nonneg_float, nonneg_int, positive_int
from lipverify.errors import InputError

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "resolve_config",
    "parameter_groups",
    "lr_at",
    "lr_milestone_steps",
    "label_certificates",
    "training_loss",
    "add_arguments",
    "run",
    "DATASET_DEFAULTS",
    "RESULT_FILES",
]

RESULT_FILES = ("last.pt", "best.pt", "metrics.jsonl", "curves.png")
CERT_RADII = {"cert_acc_36": 36 / 255, "cert_acc_72": 72 / 255, "cert_acc_108": 108 / 255}
ANGLE_NAMES = ("theta", "theta0", "theta1", "theta2")

# Global defaults: the reference recipe.
GLOBAL_DEFAULTS: dict[str, Any] = dict(
    epochs=200, batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4,
    lr_milestones=(0.5, 0.75), lr_factor=0.1, conv="soc", activation="hh1", num_layers=5,
    init_channels=32, last_layer="lln", gamma=0.0, seed=0, val_split=0.0, augment="auto",
    shuffle=True, amp=False,
)
# Per-dataset overrides. digits: small and fast on 2 CPU cores (see the README for the
# measured time and accuracy); synthetic: a few seconds, for tests.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "cifar10": {},
    "cifar100": {},
    "imagefolder": {},
    "digits": dict(init_channels=8, epochs=40, batch_size=64),
    "synthetic": dict(init_channels=4, epochs=2, batch_size=32),
}
# Keys that do not change the result; everything else must match on --resume.
_RUNTIME_KEYS = ("data_dir", "out", "cache_dir", "device", "workers", "resume", "overwrite",
                 "download", "progress")


@dataclass
class TrainConfig:
    """Everything a run depends on. ``None`` means "the per-dataset default"."""

    dataset: str = "synthetic"
    data_dir: str | None = None
    out: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    lr_milestones: tuple[float, ...] | None = None
    lr_factor: float | None = None
    conv: str | None = None
    activation: str | None = None
    num_layers: int | None = None
    init_channels: int | None = None
    last_layer: str | None = None
    gamma: float | None = None
    seed: int | None = None
    val_split: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augment: str | None = None
    shuffle: bool | None = None
    amp: bool | None = None
    limit_train: int | None = None
    limit_test: int | None = None
    cache_dir: str | None = None
    device: str | None = None
    workers: int = 0
    resume: bool = False
    overwrite: bool = False
    download: bool = True
    progress: bool | None = None


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank; only rank 0 wrote the files)."""

    out_dir: Path
    last_path: Path
    best_path: Path
    metrics: list[dict]
    best_epoch: int
    best_cert_acc_36: float
    config: dict
    model: nn.Module = field(repr=False)


# -- config ------------------------------------------------------------------------------------
def resolve_config(config: TrainConfig | dict) -> TrainConfig:
    """Fill every ``None`` with the dataset's default, then the recipe's; validate."""
    cfg = _as_config(config)
    from lipverify.data import DATASETS

    if cfg.dataset not in DATASETS:
        raise InputError(f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(DATASETS)}")
    values = asdict(cfg)
    for key, default in {**GLOBAL_DEFAULTS, **DATASET_DEFAULTS[cfg.dataset]}.items():
        if values[key] is None:
            values[key] = default
    values["lr_milestones"] = tuple(float(m) for m in values["lr_milestones"])
    for k in ("mean", "std"):
        if values[k] is not None:
            values[k] = tuple(float(v) for v in values[k])
    out = TrainConfig(**values)
    _validate(out)
    return out


def _as_config(config: TrainConfig | dict) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return TrainConfig(**asdict(config))
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(config) - names)
    if unknown:
        raise InputError(f"unknown training option(s): {', '.join(unknown)}")
    return TrainConfig(**config)


def _validate(c: TrainConfig) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise InputError(msg)

    need(c.epochs >= 1, f"--epochs must be >= 1, got {c.epochs}")
    need(c.batch_size >= 1, f"--batch-size must be >= 1, got {c.batch_size}")
    for name in ("lr", "momentum", "weight_decay", "gamma", "lr_factor"):
        v = getattr(c, name)
        need(math.isfinite(v) and v >= 0, f"--{name.replace('_', '-')} must be finite and >= 0")
    need(all(0 < m < 1 for m in c.lr_milestones), "--lr-milestones must lie in (0, 1)")
    need(0 <= c.val_split < 1, f"--val-split must lie in [0, 1), got {c.val_split}")
    need(c.augment in ("auto", "none", "crop", "crop-flip"),
         "--augment must be auto, none, crop or crop-flip")
    need(c.conv in _conv_names(), f"--conv must be one of {', '.join(_conv_names())}")
    need(c.activation in ("maxmin", "hh1", "hh2"), "--activation must be maxmin, hh1 or hh2")
    need(c.last_layer in ("lln", "ortho"), "--last-layer must be lln or ortho")
    need(c.num_layers in range(5, 45, 5), "--num-layers must be one of 5, 10, ..., 40")
    need(c.init_channels >= 1, "--init-channels must be >= 1")
    need(c.init_channels <= 4096, "--init-channels must be <= 4096 (the network would not fit)")
    need(c.seed is None or 0 <= c.seed < 2**32, "--seed must be an integer in [0, 2**32)")
    for name in ("limit_train", "limit_test"):
        v = getattr(c, name)
        need(v is None or v >= 1, f"--{name.replace('_', '-')} must be >= 1")
    for name in ("mean", "std"):
        v = getattr(c, name)
        need(v is None or all(math.isfinite(t) for t in v), f"--{name} must be finite")
    need(c.std is None or min(c.std) > 0, "--std must be positive")
    need(not (c.resume and c.out is None), "--resume needs --out RUN_DIR (the run to continue)")


def _conv_names() -> list[str]:
    from lipverify.layers import CONV_LAYERS

    return sorted(CONV_LAYERS)


def _result_keys() -> list[str]:
    return [f.name for f in fields(TrainConfig) if f.name not in _RUNTIME_KEYS]


def config_command(cfg: TrainConfig) -> str:
    """A ``lipverify train`` command line with every result-affecting option explicit."""
    parts = ["lipverify", "train", "--dataset", cfg.dataset]
    for key in _result_keys():
        v = getattr(cfg, key)
        if key == "dataset" or v is None:
            continue
        flag = "--" + key.replace("_", "-")
        if key == "shuffle":
            if not v:
                parts.append("--no-shuffle")
        elif key == "amp":
            if v:
                parts.append("--amp")
        elif isinstance(v, (tuple, list)):
            parts += [flag, *(repr(float(t)) for t in v)]
        else:
            parts += [flag, str(v)]
    if cfg.data_dir is not None:
        parts += ["--data-dir", str(cfg.data_dir)]
    return shlex.join(parts)


# -- recipe pieces -----------------------------------------------------------------------------
def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two SGD groups: weight decay on everything but the activation angles (no decay)."""
    from lipverify.layers import HouseholderOrder1, HouseholderOrder2

    angle_ids: set[int] = set()
    for m in model.modules():
        if isinstance(m, (HouseholderOrder1, HouseholderOrder2)):
            angle_ids |= {id(p) for p in m.parameters()}
    decay, angles = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_angle = id(p) in angle_ids or name.rsplit(".", 1)[-1] in ANGLE_NAMES
        (angles if is_angle else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": angles, "weight_decay": 0.0, "name": "angles"},
    ]
    return [g for g in groups if g["params"]]


def lr_milestone_steps(total_steps: int, milestones: tuple[float, ...]) -> list[int]:
    """Steps after which the lr drops: ``floor(m * total)``, as the reference's MultiStepLR."""
    return [int(math.floor(m * total_steps + 1e-9)) for m in milestones]


def lr_at(step: int, base_lr: float, total_steps: int,
          milestones: tuple[float, ...] = (0.5, 0.75), factor: float = 0.1) -> float:
    """Learning rate of optimizer step ``step`` (0-based): ``base * factor^#{m <= step}``."""
    drops = sum(step >= s for s in lr_milestone_steps(total_steps, milestones))
    return base_lr * factor**drops


def label_certificates(
    logits: torch.Tensor, target: torch.Tensor, lipschitz: float, kind: str,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Certified radius of the true label (negative if misclassified), differentiable.

    Same values as :func:`lipverify.certificates.radii_from_logits` with ``target`` (tested),
    but with finite gradients: the LLN pair distances are computed with a safe denominator
    on the target column and on identical rows, where the library version divides 0 by 0.
    """
    fy = logits.gather(1, target[:, None])
    other = torch.ones_like(logits, dtype=torch.bool).scatter_(1, target[:, None], False)
    if kind == "ortho":
        best = logits.masked_fill(~other, float("-inf")).max(1).values
        return (fy[:, 0] - best) / (math.sqrt(2.0) * lipschitz)
    if kind != "lln" or weight is None:
        raise ValueError("LLN certificates need kind='lln' and the normalized weight")
    w = weight.to(logits.dtype)
    diff = w[:, None, :] - w[None, :, :]  # (K, K, F)
    sq = (diff * diff).sum(-1)
    same = sq == 0
    dist = torch.sqrt(torch.where(same, torch.ones_like(sq), sq))[target]  # (N, K)
    same = same[target]
    margins = fy - logits
    ratio = margins / (dist * lipschitz)
    inf = torch.full_like(ratio, float("inf"))
    ratio = torch.where(same & (margins > 0), inf, ratio)
    ratio = torch.where(same & (margins <= 0), torch.zeros_like(ratio), ratio)
    return torch.where(other, ratio, inf).min(1).values


def training_loss(
    model: nn.Module, logits: torch.Tensor, y: torch.Tensor, gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample CR loss ``CE - gamma * relu(cert_y)`` and the per-sample certificates.

    ``model`` is the unwrapped LipConvNet (its claim and last layer), in train mode.
    """
    logits = logits.float()
    ce = F.cross_entropy(logits, y, reduction="none")
    if gamma == 0:
        return ce, torch.zeros_like(ce)
    kind = model.certificate_kind
    weight = model.last_layer.normalized_weight() if kind == "lln" else None
    cert = label_certificates(logits, y, float(model.lipschitz_claim), kind, weight)
    return ce - gamma * F.relu(cert), cert


# -- distributed -------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_name: str | None) -> tuple[_Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device_name is None:
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device_name)
    except RuntimeError:
        raise InputError(f"--device {device_name!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no GPU is available; use --device cpu")
    if world <= 1:
        return _Dist(), device
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    here = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        here = True
    return _Dist(rank, world, local, here), device


def _broadcast(obj: Any, d: _Dist) -> Any:
    if d.world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier(d: _Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def _all_sum(values: list[float], d: _Dist, device: torch.device) -> list[float]:
    if d.world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# -- RNG and state -----------------------------------------------------------------------------
def _seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    py = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": py[0], "keys": list(py[1]), "gauss_next": py[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype("uint32"), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["keys"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _soc_counters(model: nn.Module) -> dict[str, int]:
    return {n: int(m.total_iters) for n, m in model.named_modules() if hasattr(m, "total_iters")}


def _set_soc_counters(model: nn.Module, counters: dict[str, int]) -> None:
    for n, m in model.named_modules():
        if n in counters:
            m.total_iters = int(counters[n])


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


# -- output directory --------------------------------------------------------------------------
def _new_run_dir(dataset: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{dataset}-{stamp}"
    for i in range(1000):
        path = base if i == 0 else base.with_name(f"{base.name}-{i}")
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise InputError(f"could not create a new run directory next to {base}")


def _prepare_out(cfg: TrainConfig, d: _Dist) -> Path:
    if cfg.out is None:
        out = _new_run_dir(cfg.dataset) if d.main else None
        return Path(_broadcast(str(out) if out else None, d))
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    held = [f for f in RESULT_FILES if (out / f).exists()]
    if held and not (cfg.resume or cfg.overwrite):
        raise InputError(
            f"--out {out} already holds results ({', '.join(held)}); pass --resume to continue "
            "that run or --overwrite to replace it"
        )
    _barrier(d)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite and not cfg.resume:
            for f in held:
                (out / f).unlink()
        for f in RESULT_FILES:  # temporary files of writes cut short by a kill
            for tmp in out.glob(f".{f}.*.tmp"):
                tmp.unlink(missing_ok=True)
    _barrier(d)
    return out


# -- data --------------------------------------------------------------------------------------
@dataclass
class _Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    evals: dict[str, tuple[torch.Tensor, torch.Tensor]]
    info: Any
    augment: str


def _load_data(cfg: TrainConfig) -> _Data:
    from lipverify.data import holdout_split, load_raw

    kw = dict(data_dir=cfg.data_dir, cache_dir=cfg.cache_dir, download=cfg.download,
              workers=cfg.workers)
    x, y, info = load_raw(cfg.dataset, "train", **kw)
    xt, yt, tinfo = load_raw(cfg.dataset, "test", **kw)
    if tuple(xt.shape[1:]) != tuple(x.shape[1:]):
        raise InputError(f"train images are {tuple(x.shape[1:])}, test {tuple(xt.shape[1:])}")
    if cfg.limit_train is not None:
        x, y = x[: cfg.limit_train], y[: cfg.limit_train]
    if cfg.limit_test is not None:
        xt, yt = xt[: cfg.limit_test], yt[: cfg.limit_test]
    evals = {"test": (xt, yt)}
    if cfg.val_split > 0:
        keep, held = holdout_split(x.shape[0], cfg.val_split, cfg.seed)
        evals["val"] = (x[held], y[held])
        x, y = x[keep], y[keep]
    augment = info.augment if cfg.augment == "auto" else cfg.augment
    return _Data(x.contiguous(), y.contiguous(), evals, info, augment)


# -- evaluation --------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
    batch_size: int = 500,
) -> dict[str, float]:
    """Clean and certified accuracy (36, 72, 108 /255) in float32, eval mode."""
    from lipverify.certificates import Certificates, certified_accuracy, certify
    from lipverify.data import to_float

    was = model.training
    model.eval()
    preds, radii, logits = [], [], []
    try:
        for i in range(0, x.shape[0], batch_size):
            c = certify(model, to_float(x[i : i + batch_size]).to(device))
            preds.append(c.pred.cpu())
            radii.append(c.radius.cpu())
            logits.append(c.logits.cpu())
    finally:
        model.train(was)
    cert = Certificates(torch.cat(preds), torch.cat(radii), torch.cat(logits))
    acc = certified_accuracy(model, None, y, CERT_RADII.values(), certificates=cert)
    out = {"acc": acc["clean_accuracy"]}
    for key, r in CERT_RADII.items():
        out[key] = acc["certified_accuracy"]["%.6f" % r]
    return out


# -- plotting ----------------------------------------------------------------------------------
def plot_curves(metrics: list[dict], path: str | os.PathLike) -> Path:
    """Loss, accuracy and certified accuracy against the epoch, as a PNG (atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [m["epoch"] for m in metrics]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(ep, [m["train_loss"] for m in metrics], label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax2.plot(ep, [m["train_acc"] for m in metrics], label="train acc")
    ax2.plot(ep, [m["test_acc"] for m in metrics], label="test acc")
    for key in CERT_RADII:
        ax2.plot(ep, [m[key] for m in metrics], label=f"certified {key[9:]}/255")
    if all("val_acc" in m for m in metrics):
        ax2.plot(ep, [m["val_acc"] for m in metrics], "--", label="val acc")
        ax2.plot(ep, [m["val_cert_acc_36"] for m in metrics], "--", label="val certified 36/255")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy")
    ax2.set_ylim(0, 1)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)


# -- the loop ----------------------------------------------------------------------------------
def _build_model(cfg: TrainConfig, info: Any) -> nn.Module:
    from lipverify.models import LipConvNet

    mean = cfg.mean if cfg.mean is not None else info.mean
    std = cfg.std if cfg.std is not None else info.std
    channels = info.channels
    if len(mean) == 1:
        mean = tuple(mean) * channels
    if len(std) == 1:
        std = tuple(std) * channels
    if len(mean) != channels or len(std) != channels:
        raise InputError(f"--mean and --std need 1 or {channels} values")
    if info.image_size % 32:
        raise InputError(f"images are {info.image_size}px; LipConvNet needs a multiple of 32")
    return LipConvNet(
        conv=cfg.conv, activation=cfg.activation, num_layers=cfg.num_layers,
        init_channels=cfg.init_channels, num_classes=info.num_classes,
        last_layer=cfg.last_layer, input_size=info.image_size, in_channels=channels,
        mean=mean, std=std,
    )


def _log(d: _Dist, msg: str) -> None:
    if d.main:
        print(msg, flush=True)


def train(config: TrainConfig | dict, argv: list[str] | None = None) -> TrainResult:
    """Train a LipConvNet by the recipe; write ``last.pt``, ``best.pt``, ``metrics.jsonl``
    and ``curves.png`` into the run directory; return a :class:`TrainResult`.

    ``config`` is a :class:`TrainConfig` or a dict of its fields (``None`` = default).
    ``argv`` is the command line to record in the checkpoints (the CLI passes ``sys.argv``).
    """
    from lipverify.checkpoints import read_checkpoint, save_checkpoint

    given = _as_config(config)
    d, device = _init_distributed(given.device)
    try:
        result = _train(given, d, device, argv, read_checkpoint, save_checkpoint)
        _barrier(d)  # every rank is past its last collective before the group goes away
        return result
    finally:
        if d.initialized_here:
            import gc

            import torch.distributed as dist

            gc.collect()  # free the DDP wrapper (a reference cycle) while the group exists
            dist.destroy_process_group()


def _train(given, d, device, argv, read_checkpoint, save_checkpoint) -> TrainResult:
    # Resolve and validate before touching the disk.
    resolve_config(given)
    out = _prepare_out(resolve_config(given), d)
    last_path, best_path = out / "last.pt", out / "best.pt"
    payload = None
    if given.resume:
        if last_path.exists():
            payload = read_checkpoint(last_path)
            given = _merge_resumed(given, payload["metadata"].get("config", {}))
        else:
            _log(d, f"lipverify train: no {last_path} yet; starting the run from the beginning")
    cfg = resolve_config(given)
    cfg.out = str(out)
    _seed_everything(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False

    data = _load_data(cfg)
    model = _build_model(cfg, data.info).to(device)
    optimizer = torch.optim.SGD(
        parameter_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum
    )
    use_amp = bool(cfg.amp and device.type == "cuda")
    if cfg.amp and not use_amp:
        _log(d, "lipverify train: --amp needs a GPU; training in float32")
    scaler = torch.amp.GradScaler("cuda") if use_amp else None

    n = data.x_train.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    step, done, metrics = 0, 0, []
    best = {"epoch": 0, "cert_acc_36": -1.0}
    meta_base = {
        "argv": list(argv) if argv is not None else None,
        "command": _command_text(argv, cfg),
        "resumed_by": [],
    }
    if payload is not None:
        from lipverify.checkpoints import load_state_strict

        extra = payload["extra"]
        load_state_strict(model, payload["state_dict"], source=str(last_path))
        model.to(device)
        optimizer.load_state_dict(extra["optimizer"])
        step, done = int(extra["step"]), int(extra["epoch"])
        metrics = list(extra["metrics"])
        best = dict(extra["best"])
        _set_soc_counters(model, extra["soc_total_iters"])
        _set_rng_state(extra["rng"])
        if scaler is not None and "scaler" in extra:
            scaler.load_state_dict(extra["scaler"])
        old = payload["metadata"]
        meta_base = {
            "argv": old.get("argv"), "command": old.get("command"),
            "resumed_by": list(old.get("resumed_by", [])) + [list(argv) if argv else None],
        }

    raw_model = model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    _log(d, "lipverify train: effective config")
    _log(d, json.dumps({**asdict(cfg), "steps_per_epoch": steps_per_epoch,
                        "total_steps": total_steps, "device": str(device),
                        "world_size": d.world, "augment_resolved": data.augment,
                        "train_size": n, "num_classes": data.info.num_classes,
                        "mean": list(raw_model.config["mean"]),
                        "std": list(raw_model.config["std"])}, indent=1))
    if d.main and metrics:  # after a resume: the file holds exactly the finished epochs
        _write_metrics(out, metrics)

    from lipverify.data import augment_batch, to_float

    progress = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    select = "val" if "val" in data.evals else "test"
    for epoch in range(done + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        gen = _epoch_generator(cfg.seed, epoch)
        order = torch.randperm(n, generator=gen) if cfg.shuffle else torch.arange(n)
        model.train()
        loss_sum, correct, count = 0.0, 0.0, 0.0
        bar = _progress_bar(steps_per_epoch, epoch, cfg.epochs, progress and d.main)
        last_note = t0
        for b in range(steps_per_epoch):
            lr = lr_at(step, cfg.lr, total_steps, cfg.lr_milestones, cfg.lr_factor)
            for g in optimizer.param_groups:
                g["lr"] = lr
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            xb = augment_batch(data.x_train[idx], data.augment, gen)
            yb = data.y_train[idx]
            n_global = xb.shape[0]
            local = torch.tensor_split(torch.arange(n_global), d.world)[d.rank]
            share = 1.0
            if local.numel() == 0:  # a last batch smaller than the world: a zero-weight sample
                local, share = torch.arange(1), 0.0
            xb, yb = to_float(xb[local]).to(device), yb[local].to(device)
            with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=use_amp):
                logits = model(xb)
            per_sample, _ = training_loss(raw_model, logits, yb, cfg.gamma)
            per_sample = per_sample * share
            loss = per_sample.sum() * (d.world / n_global)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            step += 1
            loss_sum += float(per_sample.detach().sum())
            correct += share * float((logits.detach().argmax(1) == yb).sum())
            count += share * float(yb.shape[0])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / max(count, 1):.3f}",
                                acc=f"{correct / max(count, 1):.3f}", lr=f"{lr:.3g}")
            elif d.main and time.perf_counter() - last_note > 60:  # no terminal: a line a minute
                last_note = time.perf_counter()
                _log(d, f"epoch {epoch}/{cfg.epochs}  step {b + 1}/{steps_per_epoch}  "
                        f"loss {loss_sum / max(count, 1):.4f}  {last_note - t0:.0f}s")
        if bar is not None:
            bar.close()
        loss_sum, correct, count = _all_sum([loss_sum, correct, count], d, device)

        if d.main:
            row = {"epoch": epoch, "lr": lr, "train_loss": loss_sum / count,
                   "train_acc": correct / count}
            for split, (xe, ye) in data.evals.items():
                ev = evaluate(raw_model, xe, ye, device)
                prefix = "" if split == "test" else "val_"
                row["test_acc" if split == "test" else "val_acc"] = ev["acc"]
                for key in CERT_RADII:
                    row[prefix + key] = ev[key]
            row["seconds"] = time.perf_counter() - t0
            metrics.append(row)
            score = row["val_cert_acc_36" if select == "val" else "cert_acc_36"]
            meta = _metadata(cfg, data, metrics, epoch, meta_base, select)
            if score >= best["cert_acc_36"]:  # ties go to the later epoch, as the reference
                best = {"epoch": epoch, "cert_acc_36": score}
                save_checkpoint(raw_model, best_path, **meta, kind="best", best=best)
            extra = {
                "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                "metrics": metrics, "best": best, "rng": _rng_state(),
                "soc_total_iters": _soc_counters(raw_model),
            }
            if scaler is not None:
                extra["scaler"] = scaler.state_dict()
            save_checkpoint(raw_model, last_path, extra=extra, **meta, kind="last", best=best)
            _write_metrics(out, metrics)
            _log(d, _summary(row, cfg.epochs))
        _barrier(d)

    if d.main:
        if not metrics:
            raise InputError(f"{out}: nothing to plot; the run has no finished epoch")
        plot_curves(metrics, out / "curves.png")
        _log(d, f"lipverify train: done; best epoch {best['epoch']} "
                f"({select} certified accuracy at 36/255 = {best['cert_acc_36']:.4f}); "
                f"files in {out}")
    best = _broadcast(best, d)
    metrics = _broadcast(metrics, d)
    del model  # the DDP wrapper, if any: it must go before the process group does
    raw_model.eval()
    return TrainResult(out, last_path, best_path, metrics, int(best["epoch"]),
                       float(best["cert_acc_36"]), asdict(cfg), raw_model)


def _merge_resumed(given: TrainConfig, saved: dict) -> TrainConfig:
    """Take the saved run's config; refuse explicitly given options that contradict it."""
    values = asdict(given)
    conflicts = []
    for key in _result_keys():
        if key not in saved:
            continue
        old = tuple(saved[key]) if isinstance(saved[key], list) else saved[key]
        new = values[key]
        if isinstance(new, list):
            new = tuple(new)
        if new is not None and new != old and not (
            isinstance(new, tuple) and tuple(map(float, new)) == tuple(map(float, old or ()))
        ):
            conflicts.append(f"--{key.replace('_', '-')} {new!r} (saved: {old!r})")
        values[key] = old
    if conflicts:
        raise InputError(
            "--resume continues the saved config; drop or fix " + "; ".join(conflicts)
        )
    return TrainConfig(**values)


def _command_text(argv: list[str] | None, cfg: TrainConfig) -> str:
    if argv and "train" in argv:
        return "lipverify " + shlex.join(argv[argv.index("train"):])
    return config_command(cfg)


def _metadata(cfg, data, metrics, epoch, meta_base, select) -> dict:
    import lipverify

    info = data.info
    return {
        "config": asdict(cfg),
        "metrics": metrics,
        "epoch": epoch,
        "seed": cfg.seed,
        "dataset": {"name": info.name, "classes": info.classes, "num_classes": info.num_classes,
                    "train_size": int(data.x_train.shape[0]), "augment": data.augment,
                    "selection_split": select},
        "argv": meta_base["argv"],
        "command": meta_base["command"],
        "command_equivalent": config_command(cfg),
        "resumed_by": meta_base["resumed_by"],
        "lipverify_version": lipverify.__version__,
        "torch_version": torch.__version__,
    }


def _write_metrics(out: Path, metrics: list[dict]) -> None:
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))


def _summary(row: dict, epochs: int) -> str:
    return (
        f"epoch {row['epoch']}/{epochs}  lr {row['lr']:.3g}  loss {row['train_loss']:.4f}  "
        f"train {row['train_acc']:.4f}  test {row['test_acc']:.4f}  "
        f"cert36 {row['cert_acc_36']:.4f}  cert72 {row['cert_acc_72']:.4f}  "
        f"cert108 {row['cert_acc_108']:.4f}  {row['seconds']:.1f}s"
    )


def _progress_bar(total: int, epoch: int, epochs: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}/{epochs}", leave=False, dynamic_ncols=True)


# -- command line ------------------------------------------------------------------------------




def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lipverify.data import DATASETS

    g = parser.add_argument_group("data")
    g.add_argument("--dataset", required=True, choices=DATASETS)
    g.add_argument("--data-dir", help="dataset folder (imagefolder: D/train/<class>/*, "
                   "D/test/<class>/*; cifar: torchvision files, downloaded there if missing)")
    g.add_argument("--cache-dir", help="decoded-image cache (default ~/.cache/lipverify)")
    g.add_argument("--no-download", dest="download", action="store_false",
                   help="never download CIFAR")
    g.add_argument("--val-split", type=nonneg_float, metavar="F",
                   help="hold out a fraction F of the training data to select best.pt on")
    g.add_argument("--augment", choices=("auto", "none", "crop", "crop-flip"),
                   help="auto: crop+flip for CIFAR-style data, none for digits/synthetic")
    g.add_argument("--no-shuffle", dest="shuffle", action="store_const", const=False,
                   default=None, help="keep the sample order fixed")
    g.add_argument("--limit-train", type=positive_int, metavar="N",
                   help="use the first N training images (tests, smoke runs)")
    g.add_argument("--limit-test", type=positive_int, metavar="N",
                   help="evaluate on the first N test images")
    g.add_argument("--workers", type=nonneg_int, default=0,
                   help="processes for decoding image folders (0: in-process)")
    m = parser.add_argument_group("model")
    m.add_argument("--conv", help="convolution family (default soc)")
    m.add_argument("--activation", choices=("maxmin", "hh1", "hh2"), help="default hh1")
    m.add_argument("--num-layers", type=positive_int, help="5, 10, ..., 40 (default 5)")
    m.add_argument("--init-channels", type=positive_int,
                   help="default 32 (digits 8, synthetic 4)")
    m.add_argument("--last-layer", choices=("lln", "ortho"), help="default lln")
    m.add_argument("--mean", type=finite_float, nargs="+",
                   help="normalization mean (1 or C values)")
    m.add_argument("--std", type=finite_float, nargs="+", help="normalization std (1 or C values)")
    o = parser.add_argument_group("optimization (defaults: the ICLR 2022 recipe)")
    o.add_argument("--epochs", type=positive_int, help="default 200 (digits 40, synthetic 2)")
    o.add_argument("--batch-size", type=positive_int,
                   help="global batch, split across ranks; default 128 (digits 64)")
    o.add_argument("--lr", type=nonneg_float, help="default 0.1")
    o.add_argument("--momentum", type=nonneg_float, help="default 0.9")
    o.add_argument("--weight-decay", type=nonneg_float,
                   help="default 5e-4; never applied to activation angles")
    o.add_argument("--lr-milestones", type=nonneg_float, nargs="+", metavar="FRAC",
                   help="fractions of the steps after which the lr drops (default 0.5 0.75)")
    o.add_argument("--lr-factor", type=nonneg_float, help="lr multiplier at each milestone (0.1)")
    o.add_argument("--gamma", type=nonneg_float, help="certificate regularization weight (0)")
    o.add_argument("--seed", type=nonneg_int, help="default 0")
    o.add_argument("--amp", action="store_const", const=True, default=None,
                   help="mixed precision training on GPU (evaluation stays float32)")
    r = parser.add_argument_group("run")
    r.add_argument("--out", metavar="RUN_DIR", help="default: a new runs/<dataset>-<timestamp>")
    r.add_argument("--resume", action="store_true", help="continue RUN_DIR/last.pt")
    r.add_argument("--overwrite", action="store_true", help="replace results in --out")
    r.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    for k in ("mean", "std", "lr_milestones"):
        if values.get(k) is not None:
            values[k] = tuple(values[k])
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    train(config_from_args(args), argv=list(sys.argv))
    return 0
