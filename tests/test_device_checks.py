"""The logic of the gpu tests (tests/device_checks.py), run CPU against CPU.

The same checks that compare CUDA with the CPU in tests/test_gpu.py run here with the CPU on
both sides (identical results), or against a float64 reference (a small, non-zero error that
a tight tolerance must reject), so their comparison code is tested without a GPU.
"""

from __future__ import annotations

import pytest
import torch
from device_checks import (
    CONVS,
    TOL,
    Comparison,
    amp_check,
    compare_audit,
    compare_certify,
    compare_forward_backward,
    compare_runs,
    group_error,
    ieee_float32,
    lipconvnet,
    precision_flags,
    run_training,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these small models gain nothing from two, and lose much when the
    machine is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_ieee_float32_sets_and_restores_the_precision_flags() -> None:
    before = precision_flags()
    with ieee_float32() as inside:
        assert precision_flags() == inside
        if inside["api"] == "fp32_precision":
            assert inside["cudnn.conv"] == inside["cuda.matmul"] == "ieee"
        else:
            assert inside["cudnn"] is False and inside["cuda.matmul"] is False
    assert precision_flags() == before
    with pytest.raises(RuntimeError), ieee_float32():
        raise RuntimeError("restored on the way out")
    assert precision_flags() == before


def test_group_error_is_absolute_below_one_and_relative_above() -> None:
    ref = torch.tensor([0.5, -0.25], dtype=torch.float64)
    assert group_error(ref + 1e-6, ref) == pytest.approx(1e-6, rel=1e-3)
    big = torch.tensor([1000.0, 1.0], dtype=torch.float64)
    assert group_error(big + torch.tensor([1e-2, 0.0]), big) == pytest.approx(1e-5, rel=1e-3)
    with pytest.raises(ValueError):
        group_error(ref, big[:1])


@pytest.mark.parametrize("conv", CONVS)
def test_forward_backward_check_cpu_against_cpu(conv: str) -> None:
    model = lipconvnet(conv)
    for train in (False, True):
        same = compare_forward_backward(model, train, "cpu")
        assert same.ok and max(same.errors.values()) == 0.0, same
    # against a float64 reference: float32 rounding is seen, and a tight tolerance rejects it
    f64 = compare_forward_backward(model, True, "cpu", ref_dtype=torch.float64)
    assert 0.0 < max(f64.errors.values()) < 1e-4, f64
    assert not Comparison(f64.errors, tol=1e-9).ok


def test_certify_check_on_the_default_cpu_against_cpu() -> None:
    import lipverify

    model, (x, _) = lipverify.load_default()
    cert = compare_certify(model, x[:64], "cpu")
    assert cert.ok and max(cert.errors.values()) == 0.0 and cert.info["pred_mismatches"] == 0


@pytest.mark.slow  # two audits: ~30 s on a 2-core machine
def test_audit_check_on_the_default_cpu_against_cpu() -> None:
    import lipverify

    model, (x, y) = lipverify.load_default()
    rep = compare_audit(model, x[:4], y[:4], "cpu", checks=("lipschitz", "attacks"))
    assert rep.ok, rep
    assert rep.info["verdict"] == rep.info["ref_verdict"] == "sound"
    assert rep.info["pred_mismatches"] == 0 and rep.info["violations"] == (0, 0)
    assert set(rep.errors) == {"radius", "upper"} and rep.errors["upper"] <= TOL


@pytest.mark.slow
def test_amp_check_falls_back_to_float32_on_cpu(tmp_path) -> None:
    res = amp_check(tmp_path, "cpu")
    assert not res["scaler"] and res["finite"]
    assert res["weights_error"] == 0.0 and res["train_loss"][0] == res["train_loss"][1]
    assert "--amp needs a GPU" in res["log"]


@pytest.mark.slow
def test_two_rank_check_cpu_gloo_against_one_process(tmp_path) -> None:
    one = run_training(tmp_path / "one", "cpu")
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_training(tmp_path / "two", "cpu", nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    cmp = compare_runs(tmp_path / "two", tmp_path / "one")
    assert cmp.ok and cmp.info["train_acc"][0] == cmp.info["train_acc"][1], cmp
    # a different seed is caught
    other = run_training(tmp_path / "seed1", "cpu", extra=("--seed", "1"))
    assert other.returncode == 0, other.stderr[-3000:]
    assert not compare_runs(tmp_path / "seed1", tmp_path / "one").ok
