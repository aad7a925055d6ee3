"""Dense operators for eval-mode SOC layers: plan, build, cache on disk, verify, apply.

Guarantee: a materialised layer computes ``x -> P x + b`` where column ``j`` of ``P`` is the
layer's own T-term series (:func:`lipverify.layers.soc_fast.series_no_grad`, Eq. 5 of Singla &
Feizi 2021 truncated) applied to basis vector ``e_j`` (or row ``i`` the adjoint series applied
to ``e_i``): the same function as the layer up to float rounding (tested to 1e-5 on logits).
``matrix_exp`` is never used: the exact exponential is a different function and would hide a
bad term count or a stale sigma from an audit. An operator is used only in eval mode, only
while the layer's weights are bit for bit those it was built from (checked at every call
against a private copy, :meth:`~lipverify.layers.soc.SOC.same_weights`: no update idiom,
``.data`` and NumPy-view writes included, can make it serve stale weights; a changed layer
drops it and runs its series), and only for the input shape it was built for. Operators live
outside checkpoints (not in any ``state_dict``); one read from the disk cache is used only
after its SHA-256, its key and a randomized probe against the series all check out,
otherwise it is rebuilt.

Cost model (multiply-adds, "MAC"): building ``P`` pushes ``min(in, out) * H * W`` basis
vectors through the series, i.e. it costs as much as that many images (no ``n^3`` matrix
products: ``matrix_exp`` on n = 8192 took 165 s on 2 cores; the whole LipConvNet-5 plan below
builds in about a minute there); each later image then costs ``rows * cols`` MAC instead of
the series' ``~T * M^2 * k^2 * H * W``. A layer is materialised when (a) ``rows * cols <=
max_entries`` (memory: 2^27 entries = 512 MiB in float32; with ``rows = out*H*W`` and
``cols = in*H*W`` this admits n = M*H*W up to 16384 for the stride-2 layers and ~11585 for
square ones), (b) the dense product is at least ``min_gain`` (1.5) times cheaper per image,
and (c) the build repays within ``images`` images. For LipConvNet-5 at 32x32 with
``images=10_000`` this selects stages 1, 3, 4, 5 and the last layer (n = M*H*W = 16384, 8192,
4096, 2048, 1024); stage 2 (n = 16384, 8192 x 16384 entries, repays after ~11.9k images)
joins from ``images`` ~12k on (an attack audit runs ~1e5 forward-backward passes). For
LipConvNet-20, stages 3.3 to 5 (10k images), and 2.3 to 3.2 too for 1e5 images; its
full-resolution stride-1 layers stay series (2^28 to 2^30 entries, or no per-image gain).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lipverify.layers.soc import SOC, conv_transpose_filter
from lipverify.layers.soc_fast import Geometry, SeriesOperator, dense_apply, series_no_grad
from lipverify.layers.weight_cache import WeightSnapshot

__all__ = [
    "DenseOperator",
    "LayerPlan",
    "MaterializeReport",
    "default_cache_dir",
    "materialize",
    "fast_eval",
    "release",
    "operator_key",
    "build_dense",
]

log = logging.getLogger("lipverify.soc")

FORMAT = "lipverify-soc-operator/2"  # /2: the matrix excludes the identity term
# rough CPU throughputs for the small-batch cut-over (dense products become memory-bound)
_MAC_PER_S = 5e10
_BYTES_PER_S = 1e10


def default_cache_dir() -> Path:
    """``$LIPVERIFY_CACHE_DIR`` or ``~/.cache/lipverify``."""
    env = os.environ.get("LIPVERIFY_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "lipverify"


# ------------------------------------------------------------------------------------------
# the operator


@dataclass
class DenseOperator:
    """``P = I_pad + R`` of one layer for one input shape. ``matrix`` is ``R`` (the terms
    ``i >= 1``), columns in the layer's input pixel order; the identity term is applied
    exactly (space-to-depth, pad/truncate), which also keeps the float32 product accurate
    (the partial sums stay small: 3x less rounding than with ``P``). ``snapshot`` is a copy
    of the weights it was built from: it is valid only while they are unchanged."""

    snapshot: WeightSnapshot = field(repr=False)
    digest: str
    input_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    stride: int
    matrix: torch.Tensor = field(repr=False)
    seconds: float = 0.0
    source: str = "built"
    min_batch: int = 1

    def valid_for(self, layer: SOC) -> bool:
        """Eval mode, and the layer's weights bit for bit those the operator was built from."""
        return not layer.training and layer.same_weights(self.snapshot)

    def accepts(self, x: torch.Tensor) -> bool:
        return (
            x.dim() == 4
            and tuple(x.shape[1:]) == self.input_shape
            and x.shape[0] >= self.min_batch
            and x.dtype == self.matrix.dtype
            and x.device == self.matrix.device
        )

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        c, h, w = self.out_shape
        b = None if bias is None else bias.repeat_interleave(h * w)
        y = dense_apply(x, self.matrix, b).view(x.shape[0], c, h, w)
        xs = F.pixel_unshuffle(x, self.stride) if self.stride > 1 else x
        k = min(c, xs.shape[1])
        if y.requires_grad or xs.requires_grad:
            return torch.cat([y[:, :k] + xs[:, :k], y[:, k:]], 1) if k < c else y + xs[:, :k]
        y[:, :k] += xs[:, :k]
        return y


