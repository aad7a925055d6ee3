"""Gradient-norm preservation (GNP) of each layer, at data points.

A GNP layer has a Jacobian whose (relevant) singular values all equal 1. This module reports,
per layer, the worst deviation ``max |sigma - 1|`` over the singular values of the layer's
Jacobian at the inputs the layer receives on the given points, and flags the layer as GNP when
the deviation is at most ``tolerance`` (default 1e-3). A non-GNP layer yields a *warning*, not
an "unsound" verdict: GNP is what makes these networks expressive, not what makes their
certificates sound (that is the Lipschitz bound's job, :mod:`lipverify.audits.lipschitz`).

Routes, all in float64:

* **pair activations** (MaxMin, HH1, HH2, their own ``forward``): the Jacobian is block-diagonal
  with one 2x2 block per (pixel, channel pair) (by construction: each output pair depends on
  its input pair only). Two JVPs, one perturbing every first-half channel and one every
  second-half channel, give all blocks *exactly*; their singular values are exact. At an exact
  tie ``x == y`` (measure zero), where autograd averages the two sides of MaxMin, the
  one-sided Jacobian is taken (``x`` nudged up by ``1e-9 (1 + |x|)``).
* **SOC** (eval mode): the Jacobian is the layer's linear operator (independent of the point).
  Exact float64 singular values of the materialised operator when
  ``max(in_dim, out_dim) <= exact_max_dim``. Otherwise the guaranteed bound
  ``deviation_bound = sum_{i>T} a^i/i!`` (``a >= ||A||``; Weyl's inequality around the
  orthogonal ``exp(A)``, valid when ``A`` is skew and the layer pads *or* truncates channels,
  never both, as SOC does) is reported when it is within the tolerance; when it is not,
  Lanczos estimates of the extreme singular values (Ritz values of the Gram matrix), which
  can only *under*-estimate the deviation, are reported, so a flagged layer is truly off.
  Only the nonzero singular values count: with channel truncation (``out < in``) the
  ``in - out`` directions that are projected away have singular value 0 by design, so the
  Gram matrix on the smaller side (``J J^T``) is used; with channel padding ``J^T J``.
* **circular orthogonal layers** (Cayley, BCOP) and CayleyLinear: exact per-frequency singular
  values of the operator they apply (``min(cout, cin)`` per frequency).
* **any other layer** in a GNP position (an unknown activation, ReLU, a wrapper): the Jacobian
  at each point, exact SVD when both sides are at most ``exact_max_dim``, else Lanczos
  estimates as above (all ``min(in, out)`` singular values count).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lipverify.audits.lipschitz import (
    _PROBE_RTOL,
    DEFAULT_EXACT_MAX_DIM,
    _bcop_filter,
    _cayley_matrices,
    _circular_space_to_depth,
    _float64_copy,
    _forward_mismatch,
    _is_lipconvnet,
    _lipconvnet_units,
    _own_forward,
    _soc_operator,
    _walk,
    check_points,
    eval_mode,
    record_inputs,
    soc_matrix,
)
from lipverify.audits.lower import Linearization, _generator, lanczos
from lipverify.audits.operators import (
    _exp_tail,
    _gram_eigenvalues,
    _inflate,
    conv_frequency_matrices,
    conv_frequency_norm,
    frequency_singular_values,
)
from lipverify.layers.activations import HouseholderOrder1, HouseholderOrder2, MaxMin
from lipverify.layers.last import LLN
from lipverify.layers.soc import SOC, conv_transpose_filter
from lipverify.models import Normalize

__all__ = ["GNPLayer", "GNPResult", "gnp_audit", "jacobian_singular_values_2x2"]

_PAIR_ACTIVATIONS = (MaxMin, HouseholderOrder1, HouseholderOrder2)
# Layers that do not claim gradient-norm preservation (checked by the Lipschitz audit only).
_NOT_GNP_BY_DESIGN = (
    Normalize, LLN, nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d,
    nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout,
)


@dataclass
class GNPLayer:
    """One layer's worst ``|sigma - 1|`` over its Jacobians' singular values at the points.

    ``deviation_bound`` is a guaranteed upper bound on the deviation where one is known (SOC),
    else ``None``; ``worst_deviation`` is exact or a Lanczos estimate (see ``method``).
    """

    name: str
    kind: str
    worst_deviation: float
    gnp: bool
    method: str
    deviation_bound: float | None = None


@dataclass
class GNPResult:
    """Per-layer GNP deviations; ``worst_deviation`` is their maximum (0.0 with no layer)."""

    layers: list[GNPLayer]
    worst_deviation: float
    tolerance: float
    warnings: list[str]

    def to_dict(self) -> dict:
        return {
            "layers": [asdict(layer) for layer in self.layers],
            "worst_deviation": self.worst_deviation,
            "tolerance": self.tolerance,
            "warnings": list(self.warnings),
        }


# --------------------------------------------------------------------------------------------
# pair activations


def _jvp(
    f: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    try:
        return torch.func.jvp(f, (z,), (t,))[1]
    except (RuntimeError, NotImplementedError):
        return Linearization(f, z).jvp(t)


def jacobian_singular_values_2x2(activation: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Exact singular values of the 2x2 Jacobian block of every channel pair of a pair
    activation at ``z`` (N, C, ...): shape (N, C/2, ..., 2), descending, float64.

    Pair ``c`` is input channels ``(c, c + C/2)`` -> output channels ``(c, c + C/2)``. Two JVPs
    give the blocks' columns; valid for layers whose output pair depends on its input pair
    only (MaxMin, HH1, HH2).
    """
    if z.dim() < 2 or z.shape[1] % 2:
        raise ValueError(f"pair activations need (N, C, ...) with even C, got {tuple(z.shape)}")
    act = copy.deepcopy(activation).to(torch.float64).eval().requires_grad_(False)
    z = z.detach().to(torch.float64)
    h = z.shape[1] // 2
    x, y = z[:, :h], z[:, h:]
    x = torch.where(x == y, x + 1e-9 * (1.0 + x.abs()), x)  # one-sided Jacobian at exact ties
    z = torch.cat([x, y], dim=1)
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    jx = _jvp(act, z, torch.cat([one, zero], dim=1))
    jy = _jvp(act, z, torch.cat([zero, one], dim=1))
    blocks = torch.stack(
        [torch.stack([jx[:, :h], jy[:, :h]], dim=-1), torch.stack([jx[:, h:], jy[:, h:]], dim=-1)],
        dim=-2,
    )  # (..., 2 outputs, 2 inputs)
    if not torch.isfinite(blocks).all():
        return torch.full((*blocks.shape[:-2], 2), math.inf, dtype=torch.float64)
    return torch.linalg.svdvals(blocks.detach())


