"""Issue 12: the audit never says "sound" wrongly, and never reports a "guaranteed" upper bound
below the exact Jacobian norm. One regression test (or more) per defect class, each on a small
model built to fool the auditor; every test fails on the auditor before the fix.

Classes: 1 repeated application, 2 the activation catalogue's conditions, 3 code paths the
bound does not see (hooks, instance forward, parametrizations), 4 internal contradictions,
5 certifier radii, 6 one decision on the certificate formula, 7 non-finite values, 9 models
that do not run in float64, 10 what "sound" promises. (Class 8, stale caches, is in
``test_cache_staleness.py``.)
"""

from __future__ import annotations

import json
import math
import re
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import lipverify
from lipverify.audits import audit
from lipverify.audits.lipschitz import layer_upper_bound, lipschitz_audit
from lipverify.audits.verdict import decide
from lipverify.errors import InputError

from soundness_models import jacobian_norm, linear, lln_generic, orthonormal

LIP = ("lipschitz",)


def points(n: int = 6, shape: tuple[int, ...] = (1, 1, 2), seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.25 + 0.5 * torch.rand(n, *shape, generator=g)


def two_pixel(*layers: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Flatten(), *layers).eval()


def not_sound_or_bounded(model: nn.Module, x: torch.Tensor, claim: float) -> dict:
    """Audit; the verdict must not be "sound" unless the bound covers the exact norm."""
    rep = audit(model, x, lipschitz=claim, checks=LIP, lipschitz_points=4)
    exact = jacobian_norm(model, x)
    if rep.lipschitz_upper is not None:
        assert rep.lipschitz_upper >= exact, (rep.lipschitz_upper, exact)
    if exact > claim * (1 + rep.tolerance):
        assert rep.verdict != "sound", rep.reasons
    return {"report": rep, "exact": exact}


# -- class 1: a module applied more than once ---------------------------------------------------


def _double() -> nn.Linear:
    return linear(2 * orthonormal(2, 2, 5))


@pytest.mark.parametrize("build", [
    pytest.param(lambda lin: two_pixel(lin, lin), id="same-instance-twice"),
    pytest.param(lambda lin: two_pixel(*[lin] * 3), id="sequential-of-[layer]*3"),
])
def test_repeated_instance_is_bounded_every_time(build):
    lin = _double()
    model = build(lin)
    k = sum(1 for m in model._modules.values() if m is lin)
    res = not_sound_or_bounded(model, points(), claim=2.0)
    assert res["exact"] == pytest.approx(2.0**k, rel=1e-6)
    assert res["report"].lipschitz_upper == pytest.approx(2.0**k, rel=1e-5)
    assert res["report"].verdict == "unsound"  # the attained lower bound is 2^k > 2


class Loop(nn.Module):
    def __init__(self, inner: nn.Module, times: int) -> None:
        super().__init__()
        self.inner, self.times = inner, times

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.times):
            x = self.inner(x)
        return x


def test_module_called_in_a_loop_is_bounded_once_per_application():
    lin = _double()
    model = two_pixel(lin, Loop(lin, 2))  # lin: listed once, applied three times
    res = lipschitz_audit(model, points(), seed=0)
    assert res.upper == pytest.approx(8.0, rel=1e-5)  # the graph bounds every application
    rep = not_sound_or_bounded(model, points(), claim=2.0)["report"]
    assert rep.verdict != "sound"


# -- class 2: the catalogue checks its conditions ------------------------------------------------


@pytest.mark.parametrize("layer, needle", [
    (nn.Softplus(beta=1.0, threshold=1.0), "threshold"),
    (nn.Softplus(), "threshold"),  # torch's default threshold 20 still leaves a jump
    (nn.Softplus(beta=float("nan"), threshold=math.inf), "beta"),
    (nn.LeakyReLU(float("nan")), "negative_slope"),
    (nn.LeakyReLU(float("inf")), "negative_slope"),
    (nn.ELU(alpha=float("nan")), "alpha"),
    (nn.Hardtanh(-1.0, 1.0), "min_val"),
])
def test_catalogue_refuses_when_its_condition_fails(layer, needle):
    if isinstance(layer, nn.Hardtanh):
        layer.min_val, layer.max_val = 1.0, -1.0  # swapped after construction
    ub, method = layer_upper_bound(layer, (4,))
    assert ub is None, method
    assert needle in method


