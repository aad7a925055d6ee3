"""lipverify.audits.gnp against exact oracles (float64 SVD of a small layer's Jacobian)."""

from __future__ import annotations

import copy
import math
import types

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lipverify.audits.gnp import (
    GNPLayer,
    GNPResult,
    gnp_audit,
    jacobian_singular_values_2x2,
    layer_deviation,
)
from lipverify.layers.activations import HouseholderOrder1, HouseholderOrder2, MaxMin
from lipverify.layers.soc import SOC
from lipverify.models import LipConvNet


def make_activation(name: str, channels: int) -> nn.Module:
    torch.manual_seed(7)
    if name == "maxmin":
        return MaxMin()
    if name == "hh1":
        act = HouseholderOrder1(channels)
        with torch.no_grad():
            act.theta.uniform_(0.0, 2 * math.pi)
        return act
    return HouseholderOrder2(channels)


def jacobian(f: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Oracle: the float64 Jacobian of one sample, (out_dim, in_dim)."""
    f = copy.deepcopy(f).double().eval()
    z = z.detach().double()
    out = f(z)
    return torch.autograd.functional.jacobian(f, z).reshape(out.numel(), z.numel())


@pytest.mark.parametrize("shape", [(2, 4, 3, 3), (1, 6, 2, 5), (3, 2, 1, 1)])
@pytest.mark.parametrize("name", ["maxmin", "hh1", "hh2"])
def test_pair_jacobians_match_full_jacobian(name, shape):
    act = make_activation(name, shape[1])
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    s = jacobian_singular_values_2x2(act, z)
    n, c = shape[:2]
    assert s.shape == (n, c // 2, *shape[2:], 2)
    assert s.dtype == torch.float64
    assert float((s - 1).abs().max()) < 1e-5
    for i in range(n):
        full = torch.linalg.svdvals(jacobian(act, z[i:i + 1])).sort().values
        assert torch.allclose(full, s[i].flatten().sort().values, atol=1e-10)


def test_maxmin_ties_use_a_one_sided_jacobian():
    z = torch.zeros(1, 4, 2, 2)
    z[:, 2:] = z[:, :2]  # x == y everywhere: autograd would average the two sides
    s = jacobian_singular_values_2x2(MaxMin(), z)
    assert torch.allclose(s, torch.ones_like(s))


@given(
    theta=st.lists(st.floats(0.0, 2 * math.pi), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_hh2_is_gnp_for_any_angles(theta, seed):
    act = HouseholderOrder2(2)
    with torch.no_grad():
        act.theta0.fill_(theta[0])
        act.theta1.fill_(theta[1])
        act.theta2.fill_(theta[2])
    z = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(seed))
    s = jacobian_singular_values_2x2(act, z)
    assert s.shape == (2, 1, 4, 4, 2)
    assert float((s - 1).abs().max()) < 1e-5


class Scaled(nn.Module):
    """HH1 followed by a 1/sqrt(2) scaling: 1-Lipschitz but not gradient-norm preserving."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.inner = HouseholderOrder1(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) / math.sqrt(2)


def test_scaled_activation_in_lipconvnet_is_flagged():
    torch.manual_seed(0)
    model = LipConvNet(init_channels=6, activation="hh1")
    model.layer2[0].activation = Scaled(24)
    model.train()
    res = gnp_audit(model, torch.rand(2, 3, 32, 32))
    assert model.training and all(m.training for m in model.modules())
    bad = [layer for layer in res.layers if not layer.gnp]
    assert [layer.name for layer in bad] == ["layer2.0.activation"]
    assert bad[0].worst_deviation == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)
    assert bad[0].kind == "Scaled"
    assert len(res.warnings) == 1 and "layer2.0.activation" in res.warnings[0]
    assert res.worst_deviation == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)
    others = [layer for layer in res.layers if layer.gnp]
    assert len(others) == 10 and all(layer.worst_deviation < 1e-4 for layer in others)


@pytest.mark.parametrize("exact_max_dim", [4096, 0], ids=["exact", "lanczos"])
def test_non_gnp_layers_in_sequential_warn(exact_max_dim):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), Scaled(4), nn.ReLU(), MaxMin(), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )
    res = gnp_audit(model, torch.rand(3, 3, 4, 4), exact_max_dim=exact_max_dim)
    by_name = {layer.name: layer for layer in res.layers}
    assert set(by_name) == {"1", "2", "3"}  # conv, flatten and linear do not claim GNP
    assert not by_name["1"].gnp
    assert by_name["1"].worst_deviation == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)
    assert not by_name["2"].gnp and by_name["2"].worst_deviation == pytest.approx(1.0)
    assert by_name["3"].gnp and by_name["3"].worst_deviation < 1e-12
    assert len(res.warnings) == 2


