"""Benchmark: fast SOC (lipverify) against a plain SOC, in the same run (issue 6).

The baseline is written here: the reference algorithm, with the filter normalised on every
call and one convolution per Taylor power (12 in eval, 5 in train), plain autograd. lipverify
runs the same function (checked: max |logit difference| is reported) with

* eval forward (batch 256) and the attack workload (eval forward + backward w.r.t. the input,
  batch 256): :func:`lipverify.layers.soc.fast_eval`, i.e. cached filters and the small layers
  materialised as dense matrices, planned for ``--eval-images`` (a test set) and
  ``--attack-images`` (an attack audit) images; the build (or cache load) time is reported
  beside each speed-up;
* a train step (batch 128, SGD): the memory-lean exact backward, and ``fast_train`` (the
  approximate filter gradient of Singla & Feizi 2022, whose distance to the exact gradient is
  measured and reported).

Each workload runs the variants interleaved, median of ``--runs`` (>= 3) after a warm-up, on
``--threads`` threads (default 2). Reported per variant: images/s, peak extra RSS, for training
the bytes saved for backward (``saved_tensors_hooks``; total and per image), the ratio to the
baseline and the FLOP-count ceiling of the method (plain MAC / fast MAC).

    python benchmarks/bench_soc.py [--quick] [--json results.json] [--models 5,20] [--device cuda]

``--quick`` checks that the script runs (init_channels 8, small batches); its numbers mean
nothing. Operators are cached in a fresh temporary folder unless ``--cache-dir`` is given.
"""

from __future__ import annotations

import argparse
import copy
import math
import shutil
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_timing_arguments,
    announce,
    interleaved,
    save_results,
)

from lipverify.layers.soc import SOC, fast_eval, set_fast_train  # noqa: E402
from lipverify.layers.soc_fast import Geometry, saved_tensor_bytes  # noqa: E402
from lipverify.layers.soc_materialize import LayerPlan, materialize  # noqa: E402
from lipverify.models import LipConvNet  # noqa: E402

# ------------------------------------------------------------------------------------------
# the plain baseline


_V_DIMS = {1: (1, 3), 2: (1, 2), 3: (1, 2, 3), 4: (0, 2, 3)}
_U_DIMS = {1: (0, 2), 2: (0, 3), 3: (0,), 4: (1,)}


@torch.no_grad()
def plain_power_iteration(s: torch.Tensor, vec: dict[str, torch.Tensor], iters: int) -> None:
    """The reference's power iteration: products with the filter, then sums."""
    for _ in range(iters):
        for i in range(1, 5):
            u, v = vec[f"u{i}"], vec[f"v{i}"]
            t = (s * u).sum(_V_DIMS[i], keepdim=True)
            v.copy_(t / (t.norm() + 1e-12))
            t = (s * v).sum(_U_DIMS[i], keepdim=True)
            u.copy_(t / (t.norm() + 1e-12))


