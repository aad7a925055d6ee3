"""Cayley orthogonal convolution and linear layer (Trockman & Kolter, ICLR 2021).

Padding semantics: **circular**. :class:`CayleyConv` computes a circular convolution in the
Fourier domain (Sec. 3 of the paper): for every frequency ``(u, v)`` of the ``n x m`` input it
forms ``W_uv = exp(-2 pi i s (u/n + v/m)) conj(FFT(weight)[:, :, u, v])`` (``s = (k-1)//2``),
scales all of them by one factor ``alpha / ||W||_F`` and applies the Cayley map (Eq. 4 with the
rectangular extension of Eq. 6)::

    C(W) = [ (I + A)^-1 (I - A) ; -2 V (I + A)^-1 ],   A = U - U^H + V^H V,

where ``U`` holds the first ``cin`` rows of ``W`` and ``V`` the rest (``cin <= cout``; otherwise
``C(W) = C(W^T)^T`` with the plain transpose).

Guarantee: each ``C(W_uv)`` has orthonormal columns (``cin <= cout``) or rows (``cin > cout``),
and ``C(conj W) = conj C(W)``, so the layer (without bias) is an orthogonal map, or a
row-orthonormal one when channels are truncated, **for circular padding**, up to float
tolerance (singular values within 1e-5 of 1 in float64, tested against an exact Jacobian). It
is not the zero-padded convolution of ``weight``; an audit must bound the circular operator,
whose exact per-frequency matrices :meth:`CayleyConv.frequency_matrices` returns.

Stride 2 is space-to-depth (:func:`~lipverify.layers.soc.space_to_depth`, an isometry), after
which the stored kernel is ``max(1, k // 2)`` wide, as in the reference code.

:class:`CayleyLinear` (the orthogonal last layer): ``Q = C(alpha W / ||W||_F)``,
``y = Q x + b``; ``Q`` has orthonormal rows or columns (exact up to float tolerance).

In eval mode the orthogonalized operators are computed in float64 (on CPU and CUDA), cast to
the parameters' dtype and cached (detached, as in the reference). The cache is keyed on
*content* (:class:`~lipverify.layers.weight_cache.ContentCache`): it is served only while
``weight`` and ``alpha`` are bit for bit those it was computed from (same dtype, device and
shape) and the input size is the same, so no weight update (``.data`` or NumPy-view writes
included) leaves eval outputs stale; training mode never uses it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lipverify.layers.soc import space_to_depth_checked
from lipverify.layers.weight_cache import ContentCache

__all__ = ["CayleyConv", "CayleyLinear", "cayley"]

# The reference sets ``alpha`` lazily to ``||W||_F`` on the first input grid; we fix it at
# construction, on this nominal grid, so a fresh layer is fully defined before any forward.
_ALPHA_GRID = 16


def cayley(w: torch.Tensor) -> torch.Tensor:
    """The Cayley map of a batch ``(..., cout, cin)`` of (complex or real) matrices.

    Returns matrices of the same shape with orthonormal columns (``cin <= cout``) or rows.
    """
    cout, cin = w.shape[-2:]
    if cin > cout:
        return cayley(w.transpose(-1, -2)).transpose(-1, -2)
    u, v = w[..., :cin, :], w[..., cin:, :]
    eye = torch.eye(cin, dtype=w.dtype, device=w.device)
    a = u - u.mH + v.mH @ v
    inv = torch.linalg.inv(eye + a)
    return torch.cat((inv @ (eye - a), -2 * v @ inv), dim=-2)


def _eval_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for the cached eval-mode operators where the device has it, else ``t.dtype``."""
    return torch.float64 if t.device.type in ("cpu", "cuda") else t.dtype


