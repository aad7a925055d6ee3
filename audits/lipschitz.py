"""Lipschitz bounds of the map a model's claim covers.

The map is pixels -> logits for ``"ortho"`` and generic models (``model``) and pixels ->
features for ``"lln"`` models (``model.features``); see :mod:`lipverify.certificates`.

Guarantees (float64 throughout):

* **Per-layer upper bounds** (:func:`layer_upper_bound`) are guaranteed upper bounds on the
  Lipschitz constant of the layer (its operator norm for linear layers, bias excluded) on its
  actual input size, in exact arithmetic, for the operator the layer's forward pass applies:
  derived filters (SOC's ``A``, BCOP's filter, Cayley's matrices) are taken as the layer
  computes them in its own dtype, then converted exactly to float64. Every computed bound is
  multiplied by ``1 + SAFETY`` (``SAFETY = 1e-6``), which dominates the float64 rounding of the
  SVDs, FFTs and series sums (relative error below ``1e-11`` at the sizes used), so float error
  cannot push a bound below the truth. Routes, by layer type:

  - *exact*: a float64 SVD (eigenvalues of the Gram matrix) of the layer's linear operator
    materialised on its actual input, when ``max(in_dim, out_dim) <= exact_max_dim``: a conv
    is applied to the identity basis; an SOC's filter ``A`` becomes its dense matrix on the
    grid (``sum_taps kron(A_tap, shift_tap)``) and the series is summed by Horner's scheme
    (space-to-depth, an isometric permutation, is left out);
  - *zero-padded convolutions* (``nn.Conv2d``; the skew filter ``A`` of SOC): any output of a
    zero-padded convolution (any padding, stride, dilation) is an output of the full linear
    convolution, which is exactly the circular convolution on the zero-padded
    ``(n + k_eff - 1)`` grid restricted to inputs supported on the ``n`` grid, so its norm is at
    most ``max_w ||W_hat(w)||``, the largest exact per-frequency SVD on that grid (the circular
    ``n`` grid would *not* be a bound). A stride is a subsampling of the stride-1 output.
  - *SOC* (eval mode): ``||sum_{i<=T} A^i/i!|| <= min(1 + sum_{i>T} a^i/i!, sum_{i<=T} a^i/i!)``
    with ``a >= ||A||`` from the route above; the first term uses that ``A`` is skew-symmetric
    (checked exactly on the filter; otherwise only the second, triangle-inequality term is
    used), so ``exp(A)`` is orthogonal. Space-to-depth is an isometry, channel zero-padding an
    isometry and channel truncation a projection (norm <= 1). A stale or negative ``sigma``
    makes ``a`` large and the bound huge (``inf`` when ``A`` is not finite).
  - *circular layers* (Cayley, BCOP: ``padding_mode == "circular"``): exact per-frequency SVD
    on the circular ``n`` grid after space-to-depth.
  - dense layers (``nn.Linear``, LLN, CayleyLinear, and ``nn.Linear``/``nn.Conv2d`` under
    torch's read-through parametrizations): exact SVD of the weight as applied;
    ``Normalize``: ``1 / min(std)``; activations and reshapes: the constants of
    :mod:`lipverify.audits.catalogue`, each released only when its stated condition holds
    (finite parameters, continuity, parameter ranges); ``MaxPool2d``: ``sqrt(c_h c_w)`` with
    ``c`` the most windows sharing an input (1 when windows do not overlap); ``BatchNorm2d``
    (eval, running statistics, ``var + eps > 0``): ``max |gamma| / sqrt(var + eps)``. Any
    other layer: no bound (``None``).
  - the structured routes trust that a parameterised layer computes the operator they bound;
    each such bound (at most 10) is released only after the layer's own forward matches that
    operator on a random probe (see :func:`layer_upper_bound`).

* **Whole-model upper bound**: composed over the captured graph of the claimed map
  (:mod:`lipverify.audits.capture`, :mod:`lipverify.audits.graph`): lipverify's own layers are
  leaves bounded by the routes above, every other op by its rule. It is ``None``, with the
  reasons in ``refusals``, when the model cannot be captured, an op has no rule, or a
  parameter is not finite. A unit (or the whole map) whose attained lower bound exceeds its
  upper bound is listed in ``auditor_errors``.
* **Lower bounds** are attained ratios, each a genuine lower bound by construction:
  per layer, ``||J v|| / ||v||`` of the linear operator (bias excluded: the Jacobian of an
  affine map; float64) for the top Ritz vector ``v`` of ``J^T J`` (Lanczos, the Krylov
  acceleration of power iteration), or for a nonlinear layer a finite-difference ratio
  ``||f(z + d) - f(z)|| / ||d||`` along it; whole model, ratios
  ``||f(x) - f(x')|| / ||x - x'||`` over pixel pairs in ``[0, 1]``, found by Lanczos on
  ``J^T J`` at data points then a finite difference (``"local_power"``), by gradient ascent on
  the ratio (``"global_ascent"``) and by random nearby pairs (``"random_pairs"``), and all
  *recomputed in float64* (on the captured graph, its constants as the model computes them;
  for graphs holding lipverify's layers, on a float64 copy of the model, whose derived filters
  match the float32 ones to about 1e-7 relative unless SOC's ``sigma`` is nearly cancelled, in
  which case the upper bound is huge anyway) and multiplied by ``1 - LOWER_SAFETY``. Never an
  upper bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lipverify.audits.capture import (
    CaptureRefused,
    capture,
    frozen_parametrizations,
    graph_evaluator,
    release,
)
from lipverify.audits.catalogue import catalogue_bound
from lipverify.audits.coverage import non_finite, torch_type
from lipverify.audits.graph import GraphBound, bound_graph
from lipverify.audits.lower import (
    LOWER_SAFETY,
    Linearization,
    _generator,
    _global_ascent,
    _local_power,
    _per_sample_norm,
    _random_pairs,
    _tensors,
    lanczos,
    top_direction,
)
from lipverify.audits.operators import (
    SAFETY,
    _inflate,
    conv_frequency_matrices,
    conv_frequency_norm,
    conv_matrix,
    dense_spectral_norm,
    frequency_singular_values,
    materialise,
    soc_series_bound,
)
from lipverify.audits.twin import float64_twin
from lipverify.errors import InputError
from lipverify.layers.last import LLN
from lipverify.layers.soc import SOC, conv_transpose_filter
from lipverify.models import LipBlock, LipConvNet, Normalize

__all__ = [
    "LayerBound",
    "LipschitzResult",
    "lipschitz_audit",
    "layer_upper_bound",
    "layer_lower_bound",
    "soc_series_bound",
    "conv_frequency_norm",
    "conv_matrix",
    "soc_matrix",
    "conv_frequency_matrices",
    "frequency_singular_values",
    "SAFETY",
    "lanczos",
    "LOWER_SAFETY",
    "DEFAULT_EXACT_MAX_DIM",
]

DEFAULT_EXACT_MAX_DIM = 1024
"""Materialise a layer exactly when ``max(in_dim, out_dim) <= DEFAULT_EXACT_MAX_DIM``.

