"""Regression tests for the soundness bugs a mutation check found uncaught (issue 19).

Each test is small and compares with an exact float64 oracle built here, independently of the
code under test (dense Jacobians, explicit matrix powers, pairwise loops); the mutants each
one kills are listed in ``tests/mutation/mutants.py`` (``nox -s mutation``).

* LLN radii are the minimum over *all* other classes: 12 classes whose binding pairs are the two
  lowest logits.
* Ortho radii and certified accuracy: the exact distance to the decision boundary of an
  orthogonal linear model, and "certified at r" means radius strictly greater than r.
* Verdicts: no guaranteed upper bound, or a guaranteed bound above the claim with no lower
  bound above it, is ``inconclusive``, never ``sound``.
* Zero-padded convolutions on odd grids, with filters for which the circular ``n`` grid
  under-states the norm: the FFT route's bound, and SOC's ``a >= ||A||``, must cover the exact
  norm of the zero-padded operator.
* SOC's series bound against dense skew matrices, and the layer's output against the paper's
  definition ``sum_{i=0}^{T} A^i / i!`` (Singla & Feizi 2021, Eq. 5 truncated).
* Safety margins: upper bounds inflated, lower bounds deflated, ``1/min(std)`` for per-channel
  normalization.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipverify.audits import audit
from lipverify.audits.lipschitz import (
    SAFETY,
    conv_frequency_norm,
    layer_upper_bound,
    lipschitz_audit,
    soc_series_bound,
)
from lipverify.certificates import Certificates, certified_accuracy, certify, radii_from_logits
from lipverify.layers.last import LLN
from lipverify.layers.soc import SOC, conv_transpose_filter, space_to_depth
from lipverify.models import Normalize

from controls import batch, linear_model

# --------------------------------------------------------------------------------------------
# oracles


def jacobian(f, shape: tuple[int, ...]) -> torch.Tensor:
    """Dense float64 matrix (out, in) of the linear part of the affine map ``f`` on inputs of
    per-sample ``shape``: ``f`` applied to every basis vector, minus ``f(0)`` (the bias)."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64).view(n, *shape)
    with torch.no_grad():
        cols = f(basis) - f(torch.zeros(1, *shape, dtype=torch.float64))
    return cols.reshape(n, -1).T


def spectral_norm(j: torch.Tensor) -> float:
    """Largest singular value, float64 SVD."""
    return float(torch.linalg.svdvals(j.to(torch.float64))[0])


def conv_norm(weight: torch.Tensor, shape: tuple[int, ...], **conv_kw) -> float:
    """Exact norm of the zero-padded cross-correlation with ``weight`` on ``shape``."""
    w = weight.detach().to(torch.float64)
    return spectral_norm(jacobian(lambda t: F.conv2d(t, w, **conv_kw), shape))


def lln_radius_oracle(logits: torch.Tensor, weight: torch.Tensor, lip: float) -> list[float]:
    """Brute force over all pairs (float64, plain loops): ``min_{j != y} (f_y - f_j) /
    (||w_y - w_j|| L)`` with y the prediction; identical rows skipped when the margin is
    positive, radius 0 when it is not."""
    lg, w = logits.tolist(), weight.to(torch.float64).tolist()
    radii = []
    for row in lg:
        y = max(range(len(row)), key=lambda k: row[k])
        best = math.inf
        for j in range(len(row)):
            if j == y:
                continue
            dist = math.sqrt(sum((a - b) ** 2 for a, b in zip(w[y], w[j], strict=True)))
            margin = row[y] - row[j]
            if dist == 0.0:
                best = best if margin > 0 else 0.0
            else:
                best = min(best, margin / (dist * lip))
        radii.append(best)
    return radii


# --------------------------------------------------------------------------------------------
# certificates


