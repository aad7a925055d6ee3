"""Models built to fool the graph auditor (an adversarial review of issues 13 and 14): each
must be refused or get a bound at least its true Lipschitz constant, never less, and no
model may crash the audit. The true constant is measured from below: float64 Jacobian norms
at random and chosen points, and difference quotients over crafted pairs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipverify.audits.lipschitz import lipschitz_audit


class Fn(nn.Module):
    def __init__(self, f, **bufs) -> None:
        super().__init__()
        self.f = f
        for k, v in bufs.items():
            if isinstance(v, nn.Module):
                setattr(self, k, v)
            else:
                self.register_buffer(k, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(self, x)


def true_lower(model, shape, extra=(), pairs=()):
    gen = torch.Generator().manual_seed(0)
    xs = [torch.rand(1, *shape, generator=gen, dtype=torch.float64) for _ in range(6)]
    best = 0.0
    for x in xs + list(extra):
        jac = torch.autograd.functional.jacobian(lambda z: model(z).reshape(-1), x)
        best = max(best, float(torch.linalg.matrix_norm(jac.reshape(-1, x.numel()), 2)))
    with torch.no_grad():
        for a, b in pairs:
            best = max(best, float((model(a) - model(b)).norm() / (a - b).norm()))
    return best


def _lin(c: float) -> nn.Linear:
    lin = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(c * torch.eye(4))
    return lin


def _crop_conv() -> nn.Conv2d:
    conv = nn.Conv2d(1, 1, (5, 1), padding=(1, 0), bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 0] = -1.0
    return conv


def _sll_sign():
    w = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    from lipverify.audits.operators import linear_norm
    w = w * (1.9 ** 0.5 / linear_norm(lambda z: F.conv2d(z, w.double(), padding=1), (2, 4, 4)))
    return Fn(lambda s, x: (x - F.conv_transpose2d(
        F.relu(s.c0 - F.conv2d(x, s.w, padding=1)), s.w, padding=1)).flatten(1),
        w=w, c0=torch.zeros(1, 2, 4, 4))


def _quant_pairs(step: float):
    a = torch.full((1, 4), step - 1e-9, dtype=torch.float64)
    return [(a, a + 2e-9)]


def _hh1_with_a_broadcasting_buffer():
    from lipverify.layers.activations import HouseholderOrder1

    h = HouseholderOrder1(4)
    del h.theta
    h.register_buffer("theta", torch.full((1, 2, 1, 2), torch.pi / 2))
    return Fn(lambda s, x: s.h(x).flatten(1), h=h)


CASES = {
    "normalize-broadcast": (lambda: __import__("lipverify.models", fromlist=["Normalize"])
                            .Normalize([0.0] * 3, [1.0] * 3), (1, 3, 3), {}),
    "max-with-broadcast-constant": (lambda: Fn(lambda s, x: torch.maximum(
        x.unsqueeze(1), s.c).flatten(1), c=torch.full((1, 5, 4), -100.0)), (4,), {}),
    "add-with-broadcast-operand": (lambda: Fn(lambda s, x: (x.unsqueeze(1) + 0.001 * x.unsqueeze(
        1).expand(-1, 5, -1)).flatten(1)), (4,), {}),
    "shift-by-subtraction-keeps-the-sign": (lambda: Fn(
        lambda s, x: x + (s.c - s.lin(x)), c=torch.ones(1, 4), lin=_lin(-0.9)), (4,), {}),
    "sll-look-alike-with-a-sign-flip": (_sll_sign, (2, 4, 4), {}),
    "conv-bias-from-the-input": (lambda: Fn(lambda s, x: torch.cat(
        [F.conv2d(x[i:i + 1], s.w, bias=5 * x[i, :, 0, 0]) for i in range(x.shape[0])]
    ).flatten(1), w=0.1 * torch.ones(2, 2, 1, 1)), (2, 3, 3), {}),
    "elu-negative-input-scale": (lambda: Fn(lambda s, x: torch.ops.aten.elu(x, 1.0, 1.0, -1.0)),
                                 (3,), {"extra": [-5 * torch.ones(1, 3, dtype=torch.float64)]}),
    "centering-with-alpha": (lambda: Fn(lambda s, x: torch.sub(
        x, x.mean(dim=-1, keepdim=True), alpha=3)), (4,), {}),
    "quantising-cast": (lambda: Fn(lambda s, x: torch.ops.aten._to_copy(torch.ops.aten._to_copy(
        x * 255, dtype=torch.int32), dtype=x.dtype) / 255), (4,),
        {"pairs": _quant_pairs(1 / 255)}),
    "adaptive-max-pool-unbatched-layout": (lambda: Fn(lambda s, x: F.adaptive_max_pool2d(
        x.squeeze(1), (4, 4)).flatten(1)), (1, 5, 4), {}),
    "sort-pair-of-different-pads": (lambda: Fn(lambda s, x: torch.cat(
        [F.pad(x, (0, 1), value=-100.0).max(dim=1, keepdim=True)[0],
         F.pad(x, (0, 1), value=100.0).min(dim=1, keepdim=True)[0]], dim=1)), (1,), {}),
    "residual-with-a-cropping-conv": (lambda: Fn(lambda s, x: (x + s.conv(x)).flatten(1),
                                                 conv=_crop_conv()), (1, 3, 1), {}),
    "chain-through-the-batch-dim": (lambda: Fn(lambda s, x: torch.stack(
        [F.conv2d(x[i], s.w, padding=1) for i in range(x.shape[0])]).flatten(1),
        w=torch.ones(1, 1, 3, 3)), (1, 4, 4), {}),
    "addmm-with-an-input-bias": (lambda: Fn(lambda s, x: torch.addmm(x @ s.a, x, s.b),
                                            a=torch.eye(3), b=torch.eye(3)), (3,), {}),
    # a second review
    "broadcast-operand-of-a-sort-pair": (lambda: Fn(lambda s, x: torch.cat(
        [torch.maximum(x[:, :4], x[:, 4:5]), x[:, :0]], 1)), (5,),
        {"extra": [torch.tensor([[0.0, 0, 0, 0, 0.5]], dtype=torch.float64)]}),
    "integer-constant-used-as-data": (lambda: Fn(lambda s, x: torch.cat(
        [torch.maximum(x[:, 0:1], x[:, 1:2]), torch.minimum(
            x[:, 0:1], torch.cat([x[:, :0], s.k.expand(x.shape[0], 1)], 1))], 1),
        k=torch.tensor([[2]])), (2,),
        {"extra": [torch.tensor([[1.0, 0.0]], dtype=torch.float64)]}),
    "square-rounded-to-bfloat16": (lambda: Fn(lambda s, x: torch.sqrt(
        torch.ops.aten._to_copy.default(torch.ops.aten._to_copy.default(
            x ** 2, dtype=torch.bfloat16), dtype=x.dtype).sum(1, keepdim=True))), (1,),
        {"pairs": [(torch.tensor([[0.90463]], dtype=torch.float64),
                    torch.tensor([[0.904635]], dtype=torch.float64))]}),
    "negative-constant-scattered-into-a-square": (lambda: Fn(lambda s, x: torch.sqrt(
        torch.relu(torch.ops.aten.slice_scatter.default(
            x ** 2, s.c.expand(x.shape[0], 1), 1, 1, 2).sum(1, keepdim=True))),
        c=torch.tensor([[-0.99]])), (2,),
        {"extra": [torch.tensor([[0.99499, 0.3]], dtype=torch.float64)]}),
    "shift-that-broadcasts-in-a-chain": (lambda: Fn(lambda s, x: (x.unsqueeze(1) + s.c).sum(1),
                                                    c=torch.zeros(1, 300, 4)), (4,), {}),
    "integer-fill-in-a-where": (lambda: Fn(lambda s, x: torch.where(s.m, x, s.k).sum(
        1, keepdim=True), m=torch.arange(100).view(1, 100) < 99,
        k=-(torch.arange(100).view(1, 100) == 99).long()), (100,), {}),
    "slice-of-the-batch-in-a-chain": (lambda: Fn(lambda s, x: x[:100] @ s.w.T,
                                                 w=torch.cat([torch.zeros(64, 200),
                                                              torch.ones(64, 56)], 1)),
                                      (256,), {}),
    "strided-view-against-a-permute": (lambda: Fn(lambda s, x: torch.cat([torch.maximum(
        torch.as_strided(x[:, :6].view(-1, 2, 3).permute(0, 2, 1).clone(), (x.shape[0], 6),
                         (6, 1)), x[:, 6:]), torch.minimum(
        x[:, :6].view(-1, 2, 3).permute(0, 2, 1).reshape(-1, 6), x[:, 6:])], 1)), (12,),
        {"extra": [torch.tensor([[0.2] * 3 + [0.8] * 3 + [0.5] * 6], dtype=torch.float64)]}),
    "leaf-parameter-buffer-that-broadcasts": (_hh1_with_a_broadcasting_buffer, (4, 3, 1), {}),
    "export-only-branch": (lambda: Fn(lambda s, x: x if torch.compiler.is_exporting()
                                      else x + 100 * F.relu(x - 0.9999)), (4,),
                           {"extra": [torch.ones(1, 4, dtype=torch.float64)]}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_auditor_is_not_fooled(name):
    build, shape, kw = CASES[name]
    model = build().double().eval()
    x = torch.rand(4, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    res = lipschitz_audit(model, x, power_iters=5, ascent_steps=3)
    lower = true_lower(model, shape, **kw)
    assert res.upper is None or res.upper >= lower * (1 - 1e-9), (res.upper, lower)


def _soc_subclass_with_a_helper_override():
    from lipverify.layers.soc import SOC, space_to_depth_checked

    class ScaledSOC(SOC):
        def _s2d(self, x: torch.Tensor) -> torch.Tensor:
            return 100.0 * space_to_depth_checked(self, x)

    torch.manual_seed(0)
    return Fn(lambda s, x: s.soc(x).flatten(1),
              soc=ScaledSOC(2, 2, bias=False, eval_terms=1, correction=20.0))




def test_a_leaf_subclass_that_changes_a_helper_is_not_a_leaf():
    model = _soc_subclass_with_a_helper_override().eval()
    x = torch.rand(4, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    res = lipschitz_audit(model, x, power_iters=5, ascent_steps=3)
    assert res.upper is None or res.upper >= res.lower


CRASHES = {
    "max-pool-1d": (lambda s, x: F.max_pool1d(x, 3, 1), (8,)),
    "squares-in-a-cat": (lambda s, x: torch.cat([x ** 2, x ** 2], 1).sum(1, keepdim=True)
                         .sqrt(), (4,)),
    "square-plus-value": (lambda s, x: (x ** 2 + x).sqrt(), (4,)),
    "square-times-value": (lambda s, x: x ** 2 * x, (4,)),
    "scalar-output": (lambda s, x: x.sum(), (4,)),
    "model-that-only-runs-at-batch-4": (lambda s, x: x.expand(4, 3), (3,)),
    "flat-output": (lambda s, x: 2 * x.view(-1), (3,)),
    "float-of-a-square": (lambda s, x: torch.sqrt((x ** 2).float().sum(1, keepdim=True)), (4,)),
}


@pytest.mark.parametrize("name", sorted(CRASHES))
def test_no_model_crashes_the_audit(name):
    f, shape = CRASHES[name]
    res = lipschitz_audit(Fn(f).double().eval(), torch.rand(4, *shape, dtype=torch.float64),
                          power_iters=3, ascent_steps=2)
    assert res.upper is not None or res.refusals
    assert all("\n" not in r for r in res.refusals)
