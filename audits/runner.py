"""``audit()``: decide whether a model's certificates are sound.

The audit runs in stages, each a function that a process can run on its own:

1. :func:`plan_audit` validates the inputs and certifies every point (``certify``);
2. :func:`lipschitz_stage` bounds the Lipschitz constant (``lipschitz``);
3. :func:`gnp_stage` checks gradient-norm preservation (``gnp``);
4. :func:`attack_chunk` attacks one chunk of :data:`ATTACK_CHUNK` points, inside
   :func:`attack_context`; :func:`merge_attacks` combines the chunks (``attacks``);
5. :func:`assemble_report` applies the verdict rules and writes the report object.

:func:`audit` runs them in one process; :mod:`lipverify.distributed` runs the same stages on
several (``torchrun``), each rank attacking whole chunks. The stages feed :func:`verdict.decide
<lipverify.audits.verdict.decide>`, which holds the verdict rules: **unsound** on a
float64-confirmed counterexample, an attained float64 lower bound above ``claim * (1 + τ)``
or a certifier radius beyond what the guaranteed bound supports; **sound** only with a
guaranteed upper bound at or below ``claim * (1 + τ)`` and nothing refused, non-finite or
flagged; **inconclusive** otherwise, including auditor errors (a lower bound above an upper
bound). The certificate formula (kind and claimed map) is decided once, by
:func:`lipverify.certificates.claim_of`, as in :func:`lipverify.certify`.

With ``execution="float32"`` the plan also holds the float32 model's own forward (a copy,
outside ``fast_eval``) and its executed radii (:mod:`lipverify.execution`); the attack chunks
add executed violations, and :func:`verdict.decide_executed
<lipverify.audits.verdict.decide_executed>` gives the report's ``executed_verdict``.

Attacks and lower bounds can only refute; only the guaranteed upper bound can support "sound".
Chunk ``c`` covers points ``[c * ATTACK_CHUNK, (c + 1) * ATTACK_CHUNK)`` and is attacked with
the seed ``seed * 100003 + c`` wherever it runs; each stage can checkpoint its results to
``state_dir``, so a resumed or sharded audit reports exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lipverify.atomic import atomic_write_bytes, atomic_write_text
from lipverify.audits.report import AuditReport
from lipverify.audits.verdict import (
    certifier_violations,
    decide,
    decide_executed,
    vouched_accuracy,
)
from lipverify.certificates import (
    DEFAULT_RADII,
    EXECUTIONS,
    Certificates,
    certificate_kind_of,
    certified_accuracy,
    certify,
    claim_of,
)
from lipverify.errors import InputError, check_labels, check_model_images, check_seed

__all__ = [
    "audit", "ATTACK_CHUNK", "CHECKS", "AuditPlan", "AuditState", "AttackResult", "Progress",
    "plan_audit", "lipschitz_stage", "gnp_stage", "attack_context", "attack_chunk",
    "compute_chunk", "chunk_name", "chunk_counts", "merge_attacks", "assemble_report",
]

ATTACK_CHUNK = 32  # points per attack chunk (a resume unit); fixed so seeds do not shift
CHECKS = ("lipschitz", "gnp", "attacks")
_CHUNK_KEYS = ("rows", "tensors", "min_adv", "attacked", "sanity", "settings")


def _tensor_sha(x: torch.Tensor) -> str:
    return hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("lipverify", "torch", "numpy", "torchattacks", "foolbox", "autoattack"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


# -- progress ----------------------------------------------------------------------------------
class Progress:
    """Progress events of an audit.

    Calling it with a message is the ``progress`` callback of :func:`audit` (one line per
    stage and chunk); the base class passes each message to ``say``. Subclasses (the CLI's
    progress bars) also receive the structured events below.
    """

    def __init__(self, say: Callable[[str], None] | None = None) -> None:
        self._say = say

    def __call__(self, message: str) -> None:
        if self._say is not None:
            self._say(message)

    def stage_begin(self, name: str) -> None:
        """Stage ``name`` (``certify``, ``lipschitz``, ``gnp`` or ``attacks``) starts."""

    def stage_end(self, name: str) -> None:
        """Stage ``name`` has finished."""

    def attacks_update(self, total: int, done: int, violations: int) -> None:
        """``done`` of ``total`` points attacked (by every process), ``violations`` so far."""

    def close(self) -> None:
        """No more events."""


def _as_progress(progress: Callable[[str], None] | None) -> Progress:
    return progress if isinstance(progress, Progress) else Progress(progress)


# -- state -------------------------------------------------------------------------------------
class AuditState:
    """Per-stage results saved under ``directory`` (atomic writes), keyed by a fingerprint.

    ``join=True`` (the other ranks of a sharded audit) opens a folder that rank 0 has set up:
    its fingerprint must already be there and equal, and nothing is written to it.
    """

    def __init__(self, directory: Path | None, fingerprint: str, *, join: bool = False) -> None:
        self.dir = directory
        if directory is None:
            return
        fp = directory / "fingerprint"
        if join:
            if not fp.is_file():
                raise InputError(f"{directory} is not visible from every process: give --out "
                                 "a folder on a filesystem that all ranks and nodes share")
        else:
            directory.mkdir(parents=True, exist_ok=True)
        if fp.exists() and fp.read_text() != fingerprint:
            raise InputError(
                f"{directory} holds the state of a different audit (model, data or settings "
                "changed); use a new --out or --overwrite"
            )
        if not join:
            atomic_write_text(fp, fingerprint)

    def exists(self, name: str) -> bool:
        return self.dir is not None and (self.dir / name).exists()

    def load(self, name: str, keys: tuple[str, ...] = ("json",)) -> Any:
        """The saved dict (safe loading only), None if absent; a foreign one is refused."""
        if self.dir is None or not (self.dir / name).exists():
            return None
        from lipverify.checkpoints import safe_torch_load

        obj = safe_torch_load(self.dir / name)
        if not isinstance(obj, dict) or not set(keys) <= set(obj):
            raise InputError(f"{self.dir / name}: not a lipverify audit state file; "
                             "start over with --overwrite")
        return obj

    def save(self, name: str, obj: Any) -> None:
        if self.dir is None:
            return
        buf = io.BytesIO()
        torch.save(obj, buf)
        atomic_write_bytes(self.dir / name, buf.getvalue())


# -- stage 1: validate and certify -------------------------------------------------------------
@dataclass
class AuditPlan:
    """What every stage shares: the validated inputs, their certificates, the fingerprint.

    Every process of a sharded audit builds the same plan from the same (global) points.
    """

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor | None
    cert: Certificates
    claim: float | None
    kind: str
    lipschitz: float | None
    certifier: Callable | None
    attacks: str
    checks: tuple[str, ...]
    tolerance: float
    seed: int
    radii: tuple[float, ...]
    lipschitz_points: int
    finite: torch.Tensor  # logits and radius finite (cpu, bool)
    attack_radius: torch.Tensor  # the radius attacked: 0 where not finite (cpu)
    accuracy: dict
    fingerprint: str
    execution: str = "real"
    #: float32 execution: the model's own eval forward (a copy, outside fast_eval), its
    #: certificates (``radius`` = r̂), or the reason there are none
    executed_model: nn.Module | None = None
    executed_cert: Certificates | None = None
    executed_refusal: str | None = None
    executed_ops: list = field(default_factory=list)  # each op's median share of delta
    t_start: float = field(default_factory=time.time)
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds per stage

    @property
    def n_points(self) -> int:
        return int(self.x.shape[0])

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_points / ATTACK_CHUNK)

    def chunk_slice(self, c: int) -> slice:
        """The points of attack chunk ``c``."""
        return slice(c * ATTACK_CHUNK, min((c + 1) * ATTACK_CHUNK, self.n_points))


@contextmanager
def _timed(plan: AuditPlan, name: str, progress: Progress | None = None) -> Iterator[None]:
    start = time.time()
    if progress is not None:
        progress.stage_begin(name)
    try:
        yield
    finally:
        if progress is not None:
            progress.stage_end(name)
    plan.timings[f"{name}_seconds"] = round(time.time() - start, 3)


def plan_audit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    lipschitz: float | None = None,
    certifier: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    attacks: str = "quick",
    checks: Sequence[str] = CHECKS,
    tolerance: float = 1e-3,
    seed: int = 0,
    radii: Sequence[float] = DEFAULT_RADII,
    lipschitz_points: int = 8,
    progress: Callable[[str], None] | None = None,
    execution: str = "real",
) -> AuditPlan:
    """Validate the audit's inputs and certify every point: the plan the other stages use.

    The arguments are those of :func:`audit`. Raises :class:`InputError` on bad input.
    """
    t_start = time.time()
    unknown = set(checks) - set(CHECKS)
    if unknown:
        raise InputError(f"unknown checks {sorted(unknown)}; choose from {list(CHECKS)}")
    if not (isinstance(tolerance, (int, float)) and 0 <= tolerance < 1):
        raise InputError(f"tolerance must be a number in [0, 1), got {tolerance!r}")
    check_seed(seed)
    if execution not in EXECUTIONS:
        raise InputError(f"execution must be one of {list(EXECUTIONS)}, got {execution!r}")
    if lipschitz is not None:
        try:
            lipschitz = float(lipschitz)
        except (TypeError, ValueError):
            raise InputError(f"lipschitz must be a number, got {repr(lipschitz)[:40]}") from None
    tracker = _as_progress(progress)
    model.eval()
    check_model_images(model, x)
    # One decision on the certificate formula, shared with certify(): the model's declared
    # kind (default "ortho"); the claim covers that kind's map (logits or features).
    claim, kind = None, certificate_kind_of(model)
    if certifier is None or lipschitz is not None or hasattr(model, "lipschitz_claim"):
        try:
            claim, kind = claim_of(model, lipschitz)
        except InputError:
            if certifier is None:
                raise

    tracker("certifying")
    tracker.stage_begin("certify")
    if certifier is not None:
        with torch.no_grad():
            pred, radius = certifier(x)
        pred = torch.as_tensor(pred).long().flatten()
        radius = torch.as_tensor(radius, dtype=torch.float32).flatten().clamp_min(0)
        if pred.shape[0] != x.shape[0] or radius.shape[0] != x.shape[0]:
            raise InputError("the certifier must return one prediction and radius per input")
        with torch.no_grad():
            logits = model(x)
        cert = Certificates(pred=pred, radius=radius, logits=logits)
    else:
        cert = certify(model, x, lipschitz)
    if y is not None:
        y = check_labels(y, x.shape[0], cert.logits.shape[1])
    # Non-finite logits or radii certify nothing and are not attacked; they block "sound".
    finite = torch.isfinite(cert.logits).all(1).cpu() & torch.isfinite(cert.radius).cpu()
    attack_radius = torch.where(finite, cert.radius.cpu(), torch.zeros_like(cert.radius.cpu()))
    acc = vouched_accuracy(cert, y, radii, tolerance)
    executed_model = executed_cert = executed_refusal = None
    if execution == "float32":
        executed_model, executed_cert, executed_refusal = _executed(model, x, lipschitz,
                                                                    claim, certifier, cert)
        if executed_cert is not None:
            from lipverify.execution import execution_bound

            few = slice(0, min(lipschitz_points, x.shape[0]))
            executed_ops = execution_bound(executed_model, x[few],
                                           cert.radius[few].double()).dominant(5)

    fingerprint = json.dumps({
        "x": _tensor_sha(x), "y": None if y is None else _tensor_sha(y),
        "weights": hashlib.sha256(b"".join(
            t.detach().cpu().contiguous().numpy().tobytes() for t in model.state_dict().values()
        )).hexdigest(),
        "attacks": attacks, "checks": list(checks), "tolerance": tolerance, "seed": seed,
        "claim": claim, "radius": _tensor_sha(cert.radius),
        "lipschitz_points": lipschitz_points, "execution": execution,
    }, sort_keys=True)
    tracker.stage_end("certify")
    plan = AuditPlan(
        model=model, x=x, y=y, cert=cert, claim=claim, kind=kind, lipschitz=lipschitz,
        certifier=certifier, attacks=attacks, checks=tuple(checks), tolerance=tolerance,
        seed=seed, radii=tuple(radii), lipschitz_points=lipschitz_points, finite=finite,
        attack_radius=attack_radius, accuracy=acc, fingerprint=fingerprint, t_start=t_start,
        execution=execution, executed_model=executed_model, executed_cert=executed_cert,
        executed_refusal=executed_refusal,
        executed_ops=executed_ops if executed_cert is not None else [],
    )
    plan.timings["certify_seconds"] = round(time.time() - t_start, 3)
    return plan


def _executed(model: nn.Module, x: torch.Tensor, lipschitz: float | None, claim: float | None,
              certifier: Callable | None, cert: Certificates
              ) -> tuple[nn.Module, Certificates | None, str | None]:
    """The float32 model's own forward (a deep copy, kept out of ``fast_eval``), and its
    certificates, or the reason there are none."""
    import copy

    from lipverify.execution import ExecutionRefused

    executed = copy.deepcopy(model).eval()
    for p in executed.parameters():  # the same forward, without weight gradients in searches
        p.requires_grad_(False)
    if claim is None:
        return executed, None, "no Lipschitz bound is claimed, so no executed radius"
    if certifier is not None:
        return executed, None, "a custom certifier's radii have no float32 execution bound"
    try:
        ecert = certify(executed, x, lipschitz, execution="float32")
    except ExecutionRefused as exc:
        return executed, None, str(exc)
    if not torch.equal(ecert.pred.cpu(), cert.pred.cpu()):  # pragma: no cover - same forward
        return executed, None, "the executed predictions differ from the certified ones"
    return executed, ecert, None


# -- stages 2 and 3: Lipschitz bounds and GNP --------------------------------------------------
def lipschitz_stage(plan: AuditPlan, state: AuditState,
                    progress: Callable[[str], None] | None = None) -> dict:
    """Guaranteed upper and attained lower bounds (:func:`~lipverify.audits.lipschitz.
    lipschitz_audit` on the first ``lipschitz_points`` points) as a JSON-ready dict, saved in
    ``state`` as ``lipschitz.pt`` and read from there when present."""
    tracker = _as_progress(progress)
    tracker("bounding the Lipschitz constant")
    with _timed(plan, "lipschitz", tracker):
        saved = state.load("lipschitz.pt")
        if saved is not None:
            return json.loads(saved["json"])
        from lipverify.audits.lipschitz import lipschitz_audit

        res = lipschitz_audit(plan.model, plan.x[:plan.lipschitz_points],
                              map="features" if plan.kind == "lln" else "logits",
                              seed=plan.seed)
        lip = json.loads(json.dumps(res.to_dict(), default=float))
        state.save("lipschitz.pt", {"json": json.dumps(lip)})
        return lip


def gnp_stage(plan: AuditPlan, state: AuditState,
              progress: Callable[[str], None] | None = None) -> dict:
    """The gradient-norm-preservation checks on the first ``lipschitz_points`` points as a
    JSON-ready dict, saved in ``state`` as ``gnp.pt`` and read from there when present."""
    tracker = _as_progress(progress)
    tracker("checking gradient-norm preservation")
    with _timed(plan, "gnp", tracker):
        g = state.load("gnp.pt")
        if g is None:
            from lipverify.audits.gnp import gnp_audit

            res = gnp_audit(plan.model, plan.x[:plan.lipschitz_points], seed=plan.seed)
            g = {"json": json.dumps(res.to_dict(), default=float)}
            state.save("gnp.pt", g)
        return json.loads(g["json"])


# -- stage 4: attack chunks --------------------------------------------------------------------
def chunk_name(c: int) -> str:
    """File name of attack chunk ``c`` in the state folder."""
    return f"attacks-{c:05d}.pt"


def _violation_record(v: Any, index_offset: int) -> tuple[dict, dict]:
    """Split an attack Violation into a JSON row and a tensor record for violations/NNNN.pt."""
    idx = int(v.index) + index_offset
    row = {
        "index": idx,
        "attack": str(v.attack),
        "distance": float(v.distance),
        "radius": float(v.radius),
        "pred": int(v.pred),
        "adv_pred": int(v.adv_pred),
        "kind": str(getattr(v, "kind", "real")),
        "float32_flips": getattr(v, "float32_flips", None),
        "logits_float32": [float(t) for t in torch.as_tensor(v.logits32).flatten()],
        "logits_float64": [float(t) for t in torch.as_tensor(v.logits64).flatten()],
    }
    tensors = {
        **{k: val for k, val in row.items() if not k.startswith("logits")},
        "x": torch.as_tensor(v.x).detach().cpu().float(),
        "x_adv": torch.as_tensor(v.x_adv).detach().cpu().float(),
        "logits_float32": torch.as_tensor(v.logits32).detach().cpu().float(),
        "logits_float64": torch.as_tensor(v.logits64).detach().cpu().double(),
    }
    return row, tensors


def attack_context(plan: AuditPlan) -> Any:
    """Context for the attacks: eval mode with constant SOC weights and materialised small
    layers (the same function to 1e-5, tested), built once because the attacks run thousands
    of passes. Which layers repay materialising depends on the number of passes, so it is
    decided from *all* the points, also on a rank that attacks only some. Bounds and GNP
    checks never use it; they examine the layers' own operators. Yields the materialisation
    report (None without SOC layers)."""
    from contextlib import nullcontext

    from lipverify.layers.soc import SOC, fast_eval

    model, x = plan.model, plan.x
    if not any(isinstance(m, SOC) for m in model.modules()):
        return nullcontext()
    passes = {"quick": 400, "standard": 4000, "minimal-norm": 3000}.get(plan.attacks, 1000)
    return fast_eval(model, tuple(x.shape[1:]), images=passes * x.shape[0])


def compute_chunk(plan: AuditPlan, c: int) -> dict:
    """Attack chunk ``c`` (seed ``seed * 100003 + c``); call inside :func:`attack_context`.
    Returns the chunk's record (what ``attacks-NNNNN.pt`` holds)."""
    from lipverify.audits.attack_audit import attack_audit

    sl = plan.chunk_slice(c)
    res = attack_audit(plan.model, plan.x[sl], plan.cert.pred[sl], plan.attack_radius[sl],
                       suite=plan.attacks, tolerance=plan.tolerance,
                       seed=plan.seed * 100_003 + c, executed=plan.executed_model)
    rows = [_violation_record(v, sl.start) for v in res.violations + res.executed_violations]
    res.settings["unconfirmed"] = res.unconfirmed
    return {
        "rows": json.dumps([r for r, _ in rows]),
        "tensors": [t for _, t in rows],
        "min_adv": res.min_adv_distance.detach().cpu().float(),
        "attacked": res.attacked.detach().cpu().bool(),
        "sanity": json.dumps(list(res.sanity_flags)),
        "settings": json.dumps(res.settings, default=str),
    }


