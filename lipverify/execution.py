"""Rounding-error bounds for the model as executed: float32 on the CPU.

Guarantee (upper bound): :func:`execution_bound` returns, for each point ``x`` and a ball
radius ``rho``, a ``delta`` with

    |(f̂_y - f̂_j)(x') - (f_y - f_j)(x')| <= delta_j      for every j != y,

at ``x`` and at every float32 input ``x'`` with ``||x' - x||_2 <= rho``, where ``f`` is the
real-valued function of the weights as the model computes them (the one a Lipschitz claim
and the audit cover: SOC's normalized filter ``A`` and LLN's normalized rows as computed in
float32, then exact arithmetic) and ``f̂`` is the model's own eval forward executed in
float32 on the CPU (not ``fast_eval``), at any batch size.

How (standard rounding-error analysis, Higham 2002, Ch. 3; all bounds computed in float64):

* a dot product of length ``n`` computed in any order, with or without FMA, satisfies
  ``|fl(w.x) - w.x| <= gamma_n |w|.|x|``, ``gamma_n = n u / (1 - n u)``, ``u = 2^-24``; a
  sum of ``k + 1`` terms ``gamma_k sum|t_i|``; one operation ``u``. Sharper, for SOC's
  products ``p``: every node of any summation tree adds a subset of the (rounded) products,
  whose sum is at most ``Q = max(P+, P-) = (sum|p| + |sum p|) / 2`` in magnitude, and the
  node errors telescope, so ``|fl(sum p) - sum p| <= gamma_{n-1} (1 + u) Q + u sum|p|``.
  Underflow adds at most ``2^-126`` per operation (gradual underflow or flush-to-zero alike):
  an absolute term;
* per module, the error of the executed output against the real module applied to the
  executed input is bounded by ``kappa * N + beta``, with ``N`` a bound on the l2 norm of the
  executed input over the whole ball; errors already present are propagated by the real
  module's Lipschitz bound (``e_out <= lip * e_in + kappa * N + beta``);
* ``N`` over the ball: ``||ẑ_k(x')|| <= ||ẑ_k(x)|| + 2 e_k + Λ_k rho`` with ``Λ_k`` the
  Lipschitz bound of the prefix (its own guaranteed bounds: the Schur test, and for SOC
  ``1 + sum_{i>T} ||A||^i / i!``, since ``exp(A)`` is orthogonal for a skew ``A``).

Per module (one rule each, exact types only; anything else is refused with the reason):

* :class:`~lipverify.models.Normalize`: two roundings, ``gamma_2 |x - mean| / std``;
* SOC (:mod:`lipverify.layers.soc_fast` eval kernels, conv or dense, with the filter ``A``
  the model computed): each of the ``T`` terms is one convolution or matrix product of length
  ``n`` (``m k^2`` or ``m H W``) with a rounded ``1/i`` scale; its rounding ``rho_i`` is
  bounded with the products' magnitudes at ``x`` (``|A||c_{i-1}|`` and ``|A c_{i-1}|``,
  float64) plus their growth over the ball and from earlier errors; ``rho_i`` reaches the
  output through ``sum_{j <= T-i} A^j i!/(i+j)!``, of norm ``<= 1 + tail`` for a skew ``A``
  (``|i! phi_i(i theta)| <= 1``); then ``T + 1`` terms are summed and the bias added;
* MaxMin: exact (a maximum and a minimum of floats are floats);
* HH1: the reflection's two products and sum, ``sin``/``cos`` within ``2^-21`` (assumed,
  see :data:`ASSUMPTIONS`), and a rounded sector test, which can only pick the other branch
  within ``2 |v.p|`` of the exact output (``R p - p = -2 (v.p) v``);
* HH2: the angle ``phi`` and the sector thresholds within ``Delta`` of the exact ones, so a
  wrong sector's map, orthogonal and equal to the continuous exact map somewhere within
  ``Delta``, is within ``2 Delta ||p||``; plus each map's rounding;
* BCOP: one circular convolution with the filter the model computes (``n = cin k^2``
  products and the bias, bounded like SOC's terms); its norm is exact on the circular grid;
* ``nn.Linear``: ``gamma_{n+1} (|W| |x| + |b|)``; ``nn.Flatten`` and reshapes: exact;
* LLN head (rows ``w`` as the model normalizes them): per class ``gamma_{n+1} (||w_j|| N +
  |b_j|)``, per pair ``delta_j = ||w_y - w_j|| E`` plus both classes' terms; an orthogonal
  (SOC) head gives ``delta = sqrt(2) E`` with ``E`` the logits' error bound.

Checked before any bound is released (each a refusal with the reason): CPU, float32
weights and inputs, eval mode, no hooks, parametrizations, compiled modules, instance
attributes shadowing methods or classes patched after import, the
forward equals the analysed composition bit for bit at ``x``, oneDNN's float32 precision
``ieee``/``none`` for conv and matmul, ``float32_matmul_precision == "highest"`` (oneDNN
may compute in bf16 otherwise), and each SOC convolution dispatched to a direct kernel
(oneDNN or the slow im2col path; NNPACK's Winograd/FFT kernels are refused) at batch
sizes 1 to 1024. Thread count, flush-to-zero and the platform are recorded: the bound
holds for any thread count and either underflow mode.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from lipverify.errors import InputError
from lipverify.layers.activations import HouseholderOrder1, HouseholderOrder2, MaxMin
from lipverify.layers.bcop import BCOP
from lipverify.layers.last import LLN
from lipverify.layers.soc import SOC, conv_transpose_filter, space_to_depth_checked
from lipverify.models import LipBlock, LipConvNet, Normalize
from lipverify.norms import conv_frequency_norm

__all__ = [
    "ExecutionRefused", "ExecutionBound", "execution_bound", "executed_radii",
    "environment", "ASSUMPTIONS", "U32", "gamma",
]

U32 = 2.0**-24  # unit roundoff of float32 (round to nearest)
TINY = 2.0**-125  # twice the smallest normal float32: one underflow, FTZ or gradual
TRIG_ERR = 2.0**-21  # assumed absolute error of float32 sin/cos (SLEEF u10, glibc: <= 1 ulp)
ATAN2_ERR = 2.0**-20  # assumed absolute error of float32 atan2 (<= 1 ulp of a value <= pi)
SAFETY = 1e-6  # relative margin on float64 norm computations (as the audit)
NORM_SLACK = 1e-9  # relative slack on float64 norms of float32 tensors (gamma_n, n < 1e6)
CHECKED_BATCHES = (1, 2, 16, 64, 256, 1024)
_DIRECT_CONV = {"Mkldnn", "Slow2d", "SlowDilated2d", "Empty", "MkldnnEmpty"}

ASSUMPTIONS = (
    "IEEE-754 float32 with round-to-nearest; any summation order, with or without FMA",
    "float32 sin/cos within 2^-21 and atan2 within 2^-20 absolute (HH1 and HH2 angles)",
    "oneDNN convolutions run the direct algorithm (PyTorch's default), not Winograd",
    "underflow costs at most 2^-126 per operation (gradual underflow or flush-to-zero)",
    "the forward runs on the CPU as analysed: no fast_eval operators, no torch.func",
)


class ExecutionRefused(InputError):
    """No rounding-error bound for this model (the message says which op and why)."""


def gamma(n: int, u: float = U32) -> float:
    """``gamma_n = n u / (1 - n u)`` (infinite when ``n u >= 1``)."""
    nu = n * u
    return math.inf if nu >= 1 else nu / (1 - nu)


def _read(getter) -> str:  # noqa: ANN001
    try:
        return str(getter())
    except (RuntimeError, AttributeError) as exc:  # torch refuses to mix precision APIs
        return f"unreadable ({str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__})"


def environment() -> dict:
    """What the bound assumes about this machine, as recorded in reports and replays."""
    probe = torch.full((8,), 2.0**-140) * 2.0
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "flush_denormal": bool((probe == 0).all()),
        "mkldnn_enabled": bool(torch.backends.mkldnn.enabled),
        "mkldnn_conv_fp32_precision": _read(lambda: torch.backends.mkldnn.conv.fp32_precision),
        "mkldnn_matmul_fp32_precision": _read(
            lambda: torch.backends.mkldnn.matmul.fp32_precision),
        "float32_matmul_precision": _read(torch.get_float32_matmul_precision),
        "cpu_capability": _read(torch.backends.cpu.get_cpu_capability),
        "cpu_model": _cpu_model(),
        **{k: os.environ.get(k) for k in _ENV_VARS},
    }


_ENV_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_DEFAULT_FPMATH_MODE", "DNNL_DEFAULT_FPMATH_MODE",
             "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _check_environment() -> None:
    env = environment()
    for key in ("mkldnn_conv_fp32_precision", "mkldnn_matmul_fp32_precision"):
        if env[key] not in ("none", "ieee"):
            raise ExecutionRefused(
                f"torch.backends.mkldnn {key.split('_')[1]} fp32_precision is {env[key]!r}: "
                "float32 products may run in lower precision; set it to 'ieee'")
    for key in ("ONEDNN_DEFAULT_FPMATH_MODE", "DNNL_DEFAULT_FPMATH_MODE"):
        if env[key] not in (None, "", "strict", "STRICT"):
            raise ExecutionRefused(f"{key}={env[key]}: oneDNN may compute float32 products in "
                                   "lower precision; unset it")
    _probe_products()
    if env["float32_matmul_precision"] not in ("highest",):
        raise ExecutionRefused(
            f"float32 matmul precision is {env['float32_matmul_precision']!r}: oneDNN may "
            "compute in bf16; call torch.set_float32_matmul_precision('highest')")


def _probe_products() -> None:
    """Run the kernels the rules assume (a oneDNN convolution, channels-last, and the dense
    product of :func:`lipverify.layers.soc_fast.linear`, and ``F.linear``) on values whose
    float32 result is exact but whose bf16 or tf32 result is not."""
    from lipverify.layers.soc_fast import linear

    v = 1.0 + 2.0**-20  # exact in float32, not in bf16 (8 bits) or tf32 (11 bits)
    x = torch.full((2, 4, 3, 3), v).contiguous(memory_format=torch.channels_last)
    w = torch.zeros(4, 4, 3, 3)
    w[:, 0, 1, 1] = 1.0
    with torch.no_grad():
        outs = [torch.nn.functional.conv2d(x, w, padding=1),
                linear(torch.full((2, 16), v), torch.eye(16)),
                torch.nn.functional.linear(torch.full((2, 16), v), torch.eye(16))]
    if not all(bool((o == v).all()) for o in outs):
        raise ExecutionRefused("float32 convolutions or products do not compute in float32 "
                               "here (reduced-precision math mode): no float32 bound")


# -- per-module rules ---------------------------------------------------------------------------
@dataclass
class _State:
    z: torch.Tensor  # the executed activation at x (float32)
    e: torch.Tensor  # l2 error bound over the ball, per sample (float64)
    lam: float  # Lipschitz bound of the prefix
    rho: torch.Tensor  # ball radius per sample (float64)
    ops: list = field(default_factory=list)  # (name, local error per sample, lip)

    def norm_bound(self) -> torch.Tensor:
        zn = self.z.detach().double().flatten(1).norm(dim=1) * (1 + NORM_SLACK)
        return zn + 2 * self.e + self.lam * self.rho


@dataclass
class OpBound:
    """One module application: ``e_out <= lip * e_in + kappa * N_in + beta`` (``beta`` may be
    per sample), and the output's norm bound factor ``lip``."""

    name: str
    lip: float
    kappa: float
    beta: float | torch.Tensor = 0.0


