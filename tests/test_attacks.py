"""lipverify.attacks: adapters, suites, sanity flags.

Oracle: a linear classifier f(x) = W x with orthonormal rows (scaled by ``scale``). Without
active box constraints the exact minimal l2 adversarial distance of x is
min_{j != y} (f_y - f_j) / (scale * sqrt(2)), and no attack can go below it.
"""

from __future__ import annotations

import math
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

from lipverify.attacks import (
    AUTOATTACK_L2_STANDARD,
    SUITES,
    AttackSpec,
    apgd_ce,
    apgd_t,
    autoattack_backend,
    autoattack_l2,
    ddn,
    describe_suite,
    fab_t,
    fab_t_min_norm,
    fmn_l2,
    run_attack,
    sanity_flags,
    square,
    standard_autoattack_components,
    suite_specs,
)
from lipverify.errors import InputError

from controls import Rounding, batch, linear_model


def exact_distance(model: nn.Module, x: torch.Tensor, scale: float) -> torch.Tensor:
    with torch.no_grad():
        z = model(x.double() if next(model.parameters()).dtype == torch.float64 else x).double()
    y = z.argmax(1, keepdim=True)
    gap = (z.gather(1, y) - z).scatter(1, y, float("inf"))
    return gap.min(1).values / (scale * math.sqrt(2.0))


def norms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() - b.double()).flatten(1).norm(dim=1)


REDUCED_AA = [
    ("apgd-ce", {"steps": 5, "n_restarts": 1}),
    ("apgd-t", {"steps": 5, "n_target_classes": 9, "n_restarts": 1}),
    ("fab-t", {"steps": 5, "n_target_classes": 9, "n_restarts": 1}),
    ("square", {"n_queries": 20, "p_init": 0.8, "resc_schedule": False, "n_restarts": 1}),
]


# --- packaging ---------------------------------------------------------------------------


