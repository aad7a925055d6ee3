"""The field's families against their authors' claims (issue 14): models 1-Lipschitz by
construction get a guaranteed bound of at most 1 + 1e-4 and SOUND for claim 1; each
realistically broken variant (2-10% over its claim) comes out UNSOUND."""

from __future__ import annotations

import math

import families as fam
import pytest
import torch
import torch.nn.functional as F

from lipverify.audits import audit
from lipverify.audits.operators import linear_norm


def _audit(model, shape, claim=1.0):
    x = torch.rand(16, *shape, generator=torch.Generator().manual_seed(0))
    return audit(model.eval(), x, lipschitz=claim, checks=("lipschitz",), lipschitz_points=8)


SOUND = {
    "sll": (fam.sll, (3, 4, 4)),
    "cpl-exact": (lambda: fam.cpl(iters=500), (3, 4, 4)),
    "aol": (fam.aol, (3, 4, 4)),
}
BROKEN = {
    "liresnet-stale-power-iteration": (lambda: fam.liresnet(iters=4, blocks=1, classes=144),
                                       (4, 6, 6), 1.0508),
    "cpl-unconverged-power-iteration": (lambda: fam.cpl(iters=12, blocks=1, classes=48),
                                        (3, 4, 4), 1.0641),
    "sll-head-rescaled": (lambda: fam.sll(head_scale=1.05, bias=-5.0), (3, 4, 4), 1.05),
    "aol-missing-normalisation": (lambda: fam.aol(broken=True), (3, 4, 4), 1.05),
}


@pytest.mark.parametrize("name", sorted(SOUND))
def test_families_one_lipschitz_by_construction_are_sound(name):
    build, shape = SOUND[name]
    rep = _audit(build(), shape)
    assert rep.lipschitz_upper <= 1 + 1e-4, rep.reasons
    assert rep.verdict == "sound", rep.reasons


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_variants_are_unsound(name):
    build, shape, excess = BROKEN[name]
    rep = _audit(build(), shape)
    assert 1.02 <= excess <= 1.10
    assert rep.verdict == "unsound", rep.reasons
    assert rep.lipschitz_lower > 1 + rep.tolerance
    assert rep.lipschitz_lower <= rep.lipschitz_upper
    assert rep.lipschitz_upper >= excess * (1 - 1e-4)


def test_liresnet_bound_is_within_one_percent_of_the_exact_norm():
    model = fam.liresnet().eval()  # linear: its Lipschitz constant is the exact norm
    rep = _audit(model, (4, 6, 6))
    with torch.no_grad():
        exact = linear_norm(lambda z: model.double()(z) - model(torch.zeros_like(z)),
                            (4, 6, 6))
    assert exact <= rep.lipschitz_upper <= 1.01 * exact
    assert rep.verdict == "sound"


def test_a_residual_block_is_bounded_as_i_plus_k_not_one_plus_k():
    block = fam.LiResBlock(4, 20, 3, 200).double().eval()  # 1600 dims: the FFT route
    w = block.conv.weight.detach()
    exact = linear_norm(lambda z: z + F.conv2d(z, w, padding=1), (4, 20, 20)) / float(
        block.scale)
    rep = _audit(torch.nn.Sequential(block.float(), torch.nn.Flatten()), (4, 20, 20),
                 claim=1.01)
    triangle = (1 + linear_norm(lambda z: F.conv2d(z, w, padding=1), (4, 20, 20))) / float(
        block.scale)
    assert exact * (1 - 1e-6) <= rep.lipschitz_upper <= 1.01 * exact < triangle


def test_sdp_lemma_matches_the_exact_jacobian_of_a_cpl_block():
    """All units active: the block is affine with ``J = I - (2/s^2) W^T W``."""
    block = fam.CPLDense(16, 16, 5, 3).double().eval()
    w = block.weight.detach()
    j = torch.eye(16, dtype=torch.float64) - (2 / float(block.sigma) ** 2) * w.T @ w
    exact = float(torch.linalg.matrix_norm(j, 2))
    rep = _audit(torch.nn.Sequential(torch.nn.Flatten(), block).float(), (1, 4, 4),
                 claim=exact)
    bound = max(1.0, 2 * (float(torch.linalg.matrix_norm(w, 2)) / float(block.sigma)) ** 2 - 1)
    assert rep.lipschitz_upper == pytest.approx(bound, rel=1e-5)
    assert exact <= rep.lipschitz_upper * (1 + 1e-6)
    assert math.isclose(rep.lipschitz_lower, exact, rel_tol=1e-4)


