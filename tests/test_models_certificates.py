"""LipConvNet structure, the claimed bound, and certificate soundness."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lipverify
from lipverify.certificates import radii_from_logits
from lipverify.errors import InputError
from lipverify.layers import SOC, HouseholderOrder1, HouseholderOrder2
from lipverify.models import LipConvNet


def _randomize_angles(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, HouseholderOrder1):
                m.theta.copy_(2 * math.pi * torch.rand(m.theta.shape, generator=g))
            if isinstance(m, HouseholderOrder2):
                for p in (m.theta0, m.theta1, m.theta2):
                    p.copy_(2 * math.pi * torch.rand(p.shape, generator=g))


@pytest.mark.parametrize("num_layers", [5, 10])
@pytest.mark.parametrize("last", ["ortho", "lln"])
def test_structure_matches_reference_block_plan(num_layers: int, last: str) -> None:
    m = LipConvNet(num_layers=num_layers, init_channels=8, last_layer=last)
    per_stage = num_layers // 5
    convs = [b.conv for b in m.blocks]
    assert len(convs) == num_layers
    strides = [c.stride for c in convs]
    kernels = [c.kernel_size for c in convs]
    assert strides == ([1] * (per_stage - 1) + [2]) * 5
    assert kernels[-1] == 1 and all(k == 3 for k in kernels[:-1])
    assert m.num_features == 8 * 2**5
    x = torch.rand(2, 3, 32, 32)
    assert m(x).shape == (2, 10)
    assert m.features(x).shape == (2, 256)


def test_invalid_arguments_are_rejected() -> None:
    for kw in ({"num_layers": 7}, {"activation": "relu"}, {"last_layer": "x"},
               {"conv": "nope"}, {"input_size": 20}):
        with pytest.raises(ValueError):
            LipConvNet(**kw)


def test_claim_is_one_over_min_std() -> None:
    m = LipConvNet(init_channels=4, std=(0.2, 0.3, 0.25))
    assert m.lipschitz_claim == pytest.approx(1 / 0.2)
    assert m.certificate_kind == "ortho"
    assert LipConvNet(init_channels=4, last_layer="lln").certificate_kind == "lln"


def _power_iteration_norm(fn, x: torch.Tensor, iters: int = 30) -> float:
    """Float64 power-iteration estimate of ||J_fn(x)|| (a lower bound on the Lipschitz const)."""
    v = torch.randn_like(x)
    v /= v.norm()
    est = 0.0
    for _ in range(iters):
        _, jv = torch.func.jvp(fn, (x,), (v,))
        _, vjp = torch.func.vjp(fn, x)
        (jtjv,) = vjp(jv)
        est = jv.norm().item()
        v = jtjv / jtjv.norm()
    return est


@pytest.mark.parametrize("num_layers", [5, 10])
@pytest.mark.parametrize("activation,last", [("hh1", "ortho"), ("hh2", "lln"), ("maxmin", "lln")])
def test_fresh_model_respects_its_claim(num_layers: int, activation: str, last: str) -> None:
    torch.manual_seed(num_layers)
    m = LipConvNet(activation=activation, num_layers=num_layers, init_channels=4,
                   last_layer=last).double().eval()
    _randomize_angles(m, seed=num_layers)
    fn = m.features if last == "lln" else m
    for i in range(2):
        x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
        est = _power_iteration_norm(fn, x)
        assert est <= m.lipschitz_claim * (1 + 1e-4), (i, est, m.lipschitz_claim)
        assert est > 0.3 * m.lipschitz_claim  # the estimate is meaningful, not vacuous


def _tiny(last: str) -> LipConvNet:
    torch.manual_seed(1)
    m = LipConvNet(activation="hh1", init_channels=4, last_layer=last).eval()
    _randomize_angles(m)
    with torch.no_grad():  # spread logits so margins vary
        if last == "lln":
            m.last_layer.bias.normal_(0, 0.5)
        else:
            m.last_layer.bias.normal_(0, 0.2)
    return m


@pytest.mark.parametrize("last", ["ortho", "lln"])
def test_certificates_are_sound_against_random_perturbations(last: str) -> None:
    m = _tiny(last)
    x = torch.rand(16, 3, 32, 32)
    cert = lipverify.certify(m, x)
    assert cert.pred.shape == (16,) and cert.radius.shape == (16,)
    assert (cert.radius >= 0).all() and (cert.radius > 0).any()
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        d = torch.randn(x.shape, generator=g)
        d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        scale = torch.rand(16, generator=g).view(-1, 1, 1, 1) * cert.radius.view(-1, 1, 1, 1)
        with torch.no_grad():
            pred = m(x + d * scale * 0.999).argmax(1)
        assert torch.equal(pred, cert.pred)


def test_ortho_formula_matches_brute_force() -> None:
    logits = torch.randn(20, 7)
    r = radii_from_logits(logits, 2.0, "ortho")
    for i in range(20):
        y = int(logits[i].argmax())
        margin = min(float(logits[i, y] - logits[i, j]) for j in range(7) if j != y)
        assert r[i].item() == pytest.approx(margin / (math.sqrt(2) * 2.0), rel=1e-5)


def test_lln_formula_matches_brute_force_over_all_classes() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(12, 9, generator=g)
    w = w / w.norm(dim=1, keepdim=True)
    logits = torch.randn(15, 12, generator=g)
    r = radii_from_logits(logits, 3.0, "lln", weight=w)
    for i in range(15):
        y = int(logits[i].argmax())
        brute = min(float(logits[i, y] - logits[i, j]) / (float((w[y] - w[j]).norm()) * 3.0)
                    for j in range(12) if j != y)
        assert r[i].item() == pytest.approx(brute, rel=1e-5)


def test_lln_identical_rows_are_skipped_or_zero() -> None:
    w = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    logits = torch.tensor([[2.0, 1.0, 0.0], [2.0, 2.0, 0.0]])
    r = radii_from_logits(logits, 1.0, "lln", weight=w)
    assert r[0].item() == pytest.approx(2.0 / math.sqrt(2))  # class 1 never flips: skipped
    assert r[1].item() == 0.0  # tie with an identical row


@settings(max_examples=10)
@given(seed=st.integers(0, 1000), k=st.integers(2, 5))
def test_lln_certificate_is_exact_for_a_linear_model(seed: int, k: int) -> None:
    """For f(x) = W_n x + b (L = 1) the LLN radius is the exact distance to the boundary."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(k, 6, generator=g, dtype=torch.float64)
    w = w / w.norm(dim=1, keepdim=True)
    b = torch.randn(k, generator=g, dtype=torch.float64)
    x = torch.randn(6, generator=g, dtype=torch.float64)
    logits = (w @ x + b)[None]
    r = radii_from_logits(logits, 1.0, "lln", weight=w)[0].item()
    y = int(logits.argmax())
    # step just beyond the radius towards the closest competitor flips the prediction
    j = min((j for j in range(k) if j != y),
            key=lambda j: float(logits[0, y] - logits[0, j]) / float((w[y] - w[j]).norm()))
    d = (w[j] - w[y]) / (w[j] - w[y]).norm()
    assert int((w @ (x + 1.001 * r * d) + b).argmax()) != y
    assert int((w @ (x + 0.999 * r * d) + b).argmax()) == y


