"""``lipverify export``: write one frozen evaluation of a model as plain ATen ops (.pt2).

Models whose forward changes their own state (orthogonium's power iterations, for example) or
evaluates parametrizations on every call are audited as one snapshot: parametrizations
evaluated once, state as it was. ``export`` writes that snapshot with ``torch.export.save``;
``lipverify audit SNAPSHOT.pt2 --lipschitz L`` audits it, and loading it runs no code of the
model. Guarantee: the written program matched the model's forward (run from the same state)
on a probe input to 1e-5 relative (float32).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from lipverify.errors import InputError

__all__ = ["add_arguments", "run", "export_snapshot"]


def export_snapshot(model: torch.nn.Module, input_shape: tuple[int, ...], path: str | os.PathLike,
                    *, features: bool = False, seed: int = 0) -> Path:
    """Write the frozen snapshot of ``model`` (or ``model.features``) on per-sample
    ``input_shape`` to ``path`` (``.pt2``), atomically; return the path."""
    from lipverify.audits.capture import CaptureRefused, snapshot

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    probe = torch.rand((2, *input_shape), generator=torch.Generator().manual_seed(seed),
                       dtype=dtype)
    try:
        ep = snapshot(model, probe, features=features)
    except CaptureRefused as exc:
        raise InputError(str(exc)) from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.export.save(ep, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                   help="the nn.Module that FACTORY() builds")
    p.add_argument("--input-shape", default="3,32,32", metavar="C,H,W",
                   help="per-sample input shape (default 3,32,32)")
    p.add_argument("--features", action="store_true", help="export model.features")
    p.add_argument("--out", required=True, help="file to write (.pt2)")


def run(args: argparse.Namespace) -> int:
    from lipverify.audits.cli import resolve_model

    try:
        shape = tuple(int(s) for s in args.input_shape.split(","))
    except ValueError:
        raise InputError("--input-shape takes C,H,W, e.g. 3,32,32") from None
    if not shape or any(s <= 0 for s in shape):
        raise InputError("--input-shape must be positive integers, e.g. 3,32,32")
    if not str(args.out).endswith(".pt2"):
        raise InputError("--out must end in .pt2")
    ns = argparse.Namespace(model=args.model, checkpoint=None, lipschitz=0.0)
    model = resolve_model(ns)[0]
    path = export_snapshot(model, shape, args.out, features=args.features)
    print(f"wrote {path} (one frozen evaluation; audit it with: lipverify audit {path} "
          "--lipschitz L)")
    return 0
