"""lipverify.testing: assertions, Hypothesis strategies, and the auto-loaded pytest plugin."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from torch import nn

from lipverify.layers import SOC, HouseholderOrder1, HouseholderOrder2, MaxMin
from lipverify.layers.soc import conv_transpose_filter
from lipverify.testing import (
    LipschitzAssertionError,
    assert_certificates_sound,
    assert_gradient_norm_preserving,
    assert_lipschitz,
)
from lipverify.testing.strategies import (
    activation_angles,
    input_batches,
    orthogonal_filters,
    skew_symmetric_filters,
)


class Scaled(nn.Module):
    def __init__(self, inner: nn.Module, factor: float) -> None:
        super().__init__()
        self.inner, self.factor = inner, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.factor


@given(x=input_batches(channels=(4, 8)), angles=activation_angles(4, count=3))
def test_householder_layers_are_gnp(x: torch.Tensor, angles: torch.Tensor) -> None:
    hh1, hh2 = HouseholderOrder1(x.shape[1]), HouseholderOrder2(x.shape[1])
    with torch.no_grad():
        pairs = x.shape[1] // 2
        hh1.theta.copy_(angles[0, :pairs].view(1, -1, 1, 1))
        for p, a in zip((hh2.theta0, hh2.theta1, hh2.theta2), angles, strict=True):
            p.copy_(a[:pairs])
    for layer in (MaxMin(), hh1, hh2):
        assert layer(x).shape == x.shape
        assert_gradient_norm_preserving(layer, x - 0.5)
        assert_lipschitz(layer, 1.0, x)


def test_scaled_householder_is_caught_with_its_ratio() -> None:
    x = torch.rand(4, 8, 6, 6) - 0.5
    with pytest.raises(LipschitzAssertionError, match="not gradient-norm preserving") as e:
        assert_gradient_norm_preserving(Scaled(HouseholderOrder1(8), 1 / math.sqrt(2)), x)
    assert e.value.ratio == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-6) or \
        e.value.ratio == pytest.approx(1 + (1 - 1 / math.sqrt(2)), rel=1e-6)
    assert e.value.input.shape == (8, 6, 6)


def test_assert_lipschitz_reports_worst_ratio() -> None:
    with pytest.raises(LipschitzAssertionError, match="ratio / bound = 2") as e:
        assert_lipschitz(Scaled(MaxMin(), 2.0), 1.0, torch.rand(3, 4, 5, 5))
    assert e.value.ratio == pytest.approx(2.0, rel=1e-6)


@given(s=skew_symmetric_filters())
def test_skew_filters_define_skew_operators(s: torch.Tensor) -> None:
    assert s.dim() == 4 and s.shape[0] == s.shape[1]
    assert torch.allclose(conv_transpose_filter(s), -s)


@given(q=orthogonal_filters())
def test_orthogonal_filters_are_orthogonal(q: torch.Tensor) -> None:
    conv = nn.Conv2d(q.shape[0], q.shape[0], 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(q)
    assert_gradient_norm_preserving(conv, torch.rand(2, q.shape[0], 4, 4), tol=1e-5)


def test_soc_layer_passes_the_assertions() -> None:
    layer = SOC(4, 16, stride=2).eval()  # 16 = 4 * 2 * 2: no padding, no truncation
    x = torch.rand(2, 4, 8, 8)
    assert_gradient_norm_preserving(layer, x, tol=1e-5)


def test_certificates_sound_catches_overclaimed_bound() -> None:
    torch.manual_seed(0)
    w = torch.linalg.qr(torch.randn(12, 2))[0].T  # orthonormal rows: exactly 1-Lipschitz

    class Lin(nn.Module):
        lipschitz_claim = 1.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1) @ w.T.to(x.dtype)

    x = torch.rand(6, 3, 2, 2)
    assert assert_certificates_sound(Lin(), x) >= 1  # a true bound: no flip inside radii
    with pytest.raises(LipschitzAssertionError, match="certificate violated"):
        assert_certificates_sound(Lin(), x, lipschitz=0.2)  # radii 5x too large


def test_plugin_autoloads_in_a_scratch_project(tmp_path) -> None:
    (tmp_path / "test_user.py").write_text(
        "import math, torch\n"
        "from lipverify.layers import MaxMin\n"
        "from lipverify.testing import assert_gradient_norm_preserving\n"
        "def test_maxmin():\n"
        "    assert_gradient_norm_preserving(MaxMin(), torch.randn(2, 4, 3, 3))\n"
        "def test_scaled():\n"
        "    f = lambda z: MaxMin()(z) / math.sqrt(2)\n"
        "    assert_gradient_norm_preserving(f, torch.randn(2, 4, 3, 3))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--help"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert "--lipverify-audit" in proc.stdout  # the plugin was auto-loaded
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_user.py"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert "1 failed, 1 passed" in proc.stdout, proc.stdout[-2000:]
    assert "not gradient-norm preserving" in proc.stdout


def test_plugin_import_does_not_import_torch() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import sys, lipverify.testing.plugin, lipverify.testing;"
         "print('torch' in sys.modules)"], capture_output=True, text=True, cwd="/", check=True,
    ).stdout
    assert out.strip() == "False"
