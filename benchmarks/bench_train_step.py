"""Benchmark: one training step of the full-size LipConvNet-5 (SOC, HH1, LLN, init 32).

A step is what ``lipverify train`` does per batch: forward in train mode (SOC with 5 Taylor
terms and a power-iteration update), the CR loss, backward, SGD with momentum and weight decay.
Reports images per second, the median of ``--runs`` (>= 3) timed runs after warm-up, on CPU
with ``--threads`` threads (default 2) and on the GPU when one is available.

    python benchmarks/bench_train_step.py [--quick] [--json FILE]

``--quick`` checks that the script runs (init_channels 8, batch 8, one step per run); its
numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def _step_fn(model, optimizer, gamma: float):
    from lipverify.train import training_loss

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        logits = model(x)
        loss = training_loss(model, logits, y, gamma)[0].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def bench_device(device: torch.device, batch: int, steps: int, runs: int, warmup: int,
                 init_channels: int, gamma: float) -> dict:
    from lipverify.models import LipConvNet
    from lipverify.train import parameter_groups

    torch.manual_seed(0)
    model = LipConvNet(conv="soc", activation="hh1", num_layers=5, init_channels=init_channels,
                       last_layer="lln").to(device).train()
    optimizer = torch.optim.SGD(parameter_groups(model, 5e-4), lr=0.1, momentum=0.9)
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    step = _step_fn(model, optimizer, gamma)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step(x, y)
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(steps):
            step(x, y)
        sync()
        times.append(time.perf_counter() - t0)
    per_run = [batch * steps / t for t in times]
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "batch_size": batch,
        "steps_per_run": steps,
        "runs": runs,
        "images_per_second_median": statistics.median(per_run),
        "images_per_second_runs": per_run,
        "seconds_per_step_median": statistics.median(times) / steps,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: init 8, batch 8, 1 step per run")
    p.add_argument("--json", metavar="FILE", help="also write the results to FILE")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="steps per timed run")
    p.add_argument("--runs", type=int, default=3, help="timed runs (>= 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--init-channels", type=int, help="default 32 (8 with --quick)")
    p.add_argument("--gamma", type=float, default=0.0, help="CR weight (0: plain CE)")
    p.add_argument("--no-gpu", action="store_true", help="skip the GPU even when present")
    args = p.parse_args(argv)
    if args.runs < 3 and not args.quick:
        p.error("--runs must be >= 3 (the median of at least three runs)")
    batch, steps, runs, warmup = args.batch_size, args.steps, args.runs, args.warmup
    if args.quick:
        batch, steps, runs, warmup = 8, 1, 3, 1
    if args.init_channels is None:
        args.init_channels = 8 if args.quick else 32
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.no_gpu:
        devices.append(torch.device("cuda"))
    results = {
        "benchmark": "train_step",
        "model": f"LipConvNet-5 soc/hh1/lln init_channels={args.init_channels}",
        "quick": args.quick,
        "gamma": args.gamma,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "results": [
            bench_device(d, batch, steps, runs, warmup, args.init_channels, args.gamma)
            for d in devices
        ],
    }
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        from lipverify.atomic import atomic_write_text

        atomic_write_text(Path(args.json), text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