@pytest.mark.parametrize("layer, expected", [
    (nn.Softplus(beta=2.0, threshold=math.inf), 1.0),
    (nn.LeakyReLU(-3.0), 3.0),
    (nn.ELU(alpha=2.0), 2.0),
    (nn.Hardtanh(-math.inf, 0.5), 1.0),
])
def test_catalogue_bounds_cover_the_exact_derivative(layer, expected):
    ub, _ = layer_upper_bound(layer, (64,))
    assert ub == pytest.approx(expected)
    z = torch.linspace(-6, 6, 64, dtype=torch.float64)
    d = torch.autograd.functional.jacobian(lambda t: layer.double()(t), z).diagonal().abs()
    assert float(d.max()) <= ub + 1e-12


def test_softplus_jump_is_a_counterexample_the_audit_does_not_vouch_for():
    """Softplus(beta=1, threshold=0.1) jumps by log(1 + e^-0.1) ~ 0.64 at x = 0.1: the
    prediction flips across it although the slope is <= 1 everywhere else."""
    sp = nn.Softplus(beta=1.0, threshold=0.1)
    model = two_pixel(linear(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), bias=False), sp)
    model.append(linear(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]) / math.sqrt(2)))
    x = torch.tensor([[[[0.09, 0.5]]]])
    with torch.no_grad():
        before, after = model(x).argmax(1), model(x + torch.tensor([0.02, 0.0]).view(1, 1, 1, 2))
    assert int(before) != int(after.argmax(1))  # flips within 0.02
    rep = audit(model, x, lipschitz=1.0, checks=LIP, lipschitz_points=1)
    assert rep.verdict != "sound"
    assert rep.lipschitz_upper is None
    assert any("threshold" in w and "softplus" in w for w in rep.warnings), rep.warnings


# -- class 3: hooks, instance forwards, parametrizations -----------------------------------------


def _tripled_by_hook(lin: nn.Linear) -> None:
    lin.register_forward_hook(lambda _m, _i, out: 3 * out)


def _tripled_by_pre_hook(lin: nn.Linear) -> None:
    lin.register_forward_pre_hook(lambda _m, args: (3 * args[0],))


def _tripled_by_instance_forward(lin: nn.Linear) -> None:
    lin.forward = types.MethodType(lambda self, z: 3 * F.linear(z, self.weight, self.bias), lin)


