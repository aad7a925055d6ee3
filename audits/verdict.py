"""The verdict rules of an audit, and what a "sound" verdict vouches for.

* **unsound**: a counterexample confirmed in float64 inside ``radius * (1 - τ)``; an attained
  lower bound, recomputed in float64, above ``claim * (1 + τ)``; or a certifier radius larger
  than ``(1 + τ)`` times the radius its formula gives with the guaranteed upper bound ``U``
  (:func:`certifier_violations`). An auditor error (below) overrides the last two, which rest
  on the auditor's own numbers, but never a float64-confirmed counterexample.
* **sound**: none of those, no auditor error, no refusal, finite logits and radii, a
  guaranteed upper bound ``U <= claim * (1 + τ)``, and (when attacks ran) at least one
  certified point attacked and no sanity flag.
* **inconclusive**: otherwise, with every reason. An *auditor error* (an attained lower bound
  above a guaranteed upper bound, for a unit or the whole map) proves the auditor wrong about
  this model; its reason starts ``auditor error:``.

What "sound" promises: ``U <= claim (1 + τ)``, so the true radius of each certified point is
at least ``radius / (1 + τ)``; :func:`vouched_accuracy` counts certified accuracy at those
radii, next to the claimed one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lipverify.certificates import Certificates, certified_accuracy, radii_from_logits

__all__ = ["decide", "decide_executed", "certifier_violations", "vouched_accuracy"]


def vouched_accuracy(
    cert: Certificates, y: torch.Tensor | None, radii: Sequence[float], tolerance: float
) -> dict:
    """Certified accuracy at the radii a sound verdict vouches for, ``radius / (1 + τ)``
    (``certified_accuracy``), and at the claimed radii (``claimed_certified_accuracy``)."""
    vouched = Certificates(cert.pred, cert.radius / (1.0 + tolerance), cert.logits)
    acc = certified_accuracy(None, None, y, radii, certificates=vouched)
    claimed = certified_accuracy(None, None, y, radii, certificates=cert)
    acc["claimed_certified_accuracy"] = claimed["certified_accuracy"]
    acc["radius_scale"] = 1.0 / (1.0 + tolerance)
    acc["promise"] = (f"certified_accuracy counts radius / (1 + {tolerance:g}) > r: what a "
                      "sound verdict vouches for; claimed_certified_accuracy uses the full radii")
    return acc


def _lln_weight(model: nn.Module) -> torch.Tensor:
    last = model.last_layer
    w = last.normalized_weight() if hasattr(last, "normalized_weight") else last.weight
    return w.detach()


def certifier_violations(
    model: nn.Module, cert: Certificates, kind: str, upper: float, tolerance: float
) -> list[dict]:
    """Points whose radius exceeds ``(1 + τ)`` times the radius the certificate formula of
    ``kind`` gives with the guaranteed upper bound ``upper`` at the certifier's prediction
    (0 when the model predicts another class there). No attack is needed: such a radius has
    no guaranteed argument behind it."""
    logits = cert.logits.detach().double().cpu()
    weight = _lln_weight(model).double().cpu() if kind == "lln" else None
    with torch.no_grad():
        supported = radii_from_logits(logits, float(upper), kind, weight,
                                      target=cert.pred.cpu()).clamp_min(0)
    r = cert.radius.detach().double().cpu()
    bad = r > supported * (1.0 + tolerance)  # NaN radii are not claims: blocked elsewhere
    return [
        {"index": int(i), "radius": float(r[i]), "supported_radius": float(supported[i]),
         "pred": int(cert.pred[i]), "model_pred": int(logits[i].argmax())}
        for i in bad.nonzero()[:, 0].tolist()
    ]


def decide(
    *,
    claim: float | None,
    tolerance: float,
    checks: Sequence[str],
    lower: float | None,
    lower_float64: bool,
    upper: float | None,
    violations: Sequence[dict],
    float64_rechecked: bool,
    certificate_violations: Sequence[dict],
    auditor_errors: Sequence[str],
    refusals: Sequence[str],
    n_attacked: int,
    sanity: Sequence[str],
    n_nonfinite: int,
) -> tuple[str, list[str]]:
    """``(verdict, reasons)`` by the rules of the module docstring."""
    limit = None if claim is None else claim * (1 + tolerance)
    proofs: list[str] = []  # float64-confirmed counterexamples: nothing overrides them
    refutes: list[str] = []  # refutations that rest on the auditor's own bounds
    blockers: list[str] = []
    if violations and float64_rechecked:
        proofs.append(f"attacks: {len(violations)} float64-confirmed violation(s) inside "
                      f"certified radii (caught by {sorted({v['attack'] for v in violations})})")
    elif violations:
        blockers.append(f"attacks: {len(violations)} violation(s) confirmed only in the model's "
                        "own dtype (the model does not run in float64): not a proof")
    if limit is not None and lower is not None and lower > limit:
        text = (f"lipschitz: attained lower bound {lower:.6g} exceeds the claim {claim:.6g} "
                f"x (1 + {tolerance:g})")
        if lower_float64:
            refutes.append(text)
        else:
            blockers.append(text + ", but it was not recomputed in float64: not a proof")
    if certificate_violations:
        worst = max(certificate_violations, key=lambda v: v["radius"] / max(
            v["supported_radius"], 1e-300))
        refutes.append(
            f"certifier: {len(certificate_violations)} radius(es) exceed (1 + {tolerance:g}) x "
            f"the radius the guaranteed upper bound {upper:.6g} supports (e.g. point "
            f"{worst['index']}: {worst['radius']:.6g} > {worst['supported_radius']:.6g})")
    errors = [f"auditor error: {e}" for e in auditor_errors]
    if proofs:
        return "unsound", proofs + refutes + errors
    if errors:
        return "inconclusive", errors + refutes
    if refutes:
        return "unsound", refutes

    if "lipschitz" not in checks:
        blockers.append("no Lipschitz check was run, so no guaranteed upper bound")
    elif claim is None:
        blockers.append("no Lipschitz bound is claimed to compare against")
    elif upper is None:
        blockers.append("no guaranteed upper bound: " + ("; ".join(refusals) if refusals else
                                                         "some layer has none"))
    elif not upper <= limit:
        blockers.append(f"lipschitz: guaranteed upper bound {upper:.6g} exceeds the claim "
                        f"{claim:.6g} x (1 + {tolerance:g}), but no counterexample was found")
    if n_nonfinite:
        blockers.append(f"non-finite logits or radii at {n_nonfinite} point(s): nothing is "
                        "certified there")
    if "attacks" in checks and n_attacked == 0:
        blockers.append("attacks: no certified point was attacked")
    if sanity:
        blockers.append(f"sanity flags raised: {', '.join(sanity)}")
    if blockers:
        return "inconclusive", blockers
    reasons = [f"lipschitz: guaranteed upper bound {upper:.6g} <= claim {claim:.6g} x "
               f"(1 + {tolerance:g})"]
    if "attacks" in checks:
        reasons.append(f"attacks: no violation on {n_attacked} certified point(s)")
    return "sound", reasons


def decide_executed(
    *,
    verdict: str,
    tolerance: float,
    radius: torch.Tensor,
    radius_executed: torch.Tensor | None,
    refusal: str | None,
    real_violations: Sequence[dict],
    executed_violations: Sequence[dict],
) -> tuple[str, list[str]]:
    """``(executed_verdict, reasons)``: do the plain certificates hold for the float32 model?

    * **unsound**: a flip of the float32 model's own forward inside ``radius * (1 - τ)``
      (an executed violation, or a real one whose ``float32_flips`` is true: the model's
      own forward, not the attacks' ``fast_eval`` one);
    * **sound**: the real verdict is sound and the executed radius ``r̂`` (float32 rounding
      bounded) is at least ``r (1 - τ)`` at every certified point, so the float32 model keeps
      its prediction within ``r (1 - τ) / (1 + τ)``;
    * **inconclusive** otherwise. A flip inside ``r̂`` is an auditor error (the rounding bound
      is wrong); its reason starts ``auditor error:``.
    """
    reasons: list[str] = []
    errors = []
    if radius_executed is not None:
        for v in executed_violations:
            r_hat = float(radius_executed[v["index"]])
            if v["distance"] < r_hat:
                errors.append(f"auditor error: a float32 flip at point {v['index']} lies at "
                              f"{v['distance']:.6g}, inside the executed radius {r_hat:.6g}")
    flipped_real = [v for v in real_violations if v.get("float32_flips")]
    if executed_violations or flipped_real:
        if executed_violations:
            reasons.append(f"{len(executed_violations)} executed violation(s): the float32 "
                           "model flips inside certified radii where the real-valued one "
                           "does not")
        if flipped_real:
            reasons.append(f"{len(flipped_real)} real violation(s) that float32 also shows")
        return "unsound", reasons + errors
    if errors:
        return "inconclusive", errors
    if refusal is not None:
        return "inconclusive", [f"no float32 rounding bound: {refusal}"]
    if verdict != "sound":
        return "inconclusive", [f"the real-valued certificates are {verdict}, so the float32 "
                                "ones are not vouched for"]
    certified = radius > 0
    short = certified & ~(radius_executed >= radius * (1 - tolerance))  # NaN is short
    if int(short.sum()):
        return "inconclusive", [
            f"rounding could flip predictions between the executed radius and r (1 - "
            f"{tolerance:g}) at {int(short.sum())} of {int(certified.sum())} certified "
            "point(s); none was found; use the executed radii (certify --execution float32)"]
    return "sound", [f"executed radii >= r (1 - {tolerance:g}) at all {int(certified.sum())} "
                     "certified point(s)"]
