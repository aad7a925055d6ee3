"""Shared plumbing of the attack adapters: the attacked-model wrapper, eval mode, seeding, and
the float32 success check every adapter reports.

Guarantee: none (attacks can only refute). This module only makes the backends seeded,
device-agnostic and side-effect free (model modes and the global RNG state are restored).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from lipverify.errors import InputError

__all__ = ["AttackResult", "AttackedModel", "eval_mode", "seeded", "num_classes", "l2_norms",
           "per_sample_eps", "check_adversarial", "rounding_slack"]

#: DLR losses sort the logits and read the 3rd / 4th largest: they need >= 4 classes.
DLR_MIN_CLASSES = 4


@dataclass
class AttackResult:
    """What an attack found on a batch.

    ``x_adv``: the adversarial input per sample (the clean input where none was found);
    ``success``: float32 check, argmax(model(x_adv)) != label (and ||x_adv - x||_2 <= eps for
    eps-bounded attacks); ``source``: per sample, the name of the (component) attack that
    found it ("" where none). Callers that need certainty re-check in float64.
    """

    x_adv: torch.Tensor
    success: torch.Tensor
    source: list[str] = field(default_factory=list)


class AttackedModel(nn.Module):
    """``model`` as attack backends see it: logits (B, K), optionally padded to ``pad_to``
    classes with constant, never-winning logits (so DLR losses run with K < 4), and an empty
    parameter on the input's device so torchattacks finds the device of parameter-free models.
    Padding never changes the argmax.
    """

    def __init__(self, model: nn.Module, device: torch.device, pad_to: int = 0) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(0, device=device), requires_grad=False)
        self.model = model
        self.pad_to = pad_to
        self.training = model.training  # mirror the model's mode without changing it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if out.dim() != 2:
            raise InputError(
                f"the model must return logits of shape (N, K), got {tuple(out.shape)}"
            )
        k = out.shape[1]
        if self.pad_to > k:
            d = out.detach()
            low = d.min(1, keepdim=True).values - 1e3 * (1.0 + d.abs().max(1, keepdim=True).values)
            out = torch.cat([out, low.expand(-1, self.pad_to - k)], 1)
        return out


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each module's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, t in flags:
            m.training = t


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch inside a forked RNG, so the global RNG state is untouched afterwards.

    The backends call ``torch.manual_seed`` themselves, which seeds every CUDA device; when
    CUDA is in use, every visible device's state is therefore saved and restored.
    """
    cuda = torch.cuda.is_available() and (device.type == "cuda" or torch.cuda.is_initialized())
    devices = list(range(torch.cuda.device_count())) if cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def num_classes(model: nn.Module, x: torch.Tensor) -> int:
    """Number of classes, read from the model's output on one input."""
    out = model(x[:1])
    if out.dim() != 2 or out.shape[1] < 2:
        raise InputError(
            f"the model must return logits of shape (N, K) with K >= 2, got {tuple(out.shape)}"
        )
    return int(out.shape[1])


def l2_norms(d: torch.Tensor) -> torch.Tensor:
    """Per-sample l2 norm of a batch."""
    return d.flatten(1).norm(dim=1)


def per_sample_eps(eps: float | torch.Tensor, n: int, x: torch.Tensor) -> torch.Tensor:
    """``eps`` as a (n,) tensor on x's device and dtype; must be finite and non-negative."""
    e = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    e = e.expand(n).clone() if e.dim() == 0 else e.reshape(-1).clone()
    if e.shape[0] != n:
        raise InputError(f"eps must be a scalar or have shape ({n},), got {tuple(e.shape)}")
    if not torch.isfinite(e).all() or (e < 0).any():
        raise InputError("eps must be finite and non-negative")
    return e


@torch.no_grad()
def check_adversarial(
    model: nn.Module,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    labels: torch.Tensor,
    eps: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 check: argmax changed, x_adv in [0, 1], and (if eps) ||x_adv - x|| <= eps up to
    :func:`rounding_slack`."""
    ok = model(x_adv).argmax(1) != labels
    ok &= (x_adv >= 0).flatten(1).all(1) & (x_adv <= 1).flatten(1).all(1)
    if eps is not None:
        ok &= l2_norms((x_adv - x).double()) <= eps.double() + rounding_slack(x, eps.double())
    return ok


def rounding_slack(x: torch.Tensor, eps: float | torch.Tensor = 0.0) -> float | torch.Tensor:
    """Bound on how far rounding moves ||x_adv - x||_2 when an attack stores x + delta in
    x's dtype (pixels in [0, 1]): one unit roundoff per pixel plus a few on ||delta||."""
    u = torch.finfo(x.dtype).eps
    return u * (math.sqrt(x[0].numel()) + 4 * eps)
