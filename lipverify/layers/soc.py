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

Speed (same function; see :mod:`lipverify.layers.soc_fast` and
:mod:`lipverify.layers.soc_materialize`): the forward sums the series with ``A/i`` folded into
the filter and without computing padded input channels or truncated output channels; the
backward does not store the Taylor terms (exact gradients; ``fast_train=True`` swaps in the
approximate filter gradient of Singla & Feizi 2022). In eval mode ``A`` is cached, keyed on
*content* (:class:`~lipverify.layers.weight_cache.WeightSnapshot`): it is served only while the
filter, the vectors and ``correction`` are bit for bit those it was computed from (same dtype,
device and shape) and ``eval_terms`` and the mode are unchanged, so no weight update
(``.data`` or NumPy-view writes included) leaves eval outputs stale. :func:`materialize` /
:func:`fast_eval` replace small layers by their dense matrix ``P`` (built from the same
series, never ``matrix_exp``) when asked to, for audits and whole-test-set certification;
a dense operator is checked against the weights the same way at every call.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lipverify.layers.soc_fast import Geometry, SeriesOperator
from lipverify.layers.soc_fast import series as _fast_series
from lipverify.layers.weight_cache import WeightSnapshot

__all__ = [
    "SOC",
    "space_to_depth",
    "skew_filter",
    "fantastic_four",
    "conv_transpose_filter",
    "materialize",
    "fast_eval",
    "release",
    "set_fast_train",
]