Cost of the exact route, measured on one CPU core for LipConvNet-5 (16 channels) layers: an
SOC is built as a dense ``D x D`` matrix (``D = max(in_dim, out_dim)``) and its series summed
by Horner's scheme, ``T`` float64 matrix products of ``O(D^3)``, then a Gram eigensolve:
about 0.8 s at ``D = 1024`` and 7.5 s at ``D = 2048`` (a plain conv is materialised through
``in_dim`` float64 forward passes, similar cost). Above the cut-off the guaranteed FFT routes
are used: for SOC at ``T = 12`` they exceed the exact norm by about ``1e-9`` plus the margin, so
exactness buys nothing there, while for a plain zero-padded ``nn.Conv2d`` on a tiny input the
``(n + k - 1)`` grid bound can be loose (still an upper bound): pass a larger
``exact_max_dim`` to tighten it."""

_ISOMETRIES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout2d, nn.AlphaDropout)


# --------------------------------------------------------------------------------------------
# results


@dataclass
class LayerBound:
    """Bounds of one layer: ``upper`` guaranteed (``None`` if unknown), ``lower`` attained."""

    name: str
    kind: str
    upper: float | None
    lower: float | None
    method: str
    cumulative: float | None = None


@dataclass
class LipschitzResult:
    """Lipschitz bounds of the claimed map.

    ``upper`` is a guaranteed upper bound (``None`` if unknown); ``lower`` the best attained
    ratio (a genuine lower bound); ``lower_by_method`` maps ``"local_power"``,
    ``"global_ascent"`` and ``"random_pairs"`` to their attained ratios.
    ``refusals`` say why there is no upper bound (empty when there is one);
    ``auditor_errors`` name every unit (or the whole map) whose attained lower bound exceeds
    its guaranteed upper bound: a proof that the auditor is wrong about this model.
    ``lower_dtype`` is the dtype the whole-model lower bounds were recomputed in.
    """

    layers: list[LayerBound]
    upper: float | None
    lower: float
    lower_by_method: dict[str, float]
    notes: list[str]
    map: str = "logits"
    points: int = 0
    safety_margin: float = SAFETY
    refusals: list[str] = field(default_factory=list)
    auditor_errors: list[str] = field(default_factory=list)
    lower_dtype: str = "float64"

    def to_dict(self) -> dict:
        return {
            "layers": [asdict(layer) for layer in self.layers],
            "upper": self.upper,
            "lower": self.lower,
            "lower_by_method": dict(self.lower_by_method),
            "notes": list(self.notes),
            "map": self.map,
            "points": self.points,
            "upper_safety_margin": self.safety_margin,
            "lower_safety_margin": LOWER_SAFETY,
            "refusals": list(self.refusals),
            "auditor_errors": list(self.auditor_errors),
            "lower_dtype": self.lower_dtype,
        }


# --------------------------------------------------------------------------------------------
# small helpers


@contextmanager
def eval_mode(module: nn.Module, freeze: bool = False) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode (and, with ``freeze``, its parameters in
    ``requires_grad=False``: the audit needs input gradients only); restore every submodule's
    mode and every parameter's flag afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    flags = [(p, p.requires_grad) for p in module.parameters()] if freeze else []
    module.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, training in modes:  # pre-order: a parent's train() is then corrected below it
            if m.training != training:
                m.train(training)


def _own_forward(layer: nn.Module, cls: type | tuple[type, ...]) -> bool:
    """``layer`` is an instance of ``cls`` whose class did not override ``forward``."""
    classes = cls if isinstance(cls, tuple) else (cls,)
    return any(isinstance(layer, c) and type(layer).forward is c.forward for c in classes)


def _route(layer: nn.Module, attr: str) -> bool:
    """``layer`` offers the structured route ``attr`` (``orthogonal_weight``,
    ``frequency_matrices``, ``conv_filter``) *and* its class is one of lipverify's own layers
    (Cayley, BCOP): a duck-typed attribute on another class says nothing about its forward."""
    return hasattr(layer, attr) and type(layer).__module__.startswith("lipverify.layers.")


def _device(layer: nn.Module) -> torch.device:
    for t in layer.parameters():
        return t.device
    for t in layer.buffers():
        return t.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# per-layer linear operators (float64, bias excluded)


def _soc_filter(layer: SOC) -> torch.Tensor:
    """The filter ``A`` the layer applies in eval mode (its own dtype), detached."""
    with eval_mode(layer), torch.no_grad():
        return layer.normalized_filter().detach()


def _soc_operator(layer: SOC) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor, int]:
    """Float64 linear map of an eval-mode SOC (bias excluded): space-to-depth, channel padding,
    the truncated series with the layer's own ``A``, channel truncation."""
    a32 = _soc_filter(layer)
    a = a32.to(torch.float64)
    terms = layer.eval_terms

    def op(x: torch.Tensor) -> torch.Tensor:
        return layer.series(layer.prepare_input(x), a, terms)[:, : layer.out_channels]

    return op, a32, terms


