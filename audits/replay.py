"""``lipverify replay DIR``: re-run every saved violation through the model.

Guarantee: a violation "holds" only if the saved ``x_adv`` lies strictly within
``radius * (1 - tolerance)`` of ``x``, inside [0, 1], and the model's argmax at ``x_adv``
differs from the certified prediction, recomputed now: in float32 *and* float64 for a
``real`` violation, in float32 (the model's own forward, on the CPU) for an ``executed`` one.

An executed violation depends on rounding, so on the machine: one that does not hold is
"not reproducible here" when this machine differs from the audit's in what the float32 result
can depend on (platform, torch, thread count, oneDNN and precision flags, flush-to-zero; the
report records them), and "refuted" otherwise. A real violation that does not hold is refuted.
Exit codes: 0 every saved violation holds, 3 some are refuted, 5 none is refuted but some
are not reproducible here, 2 bad input.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from lipverify.errors import InputError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="an audit report directory (with report.json)")
    p.add_argument("--checkpoint", help="model to replay against (default: the audited one)")


def replay(model, directory: str | Path, tolerance: float,  # noqa: ANN001
           recorded_environment: dict | None = None) -> list[dict]:
    """Re-check each ``violations/NNNN.pt``; return one row per violation, with ``status``
    ``holds``, ``refuted`` or ``not reproducible here`` (see the module docstring)."""
    import torch

    from lipverify.execution import environment

    here = environment()
    differs = sorted(k for k, v in (recorded_environment or {}).items() if here.get(k) != v)

    from lipverify.checkpoints import safe_torch_load

    m32 = model.eval().float()
    m64 = copy.deepcopy(model).double().eval()
    rows = []
    for f in sorted((Path(directory) / "violations").glob("*.pt")):
        v = safe_torch_load(f)
        try:
            if not isinstance(v, dict) or not {"x", "x_adv", "radius", "pred", "index"} <= set(v):
                raise TypeError("missing entries")
            x, xa = v["x"].float()[None], v["x_adv"].float()[None]
            if x.shape != xa.shape or xa.dim() != 4 or not xa.is_floating_point():
                raise ValueError("x and x_adv must be images of one shape")
            radius, pred, index = float(v["radius"]), int(v["pred"]), int(v["index"])
        except (TypeError, ValueError, AttributeError, RuntimeError, IndexError):
            raise InputError(f"{f}: not a lipverify violation record") from None
        cfg = getattr(model, "config", None)
        cfg = cfg if isinstance(cfg, dict) else {}
        want = (cfg.get("in_channels", xa.shape[1]), cfg.get("input_size", xa.shape[2]),
                cfg.get("input_size", xa.shape[3]))
        if tuple(xa.shape[1:]) != want:
            raise InputError(f"{f}: images of shape {tuple(xa.shape[1:])}, but the model takes "
                             f"{want}; replay against the audited model")
        with torch.no_grad():
            p32 = int(m32(xa).argmax(1))
            p64 = int(m64(xa.double()).argmax(1))
        dist = float((xa.double() - x.double()).norm())
        inside = dist < radius * (1 - tolerance)
        in_box = bool((xa >= 0).all() and (xa <= 1).all())
        kind = str(v.get("kind", "real"))
        if kind == "executed":
            holds = inside and in_box and p32 != pred
        else:
            holds = inside and in_box and p32 != pred and p64 != pred
        status = "holds" if holds else "refuted"
        if not holds and kind == "executed" and inside and in_box and differs:
            status = "not reproducible here"
        rows.append({"file": f.name, "index": index, "kind": kind, "distance": dist,
                     "radius": radius, "pred": pred, "adv_pred_float32": p32,
                     "adv_pred_float64": p64, "holds": holds, "status": status,
                     "environment_differs": differs if kind == "executed" else []})
    return rows


def run(args: argparse.Namespace) -> int:
    from lipverify.checkpoints import load_model

    d = Path(args.directory)
    if not (d / "report.json").is_file():
        raise InputError(f"{d} has no report.json; pass the directory an audit wrote")
    try:
        report = json.loads((d / "report.json").read_text())
        source = report["provenance"]["model_source"]
        tolerance = float(report["tolerance"])
        recorded = (report.get("execution") or {}).get("environment")
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{d / 'report.json'} is corrupt or not a lipverify report") from None
    if args.checkpoint:
        model = load_model(args.checkpoint)
    elif source.get("checkpoint"):
        model = load_model(source["checkpoint"])
    elif source.get("default"):
        from lipverify.default import load_default_model

        model = load_default_model()
    else:
        raise InputError("the audited model was built by a factory; pass --checkpoint")
    rows = replay(model, d, tolerance, recorded)
    if not rows:
        print("no saved violations to replay")
        return 0
    from lipverify.execution import environment

    for r in rows:
        state = {"holds": "HOLDS", "refuted": "REFUTED"}.get(r["status"], r["status"].upper())
        extra = (f" (differs here: {', '.join(r['environment_differs'])})"
                 if r["status"] == "not reproducible here" else "")
        print(f"{r['file']}: {r['kind']} violation, index {r['index']} distance "
              f"{r['distance']:.6g} < radius {r['radius']:.6g}; pred {r['pred']} -> "
              f"{r['adv_pred_float32']} (float32), {r['adv_pred_float64']} (float64): "
              f"{state}{extra}")
    env = environment()
    print(f"replayed on {env['platform']}, torch {env['torch']}, {env['threads']} thread(s)")
    held = sum(r["holds"] for r in rows)
    refuted = sum(r["status"] == "refuted" for r in rows)
    print(f"{held}/{len(rows)} violations hold, {refuted} refuted, "
          f"{len(rows) - held - refuted} not reproducible here")
    if refuted:
        return 3
    return 0 if held == len(rows) else 5