def twelve_class_lln() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit rows on a circle (degrees): the prediction at 150, nine competitors at 152..176 and
    the two *lowest* logits at 179 and 180, in a shuffled class order. With the feature along
    e1, the pair ratio is ``sin((150 + theta) / 2)``, smallest for the two lowest logits, so a
    certificate that looks only at the top competitors over-states the radius."""
    angles = torch.tensor([150.0, 152, 155, 158, 161, 164, 167, 170, 173, 176, 179, 180],
                          dtype=torch.float64)
    perm = torch.tensor([7, 2, 11, 0, 5, 9, 1, 10, 3, 8, 6, 4])
    rad = torch.deg2rad(angles[perm])
    weight = torch.stack([torch.cos(rad), torch.sin(rad)], 1)
    feats = torch.tensor([[1.0, 0.0], [0.8, 0.05]], dtype=torch.float64)
    return feats, weight, perm


def test_lln_radius_is_the_min_over_all_other_classes():
    feats, weight, perm = twelve_class_lln()
    lip = 1.7
    logits = feats @ weight.T
    lowest_two = set(logits[0].argsort()[:2].tolist())
    assert lowest_two == {int((perm == 10).nonzero()), int((perm == 11).nonzero())}
    oracle = lln_radius_oracle(logits, weight, lip)
    got = radii_from_logits(logits, lip, "lln", weight)
    assert got.tolist() == pytest.approx(oracle, rel=1e-12)
    # the construction binds at the two lowest logits: the top-9 competitors alone over-state
    y = int(logits[0].argmax())
    ratios = (logits[0, y] - logits[0]) / ((weight[y] - weight).norm(dim=1) * lip)
    ratios[y] = math.inf
    assert int(ratios.argmin()) in lowest_two
    top9 = [j for j in logits[0].argsort(descending=True).tolist() if j != y][:9]
    assert float(ratios[top9].min()) > 1.02 * oracle[0]


class _LLNModel(nn.Module):
    """Features are the flattened pixels (1-Lipschitz), then an LLN head with 12 classes."""

    certificate_kind = "lln"
    lipschitz_claim = 1.0

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.last_layer = LLN(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.last_layer.weight.copy_(weight)
            self.last_layer.bias.zero_()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.features(x))


def test_lln_model_certificates_use_all_classes():
    feats, weight, _ = twelve_class_lln()
    model = _LLNModel(weight.float()).eval()
    x = (0.9 * feats / feats.norm(dim=1, keepdim=True)).float().view(-1, 1, 1, 2)
    cert = certify(model, x)
    w = model.last_layer.normalized_weight().detach().double()
    oracle = lln_radius_oracle(x.flatten(1).double() @ w.T, w, 1.0)
    assert cert.radius.double().tolist() == pytest.approx(oracle, rel=1e-5)


def test_ortho_radius_is_the_exact_distance_for_an_orthogonal_linear_model():
    """For ``f(x) = W x`` with orthogonal rows scaled by L, the distance from x to the boundary
    between y and j is ``(f_y - f_j) / ||w_y - w_j||`` (float64, the actual float32 weights);
    the certificate with the exact L must equal it: never more, and here not less."""
    scale = 1.5
    model = linear_model(1, 4, 10, scale=scale, seed=3)
    x = batch(16, 1, 4, seed=4)
    w = model[1].weight.detach().double()
    lip = spectral_norm(w)
    cert = certify(model, x, lipschitz=lip)
    logits = x.flatten(1).double() @ w.T
    for i in range(x.shape[0]):
        y = int(cert.pred[i])
        dist = min((logits[i, y] - logits[i, j]) / (w[y] - w[j]).norm()
                   for j in range(10) if j != y)
        assert float(cert.radius[i]) <= float(dist) * (1 + 1e-5)
        assert float(cert.radius[i]) >= float(dist) * (1 - 1e-5)


def test_certified_means_radius_strictly_greater_than_r():
    r = 0.25  # exact in float32
    above = torch.nextafter(torch.tensor(r), torch.tensor(1.0))  # the next float32 above r
    radius = torch.tensor([r, float(above), r / 2, 1.0], dtype=torch.float32)
    cert = Certificates(pred=torch.zeros(4, dtype=torch.long), radius=radius,
                        logits=torch.zeros(4, 3))
    acc = certified_accuracy(nn.Identity(), torch.zeros(4, 1, 1, 1), torch.zeros(4).long(),
                             radii=[r], certificates=cert)
    assert acc["certified_accuracy"]["%.6f" % r] == 0.5  # the two strictly above r


# --------------------------------------------------------------------------------------------
# verdicts (Lipschitz check only: fast and enough to decide these)


class Halve(nn.Module):
    """``x / 2``: 1/2-Lipschitz, but computed through an input-dependent branch
    (``where(x > 0, x, x)``) that the graph auditor has no rule for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.where(x > 0.5, x, x)


def _diag_linear(diag: list[float]) -> nn.Linear:
    lin = nn.Linear(len(diag), len(diag))
    with torch.no_grad():
        lin.weight.copy_(torch.diag(torch.tensor(diag)))
        lin.bias.zero_()
    return lin


def _audit_lipschitz(model: nn.Module, claim: float):
    x = batch(4, 1, 3, seed=5)
    return audit(model.eval(), x, lipschitz=claim, checks=("lipschitz",), seed=0)


