"""Guaranteed bounds over a captured graph (issue 13), against an exact oracle: the float64
Jacobian of a small input through an SVD. For a linear map the Jacobian norm *is* the
Lipschitz constant; for a nonlinear one it is a lower bound on it, so ``upper >= ||J||`` is
required everywhere and ``upper <= (1 + 1e-4) ||J||`` where the rule is exact."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipverify.audits.capture import (
    CaptureRefused,
    capture,
    frozen_parametrizations,
    graph_evaluator,
    release,
)
from lipverify.audits.graph import bound_graph
from lipverify.audits.lipschitz import layer_upper_bound, lipschitz_audit
from lipverify.audits.operators import linear_norm, strided_conv_norm, window_multiplicity


def graph_upper(model: nn.Module, shape: tuple[int, ...], seed: int = 0):
    model.eval()
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(seed),
                   dtype=next(model.parameters(), torch.zeros(())).dtype)
    with frozen_parametrizations(), torch.no_grad():
        cap = capture(model, x)
        try:
            gb = bound_graph(cap, lambda m, s: layer_upper_bound(m, s))
        finally:
            release(cap.handles)
    return gb, cap


def jacobian_norm(model: nn.Module, shape: tuple[int, ...], seed: int = 1,
                  dtype: torch.dtype = torch.float64) -> float:
    """Largest Jacobian norm over a few random points (an attained lower bound), float64
    unless the model only runs in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    best = 0.0
    with frozen_parametrizations():
        for _ in range(3):
            x = torch.rand(1, *shape, generator=gen, dtype=dtype)
            jac = torch.autograd.functional.jacobian(
                lambda z: model(z.view(1, *shape)).flatten(), x.flatten())
            best = max(best, float(torch.linalg.matrix_norm(jac.double(), 2)))
    return best


class Fn(nn.Module):
    def __init__(self, f, *mods: nn.Module) -> None:
        super().__init__()
        self.f = f
        self.mods = nn.ModuleList(mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x, *self.mods)


# ------------------------------------------------------------------------------------------
# numerical conv bound against dense SVDs


@pytest.mark.parametrize("circular", [False, True])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("k,p", [(1, 0), (2, 1), (3, 1), (4, 2)])
def test_strided_conv_norm_bounds_the_dense_operator(circular, stride, dilation, groups, k, p):
    gen = torch.Generator().manual_seed(k * 100 + stride * 10 + dilation + groups)
    w = torch.randn(2 * groups, 2, k, k, generator=gen, dtype=torch.float64)
    for n in (6, 7):
        if circular:
            def op(z):
                z = F.pad(z, (p, p, p, p), mode="circular") if p else z
                return F.conv2d(z, w, stride=stride, dilation=dilation, groups=groups)
        else:
            def op(z):
                return F.conv2d(z, w, stride=stride, padding=p, dilation=dilation,
                                groups=groups)
        try:
            exact = linear_norm(op, (2 * groups, n, n))
        except RuntimeError:  # kernel larger than the padded input
            continue
        bound, how = strided_conv_norm(w, (n, n), stride=stride, padding=p, dilation=dilation,
                                       groups=groups, circular=circular)
        assert bound >= exact * (1 - 1e-12)
        if how.startswith("exact"):
            assert bound <= exact * (1 + 1e-9)


def test_window_multiplicity_counts_overlaps():
    assert window_multiplicity([8], [4], [2], [2], [0], [1]) == 1
    assert window_multiplicity([8], [6], [3], [1], [0], [1]) == 3
    assert window_multiplicity([8, 8], [7, 7], [2, 2], [1, 1], [0, 0], [1, 1]) == 4


# ------------------------------------------------------------------------------------------
# one rule per op, against the Jacobian


