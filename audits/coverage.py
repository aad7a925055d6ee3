"""What the per-layer routes read: torch's read-through parametrizations and non-finite state.

The graph auditor (:mod:`lipverify.audits.capture`, :mod:`lipverify.audits.graph`) sees hooks,
instance forwards, ``__call__`` overrides, parametrizations and repeated applications as ops
of the captured graph. What remains here:

* :func:`torch_type`: the torch class under torch's read-through parametrizations
  (:data:`READ_PARAMETRIZATIONS` on the ``weight`` of an ``nn.Linear`` or ``nn.Conv2d``),
  for the per-layer routes that read ``layer.weight``;
* :func:`non_finite`: non-finite parameters or buffers (a NaN weight makes every output NaN),
  a refusal with one reason per finding.

Guarantee: none by itself; it only removes cases where a bound would not cover the function.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrizations as _param
from torch.nn.utils import parametrize

__all__ = ["READ_PARAMETRIZATIONS", "non_finite", "torch_type"]

READ_PARAMETRIZATIONS: tuple[type, ...] = (
    _param._Orthogonal, _param._SpectralNorm, _param._WeightNorm,
)
"""Parametrizations of torch whose result, in eval mode, is a deterministic function of the
layer's state that ``layer.weight`` returns exactly as forward uses it."""

_READ_BASES = (nn.Linear, nn.Conv2d)


def _read_parametrized(m: nn.Module) -> bool:
    """``m`` is torch's parametrized subclass of Linear/Conv2d with only read-through
    parametrizations, on ``weight`` only."""
    cls = type(m)
    if not (parametrize.is_parametrized(m) and len(cls.__bases__) == 1
            and cls.__bases__[0] in _READ_BASES and cls.forward is cls.__bases__[0].forward):
        return False
    plist = m.parametrizations
    return set(plist.keys()) == {"weight"} and all(
        type(p) in READ_PARAMETRIZATIONS for p in plist["weight"]
    )


def torch_type(layer: nn.Module) -> type:
    """``type(layer)``, or the torch class under a read-through parametrization."""
    return type(layer).__bases__[0] if _read_parametrized(layer) else type(layer)




def non_finite(model: nn.Module) -> list[str]:
    """Non-finite parameters and buffers (outside parametrizations' own state) and non-finite
    read-through parametrized weights, one reason each."""
    reasons: list[str] = []
    inside_parametrization: set[int] = set()
    for m in model.modules():
        if parametrize.is_parametrized(m):
            inside_parametrization |= {id(s) for s in m.parametrizations.modules()}
    for name, m in model.named_modules():
        where = name or "<root>"
        if id(m) in inside_parametrization:
            continue  # the parametrization's own state (original, u, v) is checked via .weight
        for pname, t in list(m.named_parameters(recurse=False)) + list(
            m.named_buffers(recurse=False)
        ):
            if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all()):
                reasons.append(f"{where}.{pname}: not finite (NaN or inf)")
    for name, m in model.named_modules():
        if _read_parametrized(m):
            with torch.no_grad():
                w = m.weight
            if not bool(torch.isfinite(w).all()):
                reasons.append(f"{name or '<root>'}.weight: the parametrized weight is not "
                               "finite")
    return reasons