def test_model_without_a_guaranteed_bound_is_inconclusive():
    """Lipschitz constant exactly 1, claim 1: no counterexample can exist, yet with no
    guaranteed bound the audit must not say sound."""
    model = nn.Sequential(nn.Flatten(), Halve(), _diag_linear([2.0] * 9))
    rep = _audit_lipschitz(model, 1.0)
    assert rep.lipschitz_upper is None
    assert rep.lipschitz_lower <= 1.0
    assert rep.verdict == "inconclusive", rep.reasons
    control = nn.Sequential(nn.Flatten(), _diag_linear([0.5] * 9), _diag_linear([2.0] * 9))
    rep = _audit_lipschitz(control, 1.0)  # the same function with a route for every layer
    assert rep.verdict == "sound", rep.reasons


def test_bound_above_the_claim_without_a_counterexample_is_inconclusive():
    """``diag(.5, 1, ...) relu diag(1, .5, ...)``: true constant 0.5, guaranteed product bound
    1.0 (the ReLU stops the exact merge of the two linear maps). A claim of 0.75 is true but
    unproven (bound > claim (1 + tau), lower < claim)."""
    model = nn.Sequential(nn.Flatten(), _diag_linear([1.0] + [0.5] * 8), nn.ReLU(),
                          _diag_linear([0.5] + [1.0] * 8))
    rep = _audit_lipschitz(model, 0.75)
    assert rep.lipschitz_upper > 0.75 * (1 + rep.tolerance)
    assert rep.lipschitz_lower <= 0.5
    assert rep.verdict == "inconclusive", rep.reasons
    rep = _audit_lipschitz(model, 1.0)  # control: the bound now supports the claim
    assert rep.verdict == "sound", rep.reasons


# --------------------------------------------------------------------------------------------
# zero-padded convolutions on odd grids


def _filter(name: str) -> tuple[torch.Tensor, dict]:
    """Filters for which the circular n grid is below the zero-padded norm on odd grids."""
    if name == "diff-h":  # [0, 1, -1] along the width
        return torch.tensor([0.0, 1.0, -1.0]).view(1, 1, 1, 3), {"padding": (0, 1)}
    if name == "diff-v":
        return torch.tensor([0.0, 1.0, -1.0]).view(1, 1, 3, 1), {"padding": (1, 0)}
    if name == "diff-3x3":
        w = torch.zeros(1, 1, 3, 3)
        w[0, 0, 1] = torch.tensor([0.0, 1.0, -1.0])
        return w, {"padding": 1}
    if name == "second-diff":
        return torch.tensor([1.0, -2.0, 1.0]).view(1, 1, 1, 3), {"padding": (0, 1)}
    if name == "diff-2ch":  # two channels, opposite signs
        w = torch.zeros(2, 2, 1, 3)
        w[0, 0, 0] = torch.tensor([0.0, 1.0, -1.0])
        w[1, 1, 0] = torch.tensor([0.0, -1.0, 1.0])
        return w, {"padding": (0, 1)}
    raise ValueError(name)


@pytest.mark.parametrize("grid", [(5, 5), (7, 7), (9, 9), (7, 9), (9, 7)])
@pytest.mark.parametrize(
    "name", ["diff-h", "diff-v", "diff-3x3", "second-diff", "diff-2ch"]
)
def test_conv_fft_bound_covers_the_zero_padded_norm_on_odd_grids(name, grid):
    weight, kw = _filter(name)
    layer = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[-2:]), bias=False, **kw)
    with torch.no_grad():
        layer.weight.copy_(weight)
    shape = (weight.shape[1], *grid)
    exact = conv_norm(weight, shape, **kw)
    circular = conv_frequency_norm(weight, grid)
    assert circular < exact  # the case is a trap: the circular n grid under-states the norm
    ub, method = layer_upper_bound(layer, shape, exact_max_dim=0)
    assert "zero-padded" in method
    assert ub >= exact, (ub, exact, circular, method)
    ub_exact, _ = layer_upper_bound(layer, shape)  # the exact route agrees with the oracle
    assert exact <= ub_exact <= exact * (1 + 1e-9 + SAFETY)


def _skew_difference_soc(vertical: bool, terms: int = 12) -> SOC:
    """A 2-channel SOC whose skew filter is ``[[0, D], [-D^T, 0]]`` with D the difference
    filter [0, 1, -1]: ``||A|| = ||D||``, under-stated by the circular n grid when n is odd."""
    s = torch.zeros(2, 2, 3, 3)
    if vertical:
        s[0, 1, :, 1] = torch.tensor([0.0, 1.0, -1.0])
    else:
        s[0, 1, 1, :] = torch.tensor([0.0, 1.0, -1.0])
    s[1, 0] = -conv_transpose_filter(s)[1, 0]
    assert torch.equal(s, -conv_transpose_filter(s))
    layer = SOC(2, 2, kernel_size=3, eval_terms=terms)
    with torch.no_grad():
        layer.random_conv_filter.copy_(s)
    layer.refresh_sigma(50)
    return layer.eval()


