"""Gradient-norm-preserving activations on channel pairs (Singla, Singla & Feizi, ICLR 2022).

Each activation splits the channels into halves ``x`` (first) and ``y`` (second) and maps every
pair ``(x_c, y_c)`` by a continuous piecewise-orthogonal 2x2 map. Guarantee: the Jacobian is
orthogonal wherever it exists, so each layer is exactly 1-Lipschitz (tolerance 0, up to float
rounding).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["MaxMin", "HouseholderOrder1", "HouseholderOrder2", "make_activation"]


def _halves(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if z.shape[1] % 2:
        raise ValueError(f"pair activations need an even channel count, got {z.shape[1]}")
    return z.split(z.shape[1] // 2, dim=1)


def _reflect(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Householder reflection of (x, y) across the line at angle t/2."""
    return x * torch.cos(t) + y * torch.sin(t), x * torch.sin(t) - y * torch.cos(t)


class MaxMin(nn.Module):
    """``(max(x, y), min(x, y))``: GroupSort with groups of two."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x, y = _halves(z)
        return torch.cat([torch.maximum(x, y), torch.minimum(x, y)], dim=1)


class HouseholderOrder1(nn.Module):
    """HH1 (Eq. 9): reflect a pair with ``v = (sin(t/2), -cos(t/2))`` when ``v . (x, y) > 0``.

    ``theta`` has shape (1, C/2, 1, 1). At ``theta = pi/2`` it computes ``(min, max)``.
    """

    def __init__(self, channels: int, theta: float | None = None) -> None:
        super().__init__()
        if theta is None:
            theta = math.pi / 2
        self.theta = nn.Parameter(torch.full((1, channels // 2, 1, 1), float(theta)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x, y = _halves(z)
        t = self.theta
        flip = (x * torch.sin(0.5 * t) - y * torch.cos(0.5 * t)) > 0
        a, b = _reflect(x, y, t)
        return torch.cat([torch.where(flip, a, x), torch.where(flip, b, y)], dim=1)


class HouseholderOrder2(nn.Module):
    """HH2 (Sec. 4.2): four sectors of the angle ``phi = atan2(y, x) - theta0/2``:
    identity, reflection at ``theta0 + theta1``, rotation by ``-theta2``, reflection at
    ``theta0``. Angles are clamped to [0, 2 pi]; one set of three angles per channel pair.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        g = channels // 2
        self.theta0 = nn.Parameter(math.pi * torch.rand(g))
        self.theta1 = nn.Parameter(math.pi * torch.rand(g))
        self.theta2 = nn.Parameter(math.pi * torch.rand(g))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x, y = _halves(z)
        two_pi = 2 * math.pi

        def angle(p: torch.Tensor) -> torch.Tensor:
            return torch.clamp(p.view(1, -1, 1, 1), 0.0, two_pi)

        t0, t1, t2 = angle(self.theta0), angle(self.theta1), angle(self.theta2)
        phi = (torch.atan2(y, x) - 0.5 * t0) % two_pi
        a1, a2, a3 = 0.5 * t1, 0.5 * (t1 + t2), math.pi + 0.5 * t2
        s2 = (phi >= a1) & (phi < a2)
        s3 = (phi >= a2) & (phi < a3)
        s4 = (phi >= a3) & (phi < two_pi)
        r2, r3, r4 = _reflect(x, y, t0 + t1), (
            x * torch.cos(t2) + y * torch.sin(t2),
            -x * torch.sin(t2) + y * torch.cos(t2),
        ), _reflect(x, y, t0)
        a = torch.where(s2, r2[0], torch.where(s3, r3[0], torch.where(s4, r4[0], x)))
        b = torch.where(s2, r2[1], torch.where(s3, r3[1], torch.where(s4, r4[1], y)))
        return torch.cat([a, b], dim=1)


def make_activation(name: str, channels: int) -> nn.Module:
    """Build ``maxmin``, ``hh1`` or ``hh2`` for ``channels`` channels."""
    if name == "maxmin":
        return MaxMin()
    if name == "hh1":
        return HouseholderOrder1(channels)
    if name == "hh2":
        return HouseholderOrder2(channels)
    raise ValueError(f"unknown activation {name!r}; choose maxmin, hh1 or hh2")
