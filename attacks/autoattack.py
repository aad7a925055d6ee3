"""Standard AutoAttack L2 (Croce & Hein 2020) and its eps-bounded components.

Backends: the original ``autoattack`` package when it is importable; otherwise AutoAttack is
composed from torchattacks 3.5.1 components with the ORIGINAL standard-version settings:
APGD-CE 100 iterations (1 restart), APGD-T (targeted DLR) 100 iterations with 9 target
classes, FAB-T 100 iterations with 9 target classes, Square 5000 queries with p_init 0.8 and
no rescaled schedule, run in this order, each on the points still not broken.
``torchattacks.AutoAttack`` (10 iterations) is never used.

Per-sample eps: APGD-CE, APGD-T and FAB-T take a per-sample eps exactly (the adapters drive
the torchattacks single-run methods, as their ``perturb`` does, with an (n, 1, 1, 1) eps).
torchattacks 3.5.1 APGDT's L2 update uses the first sample's step size for the whole batch
(``step_size[0]``; the original uses each sample's own): APGD-T therefore runs on groups of
samples whose eps differ by at most 2x, sorted ascending. Square and the original
package take a scalar eps: samples are grouped so that max(eps)/min(eps) <= ``group_ratio``
and each group is attacked at its *smallest* eps, so no sample is attacked beyond its own
eps (with ``group_ratio=1`` the eps is exact per sample).

Targets are capped at K - 1 for K classes (read from the model output); with K < 4 the
logits are padded with never-winning constants so the DLR losses run.

Guarantee: none. Attacks can only refute a certificate (find inputs whose prediction
changes), never prove one. Seeded; the global RNG state and the model's modes are restored.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from lipverify.attacks._util import (
    DLR_MIN_CLASSES,
    AttackedModel,
    AttackResult,
    check_adversarial,
    eval_mode,
    num_classes,
    per_sample_eps,
    seeded,
)
from lipverify.errors import InputError

__all__ = ["AUTOATTACK_L2_STANDARD", "apgd_ce", "apgd_t", "fab_t", "square", "autoattack_l2",
           "standard_autoattack_components", "autoattack_backend", "radius_groups"]

#: The original AutoAttack "standard" L2 components and settings, in run order.
AUTOATTACK_L2_STANDARD: tuple[tuple[str, dict], ...] = (
    ("apgd-ce", {"steps": 100, "n_restarts": 1}),
    ("apgd-t", {"steps": 100, "n_target_classes": 9, "n_restarts": 1}),
    ("fab-t", {"steps": 100, "n_target_classes": 9, "n_restarts": 1}),
    ("square", {"n_queries": 5000, "p_init": 0.8, "resc_schedule": False, "n_restarts": 1}),
)


def _original_autoattack():
    try:
        return importlib.import_module("autoattack")
    except ImportError:
        return None


def autoattack_backend() -> str:
    """``"autoattack"`` (the original package) or ``"torchattacks"`` (composed)."""
    return "autoattack" if _original_autoattack() is not None else "torchattacks"


def radius_groups(eps: torch.Tensor, ratio: float, max_size: int) -> list[torch.Tensor]:
    """Index groups of samples, sorted by eps, with max/min <= ``ratio`` and <= max_size each."""
    if ratio < 1:
        raise InputError(f"the group ratio must be >= 1, got {ratio}")
    order = torch.argsort(eps.detach().cpu(), stable=True)
    vals = eps.detach().cpu()[order].tolist()
    groups, start = [], 0
    for i in range(1, len(vals) + 1):
        if (i == len(vals) or i - start >= max_size
                or vals[i] > vals[start] * ratio or (vals[start] == 0) != (vals[i] == 0)):
            groups.append(order[start:i].to(eps.device))
            start = i
    return groups


def _capped(n_targets: int, k: int) -> int:
    return max(1, min(int(n_targets), k - 1))


def _setup(model: nn.Module, x: torch.Tensor, pad: bool) -> tuple[AttackedModel, int]:
    k = num_classes(model, x)
    return AttackedModel(model, x.device, DLR_MIN_CLASSES if pad else 0), k


def _make_apgd(wrapped, *, loss, steps, n_restarts, n_target_classes, seed):
    import torchattacks

    if loss == "ce":
        return torchattacks.APGD(wrapped, norm="L2", eps=1.0, steps=steps, n_restarts=n_restarts,
                                 seed=seed, loss="ce")
    return torchattacks.APGDT(wrapped, norm="L2", eps=1.0, steps=steps, n_restarts=n_restarts,
                              seed=seed, n_classes=n_target_classes + 1)


def _make_fab(wrapped, *, steps, n_restarts, n_target_classes, seed):
    import torchattacks

    return torchattacks.FAB(wrapped, norm="L2", eps=1.0, steps=steps, n_restarts=n_restarts,
                            seed=seed, multi_targeted=True, n_classes=n_target_classes + 1)


def _make_square(wrapped, *, n_queries, p_init, resc_schedule, n_restarts, seed):
    import torchattacks

    return torchattacks.Square(wrapped, norm="L2", eps=1.0, n_queries=n_queries,
                               n_restarts=n_restarts, p_init=p_init, loss="margin",
                               resc_schedule=resc_schedule, seed=seed)


def standard_autoattack_components(
    model: nn.Module,
    x: torch.Tensor,
    seed: int = 0,
    components: Sequence[tuple[str, Mapping]] = AUTOATTACK_L2_STANDARD,
) -> list[tuple[str, object]]:
    """The composed standard AutoAttack L2 as (name, torchattacks object) pairs, in run order,
    with targets capped at K - 1 for the model's K classes (for inspection and for running).
    ``components`` defaults to the standard settings; other values are for tests only."""
    k = num_classes(model, x)
    plain = AttackedModel(model, x.device)
    padded = AttackedModel(model, x.device, DLR_MIN_CLASSES)
    out: list[tuple[str, object]] = []
    for name, s in components:
        if name not in ("apgd-ce", "apgd-t", "fab-t", "square"):
            raise InputError(f"unknown AutoAttack component {name!r}")
        s = {key: v for key, v in s.items() if not key.endswith("_requested")}
        if "n_target_classes" in s:
            s["n_target_classes"] = _capped(s["n_target_classes"], k)
        if name == "apgd-ce":
            atk = _make_apgd(plain, loss="ce", n_target_classes=0, seed=seed, **s)
        elif name == "apgd-t":
            atk = _make_apgd(padded if k < DLR_MIN_CLASSES else plain, loss="dlr-targeted",
                             seed=seed, **s)
        elif name == "fab-t":
            atk = _make_fab(plain, seed=seed, **s)
        else:
            atk = _make_square(plain, seed=seed, **s)
        out.append((name, atk))
    return out


# --- drivers: per-sample eps, points still not broken, AutoAttack's order -------------------


#: torchattacks 3.5.1 APGDT's L2 update uses ``step_size[0]`` (the first sample's step) for
#: the whole batch; APGD-T therefore runs on groups whose eps differ by at most this factor,
#: sorted ascending, so the shared initial step lies between a sample's eps and its own 2 eps.
APGDT_STEP_GROUP_RATIO = 2.0


def _run_apgd(atk, model, x, labels, eps, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """torchattacks APGD(T).perturb with a per-sample eps (the projection and the initial
    step are per sample); returns (x_adv, success)."""
    adv = x.clone()
    broken = check_adversarial(model, x, x, labels)
    for t in targets:
        if t is not None:
            atk.target_class = t
        for _ in range(atk.n_restarts):
            todo = ((~broken) & (eps > 0)).nonzero()[:, 0]
            if todo.numel() == 0:
                return adv, broken
            if t is None:
                groups = [torch.arange(todo.numel(), device=todo.device)]
            else:
                groups = radius_groups(eps[todo], APGDT_STEP_GROUP_RATIO, todo.numel())
            for g in groups:
                idx = todo[g]
                atk.eps = eps[idx].view(-1, 1, 1, 1)
                _, _, _, cand = atk.attack_single_run(x[idx], labels[idx])
                ok = check_adversarial(model, x[idx], cand, labels[idx], eps[idx])
                adv[idx[ok]] = cand[ok].detach()
                broken[idx[ok]] = True
    return adv, broken


def _run_fab(atk, model, x, labels, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """torchattacks FAB multi-targeted perturb with a per-sample acceptance eps."""
    adv = x.clone()
    broken = check_adversarial(model, x, x, labels)
    with torch.no_grad():
        for t in range(2, atk.n_target_classes + 2):
            atk.target_class = t
            for r in range(atk.n_restarts):
                idx = ((~broken) & (eps > 0)).nonzero()[:, 0]
                if idx.numel() == 0:
                    return adv, broken
                atk.eps = eps[idx]
                cand = atk.attack_single_run_targeted(x[idx], labels[idx], use_rand_start=r > 0)
                ok = check_adversarial(model, x[idx], cand, labels[idx], eps[idx])
                adv[idx[ok]] = cand[ok].detach()
                broken[idx[ok]] = True
    return adv, broken


def _run_square(atk, model, x, labels, eps, group_ratio) -> tuple[torch.Tensor, torch.Tensor]:
    adv = x.clone()
    broken = check_adversarial(model, x, x, labels)
    todo = (~broken).nonzero()[:, 0]
    for g in radius_groups(eps[todo], group_ratio, todo.numel() or 1):
        idx = todo[g]
        if idx.numel() == 0 or float(eps[idx].min()) == 0.0:
            continue
        atk.eps = float(eps[idx].min())
        cand = atk(x[idx], labels[idx])
        ok = check_adversarial(model, x[idx], cand, labels[idx], eps[idx])
        adv[idx[ok]] = cand[ok].detach()
        broken[idx[ok]] = True
    return adv, broken


def _attack(model, x, labels, eps, seed, name: str, fn: Callable) -> AttackResult:
    """Run ``fn(eps, labels)`` seeded, in eval mode; name the successes ("clean" where the
    clean input itself is not classified as ``labels``)."""
    labels = torch.as_tensor(labels).to(x.device).long()
    e = per_sample_eps(eps, x.shape[0], x)
    with eval_mode(model), seeded(seed, x.device):
        adv, ok = fn(e, labels)
    same = (adv == x).flatten(1).all(1)
    source = ["" if not s else "clean" if c else name
              for s, c in zip(ok.tolist(), same.tolist(), strict=True)]
    return AttackResult(adv, ok, source)


def apgd_ce(model: nn.Module, x: torch.Tensor, labels: torch.Tensor,
            eps: float | torch.Tensor, *, steps: int = 100, n_restarts: int = 1,
            seed: int = 0) -> AttackResult:
    """APGD with cross-entropy loss, L2, per-sample eps (torchattacks.APGD)."""
    def fn(e, y):
        wrapped, _ = _setup(model, x, pad=False)
        atk = _make_apgd(wrapped, loss="ce", steps=steps, n_restarts=n_restarts,
                         n_target_classes=0, seed=seed)
        return _run_apgd(atk, wrapped, x, y, e, [None])
    return _attack(model, x, labels, eps, seed, "apgd-ce", fn)


def apgd_t(model: nn.Module, x: torch.Tensor, labels: torch.Tensor,
           eps: float | torch.Tensor, *, steps: int = 100, n_target_classes: int = 9,
           n_restarts: int = 1, seed: int = 0) -> AttackResult:
    """APGD-T: targeted DLR loss against the 2nd..(n+1)-th most likely classes (torchattacks
    .APGDT), L2, per-sample eps; targets capped at K - 1."""
    def fn(e, y):
        k = num_classes(model, x)
        wrapped = AttackedModel(model, x.device, DLR_MIN_CLASSES if k < DLR_MIN_CLASSES else 0)
        n = _capped(n_target_classes, k)
        atk = _make_apgd(wrapped, loss="dlr-targeted", steps=steps, n_restarts=n_restarts,
                         n_target_classes=n, seed=seed)
        return _run_apgd(atk, wrapped, x, y, e, range(2, n + 2))
    return _attack(model, x, labels, eps, seed, "apgd-t", fn)


def fab_t(model: nn.Module, x: torch.Tensor, labels: torch.Tensor,
          eps: float | torch.Tensor, *, steps: int = 100, n_target_classes: int = 9,
          n_restarts: int = 1, seed: int = 0) -> AttackResult:
    """FAB-T (torchattacks.FAB, multi-targeted, L2) accepting adversarials with norm <= eps,
    as in AutoAttack; for the minimum-norm use see :func:`lipverify.attacks.fab_t_min_norm`."""
    def fn(e, y):
        wrapped, k = _setup(model, x, pad=False)
        atk = _make_fab(wrapped, steps=steps, n_restarts=n_restarts,
                        n_target_classes=_capped(n_target_classes, k), seed=seed)
        return _run_fab(atk, wrapped, x, y, e)
    return _attack(model, x, labels, eps, seed, "fab-t", fn)


def square(model: nn.Module, x: torch.Tensor, labels: torch.Tensor,
           eps: float | torch.Tensor, *, n_queries: int = 5000, p_init: float = 0.8,
           resc_schedule: bool = False, n_restarts: int = 1, seed: int = 0,
           group_ratio: float = 1.0) -> AttackResult:
    """Square attack (torchattacks.Square, L2, margin loss). Scalar eps per call: samples are
    grouped (max/min eps <= group_ratio) and attacked at the group's smallest eps."""
    def fn(e, y):
        wrapped, _ = _setup(model, x, pad=False)
        atk = _make_square(wrapped, n_queries=n_queries, p_init=p_init,
                           resc_schedule=resc_schedule, n_restarts=n_restarts, seed=seed)
        return _run_square(atk, wrapped, x, y, e, group_ratio)
    return _attack(model, x, labels, eps, seed, "square", fn)


