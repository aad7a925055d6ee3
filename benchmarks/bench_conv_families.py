"""Benchmark: SOC, Cayley and BCOP side by side in the same LipConvNet, in one run (issue 8).

For each convolution family the same network (LipConvNet-5, HH1, LLN, ``--init-channels``
32 by default) is timed on

* eval forward at batch 256 (the layers' own eval paths: SOC's cached filter with 12 Taylor
  powers, Cayley's cached per-frequency matrices, BCOP's cached orthogonal filter; no
  materialisation), and
* one train step at batch 128, as ``lipverify train`` does it (CR loss, SGD with momentum and
  weight decay).

The families run interleaved, median of ``--runs`` (>= 3) after a warm-up, ``--threads``
threads (default 2). Printed: images/s of each, and the ratio to SOC measured in the same run.

    python benchmarks/bench_conv_families.py [--quick] [--json FILE]

``--quick`` (init 4, batch 8) checks that the script runs; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_timing_arguments,
    announce,
    interleaved,
    save_results,
)

from lipverify.models import LipConvNet  # noqa: E402
from lipverify.train import parameter_groups, training_loss  # noqa: E402

FAMILIES = ("soc", "cayley", "bcop")


def _eval_fn(model: torch.nn.Module, x: torch.Tensor):
    def run() -> None:
        with torch.no_grad():
            model(x)

    return run


def _train_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    optimizer = torch.optim.SGD(parameter_groups(model, 5e-4), lr=0.1, momentum=0.9)

    def step() -> None:
        loss = training_loss(model, model(x), y, 0.0)[0].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    models = {}
    for conv in args.families:
        torch.manual_seed(0)
        models[conv] = LipConvNet(conv=conv, activation="hh1", num_layers=args.num_layers,
                                  init_channels=args.init_channels, last_layer="lln")
    gen = torch.Generator().manual_seed(1)
    results = []
    for workload, batch in (("eval", args.eval_batch), ("train", args.train_batch)):
        x = torch.rand(batch, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
        fns = {}
        for conv, m in models.items():
            if workload == "eval":
                fns[conv] = _eval_fn(m.eval(), x)
            else:
                fns[conv] = _train_fn(m.train(), x, y)
        timing = interleaved(fns, args.runs, args.warmup, batch)
        base = timing[args.families[0]]["median_s"]
        res = {"workload": workload, "batch": batch, "variants": timing,
               "ratio_to_" + args.families[0]: {k: base / v["median_s"]
                                                 for k, v in timing.items()}}
        print(f"LipConvNet-{args.num_layers} init {args.init_channels} {workload:5s} "
              f"b={batch:<4d} " + "  ".join(
                  f"{k} {v['items_per_s']:7.1f} img/s (x{base / v['median_s']:.2f})"
                  for k, v in timing.items()), flush=True)
        results.append(res)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: init 4, batch 8")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--families", default=",".join(FAMILIES),
                   help="comma-separated conv families; the first is the ratio's baseline")
    p.add_argument("--num-layers", type=int, default=5)
    p.add_argument("--init-channels", type=int, default=32)
    add_timing_arguments(p)
    args = p.parse_args(argv)
    if args.quick:
        args.init_channels, args.eval_batch, args.train_batch = 4, 8, 8
    if args.runs < 3:
        p.error("--runs must be at least 3 (the median of at least 3 runs)")
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = set(args.families) - set(FAMILIES)
    if unknown:
        p.error(f"unknown families {sorted(unknown)}; choose from {list(FAMILIES)}")
    info = announce("bench_conv_families", args.threads)
    save_results(args.json, info, args, run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
