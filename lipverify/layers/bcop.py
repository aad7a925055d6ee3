"""Block Convolution Orthogonal Parameterization, BCOP (Li et al., NeurIPS 2019).

Padding semantics: **circular**, ``k // 2`` on each side (the reference pads circularly).

Construction (Sec. 4 of the paper): the ``2k - 1`` unconstrained matrices ``conv_matrices``
(M x M, ``M = max(cout, cin_eff)``) are each scaled by a power-iteration estimate of their top
singular value and orthogonalized by Björck iterations ``w <- 1.5 w - 0.5 w w^T w`` giving
``O_0 .. O_{2k-2}``. ``O_0`` gives the (semi-)orthogonal 1x1 part ``H = O_0[:cin_eff, :cout]``;
the others give rank-``M/2`` symmetric projectors ``P_j = (O_j m)(O_j m)^T`` (``m`` the
``mask``), which make 2x2 orthogonal blocks ``[[P Q, P (I-Q)], [(I-P) Q, (I-P)(I-Q)]]``
(Eq. 6), block-convolved into a k x k orthogonal kernel (Eq. 5), then multiplied by ``H``.

Guarantee: when the Björck iteration has converged, every ``O_j`` is orthogonal, each block
is a paraunitary (orthogonal under circular padding) filter, and the layer (without bias) is an
orthogonal map after space-to-depth: all singular values are 1 when ``cout >= cin_eff`` and
its rows are orthonormal when ``cout < cin_eff``. The guarantee holds *up to Björck
convergence* (well-conditioned matrices converge to float precision in 20 steps; tested to
1e-5 in float64 against an exact Jacobian); :meth:`BCOP.conv_filter` returns the filter
actually applied, which an audit can bound directly.

Stride 2 is space-to-depth (:func:`~lipverify.layers.soc.space_to_depth`, an isometry).
Power iteration starts from a fixed-seed vector (the reference draws a random start), so
results are reproducible; the Björck limit does not depend on the start.

In eval mode the filter is cached (detached, as in the reference). The cache is keyed on
*content* (:class:`~lipverify.layers.weight_cache.ContentCache`): it is served only while
``conv_matrices`` and ``mask`` are bit for bit those it was computed from (same dtype, device
and shape) and the Björck and power-iteration settings are unchanged, so no weight update
(``.data`` or NumPy-view writes included) leaves eval outputs stale; training mode never uses
it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lipverify.layers.soc import space_to_depth_checked
from lipverify.layers.weight_cache import ContentCache

__all__ = ["BCOP", "bjorck", "power_iteration_sigma", "block_orth"]

_POWER_SEED = 0


def power_iteration_sigma(w: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Estimate of the top singular value of each matrix in ``w`` (..., M, M): ``u^T w v``
    after ``iters`` steps from a fixed-seed start. An estimate (a lower bound), not a bound
    the layer relies on: Björck converges for any scale below sqrt(3) times the true norm."""
    gen = torch.Generator().manual_seed(_POWER_SEED)
    u = torch.randn(*w.shape[:-1], 1, generator=gen, dtype=torch.float64)
    u = u.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        wd = w.detach()
        v = u
        for _ in range(iters):
            v = wd.mT @ u
            v = v / v.norm(dim=-2, keepdim=True)
            u = wd @ v
            u = u / u.norm(dim=-2, keepdim=True)
    return (u.mT @ w @ v)[..., 0, 0]


def bjorck(w: torch.Tensor, iters: int = 20, beta: float = 0.5) -> torch.Tensor:
    """First-order Björck orthonormalization ``w <- (1 + beta) w - beta w w^T w``."""
    for _ in range(iters):
        w = (1 + beta) * w - beta * (w @ (w.mT @ w))
    return w


