"""Numerical operator bounds: guaranteed upper bounds on the l2 norm of linear operators.

Everything here is float64 and returns an upper bound on an operator norm in exact
arithmetic, before the ``1 + SAFETY`` margin that :func:`inflate` applies:

* :func:`dense_spectral_norm`: the exact norm of a dense matrix (Gram eigenvalues);
  :func:`linear_norm` materialises any linear map on the identity basis first.
* :func:`conv_frequency_norm`: the exact norm of a circular convolution on a grid,
  ``max_w ||W_hat(w)||`` over its frequencies.
* :func:`strided_conv_norm`: any 2-D convolution (stride, dilation, groups, zero or circular
  padding; a transposed convolution is bounded by its adjoint). A stride-``s`` convolution is
  rewritten exactly as a stride-1 convolution of the ``s x s`` polyphase components of the
  input (``y[i] = sum_r sum_a K[s a + r] x_r[i + a]``), whose norm on the circular grid is the
  per-frequency SVD. Zero padding embeds the input in the circular grid
  ``N >= n + k_eff - 1`` (rounded up to a multiple of ``s``): every output of the zero-padded
  convolution is an output of that circular one (or zero), so its norm is a bound; circular
  padding with ``s | n`` is exact.
* :func:`schur_bound`: ``||A|| <= sqrt(||A||_1 ||A||_inf)`` for a linear map with
  nonnegative entries, from ``A 1`` and ``A^T 1`` (exact for gathers, where it is
  ``sqrt(max multiplicity)``, and for disjoint average pooling).
* :func:`window_multiplicity`: the most pooling windows that share an input (max pooling is
  ``sqrt`` of it).
* :func:`soc_series_bound`: the truncated exponential series of a skew-symmetric filter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from lipverify.norms import (
    conv_frequency_matrices,
    conv_frequency_norm,
    frequency_singular_values,
)

__all__ = [
    "SAFETY", "inflate", "materialise", "dense_spectral_norm", "linear_norm",
    "conv_frequency_matrices", "conv_frequency_norm", "frequency_singular_values",
    "soc_series_bound", "conv_matrix", "strided_conv_norm", "schur_bound",
    "window_multiplicity", "adaptive_multiplicity",
]

SAFETY = 1e-6
"""Relative float-safety margin applied to every computed upper bound."""


def _inflate(value: float) -> float:
    """Apply the safety margin; NaN and overflow become ``inf`` (never a small bound)."""
    value = float(value)
    if not math.isfinite(value):
        return math.inf
    return value * (1.0 + SAFETY)


def _numel(shape: Sequence[int]) -> int:
    return int(math.prod(int(s) for s in shape))


def materialise(
    op: Callable[[torch.Tensor], torch.Tensor],
    input_shape: Sequence[int],
    device: torch.device | str = "cpu",
    chunk: int = 256,
) -> torch.Tensor:
    """Dense float64 matrix (out_dim, in_dim) of the linear ``op`` on ``input_shape`` (per sample),
    built by applying ``op`` to the identity basis in chunks."""
    n = _numel(input_shape)
    rows = []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        e = torch.zeros(m, n, dtype=torch.float64, device=device)
        e[torch.arange(m), start + torch.arange(m)] = 1.0
        out = op(e.view(m, *input_shape))
        if out.shape[0] != m:
            raise ValueError("the map does not keep one output row per input sample")
        rows.append(out.reshape(m, -1))
    return torch.cat(rows).T


def _gram_eigenvalues(j: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the smaller Gram matrix of ``j``: the squared singular values (all
    ``min(out, in)`` of them, zeros included)."""
    g = j.T @ j if j.shape[1] <= j.shape[0] else j @ j.T
    return torch.linalg.eigvalsh(g)


def dense_spectral_norm(j: torch.Tensor) -> float:
    """Spectral norm of a dense float64 matrix (``inf`` if it is not finite)."""
    if j.numel() == 0:
        return 0.0
    if not torch.isfinite(j).all():
        return math.inf
    return math.sqrt(max(float(_gram_eigenvalues(j).max()), 0.0))


def _exp_partial(a: float, terms: int) -> float:
    """``sum_{i<=terms} a^i / i!`` (float64; ``inf`` on overflow)."""
    total, term = 1.0, 1.0
    for i in range(1, terms + 1):
        term = term * a / i
        total += term
    return total if math.isfinite(total) else math.inf


