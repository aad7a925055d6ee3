"""A frozen, fast copy of a LipConvNet for third-party tools (AutoAttack, RobustBench, foolbox).

``lipverify.fast(model, input_size)`` returns a plain eval-mode :class:`FastModule` that any tool
can call as ``module(x)``: pixels in [0, 1], NCHW, of the one input size it was built for.

Guarantee (tolerance): the module computes ``model``'s eval-mode function to within
``tolerance`` (default 1e-5). This is checked when it is built: on a seeded probe batch of
``probe`` images, uniform in [0, 1], ``max |fast(x) - model(x)| <= tolerance * max(1, max
|model(x)|)``, otherwise :func:`fast` raises :class:`~lipverify.errors.InputError` and returns
nothing. The check is repeated when a saved module is loaded, against the probe logits recorded at
build time. Input gradients are autograd's exact gradients of the module's own function. They
agree with the model's to float rounding, except where an activation switches branch on a
near-tie. ``tests/test_fast_module.py`` compares logits and input gradients to 1e-5.

Its state is constants, with no parameters and no cache, so nothing can go stale:

- **SOC**: the dense operator ``P - I`` built from the layer's own T-term series
  (:func:`lipverify.layers.soc_materialize.build_dense`, never ``matrix_exp``), the identity
  being applied exactly. A layer whose dense product would not be ``min_gain`` times cheaper
  per image, or would not repay its build within ``images`` images, keeps its eval filter ``A``
  as a constant, summed by the same series kernel as the layer.
- **Cayley**: its per-frequency orthogonal matrices. **BCOP**: its orthogonalized filter.
  **LLN / CayleyLinear**: the normalized / orthogonal weight. Activations and the input
  normalization: their values, as buffers.

Cost: ``module.build_seconds`` (wall seconds of the build, the probe check included),
``module.nbytes`` (bytes of its state) and ``module.summary()`` (per layer). Memory is planned
before anything is allocated. A plan whose state exceeds ``max_bytes`` (default 2 GiB) is refused
with a one-line message naming the largest operator.

Persistence: the module is built per process, or saved as a ``state_dict``
(:func:`save` / :func:`load`; ``torch.save(module.state_dict())`` then
``FastModule.from_state_dict(torch.load(f, weights_only=True))``). The state carries its own
small JSON description, so the module is rebuilt from it without the original model.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import types
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lipverify.errors import InputError
from lipverify.layers import BCOP, LLN, SOC, CayleyConv, CayleyLinear, make_activation
from lipverify.layers.activations import HouseholderOrder1, HouseholderOrder2, MaxMin
from lipverify.layers.soc import space_to_depth
from lipverify.layers.soc_fast import Geometry, SeriesOperator, series
from lipverify.layers.soc_materialize import DenseOperator, build_dense, plan_layer
from lipverify.models import LipConvNet

__all__ = ["FastModule", "fast", "save", "load", "DEFAULT_MAX_BYTES", "DEFAULT_TOLERANCE"]

FORMAT = "lipverify-fast/1"
DEFAULT_MAX_BYTES = 2 * 2**30
DEFAULT_TOLERANCE = 1e-5
_ACTIVATIONS = {MaxMin: "maxmin", HouseholderOrder1: "hh1", HouseholderOrder2: "hh2"}
_MAX_SPEC_CHARS = 1 << 20


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


# ------------------------------------------------------------------------------------------
# the operations (each: a JSON-able spec plus constant buffers)


class _Op(nn.Module):
    """One step of a :class:`FastModule`: ``spec`` (JSON-able) and constant buffers."""

    #: buffers every instance has; ``bias`` is optional
    required: tuple[str, ...] = ()

    def __init__(self, spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.spec = dict(spec)
        names = set(self.required) | ({"bias"} if "bias" in tensors else set())
        if set(tensors) != names:
            raise InputError(f"fast module state: a {spec.get('op')!r} step needs tensors "
                             f"{sorted(names)}, got {sorted(tensors)}")
        for name, t in tensors.items():
            self.register_buffer(name, t.detach())
        self.bias: torch.Tensor | None = tensors.get("bias")

    def _add_bias(self, z: torch.Tensor) -> torch.Tensor:
        return z if self.bias is None else z + self.bias.view(1, -1, 1, 1)


class _Normalize(_Op):
    required = ("mean", "std")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class _SOCDense(_Op):
    """``x -> (P - I) x + pad(s2d(x)) + b``: :class:`DenseOperator`'s arithmetic."""

    required = ("matrix",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        op = DenseOperator((), "", tuple(s["in_shape"]), tuple(s["out_shape"]), s["stride"],
                           self.matrix)
        return op(x, self.bias)


class _SOCSeries(_Op):
    """``x -> sum_{i<=T} A^i pad(s2d(x)) / i!`` (truncated) ``+ b`` with a constant ``A``."""

    required = ("operator",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        op = SeriesOperator(Geometry(*s["geometry"]), self.operator)
        return self._add_bias(series(space_to_depth(x, s["stride"]), s["terms"], op=op))


class _FourierConv(_Op):
    """Cayley: ``irfft2(Q_uv rfft2(s2d(x))_uv) + b`` with constant ``Q``."""

    required = ("q",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = space_to_depth(x, self.spec["stride"])
        n, m = x.shape[-2:]
        xfft = torch.fft.rfft2(x)
        yfft = torch.einsum("uvoc,bcuv->bouv", self.q.to(xfft.dtype), xfft)
        return self._add_bias(torch.fft.irfft2(yfft, s=(n, m)))


class _CircularConv(_Op):
    """BCOP: ``conv2d(circular_pad(s2d(x)), W) + b`` with constant ``W``."""

    required = ("weight",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = space_to_depth(x, self.spec["stride"])
        p = self.spec["pad"]
        if p:
            x = F.pad(x, (p, p, p, p), mode="circular")
        return F.conv2d(x, self.weight.to(x.dtype), self.bias)


class _Linear(_Op):
    required = ("weight",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.flatten(1), self.weight, self.bias)


class _Reshape(_Op):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.spec["shape"])


class _Activation(_Op):
    """A pair activation whose angles are buffers (the layer's own forward)."""

    def __init__(self, spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        nn.Module.__init__(self)
        self.spec = dict(spec)
        try:
            act = make_activation(spec["name"], int(spec["channels"]))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"fast module state: bad activation {spec!r} ({e})") from None
        names = {f"act.{n}" for n, _ in act.named_parameters()}
        if set(tensors) != names:
            raise InputError(f"fast module state: activation {spec['name']!r} needs tensors "
                             f"{sorted(names)}, got {sorted(tensors)}")
        for name, _ in list(act.named_parameters()):
            delattr(act, name)
            act.register_buffer(name, tensors[f"act.{name}"].detach())
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x)


_OPS: dict[str, type[_Op]] = {
    "normalize": _Normalize, "soc_dense": _SOCDense, "soc_series": _SOCSeries,
    "cayley_conv": _FourierConv, "bcop_conv": _CircularConv, "linear": _Linear,
    "reshape": _Reshape, "activation": _Activation,
}


# ------------------------------------------------------------------------------------------
# the module


def _probe_inputs(shape: tuple[int, ...], n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=gen, dtype=torch.float64)


class FastModule(nn.Module):
    """The eval-mode function of a LipConvNet as constant operators (see the module doc).

    Always in eval mode (``train()`` keeps it there); no parameters; takes only inputs of
    ``input_shape`` (C, H, W). ``build_seconds``, ``nbytes``, ``probe_error`` and
    ``summary()`` report what it cost and how close it is.
    """

    def __init__(self, spec: dict[str, Any], ops: list[_Op], probe_logits: torch.Tensor) -> None:
        super().__init__()
        self.ops = nn.ModuleList(ops)
        self.register_buffer("probe_logits", probe_logits.detach())
        self._spec = spec
        self.input_shape: tuple[int, int, int] = tuple(int(v) for v in spec["input_shape"])
        super().train(False)

    # -- the function -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ok = isinstance(x, torch.Tensor) and x.dim() == 4
        if not ok or tuple(x.shape[1:]) != self.input_shape:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"this fast module takes (N, {', '.join(map(str, self.input_shape))})"
                             f" inputs, got {got}; build another with lipverify.fast(model, size)")
        if x.dtype != self.probe_logits.dtype:
            raise InputError(f"this fast module computes in {self.probe_logits.dtype}, the input "
                             f"is {x.dtype}; convert one of them (module.to(dtype))")
        for op in self.ops:
            x = op(x)
        return x

    def train(self, mode: bool = True) -> FastModule:
        """A fast module is the eval-mode function: it stays in eval mode."""
        return super().train(False)

    # -- what it cost --------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of the module's state (its constant operators)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @property
    def build_seconds(self) -> float:
        """Wall seconds :func:`fast` took to build and check it."""
        return float(self._spec["build"]["seconds"])

    @property
    def probe_error(self) -> float:
        """``max |fast(x) - model(x)|`` on the probe batch at build time."""
        return float(self._spec["build"]["probe_error"])

    @property
    def tolerance(self) -> float:
        return float(self._spec["probe"]["tolerance"])

    @property
    def layers(self) -> list[dict[str, Any]]:
        """Per source layer: name, how it is held (op), bytes and build seconds."""
        return [dict(r) for r in self._spec["build"]["layers"]]

    def summary(self) -> str:
        lines = [f"{r['name']}: {r['op']} {r['shape']} {_mib(r['bytes'])} in {r['seconds']:.2f} s"
                 for r in self.layers if r["bytes"] or r["seconds"] > 0.005]
        lines.append(
            f"fast module for {self.input_shape}: {_mib(self.nbytes)}, built in "
            f"{self.build_seconds:.2f} s, probe error {self.probe_error:.2e} "
            f"(tolerance {self.tolerance:g} x max(1, |logit|))"
        )
        return "\n".join(lines)

    def extra_repr(self) -> str:
        return f"input_shape={self.input_shape}, nbytes={self.nbytes}"

    # -- persistence ---------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, str]:
        return {"format": FORMAT, "spec": json.dumps(self._spec, sort_keys=True)}

    def set_extra_state(self, state: Any) -> None:
        spec = _parse_extra_state(state)
        if spec["ops"] != self._spec["ops"] or spec["input_shape"] != self._spec["input_shape"]:
            raise InputError("this state belongs to a different fast module (other layers or "
                             "input size); use FastModule.from_state_dict(state)")
        self._spec = spec

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], *, check: bool = True) -> FastModule:
        """Rebuild a module from ``module.state_dict()`` (e.g. read with
        ``torch.load(f, weights_only=True)``); with ``check``, its probe logits are recomputed
        and compared with those recorded at build time (``tolerance``)."""
        if not isinstance(state, dict) or "_extra_state" not in state:
            raise InputError("not the state of a lipverify fast module (no _extra_state entry)")
        spec = _parse_extra_state(state["_extra_state"])
        tensors: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(len(spec["ops"]))}
        for key, value in state.items():
            if key in ("_extra_state", "probe_logits"):
                continue
            parts = key.split(".", 2)
            if (len(parts) != 3 or parts[0] != "ops" or not parts[1].isdigit()
                    or int(parts[1]) not in tensors or not isinstance(value, torch.Tensor)):
                raise InputError(f"fast module state: unexpected entry {key[:80]!r}")
            tensors[int(parts[1])][parts[2]] = value
        probe = state.get("probe_logits")
        if not isinstance(probe, torch.Tensor) or not probe.is_floating_point():
            raise InputError("fast module state: probe_logits missing")
        ops = [_OPS[s["op"]](s, tensors[i]) for i, s in enumerate(spec["ops"])]
        module = cls(spec, ops, probe)
        if check:
            x = _probe_inputs(module.input_shape, int(spec["probe"]["n"]),
                              int(spec["probe"]["seed"])).to(probe)
            try:
                with torch.no_grad():
                    got = module(x)
            except (RuntimeError, ValueError, IndexError, TypeError, KeyError) as e:
                msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                raise InputError(f"fast module state is inconsistent: {msg}") from None
            err = _error(got, probe)
            if not err <= module.tolerance * _scale(probe):
                raise InputError(f"fast module state does not reproduce its recorded probe logits"
                                 f" (max error {err:.3g}): damaged or edited")
        return module


