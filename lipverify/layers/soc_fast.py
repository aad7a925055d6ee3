"""Fast kernels for the SOC series (Singla & Feizi, ICML 2021, Eq. 5 truncated at T terms).

Guarantees (what each kernel computes; all are tested against ``SOC.series`` and autograd):

* :func:`series` computes ``P x`` with ``P = sum_{i<=T} A^i / i!`` under zero padding ``k//2``,
  input channels zero-padded to ``M`` and the output truncated to ``out`` channels: the same
  function as ``SOC.series`` followed by the truncation, up to float rounding (the terms are
  summed in the same order; ``A/i`` is folded into the filter). No ``matrix_exp`` anywhere.
* ``mode="exact"``: the input gradient is ``P^T g = P(A^T) g``, summed by the same recurrence
  with the adjoint filter; the filter gradient is exact, recomputed from the saved input in the
  backward pass (the Taylor terms are not stored). Agrees with plain autograd to rounding.
* ``mode="horner"`` (``fast_train``): the output and the input gradient are exact; the filter
  gradient is the APPROXIMATION of Singla & Feizi (NeurIPS 2022, "Improved techniques for
  deterministic l2 robustness"): the series is evaluated by Horner's scheme and the
  filter gradient is taken from the last forward and backward Horner states only,
  ``wgrad(y_1, h_1)`` with ``y_1 = sum_k A^k x/(k+1)!`` and ``h_1 = sum_j (A^T)^j g/(j+1)!``.
  It matches the exact gradient in the terms of order 0 and 1 in ``A`` and differs beyond.

``A`` acts either as a convolution (``kind="conv"``) or, for tiny images (``H*W <= k*k``, where
a padded convolution wastes most of its taps), as the dense ``n x n`` matrix of the same
convolution (``kind="dense"``, built exactly by :func:`conv_matrix`). On CPU float32, dense
products go through oneDNN (``mkldnn::_linear_pointwise``), which uses AVX-512 where MKL's
``sgemm`` may not; elsewhere ``F.linear``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = [
    "Geometry",
    "SeriesOperator",
    "conv_matrix",
    "conv_matrix_grad",
    "linear",
    "series",
    "series_no_grad",
    "dense_apply",
    "SavedBytes",
    "saved_tensor_bytes",
]

# dense kind only up to this operator dimension (the n x n matrix is 256 MiB in float32)
DENSE_KIND_MAX_DIM = 8192


# ------------------------------------------------------------------------------------------
# dense products


def _mkldnn_linear_ok() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(
            torch.ops.mkldnn, "_linear_pointwise"
        )
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


_MKLDNN_LINEAR = _mkldnn_linear_ok()


def _dense_layout(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() or t.t().is_contiguous() else t.contiguous()


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T (+ bias)``: oneDNN on CPU float32 without autograd, else ``F.linear``."""
    global _MKLDNN_LINEAR
    if (
        _MKLDNN_LINEAR
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and w.dtype == torch.float32
        and not (
            torch.is_grad_enabled()
            and (x.requires_grad or w.requires_grad or (bias is not None and bias.requires_grad))
        )
    ):
        # oneDNN reorders gapped layouts (a column slice) element by element: copy them first
        x, w = _dense_layout(x), _dense_layout(w)
        try:
            return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
        except RuntimeError:  # pragma: no cover - unsupported layout/build: fall back for good
            _MKLDNN_LINEAR = False
    return F.linear(x, w, bias)


