"""A float64 twin of a model, checked by running it: the audit's exact-arithmetic stand-in.

Lower bounds and counterexamples are recomputed on a float64 deep copy of the model. A model
whose own code fixes a dtype (e.g. ``torch.norm(..., dtype=torch.float32)`` inside a
reparametrization) converts without error but fails when it runs; such a copy is *refused*
here, on a probe input, and callers fall back to the model's own dtype and say so.

Guarantee: none on values (the twin is the model's code in float64: derived quantities are
recomputed in float64); only that a returned twin ran on the probe in float64 and gave an
output of the model's shape.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["float64_twin"]


def float64_twin(
    module: nn.Module,
    probe: torch.Tensor | None = None,
    call: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[nn.Module | None, str | None]:
    """``(twin, None)``: an eval-mode float64 deep copy of ``module`` that ran on ``probe``
    (``call(twin, probe)``, default ``twin(probe)``) with an output of the same shape as the
    module's own; ``(None, reason)`` otherwise (one line, for the report)."""
    try:
        twin = copy.deepcopy(module)
        twin.to(torch.float64)
        twin.eval()
    except Exception as exc:  # noqa: BLE001 - any failure is a refusal, stated in one line
        return None, f"no float64 copy of the model ({_one_line(exc)})"
    if probe is None:
        return twin, None
    run = call or (lambda m, x: m(x))
    try:
        with torch.no_grad():
            out64 = run(twin, probe.detach().to(torch.float64))
            out = run(module, probe.detach())
    except Exception as exc:  # noqa: BLE001
        return None, f"the model does not run in float64 ({_one_line(exc)})"
    if not isinstance(out64, torch.Tensor) or out64.dtype != torch.float64:
        return None, "the model's float64 copy does not compute in float64"
    if out64.shape != getattr(out, "shape", None):
        return None, "the model's float64 copy gives outputs of another shape"
    return twin, None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"
