"""Capture the claimed map as a graph of core ATen ops, with torch's own exporter.

:func:`capture` runs ``torch.export`` (non-strict) on the claimed map and decomposes the result
to core ATen. Non-strict export runs the model's Python, so forward hooks, global hooks,
instance forwards, ``__call__`` overrides and parametrizations all appear as ops, and a module
applied *k* times appears *k* times.

* **Parametrizations are evaluated once**, in the model's own dtype, inside
  ``torch.nn.utils.parametrize.cached()``: the graph holds their results as constants. That is
  the weight as the model computes it, and for a parametrization with state (a power iteration
  that updates its vectors on every call) it is one frozen snapshot.
* **lipverify's own layers are opaque leaves** (SOC, Cayley, BCOP, LLN, Normalize and the pair
  activations): each call enters the graph as one ``lipverify::leaf`` custom op that runs the
  layer's own forward. The graph auditor bounds it with the layer's existing route, which
  checks the layer's forward on a probe first. A lipverify layer with an instance forward, a
  ``forward`` override in a subclass or a parametrization is *not* a leaf: it is traced.
* **Stateful forwards** are detected (two calls on the same input differ, or state outside
  the parameters changes); the capture then covers the snapshot, and says so.
* **The captured graph is checked** against the model's forward on probe inputs (batch 1, and
  a batch of 2 against its rows one at a time); a mismatch is a refusal.

Guarantee: none on values. A returned :class:`Captured` ran on the probes and matched the
model's own forward to ``1e-5`` relative (float32; ``1e-12`` in float64); anything else raises
:class:`CaptureRefused` with one line saying what to change.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["Captured", "CaptureRefused", "capture", "is_leaf", "leaf_module", "snapshot",
           "frozen_parametrizations", "stateful_reason", "graph_evaluator", "release"]


class CaptureRefused(Exception):
    """The claimed map could not be captured as a checked graph (one line: what to change)."""


# --------------------------------------------------------------------------------------------
# opaque leaves: lipverify's own layers enter the graph whole

_LEAVES: dict[int, nn.Module] = {}
_SHAPES: dict[tuple[int, tuple[int, ...]], tuple[int, ...]] = {}
_HANDLES = itertools.count(1)


@torch.library.custom_op("lipverify::leaf", mutates_args=())
def _leaf(x: torch.Tensor, handle: int) -> torch.Tensor:
    module = _LEAVES[handle]
    out = type(module).forward(module, x)
    return out.clone() if out is x else out


@_leaf.register_fake
def _(x: torch.Tensor, handle: int) -> torch.Tensor:
    shape = _SHAPES.get((handle, tuple(x.shape)))
    if shape is None:
        raise RuntimeError("lipverify leaf called on an input shape not seen on the probe")
    return x.new_empty(shape)


LEAF_OP = torch.ops.lipverify.leaf.default


def leaf_module(handle: int) -> nn.Module:
    """The module behind a ``lipverify::leaf`` node's handle."""
    return _LEAVES[handle]


def _leaf_types() -> tuple[type, ...]:
    from lipverify.layers.activations import HouseholderOrder1, HouseholderOrder2, MaxMin
    from lipverify.layers.bcop import BCOP
    from lipverify.layers.cayley import CayleyConv, CayleyLinear
    from lipverify.layers.last import LLN
    from lipverify.layers.soc import SOC
    from lipverify.models import Normalize

    return (SOC, CayleyConv, CayleyLinear, BCOP, LLN, Normalize, MaxMin, HouseholderOrder1,
            HouseholderOrder2)


def is_leaf(module: nn.Module) -> bool:
    """A lipverify layer of exactly one of the leaf classes, with no instance-level method
    (forward or helper), no ``__call__`` override and no parametrization: it enters the
    graph as one opaque op."""
    cls = type(module)
    return (
        cls in _leaf_types()  # exactly: a subclass may change any helper its forward calls
        and not any(callable(v) and not isinstance(v, nn.Module)
                    for v in vars(module).values())  # no instance-level method overrides
        and cls.__call__ is nn.Module.__call__
        and not parametrize.is_parametrized(module)
    )


@contextlib.contextmanager
def _as_leaves(root: nn.Module, probe: torch.Tensor, call: Callable) -> Iterator[list[int]]:
    leaves = [m for m in root.modules() if is_leaf(m)]
    handles: list[int] = []
    seen: dict[int, int] = {}
    for m in leaves:
        if id(m) not in seen:
            seen[id(m)] = next(_HANDLES)
            _LEAVES[seen[id(m)]] = m
            handles.append(seen[id(m)])
    def shape_hook(h: int) -> Callable:
        def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            _SHAPES[(h, tuple(args[0].shape))] = tuple(out.shape)
        return hook

    hooks = [m.register_forward_hook(shape_hook(seen[id(m)]))
             for m in {id(m): m for m in leaves}.values()]
    try:
        with torch.no_grad():
            call(probe)  # records each leaf's output shape for the fake kernel
    finally:
        for hk in hooks:
            hk.remove()
    for m in {id(m): m for m in leaves}.values():
        h = seen[id(m)]
        m.forward = lambda x, h=h: LEAF_OP(x, h)
    try:
        yield handles
    finally:
        for m in {id(m): m for m in leaves}.values():
            m.__dict__.pop("forward", None)