def soc_matrix(layer: SOC, n: int, m: int) -> torch.Tensor:
    """Dense float64 matrix of an eval-mode SOC (bias excluded) on an ``n x m`` grid after
    space-to-depth: ``[sum_{i<=T} A^i / i!]`` restricted to the first ``out`` output and the
    first ``in`` (unpadded) input channels, with the layer's own ``A``. Space-to-depth, an
    isometric permutation of the input, is left out: it changes no singular value."""
    a = _soc_filter(layer)
    terms = layer.eval_terms
    big = conv_matrix(a, n, m)
    cols = layer.in_channels * n * m
    eye = torch.eye(big.shape[0], cols, dtype=torch.float64, device=big.device)
    z = eye.clone()
    for i in range(terms, 0, -1):  # Horner: I + A (I + A/2 (I + ... (I + A/T)))
        z = eye + (big @ z) / i
    return z[: layer.out_channels * n * m]


def _circular_space_to_depth(layer: nn.Module, shape: Sequence[int]) -> tuple[int, int, bool]:
    """Grid after space-to-depth for a circular layer, and whether space-to-depth applies."""
    c, h, w = shape
    s = int(getattr(layer, "stride", 1) or 1)
    cin = getattr(layer, "in_channels", None)
    if s > 1 and cin == c * s * s:
        return h // s, w // s, True
    return h, w, s == 1


def _cayley_matrices(layer: nn.Module, n: int, m: int) -> torch.Tensor:
    with eval_mode(layer), torch.no_grad():
        if n == m:
            try:
                q = layer.frequency_matrices(n)
            except TypeError:
                q = layer.frequency_matrices(n, m)
        else:
            q = layer.frequency_matrices(n, m)
    return q.detach().to(torch.complex128)


def _bcop_filter(layer: nn.Module) -> torch.Tensor:
    with eval_mode(layer), torch.no_grad():
        return layer.conv_filter().detach().to(torch.float64)


