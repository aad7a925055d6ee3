"""The built-in default: a small LipConvNet trained by ``lipverify train`` on scikit-learn's
bundled digits, shipped inside the package (``lipverify/assets/default.pt``).

Its checkpoint metadata records the exact command that produced it. It is loaded like any
untrusted file (``weights_only=True``, checksum verified).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from torch import nn

__all__ = ["DEFAULT_CHECKPOINT", "load_default", "load_default_model", "default_checkpoint"]

DEFAULT_CHECKPOINT = "default.pt"


def default_checkpoint() -> Path:
    """Path of the shipped checkpoint."""
    return Path(str(resources.files("lipverify") / "assets" / DEFAULT_CHECKPOINT))


def load_default_model() -> nn.Module:
    """The built-in model, in eval mode."""
    from lipverify.checkpoints import load_checkpoint
    from lipverify.errors import CheckpointError

    path = default_checkpoint()
    if not path.is_file():
        raise CheckpointError(f"the built-in default checkpoint is missing ({path}); reinstall")
    return load_checkpoint(path)


def load_default() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """``(model, (x, y))``: the built-in model (eval mode) and the digits test split, pixels in
    [0, 1] of shape (N, 3, 32, 32) and int64 labels."""
    from lipverify.data import load_dataset

    x, y, _ = load_dataset("digits", "test")
    return load_default_model(), (x, y)
