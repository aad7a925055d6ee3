"""The catalogue of parameter-free and elementwise layers with a known Lipschitz constant.

Each entry states the exact condition under which its constant holds and checks it on the
layer as it is (finite parameters, continuity, the range of each parameter, eval mode).
A layer whose condition fails gets *no* bound, with the failed condition as the reason; a
layer of a type not listed here is not in the catalogue (``None``).

Guarantee: when :func:`catalogue_bound` returns a number, it is an upper bound on the
Lipschitz constant (l2 -> l2, per sample) of the layer's eval-mode map on every input, in
exact arithmetic. Matching is by exact type (a subclass may change ``forward``), except for
lipverify's pair activations, which match when their class keeps the original ``forward``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lipverify.layers.activations import HouseholderOrder1, HouseholderOrder2, MaxMin

__all__ = ["Entry", "CATALOGUE", "catalogue_bound", "catalogue_entry"]


@dataclass(frozen=True)
class Entry:
    """A catalogue entry: ``constant(layer)`` holds whenever ``check(layer)`` returns None.

    ``condition`` is the exact condition, in words (for the report); ``check`` returns the
    reason it fails, or None. ``exact`` says the constant is attained (not only a bound)."""

    types: tuple[type, ...]
    constant: Callable[[nn.Module], float]
    condition: str
    check: Callable[[nn.Module], str | None]
    exact: bool = True
    own_forward: bool = False  # match subclasses that keep the class's forward


def _finite_params(layer: nn.Module) -> str | None:
    for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all()):
            return f"{name} is not finite"
    return None


def _finite_attr(*names: str) -> Callable[[nn.Module], str | None]:
    def check(layer: nn.Module) -> str | None:
        for n in names:
            v = getattr(layer, n)
            if not (isinstance(v, (int, float)) and math.isfinite(float(v))):
                return f"{n} = {v!r} is not a finite number"
        return None

    return check


def _eval_mode(layer: nn.Module) -> str | None:
    return "the layer is in training mode" if layer.training else None


def _always(_layer: nn.Module) -> str | None:
    return None


def _hardtanh(layer: nn.Module) -> str | None:
    lo, hi = float(layer.min_val), float(layer.max_val)
    if math.isnan(lo) or math.isnan(hi):
        return f"min_val = {lo}, max_val = {hi}: NaN"
    if lo > hi:
        return f"min_val = {lo} > max_val = {hi}"
    return None


def _softplus(layer: nn.Module) -> str | None:
    beta, thr = float(layer.beta), float(layer.threshold)
    if not (math.isfinite(beta) and beta > 0):
        return f"beta = {beta} is not finite and positive"
    if thr != math.inf:
        # torch returns x where beta * x > threshold: a jump of log(1 + e^-t) / beta there
        jump = math.log1p(math.exp(-thr)) / beta if thr > -700 else math.inf
        return (f"threshold = {thr:g} is finite: torch switches to the identity above "
                f"threshold / beta, a jump of {jump:.3g} (not continuous, so not Lipschitz); "
                "use threshold=inf")
    return None


CATALOGUE: tuple[Entry, ...] = (
    Entry((MaxMin, HouseholderOrder1, HouseholderOrder2), lambda _m: 1.0,
          "continuous and piecewise orthogonal on channel pairs (HH2: angles clamped to "
          "[0, 2 pi]); parameters finite", _finite_params, own_forward=True),
    Entry((nn.ReLU, nn.ReLU6), lambda _m: 1.0, "none: slopes in {0, 1}, continuous", _always),
    Entry((nn.Tanh,), lambda _m: 1.0, "none: tanh' in (0, 1]", _always),
    Entry((nn.Sigmoid,), lambda _m: 0.25, "none: sigmoid' <= 1/4", _always),
    Entry((nn.Hardtanh,), lambda _m: 1.0,
          "min_val <= max_val, neither NaN (a clamp: 1-Lipschitz)", _hardtanh),
    Entry((nn.Softplus,), lambda _m: 1.0,
          "beta finite and > 0 and threshold = inf (torch's threshold makes a jump)",
          _softplus),
    Entry((nn.LeakyReLU,), lambda m: max(1.0, abs(float(m.negative_slope))),
          "negative_slope finite (slopes 1 and negative_slope)", _finite_attr("negative_slope")),
    Entry((nn.ELU,), lambda m: max(1.0, abs(float(m.alpha))),
          "alpha finite (continuous at 0; |ELU'| <= max(1, |alpha|))", _finite_attr("alpha"),
          exact=False),
    Entry((nn.Identity, nn.Flatten, nn.Unflatten), lambda _m: 1.0,
          "none: a reshape is an isometry", _always),
    Entry((nn.Dropout, nn.Dropout2d, nn.AlphaDropout), lambda _m: 1.0,
          "eval mode (the identity)", _eval_mode),
)


def catalogue_entry(layer: nn.Module) -> Entry | None:
    """The entry whose types match ``layer`` (exact type, or own forward), or None."""
    for entry in CATALOGUE:
        if type(layer) in entry.types:
            return entry
        if entry.own_forward and any(
            isinstance(layer, c) and type(layer).forward is c.forward for c in entry.types
        ):
            return entry
    return None


def catalogue_bound(layer: nn.Module) -> tuple[float | None, str] | None:
    """``(constant, method)`` when ``layer``'s entry applies, ``(None, reason)`` when its
    condition fails, ``None`` when ``layer`` is not in the catalogue."""
    entry = catalogue_entry(layer)
    if entry is None:
        return None
    failed = entry.check(layer)
    if failed is not None:
        return None, f"no bound: {type(layer).__name__}: {failed} (needs: {entry.condition})"
    value = float(entry.constant(layer))
    kind = "exact" if entry.exact else "upper"
    return value, f"{kind}: {type(layer).__name__} constant {value:g} ({entry.condition})"
