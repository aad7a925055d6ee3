"""The field's 1-Lipschitz families, re-implemented from the papers' equations (our own code),
each with its authors' claim and a realistically broken variant (issue 14).

* LiResNet-style linear residual (Hu et al., ICLR 2023): ``y = (x + K x) / s``, ``s`` a
  power-iteration estimate of ``||I + K||``.
* SLL (Araujo et al., ICLR 2023, Thm. 3): ``y = x - 2 W^T T relu(W x + b)``,
  ``T = diag(sum_j |W W^T|_ij q_j / q_i)^-1``.
* CPL (Meunier et al., ICML 2022): ``y = x - (2 / s^2) W^T relu(W x + b)``, ``s`` a
  power-iteration estimate of ``||W||``.
* AOL (Prach & Lampert, ECCV 2022): ``W diag(sum_j |W^T W|_ij)^-1/2``.

Every builder is seeded; the broken variants exceed their claim of 1 by 2-10%.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def power_iteration(op, adj, shape, iters: int, seed: int = 0) -> float:
    """``||A v|| / ||v||`` after ``iters`` steps on ``A^T A`` (a lower estimate of ``||A||``,
    as the papers' training code computes it)."""
    v = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for _ in range(iters):
        v = adj(op(v))
        v = v / v.norm()
    return float(op(v).norm() / v.norm())


def exact_head(n_in: int, n_out: int, seed: int, scale: float = 1.0) -> nn.Linear:
    """A linear head divided by its exact spectral norm (times ``scale``); orthogonal when
    square, so it passes on the Lipschitz constant of what comes before it exactly."""
    head = nn.Linear(n_in, n_out)
    with torch.no_grad():
        w = torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(seed))
        if n_in == n_out:
            w = torch.linalg.qr(w.double())[0].float()
        head.weight.copy_(scale * w / torch.linalg.matrix_norm(w.double(), 2).float())
    return head


class LiResBlock(nn.Module):
    def __init__(self, c: int, n: int, seed: int, iters: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(0.3 * torch.randn(self.conv.weight.shape, generator=gen))
        w = self.conv.weight.detach().double()

        def op(z):
            return z + F.conv2d(z, w, padding=1)

        def adj(z):
            return z + F.conv_transpose2d(z, w, padding=1)

        self.register_buffer("scale", torch.tensor(power_iteration(op, adj, (1, c, n, n),
                                                                     iters, seed)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.conv(x)) / self.scale


def liresnet(iters: int = 200, c: int = 4, n: int = 6, blocks: int = 3,
             classes: int = 5) -> nn.Module:
    """Linear residual blocks then a head; ``liresnet(iters=4, blocks=1, classes=144)`` is the
    broken variant: a stale power iteration (4 steps) under-estimates ``||I + K||`` by 5%."""
    body = [LiResBlock(c, n, 10 + i, iters) for i in range(blocks)]
    return nn.Sequential(*body, nn.Flatten(), exact_head(c * n * n, classes, 7))


class SLLDense(nn.Module):
    def __init__(self, d: int, inner: int, seed: int, bias: float) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(inner, d, generator=gen) / d ** 0.5)
        self.bias = nn.Parameter(torch.full((inner,), float(bias)))
        self.q = nn.Parameter(torch.randn(inner, generator=gen) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.exp(self.q)
        t = 1.0 / (torch.abs(self.weight @ self.weight.T) * q[None, :] / q[:, None]).sum(1)
        return x - 2 * F.linear(t * F.relu(F.linear(x, self.weight, self.bias)),
                                self.weight.T)


def sll(head_scale: float = 1.0, bias: float = 0.5, d: int = 48) -> nn.Module:
    return nn.Sequential(nn.Flatten(), SLLDense(d, 64, 1, bias), SLLDense(d, 64, 2, bias),
                         exact_head(d, 5, 3, head_scale))


class CPLDense(nn.Module):
    def __init__(self, d: int, inner: int, seed: int, iters: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(inner, d, generator=gen) / d ** 0.5)
        self.bias = nn.Parameter(torch.full((inner,), 5.0))  # every unit active on [0,1]^d
        w = self.weight.detach().double()
        self.register_buffer("sigma", torch.tensor(power_iteration(
            lambda z: z @ w.T, lambda z: z @ w, (1, d), iters, seed)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - (2 / self.sigma ** 2) * F.linear(
            F.relu(F.linear(x, self.weight, self.bias)), self.weight.T)


def cpl(iters: int = 500, d: int = 48, blocks: int = 2, classes: int = 5) -> nn.Module:
    """``cpl(iters=12, blocks=1, classes=48)`` is the broken variant: an unconverged power
    iteration gives ``2 (||W|| / s)^2 - 1 = 1.064``."""
    body = [CPLDense(d, d, 11 + i, iters) for i in range(blocks)]
    return nn.Sequential(nn.Flatten(), *body, exact_head(d, classes, 13))


def aol_rescale(w: torch.Tensor) -> torch.Tensor:
    """``W diag(sum_j |W^T W|_ij)^-1/2``: ``||.|| <= 1`` (Prach & Lampert, Thm. 1)."""
    return w * torch.abs(w.T @ w).sum(1).rsqrt()[None, :]


class AOLDense(nn.Module):
    def __init__(self, d: int, seed: int, normalise: bool = True, scale: float = 1.0,
                 orthogonal: bool = False) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(d, d, generator=gen)
        if orthogonal:
            w = torch.linalg.qr(w)[0]
        self.weight = nn.Parameter(scale * w)
        self.bias = nn.Parameter(torch.zeros(d))
        self.normalise = normalise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = aol_rescale(self.weight) if self.normalise else self.weight
        return F.linear(x, w, self.bias)


class MaxMinPairs(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


def aol(broken: bool = False, d: int = 48) -> nn.Module:
    """Random AOL layers; broken: the last layer (orthogonal x 1.05) skips its rescaling."""
    return nn.Sequential(nn.Flatten(), AOLDense(d, 21, orthogonal=broken), MaxMinPairs(),
                         AOLDense(d, 22, orthogonal=broken), MaxMinPairs(),
                         AOLDense(d, 23, normalise=not broken, scale=1.05, orthogonal=True))
