"""lipverify.audits.attack_audit: attacks at the certified radii.

Controls:
* positive: a linear classifier with orthonormal rows is exactly 1-Lipschitz and its ortho
  certificate margin / sqrt(2) is *tight* (the true distance to the runner-up's boundary),
  so with true radii nothing can be found, and with radii overstated 2x every certified
  point has a counterexample (caught by the attacks, confirmed in float64);
* positive: a LipConvNet with its own claim (sound) gives no violation.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lipverify
from lipverify.attacks import SUITES, AttackSpec
from lipverify.audits.attack_audit import AttackAuditResult, Violation, attack_audit
from lipverify.errors import InputError

from controls import Rounding, batch, linear_model


def recheck(model: nn.Module, v: Violation) -> None:
    """Independent float64 re-check of a reported violation."""
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        z = m64(v.x_adv.double()[None])[0]
    assert int(z.argmax()) == v.adv_pred != v.pred
    dist = float((v.x_adv.double() - v.x.double()).norm())
    assert dist == pytest.approx(v.distance, rel=1e-9)
    assert 0 <= float(v.x_adv.min()) and float(v.x_adv.max()) <= 1
    assert torch.allclose(z, v.logits64, atol=1e-9)


@pytest.mark.parametrize("shape", [(1, 16, 2), (3, 16, 10)])
def test_tight_linear_model_with_true_radii_has_no_violation(shape):
    c, s, k = shape
    m = linear_model(c, s, k)
    x = batch(6, c, s)
    cert = lipverify.certify(m, x, lipschitz=1.0)
    progress = []
    res = attack_audit(m, x, cert.pred, cert.radius, suite="quick",
                       progress=lambda *a: progress.append(a))
    assert isinstance(res, AttackAuditResult)
    assert res.violations == [] and res.sanity_flags == [] and res.unconfirmed == 0
    assert res.min_adv_distance.shape == (6,) and res.attacked.shape == (6,)
    assert res.attacked.all() and res.tightness.shape == (6,)
    found = torch.isfinite(res.min_adv_distance)
    assert found.any()
    # No adversarial can be closer than the (tight) certified radius.
    assert (res.min_adv_distance[found] >= cert.radius.double()[found] * (1 - 1e-4)).all()
    assert set(res.tightness_quantiles) == {"min", "p10", "p25", "median", "p75", "p90", "max"}
    assert res.tightness_quantiles["max"] <= 1 + 1e-4
    assert [p[0] for p in progress] == ["apgd-ce", "apgd-t", "ddn"]
    assert res.settings["suite"] == "quick" and res.settings["tolerance"] == 1e-3
    assert res.settings["num_classes"] == k
    assert res.settings["attacks"][1]["settings"]["n_target_classes"] == min(3, k - 1)
    assert res.seconds > 0


@pytest.mark.parametrize("suite", ["quick", "reduced-standard", "reduced-minimal-norm"])
def test_radii_overstated_2x_are_refuted_and_confirmed_in_float64(suite):
    specs = {
        "quick": "quick",
        "reduced-standard": [
            AttackSpec("autoattack", {"components": [
                ["apgd-ce", {"steps": 10, "n_restarts": 1}],
                ["apgd-t", {"steps": 10, "n_target_classes": 9, "n_restarts": 1}],
                ["fab-t", {"steps": 10, "n_target_classes": 9, "n_restarts": 1}],
                ["square", {"n_queries": 50, "p_init": 0.8, "resc_schedule": False,
                            "n_restarts": 1}]]}),
            AttackSpec("ddn", {"steps": 50}),
        ],
        "reduced-minimal-norm": [AttackSpec("ddn", {"steps": 50}),
                                 AttackSpec("fmn-l2", {"steps": 50}),
                                 AttackSpec("fab-t", {"steps": 10, "n_target_classes": 9})],
    }[suite]
    m = linear_model(3, 16, 10)
    x = batch(6, 3, 16)
    cert = lipverify.certify(m, x, lipschitz=1.0)
    radius = 2 * cert.radius
    res = attack_audit(m, x, cert.pred, radius, suite=specs, tolerance=1e-3, seed=0)
    assert [v.index for v in res.violations] == list(range(6))
    for v in res.violations:
        assert v.distance < v.radius * (1 - 1e-3)
        assert v.radius == pytest.approx(float(radius[v.index]))
        assert v.pred == int(cert.pred[v.index])
        assert v.x.shape == v.x_adv.shape == (3, 16, 16)
        assert v.logits32.shape == v.logits64.shape == (10,)
        assert v.logits64.dtype == torch.float64 and v.logits32.dtype == torch.float32
        assert v.attack.split("/")[0] in {"apgd-ce", "apgd-t", "ddn", "autoattack", "fmn-l2",
                                          "fab-t"}
        recheck(m, v)
    # The true distance is the certified radius: tightness of the 2x radii is ~2.
    assert 1.5 < res.tightness_quantiles["median"] <= 2.0 + 1e-3
    again = attack_audit(m, x, cert.pred, radius, suite=specs, tolerance=1e-3, seed=0)
    assert [v.distance for v in again.violations] == [v.distance for v in res.violations]
    assert torch.equal(again.min_adv_distance, res.min_adv_distance)


def test_sound_lipconvnet_has_no_violation_and_restores_its_mode():
    torch.manual_seed(0)
    m = lipverify.LipConvNet(init_channels=6, input_size=32)
    x = torch.rand(2, 3, 32, 32)
    cert = lipverify.certify(m, x)
    assert (cert.radius > 0).all()
    m.train()
    res = attack_audit(m, x, cert.pred, cert.radius, suite="quick")
    assert m.training and all(mod.training for mod in m.modules())
    assert res.violations == [] and res.sanity_flags == []
    found = torch.isfinite(res.min_adv_distance)
    assert (res.min_adv_distance[found] >= cert.radius.double()[found]).all()


def test_wrong_prediction_is_a_violation_at_distance_zero_and_uncertified_points_skip():
    m = linear_model(1, 16, 3)
    x = batch(4, 1, 16)
    cert = lipverify.certify(m, x, lipschitz=1.0)
    pred = cert.pred.clone()
    pred[1] = (pred[1] + 1) % 3
    radius = cert.radius.clone()
    radius[2] = 0.0
    res = attack_audit(m, x, pred, radius, suite=[AttackSpec("ddn", {"steps": 20})])
    assert [(v.index, v.attack, v.distance) for v in res.violations] == [(1, "clean", 0.0)]
    assert res.attacked.tolist() == [True, True, False, True]
    assert math.isinf(float(res.min_adv_distance[2])) and math.isnan(float(res.tightness[2]))
    assert res.tightness_quantiles["max"] == math.inf
    assert res.to_dict()["violations"][0]["attack"] == "clean"


def test_sanity_flags_are_recorded_in_eval_mode():
    m = Rounding(linear_model(1, 16, 10))
    x = batch(3, 1, 16)
    cert = lipverify.certify(m, x, lipschitz=1.0)
    res = attack_audit(m, x, cert.pred, cert.radius, suite=[AttackSpec("ddn", {"steps": 5})])
    assert res.sanity_flags == ["zero_gradients"]
    assert res.settings["sanity_mode"] == "eval"


class Float32Only(nn.Module):
    """Linear in float64; in float32 a bump towards class 0 grows with the distance of x from
    the 1/255 pixel grid (zero at grid inputs): float32-only counterexamples."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.inner(x)
        if x.dtype == torch.float32:
            off = (x - torch.round(x * 255) / 255).flatten(1).norm(dim=1)
            z = z + nn.functional.one_hot(torch.zeros_like(off, dtype=torch.long),
                                          z.shape[1]) * (1e3 * off)[:, None]
        return z


