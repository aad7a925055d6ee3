"""Benchmark: what third-party attack tools get from ``lipverify.fast`` (issue 18).

Workload: forward plus the input gradient of the cross-entropy (one attack step), at the batch
sizes of ``--batches`` (default 8, AutoAttack on 8 points, and 256). Variants, timed
interleaved in the same run, median of ``--runs`` (>= 3) after a warm-up, ``--threads``
threads (default 2):

* ``model``: ``model.eval()`` called directly, which is what AutoAttack, RobustBench and foolbox
  do (the baseline of the ratios);
* ``fast_eval``: the same model inside ``lipverify.layers.soc.fast_eval`` (constant weights,
  small SOC layers materialised);
* ``fast``: the frozen module of ``lipverify.fast(model)``.

Models: the built-in default, and LipConvNet-5 (init 32, SOC, HH1, LLN, random weights; the
function does not depend on the values). Printed: images/s of each, the ratio to ``model``, and
the fast module's build seconds and bytes.

    python benchmarks/bench_fast.py [--quick] [--json FILE]

``--quick`` (default model and an init-4 net, batch 4) checks that the script runs; its numbers
mean nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_timing_arguments, announce, interleaved, save_results  # noqa: E402

import lipverify  # noqa: E402
from lipverify.default import load_default_model  # noqa: E402
from lipverify.layers.soc import fast_eval  # noqa: E402
from lipverify.models import LipConvNet  # noqa: E402


def _attack_step(f: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    def run() -> None:
        xx = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(f(xx), y), xx)

    return run


def _models(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    width = 4 if args.quick else args.init_channels
    return {
        "default": load_default_model().eval(),
        f"LipConvNet-5 init {width}": LipConvNet(conv="soc", activation="hh1", num_layers=5,
                                                 init_channels=width, last_layer="lln").eval(),
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    gen = torch.Generator().manual_seed(1)
    for name, model in _models(args).items():
        t0 = time.perf_counter()
        module = lipverify.fast(model)
        build = time.perf_counter() - t0
        for batch in args.batches:
            x = torch.rand(batch, 3, 32, 32, generator=gen)
            y = torch.randint(0, 10, (batch,), generator=gen)
            fns = {"model": _attack_step(model, x, y), "fast": _attack_step(module, x, y)}
            with fast_eval(model, (3, 32, 32), images=1e5, use_disk=False) as rep:
                fns["fast_eval"] = _attack_step(model, x, y)
                timing = interleaved(fns, args.runs, args.warmup, batch)
            base = timing["model"]["median_s"]
            ratio = {k: base / v["median_s"] for k, v in timing.items()}
            res = {
                "model": name, "workload": "forward + input gradient", "batch": batch,
                "variants": timing, "ratio_to_model": ratio,
                "fast_build_seconds": build, "fast_bytes": module.nbytes,
                "fast_probe_error": module.probe_error,
                "fast_eval_materialise_seconds": rep.seconds,
            }
            print(f"{name:24s} b={batch:<4d} " + "  ".join(
                f"{k} {v['items_per_s']:7.1f} img/s (x{ratio[k]:.2f})" for k, v in timing.items())
                + f"  [fast: built in {build:.1f} s, {module.nbytes / 2**20:.1f} MiB]",
                flush=True)
            results.append(res)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: init 4, batch 4")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--init-channels", type=int, default=32)
    p.add_argument("--batches", default="8,256", help="comma-separated batch sizes")
    add_timing_arguments(p)
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if args.quick:
        args.batches = [4]
    if args.runs < 3:
        p.error("--runs must be at least 3 (the median of at least 3 runs)")
    if not args.batches or min(args.batches) < 1:
        p.error("--batches must list positive batch sizes")
    info = announce("bench_fast", args.threads)
    save_results(args.json, info, args, run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
