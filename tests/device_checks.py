"""Device-equivalence checks behind the ``gpu`` tests (tests/test_gpu.py).

Every check takes the device under test and a reference device (and dtypes), so the same code
runs CPU against CPU (or float32 against float64) in the default session
(tests/test_device_checks.py) and CUDA against CPU on a GPU machine.

Tolerance: a compared tensor group (logits, input gradient, all parameter gradients as one
vector, certified radii) has the error ``max|a - b| / max(1, max|b|)`` against the reference
``b``, i.e. an absolute error for values up to 1 and a relative one above; the group matches
when that error is at most ``tol`` (default :data:`TOL`, 1e-5). Comparisons on CUDA run inside
:func:`ieee_float32`, since CUDA float32 convolutions and matmuls default to TF32 (10-bit
mantissa), which cannot meet 1e-5.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TOL = 1e-5
CONVS = ("soc", "cayley", "bcop")
# The tiny synthetic run of the AMP and multi-process checks (seconds on a CPU).
TINY_TRAIN = ["--dataset", "synthetic", "--init-channels", "2", "--epochs", "1",
              "--limit-train", "65", "--limit-test", "32", "--batch-size", "16",
              "--no-shuffle", "--augment", "none", "--gamma", "0.1"]


# -- precision -------------------------------------------------------------------------------
def precision_flags() -> dict[str, Any]:
    """The current float32 precision settings of CUDA convolutions and matmuls."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if hasattr(conv, "fp32_precision") and hasattr(matmul, "fp32_precision"):
        return {"api": "fp32_precision", "cudnn.conv": conv.fp32_precision,
                "cuda.matmul": matmul.fp32_precision}
    return {"api": "allow_tf32", "cudnn": torch.backends.cudnn.allow_tf32,
            "cuda.matmul": matmul.allow_tf32}


def _set_precision(flags: dict[str, Any]) -> None:
    if flags["api"] == "fp32_precision":
        torch.backends.cudnn.conv.fp32_precision = flags["cudnn.conv"]
        torch.backends.cuda.matmul.fp32_precision = flags["cuda.matmul"]
    else:
        torch.backends.cudnn.allow_tf32 = flags["cudnn"]
        torch.backends.cuda.matmul.allow_tf32 = flags["cuda.matmul"]


@contextmanager
def ieee_float32() -> Iterator[dict[str, Any]]:
    """IEEE float32 (no TF32) for CUDA convolutions and matmuls inside the block.

    Uses ``fp32_precision = "ieee"`` where this torch has it (2.9 and later), else the older
    ``allow_tf32 = False`` flags (never both: torch refuses to mix the two APIs); the previous
    settings are restored on exit. Yields the settings in force inside the block.
    """
    saved = precision_flags()
    if saved["api"] == "fp32_precision":
        inside = {"api": "fp32_precision", "cudnn.conv": "ieee", "cuda.matmul": "ieee"}
    else:
        inside = {"api": "allow_tf32", "cudnn": False, "cuda.matmul": False}
    _set_precision(inside)
    try:
        yield precision_flags()
    finally:
        _set_precision(saved)


