"""``python -m lipverify.attacks.autoattack_original`` and ``benchmarks/bench_fast.py`` (issue 18).

The original AutoAttack is not on PyPI. So the script's plumbing is tested with a stand-in
``autoattack`` module whose ``AutoAttack`` has the original interface and runs a real, weak
attack: one normalized-gradient L2 step of length eps (fast gradient method). The run with the
real package is the ``autoattack-original`` nox session, and the last test here when it is
importable (marked slow, as is the benchmark's smoke run).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lipverify
from lipverify.attacks import autoattack_original as aao

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


class _FGM:
    """Stand-in with the original ``AutoAttack`` interface: one L2 step of length eps."""

    calls: list[dict] = []

    def __init__(self, model, norm="Linf", eps=0.3, seed=None, verbose=True, version="standard",
                 device="cuda", **kw) -> None:
        self.model, self.eps = model, eps
        _FGM.calls.append({"model": model, "norm": norm, "eps": eps, "version": version})

    def run_standard_evaluation(self, x, y, bs=250):
        xx = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(self.model(xx), y), xx)
        step = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return (x + self.eps * step).clamp(0, 1).detach()


@pytest.fixture
def stand_in(monkeypatch):
    _FGM.calls.clear()
    monkeypatch.setitem(sys.modules, "autoattack", types.SimpleNamespace(AutoAttack=_FGM))
    return _FGM


def test_verdict_counts_certified_points_broken_within_eps() -> None:
    t, f = True, False
    ok = aao.verdict(torch.tensor([t, t, f]), torch.tensor([t, t, f]), torch.tensor([t, t, t]))
    assert ok["passed"] and ok["robust_accuracy"] == ok["certified_accuracy"] == 2 / 3
    bad = aao.verdict(torch.tensor([t, t, f]), torch.tensor([t, f, t]), torch.tensor([t, t, t]))
    assert not bad["passed"] and bad["counterexamples"] == [1]
    # an example beyond eps is no success: listed, and its point counts as robust
    far = aao.verdict(torch.tensor([t, t]), torch.tensor([t, f]), torch.tensor([t, f]))
    assert far["passed"] and far["beyond_eps"] == [1] and far["counterexamples"] == []


def test_skips_clearly_without_autoattack(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "autoattack", None)  # import fails
    assert aao.main(["--n", "2"]) == 3
    assert "not importable: skipped" in capsys.readouterr().err


def test_passes_on_the_default_through_the_fast_module(stand_in, tmp_path, capsys) -> None:
    out = tmp_path / "aa.json"
    threads = torch.get_num_threads()
    assert aao.main(["--n", "8", "--json", str(out), "--quiet"]) == 0
    assert torch.get_num_threads() == threads  # restored
    res = json.loads(out.read_text())
    assert res["passed"] and res["robust_accuracy"] >= res["certified_accuracy"] > 0
    assert res["max_l2"] <= 36 / 255 * (1 + 1e-6) and res["fast_and_model_agree"]
    (call,) = stand_in.calls
    assert isinstance(call["model"], lipverify.FastModule)
    assert (call["norm"], call["version"], call["eps"]) == ("L2", "standard", 36 / 255)
    assert "PASSED" in capsys.readouterr().out


def test_fails_when_a_certified_point_is_broken(stand_in, monkeypatch, tmp_path) -> None:
    """A false claim (every radius 100) and a large eps: the attack breaks certified points."""
    real = lipverify.certify

    def inflated(model, x, **kw):
        cert = real(model, x, **kw)
        cert.radius = torch.full_like(cert.radius, 100.0)
        return cert

    monkeypatch.setattr(lipverify, "certify", inflated)
    out = tmp_path / "aa.json"
    assert aao.main(["--n", "8", "--eps", "20", "--json", str(out), "--quiet"]) == 1
    res = json.loads(out.read_text())
    assert res["counterexamples"] and res["robust_accuracy"] < res["certified_accuracy"] == 1.0


def test_bad_options_exit_2(capsys) -> None:
    for argv in (["--eps", "-1"], ["--n", "0"], ["--eps", "x/255"]):
        with pytest.raises(SystemExit) as e:
            aao.main(argv)
        assert e.value.code == 2


@pytest.mark.slow
def test_bench_fast_quick(tmp_path) -> None:
    out = tmp_path / "bench_fast.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_fast.py"), "--quick", "--json",
                           str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["model"] for r in rows] == ["default", "LipConvNet-5 init 4"]
    for row in rows:
        assert set(row["variants"]) == {"model", "fast", "fast_eval"}
        assert row["ratio_to_model"]["model"] == 1.0 and row["ratio_to_model"]["fast"] > 0
        assert row["fast_bytes"] > 0 and row["fast_probe_error"] <= 1e-5


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("autoattack") is None,
                    reason="the original autoattack package is not installed")
def test_original_autoattack_on_two_points() -> None:
    res = aao.run(n=2, verbose=False)
    assert res["passed"], res
