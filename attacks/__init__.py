"""Attack adapters (torchattacks, foolbox, the original ``autoattack`` when importable), named
suites and AutoAttack-style sanity flags.

All attacks target the model's own prediction (pass it as ``labels``): a certificate promises
that the prediction does not change. They are seeded and run on the input's device. The
attack libraries are imported only when an attack runs (they form the ``lipverify[attacks]``
extra).

Guarantee: none. Attacks can only refute a certificate (find a counterexample), never prove
one.
"""

from __future__ import annotations

from lipverify.attacks._util import AttackResult
from lipverify.attacks.autoattack import (
    AUTOATTACK_L2_STANDARD,
    apgd_ce,
    apgd_t,
    autoattack_backend,
    autoattack_l2,
    fab_t,
    square,
    standard_autoattack_components,
)
from lipverify.attacks.minimum_norm import ddn, fab_t_min_norm, fmn_l2
from lipverify.attacks.sanity import SANITY_MESSAGES, sanity_flags
from lipverify.attacks.suites import (
    BOUNDED_ATTACKS,
    MINIMUM_NORM_ATTACKS,
    SUITES,
    AttackSpec,
    describe_suite,
    run_attack,
    suite_specs,
)

__all__ = [
    "AUTOATTACK_L2_STANDARD", "BOUNDED_ATTACKS", "MINIMUM_NORM_ATTACKS", "SANITY_MESSAGES",
    "SUITES", "AttackResult", "AttackSpec", "apgd_ce", "apgd_t", "autoattack_backend",
    "autoattack_l2", "ddn", "describe_suite", "fab_t", "fab_t_min_norm", "fmn_l2",
    "run_attack", "sanity_flags", "square", "standard_autoattack_components", "suite_specs",
]
