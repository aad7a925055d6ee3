"""The original AutoAttack (Croce & Hein 2020, the ``autoattack`` package) against the built-in
default through :func:`lipverify.fast`: robust accuracy must be at least certified accuracy.

``python -m lipverify.attacks.autoattack_original [--n 8] [--eps 36/255] [--threads 1]`` runs
``AutoAttack(fast_module, norm="L2", eps=eps, version="standard")`` on the first ``n`` points of
the digits test split. Pixels are in [0, 1], and the certified radii are l2 in pixel space, so
they are the eps AutoAttack takes. It then checks every point certified at ``eps`` (correct, and
radius > eps). If the adversarial example AutoAttack returns for such a point is classified
correctly by the model, within ``eps`` of the point, the certificate held. Robust accuracy is
then >= certified accuracy.

Guarantee: none for the model. Attacks can only refute a certificate. A failure (exit 1) is a
certified point whose prediction AutoAttack changed within eps: a counterexample, or a bug.
Exit codes: 0 passed, 1 failed, 2 bad input, 3 nothing run (``autoattack`` is not importable;
the original AutoAttack is not on PyPI: install it from its source tree).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from typing import Any

import torch

from lipverify.cli import (
    EXIT_BAD_INPUT,
    EXIT_INCONCLUSIVE,
    EXIT_OK,
    EXIT_UNSOUND,
    nonneg_int,
    one_line,
    positive_int,
)
from lipverify.errors import LipverifyError

__all__ = ["run", "verdict", "main", "NOT_IMPORTABLE"]

NOT_IMPORTABLE = (
    "the original AutoAttack (package 'autoattack') is not importable: skipped. It is not on "
    "PyPI; install it from its source tree (pip install PATH/TO/auto-attack)"
)


def verdict(certified: torch.Tensor, robust: torch.Tensor, within: torch.Tensor
            ) -> dict[str, Any]:
    """Per point: ``certified`` at eps, ``robust`` (correct on the returned example), ``within``
    eps. An example beyond eps is no attack success (its point counts as robust, and is
    listed). Passed when no certified point is broken within eps and robust accuracy >=
    certified accuracy."""
    robust = robust | ~within
    broken = certified & ~robust
    n = max(1, certified.numel())
    return {
        "certified_accuracy": float(certified.sum()) / n,
        "robust_accuracy": float(robust.sum()) / n,
        "counterexamples": [int(i) for i in torch.nonzero(broken).flatten()],
        "beyond_eps": [int(i) for i in torch.nonzero(~within).flatten()],
        "passed": not bool(broken.any()) and float(robust.sum()) >= float(certified.sum()),
    }


def run(n: int = 8, eps: float = 36 / 255, seed: int = 0, verbose: bool = True
        ) -> dict[str, Any]:
    """Attack the first ``n`` digits test points of the built-in default; the timings, the
    accuracies and :func:`verdict`. Raises ``ImportError`` when ``autoattack`` is missing."""
    autoattack = importlib.import_module("autoattack")
    import lipverify
    from lipverify.errors import InputError

    model, (x, y) = lipverify.load_default()
    if not 0 < n <= len(x):
        raise InputError(f"--n must lie in [1, {len(x)}] (the digits test split), got {n}")
    device = next(model.parameters()).device
    x, y = x[:n].to(device), y[:n].to(device)
    t0 = time.perf_counter()
    module = lipverify.fast(model)
    build = time.perf_counter() - t0
    cert = lipverify.certify(model, x)
    certified = (cert.pred == y) & (cert.radius > eps)
    adversary = autoattack.AutoAttack(module, norm="L2", eps=eps, version="standard", seed=seed,
                                      device=device, verbose=verbose)
    t1 = time.perf_counter()
    x_adv = adversary.run_standard_evaluation(x, y, bs=n)
    attack = time.perf_counter() - t1
    with torch.no_grad():
        pred_fast = module(x_adv).argmax(1)
        pred_model = model.eval()(x_adv).argmax(1)
    dist = (x_adv - x).flatten(1).norm(dim=1)
    within = dist <= eps * (1 + 1e-6)
    out = verdict(certified.cpu(), (pred_model == y).cpu(), within.cpu())
    out.update(
        n=n, eps=eps, seed=seed, build_seconds=build, attack_seconds=attack,
        total_seconds=time.perf_counter() - t0, max_l2=float(dist.max()),
        fast_module_bytes=module.nbytes, fast_and_model_agree=bool((pred_fast == pred_model).all()),
        clean_accuracy=float((cert.pred == y).float().mean()),
    )
    return out


def _eps(text: str) -> float:
    from lipverify.certify_cmd import parse_radius

    return parse_radius(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lipverify.attacks.autoattack_original",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=positive_int, default=8, help="points (default 8)")
    p.add_argument("--eps", type=_eps, default=36 / 255, help="l2 radius, e.g. 36/255")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--json", default=None, help="also write the result as JSON (atomically)")
    p.add_argument("--quiet", action="store_true", help="no AutoAttack progress lines")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads (default 1: a batch of a few points gains nothing from "
                        "more, and on a busy machine extra threads wait for each other)")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        res = run(args.n, args.eps, args.seed, verbose=not args.quiet)
    except ImportError as e:
        if getattr(e, "name", None) != "autoattack":
            raise
        print(NOT_IMPORTABLE, file=sys.stderr)
        return EXIT_INCONCLUSIVE
    except LipverifyError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        torch.set_num_threads(threads)
    print(f"original AutoAttack (standard, L2) at eps {res['eps']:.6f} on {res['n']} points of "
          f"the built-in default, through lipverify.fast: robust accuracy "
          f"{res['robust_accuracy']:.1%} >= certified accuracy {res['certified_accuracy']:.1%}: "
          f"{'PASSED' if res['passed'] else 'FAILED'} (attack {res['attack_seconds']:.1f} s, "
          f"fast module built in {res['build_seconds']:.1f} s, "
          f"{res['total_seconds']:.1f} s in all)")
    if res["counterexamples"]:
        print(f"certified points broken within eps: {res['counterexamples']}")
    if args.json:
        from lipverify.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(res, indent=2, sort_keys=True) + "\n")
    return EXIT_OK if res["passed"] else EXIT_UNSOUND


if __name__ == "__main__":
    sys.exit(main())