def release(handles: list[int]) -> None:
    """Forget the modules behind ``handles`` (after the audit)."""
    for h in handles:
        _LEAVES.pop(h, None)
        for key in [k for k in _SHAPES if k[0] == h]:
            del _SHAPES[key]


# --------------------------------------------------------------------------------------------
# state


def _state(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    out = [(k, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()
           if isinstance(v, torch.Tensor)]
    for name, m in model.named_modules():
        for k, v in vars(m).items():
            if isinstance(v, torch.Tensor) and not k.startswith("__"):
                out.append((f"{name}.{k}", v.detach().clone()))
    return out


def stateful_reason(call: Callable, model: nn.Module, probe: torch.Tensor) -> str | None:
    """Why the forward is stateful (two calls on ``probe`` differ, or state outside the
    parameters changes), or None."""
    before = _state(model)
    with torch.no_grad():
        a = call(probe)
        mid = _state(model)
        b = call(probe)
    if len(before) != len(mid) or any(
            k1 != k2 or t1.shape != t2.shape or not torch.equal(t1, t2)
            for (k1, t1), (k2, t2) in zip(before, mid, strict=True)):
        changed = next((k1 for (k1, t1), (k2, t2) in zip(before, mid, strict=True)
                        if k1 != k2 or t1.shape != t2.shape or not torch.equal(t1, t2)), "?")
        return f"the forward changes the model's state ({changed})"
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)):
        return "two calls on the same input give different outputs"
    return None


@contextlib.contextmanager
def frozen_parametrizations() -> Iterator[None]:
    """Every parametrization is evaluated once, at its first use, and reused (the snapshot)."""
    with parametrize.cached():
        yield


# --------------------------------------------------------------------------------------------
# capture


@dataclass
class Captured:
    """An exported program of the claimed map, checked against the model's forward."""

    program: torch.export.ExportedProgram
    input_shape: tuple[int, ...]
    handles: list[int]
    stateful: str | None = None

    @property
    def graph(self) -> torch.fx.Graph:
        return self.program.graph

    def constants(self) -> dict[str, torch.Tensor]:
        """Placeholder name -> value, for parameters, buffers and lifted constants."""
        ep = self.program
        out: dict[str, torch.Tensor] = {}
        for spec in ep.graph_signature.input_specs:
            if spec.target is None:
                continue
            value = ep.state_dict.get(spec.target, ep.constants.get(spec.target))
            if value is not None:
                out[spec.arg.name] = value
        return out

    def user_input(self) -> str:
        names = self.program.graph_signature.user_inputs
        if len(names) != 1:
            raise CaptureRefused("the claimed map must take one tensor input")
        return names[0]


class _Map(nn.Module):
    def __init__(self, model: nn.Module, features: bool) -> None:
        super().__init__()
        self.model = model
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x) if self.features else self.model(x)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:240] if text else ''}"


