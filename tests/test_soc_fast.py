"""Fast SOC paths compute the same function as the plain series (issue 6).

Oracles: ``SOC.reference_forward`` (one conv per power, plain autograd) and, for the dense
operators, the exact float64 Jacobian (its singular values).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from lipverify.layers.soc import (
    SOC,
    fantastic_four,
    fast_eval,
    materialize,
    release,
    set_fast_train,
    skew_filter,
)
from lipverify.layers.soc_fast import (
    Geometry,
    conv_matrix,
    conv_matrix_grad,
    linear,
    saved_tensor_bytes,
    series,
)
from lipverify.layers.soc_materialize import build_dense, operator_key
from lipverify.models import LipConvNet


def soc(cin: int, cout: int, k: int = 3, s: int = 1, dtype=torch.float64, **kw) -> SOC:
    layer = SOC(cin, cout, kernel_size=k, stride=s, **kw).to(dtype)
    layer.refresh_sigma()
    with torch.no_grad():  # a non-trivial bias, so bias handling is checked too
        if layer.bias is not None:
            layer.bias.normal_()
    return layer


def plain(model: torch.nn.Module, x: torch.Tensor, monkeypatch) -> torch.Tensor:
    """``model(x)`` with every SOC on its plain implementation."""
    with monkeypatch.context() as mp:
        mp.setattr(SOC, "forward", SOC.reference_forward)
        return model(x)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# ------------------------------------------------------------------------------------------
# kernels


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("c", [2, 6])
def test_power_iteration_matches_the_reference_formulas(c: int, k: int) -> None:
    """Matrix-vector power iteration and sigma == the reference's products and sums."""
    torch.manual_seed(c + k)
    w = torch.randn(c, c, k, k, dtype=torch.float64, requires_grad=True)
    s = skew_filter(w)
    layer = SOC(c, c, kernel_size=k, init_iters=0).double()
    vec = {n: t.clone() for n, t in layer._vectors().items()}
    ref = {n: t.clone() for n, t in vec.items()}
    dims_v = {1: (1, 3), 2: (1, 2), 3: (1, 2, 3), 4: (0, 2, 3)}
    dims_u = {1: (0, 2), 2: (0, 3), 3: (0,), 4: (1,)}
    with torch.no_grad():
        for _ in range(3):
            for i in range(1, 5):
                v = (s * ref[f"u{i}"]).sum(dims_v[i], keepdim=True)
                ref[f"v{i}"] = v / (v.norm() + 1e-12)
                u = (s * ref[f"v{i}"]).sum(dims_u[i], keepdim=True)
                ref[f"u{i}"] = u / (u.norm() + 1e-12)
    sigma = fantastic_four(s, vec, 3)
    for n in vec:
        assert vec[n].shape == ref[n].shape and torch.allclose(vec[n], ref[n], atol=1e-12)
    want = torch.stack([(s * ref[f"u{i}"] * ref[f"v{i}"]).sum() for i in range(1, 5)]).min()
    assert torch.allclose(sigma, want, atol=1e-12)
    g = torch.autograd.grad(sigma, w, retain_graph=True)[0]
    gr = torch.autograd.grad(want, w)[0]
    assert torch.allclose(g, gr, atol=1e-12)