def _schur(a: torch.Tensor) -> float:
    """Schur-test bound on ``|| |op| ||_2`` (and so ``||op||_2``) of a convolution filter or a
    matrix ``a`` (output index first): ``sqrt(max row sum * max column sum)`` of ``|a|``."""
    m = a.detach().double().abs()
    m = m.reshape(m.shape[0], m.shape[1], -1)
    rows = m.sum(dim=(1, 2)).max()
    cols = m.sum(dim=(0, 2)).max()
    return float(torch.sqrt(rows * cols)) * (1 + NORM_SLACK)


def _soc_tail(alpha: float, terms: int) -> float:
    """``sum_{i>T} alpha^i / i!`` bounded by its first term over ``1 - alpha / (T + 2)``."""
    if alpha >= terms + 2:
        return math.inf
    first = alpha ** (terms + 1) / math.factorial(terms + 1)
    return first / (1 - alpha / (terms + 2))


def _soc_rule(m: SOC, z: torch.Tensor, st: _State) -> OpBound:
    """The SOC eval forward's error at the executed input, per sample. The magnitudes the
    products see are split into the terms at ``x`` (computed in float64: ``|| |A| |c_{i-1}|
    ||``) and their deviation over the ball (``||A||^{i-1}/(i-1)! dev + d_{i-1}``)."""
    if m._dense is not None:
        raise ExecutionRefused(f"SOC {m.extra_repr()}: a materialised dense operator "
                               "(fast_eval) is not the model's own eval forward; release it")
    xs = space_to_depth_checked(m, z)
    with torch.no_grad():
        op = m.eval_operator(xs)
    a = m._eval_cache["a"].detach()  # the filter as the model computes it, in float32
    geo = op.geo
    if not torch.isfinite(a).all():
        raise ExecutionRefused(f"SOC {m.extra_repr()}: the normalized filter is not finite")
    k, terms = geo.k, m.eval_terms
    if geo.kind == "dense":
        n = geo.m * geo.hw
        eta = gamma(k * k)  # the matrix is built by a product with a 0/1 selection
    else:
        n = geo.m * k * k
        eta = 0.0
        _check_conv_backend(f"SOC {m.extra_repr()}",
                            [(co, ci) for ci in (geo.cin, geo.m) for co in (geo.m, geo.cout)],
                            k, k // 2, geo.h, geo.w, channels_last=True)
    # Term i is a dot product of length n with the filter A (1 + phi) / i, |phi| <= (1 + eta)
    # (1 + gamma_2) - 1 (1/i rounded, the scale applied), summed in any order: its error is at
    # most gamma_{n-1} (1 + u) max(P+, P-) + u sum|p| (the module docstring), with
    # max(P+, P-) = (|A||c| + |Ac|) / 2 per output.
    scale = (1 + eta) * (1 + gamma(2))
    k_sum = scale * gamma(n - 1) * (1 + U32)
    k_abs = scale * (1 + U32) - 1
    alpha = conv_frequency_norm(a, (geo.h + k - 1, geo.w + k - 1)) * (1 + SAFETY)
    # || |A| || <= ||sum_taps |A_t| ||_2: the nonnegative filter's norm is at frequency 0
    abs_norm = float(torch.linalg.matrix_norm(a.double().abs().sum((2, 3)), ord=2)) * (
        1 + SAFETY)
    skew = bool(torch.equal(a, -conv_transpose_filter(a)))
    dev = 2 * st.e + st.lam * st.rho  # ||ẑ(x') - ẑ(x)|| over the ball
    a64 = a.double()
    pad = k // 2
    with torch.no_grad():
        c = xs.double()
        if c.shape[1] < geo.m:
            c = torch.nn.functional.pad(c, (0, 0, 0, 0, 0, geo.m - c.shape[1]))
        slack = 1 + NORM_SLACK

        def norm(t: torch.Tensor) -> torch.Tensor:
            return t.flatten(1).norm(dim=1) * slack

        # rho_i (the products' rounding in term i) reaches the output through
        # sum_{j <= T-i} A^j i!/(i+j)!, whose norm is <= 1 + tail for a skew (normal) A, as
        # |i! phi_i(i theta)| <= 1; the triangle inequality otherwise.
        def reach(i: int) -> float:
            # sum_{j > T-i} alpha^j i!/(i+j)! = i! alpha^-i sum_{k > T} alpha^k / k!
            tail = math.factorial(i) * _soc_tail(alpha, terms) / alpha**i if alpha > 0 else 0.0
            if skew:
                return 1.0 + tail
            return math.fsum(alpha**j * math.factorial(i) / math.factorial(i + j)
                             for j in range(terms - i + 1))

        sum_mag = norm(c) + dev  # sum_i || |ĉ_i(x')| ||, i = 0 first
        d_prev = torch.zeros_like(dev)  # a bound on ||d_{i-1}|| (for magnitudes)
        sum_d = torch.zeros_like(dev)  # the series' error at the output
        power = 1.0  # ||A||^(i-1) / (i-1)!
        total = c.clone()
        for i in range(1, terms + 1):
            s_abs = torch.nn.functional.conv2d(c.abs(), a64.abs(), padding=pad)  # |A||c|
            ac = torch.nn.functional.conv2d(c, a64, padding=pad)
            half = norm((s_abs + ac.abs()) / 2)  # ||max(P+, P-)|| at x
            # what the ball and d_{i-1} add: |A||D| to |A||c|, (|A||D| + |AD|)/2 to max(P+, P-)
            shift = power * dev + d_prev
            rho_i = (k_sum * (half + (abs_norm + alpha) / 2 * shift)
                     + k_abs * (norm(s_abs) + abs_norm * shift)) / i
            d = (alpha / i) * d_prev + rho_i
            sum_d = sum_d + reach(i) * rho_i
            c = ac / i
            power = power * alpha / i
            total = total + c
            sum_mag = sum_mag + norm(c) + power * dev + d
            d_prev = d
        # exp(A) is orthogonal for a skew A: ||P|| <= 1 + tail; else the triangle inequality
        lip = (1.0 + _soc_tail(alpha, terms)) if skew else math.fsum(
            alpha**i / math.factorial(i) for i in range(terms + 1))
        series_err = sum_d + gamma(max(terms, 1)) * sum_mag  # T + 1 terms summed
        out_mag = norm(total[:, : geo.cout]) + lip * dev + series_err
        b = 0.0 if m.bias is None else float(m.bias.detach().double().norm()) * math.sqrt(
            geo.hw)
        local = series_err + U32 * (out_mag + b * slack)  # the bias add
    out_numel = geo.cout * geo.hw
    # underflow: at most TINY per product (a subnormal input read as zero included) and per
    # addition, in every term, carried through the rest of the series (<= e^alpha)
    local = local + math.sqrt(out_numel) * (terms + 2) * (n + 2) * TINY * (
        1 + float(a.abs().max())) * math.exp(min(alpha, 700.0)) * 2
    return OpBound(f"SOC({m.extra_repr()})", lip, 0.0, local)


def _check_conv_backend(name: str, shapes: Iterable[tuple[int, int]], k: int, pad: int,
                        h: int, w: int, channels_last: bool) -> None:
    """Every (out, in) block of a convolution, at every batch size checked, dispatches to a
    direct kernel (oneDNN or im2col), never NNPACK's Winograd/FFT."""
    sel = getattr(torch._C, "_select_conv_backend", None)
    if sel is None:
        raise ExecutionRefused("this torch cannot say which convolution kernel runs; the "
                               "float32 bound needs a direct kernel")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for batch in CHECKED_BATCHES:
        for cout, cin in sorted(set(shapes)):
            x = torch.empty(batch, cin, h, w).contiguous(memory_format=fmt)
            weight = torch.empty(cout, cin, k, k)
            backend = str(sel(x, weight, None, [1, 1], [pad, pad], [1, 1], False,
                              [0, 0], 1)).split(".")[-1]
            if backend not in _DIRECT_CONV:
                raise ExecutionRefused(
                    f"{name}: at batch {batch} the convolution runs on "
                    f"{backend}, whose error has no bound here (Winograd/FFT); enable oneDNN "
                    "(torch.backends.mkldnn.enabled = True)")


def _bcop_rule(m: BCOP, z: torch.Tensor, st: _State) -> OpBound:
    """``conv(pad_circular(s2d(x)), W) + b`` with ``W`` the filter the model computes: one dot
    product of ``n = cin k^2`` products and the bias per output (any order), bounded like
    SOC's terms, ``gamma_n (1 + u) max(P+, P-) + u sum|p|``, at ``x`` plus the ball's shift."""
    xs = space_to_depth_checked(m, z)
    with torch.no_grad():
        w = m.conv_filter().detach()
    if not torch.isfinite(w).all():
        raise ExecutionRefused(f"BCOP {m.extra_repr()}: the filter is not finite")
    k, p = m.kernel_size, m.kernel_size // 2
    cout, cin = w.shape[:2]
    h, wd = xs.shape[-2:]
    _check_conv_backend(f"BCOP {m.extra_repr()}", [(cout, cin)], k, 0, h + 2 * p, wd + 2 * p,
                        channels_last=False)
    n = cin * k * k
    lip = conv_frequency_norm(w, (h, wd)) * (1 + SAFETY)  # circular padding: exact
    abs_norm = float(torch.linalg.matrix_norm(w.double().abs().sum((2, 3)), ord=2)) * (
        1 + SAFETY)
    w64 = w.double()
    b64 = None if m.bias is None else m.bias.detach().double()
    with torch.no_grad():
        x64 = xs.double()
        if p:
            x64 = torch.nn.functional.pad(x64, (p, p, p, p), mode="circular")
        s_abs = torch.nn.functional.conv2d(x64.abs(), w64.abs(),
                                           None if b64 is None else b64.abs())
        val = torch.nn.functional.conv2d(x64, w64, b64)
    slack = 1 + NORM_SLACK
    half = ((s_abs + val.abs()) / 2).flatten(1).norm(dim=1) * slack
    dev = 2 * st.e + st.lam * st.rho
    k_sum = gamma(n) * (1 + U32)  # n products and the bias: n + 1 terms
    local = (k_sum * (half + (abs_norm + lip) / 2 * dev)
             + U32 * (s_abs.flatten(1).norm(dim=1) * slack + abs_norm * dev))
    local = local + math.sqrt(val[0].numel()) * (n + 2) * TINY * (1 + float(w.abs().max()))
    return OpBound(f"BCOP({m.extra_repr()})", lip, 0.0, local)


def _normalize_rule(m: Normalize, z: torch.Tensor, st: _State) -> OpBound:
    std = m.std.detach().double()
    if not (torch.isfinite(std).all() and (std > 0).all()
            and torch.isfinite(m.mean.detach()).all()):
        raise ExecutionRefused("Normalize: std must be positive and finite, mean finite")
    smin = float(std.min())
    mean_img = torch.broadcast_to(m.mean.detach().double() / std, z[:1].shape)
    g2 = gamma(2)
    return OpBound("Normalize", 1.0 / smin * (1 + NORM_SLACK), g2 / smin,
                   g2 * float(mean_img.norm()) * (1 + NORM_SLACK)
                   + 2 * TINY * math.sqrt(z[0].numel()) * (1 + 1 / smin))


def _hh1_rule(m: HouseholderOrder1, z: torch.Tensor, st: _State) -> OpBound:
    c = TRIG_ERR + gamma(2) * (1 + TRIG_ERR)
    return OpBound("HH1", 1.0, (2 + 2 * math.sqrt(2)) * c, math.sqrt(z[0].numel()) * 8 * TINY)


def _hh2_rule(m: HouseholderOrder2, z: torch.Tensor, st: _State) -> OpBound:
    """HH2: the computed angle ``phi`` (atan2, the shift, the remainder by float32 2 pi) and
    the sector thresholds are within ``Delta`` of the exact ones, so a wrong sector is one
    whose interval lies within ``Delta`` of ``phi``; its (orthogonal) map agrees with the
    continuous, 1-Lipschitz exact map there, so it is within ``2 Delta ||p||`` of it. Each
    map's two products and sum, with ``sin``/``cos`` of angles rounded once: ``2 c ||p||``."""
    delta_angle = ATAN2_ERR + 32 * math.pi * U32
    c = TRIG_ERR + 4 * math.pi * U32
    c = c + gamma(2) * (1 + c)
    return OpBound("HH2", 1.0, 2 * delta_angle + 2 * c, math.sqrt(z[0].numel()) * 8 * TINY)


def _linear_rule(m: nn.Linear, z: torch.Tensor, st: _State) -> OpBound:
    w = m.weight.detach().double()
    n = w.shape[1]
    with torch.no_grad():
        smax = float(torch.linalg.matrix_norm(w, ord=2))
    lip = min(_schur(w), float(w.norm()), smax * (1 + SAFETY)) * (1 + NORM_SLACK)
    if n == 0 or w.shape[0] == 0 or not torch.isfinite(w).all():
        raise ExecutionRefused("Linear: empty or non-finite weights")
    g = gamma(n + 1)
    rows = z[0].numel() // n  # F.linear acts on the last dimension, row by row
    b = 0.0 if m.bias is None else float(m.bias.detach().double().norm()) * math.sqrt(rows)
    return OpBound(f"Linear({n}->{w.shape[0]})", lip, g * _schur(w),
                   g * b * (1 + NORM_SLACK) + math.sqrt(rows * w.shape[0]) * (n + 2) * TINY
                   * (1 + float(w.abs().max())))


_RULES = {
    SOC: _soc_rule,
    BCOP: _bcop_rule,
    Normalize: _normalize_rule,
    # exact, but for a subnormal input read as zero (denormals-are-zero)
    MaxMin: lambda m, z, st: OpBound("MaxMin", 1.0, 0.0, TINY * math.sqrt(z[0].numel())),
    HouseholderOrder1: _hh1_rule,
    HouseholderOrder2: _hh2_rule,
    nn.Flatten: lambda m, z, st: OpBound("Flatten", 1.0, 0.0, 0.0),
    nn.Linear: _linear_rule,
}
_SHAPE_KEEPING = (Normalize, MaxMin, HouseholderOrder1, HouseholderOrder2)


def _pair_angles(m: nn.Module) -> int:
    angle = m.theta if isinstance(m, HouseholderOrder1) else m.theta0
    others = [] if isinstance(m, HouseholderOrder1) else [m.theta1, m.theta2]
    if any(o.numel() != angle.numel() for o in others):
        return -1
    if isinstance(m, HouseholderOrder1) and (angle.dim() != 4 or angle.shape[0] != 1
                                             or angle.shape[2:] != (1, 1)):
        return -1
    return angle.numel()


_REFUSED = {
    "CayleyConv": "the Cayley transform's FFT and matrix inverse have no rounding bound here",
    "CayleyLinear": "the Cayley transform's matrix inverse has no rounding bound here",
}


def _check_plain(m: nn.Module) -> None:
    from torch.nn.modules import module as module_mod
    from torch.nn.utils import parametrize

    name = type(m).__name__
    cls = type(m)
    for attr, value in vars(m).items():
        if attr.startswith("__") or not hasattr(cls, attr):
            continue
        if callable(value) and not isinstance(value, nn.Module):
            raise ExecutionRefused(f"{name} has an instance {attr.strip('_')}: the analysed "
                                   "forward would not be the one that runs")
    if getattr(m, "_compiled_call_impl", None) is not None:
        raise ExecutionRefused(f"{name} is compiled (module.compile()): the compiled kernels "
                               "have no rounding bound here")
    for attr, value in _METHODS.get(cls, {}).items():
        if vars(cls).get(attr) is not value:
            raise ExecutionRefused(f"{name}.{attr} was replaced after import: the analysed "
                                   "forward would not be the one that runs")
    if nn.Module.__call__ is not _MODULE_CALL or nn.Module._call_impl is not _MODULE_IMPL:
        raise ExecutionRefused("nn.Module.__call__ was replaced: the analysed forward would "
                               "not be the one that runs")
    if m.training:
        raise ExecutionRefused(f"{name} is in train mode; certify in eval mode")
    if m._forward_hooks or m._forward_pre_hooks or parametrize.is_parametrized(m):
        raise ExecutionRefused(f"{name} has hooks or parametrizations: the float32 bound "
                               "covers plain modules only")
    if module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks:
        raise ExecutionRefused("global module hooks are registered: the float32 bound covers "
                               "plain modules only")


# The methods the analysis describes, as imported: a class patched later is refused.
_METHODS = {
    cls: {attr: value for attr, value in vars(cls).items() if callable(value)
          or isinstance(value, (staticmethod, classmethod, property))}
    for cls in (LipConvNet, LipBlock, nn.Sequential, Normalize, SOC, BCOP, MaxMin,
                HouseholderOrder1, HouseholderOrder2, nn.Flatten, nn.Linear, LLN)
}
_MODULE_CALL = nn.Module.__call__
_MODULE_IMPL = nn.Module._call_impl


# -- the walk ------------------------------------------------------------------------------------
def _apply(rule_out: OpBound, st: _State, out: torch.Tensor) -> _State:
    if out.dim() < 2 or out.shape[0] != st.z.shape[0]:
        raise ExecutionRefused(f"{rule_out.name}: the output {tuple(out.shape)} has no batch "
                               "dimension of the inputs")
    n_in = st.norm_bound()
    local = rule_out.kappa * n_in + rule_out.beta
    if rule_out.lip < 0 or rule_out.kappa < 0 or bool((local < 0).any()):
        raise ExecutionRefused(f"{rule_out.name}: a negative error or Lipschitz bound (an "
                               "auditor bug or an invalid module); no float32 bound")
    if not torch.isfinite(local).all() or float(local.max()) > 1e30:
        raise ExecutionRefused(f"{rule_out.name}: no finite rounding bound (magnitudes too "
                               "large or a dot product too long for float32)")
    st.ops.append((rule_out.name, local, rule_out.lip))
    return _State(out, rule_out.lip * st.e + local, st.lam * rule_out.lip, st.rho, st.ops)


def _walk(m: nn.Module, st: _State) -> _State:
    _check_plain(m)
    t = type(m)
    if t is nn.Sequential:
        for child in m:
            st = _walk(child, st)
        return st
    if t is LipBlock:
        return _walk(m.activation, _walk(m.conv, st))
    rule = _RULES.get(t)
    if rule is None:
        why = _REFUSED.get(t.__name__, "no rounding rule for this module type")
        raise ExecutionRefused(f"{t.__name__}: {why}; float32 certificates cover Normalize, "
                               "SOC, BCOP, MaxMin, HH1, HH2, Linear, Flatten and an LLN, SOC or "
                               "BCOP head")
    try:
        with torch.no_grad():
            out = m(st.z)
        if t in _SHAPE_KEEPING and out.shape != st.z.shape:
            raise ExecutionRefused(f"{t.__name__} changes the shape {tuple(st.z.shape)} to "
                                   f"{tuple(out.shape)} (broadcasting): no rule for that")
        if t in (HouseholderOrder1, HouseholderOrder2) and not (
                st.z.dim() == 4 and _pair_angles(m) == st.z.shape[1] // 2):
            raise ExecutionRefused(f"{t.__name__} needs NCHW inputs with one angle per channel "
                                   "pair")
        bound = rule(m, st.z, st)
    except ExecutionRefused:
        raise
    except (RuntimeError, ValueError, ZeroDivisionError, IndexError, TypeError,
            AttributeError) as exc:
        text = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise ExecutionRefused(f"{t.__name__}: no rounding bound ({text})") from None
    return _apply(bound, st, out)


@dataclass
class ExecutionBound:
    """``delta`` (N, K): the margin error bound per point and class (0 at the predicted
    class); ``ops``: each module's share of the final error bound, per point."""

    delta: torch.Tensor
    logits: torch.Tensor
    ops: list[tuple[str, torch.Tensor]]
    distances: torch.Tensor | None = None  # LLN: ||w_i - w_j|| (K, K) of the rows as computed

    def dominant(self, top: int = 3) -> list[dict]:
        """The ops with the largest median share of ``delta``."""
        rows = [{"op": name, "median_share": float(share.median())} for name, share in self.ops]
        return sorted(rows, key=lambda r: -r["median_share"])[:top]


def _top_walk(model: nn.Module, x: torch.Tensor, rho: torch.Tensor) -> tuple[_State, str]:
    """Walk to the last error before the margins; returns (state, head kind)."""
    _check_plain(model)
    st = _State(x, torch.zeros(x.shape[0], dtype=torch.float64), 1.0, rho)
    if type(model) is LipConvNet:
        st = _walk(model.normalize, st)
        for s in range(1, 6):
            st = _walk(getattr(model, f"layer{s}"), st)
        st = _State(st.z.flatten(1), st.e, st.lam, st.rho, st.ops)
        last = model.last_layer
        if type(last) is LLN:
            _check_plain(last)
            return st, "lln"
        if type(last) not in (SOC, BCOP):
            why = _REFUSED.get(type(last).__name__, "no rounding rule")
            raise ExecutionRefused(f"{type(last).__name__} last layer: {why}")
        feats = st.z
        st = _State(feats[:, :, None, None], st.e, st.lam, st.rho, st.ops)
        st = _walk(last, st)
        return _State(st.z.flatten(1), st.e, st.lam, st.rho, st.ops), "logits"
    if type(model) is nn.Sequential:
        return _walk(model, st), "logits"
    raise ExecutionRefused(f"{type(model).__name__}: float32 certificates cover LipConvNet and "
                           "nn.Sequential models of Normalize, SOC, BCOP, MaxMin, HH1, HH2, "
                           "Linear and Flatten")


def execution_bound(model: nn.Module, x: torch.Tensor, rho: torch.Tensor | float) -> ExecutionBound:
    """The margin error bound ``delta`` of the float32 model at ``x`` and over the balls of
    radius ``rho`` (see the module docstring). Raises :class:`ExecutionRefused` with the
    reason when no bound can be given."""
    if x.device.type != "cpu":
        raise ExecutionRefused("float32 execution certificates cover the CPU only (GPU "
                               "precisions come later); pass --device cpu")
    if x.dtype != torch.float32 or any(p.dtype != torch.float32 for p in model.parameters()):
        raise ExecutionRefused("float32 execution certificates need float32 weights and inputs")
    if any(b.is_floating_point() and b.dtype != torch.float32 for b in model.buffers()):
        raise ExecutionRefused("float32 execution certificates need float32 buffers")
    _check_environment()
    if type(x) is not torch.Tensor or x.dim() < 2 or x.shape[0] == 0:
        raise InputError("float32 execution bounds need a plain, non-empty batch of inputs")
    rho = torch.as_tensor(rho, dtype=torch.float64).detach().cpu()
    if rho.numel() == 1:
        rho = rho.reshape(1).expand(x.shape[0]).clone()
    elif rho.numel() == x.shape[0]:
        rho = rho.reshape(-1).clone()
    else:
        raise InputError(f"give one ball radius, or one per point ({x.shape[0]})")
    if not torch.isfinite(rho).all() or (rho < 0).any():
        raise InputError("ball radii must be finite and non-negative")
    with torch.no_grad():
        st, head = _top_walk(model, x, rho)
        logits = model(x)
    if logits.dim() != 2:
        raise ExecutionRefused(f"the model's output has shape {tuple(logits.shape)}; "
                               "certificates need logits of shape (N, classes)")
    n = x.shape[0]
    if head == "logits":
        if not torch.equal(st.z, logits):
            raise ExecutionRefused("the model's forward differs from the analysed composition "
                                   "at x (a custom forward or hidden state)")
        delta_pair = math.sqrt(2.0) * st.e  # |e_y - e_j| <= sqrt(2) ||e||
        delta = delta_pair[:, None].expand(n, logits.shape[1]).clone()
        shares = _shares(st.ops, math.sqrt(2.0))
        distances = None
    else:
        delta, shares, distances, head_out = _lln_head(model.last_layer, st)
        if not torch.equal(head_out, logits):
            raise ExecutionRefused("the model's forward differs from the analysed composition "
                                   "at x (a custom forward or hidden state)")
    pred = logits.argmax(1)
    delta = delta.scatter(1, pred[:, None], 0.0)
    return ExecutionBound(delta, logits, shares, distances)


def _shares(ops: Iterable, factor: float) -> list[tuple[str, torch.Tensor]]:
    """Each op's local error times the Lipschitz bound of everything after it."""
    ops = list(ops)
    out = []
    after = factor
    for name, local, lip in reversed(ops):
        out.append((name, local * after))
        after *= lip
    merged: dict[str, torch.Tensor] = {}
    for name, share in reversed(out):
        key = name.split("(")[0]
        merged[key] = merged.get(key, 0) + share
    return list(merged.items())


def _lln_head(last: LLN, st: _State) -> tuple:
    """Per-pair error of ``F.linear(phi, w, b)`` with ``w`` the rows as the model normalizes
    them (the weights the certificate formula uses): ``||w_y - w_j|| E`` from the features,
    ``gamma_{n+1} (|w_y| |phi| + |b_y|)`` per class (``|w| |phi| <= ||w|| N``)."""
    with torch.no_grad():
        w = last.normalized_weight().detach().double()
        out = last(st.z)
    n_in = w.shape[1]
    dist = torch.cdist(w, w, compute_mode="donot_use_mm_for_euclid_dist") * (1 + 1e-12)
    rows = w.norm(dim=1) * (1 + NORM_SLACK)
    g = gamma(n_in + 1)
    b = torch.zeros(w.shape[0], dtype=torch.float64) if last.bias is None else (
        last.bias.detach().double().abs())
    n_phi = st.norm_bound()  # (N,)
    per_class = g * (rows[None, :] * n_phi[:, None] + b[None, :])  # (N, K)
    pred = out.argmax(1)
    own = per_class.gather(1, pred[:, None])
    delta = dist[pred] * st.e[:, None] + own + per_class
    delta = delta * (1 + NORM_SLACK) + 4 * TINY * (n_in + 2)
    shares = _shares(st.ops, float(dist.max()))
    shares.append(("LLN", (2 * per_class.max(1).values) * (1 + NORM_SLACK)))
    return delta, shares, dist, out


def executed_radii(
    bound: ExecutionBound, lipschitz: float, kind: str, rho: torch.Tensor
) -> torch.Tensor:
    """Certified radii of the float32 model: ``(m̂ - 2 delta) / (sqrt(2) L)`` (orthogonal) or
    ``min_j (m̂_j - 2 delta_j) / (||w_y - w_j|| L)`` (LLN), with ``m̂`` the executed margin;
    capped at the ball radius ``rho`` the bound holds on, clamped at 0."""
    logits = bound.logits.double()
    pred = logits.argmax(1)
    margins = logits.gather(1, pred[:, None]) - logits  # (N, K)
    other = torch.ones_like(margins, dtype=torch.bool).scatter_(1, pred[:, None], False)
    lip = float(lipschitz) * (1 + 1e-12)
    if kind == "lln":
        if bound.distances is None:  # an "lln" claim on a model whose head is not an LLN
            raise ExecutionRefused("LLN certificates need an LLN head; this model's head "
                                   "gives no row distances")
        dist = bound.distances[pred]
        num = margins - 2 * bound.delta
        # identical rows: the margin is a constant, never flipped when it stays positive
        r = torch.where(dist > 0, num / (dist.clamp_min(1e-300) * lip),
                        torch.where(num > 0, math.inf, 0.0))
    else:
        r = (margins - 2 * bound.delta) / (math.sqrt(2.0) * lip)
    r = r.masked_fill(~other, math.inf).min(1).values
    return torch.minimum(r, torch.as_tensor(rho, dtype=torch.float64)).clamp_min(0.0)
