"""lipverify.audits.audit: end-to-end negative and positive controls (issue 4, "Acceptance").

Each negative control asserts the verdict *and* the check that caught it (the reason prefix):
* a plain ReLU CNN declared 1-Lipschitz -> unsound by "lipschitz:" (attained lower bound);
* a tight LipConvNet (``init_channels=6``: no channel zero-padding) whose logits are scaled by
  1.05 while claiming the original bound -> unsound by "lipschitz:" (tightness checked first);
* a LipConvNet evaluated with SOC highest power T = 2, claiming 1/min(std) -> unsound by
  "lipschitz:" (the truncated series is not orthogonal: |1 + iλ - λ²/2| > 1);
* a sound model whose certifier overstates radii by 2x, ``checks=("attacks",)`` -> unsound by
  "attacks:", each violation re-confirmed here in float64 on the saved adversarial input;
* a model that rounds its input (zero gradients, not Lipschitz) -> never "sound".
Positive control: the built-in digits LipConvNet is "sound" on 100 test points under "quick".
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import lipverify
from lipverify.audits import audit
from lipverify.layers.soc import SOC

from controls import Rounding


def pixels(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.25 + 0.5 * torch.rand(n, 3, 32, 32, generator=g)


def reason(report, prefix: str) -> str:
    hits = [r for r in report.reasons if r.startswith(prefix)]
    assert hits, f"no reason starting with {prefix!r}: {report.reasons}"
    return hits[0]


class Scaled(nn.Module):
    """``factor * net(x)`` that still claims ``net``'s bound for the logit map."""

    def __init__(self, net: nn.Module, factor: float) -> None:
        super().__init__()
        self.net, self.factor = net, factor
        self.lipschitz_claim = net.lipschitz_claim
        self.certificate_kind = "ortho"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.factor * self.net(x)


@pytest.fixture(scope="module")
def default():
    model, (x, y) = lipverify.load_default()
    return model, x, y


@pytest.fixture(scope="module")
def overstated(default):
    """The default model on 16 test points with radii overstated 2x, attacks only."""
    model, x, _ = default
    x = x[:16]
    c = lipverify.certify(model, x)
    assert int((c.radius > 0).sum()) >= 8
    rep = audit(model, x, certifier=lambda _x: (c.pred, 2 * c.radius), checks=("attacks",),
                attacks="quick", seed=0)
    return model, x, c, rep


def test_relu_cnn_declared_1_lipschitz_is_unsound_by_lipschitz():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10),
    )
    with torch.no_grad():  # scale so that it is clearly not 1-Lipschitz
        for m in net:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(4.0)
    x = pixels(4)
    rep = audit(net, x, lipschitz=1.0, checks=("lipschitz",), lipschitz_points=4)
    assert rep.verdict == "unsound"
    assert "exceeds the claim" in reason(rep, "lipschitz:")
    assert rep.lipschitz_lower is not None and rep.lipschitz_lower > 1.0 * (1 + 1e-3)
    assert rep.lipschitz_claim == 1.0
    assert rep.violations == []  # the attack check was not run: lipschitz alone caught it


@pytest.fixture(scope="module")
def tight_net():
    torch.manual_seed(0)
    return lipverify.LipConvNet(init_channels=6).eval()


def test_tight_lipconvnet_attains_its_claim(tight_net):
    rep = audit(tight_net, pixels(4), checks=("lipschitz",), lipschitz_points=4)
    claim = tight_net.lipschitz_claim
    assert rep.verdict == "sound", rep.reasons
    assert reason(rep, "lipschitz:")
    assert rep.lipschitz_lower >= claim * (1 - 1e-3)
    assert rep.lipschitz_lower <= rep.lipschitz_upper <= claim * (1 + 1e-3)


def test_tight_network_scaled_by_1_05_is_unsound_by_lipschitz(tight_net):
    scaled = Scaled(tight_net, 1.05).eval()
    rep = audit(scaled, pixels(4), checks=("lipschitz",), lipschitz_points=4)
    claim = tight_net.lipschitz_claim
    assert rep.lipschitz_claim == pytest.approx(claim)
    assert rep.verdict == "unsound", rep.reasons
    assert "exceeds the claim" in reason(rep, "lipschitz:")
    assert rep.lipschitz_lower > claim * (1 + 1e-3)
    assert rep.lipschitz_lower == pytest.approx(1.05 * claim, rel=2e-3)


def test_soc_truncated_at_t2_still_claiming_1_over_std_is_unsound_by_lipschitz():
    torch.manual_seed(0)
    net = lipverify.LipConvNet(init_channels=6).eval()
    socs = [m for m in net.modules() if isinstance(m, SOC)]
    assert socs
    for layer in socs:
        layer.eval_terms = 2
    claim = float(1 / net.normalize.std.min())
    assert net.lipschitz_claim == pytest.approx(claim)
    rep = audit(net, pixels(4), checks=("lipschitz",), lipschitz_points=4)
    assert rep.verdict == "unsound", rep.reasons
    assert "exceeds the claim" in reason(rep, "lipschitz:")  # caught by the lower bound
    assert rep.lipschitz_lower > claim * (1 + 1e-3)


