"""Hypothesis strategies for testing Lipschitz layers (ours and users').

All draw realistic 4-D NCHW tensors (or filters) from seeds, so shrinking stays cheap.
"""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

__all__ = ["input_batches", "skew_symmetric_filters", "orthogonal_filters", "activation_angles"]


@st.composite
def input_batches(
    draw: st.DrawFn,
    channels: int | tuple[int, ...] = (2, 4, 8),
    sizes: tuple[int, ...] = (4, 8, 16),
    batch: tuple[int, int] = (1, 4),
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Pixels in [0, 1] of shape (N, C, H, H)."""
    c = channels if isinstance(channels, int) else draw(st.sampled_from(channels))
    n = draw(st.integers(*batch))
    h = draw(st.sampled_from(sizes))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, h, generator=g, dtype=dtype)


@st.composite
def skew_symmetric_filters(
    draw: st.DrawFn, channels: tuple[int, ...] = (2, 4, 8), kernel_sizes: tuple[int, ...] = (1, 3)
) -> torch.Tensor:
    """Filters S (C, C, k, k) whose convolution is skew-symmetric: S = -flip(S^T)."""
    from lipverify.layers.soc import skew_filter

    c = draw(st.sampled_from(channels))
    k = draw(st.sampled_from(kernel_sizes))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return skew_filter(torch.randn(c, c, k, k, generator=g) / math.sqrt(c * k * k))


@st.composite
def orthogonal_filters(draw: st.DrawFn, channels: tuple[int, ...] = (2, 4, 8)) -> torch.Tensor:
    """1x1 filters (C, C, 1, 1) holding a random orthogonal matrix (QR of a Gaussian)."""
    c = draw(st.sampled_from(channels))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q, r = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q.float()[:, :, None, None]


def activation_angles(pairs: int, count: int = 1) -> st.SearchStrategy[torch.Tensor]:
    """``count`` angles per channel pair, uniform in [0, 2 pi): shape (count, pairs)."""
    return st.integers(0, 2**31 - 1).map(
        lambda s: 2 * math.pi * torch.rand(count, pairs, generator=torch.Generator().manual_seed(s))
    )
