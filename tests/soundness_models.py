"""Small models built to fool an auditor (issue 12), importable by tests and by the CLI
(``--model soundness_models:FACTORY``; pytest's ``pythonpath`` holds ``tests``).

Every model takes pixels (N, C, H, W) in [0, 1]. Their exact Lipschitz constants are known in
closed form or from a float64 Jacobian SVD (:func:`jacobian_norm`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def orthonormal(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A ``rows x cols`` matrix with orthonormal rows (rows <= cols) or columns."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=g,
                                       dtype=torch.float64))
    return (q if rows >= cols else q.T).float()


def linear(w: torch.Tensor, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias:
            lin.bias.zero_()
    return lin


def jacobian_norm(model: nn.Module, x: torch.Tensor) -> float:
    """Largest spectral norm of the float64 Jacobian of ``model`` at the points ``x``."""
    m64 = copy.deepcopy(model).double().eval()
    best = 0.0
    for xi in x.double():
        j = torch.autograd.functional.jacobian(lambda z: m64(z[None])[0], xi)
        j = j.reshape(-1, xi.numel())
        best = max(best, float(torch.linalg.matrix_norm(j, ord=2)))
    return best


def reused_linear() -> nn.Module:
    """CIFAR-sized: one ``2 x orthogonal`` layer applied twice (true L = 4 on the logits);
    a per-module product that bounds it once says 2."""
    torch.manual_seed(0)
    mid = linear(2 * orthonormal(16, 16, 1))
    return nn.Sequential(nn.Flatten(), linear(orthonormal(16, 3 * 32 * 32, 0)), mid, mid,
                         linear(orthonormal(4, 16, 2))).eval()


class LLNGeneric(nn.Module):
    """A generic model that declares LLN certificates: ``features`` then a linear head with
    unit rows. The claim covers the features, so the LLN formula applies."""

    certificate_kind = "lln"

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), linear(3 * orthonormal(8, 3 * 32 * 32, 3)))
        w = torch.randn(4, 8, generator=torch.Generator().manual_seed(4))
        self.last_layer = linear(w / w.norm(dim=1, keepdim=True))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.features(x))


def lln_generic() -> nn.Module:
    return LLNGeneric().eval()