def attack_chunk(plan: AuditPlan, state: AuditState, c: int) -> tuple[dict, bool]:
    """Chunk ``c``'s record: read from ``state`` if saved there, else computed and saved.
    Returns ``(record, computed)``."""
    chunk = state.load(chunk_name(c), _CHUNK_KEYS)
    if chunk is not None:
        return chunk, False
    chunk = compute_chunk(plan, c)
    state.save(chunk_name(c), chunk)
    return chunk, True


def chunk_counts(plan: AuditPlan, chunk: dict, c: int) -> tuple[int, int]:
    """(points, violations) of chunk ``c``'s record, for progress reports."""
    sl = plan.chunk_slice(c)
    return sl.stop - sl.start, len(json.loads(chunk["rows"]))


@dataclass
class AttackResult:
    """The attack chunks merged: the report's ``attacks`` section and what the verdict uses."""

    summary: dict
    violations: list[dict]
    tensors: list[dict]
    min_adv: torch.Tensor
    n_attacked: int
    sanity: list[str]
    executed: list[dict] = field(default_factory=list)  # kind "executed" (float32 only)
    unconfirmed: int = 0  # float32-only flips of the attacks' own forward, not confirmed


def merge_attacks(plan: AuditPlan, chunks: Sequence[dict], materialized: Any = None
                  ) -> AttackResult:
    """Merge the records of chunks ``0 .. n_chunks - 1`` (in order); ``materialized`` is the
    report yielded by :func:`attack_context`."""
    if len(chunks) != plan.n_chunks:
        raise ValueError(f"{len(chunks)} attack chunks for {plan.n_chunks}")
    min_adv = torch.full((plan.n_points,), float("inf"))
    violations: list[dict] = []
    tensors: list[dict] = []
    sanity: list[str] = []
    n_attacked = unconfirmed = 0
    settings: dict = {}
    for c, chunk in enumerate(chunks):
        violations += json.loads(chunk["rows"])
        tensors += chunk["tensors"]
        min_adv[plan.chunk_slice(c)] = chunk["min_adv"]
        n_attacked += int(chunk["attacked"].sum())
        sanity += [f for f in json.loads(chunk["sanity"]) if f not in sanity]
        settings = json.loads(chunk["settings"])
        unconfirmed += int(settings.pop("unconfirmed", 0))
    executed = [v for v in violations if v.get("kind") == "executed"]
    violations = [v for v in violations if v.get("kind", "real") == "real"]
    # the report lists real violations first, then executed ones: the records follow suit
    tensors = ([t for t in tensors if t.get("kind", "real") == "real"]
               + [t for t in tensors if t.get("kind") == "executed"])
    settings["seed"] = plan.seed
    settings["chunk_seeds"] = f"seed * 100003 + chunk index (chunks of {ATTACK_CHUNK})"
    if materialized is not None:
        settings["materialized_layers"] = list(materialized.materialized)
        plan.timings["materialize_seconds"] = round(materialized.seconds, 3)
    radius = plan.cert.radius.cpu()
    found = torch.isfinite(min_adv) & (radius > 0)
    tight = radius[found].double() / min_adv[found].double()
    summary = {
        "settings": settings,
        "n_attacked": n_attacked,
        "sanity_flags": sanity,
        "tightness_quantiles": _quantiles(tight),
        "n_with_adversarial": int(found.sum()),
        "unconfirmed_float32": unconfirmed,
    }
    return AttackResult(summary, violations, tensors, min_adv, n_attacked, sanity, executed,
                        unconfirmed)


