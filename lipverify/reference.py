"""Import checkpoints written by the reference SOC / Householder / LLN code.

Guarantee: the returned eval-mode :class:`~lipverify.models.LipConvNet` computes the reference
network's function on pixel inputs (normalization inside), including its stored power-iteration
vectors, so imported logits and certificates match the reference (tested to 1e-4 on the
fixtures in ``shared/compat``). Stale vectors are imported as they are: the audit exposes them.

The reference certifies with ``L = 1/max(std)``; lipverify claims ``1/min(std)``. They agree
for the uniform std of the papers (0.2507 on every channel).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from lipverify.checkpoints import build_model, file_sha256, load_state_strict, safe_torch_load
from lipverify.errors import CheckpointError

__all__ = ["load_soc_reference", "architecture_from_reference_config"]

_NAMES = {  # reference config key -> LipConvNet keyword
    "conv": "conv",
    "activation": "activation",
    "num_layers": "num_layers",
    "init_channels": "init_channels",
    "num_classes": "num_classes",
    "input_side": "input_size",
    "cifar_mean": "mean",
    "cifar_std": "std",
}


def architecture_from_reference_config(config: dict) -> dict:
    """Translate the reference's config names into LipConvNet keywords."""
    arch = {ours: config[theirs] for theirs, ours in _NAMES.items() if theirs in config}
    if "lln" in config:
        arch["last_layer"] = "lln" if config["lln"] else "ortho"
    if "block_size" in config and "num_layers" not in config:
        arch["num_layers"] = 5 * int(config["block_size"])
    for k in ("mean", "std"):
        if k in arch:
            arch[k] = tuple(float(v) for v in arch[k])
    if "mean" in arch:
        arch.setdefault("in_channels", len(arch["mean"]))
    return arch


def load_soc_reference(
    path_or_state_dict: str | os.PathLike | dict, _source: str | None = None, **architecture: Any
) -> nn.Module:
    """Build an eval-mode LipConvNet reproducing a reference checkpoint.

    ``path_or_state_dict`` is a file, the loaded file's dict (``state_dict`` + ``config``), or a
    bare ``state_dict``. Keyword arguments use LipConvNet's names and override the file's config.
    """
    source = _source or "reference checkpoint"
    sha = None
    obj = path_or_state_dict
    if isinstance(obj, (str, os.PathLike)):
        source = str(obj)
        sha = file_sha256(obj) if os.path.isfile(obj) else None
        obj = safe_torch_load(obj)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: not a reference checkpoint (got {type(obj).__name__})")
    config = obj.get("config", {}) if "state_dict" in obj else {}
    state = obj["state_dict"] if "state_dict" in obj else obj
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: the 'config' entry is not a dict")
    arch = architecture_from_reference_config(config)
    arch.update(architecture)
    model = build_model(arch, source, state=state if isinstance(state, dict) else None)
    if isinstance(state, dict):  # DataParallel / DDP prefixes
        state = {(k.removeprefix("module.") if isinstance(k, str) else k): v
                 for k, v in state.items()}
    load_state_strict(model, state, ignore_missing=("normalize.",), source=source)
    model.metadata = {"source": "reference", "reference_config": _plain(config)}
    model.checkpoint_sha256 = sha
    return model.eval()


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj
