"""User-facing errors and input checks.

Every check raises :class:`InputError` (or :class:`CheckpointError`) with a one-line message
that says what is wrong and what to do; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import math

import torch

__all__ = ["LipverifyError", "InputError", "CheckpointError", "check_images", "check_labels",
           "check_radius", "check_model_images", "check_device", "check_seed"]


class LipverifyError(ValueError):
    """Base class of errors caused by bad input, not by a bug."""


class InputError(LipverifyError):
    """Images, labels or options that cannot be used."""


class CheckpointError(LipverifyError):
    """A checkpoint that is unsafe, corrupt, or does not match the architecture."""


def check_images(
    x: torch.Tensor, channels: int | None = None, size: int | None = None
) -> torch.Tensor:
    """Validate a batch of pixels: 4-D NCHW float, finite, in [0, 1], non-empty."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"images must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise InputError(f"images must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise InputError("no images: the dataset or batch is empty")
    if not x.is_floating_point():
        raise InputError(f"images must be floating point in [0, 1], got {x.dtype}")
    if channels is not None and x.shape[1] != channels:
        raise InputError(f"the model takes {channels} channels, the images have {x.shape[1]}")
    if size is not None and tuple(x.shape[2:]) != (size, size):
        raise InputError(
            f"the model takes {size}x{size} images, got {x.shape[2]}x{x.shape[3]}"
        )
    if not torch.isfinite(x).all():
        raise InputError("images contain NaN or Inf pixels; clean the input first")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise InputError(
            f"pixels must lie in [0, 1] (got min {lo:.4g}, max {hi:.4g}); "
            "pass un-normalized pixels, the model normalizes inside"
        )
    return x


def check_labels(y: torch.Tensor, n: int, num_classes: int | None) -> torch.Tensor:
    """Validate integer labels of length ``n`` in ``[0, num_classes)``."""
    y = torch.as_tensor(y)
    if y.dim() != 1 or y.shape[0] != n:
        raise InputError(f"labels must have shape ({n},), got {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex():
        raise InputError(f"labels must be integers, got {y.dtype}")
    if n and (int(y.min()) < 0 or (num_classes is not None and int(y.max()) >= num_classes)):
        raise InputError(
            f"labels must lie in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]"
        )
    return y.long()


def check_radius(r: float) -> float:
    """A radius must be a finite, non-negative number."""
    try:
        r = float(r)
    except (TypeError, ValueError):
        raise InputError(f"radius {r!r} is not a number") from None
    if math.isnan(r) or math.isinf(r) or r < 0:
        raise InputError(f"radius must be finite and non-negative, got {r}")
    return r


def check_model_images(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """:func:`check_images` with the channel count and image size that ``model`` declares in a
    ``config`` dict (LipConvNet does); models without one are only checked for pixel values."""
    cfg = getattr(model, "config", None)
    cfg = cfg if isinstance(cfg, dict) else {}
    return check_images(x, cfg.get("in_channels"), cfg.get("input_size"))


def check_device(name: str | None) -> torch.device:
    """A usable torch device from ``name`` (None: cuda if available, else cpu)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)"
                         ) from None
    try:
        if device.type == "meta":
            raise RuntimeError("the meta device holds no data")
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, AttributeError, ValueError):
        raise InputError(f"--device {name!r} is not available here; use --device cpu") from None
    return device


def check_seed(seed: object) -> int:
    """A seed must be an integer in [0, 2**32)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise InputError(f"seed must be an integer in [0, 2**32), got {repr(seed)[:40]}")
    return seed
