"""Issue 12, property test: random small models drawn from the supported catalogue, with
reuse, hooks, instance forwards, parametrizations, edge-value parameters and NaN.

* Whenever the audit reports a guaranteed upper bound, it is at least the exact (float64)
  Jacobian norm at random points and at least the attained lower bound.
* Whenever it says "sound" on 2-pixel inputs, no violated certificate turns up in two
  searches: a float64 grid of 513 x 513 points on [0, 1]^2, and 256 points on each circle of
  radius r (1 - 1e-6) around each certified point.

The default session draws the profile's examples (25 under CI); the ``slow`` session, 200.
"""

from __future__ import annotations

import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from lipverify.audits import audit
from lipverify.layers.activations import MaxMin

from soundness_models import jacobian_norm

GRID = 513
CIRCLE = 256
SHRINK = 1 - 1e-6

EDGE = [float("nan"), float("inf"), -float("inf")]
ACTIVATIONS = st.one_of(
    st.sampled_from([nn.ReLU, nn.Tanh, nn.Sigmoid, MaxMin, nn.Identity]).map(lambda c: c()),
    st.sampled_from([0.1, -2.0, *EDGE]).map(nn.LeakyReLU),
    st.sampled_from([1.0, 3.0, *EDGE]).map(lambda a: nn.ELU(alpha=a)),
    st.tuples(st.sampled_from([1.0, 5.0, float("nan")]),
              st.sampled_from([20.0, 0.5, math.inf])).map(
        lambda bt: nn.Softplus(beta=bt[0], threshold=bt[1])),
    st.sampled_from([(-0.5, 0.5), (-math.inf, 0.2)]).map(lambda mm: nn.Hardtanh(*mm)),
)
TAMPER = ["none", "none", "none", "hook", "pre_hook", "instance_forward", "container_hook",
          "triple_parametrization", "orthogonal", "nan_weight", "nan_bias"]


class Triple(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 3 * w


def _linear(i: int, o: int, g: torch.Generator, scale: float) -> nn.Linear:
    lin = nn.Linear(i, o)
    with torch.no_grad():
        lin.weight.copy_(scale * torch.randn(o, i, generator=g) / math.sqrt(i))
        lin.bias.copy_(0.1 * torch.randn(o, generator=g))
    return lin


def _tamper(kind: str, model: nn.Sequential, lin: nn.Linear) -> None:
    if kind == "hook":
        lin.register_forward_hook(lambda _m, _i, out: 3 * out)
    elif kind == "pre_hook":
        lin.register_forward_pre_hook(lambda _m, args: (2 * args[0],))
    elif kind == "instance_forward":
        lin.forward = types.MethodType(
            lambda self, z: F.linear(3 * z, self.weight, self.bias), lin)
    elif kind == "container_hook":
        model.register_forward_hook(lambda _m, _i, out: 4 * out)
    elif kind == "triple_parametrization":
        parametrize.register_parametrization(lin, "weight", Triple())
    elif kind == "orthogonal":
        parametrizations.orthogonal(lin)
    elif kind in ("nan_weight", "nan_bias"):
        with torch.no_grad():
            (lin.weight if kind == "nan_weight" else lin.bias).view(-1)[0] = float("nan")


@st.composite
def small_models(draw):
    """(model, claim): Flatten, Linear(2, h), act, Linear(h, h) [, act, the same Linear again],
    Linear(h, k); one tamper; a claim of 0.5, 1 or 2 x the product of the plain layer norms."""
    h = draw(st.sampled_from([2, 4]))
    k = draw(st.sampled_from([2, 3]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    scale = draw(st.sampled_from([0.5, 1.0, 2.0]))
    first, mid, last = _linear(2, h, g, scale), _linear(h, h, g, scale), _linear(h, k, g, 1.0)
    act = draw(ACTIVATIONS)
    layers = [nn.Flatten(), first, act, mid]
    reuse = draw(st.booleans())
    if reuse:
        layers += [act, mid]
    model = nn.Sequential(*layers, last).eval()
    norms = [float(torch.linalg.matrix_norm(m.weight.detach().double(), ord=2))
             for m in (first, mid, last)]
    plain = norms[0] * norms[1] * norms[2] * (norms[1] if reuse else 1.0)
    _tamper(draw(st.sampled_from(TAMPER)), model, draw(st.sampled_from([first, mid, last])))
    claim = draw(st.sampled_from([0.5, 1.0, 2.0])) * plain
    return model, claim


def _violations_near(model64: nn.Module, x: torch.Tensor, pred: torch.Tensor,
                     radius: torch.Tensor) -> list[str]:
    """Certified points of ``x`` (N, 2) with a prediction change inside ``radius * SHRINK``,
    searched on the float64 grid and on circles."""
    t = torch.linspace(0, 1, GRID, dtype=torch.float64)
    grid = torch.cartesian_prod(t, t)
    ang = torch.arange(CIRCLE, dtype=torch.float64) * (2 * math.pi / CIRCLE)
    unit = torch.stack([ang.cos(), ang.sin()], 1)
    with torch.no_grad():
        grid_pred = model64(grid.view(-1, 1, 1, 2)).argmax(1)
    found = []
    for i in (radius > 0).nonzero()[:, 0].tolist():
        r, xi = float(radius[i]) * SHRINK, x[i].double()
        inside = (grid - xi).norm(dim=1) < r
        if bool((grid_pred[inside] != pred[i]).any()):
            found.append(f"grid point inside radius {r} of point {i} changes the prediction")
        ring = xi + r * unit
        ring = ring[((ring >= 0) & (ring <= 1)).all(1)]
        with torch.no_grad():
            ring_pred = model64(ring.view(-1, 1, 1, 2)).argmax(1)
        if bool((ring_pred != pred[i]).any()):
            found.append(f"circle point at radius {r} of point {i} changes the prediction")
    return found


def _check(model: nn.Module, claim: float) -> None:
    x = torch.rand(6, 1, 1, 2, generator=torch.Generator().manual_seed(0))
    rep = audit(model, x, lipschitz=claim, checks=("lipschitz",), lipschitz_points=4)
    if rep.lipschitz_upper is not None:
        probe = torch.cat([x, torch.rand(6, 1, 1, 2, generator=torch.Generator().manual_seed(1))])
        exact = jacobian_norm(model, probe)
        assert rep.lipschitz_upper >= exact, (rep.lipschitz_upper, exact, model)
        assert rep.lipschitz_upper >= rep.lipschitz_lower, rep.reasons
    if rep.verdict == "sound":
        model64 = copy.deepcopy(model).double().eval()
        pred = torch.tensor([s["pred"] for s in rep.samples])
        radius = torch.tensor([s["radius"] for s in rep.samples], dtype=torch.float64)
        assert _violations_near(model64, x.view(-1, 2), pred, radius) == [], rep.reasons


@given(small_models())
def test_audit_bounds_and_sound_verdicts_hold(drawn):
    _check(*drawn)


@pytest.mark.slow
@settings(max_examples=200)
@given(small_models())
def test_audit_bounds_and_sound_verdicts_hold_many(drawn):
    _check(*drawn)
