"""The benchmark scripts run (``--quick``: tiny models, numbers meaningless) and write JSON
with one timing per variant and the ratio against the baseline measured in the same run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def run_bench(script: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{script}.json"
    proc = subprocess.run([sys.executable, str(BENCH / script), "--quick", "--json", str(out),
                           *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


def test_conv_families_side_by_side(tmp_path):
    data = run_bench("bench_conv_families.py", tmp_path)
    rows = {r["workload"]: r for r in data["results"]}
    assert set(rows) == {"eval", "train"}
    for row in rows.values():
        assert set(row["variants"]) == {"soc", "cayley", "bcop"}
        assert all(v["items_per_s"] > 0 and len(v["runs_s"]) >= 3
                   for v in row["variants"].values())
        assert row["ratio_to_soc"]["soc"] == 1.0


def test_soc_audit_workload(tmp_path):
    data = run_bench("bench_soc.py", tmp_path, "--workloads", "audit")
    (row,) = data["results"]
    assert row["workload"] == "audit" and row["suite"] == "quick"
    assert set(row["median_s"]) == {"plain", "lipverify"}
    # both variants attacked the same certified points and found no violation
    details = row["details"]
    assert details["plain"]["attacked"] == details["lipverify"]["attacked"] == row["points"]
    assert details["plain"]["violations"] == details["lipverify"]["violations"] == 0
    assert row["ratio"]["lipverify"] > 0
