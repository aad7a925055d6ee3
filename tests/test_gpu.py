"""CUDA against the CPU (marker ``gpu``; skipped without CUDA; ``benchmarks/gpu_check.sh`` runs
them on a device machine). The comparison logic lives in tests/device_checks.py and is itself
tested CPU against CPU in tests/test_device_checks.py.

Tolerance 1e-5 (see device_checks: ``max|a - b| / max(1, max|b|)`` per tensor group), in IEEE
float32: CUDA's default TF32 convolutions cannot meet it, so every comparison runs inside
``device_checks.ieee_float32``.

Two processes: ``lipverify train`` under torchrun binds rank r to ``cuda:r`` and uses nccl,
and NCCL refuses two ranks on one GPU ("Duplicate GPU detected"), so the two-rank check needs
two GPUs and is skipped, with that reason, on a one-GPU machine. (The same comparison runs on
the CPU with gloo in tests/test_device_checks.py and tests/test_train.py.)
"""

from __future__ import annotations

import pytest
import torch
from device_checks import (
    CONVS,
    amp_check,
    compare_audit,
    compare_certify,
    compare_forward_backward,
    compare_runs,
    lipconvnet,
    run_training,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("conv", CONVS)
def test_conv_family_matches_cpu(conv: str, train: bool) -> None:
    model = lipconvnet(conv, init_channels=8)
    cmp = compare_forward_backward(model, train, "cuda", n=8)
    assert cmp.ok, cmp


def test_amp_training_step_runs(tmp_path) -> None:
    res = amp_check(tmp_path, "cuda")
    assert res["scaler"], "no GradScaler state in last.pt: --amp did not run under autocast"
    assert res["finite"]
    # float16 autocast changes the rounding (non-zero), not the training (small)
    assert 0.0 < res["weights_error"] < 0.05, res


def test_certify_of_the_default_matches_cpu() -> None:
    import lipverify

    model, (x, _) = lipverify.load_default()
    cmp = compare_certify(model, x, "cuda")
    assert cmp.ok and cmp.info["pred_mismatches"] == 0, cmp


def test_quick_audit_of_the_default_matches_cpu() -> None:
    import lipverify

    model, (x, y) = lipverify.load_default()
    cmp = compare_audit(model, x[:8], y[:8], "cuda", attacks="quick")  # CPU side: ~10 s
    assert cmp.ok and cmp.info["pred_mismatches"] == 0, cmp
    assert cmp.info["verdict"] == cmp.info["ref_verdict"], cmp
    assert "upper" in cmp.errors, cmp


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="nccl needs one GPU per rank (NCCL refuses two ranks on one GPU); "
                           "this machine has fewer than 2")
def test_two_rank_nccl_training_matches_one_process(tmp_path) -> None:
    one = run_training(tmp_path / "one", "cuda")
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_training(tmp_path / "two", "cuda", nproc=2)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    cmp = compare_runs(tmp_path / "two", tmp_path / "one")
    assert cmp.ok and cmp.info["train_acc"][0] == cmp.info["train_acc"][1], cmp
