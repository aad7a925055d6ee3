"""Reusable assertions for users' own Lipschitz layers and models (and ours).

* :func:`assert_gradient_norm_preserving`: ``||J^T g|| = ||g||`` and ``||J v|| = ||v||`` at
  the given points, within ``tol`` (relative).
* :func:`assert_lipschitz`: attained ratios ``||f(a) - f(b)|| / ||a - b||`` stay at or below
  ``bound * (1 + tol)`` (a search for counterexamples: it can refute, never prove).
* :func:`assert_certificates_sound`: no input found inside a certified radius changes the
  prediction (again a search for counterexamples).

Each failure message gives the worst ratio and the index of the input that produced it; the
offending input is attached to the exception as ``.input``. Strategies for Hypothesis live in
:mod:`lipverify.testing.strategies`. Importing this package does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "assert_gradient_norm_preserving": "lipverify.testing.assertions",
    "assert_lipschitz": "lipverify.testing.assertions",
    "assert_certificates_sound": "lipverify.testing.assertions",
    "LipschitzAssertionError": "lipverify.testing.assertions",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lipverify.testing' has no attribute {name!r}")
