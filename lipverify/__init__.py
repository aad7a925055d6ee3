"""lipverify: provably 1-Lipschitz CNNs and audits of their l2 robustness certificates.

Importing this package does not import torch (the pytest plugin relies on that); the public
names below load their modules on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "LipConvNet": "lipverify.models",
    "certify": "lipverify.certificates",
    "certified_accuracy": "lipverify.certificates",
    "Certificates": "lipverify.certificates",
    "save_checkpoint": "lipverify.checkpoints",
    "load_checkpoint": "lipverify.checkpoints",
    "load_model": "lipverify.checkpoints",
    "load_soc_reference": "lipverify.reference",
    "load_default": "lipverify.default",
    "LipverifyError": "lipverify.errors",
    "InputError": "lipverify.errors",
    "CheckpointError": "lipverify.errors",
    "FastModule": "lipverify.fast",
}
#: submodules that are callable: ``lipverify.fast(model)`` builds, ``lipverify.fast.load(path)``
_CALLABLE_MODULES = ("fast",)

__all__ = sorted([*_LAZY, *_CALLABLE_MODULES]) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _CALLABLE_MODULES:  # importing sets the attribute: no second call
        return importlib.import_module(f"lipverify.{name}")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lipverify' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_CALLABLE_MODULES))
