"""Skew Orthogonal Convolution (Singla & Feizi, ICML 2021).

Guarantee (eval mode): the layer computes ``P x`` with ``P = sum_{i<=T} A^i / i!`` (Eq. 5 of
the paper, truncated), where ``A = correction * S / sigma`` and ``S`` is a skew-symmetric
convolution filter, i.e. ``conv_transpose(S) = -conv(S)`` under zero padding. ``exp(A)`` is
orthogonal, so ``||P|| <= 1 + sum_{i>T} ||A||^i / i!`` (upper bound; the audit checks it with a
guaranteed bound on ``||A||``). With the default ``T = 12`` and a power-iteration ``sigma`` that
matches the filter, the singular values are within 1e-6 of 1 (tested against an exact Jacobian).

Stride 2 is a space-to-depth rearrangement (same channel order as ``F.pixel_unshuffle``), an
isometry. Channel zero-padding is an isometry and channel truncation is a projection, so both
keep the layer 1-Lipschitz.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SOC", "space_to_depth", "skew_filter", "fantastic_four", "conv_transpose_filter"]


def space_to_depth(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Channel ``c*s*s + a*s + b`` takes pixel offset (a, b): ``pixel_unshuffle``. An isometry."""
    return x if stride == 1 else F.pixel_unshuffle(x, stride)


def conv_transpose_filter(w: torch.Tensor) -> torch.Tensor:
    """Filter of the adjoint convolution (zero padding, odd kernel): swap channels, flip taps."""
    return torch.flip(w.transpose(0, 1), dims=(2, 3))


def skew_filter(w: torch.Tensor) -> torch.Tensor:
    """``S = (W - W^T) / 2``: its convolution operator is skew-symmetric."""
    return 0.5 * (w - conv_transpose_filter(w))


def _l2_normalize(t: torch.Tensor) -> torch.Tensor:
    return t / (t.norm() + 1e-12)


_SHAPES = {  # (u shape, v shape) as functions of (c, k), as in the reference code
    1: (lambda c, k: (1, c, 1, k), lambda c, k: (c, 1, k, 1)),
    2: (lambda c, k: (1, c, k, 1), lambda c, k: (c, 1, 1, k)),
    3: (lambda c, k: (1, c, k, k), lambda c, k: (c, 1, 1, 1)),
    4: (lambda c, k: (c, 1, k, k), lambda c, k: (1, c, 1, 1)),
}
_V_DIMS = {1: (1, 3), 2: (1, 2), 3: (1, 2, 3), 4: (0, 2, 3)}
_U_DIMS = {1: (0, 2), 2: (0, 3), 3: (0,), 4: (1,)}


def fantastic_four(
    s: torch.Tensor, vectors: dict[str, torch.Tensor], iters: int
) -> torch.Tensor:
    """Run ``iters`` power-iteration steps in place on the four reshapings of ``s``.

    Returns ``sigma = min_i <s, u_i v_i>``: an *estimate*, a bilinear form with the stored
    vectors, which is neither an upper nor a lower bound on the operator norm.
    """
    with torch.no_grad():
        for _ in range(iters):
            for i in range(1, 5):
                u, v = vectors[f"u{i}"], vectors[f"v{i}"]
                v.copy_(_l2_normalize((s * u).sum(_V_DIMS[i], keepdim=True)))
                u.copy_(_l2_normalize((s * v).sum(_U_DIMS[i], keepdim=True)))
    sig = [(s * vectors[f"u{i}"] * vectors[f"v{i}"]).sum() for i in range(1, 5)]
    return torch.min(torch.min(torch.min(sig[0], sig[1]), sig[2]), sig[3])