def space_to_depth(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Channel ``c*s*s + a*s + b`` takes pixel offset (a, b): ``pixel_unshuffle``. An isometry."""
    return x if stride == 1 else F.pixel_unshuffle(x, stride)


def space_to_depth_checked(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """:func:`space_to_depth` by ``layer.stride``, refusing an input whose channel count is not
    the layer's (``layer.in_channels`` counts channels after space-to-depth)."""
    xs = space_to_depth(x, layer.stride)
    if xs.shape[1] != layer.in_channels:
        s2 = layer.stride**2
        raise ValueError(f"{type(layer).__name__} expects {layer.in_channels // s2} input "
                         f"channels, got {xs.shape[1] // s2}")
    return xs


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


def _unfoldings(s: torch.Tensor) -> dict[int, torch.Tensor]:
    """Matrices ``M_i`` with ``<s, u_i v_i> = v_i^T M_i u_i`` (rows: v's dims, columns: u's):
    power-iteration steps become matrix-vector products (one read of ``s`` each, instead of a
    filter-sized product and a reduction)."""
    mats = {}
    for i in range(1, 5):
        vd = tuple(d for d in range(4) if d not in _V_DIMS[i])
        ud = tuple(d for d in range(4) if d not in _U_DIMS[i])
        rows = math.prod(s.shape[d] for d in vd)
        mats[i] = s.permute(*vd, *ud).reshape(rows, -1)
    return mats


class _Sigma(torch.autograd.Function):
    """``<s, u v>`` whose value was computed already; gradient ``g u v`` with respect to s."""

    @staticmethod
    def forward(s: torch.Tensor, value: torch.Tensor, u: torch.Tensor, v: torch.Tensor):  # noqa: ANN205
        return value.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        _, _, u, v = inputs
        ctx.save_for_backward(u.clone(), v.clone())  # the buffers move on in place

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        u, v = ctx.saved_tensors
        return g * u * v, None, None, None


def fantastic_four(
    s: torch.Tensor, vectors: dict[str, torch.Tensor], iters: int
) -> torch.Tensor:
    """Run ``iters`` power-iteration steps in place on the four reshapings of ``s``.

    Returns ``sigma = min_i <s, u_i v_i>``: an *estimate*, a bilinear form with the stored
    vectors, which is neither an upper nor a lower bound on the operator norm. Differentiable
    with respect to ``s`` (the gradient of the minimal form).
    """
    with torch.no_grad():
        mats = _unfoldings(s.detach())
        for _ in range(iters):
            for i in range(1, 5):
                u, v = vectors[f"u{i}"], vectors[f"v{i}"]
                v.copy_(_l2_normalize(torch.mv(mats[i], u.reshape(-1))).view_as(v))
                u.copy_(_l2_normalize(torch.mv(mats[i].t(), v.reshape(-1))).view_as(u))
        values = torch.stack([
            torch.dot(vectors[f"v{i}"].reshape(-1), torch.mv(mats[i], vectors[f"u{i}"].reshape(-1)))
            for i in range(1, 5)
        ])
        j = int(torch.argmin(values)) + 1 if not torch.isnan(values).any() else 1
        value = values.min() if not torch.isnan(values).any() else values.sum()
    if torch.is_grad_enabled() and s.requires_grad:
        return _Sigma.apply(s, value, vectors[f"u{j}"], vectors[f"v{j}"])
    return value


class _CachedFilter(torch.autograd.Function):
    """Forward: the eval cache's ``A`` (nothing recomputed). Backward (run only when a weight
    gradient is asked for): the gradient of the normalization ``W -> A``, recomputed from the
    cache's own copy of the weights ``A`` was computed from (so a later write to the live
    weights cannot change it)."""

    @staticmethod
    def forward(ctx, w, snapshot, a):  # noqa: ANN001, ANN205
        ctx.snapshot = snapshot
        return a.view_as(a)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # noqa: ANN001, ANN205
        w, correction, *vecs = ctx.snapshot.copies
        vectors = dict(zip(SOC.VECTOR_NAMES, (v.clone() for v in vecs), strict=True))
        with torch.enable_grad():
            wd = w.detach().clone().requires_grad_(True)
            s = skew_filter(wd)
            a = s * (correction / fantastic_four(s, vectors, 0))
            (gw,) = torch.autograd.grad(a, wd, g)
        return gw, None, None


def _functorch_active() -> bool:
    probe = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(probe()) if probe is not None else False


class SOC(nn.Module):
    """Skew orthogonal convolution from ``in_channels`` to ``out_channels``.

    Parameter and buffer names follow the reference code, so its ``state_dict`` loads as is.
    ``train_terms``/``eval_terms`` are the highest Taylor power T in each mode.
    """

    #: the power-iteration buffers, in the order of :meth:`_weight_parts`
    VECTOR_NAMES = tuple(f"{c}{i}" for i in range(1, 5) for c in "uv")

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
        fast_train: bool = False,
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
        #: train mode: approximate filter gradient of Singla & Feizi 2022 (see soc_fast)
        self.fast_train = fast_train
        self._eval_cache: dict[str, Any] | None = None  # never part of state_dict
        self._dense: Any = None  # a soc_materialize.DenseOperator, never part of state_dict
        self._frozen = False  # set by fast_eval: weights are constants (no weight gradients)

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
        iters = 0
        if self.training:
            first = self.total_iters % self.update_freq == 0
            self.total_iters += 1
            iters = self.init_iters if first else self.update_iters
        return s * (self.correction / fantastic_four(s, self._vectors(), iters))

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """Space-to-depth, then zero-pad channels up to ``max_channels``."""
        x = space_to_depth_checked(self, x)
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

    # -- fast paths (same function) ------------------------------------------------------
    def _weight_parts(self) -> list[torch.Tensor]:
        """Everything ``A`` depends on: filter, ``correction``, then :data:`VECTOR_NAMES`."""
        parts = [self.random_conv_filter, self.correction]
        return parts + [getattr(self, name) for name in self.VECTOR_NAMES]

    def _weights_extra(self) -> tuple:
        return (self.eval_terms, self.training)

    def weights_snapshot(self) -> WeightSnapshot:
        """A private bitwise copy of everything ``A`` (and so a dense operator) depends on:
        the filter, ``correction``, the vectors, ``eval_terms`` and the mode."""
        return WeightSnapshot(self._weight_parts(), self._weights_extra())

    def same_weights(self, snapshot: WeightSnapshot | None) -> bool:
        """Whether the weights are bit for bit those of ``snapshot`` (any update, whatever
        the idiom: in place, through ``.data`` or a NumPy view, ``load_state_dict``,
        re-assignment, a dtype or device change, makes this False)."""
        return snapshot is not None and snapshot.matches(
            self._weight_parts(), self._weights_extra()
        )

    def _geometry(self, xs: torch.Tensor) -> Geometry:
        return Geometry(
            self.in_channels, self.out_channels, self.max_channels, self.kernel_size,
            xs.shape[-2], xs.shape[-1],
        )

    def eval_operator(self, xs: torch.Tensor) -> SeriesOperator:
        """The cached (eval mode) operator ``A`` for inputs shaped like ``xs`` (after
        space-to-depth). Rebuilt unless the weights are bit for bit those of the cache's
        snapshot (:meth:`same_weights`)."""
        cache = self._eval_cache
        if cache is None or not self.same_weights(cache["snapshot"]):
            snapshot = self.weights_snapshot()
            with torch.inference_mode(False), torch.no_grad():
                w, correction, *vecs = snapshot.copies  # A is computed from the copy itself
                s = skew_filter(w)  # the eval-mode (pure) formula
                vectors = dict(zip(self.VECTOR_NAMES, vecs, strict=True))
                a = s * (correction / fantastic_four(s, vectors, 0))
            cache = {"snapshot": snapshot, "a": a, "ops": {}}
            self._eval_cache = cache
        geo = self._geometry(xs)
        op = cache["ops"].get(geo)
        if op is None:
            with torch.inference_mode(False), torch.no_grad():
                op = SeriesOperator.from_filter(cache["a"], geo)
            cache["ops"] = {geo: op}  # one input size at a time
        return op

    def clear_cache(self) -> None:
        """Drop the cached eval operator (the dense operator stays; see :func:`release`)."""
        self._eval_cache = None

    def train(self, mode: bool = True) -> SOC:
        if mode != self.training:
            self._eval_cache = None
        return super().train(mode)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_eval_cache"] = None
        state["_dense"] = None
        return state

    def _s2d(self, x: torch.Tensor) -> torch.Tensor:
        return space_to_depth_checked(self, x)

    def _add_bias(self, z: torch.Tensor) -> torch.Tensor:
        return z if self.bias is None else z + self.bias.view(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _functorch_active():  # torch.func transforms: the plain differentiable series
            return self.reference_forward(x)
        if self.training:
            a = self.normalized_filter()  # advances power iteration, as the reference does
            xs = self._s2d(x)
            mode = "horner" if self.fast_train else "exact"
            z = _fast_series(xs, self.train_terms, mode, a=a, geo=self._geometry(xs))
            return self._add_bias(z)
        dense = self._dense
        if dense is not None:
            if dense.valid_for(self):
                if dense.accepts(x):
                    return dense(x, self.bias)
            else:
                self._dense = None  # the weights changed: never use a stale operator
        xs = self._s2d(x)
        weights_need_grad = (
            torch.is_grad_enabled() and not self._frozen
            and self.random_conv_filter.requires_grad
        )
        op = self.eval_operator(xs)
        if weights_need_grad:
            cache = self._eval_cache
            # the cached A, with the gradient of the normalization recomputed if asked for
            a = _CachedFilter.apply(self.random_conv_filter, cache["snapshot"], cache["a"])
            return self._add_bias(_fast_series(xs, self.eval_terms, op=op, a=a, geo=op.geo))
        return self._add_bias(_fast_series(xs, self.eval_terms, op=op))

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The plain implementation (one conv per power, plain autograd): the oracle."""
        a = self.normalized_filter()
        return self.finish_output(self.series(self.prepare_input(x), a, self.terms))

    def extra_repr(self) -> str:
        return (
            f"in={self.in_channels // self.stride**2}, out={self.out_channels}, "
            f"kernel={self.kernel_size}, stride={self.stride}, "
            f"T={self.train_terms}/{self.eval_terms}"
            + (", fast_train" if self.fast_train else "")
        )


def set_fast_train(model: nn.Module, enabled: bool = True) -> int:
    """Set ``fast_train`` on every SOC in ``model``; returns how many layers were set."""
    count = 0
    for m in model.modules():
        if isinstance(m, SOC):
            m.fast_train = enabled
            count += 1
    return count


def materialize(model: nn.Module, input_size: Any = None, cache_dir: Any = None, **kw: Any):
    """Build dense operators for the small SOC layers of ``model`` (see
    :func:`lipverify.layers.soc_materialize.materialize`)."""
    from lipverify.layers.soc_materialize import materialize as _materialize

    return _materialize(model, input_size, cache_dir, **kw)


def release(model: nn.Module) -> None:
    """Drop every dense operator and eval cache held by the SOC layers of ``model``."""
    from lipverify.layers.soc_materialize import release as _release

    _release(model)


@contextmanager
def fast_eval(model: nn.Module, input_size: Any = None, cache_dir: Any = None,
              **kw: Any) -> Iterator[Any]:
    """Eval mode with constant weights (no weight gradients) and materialised small layers,
    restored on exit; weights written inside the scope are still seen (see
    :func:`lipverify.layers.soc_materialize.fast_eval`)."""
    from lipverify.layers.soc_materialize import fast_eval as _fast_eval

    with _fast_eval(model, input_size, cache_dir, **kw) as report:
        yield report