def _tap_matrix(h: int, w: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """0/1 matrix (k*k, H*W*H*W): entry (tap, p*HW + q) = 1 iff output pixel p reads input
    pixel q through ``tap`` of a zero-padded k x k cross-correlation."""
    pad = k // 2
    py, px = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    py, px = py.reshape(-1, 1), px.reshape(-1, 1)
    dy = py.reshape(1, -1) - py + pad  # (p, q): qy - py + pad
    dx = px.reshape(1, -1) - px + pad
    ok = (dy >= 0) & (dy < k) & (dx >= 0) & (dx < k)
    tap = torch.where(ok, dy * k + dx, torch.full_like(dy, k * k))
    s = torch.zeros(k * k + 1, h * w * h * w, dtype=dtype)
    s[tap.reshape(-1), torch.arange(h * w * h * w)] = 1.0
    return s[: k * k].to(device)


@functools.lru_cache(maxsize=64)
def _tap_pairs(h: int, w: int, k: int) -> tuple[tuple[int, torch.Tensor, torch.Tensor], ...]:
    """For each tap of a zero-padded k x k cross-correlation on H x W: the output pixels p
    and input pixels q it joins."""
    pad = k // 2
    out = []
    for ty in range(k):
        for tx in range(k):
            ps, qs = [], []
            for py in range(h):
                for px in range(w):
                    qy, qx = py + ty - pad, px + tx - pad
                    if 0 <= qy < h and 0 <= qx < w:
                        ps.append(py * w + px)
                        qs.append(qy * w + qx)
            if ps:
                out.append((ty * k + tx, torch.tensor(ps), torch.tensor(qs)))
    return tuple(out)


def conv_matrix(a: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The ``(M*H*W) x (M*H*W)`` matrix of ``F.conv2d(., a, padding=k//2)`` on H x W images.

    Exact (a 0/1 selection, differentiable): row ``o*H*W + p``, column ``c*H*W + q``.
    """
    m, k = a.shape[0], a.shape[-1]
    if h * w == 1:
        return a[:, :, k // 2, k // 2]
    s = _tap_matrix(h, w, k, a.dtype, a.device)
    g = linear(a.reshape(m * m, k * k), s.t()).view(m, m, h * w, h * w)
    return g.permute(0, 2, 1, 3).reshape(m * h * w, m * h * w)


def conv_matrix_grad(gk: torch.Tensor, m: int, k: int, h: int, w: int) -> torch.Tensor:
    """Adjoint of :func:`conv_matrix`: the filter gradient from the matrix gradient."""
    if h * w == 1:
        ga = gk.new_zeros(m, m, k, k)
        ga[:, :, k // 2, k // 2] = gk
        return ga
    hw = h * w
    s = _tap_matrix(h, w, k, gk.dtype, gk.device)
    g = gk.view(m, hw, m, hw).permute(0, 2, 1, 3).reshape(m * m, hw * hw)
    return linear(g, s).view(m, m, k, k)


# ------------------------------------------------------------------------------------------
# the operator A for one geometry


@dataclass(frozen=True)
class Geometry:
    """Shapes of one SOC application: channels in (after space-to-depth), out, M, k, H, W."""

    cin: int
    cout: int
    m: int
    k: int
    h: int
    w: int

    @property
    def hw(self) -> int:
        return self.h * self.w

    @property
    def n(self) -> int:
        return self.m * self.hw

    @property
    def kind(self) -> str:
        """``dense`` when a padded conv would waste taps (H*W <= k*k) and n is small."""
        if self.hw == 1 or (self.hw <= self.k * self.k and self.n <= DENSE_KIND_MAX_DIM):
            return "dense"
        return "conv"

    def term_macs(self, cin: int | None = None, cout: int | None = None) -> int:
        """Multiply-adds of one application of ``A[:cout, :cin]`` to one image."""
        cin = self.m if cin is None else cin
        cout = self.m if cout is None else cout
        if self.kind == "dense":
            return cout * cin * self.hw * self.hw
        return cout * cin * self.k * self.k * self.hw

    def series_macs(self, terms: int) -> int:
        """Multiply-adds per image of the T-term series as :func:`series` computes it."""
        if terms == 0:
            return 0
        if terms == 1:
            return self.term_macs(self.cin, self.cout)
        return (
            self.term_macs(self.cin, self.m)
            + (terms - 2) * self.term_macs()
            + self.term_macs(self.m, self.cout)
        )


@dataclass
class SeriesOperator:
    """``A`` (filter ``(M, M, k, k)``) prepared for one geometry: conv filter or dense matrix.

    ``tensor`` is the filter, or for ``kind="dense"`` its matrix (:func:`conv_matrix`).
    """

    geo: Geometry
    tensor: torch.Tensor
    kind: str = field(init=False)
    _mats: dict = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.kind = self.geo.kind

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """Channels-last for CPU float32 convolutions (oneDNN runs them 10-35% faster)."""
        if self.kind == "conv" and x.device.type == "cpu" and x.dtype == torch.float32:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _matrix(self, adjoint: bool, rows: int, cols: int) -> torch.Tensor:
        """Block ``[:rows, :cols]`` of ``A`` (or ``A^T``) as a ``linear`` weight, in a layout
        oneDNN reads fast (cached while ``A`` is a constant)."""
        key = (adjoint, rows, cols)
        w = self._mats.get(key)
        if w is None:
            t = self.tensor
            w = _dense_layout(t[:cols, :rows].t() if adjoint else t[:rows, :cols])
            if not t.requires_grad:
                self._mats[key] = w
        return w

    @classmethod
    def from_filter(cls, a: torch.Tensor, geo: Geometry) -> SeriesOperator:
        if geo.kind == "dense":
            return cls(geo, conv_matrix(a, geo.h, geo.w))
        return cls(geo, a)

    # -- primitives on 4-D tensors (B, C, H, W) ---------------------------------------------
    def fwd(self, x: torch.Tensor, scale: float, cout: int) -> torch.Tensor:
        """``scale * A[:cout, :C] x`` where C = x's channels (the rest of x is zero)."""
        return self._apply(x, scale, cout, adjoint=False)

    def adj(self, g: torch.Tensor, scale: float, cout: int) -> torch.Tensor:
        """``scale * (A^T)[:cout, :C] g`` (the adjoint operator; no skew-symmetry assumed)."""
        return self._apply(g, scale, cout, adjoint=True)

    def _apply(self, x: torch.Tensor, scale: float, cout: int, adjoint: bool) -> torch.Tensor:
        geo, cin, t = self.geo, x.shape[1], self.tensor
        if self.kind == "conv":
            if adjoint:  # conv_transpose_filter(t)[:cout, :cin]
                f = torch.flip(t[:cin, :cout].transpose(0, 1), dims=(2, 3))
            else:
                f = t[:cout, :cin]
            if scale != 1.0:
                f = f * scale
            return F.conv2d(x, f, padding=geo.k // 2)
        hw = geo.hw
        y = linear(x.reshape(x.shape[0], cin * hw), self._matrix(adjoint, cout * hw, cin * hw))
        if scale != 1.0:
            y = y.mul_(scale) if not y.requires_grad else y * scale
        return y.view(x.shape[0], cout, geo.h, geo.w)

    def wgrad(self, x: torch.Tensor, g: torch.Tensor, scale: float, out: torch.Tensor) -> None:
        """``out[:G, :C] += scale * d<g, A x>/dA`` for x with C channels and g with G; ``out``
        is filter-shaped ``(M, M, k, k)`` for both kinds."""
        geo, cin, cout = self.geo, x.shape[1], g.shape[1]
        if self.kind == "conv":
            gw = torch.nn.grad.conv2d_weight(x, (cout, cin, geo.k, geo.k), g, padding=geo.k // 2)
            out[:cout, :cin].add_(gw, alpha=scale)
        else:  # per tap: sum over the pixel pairs (p, q) it joins of g_p^T x_q (no n x n temp)
            b, hw, k = x.shape[0], geo.hw, geo.k
            xs = x.reshape(b, cin, hw).permute(2, 0, 1).contiguous()  # (hw, B, C)
            gs = g.reshape(b, cout, hw).permute(2, 0, 1).contiguous()
            for tap, ps, qs in _tap_pairs(geo.h, geo.w, k):
                gt = gs[ps.to(gs.device)].reshape(-1, cout)
                xt = xs[qs.to(xs.device)].reshape(-1, cin)
                out[:cout, :cin, tap // k, tap % k].add_(linear(gt.t(), xt.t()), alpha=scale)


# ------------------------------------------------------------------------------------------
# the series, forward


def _add_input(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``z += pad(x)`` on the channels both have (x zero-padded / truncated to z's)."""
    c = min(z.shape[1], x.shape[1])
    z[:, :c] += x[:, :c]
    return z


def _power_sum(
    op: SeriesOperator, x: torch.Tensor, terms: int, identity: bool = True
) -> torch.Tensor:
    """``sum_{i<=T} (A^i / i!) pad(x)``, truncated; term order as ``SOC.series``. Without
    ``identity`` the ``i = 0`` term is left out (dense operators keep it exact, apart)."""
    geo = op.geo
    if terms == 0:
        z = x.new_zeros(x.shape[0], geo.cout, geo.h, geo.w)
        return _add_input(z, x) if identity else z
    x = op.layout(x)
    cur, z = x, None
    for i in range(1, terms + 1):
        nxt = op.fwd(cur, 1.0 / i, geo.cout if i == terms else geo.m)
        if z is None:
            # z aliases c_1's buffer; it is only written once c_1 has been consumed
            z = nxt[:, : geo.cout]
            if terms == 1 and identity:
                _add_input(z, x)
        else:
            if i == 2 and identity:
                _add_input(z, x)  # (x + c_1) + c_2 + ...: the order of SOC.series
            z += nxt[:, : geo.cout]
        cur = nxt
    return z.contiguous()


def _horner(op: SeriesOperator, x: torch.Tensor, terms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Horner: ``y_T = pad(x)``, ``y_k = pad(x) + A y_{k+1} / (k+1)``; returns (y_0, y_1)."""
    geo = op.geo
    x = op.layout(x)
    y = x
    y1 = x
    for kk in range(terms - 1, -1, -1):
        t = op.fwd(y, 1.0 / (kk + 1), geo.cout if kk == 0 else geo.m)
        _add_input(t, x)
        if kk == 1:
            y1 = t
        y = t
    if terms == 0:
        y = _add_input(x.new_zeros(x.shape[0], geo.cout, geo.h, geo.w), x)
    return y.contiguous(), y1


def series_no_grad(
    op: SeriesOperator, x: torch.Tensor, terms: int, identity: bool = True
) -> torch.Tensor:
    """The series without autograd (eval, certification, building dense operators)."""
    with torch.no_grad():
        return _power_sum(op, x, terms, identity)


# ------------------------------------------------------------------------------------------
# the series, backward


def _engine_needs(ctx_flag: bool, t: torch.Tensor) -> bool:
    """Whether this backward pass needs the gradient of ``t`` (False for ``autograd.grad``
    w.r.t. the input only): skips the filter gradient in attacks."""
    if not ctx_flag:
        return False
    node = t.grad_fn
    probe = getattr(torch._C, "_will_engine_execute_node", None)
    if node is None or probe is None:
        return True
    try:
        return bool(probe(node))
    except (RuntimeError, TypeError):
        return True


class _Series(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, geo, const_op, terms, mode):  # noqa: ANN001, ANN205
        op = const_op if const_op is not None else SeriesOperator.from_filter(a, geo)
        want_w = a is not None and a.requires_grad
        ctx.geo, ctx.terms, ctx.mode, ctx.const_op, ctx.want_w = geo, terms, mode, const_op, want_w
        if mode == "horner":
            z, act = _horner(op, x, terms)
        else:
            z, act = _power_sum(op, x, terms), x
        # only what backward needs: the filter (unless the operator is a cached constant)
        # and, for the filter gradient, the input (exact) or the last Horner state
        keep_a = const_op is None or want_w
        ctx.save_for_backward(act if want_w else None, a if keep_a else None)
        return z

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        act, a = ctx.saved_tensors
        geo = ctx.geo
        op = ctx.const_op if ctx.const_op is not None else SeriesOperator.from_filter(a, geo)
        need_x = ctx.needs_input_grad[0]
        need_w = ctx.want_w and _engine_needs(ctx.needs_input_grad[1], a)
        g = g.contiguous()
        if ctx.mode == "horner":
            gx, gk = _horner_backward(op, g, act, ctx.terms, need_x, need_w)
        else:
            gx, gk = _exact_backward(op, g, act, ctx.terms, need_x, need_w)
        return gx, gk, None, None, None, None


def _exact_backward(
    op: SeriesOperator, g: torch.Tensor, x: torch.Tensor | None, terms: int,
    need_x: bool, need_w: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Reverse sweep of ``c_i = A c_{i-1} / i``, ``z = sum c_i``: adjoint states
    ``gbar_{i-1} = g + A^T gbar_i / i``; filter gradient ``sum_i wgrad(c_{i-1}, gbar_i) / i``
    with the ``c_i`` recomputed from the saved input."""
    geo = op.geo
    g = op.layout(g)
    cs: list[torch.Tensor] = []
    gk = None
    if need_w:
        assert x is not None
        gk = op.tensor.new_zeros(geo.m, geo.m, geo.k, geo.k)
        cur = op.layout(x)
        cs.append(cur)
        for i in range(1, terms):
            cur = op.fwd(cur, 1.0 / i, geo.m)
            cs.append(cur)
    gb = g  # gbar_T: the output gradient, zero beyond cout
    for i in range(terms, 0, -1):
        if need_w:
            op.wgrad(cs.pop(), gb, 1.0 / i, gk)
        if i > 1 or need_x:
            nb = op.adj(gb, 1.0 / i, geo.m if i > 1 else geo.cin)
            gb = _add_input(nb, g)
        else:
            gb = None
    if terms == 0 and need_x:
        gb = _add_input(g.new_zeros(g.shape[0], geo.cin, geo.h, geo.w), g)
    return (gb.contiguous() if need_x else None), gk


def _horner_backward(
    op: SeriesOperator, g: torch.Tensor, y1: torch.Tensor | None, terms: int,
    need_x: bool, need_w: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Adjoint Horner ``h_T = g``, ``h_k = g + A^T h_{k+1}/(k+1)`` (exact input gradient
    ``h_0``); APPROXIMATE filter gradient ``wgrad(y_1, h_1)`` (Singla & Feizi 2022)."""
    geo = op.geo
    g = op.layout(g)
    h = g
    for kk in range(terms - 1, 0, -1):
        h = _add_input(op.adj(h, 1.0 / (kk + 1), geo.m), g)
    gk = None
    if need_w and terms > 0:
        assert y1 is not None
        gk = op.tensor.new_zeros(geo.m, geo.m, geo.k, geo.k)
        op.wgrad(y1, h, 1.0, gk)
    gx = None
    if need_x:
        if terms == 0:
            gx = _add_input(g.new_zeros(g.shape[0], geo.cin, geo.h, geo.w), g)
        else:
            gx = _add_input(op.adj(h, 1.0, geo.cin), g).contiguous()
    return gx, gk


def series(
    x: torch.Tensor,
    terms: int,
    mode: str = "exact",
    *,
    op: SeriesOperator | None = None,
    a: torch.Tensor | None = None,
    geo: Geometry | None = None,
) -> torch.Tensor:
    """Differentiable ``x -> P(A) pad(x)`` truncated, with the memory-lean backward.

    ``x``: (B, cin, H, W) after space-to-depth (not channel-padded). Give ``op``, a constant
    operator (the eval cache), and/or the filter ``a`` (which may require grad: train mode, or
    eval mode when the weights need gradients) and ``geo``. With both, ``op`` computes and
    ``a`` only receives the filter gradient.
    """
    if mode not in ("exact", "horner"):
        raise ValueError(f"mode must be 'exact' or 'horner', got {mode!r}")
    if op is None and (a is None or geo is None):
        raise ValueError("series needs op, or a and geo")
    geo = op.geo if op is not None else geo
    needs_graph = torch.is_grad_enabled() and (
        x.requires_grad or (a is not None and a.requires_grad)
    )
    if not needs_graph:
        with torch.no_grad():
            if op is None:
                op = SeriesOperator.from_filter(a, geo)
            return _horner(op, x, terms)[0] if mode == "horner" else _power_sum(op, x, terms)
    return _Series.apply(x, a, geo, op, terms, mode)


# ------------------------------------------------------------------------------------------
# materialised dense operators


class _Dense(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, bias):  # noqa: ANN001, ANN205
        ctx.save_for_backward(p)
        ctx.has_bias = bias is not None
        return linear(x, p, bias)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        (p,) = ctx.saved_tensors
        gx = linear(g, p.t()) if ctx.needs_input_grad[0] else None
        gb = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, None, gb


def dense_apply(x: torch.Tensor, p: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x.flatten(1) @ p.T + bias`` with ``p`` a constant (input and bias gradients only)."""
    x2 = x.reshape(x.shape[0], -1)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _Dense.apply(x2, p, bias)
    with torch.no_grad():
        return linear(x2, p, bias)


# ------------------------------------------------------------------------------------------
# activation memory


@dataclass
class SavedBytes:
    """Bytes kept alive for backward (unique storages) and the raw sum over saves."""

    unique: int = 0
    total: int = 0
    count: int = 0
    _seen: dict = field(default_factory=dict, repr=False)


@contextlib.contextmanager
def saved_tensor_bytes() -> Iterator[SavedBytes]:
    """Measure what autograd saves for backward inside the block (``saved_tensors_hooks``).

    ``unique`` counts each storage once (a tensor saved by several ops costs memory once).
    """
    meter = SavedBytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        key = (st.data_ptr(), t.device.type)
        nbytes = st.nbytes()
        meter.total += t.numel() * t.element_size()
        meter.count += 1
        if nbytes > meter._seen.get(key, -1):
            meter.unique += nbytes - max(meter._seen.get(key, 0), 0)
            meter._seen[key] = nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield meter