def test_radii_overstated_2x_are_refuted_by_attacks_in_float64(overstated):
    model, x, c, rep = overstated
    assert rep.verdict == "unsound", rep.reasons
    assert "float64-confirmed" in reason(rep, "attacks:")
    assert not any(r.startswith("lipschitz:") for r in rep.reasons)  # attacks only
    assert rep.lipschitz_lower is None and rep.lipschitz_upper is None
    assert rep.violations and len(rep.violations) == len(rep.violation_tensors)
    assert rep.attacks["n_attacked"] >= len(rep.violations)
    m64 = copy.deepcopy(model).double().eval()
    for row, t in zip(rep.violations, rep.violation_tensors, strict=True):
        i = row["index"]
        assert row["pred"] == int(c.pred[i])
        assert row["radius"] == pytest.approx(2 * float(c.radius[i]), rel=1e-6)
        assert row["distance"] < row["radius"]
        z64 = torch.tensor(row["logits_float64"], dtype=torch.float64)
        assert int(z64.argmax()) == row["adv_pred"] != row["pred"]
        # independent float64 recomputation on the saved adversarial input
        x_adv = t["x_adv"].double()
        assert x_adv.shape == x.shape[1:]
        assert torch.equal(t["x"], x[i])
        dist = float((x_adv - x[i].double()).norm())
        assert dist == pytest.approx(row["distance"], rel=1e-5) and dist < row["radius"]
        assert 0 <= float(x_adv.min()) and float(x_adv.max()) <= 1
        with torch.no_grad():
            z = m64(x_adv[None])[0]
        assert z.shape == (10,)
        assert int(z.argmax()) != row["pred"]
        assert torch.allclose(z, z64, atol=1e-6)


def test_rounding_model_is_not_sound():
    torch.manual_seed(0)
    net = lipverify.LipConvNet(init_channels=6).eval()
    model = Rounding(net).eval()
    x = pixels(4)
    rep = audit(model, x, lipschitz=net.lipschitz_claim, checks=("attacks",), attacks="quick")
    assert rep.verdict in ("unsound", "inconclusive"), rep.reasons
    flagged = "zero_gradients" in rep.attacks["sanity_flags"]
    assert flagged or rep.violations
    if flagged:
        assert "zero_gradients" in reason(rep, "sanity flags raised:")
    else:
        assert reason(rep, "attacks:")


@pytest.fixture(scope="module")
def positive(default):
    model, x, y = default
    # all 100 points are certified and attacked; the (costly, point-independent) layer-wise upper
    # bound and the attained lower bound use 2 of them
    return audit(model, x[:100], y[:100], attacks="quick", seed=0, lipschitz_points=2)


def test_default_model_is_sound_on_100_points(positive):
    rep = positive
    assert rep.verdict == "sound", rep.reasons
    assert reason(rep, "lipschitz:") and reason(rep, "attacks:")
    assert rep.violations == [] and rep.violation_tensors == []
    assert rep.attacks["sanity_flags"] == []
    assert len(rep.samples) == 100
    certified = sum(s["radius"] > 0 for s in rep.samples)
    assert certified >= 50
    assert rep.attacks["n_attacked"] == certified
    lo, up = rep.lipschitz_lower, rep.lipschitz_upper
    assert lo is not None and up is not None
    assert 0 < lo <= up <= rep.lipschitz_claim * (1 + rep.tolerance)
    assert rep.provenance["n_points"] == 100
    stages = [rep.provenance[f"{k}_seconds"] for k in ("certify", "lipschitz", "gnp", "attacks")]
    assert all(t >= 0 for t in stages) and sum(stages) <= rep.provenance["seconds"] + 0.01


def test_save_writes_all_report_files(positive, overstated, tmp_path):
    keys = {"verdict", "violations", "lipschitz_lower", "lipschitz_upper",
            "certified_accuracy", "provenance"}
    d = positive.save(tmp_path / "sound")
    for name in ("report.json", "report.md", "report.html"):
        assert (d / name).is_file() and (d / name).stat().st_size > 0
    data = json.loads((d / "report.json").read_text())
    assert keys <= set(data) and data["verdict"] == "sound" and data["violations"] == []
    assert data["lipschitz_lower"] <= data["lipschitz_upper"]
    assert (d / "violations").is_dir() and not list((d / "violations").glob("*.pt"))

    rep = overstated[3]
    d = rep.save(tmp_path / "unsound")
    for name in ("report.json", "report.md", "report.html", "violations/0000.pt"):
        assert (d / name).is_file()
    data = json.loads((d / "report.json").read_text())
    assert keys <= set(data) and data["verdict"] == "unsound"
    assert len(data["violations"]) == len(rep.violations)
    assert len(list((d / "violations").glob("*.pt"))) == len(rep.violations)
    v0 = torch.load(d / "violations" / "0000.pt", weights_only=True)
    assert v0["index"] == rep.violations[0]["index"]
    assert torch.equal(v0["x_adv"], rep.violation_tensors[0]["x_adv"])

    # a sound report saved over it leaves no stale violation records behind
    positive.save(d)
    assert json.loads((d / "report.json").read_text())["verdict"] == "sound"
    assert not list((d / "violations").glob("*.pt"))