# ------------------------------------------------------------------------------------------
# keys and the disk cache


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())


def operator_key(layer: SOC, input_shape: Sequence[int]) -> str:
    """SHA-256 over the format, geometry, ``eval_terms``, dtype and every tensor ``A`` depends
    on (filter, power-iteration vectors, correction)."""
    h = hashlib.sha256(FORMAT.encode())
    meta = dict(
        input_shape=list(input_shape), cin=layer.in_channels, cout=layer.out_channels,
        m=layer.max_channels, k=layer.kernel_size, stride=layer.stride, terms=layer.eval_terms,
        dtype=str(layer.random_conv_filter.dtype),
    )
    h.update(json.dumps(meta, sort_keys=True).encode())
    tensors = [layer.random_conv_filter, layer.correction]
    tensors += [getattr(layer, f"{c}{i}") for i in range(1, 5) for c in "uv"]
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _matrix_sha(p: torch.Tensor) -> str:
    return hashlib.sha256(_tensor_bytes(p)).hexdigest()


def _probe_ok(layer: SOC, op: DenseOperator, digest: str) -> bool:
    """Randomized check ``P v == series(v)`` on 4 Gaussian inputs (seeded by the key): an
    operator off by a matrix ``E`` fails unless ``||E v||`` is tiny for all four, which for
    Gaussian ``v`` happens only when ``||E||_F`` is (w.h.p.)."""
    p = op.matrix
    gen = torch.Generator().manual_seed(int(digest[:15], 16))
    v = torch.randn(4, *op.input_shape, generator=gen, dtype=torch.float64).to(p)
    with torch.no_grad():
        xs = layer._s2d(v)
        ref = series_no_grad(layer.eval_operator(xs), xs, layer.eval_terms)
        got = op(v, None)
    tol = 1e-4 if p.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
    err = (got - ref).abs().max().item()
    return math.isfinite(err) and err <= tol * max(1.0, ref.abs().max().item())


