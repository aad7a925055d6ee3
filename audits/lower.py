"""Attained lower bounds on Lipschitz constants: every number here is a ratio some input pair
(or some linearisation) actually attains, so it is a lower bound by construction.

* :class:`Linearization`, :func:`lanczos`, :func:`top_direction`: the top singular direction
  of a Jacobian by Lanczos on ``J^T J`` (the Krylov acceleration of power iteration); the
  attained ``||J v|| / ||v||`` is a lower bound on the operator norm (never an upper bound).
* whole-map ratios ``||f(a) - f(b)|| / ||a - b||`` over pixel pairs in ``[0, 1]``: by Lanczos
  at data points then a finite difference (:func:`local_power`), by gradient ascent on the
  ratio (:func:`global_ascent`) and by random nearby pairs (:func:`random_pairs`); each is
  recomputed by the float64 evaluator it is given, and callers deflate it by
  ``1 - LOWER_SAFETY``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LOWER_SAFETY", "Linearization", "Krylov", "lanczos", "top_direction",
           "local_power", "global_ascent", "random_pairs", "ratios", "generator",
           "per_sample_norm", "unit"]

LOWER_SAFETY = 1e-7
"""Relative deflation of every reported lower bound: absorbs float64 rounding in the
difference quotients (steps of at least 1e-4 in l2; measured rounding below 1e-9 relative)."""


class Linearization:
    """``J v`` and ``J^T u`` of a batched map ``f`` at ``z``, reusing one autograd graph.

    ``J v`` uses the double-backward identity ``J v = d/du <J^T u, v>``. Samples in a batch are
    independent (eval mode), so a batch of directions gives per-sample products.
    """

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> None:
        self.z = z.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            self.y = f(self.z)
            self.u0 = torch.zeros_like(self.y, requires_grad=True)
            g = None
            if self.y.requires_grad:  # else f does not depend on z (differentiably)
                (g,) = torch.autograd.grad(
                    self.y, self.z, self.u0, create_graph=True, allow_unused=True
                )
        self.g = g

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        if self.g is None or not self.g.requires_grad:
            return torch.zeros_like(self.y)
        (jv,) = torch.autograd.grad(self.g, self.u0, v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(self.y) if jv is None else jv

    def vjp(self, u: torch.Tensor) -> torch.Tensor:
        if not self.y.requires_grad:
            return torch.zeros_like(self.z)
        (w,) = torch.autograd.grad(self.y, self.z, u, retain_graph=True, allow_unused=True)
        return torch.zeros_like(self.z) if w is None else w


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).norm(dim=1)


def _unit(v: torch.Tensor) -> torch.Tensor:
    n = _per_sample_norm(v).clamp_min(1e-300)
    return v / n.view(-1, *([1] * (v.dim() - 1)))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).reshape(a.shape[0], -1).sum(1)


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


@dataclass
class Krylov:
    """Per-sample Lanczos result on a PSD operator ``G``: extreme Ritz values and unit vectors.
    By Cauchy interlacing ``lam_min <= theta_min <= theta_max <= lam_max``."""

    theta_max: torch.Tensor
    y_max: torch.Tensor
    theta_min: torch.Tensor
    y_min: torch.Tensor
    steps: int


def lanczos(
    apply_g: Callable[[torch.Tensor], torch.Tensor],
    v: torch.Tensor,
    iters: int,
    mask: torch.Tensor | None = None,
    rtol: float = 1e-7,
) -> Krylov:
    """Lanczos on the PSD operator ``G`` (e.g. ``J^T J``), batched over samples, with full
    re-orthogonalisation: the Krylov-accelerated power iteration. Runs at most ``iters``
    products and stops when every sample's extreme Ritz values change by less than ``rtol``
    (or its Krylov space is invariant). ``mask`` restricts ``G`` to ``P G P``,
    ``P = diag(mask)``."""
    b = v.shape[0]
    dev = v.device
    q = _unit(v if mask is None else v * mask)
    basis = [q]
    alphas: list[torch.Tensor] = []
    betas: list[torch.Tensor] = []
    steps = torch.zeros(b, dtype=torch.int64)  # valid Lanczos steps per sample
    alive = torch.ones(b, dtype=torch.bool)
    done = torch.zeros(b, dtype=torch.bool)
    prev: list[tuple[float, float] | None] = [None] * b
    ritz: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * b
    for _ in range(max(1, iters)):
        w = apply_g(basis[-1])
        if mask is not None:
            w = w * mask
        if not torch.isfinite(w).all():
            break
        active = alive & ~done
        alphas.append(_dot(w, basis[-1]).to(torch.float64).cpu())
        steps += active.to(torch.int64)
        for _ in range(2):  # classical Gram-Schmidt, twice
            for qq in basis:
                w = w - _bcast(_dot(w, qq), w) * qq
        beta = _per_sample_norm(w).to(torch.float64).cpu()
        scale = torch.stack(alphas).abs().max(0).values.clamp_min(1e-300)
        alive = alive & (beta > 1e-10 * scale)
        betas.append(torch.where(alive, beta, torch.zeros_like(beta)))
        for i in range(b):
            if not active[i]:
                continue
            k = int(steps[i])
            t = torch.diag(_column(alphas, i, k))
            if k > 1:
                off = _column(betas, i, k)[:-1]
                t = t + torch.diag(off, 1) + torch.diag(off, -1)
            evals, evecs = torch.linalg.eigh(t)
            ritz[i] = (evals, evecs)
            cur = (float(evals[-1]), float(evals[0]))
            old = prev[i]
            top = max(abs(cur[0]), 1e-300)
            if old is not None and max(abs(cur[0] - old[0]), abs(cur[1] - old[1])) <= rtol * top:
                done[i] = True
            prev[i] = cur
        if bool((done | ~alive).all()):
            break
        keep = _bcast((alive & ~done).to(torch.float64), w).to(dev)
        basis.append(w / _bcast(torch.where(alive, beta, torch.ones_like(beta)), w).to(dev)
                     * keep)
    zero = torch.zeros(b, dtype=torch.float64)
    tmax, tmin = zero.clone(), zero.clone()
    ymax, ymin = basis[0].clone(), basis[0].clone()
    for i in range(b):
        if ritz[i] is None:
            continue
        evals, evecs = ritz[i]
        k = evals.shape[0]
        stack = torch.stack([basis[j][i] for j in range(k)])  # (k, ...)
        tmax[i], tmin[i] = evals[-1].clamp_min(0), evals[0].clamp_min(0)
        for col, y in ((evecs[:, -1], ymax), (evecs[:, 0], ymin)):
            coef = col.to(stack.dtype).to(dev).reshape(k, *[1] * (stack.dim() - 1))
            y[i] = (stack * coef).sum(0)
    return Krylov(tmax.to(dev), _unit(ymax), tmin.to(dev), _unit(ymin), int(steps.max()))


def _column(values: list[torch.Tensor], i: int, k: int) -> torch.Tensor:
    """The first ``k`` valid entries of sample ``i`` (a sample's entries stop when it stops)."""
    return torch.stack([t[i] for t in values[:k]])


def top_direction(
    lin: Linearization, v: torch.Tensor, iters: int, mask: torch.Tensor | None = None,
    rtol: float = 1e-7,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top right-singular direction estimate of ``J`` per sample (Lanczos on ``J^T J``) and its
    attained ``||J y||`` (``y`` unit): a genuine lower bound on ``||J||``."""
    kry = lanczos(lambda u: lin.vjp(lin.jvp(u)), v, iters, mask=mask, rtol=rtol)
    y = kry.y_max
    return y, _per_sample_norm(lin.jvp(y)).to(torch.float64)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _ratios(
    f: Callable[[torch.Tensor], torch.Tensor], a: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """``||f(a) - f(b)|| / ||a - b||`` per pair, float64 (0 where ``||a - b|| <= 1e-6``, too
    close for a meaningful quotient, or where it is not finite)."""
    with torch.no_grad():
        dtype = next((p.dtype for p in _tensors(f)), a.dtype)
        a, b = a.to(dtype), b.to(dtype)
        num = _per_sample_norm(f(a) - f(b)).to(torch.float64)
        den = _per_sample_norm(a - b).to(torch.float64)
    r = torch.where(den > 1e-6, num / den.clamp_min(1e-300), torch.zeros_like(num))
    return torch.where(torch.isfinite(r), r, torch.zeros_like(r))


def _tensors(f: Callable) -> Iterator[torch.Tensor]:
    owner = getattr(f, "__self__", f)
    if isinstance(owner, nn.Module):
        yield from (t for t in owner.parameters() if t.is_floating_point())
        yield from (t for t in owner.buffers() if t.is_floating_point())


def _local_power(
    f32: Callable, f64: Callable, xs: torch.Tensor, gen: torch.Generator, iters: int
) -> tuple[float, torch.Tensor]:
    """Power iteration on ``J^T J`` at each point (directions kept inside ``[0,1]``), then the
    attained finite-difference ratio in float64 along the best direction."""
    mask = ((xs > 0) & (xs < 1)).to(xs.dtype)
    v0 = torch.randn(xs.shape, generator=gen).to(device=xs.device, dtype=xs.dtype)
    lin = Linearization(f32, xs)
    v, _ = top_direction(lin, v0, iters, mask=mask, rtol=1e-6)
    del lin
    x64 = xs.to(torch.float64)
    v64 = _unit(v.to(torch.float64))
    h = 1e-3  # l2 step: rounding error ~1e-10 relative, far below LOWER_SAFETY
    b = torch.cat([(x64 + h * v64).clamp(0, 1), (x64 - h * v64).clamp(0, 1)])
    r = _ratios(f64, torch.cat([x64, x64]), b).cpu()
    best = torch.maximum(r[: xs.shape[0]], r[xs.shape[0]:])
    return float(best.max()), v.detach()


def _global_ascent(
    f32: Callable, f64: Callable, xs: torch.Tensor, v: torch.Tensor, gen: torch.Generator,
    steps: int,
    max_pairs: int = 2,
    lr: float = 1e-2,
) -> float:
    """Adam ascent on ``log ||f(a) - f(b)|| - log ||a - b||`` over pairs in ``[0, 1]``, started
    at (x, x + 0.1 v) with ``v`` the local top direction (half the pairs) or a random one.
    Runs on the ``max_pairs`` points with the largest local ratio: each step costs a forward and
    a backward pass of two points per pair (about 0.4 s per pair on one core for LipConvNet-5,
    16 channels). Each pair's best ratio (distance > 1e-4) and its final one are recomputed in
    float64."""
    if xs.shape[0] > max_pairs:  # spend the ascent on the points with the largest local ratio
        keep = torch.argsort(_ratios(f32, xs, (xs + 1e-3 * _unit(v)).clamp(0, 1)),
                             descending=True)[:max_pairs].to(xs.device)
        xs, v = xs[keep], v[keep]
    n = xs.shape[0]
    rnd = _unit(torch.randn(xs.shape, generator=gen).to(device=xs.device, dtype=xs.dtype))
    d = torch.where(torch.arange(n, device=xs.device).view(-1, *[1] * (xs.dim() - 1)) % 2 == 0,
                    _unit(v), rnd)
    a = xs.detach().clone()
    b = (xs + 0.1 * d).clamp(0, 1).detach()
    a.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.Adam([a, b], lr=lr)
    best_r = torch.zeros(n, dtype=torch.float64, device=xs.device)
    best_a, best_b = a.detach().clone(), b.detach().clone()
    for _ in range(max(0, steps)):
        out = f32(torch.cat([a, b]))
        num = _per_sample_norm(out[:n] - out[n:])
        den = _per_sample_norm(a - b)
        r = (num / den.clamp_min(1e-12)).detach().to(torch.float64)
        ok = (den.detach() > 1e-4) & torch.isfinite(r) & (r > best_r)
        best_r = torch.where(ok, r, best_r)
        best_a[ok], best_b[ok] = a.detach()[ok], b.detach()[ok]
        loss = -(torch.log(num.clamp_min(1e-30)) - torch.log(den.clamp_min(1e-30))).sum()
        a.grad, b.grad = torch.autograd.grad(loss, [a, b])  # inputs only: no weight grads
        opt.step()
        with torch.no_grad():
            a.clamp_(0, 1)
            b.clamp_(0, 1)
    final = _ratios(f64, a.detach(), b.detach())
    kept = _ratios(f64, best_a, best_b)
    return float(torch.maximum(final, kept).max())


def _random_pairs(
    f32: Callable, f64: Callable, xs: torch.Tensor, gen: torch.Generator, keep: int = 8
) -> float:
    """Random nearby pairs (l2 radii 1e-3 .. 1, clamped to [0,1]) and pairs of data points,
    screened in the working dtype; the best ``keep`` are recomputed in float64."""
    a_list, b_list = [], []
    for r in (1e-3, 1e-2, 1e-1, 1.0):
        d = _unit(torch.randn(xs.shape, generator=gen).to(device=xs.device, dtype=xs.dtype))
        a_list.append(xs)
        b_list.append((xs + r * d).clamp(0, 1))
    if xs.shape[0] > 1:
        a_list.append(xs)
        b_list.append(xs.roll(1, 0))
    a, b = torch.cat(a_list), torch.cat(b_list)
    r32 = torch.cat([_ratios(f32, a[i:i + 64], b[i:i + 64]) for i in range(0, a.shape[0], 64)])
    idx = torch.argsort(r32, descending=True)[:keep]
    return float(_ratios(f64, a[idx], b[idx]).max()) if idx.numel() else 0.0


generator = _generator
ratios = _ratios
local_power = _local_power
global_ascent = _global_ascent
random_pairs = _random_pairs
per_sample_norm = _per_sample_norm
unit = _unit
