"""``lipverify certify [CKPT] --dataset NAME``: clean and certified accuracy of a checkpoint.

Accepts lipverify checkpoints and reference-code checkpoints (:func:`lipverify.load_model`,
safe loading only). Certificates use the model's claimed Lipschitz bound and its formula, in
eval mode and float32 (:mod:`lipverify.certificates`): a sample counts as certified at ``r``
when it is classified correctly and its radius is strictly greater than ``r``. The numbers are
exactly those claims; whether the claim holds is the audit's job.

With no CKPT, the built-in default model (``lipverify.default``) is certified on its own test
split when that module is installed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from lipverify.atomic import atomic_write_text
from lipverify.cli import positive_int
from lipverify.distributed import World
from lipverify.errors import InputError, check_device, check_images, check_labels

__all__ = ["add_arguments", "run", "parse_radius", "certify_dataset", "format_table"]

DEFAULT_RADII_TEXT = ("36/255", "72/255", "108/255")


def parse_radius(text: str) -> float:
    """``"36/255"`` or ``"0.14"`` -> float; finite and >= 0, else ``ArgumentTypeError``."""
    s = str(text).strip()
    try:
        if "/" in s:
            num, den = s.split("/", 1)  # a second "/" makes float() fail below
            value = float(num) / float(den)
        else:
            value = float(s)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"radius {text!r} is not a number or fraction") from None
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise argparse.ArgumentTypeError(f"radius {text!r} must be finite and >= 0")
    return value



def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lipverify.data import DATASETS

    parser.add_argument("checkpoint", nargs="?", metavar="CKPT",
                        help="lipverify or reference checkpoint (default: the built-in model)")
    parser.add_argument("--dataset", choices=DATASETS,
                        help="default: the dataset recorded in the checkpoint")
    parser.add_argument("--data-dir", help="dataset folder (see lipverify train --help); "
                        "default: the one recorded in the checkpoint")
    parser.add_argument("--cache-dir", help="decoded-image cache (default ~/.cache/lipverify)")
    parser.add_argument("--split", choices=("test", "train"), default="test")
    parser.add_argument("--radii", nargs="+", type=parse_radius, metavar="R",
                        help="l2 radii in pixel units, e.g. 36/255 0.5 "
                             "(default 36/255 72/255 108/255)")
    parser.add_argument("--num-points", "--n", dest="n", type=positive_int, metavar="N",
                        help="certify the first N images of the split; under torchrun write "
                             "--num-points (torchrun takes --n for its own options)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON (atomic)")
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--execution", choices=("real", "float32"), default="real",
                        help="real (default): radii of the real-valued function of the "
                        "weights; float32: radii that also hold for the model as executed in "
                        "float32 on the CPU (rounding bounded)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda if available; under "
                                         "torchrun each rank uses cuda:LOCAL_RANK)")
    parser.add_argument("--no-download", dest="download", action="store_false",
                        help="never download CIFAR")


def certify_dataset(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, radii: list[float],
    device: torch.device | str = "cpu", batch_size: int = 256, world: World | None = None,
    execution: str = "real",
) -> dict | None:
    """Certify ``model`` on pixels ``x`` (float in [0, 1]) with labels ``y``.

    Returns ``clean_accuracy``, ``certified_accuracy`` (``"%.6f" % r`` -> fraction),
    ``samples`` (``index, label, pred, radius`` per image) and the claim used. Under torchrun
    (``world``), call it on every rank with the same arguments: each certifies whole batches
    (batch ``b`` on rank ``b % world.size``), and rank 0 gets the same table as one process
    would; the other ranks get None. ``execution="float32"``: the radii hold for the model as
    executed in float32 on the CPU (see :func:`lipverify.certify`); each sample also has its
    real-valued ``radius_real`` and the margin error bound ``delta``.
    """
    from lipverify.certificates import Certificates, certified_accuracy, certify, claim_of
    from lipverify.distributed import certify_batches

    cfg = getattr(model, "config", {}) or {}
    check_images(x, channels=cfg.get("in_channels"), size=cfg.get("input_size"))
    y = check_labels(y, x.shape[0], cfg.get("num_classes"))
    lip, kind = claim_of(model)
    model = model.to(device).eval()

    def batch(start: int, stop: int) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            c = certify(model, x[start:stop].to(device), batch_size=batch_size,
                        execution=execution)
        if execution == "real":
            return c.pred, c.radius, c.logits
        return c.pred, c.radius, c.logits, c.plain_radius, c.delta.max(1).values

    parts = certify_batches(batch, x.shape[0], batch_size, world or World())
    if parts is None:
        return None
    cert = Certificates(*(torch.cat([p[i] for p in parts]) for i in range(3)))
    acc = certified_accuracy(model, None, y, radii, certificates=cert)
    acc["samples"] = [
        {"index": i, "label": int(lbl), "pred": int(p), "radius": float(r)}
        for i, (lbl, p, r) in enumerate(zip(y.tolist(), cert.pred.tolist(),
                                            cert.radius.tolist(), strict=True))
    ]
    if execution != "real":
        real, delta = (torch.cat([p[i] for p in parts]) for i in (3, 4))
        for row, r, d in zip(acc["samples"], real.tolist(), delta.tolist(), strict=True):
            row["radius_real"], row["delta"] = float(r), float(d)
    acc["lipschitz"] = lip
    acc["certificate_kind"] = kind
    acc["execution"] = execution
    return acc


def _radius_label(r: float) -> str:
    k = r * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{r:g}"


def format_table(result: dict, radii: list[float]) -> str:
    """The plain-text table the CLI prints."""
    rows = [("clean (r = 0)", result["clean_accuracy"])]
    for r in radii:
        rows.append((f"r = {_radius_label(r)} ({r:.6f})", result["certified_accuracy"]["%.6f" % r]))
    width = max(len(a) for a, _ in rows)
    lines = [f"{'radius':<{width}}  accuracy", f"{'-' * width}  --------"]
    lines += [f"{a:<{width}}  {v:8.4f}" for a, v in rows]
    return "\n".join(lines)


def _load(args: argparse.Namespace) -> tuple[torch.nn.Module, str, tuple | None]:
    """(model, description, default data or None)."""
    if args.checkpoint is not None:
        from lipverify.checkpoints import load_model

        model = load_model(args.checkpoint)
        return model, str(args.checkpoint), None
    try:
        import lipverify.default as default
    except ModuleNotFoundError as e:
        if e.name not in ("lipverify.default",):
            raise
        raise InputError(
            "no checkpoint given and no built-in default model is installed; "
            "pass CKPT (see 'lipverify certify --help')"
        ) from None
    model, data = default.load_default()
    return model, "built-in default model", data


def _json_text(doc: dict) -> str:
    """Pretty JSON with one line per sample."""
    head = {k: v for k, v in doc.items() if k != "samples"}
    text = json.dumps(head, indent=1)[:-2]
    samples = ",\n  ".join(json.dumps(s) for s in doc["samples"])
    return f'{text},\n "samples": [\n  {samples}\n ]\n}}\n'


def run(args: argparse.Namespace) -> int:
    from lipverify import distributed

    if distributed.launched():
        with distributed.process_group(args.device) as (world, device):
            return _run(args, world, device)
    return _run(args, World(), None)


def _points(args: argparse.Namespace) -> tuple[torch.nn.Module, str, str | None, str, Any, Any]:
    """(model, description, dataset, source, x, y) as the options choose them."""
    from lipverify.data import load_dataset

    model, what, default_data = _load(args)
    meta = getattr(model, "metadata", {}) or {}
    dataset = args.dataset
    if dataset is None and default_data is None:
        dataset = (meta.get("dataset") or {}).get("name") if isinstance(meta, dict) else None
        if dataset is None:
            raise InputError("pass --dataset NAME (the checkpoint does not record its dataset)")
    if dataset is None:
        x, y = default_data
        source = "built-in test split"
    else:
        data_dir = args.data_dir
        trained = meta.get("config") if isinstance(meta, dict) else None
        if data_dir is None and isinstance(trained, dict) and trained.get("dataset") == dataset:
            data_dir = trained.get("data_dir")  # where the checkpoint was trained, if recorded
        x, y, info = load_dataset(dataset, args.split, data_dir=data_dir,
                                  cache_dir=args.cache_dir, download=args.download)
        source = f"{dataset} {args.split}"
        classes = (getattr(model, "config", None) or {}).get("num_classes")
        if classes is not None and info.num_classes > classes:
            raise InputError(
                f"{dataset} has {info.num_classes} classes, the model only {classes}"
            )
    if args.n is not None:
        x, y = x[: args.n], y[: args.n]
    return model, what, dataset, source, x, y


def _run(args: argparse.Namespace, world: World, device: torch.device | None) -> int:
    """Certify (on every rank of a torchrun job); rank 0 prints and writes the JSON."""
    from lipverify.distributed import agree

    radii = list(args.radii) if args.radii else [parse_radius(r) for r in DEFAULT_RADII_TEXT]
    model, what, dataset, source, x, y = agree(world, lambda: _points(args))
    if device is None:
        device = check_device(args.device)
    result = agree(world, lambda: certify_dataset(model, x.float(), torch.as_tensor(y), radii,
                                                  device, args.batch_size, world,
                                                  args.execution))
    if result is None:  # another rank than 0 of a torchrun job: rank 0 prints and writes
        return 0
    print(f"checkpoint: {what}")
    print(f"data: {source}, {x.shape[0]} images; claim L = {result['lipschitz']:.6g} "
          f"({result['certificate_kind']} certificate"
          + (", radii for float32 execution on the CPU" if args.execution != "real" else "")
          + ")")
    print(format_table(result, radii))
    if args.json:
        doc = {
            "checkpoint": what,
            "checkpoint_sha256": getattr(model, "checkpoint_sha256", None),
            "dataset": dataset or "default",
            "split": args.split,
            "n": int(x.shape[0]),
            "radii": radii,
            **result,
            "provenance": {"world_size": world.size},
        }
        atomic_write_text(Path(args.json), _json_text(doc))
        print(f"wrote {args.json}")
    sys.stdout.flush()
    return 0
