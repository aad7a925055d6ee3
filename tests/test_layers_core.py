"""SOC, pair activations and space-to-depth against exact float64 Jacobian oracles."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.autograd.functional import jacobian

from lipverify.layers import SOC, HouseholderOrder1, HouseholderOrder2, MaxMin, space_to_depth


def jacobian_svals(fn, x: torch.Tensor) -> torch.Tensor:
    """Singular values of the Jacobian of ``fn`` at ``x`` (float64, exact oracle)."""
    j = jacobian(fn, x.double())
    out_dim = int(torch.tensor(j.shape[: j.dim() - x.dim()]).prod())
    return torch.linalg.svdvals(j.reshape(out_dim, x.numel()))


def soc64(cin: int, cout: int, k: int, s: int, **kw) -> SOC:
    layer = SOC(cin, cout, kernel_size=k, stride=s, **kw).double().eval()
    layer.refresh_sigma()
    return layer


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("cin,cout", [(4, 4), (2, 6), (3, 12), (4, 2), (4, 8)])
def test_soc_eval_singular_values_are_one(cin: int, cout: int, kernel: int, stride: int) -> None:
    """Eval SOC is orthogonal: nonzero singular values within 1e-6 of 1 (T = 12)."""
    torch.manual_seed(cin * 31 + cout * 7 + kernel + stride)
    layer = soc64(cin, cout, kernel, stride, bias=False)
    x = torch.rand(1, cin, 8, 8, dtype=torch.float64)
    out = layer(x)
    assert out.shape == (1, cout, 8 // stride, 8 // stride)
    sv = jacobian_svals(layer, x)
    # min(n_in, n_out) singular values: with padding every input direction keeps its norm,
    # with truncation the rows stay orthonormal; either way they all equal 1.
    assert sv.numel() == min(x.numel(), out.numel())
    assert torch.allclose(sv, torch.ones_like(sv), atol=1e-6), (sv.min(), sv.max())


def test_soc_truncation_keeps_rows_orthonormal() -> None:
    """With truncation the Jacobian has orthonormal rows: J J^T = I."""
    layer = soc64(4, 2, 3, 1, bias=False)
    x = torch.rand(1, 4, 6, 6, dtype=torch.float64)
    j = jacobian(layer, x).reshape(2 * 36, 4 * 36)
    assert torch.allclose(j @ j.T, torch.eye(72, dtype=torch.float64), atol=1e-6)


def test_soc_train_mode_uses_fewer_terms_and_is_not_exact() -> None:
    layer = SOC(4, 4).double()
    assert layer.terms == 5 and layer.eval().terms == 12
    layer.train_terms = 1
    layer.train()
    x = torch.rand(1, 4, 8, 8, dtype=torch.float64)
    sv = jacobian_svals(layer, x)
    assert (sv - 1).abs().max() > 1e-3  # one Taylor term is far from orthogonal


def test_soc_vectors_match_filter_at_construction() -> None:
    """Unlike the reference, a fresh SOC's sigma is a converged estimate of its filter."""
    layer = SOC(8, 8)
    sig = layer.sigma().item()
    layer.refresh_sigma(200)
    assert sig > 0 and math.isclose(sig, layer.sigma().item(), rel_tol=1e-3)


def test_soc_eval_is_pure_and_train_updates_vectors() -> None:
    layer = SOC(4, 4).eval()
    u = layer.u1.clone()
    layer(torch.rand(2, 4, 8, 8))
    assert torch.equal(u, layer.u1)
    with torch.no_grad():
        layer.random_conv_filter.add_(0.5 * torch.randn_like(layer.random_conv_filter))
    layer.train()(torch.rand(2, 4, 8, 8))
    assert not torch.equal(u, layer.u1)


def test_soc_rejects_wrong_channel_count() -> None:
    with pytest.raises(ValueError, match="input channels"):
        SOC(4, 4)(torch.rand(1, 3, 8, 8))