def _ops():
    g = torch.Generator().manual_seed(3)

    def conv(**kw):
        c = nn.Conv2d(2, 4, 3, **kw)
        with torch.no_grad():
            c.weight.copy_(torch.randn(c.weight.shape, generator=g))
        return c

    bn = nn.BatchNorm2d(2)
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([0.5, 2.0]))
        bn.weight.copy_(torch.tensor([1.5, -0.3]))
    ct = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1)
    lin = nn.Linear(2 * 6 * 6, 5)
    scale = torch.tensor([0.5, -3.0]).view(1, 2, 1, 1)
    return {
        # name: (module, exact rule?)
        "conv-zeros": (conv(padding=1), True),
        "conv-circular": (conv(padding=1, padding_mode="circular"), True),
        "conv-reflect": (conv(padding=1, padding_mode="reflect"), False),
        "conv-replicate": (conv(padding=2, padding_mode="replicate"), False),
        "conv-stride-dilation-groups": (nn.Conv2d(2, 4, 3, stride=2, padding=2, dilation=2,
                                                  groups=2), True),
        "conv-transpose": (ct, True),
        "linear": (Fn(lambda x, m: m(x.flatten(1)), lin), True),
        "batchnorm": (bn, True),
        "avgpool": (nn.AvgPool2d(2), True),
        "avgpool-overlap": (nn.AvgPool2d(3, stride=1, padding=1), False),
        "adaptive-avgpool": (nn.AdaptiveAvgPool2d(2), True),
        "maxpool": (nn.MaxPool2d(2), True),
        "maxpool-overlap": (nn.MaxPool2d(3, stride=1, padding=1), False),
        "lppool-l2": (nn.LPPool2d(2, 2), True),
        "pixel-shuffle": (Fn(lambda x: F.pixel_shuffle(F.pixel_unshuffle(x, 2), 2)), True),
        "centering": (Fn(lambda x: x - x.mean(dim=(-2, -1), keepdim=True)), True),
        "mul-const": (Fn(lambda x: x * scale.to(x.dtype) + 1.0), True),
        "div-const": (Fn(lambda x: x / 4.0), True),
        "cat-shared": (Fn(lambda x: torch.cat([x, 2 * x], 1)), True),
        "cat-disjoint": (Fn(lambda x: torch.cat([x[:, :1] * 3, x[:, 1:] * 2], 1)), True),
        "maxmin": (Fn(lambda x: torch.cat(
            [torch.maximum(*x.chunk(2, 1)), torch.minimum(*x.chunk(2, 1))], 1)), True),
        "groupsort2": (Fn(lambda x: torch.cat(
            [x.view(-1, 1, 2, 6, 6).min(2, keepdim=True)[0],
             x.view(-1, 1, 2, 6, 6).max(2, keepdim=True)[0]], 2).view(-1, 2, 6, 6)), True),
        "fullsort": (Fn(lambda x: torch.sort(x.flatten(1), dim=1)[0]), True),
        "crelu": (Fn(lambda x: torch.cat([F.relu(x), F.relu(-x)], 1)), True),
        "pad-slice-flip": (Fn(lambda x: F.pad(x, (1, 1, 1, 1)).flip(-1)[..., 1:5]), True),
        "activations": (Fn(lambda x: torch.tanh(F.leaky_relu(F.elu(x), 0.2)) + F.gelu(x)),
                        False),
        "l2-merge": (Fn(lambda x: torch.sqrt(0.5 * x ** 2 + 0.5 * torch.tanh(x) ** 2 + 1e-6)),
                     False),
    }


OPS = _ops()


@pytest.mark.parametrize("name", sorted(OPS))
def test_each_op_rule_bounds_the_exact_jacobian(name):
    module, exact = OPS[name]
    module = module.double().eval()
    shape = (2, 6, 6)
    gb, _ = graph_upper(module, shape)
    assert gb.refusals == [] and gb.upper is not None, gb.refusals
    j = jacobian_norm(module, shape)
    assert gb.upper >= j * (1 - 1e-12), (gb.upper, j)
    if exact:
        assert gb.upper <= j * (1 + 1e-4), (gb.upper, j)


def test_node_rows_name_their_module_and_rule():
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(72, 3)).double()
    gb, _ = graph_upper(model, (2, 6, 6))
    mods = {nb.module for nb in gb.nodes}
    assert {"0", "1", "3"} <= mods
    assert all(nb.rule for nb in gb.nodes)
    assert gb.nodes[-1].cumulative * (1 + 1e-9) >= gb.upper / (1 + 1e-9)


# ------------------------------------------------------------------------------------------
# soundness: what per-module bounds used to miss is bounded or refused, never under-bounded


class Loop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            x = self.lin(x)
        return x


class Scale2(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2.0 * w


class Stateful(nn.Module):
    """Renormalises its weight by a power-iteration estimate updated on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 6, generator=torch.Generator().manual_seed(5)))
        self.u = torch.ones(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            v = F.normalize(self.weight.T @ self.u.to(self.weight.dtype), dim=0)
            self.u = F.normalize(self.weight @ v, dim=0)
        sigma = self.u @ self.weight @ v
        return x @ (self.weight / sigma).T


def _soundness_models():
    hooked = nn.Linear(6, 6)
    hooked.register_forward_hook(lambda m, a, out: 3.0 * out)
    param = nn.Linear(6, 6)
    torch.nn.utils.parametrize.register_parametrization(param, "weight", Scale2())
    instance = nn.Linear(6, 6)
    instance.forward = lambda x: 5.0 * nn.functional.linear(x, instance.weight)
    shared = nn.Linear(6, 6)
    return {
        "reuse-in-a-loop": Loop(),
        "reuse-in-sequential": nn.Sequential(shared, nn.ReLU(), shared),
        "forward-hook": nn.Sequential(hooked, nn.Tanh()),
        "parametrization": param,
        "instance-forward": nn.Sequential(instance),
    }


@pytest.mark.parametrize("name", sorted(_soundness_models()))
def test_code_outside_the_weights_is_bounded_soundly(name):
    model = _soundness_models()[name].double().eval()
    gb, _ = graph_upper(model, (6,))
    j = jacobian_norm(model, (6,))
    assert gb.upper is not None, gb.refusals
    assert gb.upper >= j * (1 - 1e-12)


def test_a_stateful_forward_is_audited_as_one_snapshot():
    model = Stateful().double().eval()
    gb, cap = graph_upper(model, (6,))
    assert cap.stateful is not None and "state" in cap.stateful
    x = torch.rand(8, 6, dtype=torch.float64)
    res = lipschitz_audit(model, x, power_iters=5, ascent_steps=5)
    assert any("snapshot" in n for n in res.notes)
    assert res.upper is not None and res.upper >= res.lower


def test_a_data_dependent_branch_is_refused_in_one_line():
    class Branch(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 100 if float(x.sum()) > 0 else x

    with pytest.raises(CaptureRefused) as err:
        with frozen_parametrizations():
            capture(Branch().eval(), torch.rand(2, 4))
    assert "\n" not in str(err.value) and "traceable" in str(err.value)
    res = lipschitz_audit(Branch(), torch.rand(4, 4), power_iters=2, ascent_steps=2)
    assert res.upper is None and any("torch.export" in r for r in res.refusals)


def test_a_product_of_two_input_dependent_values_is_refused():
    model = Fn(lambda x: x * x.flip(-1)).double()
    gb, _ = graph_upper(model, (4,))
    assert gb.upper is None and "product" in gb.refusals[0]


def test_the_float64_graph_evaluator_matches_the_model():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.GELU(), nn.Flatten(),
                          nn.Linear(3 * 5 * 5, 4)).eval()
    x = torch.rand(3, 2, 5, 5)
    with frozen_parametrizations(), torch.no_grad():
        cap = capture(model, x)
        f64 = graph_evaluator(cap)
        release(cap.handles)
        y64 = f64(x)
        ref = model.double()(x.double())
    assert y64.dtype == torch.float64
    assert torch.allclose(y64, ref, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------
# the field's layers: orthogonium and deel-torchlip (test extras)

orthogonium = pytest.importorskip("orthogonium")
torchlip = pytest.importorskip("deel.torchlip")


def test_orthogonium_bcop_large_cnn_at_cifar_size_is_bounded_near_one():
    from orthogonium.model_factory.models_factory import BCOPLargeCNN

    torch.manual_seed(0)
    model = BCOPLargeCNN().eval()
    gb, cap = graph_upper(model, (3, 32, 32))
    assert gb.refusals == []
    assert 1.0 <= gb.upper <= 1 + 1e-4  # built of orthogonal convs, MaxMin and OrthoLinear
    assert cap.stateful is not None  # its power iteration updates on every call


def _orthogonium_small():
    from orthogonium.layers.conv.AOC import AdaptiveOrthoConv2d
    from orthogonium.layers.conv.AOL.aol import AOLConv2D
    from orthogonium.layers.conv.SLL.sll_layer import SDPBasedLipschitzResBlock
    from orthogonium.layers.custom_activations import MaxMin
    from orthogonium.layers.linear import OrthoLinear
    from orthogonium.layers.residual import PrescaledAdditiveResidual

    torch.manual_seed(0)
    aoc = nn.Sequential(
        AdaptiveOrthoConv2d(4, 4, 3, padding=1, padding_mode="circular"), MaxMin(),
        PrescaledAdditiveResidual(nn.Sequential(
            AdaptiveOrthoConv2d(4, 4, 3, padding=1, padding_mode="circular"), MaxMin())),
        nn.Flatten(), OrthoLinear(4 * 6 * 6, 5))
    aol = nn.Sequential(AOLConv2D(4, 4, 3, padding=1), MaxMin(), nn.Flatten(),
                        OrthoLinear(4 * 6 * 6, 5))
    sll = nn.Sequential(SDPBasedLipschitzResBlock(4, 2), nn.Flatten(), OrthoLinear(144, 5))
    return {"aoc-residual": (aoc, True), "aol": (aol, True), "sll": (sll, True)}


@pytest.mark.parametrize("name", ["aoc-residual", "aol", "sll"])
def test_orthogonium_models_get_a_sound_bound(name):
    model, by_construction = _orthogonium_small()[name]
    model = model.eval()
    gb, _ = graph_upper(model, (4, 6, 6))
    assert gb.refusals == [] and gb.upper is not None and math.isfinite(gb.upper)
    j = jacobian_norm(model, (4, 6, 6), dtype=torch.float32)  # its code fixes float32
    assert gb.upper >= j * (1 - 1e-5)
    if by_construction:
        assert gb.upper <= 1 + 1e-4


def test_a_torchlip_model_gets_a_sound_bound():
    from deel.torchlip import GroupSort2, ScaledL2NormPool2d, SpectralConv2d, SpectralLinear

    torch.manual_seed(0)
    model = nn.Sequential(SpectralConv2d(3, 4, 3, padding=1), GroupSort2(),
                          ScaledL2NormPool2d(2), nn.Flatten(), SpectralLinear(4 * 3 * 3, 5))
    model = model.eval()
    gb, _ = graph_upper(model, (3, 6, 6))
    assert gb.refusals == [] and gb.upper is not None
    j = jacobian_norm(model, (3, 6, 6), dtype=torch.float32)
    assert j * (1 - 1e-5) <= gb.upper <= 1.1  # spectral norms from a power iteration


@pytest.mark.parametrize("n", [5, 7])
def test_zero_padded_conv_is_not_bounded_on_the_circular_grid(n):
    """The difference filter on an odd grid: the circular n grid under-states the norm of the
    zero-padded conv (a trap for any grid smaller than n + k - 1)."""
    w = torch.zeros(1, 1, 1, 3, dtype=torch.float64)
    w[0, 0, 0, 1:] = torch.tensor([1.0, -1.0])

    def op(z):
        return F.conv2d(z, w, padding=(0, 1))

    exact = linear_norm(op, (1, 1, n))
    model = Fn(lambda x: F.conv2d(x, w.to(x.dtype), padding=(0, 1)))
    from lipverify.audits.operators import conv_frequency_norm
    assert conv_frequency_norm(w, (1, n)) < exact  # the trap
    for dim in (0, 10_000):  # the frequency route and the exact route
        x = torch.rand(2, 1, 1, n, dtype=torch.float64)
        with frozen_parametrizations(), torch.no_grad():
            cap = capture(model.eval(), x)
            gb = bound_graph(cap, layer_upper_bound, exact_max_dim=dim)
            release(cap.handles)
        assert gb.upper >= exact


def test_capture_works_under_ieee_cudnn_flags_and_restores_them():
    """A user asking for IEEE cuDNN convolutions (the new fp32_precision API) makes torch's
    legacy allow_tf32 read raise; capture must still work and leave the flags as they were."""
    cudnn = torch.backends.cudnn
    saved = (cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision)
    cudnn.conv.fp32_precision = "ieee"
    try:
        model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
        gb, _ = graph_upper(model, (4,))
        assert gb.upper is not None
        assert (cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision) == ("ieee", saved[1])
    finally:
        cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = saved