# --------------------------------------------------------------------------------------------
# extreme singular values of a linearisation


def _extreme_singular_values(
    jvp: Callable[[torch.Tensor], torch.Tensor],
    vjp: Callable[[torch.Tensor], torch.Tensor],
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    gen: torch.Generator,
    iters: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lanczos estimates (per sample) of the largest and the smallest of the ``min(in, out)``
    singular values, on the smaller Gram side (``J^T J`` or ``J J^T``). Ritz values interlace,
    so ``s_max_est <= s_max`` and ``s_min_est >= s_min``: the deviation is under-estimated."""
    if math.prod(out_shape[1:]) < math.prod(in_shape[1:]):
        shape, apply_g = out_shape, (lambda u: jvp(vjp(u)))  # J J^T on the output side
    else:
        shape, apply_g = in_shape, (lambda v: vjp(jvp(v)))  # J^T J
    v0 = torch.randn(shape, generator=gen, dtype=torch.float64).to(device)
    kry = lanczos(apply_g, v0, iters, rtol=1e-10)
    return kry.theta_max.sqrt(), kry.theta_min.sqrt()


def _dense_deviation(j: torch.Tensor) -> float:
    if not torch.isfinite(j).all():
        return math.inf
    s = _gram_eigenvalues(j).clamp_min(0).sqrt()
    return float((s - 1).abs().max()) if s.numel() else 0.0


# --------------------------------------------------------------------------------------------
# per-layer routes


def _soc_deviation(
    layer: SOC, z: torch.Tensor, gen: torch.Generator, iters: int, exact_max_dim: int,
    tolerance: float,
) -> tuple[float, str, float | None]:
    op, a32, terms = _soc_operator(layer)
    if not torch.isfinite(a32).all():
        return math.inf, "soc: the normalized filter A is not finite", math.inf
    c, h, w = z.shape[1:]
    s, k = layer.stride, layer.kernel_size
    n, m = h // s, w // s
    in_dim, out_dim = c * h * w, layer.out_channels * n * m
    pads = layer.max_channels > layer.in_channels
    truncates = layer.out_channels < layer.max_channels
    skew = bool(torch.equal(a32, -conv_transpose_filter(a32)))
    bound = None
    if skew and not (pads and truncates):
        a = _inflate(conv_frequency_norm(a32, (n + k - 1, m + k - 1)))
        bound = _inflate(_exp_tail(a, terms))
    if max(in_dim, out_dim) <= exact_max_dim:
        j = soc_matrix(layer, n, m)
        return _dense_deviation(j), f"exact: float64 SVD of the materialised series (T={terms})", (
            bound
        )
    if bound is not None and bound <= tolerance:
        return bound, (
            f"guaranteed: |sigma - 1| <= sum_(i>T) a^i/i! with a >= ||A|| (T={terms})"
        ), bound
    z0 = torch.zeros(1, c, h, w, dtype=torch.float64, device=a32.device)
    lin = Linearization(op, z0)
    smax, smin = _extreme_singular_values(
        lin.jvp, lin.vjp, (1, c, h, w), (1, layer.out_channels, n, m), gen, iters, a32.device
    )
    dev = max(float((smax - 1).abs().max()), float((smin - 1).abs().max()))
    return dev, f"estimate: Lanczos on the Gram matrix (T={terms})", bound


def _circular_deviation(layer: nn.Module, z: torch.Tensor) -> tuple[float, str] | None:
    if hasattr(layer, "orthogonal_weight"):
        with eval_mode(layer), torch.no_grad():
            q = layer.orthogonal_weight().detach()
        s = frequency_singular_values(q)
        return float((s - 1).abs().max()), "exact: SVD of the applied weight"
    if z.dim() != 4:
        return None
    shape = tuple(z.shape[1:])
    if hasattr(layer, "frequency_matrices"):
        n, m, exact = _circular_space_to_depth(layer, shape)
        if not exact:
            return None
        s = frequency_singular_values(_cayley_matrices(layer, n, m))
        return float((s - 1).abs().max()), f"exact: per-frequency SVD on the circular {n}x{m} grid"
    if hasattr(layer, "conv_filter") and getattr(layer, "padding_mode", None) == "circular":
        filt = _bcop_filter(layer)
        st = int(getattr(layer, "stride", 1) or 1)
        if filt.shape[1] == shape[0] * st * st:
            grid = (shape[1] // st, shape[2] // st)
        elif st == 1:
            grid = (shape[1], shape[2])
        else:
            return None
        s = torch.cat([frequency_singular_values(mats).flatten()
                       for mats in conv_frequency_matrices(filt, grid)])
        return float((s - 1).abs().max()), (
            f"exact: per-frequency SVD on the circular {grid[0]}x{grid[1]} grid"
        )
    return None


def _generic_deviation(
    layer: nn.Module, z: torch.Tensor, gen: torch.Generator, iters: int, exact_max_dim: int
) -> tuple[float, str]:
    f64 = _float64_copy(layer)
    if f64 is None:
        raise RuntimeError("no float64 copy of the layer")
    z = z.detach().to(torch.float64)
    in_dim = math.prod(z.shape[1:])
    with torch.no_grad():
        out_shape = tuple(f64(z[:1]).shape)
    out_dim = math.prod(out_shape[1:])
    if max(in_dim, out_dim) <= exact_max_dim:
        worst = 0.0
        for i in range(z.shape[0]):
            worst = max(worst, _dense_deviation(_jacobian_at(f64, z[i], in_dim)))
        return worst, "exact: float64 SVD of the Jacobian at each point"
    lin = Linearization(f64, z)
    smax, smin = _extreme_singular_values(
        lin.jvp, lin.vjp, tuple(z.shape), (z.shape[0], *out_shape[1:]), gen, iters, z.device
    )
    dev = max(float((smax - 1).abs().max()), float((smin - 1).abs().max()))
    return dev, "estimate: Lanczos on the Jacobian's Gram matrix at each point"


def _jacobian_at(
    f: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, in_dim: int, chunk: int = 128
) -> torch.Tensor:
    """Dense Jacobian (out_dim, in_dim) of ``f`` at the single point ``z`` (no batch dim):
    Jacobian-vector products with the identity basis, ``chunk`` at a time, on copies of ``z``
    (samples are independent in eval mode)."""
    cols = []
    lin = None
    for start in range(0, in_dim, chunk):
        m = min(chunk, in_dim - start)
        if lin is None or lin.z.shape[0] != m:
            lin = Linearization(f, z.unsqueeze(0).expand(m, *z.shape).contiguous())
        e = torch.zeros(m, in_dim, dtype=z.dtype, device=z.device)
        e[torch.arange(m), start + torch.arange(m)] = 1.0
        cols.append(lin.jvp(e.view(m, *z.shape)).reshape(m, -1))
    return torch.cat(cols).T


def layer_deviation(
    layer: nn.Module,
    z: torch.Tensor,
    *,
    seed: int = 0,
    iters: int = 50,
    exact_max_dim: int = DEFAULT_EXACT_MAX_DIM,
    tolerance: float = 1e-3,
) -> tuple[float, str, float | None]:
    """``(worst |sigma - 1|, method, guaranteed bound or None)`` of ``layer`` at inputs ``z``.

    For a SOC too large to materialise whose guaranteed bound is within ``tolerance``, the bound
    itself is reported as the deviation (conservative, no estimate needed)."""
    gen = _generator(seed)
    with eval_mode(layer):
        if _own_forward(layer, _PAIR_ACTIVATIONS):
            s = jacobian_singular_values_2x2(layer, z)
            return float((s - 1).abs().max()), "exact: 2x2 pair Jacobians from two JVPs", None
        if _matches_its_operator(layer, tuple(z.shape[1:])):
            if _own_forward(layer, SOC):
                return _soc_deviation(layer, z, gen, iters, exact_max_dim, tolerance)
            circ = _circular_deviation(layer, z)
            if circ is not None:
                return circ[0], circ[1], None
        dev, method = _generic_deviation(layer, z, gen, iters, exact_max_dim)
        return dev, method, None


def _matches_its_operator(layer: nn.Module, shape: tuple[int, ...]) -> bool:
    """The structured routes assume the layer computes its documented operator: check it on
    a random probe (see :func:`lipverify.audits.lipschitz.layer_upper_bound`); a layer that
    fails (or has no such operator) takes the generic Jacobian route."""
    try:
        gap = _forward_mismatch(layer, shape)
    except (RuntimeError, ValueError, TypeError, IndexError):
        return False
    if gap is None:
        return False
    dtype = next((t.dtype for t in layer.parameters()), torch.float32)
    return gap <= _PROBE_RTOL.get(dtype, 1e-2)


# --------------------------------------------------------------------------------------------
# which layers claim GNP


def gnp_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layers in a GNP position: every block's conv and activation of a LipConvNet (and an
    orthogonal last layer); in a nested ``nn.Sequential``, every unit except the layers that
    do not claim GNP (normalization, plain conv/linear, LLN, reshapes); otherwise the leaf
    modules of that kind."""
    if _is_lipconvnet(model):
        units = _lipconvnet_units(model, "", logits=not isinstance(model.last_layer, LLN))
        return [(n, m) for n, m in units if n != "normalize"]  # a scaling, not GNP
    units = _walk(model, "")
    if len(units) == 1 and units[0][1] is model and any(model.children()):
        units = [(n, m) for n, m in model.named_modules() if n and not any(m.children())]
    return [(n, m) for n, m in units if not _own_forward_any(m, _NOT_GNP_BY_DESIGN)]


def _own_forward_any(layer: nn.Module, classes: tuple[type, ...]) -> bool:
    return type(layer) in classes or _own_forward(layer, (Normalize, LLN))


def gnp_audit(
    model: nn.Module,
    x: torch.Tensor,
    *,
    tolerance: float = 1e-3,
    seed: int = 0,
    max_points: int = 8,
    iters: int = 50,
    exact_max_dim: int = DEFAULT_EXACT_MAX_DIM,
) -> GNPResult:
    """Worst deviation ``max |sigma - 1|`` of each GNP layer's Jacobian singular values at the
    inputs it receives on the first ``max_points`` points of ``x``; ``gnp = deviation <=
    tolerance``. Exact for pair activations, circular layers and small operators; a
    Lanczos estimate (a lower estimate of the deviation) otherwise, with a guaranteed
    bound for SOC. Non-GNP layers produce warnings. Eval mode; modes are restored after.
    """
    check_points(x)
    if not (isinstance(tolerance, (int, float)) and tolerance >= 0):
        raise ValueError(f"tolerance must be a non-negative number, got {tolerance!r}")
    xs = x[:max_points].detach()
    warnings: list[str] = []
    layers: list[GNPLayer] = []
    with eval_mode(model, freeze=True):
        units = gnp_layers(model)
        inputs = record_inputs(model, xs, [m for _, m in units])
        for i, (name, layer) in enumerate(units):
            kind = type(layer).__name__
            seen = inputs.get(id(layer))
            if not seen:
                warnings.append(f"{name} ({kind}): not called on these inputs; not checked")
                continue
            z = torch.cat(seen) if len(seen) > 1 and _same_shapes(seen) else seen[0]
            try:
                dev, method, bound = layer_deviation(
                    layer, z, seed=seed + i, iters=iters, exact_max_dim=exact_max_dim,
                    tolerance=tolerance,
                )
            except (RuntimeError, ValueError, TypeError) as exc:
                warnings.append(f"{name} ({kind}): GNP not checked ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0][:160]})")
                continue
            dev = math.inf if math.isnan(dev) else dev
            ok = dev <= tolerance
            layers.append(GNPLayer(name, kind, dev, ok, method, bound))
            if not ok:
                warnings.append(
                    f"{name} ({kind}): Jacobian singular values deviate from 1 by {dev:.3g} > "
                    f"tolerance {tolerance:g}; the layer is not gradient-norm preserving"
                )
    if not layers and not warnings:
        warnings.append("no layer in a GNP position was found")
    worst = max((layer.worst_deviation for layer in layers), default=0.0)
    return GNPResult(layers=layers, worst_deviation=worst, tolerance=float(tolerance),
                     warnings=warnings)


def _same_shapes(ts: list[torch.Tensor]) -> bool:
    return all(t.shape[1:] == ts[0].shape[1:] for t in ts)