def _parse_extra_state(state: Any) -> dict[str, Any]:
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(f"not a lipverify fast module state (expected format {FORMAT})")
    text = state.get("spec")
    if not isinstance(text, str) or len(text) > _MAX_SPEC_CHARS:
        raise InputError("fast module state: missing or oversized description")
    try:
        spec = json.loads(text)
        ok = (
            isinstance(spec, dict) and isinstance(spec.get("ops"), list)
            and all(isinstance(s, dict) and s.get("op") in _OPS for s in spec["ops"])
            and isinstance(spec.get("input_shape"), list) and len(spec["input_shape"]) == 3
            and all(isinstance(v, int) and 0 < v < 1 << 16 for v in spec["input_shape"])
            and isinstance(spec.get("probe"), dict) and isinstance(spec.get("build"), dict)
            and 0 < int(spec["probe"]["n"]) <= 1024
            and int(spec["probe"]["n"]) * math.prod(spec["input_shape"]) <= 1 << 26
            and 0 < float(spec["probe"]["tolerance"]) < 1
            and all(_op_spec_ok(s) for s in spec["ops"])
        )
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise InputError("fast module state: unreadable description")
    return spec


def _small_ints(values: Any, n: int, lo: int = 0, hi: int = 1 << 16) -> bool:
    return (isinstance(values, list) and len(values) == n
            and all(isinstance(v, int) and lo <= v < hi for v in values))


