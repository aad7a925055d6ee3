"""Rounding search: inputs where float32 rounding alone flips the prediction.

Near the decision boundary the real-valued margin is smaller than the float32 rounding
error, so the executed model can flip where the real one does not. The search walks from
``x`` along the direction that lowers the executed margin fastest (the gradient of
``f_y - f_j`` for the runner-up ``j``) to just inside the radius, at log-spaced depths
``radius * (1 - s)``, ``s`` in ``[1e-7, 1e-2]``, with small random jitter that samples the
rounding error, and evaluates the model as given (float32, its own forward).

Guarantee: none; a search that can only refute. Every returned point lies in [0, 1], is
float32, and is strictly within ``radius`` of ``x`` (checked in float64).
"""

from __future__ import annotations

import torch
from torch import nn

from lipverify.attacks._util import l2_norms

__all__ = ["rounding_search", "ROUNDING_BUDGET"]

#: model evaluations per point of the default search
ROUNDING_BUDGET = 64


def _direction(model: nn.Module, x: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(xg)
        other = logits.detach().clone()
        other.scatter_(1, pred[:, None], float("-inf"))
        j = other.argmax(1)
        margin = logits.gather(1, pred[:, None]) - logits.gather(1, j[:, None])
        (g,) = torch.autograd.grad(margin.sum(), xg)
    g = -g.detach()
    norm = l2_norms(g).clamp_min(1e-30).view(-1, *([1] * (x.dim() - 1)))
    return g / norm


@torch.no_grad()
def rounding_search(
    model: nn.Module,
    x: torch.Tensor,
    pred: torch.Tensor,
    radius: torch.Tensor,
    *,
    budget: int = ROUNDING_BUDGET,
    seed: int = 0,
    group: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_adv, found)``: for each point, an input within ``radius`` whose executed
    prediction is not ``pred`` (``found``), else ``x``. ``budget`` model evaluations per
    point (``group`` candidates per forward); points with radius 0 are skipped."""
    gen = torch.Generator().manual_seed(int(seed))
    n = x.shape[0]
    x_adv = x.detach().clone()
    found = torch.zeros(n, dtype=torch.bool)
    live = (radius > 0).nonzero()[:, 0]
    if live.numel() == 0:
        return x_adv, found
    xs, ps = x[live], pred[live].to(x.device)
    rs = radius[live].double().cpu()
    d = _direction(model, xs, ps)
    ones = [1] * (x.dim() - 1)
    for start in range(0, budget, group):
        k = min(group, budget - start)
        s = 10 ** (-7 + 5 * torch.rand(k, len(live), generator=gen, dtype=torch.float64))
        jit = 10 ** (-6 + 3 * torch.rand(k, len(live), generator=gen, dtype=torch.float64))
        noise = torch.randn((k, *xs.shape), generator=gen).to(x.device, x.dtype)
        noise = noise / l2_norms(noise.flatten(0, 1)).view(k, len(live), *ones)
        t = rs[None, :] * (1 - s)  # the depth along d, and the jitter's size
        depth = t.to(x.device, x.dtype).view(k, len(live), *ones)
        size = (jit * t).to(x.device, x.dtype).view(k, len(live), *ones)
        cand = (xs[None] + depth * d[None] + size * noise).clamp(0, 1).flatten(0, 1)
        dist = l2_norms(cand.double() - xs.repeat(k, *ones).double()).cpu()
        inside = dist < rs.repeat(k)
        flips = (model(cand).argmax(1) != ps.repeat(k)).cpu() & inside
        for idx in flips.nonzero()[:, 0].tolist():
            i = idx % len(live)
            g = int(live[i])
            if not found[g]:
                found[g] = True
                x_adv[g] = cand[idx]
    return x_adv, found