_CHECK_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def _mismatch(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    a64, b64 = a.detach().double(), b.detach().double()
    return float((a64 - b64).abs().max() / b64.abs().max().clamp_min(1e-30))


def capture(model: nn.Module, probe: torch.Tensor, *, features: bool = False,
            seed: int = 0) -> Captured:
    """Export the claimed map (``model`` or ``model.features``) of one sample shaped like
    ``probe[:1]``; the caller holds :func:`frozen_parametrizations` and eval mode."""
    wrapper = _Map(model, features)
    x = probe[:1].detach()
    try:
        stateful = stateful_reason(wrapper, model, x)
        # the snapshot: parametrizations evaluated once, before export sees them
        with torch.no_grad():
            out = wrapper(probe[:2].detach())
    except Exception as exc:  # noqa: BLE001 - the model's own failure, said in one line
        raise CaptureRefused(f"the model fails on a probe input ({_one_line(exc)})") from None
    if not isinstance(out, torch.Tensor) or out.dim() < 2 or \
            out.shape[0] != min(2, probe.shape[0]):
        raise CaptureRefused("the claimed map must return one tensor (N, ...) with one row per "
                             "input sample")
    with _as_leaves(model, x, wrapper) as handles:
        state = _state(model)  # what the graph will hold: the state export reads
        try:
            with warnings.catch_warnings(), _tracing_precision_flags():
                warnings.simplefilter("ignore")
                ep = torch.export.export(wrapper, (x,), strict=False)
                ep = ep.run_decompositions(_decompositions())
        except Exception as exc:  # noqa: BLE001 - any failure is a refusal, said in one line
            release(handles)
            from torch.nn.modules import module as _module

            hint = "global forward hooks are registered; " if (
                _module._global_forward_hooks or _module._global_forward_pre_hooks) else ""
            raise CaptureRefused(
                f"torch.export could not capture the model ({_one_line(exc)}); {hint}make the "
                "forward traceable (no data-dependent Python branches, no .item(), no state "
                "updates in eval mode), or audit a plain copy (lipverify export)") from None
        finally:
            _restore(model, state)
    sig = ep.graph_signature
    if sig.buffers_to_mutate or sig.user_inputs_to_mutate:
        release(handles)
        raise CaptureRefused("the forward mutates buffers or its input in eval mode; audit a "
                             "frozen copy (lipverify export)")
    cap = Captured(ep, tuple(x.shape[1:]), handles, stateful)
    try:
        # a stateful forward is compared from the state the graph holds (the snapshot)
        _check(cap, wrapper, probe, seed,
               (lambda: _put_state(model, state)) if stateful else (lambda: None))
    except CaptureRefused:
        release(handles)
        raise
    except Exception as exc:  # noqa: BLE001
        release(handles)
        raise CaptureRefused(f"the model fails on a probe input ({_one_line(exc)})") from None
    return cap


@contextlib.contextmanager
def _tracing_precision_flags() -> Iterator[None]:
    """torch.export reads cuDNN's legacy ``allow_tf32`` flag, which raises once the newer
    ``fp32_precision`` settings were changed (as a user asking for IEEE convolutions does).
    The flags change no op of the captured graph (tracing computes nothing): while tracing,
    put cuDNN's conv and RNN settings back to their defaults, then restore them."""
    cudnn = torch.backends.cudnn
    parts = [p for p in (getattr(cudnn, "conv", None), getattr(cudnn, "rnn", None))
             if p is not None and hasattr(p, "fp32_precision")]
    try:
        cudnn.allow_tf32  # noqa: B018 - the read that torch.export does
        parts = []
    except RuntimeError:
        pass
    saved = [p.fp32_precision for p in parts]
    for p in parts:
        p.fp32_precision = "tf32"
    try:
        yield
    finally:
        for p, v in zip(parts, saved, strict=True):
            p.fp32_precision = v


def _decompositions() -> dict:
    """Core ATen, except activations whose graph rule has a checked condition (softplus's
    threshold) or a tighter constant than their decomposition."""
    table = torch.export.default_decompositions()
    aten = torch.ops.aten
    for op in (aten.softplus.default, aten.silu.default, aten.hardswish.default,
               aten.hardsigmoid.default, aten.elu.default, aten.leaky_relu.default,
               aten.gelu.default, aten.hardtanh.default):
        table.pop(op, None)
    return table


def _restore(model: nn.Module, state: list[tuple[str, torch.Tensor]]) -> None:
    """Put back tensor state that tracing replaced (a fake tensor left in an attribute)."""
    now = dict(_state_refs(model))
    for name, value in state:
        ref = now.get(name)
        if ref is None:
            continue
        owner, attr = ref
        cur = getattr(owner, attr, None)
        if isinstance(cur, torch.Tensor) and type(cur) is not type(value) and \
                not isinstance(cur, nn.Parameter):
            setattr(owner, attr, value)


def _state_refs(model: nn.Module) -> Iterator[tuple[str, tuple[nn.Module, str]]]:
    for name, m in model.named_modules():
        for k, v in vars(m).items():
            if isinstance(v, torch.Tensor):
                yield f"{name}.{k}", (m, k)


def _put_state(model: nn.Module, state: list[tuple[str, torch.Tensor]]) -> None:
    """Write back recorded tensor state (parameters, buffers, plain tensor attributes)."""
    refs = dict(_state_refs(model))
    sd = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, value in state:
            if name in sd and isinstance(sd[name], torch.Tensor) and \
                    sd[name].shape == value.shape:
                sd[name].copy_(value)
            elif name in refs:
                owner, attr = refs[name]
                setattr(owner, attr, value.clone())


def _check(cap: Captured, wrapper: nn.Module, probe: torch.Tensor, seed: int,
           reset: Callable[[], None]) -> None:
    """The graph against the forward: on every probe point (the audit's points), two random
    points and the corners 0 and 1 of the pixel cube, one at a time; and the forward on the
    whole batch of probe points against those rows (a sample's output must not depend on the
    rest of its batch, whatever the batch size)."""
    gen = torch.Generator().manual_seed(seed + 7919)
    shape = (1, *cap.input_shape)
    rnd = [torch.rand(shape, generator=gen).to(probe.device, probe.dtype) for _ in range(2)]
    corners = [torch.zeros(shape, dtype=probe.dtype, device=probe.device),
               torch.ones(shape, dtype=probe.dtype, device=probe.device)]
    points = [p.unsqueeze(0) for p in probe.detach()]
    run = cap.program.module()
    tol = _CHECK_RTOL.get(probe.dtype, 1e-3)
    with torch.no_grad():
        rows = []
        for x in points + rnd + corners:
            reset()
            want = wrapper(x)
            got = run(x)
            if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor):
                raise CaptureRefused("the claimed map must return one tensor")
            gap = _mismatch(got, want)
            if not gap <= tol:
                raise CaptureRefused(
                    f"the captured graph differs from the model's forward by {gap:.3g} "
                    "(relative) on a probe: the forward depends on something export does not "
                    "see (state, randomness, torch.compiler.is_exporting()); audit a frozen "
                    "copy (lipverify export)")
            rows.append(want)
        for batch, alone in ((torch.cat(points), torch.cat(rows[:len(points)])),
                             (torch.cat(rnd), torch.cat(rows[len(points):len(points) + 2]))):
            reset()
            together = wrapper(batch)
            reset()
            if not _mismatch(together, alone) <= tol:
                raise CaptureRefused("a sample's output depends on the other samples of its "
                                     "batch; per-sample certificates do not apply")