A_BOUND = re.compile(r"a=\|\|A\|\|<=([0-9.eE+-]+)")


@pytest.mark.parametrize("grid", [(5, 5), (7, 7), (9, 5)])
@pytest.mark.parametrize("vertical", [False, True], ids=["horizontal", "vertical"])
def test_soc_bound_on_a_covers_the_zero_padded_norm_on_odd_grids(vertical, grid):
    layer = _skew_difference_soc(vertical)
    a = layer.normalized_filter().detach()
    shape = (2, *grid)
    exact_a = conv_norm(a, shape, padding=1)
    assert conv_frequency_norm(a, grid) < exact_a  # a trap: the circular grid under-states
    _, method = layer_upper_bound(layer, shape, exact_max_dim=0)
    found = A_BOUND.search(method)
    assert found, f"the soc-series method no longer states a: {method}"
    assert float(found.group(1)) >= exact_a * (1 - 1e-6), (method, exact_a)  # 6 digits printed


# --------------------------------------------------------------------------------------------
# SOC: the series bound and the series itself


def _skew_matrix(angles: list[float], seed: int) -> torch.Tensor:
    """Dense skew-symmetric matrix with eigenvalues ``+-i theta`` (float64): ``||A|| =
    max theta``."""
    d = 2 * len(angles)
    blocks = torch.zeros(d, d, dtype=torch.float64)
    for i, t in enumerate(angles):
        blocks[2 * i, 2 * i + 1], blocks[2 * i + 1, 2 * i] = t, -t
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    return q @ blocks @ q.T


def taylor(a: torch.Tensor, terms: int) -> torch.Tensor:
    """``sum_{i=0}^{T} A^i / i!`` by explicit powers and factorials (float64)."""
    out = torch.eye(a.shape[0], dtype=torch.float64)
    power = torch.eye(a.shape[0], dtype=torch.float64)
    for i in range(1, terms + 1):
        power = power @ a
        out = out + power / math.factorial(i)
    return out


ROUNDING = 1e-14  # float64 SVD of a matrix of norm ~1; soc_series_bound is not inflated


@pytest.mark.parametrize("terms", [1, 5, 9, 12])
@pytest.mark.parametrize("a", [0.25, 0.5, 1.0, 2.0])
def test_soc_series_bound_covers_dense_skew_series(a, terms):
    """For T = 1 (mod 4) the truncated series of a skew matrix expands, and ``1 + tail(a)``
    is within a few percent of the truth: a bound computed with a smaller ``a`` falls below
    (for T = 9 the excess is 1e-13 at a = 0.25, 3e-10 at a = 0.5)."""
    mat = _skew_matrix([a, 0.6 * a, 0.3 * a], seed=terms)
    exact = spectral_norm(taylor(mat, terms))
    assert soc_series_bound(a, terms, skew=True) >= exact - ROUNDING
    general = mat + 0.5 * a * torch.eye(mat.shape[0], dtype=torch.float64)  # not skew
    general = general * (a / spectral_norm(general))
    exact = spectral_norm(taylor(general, terms))
    assert soc_series_bound(a, terms, skew=False) >= exact * (1 - ROUNDING)


@pytest.mark.parametrize("terms", [1, 5])
def test_soc_layer_bound_with_few_terms_covers_the_exact_norm(terms):
    """An SOC scaled to ||A|| = 0.5 and T = 1 or 5: the truncated series expands by about
    ``a^(T+1)/(T+1)!`` and the FFT-route bound must cover it."""
    torch.manual_seed(3)
    layer = SOC(3, 3, kernel_size=3, eval_terms=terms).eval()
    shape = (3, 9, 9)
    norm_a = conv_norm(layer.normalized_filter().detach(), shape, padding=1)
    with torch.no_grad():
        layer.correction.mul_(0.5 / norm_a)
    exact = spectral_norm(jacobian(copy.deepcopy(layer).double(), shape))
    assert exact > 1 + 1e-5  # expands: the bound is not dominated by the safety margin
    ub, method = layer_upper_bound(layer, shape, exact_max_dim=0)
    assert method.startswith("soc-series")
    assert ub >= exact


SOC_SERIES_CASES = [  # (in, out, stride, grid): dense kind (3x3), conv kind, padding, truncation
    (2, 2, 1, (3, 3)),
    (2, 2, 1, (5, 4)),
    (2, 3, 1, (4, 4)),
    (3, 2, 1, (4, 4)),
    (1, 4, 2, (6, 6)),
]


