"""``lipverify audit`` end to end on a reference-format checkpoint from ``../shared/compat``
with ``--dataset imagefolder`` on (a slice of) the CIFAR-10 JPEG mirror: it exits 0 and writes
every report file."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

# test/<class>/NNNN.jpg with NNNN < 3 and train/<class>/0000.jpg: 30 test and 10 train images
_WANTED = re.compile(r"^(test/[a-z]+/000[0-2]|train/[a-z]+/0000)\.jpg$")


@pytest.fixture
def mirror_slice(shared, tmp_path) -> Path:
    """Regular files copied byte for byte out of the tarball (no extraction of paths)."""
    tarball = shared("datasets", "cifar10-jpg.tar.gz")
    root = tmp_path / "cifar10-slice"
    with tarfile.open(tarball, "r|gz") as tar:
        for member in tar:
            if member.isfile() and _WANTED.match(member.name):
                dest = root / member.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(tar.extractfile(member).read())
    assert len(list(root.glob("test/*/*.jpg"))) == 30
    return root


def test_audit_reference_checkpoint_on_imagefolder(shared, mirror_slice, tmp_path):
    ckpt = shared("compat", "soc-lipconvnet5-hh1-lln-c10.pt")
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "lipverify", "audit", str(ckpt), "--dataset", "imagefolder",
         "--data-dir", str(mirror_slice), "--cache-dir", str(tmp_path / "cache"), "--n", "20",
         "--lipschitz-points", "2", "--quiet", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-1500:]
    assert "verdict: SOUND" in proc.stdout
    for name in ("report.json", "report.md", "report.html"):
        assert (out / name).stat().st_size > 0
    assert (out / "violations").is_dir()
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "sound" and report["violations"] == []
    prov = report["provenance"]
    assert prov["dataset"] == "imagefolder" and prov["n_points"] == 20
    assert prov["lipschitz_points"] == 2
    assert prov["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert report["lipschitz_lower"] <= report["lipschitz_upper"]
    assert "<img" in (out / "report.html").read_text()
