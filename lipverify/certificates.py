"""Certified l2 radii from a claimed Lipschitz bound.

The protocol, in one place:

* A model *claims* a Lipschitz bound ``L`` (attribute ``lipschitz_claim``) for the map its
  certificate formula relies on, and names the formula (attribute ``certificate_kind``):

  - ``"ortho"`` (orthogonal last layer, and any model that declares no kind): ``L`` covers
    pixels -> logits,
    and ``radius = (f_y - max_{j!=y} f_j) / (sqrt(2) L)``.
  - ``"lln"`` (Last Layer Normalization): ``L`` covers pixels -> features (``model.features``),
    and ``radius = min_{j!=y} (f_y - f_j) / (||w_y - w_j|| L)`` over *all* other classes,
    with ``w`` the normalized rows of ``model.last_layer``. A pair with ``w_y = w_j`` never
    flips when its margin is positive, so it is skipped; with a margin <= 0 the radius is 0.

* For SOC LipConvNets ``L = 1/min(std)``, the factor of the input normalization. The reference
  code uses ``1/max(std)``; the two agree for the uniform std the papers use, and lipverify uses
  ``min(std)``, which is the sound choice for per-channel std.
* ``lipschitz=`` overrides the claim, e.g. with an audited guaranteed upper bound.

Guarantee: if the claim is a true upper bound, no input within ``radius`` (l2, pixel space) of
``x`` changes the prediction. The audit (:mod:`lipverify.audits`) checks the claim.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from lipverify.errors import InputError, check_labels, check_model_images, check_radius

__all__ = [
    "Certificates", "certify", "certified_accuracy", "radii_from_logits", "claim_of",
    "certificate_kind_of", "CERTIFICATE_MAPS", "EXECUTIONS",
]


@dataclass
class Certificates:
    """Predictions and certified l2 radii (pixel units) of a batch."""

    pred: torch.Tensor
    radius: torch.Tensor
    logits: torch.Tensor
    #: "real" (the real-valued function of the weights) or "float32" (the model as executed)
    execution: str = "real"
    #: float32 execution only: the margin error bound per class (0 at ``pred``) and the
    #: real-valued radii the executed ones were derived from
    delta: torch.Tensor | None = None
    plain_radius: torch.Tensor | None = None


CERTIFICATE_MAPS = {"ortho": "logits", "lln": "features"}
"""The map a claim covers, per certificate kind."""


def certificate_kind_of(model: nn.Module) -> str:
    """The certificate formula of ``model``: its declared ``certificate_kind``, else
    ``"ortho"``. An LLN model must have ``features(x)`` and a ``last_layer``."""
    kind = getattr(model, "certificate_kind", "ortho")
    if kind not in CERTIFICATE_MAPS:
        raise InputError(f"certificate_kind must be one of {sorted(CERTIFICATE_MAPS)}, got "
                         f"{str(kind)[:40]!r}; declare 'ortho' for a bound on the logits")
    if kind == "lln" and not (callable(getattr(model, "features", None))
                              and hasattr(model, "last_layer")):
        raise InputError("certificate_kind 'lln' needs features(x) and last_layer on the "
                         "model; declare 'ortho' for a bound on the logits")
    return kind


def claim_of(model: nn.Module, lipschitz: float | None = None) -> tuple[float, str]:
    """The Lipschitz bound and certificate kind to use for ``model``: the one decision that
    :func:`certify` and the audit share.

    The kind is the model's declared ``certificate_kind`` (default ``"ortho"``); the bound,
    ``lipschitz`` when given, else ``model.lipschitz_claim``, covers that kind's map
    (:data:`CERTIFICATE_MAPS`: the logits for ``"ortho"``, the features for ``"lln"``).
    """
    kind = certificate_kind_of(model)
    if lipschitz is None:
        lipschitz = getattr(model, "lipschitz_claim", None)
        if lipschitz is None:
            raise InputError(
                f"this model declares no Lipschitz bound; pass lipschitz=L for its "
                f"{CERTIFICATE_MAPS[kind]} map ({kind} certificates)"
            )
    try:
        lipschitz = float(lipschitz)
    except (TypeError, ValueError):
        raise InputError(f"the Lipschitz bound must be a number, got {repr(lipschitz)[:40]}"
                         ) from None
    if not math.isfinite(lipschitz) or lipschitz <= 0:
        raise InputError(f"the Lipschitz bound must be positive and finite, got {lipschitz}")
    return lipschitz, kind


def _lln_weight(model: nn.Module) -> torch.Tensor:
    last = model.last_layer
    return last.normalized_weight() if hasattr(last, "normalized_weight") else last.weight


def radii_from_logits(
    logits: torch.Tensor,
    lipschitz: float,
    kind: str = "ortho",
    weight: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """Certified radius of ``target`` (default: the predicted class); negative if misclassified.

    ``weight`` holds the normalized LLN rows, required for ``kind="lln"``.
    """
    if target is None:
        target = logits.argmax(1)
    fy = logits.gather(1, target[:, None])
    margins = fy - logits  # (N, K): f_y - f_j
    other = torch.ones_like(margins, dtype=torch.bool).scatter_(1, target[:, None], False)
    if kind == "ortho":
        best_other = logits.masked_fill(~other, float("-inf")).max(1).values
        return (fy[:, 0] - best_other) / (math.sqrt(2.0) * lipschitz)
    if kind != "lln":
        raise ValueError(f"unknown certificate kind {kind!r}")
    if weight is None:
        raise ValueError("LLN certificates need the normalized last-layer weight")
    w = weight.to(logits.dtype)
    dist = torch.cdist(w[target], w, compute_mode="donot_use_mm_for_euclid_dist")  # (N, K)
    same = dist == 0  # the target's own column, and any identical rows
    ratio = margins / (torch.where(same, torch.ones_like(dist), dist) * lipschitz)
    # Identical rows: a positive margin never flips (skip), a non-positive one gives 0.
    # (The safe denominator keeps gradients finite for certificate regularization.)
    ratio = torch.where(same & (margins > 0), torch.full_like(ratio, float("inf")), ratio)
    ratio = torch.where(same & (margins <= 0), torch.zeros_like(ratio), ratio)
    return ratio.masked_fill(~other, float("inf")).min(1).values


@torch.no_grad()
def certify(
    model: nn.Module,
    x: torch.Tensor,
    lipschitz: float | None = None,
    batch_size: int = 256,
    execution: str = "real",
) -> Certificates:
    """Predictions and certified l2 radii around them, using the model's claim (or ``lipschitz``).

    ``execution="real"`` (default): radii for the real-valued function of the weights (what a
    Lipschitz claim covers). ``execution="float32"``: radii that also hold for the model as
    executed in float32 on the CPU, ``(m̂ - 2 delta) / (sqrt(2) L)`` with ``delta`` the
    rounding-error bound of :mod:`lipverify.execution` (raises
    :class:`~lipverify.execution.ExecutionRefused` with the reason when none exists).
    The model is evaluated in eval mode; its previous mode is restored afterwards.
    """
    if execution not in EXECUTIONS:
        raise InputError(f"execution must be one of {list(EXECUTIONS)}, got {execution!r}")
    lip, kind = claim_of(model, lipschitz)
    check_model_images(model, x)
    was_training = model.training
    model.eval()
    try:
        logits = torch.cat([model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
        weight = _lln_weight(model) if kind == "lln" else None
        radius = radii_from_logits(logits, lip, kind, weight).clamp_min(0.0)
        if execution == "float32":
            return _executed(model, x, lip, kind, radius, batch_size)
    finally:
        model.train(was_training)
    return Certificates(pred=logits.argmax(1), radius=radius, logits=logits)


EXECUTIONS = ("real", "float32")


def _executed(model: nn.Module, x: torch.Tensor, lip: float, kind: str, plain: torch.Tensor,
              batch_size: int) -> Certificates:
    """Certificates of the float32 model (see :func:`certify`)."""
    from lipverify.execution import ExecutionRefused, executed_radii, execution_bound

    if not torch.isfinite(plain).all():
        raise ExecutionRefused("non-finite logits or radii at some points: no float32 bound")
    logits, deltas, radii = [], [], []
    for i in range(0, x.shape[0], batch_size):
        rho = plain[i : i + batch_size].double()
        b = execution_bound(model, x[i : i + batch_size], rho)
        logits.append(b.logits)
        deltas.append(b.delta)
        radii.append(executed_radii(b, lip, kind, rho))
    logits_t = torch.cat(logits)
    r64 = torch.cat(radii)
    r = r64.to(plain.dtype)  # rounded toward zero: never above the proven radius
    r = torch.where(r.double() > r64, torch.nextafter(r, torch.zeros_like(r)), r)
    return Certificates(pred=logits_t.argmax(1), radius=r,
                        logits=logits_t, execution="float32", delta=torch.cat(deltas),
                        plain_radius=plain)


DEFAULT_RADII = (36 / 255, 72 / 255, 108 / 255)


def certified_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None,
    radii: Iterable[float] = DEFAULT_RADII,
    lipschitz: float | None = None,
    certificates: Certificates | None = None,
) -> dict:
    """Clean accuracy and certified accuracy at each radius.

    A sample is certified at ``r`` when it is correct and its radius is strictly greater than
    ``r``. With ``y=None`` every prediction counts as correct (the fraction with radius > r).
    Keys: ``clean_accuracy`` and ``certified_accuracy`` (radius formatted ``"%.6f"`` -> fraction).
    """
    radii = [check_radius(r) for r in radii]
    cert = certificates if certificates is not None else certify(model, x, lipschitz)
    n = cert.pred.shape[0]
    correct = (
        torch.ones(n, dtype=torch.bool)
        if y is None
        else cert.pred.cpu() == check_labels(y, n, cert.logits.shape[1]).cpu()
    )
    rad = cert.radius.cpu()
    return {
        "clean_accuracy": correct.float().mean().item(),
        "certified_accuracy": {
            "%.6f" % r: (correct & (rad > r)).float().mean().item() for r in radii
        },
    }
