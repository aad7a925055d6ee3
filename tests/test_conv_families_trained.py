"""Cayley and BCOP LipConvNets trained by ``lipverify train`` for two epochs on digits, then
certified and audited with the ``quick`` suite on 100 test points (issue 8): the audit must say
"sound" with at least 50 of the 100 points correctly classified and certified."""

from __future__ import annotations

import json

import pytest

from lipverify.audits import audit
from lipverify.checkpoints import load_model
from lipverify.data import load_dataset
from lipverify.layers import CONV_LAYERS
from lipverify.train import train


@pytest.fixture(scope="module", params=["cayley", "bcop"])
def trained(request, tmp_path_factory):
    conv = request.param
    out = tmp_path_factory.mktemp(f"digits-{conv}")
    result = train({"dataset": "digits", "conv": conv, "epochs": 2, "seed": 0, "out": str(out)})
    return conv, result


def test_two_epoch_training_writes_a_run(trained):
    conv, result = trained
    lines = [json.loads(s) for s in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert all(0.0 <= m["cert_acc_36"] <= m["test_acc"] <= 1.0 for m in lines)
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    for name in ("last.pt", "best.pt", "curves.png"):
        assert (result.out_dir / name).stat().st_size > 0
    model = load_model(result.best_path)
    assert model.config["conv"] == conv
    assert sum(isinstance(m, CONV_LAYERS[conv]) for m in model.modules()) >= 5


def test_two_epoch_model_audits_sound(trained):
    conv, result = trained
    model = load_model(result.best_path)
    x, y, _ = load_dataset("digits", "test")
    x, y = x[:100], y[:100]
    rep = audit(model, x, y, attacks="quick", seed=0, lipschitz_points=2)
    assert rep.verdict == "sound", (conv, rep.reasons)
    certified = sum(s["radius"] > 0 and s["pred"] == s["label"] for s in rep.samples)
    assert certified >= 50, (conv, certified)
    assert rep.attacks["n_attacked"] >= certified and rep.violations == []
    lo, up = rep.lipschitz_lower, rep.lipschitz_upper
    assert 0 < lo <= up <= rep.lipschitz_claim * (1 + rep.tolerance)
