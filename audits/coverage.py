"""Does a per-layer bound see everything the model runs? Refusals, with their reasons.

Per-layer bounds read a layer's weights and type. Code that changes what a layer computes
without changing either is invisible to them, so the audit refuses to release an upper bound
when any of these is present (one reason per finding):

* forward hooks and forward pre-hooks, on any module or global (``register_module_forward_*``);
* an instance-level ``forward`` (``'forward' in m.__dict__``) or ``_call_impl``, or a class
  whose ``__call__`` is not ``nn.Module.__call__``;
* parametrizations (``torch.nn.utils.parametrize``), except :data:`READ_PARAMETRIZATIONS` on
  the ``weight`` of an ``nn.Linear`` or ``nn.Conv2d``: the bound reads ``layer.weight``, which
  *is* the parametrization's result as forward uses it (tested against exact Jacobians);
* non-finite parameters or buffers (a NaN weight makes every output NaN);
* a module applied a different number of times than the composition lists it
  (:func:`repeated_application`: e.g. a module called in a loop).

Guarantee: none by itself; it only removes cases where a bound would not cover the function.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.nn.modules import module as _module
from torch.nn.utils import parametrizations as _param
from torch.nn.utils import parametrize

__all__ = ["READ_PARAMETRIZATIONS", "unseen_code", "non_finite", "torch_type",
           "repeated_application"]

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


def _global_hooks() -> list[str]:
    found = []
    for name in ("_global_forward_hooks", "_global_forward_pre_hooks"):
        if getattr(_module, name, None):
            found.append(f"global {name.strip('_').replace('_', ' ')} are registered "
                         "(torch.nn.modules.module.register_module_forward_*): remove them")
    return found


def unseen_code(model: nn.Module) -> list[str]:
    """Reasons why per-layer bounds of ``model`` would not cover what it runs (empty: none
    found). Each names the module (``<root>`` for the model itself) and what to change."""
    reasons = _global_hooks()
    for name, m in model.named_modules():
        where = name or "<root>"
        if m._forward_hooks or m._forward_pre_hooks:
            reasons.append(f"{where}: forward hooks change its output; remove them "
                           "(a hook's effect is not in the layer's bound)")
        if "forward" in m.__dict__ or "_call_impl" in m.__dict__:
            reasons.append(f"{where}: an instance-level forward replaces the class's; the "
                           "bound would read the class's weights only")
        if type(m).__call__ is not nn.Module.__call__:
            reasons.append(f"{where}: its class overrides __call__")
        if parametrize.is_parametrized(m) and not _read_parametrized(m):
            kinds = sorted({type(p).__name__ for plist in m.parametrizations.values()
                            for p in plist})
            reasons.append(f"{where}: parametrized ({', '.join(kinds)}); only "
                           f"{', '.join(c.__name__ for c in READ_PARAMETRIZATIONS)} on the "
                           "weight of nn.Linear/nn.Conv2d are read by the bounds")
    return reasons + non_finite(model)


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


def repeated_application(
    units: Sequence[tuple[str, nn.Module]], calls: dict[int, int], modules: Iterable[nn.Module]
) -> list[str]:
    """Modules whose number of calls on a probe pass differs from their number of places in
    the composition ``units`` (both counted per module instance). ``calls`` maps ``id`` to
    the count of forward calls on one probe pass; ``modules`` are all modules of the map."""
    listed: dict[int, int] = {}
    names: dict[int, str] = {}
    for name, m in units:
        listed[id(m)] = listed.get(id(m), 0) + 1
        names.setdefault(id(m), name)
    out = []
    for m in {id(m): m for m in modules}.values():
        want, got = listed.get(id(m)), calls.get(id(m), 0)
        if want is not None and got != want:
            out.append(f"{names[id(m)]}: applied {got} time(s) on one pass but the composition "
                       f"bounds it {want} time(s) (e.g. a module called in a loop); refusing")
    return out
