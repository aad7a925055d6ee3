"""``lipverify audit``: audit a checkpoint (or the built-in default) and write a report.

Exit codes: 0 sound, 1 unsound, 2 bad input, 3 inconclusive, 4 internal error.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from lipverify.cli import finite_float, positive_int
from lipverify.errors import InputError, LipverifyError

SUITES = ("quick", "standard", "minimal-norm")
REPORT_FILES = ("report.json", "report.md", "report.html")




def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= v < 2**32:
        raise argparse.ArgumentTypeError(f"must lie in [0, 2**32), got {v}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", help="lipverify or reference-format checkpoint; "
                   "omit to audit the built-in default model")
    p.add_argument("--model", metavar="MODULE:FACTORY",
                   help="audit any nn.Module built by FACTORY() (needs --lipschitz unless the "
                        "module declares lipschitz_claim)")
    p.add_argument("--lipschitz", type=finite_float, metavar="L",
                   help="claimed Lipschitz bound (overrides the model's claim) of the map the "
                        "certificate formula uses: the logits (pixels -> logits) for 'ortho' "
                        "certificates, the default for any model; the features "
                        "(model.features) for a model declaring certificate_kind = 'lln'")
    p.add_argument("--dataset", help="digits, cifar10, cifar100, imagefolder, synthetic "
                   "(default: digits for the built-in model)")
    p.add_argument("--data-dir")
    p.add_argument("--cache-dir")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--n", type=positive_int, default=100, help="number of points (default 100)")
    p.add_argument("--attacks", default="quick", choices=SUITES)
    p.add_argument("--checks", default="lipschitz,gnp,attacks",
                   help="comma-separated subset of lipschitz,gnp,attacks")
    p.add_argument("--out", help="report directory (default: a new audits/<name>-<timestamp>)")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--tolerance", type=finite_float, default=1e-3)
    p.add_argument("--lipschitz-points", type=positive_int, default=8, metavar="K",
                   help="points for the local lower bound and GNP checks (default 8)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted audit in --out")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def resolve_model(args: argparse.Namespace) -> tuple[Any, str, dict, str | None]:
    """Return (model, name, model_source, default_dataset)."""
    if args.model and args.checkpoint:
        raise InputError("give either a checkpoint or --model, not both")
    if args.model:
        mod_name, _, fn_name = args.model.partition(":")
        if not fn_name:
            raise InputError("--model takes MODULE:FACTORY, e.g. mypkg.nets:build")
        try:
            factory = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise InputError(f"cannot import {args.model}: {e}") from None
        if not callable(factory):
            raise InputError(f"{args.model} is not callable; give a function that builds the "
                             "model")
        model = factory()
        import torch

        if not isinstance(model, torch.nn.Module):
            raise InputError(f"{args.model}() returned a {type(model).__name__}, "
                             "not a torch.nn.Module")
        if args.lipschitz is None and not hasattr(model, "lipschitz_claim"):
            raise InputError("--model needs --lipschitz L (the bound claimed for its logits, or "
                             "its features when it declares certificate_kind = 'lln')")
        return model, fn_name, {"factory": args.model, "lipschitz": args.lipschitz}, None
    if args.checkpoint:
        from lipverify.checkpoints import load_model

        path = Path(args.checkpoint)
        model = load_model(path)
        meta = getattr(model, "metadata", {}) or {}
        ds = (meta.get("config") or {}).get("dataset") if isinstance(meta, dict) else None
        return model, path.stem, {"checkpoint": str(path.resolve())}, ds
    from lipverify.default import load_default_model

    return load_default_model(), "default", {"default": True}, "digits"


def output_dir(args: argparse.Namespace, name: str) -> Path:
    if args.out:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out} exists and is not a directory")
        has_results = out.exists() and any(out.iterdir())
        if has_results and not (args.resume or args.overwrite):
            raise InputError(f"{out} already holds results; pass --overwrite to replace them "
                             "or --resume to continue")
        if has_results:  # temporary files of writes cut short by a kill
            for pattern in (".*.tmp", ".state/.*.tmp", "violations/.*.tmp"):
                for tmp in out.glob(pattern):
                    tmp.unlink(missing_ok=True)
        if args.overwrite and not args.resume and out.exists():
            for f in REPORT_FILES:
                (out / f).unlink(missing_ok=True)
            shutil.rmtree(out / "violations", ignore_errors=True)
            shutil.rmtree(out / ".state", ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        return out
    if args.resume:
        raise InputError("--resume needs the --out directory of the interrupted audit")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        out = Path("audits") / (f"{name}-{stamp}" + (f"-{i}" if i else ""))
        try:
            out.mkdir(parents=True, exist_ok=False)
            return out
        except FileExistsError:
            continue
    raise InputError("could not create a new output directory under audits/")


def run(args: argparse.Namespace) -> int:
    from lipverify.audits.runner import CHECKS, audit
    from lipverify.data import load_dataset
    from lipverify.errors import check_device, check_images

    checks = tuple(c.strip() for c in args.checks.split(",") if c.strip())
    if not checks or set(checks) - set(CHECKS):
        raise InputError(f"--checks takes a comma-separated subset of {','.join(CHECKS)}")
    model, name, source, default_ds = resolve_model(args)
    dataset = args.dataset or default_ds
    if dataset is None:
        raise InputError("pass --dataset (and --data-dir for imagefolder) to choose the points")
    x, y, info = load_dataset(dataset, args.split, data_dir=args.data_dir,
                              cache_dir=args.cache_dir)
    x, y = x[: args.n], y[: args.n]
    cfg = getattr(model, "config", {}) or {}
    check_images(x, cfg.get("in_channels"), cfg.get("input_size"))
    classes = cfg.get("num_classes")
    if classes is not None and info.num_classes > classes:
        raise InputError(f"the dataset has {info.num_classes} classes, the model {classes}")
    device = check_device(args.device)
    model = model.to(device)
    x, y = x.to(device), y.to(device)
    fresh = not (args.out and Path(args.out).exists())
    out = output_dir(args, name)

    bar = None
    if not args.quiet and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=None, desc="audit", unit="step", file=sys.stderr)

    def progress(msg: str) -> None:
        if bar is not None:
            bar.set_description(msg)
            bar.update(1)
        elif not args.quiet:
            sys.stderr.write(f"[audit] {msg}\n")

    prov = {"model_source": source, "dataset": dataset, "split": args.split,
            "data_dir": args.data_dir, "command": sys.argv}
    try:
        report = audit(model, x, y, lipschitz=args.lipschitz, attacks=args.attacks,
                       checks=checks, tolerance=args.tolerance, seed=args.seed,
                       state_dir=out / ".state", progress=progress, provenance=prov,
                       lipschitz_points=args.lipschitz_points)
    except LipverifyError:
        if fresh and not any(out.iterdir()):  # refused before any work: leave no empty dir
            out.rmdir()
        raise
    if bar is not None:
        bar.close()
    report.save(out)
    print(report.summary())
    print(f"report: {out / 'report.html'}  (json: {out / 'report.json'})")
    return report.exit_code
