"""Named attack suites, as data, and one dispatcher that runs an attack spec.

Suites (the settings below are exactly what runs; the report records them):

* ``quick``: APGD-CE 50 iterations; APGD-T 50 iterations with 3 targets; DDN 100 steps.
* ``standard``: full standard AutoAttack L2 (APGD-CE 100, APGD-T 100 x 9 targets, FAB-T
  100 x 9 targets, Square 5000 queries, p_init 0.8, no rescaled schedule); DDN 1000 steps.
* ``minimal-norm``: DDN 1000 steps; FMN-L2 1000 steps; FAB-T 100 iterations with 9 targets.

Eps-bounded attacks (apgd-ce, apgd-t, square, autoattack) search the ball of a given
per-sample eps; minimum-norm attacks (ddn, fmn-l2, fab-t) take no eps and return the
smallest adversarial they find. Targets are capped at K - 1 for K classes.

Guarantee: none. Attacks can only refute, never prove.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lipverify.attacks import autoattack as _aa
from lipverify.attacks import minimum_norm as _mn
from lipverify.attacks._util import AttackResult
from lipverify.errors import InputError

__all__ = ["AttackSpec", "SUITES", "MINIMUM_NORM_ATTACKS", "BOUNDED_ATTACKS", "suite_specs",
           "describe_suite", "run_attack"]

MINIMUM_NORM_ATTACKS = ("ddn", "fmn-l2", "fab-t")
BOUNDED_ATTACKS = ("apgd-ce", "apgd-t", "square", "autoattack")


@dataclass(frozen=True)
class AttackSpec:
    """One attack and its settings (keyword arguments of its adapter)."""

    name: str
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in MINIMUM_NORM_ATTACKS + BOUNDED_ATTACKS:
            raise InputError(
                f"unknown attack {self.name!r}; use one of "
                f"{', '.join(MINIMUM_NORM_ATTACKS + BOUNDED_ATTACKS)}"
            )

    @property
    def minimum_norm(self) -> bool:
        """True for attacks that minimise the perturbation instead of taking an eps."""
        return self.name in MINIMUM_NORM_ATTACKS

    def for_classes(self, k: int) -> AttackSpec:
        """The spec as it runs on a K-class model: targets capped at K - 1 (noted)."""
        s = copy.deepcopy(dict(self.settings))
        n = s.get("n_target_classes")
        if n is not None and n > k - 1:
            s["n_target_classes"] = max(1, k - 1)
            s["n_target_classes_requested"] = n
        if self.name == "autoattack":
            comps = []
            for name, cs in s.get("components", []):
                cs = dict(cs)
                n = cs.get("n_target_classes")
                if n is not None and n > k - 1:
                    cs["n_target_classes"] = max(1, k - 1)
                    cs["n_target_classes_requested"] = n
                comps.append([name, cs])
            s["components"] = comps
        return AttackSpec(self.name, s)

    def to_dict(self) -> dict:
        """JSON-ready description: name, kind, settings."""
        s = copy.deepcopy(dict(self.settings))
        if "components" in s:
            s["components"] = [[n, dict(c)] for n, c in s["components"]]
        return {"name": self.name, "minimum_norm": self.minimum_norm, "settings": s}


def _ddn(steps: int) -> AttackSpec:
    return AttackSpec("ddn", {"steps": steps, "init_epsilon": 1.0, "gamma": 0.05})


SUITES: dict[str, tuple[AttackSpec, ...]] = {
    "quick": (
        AttackSpec("apgd-ce", {"steps": 50, "n_restarts": 1}),
        AttackSpec("apgd-t", {"steps": 50, "n_target_classes": 3, "n_restarts": 1}),
        _ddn(100),
    ),
    "standard": (
        AttackSpec("autoattack", {
            "version": "standard",
            "components": [[n, dict(s)] for n, s in _aa.AUTOATTACK_L2_STANDARD],
        }),
        _ddn(1000),
    ),
    "minimal-norm": (
        _ddn(1000),
        AttackSpec("fmn-l2", {"steps": 1000, "max_stepsize": 1.0, "gamma": 0.05}),
        AttackSpec("fab-t", {"steps": 100, "n_target_classes": 9, "n_restarts": 1,
                             "alpha_max": 0.1, "eta": 1.05, "beta": 0.9}),
    ),
}


def suite_specs(suite: str | Sequence[AttackSpec]) -> tuple[AttackSpec, ...]:
    """The specs of a named suite (or a custom sequence of specs, validated)."""
    if isinstance(suite, str):
        if suite not in SUITES:
            raise InputError(f"unknown attack suite {suite!r}; use one of {', '.join(SUITES)}")
        return SUITES[suite]
    specs = tuple(suite)
    if not specs or not all(isinstance(s, AttackSpec) for s in specs):
        raise InputError("a custom suite must be a non-empty sequence of AttackSpec")
    return specs


def describe_suite(suite: str | Sequence[AttackSpec]) -> list[dict]:
    """JSON-ready list of the attacks of a suite with their settings."""
    return [s.to_dict() for s in suite_specs(suite)]


def run_attack(
    spec: AttackSpec,
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    eps: float | torch.Tensor | None = None,
    *,
    seed: int = 0,
    group_ratio: float = 1.0,
) -> AttackResult:
    """Run one spec against ``labels`` (pass the model's own prediction). Eps-bounded attacks
    need ``eps`` (scalar or per sample); minimum-norm attacks ignore it. ``group_ratio``
    applies to scalar-eps backends (Square, the original autoattack package)."""
    try:
        return _dispatch(spec, model, x, labels, eps, seed, group_ratio)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in ("torchattacks", "foolbox", "eagerpy"):
            raise InputError(
                f"the attack backend {e.name!r} is not installed; "
                "install the extra: pip install 'lipverify[attacks]'"
            ) from None
        raise


def _dispatch(spec, model, x, labels, eps, seed, group_ratio) -> AttackResult:
    s = {k: v for k, v in spec.settings.items() if not k.endswith("_requested")}
    if spec.minimum_norm:
        fn = {"ddn": _mn.ddn, "fmn-l2": _mn.fmn_l2, "fab-t": _mn.fab_t_min_norm}[spec.name]
        return fn(model, x, labels, seed=seed, **s)
    if eps is None:
        raise InputError(f"attack {spec.name!r} needs eps")
    if spec.name == "autoattack":
        if s.get("version", "standard") != "standard":
            raise InputError("only the standard AutoAttack version is supported")
        comps = [(n, dict(c)) for n, c in s.get("components", _aa.AUTOATTACK_L2_STANDARD)]
        return _aa.autoattack_l2(model, x, labels, eps, seed=seed, group_ratio=group_ratio,
                                 components=comps)
    if spec.name == "square":
        return _aa.square(model, x, labels, eps, seed=seed, group_ratio=group_ratio, **s)
    fn = {"apgd-ce": _aa.apgd_ce, "apgd-t": _aa.apgd_t}[spec.name]
    return fn(model, x, labels, eps, seed=seed, **s)