def _orthogonium_residuals():
    pytest.importorskip("orthogonium")
    from orthogonium.layers.conv.AOL.aol import AOLConv2D
    from orthogonium.layers.conv.SLL.sll_layer import (
        SDPBasedLipschitzDense,
        SDPBasedLipschitzResBlock,
    )
    from orthogonium.layers.custom_activations import MaxMin
    from orthogonium.layers.linear import OrthoLinear
    from orthogonium.layers.residual import (
        AdditiveResidual,
        L2NormResidual,
        PrescaledAdditiveResidual,
    )

    torch.manual_seed(0)
    nn = torch.nn
    return {
        "SDPBasedLipschitzResBlock": nn.Sequential(
            SDPBasedLipschitzResBlock(4, 2), SDPBasedLipschitzResBlock(4, 2), nn.Flatten(),
            OrthoLinear(4 * 6 * 6, 5)),
        "SDPBasedLipschitzDense": nn.Sequential(
            nn.Flatten(), SDPBasedLipschitzDense(144, 144, 64), OrthoLinear(144, 5)),
        "L2NormResidual": nn.Sequential(
            L2NormResidual(nn.Sequential(AOLConv2D(4, 4, 3, padding=1), MaxMin())),
            nn.Flatten(), OrthoLinear(4 * 6 * 6, 5)),
        "PrescaledAdditiveResidual": nn.Sequential(
            PrescaledAdditiveResidual(nn.Sequential(AOLConv2D(4, 4, 3, padding=1), MaxMin()),
                                      init_val=0.7),
            nn.Flatten(), OrthoLinear(4 * 6 * 6, 5)),
        "AdditiveResidual": nn.Sequential(
            AdditiveResidual(nn.Sequential(AOLConv2D(4, 4, 3, padding=1), MaxMin()),
                             init_val=0.3),
            nn.Flatten(), OrthoLinear(4 * 6 * 6, 5)),
    }


@pytest.mark.parametrize("name", ["SDPBasedLipschitzResBlock", "SDPBasedLipschitzDense",
                                  "L2NormResidual", "PrescaledAdditiveResidual",
                                  "AdditiveResidual"])
def test_orthogonium_residual_blocks_are_sound_for_claim_one(name):
    model = _orthogonium_residuals()[name]
    rep = _audit(model, (4, 6, 6))
    assert rep.lipschitz_upper <= 1 + 1e-4, rep.reasons
    assert rep.verdict == "sound", rep.reasons


class _NotAdjoint(torch.nn.Module):
    """``x - 2 K2^T D relu(K1 x + b)`` with ``K2 = -K1``: it looks like an SLL block but the
    second map is not the adjoint of the first, so the block *expands* (``I + 2 K^T D K``)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.k = torch.nn.Parameter(torch.randn(4, 4, 3, 3, generator=g) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(F.conv2d(x, self.k, padding=1) + 5.0)  # every unit active
        return (x - 2 * F.conv_transpose2d(h, -self.k, padding=1)).flatten(1)


def test_a_block_that_only_looks_like_sll_is_not_given_the_lemma():
    model = _NotAdjoint().double().eval()
    w = model.k.detach()
    exact = linear_norm(lambda z: z + 2 * F.conv_transpose2d(F.conv2d(z, w, padding=1), w,
                                                              padding=1), (4, 5, 5))
    assert exact > 1.5  # the trap: the lemma would claim max(1, 2 n^2 - 1)
    rep = _audit(model.float(), (4, 5, 5), claim=exact * 1.01)
    assert rep.lipschitz_upper >= exact * (1 - 1e-6)
    assert not any("SDP residual" in (lb.get("method") or "") for lb in rep.layers)
