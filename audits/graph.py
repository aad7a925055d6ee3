"""Guaranteed Lipschitz bounds over a captured graph: one rule per ATen op, named patterns.

The graph is the core-ATen program of :mod:`lipverify.audits.capture`. Every node is either a
*constant* (it depends on parameters and buffers only: evaluated once, in the model's dtype,
then read exactly in float64) or a *value* that depends on the input ``x``, carrying ``L``, an
upper bound on its Lipschitz constant (l2 -> l2, per sample) as a function of ``x``.

Composition: a one-input op with constant ``c`` gives ``c L``; ``a + b`` gives ``L_a + L_b``
(triangle inequality). *Gathers* (view, permute, slice, split, cat, pad, flip, expand,
``where`` with a constant mask, ...: each output entry copies one input entry or a constant)
are tracked exactly: every value that is not a gather of another carries an index map, so a
gather of values ``u_r`` gets ``L^2 = sum_r max_j mult(j) L_r^2`` (the multiplicity of each
source entry), which is ``sqrt(sum L_i^2)`` for a concatenation of outputs of a shared
input and ``max L_i`` for disjoint slices.

Rules per op (each a guaranteed bound, its condition checked; float64, margin ``1 + SAFETY``):

* convolution and transposed convolution (any stride, dilation, groups; a transposed conv by
  its adjoint): :func:`~lipverify.audits.operators.strided_conv_norm`, or the exact SVD when
  small; a gather that circularly or zero pads its input right before a conv with no padding
  is folded into the conv (circular: exact per-frequency SVD on the input grid);
* ``mm``/``addmm``/``bmm`` with one constant operand: exact SVD of the constant;
* batch norm in eval mode: ``max |gamma| / sqrt(var + eps)`` (``var + eps > 0`` checked);
* average, adaptive average pooling, ``sum``, ``mean`` (nonnegative linear maps): the Schur
  test ``sqrt(max(A 1) max(A^T 1))``; max and adaptive max pooling, ``amax``/``max.dim``:
  ``sqrt`` of the most windows sharing an input;
* multiplication and division by constants (``max |c|``, times ``sqrt`` of the broadcast);
* elementwise activations with their constants (softplus only with ``threshold = inf``);
* lipverify's layers (``lipverify::leaf``): the caller's per-layer route.

Named patterns (lemma, precondition checked on the graph):

* *sort pairs*: ``(max(a, b), min(a, b))``, ``(min, max)`` over a dimension, and ``sort``
  are 1-Lipschitz from their inputs jointly (sorting is 1-Lipschitz in l2), so MaxMin,
  GroupSort and full sort cost 1 where op-by-op composition gives ``sqrt 2``; a lone
  ``max(a, b)`` satisfies ``||D max||^2 <= ||D a||^2 + ||D b||^2``;
* *CReLU*: ``(relu(a), relu(-a))`` is 1-Lipschitz from ``a``;
* *centering*: ``a - mean(a, dims, keepdim)`` is the orthogonal projection ``I - P``: 1;
* *l2-norm merges*: ``sqrt(sum_k M_k(v_k^2) + eps)`` with nonnegative linear ``M_k`` (pooling,
  sums, nonnegative constants, gathers) and ``eps >= 0`` has
  ``L^2 <= sum_k max_j (M_k^T 1)_j L_k^2`` (reverse triangle inequality per output, then a
  sum): l2-norm pooling and ``sqrt(a x^2 + b f(x)^2 + eps)``;
  ``sign(q) * relu(abs(q))`` of such a ``q >= 0`` is ``q`` (LPPool's decomposition).

Anything else that depends on ``x`` is *refused* with its node and reason: no bound is
released for a graph with a refusal.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lipverify.audits.capture import LEAF_OP, Captured, leaf_module
from lipverify.audits.lemmas import identity_filter, sdp_residual_factor
from lipverify.audits.operators import adaptive_multiplicity as _adaptive_mult
from lipverify.audits.operators import (
    dense_spectral_norm,
    inflate,
    linear_norm,
    schur_bound,
    strided_conv_norm,
    window_multiplicity,
)

__all__ = ["NodeBound", "GraphBound", "bound_graph", "LeafBound", "ROUNDING"]

aten = torch.ops.aten
ROUNDING = 1e-12
"""Final relative margin on a graph bound: float64 rounding of the products and sums."""

LeafBound = Callable[[torch.nn.Module, tuple[int, ...]], tuple[float | None, str]]


class Refused(Exception):
    """No bound for this node (the message says why)."""


@dataclass
class NodeBound:
    """One node's bound: ``local`` is the op's own constant (None for merges); ``cumulative``
    bounds the Lipschitz constant of the node's value as a function of the input."""

    name: str
    op: str
    module: str
    local: float | None
    cumulative: float
    rule: str


