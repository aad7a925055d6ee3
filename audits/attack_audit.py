"""Attacks at the certified radii: counterexamples to l2 robustness certificates.

For every certified sample (radius r > 0) the suite's eps-bounded attacks search the ball of
radius r (1 - tolerance) around x for an input whose prediction differs from the certified
``pred`` (the model's own prediction, not the true label); the minimum-norm attacks return
the smallest adversarial perturbation they find. A *violation* is an x' with

    ||x' - x||_2 < r (1 - tolerance),   x' in [0, 1],   argmax f(x') != pred,

re-checked independently in float64 (a float64 deep copy of the model): only
float64-confirmed candidates are reported; float32-only candidates are counted
(``unconfirmed``). The clean input itself is checked first (x' = x, distance 0): a
certifier whose ``pred`` is not the model's float64 argmax is refuted there. A model that
does not run in float64 (:func:`lipverify.audits.twin.float64_twin` refuses its copy) is
re-checked in its own dtype instead, and ``settings["recheck"]`` says so: such violations are
not float64 proofs, and the verdict does not treat them as proofs.

Per-sample eps: APGD-CE, APGD-T and FAB-T run at each sample's own eps; Square and the
original ``autoattack`` package take one eps per call, so samples are grouped with
max/min radius <= ``group_ratio`` and attacked at the group's smallest eps (never beyond a
sample's own ball).

Tightness: r / d_min, with d_min the smallest float64-confirmed adversarial distance found
by any attack (inf where none). d_min is an upper bound on the true distance to the decision
boundary, so tightness is a lower bound on r / (true distance); tightness > 1 / (1 - tol)
would be a violation.

Guarantee: attacks can only refute (every reported violation is a float64-checked
counterexample, unless ``settings["recheck"]`` names another dtype); finding none proves
nothing about the certificates.
"""

from __future__ import annotations

import importlib.metadata
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lipverify.attacks import AttackSpec, autoattack_backend, run_attack, sanity_flags, suite_specs
from lipverify.attacks._util import eval_mode, l2_norms, num_classes, rounding_slack
from lipverify.audits.twin import float64_twin
from lipverify.errors import InputError, check_images, check_labels

__all__ = ["Violation", "AttackAuditResult", "attack_audit", "TIGHTNESS_QUANTILES"]

#: Relative margin kept below each sample's bound by the attacks' eps (plus the rounding
#: slack of storing x + delta in float32), so eps-bounded attacks stay strictly inside.
EPS_MARGIN = 1e-6
#: Quantiles of the tightness reported in ``tightness_quantiles`` (key -> q).
TIGHTNESS_QUANTILES = {"min": 0.0, "p10": 0.1, "p25": 0.25, "median": 0.5, "p75": 0.75,
                       "p90": 0.9, "max": 1.0}


@dataclass
class Violation:
    """A float64-confirmed counterexample to the certificate of sample ``index``."""

    index: int
    x: torch.Tensor
    x_adv: torch.Tensor
    distance: float
    radius: float
    attack: str
    pred: int
    adv_pred: int
    logits32: torch.Tensor
    logits64: torch.Tensor
    #: "real": confirmed in float64 (the real-valued certificate fails); "executed": only
    #: the float32 model's own forward flips (see ``execution="float32"``)
    kind: str = "real"
    #: with ``executed``: whether the float32 model's own forward (batch of one) flips too
    float32_flips: bool | None = None

    def to_dict(self) -> dict:
        """JSON-ready summary (without the images)."""
        return {"index": self.index, "distance": self.distance, "radius": self.radius,
                "attack": self.attack, "pred": self.pred, "adv_pred": self.adv_pred,
                "kind": self.kind, "float32_flips": self.float32_flips,
                "logits32": self.logits32.tolist(), "logits64": self.logits64.tolist()}


