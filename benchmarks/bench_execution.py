"""The price of float32 rounding in certificates (issue 15), on the built-in default and on
the reference-format LipConvNet-5 checkpoints in ``../shared/compat`` (SOC with HH1 or HH2,
BCOP with MaxMin; each on its 16 CIFAR images).

For each model and point set it prints, against the real-valued certificates computed in
the same run (the baseline):

* the relative price of rounding ``(r - r̂) / r`` (median and maximum over certified points),
  with ``r̂`` the radius of ``certify(execution="float32")``;
* the bound ``delta`` on the margin error and the observed ``|margin_fp32 - margin_fp64|`` at
  the points (median), and their ratio (median over points);
* the ops that dominate ``delta`` (median share);
* seconds of ``certify`` real and float32, and their ratio.

    python benchmarks/bench_execution.py [--threads 2] [--n 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

from lipverify.certificates import certify
from lipverify.execution import execution_bound

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import setup_threads  # noqa: E402


def _observed(model: torch.nn.Module, x: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """``max_j |margin_fp32 - margin_fp64|`` per point (float64 twin of the model)."""
    twin = copy.deepcopy(model).double()
    with torch.no_grad():
        l32, l64 = model(x).double(), twin(x.double())
    m32 = l32.gather(1, pred[:, None]) - l32
    m64 = l64.gather(1, pred[:, None]) - l64
    return (m32 - m64).abs().max(1).values


#: reference-format LipConvNet-5 checkpoints (../shared/compat) and their CIFAR images
REFERENCE = (
    ("soc-lipconvnet5-hh1-lln-c10.pt", "LipConvNet-5 (reference checkpoint: SOC, HH1, LLN, C10)"),
    ("soc-lipconvnet5-hh2-lln-c100.pt",
     "LipConvNet-5 (reference checkpoint: SOC, HH2, LLN, C100)"),
    ("bcop-lipconvnet5-maxmin-lln-c10.pt",
     "LipConvNet-5 (reference checkpoint: BCOP, MaxMin, LLN, C10)"),
)


def measure(name: str, model: torch.nn.Module, x: torch.Tensor) -> dict:
    certify(model, x[:1])  # warm-up: eval caches (SOC's A, BCOP's filter) built outside timing
    t0 = time.perf_counter()
    real = certify(model, x)
    t1 = time.perf_counter()
    ex = certify(model, x, execution="float32")
    t2 = time.perf_counter()
    ok = real.radius > 0
    price = ((real.radius.double() - ex.radius.double()) / real.radius.double())[ok]
    delta = ex.delta.max(1).values
    observed = _observed(model, x, real.pred)
    ratio = delta / observed.clamp_min(1e-300)
    ops = execution_bound(model, x[:32], real.radius[:32].double()).dominant(4)
    row = {
        "model": name, "points": int(x.shape[0]), "certified": int(ok.sum()),
        "price_median": float(price.median()), "price_max": float(price.max()),
        "delta_median": float(delta.median()), "observed_median": float(observed.median()),
        "observed_max": float(observed.max()), "delta_over_observed_median":
        float(ratio.median()), "dominant_ops": ops,
        "certify_real_s": round(t1 - t0, 3), "certify_float32_s": round(t2 - t1, 3),
        "time_ratio": round((t2 - t1) / max(t1 - t0, 1e-9), 2),
    }
    print(f"\n{name}: {row['points']} points, {row['certified']} certified")
    print(f"  price (r - r_exec)/r: median {row['price_median']:.4f}, max "
          f"{row['price_max']:.4f}")
    print(f"  delta median {row['delta_median']:.3g}; observed |m32 - m64| median "
          f"{row['observed_median']:.3g} (max {row['observed_max']:.3g}); delta/observed "
          f"median {row['delta_over_observed_median']:.3g}")
    print("  dominant ops (median share of delta): " + ", ".join(
        f"{o['op']} {o['median_share']:.3g}" for o in ops))
    print(f"  certify: real {row['certify_real_s']} s, float32 {row['certify_float32_s']} s "
          f"(ratio {row['time_ratio']})")
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=200, help="points of the default's test split")
    ap.add_argument("--json")
    args = ap.parse_args()
    setup_threads(args.threads)
    from lipverify.checkpoints import load_model
    from lipverify.default import load_default

    rows = []
    model, (x, _) = load_default()
    rows.append(measure("built-in default (LipConvNet-5, SOC, HH1, LLN, digits)", model,
                        x[: args.n]))
    shared = Path(os.environ.get("LIPVERIFY_SHARED",
                                 Path(__file__).resolve().parents[2] / "shared"))
    for fname, what in REFERENCE:
        ref = shared / "compat" / fname
        if not ref.is_file():
            print(f"\n(skipped {fname}: {ref} is missing)")
            continue
        obj = torch.load(ref, weights_only=True)
        rows.append(measure(what, load_model(str(ref)), obj["inputs_pixels"].float()))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
