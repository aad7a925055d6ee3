"""Exact norms of circular convolutions, per frequency (float64).

Guarantee: :func:`conv_frequency_norm` is the exact l2 norm of the circular convolution on
its grid (a Hermitian eigensolver per frequency, float64); a zero-padded convolution on an
``n x m`` image is a compression of the circular one on any grid of at least
``(n + k - 1, m + k - 1)``, so that norm bounds it. Used by the audit
(:mod:`lipverify.audits.operators`) and the float32 execution bounds
(:mod:`lipverify.execution`); callers add their own safety margin.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

__all__ = ["conv_frequency_matrices", "conv_frequency_norm", "frequency_singular_values"]


def conv_frequency_matrices(
    weight: torch.Tensor, grid: tuple[int, int], dilation: tuple[int, int] = (1, 1)
) -> Iterator[torch.Tensor]:
    """Per-frequency matrices ``W_hat(u, v)`` (..., rows, n_v, cout, cin), complex128, of the
    circular cross-correlation with real filter ``weight`` (..., cout, cin, kh, kw) on ``grid``
    (taps at multiples of ``dilation``, wrapped modulo the grid), in chunks of frequency rows.
    Only ``v <= n_w // 2`` is produced: ``W_hat(-w) = conj(W_hat(w))`` has the same singular
    values. The cross-correlation's matrices are the complex conjugates of these up to a
    unit phase, so the singular values are the same."""
    w = weight.detach().to(torch.float64)
    nh, nw = int(grid[0]), int(grid[1])
    kh, kw = w.shape[-2:]
    dev = w.device

    def phases(n: int, k: int, d: int, freqs: int) -> torch.Tensor:
        u = torch.arange(freqs, dtype=torch.int64, device=dev)[:, None]
        i = torch.arange(k, dtype=torch.int64, device=dev)[None, :] * d
        ang = (-2.0 * math.pi / n) * ((u * i) % n).to(torch.float64)
        return torch.polar(torch.ones_like(ang), ang)

    eh = phases(nh, kh, dilation[0], nh)
    ew = phases(nw, kw, dilation[1], nw // 2 + 1)
    wc = w.to(torch.complex128)
    per_row = 16 * (nw // 2 + 1) * max(1, w[..., 0, 0].numel())
    rows = max(1, (1 << 27) // per_row)
    for start in range(0, nh, rows):
        yield torch.einsum("...ocij,ui,vj->...uvoc", wc, eh[start:start + rows], ew)


def conv_frequency_norm(
    weight: torch.Tensor, grid: tuple[int, int], dilation: tuple[int, int] = (1, 1)
) -> float:
    """``max_w ||W_hat(w)||_2`` over the frequencies of the circular ``grid``: the exact norm of
    the circular convolution with real filter ``weight`` (..., cout, cin, kh, kw) on that grid.
    Leading dimensions are independent blocks (e.g. groups); the maximum is over them too.
    Float64, exact (Hermitian eigensolver) per frequency; ``inf`` for a non-finite filter."""
    if not torch.isfinite(weight).all():
        return math.inf
    return max(float(frequency_singular_values(m).max())
               for m in conv_frequency_matrices(weight, grid, dilation))


def frequency_singular_values(mats: torch.Tensor) -> torch.Tensor:
    """All ``min(rows, cols)`` singular values of a batch of (complex) matrices, float64, from
    the eigenvalues of the smaller Gram matrix (Hermitian eigensolver)."""
    mats = mats.to(torch.complex128 if mats.is_complex() else torch.float64)
    if mats.shape[-1] <= mats.shape[-2]:
        g = mats.mH @ mats
    else:
        g = mats @ mats.mH
    return torch.linalg.eigvalsh(g).clamp_min(0).sqrt()