def test_float32_only_candidates_are_not_violations():
    inner = linear_model(1, 16, 4)
    with torch.no_grad():
        inner[1].bias.copy_(torch.tensor([-10.0, 0.0, 0.0, 0.0]))  # class 0 never predicted
    m = Float32Only(inner).eval()
    x = torch.round(batch(4, 1, 16) * 255) / 255
    cert = lipverify.certify(m, x, lipschitz=1.0)
    assert (cert.pred != 0).all() and (cert.radius > 0).all()
    suite = [AttackSpec("apgd-ce", {"steps": 10}), AttackSpec("ddn", {"steps": 20})]
    res = attack_audit(m, x, cert.pred, cert.radius, suite=suite)
    assert res.violations == []
    assert res.unconfirmed > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"radius": torch.ones(2)},
        {"radius": -torch.ones(3)},
        {"radius": torch.tensor([0.1, float("nan"), 0.1])},
        {"tolerance": 1.0},
        {"suite": "nonsense"},
        {"pred": torch.tensor([0, 1, 17])},
        {"batch_size": 0},
    ],
)
def test_bad_input_raises_input_error(kwargs):
    m = linear_model(1, 16, 10)
    x = batch(3, 1, 16)
    args = {"radius": torch.full((3,), 0.1), "pred": m(x).argmax(1)} | kwargs
    with pytest.raises(InputError):
        attack_audit(m, x, args.pop("pred"), args.pop("radius"), **args)


def test_quick_suite_is_recorded_verbatim():
    m = linear_model(1, 16, 10)
    x = batch(2, 1, 16)
    cert = lipverify.certify(m, x, lipschitz=1.0)
    res = attack_audit(m, x, cert.pred, torch.zeros(2), suite="quick")
    assert not res.attacked.any() and res.violations == [] and res.tightness_quantiles == {}
    assert res.settings["attacks"] == [s.to_dict() for s in SUITES["quick"]]
    assert res.settings["libraries"]["torchattacks"] == "3.5.1"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_inputs_device():
    m = linear_model(3, 16, 10).to("cuda")
    x = batch(4, 3, 16).to("cuda")
    cert = lipverify.certify(m, x, lipschitz=1.0)
    state = torch.cuda.get_rng_state()
    res = attack_audit(m, x, cert.pred, 2 * cert.radius, suite="quick")
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert len(res.violations) == 4 and res.violations[0].x_adv.device.type == "cpu"