def _autoattack_original(module, model, x, labels, e, seed, group_ratio):
    k = num_classes(model, x)
    wrapped = AttackedModel(model, x.device, DLR_MIN_CLASSES if k < DLR_MIN_CLASSES else 0)
    adv = x.clone()
    broken = check_adversarial(wrapped, x, x, labels)
    todo = (~broken).nonzero()[:, 0]
    for g in radius_groups(e[todo], group_ratio, todo.numel() or 1):
        idx = todo[g]
        if idx.numel() == 0 or float(e[idx].min()) == 0.0:
            continue
        aa = module.AutoAttack(wrapped, norm="L2", eps=float(e[idx].min()), version="standard",
                               seed=seed, verbose=False, device=x.device)
        for part in ("apgd_targeted", "fab"):
            if hasattr(aa, part) and hasattr(getattr(aa, part), "n_target_classes"):
                sub = getattr(aa, part)
                sub.n_target_classes = _capped(sub.n_target_classes, k)
        cand = aa.run_standard_evaluation(x[idx], labels[idx], bs=idx.numel())
        ok = check_adversarial(wrapped, x[idx], cand, labels[idx], e[idx])
        adv[idx[ok]] = cand[ok].detach()
        broken[idx[ok]] = True
    return adv, broken


def _is_standard(components) -> bool:
    norm = [(n, {k: v for k, v in s.items() if not k.endswith("_requested")})
            for n, s in components]
    std = [(n, dict(s)) for n, s in AUTOATTACK_L2_STANDARD]
    if len(norm) != len(std):
        return False
    for (n, s), (m, t) in zip(norm, std, strict=True):
        t = dict(t)
        if "n_target_classes" in s and s["n_target_classes"] < t["n_target_classes"]:
            t["n_target_classes"] = s["n_target_classes"]  # capped at K - 1
        if n != m or s != t:
            return False
    return True


