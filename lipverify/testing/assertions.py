"""Assertions behind :mod:`lipverify.testing` (see there for the guarantees)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "LipschitzAssertionError",
    "assert_gradient_norm_preserving",
    "assert_lipschitz",
    "assert_certificates_sound",
]


class LipschitzAssertionError(AssertionError):
    """An assertion failure carrying the worst ratio and the input behind it."""

    def __init__(self, message: str, ratio: float, index: int, input: torch.Tensor) -> None:
        super().__init__(message)
        self.ratio, self.index, self.input = ratio, index, input


def _float64(fn: Callable | nn.Module) -> Callable:
    if isinstance(fn, nn.Module):
        return copy.deepcopy(fn).double().eval()
    return fn


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


def assert_gradient_norm_preserving(
    layer: Callable | nn.Module, x: torch.Tensor, tol: float = 1e-4, probes: int = 4,
    seed: int = 0,
) -> float:
    """Check ``||J v|| = ||v||`` and ``||J^T g|| = ||g||`` per sample for random ``v``, ``g``.

    Runs in float64 on a copy of the layer. Returns the worst relative deviation.
    """
    f = _float64(layer)
    x = x.detach().double()
    g = torch.Generator().manual_seed(seed)
    worst, worst_i = 0.0, 0
    for _ in range(probes):
        v = torch.randn(x.shape, generator=g, dtype=torch.float64)
        out, jv = torch.func.jvp(f, (x,), (v,))
        u = torch.randn(out.shape, generator=g, dtype=torch.float64)
        _, vjp = torch.func.vjp(f, x)
        (jtu,) = vjp(u)
        for got, ref in ((jv, v), (jtu, u)):
            dev = (_per_sample_norm(got) / _per_sample_norm(ref) - 1).abs().detach()
            i = int(dev.argmax())
            if float(dev[i]) > worst:
                worst, worst_i = float(dev[i]), i
    if worst > tol:
        raise LipschitzAssertionError(
            f"not gradient-norm preserving: worst |ratio - 1| = {worst:.3g} > {tol:g} "
            f"(ratio {1 + worst:.6g} or {1 - worst:.6g}) at input index {worst_i}",
            1 + worst, worst_i, x[worst_i].float(),
        )
    return worst


def assert_lipschitz(
    layer: Callable | nn.Module, bound: float, x: torch.Tensor, tol: float = 1e-6,
    pairs: int = 8, steps: int = 20, scale: float = 1e-2, seed: int = 0,
) -> float:
    """Search for ``||f(a) - f(b)|| > bound * ||a - b|| * (1 + tol)`` near the points ``x``.

    Random pairs plus ``steps`` of power iteration on ``J^T J`` at each point. Returns the worst
    attained ratio divided by ``bound``.
    """
    f = _float64(layer)
    x = x.detach().double()
    g = torch.Generator().manual_seed(seed)
    ratios = torch.zeros(x.shape[0], dtype=torch.float64)
    with torch.no_grad():
        fx = f(x)
        for _ in range(pairs):
            d = torch.randn(x.shape, generator=g, dtype=torch.float64) * scale
            r = _per_sample_norm(f(x + d) - fx) / _per_sample_norm(d)
            ratios = torch.maximum(ratios, r)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    for _ in range(steps):
        _, jv = torch.func.jvp(f, (x,), (v,))
        ratios = torch.maximum(ratios, _per_sample_norm(jv) / _per_sample_norm(v))
        _, vjp = torch.func.vjp(f, x)
        (v,) = vjp(jv)
        v = v / _per_sample_norm(v).clamp_min(1e-300).view(-1, *[1] * (x.dim() - 1))
    rel = ratios / bound
    i = int(rel.argmax())
    if float(rel[i]) > 1 + tol:
        raise LipschitzAssertionError(
            f"Lipschitz bound {bound:g} exceeded: worst ratio / bound = {float(rel[i]):.6g} "
            f"(> 1 + {tol:g}) at input index {i}", float(rel[i]), i, x[i].float(),
        )
    return float(rel.max())


def assert_certificates_sound(
    model: nn.Module, x: torch.Tensor, lipschitz: float | None = None, steps: int = 20,
    restarts: int = 2, tol: float = 1e-3, seed: int = 0,
) -> float:
    """Search inside each certified radius for a changed prediction (PGD on the margin plus
    random directions). Returns the smallest distance/radius ratio of any flip found (inf
    if none); fails when a flip lies closer than ``radius * (1 - tol)``."""
    from lipverify.certificates import certify

    cert = certify(model, x, lipschitz)
    f = _float64(model)
    x64 = x.detach().double()
    rad = cert.radius.double()
    pred = cert.pred
    g = torch.Generator().manual_seed(seed)
    best = torch.full((x.shape[0],), float("inf"), dtype=torch.float64)
    shape = (-1, *[1] * (x.dim() - 1))
    eps = (rad * (1 - tol)).view(shape)
    for _ in range(restarts):
        d = torch.randn(x64.shape, generator=g, dtype=torch.float64)
        d = d / _per_sample_norm(d).view(shape) * eps * 0.5
        for _ in range(steps):
            d.requires_grad_(True)
            logits = f((x64 + d).clamp(0, 1))
            top = logits.gather(1, pred[:, None])[:, 0]
            other = logits.scatter(1, pred[:, None], float("-inf")).max(1).values
            (grad,) = torch.autograd.grad((top - other).sum(), d)
            with torch.no_grad():
                step = grad / _per_sample_norm(grad).clamp_min(1e-300).view(shape)
                d = d - 0.25 * eps * step
                n = _per_sample_norm(d).view(shape)
                d = d * torch.clamp(eps / n.clamp_min(1e-300), max=1.0)
                xa = (x64 + d).clamp(0, 1)
                flipped = f(xa).argmax(1) != pred
                dist = _per_sample_norm(xa - x64)
                ok = flipped & (rad > 0)
                best = torch.where(ok, torch.minimum(best, dist / rad), best)
    i = int(best.argmin())
    if float(best[i]) < 1 - tol:
        raise LipschitzAssertionError(
            f"certificate violated: prediction flips at distance/radius = {float(best[i]):.6g} "
            f"(< 1 - {tol:g}) at input index {i}", float(best[i]), i, x[i].detach(),
        )
    return float(best.min())