@dataclass
class AttackAuditResult:
    """Outcome of :func:`attack_audit` (tensors on the CPU, shape (N,) per sample)."""

    violations: list[Violation]
    min_adv_distance: torch.Tensor
    attacked: torch.Tensor
    tightness_quantiles: dict[str, float]
    sanity_flags: list[str]
    settings: dict
    seconds: float
    tightness: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    unconfirmed: int = 0
    #: flips of the float32 model's own forward that float64 does not confirm (only with
    #: ``executed``)
    executed_violations: list[Violation] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready summary."""
        d = self.min_adv_distance
        return {
            "violations": [v.to_dict() for v in self.violations],
            "n_attacked": int(self.attacked.sum()),
            "n_adversarial_found": int(torch.isfinite(d[self.attacked]).sum()),
            "min_adv_distance": [None if math.isinf(v) else v for v in d.tolist()],
            "tightness_quantiles": self.tightness_quantiles,
            "sanity_flags": list(self.sanity_flags),
            "unconfirmed": self.unconfirmed,
            "executed_violations": [v.to_dict() for v in self.executed_violations],
            "settings": self.settings,
            "seconds": self.seconds,
        }


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": torch.__version__}
    for name in ("torchattacks", "foolbox", "autoattack"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _check_radius_tensor(radius, n: int) -> torch.Tensor:
    r = torch.as_tensor(radius).detach().to("cpu", torch.float64)
    if r.dim() != 1 or r.shape[0] != n:
        raise InputError(f"radius must have shape ({n},), got {tuple(r.shape)}")
    if not torch.isfinite(r).all() or (r < 0).any():
        raise InputError("radii must be finite and non-negative; clamp negative radii at 0")
    return r


def _quantiles(t: torch.Tensor) -> dict[str, float]:
    t = t[~torch.isnan(t)]  # inf (an adversarial at distance 0) stays
    if t.numel() == 0:
        return {}
    how = "linear" if bool(torch.isfinite(t).all()) else "nearest"
    return {k: float(torch.quantile(t, q, interpolation=how))
            for k, q in TIGHTNESS_QUANTILES.items()}


class _Recorder:
    """Float64 re-check of candidates; keeps per sample the smallest adversarial distance and
    the smallest confirmed violation."""

    def __init__(self, model, model64, x, pred, radius, tolerance, executed=None):
        self.model, self.model64, self.executed = model, model64, executed
        self.executed_violations: dict[int, Violation] = {}
        self.recheck_dtype = (torch.float64 if model64 is not model else
                              next((p.dtype for p in model.parameters()), x.dtype))
        self.x, self.pred = x, pred
        self.radius = radius
        self.bound = radius * (1.0 - tolerance)
        self.min_dist = torch.full((x.shape[0],), math.inf, dtype=torch.float64)
        self.violations: dict[int, Violation] = {}
        self.unconfirmed = 0

    @torch.no_grad()
    def check(self, idx: torch.Tensor, x_adv: torch.Tensor, found32: torch.Tensor,
              source: Sequence[str], candidates: torch.Tensor | None = None) -> None:
        """Re-check rows ``candidates`` (default: those the attack's float32 check found,
        ``found32``) of ``x_adv`` (samples ``idx``) in float64."""
        found32 = found32.cpu()
        keep = (found32 if candidates is None else candidates.cpu()).nonzero()[:, 0]
        if keep.numel() == 0:
            return
        rows = idx[keep]
        xa = x_adv[keep.to(x_adv.device)].detach()
        x0 = self.x[rows.to(self.x.device)]
        dev = x0.device
        logits64 = self.model64(xa.to(self.recheck_dtype)).double()
        adv64 = (logits64.argmax(1) != self.pred[rows].to(dev)).cpu()
        dist = l2_norms(xa.double() - x0.double()).cpu()
        inbox = ((xa >= 0).flatten(1).all(1) & (xa <= 1).flatten(1).all(1)).cpu()
        confirmed = adv64 & inbox
        for j in confirmed.nonzero()[:, 0].tolist():
            i = int(rows[j])
            self.min_dist[i] = min(float(self.min_dist[i]), float(dist[j]))
        below = dist < self.bound[rows]
        self.unconfirmed += int((found32[keep] & ~confirmed & below).sum())
        batch = (rows, keep, xa, x0, dist, logits64, source)
        if self.executed is not None:
            self._check_executed(batch, ~adv64 & inbox & below)
        viol = (confirmed & below).nonzero()[:, 0].tolist()
        if not viol:
            return
        logits32 = self.model(xa[viol])
        for n, j in enumerate(viol):
            own = (None if self.executed is None else
                   bool(int(self.executed(xa[j:j + 1]).argmax()) != int(self.pred[rows[j]])))
            self._keep(self.violations, batch, j, logits32[n], int(logits64[j].argmax()),
                       float32_flips=own)

    def _check_executed(self, batch: tuple, open_: torch.Tensor) -> None:
        """Candidates that float64 does not confirm, re-run through the float32 model's own
        forward (``executed``): a flip there is an executed violation."""
        rows, _, xa = batch[:3]
        # one point at a time: the float32 result can depend on the batch, and replay runs
        # each record alone
        for j in open_.nonzero()[:, 0].tolist():
            logits32 = self.executed(xa[j:j + 1])[0]
            if int(logits32.argmax()) != int(self.pred[rows[j]]):
                self._keep(self.executed_violations, batch, j, logits32,
                           int(logits32.argmax()), kind="executed")

    def _keep(self, store: dict, batch: tuple, j: int, logits32: torch.Tensor, adv_pred: int,
              **extra: object) -> None:
        """Record candidate ``j`` of ``batch`` in ``store`` unless its sample already has a
        violation at a smaller distance."""
        rows, keep, xa, x0, dist, logits64, source = batch
        i = int(rows[j])
        old = store.get(i)
        if old is not None and old.distance <= float(dist[j]):
            return
        store[i] = Violation(
            index=i, x=x0[j].detach().float().cpu(), x_adv=xa[j].float().cpu(),
            distance=float(dist[j]), radius=float(self.radius[i]),
            attack=source[int(keep[j])] or "unknown", pred=int(self.pred[i]),
            adv_pred=adv_pred, logits32=logits32.detach().float().cpu(),
            logits64=logits64[j].detach().cpu(), **extra,
        )


def attack_audit(
    model: nn.Module,
    x: torch.Tensor,
    pred: torch.Tensor,
    radius: torch.Tensor,
    *,
    suite: str | Sequence[AttackSpec] = "quick",
    tolerance: float = 1e-3,
    seed: int = 0,
    batch_size: int = 128,
    group_ratio: float = 1.05,
    progress: Callable[[str, int, int], None] | None = None,
    executed: nn.Module | None = None,
    rounding_budget: int | None = None,
) -> AttackAuditResult:
    """Attack every certified sample at its certified radius; see the module docstring.

    ``pred``: the certified predictions; ``radius``: certified l2 radii (0 = not certified,
    not attacked). ``suite``: a name in :data:`lipverify.attacks.SUITES` or a sequence of
    :class:`~lipverify.attacks.AttackSpec`. ``progress(attack, done, total)`` is called after
    each batch. The model is attacked in eval mode (its modes are restored afterwards).
    ``executed``: the float32 model with its own eval forward (not ``fast_eval``): candidates
    that float64 does not confirm are re-run through it, and a rounding search
    (:func:`lipverify.attacks.rounding.rounding_search`, ``rounding_budget`` evaluations per
    point) looks for flips that only rounding causes; both give ``executed_violations``.
    Guarantee: violations are float64-confirmed counterexamples; none found proves nothing.
    """
    start = time.perf_counter()
    check_images(x)
    n = x.shape[0]
    specs = suite_specs(suite)
    if not (0.0 <= float(tolerance) < 1.0):
        raise InputError(f"tolerance must lie in [0, 1), got {tolerance}")
    if int(batch_size) < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if float(group_ratio) < 1.0:
        raise InputError(f"group_ratio must be >= 1, got {group_ratio}")
    radius = _check_radius_tensor(radius, n)
    device = x.device

    with eval_mode(model):
        k = num_classes(model, x)
        pred = check_labels(torch.as_tensor(pred).detach().cpu(), n, k)
        specs = tuple(s.for_classes(k) for s in specs)
        model64, why = float64_twin(model, x[:1])
        recheck = "float64 deep copy of the model"
        if model64 is None:  # refused, not a crash: violations are then not float64 proofs
            model64, recheck = model, f"the model's own dtype ({why})"
        flags = sanity_flags(model, x[:batch_size], seed=seed)

        rec = _Recorder(model, model64, x, pred, radius, float(tolerance), executed)
        certified = (radius > 0).nonzero()[:, 0]
        certified = certified[torch.argsort(radius[certified], stable=True)]
        # Attack eps: below each bound by the rounding slack of storing x + delta, so that
        # everything an eps-bounded attack returns lies strictly inside the bound.
        eps = (rec.bound * (1.0 - EPS_MARGIN) - 2 * rounding_slack(x, rec.bound)).clamp_min(0)
        eps = eps.to(x.dtype)
        batches = [certified[i:i + batch_size] for i in range(0, certified.numel(), batch_size)]

        # The clean input itself (distance 0 < bound): every certified point is re-checked.
        for b in batches:
            with torch.no_grad():
                clean32 = model(x[b.to(device)]).argmax(1).cpu() != pred[b]
            rec.check(b, x[b.to(device)], clean32, ["clean"] * b.numel(),
                      candidates=torch.ones(b.numel(), dtype=torch.bool))
        for spec in specs:
            for done, b in enumerate(batches, 1):
                bd = b.to(device)
                res = run_attack(spec, model, x[bd], pred[b].to(device),
                                 None if spec.minimum_norm else eps[b].to(device),
                                 seed=seed, group_ratio=float(group_ratio))
                rec.check(b, res.x_adv, res.success, res.source)
                if progress is not None:
                    progress(spec.name, done, len(batches))
        if executed is not None:
            from lipverify.attacks.rounding import ROUNDING_BUDGET, rounding_search

            budget = ROUNDING_BUDGET if rounding_budget is None else int(rounding_budget)
            for b in batches:
                bd = b.to(device)
                xa, hit = rounding_search(executed, x[bd], pred[b], eps[b], budget=budget,
                                          seed=seed)
                rec.check(b, xa, hit, ["rounding"] * b.numel())

    attacked = radius > 0
    tight = torch.full((n,), math.nan, dtype=torch.float64)
    found = attacked & torch.isfinite(rec.min_dist)
    tight[found] = radius[found] / rec.min_dist[found]
    settings = {
        "suite": suite if isinstance(suite, str) else "custom",
        "attacks": [s.to_dict() for s in specs],
        "tolerance": float(tolerance),
        "seed": int(seed),
        "batch_size": int(batch_size),
        "group_ratio": float(group_ratio),
        "eps_margin": EPS_MARGIN,
        "num_classes": k,
        "target": "model prediction",
        "recheck": recheck,
        "execution": "float32" if executed is not None else "real",
        "sanity_mode": "eval",
        "libraries": _versions(),
    }
    if any(s.name == "autoattack" for s in specs):
        settings["autoattack_backend"] = autoattack_backend()
    return AttackAuditResult(
        violations=[rec.violations[i] for i in sorted(rec.violations)],
        min_adv_distance=rec.min_dist,
        attacked=attacked,
        tightness_quantiles=_quantiles(tight),
        sanity_flags=flags,
        settings=settings,
        seconds=time.perf_counter() - start,
        tightness=tight,
        unconfirmed=rec.unconfirmed,
        executed_violations=[rec.executed_violations[i] for i in sorted(rec.executed_violations)],
    )