SOC_CASES = [(4, 4, 3, 1), (4, 6, 3, 1), (6, 4, 3, 1), (2, 4, 3, 2), (2, 12, 3, 2), (8, 4, 1, 1)]


def _oracle_deviation(layer: SOC, z: torch.Tensor) -> float:
    """Deviation of the nonzero singular values (the min(in, out) largest) of the Jacobian."""
    lay = copy.deepcopy(layer)
    j = jacobian(lay, z[:1])
    s = torch.linalg.svdvals(j)[: min(j.shape)]
    return float((s - 1).abs().max())


@pytest.mark.parametrize("exact_max_dim", [4096, 0], ids=["exact", "bound"])
@pytest.mark.parametrize("cin,cout,k,stride", SOC_CASES)
def test_soc_layers_are_gnp_at_t12(cin, cout, k, stride, exact_max_dim):
    torch.manual_seed(1)
    layer = SOC(cin, cout, kernel_size=k, stride=stride).eval()
    z = torch.randn(2, cin, 8, 8)
    dev, method, bound = layer_deviation(layer, z, exact_max_dim=exact_max_dim)
    assert dev < 1e-4
    assert bound is not None and bound < 1e-4
    oracle = _oracle_deviation(layer, z)
    assert oracle <= bound
    if exact_max_dim:
        assert method.startswith("exact") and dev == pytest.approx(oracle, abs=1e-6)
    else:
        assert method.startswith("guaranteed") and dev == bound


@pytest.mark.parametrize("exact_max_dim", [4096, 0], ids=["exact", "lanczos"])
def test_soc_with_two_terms_is_not_gnp(exact_max_dim):
    torch.manual_seed(2)
    layer = SOC(4, 4, kernel_size=3).eval()
    layer.eval_terms = 2
    z = torch.randn(1, 4, 8, 8)
    dev, method, bound = layer_deviation(layer, z, exact_max_dim=exact_max_dim)
    oracle = _oracle_deviation(layer, z)
    assert dev > 1e-2
    # exact (with the layer's float32 A; the oracle recomputes A in float64: ~1e-7 apart), or a
    # Lanczos under-estimate
    assert dev <= oracle * (1 + 1e-6)
    if exact_max_dim:
        assert dev == pytest.approx(oracle, rel=1e-6)
    else:
        assert method.startswith("estimate") and dev >= 0.5 * oracle
    res = gnp_audit(nn.Sequential(layer), z, exact_max_dim=exact_max_dim)
    assert not res.layers[0].gnp and res.warnings


def test_stale_sigma_is_not_gnp():
    torch.manual_seed(3)
    layer = SOC(4, 4, kernel_size=3).eval()
    with torch.no_grad():
        for i in range(1, 5):
            u, v = getattr(layer, f"u{i}"), getattr(layer, f"v{i}")
            u.copy_(torch.randn(u.shape))
            v.copy_(torch.randn(v.shape) * 1e-3)  # |sigma| far below ||S||
    res = gnp_audit(nn.Sequential(layer), torch.rand(1, 4, 8, 8))
    assert not res.layers[0].gnp
    assert res.layers[0].worst_deviation > 1.0


def test_soc_whose_forward_is_not_its_series_takes_the_jacobian_route():
    torch.manual_seed(4)
    layer = SOC(4, 4, kernel_size=3).eval()
    layer.forward = types.MethodType(lambda self, x: 0.5 * SOC.forward(self, x), layer)
    dev, method, bound = layer_deviation(layer, torch.randn(1, 4, 8, 8))
    assert method.startswith("exact: float64 SVD of the Jacobian") and bound is None
    assert dev == pytest.approx(0.5, abs=1e-6)


def test_lipconvnet_is_gnp_and_result_serialises():
    torch.manual_seed(0)
    model = LipConvNet(init_channels=6, activation="hh2")
    res = gnp_audit(model, torch.rand(3, 3, 32, 32), max_points=2)
    assert isinstance(res, GNPResult) and all(isinstance(g, GNPLayer) for g in res.layers)
    assert [g.name for g in res.layers][-1] == "last_layer"
    assert len(res.layers) == 11
    assert all(g.gnp for g in res.layers) and not res.warnings
    assert res.worst_deviation < 1e-4
    assert res.tolerance == 1e-3
    d = res.to_dict()
    assert set(d) == {"layers", "worst_deviation", "tolerance", "warnings"}
    assert {"name", "kind", "worst_deviation", "gnp", "method"} <= set(d["layers"][0])


def test_lln_last_layer_is_not_a_gnp_layer():
    model = LipConvNet(init_channels=6, last_layer="lln")
    res = gnp_audit(model, torch.rand(1, 3, 32, 32))
    assert "last_layer" not in [g.name for g in res.layers]