@dataclass
class GraphBound:
    upper: float | None
    nodes: list[NodeBound] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    leaves: list[tuple[str, torch.nn.Module, tuple[int, ...]]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# abstract values


@dataclass
class Const:
    value: object


@dataclass(eq=False)
class Var:
    """An input-dependent tensor: ``L`` bounds its Lipschitz constant; ``idx`` (float64, same
    shape) gives, per entry, the global source index it copies (0: a constant)."""

    shape: tuple[int, ...]
    L: float
    idx: torch.Tensor
    src: tuple[torch.Tensor, torch.Tensor] | None = None
    """``(source index map, c^2 per entry)``: the value is an elementwise function of a
    gather, entry ``i`` being ``c_i``-Lipschitz in source entry ``src[0][i]``."""
    lin: Lin | None = None
    act: Act | None = None
    res: Res | None = None
    chain: tuple[Var, Callable[[torch.Tensor], torch.Tensor]] | None = None
    """``(root, f)``: the value is ``f(root) + const`` with ``f`` linear (float64): the
    maximal linear subgraph ending here, for an exact merged bound where it is small."""


@dataclass(eq=False)
class Lin:
    """The value is ``A(root) + const``: a conv (weight, geometry) or a dense map
    (``root_flat @ weight.T``) of ``root``, weights in float64."""

    root: Var
    kind: str
    weight: torch.Tensor
    geom: tuple = ()
    shape: tuple = ()
    """The shape of the map's output (a conv may crop or pad)."""

    def scaled(self, c: float) -> Lin:
        return Lin(self.root, self.kind, self.weight * c, self.geom, self.shape)


@dataclass(eq=False)
class Act:
    """The value is ``D * s(lin)``: ``s`` monotone with slope in [0, 1], ``D >= 0``."""

    lin: Lin
    d: torch.Tensor


@dataclass(eq=False)
class Res:
    """The value is ``coef * K^T D s(K root + b)`` with ``n >= ||D^(1/2) K||``."""

    root: Var
    n: float
    coef: float


@dataclass(eq=False)
class Quad:
    """``sum_k M_k(v_k^2) + eps`` with ``M_k`` nonnegative linear maps (float64)."""

    shape: tuple[int, ...]
    terms: list[tuple[Var, Callable[[torch.Tensor], torch.Tensor]]]
    eps: torch.Tensor


@dataclass(eq=False)
class SignOf:
    quad: Quad


@dataclass(eq=False)
class Opaque:
    """Input-dependent but not Lipschitz (indices of a sort or max): any use is refused."""

    what: str


@dataclass
class Tup:
    items: list


class _Space:
    """The global index space: each root value owns a contiguous range of indices."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.lips: list[float] = []
        self.next = 1

    def fresh(self, shape: Sequence[int], lip: float) -> Var:
        n = math.prod(shape)
        self.starts.append(self.next)
        self.lips.append(lip)
        idx = torch.arange(self.next, self.next + n, dtype=torch.float64).reshape(shape)
        self.next += n
        return Var(tuple(shape), lip, idx)

    def gather_lip(self, counts_idx: torch.Tensor, weights: torch.Tensor | None = None) -> float:
        """``sqrt(sum_r max_{j in r} w(j) L_r^2)``, ``w(j)`` the (weighted) count of ``j``."""
        flat = counts_idx.reshape(-1)
        w = torch.ones_like(flat) if weights is None else weights.reshape(-1)
        keep = flat > 0
        flat, w = flat[keep], w[keep]
        if flat.numel() == 0:
            return 0.0
        uniq, inv = torch.unique(flat, return_inverse=True)
        tot = torch.zeros(uniq.shape, dtype=torch.float64).index_add_(0, inv, w)
        starts = torch.tensor(self.starts, dtype=torch.float64)
        root = torch.searchsorted(starts, uniq, right=True) - 1
        best = torch.zeros(len(self.starts), dtype=torch.float64).scatter_reduce_(
            0, root, tot, reduce="amax")
        lips = torch.tensor(self.lips, dtype=torch.float64)
        used = best > 0
        total = float((best[used] * lips[used] ** 2).sum())
        return math.sqrt(total) if math.isfinite(total) else math.inf


# --------------------------------------------------------------------------------------------
# op classes

_GATHERS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
    aten.expand.default, aten.slice.Tensor, aten.select.int, aten.squeeze.dim,
    aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default, aten.cat.default,
    aten.split_with_sizes.default, aten.split.Tensor, aten.unbind.int, aten.clone.default,
    aten.alias.default, aten.flip.default, aten.roll.default, aten.repeat.default,
    aten.constant_pad_nd.default, aten.slice_scatter.default, aten.select_scatter.default,
    aten.copy.default, aten.index_select.default, aten.index.Tensor,
    aten.reflection_pad1d.default, aten.reflection_pad2d.default,
    aten.reflection_pad3d.default, aten.replication_pad1d.default,
    aten.replication_pad2d.default, aten.replication_pad3d.default,
    aten._unsafe_index.Tensor, aten.pixel_shuffle.default, aten.pixel_unshuffle.default,
    aten.transpose.int, aten.t.default, aten.detach.default, aten.lift_fresh_copy.default,
    aten.diagonal.default, aten.narrow.default,
    aten.where.self, aten.im2col.default, aten.unfold.default, aten.upsample_nearest2d.vec,
    aten.upsample_nearest2d.default, aten.expand_copy.default, aten.permute_copy.default,
    aten.view_copy.default, aten.contiguous.default if hasattr(aten, "contiguous") else None,
}
_GATHERS.discard(None)

_NO_OPS = {aten._assert_tensor_metadata.default} if hasattr(
    aten, "_assert_tensor_metadata") else set()
"""Checks that compute nothing (export's dtype/device assertions)."""

_QUAD_GATHERS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
    aten.expand.default, aten.slice.Tensor, aten.select.int, aten.squeeze.dim,
    aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default, aten.clone.default,
    aten.alias.default, aten.flip.default, aten.transpose.int, aten.t.default,
}
"""Gathers that copy every output entry from the input (no constant entries, no scatter):
the only ones allowed inside the nonnegative linear maps of an l2-norm merge."""

_IDENTITY = {aten._to_copy.default, aten.clone.default, aten.detach.default,
             aten.alias.default, aten.lift_fresh_copy.default}


def _unary_constant(node: torch.fx.Node) -> tuple[float, str] | None:
    t, a = node.target, node.args
    kw = node.kwargs
    if t in (aten.relu.default, aten.abs.default, aten.neg.default, aten.tanh.default,
             aten.hardtanh.default, aten.sin.default, aten.cos.default, aten.atan.default,
             aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default,
             aten.log_sigmoid_forward.default):
        return 1.0, "1-Lipschitz elementwise"
    if t is aten.sigmoid.default:
        return 0.25, "sigmoid' <= 1/4"
    if t is aten.hardsigmoid.default:
        return 1 / 6, "hardsigmoid' <= 1/6"
    if t is aten.hardswish.default:
        return 1.5, "|hardswish'| <= 3/2"
    if t is aten.silu.default:
        return 1.1, "|silu'| <= 1.0998"
    if t is aten.gelu.default:
        return 1.13, "|gelu'| <= 1.1290 (exact and tanh forms)"
    if t is aten.erf.default:
        return 2 / math.sqrt(math.pi) * (1 + 1e-15), "erf' <= 2/sqrt(pi)"
    if t is aten.leaky_relu.default:
        slope = float(a[1]) if len(a) > 1 else float(kw.get("negative_slope", 0.01))
        if not math.isfinite(slope):
            raise Refused("leaky_relu with a non-finite slope")
        return max(1.0, abs(slope)), "max(1, |slope|)"
    if t is aten.elu.default:
        alpha, scale, iscale = (list(a[1:]) + [1.0, 1.0, 1.0])[:3]
        vals = [float(alpha), float(scale), float(iscale)]
        if not all(math.isfinite(v) for v in vals) or vals[2] < 0:
            raise Refused("elu needs finite parameters and input_scale >= 0 (exp(i x) is "
                          "unbounded for i < 0)")
        return max(abs(vals[1]), abs(vals[1] * vals[0] * vals[2])), "elu: max(|s|, |s a i|)"
    if t is aten.softplus.default:
        beta = float(a[1]) if len(a) > 1 else 1.0
        thr = float(a[2]) if len(a) > 2 else 20.0
        if thr != math.inf or not math.isfinite(beta) or beta <= 0:
            raise Refused(f"softplus with threshold {thr:g} jumps by log(1+e^-t)/beta at the "
                          "threshold: not Lipschitz")
        return 1.0, "softplus (threshold inf)"
    return None


_NONNEG_LINEAR = {aten.avg_pool2d.default, aten.avg_pool1d.default, aten.avg_pool3d.default,
                  aten._adaptive_avg_pool2d.default, aten.adaptive_avg_pool1d.default,
                  aten._adaptive_avg_pool3d.default, aten.sum.dim_IntList, aten.mean.dim,
                  aten.sum.default, aten.mean.default, aten.upsample_bilinear2d.vec,
                  aten.upsample_bilinear2d.default}


_LINEAR_OPS = {aten.convolution.default, aten.mm.default, aten.addmm.default,
               aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor,
               aten.avg_pool2d.default, aten._adaptive_avg_pool2d.default, aten.mean.dim,
               aten.sum.dim_IntList}
"""Ops whose value, when one operand depends on the input (or both, for +/-), is a linear
map of it plus a constant: they extend a linear chain."""
_POOL_DIMS = {aten.max_pool2d_with_indices.default: 2, aten.max_pool2d.default: 2,
              aten.max_pool1d.default: 1, aten.max_pool3d_with_indices.default: 3}
_WEIGHTED = {aten.convolution.default, aten.mm.default, aten.addmm.default, aten.mul.Tensor,
             aten.div.Tensor, aten._native_batch_norm_legit_no_training.default}


def _pair(v: object, n: int = 2) -> list[int]:
    if isinstance(v, (list, tuple)):
        v = list(v)
        return [int(x) for x in (v * n if len(v) == 1 else v)]
    return [int(v)] * n


# --------------------------------------------------------------------------------------------
# the interpreter


class _Interpreter:
    def __init__(self, cap: Captured, leaf_bound: LeafBound, exact_max_dim: int,
                 lemmas: bool = True) -> None:
        self.lemmas = lemmas
        self.cap = cap
        self.leaf_bound = leaf_bound
        self.exact_max_dim = exact_max_dim
        self.space = _Space()
        self.env: dict[str, object] = {}
        self.nodes: list[NodeBound] = []
        self.leaves: list[tuple[str, torch.nn.Module, tuple[int, ...]]] = []
        self.users: dict[str, int] = {n.name: len(n.users) for n in cap.graph.nodes}

    # -- helpers ---------------------------------------------------------------------------
    def value(self, a: object) -> object:
        if isinstance(a, torch.fx.Node):
            return self.env[a.name]
        if isinstance(a, (list, tuple)):
            return type(a)(self.value(x) for x in a)
        return a

    def record(self, node: torch.fx.Node, local: float | None, L: float, rule: str) -> None:
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        path = path.removeprefix("model.").removeprefix("model")
        self.nodes.append(NodeBound(node.name, str(node.target).removeprefix("aten."), path,
                                    local, L, rule))

    def fresh(self, node: torch.fx.Node, L: float, local: float | None, rule: str,
              src: tuple[torch.Tensor, torch.Tensor] | None = None) -> Var:
        meta = node.meta["val"]
        shape = tuple((meta[0] if isinstance(meta, (list, tuple)) else meta).shape)
        self.record(node, local, L, rule)
        out = self.space.fresh(shape, L)
        out.src = src
        return out

    @staticmethod
    def elementwise(v: Var, c2: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``src`` of an elementwise function of ``v`` with squared constants ``c2``."""
        base, w = v.src if v.src is not None else (v.idx, torch.ones_like(v.idx))
        return base, w * c2

    # -- main loop -------------------------------------------------------------------------
    def run(self) -> float:
        consts = self.cap.constants()
        user = self.cap.user_input()
        out_val: object = None
        for node in self.cap.graph.nodes:
            if node.op == "placeholder":
                if node.name == user:
                    self.env[node.name] = self.space.fresh(tuple(node.meta["val"].shape), 1.0)
                else:
                    self.env[node.name] = Const(consts.get(node.target, consts.get(node.name)))
                continue
            if node.op == "output":
                out_val = self.value(node.args[0])
                continue
            if node.op != "call_function":
                raise Refused(f"{node.name}: unsupported graph node kind {node.op}")
            if node.target in _NO_OPS:
                self.env[node.name] = Const(None)
                continue
            args, kwargs = self.value(node.args), self.value(node.kwargs)
            if not _depends(args) and not _depends(kwargs):
                self.env[node.name] = Const(node.target(*_raw(args), **_raw(kwargs)))
                continue
            try:
                out = self.rule(node, args, kwargs)
                if self.lemmas and isinstance(out, Var) and (
                        node.target in _LINEAR_OPS or node.target in _GATHERS
                        or node.target in _IDENTITY):
                    self.linear_chain(node, args, kwargs, out)
                self.env[node.name] = out
            except Exception as exc:  # noqa: BLE001 - any failure of a rule is a refusal
                if not isinstance(exc, Refused):
                    text = str(exc).strip().splitlines()
                    exc = Refused(f"the rule failed ({type(exc).__name__}: "
                                  f"{text[0][:160] if text else ''})")
                stack = node.meta.get("nn_module_stack") or {}
                path = list(stack.values())[-1][0].removeprefix("model.") if stack else ""
                where = f"{path}: " if path else ""
                raise Refused(f"{where}{node.name} ({_opname(node)}): {exc}") from None
        if isinstance(out_val, (list, tuple)):
            if len(out_val) != 1:
                raise Refused("the claimed map must return one tensor")
            out_val = out_val[0]
        if isinstance(out_val, Const):
            return 0.0
        if not isinstance(out_val, Var):
            raise Refused("the output is not a bounded value")
        return self.space.gather_lip(out_val.idx)

    # -- rules -----------------------------------------------------------------------------
    def rule(self, node: torch.fx.Node, args: tuple, kwargs: dict) -> object:
        t = node.target
        if t is operator.getitem:
            seq, i = args
            if isinstance(seq, Tup):
                return seq.items[i]
            if isinstance(seq, (list, tuple)):
                return seq[i]
            raise Refused("getitem of a value")
        if any(isinstance(a, Opaque) for a in _flat(args)):
            raise Refused("uses the indices of a sort or max, which are not Lipschitz")
        rounding = _rounding(node, args, self.env)
        if rounding is not None:
            raise Refused(rounding)
        if any(isinstance(a, (Quad, SignOf)) for a in _flat(args)):
            return self.quad_rule(node, args, kwargs)
        if t is LEAF_OP:
            return self.leaf(node, args)
        if t in _IDENTITY and isinstance(args[0], Var):
            v = args[0]
            return Var(tuple(node.meta["val"].shape), v.L, v.idx.contiguous(), v.src, v.lin,
                       v.act, v.res)
        if t is aten.cat.default:
            grouped = self.cat_groups(node, args)
            if grouped is not None:
                return grouped
        if t in _GATHERS and self.gather_ok(t, args):
            return self.gather(node, args, kwargs)
        if t in (aten.maximum.default, aten.minimum.default, aten.fmax.default,
                 aten.fmin.default):
            return self.maxmin(node, args)
        if t in (aten.max.dim, aten.min.dim):
            v = self.var(args[0])
            out = self.fresh(node, self.pair_lip([v.idx]), 1.0,
                             "max/min over a dim: 1-Lipschitz (sort lemma)")
            return Tup([out, Opaque("argmax indices")])
        if t in (aten.amax.default, aten.amin.default):
            v = self.var(args[0])
            return self.fresh(node, self.pair_lip([v.idx]), 1.0,
                              "amax/amin: 1-Lipschitz (sort lemma)")
        if t is aten.sort.default or t is aten.sort.stable:
            v = self.var(args[0])
            out = self.fresh(node, self.pair_lip([v.idx]), 1.0, "sort: 1-Lipschitz")
            return Tup([out, Opaque("sort indices")])
        if t in (aten.pow.Tensor_Scalar,) and float(args[1]) == 2.0:
            return self.square(node, self.var(args[0]))
        if t is aten.mul.Tensor and isinstance(args[0], Var) and args[1] is args[0]:
            return self.square(node, args[0])
        unary = _unary_constant(node)
        if unary is not None:
            v = self.var(args[0])
            for extra in list(args[1:]) + list(kwargs.values()):
                if _depends(extra):
                    raise Refused("a bound of the op depends on the input")
            c, why = unary
            out = self.fresh(node, c * v.L, c, why, self.elementwise(v, c * c))
            if v.lin is not None and _monotone_01(node):
                out.act = Act(v.lin, torch.ones((), dtype=torch.float64))
            if t is aten.neg.default and v.res is not None:
                out.res = Res(v.res.root, v.res.n, -v.res.coef)
            if t is aten.neg.default and v.lin is not None:
                out.lin = v.lin.scaled(-1.0)
            return out
        if t in (aten.add.Tensor, aten.sub.Tensor, aten.rsub.Scalar, aten.add.Scalar,
                 aten.sub.Scalar, aten.rsub.Tensor):
            return self.add(node, args, kwargs)
        if t in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
            return self.mul(node, args)
        if t is aten.convolution.default:
            return self.conv(node, args)
        if t in (aten.addmm.default, aten.mm.default, aten.bmm.default):
            return self.matmul(node, args, kwargs)
        if t is aten._native_batch_norm_legit_no_training.default:
            return self.batchnorm(node, args)
        if t in _NONNEG_LINEAR:
            return self.nonneg_linear(node, args, kwargs)
        if t in (aten.max_pool2d_with_indices.default, aten.max_pool2d.default,
                 aten.max_pool1d.default, aten.max_pool3d_with_indices.default):
            return self.maxpool(node, args)
        if t in (aten.adaptive_max_pool2d.default, aten.adaptive_max_pool1d.default):
            v = self.var(args[0])
            out_shape = node.meta["val"][0].shape
            nd = 2 if t is aten.adaptive_max_pool2d.default else 1
            m = _adaptive_mult(v.shape[-nd:], out_shape[-nd:])
            out = self.fresh(node, math.sqrt(m) * v.L, math.sqrt(m),
                             f"adaptive max pool: sqrt({m}) windows share an input")
            return Tup([out, Opaque("pool indices")])
        raise Refused("no bound for this op on an input-dependent value")

    # maximal linear subgraphs ---------------------------------------------------------------
    def linear_chain(self, node: torch.fx.Node, args: tuple, kwargs: dict, out: Var) -> None:
        """Extend the linear chain of the node's input(s) by this linear op and, where the
        composed map is small, bound it exactly by a float64 SVD (never looser than the
        op-by-op composition: the smaller of the two is kept)."""
        vars_ = [a for a in _flat(args) if isinstance(a, Var)]
        if not vars_:
            return
        chains = [v.chain if v.chain is not None else (v, lambda z: z) for v in vars_]
        root = chains[0][0]
        if any(not _same(c[0], root) for c in chains):
            return
        fns = [c[1] for c in chains]
        t = node.target

        keep = _INDEX_ARGS.get(t, set())

        def lin_args(z: torch.Tensor) -> tuple:
            it = iter(fns)

            def sub(a: object, top: int | None = None) -> object:
                if isinstance(a, Var):
                    return next(it)(z)
                if isinstance(a, Const):
                    v = a.value
                    if isinstance(v, torch.Tensor):
                        v = v.detach().cpu()
                        if top in keep:
                            return v
                        # weights are read exactly; any other constant is a shift: dropped
                        return v.double() if t in _WEIGHTED else torch.zeros(
                            v.shape, dtype=torch.float64)
                    return v
                if isinstance(a, (list, tuple)):
                    return type(a)(sub(e) for e in a)
                return a

            return tuple(sub(a, i) for i, a in enumerate(args))

        kw = _raw(kwargs)

        def fn(z: torch.Tensor) -> torch.Tensor:
            a = lin_args(z)
            if t is aten.constant_pad_nd.default:
                a = (a[0], a[1], 0.0)
            if t in (aten.view.default, aten._unsafe_view.default, aten.reshape.default,
                     aten.expand.default):
                a = (a[0], [a[0].shape[0], *list(a[1])[1:]])  # a batch of samples
            if t is aten._native_batch_norm_legit_no_training.default:
                x, w, _b, _m, var, _mo, eps = a[:7]
                scale = (1.0 / torch.sqrt(var + eps)) * (w if w is not None else 1.0)
                return x * scale.view(1, -1, *([1] * (x.dim() - 2)))
            if t in (aten.addmm.default,) and not isinstance(args[0], Var):
                zero = torch.zeros((), dtype=torch.float64)
                return t(zero, *a[1:], **{k: v for k, v in kw.items() if k != "beta"})
            if t is aten.convolution.default:
                return t(a[0], a[1], None, *a[3:])
            return t(*a, **kw)

        out.chain = (root, fn)
        n_in, n_out = math.prod(root.shape[1:]), math.prod(out.shape[1:])
        if max(n_in, n_out) > self.exact_max_dim or t not in _LINEAR_OPS:
            return
        if not (self.space.lips and self.space.lips[-1] == out.L):
            return
        try:
            if not _batches(fn, root.shape[1:], tuple(out.shape[1:])):
                out.chain = None  # an op of the chain mixes the batch dimension
                return
            exact = inflate(linear_norm(fn, root.shape[1:])) * root.L
        except (RuntimeError, ValueError, TypeError, IndexError):
            out.chain = None  # an op of the chain does not batch: the op-by-op bound stands
            return
        if exact < out.L:
            out.L = exact
            self.space.lips[-1] = exact
            self.nodes[-1].cumulative = exact
            self.nodes[-1].rule += ("; merged linear subgraph from "
                                    f"{n_in}-dim value: exact SVD, cumulative {exact:.6g}")

    def var(self, a: object) -> Var:
        if not isinstance(a, Var):
            raise Refused("expected an input-dependent tensor here")
        return a

    # gathers ------------------------------------------------------------------------------
    def gather_ok(self, t: object, args: tuple) -> bool:
        if t is aten.where.self:
            return isinstance(args[0], Const) and not isinstance(args[0], Var)
        if t in (aten.index.Tensor, aten._unsafe_index.Tensor):
            return not _depends(args[1])
        if t is aten.index_select.default:
            return not _depends(args[2])
        return True

    def gather(self, node: torch.fx.Node, args: tuple, kwargs: dict) -> object:
        t = node.target
        idx_args = _to_idx(args, t)
        if t is aten.constant_pad_nd.default:
            idx_args = (idx_args[0], idx_args[1], 0.0)
        if t in (aten.view.default, aten._unsafe_view.default):
            t = aten.reshape.default  # index maps may be laid out differently in memory
        with torch.no_grad():
            out = t(*idx_args, **_raw(kwargs))
        meta = node.meta["val"]
        if isinstance(out, (list, tuple)):
            vals = [Var(tuple(m.shape), self.space.gather_lip(o), o)
                    for o, m in zip(out, meta, strict=True)]
            return Tup(vals)
        return Var(tuple(meta.shape), self.space.gather_lip(out), out)

    # sort pairs ---------------------------------------------------------------------------
    def pair_lip(self, idxs: list[torch.Tensor]) -> float:
        """Lipschitz bound of a 1-Lipschitz function of the gathers ``idxs`` jointly."""
        return self.space.gather_lip(torch.cat([i.reshape(-1) for i in idxs]))

    def maxmin(self, node: torch.fx.Node, args: tuple) -> Var:
        a, b = args[0], args[1]
        shape = tuple(node.meta["val"].shape)
        if isinstance(a, Const) or isinstance(b, Const):
            v = a if isinstance(a, Var) else b
            return self.fresh(node, self.pair_lip([v.idx.expand(shape)]), 1.0,
                              "max/min with a constant: 1-Lipschitz per entry")
        return self.fresh(node, self.pair_lip([a.idx.expand(shape), b.idx.expand(shape)]),
                          None, "||D max(a,b)||^2 <= ||D a||^2 + ||D b||^2")

    # cat with patterns: a gather when every piece is one; sort pairs and CReLU grouped ----
    def _pattern(self, n: object) -> tuple[str, tuple, list[torch.Tensor]] | None:
        """(pair kind, key, source index maps) of a piece that is a 1-Lipschitz function of
        the gathers ``sources`` jointly, or None."""
        if not isinstance(n, torch.fx.Node):
            return None
        env = self.env
        if n.target in (aten.maximum.default, aten.minimum.default):
            a, b = n.args[0], n.args[1]
            if isinstance(env.get(getattr(a, "name", "")), Var) and \
                    isinstance(env.get(getattr(b, "name", "")), Var) and \
                    _pure(env[a.name]) and _pure(env[b.name]):
                shape = tuple(n.meta["val"].shape)
                ia, ib = env[a.name].idx.expand(shape), env[b.name].idx.expand(shape)
                key = ("maxmin", frozenset((_content(ia), _content(ib))))
                return ("max" if n.target is aten.maximum.default else "min", key, [ia, ib])
        if n.target is operator.getitem and n.args[1] == 0 and isinstance(n.args[0],
                                                                          torch.fx.Node):
            r = n.args[0]
            if r.target in (aten.max.dim, aten.min.dim, aten.sort.default, aten.sort.stable) \
                    and isinstance(env.get(r.args[0].name), Var) and _pure(env[r.args[0].name]):
                key = ("reduce", _content(env[r.args[0].name].idx),
                       r.args[1] if len(r.args) > 1 else -1)
                kind = {aten.max.dim: "max", aten.min.dim: "min"}.get(r.target, "sort")
                return kind, key, [env[r.args[0].name].idx]
        if n.target is aten.relu.default and isinstance(n.args[0], torch.fx.Node):
            a = n.args[0]
            neg = a.target is aten.neg.default
            src = a.args[0] if neg else a
            if isinstance(src, torch.fx.Node) and isinstance(env.get(src.name), Var) and \
                    _pure(env[src.name]):
                return ("neg" if neg else "pos"), ("crelu", _content(env[src.name].idx)), [
                    env[src.name].idx]
        return None

    def cat_groups(self, node: torch.fx.Node, args: tuple) -> Var | None:
        pieces = list(node.args[0])
        pats = [self._pattern(p) for p in pieces]
        if not any(pats) and not any(isinstance(v, Var) and v.src is not None
                                     for v in args[0]):
            return None
        partner = {"max": "min", "min": "max", "pos": "neg", "neg": "pos", "sort": None}
        used = [False] * len(pieces)
        sources: list[torch.Tensor] = []
        weights: list[torch.Tensor] = []
        pairs = 0
        for i, pat in enumerate(pats):
            if used[i]:
                continue
            used[i] = True
            if pat is None:
                val = args[0][i]
                if isinstance(val, Var):
                    idx, w = val.src if val.src is not None else (val.idx, None)
                    sources.append(idx.reshape(-1))
                    weights.append(torch.ones(idx.numel(), dtype=torch.float64) if w is None
                                   else w.expand(idx.shape).reshape(-1))
                continue
            kind, key, src = pat
            for j in range(i + 1, len(pieces)):
                other = pats[j]
                if not used[j] and other and other[1] == key and other[0] == partner[kind]:
                    used[j] = True
                    pairs += 1
                    break
            sources += [t.reshape(-1) for t in src]
            weights += [torch.ones(t.numel(), dtype=torch.float64) for t in src]
        L = self.space.gather_lip(torch.cat(sources), torch.cat(weights))
        return self.fresh(node, L, None, f"cat with {pairs} sort/CReLU pair(s): 1-Lipschitz "
                          "from their sources jointly")

    def leaf(self, node: torch.fx.Node, args: tuple) -> Var:
        v = self.var(args[0])
        module = leaf_module(int(args[1]))
        shape = tuple(v.shape[1:])
        why = _leaf_shape_problem(module, shape)
        if why is not None:
            raise Refused(f"{type(module).__name__}: {why}")
        ub, method = self.leaf_bound(module, shape)
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0].removeprefix("model.") if stack else node.name
        self.leaves.append((path, module, shape))
        if ub is None:
            raise Refused(f"{type(module).__name__}: {method}")
        out = self.fresh(node, ub * v.L, ub, f"{type(module).__name__}: {method}")
        self.nodes[-1].op = type(module).__name__
        self.nodes[-1].module = path
        return out

    # linear -------------------------------------------------------------------------------
    def add(self, node: torch.fx.Node, args: tuple, kwargs: dict) -> Var:
        t = node.target
        a, b = args[0], args[1]
        alpha = float(kwargs.get("alpha", args[2] if len(args) > 2 else 1.0))
        # y = ka * a + kb * b
        if t in (aten.rsub.Scalar, aten.rsub.Tensor):
            ka, kb = -alpha, 1.0
        elif t in (aten.sub.Tensor, aten.sub.Scalar):
            ka, kb = 1.0, -alpha
        else:
            ka, kb = 1.0, alpha
        out_numel = math.prod(node.meta["val"].shape)
        if isinstance(a, Var) and isinstance(b, Var):
            mean = self._centering(node, args, kwargs)
            if mean is not None:
                return mean
            ga = math.sqrt(out_numel / math.prod(a.shape))
            gb = math.sqrt(out_numel / math.prod(b.shape))
            same_shape = ga == 1.0 and gb == 1.0
            if same_shape and ka != 0:
                merged = self._residual_lemma(node, a, b, kb / ka, ka) if self.lemmas \
                    else None
                if merged is not None:
                    return merged
            L = abs(ka) * ga * a.L + abs(kb) * gb * b.L
            return self.fresh(node, L, None, "triangle inequality (times sqrt of any "
                              "broadcast)")
        v, k = (a, ka) if isinstance(a, Var) else (b, kb)
        grow = math.sqrt(out_numel / math.prod(v.shape))
        out = self.fresh(node, abs(k) * grow * v.L, abs(k) * grow, "shift by a constant")
        if grow == 1.0 and v.lin is not None:
            out.lin = v.lin.scaled(k)  # an affine shift keeps the (signed) linear part
        return out

    def _centering(self, node: torch.fx.Node, args: tuple, kwargs: dict) -> Var | None:
        if node.target is not aten.sub.Tensor or len(args) > 2 or \
                float(kwargs.get("alpha", 1.0)) != 1.0:
            return None
        src, m = node.args[0], node.args[1]
        if not (isinstance(m, torch.fx.Node) and m.target in (aten.mean.dim,)
                and m.args[0] is src and (len(m.args) > 2 and m.args[2] is True)):
            return None
        if tuple(node.meta["val"].shape) != tuple(src.meta["val"].shape):
            return None
        a = args[0]
        return self.fresh(node, a.L, 1.0, "centering a - mean(a): an orthogonal projection")

    def _residual_lemma(self, node: torch.fx.Node, a: Var, b: Var, sign: float,
                        scale: float = 1.0) -> Var | None:
        """``scale * (a + sign * b)`` by the SDP-residual lemma or as one merged linear map
        (``a``, ``b`` and the output of one shape)."""
        if not (a.shape == b.shape == tuple(node.meta["val"].shape)):
            return None
        triangle = abs(scale) * (a.L + abs(sign) * b.L)
        # y = x + s g = k (x + (s / k) g): (x, g, s, k) for g = b and, when sign != 0, g = a
        cases = [(a, b, sign, 1.0)] + ([(b, a, 1.0 / sign, sign)] if sign else [])
        for x, g, sg, k in cases:
            if g.res is not None and _same(x, g.res.root):
                c = -sg * g.res.coef
                factor = inflate(abs(scale * k) * sdp_residual_factor(c, g.res.n))
                L = factor * x.L
                if L <= triangle:
                    return self.fresh(node, L, factor, f"SDP residual x - c K^T D s(Kx+b): "
                                      f"max(1, c n^2 - 1) with c = {c:.6g}, n = "
                                      f"||D^1/2 K|| <= {g.res.n:.6g}")
        lin = self._merge(a, b, sign)
        if lin is None:
            return None
        lin = lin.scaled(scale) if scale != 1.0 else lin
        bound, how = self._lin_norm(lin, tuple(node.meta["val"].shape))
        L = bound * lin.root.L
        if not L <= triangle:
            return None
        out = self.fresh(node, L, bound, f"merged linear map of one value: {how}")
        out.lin = lin
        return out

    def _merge(self, a: Var, b: Var, sign: float) -> Lin | None:
        la, lb = self._as_lin(a, b), self._as_lin(b, a)
        if la is None or lb is None or not _same(la.root, lb.root) or la.kind != lb.kind:
            return None
        if la.geom != lb.geom or la.weight.shape != lb.weight.shape:
            return None
        if la.shape != lb.shape:
            return None
        return Lin(la.root, la.kind, la.weight + sign * lb.weight, la.geom, la.shape)

    @staticmethod
    def _as_lin(v: Var, other: Var) -> Lin | None:
        """``v``'s linear record, or ``v`` itself as the identity in ``other``'s geometry."""
        if v.lin is not None:
            return v.lin
        ol = other.lin
        if ol is None or not _same(v, ol.root):
            return None
        if ol.kind == "dense":
            n = ol.weight.shape[1]
            if ol.weight.shape[0] != n:
                return None
            return Lin(v, "dense", torch.eye(n, dtype=torch.float64), (), v.shape)
        stride, padding, dilation, groups = ol.geom
        if stride != (1, 1) or ol.weight.shape[0] != v.shape[1] or ol.shape != v.shape:
            return None
        eye = identity_filter(v.shape[1], groups, tuple(ol.weight.shape[2:]), padding,
                              dilation)
        return None if eye is None else Lin(v, "conv", eye, ol.geom, v.shape)

    def _lin_norm(self, lin: Lin, out_shape: tuple[int, ...]) -> tuple[float, str]:
        root = lin.root
        if lin.kind == "dense":
            return inflate(dense_spectral_norm(lin.weight)), "exact SVD"
        stride, padding, dilation, groups = lin.geom
        w = lin.weight
        if max(math.prod(root.shape[1:]), math.prod(out_shape[1:])) <= self.exact_max_dim:
            n = linear_norm(lambda z: F.conv2d(z, w, None, stride, padding, dilation, groups),
                            root.shape[1:])
            return inflate(n), "exact: float64 SVD of the materialised map"
        bound, how = strided_conv_norm(w, tuple(root.shape[2:]), stride=stride,
                                       padding=padding, dilation=dilation, groups=groups)
        return inflate(bound), how

    def mul(self, node: torch.fx.Node, args: tuple) -> Var:
        a, b = args[0], args[1]
        div = node.target in (aten.div.Tensor, aten.div.Scalar)
        if isinstance(a, Var) and isinstance(b, Var):
            raise Refused("a product of two input-dependent values has no global bound")
        if not isinstance(a, Var):
            if div:
                raise Refused("division by an input-dependent value")
            a, b = b, a
        c = b.value if isinstance(b, Const) else b
        c = torch.as_tensor(c, dtype=torch.float64).detach().cpu().double()
        if div:
            if bool((c == 0).any()):
                raise Refused("division by zero")
            c = 1.0 / c
        if not bool(torch.isfinite(c).all()):
            raise Refused("multiplication by a non-finite constant")
        k = float(c.abs().max()) if c.numel() else 0.0
        shape = tuple(node.meta["val"].shape)
        grow = math.sqrt(math.prod(shape) / math.prod(a.shape))
        local = inflate(k * grow) if div else k * grow
        src = None
        if shape == a.shape:
            c2 = c.abs() ** 2 * ((1 + 1e-15) if not div else (1 + 2e-6))
            src = self.elementwise(a, c2.expand(shape))
        out = self.fresh(node, local * a.L, local, "max |c| of the constant factor", src)
        if shape == a.shape:
            scalar = float(c.reshape(-1)[0]) if c.numel() == 1 else None
            if a.lin is not None and scalar is not None:
                out.lin = a.lin.scaled(scalar)
            if a.res is not None and scalar is not None:
                out.res = Res(a.res.root, a.res.n, a.res.coef * scalar)
            if a.act is not None and bool((c >= 0).all()):
                out.act = Act(a.act.lin, a.act.d * c)
        return out

    def conv(self, node: torch.fx.Node, args: tuple) -> Var:
        x, w, bias, stride, padding, dilation, transposed, _outpad, groups = args[:9]
        v = self.var(x)
        if _depends(w) or _depends(bias):
            raise Refused("the filter or the bias depends on the input")
        weight = w.value.detach().cpu().double()
        if v.idx.dim() != weight.dim():
            raise Refused("an unbatched convolution (the batch dimension was removed)")
        if weight.dim() != 4:
            if max(math.prod(v.shape[1:]), math.prod(node.meta["val"].shape[1:])) > \
                    self.exact_max_dim:
                raise Refused(f"a {weight.dim() - 2}-D convolution larger than the exact "
                              "route (only 2-D convolutions have the frequency route)")
            return self._conv_dense(node, v, weight, args)
        grid = tuple(v.shape[2:])
        if transposed:
            grid = tuple(node.meta["val"].shape[2:])  # the adjoint conv acts on the output
        src, circ, pad = self._padded_source(node, v, padding) if not transposed else (
            None, False, padding)
        if transposed and v.act is not None:
            res = self._sdp_adjoint(node, v, weight, args)
            if res is not None:
                return res
        in_numel = math.prod(v.shape[1:])
        out_numel = math.prod(node.meta["val"].shape[1:])
        if src is None and max(in_numel, out_numel) <= self.exact_max_dim:
            out = self._conv_dense(node, v, weight, args)
            if not transposed:
                out.lin = Lin(v, "conv", weight, _geom(stride, padding, dilation, groups),
                              out.shape)
            return out
        base = src if src is not None else v
        if src is not None:
            grid = tuple(src.shape[2:])
        bound, how = strided_conv_norm(weight, grid, stride=stride, padding=pad,
                                       dilation=dilation, groups=groups, circular=circ)
        if transposed:
            how = "transposed: the adjoint conv, " + how
        if src is not None:
            how = ("circularly" if circ else "zero") + " padded by the gather before it; " + how
        local = inflate(bound)
        out = self.fresh(node, local * base.L, local, how)
        if not transposed and src is None:
            out.lin = Lin(v, "conv", weight, _geom(stride, padding, dilation, groups),
                          out.shape)
        return out

    def _sdp_adjoint(self, node: torch.fx.Node, v: Var, weight: torch.Tensor,
                     args: tuple) -> Var | None:
        """``conv_transpose(D s(conv(u, K)), K)`` with the same filter and geometry: the
        transposed conv is the exact adjoint of the first (its output back on ``u``'s shape),
        so the value is ``K^T D s(K u + b)``; record ``n >= ||D^(1/2) K||``."""
        _, _, _, stride, padding, dilation, _, _outpad, groups = args[:9]
        lin = v.act.lin
        if lin.kind != "conv" or lin.geom != _geom(stride, padding, dilation, groups):
            return None
        if lin.weight.shape != weight.shape or not torch.equal(lin.weight, weight):
            return None
        if tuple(node.meta["val"].shape) != tuple(lin.root.shape):
            return None
        d = v.act.d
        if not bool(torch.isfinite(d).all()) or not bool((d >= 0).all()):
            return None
        st, pd, dl, gr = lin.geom
        dfull = d.expand(v.shape)
        root = lin.root
        if max(math.prod(root.shape[1:]), math.prod(v.shape[1:])) <= self.exact_max_dim:
            sq = dfull.sqrt()
            n = linear_norm(lambda z: sq * F.conv2d(z, weight, None, st, pd, dl, gr),
                            root.shape[1:])
            how = "exact SVD of D^1/2 K"
        else:
            per_channel = dfull.amax(dim=(0, 2, 3)).sqrt()
            n, how = strided_conv_norm(weight * per_channel.view(-1, 1, 1, 1),
                                       tuple(root.shape[2:]), stride=st, padding=pd,
                                       dilation=dl, groups=gr)
        n = inflate(n)
        plain = self._conv_dense(node, v, weight, args) if max(
            math.prod(root.shape[1:]), math.prod(v.shape[1:])) <= self.exact_max_dim else None
        if plain is None:
            b, _ = strided_conv_norm(weight, tuple(root.shape[2:]), stride=st, padding=pd,
                                     dilation=dl, groups=gr)
            local = inflate(b)
            plain = self.fresh(node, local * v.L, local, "transposed: the adjoint conv")
        plain.res = Res(root, n, 1.0)
        self.nodes[-1].rule += f"; K^T D s(K u + b) recorded ({how}, n <= {n:.6g})"
        return plain

    def _conv_dense(self, node: torch.fx.Node, v: Var, weight: torch.Tensor,
                    args: tuple) -> Var:
        _, _, _, stride, padding, dilation, transposed, outpad, groups = args[:9]

        def op(z: torch.Tensor) -> torch.Tensor:
            return aten.convolution.default(z, weight, None, stride, padding, dilation,
                                            transposed, outpad, groups)

        n = linear_norm(op, v.shape[1:])
        local = inflate(n)
        return self.fresh(node, local * v.L, local, "exact: float64 SVD of the materialised "
                          "conv")

    def _padded_source(self, node: torch.fx.Node, v: Var, padding: object
                       ) -> tuple[Var | None, bool, list[int]]:
        """If the conv has no padding and its input is exactly a circular or zero padding
        of one root value, return that root (as a Var), the kind and the padding."""
        if any(int(p) != 0 for p in _pair(padding)) or v.idx.dim() != 4:
            return None, False, _pair(padding)
        flat = v.idx[v.idx > 0]
        if flat.numel() == 0:
            return None, False, _pair(padding)
        starts = torch.tensor(self.space.starts, dtype=torch.float64)
        lo, hi = float(flat.min()), float(flat.max())
        r = int(torch.searchsorted(starts, torch.tensor([lo], dtype=torch.float64),
                                   right=True)[0]) - 1
        start = self.space.starts[r]
        end = self.space.starts[r + 1] if r + 1 < len(self.space.starts) else self.space.next
        if hi >= end:
            return None, False, _pair(padding)
        n_root = end - start
        b, c, hp, wp = v.idx.shape
        for ph in range(0, hp // 2 + 1):
            h = hp - 2 * ph
            if h <= 0 or n_root % (c * h) != 0:
                continue
            w = n_root // (c * h)
            pw2 = wp - w
            if pw2 < 0 or pw2 % 2:
                continue
            pw = pw2 // 2
            base = torch.arange(start, end, dtype=torch.float64).reshape(1, c, h, w)
            root = Var((1, c, h, w), self.space.lips[r], base)
            if ph <= h and pw <= w and (ph or pw):
                circ = F.pad(base, (pw, pw, ph, ph), mode="circular")
                if torch.equal(circ, v.idx):
                    return root, True, [ph, pw]
            zero = F.pad(base, (pw, pw, ph, ph))
            if torch.equal(zero, v.idx):
                return root, False, [ph, pw]
        return None, False, _pair(padding)

    def matmul(self, node: torch.fx.Node, args: tuple, kwargs: dict) -> Var:
        t = node.target
        if t is aten.addmm.default:
            bias, m1, m2 = args[:3]
            beta = float(kwargs.get("beta", 1.0))
            alpha = float(kwargs.get("alpha", 1.0))
        else:
            bias, (m1, m2), beta, alpha = None, args[:2], 0.0, 1.0
        if isinstance(m1, Var) and isinstance(m2, Var):
            raise Refused("a product of two input-dependent matrices")
        L = 0.0
        local = None
        dense_lin = None
        res = None
        if isinstance(m1, Var) and isinstance(m2, Const) and m1.idx.dim() == 2 and \
                m2.value.dim() == 2:
            mat2 = m2.value.detach().cpu().double() * alpha
            dense_lin = Lin(m1, "dense", mat2.T.contiguous(), (),
                            tuple(node.meta["val"].shape))
            act = m1.act
            if act is not None and act.lin.kind == "dense" and \
                    act.lin.weight.shape == mat2.shape and torch.equal(act.lin.weight, mat2) \
                    and tuple(node.meta["val"].shape) == tuple(act.lin.root.shape) and \
                    bool((act.d >= 0).all()):
                dvec = act.d.expand(m1.shape).amax(dim=0).sqrt()
                res = Res(act.lin.root, inflate(dense_spectral_norm(dvec[:, None] * mat2)),
                          1.0)
        if isinstance(m1, Var) or isinstance(m2, Var):
            v, c = (m1, m2) if isinstance(m1, Var) else (m2, m1)
            mat = c.value.detach().cpu().double()
            norm = max((dense_spectral_norm(mat[i]) for i in range(mat.shape[0])), default=0.0
                       ) if mat.dim() == 3 else dense_spectral_norm(mat)
            local = inflate(abs(alpha) * norm)
            L += local * v.L
        if isinstance(bias, Var):
            grow = math.sqrt(math.prod(node.meta["val"].shape) / math.prod(bias.shape))
            L += abs(beta) * grow * bias.L
            local = None
        out = self.fresh(node, L, local, "exact: float64 SVD of the constant matrix")
        if not isinstance(bias, Var):
            out.lin, out.res = dense_lin, res
        return out

    def batchnorm(self, node: torch.fx.Node, args: tuple) -> Tup:
        x, weight, bias, mean, var, _mom, eps = args[:7]
        v = self.var(x)
        if _depends((weight, bias, mean, var)):
            raise Refused("a batch-norm parameter depends on the input")
        vv = var.value.detach().cpu().double() + float(eps)
        if not bool(torch.isfinite(vv).all()) or not bool((vv > 0).all()):
            raise Refused("batch norm needs running_var + eps > 0 and finite")
        scale = 1.0 / torch.sqrt(vv)
        if isinstance(weight, Const) and weight.value is not None:
            scale = scale * weight.value.detach().cpu().double()
        local = inflate(float(scale.abs().max()))
        out = self.fresh(node, local * v.L, local, "batch norm (eval): max |gamma|/sqrt(var+eps)")
        return Tup([out, Const(None), Const(None)])

    def nonneg_linear(self, node: torch.fx.Node, args: tuple, kwargs: dict) -> Var:
        v = self.var(args[0])
        rest, kw = _raw(args[1:]), _raw(kwargs)
        t = node.target

        def op(z: torch.Tensor) -> torch.Tensor:
            return t(z, *rest, **kw)

        b = inflate(schur_bound(op, v.shape))
        return self.fresh(node, b * v.L, b, "nonnegative linear map: Schur test "
                          "sqrt(max A1 * max A^T 1)")

    def maxpool(self, node: torch.fx.Node, args: tuple) -> object:
        v = self.var(args[0])
        nd = _POOL_DIMS[node.target]
        kernel = _pair(args[1], nd)
        stride = _pair(args[2] if len(args) > 2 and args[2] else kernel, nd)
        padding = _pair(args[3] if len(args) > 3 else 0, nd)
        dilation = _pair(args[4] if len(args) > 4 else 1, nd)
        meta = node.meta["val"]
        out = meta[0].shape if isinstance(meta, (list, tuple)) else meta.shape
        m = window_multiplicity(v.shape[-nd:], out[-nd:], kernel, stride, padding, dilation)
        res = self.fresh(node, math.sqrt(m) * v.L, math.sqrt(m),
                         f"max pool: sqrt of the most windows sharing an input ({m})")
        if isinstance(meta, (list, tuple)):
            return Tup([res, Opaque("pool indices")])
        return res

    # quadratic forms ----------------------------------------------------------------------
    def square(self, node: torch.fx.Node, v: Var) -> Quad:
        shape = tuple(node.meta["val"].shape)
        return Quad(shape, [(v, lambda z: z)], torch.zeros(shape, dtype=torch.float64))

    def quad_rule(self, node: torch.fx.Node, args: tuple, kwargs: dict) -> object:
        t = node.target
        q = next(a for a in _flat(args) if isinstance(a, (Quad, SignOf)))
        shape = tuple(node.meta["val"].shape)
        if isinstance(q, SignOf):
            if t is aten.mul.Tensor and len(args) == 2 and {type(args[0]), type(args[1])} == {
                    SignOf, Quad}:
                s = args[0] if isinstance(args[0], SignOf) else args[1]
                other = args[1] if s is args[0] else args[0]
                if other is s.quad:
                    return other  # sign(q) * q = q for q >= 0
            raise Refused("sign of a quadratic form used other than as sign(q) * q")
        if not _nonneg(q.eps):
            raise Refused("a quadratic form with a negative constant")
        if t in (aten.abs.default, aten.relu.default):
            return q
        if t is aten.sign.default:
            return SignOf(q)
        if t in (aten.sqrt.default,) or (t is aten.pow.Tensor_Scalar and float(args[1]) == 0.5):
            total = 0.0
            for v, m in q.terms:
                x = torch.ones(v.shape, dtype=torch.float64, requires_grad=True)
                with torch.enable_grad():
                    y = m(x)
                    (col,) = torch.autograd.grad(y, x, torch.ones_like(y))
                total += float(col.max()) * v.L ** 2
            L = inflate(math.sqrt(total))
            self.record(node, None, L, "l2-norm merge: sqrt(sum_k max(M_k^T 1) L_k^2)")
            return self.space.fresh(shape, L)
        if t in (aten.add.Tensor, aten.add.Scalar) and len(args) == 2 and \
                float(kwargs.get("alpha", 1.0)) == 1.0:
            a, b = args
            if isinstance(a, Quad) and isinstance(b, Quad):
                if a.shape != shape or b.shape != shape:
                    raise Refused("broadcast sum of quadratic forms")
                return Quad(shape, a.terms + b.terms, a.eps + b.eps)
            other = b if isinstance(a, Quad) else a
            if _depends(other):
                raise Refused("adds an input-dependent value to a square")
            c = torch.as_tensor(other.value if isinstance(other, Const) else other,
                                dtype=torch.float64).cpu()
            if not _nonneg(c) or torch.broadcast_shapes(c.shape, shape) != shape:
                raise Refused("adds a negative or broadcasting constant to a quadratic form")
            return Quad(shape, q.terms, q.eps + c)
        linear = self._nonneg_op(node, args, kwargs)
        if linear is None:
            raise Refused("a square (x^2) is not Lipschitz; only its l2-norm merge sqrt(...) "
                          "is bounded")
        terms = [(v, (lambda z, m=m: linear(m(z)))) for v, m in q.terms]
        eps = linear(q.eps) if q.eps.abs().max() > 0 else torch.zeros(shape, dtype=torch.float64)
        return Quad(shape, terms, eps)

    def _nonneg_op(self, node: torch.fx.Node, args: tuple, kwargs: dict
                   ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        t = node.target
        pos = next((i for i, a in enumerate(args) if isinstance(a, Quad)), None)
        if pos is None or any(isinstance(a, (Var, Quad, SignOf, Opaque))
                              for i, a in enumerate(_flat(args)) if i != pos):
            return None
        if t in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
            other = args[1 - pos] if len(args) == 2 else None
            if isinstance(other, Quad) or (t in (aten.div.Tensor, aten.div.Scalar) and pos):
                return None
            c = torch.as_tensor(other.value if isinstance(other, Const) else other,
                                dtype=torch.float64).cpu()
            if t in (aten.div.Tensor, aten.div.Scalar):
                if not bool((c > 0).all()):
                    return None
                c = 1.0 / c
            if not _nonneg(c) or not bool(torch.isfinite(c).all()):
                return None
            return lambda z: z * c
        if pos != 0 or _depends(args[1:]):
            return None
        if t in _NONNEG_LINEAR or t in _QUAD_GATHERS:
            rest, kw = _raw(args[1:]), _raw(kwargs)
            return lambda z: t(z, *rest, **kw)
        if t in _IDENTITY:
            return lambda z: z
        return None


# --------------------------------------------------------------------------------------------
# utilities


def _flat(x: object) -> list:
    if isinstance(x, (list, tuple)):
        return [y for e in x for y in _flat(e)]
    if isinstance(x, dict):
        return [y for e in x.values() for y in _flat(e)]
    if isinstance(x, Tup):
        return _flat(x.items)
    return [x]


def _depends(x: object) -> bool:
    return any(isinstance(a, (Var, Quad, SignOf, Opaque)) for a in _flat(x))


def _raw(x: object) -> object:
    if isinstance(x, Const):
        return x.value
    if isinstance(x, Tup):
        return [_raw(i) for i in x.items]
    if isinstance(x, (list, tuple)):
        return type(x)(_raw(e) for e in x)
    if isinstance(x, dict):
        return {k: _raw(v) for k, v in x.items()}
    return x


_INDEX_ARGS = {aten.index.Tensor: {1}, aten._unsafe_index.Tensor: {1},
               aten.index_select.default: {2}, aten.where.self: {0}}
"""Argument positions that hold indices or masks (kept as they are); every other constant
tensor is data: a constant entry (0 in an index map)."""


def _to_idx(x: object, target: object = None) -> object:
    """Arguments for running a gather on index maps: values -> their index maps, constant
    tensors -> zeros (constant entries), except the op's index and mask arguments."""
    keep = _INDEX_ARGS.get(target, set())
    if isinstance(x, tuple) and target is not None:
        return tuple(e if i in keep and not _depends(e) else _to_idx(e)
                     for i, e in enumerate(_raw_index(x, keep)))
    if isinstance(x, Var):
        return x.idx
    if isinstance(x, Const):
        v = x.value
        if isinstance(v, torch.Tensor):
            return torch.zeros(v.shape, dtype=torch.float64)
        return v
    if isinstance(x, (list, tuple)):
        return type(x)(_to_idx(e) for e in x)
    return x


def _raw_index(args: tuple, keep: set[int]) -> tuple:
    """The index and mask arguments as plain tensors (on the CPU)."""
    out = []
    for i, a in enumerate(args):
        if i in keep:
            a = _raw(a)
            if isinstance(a, torch.Tensor):
                a = a.detach().cpu()
            elif isinstance(a, (list, tuple)):
                a = type(a)(t.detach().cpu() if isinstance(t, torch.Tensor) else t for t in a)
        out.append(a)
    return tuple(out)


_MANTISSA = {torch.float64: 53, torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}


def _rounding(node: torch.fx.Node, args: tuple, env: dict) -> str | None:
    """Why the op rounds an input-dependent value (a cast to an integer, boolean or less
    precise floating dtype: a step function, not Lipschitz), or None."""
    meta = node.meta.get("val")
    if not isinstance(meta, torch.Tensor):
        return None
    if not meta.dtype.is_floating_point:
        return f"casts an input-dependent value to {meta.dtype} (rounding: a step function)"
    src = [n.meta["val"].dtype for n in node.all_input_nodes
           if isinstance(n.meta.get("val"), torch.Tensor)
           and isinstance(env.get(n.name), (Var, Quad, SignOf))]
    if src and _MANTISSA.get(meta.dtype, 0) < max(_MANTISSA.get(d, 0) for d in src):
        return f"rounds an input-dependent value to {meta.dtype} (a step function)"
    return None


def _leaf_shape_problem(module: torch.nn.Module, shape: tuple[int, ...]) -> str | None:
    """Why a lipverify layer's route does not apply to inputs of this per-sample shape (its
    parameters would broadcast the input), or None."""
    from lipverify.layers.activations import HouseholderOrder1, HouseholderOrder2, MaxMin
    from lipverify.models import Normalize

    tensors = {k: v for k, v in list(module.named_parameters()) + list(module.named_buffers())}
    tensors.update({k: v for k, v in vars(module).items() if isinstance(v, torch.Tensor)})
    if not shape:
        return "a scalar input"
    c = shape[0]
    want: dict[str, tuple[int, ...]] = {}
    if isinstance(module, Normalize):
        want = {"mean": (1, c, 1, 1), "std": (1, c, 1, 1)}
        if len(shape) != 3:
            return f"per-channel statistics applied to inputs of shape {shape}"
    elif isinstance(module, HouseholderOrder1):
        want = {"theta": (1, c // 2, 1, 1)}
    elif isinstance(module, HouseholderOrder2):
        want = {"theta0": (c // 2,), "theta1": (c // 2,), "theta2": (c // 2,)}
    elif not isinstance(module, MaxMin):
        return None
    if isinstance(module, (MaxMin, HouseholderOrder1, HouseholderOrder2)) and c % 2:
        return f"pair activation on inputs of shape {shape}: an odd channel count"
    if isinstance(module, (HouseholderOrder1, HouseholderOrder2)) and len(shape) != 3:
        return f"pair activation with parameters on inputs of shape {shape}"
    extra = set(tensors) - set(want)
    if extra:
        return f"unexpected tensors {sorted(extra)} (they could broadcast the input)"
    for k, shp in want.items():
        if k not in tensors or tuple(tensors[k].shape) != shp:
            got = tuple(tensors[k].shape) if k in tensors else None
            return f"{k} has shape {got}, not {shp} (it would broadcast the input)"
    return None


def _geom(stride: object, padding: object, dilation: object, groups: object) -> tuple:
    return (tuple(_pair(stride)), tuple(_pair(padding)), tuple(_pair(dilation)), int(groups))


def _same(a: Var, b: Var) -> bool:
    """The same value: one object, or equal index maps of pure gathers (fresh values own
    their index ranges, so equal maps mean equal values)."""
    if a is b:
        return True
    return (_pure(a) and _pure(b) and a.idx.shape == b.idx.shape
            and bool(torch.equal(a.idx, b.idx)))


def _batches(fn: Callable[[torch.Tensor], torch.Tensor], shape: Sequence[int],
             out_shape: Sequence[int]) -> bool:
    """``fn`` maps a batch of samples to the batch of its per-sample outputs (dim 0 stays
    the batch): checked on two random samples, together and one at a time."""
    z = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    both = fn(z)
    ones = [fn(z[i:i + 1]) for i in range(3)]
    if tuple(both.shape) != (3, *out_shape) or any(
            tuple(o.shape) != (1, *out_shape) for o in ones):
        return False
    return bool(torch.allclose(both, torch.cat(ones), rtol=1e-12, atol=1e-12))


def _pure(v: Var) -> bool:
    """Every entry of ``v`` is a copy of an entry of some value: no constant entries (whose
    values the index map does not record) and no elementwise function on top."""
    return v.src is None and bool((v.idx > 0).all())


def _monotone_01(node: torch.fx.Node) -> bool:
    """The elementwise op is monotone with slope in [0, 1] (its parameters checked)."""
    t, a = node.target, node.args
    if t in (aten.relu.default, aten.tanh.default, aten.sigmoid.default,
             aten.hardtanh.default, aten.clamp.default, aten.clamp_min.default,
             aten.clamp_max.default):
        return True
    if t is aten.leaky_relu.default:
        slope = float(a[1]) if len(a) > 1 else 0.01
        return 0.0 <= slope <= 1.0
    if t is aten.elu.default:
        alpha, scale, iscale = (list(a[1:]) + [1.0, 1.0, 1.0])[:3]
        return 0.0 <= float(alpha) <= 1.0 and float(scale) == 1.0 and float(iscale) == 1.0
    return False


def _content(t: torch.Tensor) -> tuple:
    """A key equal for index maps with equal shape and entries."""
    return tuple(t.shape), t.contiguous().numpy().tobytes()


def _nonneg(c: torch.Tensor) -> bool:
    c = torch.as_tensor(c)
    return bool(torch.isfinite(c).all()) and bool((c >= 0).all())


def _opname(node: torch.fx.Node) -> str:
    if node.target is LEAF_OP:
        return "lipverify leaf"
    return str(node.target).removeprefix("aten.")


def bound_graph(cap: Captured, leaf_bound: LeafBound, *, exact_max_dim: int = 1024,
                lemmas: bool = True) -> GraphBound:
    """A guaranteed upper bound on the Lipschitz constant of the captured map (None, with the
    refusal, when some node has no rule), and each node's bound. ``lemmas=False`` turns off
    the residual lemmas and linear merging (the op-by-op baseline of the benchmarks)."""
    it = _Interpreter(cap, leaf_bound, exact_max_dim, lemmas)
    try:
        L = it.run()
    except Refused as exc:
        return GraphBound(None, it.nodes, [str(exc)], it.leaves)
    upper = L * (1 + ROUNDING) if math.isfinite(L) else math.inf
    return GraphBound(upper, it.nodes, [], it.leaves)
