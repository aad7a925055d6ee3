"""AutoAttack-style sanity checks of a model (Croce & Hein 2020, ``autoattack/checks.py``):
conditions under which gradient attacks are unreliable, so "no violation found" means little.

Flags (ids; :data:`SANITY_MESSAGES` explains each):

* ``randomness``: two forward passes of the same batch differ (dropout in train mode, noise
  layers): the model is not a fixed function and gradients are noisy.
* ``softmax``: every output row is non-negative and sums to 1: the model returns
  probabilities, whose saturated gradients weaken CE/DLR attacks.
* ``zero_gradients``: the input gradient of the margin f_pred - max_{j != pred} f_j is exactly
  zero on at least one point (rounding/quantisation, saturated or non-differentiable layers):
  gradient attacks are blind there.

The model is evaluated as given, in its current mode.

Guarantee: none; a raised flag says the attacks may miss counterexamples, an absent flag
proves nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from lipverify.attacks._util import seeded

__all__ = ["SANITY_MESSAGES", "sanity_flags"]

SANITY_MESSAGES = {
    "randomness": "two forward passes of the same batch differ: the model is randomized",
    "softmax": "the outputs are non-negative and sum to 1: the model returns probabilities",
    "zero_gradients": "the input gradient of the margin is zero on some points: "
                      "gradient-based attacks are blind there",
}


def sanity_flags(model: nn.Module, x: torch.Tensor, *, seed: int = 0) -> list[str]:
    """The sanity flags raised by ``model`` on the batch ``x`` (ids of SANITY_MESSAGES)."""
    flags: list[str] = []
    with seeded(seed, x.device), torch.no_grad():
        out1 = model(x)
        out2 = model(x)
    scale = float(out1.abs().max()) if out1.numel() else 0.0
    if out1.shape != out2.shape or (out1 - out2).abs().max() > 1e-6 * max(1.0, scale):
        flags.append("randomness")
    sums = out1.double().sum(1)
    if bool((out1 >= 0).all()) and bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-4)):
        flags.append("softmax")

    xg = x.detach().clone().requires_grad_(True)
    with seeded(seed, x.device), torch.enable_grad():
        logits = model(xg)
        pred = logits.argmax(1, keepdim=True)
        other = logits.scatter(1, pred, float("-inf")).max(1).values
        margin = logits.gather(1, pred)[:, 0] - other
        grad = None
        if margin.requires_grad:
            (grad,) = torch.autograd.grad(margin.sum(), xg, allow_unused=True)
    zero = (torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if grad is None
            else (grad.flatten(1) == 0).all(1))
    if bool(zero.any()):
        flags.append("zero_gradients")
    return flags