class SOC(nn.Module):
    """Skew orthogonal convolution from ``in_channels`` to ``out_channels``.

    Parameter and buffer names follow the reference code, so its ``state_dict`` loads as is.
    ``train_terms``/``eval_terms`` are the highest Taylor power T in each mode.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        bias: bool = True,
        train_terms: int = 5,
        eval_terms: int = 12,
        init_iters: int = 50,
        update_iters: int = 1,
        update_freq: int = 200,
        correction: float | None = None,
    ) -> None:
        super().__init__()
        if stride not in (1, 2) or kernel_size not in (1, 3):
            raise ValueError("SOC supports stride 1 or 2 and kernel size 1 or 3")
        self.in_channels = in_channels * stride * stride  # after space-to-depth
        self.out_channels = out_channels
        self.max_channels = m = max(self.in_channels, out_channels)
        self.stride, self.kernel_size = stride, kernel_size
        self.train_terms, self.eval_terms = train_terms, eval_terms
        self.init_iters, self.update_iters, self.update_freq = init_iters, update_iters, update_freq
        self.total_iters = 0
        self.random_conv_filter = nn.Parameter(
            torch.randn(m, m, kernel_size, kernel_size) / math.sqrt(m)
        )
        for i, (ushape, vshape) in _SHAPES.items():
            self.register_buffer(f"u{i}", _l2_normalize(torch.randn(ushape(m, kernel_size))))
            self.register_buffer(f"v{i}", _l2_normalize(torch.randn(vshape(m, kernel_size))))
        if correction is None:
            correction = 0.7 if kernel_size == 3 else 1.0
        self.register_buffer("correction", torch.tensor([float(correction)]))
        if bias:
            bound = 1.0 / math.sqrt(out_channels)
            self.bias = nn.Parameter(torch.empty(out_channels).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        # Unlike the reference, the vectors match the filter from the start.
        self.refresh_sigma(init_iters)

    def _vectors(self) -> dict[str, torch.Tensor]:
        return {f"{c}{i}": getattr(self, f"{c}{i}") for i in range(1, 5) for c in "uv"}

    def refresh_sigma(self, iters: int | None = None) -> torch.Tensor:
        """Re-run power iteration on the current filter (default ``init_iters`` steps)."""
        s = skew_filter(self.random_conv_filter.detach())
        return fantastic_four(s, self._vectors(), self.init_iters if iters is None else iters)

    @property
    def terms(self) -> int:
        """Highest Taylor power used in the current mode."""
        return self.train_terms if self.training else self.eval_terms

    def sigma(self) -> torch.Tensor:
        """The current scale estimate ``min_i <S, u_i v_i>`` (no power-iteration update)."""
        return fantastic_four(skew_filter(self.random_conv_filter), self._vectors(), 0)

    def normalized_filter(self) -> torch.Tensor:
        """``A = correction * S / sigma``: the filter whose series the layer sums.

        In train mode the vectors first take power-iteration steps, as in the reference:
        ``init_iters`` every ``update_freq`` calls, ``update_iters`` otherwise.
        """
        s = skew_filter(self.random_conv_filter)
        if self.training:
            first = self.total_iters % self.update_freq == 0
            self.total_iters += 1
            iters = self.init_iters if first else self.update_iters
            fantastic_four(s.detach(), self._vectors(), iters)
        return self.correction * s / fantastic_four(s, self._vectors(), 0)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """Space-to-depth, then zero-pad channels up to ``max_channels``."""
        x = space_to_depth(x, self.stride)
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"SOC expects {self.in_channels // self.stride**2} input channels, "
                f"got {x.shape[1] // self.stride**2}"
            )
        if self.max_channels > self.in_channels:
            x = F.pad(x, (0, 0, 0, 0, 0, self.max_channels - self.in_channels))
        return x

    def finish_output(self, z: torch.Tensor) -> torch.Tensor:
        """Truncate to ``out_channels``, then add the bias."""
        z = z[:, : self.out_channels]
        return z if self.bias is None else z + self.bias.view(1, -1, 1, 1)

    def series(self, x: torch.Tensor, a: torch.Tensor, terms: int) -> torch.Tensor:
        """``sum_{i<=terms} A^i x / i!`` with zero padding (reference evaluation order)."""
        z = cur = x
        pad = self.kernel_size // 2
        for i in range(1, terms + 1):
            cur = F.conv2d(cur, a, padding=pad) / float(i)
            z = z + cur
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.normalized_filter()
        return self.finish_output(self.series(self.prepare_input(x), a, self.terms))

    def extra_repr(self) -> str:
        return (
            f"in={self.in_channels // self.stride**2}, out={self.out_channels}, "
            f"kernel={self.kernel_size}, stride={self.stride}, "
            f"T={self.train_terms}/{self.eval_terms}"
        )
