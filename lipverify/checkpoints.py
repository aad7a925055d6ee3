"""Self-describing, checksummed checkpoints and safe loading.

Guarantees:

* Loading never runs code from the file: every load is ``torch.load(..., weights_only=True)``;
  a file that needs arbitrary unpickling is refused with :class:`CheckpointError`.
* A lipverify checkpoint stores a format version, the architecture, the weights, metadata and a
  SHA-256 over all of them (tensor names, dtypes, shapes and bytes, and the canonical text of
  every other value). Any change to the stored content fails the check on load. The checksum
  detects damage, it is no signature: a crafted file is still only data, and before any model
  is built its architecture is bounded and checked against the weights (channels, depth,
  classes), so no file can make us construct a huge network.
* Every failure to read or interpret a file is a one-line :class:`CheckpointError` naming it.
* Writes are atomic (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lipverify.atomic import atomic_write_bytes
from lipverify.errors import CheckpointError, LipverifyError
from lipverify.safe_load import _short, safe_torch_load

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "load_model",
    "safe_torch_load",
    "content_sha256",
    "file_sha256",
    "load_state_strict",
]

FORMAT = "lipverify-checkpoint"
FORMAT_VERSION = 1


def _digest(h: Any, obj: Any) -> None:
    """Feed a canonical encoding of ``obj`` (nested containers, tensors, scalars) into ``h``."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _digest(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _digest(h, v)
    else:
        h.update(f"V{type(obj).__name__}:{obj!r};".encode())


def content_sha256(payload: dict) -> str:
    """SHA-256 of everything in a checkpoint payload except the ``sha256`` entry itself."""
    h = hashlib.sha256()
    _digest(h, {k: v for k, v in payload.items() if k != "sha256"})
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_state_strict(
    model: nn.Module, state: dict, ignore_missing: tuple[str, ...] = (), source: str = "checkpoint"
) -> None:
    """Load ``state`` into ``model``; name the first key or shape that does not fit."""
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"{source}: the weights are not a state_dict")
    own = model.state_dict()
    for k, v in state.items():
        if k not in own:
            raise CheckpointError(f"{source}: architecture mismatch, unexpected key {k!r}")
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{source}: {k!r} is not a tensor")
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(
                f"{source}: architecture mismatch at {k!r}: file has shape {tuple(v.shape)}, "
                f"model expects {tuple(own[k].shape)}"
            )
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{source}: {k!r} holds NaN or Inf weights")
    for k in own:
        if k not in state and not k.startswith(ignore_missing):
            raise CheckpointError(f"{source}: architecture mismatch, missing key {k!r}")
    model.load_state_dict(state, strict=False)


