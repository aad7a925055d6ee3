"""Benchmark: what third-party attack tools get from ``lipverify.fast`` (issue 18).

Workload: forward plus the input gradient of the cross-entropy (one attack step), at the batch
sizes of ``--batches`` (default 8, AutoAttack on 8 points, and 256), taken two ways
(``--workloads``): ``grad``, ``torch.autograd.grad`` with respect to the input only (APGD), and
``backward``, ``loss.backward()`` (FAB, foolbox), which on the model also computes the gradient
of every parameter, and on the fast module (no parameters) does not. Variants, timed
interleaved in the same run, median of ``--runs`` (>= 3) after a warm-up, ``--threads``
threads (default 2):

* ``model``: ``model.eval()`` called directly, which is what AutoAttack, RobustBench and foolbox
  do (the baseline of the ratios);
* ``fast_eval``: a copy of the model inside ``lipverify.layers.soc.fast_eval`` (constant
  weights, small SOC layers materialised);
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
import copy
import itertools
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


def _attack_step(f: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, how: str):
    """``grad``: ``torch.autograd.grad`` with respect to the input only (APGD, Square's
    forward passes aside); ``backward``: ``loss.backward()``, as FAB and foolbox do, which also
    fills the gradient of every parameter that requires one."""
    def run() -> None:
        xx = x.clone().requires_grad_(True)
        loss = F.cross_entropy(f(xx), y)
        if how == "grad":
            torch.autograd.grad(loss, xx)
        else:
            f.zero_grad(set_to_none=True)
            loss.backward()

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
        twin = copy.deepcopy(model)  # fast_eval changes its model while the block runs
        for batch, how in itertools.product(args.batches, args.workloads):
            x = torch.rand(batch, 3, 32, 32, generator=gen)
            y = torch.randint(0, 10, (batch,), generator=gen)
            fns = {"model": _attack_step(model, x, y, how),
                   "fast": _attack_step(module, x, y, how)}
            with fast_eval(twin, (3, 32, 32), images=1e5, use_disk=False) as rep:
                fns["fast_eval"] = _attack_step(twin, x, y, how)
                timing = interleaved(fns, args.runs, args.warmup, batch)
            base = timing["model"]["median_s"]
            ratio = {k: base / v["median_s"] for k, v in timing.items()}
            res = {
                "model": name, "workload": f"forward + input gradient ({how})", "batch": batch,
                "variants": timing, "ratio_to_model": ratio,
                "fast_build_seconds": build, "fast_bytes": module.nbytes,
                "fast_probe_error": module.probe_error,
                "fast_eval_materialise_seconds": rep.seconds,
            }
            print(f"{name:24s} {how:8s} b={batch:<4d} " + "  ".join(
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
    p.add_argument("--workloads", default="grad,backward",
                   help="grad (autograd.grad, input only), backward (loss.backward())")
    add_timing_arguments(p)
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not args.workloads or set(args.workloads) - {"grad", "backward"}:
        p.error("--workloads: grad, backward or both")
    if args.quick:
        args.batches, args.workloads = [4], ["grad"]
    if args.runs < 3:
        p.error("--runs must be at least 3 (the median of at least 3 runs)")
    if not args.batches or min(args.batches) < 1:
        p.error("--batches must list positive batch sizes")
    info = announce("bench_fast", args.threads)
    save_results(args.json, info, args, run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