def _block(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """2x2 orthogonal block ``B(P, Q)`` (Eq. 6), shape (2, 2, M, M)."""
    eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
    return torch.stack(
        (torch.stack((p @ q, p @ (eye - q))), torch.stack(((eye - p) @ q, (eye - p) @ (eye - q))))
    )


def _block_conv(b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Block convolution ``R[i, j] = sum_{a,b} B1[a, b] B2[i-a, j-b]`` (Eq. 5)."""
    k1, k2 = b1.shape[0], b2.shape[0]
    k = k1 + k2 - 1
    r = b1.new_zeros(k, k, *b1.shape[2:])
    for a in range(k1):
        for b in range(k1):
            for c in range(k2):
                for d in range(k2):
                    r[a + c, b + d] = r[a + c, b + d] + b1[a, b] @ b2[c, d]
    return r


def block_orth(projectors: torch.Tensor) -> torch.Tensor:
    """k x k taps ``R`` (k, k, M, M) from ``2k - 2`` projectors: ``B(P1,P2) * B(P3,P4) * ...``."""
    r = _block(projectors[0], projectors[1])
    for j in range(2, projectors.shape[0], 2):
        r = _block_conv(r, _block(projectors[j], projectors[j + 1]))
    return r


class BCOP(nn.Module):
    """BCOP orthogonal convolution, circular padding, any odd ``kernel_size``.

    ``conv_matrices`` (2k-1, M, M), ``mask`` (2k-2, 1, M) buffer and ``bias`` (cout,) as in the
    reference ``state_dict``. ``in_channels`` is the width after space-to-depth.
    """

    padding_mode = "circular"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        bias: bool = True,
        bjorck_iters: int = 20,
        bjorck_beta: float = 0.5,
        power_iters: int = 20,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError("BCOP supports stride 1 or 2")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError("BCOP needs an odd kernel_size")
        self.stride, self.kernel_size = stride, kernel_size
        self.in_channels = in_channels * stride * stride  # after space-to-depth
        self.out_channels = out_channels
        self.max_channels = m = max(self.in_channels, out_channels)
        self.num_kernels = 2 * kernel_size - 1
        self.bjorck_iters, self.bjorck_beta = bjorck_iters, bjorck_beta
        self.power_iters = power_iters
        gain = 1.0 / math.sqrt(m)
        mats = torch.empty(self.num_kernels, m, m)
        for i in range(self.num_kernels):
            nn.init.orthogonal_(mats[i], gain=gain)
        self.conv_matrices = nn.Parameter(mats)
        mask = torch.zeros(self.num_kernels - 1, 1, m)
        mask[..., : m // 2] = 1.0
        self.register_buffer("mask", mask)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels).uniform_(-gain, gain))
        else:
            self.register_parameter("bias", None)
        self._cache = ContentCache()

    def orthogonal_matrices(self) -> torch.Tensor:
        """``O_0 .. O_{2k-2}``: scaled by power iteration, then Björck-orthogonalized."""
        w = self.conv_matrices
        w = w / power_iteration_sigma(w, self.power_iters)[:, None, None]
        return bjorck(w, self.bjorck_iters, self.bjorck_beta)

    def _compute(self) -> torch.Tensor:
        o = self.orthogonal_matrices()
        cin, cout, k = self.in_channels, self.out_channels, self.kernel_size
        h = o[0, :cin, :cout]
        if k == 1:
            return h.T.reshape(cout, cin, 1, 1)
        masked = o[1:] * self.mask
        taps = block_orth(masked @ masked.mT)  # (k, k, M, M), taps[a, b]
        if cin <= cout:
            # weight[o, c, b, a] = (H R[a, b])[c, o]
            return torch.einsum("cm,abmo->ocba", h, taps)
        # weight[o, c, b, a] = (H^T R[a, b])[o, c]
        return torch.einsum("mo,abmc->ocba", h, taps)

    def conv_filter(self) -> torch.Tensor:
        """The filter (cout, cin_eff, k, k) applied with circular padding after space-to-depth.

        Cached (keyed on content, see the module) and detached in eval mode; differentiable
        in training mode."""
        if self.training:
            self._cache.clear()
            return self._compute()
        params = (self.conv_matrices, self.mask)
        settings = (self.bjorck_iters, self.bjorck_beta, self.power_iters)
        hit = self._cache.get(params, settings)
        if hit is None:
            with torch.inference_mode(False), torch.no_grad():  # usable outside the mode too
                hit = self._compute()
            self._cache.put(params, settings, hit)
        return hit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = space_to_depth_checked(self, x)
        w = self.conv_filter()
        p = self.kernel_size // 2
        if p:
            x = F.pad(x, (p, p, p, p), mode="circular")
        return F.conv2d(x, w.to(x.dtype), self.bias)

    def train(self, mode: bool = True) -> BCOP:
        if mode != self.training:  # frees memory only: the content key decides validity
            self._cache.clear()
        return super().train(mode)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_channels // self.stride**2}, out={self.out_channels}, "
            f"kernel={self.kernel_size}, stride={self.stride}, padding=circular"
        )
