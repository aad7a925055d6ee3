"""Benchmark: a sharded audit (torchrun, 2 processes x 1 thread) against one process with
2 threads (issue 16), on the same cores.

Workload: ``lipverify audit`` of the built-in default model on the first ``--num-points``
(default 96: three attack chunks) digits test points, ``--checks lipschitz,attacks --attacks
quick``, seed 0. Variants, each a fresh command (process start, loading and the report
included: what a user waits for), run alternately ``--runs`` times (median):

* ``1proc_x2threads`` (the baseline of the ratio): ``python -m lipverify audit ...`` with
  ``OMP_NUM_THREADS=2``;
* ``2proc_x1thread``: ``torchrun --standalone --nproc-per-node=2 -m lipverify audit ...`` with
  ``OMP_NUM_THREADS=1`` (gloo; rank 0 bounds the Lipschitz constant while rank 1 attacks).

Printed: the median wall seconds of each (and every run's), the ratio (baseline seconds /
variant seconds: above 1 the sharded run is faster), the stage seconds of each variant's last
report, and how far the two reports agree: verdict, violation indices, certified accuracy, the
sections that differ, and the largest relative difference of a radius and of an adversarial
distance (1 and 2 threads may round differently; the tests compare sharded and
single-process runs at 1 thread each, where the reports are identical).

    python benchmarks/bench_sharded.py [--quick] [--runs R] [--num-points N] [--json FILE]

``--quick`` (a tiny random LipConvNet on 40 synthetic points) checks that the script runs; its
numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, save_results  # noqa: E402

VARIANTS = ("1proc_x2threads", "2proc_x1thread")
BASELINE = "1proc_x2threads"


def _command(variant: str, audit_args: list[str], out: Path) -> tuple[list[str], dict]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    threads = "2" if variant == BASELINE else "1"
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    if variant == BASELINE:
        cmd = [sys.executable, "-m", "lipverify"]
    else:
        torchrun = shutil.which("torchrun")
        cmd = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]) + [
            "--standalone", "--nproc-per-node=2", "-m", "lipverify"]
    return cmd + ["audit", *audit_args, "--out", str(out), "--quiet"], env


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _agreement(a: dict, b: dict) -> dict:
    """How far two reports of the same audit agree (1 and 2 threads may round differently)."""
    def rel(key: str) -> float:
        worst = 0.0
        for sa, sb in zip(a["samples"], b["samples"], strict=True):
            va, vb = sa[key], sb[key]
            if isinstance(va, float) and isinstance(vb, float) and va != vb:
                worst = max(worst, abs(va - vb) / max(abs(va), abs(vb)))
        return worst

    return {
        "differing_sections": sorted(k for k in a if k != "provenance" and a[k] != b.get(k)),
        "verdict": a["verdict"] == b["verdict"],
        "violations": [v["index"] for v in a["violations"]]
        == [v["index"] for v in b["violations"]],
        "certified_accuracy": a["certified_accuracy"] == b["certified_accuracy"],
        "max_rel_radius_diff": rel("radius"),
        "max_rel_min_adv_diff": rel("min_adv_distance"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-points", type=int, default=96)
    p.add_argument("--runs", type=int, default=1, help="runs of each variant (median)")
    p.add_argument("--quick", action="store_true", help="tiny model, 40 points: a smoke run")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-sharded-") as tmp:
        tmp_path = Path(tmp)
        if args.quick:
            import torch

            import lipverify
            from lipverify.models import LipConvNet

            torch.manual_seed(0)
            model = LipConvNet(conv="bcop", init_channels=2, num_classes=4,
                               activation="maxmin", last_layer="lln")
            lipverify.save_checkpoint(model.eval(), tmp_path / "tiny.pt",
                                      dataset={"name": "synthetic"})
            audit_args = [str(tmp_path / "tiny.pt"), "--dataset", "synthetic",
                          "--num-points", "40"]
        else:
            audit_args = ["--dataset", "digits", "--num-points", str(args.num_points)]
        audit_args += ["--checks", "lipschitz,attacks", "--attacks", "quick", "--seed", "0"]
        info = machine_info(threads=2)
        print(f"bench_sharded: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, "
              f"load {info['load_average_at_start']}", flush=True)

        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        stages: dict[str, dict[str, Any]] = {}
        reports: dict[str, dict] = {}
        for r in range(max(1, args.runs)):
            for variant in VARIANTS:
                out = tmp_path / f"{variant}-{r}"
                cmd, env = _command(variant, audit_args, out)
                start = time.perf_counter()
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                seconds = time.perf_counter() - start
                doc = _report(out) if (out / "report.json").exists() else None
                if doc is None:
                    sys.stderr.write(proc.stderr[-3000:])
                    print(f"{variant}: failed (exit {proc.returncode})")
                    return 1
                times[variant].append(seconds)
                reports[variant] = doc
                stages[variant] = {k: v for k, v in doc["provenance"].items()
                                   if k.endswith("seconds") or k.startswith("attack_chunks")}
                print(f"  run {r + 1} {variant}: {seconds:.1f} s", flush=True)

    median = {v: statistics.median(ts) for v, ts in times.items()}
    ratio = {v: median[BASELINE] / median[v] for v in VARIANTS}
    same = _agreement(reports[VARIANTS[0]], reports[VARIANTS[1]])
    doc = reports[BASELINE]
    print(f"workload: audit, {doc['provenance']['n_points']} points, checks lipschitz,attacks, "
          f"suite quick; verdict {doc['verdict']}, {len(doc['violations'])} violations")
    for v in VARIANTS:
        runs = ", ".join(f"{t:.1f}" for t in times[v])
        print(f"  {v:16s} median {median[v]:7.1f} s (runs {runs})   ratio {ratio[v]:.2f}x   "
              f"last run's stages {json.dumps(stages[v])}")
    print(f"  reports: {json.dumps(same)}")
    save_results(args.json, info, args, [{
        "workload": "audit", "points": doc["provenance"]["n_points"],
        "checks": "lipschitz,attacks", "suite": "quick", "baseline": BASELINE,
        "median_s": median, "runs_s": times, "ratio": ratio, "stages": stages,
        "reports_agree": same, "verdict": doc["verdict"],
    }])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
