"""Small models shared by the attack and audit tests (importable: pytest's ``pythonpath``).

* :func:`linear_model`: flatten, then a linear map with orthonormal rows times ``scale`` (its
  Lipschitz constant is exactly ``scale``), zero bias, eval mode.
* :class:`Rounding`: quantises its input to 8 bits before ``net``: piecewise constant, so its
  gradients are zero and it is not Lipschitz (the negative control for sanity flags).
"""

from __future__ import annotations

import torch
from torch import nn


def linear_model(c: int, s: int, k: int, scale: float = 1.0, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    d = c * s * s
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    lin = nn.Linear(d, k)
    with torch.no_grad():
        lin.weight.copy_(q.T * scale)
        lin.bias.zero_()
    return nn.Sequential(nn.Flatten(), lin).eval()


def batch(n: int, c: int, s: int, seed: int = 1) -> torch.Tensor:
    """``n`` images of ``c`` x ``s`` x ``s`` pixels in [0.25, 0.75] (room for attacks)."""
    g = torch.Generator().manual_seed(seed)
    return 0.25 + 0.5 * torch.rand(n, c, s, s, generator=g)


class Rounding(nn.Module):
    """Quantises its input to 8 bits, then ``net``: piecewise constant (zero gradients)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.round(x * 255) / 255)
