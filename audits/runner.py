"""``audit()``: decide whether a model's certificates are sound.

The stages (certify, Lipschitz bounds, GNP, attack chunks) feed :func:`verdict.decide
<lipverify.audits.verdict.decide>`, which holds the verdict rules: **unsound** on a
float64-confirmed counterexample, an attained float64 lower bound above ``claim * (1 + τ)``
or a certifier radius beyond what the guaranteed bound supports; **sound** only with a
guaranteed upper bound at or below ``claim * (1 + τ)`` and nothing refused, non-finite or
flagged; **inconclusive** otherwise, including auditor errors (a lower bound above an upper
bound). The certificate formula (kind and claimed map) is decided once, by
:func:`lipverify.certificates.claim_of`, as in :func:`lipverify.certify`.

Attacks and lower bounds can only refute; only the guaranteed upper bound can support "sound".
The attack stage runs in fixed chunks with per-chunk seeds and can checkpoint its per-sample
results to ``state_dir``, so a resumed audit reports exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lipverify.atomic import atomic_write_bytes, atomic_write_text
from lipverify.audits.report import AuditReport
from lipverify.audits.verdict import certifier_violations, decide, vouched_accuracy
from lipverify.certificates import DEFAULT_RADII, certificate_kind_of, certify, claim_of
from lipverify.errors import InputError, check_labels, check_model_images, check_seed

__all__ = ["audit", "ATTACK_CHUNK", "CHECKS"]

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


class _State:
    """Per-stage results saved under ``state_dir`` (atomic writes), keyed by a fingerprint."""

    def __init__(self, directory: Path | None, fingerprint: str) -> None:
        self.dir = directory
        if directory is None:
            return
        directory.mkdir(parents=True, exist_ok=True)
        fp = directory / "fingerprint"
        if fp.exists() and fp.read_text() != fingerprint:
            raise InputError(
                f"{directory} holds the state of a different audit (model, data or settings "
                "changed); use a new --out or --overwrite"
            )
        atomic_write_text(fp, fingerprint)

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
        import io

        buf = io.BytesIO()
        torch.save(obj, buf)
        atomic_write_bytes(self.dir / name, buf.getvalue())


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


def _fast_attack_context(model: nn.Module, x: torch.Tensor, suite: str) -> Any:
    """Eval mode with constant SOC weights and materialised small layers for the attacks:
    the same function (to 1e-5, tested), built once because the attacks run thousands of
    passes. Bounds and GNP checks never use it; they examine the layers' own operators."""
    from contextlib import nullcontext

    from lipverify.layers.soc import SOC, fast_eval

    if not any(isinstance(m, SOC) for m in model.modules()):
        return nullcontext()
    passes = {"quick": 400, "standard": 4000, "minimal-norm": 3000}.get(suite, 1000)
    return fast_eval(model, tuple(x.shape[1:]), images=passes * x.shape[0])