def _linear_matrix(layer: nn.Module) -> torch.Tensor | None:
    """The dense weight a linear layer applies (float64), or ``None``."""
    with eval_mode(layer), torch.no_grad():
        if _route(layer, "orthogonal_weight") and callable(layer.orthogonal_weight):
            return layer.orthogonal_weight().detach().to(torch.float64)
        if _own_forward(layer, LLN):
            return layer.normalized_weight().detach().to(torch.float64)
        if torch_type(layer) is nn.Linear:
            return layer.weight.detach().to(torch.float64)
    return None


def _is_linear_layer(layer: nn.Module) -> bool:
    """Layers whose eval-mode map is affine, so their Jacobian is the operator the bound covers."""
    if isinstance(layer, _ISOMETRIES) or _own_forward(layer, (SOC, Normalize, LLN)):
        return True
    if torch_type(layer) in (nn.Linear, nn.Conv2d):
        return True
    if type(layer) is nn.BatchNorm2d and layer.track_running_stats:
        return True
    return any(
        _route(layer, a) for a in ("orthogonal_weight", "frequency_matrices", "conv_filter")
    )


# --------------------------------------------------------------------------------------------
# per-layer upper bounds


def _soc_upper(layer: SOC, shape: Sequence[int], exact_max_dim: int) -> tuple[float, str]:
    c, h, w = shape
    s, k = layer.stride, layer.kernel_size
    n, m = h // s, w // s
    in_dim, out_dim = c * h * w, layer.out_channels * n * m
    a32, terms = _soc_filter(layer), layer.eval_terms
    if not torch.isfinite(a32).all():
        return math.inf, "soc: the normalized filter A is not finite (sigma is 0 or NaN)"
    if max(in_dim, out_dim) <= exact_max_dim:
        j = soc_matrix(layer, n, m)
        return _inflate(dense_spectral_norm(j)), (
            f"exact: float64 SVD of the materialised series ({out_dim}x{in_dim}, T={terms})"
        )
    grid = (n + k - 1, m + k - 1)
    a = _inflate(conv_frequency_norm(a32, grid))
    skew = bool(torch.equal(a32, -conv_transpose_filter(a32)))
    bound = soc_series_bound(a, terms, skew)
    rule = "1 + sum_{i>T} a^i/i!" if skew else "sum_{i<=T} a^i/i! (A not skew)"
    return _inflate(bound), (
        f"soc-series: {rule}, T={terms}, a=||A||<={a:.6g} (per-frequency SVD on the "
        f"zero-padded {grid[0]}x{grid[1]} grid)"
    )