def _exp_tail(a: float, terms: int) -> float:
    """``sum_{i>terms} a^i / i!`` (float64; ``inf`` when ``e^a`` overflows)."""
    if a <= 0.0:
        return 0.0
    if a > 700.0:
        return math.inf
    term = math.exp((terms + 1) * math.log(a) - math.lgamma(terms + 2))
    total, i = 0.0, terms + 1
    while term > 0.0 and (term > 1e-18 * total or i <= 2 * a):
        total += term
        i += 1
        term = term * a / i
    return total


def soc_series_bound(a: float, terms: int, skew: bool = True) -> float:
    """Upper bound on ``||sum_{i<=T} A^i / i!||`` given ``||A|| <= a`` (not inflated).

    With ``A`` skew-symmetric, ``exp(A)`` is orthogonal and the truncated series differs from
    it by the tail: ``<= 1 + sum_{i>T} a^i/i!``. The triangle inequality gives
    ``sum_{i<=T} a^i/i!`` without skewness. Returns the smaller valid one.
    """
    if not math.isfinite(a):
        return math.inf
    partial = _exp_partial(a, terms)
    return min(1.0 + _exp_tail(a, terms), partial) if skew else partial


def conv_matrix(filt: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Dense float64 matrix (cout*n*m, cin*n*m) of the stride-1 cross-correlation with ``filt``
    (cout, cin, kh, kw), odd kernel, zero padding ``k // 2``, on an ``n x m`` grid, in NCHW
    flattening order: ``sum_taps kron(filt[:, :, i, j], shift_i (x) shift_j)``."""
    filt = filt.to(torch.float64)
    kh, kw = filt.shape[-2:]
    dev = filt.device

    def shift(size: int, d: int) -> torch.Tensor:  # S[p, p + d] = 1
        if abs(d) >= size:
            return torch.zeros(size, size, dtype=torch.float64, device=dev)
        return torch.diag(torch.ones(size - abs(d), dtype=torch.float64, device=dev), d)

    mat = None
    for i in range(kh):
        for j in range(kw):
            s = torch.kron(shift(n, i - kh // 2), shift(m, j - kw // 2))
            term = torch.kron(filt[:, :, i, j], s)
            mat = term if mat is None else mat + term
    return mat


inflate = _inflate


def linear_norm(op: Callable[[torch.Tensor], torch.Tensor], input_shape: Sequence[int],
                device: torch.device | str = "cpu") -> float:
    """Exact norm of the float64 linear map ``op`` on per-sample ``input_shape``."""
    with torch.no_grad():
        return dense_spectral_norm(materialise(op, input_shape, device))


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[-1]))


def _polyphase(weight: torch.Tensor, stride: tuple[int, int], dilation: tuple[int, int],
               shift: tuple[int, int]) -> torch.Tensor:
    """Kernel (..., O, I*sh*sw, a, b) of the stride-1 correlation on the polyphase components
    that equals the stride-``s`` correlation with ``weight`` whose taps sit at
    ``dilation * t - shift`` (up to a unitary shift of the components)."""
    w = weight.to(torch.float64)
    *lead, kh, kw = w.shape
    (sh, sw), (dh, dw) = stride, dilation
    keh, kew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    oh, ow = (-shift[0]) % sh, (-shift[1]) % sw
    ah, aw = -(-(keh + oh) // sh), -(-(kew + ow) // sw)
    full = torch.zeros(*lead, ah * sh, aw * sw, dtype=torch.float64, device=w.device)
    full[..., oh:oh + keh:dh, ow:ow + kew:dw] = w
    o, i = lead[-2], lead[-1]
    full = full.reshape(-1, o, i, ah, sh, aw, sw).permute(0, 1, 2, 4, 6, 3, 5)
    return full.reshape(*lead[:-1], i * sh * sw, ah, aw)


def strided_conv_norm(
    weight: torch.Tensor, grid: tuple[int, int], *, stride: Sequence[int] | int = 1,
    padding: Sequence[int] | int = 0, dilation: Sequence[int] | int = 1, groups: int = 1,
    circular: bool = False,
) -> tuple[float, str]:
    """Upper bound on the norm of the 2-D cross-correlation with ``weight`` (O, I/groups, kh,
    kw) on inputs of spatial size ``grid``, and the method (not inflated). ``circular``: the
    input is circularly padded by ``padding`` (exact when the stride divides the grid);
    otherwise zero padding."""
    s, p, d = _pair(stride), _pair(padding), _pair(dilation)
    w = weight.detach().to(torch.float64)
    if not torch.isfinite(w).all():
        return math.inf, "conv: the filter is not finite"
    o = w.shape[0]
    blocks = w.reshape(groups, o // groups, *w.shape[1:])
    k_eff = [d[i] * (w.shape[2 + i] - 1) + 1 for i in range(2)]
    outs = [(int(grid[i]) + 2 * p[i] - k_eff[i]) // s[i] + 1 for i in range(2)]
    if circular and all(outs[i] * s[i] == int(grid[i]) for i in range(2)):
        n = (int(grid[0]), int(grid[1]))  # one period of outputs: exact
        how = f"exact: per-frequency SVD of the circular conv on the {n[0]}x{n[1]} grid"
    elif circular:  # the circular padding is a gather (sqrt of its multiplicity), then a conv
        mult = math.prod(-(-(int(grid[i]) + 2 * p[i]) // int(grid[i])) for i in range(2))
        padded = (int(grid[0]) + 2 * p[0], int(grid[1]) + 2 * p[1])
        bound, how = strided_conv_norm(weight, padded, stride=s, padding=0, dilation=d,
                                       groups=groups)
        return math.sqrt(mult) * bound, (
            f"upper: sqrt({mult}) for the circular padding (each input copied at most {mult} "
            f"times) x {how}")
    else:
        n = tuple(-(-(int(grid[i]) + k_eff[i] - 1) // s[i]) * s[i] for i in range(2))
        how = (f"conv-fft: per-frequency SVD on the {n[0]}x{n[1]} grid that embeds the "
               "zero-padded conv")
    poly = _polyphase(blocks, s, d, p)
    small = (n[0] // s[0], n[1] // s[1])
    bound = conv_frequency_norm(poly, small)
    if s != (1, 1):
        how += f" (stride {s[0]}x{s[1]} as {s[0] * s[1]} polyphase components)"
    return bound, how


def schur_bound(op: Callable[[torch.Tensor], torch.Tensor], input_shape: Sequence[int],
                device: torch.device | str = "cpu") -> float:
    """``sqrt(max(A 1) * max(A^T 1))`` for the float64 linear map ``op`` whose matrix has
    nonnegative entries (the caller guarantees it): an upper bound on its norm (Schur test).
    ``op`` is applied to one tensor of exactly ``input_shape``."""
    x = torch.ones(*input_shape, dtype=torch.float64, device=device, requires_grad=True)
    with torch.enable_grad():
        y = op(x)
        (cols,) = torch.autograd.grad(y, x, torch.ones_like(y))
    rows = y.detach()
    if rows.numel() == 0:
        return 0.0
    r, c = float(rows.abs().max()), float(cols.abs().max())
    return math.sqrt(r * c) if math.isfinite(r * c) else math.inf


def window_multiplicity(size: Sequence[int], out: Sequence[int], kernel: Sequence[int],
                        stride: Sequence[int], padding: Sequence[int],
                        dilation: Sequence[int]) -> int:
    """The most windows (one per output position, per dimension product) that contain one
    input position: counted exactly, dimension by dimension."""
    total = 1
    for n, o, k, s, p, d in zip(size, out, kernel, stride, padding, dilation, strict=True):
        count = [0] * int(n)
        for j in range(int(o)):
            for t in range(int(k)):
                i = j * s - p + t * d
                if 0 <= i < n:
                    count[i] += 1
        total *= max(count) if count else 0
    return total


def adaptive_multiplicity(size: Sequence[int], out: Sequence[int]) -> int:
    """The same for adaptive pooling windows ``[floor(i n / o), ceil((i + 1) n / o))``."""
    total = 1
    for n, o in zip(size, out, strict=True):
        count = [0] * int(n)
        for j in range(int(o)):
            for i in range((j * n) // o, -(-((j + 1) * n) // o)):
                count[i] += 1
        total *= max(count) if count else 0
    return total