def _op_spec_ok(s: dict[str, Any]) -> bool:
    """Bounds on what a read description may ask for (a crafted one must not run for ever)."""
    op = s["op"]
    if "stride" in s or op in ("soc_dense", "soc_series", "cayley_conv", "bcop_conv"):
        if s.get("stride") not in (1, 2):
            return False
    if op == "soc_dense":
        return _small_ints(s.get("in_shape"), 3, 1) and _small_ints(s.get("out_shape"), 3, 1)
    if op == "soc_series":
        return _small_ints(s.get("geometry"), 6, 1) and s.get("terms") in range(65)
    if op == "bcop_conv":
        return s.get("pad") in range(16)
    if op == "reshape":
        return isinstance(s.get("shape"), list) and 1 <= len(s["shape"]) <= 3 and all(
            isinstance(v, int) and -1 <= v < 1 << 24 for v in s["shape"])
    if op == "activation":
        return s.get("name") in ("maxmin", "hh1", "hh2") and _small_ints([s.get("channels")], 1, 2)
    return True


def _error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).abs().max())


def _scale(ref: torch.Tensor) -> float:
    return max(1.0, float(ref.double().abs().max()))


# ------------------------------------------------------------------------------------------
# planning and building


def _input_shape(model: LipConvNet, input_size: Any) -> tuple[int, int, int]:
    cfg = model.config
    if input_size is None:
        input_size = cfg["input_size"]
    if isinstance(input_size, int):
        return (int(cfg["in_channels"]), input_size, input_size)
    try:
        size = tuple(int(v) for v in input_size)
    except (TypeError, ValueError):
        size = ()
    if len(size) == 2:
        size = (int(cfg["in_channels"]), *size)
    if len(size) != 3 or min(size) <= 0:
        raise InputError(f"input_size must be H, (H, W) or (C, H, W), got {input_size!r}")
    return size  # type: ignore[return-value]