def _soc_oracle(layer: SOC, x: torch.Tensor, terms: int) -> torch.Tensor:
    """``(sum_{i=0}^{T} A^i / i!) pad(s2d(x))`` truncated, plus bias: dense float64."""
    a = layer.normalized_filter().detach().double()
    xs = space_to_depth(x.double(), layer.stride)
    pad = layer.max_channels - xs.shape[1]
    xs = F.pad(xs, (0, 0, 0, 0, 0, pad))
    shape = tuple(xs.shape[1:])
    mat = jacobian(lambda t: F.conv2d(t, a, padding=layer.kernel_size // 2), shape)
    z = (taylor(mat, terms) @ xs.reshape(xs.shape[0], -1).T).T.reshape(xs.shape)
    return z[:, : layer.out_channels] + layer.bias.detach().double().view(1, -1, 1, 1)


@pytest.mark.parametrize("terms", [1, 2, 5, 12])
@pytest.mark.parametrize("cin,cout,stride,grid", SOC_SERIES_CASES)
def test_soc_eval_output_is_the_truncated_taylor_series(cin, cout, stride, grid, terms):
    """Eval mode sums exactly the powers 0..eval_terms (float64 layer, so a term of size
    ``1/12!`` is visible), whatever internal path it takes."""
    torch.manual_seed(7)
    layer = SOC(cin, cout, kernel_size=3, stride=stride, eval_terms=terms).double().eval()
    with torch.no_grad():
        layer.correction.mul_(1.5)  # ||A|| near 1: every term matters at 1e-12
    x = torch.randn(3, cin, *grid, dtype=torch.float64)
    with torch.no_grad():
        got = layer(x)
    ref = _soc_oracle(layer, x, terms)
    torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-11)


def test_soc_train_output_is_the_truncated_taylor_series():
    """Train mode sums the powers 0..train_terms (power iteration frozen to compare)."""
    torch.manual_seed(8)
    layer = SOC(2, 2, kernel_size=3, train_terms=5).double()
    layer.init_iters = layer.update_iters = 0
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    got = layer.train()(x).detach()
    ref = _soc_oracle(layer.eval(), x, 5)
    torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-11)


def test_soc_default_terms_are_the_papers():
    """Highest Taylor power T: 12 in evaluation, 5 in training (as in the reference code)."""
    layer = SOC(2, 2)
    assert (layer.eval_terms, layer.train_terms) == (12, 5)


# --------------------------------------------------------------------------------------------
# safety margins and normalization


def test_upper_bounds_carry_the_safety_margin():
    lin = _diag_linear([2.0, 1.0, 0.5])
    ub, _ = layer_upper_bound(lin, (3,))
    assert ub >= 2.0 * (1 + 0.5 * SAFETY)
    weight = torch.tensor([0.0, 1.0, -1.0]).view(1, 1, 1, 3)
    conv = nn.Conv2d(1, 1, (1, 3), padding=(0, 1), bias=False)
    with torch.no_grad():
        conv.weight.copy_(weight)
    exact = conv_norm(weight, (1, 6, 6), padding=(0, 1))
    for emd in (4096, 0):
        ub, _ = layer_upper_bound(conv, (1, 6, 6), exact_max_dim=emd)
        assert ub >= exact * (1 + 0.5 * SAFETY)


def test_normalization_bound_and_claim_use_the_smallest_std():
    std = (0.5, 0.25, 1.0)
    norm = Normalize((0.1, 0.2, 0.3), std)
    shape = (3, 2, 2)
    exact = spectral_norm(jacobian(copy.deepcopy(norm).double(), shape))
    assert exact == pytest.approx(4.0, rel=1e-12)
    ub, _ = layer_upper_bound(norm, shape)
    assert ub >= exact * (1 + 0.5 * SAFETY)
    assert norm.lipschitz >= exact  # what a LipConvNet claims


def test_lower_bound_is_deflated_below_an_exactly_known_constant():
    """``2 I``: every pair attains ratio 2 (up to 1e-13 in float64), so a lower bound above 2
    means the safety factor went the wrong way."""
    model = nn.Sequential(nn.Flatten(), _diag_linear([2.0] * 9)).eval()
    res = lipschitz_audit(model, batch(4, 1, 3, seed=6), map="logits", ascent_steps=5)
    assert all(v <= 2.0 for v in res.lower_by_method.values()), res.lower_by_method
    assert res.lower >= 2.0 * (1 - 1e-6)
    assert 2.0 <= res.upper <= 2.0 * (1 + 3 * SAFETY)