def _load(path: Path, layer: SOC, digest: str, rows: int, cols: int,
          device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    from lipverify.errors import CheckpointError
    from lipverify.safe_load import safe_torch_load

    if not path.is_file():
        return None
    try:
        payload = safe_torch_load(path)
    except CheckpointError as exc:
        log.warning("ignoring unreadable cached SOC operator %s (%s)", path, exc)
        return None
    p = payload.get("matrix") if isinstance(payload, dict) else None
    if (
        not isinstance(p, torch.Tensor)
        or payload.get("format") != FORMAT
        or payload.get("key") != digest
        or tuple(p.shape) != (rows, cols)
        or p.dtype != dtype
        or payload.get("matrix_sha256") != _matrix_sha(p)
    ):
        log.warning("ignoring cached SOC operator %s: key, shape or checksum mismatch", path)
        return None
    return p.to(device)


def _save(path: Path, digest: str, p: torch.Tensor) -> None:
    from lipverify.atomic import atomic_write

    payload = {
        "format": FORMAT, "key": digest, "matrix_sha256": _matrix_sha(p),
        "matrix": p.detach().cpu().contiguous(),
    }
    try:
        atomic_write(path, lambda f: torch.save(payload, f))
    except OSError as exc:  # a read-only cache is not an error: the operator is still used
        log.warning("could not write SOC operator cache %s (%s)", path, exc)


# ------------------------------------------------------------------------------------------
# building P


def build_dense(layer: SOC, input_shape: Sequence[int], identity: bool = True,
                chunk_elems: int = 1 << 24) -> torch.Tensor:
    """``P`` (rows ``out*H*W``, columns ``C*Hin*Win`` in input pixel order) of an eval-mode
    layer, by pushing basis vectors through the layer's own series in chunks; without
    ``identity``, ``P`` minus its ``i = 0`` term (the padded identity)."""
    c, hin, win = (int(v) for v in input_shape)
    p0 = layer.random_conv_filter
    dev, dt = p0.device, p0.dtype
    s = layer.stride
    h, w = hin // s, win // s
    hw = h * w
    cin, cout, m = layer.in_channels, layer.out_channels, layer.max_channels
    rows, cols = cout * hw, cin * hw
    # column j of the space-to-depth layout holds input pixel perm[j]
    perm = F.pixel_unshuffle(
        torch.arange(cols, dtype=torch.float64).view(1, c, hin, win), s
    ).flatten().long().to(dev)
    with torch.no_grad():
        op = layer.eval_operator(torch.zeros(1, cin, h, w, dtype=dt, device=dev))
        p = torch.empty(rows, cols, dtype=dt, device=dev)
        chunk = max(1, chunk_elems // (m * hw))
        if cin <= cout:  # columns: P e_j
            for j0 in range(0, cols, chunk):
                j1 = min(cols, j0 + chunk)
                e = torch.zeros(j1 - j0, cols, dtype=dt, device=dev)
                e[torch.arange(j1 - j0), torch.arange(j0, j1)] = 1.0
                z = series_no_grad(op, e.view(-1, cin, h, w), layer.eval_terms, identity)
                p[:, perm[j0:j1]] = z.reshape(j1 - j0, rows).t()
        else:  # rows: P^T e_i = P(A^T) e_i, the adjoint series
            geo = Geometry(cout, cin, m, layer.kernel_size, h, w)
            t = op.tensor
            adj_t = t.t() if op.kind == "dense" else conv_transpose_filter(t)
            adj = SeriesOperator(geo, adj_t.contiguous())
            for i0 in range(0, rows, chunk):
                i1 = min(rows, i0 + chunk)
                e = torch.zeros(i1 - i0, rows, dtype=dt, device=dev)
                e[torch.arange(i1 - i0), torch.arange(i0, i1)] = 1.0
                z = series_no_grad(adj, e.view(-1, cout, h, w), layer.eval_terms, identity)
                p[i0:i1][:, perm] = z.reshape(i1 - i0, cols)
    return p


# ------------------------------------------------------------------------------------------
# planning


@dataclass
class LayerPlan:
    """One SOC layer: its operator size, per-image costs, and what materialize did."""

    name: str
    input_shape: tuple[int, int, int]
    n: int
    rows: int
    cols: int
    kind: str
    terms: int
    hw: int
    k2: int
    series_macs: int
    dense_macs: int
    build_macs: int
    selected: bool = False
    materialized: bool = False
    reason: str = ""
    seconds: float = 0.0
    source: str = ""

    @property
    def fast_macs(self) -> int:
        """Per image after :func:`materialize` (planned, for a dry run)."""
        return self.dense_macs if self.selected else self.series_macs

    @property
    def plain_macs(self) -> int:
        """One full ``M x M`` convolution per power, as the plain implementation."""
        m = self.n // self.hw
        return self.terms * m * m * self.k2 * self.hw

    @property
    def repays_after(self) -> float:
        """Images after which the build has paid for itself."""
        saved = self.series_macs - self.dense_macs
        return self.build_macs / saved if saved > 0 else math.inf


@dataclass
class MaterializeReport:
    """What :func:`materialize` planned and did; ``seconds`` is its wall time."""

    layers: list[LayerPlan]
    seconds: float = 0.0
    images: float = 0.0

    @property
    def build_seconds(self) -> float:
        return sum(p.seconds for p in self.layers if p.source == "built")

    @property
    def load_seconds(self) -> float:
        return sum(p.seconds for p in self.layers if p.source == "disk")

    @property
    def materialized(self) -> list[str]:
        return [p.name for p in self.layers if p.materialized]

    def macs_per_image(self) -> tuple[int, int]:
        """(plain, fast) multiply-adds per image over the SOC layers: the FLOP ceiling of the
        speed-up is their ratio."""
        return sum(p.plain_macs for p in self.layers), sum(p.fast_macs for p in self.layers)

    def as_dict(self) -> dict[str, Any]:
        plain, fast = self.macs_per_image()
        return {
            "seconds": self.seconds, "build_seconds": self.build_seconds,
            "load_seconds": self.load_seconds, "images": self.images,
            "plain_macs_per_image": plain, "fast_macs_per_image": fast,
            "flop_ceiling": plain / fast if fast else math.inf,
            "layers": [asdict(p) for p in self.layers],
        }

    def __str__(self) -> str:
        lines = []
        for p in self.layers:
            what = (
                f"dense {p.rows}x{p.cols} ({p.source} in {p.seconds:.1f} s)"
                if p.materialized else f"series ({p.reason})"
            )
            lines.append(f"{p.name}: n={p.n} {what}")
        plain, fast = self.macs_per_image()
        lines.append(
            f"total {self.seconds:.1f} s (build {self.build_seconds:.1f} s, load "
            f"{self.load_seconds:.1f} s); MAC/image {plain / 1e6:.0f}M -> {fast / 1e6:.0f}M "
            f"(ceiling {plain / max(fast, 1):.2f}x)"
        )
        return "\n".join(lines)


def _soc_layers(model: nn.Module) -> list[tuple[str, SOC]]:
    return [(n or "soc", m) for n, m in model.named_modules() if isinstance(m, SOC)]


def _input_shape(model: nn.Module, input_size: Any) -> tuple[int, int, int]:
    from lipverify.errors import InputError

    cfg = getattr(model, "config", None) or {}
    if input_size is None:
        input_size = cfg.get("input_size")
        if input_size is None:
            raise InputError("pass input_size=(C, H, W): the model does not record its own")
    if isinstance(input_size, int):
        return (int(cfg.get("in_channels", 3)), input_size, input_size)
    size = tuple(int(v) for v in input_size)
    if len(size) == 2:
        return (int(cfg.get("in_channels", 3)), *size)
    if len(size) == 3:
        return size  # type: ignore[return-value]
    raise InputError(f"input_size must be H, (H, W) or (C, H, W), got {input_size!r}")


def _layer_inputs(model: nn.Module, shape: tuple[int, int, int]) -> dict[SOC, tuple]:
    """Input shape (C, H, W) of every SOC layer for one image of ``shape``."""
    seen: dict[SOC, tuple] = {}

    def record(mod: nn.Module, args: tuple) -> None:
        seen.setdefault(mod, tuple(args[0].shape[1:]))

    hooks = [m.register_forward_pre_hook(record) for _, m in _soc_layers(model)]
    p = next(model.parameters())
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *shape, dtype=p.dtype, device=p.device))
    finally:
        for h in hooks:
            h.remove()
        for m, t in modes.items():
            m.training = t
    return seen