def plain_soc_forward(self: SOC, x: torch.Tensor) -> torch.Tensor:
    """Straightforward SOC: normalise the filter (power iteration in train mode, as the
    reference), space-to-depth, zero-pad channels, ``z += conv(cur, A) / i`` for each power,
    truncate, add the bias. Plain autograd stores every term."""
    w = self.random_conv_filter
    s = 0.5 * (w - torch.flip(w.transpose(0, 1), dims=(2, 3)))
    vec = self._vectors()
    if self.training:
        first = self.total_iters % self.update_freq == 0
        self.total_iters += 1
        plain_power_iteration(s.detach(), vec, self.init_iters if first else self.update_iters)
    sigma = torch.stack([(s * vec[f"u{i}"] * vec[f"v{i}"]).sum() for i in range(1, 5)]).min()
    a = self.correction * s / sigma
    if self.stride > 1:
        x = F.pixel_unshuffle(x, self.stride)
    if self.max_channels > x.shape[1]:
        x = F.pad(x, (0, 0, 0, 0, 0, self.max_channels - x.shape[1]))
    z = cur = x
    for i in range(1, self.terms + 1):
        cur = F.conv2d(cur, a, padding=self.kernel_size // 2) / i
        z = z + cur
    z = z[:, : self.out_channels]
    return z if self.bias is None else z + self.bias.view(1, -1, 1, 1)


def plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose SOC layers run :func:`plain_soc_forward`."""
    m = copy.deepcopy(model)
    for layer in m.modules():
        if isinstance(layer, SOC):
            layer.forward = types.MethodType(plain_soc_forward, layer)
    return m


# ------------------------------------------------------------------------------------------
# FLOP counts


def _geometry(p: LayerPlan) -> Geometry:
    k = int(round(math.sqrt(p.k2)))
    return Geometry(p.cols // p.hw, p.rows // p.hw, p.n // p.hw, k, p.hw, 1)


def train_macs(plans: list[LayerPlan], terms: int) -> dict[str, int]:
    """MAC per image of one train step (forward + backward) over the SOC layers."""
    plain = exact = horner = 0
    for p in plans:
        geo = _geometry(p)
        full = geo.m * geo.m * geo.k * geo.k * geo.hw  # a plain padded M x M convolution
        series = geo.series_macs(terms)
        recompute = (
            geo.term_macs(geo.cin, geo.m) + (terms - 2) * geo.term_macs() if terms > 1 else 0
        )
        plain += 3 * terms * full  # forward, input gradient, filter gradient per power
        exact += 3 * series + recompute  # forward, adjoint sweep, filter gradients, recompute
        horner += 2 * series + geo.term_macs()  # forward, adjoint sweep, one filter gradient
    return {"plain": plain, "exact": exact, "fast_train": horner}


def soc_plans(model: torch.nn.Module, size: int) -> list[LayerPlan]:
    return materialize(model, size, None, images=0, use_disk=False).layers


# ------------------------------------------------------------------------------------------
# workloads


def _forward_fn(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    return lambda: model(x)


def _attack_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], Any]:
    def step() -> torch.Tensor:
        xx = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(xx), y)
        return torch.autograd.grad(loss, xx)[0]

    return step


def _train_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], Any]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _saved(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Bytes saved for backward by one train forward: at this batch, and per image (the slope
    between this batch and half of it: weight-derived saves cancel)."""
    sizes = []
    for xb, yb in ((x, y), (x[: len(x) // 2], y[: len(y) // 2])):
        with saved_tensor_bytes() as meter:
            loss = F.cross_entropy(model(xb), yb)
        del loss
        sizes.append(meter.unique)
    per_image = (sizes[0] - sizes[1]) / (len(x) - len(x) // 2)
    return {"saved_mib": sizes[0] / 2**20, "activation_mib": per_image * len(x) / 2**20,
            "activation_bytes_per_image": per_image}


def _horner_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
                     ) -> dict[str, float]:
    """Cosine similarity and relative error of the fast_train filter gradients against the
    exact ones (same weights, same power-iteration state, same batch)."""
    grads = []
    for fast in (False, True):
        m = copy.deepcopy(model).train()
        set_fast_train(m, fast)
        socs = [c for c in m.modules() if isinstance(c, SOC)]
        loss = F.cross_entropy(m(x), y)
        grads.append(torch.autograd.grad(loss, [c.random_conv_filter for c in socs]))
    grads = [[g.double() for g in gs] for gs in grads]
    cos = [F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
           for a, b in zip(grads[0], grads[1], strict=True)]
    relerr = [((b - a).norm() / a.norm()).item() for a, b in zip(grads[0], grads[1], strict=True)]
    flat = [torch.cat([g.flatten() for g in gs]) for gs in grads]
    return {
        "cosine_min": min(cos), "cosine_median": statistics.median(cos),
        "relative_error_max": max(relerr), "relative_error_median": statistics.median(relerr),
        "cosine_all_layers": F.cosine_similarity(flat[0], flat[1], dim=0).item(),
        "relative_error_all_layers": ((flat[1] - flat[0]).norm() / flat[0].norm()).item(),
    }


def bench_train(base: torch.nn.Module, plans: list[LayerPlan], args: argparse.Namespace,
                gen: torch.Generator, common: dict[str, Any],
                fmt: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Train step at ``--train-batch``: plain, exact (lean backward) and fast_train."""
    size = base.config["input_size"]
    batch = args.train_batch
    x = torch.rand(batch, 3, size, size, generator=gen).to(args.device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(args.device)
    models = {"plain": plain_model(base).train(), "exact": copy.deepcopy(base).train(),
              "fast_train": copy.deepcopy(base).train()}
    set_fast_train(models["fast_train"])
    saved = {k: _saved(m, x, y) for k, m in models.items()}
    accuracy = _horner_accuracy(base, x, y)
    timing = interleaved({k: _train_fn(m, x, y) for k, m in models.items()}, args.runs,
                         args.warmup, batch)
    for k in timing:
        timing[k].update(saved[k])
    macs = train_macs(plans, base.layer1[0].conv.train_terms)
    res = {
        **common, "workload": "train", "batch": batch, "variants": timing,
        "ratio": {k: timing["plain"]["median_s"] / timing[k]["median_s"]
                  for k in ("exact", "fast_train")},
        "flop_ceiling": {k: macs["plain"] / macs[k] for k in ("exact", "fast_train")},
        "activation_memory_ratio": {
            k: saved[k]["activation_bytes_per_image"] / saved["plain"]["activation_bytes_per_image"]
            for k in ("exact", "fast_train")},
        "saved_bytes_ratio": {k: saved[k]["saved_mib"] / saved["plain"]["saved_mib"]
                              for k in ("exact", "fast_train")},
        "fast_train_gradient": accuracy,
    }
    fmt(res)
    r = res
    print(f"{'':15s} train   activation memory (saved per image) "
          + " ".join(f"{k} {v:.2f}x" for k, v in r["activation_memory_ratio"].items())
          + "; all saved bytes "
          + " ".join(f"{k} {v:.2f}x" for k, v in r["saved_bytes_ratio"].items())
          + f"; fast_train filter gradient vs exact: cosine {accuracy['cosine_all_layers']:.4f}"
          f" (min layer {accuracy['cosine_min']:.4f}), relative error "
          f"{accuracy['relative_error_all_layers']:.3f} (max layer "
          f"{accuracy['relative_error_max']:.3f})", flush=True)
    return res


def bench_audit(num_layers: int, args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    """The audit workload: the ``quick`` attack suite on ``--audit-points`` points of a
    LipConvNet at ``--audit-init-channels``, through :func:`lipverify.audits.audit` (attack
    stage: certify, materialise, attack) against the plain model put through the same attack
    code. Each variant runs ``--audit-runs`` times (a run takes minutes; default 1)."""
    import os

    from lipverify.audits import audit
    from lipverify.audits.attack_audit import attack_audit
    from lipverify.certificates import certify

    torch.manual_seed(0)
    model = LipConvNet(num_layers=num_layers, init_channels=args.audit_init_channels).eval()
    size = model.config["input_size"]
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(args.audit_points, 3, size, size, generator=gen)
    plain = plain_model(model).eval()
    os.environ["LIPVERIFY_CACHE_DIR"] = str(cache)  # a fresh operator cache: builds are timed

    def run_plain() -> dict[str, Any]:
        with torch.no_grad():
            cert = certify(plain, x)
        res = attack_audit(plain, x, cert.pred, cert.radius, suite="quick", seed=0)
        return {"attacked": int(res.attacked.sum()), "violations": len(res.violations)}

    def run_fast() -> dict[str, Any]:
        rep = audit(copy.deepcopy(model), x, checks=("attacks",), attacks="quick", seed=0)
        return {"attacked": rep.attacks["n_attacked"], "violations": len(rep.violations),
                "materialize_seconds": rep.provenance.get("materialize_seconds")}

    seconds: dict[str, list[float]] = {"plain": [], "lipverify": []}
    info: dict[str, Any] = {}
    for _ in range(args.audit_runs):
        for name, fn in (("plain", run_plain), ("lipverify", run_fast)):
            shutil.rmtree(cache / "soc", ignore_errors=True)
            t0 = time.perf_counter()
            info[name] = fn()
            seconds[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    res = {
        "model": f"LipConvNet-{num_layers}", "init_channels": args.audit_init_channels,
        "workload": "audit", "points": args.audit_points, "suite": "quick",
        "runs": args.audit_runs, "seconds": seconds, "median_s": med,
        "ratio": {"lipverify": med["plain"] / med["lipverify"]}, "details": info,
    }
    print(f"LipConvNet-{num_layers:<3d}    audit   quick on {args.audit_points} points, init "
          f"{args.audit_init_channels}: plain {med['plain']:.1f} s, lipverify "
          f"{med['lipverify']:.1f} s (materialise {info['lipverify']['materialize_seconds']} s "
          f"included) x{res['ratio']['lipverify']:.2f}; attacked "
          f"{info['plain']['attacked']} / {info['lipverify']['attacked']}", flush=True)
    return res


def bench_model(num_layers: int, args: argparse.Namespace, cache: Path) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    name = f"LipConvNet-{num_layers}"
    base = LipConvNet(num_layers=num_layers, init_channels=args.init_channels).eval()
    base = base.to(args.device)
    size = base.config["input_size"]
    gen = torch.Generator().manual_seed(1)
    results = []
    plans = soc_plans(base, size)
    common = {"model": name, "init_channels": args.init_channels}

    def fmt(res: dict[str, Any]) -> None:
        row = [f"{name:15s} {res['workload']:7s} b={res['batch']:<4d}"]
        for k, v in res["variants"].items():
            row.append(f"{k} {v['items_per_s']:8.1f} img/s ({v['peak_rss_mib']:.0f} MiB)")
        row.append(" ".join(f"x{r:.2f} [{k}]" for k, r in res["ratio"].items()))
        ceil = res["flop_ceiling"]
        row.append("ceiling " + " ".join(f"{k} {c:.2f}" for k, c in ceil.items()))
        if "build_seconds" in res:
            row.append(f"build {res['build_seconds']:.1f} s load {res['load_seconds']:.1f} s")
        print("  ".join(row), flush=True)

    # -- eval forward and the attack workload ---------------------------------------------
    for workload, batch, images in (
        ("eval", args.eval_batch, args.eval_images),
        ("attack", args.eval_batch, args.attack_images),
    ):
        if workload not in args.workloads:
            continue
        x = torch.rand(batch, 3, size, size, generator=gen).to(args.device)
        y = torch.randint(0, 10, (batch,), generator=gen).to(args.device)
        plain = plain_model(base).eval()
        fast = copy.deepcopy(base)
        t0 = time.perf_counter()
        with fast_eval(fast, size, cache, images=images) as report:
            setup = time.perf_counter() - t0
            extra: dict[str, Any] = {}
            if workload == "eval":
                with torch.no_grad():
                    diff = (fast(x) - plain(x)).abs().max().item()
                    timing = interleaved({"plain": _forward_fn(plain, x),
                                          "lipverify": _forward_fn(fast, x)},
                                         args.runs, args.warmup, batch)
            else:
                gp, gf = _attack_fn(plain, x, y), _attack_fn(fast, x, y)
                ref, got = gp(), gf()
                diff = (ref - got).abs().max().item()
                # MaxMin switches where two inputs tie to within rounding: a few samples may
                # take the other branch (their gradients differ), the rest agree to rounding
                per = ((got - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1))
                extra = {"gradient_max_abs": ref.abs().max().item(),
                         "samples_relative_difference_above_1e-4": int((per > 1e-4).sum()),
                         "median_relative_difference": per.median().item()}
                timing = interleaved({"plain": gp, "lipverify": gf}, args.runs, args.warmup,
                                     batch)
            plain_macs, fast_macs = report.macs_per_image()
            res = {
                **common, "workload": workload, "batch": batch, "variants": timing,
                "ratio": {"lipverify": timing["plain"]["median_s"]
                          / timing["lipverify"]["median_s"]},
                "flop_ceiling": {"lipverify": plain_macs / fast_macs},
                "build_seconds": report.build_seconds, "load_seconds": report.load_seconds,
                "setup_seconds": setup, "images_planned": images,
                "materialized": report.materialized, "max_abs_difference": diff, **extra,
                "plan": report.as_dict(),
            }
            fmt(res)
            results.append(res)
        del plain, fast

    # -- train step ----------------------------------------------------------------------
    if "train" in args.workloads:
        results.append(bench_train(base, plans, args, gen, common, fmt))

    if "audit" in args.workloads and num_layers in args.audit_models:
        results.append(bench_audit(num_layers, args, cache))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model and batches")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--models", default="5,20", help="LipConvNet depths (default 5,20)")
    p.add_argument("--init-channels", type=int, default=32)
    add_timing_arguments(p)
    p.add_argument("--eval-images", type=float, default=10_000,
                   help="images the eval plan must repay (a test set)")
    p.add_argument("--attack-images", type=float, default=100_000,
                   help="images the attack plan must repay (~1000 steps x 100 points)")
    p.add_argument("--cache-dir", type=Path, help="persistent operator cache (default: fresh)")
    p.add_argument("--workloads", default="eval,attack,train,audit",
                   help="comma-separated subset of eval,attack,train,audit")
    p.add_argument("--audit-models", default="5",
                   help="depths that also run the audit workload (default 5)")
    p.add_argument("--audit-points", type=int, default=100)
    p.add_argument("--audit-init-channels", type=int, default=16)
    p.add_argument("--audit-runs", type=int, default=1,
                   help="runs of the audit workload per variant (each takes minutes)")
    p.add_argument("--device", default="cpu",
                   help="cpu (default) or cuda: models and batches of the eval, attack and "
                        "train workloads live there (timings synchronise CUDA); the audit "
                        "workload stays on the CPU")
    args = p.parse_args(argv)
    if args.quick:
        args.init_channels, args.eval_batch, args.train_batch = 8, 32, 16
        args.audit_init_channels, args.audit_points = 4, 4
        args.models = args.models if "--models" in (argv or sys.argv) else "5"
    if args.runs < 3:
        p.error("--runs must be at least 3 (the median of at least 3 runs)")
    args.workloads = set(args.workloads.split(","))
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU is available")
    args.audit_models = {int(d) for d in args.audit_models.split(",") if d}
    info = announce("bench_soc", args.threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="lipverify-bench-") as tmp:
        cache = args.cache_dir or Path(tmp)
        for depth in (int(d) for d in args.models.split(",")):
            results += bench_model(depth, args, cache)
    save_results(args.json, info, args, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