class CayleyConv(nn.Module):
    """Cayley orthogonal convolution, circular padding, computed with 2-D real FFTs.

    ``weight`` (cout, cin_eff, k', k'), ``bias`` (cout,) and scalar ``alpha`` as in the
    reference ``state_dict``. After space-to-depth, ``in_channels = cin * stride**2`` and
    ``kernel_size`` is the stored (applied) kernel ``k'``: ``k`` for stride 1, ``max(1, k//2)``
    for stride 2; ``requested_kernel_size`` is the constructor's ``k``.
    """

    padding_mode = "circular"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError("CayleyConv supports stride 1 or 2")
        if kernel_size < 1:
            raise ValueError("kernel_size must be positive")
        self.stride = stride
        self.requested_kernel_size = kernel_size
        self.kernel_size = k = kernel_size if stride == 1 else max(1, kernel_size // 2)
        self.in_channels = cin = in_channels * stride * stride  # after space-to-depth
        self.out_channels = out_channels
        weight = torch.empty(out_channels, cin, k, k)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Conv2d's default
        self.weight = nn.Parameter(weight)
        if bias:
            bound = 1.0 / math.sqrt(cin * k * k)
            self.bias = nn.Parameter(torch.empty(out_channels).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        with torch.no_grad():
            alpha = self._shifted_spectrum(weight, _ALPHA_GRID, _ALPHA_GRID).norm()
        self.alpha = nn.Parameter(alpha.clone())
        self._cache = ContentCache()

    def _shifted_spectrum(self, weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
        """``W_uv`` of shape (n, m//2+1, cout, cin_eff), before scaling and the Cayley map."""
        if n < self.kernel_size or m < self.kernel_size:
            raise ValueError(
                f"CayleyConv needs inputs at least {self.kernel_size} pixels wide after "
                f"space-to-depth, got {n}x{m}"
            )
        s = (self.kernel_size - 1) // 2
        wfft = torch.fft.rfft2(weight, (n, m)).permute(2, 3, 0, 1).conj()
        u = torch.arange(n, device=weight.device, dtype=weight.dtype)[:, None] / n
        v = torch.arange(m // 2 + 1, device=weight.device, dtype=weight.dtype)[None, :] / m
        shift = torch.polar(torch.ones_like(u + v), -2 * math.pi * s * (u + v))
        return shift[:, :, None, None] * wfft

    def _compute(self, n: int, m: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        weight, alpha = self.weight, self.alpha
        if dtype is not None:
            weight, alpha = weight.to(dtype), alpha.to(dtype)
        w = self._shifted_spectrum(weight, n, m)
        q = cayley(alpha * w / w.norm())
        return q if dtype is None else q.to(torch.promote_types(self.weight.dtype, torch.complex64))

    def frequency_matrices(self, n: int, m: int | None = None) -> torch.Tensor:
        """The complex operators applied per frequency on an ``n x m`` input (after
        space-to-depth; ``m = n`` by default): shape (n, m//2+1, cout, cin_eff).

        ``y_uv = C_uv x_uv`` for ``x_uv = rfft2(x)[..., u, v]``, bias excluded. Uses (and fills)
        the eval-mode cache; differentiable in training mode.
        """
        m = n if m is None else m
        if self.training:
            self._cache.clear()
            return self._compute(n, m)
        params = (self.weight, self.alpha)
        hit = self._cache.get(params, (n, m))
        if hit is None:
            with torch.inference_mode(False), torch.no_grad():  # usable outside the mode too
                hit = self._compute(n, m, _eval_dtype(self.weight))
            self._cache.put(params, (n, m), hit)
        return hit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = space_to_depth_checked(self, x)
        n, m = x.shape[-2:]
        q = self.frequency_matrices(n, m)
        xfft = torch.fft.rfft2(x)
        yfft = torch.einsum("uvoc,bcuv->bouv", q.to(xfft.dtype), xfft)
        y = torch.fft.irfft2(yfft, s=(n, m))
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    def train(self, mode: bool = True) -> CayleyConv:
        if mode != self.training:  # frees memory only: the content key decides validity
            self._cache.clear()
        return super().train(mode)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_channels // self.stride**2}, out={self.out_channels}, "
            f"kernel={self.requested_kernel_size} (applied {self.kernel_size}), "
            f"stride={self.stride}, padding=circular"
        )


class CayleyLinear(nn.Module):
    """Orthogonal linear last layer ``y = C(alpha W / ||W||_F) x + b`` on flattened features.

    Padding semantics: none (a dense map). Guarantee: ``Q`` has orthonormal rows
    (``out <= in``) or columns, up to float tolerance, so the map is 1-Lipschitz.
    """

    flat_input = True

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))
        self.alpha = nn.Parameter(self.weight.detach().norm().clone())
        self._cache = ContentCache()

    def _compute(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        weight, alpha = self.weight, self.alpha
        if dtype is not None:
            weight, alpha = weight.to(dtype), alpha.to(dtype)
        return cayley(alpha * weight / weight.norm()).to(self.weight.dtype)

    def orthogonal_weight(self) -> torch.Tensor:
        """``Q`` (out, in) as applied: cached (keyed on content, see the module) and detached
        in eval mode."""
        if self.training:
            self._cache.clear()
            return self._compute()
        params = (self.weight, self.alpha)
        hit = self._cache.get(params)
        if hit is None:
            with torch.inference_mode(False), torch.no_grad():  # usable outside the mode too
                hit = self._compute(_eval_dtype(self.weight))
            self._cache.put(params, (), hit)
        return hit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.flatten(1), self.orthogonal_weight(), self.bias)

    def train(self, mode: bool = True) -> CayleyLinear:
        if mode != self.training:  # frees memory only: the content key decides validity
            self._cache.clear()
        return super().train(mode)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