def save_checkpoint(
    model: nn.Module, path: str | os.PathLike, *, extra: dict | None = None, **metadata: Any
) -> Path:
    """Write ``model`` (a LipConvNet) with ``metadata`` atomically; return the path.

    ``extra`` holds further tensors/containers (e.g. optimizer state), covered by the checksum.
    """
    arch = getattr(model, "config", None)
    if arch is None:
        raise TypeError("save_checkpoint needs a model with a .config (e.g. a LipConvNet)")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": dict(arch),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "metadata": json.loads(json.dumps(metadata, default=str)),
        "extra": extra or {},
    }
    payload["sha256"] = content_sha256(payload)
    buf = io.BytesIO()
    torch.save(payload, buf)
    return atomic_write_bytes(path, buf.getvalue())


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Safely read and verify a lipverify checkpoint payload (no model is built)."""
    payload = safe_torch_load(path)
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a checkpoint (top level is {type(payload).__name__})")
    if payload.get("format") != FORMAT:
        if "state_dict" in payload and "config" in payload:
            raise CheckpointError(
                f"{path}: a reference-code checkpoint; load it with lipverify.load_soc_reference"
            )
        raise CheckpointError(f"{path}: not a lipverify checkpoint (no format tag)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {payload.get('format_version')!r} is not supported "
            f"(this lipverify reads version {FORMAT_VERSION})"
        )
    for key, kind in (("architecture", dict), ("state_dict", dict), ("metadata", dict),
                      ("extra", dict), ("sha256", str)):
        if not isinstance(payload.get(key), kind):
            raise CheckpointError(f"{path}: corrupt checkpoint, {key!r} is missing or malformed")
    if content_sha256(payload) != payload["sha256"]:
        raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt or was modified")
    return payload


# Sanity bounds on architecture integers: far above any real LipConvNet, far below sizes
# whose construction would exhaust memory (a crafted file must not be able to do that).
_ARCH_INT_BOUNDS = {"init_channels": 4096, "num_layers": 40, "num_classes": 100_000,
                    "input_size": 4096, "in_channels": 64}


def _check_architecture(architecture: Any, source: str) -> dict:
    if not isinstance(architecture, dict) or not all(isinstance(k, str) for k in architecture):
        raise CheckpointError(f"{source}: the architecture is not a dict of keyword arguments")
    for key, hi in _ARCH_INT_BOUNDS.items():
        v = architecture.get(key, 1)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
            raise CheckpointError(
                f"{source}: unusable architecture, {key} = {repr(v)[:40]} "
                f"(expected an integer in [1, {hi}])"
            )
    for key in ("mean", "std"):
        v = architecture.get(key, ())
        if not isinstance(v, (list, tuple)) or len(v) > 64 or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
            for t in v
        ):
            raise CheckpointError(
                f"{source}: unusable architecture, {key} = {repr(v)[:40]} "
                "(expected a short list of finite numbers)"
            )
    return architecture


def _check_fits_state(architecture: dict, state: Any, source: str) -> None:
    """Compare the sizes the architecture implies with the weights *before* building a model,
    so a wrong or hostile architecture cannot make us construct a huge network."""
    if not isinstance(state, dict):
        return
    from lipverify.models import LipConvNet

    arch = {name: p.default for name, p in inspect.signature(LipConvNet).parameters.items()}
    arch.update(architecture)
    keys = {k.removeprefix("module."): v for k, v in state.items() if isinstance(k, str)}
    blocks = [int(m.group(1)) for k in keys if (m := re.match(r"layer1\.(\d+)\.", k))]
    implied: dict[str, int] = {}
    if blocks:
        implied["num_layers"] = 5 * (max(blocks) + 1)
    bias = keys.get("last_layer.bias")
    if isinstance(bias, torch.Tensor) and bias.dim() == 1:
        implied["num_classes"] = int(bias.shape[0])
    first = keys.get("layer1.0.conv.bias")  # the first block; stride 2 iff it ends layer1
    if isinstance(first, torch.Tensor) and first.dim() == 1:
        stride = 2 if implied.get("num_layers", arch["num_layers"]) == 5 else 1
        if first.shape[0] % stride == 0:
            implied["init_channels"] = int(first.shape[0]) // stride
    for key, value in implied.items():
        if arch.get(key) != value:
            raise CheckpointError(
                f"{source}: architecture mismatch, it says {key} = {arch.get(key)!r} "
                f"but the weights imply {value}"
            )


def build_model(architecture: dict, source: str = "checkpoint", state: Any = None) -> nn.Module:
    """Construct a LipConvNet from an architecture dict, with a one-line error on bad values.

    With ``state`` (the weights to be loaded), sizes are checked against it first.
    """
    from lipverify.models import LipConvNet

    _check_architecture(architecture, source)
    if state is not None:
        _check_fits_state(architecture, state, source)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            return LipConvNet(**architecture)
        except (TypeError, ValueError, RuntimeError, ArithmeticError, MemoryError) as e:
            raise CheckpointError(f"{source}: unusable architecture ({_short(e)})") from None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a lipverify checkpoint into an eval-mode model; ``model.metadata`` holds metadata."""
    payload = read_checkpoint(path)
    model = build_model(payload["architecture"], str(path), payload["state_dict"])
    load_state_strict(model, payload["state_dict"], source=str(path))
    claim = getattr(model, "lipschitz_claim", 1.0)
    if not (math.isfinite(claim) and claim > 0):
        raise CheckpointError(f"{path}: the normalization std must be positive and finite")
    model.metadata = payload["metadata"]
    model.checkpoint_sha256 = file_sha256(path)
    return model.to(map_location).eval()


def load_exported(path: str | os.PathLike) -> nn.Module:
    """A snapshot written by ``lipverify export`` (``torch.export`` format: a graph of ATen
    ops and tensors; loading it runs no code of the model), as an eval-mode module."""
    try:
        module = ExportedModel(torch.export.load(str(path)).module())
    except Exception as e:  # noqa: BLE001 - any failure is a bad file
        raise CheckpointError(f"{path}: not a lipverify export snapshot ({_short(e)})") from None
    module.checkpoint_sha256 = file_sha256(path)
    return module


class ExportedModel(nn.Module):
    """An exported program as a module: its graph was traced in eval mode, so ``train()`` and
    ``eval()`` only set the flag (the graph itself has no modes)."""

    def __init__(self, program_module: nn.Module) -> None:
        super().__init__()
        self.program = program_module

    def train(self, mode: bool = True) -> ExportedModel:  # noqa: D102
        self.training = bool(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)


def load_model(path: str | os.PathLike, **architecture: Any) -> nn.Module:
    """Load either a lipverify checkpoint or a reference-code checkpoint (eval mode).

    Any failure to interpret the file is a :class:`CheckpointError`.
    """
    if str(path).endswith(".pt2"):
        return load_exported(path)
    payload = safe_torch_load(path)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        return load_checkpoint(path)
    from lipverify.reference import architecture_from_reference_config, load_soc_reference

    source = str(path)
    try:
        if isinstance(payload, dict):
            state = payload["state_dict"] if "state_dict" in payload else payload
            config = payload.get("config", {}) if "state_dict" in payload else {}
            if isinstance(config, dict):
                arch = {**architecture_from_reference_config(config), **architecture}
                _check_architecture(arch, source)
                _check_fits_state(arch, state, source)
        model = load_soc_reference(payload, _source=source, **architecture)
    except LipverifyError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the file holds, it is a bad checkpoint
        raise CheckpointError(f"{source}: unusable reference checkpoint ({_short(e)})") from None
    model.checkpoint_sha256 = file_sha256(path)  # provenance: what file was audited
    return model
