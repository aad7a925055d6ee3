"""Cayley and BCOP orthogonal convolutions: exact-Jacobian orthogonality, circular padding,
reference fixtures, LipConvNet integration, eval-mode cache and a 1-Lipschitz property test."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import lipverify
from lipverify.certificates import certify
from lipverify.layers import BCOP, CONV_LAYERS, CayleyConv, CayleyLinear
from lipverify.models import ORTHO_LAST_LAYERS, LipConvNet

LAYERS = {"cayley": CayleyConv, "bcop": BCOP}
FIXTURES = ["cayley-lipconvnet5-maxmin-ortho-c10.pt", "bcop-lipconvnet5-maxmin-lln-c10.pt"]
# (cin, cout) per stride: cout == cin_eff, cout > cin_eff (channel padding), cout < cin_eff
CHANNELS = {
    1: {"equal": (4, 4), "pad": (2, 6), "trunc": (6, 2)},
    2: {"equal": (2, 8), "pad": (1, 6), "trunc": (3, 6)},
}


def make_layer(kind: str, cin: int, cout: int, k: int, stride: int) -> torch.nn.Module:
    torch.manual_seed(1)
    return LAYERS[kind](cin, cout, kernel_size=k, stride=stride).double().eval()


def jacobian_matrix(f, x: torch.Tensor) -> torch.Tensor:
    jac = torch.autograd.functional.jacobian(f, x)
    out = f(x)
    return jac.reshape(out.numel(), x.numel())


@pytest.mark.parametrize("kind", ["cayley", "bcop"])
@pytest.mark.parametrize("kernel_size", [1, 3])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("regime", ["equal", "pad", "trunc"])
def test_exact_jacobian_is_orthogonal(kind: str, kernel_size: int, stride: int, regime: str):
    cin, cout = CHANNELS[stride][regime]
    layer = make_layer(kind, cin, cout, kernel_size, stride)
    assert layer.in_channels == cin * stride * stride
    assert (layer.out_channels, layer.stride, layer.padding_mode) == (cout, stride, "circular")
    x = torch.randn(1, cin, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (1, cout, 8 // stride, 8 // stride)
    jac = jacobian_matrix(layer, x)
    sv = torch.linalg.svdvals(jac)
    # padding: an isometry (all in-dim values are 1); truncation: orthonormal rows
    assert sv.numel() == min(jac.shape)
    padded = cout >= layer.in_channels
    assert (jac.shape[0] >= jac.shape[1]) == padded
    torch.testing.assert_close(sv, torch.ones_like(sv), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["cayley", "bcop"])
@pytest.mark.parametrize("kernel_size,stride", [(3, 1), (3, 2)])
def test_padding_is_circular(kind: str, kernel_size: int, stride: int):
    """Circular convolution commutes with circular shifts (by whole stride blocks)."""
    layer = make_layer(kind, 2, 4, kernel_size, stride)
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        shifted = layer(torch.roll(x, shifts=(stride, 3 * stride), dims=(2, 3)))
        expected = torch.roll(layer(x), shifts=(1, 3), dims=(2, 3))
    torch.testing.assert_close(shifted, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("cin,cout,stride", [(3, 6, 1), (2, 3, 2), (6, 4, 1)])
def test_bcop_filter_is_the_applied_conv(cin: int, cout: int, stride: int):
    layer = make_layer("bcop", cin, cout, 3, stride)
    w = layer.conv_filter()
    assert w.shape == (cout, cin * stride * stride, 3, 3)
    x = torch.randn(2, cin, 8, 8, dtype=torch.float64)
    xs = F.pixel_unshuffle(x, stride) if stride > 1 else x
    expected = F.conv2d(F.pad(xs, (1, 1, 1, 1), mode="circular"), w, layer.bias)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("cin,cout,stride", [(3, 6, 1), (2, 3, 2), (6, 4, 1)])
@pytest.mark.parametrize("n", [4, 6])
def test_cayley_frequency_matrices_are_the_applied_operator(cin, cout, stride, n):
    layer = make_layer("cayley", cin, cout, 3, stride)
    cin_eff = cin * stride * stride
    q = layer.frequency_matrices(n)
    assert q.shape == (n, n // 2 + 1, cout, cin_eff) and q.is_complex()
    eye = torch.eye(min(cout, cin_eff), dtype=q.dtype)
    gram = q.mH @ q if cout >= cin_eff else q @ q.mH
    torch.testing.assert_close(gram, eye.expand_as(gram), atol=1e-10, rtol=0)
    x = torch.randn(2, cin, n * stride, n * stride, dtype=torch.float64)
    xs = F.pixel_unshuffle(x, stride) if stride > 1 else x
    yfft = torch.einsum("uvoc,bcuv->bouv", q, torch.fft.rfft2(xs))
    expected = torch.fft.irfft2(yfft, s=(n, n)) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("cin,cout", [(3, 5), (5, 3)])
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_cayley_spectrum_is_circular_cross_correlation(cin: int, cout: int, kernel_size: int):
    """Before the Cayley map, ``W_uv`` is the spectrum of ``conv2d`` with circular padding k//2."""
    layer = make_layer("cayley", cin, cout, kernel_size, 1)
    x = torch.randn(2, cin, 8, 6, dtype=torch.float64)
    with torch.no_grad():
        w = layer._shifted_spectrum(layer.weight, 8, 6)
        y = torch.fft.irfft2(torch.einsum("uvoc,bcuv->bouv", w, torch.fft.rfft2(x)), s=(8, 6))
        p = kernel_size // 2
        expected = F.conv2d(F.pad(x, (p, p, p, p), mode="circular"), layer.weight)
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("in_features,out_features", [(32, 10), (10, 32), (16, 16)])
def test_cayley_linear_is_orthogonal(in_features: int, out_features: int):
    torch.manual_seed(2)
    layer = CayleyLinear(in_features, out_features).double().eval()
    assert layer.flat_input
    q = layer.orthogonal_weight()
    assert q.shape == (out_features, in_features)
    x = torch.randn(3, in_features, dtype=torch.float64)
    jac = jacobian_matrix(lambda t: layer(t[None])[0], x[0])
    torch.testing.assert_close(jac, q)
    sv = torch.linalg.svdvals(jac)
    assert sv.numel() == min(in_features, out_features)
    torch.testing.assert_close(sv, torch.ones_like(sv), atol=1e-5, rtol=0)
    assert layer(x).shape == (3, out_features)


@pytest.mark.parametrize("name", FIXTURES)
def test_reference_fixture(shared, name: str):
    path = shared("compat", name)
    ref = torch.load(path, weights_only=True)
    model = lipverify.load_soc_reference(path)
    assert not model.training
    conv = model.layer1[0].conv
    assert isinstance(conv, LAYERS[ref["config"]["conv"]])
    x = ref["inputs_pixels"]
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == ref["logits"].shape == (16, 10)
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=0)
    assert torch.equal(logits.argmax(1), ref["pred"])
    cert = certify(model, x)
    torch.testing.assert_close(cert.radius, ref["certificates_pixel_space"], atol=1e-4, rtol=0)
    assert torch.equal(cert.pred, ref["pred"])


@pytest.mark.parametrize("conv", ["cayley", "bcop"])
@pytest.mark.parametrize("last_layer", ["ortho", "lln"])
def test_lipconvnet_forward_backward(conv: str, last_layer: str):
    assert CONV_LAYERS[conv] is LAYERS[conv] and conv in ORTHO_LAST_LAYERS
    torch.manual_seed(3)
    model = LipConvNet(conv=conv, init_channels=4, last_layer=last_layer)
    if last_layer == "ortho":
        expected = CayleyLinear if conv == "cayley" else BCOP
        assert isinstance(model.last_layer, expected)
    x = torch.rand(2, 3, 32, 32)
    model.train()
    out = model(x)
    assert out.shape == (2, 10)
    F.cross_entropy(out, torch.tensor([1, 7])).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    weights = [g for n, g in grads.items() if n.endswith(("weight", "conv_matrices"))]
    assert all(g.abs().sum() > 0 for g in weights)
    model.eval()
    with torch.no_grad():
        eval_out = model(x)
    assert eval_out.shape == (2, 10)
    # caching in eval mode does not change the function
    torch.testing.assert_close(eval_out, out.detach(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("conv", ["cayley", "bcop"])
def test_fresh_model_is_lipschitz(conv: str):
    """A freshly built model's features map has Jacobian norm <= 1/min(std) (eval, float64)."""
    torch.manual_seed(4)
    model = LipConvNet(conv=conv, init_channels=2, last_layer="lln").double().eval()
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    jac = jacobian_matrix(model.features, x)
    top = torch.linalg.matrix_norm(jac, ord=2).item()
    assert top <= model.lipschitz_claim * (1 + 1e-6)
    assert top > 0.5 * model.lipschitz_claim  # non-degenerate


@pytest.mark.parametrize("kind", ["cayley", "bcop", "cayley_linear"])
def test_eval_cache_follows_weights_and_mode(kind: str):
    torch.manual_seed(5)
    if kind == "cayley_linear":
        layer, x, param = CayleyLinear(12, 6), torch.randn(2, 12), "weight"
    else:
        layer, x = LAYERS[kind](2, 6, kernel_size=3, stride=2), torch.randn(2, 2, 8, 8)
        param = "weight" if kind == "cayley" else "conv_matrices"
    layer.eval()
    with torch.no_grad():
        y0 = layer(x)
        assert torch.equal(layer(x), y0)  # cached: identical
        getattr(layer, param).mul_(1.5).add_(0.1 * torch.randn_like(getattr(layer, param)))
        y1 = layer(x)
    assert not torch.allclose(y0, y1, atol=1e-3)
    layer.train()
    with torch.no_grad():
        y_train = layer(x)
    torch.testing.assert_close(y_train, y1, atol=1e-5, rtol=0)
    # a freshly loaded state computes from the loaded weights
    other = type(layer)(*((12, 6) if kind == "cayley_linear" else (2, 6, 3, 2))).eval()
    with torch.no_grad():
        other(x)  # fill its cache with its own weights
        other.load_state_dict(layer.state_dict())
        torch.testing.assert_close(other(x), y1, atol=1e-5, rtol=0)
        # a dtype change recomputes too
        torch.testing.assert_close(other.double()(x.double()), y1.double(), atol=1e-5, rtol=0)


def test_bcop_is_deterministic():
    torch.manual_seed(6)
    layer = BCOP(4, 4, kernel_size=3)
    assert torch.equal(layer.conv_filter(), layer.conv_filter())
    torch.manual_seed(6)
    assert torch.equal(BCOP(4, 4, kernel_size=3).eval().conv_filter(), layer.conv_filter())


def test_state_dict_keys_match_reference_names():
    assert set(CayleyConv(3, 8, 3, 2).state_dict()) == {"weight", "bias", "alpha"}
    assert CayleyConv(3, 8, 3, 2).weight.shape == (8, 12, 1, 1)
    assert CayleyConv(4, 8, 3, 1).weight.shape == (8, 4, 3, 3)
    assert set(CayleyLinear(16, 10).state_dict()) == {"weight", "bias", "alpha"}
    bcop = BCOP(3, 8, 3, 2)
    assert set(bcop.state_dict()) == {"conv_matrices", "mask", "bias"}
    assert bcop.conv_matrices.shape == (5, 12, 12) and bcop.mask.shape == (4, 1, 12)
    assert BCOP(16, 10, kernel_size=1).mask.shape == (0, 1, 16)


@pytest.mark.parametrize("kind", ["soc", "cayley", "bcop"])
@pytest.mark.parametrize("stride", [1, 2])
def test_bad_input_channels(kind: str, stride: int):
    """All three families refuse a wrong channel count the same way, naming the layer."""
    layer = CONV_LAYERS[kind](3, 6, kernel_size=3, stride=stride)
    name = type(layer).__name__
    with pytest.raises(ValueError, match=f"^{name} expects 3 input channels, got 4$"):
        layer(torch.randn(1, 4, 8, 8))
    assert layer(torch.randn(1, 3, 8, 8)).shape == (1, 6, 8 // stride, 8 // stride)


@functools.cache
def _lipschitz_layer(name: str) -> torch.nn.Module:
    torch.manual_seed(7)
    layers = {
        "cayley_s1_k3": lambda: CayleyConv(3, 4, 3, 1),
        "cayley_s2_k3": lambda: CayleyConv(3, 6, 3, 2),
        "bcop_s1_k3": lambda: BCOP(4, 3, 3, 1),
        "bcop_s2_k1": lambda: BCOP(3, 8, 1, 2),
        "cayley_linear": lambda: CayleyLinear(48, 10),
        "bcop_last": lambda: ORTHO_LAST_LAYERS["bcop"](48, 10),
    }
    return layers[name]().double().eval()


@pytest.mark.parametrize(
    "name",
    ["cayley_s1_k3", "cayley_s2_k3", "bcop_s1_k3", "bcop_s2_k1", "cayley_linear", "bcop_last"],
)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e2))
def test_one_lipschitz_on_random_pairs(name: str, seed: int, scale: float):
    layer = _lipschitz_layer(name)
    gen = torch.Generator().manual_seed(seed)
    if name == "cayley_linear":
        shape = (4, 48)
    elif name == "bcop_last":
        shape = (4, 48, 1, 1)
    else:
        shape = (4, layer.in_channels // layer.stride**2, 8, 8)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    y = x + scale * torch.randn(shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        fx, fy = layer(x), layer(y)
    out_diff = (fx - fy).flatten(1).norm(dim=1)
    in_diff = (x - y).flatten(1).norm(dim=1)
    assert torch.all(out_diff <= in_diff * (1 + 1e-6))
    assert math.isfinite(out_diff.sum().item())