def _quantiles(t: torch.Tensor) -> dict[str, float]:
    if t.numel() == 0:
        return {}
    qs = torch.tensor([0.0, 0.25, 0.5, 0.75, 0.95, 1.0], dtype=torch.float64)
    vals = torch.quantile(t.double(), qs)
    return {f"q{int(q * 100)}": float(v) for q, v in zip(qs, vals, strict=True)}


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
) -> AuditReport:
    """Audit ``model``'s certificates on pixels ``x`` (labels ``y`` optional).

    ``lipschitz`` overrides (or, for a generic module, declares) the claimed bound of the logit
    map; ``certifier`` is a callable ``x -> (pred, radius)`` used instead of the Lipschitz
    formula (its radii are then audited by attacks only, unless a bound is also given).
    """
    unknown = set(checks) - set(CHECKS)
    if unknown:
        raise InputError(f"unknown checks {sorted(unknown)}; choose from {list(CHECKS)}")
    if not (isinstance(tolerance, (int, float)) and 0 <= tolerance < 1):
        raise InputError(f"tolerance must be a number in [0, 1), got {tolerance!r}")
    check_seed(seed)
    if lipschitz is not None:
        try:
            lipschitz = float(lipschitz)
        except (TypeError, ValueError):
            raise InputError(f"lipschitz must be a number, got {repr(lipschitz)[:40]}") from None
    say = progress or (lambda _msg: None)
    t_start = time.time()
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

    say("certifying")
    if certifier is not None:
        with torch.no_grad():
            pred, radius = certifier(x)
        pred = torch.as_tensor(pred).long().flatten()
        radius = torch.as_tensor(radius, dtype=torch.float32).flatten().clamp_min(0)
        if pred.shape[0] != x.shape[0] or radius.shape[0] != x.shape[0]:
            raise InputError("the certifier must return one prediction and radius per input")
        with torch.no_grad():
            logits = model(x)
        from lipverify.certificates import Certificates

        cert = Certificates(pred=pred, radius=radius, logits=logits)
    else:
        cert = certify(model, x, lipschitz)
    if y is not None:
        y = check_labels(y, x.shape[0], cert.logits.shape[1])
    # Non-finite logits or radii certify nothing and are not attacked; they block "sound".
    finite = torch.isfinite(cert.logits).all(1).cpu() & torch.isfinite(cert.radius).cpu()
    attack_radius = torch.where(finite, cert.radius.cpu(), torch.zeros_like(cert.radius.cpu()))
    acc = vouched_accuracy(cert, y, radii, tolerance)

    fingerprint = json.dumps({
        "x": _tensor_sha(x), "y": None if y is None else _tensor_sha(y),
        "weights": hashlib.sha256(b"".join(
            t.detach().cpu().contiguous().numpy().tobytes() for t in model.state_dict().values()
        )).hexdigest(),
        "attacks": attacks, "checks": list(checks), "tolerance": tolerance, "seed": seed,
        "claim": claim, "radius": _tensor_sha(cert.radius),
        "lipschitz_points": lipschitz_points,
    }, sort_keys=True)
    state = _State(Path(state_dir) if state_dir is not None else None, fingerprint)

    reasons: list[str] = []
    warnings: list[str] = []
    layers: list[dict] = []
    lower = upper = None
    gnp_dict = attack_dict = None
    violations: list[dict] = []
    violation_tensors: list[dict] = []
    min_adv = torch.full((x.shape[0],), float("inf"))
    timings: dict[str, float] = {}  # wall seconds per stage, into the provenance
    stage_start = t_start

    def stage_done(name: str) -> None:
        nonlocal stage_start
        now = time.time()
        timings[f"{name}_seconds"] = round(now - stage_start, 3)
        stage_start = now

    stage_done("certify")

    if "lipschitz" in checks:
        say("bounding the Lipschitz constant")
        lip = state.load("lipschitz.pt")
        if lip is None:
            from lipverify.audits.lipschitz import lipschitz_audit

            res = lipschitz_audit(model, x[:lipschitz_points],
                                  map="features" if kind == "lln" else "logits", seed=seed)
            lip = json.loads(json.dumps(res.to_dict(), default=float))
            state.save("lipschitz.pt", {"json": json.dumps(lip)})
        else:
            lip = json.loads(lip["json"])
        layers = lip.get("layers", [])
        lower, upper = lip.get("lower"), lip.get("upper")
        warnings += lip.get("notes", [])
        warnings += [f"no upper bound: {r}" for r in lip.get("refusals", [])]
        stage_done("lipschitz")

    if "gnp" in checks:
        say("checking gradient-norm preservation")
        g = state.load("gnp.pt")
        if g is None:
            from lipverify.audits.gnp import gnp_audit

            g = {"json": json.dumps(gnp_audit(model, x[:lipschitz_points], seed=seed).to_dict(),
                                    default=float)}
            state.save("gnp.pt", g)
        gnp_dict = json.loads(g["json"])
        warnings += gnp_dict.get("warnings", [])
        stage_done("gnp")

    n_attacked = 0
    sanity: list[str] = []
    if "attacks" in checks:
        from lipverify.audits.attack_audit import attack_audit

        n_chunks = math.ceil(x.shape[0] / ATTACK_CHUNK)
        settings: dict = {}
        with _fast_attack_context(model, x, attacks) as mat_report:
            for c in range(n_chunks):
                sl = slice(c * ATTACK_CHUNK, (c + 1) * ATTACK_CHUNK)
                say(f"attacking chunk {c + 1}/{n_chunks}")
                chunk = state.load(f"attacks-{c:05d}.pt", _CHUNK_KEYS)
                if chunk is None:
                    res = attack_audit(model, x[sl], cert.pred[sl], attack_radius[sl],
                                       suite=attacks, tolerance=tolerance,
                                       seed=seed * 100_003 + c)
                    rows = [_violation_record(v, sl.start) for v in res.violations]
                    chunk = {
                        "rows": json.dumps([r for r, _ in rows]),
                        "tensors": [t for _, t in rows],
                        "min_adv": res.min_adv_distance.detach().cpu().float(),
                        "attacked": res.attacked.detach().cpu().bool(),
                        "sanity": json.dumps(list(res.sanity_flags)),
                        "settings": json.dumps(res.settings, default=str),
                    }
                    state.save(f"attacks-{c:05d}.pt", chunk)
                violations += json.loads(chunk["rows"])
                violation_tensors += chunk["tensors"]
                min_adv[sl] = chunk["min_adv"]
                n_attacked += int(chunk["attacked"].sum())
                sanity += [f for f in json.loads(chunk["sanity"]) if f not in sanity]
                settings = json.loads(chunk["settings"])
        settings["seed"] = seed
        settings["chunk_seeds"] = f"seed * 100003 + chunk index (chunks of {ATTACK_CHUNK})"
        if mat_report is not None:
            settings["materialized_layers"] = list(mat_report.materialized)
            timings["materialize_seconds"] = round(mat_report.seconds, 3)
        found = torch.isfinite(min_adv) & (cert.radius > 0)
        tight = cert.radius[found].double() / min_adv[found].double()
        attack_dict = {
            "settings": settings,
            "n_attacked": n_attacked,
            "sanity_flags": sanity,
            "tightness_quantiles": _quantiles(tight),
            "n_with_adversarial": int(found.sum()),
        }
        stage_done("attacks")

    # -- verdict ------------------------------------------------------------------------------
    lip_refusals = list(lip.get("refusals", [])) if "lipschitz" in checks else []
    auditor_errors = list(lip.get("auditor_errors", [])) if "lipschitz" in checks else []
    cert_violations = (
        certifier_violations(model, cert, kind, upper, tolerance)
        if certifier is not None and claim is not None and upper is not None
        and math.isfinite(upper) else []  # an infinite bound supports no radius, refutes none
    )
    recheck = (attack_dict or {}).get("settings", {}).get("recheck", "float64")
    verdict, verdict_reasons = decide(
        claim=claim, tolerance=tolerance, checks=checks, lower=lower, upper=upper,
        violations=violations, float64_rechecked=recheck.startswith("float64"),
        certificate_violations=cert_violations, auditor_errors=auditor_errors,
        refusals=lip_refusals, n_attacked=n_attacked, sanity=sanity,
        n_nonfinite=int((~finite).sum()),
        lower_float64=("lipschitz" in checks and lip.get("lower_dtype", "float64") == "float64"),
    )
    reasons += verdict_reasons
    if gnp_dict and any(not layer.get("gnp", True) for layer in gnp_dict.get("layers", [])):
        warnings.append("some layers are not gradient-norm preserving (see gnp)")

    samples = [
        {"index": i, "label": None if y is None else int(y[i]), "pred": int(cert.pred[i]),
         "radius": float(cert.radius[i]),
         "min_adv_distance": float(min_adv[i]) if "attacks" in checks else None}
        for i in range(x.shape[0])
    ]
    prov = {
        "seed": seed,
        "tolerance": tolerance,
        "checks": list(checks),
        "attack_suite": attacks if "attacks" in checks else None,
        "attack_settings": attack_dict["settings"] if attack_dict else None,
        "n_points": int(x.shape[0]),
        "lipschitz_points": min(lipschitz_points, int(x.shape[0])),
        "certificate_kind": kind,
        "claim_source": "override" if lipschitz is not None else (
            "certifier" if certifier is not None and claim is None else "model"),
        "checkpoint_sha256": getattr(model, "checkpoint_sha256", None),
        "inputs_sha256": _tensor_sha(x),
        "versions": _versions(),
        "device": str(x.device),
        "seconds": round(time.time() - t_start, 3),
        **timings,
        **(provenance or {}),
    }
    return AuditReport(
        verdict=verdict, reasons=reasons, violations=violations, lipschitz_claim=claim,
        certificate_violations=cert_violations,
        lipschitz_lower=lower, lipschitz_upper=upper, layers=layers,
        certified_accuracy=acc, provenance=prov, tolerance=tolerance, gnp=gnp_dict,
        attacks=attack_dict, samples=samples, warnings=warnings,
        violation_tensors=violation_tensors,
    )