def _quantiles(t: torch.Tensor) -> dict[str, float]:
    if t.numel() == 0:
        return {}
    qs = torch.tensor([0.0, 0.25, 0.5, 0.75, 0.95, 1.0], dtype=torch.float64)
    vals = torch.quantile(t.double(), qs)
    return {f"q{int(q * 100)}": float(v) for q, v in zip(qs, vals, strict=True)}


# -- stage 5: verdict and report ---------------------------------------------------------------
def assemble_report(
    plan: AuditPlan,
    *,
    lip: dict | None = None,
    gnp: dict | None = None,
    attacks: AttackResult | None = None,
    provenance: dict | None = None,
) -> AuditReport:
    """Apply the verdict rules to the stages' results (None: stage not run) and build the
    report; ``provenance`` is merged into the report's provenance."""
    checks = plan.checks
    cert, kind, claim, tolerance = plan.cert, plan.kind, plan.claim, plan.tolerance
    lip = lip if "lipschitz" in checks else None
    warnings: list[str] = []
    layers: list[dict] = []
    lower = upper = None
    if lip is not None:
        layers = lip.get("layers", [])
        lower, upper = lip.get("lower"), lip.get("upper")
        warnings += lip.get("notes", [])
        warnings += [f"no upper bound: {r}" for r in lip.get("refusals", [])]
    if gnp is not None:
        warnings += gnp.get("warnings", [])
    attack_dict = attacks.summary if attacks is not None else None

    lip_refusals = list(lip.get("refusals", [])) if lip is not None else []
    auditor_errors = list(lip.get("auditor_errors", [])) if lip is not None else []
    cert_violations = (
        certifier_violations(plan.model, cert, kind, upper, tolerance)
        if plan.certifier is not None and claim is not None and upper is not None
        and math.isfinite(upper) else []  # an infinite bound supports no radius, refutes none
    )
    recheck = (attack_dict or {}).get("settings", {}).get("recheck", "float64")
    verdict, reasons = decide(
        claim=claim, tolerance=tolerance, checks=checks, lower=lower, upper=upper,
        violations=attacks.violations if attacks is not None else [],
        float64_rechecked=recheck.startswith("float64"),
        certificate_violations=cert_violations, auditor_errors=auditor_errors,
        refusals=lip_refusals, n_attacked=attacks.n_attacked if attacks is not None else 0,
        sanity=attacks.sanity if attacks is not None else [],
        n_nonfinite=int((~plan.finite).sum()),
        lower_float64=(lip is not None and lip.get("lower_dtype", "float64") == "float64"),
    )
    if gnp and any(not layer.get("gnp", True) for layer in gnp.get("layers", [])):
        warnings.append("some layers are not gradient-norm preserving (see gnp)")
    if attacks is not None and attacks.unconfirmed and plan.execution == "real":
        warnings.append(
            f"attacks: {attacks.unconfirmed} float32 flip(s) inside certified radii that "
            "float64 does not confirm: the real-valued certificates stand, but the float32 "
            "model may not keep them; audit it with --execution float32")
    execution = _execution_section(plan, verdict, attacks) if plan.execution != "real" else None

    y = plan.y
    samples = [
        {"index": i, "label": None if y is None else int(y[i]), "pred": int(cert.pred[i]),
         "radius": float(cert.radius[i]),
         "min_adv_distance": float(attacks.min_adv[i]) if attacks is not None else None}
        for i in range(plan.n_points)
    ]
    if plan.executed_cert is not None:
        for i, row in enumerate(samples):
            row["radius_executed"] = float(plan.executed_cert.radius[i])
            row["delta"] = float(plan.executed_cert.delta[i].max())
    prov = {
        "seed": plan.seed,
        "tolerance": tolerance,
        "checks": list(checks),
        "attack_suite": plan.attacks if "attacks" in checks else None,
        "attack_settings": attack_dict["settings"] if attack_dict else None,
        "n_points": plan.n_points,
        "lipschitz_points": min(plan.lipschitz_points, plan.n_points),
        "certificate_kind": kind,
        "claim_source": "override" if plan.lipschitz is not None else (
            "certifier" if plan.certifier is not None and claim is None else "model"),
        "checkpoint_sha256": getattr(plan.model, "checkpoint_sha256", None),
        "inputs_sha256": _tensor_sha(plan.x),
        "versions": _versions(),
        "device": str(plan.x.device),
        "seconds": round(time.time() - plan.t_start, 3),
        **plan.timings,
        **(provenance or {}),
    }
    return AuditReport(
        execution=execution, verdict=verdict, reasons=reasons,
        violations=(attacks.violations + attacks.executed) if attacks else [],
        lipschitz_claim=claim, certificate_violations=cert_violations,
        lipschitz_lower=lower, lipschitz_upper=upper, layers=layers,
        certified_accuracy=plan.accuracy, provenance=prov, tolerance=tolerance, gnp=gnp,
        attacks=attack_dict, samples=samples, warnings=warnings,
        violation_tensors=attacks.tensors if attacks else [],
    )