def test_importing_lipverify_and_attacks_imports_no_attack_library():
    code = (
        "import sys, lipverify, lipverify.attacks, lipverify.audits.attack_audit\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('torchattacks', 'foolbox', 'autoattack', 'eagerpy')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- suites as data ----------------------------------------------------------------------


def test_suite_definitions_hold_the_exact_settings():
    quick = {s.name: dict(s.settings) for s in SUITES["quick"]}
    assert [s.name for s in SUITES["quick"]] == ["apgd-ce", "apgd-t", "ddn"]
    assert quick["apgd-ce"]["steps"] == 50 and quick["apgd-ce"]["n_restarts"] == 1
    assert quick["apgd-t"]["steps"] == 50 and quick["apgd-t"]["n_target_classes"] == 3
    assert quick["ddn"]["steps"] == 100

    std = SUITES["standard"]
    assert [s.name for s in std] == ["autoattack", "ddn"]
    assert std[1].settings["steps"] == 1000
    comps = {n: c for n, c in std[0].settings["components"]}
    assert [n for n, _ in std[0].settings["components"]] == ["apgd-ce", "apgd-t", "fab-t",
                                                             "square"]
    assert comps["apgd-ce"] == {"steps": 100, "n_restarts": 1}
    assert comps["apgd-t"] == {"steps": 100, "n_target_classes": 9, "n_restarts": 1}
    assert comps["fab-t"] == {"steps": 100, "n_target_classes": 9, "n_restarts": 1}
    assert comps["square"] == {"n_queries": 5000, "p_init": 0.8, "resc_schedule": False,
                               "n_restarts": 1}

    mn = {s.name: dict(s.settings) for s in SUITES["minimal-norm"]}
    assert list(mn) == ["ddn", "fmn-l2", "fab-t"]
    assert mn["ddn"]["steps"] == 1000 and mn["fmn-l2"]["steps"] == 1000
    assert mn["fab-t"]["steps"] == 100 and mn["fab-t"]["n_target_classes"] == 9
    assert all(s.minimum_norm for s in SUITES["minimal-norm"])
    assert not any(s.minimum_norm for s in SUITES["quick"][:2])

    desc = describe_suite("quick")
    assert desc[1] == {"name": "apgd-t", "minimum_norm": False,
                       "settings": {"steps": 50, "n_target_classes": 3, "n_restarts": 1}}


def test_spec_caps_targets_at_classes_minus_one_and_validates():
    capped = SUITES["standard"][0].for_classes(3)
    comps = dict((n, c) for n, c in capped.settings["components"])
    assert comps["apgd-t"]["n_target_classes"] == 2
    assert comps["apgd-t"]["n_target_classes_requested"] == 9
    assert comps["fab-t"]["n_target_classes"] == 2
    assert SUITES["quick"][1].for_classes(100).settings["n_target_classes"] == 3
    assert SUITES["quick"][1].for_classes(2).settings["n_target_classes"] == 1
    # The suite definition itself is not modified.
    assert dict(SUITES["standard"][0].settings["components"][1][1])["n_target_classes"] == 9
    with pytest.raises(InputError):
        AttackSpec("pgd")
    with pytest.raises(InputError):
        suite_specs("nonsense")
    m = linear_model(1, 8, 3)
    x = batch(2, 1, 8)
    with pytest.raises(InputError):
        run_attack(SUITES["quick"][0], m, x, m(x).argmax(1))  # eps-bounded needs eps


@pytest.mark.parametrize("k", [2, 3, 10, 100])
def test_composed_standard_autoattack_has_the_original_settings(k):
    import torchattacks

    m = linear_model(3, 8, k)
    x = batch(2, 3, 8)
    comps = standard_autoattack_components(m, x, seed=7)
    assert [n for n, _ in comps] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    a, t, f, s = (c for _, c in comps)
    targets = min(9, k - 1)
    assert type(a) is torchattacks.APGD and (a.norm, a.steps, a.n_restarts, a.loss, a.seed) == (
        "L2", 100, 1, "ce", 7)
    assert type(t) is torchattacks.APGDT and (t.norm, t.steps, t.n_restarts) == ("L2", 100, 1)
    assert t.n_target_classes == targets
    assert type(f) is torchattacks.FAB and (f.norm, f.steps, f.n_restarts) == ("L2", 100, 1)
    assert f.multi_targeted and f.n_target_classes == targets
    assert type(s) is torchattacks.Square and (s.norm, s.n_queries, s.p_init) == ("L2", 5000, 0.8)
    assert s.rescale_schedule is False and s.loss == "margin" and s.n_restarts == 1
    assert not any(type(c).__name__ == "AutoAttack" for _, c in comps)
    assert AUTOATTACK_L2_STANDARD[0] == ("apgd-ce", {"steps": 100, "n_restarts": 1})


# --- eps-bounded adapters ------------------------------------------------------------------

BOUNDED = {
    "apgd-ce": lambda m, x, y, e: apgd_ce(m, x, y, e, steps=10),
    "apgd-t": lambda m, x, y, e: apgd_t(m, x, y, e, steps=10, n_target_classes=3),
    "fab-t": lambda m, x, y, e: fab_t(m, x, y, e, steps=10, n_target_classes=3),
    "square": lambda m, x, y, e: square(m, x, y, e, n_queries=30),
    "autoattack": lambda m, x, y, e: autoattack_l2(m, x, y, e, components=REDUCED_AA),
}


@pytest.mark.parametrize("name", list(BOUNDED))
@pytest.mark.parametrize("shape", [(1, 8, 2), (3, 8, 3), (3, 16, 10)])
def test_bounded_attacks_stay_in_each_samples_ball_and_report_honestly(name, shape):
    c, s, k = shape
    m = linear_model(c, s, k, scale=20.0)
    x = batch(6, c, s)
    y = m(x).argmax(1)
    d = exact_distance(m, x, 20.0)
    # Per-sample eps: 0, far below, and well above the exact distance.
    eps = torch.stack([torch.zeros(()), 0.5 * d[1], 0.9 * d[2], 1.5 * d[3], 2 * d[4], 3 * d[5]])
    res = BOUNDED[name](m, x, y, eps.float())
    assert res.x_adv.shape == x.shape and res.success.shape == (6,) and len(res.source) == 6
    dist = norms(res.x_adv, x)
    assert (dist <= eps.double() + 1e-5).all()
    assert ((res.x_adv >= 0) & (res.x_adv <= 1)).all()
    flipped = m(res.x_adv).argmax(1) != y
    assert torch.equal(res.success, flipped)
    assert not res.success[:3].any()  # below the exact distance nothing can be found
    assert (dist[~res.success] == 0).all()  # unsuccessful rows are the clean input
    assert all((src != "") == bool(ok) for src, ok in zip(res.source, res.success, strict=True))
    if name != "square":  # gradient attacks find the easy ones
        assert res.success[4:].all()


def test_autoattack_runs_components_in_order_on_the_points_still_unbroken(monkeypatch):
    import lipverify.attacks.autoattack as aa

    seen = {}
    for fn in ("_run_apgd", "_run_fab", "_run_square"):
        orig = getattr(aa, fn)

        def spy(atk, model, xs, *a, _orig=orig, **kw):
            seen.setdefault(type(atk).__name__, []).append(xs.shape[0])
            return _orig(atk, model, xs, *a, **kw)

        monkeypatch.setattr(aa, fn, spy)
    m = linear_model(3, 8, 10, scale=20.0)
    x = batch(6, 3, 8)
    y = m(x).argmax(1)
    d = exact_distance(m, x, 20.0).float()
    eps = torch.where(torch.arange(6) < 3, 3 * d, 1e-3 * d)
    res = autoattack_l2(m, x, y, eps, components=REDUCED_AA)
    assert res.source[:3] == ["autoattack/apgd-ce"] * 3
    assert res.source[3:] == [""] * 3
    assert seen == {"APGD": [6], "APGDT": [3], "FAB": [3], "Square": [3]}


def test_original_autoattack_package_is_used_when_importable(monkeypatch):
    calls = []

    class FakeAutoAttack:
        def __init__(self, model, **kw):
            calls.append(kw)
            self.model = model
            self.apgd_targeted = types.SimpleNamespace(n_target_classes=9)
            self.fab = types.SimpleNamespace(n_target_classes=9)

        def run_standard_evaluation(self, x, y, bs=250):
            calls[-1]["targets"] = (self.apgd_targeted.n_target_classes,
                                    self.fab.n_target_classes)
            return x.clone()

    fake = types.ModuleType("autoattack")
    fake.AutoAttack = FakeAutoAttack
    monkeypatch.setitem(sys.modules, "autoattack", fake)
    assert autoattack_backend() == "autoattack"
    m = linear_model(1, 8, 3)
    x = batch(4, 1, 8)
    y = m(x).argmax(1)
    eps = torch.tensor([0.1, 0.102, 0.5, 0.0])
    res = autoattack_l2(m, x, y, eps, seed=3, group_ratio=1.05)
    assert not res.success.any()
    assert [c["eps"] for c in calls] == pytest.approx([0.1, 0.5])  # groups, at their min eps
    for c in calls:
        assert (c["norm"], c["version"], c["seed"]) == ("L2", "standard", 3)
        assert c["targets"] == (2, 2)  # capped at K - 1


# --- minimum-norm adapters ------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 8, 2), (3, 8, 10)])
def test_minimum_norm_attacks_never_beat_the_exact_distance(shape):
    c, s, k = shape
    m = linear_model(c, s, k, scale=20.0)
    x = batch(5, c, s)
    y = m(x).argmax(1)
    d = exact_distance(m, x, 20.0)
    fab = fab_t_min_norm(m, x, y, steps=20, n_target_classes=9)
    dd = ddn(m, x, y, steps=100)
    for res in (fab, dd):
        assert res.x_adv.shape == x.shape and res.success.all()
        assert (m(res.x_adv).argmax(1) != y).all()
        assert (norms(res.x_adv, x) >= d * (1 - 1e-4)).all()
    # FAB projects onto the linear decision boundary: exact up to its overshoot eta = 1.05.
    assert (norms(fab.x_adv, x) <= d * 1.06).all()
    # DDN shrinks its norm by (1 - gamma) per step from init_epsilon = 1: 100 steps reach 0.006.
    assert (norms(dd.x_adv, x) <= torch.clamp(d * 1.5, min=0.01)).all()


def test_fmn_l2_finds_adversarials_no_closer_than_a_lipschitz_bound():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x = batch(6, 3, 8)
    y = m(x).argmax(1)
    with torch.no_grad():
        lip = float(torch.linalg.matrix_norm(m[1].weight, 2)
                    * torch.linalg.matrix_norm(m[3].weight, 2))
        z = m(x).double()
    gap = (z.gather(1, y[:, None]) - z).scatter(1, y[:, None], float("inf")).min(1).values
    lower = gap / (math.sqrt(2.0) * lip)
    res = fmn_l2(m, x, y, steps=50)
    assert res.success.sum() >= 4
    assert (norms(res.x_adv, x)[res.success] >= lower[res.success]).all()
    assert torch.equal(res.success, m(res.x_adv).argmax(1) != y)


def test_fmn_projection_is_the_l2_ball_projection():
    import eagerpy as ep

    from lipverify.attacks.minimum_norm import _fixed_l2fmn_class

    atk = _fixed_l2fmn_class()(steps=1)
    x0 = torch.zeros(3, 1, 2, 2)
    d = torch.randn(3, 1, 2, 2)
    d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * 2.0
    eps = torch.tensor([0.5, 3.0, float("inf")])
    out = atk.project(ep.astensor(x0 + d), ep.astensor(x0), ep.astensor(eps)).raw
    assert torch.allclose(out.flatten(1).norm(dim=1), torch.tensor([0.5, 2.0, 2.0]))
    assert torch.allclose(out[0], d[0] * 0.25)


# --- reproducibility, side effects ---------------------------------------------------------


def test_attacks_are_seeded_and_leave_rng_and_modes_alone():
    m = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.Dropout(0.5), nn.ReLU(),
                      nn.Linear(16, 4))
    m.train()
    m[2].eval()  # a mixed-mode model: each module's own flag must come back
    x = batch(4, 3, 8)
    with torch.no_grad():
        m.eval()
        y = m(x).argmax(1)
        m.train()
        m[2].eval()
    state = torch.get_rng_state()
    r1 = apgd_t(m, x, y, 0.3, steps=5, n_target_classes=3, seed=5)
    r2 = apgd_t(m, x, y, 0.3, steps=5, n_target_classes=3, seed=5)
    r3 = square(m, x, y, 0.3, n_queries=10, seed=5)
    r4 = square(m, x, y, 0.3, n_queries=10, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(r1.x_adv, r2.x_adv) and torch.equal(r3.x_adv, r4.x_adv)
    assert m.training and not m[2].training and m[1].training and m[4].training


# --- sanity flags --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 8), (3, 16)])
def test_sanity_flags(shape):
    c, s = shape
    x = batch(5, c, s)
    lin = linear_model(c, s, 10, scale=5.0)
    assert sanity_flags(lin, x) == []
    dropout = nn.Sequential(nn.Dropout(0.5), lin).train()
    assert "randomness" in sanity_flags(dropout, x)
    assert sanity_flags(dropout.eval(), x) == []
    assert sanity_flags(nn.Sequential(lin, nn.Softmax(dim=1)), x) == ["softmax"]
    assert sanity_flags(Rounding(lin), x) == ["zero_gradients"]
    state = torch.get_rng_state()
    sanity_flags(dropout.train(), x)
    assert torch.equal(torch.get_rng_state(), state)


def test_sanity_flags_of_a_lipconvnet_are_clean():
    import lipverify

    m = lipverify.LipConvNet(init_channels=6, input_size=32).eval()
    assert sanity_flags(m, batch(2, 3, 32)) == []


def test_missing_backend_is_an_input_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # makes `import torchattacks` fail
    m = linear_model(1, 8, 3)
    x = batch(2, 1, 8)
    with pytest.raises(InputError, match=r"lipverify\[attacks\]"):
        run_attack(SUITES["quick"][0], m, x, m(x).argmax(1), 0.1)
