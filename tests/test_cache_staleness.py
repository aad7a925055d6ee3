"""Eval caches never serve stale weights (issue 12, class 8).

SOC, Cayley and BCOP cache their normalized operators in eval mode. Whatever idiom updates the
weights (writes through ``.data``, which do not bump the version counter, an EMA through
``.data``, a write through a NumPy view, ``load_state_dict``, ``copy_`` under ``no_grad``),
the next eval logits and certified radii must be bit for bit those of a freshly built model
loaded with the same weights (the oracle: it never had a cache).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

import lipverify
from lipverify.layers import BCOP, SOC, CayleyConv, CayleyLinear
from lipverify.layers.soc import fast_eval
from lipverify.layers.weight_cache import ContentCache, WeightSnapshot, _equal_in_one_sync
from lipverify.models import LipConvNet

CONVS = ["soc", "cayley", "bcop"]


@functools.cache
def _built(conv: str, last: str, seed: int) -> LipConvNet:
    torch.manual_seed(seed)
    return LipConvNet(conv=conv, activation="maxmin", num_layers=5, init_channels=4,
                      last_layer=last)


def build(conv: str, last: str, seed: int) -> LipConvNet:
    """A newly built model: a copy of one that never ran (so it holds no cache)."""
    return copy.deepcopy(_built(conv, last, seed))


def tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every floating parameter and buffer (the SOC vectors and ``correction`` included)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point():
            yield name, t


def pairs(model: nn.Module, source: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    new = dict(tensors(source))
    return [(t, new[name]) for name, t in tensors(model)]


def data_copy(model: nn.Module, source: nn.Module) -> None:
    for p, q in pairs(model, source):
        p.data.copy_(q)


def data_setitem(model: nn.Module, source: nn.Module) -> None:
    for p, q in pairs(model, source):
        p.data[...] = q.detach()


def data_assign(model: nn.Module, source: nn.Module) -> None:
    for p, q in pairs(model, source):
        p.data = q.detach().clone()


def ema(model: nn.Module, source: nn.Module, decay: float = 0.9) -> None:
    for p, q in pairs(model, source):
        p.data.mul_(decay).add_(q.data, alpha=1 - decay)


def numpy_view(model: nn.Module, source: nn.Module) -> None:
    for p, q in pairs(model, source):
        p.detach().numpy()[...] = q.detach().numpy()


def load_state(model: nn.Module, source: nn.Module) -> None:
    model.load_state_dict(source.state_dict())


def nograd_copy(model: nn.Module, source: nn.Module) -> None:
    with torch.no_grad():
        for p, q in pairs(model, source):
            p.copy_(q)


IDIOMS: dict[str, Callable[[nn.Module, nn.Module], None]] = {
    "data_copy": data_copy, "data_setitem": data_setitem, "data_assign": data_assign,
    "ema": ema, "numpy_view": numpy_view, "load_state_dict": load_state,
    "nograd_copy": nograd_copy,
}


def fresh_copy(model: LipConvNet, conv: str, last: str) -> LipConvNet:
    """A newly built model (it never ran: no cache) loaded with a copy of ``model``'s state."""
    fresh = build(conv, last, seed=0)
    fresh.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    return fresh.eval()


def outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Eval logits (a plain call first: it must not be served from a stale cache), then the
    logits and radii of ``certify`` (which switches the model to eval mode and back)."""
    with torch.no_grad():
        logits = model(x)
    cert = lipverify.certify(model, x)
    return logits, cert.logits, cert.radius


def fill_caches(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def assert_bitwise(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w), (g - w).abs().max().item()


@pytest.mark.parametrize("last", ["lln", "ortho"])
@pytest.mark.parametrize("idiom", list(IDIOMS))
@pytest.mark.parametrize("conv", CONVS)
def test_eval_outputs_follow_every_weight_update(conv: str, idiom: str, last: str) -> None:
    model, source = build(conv, last, seed=0).eval(), build(conv, last, seed=1)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    before = outputs(model, x)
    assert torch.equal(fill_caches(model, x), before[0])  # every eval cache is filled now
    IDIOMS[idiom](model, source)
    want = outputs(fresh_copy(model, conv, last), x)
    assert not torch.equal(want[0], before[0])  # the update matters (the test can fail)
    assert_bitwise(outputs(model, x), want)
    assert torch.equal(fill_caches(model, x), want[0])  # the refilled cache serves it again


@pytest.mark.parametrize("idiom", ["data_copy", "ema", "numpy_view", "nograd_copy"])
def test_fast_eval_operators_follow_weight_updates(idiom: str, tmp_path) -> None:
    """Inside :func:`fast_eval` (dense SOC operators, frozen weights) an update made in the
    scope is seen by the next call too: the operators are rebuilt or dropped, never reused."""
    model, source = build("soc", "lln", seed=0).eval(), build("soc", "lln", seed=1)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with fast_eval(model, 32, tmp_path, images=math.inf, min_gain=0, min_batch=1,
                   max_entries=1 << 20) as report:
        assert report is not None and report.materialized  # the dense path is in use
        with torch.no_grad():
            before = model(x)
        IDIOMS[idiom](model, source)
        fresh = fresh_copy(model, "soc", "lln")
        with torch.no_grad():
            got, want = model(x), fresh(x)
    assert not torch.allclose(want, before, atol=1e-3)
    # dense and series differ by float rounding only (the dense path is tested to 1e-5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert_bitwise((model(x),), (want,))  # out of the scope: the series, bit for bit


def cached_values(model: nn.Module) -> list[object]:
    """The eval-cache entry of every caching layer (SOC: its ``A``; others: their operator)."""
    out = []
    for m in model.modules():
        if isinstance(m, SOC):
            out.append(m._eval_cache["a"] if m._eval_cache else None)
        elif isinstance(m, CayleyConv | CayleyLinear | BCOP):
            out.append(m._cache.value)
    return out


@pytest.mark.parametrize("conv", CONVS)
def test_unchanged_weights_reuse_the_cache_outside_the_state_dict(conv: str) -> None:
    model = build(conv, "ortho", seed=0).eval()
    keys = set(model.state_dict())
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    first = fill_caches(model, x)
    values = cached_values(model)
    assert len(values) == 6 and all(v is not None for v in values)
    lipverify.certify(model, x)  # eval -> eval: nothing is dropped or rebuilt
    assert torch.equal(fill_caches(model, x), first)
    assert all(a is b for a, b in zip(cached_values(model), values, strict=True))
    assert set(model.state_dict()) == keys


def test_snapshot_compares_bits_dtype_shape_and_extra() -> None:
    t = torch.tensor([0.0, float("nan"), 1.5])
    snap = WeightSnapshot([t], extra=(3,))
    assert snap.matches([t], (3,)) and snap.matches([t.clone()], (3,))  # NaN matches itself
    assert not snap.matches([t], (4,))
    assert not snap.matches([torch.tensor([-0.0, float("nan"), 1.5])], (3,))  # -0.0 != 0.0
    assert not snap.matches([t.double()], (3,)) and not snap.matches([t[:2]], (3,))
    assert not snap.matches([t, t], (3,))
    t.detach().numpy()[2] = 2.0  # no version bump
    assert not snap.matches([t], (3,))
    w = torch.randn(4, 3).t()  # non-contiguous: the torch.equal fallback
    snap = WeightSnapshot([w])
    assert snap.matches([w]) and snap.matches([w.clone()]) and not snap.matches([w.contiguous()])
    w.detach().numpy()[1, 2] += 1.0
    assert not snap.matches([w])
    a, b = torch.arange(6.0), torch.arange(6.0)
    assert _equal_in_one_sync([(a, b), (a[:0], b[:0])]) and _equal_in_one_sync([])
    b[5] = 7.0
    assert not _equal_in_one_sync([(a, a.clone()), (a, b)])
    cache = ContentCache()
    cache.put([a], "k", "value")
    assert cache.get([a], "k") == "value" and cache.get([b], "k") is None
    cache.clear()
    assert cache.get([a], "k") is None