def _execution_section(plan: AuditPlan, verdict: str, attacks: AttackResult | None) -> dict:
    """The report's ``execution`` section: the executed verdict and what it rests on."""
    from lipverify.execution import ASSUMPTIONS, environment

    ecert = plan.executed_cert
    real = attacks.violations if attacks is not None else []
    executed = attacks.executed if attacks is not None else []
    r_hat = ecert.radius.cpu().double() if ecert is not None else None
    ev, reasons = decide_executed(
        verdict=verdict, tolerance=plan.tolerance, radius=plan.cert.radius.cpu().double(),
        radius_executed=r_hat, refusal=plan.executed_refusal, real_violations=real,
        executed_violations=executed)
    out: dict = {"execution": plan.execution, "executed_verdict": ev, "reasons": reasons,
                 "refusal": plan.executed_refusal, "n_executed_violations": len(executed),
                 "assumptions": list(ASSUMPTIONS), "environment": environment()}
    if ecert is not None:
        r = plan.cert.radius.cpu().double()
        ok = r > 0
        price = ((r - r_hat) / r)[ok]
        delta = ecert.delta.max(1).values.cpu()
        out.update({
            "price_median": float(price.median()) if price.numel() else None,
            "price_max": float(price.max()) if price.numel() else None,
            "delta_median": float(delta.median()),
            "delta_max": float(delta.max()),
            "n_executed_radius_positive": int((r_hat > 0).sum()),
            "dominant_ops": plan.executed_ops,
            "certified_accuracy": certified_accuracy(
                None, None, plan.y, plan.radii, certificates=ecert)["certified_accuracy"],
        })
    return out