def _check_model(model: Any) -> LipConvNet:
    if not isinstance(model, LipConvNet) or any(
        getattr(type(model), f) is not getattr(LipConvNet, f)
        for f in ("forward", "features", "head")
    ):
        raise InputError(
            f"lipverify.fast() builds LipConvNet models (SOC, Cayley, BCOP); got "
            f"{type(model).__name__}. Call another model directly in eval mode, or use "
            "lipverify.layers.soc.fast_eval for its SOC layers"
        )
    return model


class _Step:
    """A planned step: source module, op kind, the shape it sees, estimated bytes."""

    def __init__(self, name: str, module: nn.Module | None, op: str, in_shape: tuple,
                 nbytes: int = 0, **spec: Any) -> None:
        self.name, self.module, self.op, self.in_shape = name, module, op, in_shape
        self.nbytes, self.spec = nbytes, spec


def _soc_dense_wanted(name: str, layer: SOC, shape: tuple, dense: Any, images: float,
                      min_gain: float) -> bool:
    if dense is True or dense is False:
        return dense
    if dense is not None:
        return name in dense
    plan = plan_layer(name, layer, shape)
    return plan.series_macs >= min_gain * plan.dense_macs and plan.repays_after <= images


def _plan(model: LipConvNet, shape: tuple, itemsize: int, dense: Any, images: float,
          min_gain: float) -> list[_Step]:
    p = next(model.parameters())
    z = torch.zeros(1, *shape, dtype=p.dtype, device=p.device)
    names = {m: n for n, m in model.named_modules()}
    steps = [_Step("normalize", model.normalize, "normalize", shape, 2 * shape[0] * itemsize)]
    z = model.normalize(z)

    def conv(mod: nn.Module, z: torch.Tensor) -> None:
        name, c, h, w = names[mod], *z.shape[1:]
        bias = 0 if mod.bias is None else mod.out_channels * itemsize
        if isinstance(mod, SOC):
            s = mod.stride
            geo = Geometry(mod.in_channels, mod.out_channels, mod.max_channels, mod.kernel_size,
                           h // s, w // s)
            if _soc_dense_wanted(name, mod, (c, h, w), dense, images, min_gain):
                rows, cols = geo.cout * geo.hw, geo.cin * geo.hw
                steps.append(_Step(name, mod, "soc_dense", (c, h, w), rows * cols * itemsize + bias,
                                   shape=[rows, cols]))
            else:
                op_shape = [geo.n, geo.n] if geo.kind == "dense" else [geo.m, geo.m, geo.k, geo.k]
                steps.append(_Step(name, mod, "soc_series", (c, h, w),
                                   math.prod(op_shape) * itemsize + bias, shape=op_shape))
        elif isinstance(mod, CayleyConv):
            s = mod.stride
            n, m = h // s, w // s
            entries = n * (m // 2 + 1) * mod.out_channels * mod.in_channels
            steps.append(_Step(name, mod, "cayley_conv", (c, h, w), 2 * entries * itemsize + bias,
                               shape=[n, m // 2 + 1, mod.out_channels, mod.in_channels]))
        elif isinstance(mod, BCOP):
            k = mod.kernel_size
            entries = mod.out_channels * mod.in_channels * k * k
            steps.append(_Step(name, mod, "bcop_conv", (c, h, w), entries * itemsize + bias,
                               shape=[mod.out_channels, mod.in_channels, k, k]))
        else:
            raise InputError(f"lipverify.fast() does not know the layer {name} "
                             f"({type(mod).__name__}); it builds SOC, Cayley and BCOP LipConvNets")

    for blk in model.blocks:
        conv(blk.conv, z)
        z = blk.conv(z)
        act = blk.activation
        if type(act) not in _ACTIVATIONS:
            raise InputError(f"lipverify.fast() does not know the activation {names[act]} "
                             f"({type(act).__name__})")
        steps.append(_Step(names[act], act, "activation", tuple(z.shape[1:]),
                           sum(t.numel() for t in act.parameters()) * itemsize))
        z = blk.activation(z)
    z = z.flatten(1)
    steps.append(_Step("flatten", None, "reshape", tuple(z.shape[1:]), shape=[-1]))
    last = model.last_layer
    if isinstance(last, (LLN, CayleyLinear)):
        steps.append(_Step("last_layer", last, "linear", tuple(z.shape[1:]),
                           (last.weight.numel() + last.bias.numel()) * itemsize,
                           shape=list(last.weight.shape)))
    else:
        steps.append(_Step("features", None, "reshape", tuple(z.shape[1:]),
                           shape=[z.shape[1], 1, 1]))
        conv(last, z[:, :, None, None])
        steps.append(_Step("logits", None, "reshape", (last.out_channels, 1, 1), shape=[-1]))
    return steps


def _build(step: _Step) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(spec, tensors) of one step: the layer's eval-mode operator as constants."""
    mod = step.module
    spec: dict[str, Any] = {"op": step.op}
    tensors: dict[str, torch.Tensor] = {}
    if getattr(mod, "bias", None) is not None and step.op != "normalize":
        tensors["bias"] = mod.bias.detach().clone()
    c, h, w = step.in_shape if len(step.in_shape) == 3 else (0, 0, 0)
    if step.op == "normalize":
        tensors = {"mean": mod.mean.detach().clone(), "std": mod.std.detach().clone()}
    elif step.op == "soc_dense":
        s = mod.stride
        spec.update(in_shape=[c, h, w], out_shape=[mod.out_channels, h // s, w // s], stride=s)
        tensors["matrix"] = build_dense(mod, (c, h, w), identity=False)
    elif step.op == "soc_series":
        s = mod.stride
        op = mod.eval_operator(torch.zeros(1, mod.in_channels, h // s, w // s,
                                           dtype=mod.random_conv_filter.dtype,
                                           device=mod.random_conv_filter.device))
        g = op.geo
        spec.update(stride=s, terms=mod.eval_terms,
                    geometry=[g.cin, g.cout, g.m, g.k, g.h, g.w])
        tensors["operator"] = op.tensor.detach().clone()
    elif step.op == "cayley_conv":
        s = mod.stride
        spec.update(stride=s)
        tensors["q"] = mod.frequency_matrices(h // s, w // s).detach().clone()
    elif step.op == "bcop_conv":
        spec.update(stride=mod.stride, pad=mod.kernel_size // 2)
        tensors["weight"] = mod.conv_filter().detach().clone()
    elif step.op == "linear":
        weight = mod.normalized_weight() if isinstance(mod, LLN) else mod.orthogonal_weight()
        tensors["weight"] = weight.detach().clone()
    elif step.op == "reshape":
        spec.update(shape=step.spec["shape"])
    elif step.op == "activation":
        spec.update(name=_ACTIVATIONS[type(mod)], channels=int(step.in_shape[0]))
        tensors = {f"act.{n}": p.detach().clone() for n, p in mod.named_parameters()}
    return spec, tensors


def fast(
    model: nn.Module,
    input_size: Any = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    dense: bool | Collection[str] | None = None,
    images: float = 1e5,
    min_gain: float = 1.5,
    tolerance: float = DEFAULT_TOLERANCE,
    probe: int = 8,
    seed: int = 0,
) -> FastModule:
    """The eval-mode function of ``model`` (a SOC, Cayley or BCOP LipConvNet) as a frozen
    :class:`FastModule` for inputs of ``input_size`` (H, (H, W) or (C, H, W); default the
    model's own), checked on ``probe`` seeded images to ``tolerance`` (see the module doc).

    ``dense``: which SOC layers become dense operators: ``None`` (default) those whose dense
    product is ``min_gain`` times cheaper per image than the series and repays its build within
    ``images`` images (a standard AutoAttack runs ~1e4 passes per point); ``True`` all,
    ``False`` none, or a collection of layer names (``"layer2.0.conv"``). ``max_bytes``: the
    module's state may not exceed it (planned before anything is built; refused otherwise).
    The model itself is left as it was (modes restored, no weights changed).
    """
    t0 = time.perf_counter()
    model = _check_model(model)
    if not (isinstance(max_bytes, int) and max_bytes > 0):
        raise InputError(f"max_bytes must be a positive integer, got {max_bytes!r}")
    if not (isinstance(probe, int) and 0 < probe <= 1024):
        raise InputError(f"probe must be an integer in [1, 1024], got {probe!r}")
    if not (isinstance(tolerance, (int, float)) and 0 < tolerance < 1):
        raise InputError(f"tolerance must lie in (0, 1), got {tolerance!r}")
    if dense is not None and not isinstance(dense, bool):
        dense = {str(n) for n in dense}
    shape = _input_shape(model, input_size)
    p = next(model.parameters())
    if not p.is_floating_point():
        raise InputError(f"lipverify.fast() needs floating-point weights, got {p.dtype}")
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.inference_mode(False), torch.no_grad():
            try:
                steps = _plan(model, shape, p.element_size(), dense, images, min_gain)
            except (RuntimeError, ValueError) as e:
                if isinstance(e, InputError):
                    raise
                msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                raise InputError(f"lipverify.fast(): the model does not take {shape} inputs "
                                 f"({msg})") from None
            _check_budget(steps, max_bytes, dense)
            specs, ops, report = [], [], []
            for i, step in enumerate(steps):
                t1 = time.perf_counter()
                spec, tensors = _build(step)
                op = _OPS[step.op](spec, {k: v.detach() for k, v in tensors.items()})
                specs.append(op.spec)
                ops.append(op)
                report.append({
                    "index": i, "name": step.name, "op": step.op,
                    "shape": step.spec.get("shape", []),
                    "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
                    "seconds": time.perf_counter() - t1,
                })
            x = _probe_inputs(shape, probe, seed).to(device=p.device, dtype=p.dtype)
            ref = model(x)
            spec = {"input_shape": list(shape), "ops": specs, "build": {},
                    "probe": {"n": probe, "seed": seed, "tolerance": float(tolerance)}}
            module = FastModule(spec, ops, ref)
            got = module(x)
    finally:
        for m, t in modes.items():
            m.training = t
    err = _error(got, ref)
    if not err <= tolerance * _scale(ref):
        raise InputError(f"lipverify.fast(): the fast module differs from the model by {err:.3g}"
                         f" on the probe batch (tolerance {tolerance:g} x "
                         f"{_scale(ref):.3g}); not returned")
    spec["build"] = {"seconds": time.perf_counter() - t0, "probe_error": err, "layers": report}
    return module


def _check_budget(steps: list[_Step], max_bytes: int, dense: Any) -> None:
    total = sum(s.nbytes for s in steps)
    if total <= max_bytes:
        return
    big = max(steps, key=lambda s: s.nbytes)
    hint = "raise max_bytes"
    if any(s.op == "soc_dense" for s in steps):
        hint += ", or keep SOC layers as series (dense=False, or dense=[names])"
    raise InputError(
        f"lipverify.fast(): the operators would not fit: {_mib(total)} in all > max_bytes "
        f"{_mib(max_bytes)}; the largest, {big.name} ({big.op} {big.spec.get('shape', [])}), "
        f"needs {_mib(big.nbytes)}; {hint}"
    )


# ------------------------------------------------------------------------------------------
# files


def save(module: FastModule, path: str | os.PathLike) -> Path:
    """Write ``module.state_dict()`` atomically to ``path`` (read it back with :func:`load`)."""
    from lipverify.atomic import atomic_write

    if not isinstance(module, FastModule):
        raise InputError(f"save() takes a FastModule, got {type(module).__name__}")
    state = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
             for k, v in module.state_dict().items()}
    return atomic_write(path, lambda f: torch.save(state, f))


def load(path: str | os.PathLike, map_location: str | torch.device | None = None) -> FastModule:
    """Read a module written by :func:`save` (``weights_only=True``; the probe is re-checked)."""
    from lipverify.checkpoints import safe_torch_load

    module = FastModule.from_state_dict(safe_torch_load(path))
    return module.to(map_location) if map_location is not None else module


# ``lipverify.fast`` is this module; calling it calls :func:`fast`, so ``lipverify.fast(model)``
# builds and ``lipverify.fast.load(path)`` reads, however the module was imported.
class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> FastModule:
        return fast(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