def _conv2d_upper(layer: nn.Conv2d, shape: Sequence[int], exact_max_dim: int) -> tuple:
    c, h, w = shape
    w64 = layer.weight.detach().to(torch.float64)

    def op(x: torch.Tensor) -> torch.Tensor:
        return layer._conv_forward(x, w64, None)

    with torch.no_grad():
        out_dim = op(torch.zeros(1, c, h, w, dtype=torch.float64, device=w64.device)).numel()
    in_dim = c * h * w
    if max(in_dim, out_dim) <= exact_max_dim:
        with torch.no_grad():
            j = materialise(op, shape, w64.device)
        return _inflate(dense_spectral_norm(j)), (
            f"exact: float64 SVD of the materialised conv ({out_dim}x{in_dim})"
        )
    kh, kw = w64.shape[-2:]
    dh, dw = layer.dilation
    groups = layer.groups
    blocks = w64.view(groups, w64.shape[0] // groups, *w64.shape[1:])
    if layer.padding_mode == "zeros":
        grid = (h + dh * (kh - 1), w + dw * (kw - 1))
        bound = conv_frequency_norm(blocks, grid, (dh, dw))
        return _inflate(bound), (
            f"conv-fft: per-frequency SVD of the circular conv on the zero-padded "
            f"{grid[0]}x{grid[1]} grid (n+k-1); stride {tuple(layer.stride)} is a subsampling"
        )
    pad = layer.padding if isinstance(layer.padding, tuple) else None
    if (
        layer.padding_mode == "circular"
        and pad is not None
        and 2 * pad[0] == dh * (kh - 1)
        and 2 * pad[1] == dw * (kw - 1)
    ):
        bound = conv_frequency_norm(blocks, (h, w), (dh, dw))
        return _inflate(bound), (
            f"circular-fft: per-frequency SVD on the circular {h}x{w} grid"
            + ("" if tuple(layer.stride) == (1, 1) else "; the stride is a subsampling")
        )
    return None, f"no bound: {layer.padding_mode!r} padding of this size is not supported"


def _maxpool_upper(layer: nn.MaxPool2d) -> tuple[float, str] | None:
    if layer.return_indices:
        return None

    def pair(v: int | tuple) -> tuple[int, int]:
        return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))

    k, s, d = pair(layer.kernel_size), pair(layer.stride or layer.kernel_size), pair(
        layer.dilation
    )
    counts = [min(k[i], -(-((k[i] - 1) * d[i] + 1) // s[i])) for i in range(2)]
    return math.sqrt(counts[0] * counts[1]), (
        f"upper: sqrt of the most windows sharing an input ({counts[0]}x{counts[1]})"
    )


def _upper(layer: nn.Module, shape: Sequence[int], exact_max_dim: int) -> tuple:
    const = catalogue_bound(layer)  # its condition checked; None: not in the catalogue
    if const is not None:
        return const
    if _own_forward(layer, Normalize):
        std = layer.std.detach().to(torch.float64)
        return _inflate(float(1.0 / std.abs().min())), "exact: 1/min(std)"
    if (_route(layer, "orthogonal_weight") or _own_forward(layer, LLN)
            or torch_type(layer) is nn.Linear):
        mat = _linear_matrix(layer)
        return _inflate(dense_spectral_norm(mat)), (
            f"exact: float64 SVD of the {mat.shape[0]}x{mat.shape[1]} weight as applied"
        )
    if _route(layer, "frequency_matrices"):
        n, m, exact = _circular_space_to_depth(layer, shape)
        q = _cayley_matrices(layer, n, m)
        if not torch.isfinite(torch.view_as_real(q)).all():
            return math.inf, "circular: non-finite frequency matrices"
        bound = float(frequency_singular_values(q).max())
        return _inflate(bound), (
            f"{'exact' if exact else 'upper'}: per-frequency SVD of the circular operator on "
            f"the {n}x{m} grid (layer.frequency_matrices)"
        )
    if _route(layer, "conv_filter") and getattr(layer, "padding_mode", None) == "circular":
        filt = _bcop_filter(layer)
        c = shape[0]
        s = int(getattr(layer, "stride", 1) or 1)
        if filt.shape[1] == c * s * s:
            grid, exact = (shape[1] // s, shape[2] // s), True
        else:
            grid, exact = (shape[1], shape[2]), s == 1
        bound = conv_frequency_norm(filt, grid)
        return _inflate(bound), (
            f"{'exact' if exact else 'upper'}: per-frequency SVD of the circular conv on the "
            f"{grid[0]}x{grid[1]} grid (layer.conv_filter)"
        )
    if _own_forward(layer, SOC):
        return _soc_upper(layer, shape, exact_max_dim)
    if torch_type(layer) is nn.Conv2d:
        return _conv2d_upper(layer, shape, exact_max_dim)
    if type(layer) is nn.BatchNorm2d and layer.track_running_stats:
        var = layer.running_var.detach().double() + float(layer.eps)
        if not bool((var > 0).all()) or not math.isfinite(float(layer.eps)):
            return None, "no bound: BatchNorm2d needs running_var + eps > 0 and finite"
        scale = 1.0 / torch.sqrt(var)
        if layer.weight is not None:
            scale = scale * layer.weight.detach().double()
        return _inflate(float(scale.abs().max())), "exact: max |gamma| / sqrt(var + eps)"
    if type(layer) is nn.MaxPool2d:
        res = _maxpool_upper(layer)
        if res is not None:
            return res
    return None, f"no bound: unknown layer type {type(layer).__name__}"


def _reference_operator(
    layer: nn.Module, shape: Sequence[int]
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Float64 map (bias excluded) that the bound of a parameterised orthogonal layer assumes
    the layer computes, rebuilt from the quantities the bound used; ``None`` for torch's own
    layers, which need no check."""
    if _route(layer, "orthogonal_weight") or _own_forward(layer, LLN):
        w = _linear_matrix(layer)
        return lambda x: x.flatten(1) @ w.T
    if _route(layer, "frequency_matrices"):
        n, m, _ = _circular_space_to_depth(layer, shape)
        q = _cayley_matrices(layer, n, m)
        s = int(getattr(layer, "stride", 1) or 1)
        s2d = s > 1 and getattr(layer, "in_channels", None) == shape[0] * s * s

        def fourier(x: torch.Tensor) -> torch.Tensor:
            x = F.pixel_unshuffle(x, s) if s2d else x
            y = torch.einsum("uvoc,bcuv->bouv", q, torch.fft.rfft2(x))
            y = torch.fft.irfft2(y, s=(n, m))
            return y if s2d or s == 1 else y[..., ::s, ::s]

        return fourier
    if _route(layer, "conv_filter") and getattr(layer, "padding_mode", None) == "circular":
        filt = _bcop_filter(layer)
        s = int(getattr(layer, "stride", 1) or 1)
        s2d = s > 1 and filt.shape[1] == shape[0] * s * s
        kh, kw = filt.shape[-2:]

        def circular(x: torch.Tensor) -> torch.Tensor:
            x = F.pixel_unshuffle(x, s) if s2d else x
            x = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2), mode="circular")
            return F.conv2d(x, filt, stride=1 if s2d else s)

        return circular
    if _own_forward(layer, SOC):
        a = _soc_filter(layer).to(torch.float64)
        return lambda x: layer.series(layer.prepare_input(x), a, layer.eval_terms)[
            :, : layer.out_channels
        ]
    return None


_PROBE_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}
_PROBE_MAX_BOUND = 10.0  # larger bounds support no soundness verdict: no need to check them


def _forward_mismatch(layer: nn.Module, shape: Sequence[int]) -> float | None:
    """Relative distance between ``layer(x) - layer(0)`` (its own forward, own dtype) and the
    float64 operator its bound assumes, on a fixed random probe; ``None`` if not applicable."""
    op = _reference_operator(layer, shape)
    if op is None:
        return None
    dtype = next((t.dtype for t in layer.parameters() if t.is_floating_point()), torch.float32)
    dev = _device(layer)
    x = torch.randn(2, *shape, generator=_generator(12345), dtype=torch.float64).to(dev)
    with torch.no_grad():
        y = (layer(x.to(dtype)) - layer(torch.zeros_like(x, dtype=dtype))).to(torch.float64)
        ref = op(x)
    if y.shape != ref.shape:
        return math.inf
    return float((y - ref).norm() / ref.norm().clamp_min(1e-300))


def layer_upper_bound(
    layer: nn.Module, input_shape: Sequence[int], *, exact_max_dim: int = DEFAULT_EXACT_MAX_DIM
) -> tuple[float | None, str]:
    """Guaranteed upper bound on the eval-mode Lipschitz constant of ``layer`` on inputs of
    per-sample shape ``input_shape`` (e.g. (C, H, W)), and the method used.

    The bound includes the ``1 + SAFETY`` margin; it is ``inf`` when the layer's operator is not
    finite and ``None`` for layer types with no known bound. See the module docstring for the
    route per layer type; ``exact_max_dim`` selects the exact (materialised) route.

    For parameterised layers (SOC, Cayley, BCOP, LLN, CayleyLinear) a bound at most 10 is only
    returned after a consistency probe: the layer's own forward (bias removed) must match the
    float64 operator the bound was computed for on a fixed random input, to 1e-4 relative in
    float32 (rounding is ~1e-6) or 1e-9 in float64; otherwise the bound is ``None``.
    """
    shape = tuple(int(s) for s in input_shape)
    try:
        with eval_mode(layer), torch.no_grad():
            ub, method = _upper(layer, shape, int(exact_max_dim))
            if ub is not None and math.isfinite(ub) and ub <= _PROBE_MAX_BOUND:
                gap = _forward_mismatch(layer, shape)
                dtype = next((t.dtype for t in layer.parameters()), torch.float32)
                if gap is not None and not gap <= _PROBE_RTOL.get(dtype, 1e-2):
                    return None, (
                        f"no bound: the layer's forward differs from the operator the bound "
                        f"assumes by {gap:.3g} (relative) on a random probe"
                    )
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        return None, f"no bound: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    if ub is None:
        return None, method
    ub = float(ub)
    return (math.inf if math.isnan(ub) else ub), method


# --------------------------------------------------------------------------------------------
# linearisation helpers (autograd, reusable graph)


def _float64_copy(module: nn.Module) -> nn.Module | None:
    """An eval-mode float64 copy (:func:`~lipverify.audits.twin.float64_twin`), or None."""
    return float64_twin(module)[0]


def layer_lower_bound(
    layer: nn.Module, input_shape: Sequence[int], iters: int = 50, seed: int = 0
) -> float:
    """A genuine lower bound on the eval-mode Lipschitz constant of ``layer`` (float64).

    Power iteration on ``J^T J`` at a random point of shape ``input_shape``; for a layer whose
    eval-mode map is affine the attained ``||J v|| / ||v||`` is reported (the operator with the
    bias excluded, padding and stride included), otherwise the finite-difference ratio
    ``||f(z + d) - f(z)|| / ||d||`` along the found direction. Returns 0.0 if it fails.
    """
    shape = tuple(int(s) for s in input_shape)
    f64 = _float64_copy(layer)
    if f64 is None:
        return 0.0
    dev = _device(f64)
    gen = _generator(seed)
    z = torch.randn(1, *shape, generator=gen, dtype=torch.float64).to(dev)
    v = torch.randn(1, *shape, generator=gen, dtype=torch.float64).to(dev)
    try:
        lin = Linearization(f64, z)
        best_v, best = top_direction(lin, v, iters)
        if _is_linear_layer(layer):
            return float(best[0]) * (1 - LOWER_SAFETY)
        with torch.no_grad():
            fz = f64(z)
            ratios = [0.0]
            for h in (1e-4, 1e-3):
                for sgn in (1.0, -1.0):
                    d = sgn * h * best_v
                    num = float(_per_sample_norm(f64(z + d) - fz)[0])
                    ratios.append(num / float(_per_sample_norm(d)[0]))
        return max(r for r in ratios if math.isfinite(r)) * (1 - LOWER_SAFETY)
    except (RuntimeError, ValueError, TypeError):
        return 0.0


# --------------------------------------------------------------------------------------------
# the claimed map and its composition


def _is_lipconvnet(model: nn.Module) -> bool:
    if not isinstance(model, LipConvNet):
        return False
    cls = type(model)
    if any(getattr(cls, n) is not getattr(LipConvNet, n) for n in ("forward", "features", "head")):
        return False
    return all(type(getattr(model, f"layer{s}")) is nn.Sequential for s in range(1, 6))


def _lipconvnet_units(model: LipConvNet, prefix: str, logits: bool) -> list:
    units: list[tuple[str, nn.Module]] = [(f"{prefix}normalize", model.normalize)]
    for s in range(1, 6):
        for j, blk in enumerate(getattr(model, f"layer{s}")):
            name = f"{prefix}layer{s}.{j}"
            if _own_forward(blk, LipBlock):
                units += [(f"{name}.conv", blk.conv), (f"{name}.activation", blk.activation)]
            else:
                units.append((name, blk))
    if logits:
        units.append((f"{prefix}last_layer", model.last_layer))
    return units


def _walk(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """Composition units of a module the audit can follow (Sequential, LipBlock, LipConvNet)."""
    if type(module) is nn.Sequential:
        out: list[tuple[str, nn.Module]] = []
        for name, child in module._modules.items():  # not named_children(): it drops repeats
            if child is not None:
                out += _walk(child, f"{prefix}{name}.")
        return out
    if _own_forward(module, LipBlock):
        return [(f"{prefix}conv", module.conv), (f"{prefix}activation", module.activation)]
    if _is_lipconvnet(module):
        return _lipconvnet_units(module, prefix, True)
    return [(prefix.rstrip(".") or type(module).__name__, module)]




def record_inputs(
    f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, modules: Sequence[nn.Module]
) -> dict[int, list[torch.Tensor]]:
    """Inputs (first positional argument, detached) of each module over one pass ``f(x)``,
    keyed by ``id(module)``, one entry per call."""
    seen: dict[int, list[torch.Tensor]] = {}
    handles = []

    def hook(mod: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor):
            seen.setdefault(id(mod), []).append(args[0].detach())

    for m in {id(m): m for m in modules}.values():
        handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            f(x)
    finally:
        for hd in handles:
            hd.remove()
    return seen


def _claimed_map(model: nn.Module, map: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return model.features if map == "features" else model


def resolve_map(model: nn.Module, map: str | None) -> str:
    """``"logits"`` or ``"features"``; ``None`` follows the model's certificate kind."""
    if map is None:
        map = "features" if getattr(model, "certificate_kind", "ortho") == "lln" else "logits"
    if map not in ("logits", "features"):
        raise InputError(f"map must be 'logits' or 'features', got {map!r}")
    if map == "features" and not callable(getattr(model, "features", None)):
        raise InputError("map='features' needs a model with a features(x) method; use 'logits'")
    return map


def check_points(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] == 0:
        raise InputError("x must be a non-empty batch tensor (N, ...) of pixels in [0, 1]")
    if not x.is_floating_point() or not torch.isfinite(x).all():
        raise InputError("x must be finite floating-point pixels in [0, 1]")
    return x


# --------------------------------------------------------------------------------------------
# whole-model lower bounds


# --------------------------------------------------------------------------------------------
# the audit


def _node_layers(gb: GraphBound, iters: int, seed: int, notes: list[str]) -> list[LayerBound]:
    """The report's per-node rows: each node's own bound (``upper``; for merges its
    cumulative bound) and cumulative bound; lipverify's layers also get an attained lower
    bound and the SOC note."""
    leaves = {name: (module, shape) for name, module, shape in gb.leaves}
    rows = []
    for i, nb in enumerate(gb.nodes):
        lb = None
        if nb.module in leaves and nb.op == type(leaves[nb.module][0]).__name__:
            module, shape = leaves[nb.module]
            lb = layer_lower_bound(module, shape, iters=iters, seed=seed + 1 + i)
            if _own_forward(module, SOC) and nb.local is not None and nb.local > 1 + 1e-3:
                sigma = float(module.sigma().detach())
                notes.append(
                    f"{nb.module} (SOC): guaranteed bound {nb.local:.4g} > 1 with sigma = "
                    f"{sigma:.4g} and T = {module.eval_terms}: the truncated series is not "
                    "orthogonal (stale or negative sigma, or too few Taylor terms)")
        name = nb.module if nb.module in leaves and lb is not None else (
            f"{nb.module}:{nb.name}" if nb.module else nb.name)
        upper = nb.local if nb.local is not None else nb.cumulative
        rows.append(LayerBound(name, nb.op, upper, lb, nb.rule, cumulative=nb.cumulative))
    return rows


def lipschitz_audit(
    model: nn.Module,
    x: torch.Tensor,
    *,
    map: str | None = None,
    seed: int = 0,
    power_iters: int = 50,
    ascent_steps: int = 50,
    max_points: int = 16,
    exact_max_dim: int = DEFAULT_EXACT_MAX_DIM,
) -> LipschitzResult:
    """Guaranteed upper and attained lower bounds on the Lipschitz constant of the claimed map.

    ``map`` is ``"logits"`` (ortho and generic models) or ``"features"`` (LLN); ``None``
    follows ``model.certificate_kind``. Uses the first ``max_points`` points of ``x`` (pixels
    in [0, 1]). The model is evaluated in eval mode; every module's mode is restored after.
    ``upper`` is the product of guaranteed per-layer bounds (``None`` unless every layer of a
    known composition has one); ``lower`` the largest float64-recomputed attained ratio.
    """
    check_points(x)
    map = resolve_map(model, map)
    gen = _generator(seed)
    notes: list[str] = []
    refusals: list[str] = []
    xs = x[:max_points].detach()
    layers: list[LayerBound] = []
    upper: float | None = None
    cap = None
    with eval_mode(model, freeze=True), frozen_parametrizations():
        f32 = _claimed_map(model, map)
        try:
            cap = capture(model, xs, features=map == "features", seed=seed)
        except CaptureRefused as exc:
            refusals.append(str(exc))
        if cap is not None:
            try:
                gb = bound_graph(cap, lambda m, s: layer_upper_bound(
                    m, s, exact_max_dim=exact_max_dim), exact_max_dim=exact_max_dim)
                refusals += gb.refusals + non_finite(model)
                upper = gb.upper if not refusals else None
                layers = _node_layers(gb, power_iters, seed, notes)
                if cap.stateful:
                    notes.append(
                        f"stateful forward ({cap.stateful}): the bounds cover one frozen "
                        "snapshot (parametrizations evaluated once, their state as it was); "
                        "`lipverify export` writes that snapshot as plain ops")
                f64_graph = None if gb.leaves or refusals else graph_evaluator(cap)
            finally:
                release(cap.handles)
        else:
            f64_graph = None
        if f64_graph is not None:
            f64, lower_dtype = f64_graph, "float64"
        else:
            f64_module, why = float64_twin(
                model, xs[:1], call=lambda m, z: _claimed_map(m, map)(z))
            lower_dtype = "float64"
            if f64_module is None or cap is not None and cap.stateful:
                why = why or "a stateful forward has no float64 copy of its snapshot"
                lower_dtype = str(next((t.dtype for t in _tensors(f32)), xs.dtype)).replace(
                    "torch.", "")
                notes.append(f"{why}: lower bounds evaluated in the model's own dtype "
                             f"({lower_dtype})")
                f64 = f32
            else:
                f64 = _claimed_map(f64_module, map)
        lower_by: dict[str, float] = {}
        try:
            lower_by["local_power"], v = _local_power(f32, f64, xs, gen, power_iters)
            lower_by["global_ascent"] = _global_ascent(f32, f64, xs, v, gen, ascent_steps)
            lower_by["random_pairs"] = _random_pairs(f32, f64, xs, gen)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            text = str(exc).strip().splitlines()
            notes.append(f"the attained lower bounds could not run on this model "
                         f"({type(exc).__name__}: {text[0][:160] if text else ''})")
            lower_by = {k: lower_by.get(k, 0.0)
                        for k in ("local_power", "global_ascent", "random_pairs")}
    lower_by = {k: v * (1 - LOWER_SAFETY) for k, v in lower_by.items()}
    lower = max(lower_by.values())
    errors = [f"{lb.name}: attained lower bound {lb.lower:.9g} > guaranteed upper bound "
              f"{lb.upper:.9g}" for lb in layers
              if lb.upper is not None and lb.lower is not None and lb.lower > lb.upper]
    if upper is not None and lower > upper:
        errors.append(f"the {map} map: attained lower bound {lower:.9g} > guaranteed upper "
                      f"bound {upper:.9g}")
    return LipschitzResult(
        layers=layers, upper=upper, lower=lower, lower_by_method=lower_by, notes=notes,
        map=map, points=int(xs.shape[0]), refusals=refusals, auditor_errors=errors,
        lower_dtype=lower_dtype,
    )
