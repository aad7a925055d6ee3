"""benchmarks/gpu_check.sh in its CPU mode, and the summary it writes (issue 17).

The script is meant for a CUDA machine; ``GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1`` runs every
step but the install on the CPU with small sizes, which is what these tests check: each step
runs under its limit, a failing step is recorded and the next one still runs, and
gpu_check.json holds the step table, the pytest outcome and each step's results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


def _run_script(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    wheels = tmp_path / "no-wheels"  # no carried data: synthetic images, said so
    wheels.mkdir()
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh")], cwd=tmp_path, text=True,
        capture_output=True, timeout=600,
        env={**os.environ, "OUT": str(out), "GPU_CHECK_INSTALL": "0",
             "GPU_CHECK_WHEELS": str(wheels), "OMP_NUM_THREADS": "2", **env})
    doc = json.loads((out / "gpu_check.json").read_text())
    return proc, doc


def test_summary_reads_the_step_table_and_the_pytest_log(tmp_path) -> None:
    steps = tmp_path / "steps.tsv"
    steps.write_text("install\tskipped\t0\t0\t0\npytest\tok\t0\t12.5\t150\n"
                     "bench5\ttimeout\t124\t60.2\t60\n")
    log = tmp_path / "pytest.log"
    log.write_text("ss.F\nSKIPPED [1] tests/test_gpu.py:44: needs CUDA\n"
                   "FAILED tests/test_gpu.py::test_x - AssertionError\n"
                   "1 failed, 1 passed, 2 skipped, 3 deselected in 1.0s\n")
    out = tmp_path / "gpu_check.json"
    gpu_check.main(["summary", "--steps", str(steps), "--out", str(out), "--device", "cpu",
                    "--pytest-log", str(log), "--bench-json", str(tmp_path / "absent_5.json")])
    doc = json.loads(out.read_text())
    assert [s["status"] for s in doc["steps"]] == ["skipped", "ok", "timeout"]
    assert doc["steps"][2]["rc"] == 124 and not doc["ok"]
    assert doc["pytest"]["counts"] == {"failed": 1, "passed": 1, "skipped": 2, "deselected": 3}
    assert doc["pytest"]["skip_reasons"] == ["tests/test_gpu.py:44: needs CUDA"]
    assert len(doc["pytest"]["failures"]) == 1 and "bench_soc_5" not in doc


@pytest.mark.slow  # the whole script on the CPU: ~1 minute on 2 cores
def test_gpu_check_quick_cpu_mode_writes_every_result(tmp_path) -> None:
    proc, doc = _run_script(tmp_path, GPU_CHECK_DEVICE="cpu", GPU_CHECK_QUICK="1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = {s["step"]: s["status"] for s in doc["steps"]}
    assert status == {"install": "skipped", "certify": "ok", "bench5": "ok",
                      "bench20": "skipped", "pytest": "ok"}
    assert doc["ok"] and doc["quick"] and doc["total_seconds"] < 300
    # the gpu tests were collected; without CUDA every one is skipped with its reason
    counts = doc["pytest"]["counts"]
    if not torch.cuda.is_available():
        assert counts.get("skipped", 0) >= 10 and "failed" not in counts
        assert any("needs CUDA" in r for r in doc["pytest"]["skip_reasons"])
    cert = doc["certify"]
    assert cert["synthetic"] and cert["data"].startswith("SYNTHETIC") and cert["n"] == 64
    for mode in ("ieee", "default"):
        timing = cert["modes"][mode]["certify_dataset"]
        assert timing["median_s"] > 0 and timing["images_per_s"] > 0
    assert cert["radius_error_default_vs_ieee"] == 0.0  # the CPU has no TF32
    rows = {r["workload"]: r for r in doc["bench_soc_5"]["results"]}
    assert set(rows) == {"eval", "attack", "train"}
    for row in rows.values():
        assert row["model"] == "LipConvNet-5" and "plain" in row["variants"]
        assert all(v > 0 for v in row["ratio"].values())
    assert doc["bench_soc_5"]["args"]["device"] == "cpu"
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert files <= {"gpu_check.json", "install.log", "pytest.log", "certify.log",
                     "certify.json", "bench_soc.log", "bench_soc_5.json", "bench_soc_20.json"}


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure path without CUDA")
def test_gpu_check_records_failing_steps_and_keeps_going(tmp_path) -> None:
    proc, doc = _run_script(tmp_path, GPU_CHECK_DEVICE="cuda", GPU_CHECK_QUICK="1")
    assert proc.returncode == 1
    status = {s["step"]: s["status"] for s in doc["steps"]}
    assert status["certify"] == status["bench5"] == "failed"
    assert status["pytest"] == "ok"  # it ran after the failures
    assert not doc["ok"] and "certify" not in doc


@pytest.mark.slow  # a venv and an offline editable install: ~1 minute on a busy 2-core machine
def test_gpu_check_install_step_works_offline(tmp_path) -> None:
    # the device's python has torch & co. but not lipverify: a venv over this environment's
    # packages, into which the install step puts lipverify with --no-index (no network used)
    venv = tmp_path / "venv"
    # (--without-pip: pip and setuptools come from this environment, as on the device, not
    # the venv's bundled old setuptools, which would need the `wheel` package)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    proc, doc = _run_script(tmp_path, GPU_CHECK_DEVICE="cpu", GPU_CHECK_STEPS="install",
                            GPU_CHECK_INSTALL="1", PYTHON=str(python))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = {s["step"]: s["status"] for s in doc["steps"]}
    assert status == {"install": "ok", "certify": "skipped", "bench5": "skipped",
                      "bench20": "skipped", "pytest": "skipped"}
    log = (tmp_path / "out" / "install.log").read_text()
    assert "Successfully installed lipverify" in log and "torchattacks 3.5.1" in log
    where = subprocess.run([str(python), "-c", "import lipverify; print(lipverify.__file__)"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert where.stdout.strip() == str(REPO / "lipverify" / "__init__.py")