@given(
    st.integers(1, 3), st.integers(1, 4), st.sampled_from([4, 8, 16]), st.integers(0, 2**16)
)
def test_space_to_depth_is_isometry(n: int, c: int, side: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, side, side, generator=g, dtype=torch.float64)
    y = space_to_depth(x, 2)
    assert y.shape == (n, 4 * c, side // 2, side // 2)
    assert torch.allclose(y.norm(), x.norm())
    # channel c*4 + a*2 + b holds pixel offset (a, b)
    assert torch.equal(y[:, 1::4], x[:, :, 0::2, 1::2])
    assert torch.equal(y[:, 2::4], x[:, :, 1::2, 0::2])


def _hh1(c: int, g: torch.Generator) -> HouseholderOrder1:
    act = HouseholderOrder1(c).double()
    with torch.no_grad():
        act.theta.copy_(2 * math.pi * torch.rand(act.theta.shape, generator=g))
    return act


def _hh2(c: int, g: torch.Generator) -> HouseholderOrder2:
    act = HouseholderOrder2(c).double()
    with torch.no_grad():
        for p in (act.theta0, act.theta1, act.theta2):
            p.copy_(2 * math.pi * torch.rand(p.shape, generator=g))
    return act


ACTIVATIONS = {"maxmin": lambda c, g: MaxMin(), "hh1": _hh1, "hh2": _hh2}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("shape", [(1, 4, 3, 3), (2, 6, 2, 2)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_activation_jacobian_is_orthogonal(name: str, shape: tuple, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    act = ACTIVATIONS[name](shape[1], g)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    assert act(x).shape == x.shape
    sv = jacobian_svals(act, x)
    assert torch.allclose(sv, torch.ones_like(sv), atol=1e-10)


def test_hh1_at_half_pi_is_swapped_maxmin() -> None:
    x = torch.randn(3, 8, 5, 5)
    hh = HouseholderOrder1(8)
    assert torch.allclose(hh.theta, torch.full_like(hh.theta, math.pi / 2))
    mm = MaxMin()(x)
    expected = torch.cat([mm[:, 4:], mm[:, :4]], dim=1)  # (min, max)
    assert torch.allclose(hh(x), expected, atol=1e-6)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@given(seed=st.integers(0, 2**16), c=st.sampled_from([2, 4, 8]), side=st.sampled_from([1, 4, 8]))
def test_activation_is_1_lipschitz_on_pairs(name: str, seed: int, c: int, side: int) -> None:
    g = torch.Generator().manual_seed(seed)
    act = ACTIVATIONS[name](c, g)
    x1 = torch.randn(4, c, side, side, generator=g, dtype=torch.float64)
    x2 = x1 + 0.3 * torch.randn(4, c, side, side, generator=g, dtype=torch.float64)
    y1, y2 = act(x1), act(x2)
    assert y1.shape == x1.shape
    d_out = (y1 - y2).flatten(1).norm(dim=1)
    d_in = (x1 - x2).flatten(1).norm(dim=1)
    assert (d_out <= d_in * (1 + 1e-12)).all()


@pytest.mark.parametrize("stride", [1, 2])
@given(seed=st.integers(0, 2**16), c=st.sampled_from([2, 4]))
def test_soc_is_1_lipschitz_on_random_pairs(stride: int, seed: int, c: int) -> None:
    torch.manual_seed(seed)
    layer = soc64(c, 2 * c, 3, stride)
    x1 = torch.rand(3, c, 8, 8, dtype=torch.float64)
    x2 = (x1 + 0.1 * torch.randn_like(x1)).clamp(0, 1)
    y1, y2 = layer(x1), layer(x2)
    assert y1.shape == (3, 2 * c, 8 // stride, 8 // stride)
    ratio = (y1 - y2).flatten(1).norm(dim=1) / (x1 - x2).flatten(1).norm(dim=1)
    assert (ratio <= 1 + 1e-6).all()


def test_eval_backward_can_run_repeatedly() -> None:
    """The eval-mode operator cache must hold no autograd graph (``inference_mode(False)``
    re-enables grad mode, so it has to be entered before ``no_grad``)."""
    from lipverify.models import LipConvNet

    m = LipConvNet(init_channels=6).eval()
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    grads = []
    for _ in range(3):
        m(x).sum().backward()
        grads.append(x.grad.clone())
        x.grad = None
    assert all(torch.allclose(g, grads[0]) for g in grads)
    assert m.layer1[0].conv.random_conv_filter.grad is not None
