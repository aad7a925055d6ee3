"""Minimum-norm L2 attacks: foolbox DDN (Rony et al. 2019), foolbox FMN-L2 (Pintor et al.
2021) and FAB-T from torchattacks (Croce & Hein 2020; foolbox has no FAB).

Each returns, per sample, the smallest adversarial perturbation it found (the clean input
where it found none) and a float32 success flag; the distance ||x_adv - x||_2 is an upper
bound on the sample's true minimal adversarial distance, never a lower bound.

Guarantee: none. Attacks can only refute a certificate, never prove one. Seeded; the global
RNG state and the model's modes are restored.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lipverify.attacks._util import (
    AttackedModel,
    AttackResult,
    check_adversarial,
    eval_mode,
    l2_norms,
    num_classes,
    seeded,
)

__all__ = ["ddn", "fmn_l2", "fab_t_min_norm"]


def _import_foolbox():
    with warnings.catch_warnings():  # foolbox 3.3.4 imports a deprecated scipy namespace
        warnings.simplefilter("ignore", DeprecationWarning)
        import foolbox
    return foolbox


def _foolbox(model, x, labels, attack) -> AttackResult:
    foolbox = _import_foolbox()

    labels = torch.as_tensor(labels).to(x.device).long()
    wrapped = AttackedModel(model, x.device)
    fmodel = foolbox.PyTorchModel(wrapped, bounds=(0.0, 1.0), device=x.device)
    raw, _, _ = attack(fmodel, x, foolbox.criteria.Misclassification(labels), epsilons=None)
    adv = raw.detach().to(x.dtype).clamp(0.0, 1.0)
    ok = check_adversarial(wrapped, x, adv, labels)
    adv = torch.where(ok.view(-1, *[1] * (x.dim() - 1)), adv, x)
    return AttackResult(adv, ok)


def _named(res: AttackResult, x: torch.Tensor, name: str) -> AttackResult:
    """Name the successes ("clean" where the clean input itself is already adversarial)."""
    same = (res.x_adv == x).flatten(1).all(1)
    res.source = ["" if not s else "clean" if c else name
                  for s, c in zip(res.success.tolist(), same.tolist(), strict=True)]
    return res


def ddn(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, *, steps: int = 1000,
        init_epsilon: float = 1.0, gamma: float = 0.05, seed: int = 0) -> AttackResult:
    """Decoupled Direction and Norm (foolbox.attacks.DDNAttack), untargeted, L2. Its norm
    shrinks by (1 - gamma) per step from ``init_epsilon``: it cannot go below
    init_epsilon * (1 - gamma)^steps (0.006 for 100 steps)."""
    foolbox = _import_foolbox()

    atk = foolbox.attacks.DDNAttack(init_epsilon=init_epsilon, steps=steps, gamma=gamma)
    with eval_mode(model), seeded(seed, x.device):
        return _named(_foolbox(model, x, labels, atk), x, "ddn")


def _fixed_l2fmn_class():
    """foolbox's L2FMNAttack with its projection fixed.

    foolbox 3.3.4 ``L2FMNAttack.project`` computes ``min(1, norms / norms)`` (always 1), so
    the perturbation is never projected onto the shrinking eps ball and the attack stalls at
    its first adversarial (about 1.0 from x). Here the projection is the paper's (Pintor et
    al. 2021, Alg. 1): x0 + d * min(1, eps / ||d||), d = x - x0.
    """
    import eagerpy as ep

    foolbox = _import_foolbox()
    from foolbox.devutils import atleast_kd, flatten

    class FixedL2FMNAttack(foolbox.attacks.L2FMNAttack):
        def project(self, x, x0, epsilon):
            d = x - x0
            norms = ep.maximum(flatten(d).norms.l2(axis=-1), 1e-12)
            factor = ep.minimum(1, epsilon / norms)
            return x0 + d * atleast_kd(factor, x.ndim)

    return FixedL2FMNAttack


def fmn_l2(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, *, steps: int = 1000,
           max_stepsize: float = 1.0, gamma: float = 0.05, seed: int = 0) -> AttackResult:
    """Fast Minimum Norm, L2 (foolbox.attacks.L2FMNAttack, untargeted), with foolbox 3.3.4's
    broken eps-ball projection replaced by the paper's (see :func:`_fixed_l2fmn_class`)."""
    atk = _fixed_l2fmn_class()(steps=steps, max_stepsize=max_stepsize, gamma=gamma)
    with eval_mode(model), seeded(seed, x.device):
        return _named(_foolbox(model, x, labels, atk), x, "fmn-l2")


def fab_t_min_norm(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, *, steps: int = 100,
                   n_target_classes: int = 9, n_restarts: int = 1, alpha_max: float = 0.1,
                   eta: float = 1.05, beta: float = 0.9, seed: int = 0) -> AttackResult:
    """FAB-T (torchattacks.FAB, multi-targeted, L2) as a minimum-norm attack: every target
    (the 2nd..(n+1)-th most likely classes, capped at K - 1) is run on every sample and the
    smallest adversarial found is kept."""
    import torchattacks

    labels = torch.as_tensor(labels).to(x.device).long()
    with eval_mode(model), seeded(seed, x.device), torch.no_grad():
        k = num_classes(model, x)
        n = max(1, min(int(n_target_classes), k - 1))
        wrapped = AttackedModel(model, x.device)
        atk = torchattacks.FAB(wrapped, norm="L2", eps=None, steps=steps, n_restarts=n_restarts,
                               alpha_max=alpha_max, eta=eta, beta=beta, seed=seed,
                               multi_targeted=True, n_classes=n + 1)
        adv = x.clone()
        best = torch.full((x.shape[0],), float("inf"), dtype=torch.float64, device=x.device)
        for t in range(2, n + 2):
            atk.target_class = t
            for r in range(n_restarts):
                cand = atk.attack_single_run_targeted(x, labels, use_rand_start=r > 0)
                dist = l2_norms((cand - x).double())
                better = check_adversarial(wrapped, x, cand, labels) & (dist < best)
                adv[better] = cand[better]
                best[better] = dist[better]
        ok = torch.isfinite(best)
    return _named(AttackResult(adv, ok), x, "fab-t")