class Triple(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 3 * w


def _tripled_by_parametrization(lin: nn.Linear) -> None:
    parametrize.register_parametrization(lin, "weight", Triple())


@pytest.mark.parametrize("tamper", [_tripled_by_hook, _tripled_by_pre_hook,
                                    _tripled_by_instance_forward, _tripled_by_parametrization])
def test_code_outside_the_weights_is_bounded_or_refused(tamper):
    """The captured graph runs hooks, instance forwards and parametrizations as ops: the bound
    covers them (at least the exact norm 3), or there is none; never a bound of 1."""
    lin = linear(orthonormal(2, 2, 7))
    model = two_pixel(lin)
    tamper(lin)
    res = not_sound_or_bounded(model, points(), claim=1.0)
    assert res["exact"] == pytest.approx(3.0, rel=1e-6)
    rep = res["report"]
    assert rep.lipschitz_upper is None or rep.lipschitz_upper >= 3.0 * (1 - 1e-9)
    assert rep.verdict == "unsound"  # the attained ratio 3 exceeds the claim 1


def test_a_hook_on_the_container_is_bounded_or_refused():
    model = two_pixel(linear(orthonormal(2, 2, 7)))
    model.register_forward_hook(lambda _m, _i, out: 3 * out)
    upper = not_sound_or_bounded(model, points(), claim=1.0)["report"].lipschitz_upper
    assert upper is None or upper >= 3.0 * (1 - 1e-9)


def test_global_forward_hooks_are_bounded_or_refused():
    model = two_pixel(linear(orthonormal(2, 2, 7)))
    handle = nn.modules.module.register_module_forward_hook(lambda _m, _i, out: 3 * out)
    try:
        res = lipschitz_audit(model, points(), seed=0)
    finally:
        handle.remove()
    assert res.upper is None or res.upper >= 3.0 * (1 - 1e-9)
    assert res.upper is not None or any("global" in r for r in res.refusals), res.refusals


@pytest.mark.parametrize("wrap, exact_one", [
    (lambda lin: parametrizations.orthogonal(lin), True),
    (lambda lin: parametrizations.spectral_norm(lin), False),
    (lambda lin: parametrizations.weight_norm(lin), False),
])
def test_read_through_parametrizations_are_bounded_exactly(wrap, exact_one):
    torch.manual_seed(3)
    lin = wrap(nn.Linear(2, 3))
    model = two_pixel(lin, nn.Tanh(), wrap(nn.Linear(3, 2)))
    x = points()
    rep = audit(model, x, lipschitz=1.0, checks=LIP, lipschitz_points=4)
    assert rep.lipschitz_upper is not None, rep.reasons
    layer_norms = [float(torch.linalg.matrix_norm(m.weight.detach().double(), ord=2))
                   for m in (model[1], model[3])]
    assert rep.lipschitz_upper == pytest.approx(math.prod(layer_norms), rel=1e-5)
    assert rep.lipschitz_upper >= jacobian_norm(model, x)
    if exact_one:
        assert rep.verdict == "sound", rep.reasons


# -- class 4: internal contradictions ---------------------------------------------------------


def _fool_float64(model: nn.Sequential) -> None:
    """Converting the model to float64 scales its layer: the float64 twin computes 3 f."""

    def _apply(self, fn, recurse=True):
        out = nn.Module._apply(self, fn, recurse)
        if self[1].weight.dtype == torch.float64:
            with torch.no_grad():
                self[1].weight.mul_(3)
        return out

    model._apply = types.MethodType(_apply, model)


def test_lower_above_upper_is_an_auditor_error_not_a_verdict(monkeypatch):
    model = two_pixel(linear(orthonormal(2, 2, 9)))
    _fool_float64(model)
    from lipverify.audits import lipschitz as lip

    real = lip.graph_evaluator
    monkeypatch.setattr(lip, "graph_evaluator", lambda cap: (lambda z: 3 * real(cap)(z)))
    rep = audit(model, points(), lipschitz=1.0, checks=LIP, lipschitz_points=4)
    assert rep.lipschitz_lower > rep.lipschitz_upper
    assert rep.verdict == "inconclusive"
    assert rep.exit_code == 3
    err = [r for r in rep.reasons if r.startswith("auditor error:")]
    assert err and "logits map" in err[0]
    lo, up = (float(v) for v in re.findall(r"bound ([0-9.e+-]+)", err[0]))
    assert lo == pytest.approx(rep.lipschitz_lower) and up == pytest.approx(rep.lipschitz_upper)


def test_float64_counterexample_still_makes_it_unsound():
    common = dict(claim=1.0, tolerance=1e-3, checks=("lipschitz", "attacks"), lower=3.0,
                  lower_float64=True, upper=1.0, certificate_violations=[],
                  auditor_errors=["the logits map: attained lower bound 3 > guaranteed 1"],
                  refusals=[], n_attacked=4, sanity=[], n_nonfinite=0)
    verdict, reasons = decide(violations=[{"attack": "apgd-ce"}], float64_rechecked=True,
                              **common)
    assert verdict == "unsound" and any(r.startswith("auditor error:") for r in reasons)
    verdict, _ = decide(violations=[], float64_rechecked=True, **common)
    assert verdict == "inconclusive"


# -- class 5: certifier radii are checked against the guaranteed bound -------------------------


def test_certifier_radii_beyond_the_guaranteed_bound_are_violations():
    model = two_pixel(linear(orthonormal(3, 2, 11)))
    x = points(8)
    cert = lipverify.certify(model, x, lipschitz=1.0)
    assert int((cert.radius > 0).sum()) >= 4
    rep = audit(model, x, lipschitz=1.0, certifier=lambda _x: (cert.pred, 1.5 * cert.radius),
                checks=LIP, lipschitz_points=4)
    assert rep.verdict == "unsound", rep.reasons
    assert any(r.startswith("certifier:") for r in rep.reasons)
    assert len(rep.certificate_violations) == int((cert.radius > 0).sum())
    ok = audit(model, x, lipschitz=1.0, certifier=lambda _x: (cert.pred, cert.radius),
               checks=LIP, lipschitz_points=4)
    assert ok.verdict == "sound" and ok.certificate_violations == []


def test_certifier_predicting_another_class_is_a_violation():
    model = two_pixel(linear(orthonormal(3, 2, 11)))
    x = points(4)
    cert = lipverify.certify(model, x, lipschitz=1.0)
    wrong = (cert.pred + 1) % 3
    rep = audit(model, x, lipschitz=1.0, certifier=lambda _x: (wrong, 0.01 + cert.radius),
                checks=LIP, lipschitz_points=4)
    assert rep.verdict == "unsound"
    assert all(v["model_pred"] != v["pred"] for v in rep.certificate_violations)


# -- class 6: one decision on the certificate formula -----------------------------------------


def test_declared_lln_kind_is_used_by_certify_and_audit_alike():
    model = lln_generic()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    features_claim = 3.0  # the features map is 3 x orthonormal rows
    rep = audit(model, x, lipschitz=features_claim, checks=LIP, lipschitz_points=2)
    assert rep.provenance["certificate_kind"] == "lln"
    cert = lipverify.certify(model, x, lipschitz=features_claim)
    assert [s["radius"] for s in rep.samples] == pytest.approx(cert.radius.tolist(), rel=0,
                                                                abs=0)
    assert rep.verdict == "sound"  # the captured features map is bounded exactly
    assert rep.lipschitz_upper == pytest.approx(features_claim, rel=1e-5)


def test_unknown_certificate_kind_is_refused():
    model = two_pixel(linear(orthonormal(2, 2, 1)))
    model.certificate_kind = "mystery"
    with pytest.raises(InputError, match="certificate_kind"):
        audit(model, points(), lipschitz=1.0, checks=LIP)
    with pytest.raises(InputError, match="certificate_kind"):
        lipverify.certify(model, points(), lipschitz=1.0)


# -- class 7: non-finite values -------------------------------------------------------------------


def test_nan_logits_never_give_sound_and_do_not_blame_the_input():
    lin = linear(orthonormal(3, 2, 2))
    with torch.no_grad():
        lin.bias[0] = float("nan")
    model = two_pixel(lin)
    for checks in (LIP, ("lipschitz", "attacks")):
        rep = audit(model, points(), lipschitz=1.0, checks=checks, lipschitz_points=2)
        assert rep.verdict != "sound"
        assert any("not finite" in r or "non-finite" in r for r in rep.reasons), rep.reasons


def test_nan_certifier_radii_never_give_sound():
    model = two_pixel(linear(orthonormal(3, 2, 2)))
    x = points()
    cert = lipverify.certify(model, x, lipschitz=1.0)
    rad = cert.radius.clone()
    rad[0] = float("nan")
    rep = audit(model, x, lipschitz=1.0, certifier=lambda _x: (cert.pred, rad), checks=LIP,
                lipschitz_points=2)
    assert rep.verdict == "inconclusive"
    assert any("non-finite" in r for r in rep.reasons)


# -- class 9: a model that does not run in float64 -------------------------------------------------


class Float32Only(nn.Module):
    """Normalizes its weight with ``dtype=float32`` (as orthogonium's reparametrizers do)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 2, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight / torch.norm(self.weight, dtype=torch.float32)
        return x.flatten(1) @ w.T


def test_model_that_cannot_run_in_float64_is_refused_not_crashed():
    model = Float32Only().eval()
    rep = audit(model, points(2), lipschitz=1.0, checks=("lipschitz", "gnp", "attacks"),
                lipschitz_points=2)
    # the captured graph runs in float64 (constants as the model computes them); the
    # attacks' recheck, on a float64 copy of the module, says it fell back to float32
    assert rep.verdict in ("sound", "inconclusive") and rep.lipschitz_lower > 0
    assert rep.lipschitz_upper is not None
    assert "own dtype" in rep.attacks["settings"]["recheck"]


# -- class 10: what "sound" promises, in numbers -----------------------------------------------


def test_certified_accuracy_is_reported_at_the_vouched_radii():
    model = two_pixel(linear(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]) / math.sqrt(2)))
    r0 = 36 / 255
    # margin sqrt(2) * x0 ... the radius of (x0, .) is x0 - 0 .. choose radius 1.2 r0
    rad = 1.2 * r0
    x = torch.tensor([[[[rad, 0.5]]]])
    tol = 0.5
    rep = audit(model, x, torch.tensor([0]), lipschitz=1.0, checks=LIP, tolerance=tol,
                lipschitz_points=1, radii=[r0])
    key = "%.6f" % r0
    assert rep.samples[0]["radius"] == pytest.approx(rad, rel=1e-5)
    assert rep.certified_accuracy["claimed_certified_accuracy"][key] == 1.0
    assert rep.certified_accuracy["certified_accuracy"][key] == 0.0  # 1.2 / 1.5 < 1
    assert "1 + 0.5" in rep.certified_accuracy["promise"]
    assert "vouched" in rep.to_markdown()


# -- the CLI path: --model module:factory --lipschitz L ----------------------------------------


def test_cli_generic_model_with_reuse_is_not_sound(tmp_path, capsys):
    from lipverify.cli import main

    out = tmp_path / "audit"
    code = main(["audit", "--model", "soundness_models:reused_linear", "--lipschitz", "2",
                 "--dataset", "synthetic", "--n", "4", "--checks", "lipschitz", "--quiet",
                 "--out", str(out), "--lipschitz-points", "2"])
    doc = json.loads((out / "report.json").read_text())
    assert code == 1 and doc["verdict"] == "unsound"  # the attained lower bound is 4 > 2
    assert doc["lipschitz_upper"] >= 4.0
    assert doc["provenance"]["certificate_kind"] == "ortho"
    assert "2 x orthogonal" not in capsys.readouterr().err


def test_cli_help_says_which_map_lipschitz_bounds(capsys):
    from lipverify.cli import main

    with pytest.raises(SystemExit):
        main(["audit", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "features" in help_text and "logits" in help_text and "'lln'" in help_text


def test_an_infinite_upper_bound_refutes_no_certifier_radius():
    """U = inf supports no radius, but it is no evidence against one either."""
    steep = [nn.LeakyReLU(1e38) for _ in range(9)]  # bound 1e38 each: the product is inf
    model = two_pixel(linear(2 * torch.eye(2)), *steep)  # positive inputs: slope 1 regions
    x = points(4)
    cert = lipverify.certify(model, x, lipschitz=2.0)
    rep = audit(model, x, lipschitz=2.0, certifier=lambda _x: (cert.pred, cert.radius),
                checks=LIP, lipschitz_points=2)
    assert rep.lipschitz_upper == math.inf
    assert rep.certificate_violations == []
    assert rep.verdict == "inconclusive", rep.reasons