@given(
    st.sampled_from([1, 2, 3, 4, 5]), st.sampled_from([1, 2, 4]), st.sampled_from([1, 3]),
    st.integers(0, 2**16),
)
def test_conv_matrix_is_the_convolution(h: int, c: int, k: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(c, c, k, k, generator=g, dtype=torch.float64)
    x = torch.randn(3, c, h, h + 1, generator=g, dtype=torch.float64)
    k_mat = conv_matrix(a, h, h + 1)
    assert k_mat.shape == (c * h * (h + 1),) * 2
    want = F.conv2d(x, a, padding=k // 2).flatten(1)
    assert torch.allclose(x.flatten(1) @ k_mat.T, want, atol=1e-12)
    # conv_matrix_grad is its adjoint: <conv_matrix(a), G> = <a, conv_matrix_grad(G)>
    gk = torch.randn(k_mat.shape, generator=g, dtype=torch.float64)
    ga = conv_matrix_grad(gk, c, k, h, h + 1)
    assert ga.shape == a.shape
    assert math.isclose((k_mat * gk).sum().item(), (a * ga).sum().item(), rel_tol=1e-9,
                        abs_tol=1e-9)


def test_linear_matches_f_linear_for_every_layout() -> None:
    k = torch.randn(40, 60)
    x = torch.randn(7, 60)
    for w, xx in [
        (k, x), (k[:20], x), (k[:, :30], x[:, :30]), (k.t()[:, :40], x[:, :40]),
        (k[:30, :20].t(), torch.randn(7, 30)),
    ]:
        assert torch.allclose(linear(xx, w), F.linear(xx, w), atol=1e-5)
    assert torch.allclose(linear(x, k, torch.ones(40)), F.linear(x, k, torch.ones(40)), atol=1e-5)


@pytest.mark.parametrize("mode", ["exact", "horner"])
@pytest.mark.parametrize("terms", [0, 1, 2, 5, 12])
@pytest.mark.parametrize("h", [1, 2, 5])
@pytest.mark.parametrize("cin,cout,k,s", [(4, 4, 3, 1), (2, 6, 3, 2), (6, 2, 3, 1), (4, 3, 1, 2)])
def test_series_output_and_gradients_match_plain_autograd(
    cin: int, cout: int, k: int, s: int, h: int, terms: int, mode: str
) -> None:
    """float64: output and input gradient exact in both modes; filter gradient exact in
    ``exact`` mode (``horner``'s is approximate, checked below)."""
    if h % s:
        h *= s
    layer = soc(cin, cout, k, s, bias=False)
    x = torch.randn(3, cin, h, h + s, dtype=torch.float64, requires_grad=True)
    a = layer.normalized_filter()
    xs = F.pixel_unshuffle(x, s) if s > 1 else x
    geo = Geometry(layer.in_channels, cout, layer.max_channels, k, h // s, (h + s) // s)
    y = series(xs, terms, mode, a=a, geo=geo)
    want = layer.series(F.pad(xs, (0, 0, 0, 0, 0, layer.max_channels - layer.in_channels)),
                        a, terms)[:, :cout]
    assert y.shape == want.shape == (3, cout, h // s, (h + s) // s)
    assert torch.allclose(y, want, atol=1e-12)
    g = torch.randn_like(want)
    w = layer.random_conv_filter
    got = torch.autograd.grad(y, (x, w), g, retain_graph=True, allow_unused=True,
                              materialize_grads=True)
    ref = torch.autograd.grad(want, (x, w), g, allow_unused=True, materialize_grads=True)
    assert torch.allclose(got[0], ref[0], atol=1e-12)
    if mode == "exact" or terms <= 1:  # Horner with one term is exact too
        assert torch.allclose(got[1], ref[1], atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("side", [8, 2])
@pytest.mark.parametrize("stride", [1, 2])
def test_layer_train_and_eval_gradients_match_plain_autograd(stride: int, side: int,
                                                            dtype: torch.dtype) -> None:
    """Whole layer (space-to-depth, bias, power iteration): float64 to 1e-5 as required (in
    fact to rounding); float32 (channels-last convolutions, oneDNN products) to 1e-5."""
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for training in (True, False):
        fast = soc(4, 6, 3, stride, dtype=dtype).train(training)
        ref = copy.deepcopy(fast)
        x = torch.rand(2, 4, side, side, dtype=dtype, requires_grad=True)
        ys = [fast(x), ref.reference_forward(x)]
        assert ys[0].shape == (2, 6, side // stride, side // stride)
        assert rel(ys[0], ys[1]) < tol
        assert torch.equal(fast.u1, ref.u1)  # power iteration advanced identically
        g = torch.randn_like(ys[0])
        gf = torch.autograd.grad(ys[0], (x, fast.random_conv_filter, fast.bias), g)
        gr = torch.autograd.grad(ys[1], (x, ref.random_conv_filter, ref.bias), g)
        for a, b in zip(gf, gr, strict=True):
            assert torch.allclose(a, b, atol=1e-5) and rel(a, b) < tol


def test_input_only_backward_skips_the_filter_gradient(monkeypatch) -> None:
    """``autograd.grad(loss, x)`` (attacks) never computes the filter gradient."""
    calls = []
    real = torch.nn.grad.conv2d_weight
    monkeypatch.setattr(torch.nn.grad, "conv2d_weight", lambda *a, **k: calls.append(1)
                        or real(*a, **k))
    layer = soc(4, 4).eval()
    x = torch.rand(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x)
    assert not calls
    y = layer.reference_forward(x)
    assert torch.allclose(gx, torch.autograd.grad(y.square().sum(), x)[0], atol=1e-12)
    layer(x).square().sum().backward()
    assert calls and layer.random_conv_filter.grad is not None


def test_double_backward_gives_jacobian_vector_products() -> None:
    """``J v = d/du <J^T u, v>`` (used by the Lipschitz audit) through the fast backward."""
    layer = soc(4, 4, bias=False).eval()
    x = torch.rand(1, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    u = torch.zeros_like(y, requires_grad=True)
    (g,) = torch.autograd.grad(y, x, u, create_graph=True)
    v = torch.randn_like(x)
    (jv,) = torch.autograd.grad(g, u, v)
    assert torch.allclose(jv, layer.reference_forward(v), atol=1e-12)  # linear, no bias


def test_torch_func_transforms_use_the_plain_series() -> None:
    layer = soc(4, 4).eval()
    x = torch.rand(2, 4, 6, 6, dtype=torch.float64)
    y, vjp = torch.func.vjp(layer, x)
    assert torch.allclose(y, layer.reference_forward(x), atol=1e-12)
    assert vjp(torch.ones_like(y))[0].shape == x.shape


def test_fast_train_gradient_is_close_but_approximate() -> None:
    """Singla & Feizi (2022)'s filter gradient: input gradient exact, filter gradient close
    (cosine > 0.95 at init; measured with the benchmark on LipConvNet-5/20), not equal."""
    torch.manual_seed(3)
    model = LipConvNet(init_channels=4, num_layers=5).double().train()
    fast = copy.deepcopy(model)
    assert set_fast_train(fast) == 6 and "fast_train" in repr(fast.layer1[0].conv)
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 10, (4,))
    grads = []
    for m in (model, fast):
        loss = F.cross_entropy(m(x), y)
        grads.append(torch.autograd.grad(loss, [x] + [c.random_conv_filter for c in socs(m)]))
    assert rel(grads[1][0], grads[0][0]) < 1e-10  # input gradient: exact
    for ge, ga in zip(grads[0][1:], grads[1][1:], strict=True):
        cos = F.cosine_similarity(ge.flatten(), ga.flatten(), dim=0).item()
        assert cos > 0.95 and rel(ga, ge) > 1e-8


def socs(model: torch.nn.Module) -> list[SOC]:
    return [m for m in model.modules() if isinstance(m, SOC)]


# ------------------------------------------------------------------------------------------
# memory


def saved_per_image(model: torch.nn.Module, run) -> tuple[float, torch.Tensor]:
    """Bytes saved for backward per image (slope between batches 2 and 6: the weight-derived
    saves, the same for every batch size, cancel) and the loss at batch 6."""
    sizes = []
    for b in (2, 6):
        x = torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(b))
        with saved_tensor_bytes() as meter:
            loss = run(model, x).square().sum()
        sizes.append(meter.unique)
    return (sizes[1] - sizes[0]) / 4, loss


@pytest.mark.parametrize("fast_train", [False, True])
def test_saved_activation_bytes_at_most_0_7_of_plain(fast_train: bool, monkeypatch) -> None:
    torch.manual_seed(0)
    model = LipConvNet(init_channels=8, num_layers=5).train()
    other = copy.deepcopy(model)
    set_fast_train(model, fast_train)
    fast, loss_f = saved_per_image(model, lambda m, x: m(x))
    base, loss_p = saved_per_image(other, lambda m, x: plain(m, x, monkeypatch))
    assert 0 < fast <= 0.7 * base, (fast, base)
    assert torch.allclose(loss_f, loss_p, rtol=1e-5)
    loss_f.backward()  # the lean graph is complete
    assert all(c.random_conv_filter.grad is not None for c in socs(model))


# ------------------------------------------------------------------------------------------
# eval cache


def test_eval_cache_is_reused_and_invalidated(monkeypatch) -> None:
    layer = soc(4, 4, dtype=torch.float32).eval()
    x = torch.rand(2, 4, 8, 8)

    def check() -> None:
        with torch.no_grad():
            assert torch.allclose(layer(x), layer.reference_forward(x), atol=1e-6)

    check()
    cached = layer._eval_cache["a"]
    assert not cached.requires_grad and cached.grad_fn is None  # a constant, no graph
    check()
    assert layer._eval_cache["a"] is cached  # reused
    with torch.no_grad():
        layer.random_conv_filter.mul_(1.5)  # in place: version bump
    check()
    assert layer._eval_cache["a"] is not cached
    state = copy.deepcopy(soc(4, 4, dtype=torch.float32).state_dict())
    layer.load_state_dict(state)
    check()
    with torch.no_grad():
        layer.u2.copy_(-layer.u2)  # a vector changes sigma
        layer.correction.fill_(0.5)
    check()
    layer.eval_terms = 3
    check()
    for _ in range(2):  # re-assigned tensors (even one reusing a freed id/address)
        layer.random_conv_filter = torch.nn.Parameter(torch.randn_like(layer.random_conv_filter))
        check()
    layer.train()
    assert layer._eval_cache is None
    layer(x)  # train mode: power iteration moves the vectors
    layer.eval()
    check()


def test_eval_with_trainable_weights_keeps_weight_gradients() -> None:
    layer = soc(4, 4).eval()
    x = torch.rand(2, 4, 6, 6, dtype=torch.float64)
    layer(x).sum().backward()
    g = layer.random_conv_filter.grad.clone()
    layer.random_conv_filter.grad = None
    layer.reference_forward(x).sum().backward()
    assert torch.allclose(g, layer.random_conv_filter.grad, atol=1e-12)


# ------------------------------------------------------------------------------------------
# dense operators


def test_every_soc_layer_and_the_logits_match_the_plain_series(tmp_path, monkeypatch) -> None:
    """float32 LipConvNet-5: every layer's fast path (cached and dense) equals the plain
    12-power series to 1e-5, and so do the logits."""
    torch.manual_seed(0)
    model = LipConvNet(init_channels=4, num_layers=5).eval()
    x = torch.rand(8, 3, 32, 32)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a: inputs.setdefault(mod, a[0]))
             for m in socs(model)]
    with torch.no_grad():
        want = plain(model, x, monkeypatch)
        cached = model(x)
    for h in hooks:
        h.remove()
    report = materialize(model, 32, tmp_path, images=math.inf, min_gain=0, min_batch=1)
    assert len(report.materialized) == 6 and report.build_seconds > 0
    with torch.no_grad():
        dense = model(x)
        for layer, xi in inputs.items():
            assert layer._dense is not None and layer._dense.accepts(xi)
            ref = layer.reference_forward(xi)
            assert (layer(xi) - ref).abs().max() <= 1e-5
    assert dense.shape == want.shape == (8, 10)
    assert (cached - want).abs().max() <= 1e-5
    assert (dense - want).abs().max() <= 1e-5
    # the attack workload: input gradients through the dense operators
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xg).logsumexp(1).sum(), xg)
    xr = x.clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(plain(model, xr, monkeypatch).logsumexp(1).sum(), xr)
    assert (g - gr).abs().max() <= 1e-5
    release(model)
    assert all(m._dense is None for m in socs(model))


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("cin,cout", [(4, 4), (3, 12), (4, 2)])
def test_dense_operator_is_orthogonal_in_float64(cin: int, cout: int, kernel: int,
                                                 stride: int) -> None:
    """Exact-Jacobian oracle through the fast path: the dense operator's singular values are
    within 1e-6 of 1 at the default T = 12, and it equals the plain series."""
    torch.manual_seed(cin * 7 + cout + kernel + stride)
    layer = soc(cin, cout, kernel, stride, bias=False).eval()
    shape = (cin, 8, 8)
    p = build_dense(layer, shape)
    x = torch.eye(cin * 64, dtype=torch.float64).view(-1, *shape)
    with torch.no_grad():
        jac = layer.reference_forward(x).flatten(1).T
    assert p.shape == jac.shape == (cout * 64 // stride**2, cin * 64)
    assert torch.allclose(p, jac, atol=1e-12)
    sv = torch.linalg.svdvals(p)
    assert sv.numel() == min(p.shape)
    assert torch.allclose(sv, torch.ones_like(sv), atol=1e-6), (sv.min(), sv.max())


def test_materialize_policy_and_report() -> None:
    model = LipConvNet(init_channels=4, num_layers=5).eval()
    report = materialize(model, (3, 32, 32), None, images=0, use_disk=False)
    assert not report.materialized  # nothing repays with no images
    assert all("repays" in p.reason or "cheaper" in p.reason for p in report.layers)
    plain_macs, fast_macs = report.macs_per_image()
    assert plain_macs >= fast_macs > 0
    report = materialize(model, 32, None, images=math.inf, max_entries=0, use_disk=False)
    assert not report.materialized and "max_entries" in report.layers[0].reason
    d = report.as_dict()
    assert d["flop_ceiling"] >= 1 and len(d["layers"]) == 6


def test_small_batches_fall_back_to_the_series(tmp_path) -> None:
    layer = soc(4, 4, dtype=torch.float32).eval()
    materialize(layer, (4, 6, 6), tmp_path, images=math.inf, min_gain=0, min_batch=3)
    x = torch.rand(2, 4, 6, 6)
    with torch.no_grad():
        assert torch.allclose(layer(x), layer.reference_forward(x), atol=1e-5)
        assert not layer._dense.accepts(x) and layer._dense.accepts(torch.rand(3, 4, 6, 6))


def test_dense_operator_is_dropped_when_weights_change(tmp_path) -> None:
    layer = soc(4, 4, dtype=torch.float32).eval()
    materialize(layer, (4, 6, 6), tmp_path, images=math.inf, min_gain=0, min_batch=1)
    x = torch.rand(3, 4, 6, 6)
    with torch.no_grad():
        layer.random_conv_filter.add_(0.3)
        assert torch.allclose(layer(x), layer.reference_forward(x), atol=1e-5)
    assert layer._dense is None
    materialize(layer, (4, 6, 6), tmp_path, images=math.inf, min_gain=0, min_batch=1)
    layer.load_state_dict(soc(4, 4, dtype=torch.float32).state_dict())
    with torch.no_grad():
        assert torch.allclose(layer(x), layer.reference_forward(x), atol=1e-5)
    assert layer._dense is None
    materialize(layer, (4, 6, 6), tmp_path, images=math.inf, min_gain=0, min_batch=1)
    dense = layer._dense
    layer.train()
    assert not dense.valid_for(layer)  # train mode never uses the eval operator
    ref = copy.deepcopy(layer)
    assert torch.allclose(layer(x), ref.reference_forward(x), atol=1e-5)


def test_operators_are_not_part_of_the_state_dict(tmp_path) -> None:
    model = LipConvNet(init_channels=4, num_layers=5).eval()
    keys = set(model.state_dict())
    materialize(model, 32, tmp_path, images=math.inf, min_gain=0)
    assert set(model.state_dict()) == keys
    clone = copy.deepcopy(model)
    assert all(m._dense is None and m._eval_cache is None for m in socs(clone))


def test_disk_cache_keyed_by_weights_and_tamper_checked(tmp_path, caplog) -> None:
    layer = soc(4, 6, dtype=torch.float32).eval()
    shape = (4, 6, 6)
    kw = dict(images=math.inf, min_gain=0, min_batch=1)
    x = torch.rand(3, *shape)

    def run() -> str:
        report = materialize(layer, shape, tmp_path, **kw)
        with torch.no_grad():
            assert torch.allclose(layer(x), layer.reference_forward(x), atol=1e-5)
        return report.layers[0].source

    assert run() == "built"
    path = tmp_path / "soc" / f"{operator_key(layer, shape)}.pt"
    assert path.is_file()
    assert run() == "disk"
    # a changed weight gets a different key: the stale operator is not reused
    with torch.no_grad():
        layer.random_conv_filter.mul_(-1)
    assert run() == "built" and len(list((tmp_path / "soc").glob("*.pt"))) == 2
    path = tmp_path / "soc" / f"{operator_key(layer, shape)}.pt"
    payload = torch.load(path, weights_only=True)
    # tampered matrix, stale checksum: rejected by the SHA-256
    bad = dict(payload, matrix=payload["matrix"] * 1.01)
    torch.save(bad, path)
    assert run() == "built"
    # tampered matrix with a matching checksum: rejected by the probe against the series
    from lipverify.layers.soc_materialize import _matrix_sha

    m = payload["matrix"].clone()
    m[0, 0] += 0.5
    torch.save(dict(payload, matrix=m, matrix_sha256=_matrix_sha(m)), path)
    assert run() == "built"
    assert "probe" in caplog.text
    path.write_bytes(b"not a checkpoint")
    assert run() == "built"
    assert run() == "disk"


def test_fast_eval_freezes_materialises_and_restores(tmp_path, monkeypatch) -> None:
    model = LipConvNet(init_channels=4, num_layers=5).train()
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    with fast_eval(model, cache_dir=tmp_path, images=math.inf, min_gain=0, min_batch=1) as report:
        assert not model.training and len(report.materialized) == 6
        out = model(x)
        (g,) = torch.autograd.grad(out.sum(), x)
        assert g.shape == x.shape
        assert all(c.random_conv_filter.grad is None for c in socs(model))
        want = plain(model, x, monkeypatch)
        assert (out - want).abs().max() <= 1e-5
    assert model.training and all(m._dense is None and not m._frozen for m in socs(model))


def test_build_time_is_reported_and_logged(tmp_path, caplog) -> None:
    import logging

    model = LipConvNet(init_channels=4, num_layers=5).eval()
    with caplog.at_level(logging.INFO, logger="lipverify.soc"):
        report = materialize(model, 32, tmp_path, images=math.inf, min_gain=0)
    assert "built in" in str(report) and "ceiling" in str(report)
    assert "SOC materialize" in caplog.text
    assert math.isclose(report.build_seconds, sum(p.seconds for p in report.layers), rel_tol=1e-9)