# -- the whole audit in one process ------------------------------------------------------------
def audit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    lipschitz: float | None = None,
    certifier: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    attacks: str = "quick",
    checks: Sequence[str] = CHECKS,
    tolerance: float = 1e-3,
    seed: int = 0,
    radii: Sequence[float] = DEFAULT_RADII,
    state_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    provenance: dict | None = None,
    lipschitz_points: int = 8,
    execution: str = "real",
) -> AuditReport:
    """Audit ``model``'s certificates on pixels ``x`` (labels ``y`` optional).

    ``lipschitz`` overrides (or, for a generic module, declares) the claimed bound of the logit
    map; ``certifier`` is a callable ``x -> (pred, radius)`` used instead of the Lipschitz
    formula (its radii are then audited by attacks only, unless a bound is also given).
    ``execution="float32"`` also audits the model as executed in float32 on the CPU (the
    report's ``execution`` section: ``executed_verdict``, executed radii, executed
    violations). ``progress`` receives one message per stage and chunk (a :class:`Progress`
    also gets the structured events); ``state_dir`` keeps each stage's results for a resumed audit.
    """
    tracker = _as_progress(progress)
    plan = plan_audit(model, x, y, lipschitz=lipschitz, certifier=certifier, attacks=attacks,
                      checks=checks, tolerance=tolerance, seed=seed, radii=radii,
                      lipschitz_points=lipschitz_points, progress=tracker,
                      execution=execution)
    state = AuditState(Path(state_dir) if state_dir is not None else None, plan.fingerprint)
    lip = lipschitz_stage(plan, state, tracker) if "lipschitz" in plan.checks else None
    gnp = gnp_stage(plan, state, tracker) if "gnp" in plan.checks else None
    result = None
    if "attacks" in plan.checks:
        with _timed(plan, "attacks", tracker), attack_context(plan) as materialized:
            chunks: list[dict | None] = [state.load(chunk_name(c), _CHUNK_KEYS)
                                         for c in range(plan.n_chunks)]
            done = violations = 0
            for c, chunk in enumerate(chunks):
                if chunk is not None:
                    points, found = chunk_counts(plan, chunk, c)
                    done, violations = done + points, violations + found
            tracker.attacks_update(plan.n_points, done, violations)
            for c in range(plan.n_chunks):
                tracker(f"attacking chunk {c + 1}/{plan.n_chunks}")
                if chunks[c] is None:
                    chunks[c], _ = attack_chunk(plan, state, c)
                    points, found = chunk_counts(plan, chunks[c], c)
                    done, violations = done + points, violations + found
                    tracker.attacks_update(plan.n_points, done, violations)
            result = merge_attacks(plan, chunks, materialized)
    return assemble_report(plan, lip=lip, gnp=gnp, attacks=result, provenance=provenance)
