"""``lipverify audit``: audit a checkpoint (or the built-in default) and write a report.

Exit codes: 0 sound, 1 unsound, 2 bad input, 3 inconclusive, 4 internal error. Under
``torchrun`` (:mod:`lipverify.distributed`) a finished audit exits 0 whatever its verdict,
since torchrun takes any other status for a failed worker and restarts the job; the verdict is
in ``report.json`` and in the summary printed by rank 0.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from lipverify.audits.runner import Progress
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
    p.add_argument("--num-points", "--n", dest="n", type=positive_int, default=100,
                   metavar="N", help="audit the first N points of the split (default 100); "
                   "under torchrun write --num-points (torchrun takes --n for its own options)")
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
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available; "
                   "under torchrun each rank uses cuda:LOCAL_RANK)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--execution", choices=("real", "float32"), default="real",
                   help="real (default): audit the real-valued certificates; float32: also "
                   "the model as executed in float32 on the CPU (executed radii, a rounding "
                   "search, executed_verdict)")


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


class CliProgress(Progress):
    """The audit's progress on stderr: tqdm bars on a terminal (the attacks: points done of
    all, violations so far, time left; the Lipschitz and GNP stages: time spent), otherwise one
    line per stage and per finished chunk; nothing with ``--quiet``."""

    def __init__(self, quiet: bool = False, tty: bool | None = None) -> None:
        super().__init__()
        self.quiet = quiet
        self.tty = (not quiet) and (sys.stderr.isatty() if tty is None else tty)
        self._attack_bar: Any = None
        self._stage_bar: Any = None
        self._stop_tick: threading.Event | None = None
        self._first: tuple[float, int] | None = None  # (time, points done) at the first update
        self._lock = threading.Lock()

    def __call__(self, message: str) -> None:
        if self.quiet or self.tty or message.startswith("attacking chunk"):
            return  # bars on a terminal; chunk lines come from attacks_update
        sys.stderr.write(f"[audit] {message}\n")

    def stage_begin(self, name: str) -> None:
        if not self.tty or name not in _STAGE_LABELS:
            return
        from tqdm import tqdm

        with self._lock:
            self._stage_bar = tqdm(total=None, desc=_STAGE_LABELS[name], file=sys.stderr,
                                   bar_format="{desc}: {elapsed} elapsed",
                                   position=1 if self._attack_bar is not None else 0)
        stop = self._stop_tick = threading.Event()
        bar = self._stage_bar

        def tick() -> None:  # the stage reports nothing itself: keep the clock moving
            while not stop.wait(0.5):
                with self._lock:
                    bar.refresh()

        threading.Thread(target=tick, daemon=True).start()

    def stage_end(self, name: str) -> None:
        if name in _STAGE_LABELS and self._stage_bar is not None:
            self._stop_tick.set()
            with self._lock:
                self._stage_bar.close()
                self._stage_bar = None
        if name == "attacks" and self._attack_bar is not None:
            with self._lock:
                self._attack_bar.close()
                self._attack_bar = None

    def attacks_update(self, total: int, done: int, violations: int) -> None:
        if self.quiet:
            return
        now = time.time()
        if self._first is None:
            self._first = (now, done)
        if self.tty:
            from tqdm import tqdm

            with self._lock:
                if self._attack_bar is None:
                    self._attack_bar = tqdm(total=total, initial=done, desc="attacks",
                                            unit="pt", file=sys.stderr, position=0)
                bar = self._attack_bar
                bar.set_postfix_str(f"{violations} violations", refresh=False)
                bar.update(done - bar.n)
            return
        t0, d0 = self._first
        left = ""
        if done > d0 and done < total:
            left = f", about {_duration((total - done) * (now - t0) / (done - d0))} left"
        sys.stderr.write(f"[audit] attacks: {done}/{total} points, {violations} "
                         f"violation(s){left}\n")

    def close(self) -> None:
        for name in ("lipschitz", "attacks"):
            self.stage_end(name)


_STAGE_LABELS = {"lipschitz": "Lipschitz bound (per-layer bounds, then float64 lower bounds)",
                 "gnp": "gradient-norm preservation"}


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else (
        f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def _parse_checks(text: str) -> tuple[str, ...]:
    from lipverify.audits.runner import CHECKS

    checks = tuple(c.strip() for c in text.split(",") if c.strip())
    if not checks or set(checks) - set(CHECKS):
        raise InputError(f"--checks takes a comma-separated subset of {','.join(CHECKS)}")
    return checks


def _load(args: argparse.Namespace, device: Any) -> tuple[Any, str, dict, str, Any, Any]:
    """(model, name, model source, dataset, x, y) on ``device``."""
    from lipverify.data import load_dataset
    from lipverify.errors import check_images

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
    return model.to(device), name, source, dataset, x.to(device), y.to(device)


def run(args: argparse.Namespace) -> int:
    from lipverify import distributed

    checks = _parse_checks(args.checks)
    if distributed.launched():
        with distributed.process_group(args.device) as (world, device):
            return _run_sharded(args, checks, world, device)
    from lipverify.audits.runner import audit
    from lipverify.errors import check_device

    model, name, source, dataset, x, y = _load(args, check_device(args.device))
    fresh = not (args.out and Path(args.out).exists())
    out = output_dir(args, name)
    progress = CliProgress(args.quiet)
    prov = {"model_source": source, "dataset": dataset, "split": args.split,
            "data_dir": args.data_dir, "command": sys.argv}
    try:
        report = audit(model, x, y, lipschitz=args.lipschitz, attacks=args.attacks,
                       checks=checks, tolerance=args.tolerance, seed=args.seed,
                       state_dir=out / ".state", progress=progress, provenance=prov,
                       lipschitz_points=args.lipschitz_points, execution=args.execution)
    except LipverifyError:
        if fresh and not any(out.iterdir()):  # refused before any work: leave no empty dir
            out.rmdir()
        raise
    finally:
        progress.close()
    report.save(out)
    print(report.summary())
    print(f"report: {out / 'report.html'}  (json: {out / 'report.json'})")
    return report.exit_code


def _sharded_output_dir(args: argparse.Namespace, name: str, world: Any) -> tuple[Path, bool]:
    """Rank 0: the output folder, and whether it is new. After a torchrun restart
    (``TORCHELASTIC_RESTART_COUNT > 0``, or a folder recorded by an earlier attempt of this
    job in torchrun's store) it is the first attempt's folder, resumed rather than refused."""
    from lipverify.distributed import job_board

    board = job_board(world)
    previous = board.get("audit-out")
    if world.restart > 0 or previous is not None:
        if not args.out:
            args.out = previous
        args.resume, args.overwrite = bool(args.out), False
    fresh = not (args.out and Path(args.out).exists())
    out = output_dir(args, name)
    board.set("audit-out", str(out.resolve()))
    return out, fresh


def _run_sharded(args: argparse.Namespace, checks: tuple[str, ...], world: Any,
                 device: Any) -> int:
    from lipverify import distributed

    model, name, source, dataset, x, y = distributed.agree(world, lambda: _load(args, device))
    out, fresh = distributed.on_main(world, lambda: _sharded_output_dir(args, name, world))
    out = Path(out)
    progress = CliProgress(args.quiet or not world.main)
    prov = {"model_source": source, "dataset": dataset, "split": args.split,
            "data_dir": args.data_dir, "command": sys.argv}
    try:
        report = distributed.audit_sharded(
            model, x, y, state_dir=out / ".state", world=world, progress=progress,
            provenance=prov, lipschitz=args.lipschitz, attacks=args.attacks, checks=checks,
            tolerance=args.tolerance, seed=args.seed, lipschitz_points=args.lipschitz_points,
            execution=args.execution)
    except LipverifyError:
        if world.main and fresh and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    finally:
        progress.close()
    if report is None:
        return 0
    report.save(out)
    print(report.summary())
    print(f"report: {out / 'report.html'}  (json: {out / 'report.json'})")
    print(f"({world.size} processes; under torchrun the exit status is 0 for every verdict: "
          f"read the verdict above or in report.json)")
    sys.stdout.flush()
    return 0
