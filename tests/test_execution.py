"""Certificates for the model as executed in float32 (issue 15).

Oracles: each rule's rounding bound against the float64 evaluation of the same real-valued
module (for SOC, the series of the filter the model computes, summed in float64); the
rounding-dominated model from the issue, audited with and without ``--execution float32``.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lipverify.attacks.rounding import ROUNDING_BUDGET, rounding_search
from lipverify.audits import audit
from lipverify.certificates import certify
from lipverify.cli import main
from lipverify.errors import InputError
from lipverify.execution import ExecutionRefused, _State, _walk, environment, execution_bound
from lipverify.layers import SOC
from lipverify.layers.activations import HouseholderOrder1, HouseholderOrder2, MaxMin
from lipverify.layers.soc import space_to_depth
from lipverify.models import LipConvNet, Normalize


def rounding_model(offset: float, classes: int = 10, shape=(3, 4, 4), seed: int = 0):
    """1-Lipschitz: ``x -> W x`` with orthonormal rows, computed through a large offset that
    cancels, ``W ((x + offset) - offset)`` (the issue's model). Float32 rounds ``x + offset``
    to multiples of ``ulp(offset)``, except on the grid of :func:`points`, where it is exact:
    there the float32 logits are those of the real model (to the linear layer's rounding)."""
    g = torch.Generator().manual_seed(seed)
    d = math.prod(shape)
    q, _ = torch.linalg.qr(torch.randn(d, classes, generator=g, dtype=torch.float64))
    lin = nn.Linear(d, classes, bias=False)
    with torch.no_grad():
        lin.weight.copy_(q.T.float())
    c = shape[0]
    ones = (1.0,) * c
    return nn.Sequential(Normalize((-offset,) * c, ones), Normalize((offset,) * c, ones),
                         nn.Flatten(), lin).eval()


def points(n: int, shape=(3, 4, 4), seed: int = 1) -> torch.Tensor:
    """Pixels ``k / 256`` in [0.3, 0.7] (a dyadic grid: ``x + 4096`` is exact in float32)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(77, 180, (n, *shape), generator=g).float() / 256


def soc_reference(m: SOC, z: torch.Tensor) -> torch.Tensor:
    """``P(A) z + b`` in float64 with the filter ``A`` as the model computes it (float32)."""
    m.eval_operator(space_to_depth(z, m.stride))
    a = m._eval_cache["a"].double()
    x = space_to_depth(z.double(), m.stride)
    x = F.pad(x, (0, 0, 0, 0, 0, a.shape[1] - x.shape[1]))
    total, cur = x.clone(), x
    for i in range(1, m.eval_terms + 1):
        cur = F.conv2d(cur, a, padding=m.kernel_size // 2) / i
        total = total + cur
    out = total[:, : m.out_channels]
    return out if m.bias is None else out + m.bias.double().view(1, -1, 1, 1)


def _local_bound(module: nn.Module, z: torch.Tensor) -> torch.Tensor:
    st0 = _State(z, torch.zeros(z.shape[0], dtype=torch.float64), 1.0,
                 torch.zeros(z.shape[0], dtype=torch.float64))
    return _walk(module, st0).e


def _soc(cin, cout, k, stride, h, scale):
    torch.manual_seed(cin * 7 + cout + k + stride + h)
    m = SOC(cin, cout, kernel_size=k, stride=stride).eval()
    return m, scale * torch.randn(3, cin, h, h)


# -- each rule's bound against the float64 oracle ----------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 300.0])
@pytest.mark.parametrize("cin,cout,k,stride,h", [
    (4, 4, 3, 1, 8),  # conv kernel
    (3, 8, 3, 2, 8),  # space-to-depth, channel padding
    (8, 4, 3, 1, 2),  # dense kernel (H*W <= k*k)
    (16, 10, 1, 1, 1),  # 1x1 on one pixel: the orthogonal head
])
def test_soc_rounding_bound_covers_the_float32_forward(cin, cout, k, stride, h, scale):
    m, z = _soc(cin, cout, k, stride, h, scale)
    with torch.no_grad():
        err = (m(z).double() - soc_reference(m, z)).flatten(1).norm(dim=1)
    bound = _local_bound(m, z)
    assert (err > 0).any()  # the oracle sees rounding at all
    assert (bound >= err).all(), (bound, err)


@pytest.mark.parametrize("cin,cout,k,stride,h", [(4, 4, 3, 1, 5), (2, 4, 3, 2, 4)])
def test_soc_rule_lipschitz_factor_covers_the_exact_jacobian(cin, cout, k, stride, h):
    from lipverify.execution import _soc_rule

    m, z = _soc(cin, cout, k, stride, h, 1.0)
    zero = torch.zeros(1, dtype=torch.float64)
    st0 = _State(z[:1], zero, 1.0, zero)
    rule = _soc_rule(m, z[:1], st0)
    jac = torch.autograd.functional.jacobian(lambda t: soc_reference(m, t), z[:1].double())
    exact = torch.linalg.matrix_norm(jac.reshape(-1, z[0].numel()), ord=2)
    assert float(exact) > 0.99 and rule.lip >= float(exact)


@pytest.mark.parametrize("module,shape", [
    (Normalize((-300.0, 0.5), (0.25, 1.5)), (4, 2, 3, 3)),
    (MaxMin(), (4, 6, 3, 3)),
    (HouseholderOrder1(6, theta=1.234), (4, 6, 3, 3)),
    (HouseholderOrder2(6), (4, 6, 3, 3)),
    (nn.Linear(20, 7), (4, 20)),
    (nn.Flatten(), (4, 2, 3, 3)),
])
@pytest.mark.parametrize("scale", [1.0, 500.0])
def test_elementwise_and_linear_rules_cover_the_float32_forward(module, shape, scale):
    module.eval()
    z = scale * torch.randn(*shape)
    twin = copy.deepcopy(module).double()
    with torch.no_grad():
        err = (module(z).double() - twin(z.double())).flatten(1).norm(dim=1)
    assert (_local_bound(module, z) >= err).all()


# -- delta over the ball: a property test over small random models ---------------------------
def _tiny_lipconvnet(activation: str, last: str, seed: int, conv: str = "soc") -> nn.Module:
    torch.manual_seed(seed)
    return LipConvNet(conv=conv, activation=activation, num_layers=5, init_channels=2,
                      last_layer=last, num_classes=4).eval()


@pytest.mark.parametrize("cin,cout,k,stride,h", [(4, 4, 3, 1, 6), (3, 8, 3, 2, 8),
                                                 (16, 10, 1, 1, 1)])
@pytest.mark.parametrize("scale", [1.0, 300.0])
def test_bcop_rounding_bound_covers_the_float32_forward(cin, cout, k, stride, h, scale):
    from lipverify.layers import BCOP

    torch.manual_seed(cin + cout + k + h)
    m = BCOP(cin, cout, kernel_size=k, stride=stride).eval()
    with torch.no_grad():
        m.bias.uniform_(-scale, scale)
    z = scale * torch.randn(3, cin, h, h)
    with torch.no_grad():
        w = m.conv_filter().double()
        xs = space_to_depth(z.double(), stride)
        if k // 2:
            xs = F.pad(xs, (k // 2,) * 4, mode="circular")
        err = (m(z).double() - F.conv2d(xs, w, m.bias.double())).flatten(1).norm(dim=1)
    assert (err > 0).any() and (_local_bound(m, z) >= err).all()


@given(kind=st.sampled_from(["linear", "soc-maxmin-ortho", "soc-hh1-lln", "bcop-maxmin-lln",
                             "soc-hh2-lln"]),
       offset=st.floats(0, 2000), seed=st.integers(0, 2**16), radius=st.floats(0.01, 0.5))
def test_delta_covers_the_observed_margin_error_in_the_ball(kind, offset, seed, radius):
    if kind == "linear":
        model = rounding_model(offset, classes=5, seed=seed)
        x = points(3, seed=seed)
    else:
        conv, activation, last = kind.split("-")
        model = _tiny_lipconvnet(activation, last, seed, conv)
        x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    bound = execution_bound(model, x, radius)
    twin = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(seed + 1)
    pred = bound.logits.argmax(1)
    for _ in range(3):
        step = torch.randn(x.shape, generator=g)
        step = step / step.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
        xp = (x + radius * torch.rand(1, generator=g).item() * step).clamp(0, 1)
        with torch.no_grad():
            l32, l64 = model(xp).double(), twin(xp.double())
        m32 = l32.gather(1, pred[:, None]) - l32
        m64 = l64.gather(1, pred[:, None]) - l64
        assert ((m32 - m64).abs() <= bound.delta).all()


# -- the rounding-dominated model (acceptance) --------------------------------------------------
@pytest.fixture(scope="module")
def rounding_audit():
    model, x = rounding_model(4096.0), points(196)
    report = audit(model, x, lipschitz=1.0, checks=("lipschitz", "attacks"), attacks="quick",
                   execution="float32")
    return model, x, report


def test_float32_audit_reports_executed_violations(rounding_audit):
    model, x, report = rounding_audit
    executed = [v for v in report.violations if v["kind"] == "executed"]
    assert report.verdict == "sound"  # the real-valued certificates are right
    assert executed and report.execution["executed_verdict"] == "unsound"
    assert report.to_dict()["executed_verdict"] == "unsound"
    md = report.to_markdown()
    assert "## Execution in float32" in md and "| executed |" in md
    assert "executed (float32) verdict: UNSOUND" in report.summary()
    r_hat = torch.tensor([s["radius_executed"] for s in report.samples])
    for r, acc in report.execution["certified_accuracy"].items():
        assert acc == pytest.approx(float((r_hat > float(r)).double().mean()))
    twin = copy.deepcopy(model).double()
    for v in report.violation_tensors:
        if v["kind"] != "executed":
            continue
        xa = v["x_adv"][None]
        assert float((xa.double() - v["x"][None].double()).norm()) < v["radius"]
        with torch.no_grad():
            assert int(model(xa).argmax()) != v["pred"]  # float32 flips
            assert int(twin(xa.double()).argmax()) == v["pred"]  # float64 does not


def test_executed_radii_hold_under_ten_times_the_search_budget(rounding_audit):
    model, x, report = rounding_audit
    r_hat = torch.tensor([s["radius_executed"] for s in report.samples], dtype=torch.float64)
    assert float((r_hat > 0).double().mean()) >= 0.5
    pred = torch.tensor([s["pred"] for s in report.samples])
    _, found = rounding_search(model, x, pred, r_hat, budget=10 * ROUNDING_BUDGET, seed=7)
    assert not found.any()
    flipped = [v for v in report.violations if v["kind"] == "executed"]
    assert all(v["distance"] >= r_hat[v["index"]] for v in flipped)


def test_without_the_flag_float32_only_flips_are_a_warning():
    model, x = rounding_model(4096.0), points(64)
    report = audit(model, x, lipschitz=1.0, checks=("attacks",), attacks="quick")
    assert report.execution is None and not report.violations
    assert any("--execution float32" in w for w in report.warnings)


def test_an_executed_flip_inside_the_executed_radius_is_an_auditor_error():
    from lipverify.audits.verdict import decide_executed

    v = {"index": 0, "distance": 0.1, "pred": 1, "kind": "executed"}
    verdict, reasons = decide_executed(
        verdict="sound", tolerance=1e-3, radius=torch.tensor([0.5]),
        radius_executed=torch.tensor([0.2]), refusal=None, real_violations=[],
        executed_violations=[v])
    assert verdict == "unsound" and any(r.startswith("auditor error") for r in reasons)


# -- certify ------------------------------------------------------------------------------------
def test_certify_float32_radii_are_smaller_and_the_default_stays_real():
    model, x = rounding_model(4096.0), points(32)
    real = certify(model, x, lipschitz=1.0)
    ex = certify(model, x, lipschitz=1.0, execution="float32")
    assert real.execution == "real" and real.delta is None
    assert (ex.radius <= real.radius).all() and (ex.radius < real.radius).any()
    assert torch.equal(ex.plain_radius, real.radius)
    expected = (real.radius.double() - 2 * ex.delta.max(1).values / math.sqrt(2)).clamp_min(0)
    assert torch.allclose(ex.radius.double(), expected, rtol=1e-6, atol=1e-9)
    with pytest.raises(InputError, match="execution"):
        certify(model, x, lipschitz=1.0, execution="bf16")


def test_certify_cli_float32(capsys, tmp_path):
    out = tmp_path / "c.json"
    assert main(["certify", "--n", "8", "--execution", "float32", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["execution"] == "float32"
    for row in doc["samples"]:
        assert row["radius"] <= row["radius_real"] and row["delta"] > 0


# -- refusals: the bound covers what runs, or says why not -------------------------------------
def test_refuses_layers_without_a_rounding_rule():
    x = torch.rand(2, 3, 32, 32)
    cayley = _tiny_lipconvnet("maxmin", "ortho", 0, "cayley")
    with pytest.raises(ExecutionRefused, match="Cayley.*FFT"):
        execution_bound(cayley, x, 0.1)
    odd = nn.Sequential(nn.Flatten(), nn.Tanh()).eval()
    with pytest.raises(ExecutionRefused, match="Tanh: no rounding rule"):
        execution_bound(odd, x, 0.1)


def test_refuses_hooks_instance_forwards_and_fast_eval():
    from lipverify.layers.soc import fast_eval

    model, x = _tiny_lipconvnet("maxmin", "ortho", 0), torch.rand(2, 3, 32, 32)
    handle = model.layer1[0].activation.register_forward_hook(lambda m, i, o: o * 1.01)
    with pytest.raises(ExecutionRefused, match="hooks"):
        execution_bound(model, x, 0.1)
    handle.remove()
    model.layer2[0].conv.forward = lambda t: t
    with pytest.raises(ExecutionRefused, match="instance forward"):
        execution_bound(model, x, 0.1)
    model = _tiny_lipconvnet("maxmin", "ortho", 0)
    with fast_eval(model, (3, 32, 32)), pytest.raises(ExecutionRefused, match="fast_eval"):
        execution_bound(model, x, 0.1)


def test_a_model_that_rounds_differently_from_its_modules_is_refused():
    """A fooling model: its forward runs the modules, then adds a float32 round trip through a
    huge offset that the per-module analysis never sees."""

    class Sneaky(nn.Sequential):
        def forward(self, x):  # noqa: ANN001, ANN201
            return (super().forward(x) + 1e6) - 1e6

    model = rounding_model(0.0)
    sneaky = Sneaky(*model)
    with pytest.raises(ExecutionRefused):
        execution_bound(sneaky, points(4), 0.1)


def test_refuses_reduced_precision_settings_and_winograd_kernels(monkeypatch):
    model, x = _tiny_lipconvnet("maxmin", "ortho", 0), torch.rand(2, 3, 32, 32)
    old = torch.get_float32_matmul_precision()
    old_mkldnn = torch.backends.mkldnn.matmul.fp32_precision
    torch.set_float32_matmul_precision("medium")
    try:
        with pytest.raises(ExecutionRefused, match="precision"):
            execution_bound(model, x, 0.1)
    finally:
        torch.set_float32_matmul_precision(old)
        torch.backends.mkldnn.matmul.fp32_precision = old_mkldnn
    assert torch.backends.mkldnn.matmul.fp32_precision == old_mkldnn

    class Nnpack:
        def __str__(self) -> str:
            return "_ConvBackend.NnpackSpatial"

    monkeypatch.setattr(torch._C, "_select_conv_backend", lambda *a, **k: Nnpack())
    with pytest.raises(ExecutionRefused, match="NnpackSpatial"):
        execution_bound(model, x, 0.1)


def test_refused_models_audit_inconclusive_with_the_reason():
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 10), nn.Tanh()).eval()
    report = audit(model, points(4), lipschitz=1.0, checks=("attacks",), attacks="quick",
                   execution="float32")
    assert report.execution["executed_verdict"] == "inconclusive"
    assert "Tanh" in report.execution["reasons"][0]
    assert "radius_executed" not in report.samples[0]


def test_certify_cli_refusal_is_one_line(tmp_path, capsys):
    from lipverify.checkpoints import save_checkpoint

    path = tmp_path / "cayley.pt"
    save_checkpoint(_tiny_lipconvnet("maxmin", "lln", 0, "cayley"), path)
    code = main(["certify", str(path), "--dataset", "synthetic", "--n", "4",
                 "--execution", "float32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Cayley" in err[0]


# -- replay -------------------------------------------------------------------------------------
def test_replay_separates_refuted_from_not_reproducible(rounding_audit, tmp_path):
    from lipverify.audits.replay import replay

    model, _, report = rounding_audit
    report.save(tmp_path)
    env = environment()
    rows = replay(model, tmp_path, report.tolerance, env)
    executed = [r for r in rows if r["kind"] == "executed"]
    assert executed and all(r["status"] == "holds" for r in executed)
    # a record whose point no longer flips: refuted on the same machine, not reproducible on
    # another one
    f = tmp_path / "violations" / executed[0]["file"]
    rec = torch.load(f, weights_only=True)
    rec["x_adv"] = rec["x"].clone()
    torch.save(rec, f)
    same = {r["file"]: r for r in replay(model, tmp_path, report.tolerance, env)}
    assert same[f.name]["status"] == "refuted"
    other = {r["file"]: r for r in replay(model, tmp_path, report.tolerance,
                                          {**env, "threads": env["threads"] + 7})}
    assert other[f.name]["status"] == "not reproducible here"


def test_refuses_classes_patched_after_import(monkeypatch):
    model, x = _tiny_lipconvnet("maxmin", "ortho", 0), torch.rand(2, 3, 32, 32)
    original = MaxMin.forward
    monkeypatch.setattr(MaxMin, "forward", lambda self, z: (original(self, z) + 1e6) - 1e6)
    with pytest.raises(ExecutionRefused, match="replaced"):
        execution_bound(model, x, 0.1)
    monkeypatch.undo()
    model.features = lambda t: t.flatten(1)
    with pytest.raises(ExecutionRefused, match="instance features"):
        execution_bound(model, x, 0.1)


# -- regressions from the adversarial review --------------------------------------------------
def test_negative_std_is_refused_not_a_negative_delta():
    """A fooling model: two Normalize layers with std -1 cancel, so L = 1 holds, but 1/min(std)
    is negative and would have made delta negative."""
    model = rounding_model(4096.0)
    for layer in model[:2]:
        layer.std.fill_(-1.0)
    with pytest.raises(ExecutionRefused, match="std must be positive"):
        execution_bound(model, points(4), 0.1)


def test_instance_overrides_and_compiled_modules_are_refused():
    from lipverify.layers.soc_fast import SeriesOperator

    model, x = _tiny_lipconvnet("maxmin", "ortho", 0), torch.rand(2, 3, 32, 32)
    soc = model.layer3[0].conv
    orig = soc.eval_operator
    soc.eval_operator = lambda xs: SeriesOperator(orig(xs).geo, orig(xs).tensor.bfloat16()
                                                  .float())
    with pytest.raises(ExecutionRefused, match="instance eval_operator"):
        execution_bound(model, x, 0.1)
    model = _tiny_lipconvnet("maxmin", "ortho", 0)
    model.layer2[0].activation._compiled_call_impl = lambda z: z
    with pytest.raises(ExecutionRefused, match="compiled"):
        execution_bound(model, x, 0.1)


def test_broadcast_normalize_and_batched_linear_bounds_cover_the_error():
    norm = Normalize((513.0,), (1.0,)).eval()  # one channel's buffers broadcast over 16
    z = torch.rand(4, 16, 3, 3)
    twin = copy.deepcopy(norm).double()
    with torch.no_grad():
        err = (norm(z).double() - twin(z.double())).flatten(1).norm(dim=1)
    assert (_local_bound(norm, z) >= err).all()
    lin = nn.Linear(8, 5).eval()
    with torch.no_grad():
        lin.bias.fill_(513.0)
    z = torch.randn(4, 64, 8)  # F.linear on every row of the last dimension
    twin = copy.deepcopy(lin).double()
    with torch.no_grad():
        err = (lin(z).double() - twin(z.double())).flatten(1).norm(dim=1)
    assert (_local_bound(lin, z) >= err).all()


def test_bad_shapes_and_settings_are_refusals_not_tracebacks():
    model, x = rounding_model(4096.0), points(4)
    assert execution_bound(model, x, torch.full((4, 1), 0.1)).delta.shape == (4, 10)
    with pytest.raises(InputError):
        execution_bound(model, x[:0], 0.1)
    with pytest.raises(InputError, match="radius"):
        execution_bound(model, x, torch.full((3,), 0.1))
    zero_std = rounding_model(0.0)
    zero_std[0].std.zero_()
    with pytest.raises(ExecutionRefused):
        execution_bound(zero_std, x, 0.1)
    empty = nn.Sequential(nn.Flatten(), nn.Linear(48, 0)).eval()
    with pytest.raises(ExecutionRefused):
        execution_bound(empty, x, 0.1)
    old = torch.backends.mkldnn.fp32_precision
    torch.backends.mkldnn.fp32_precision = "bf16"  # mixing the APIs: the legacy read raises
    try:
        env = environment()
        with pytest.raises(ExecutionRefused):
            execution_bound(model, x, 0.1)
    finally:
        torch.backends.mkldnn.fp32_precision = old
    assert isinstance(env["float32_matmul_precision"], str)


def test_a_nan_executed_radius_is_never_sound():
    from lipverify.audits.verdict import decide_executed

    verdict, _ = decide_executed(
        verdict="sound", tolerance=1e-3, radius=torch.tensor([0.5]),
        radius_executed=torch.tensor([math.nan]), refusal=None, real_violations=[],
        executed_violations=[])
    assert verdict == "inconclusive"


def test_reference_lipconvnet5_delta_covers_the_observed_error(shared):
    """The reference-format SOC/HH1/LLN LipConvNet-5 on its CIFAR-10 images."""
    from lipverify.checkpoints import load_model

    path = shared("compat", "soc-lipconvnet5-hh1-lln-c10.pt")
    model = load_model(path)
    x = torch.load(path, weights_only=True)["inputs_pixels"].float()
    real = certify(model, x)
    ex = certify(model, x, execution="float32")
    assert (ex.radius <= real.radius).all()
    twin = copy.deepcopy(model).double()
    with torch.no_grad():
        l32, l64 = model(x).double(), twin(x.double())
    m32 = l32.gather(1, real.pred[:, None]) - l32
    m64 = l64.gather(1, real.pred[:, None]) - l64
    assert ((m32 - m64).abs() <= ex.delta).all()


def test_second_review_regressions(monkeypatch):
    x = points(4)
    # a reduced-precision oneDNN math mode, set by environment variable
    monkeypatch.setenv("ONEDNN_DEFAULT_FPMATH_MODE", "BF16")
    with pytest.raises(ExecutionRefused, match="FPMATH"):
        execution_bound(rounding_model(4096.0), x, 0.1)
    monkeypatch.delenv("ONEDNN_DEFAULT_FPMATH_MODE")
    # HH1 after a Flatten broadcasts its angles: not the per-pair map the rule describes
    flat_hh1 = nn.Sequential(nn.Flatten(), HouseholderOrder1(6), nn.Flatten(),
                             nn.Linear(48 * 24, 4)).eval()
    with pytest.raises(ExecutionRefused, match="HouseholderOrder1"):
        execution_bound(flat_hh1, x, 0.1)
    # a module that fails, or an output without the batch dimension: refusals
    broken = _tiny_lipconvnet("maxmin", "ortho", 0)
    broken.layer1[0].conv.eval_terms = -1
    with pytest.raises(ExecutionRefused):
        execution_bound(broken, torch.rand(1, 3, 32, 32), 0.1)
    with pytest.raises(ExecutionRefused, match="batch dimension"):
        execution_bound(nn.Sequential(nn.Flatten(0)).eval(), x, 0.1)
    env = environment()
    assert {"cpu_capability", "cpu_model", "ATEN_CPU_CAPABILITY"} <= set(env)


def test_executed_radii_are_rounded_toward_zero():
    model, x = rounding_model(4096.0), points(64)
    ex = certify(model, x, lipschitz=1.0, execution="float32")
    b = execution_bound(model, x, certify(model, x, lipschitz=1.0).radius.double())
    from lipverify.execution import executed_radii

    proven = executed_radii(b, 1.0, "ortho", ex.plain_radius.double())
    assert (ex.radius.double() <= proven).all()


def test_non_finite_logits_are_an_executed_refusal_not_bad_input():
    model = rounding_model(4096.0)
    with torch.no_grad():
        model[3].weight[0, 0] = math.nan
    report = audit(model, points(4), lipschitz=1.0, checks=("attacks",), attacks="quick",
                   execution="float32")
    assert report.execution["executed_verdict"] == "inconclusive"
    assert "non-finite" in report.execution["reasons"][0]



def test_chunks_in_any_order_give_the_float32_audit_report(tmp_path):
    """The sharded path (stages, chunks claimed in any order, one state folder) reports the
    executed violations and radii that one audit() does, records in step with the rows."""
    from lipverify.audits import runner
    from lipverify.audits.runner import AuditState

    model, x = rounding_model(4096.0), points(80)
    opts = dict(lipschitz=1.0, checks=("attacks",), attacks="quick", execution="float32")
    ref = audit(model, x, **opts)
    plan = runner.plan_audit(model, x, **opts)
    state = AuditState(tmp_path / "state", plan.fingerprint)
    with runner.attack_context(plan) as mat:
        for c in (2, 0, 1):
            runner.attack_chunk(plan, state, c)
    chunks = [state.load(runner.chunk_name(c), runner._CHUNK_KEYS) for c in range(3)]
    got = runner.assemble_report(plan, attacks=runner.merge_attacks(plan, chunks, mat))
    assert any(v["kind"] == "executed" for v in ref.violations)
    assert got.violations == ref.violations and got.samples == ref.samples
    assert got.execution["executed_verdict"] == ref.execution["executed_verdict"]
    for row, rec in zip(got.violations, got.violation_tensors, strict=True):
        assert (row["index"], row["kind"]) == (rec["index"], rec["kind"])


def test_rounding_search_returns_points_inside_the_ball_for_any_input_rank():
    model = nn.Sequential(nn.Linear(5, 3)).eval()
    x = torch.rand(16, 5, generator=torch.Generator().manual_seed(0))
    radius = torch.full((16,), 0.5, dtype=torch.float64)
    with torch.no_grad():
        pred = model(x).argmax(1)
    xa, found = rounding_search(model, x, pred, radius, budget=32)
    assert found.any()
    dist = (xa.double() - x.double()).norm(dim=1)
    assert (dist[found] < radius[found]).all() and ((xa >= 0) & (xa <= 1)).all()
    with torch.no_grad():
        assert (model(xa[found]).argmax(1) != pred[found]).all()
