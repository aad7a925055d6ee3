"""Lemmas for residual blocks: guaranteed bounds tighter than the triangle inequality.

* **Linear merge** (LiResNet-style ``x + K x``): a sum of linear maps of one value is one
  linear map. ``x + conv(x)`` with stride 1 and "same" zero padding is the convolution with
  ``K + delta`` (delta the identity filter at the centre tap), bounded as one operator
  (:func:`identity_filter`, then the conv bound): ``||I + K||``, not ``1 + ||K||``.
* **SDP residual** (SLL, Araujo et al. ICLR 2023, Thm. 3; CPL, Meunier et al. ICML 2022):
  ``y = x - c K^T D s(K x + b)`` with ``K^T`` the exact adjoint of ``K``, ``D >= 0``
  diagonal and ``s`` monotone with ``0 <= s' <= 1``. Every (generalised) Jacobian is
  ``J = I - c K^T D L K`` with ``L`` diagonal in ``[0, 1]``: symmetric, and since
  ``0 <= K^T D L K <= ||D^(1/2) K||^2 I``, its eigenvalues lie in ``[1 - c n^2, 1]``
  (``c >= 0``) with ``n = ||D^(1/2) K||``. So ``Lip(y) <= max(1, c n^2 - 1)``
  (:func:`sdp_residual_factor`); for ``c < 0`` it is ``1 + |c| n^2``. SLL's ``D`` makes
  ``2 n^2 <= 2``: the block is 1-Lipschitz. CPL's ``c = 2 / s_hat^2`` with ``s_hat`` a
  power-iteration estimate of ``||K||`` gives ``2 (||K|| / s_hat)^2 - 1``: above 1 exactly
  when the power iteration has not converged.

The preconditions are checked on the captured graph by :mod:`lipverify.audits.graph`
(equal constant filters, equal stride/padding/dilation/groups, the transposed output back on
the input's shape, ``D`` a nonnegative constant, the activation in the monotone list).
"""

from __future__ import annotations

import math

import torch

__all__ = ["identity_filter", "sdp_residual_factor", "MONOTONE_SLOPE_01"]

MONOTONE_SLOPE_01 = ("relu", "tanh", "hardtanh", "clamp", "leaky_relu", "elu", "sigmoid")
"""Activations ``s`` with ``0 <= s' <= 1`` everywhere (leaky_relu with slope in [0, 1], elu
with ``alpha`` in [0, 1] and unit scales: checked where they are recognised)."""


def identity_filter(channels: int, groups: int, kernel: tuple[int, int],
                    padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor | None:
    """The filter (C, C/groups, kh, kw) whose stride-1 convolution with this padding and
    dilation is the identity, or None if no tap lands on offset 0."""
    taps = []
    for i in range(2):
        if padding[i] % dilation[i] or not 0 <= padding[i] // dilation[i] < kernel[i]:
            return None
        taps.append(padding[i] // dilation[i])
    per = channels // groups
    eye = torch.zeros(channels, per, *kernel, dtype=torch.float64)
    o = torch.arange(channels)
    eye[o, o % per, taps[0], taps[1]] = 1.0
    return eye


def sdp_residual_factor(c: float, n: float) -> float:
    """``max(1, c n^2 - 1)`` for ``c >= 0``, ``1 + |c| n^2`` otherwise (see the module)."""
    v = c * n * n
    if not math.isfinite(v):
        return math.inf
    return max(1.0, v - 1.0) if c >= 0 else 1.0 - v