def test_certified_accuracy_counts_strictly_greater() -> None:
    m = _tiny("ortho")
    x = torch.rand(8, 3, 32, 32)
    cert = lipverify.certify(m, x)
    y = cert.pred.clone()
    y[0] = (y[0] + 1) % 10
    r0 = float(cert.radius[1])
    res = lipverify.certified_accuracy(m, x, y, radii=[0.0, r0])
    assert res["clean_accuracy"] == pytest.approx(7 / 8)
    expected = ((cert.radius > r0) & (cert.pred == y)).float().mean().item()
    assert res["certified_accuracy"]["%.6f" % r0] == pytest.approx(expected)
    assert set(res["certified_accuracy"]) == {"%.6f" % 0.0, "%.6f" % r0}


def test_certify_generic_module_needs_a_bound() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    x = torch.rand(3, 3, 4, 4)
    with pytest.raises(InputError, match="lipschitz"):
        lipverify.certify(net, x)
    cert = lipverify.certify(net, x, lipschitz=2.0)
    assert cert.radius.shape == (3,)


@pytest.mark.parametrize(
    "bad", [torch.full((1, 3, 32, 32), float("nan")), torch.full((1, 3, 32, 32), 1.5),
            torch.rand(3, 32, 32), torch.rand(0, 3, 32, 32)]
)
def test_certify_rejects_bad_images(bad: torch.Tensor) -> None:
    with pytest.raises(InputError):
        lipverify.certify(_tiny("ortho"), bad)


def test_certify_restores_training_mode() -> None:
    m = _tiny("lln").train()
    lipverify.certify(m, torch.rand(2, 3, 32, 32))
    assert m.training
    assert all(isinstance(b.conv, SOC) for b in m.blocks)


@pytest.mark.parametrize("kind", ["ortho", "lln"])
def test_label_certificates_have_finite_gradients(kind: str) -> None:
    """Certificate regularization differentiates the radius of the true label."""
    logits = torch.randn(6, 5, requires_grad=True)
    w = torch.randn(5, 4)
    w = (w / w.norm(dim=1, keepdim=True)).requires_grad_(True)
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    r = radii_from_logits(logits, 2.0, kind, weight=w if kind == "lln" else None, target=target)
    r.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    if kind == "lln":
        assert torch.isfinite(w.grad).all()