# -- error measure ---------------------------------------------------------------------------
def group_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|got - ref| / max(1, max|ref|)`` in float64 (0 for empty tensors)."""
    got, ref = got.detach().cpu().double(), ref.detach().cpu().double()
    if got.shape != ref.shape:
        raise ValueError(f"shape mismatch {tuple(got.shape)} vs {tuple(ref.shape)}")
    if ref.numel() == 0:
        return 0.0
    return float((got - ref).abs().max() / max(1.0, float(ref.abs().max())))


@dataclass
class Comparison:
    """Errors per tensor group against the reference, and the tolerance they must meet."""

    errors: dict[str, float]
    tol: float = TOL
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(e <= self.tol for e in self.errors.values())

    def __str__(self) -> str:
        errs = ", ".join(f"{k} {v:.3g}" for k, v in self.errors.items())
        return f"errors ({errs}) vs tolerance {self.tol:g}; {self.info}"


# -- models ----------------------------------------------------------------------------------
def lipconvnet(conv: str, seed: int = 0, init_channels: int = 4, num_layers: int = 5,
               activation: str = "hh1", last_layer: str = "lln") -> nn.Module:
    """A seeded LipConvNet on the CPU, float32."""
    from lipverify.models import LipConvNet

    torch.manual_seed(seed)
    return LipConvNet(conv=conv, activation=activation, num_layers=num_layers,
                      init_channels=init_channels, last_layer=last_layer)


def batch(n: int = 4, seed: int = 1, size: int = 32, classes: int = 10
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded pixels in [0, 1] (CPU, float32) and labels."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, train: bool,
                     device: torch.device | str, dtype: torch.dtype = torch.float32
                     ) -> dict[str, torch.Tensor]:
    """Logits, gradient of the mean cross-entropy w.r.t. the input and w.r.t. all parameters
    (one flat vector) of a copy of ``model`` on ``device``/``dtype`` in train or eval mode.
    ``model`` itself is untouched (train-mode SOC advances its power iteration in the copy)."""
    m = copy.deepcopy(model).to(device=device, dtype=dtype).train(train)
    xx = x.to(device=device, dtype=dtype).requires_grad_(True)
    logits = m(xx)
    loss = F.cross_entropy(logits, y.to(device))
    params = [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [xx, *params], allow_unused=True)
    flat = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads[1:],
                                                                    strict=True)]
    return {"logits": logits.detach().cpu(), "input_grad": grads[0].detach().cpu(),
            "param_grads": torch.cat([g.detach().flatten() for g in flat]).cpu()}


def compare_forward_backward(model: nn.Module, train: bool, device: torch.device | str,
                             ref_device: torch.device | str = "cpu",
                             dtype: torch.dtype = torch.float32,
                             ref_dtype: torch.dtype = torch.float32, n: int = 4,
                             tol: float = TOL) -> Comparison:
    """Forward and backward of ``model`` on ``device`` against ``ref_device`` (same weights,
    same batch), IEEE float32 on CUDA."""
    x, y = batch(n, classes=model.config["num_classes"])
    with ieee_float32() as flags:
        got = forward_backward(model, x, y, train, device, dtype)
        ref = forward_backward(model, x, y, train, ref_device, ref_dtype)
    errors = {k: group_error(got[k], ref[k]) for k in ref}
    return Comparison(errors, tol, {"device": str(device), "ref_device": str(ref_device),
                                    "dtype": str(dtype), "ref_dtype": str(ref_dtype),
                                    "train": train, "precision": flags})


# -- certificates and the audit --------------------------------------------------------------
def compare_certify(model: nn.Module, x: torch.Tensor, device: torch.device | str,
                    ref_device: torch.device | str = "cpu", tol: float = TOL) -> Comparison:
    """``lipverify.certify`` on ``device`` against ``ref_device``: radii within ``tol``;
    ``info["pred_mismatches"]`` counts differing predictions."""
    from lipverify.certificates import certify

    with ieee_float32() as flags:
        got = certify(copy.deepcopy(model).to(device), x.to(device))
        ref = certify(copy.deepcopy(model).to(ref_device), x.to(ref_device))
    mismatches = int((got.pred.cpu() != ref.pred.cpu()).sum())
    return Comparison({"radius": group_error(got.radius, ref.radius),
                       "logits": group_error(got.logits, ref.logits)}, tol,
                      {"pred_mismatches": mismatches, "precision": flags})


def audit_summary(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  device: torch.device | str, attacks: str = "quick",
                  checks: tuple[str, ...] = ("lipschitz", "gnp", "attacks")) -> dict[str, Any]:
    """Verdict, radii, bounds and attack counts of an audit of a copy of ``model`` on
    ``device``."""
    from lipverify.audits import audit

    rep = audit(copy.deepcopy(model).to(device), x.to(device), y.to(device), attacks=attacks,
                checks=checks, seed=0, lipschitz_points=min(8, x.shape[0]))
    return {"verdict": rep.verdict, "radius": torch.tensor([s["radius"] for s in rep.samples]),
            "pred": torch.tensor([s["pred"] for s in rep.samples]),
            "upper": rep.lipschitz_upper, "lower": rep.lipschitz_lower,
            "violations": len(rep.violations),
            "attacked": None if rep.attacks is None else rep.attacks["n_attacked"]}


def compare_audit(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  device: torch.device | str, ref_device: torch.device | str = "cpu",
                  attacks: str = "quick",
                  checks: tuple[str, ...] = ("lipschitz", "gnp", "attacks"),
                  tol: float = TOL) -> Comparison:
    """An audit on ``device`` against one on ``ref_device``: radii and the guaranteed upper
    bound within ``tol``; ``info`` holds both verdicts, the prediction mismatches and the
    attained lower bounds (reported, not compared: attacks and ascent may take other paths)."""
    with ieee_float32() as flags:
        got = audit_summary(model, x, y, device, attacks, checks)
        ref = audit_summary(model, x, y, ref_device, attacks, checks)
    errors = {"radius": group_error(got["radius"], ref["radius"])}
    if ref["upper"] is not None and got["upper"] is not None:
        errors["upper"] = abs(got["upper"] - ref["upper"]) / max(1.0, abs(ref["upper"]))
    info = {"verdict": got["verdict"], "ref_verdict": ref["verdict"],
            "pred_mismatches": int((got["pred"] != ref["pred"]).sum()),
            "upper": (got["upper"], ref["upper"]), "lower": (got["lower"], ref["lower"]),
            "violations": (got["violations"], ref["violations"]),
            "attacked": (got["attacked"], ref["attacked"]), "precision": flags}
    return Comparison(errors, tol, info)


# -- training runs (AMP, multi-process) ------------------------------------------------------
def _env() -> dict[str, str]:
    # one thread per process: float results do not depend on the thread count; no TF32 in
    # cuBLAS and cuDNN (NVIDIA_TF32_OVERRIDE=0), as ieee_float32 does in this process
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "NVIDIA_TF32_OVERRIDE": "0"}


def run_training(out: Path, device: str, nproc: int = 1, extra: tuple[str, ...] = (),
                 timeout: float = 300) -> subprocess.CompletedProcess:
    """``lipverify train`` on :data:`TINY_TRAIN` into ``out``: one process, or ``nproc``
    ranks under ``torch.distributed.run`` (gloo on CPU, nccl on CUDA, rank r on cuda:r);
    TF32 off."""
    head = [sys.executable, "-m"]
    if nproc > 1:
        head += ["torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]
    cmd = [*head, "lipverify", "train", *TINY_TRAIN, "--device", device, "--out", str(out),
           *extra]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def run_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_state(out: Path) -> dict[str, torch.Tensor]:
    from lipverify.checkpoints import read_checkpoint

    return read_checkpoint(out / "last.pt")["state_dict"]


def compare_runs(got: Path, ref: Path, tol: float = TOL) -> Comparison:
    """Two finished training runs: final weights (floating tensors) and the first epoch's
    training loss within ``tol``; ``info["train_acc"]`` holds both accuracies."""
    a, b = run_state(got), run_state(ref)
    if set(a) != set(b):
        raise ValueError(f"different state keys: {sorted(set(a) ^ set(b))}")
    floats = [k for k in b if b[k].is_floating_point()]
    weights = max(group_error(a[k], b[k]) for k in floats)
    ma, mb = run_metrics(got)[0], run_metrics(ref)[0]
    loss = abs(ma["train_loss"] - mb["train_loss"]) / max(1.0, abs(mb["train_loss"]))
    return Comparison({"weights": weights, "train_loss": loss}, tol,
                      {"train_acc": (ma["train_acc"], mb["train_acc"])})


def amp_check(tmp: Path, device: str) -> dict[str, Any]:
    """One epoch of ``lipverify train --amp`` on ``device`` and the same run in float32.

    Returns whether a gradient scaler ran (its state is saved in last.pt; on a CPU ``--amp``
    falls back to float32 and saves none), whether every weight is finite, both training
    losses, and the weight error of the AMP run against the float32 one (0 when autocast was
    not in effect; small but non-zero under float16 autocast).
    """
    from lipverify.checkpoints import read_checkpoint

    runs = {}
    for name, extra in (("amp", ("--amp",)), ("fp32", ())):
        proc = run_training(tmp / name, device, extra=extra)
        if proc.returncode != 0:
            raise RuntimeError(f"lipverify train {' '.join(extra)} on {device} failed: "
                               f"{proc.stderr[-3000:]}")
        runs[name] = proc
    payload = read_checkpoint(tmp / "amp" / "last.pt")
    state = payload["state_dict"]
    return {
        "scaler": "scaler" in payload["extra"],
        "finite": all(bool(torch.isfinite(t).all()) for t in state.values()
                      if t.is_floating_point()),
        "train_loss": (run_metrics(tmp / "amp")[0]["train_loss"],
                       run_metrics(tmp / "fp32")[0]["train_loss"]),
        "weights_error": compare_runs(tmp / "amp", tmp / "fp32").errors["weights"],
        "log": (runs["amp"].stdout + runs["amp"].stderr)[-4000:],
    }
