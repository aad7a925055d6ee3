"""Python side of ``benchmarks/gpu_check.sh``: the 10k certification timing and the summary.

``certify``: times the certification of 10,000 CIFAR-10-shaped images (3x32x32) with
LipConvNet-5 on ``--device``: the CIFAR-10 test split when ``--data`` names a tar of its JPEG
folder (``test/<class>/*.jpg``, made by ``benchmarks/gpu_wheels.sh``), else 10,000 seeded
uniform-noise images (said so in the output); the reference checkpoint when ``--checkpoint``
is given, else a seeded, untrained LipConvNet-5 (init 32, SOC/HH1/LLN: the CIFAR default of
``lipverify train``; accuracy is then meaningless, the timing is not). Timed, with CUDA
synchronised: ``certify_dataset`` (the core of ``lipverify certify``: batches of 256 moved
from host memory, radii and per-sample records back), cold (the first call) and warm (median
of ``--runs``), and ``lipverify.certify`` on images already on the device; each in IEEE float32
and in the device's default precision (TF32 convolutions on CUDA), with the largest radius
difference between the two.

``summary``: merges the step table written by the shell script, the pytest outcome and the
JSON of each step into one ``gpu_check.json``.

    python benchmarks/gpu_check.py certify --device cuda --json certify.json
    python benchmarks/gpu_check.py summary --steps steps.tsv --out gpu_check.json ...
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tarfile
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from common import machine_info, write_json  # noqa: E402

GOAL_SECONDS = 2.0
RADII = (36 / 255, 72 / 255, 108 / 255)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_images(data: Path | None, n: int, workers: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                  str]:
    """``(x, y, description)``: the CIFAR-10 test JPEGs of the tar ``data`` if it exists, else
    ``n`` seeded synthetic images."""
    if data is not None and data.is_file():
        from lipverify.data import load_dataset

        with tempfile.TemporaryDirectory(prefix="gpu-check-cifar-") as tmp:
            root = Path(tmp) / "data"
            with tarfile.open(data) as tar:
                tar.extractall(root, filter="data")
            for cls in (root / "test").iterdir():  # the loader reads class names from train/
                (root / "train" / cls.name).mkdir(parents=True, exist_ok=True)
            x, y, _ = load_dataset("imagefolder", "test", root, cache_dir=Path(tmp) / "cache",
                                   workers=workers)
        if n < x.shape[0]:  # a seeded subset (the folder is sorted by class)
            keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:n]
            x, y = x[keep], y[keep]
        return x, y, f"CIFAR-10 test split ({x.shape[0]} images of the JPEG mirror, {data})"
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    why = "not given" if data is None else f"{data} not on this machine"
    return x, y, (f"SYNTHETIC: {n} seeded uniform-noise images of shape 3x32x32 "
                  f"(CIFAR-10 {why})")


def load_net(checkpoint: Path | None, init_channels: int) -> tuple[torch.nn.Module, str]:
    if checkpoint is not None and checkpoint.is_file():
        from lipverify.checkpoints import load_model

        return load_model(checkpoint), f"checkpoint {checkpoint}"
    from lipverify.models import LipConvNet

    torch.manual_seed(0)
    net = LipConvNet(conv="soc", activation="hh1", num_layers=5, init_channels=init_channels,
                     last_layer="lln").eval()
    return net, (f"seeded untrained LipConvNet-5 (init {init_channels}, SOC/HH1/LLN); "
                 "accuracy meaningless")


def _timed(fn, device: torch.device, runs: int) -> tuple[Any, float, list[float]]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    cold = time.perf_counter() - t0
    warm = []
    for _ in range(runs):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        warm.append(time.perf_counter() - t0)
    return out, cold, warm


def certify_timing(args: argparse.Namespace) -> dict[str, Any]:
    from device_checks import group_error, ieee_float32, precision_flags

    from lipverify.certificates import certify
    from lipverify.certify_cmd import certify_dataset

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is available")
    t0 = time.perf_counter()
    x, y, data_text = load_images(args.data, args.n, args.workers)
    load_s = time.perf_counter() - t0
    net, model_text = load_net(args.checkpoint, args.init_channels)
    net = net.to(device).eval()
    print(f"data: {data_text} (loaded in {load_s:.1f} s)\nmodel: {model_text}\n"
          f"device: {device}", flush=True)
    result: dict[str, Any] = {"device": str(device), "n": int(x.shape[0]), "data": data_text,
                              "synthetic": data_text.startswith("SYNTHETIC"),
                              "model": model_text, "goal_seconds": GOAL_SECONDS,
                              "runs": args.runs, "load_seconds": load_s, "modes": {}}
    radii = {}
    x_dev = x.to(device)
    for mode in ("ieee", "default"):
        with ieee_float32() if mode == "ieee" else nullcontext():
            flags = precision_flags()
            acc, cold, warm = _timed(lambda: certify_dataset(net, x, y, list(RADII), device),
                                     device, args.runs)
            cert, lcold, lwarm = _timed(lambda: certify(net, x_dev), device, args.runs)
        radii[mode] = cert.radius.cpu()
        med, lmed = statistics.median(warm), statistics.median(lwarm)
        result["modes"][mode] = {
            "precision": flags,
            "certify_dataset": {"cold_s": cold, "warm_s": warm, "median_s": med,
                                "images_per_s": x.shape[0] / med},
            "certify_on_device": {"cold_s": lcold, "warm_s": lwarm, "median_s": lmed,
                                  "images_per_s": x.shape[0] / lmed},
            "clean_accuracy": acc["clean_accuracy"],
            "certified_accuracy": acc["certified_accuracy"],
            "goal_met": med < GOAL_SECONDS,
        }
        print(f"{mode:7s} certify_dataset: cold {cold:.3f} s, warm median {med:.3f} s "
              f"({x.shape[0] / med:.0f} img/s); certify on device: median {lmed:.3f} s; "
              f"clean {acc['clean_accuracy']:.4f}, certified {acc['certified_accuracy']}",
              flush=True)
    result["radius_error_default_vs_ieee"] = group_error(radii["default"], radii["ieee"])
    result["goal_met"] = result["modes"]["ieee"]["goal_met"]
    print(f"radius difference, default precision vs IEEE: "
          f"{result['radius_error_default_vs_ieee']:.3g}; goal < {GOAL_SECONDS} s "
          f"{'met' if result['goal_met'] else 'NOT met'} (IEEE, warm)", flush=True)
    return result


# -- summary ---------------------------------------------------------------------------------
_PYTEST_COUNTS = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


def pytest_outcome(log: Path) -> dict[str, Any]:
    """Counts of pytest's closing line and the skip reasons (``-rs``) in ``log``."""
    if not log.is_file():
        return {"found": False}
    text = log.read_text(errors="replace")
    lines = [ln for ln in text.splitlines() if _PYTEST_COUNTS.search(ln)]
    counts: dict[str, int] = {}
    if lines:
        for num, word in _PYTEST_COUNTS.findall(lines[-1]):
            counts["errors" if word.startswith("error") else word] = int(num)
    skips = [ln.split("] ", 1)[-1] for ln in text.splitlines() if ln.startswith("SKIPPED")]
    failed = [ln for ln in text.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    return {"found": bool(lines), "counts": counts, "skip_reasons": skips, "failures": failed}


def summary(args: argparse.Namespace) -> dict[str, Any]:
    steps = []
    for line in args.steps.read_text().splitlines():
        name, status, rc, seconds, limit = line.split("\t")
        steps.append({"step": name, "status": status, "rc": int(rc),
                      "seconds": float(seconds), "limit_s": float(limit)})
    doc: dict[str, Any] = {
        "device_requested": args.device, "quick": args.quick,
        "machine": machine_info(torch.get_num_threads()),
        "cuda": {"available": torch.cuda.is_available(),
                 "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
                 "torch_cuda": torch.version.cuda},
        "steps": steps, "ok": all(s["status"] in ("ok", "skipped") for s in steps),
        "pytest": pytest_outcome(args.pytest_log) if args.pytest_log else None,
        "total_seconds": args.total_seconds,
    }
    for key, path in (("certify", args.certify_json), *(
            (f"bench_soc_{p.stem.rsplit('_', 1)[-1]}", p) for p in args.bench_json)):
        if path is not None and path.is_file():
            doc[key] = json.loads(path.read_text())
    write_json(args.out, doc)
    print(json.dumps({"ok": doc["ok"], "steps": [(s["step"], s["status"], round(s["seconds"], 1))
                                                  for s in steps]}))
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("certify", help="time the 10k certification")
    c.add_argument("--device", default="cuda")
    c.add_argument("--n", type=int, default=10_000)
    c.add_argument("--data", type=Path, help="tar of the CIFAR-10 test JPEGs (test/<class>/*)")
    c.add_argument("--checkpoint", type=Path, help="a LipConvNet-5 checkpoint")
    c.add_argument("--init-channels", type=int, default=32)
    c.add_argument("--runs", type=int, default=3)
    c.add_argument("--workers", type=int, default=8)
    c.add_argument("--json", type=Path, required=True)
    s = sub.add_parser("summary", help="merge the step results into one JSON")
    s.add_argument("--steps", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--device", default="cuda")
    s.add_argument("--quick", action="store_true")
    s.add_argument("--pytest-log", type=Path)
    s.add_argument("--certify-json", type=Path)
    s.add_argument("--bench-json", type=Path, nargs="*", default=[])
    s.add_argument("--total-seconds", type=float)
    args = p.parse_args(argv)
    if args.command == "certify":
        write_json(args.json, certify_timing(args))
    else:
        summary(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