def autoattack_l2(model: nn.Module, x: torch.Tensor, labels: torch.Tensor,
                  eps: float | torch.Tensor, *, seed: int = 0, group_ratio: float = 1.0,
                  components: Sequence[tuple[str, Mapping]] = AUTOATTACK_L2_STANDARD,
                  ) -> AttackResult:
    """Standard AutoAttack L2 at a (per-sample) eps against ``labels`` (pass the model's own
    prediction): the components run in order, each on the points still not broken.
    ``source`` names the component that broke each point. The original ``autoattack``
    package runs when importable and ``components`` are the standard ones; reduced
    ``components`` (tests only) always use the torchattacks composition."""
    labels = torch.as_tensor(labels).to(x.device).long()
    e = per_sample_eps(eps, x.shape[0], x)
    module = _original_autoattack() if _is_standard(components) else None
    with eval_mode(model), seeded(seed, x.device):
        if module is not None:
            adv, ok = _autoattack_original(module, model, x, labels, e, seed, group_ratio)
            return AttackResult(adv, ok, ["autoattack" if s else "" for s in ok.tolist()])
        comps = standard_autoattack_components(model, x, seed=seed, components=components)
        adv = x.clone()
        broken = check_adversarial(model, x, x, labels)
        source = ["clean" if b else "" for b in broken.tolist()]
        for name, atk in comps:
            idx = (~broken).nonzero()[:, 0]
            if idx.numel() == 0:
                break
            torch.manual_seed(seed)  # each component starts from the seed, as in AutoAttack
            xs, ys, es = x[idx], labels[idx], e[idx]
            if name == "apgd-ce":
                a, ok = _run_apgd(atk, atk.model, xs, ys, es, [None])
            elif name == "apgd-t":
                a, ok = _run_apgd(atk, atk.model, xs, ys, es, range(2, atk.n_target_classes + 2))
            elif name == "fab-t":
                a, ok = _run_fab(atk, atk.model, xs, ys, es)
            else:
                a, ok = _run_square(atk, atk.model, xs, ys, es, group_ratio)
            adv[idx[ok]] = a[ok]
            broken[idx[ok]] = True
            for i in idx[ok].tolist():
                source[i] = f"autoattack/{name}"
    return AttackResult(adv, broken, source)