def snapshot(model: nn.Module, probe: torch.Tensor, *, features: bool = False
             ) -> torch.export.ExportedProgram:
    """One frozen evaluation of the claimed map as an exported program of plain ATen ops
    (parametrizations and stateful normalisations evaluated once; lipverify's layers kept as
    leaves are traced as the ops they run). ``torch.export.save`` writes it; loading it runs
    no Python code of the model."""
    wrapper = _Map(model, features)
    x = probe[:1].detach()
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with frozen_parametrizations(), torch.no_grad():
            wrapper(x)
            state = _state(model)
            try:
                with warnings.catch_warnings(), _tracing_precision_flags():
                    warnings.simplefilter("ignore")
                    ep = torch.export.export(
                        wrapper, (probe[:2].detach(),), strict=False,
                        dynamic_shapes=({0: torch.export.Dim.AUTO},)).run_decompositions()
            except Exception as exc:  # noqa: BLE001
                raise CaptureRefused(f"torch.export could not capture the model "
                                     f"({_one_line(exc)})") from None
            finally:
                _restore(model, state)
            got, want = ep.module()(x), wrapper(x)
    finally:
        for m, t in was:
            m.train(t)
    if not _mismatch(got, want) <= _CHECK_RTOL.get(x.dtype, 1e-3):
        raise CaptureRefused("the exported snapshot differs from the model's forward")
    return ep


def graph_evaluator(cap: Captured) -> Callable[[torch.Tensor], torch.Tensor]:
    """The captured map evaluated in float64, one sample at a time: the subgraph that depends
    only on parameters and buffers is evaluated once, in the model's own dtype, and its values
    are converted exactly to float64; every op that depends on the input runs in float64.
    (For graphs without lipverify leaves: those run their own forward.)"""
    consts = cap.constants()
    user = cap.user_input()
    const_env: dict[str, object] = {}
    live: set[str] = {user}
    nodes = list(cap.graph.nodes)
    for node in nodes:
        if node.op == "placeholder" and node.name != user:
            const_env[node.name] = consts.get(node.target, consts.get(node.name))
        elif node.op == "call_function":
            deps = [a.name for a in node.all_input_nodes]
            if any(d in live for d in deps):
                live.add(node.name)
            else:
                args = torch.fx.node.map_arg(node.args, lambda a: const_env[a.name])
                kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: const_env[a.name])
                const_env[node.name] = node.target(*args, **kwargs)

    def to64(v: object) -> object:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.detach().to(torch.float64)
        if isinstance(v, (list, tuple)):
            return type(v)(to64(e) for e in v)
        return v

    c64 = {k: to64(v) for k, v in const_env.items()}

    def one(x: torch.Tensor) -> torch.Tensor:
        env = dict(c64)
        env[user] = x.to(torch.float64)
        out = None
        for node in nodes:
            if node.op == "call_function" and node.name in live:
                args = torch.fx.node.map_arg(node.args, lambda a: env[a.name])
                kwargs = dict(torch.fx.node.map_arg(node.kwargs, lambda a: env[a.name]))
                if kwargs.get("dtype") in (torch.float32, torch.float16, torch.bfloat16):
                    kwargs["dtype"] = torch.float64
                env[node.name] = node.target(*args, **kwargs)
            elif node.op == "output":
                res = torch.fx.node.map_arg(node.args[0], lambda a: env[a.name])
                out = res[0] if isinstance(res, (list, tuple)) else res
        return out

    def f64(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([one(x[i:i + 1]) for i in range(x.shape[0])])

    return f64
