"""Shared fixtures. Tests that need ``../shared`` fail (not skip) when ``CI`` is set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LIPVERIFY_SHARED", REPO.parent / "shared"))

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
torch.set_num_threads(min(2, torch.get_num_threads()))


def shared_path(*parts: str) -> Path:
    """Path under ``../shared``; skip when absent locally, fail when absent under CI."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        msg = f"shared material {p} is missing"
        if os.environ.get("CI"):
            pytest.fail(msg + " (required under CI)")
        pytest.skip(msg)
    return p


@pytest.fixture
def compat_dir() -> Path:
    return shared_path("compat")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def shared():
    """``shared("compat", "x.pt")`` -> Path; skip locally / fail under CI when missing."""
    return shared_path