def plan_layer(name: str, layer: SOC, input_shape: tuple) -> LayerPlan:
    """Sizes and per-image costs of ``layer`` on inputs of ``input_shape`` (C, H, W)."""
    c, hin, win = input_shape
    s = layer.stride
    geo = Geometry(layer.in_channels, layer.out_channels, layer.max_channels,
                   layer.kernel_size, hin // s, win // s)
    rows, cols = geo.cout * geo.hw, geo.cin * geo.hw
    series_macs = geo.series_macs(layer.eval_terms)
    nb = min(geo.cin, geo.cout) * geo.hw
    return LayerPlan(
        name=name, input_shape=tuple(input_shape), n=geo.n, rows=rows, cols=cols,
        kind=geo.kind, terms=layer.eval_terms, hw=geo.hw, k2=geo.k * geo.k,
        series_macs=series_macs, dense_macs=rows * cols, build_macs=nb * series_macs,
    )


def _min_batch(plan: LayerPlan, itemsize: int) -> int:
    """Batch size from which the dense product (memory-bound for small batches) beats the
    series, by the rough throughputs above."""
    saved = (plan.series_macs - plan.dense_macs) / _MAC_PER_S
    if saved <= 0:
        return 1 << 30
    read = plan.dense_macs * itemsize / _BYTES_PER_S
    return max(1, min(64, math.ceil(read / saved)))


# ------------------------------------------------------------------------------------------
# the API


def materialize(
    model: nn.Module,
    input_size: Any = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    images: float = 10_000,
    max_entries: int = 1 << 27,
    min_gain: float = 1.5,
    use_disk: bool = True,
    layers: Sequence[str] | None = None,
    min_batch: int | None = None,
    dry_run: bool = False,
) -> MaterializeReport:
    """Materialise the dense operator of every SOC layer of ``model`` that repays its build.

    ``images``: how many images (forward or forward+backward passes) the caller will run, e.g.
    10_000 to certify a CIFAR-10 test set, ~1e5 for an attack audit; ``layers``: names to
    consider (default all). Operators are read from / written to ``cache_dir`` (default
    :func:`default_cache_dir`) unless ``use_disk=False``; ``dry_run`` only plans (reason
    ``"would materialise"``). Returns the report with the time spent (build and load seconds)
    and the MAC/image before and after.
    """
    t0 = time.perf_counter()
    shape = _input_shape(model, input_size)
    inputs = _layer_inputs(model, shape)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    plans = []
    for name, layer in _soc_layers(model):
        if layer not in inputs:
            continue
        plan = plan_layer(name, layer, inputs[layer])
        plans.append(plan)
        if layers is not None and name not in layers:
            plan.reason = "not selected"
        elif plan.dense_macs > max_entries:
            plan.reason = f"{plan.dense_macs} entries > max_entries {max_entries}"
        elif plan.series_macs < min_gain * plan.dense_macs:
            plan.reason = f"dense only {plan.series_macs / plan.dense_macs:.2f}x cheaper"
        elif plan.repays_after > images:
            plan.reason = f"repays after {plan.repays_after:.0f} images > {images:.0f}"
        else:
            plan.selected = True
            if dry_run:
                plan.reason = "would materialise"
            else:
                _attach(layer, plan, cache if use_disk else None, min_batch)
    report = MaterializeReport(plans, time.perf_counter() - t0, images)
    log.info("SOC materialize:\n%s", report)
    return report


def _attach(layer: SOC, plan: LayerPlan, cache: Path | None, min_batch: int | None) -> None:
    t0 = time.perf_counter()
    was_training = layer.training
    layer.training = False  # the operator is the eval-mode function (eval_terms)
    try:
        p0 = layer.random_conv_filter
        digest = operator_key(layer, plan.input_shape)
        snapshot = layer.weights_snapshot()
        c, hin, win = plan.input_shape
        s = layer.stride
        out_shape = (layer.out_channels, hin // s, win // s)
        mb = min_batch if min_batch is not None else _min_batch(plan, p0.element_size())
        path = cache / "soc" / f"{digest}.pt" if cache is not None else None
        p = None
        if path is not None:
            p = _load(path, layer, digest, plan.rows, plan.cols, p0.device, p0.dtype)
            if p is not None:
                op = DenseOperator(snapshot, digest, plan.input_shape, out_shape, s, p, 0.0,
                                   "disk", mb)
                if not _probe_ok(layer, op, digest):
                    log.warning("cached SOC operator %s failed the probe check; rebuilding", path)
                    p = None
        source = "disk"
        if p is None:
            source = "built"
            p = build_dense(layer, plan.input_shape, identity=False)
            if path is not None:
                _save(path, digest, p)
        plan.seconds = time.perf_counter() - t0
        plan.source, plan.materialized = source, True
        layer._dense = DenseOperator(
            snapshot, digest, plan.input_shape, out_shape, s, p, plan.seconds, source, mb,
        )
        log.info("%s: dense %dx%d %s in %.2f s", plan.name, plan.rows, plan.cols, source,
                 plan.seconds)
    finally:
        layer.training = was_training


def release(model: nn.Module) -> None:
    """Drop the dense operators and eval caches of every SOC layer of ``model``."""
    for _, layer in _soc_layers(model):
        layer._dense = None
        layer.clear_cache()


@contextmanager
def fast_eval(
    model: nn.Module,
    input_size: Any = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    materialize_layers: bool = True,
    **kw: Any,
) -> Iterator[MaterializeReport | None]:
    """Eval mode with the SOC weights treated as constants (no weight gradients; the cached
    ``A`` serves attacks too) and, unless ``materialize_layers=False``, the small layers
    materialised (``kw`` as :func:`materialize`). Restores modes and frees operators on exit.

    "Constants" only means no weight gradients: every call still compares the weights with the
    copy its cached ``A`` or dense operator was built from, so a weight written inside the
    scope (by any idiom) drops the stale operator and the layer runs its series.
    """
    modes = {m: m.training for m in model.modules()}
    socs = _soc_layers(model)
    frozen = {layer: layer._frozen for _, layer in socs}
    previous = {layer: layer._dense for _, layer in socs}
    model.eval()
    for _, layer in socs:
        layer._frozen = True
    try:
        report = materialize(model, input_size, cache_dir, **kw) if materialize_layers else None
        yield report
    finally:
        for m, t in modes.items():
            m.training = t
        for _, layer in socs:
            layer._frozen = frozen[layer]
            layer._dense = previous[layer]
