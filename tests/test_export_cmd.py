"""``lipverify export`` writes one frozen evaluation that audits as plain ops (issue 13)."""

from __future__ import annotations

import json

import torch
from torch import nn

from lipverify.checkpoints import load_model
from lipverify.cli import main


class PowerIterNet(nn.Module):
    """Normalises its weight by a power iteration that advances on every eval call."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.weight = nn.Parameter(torch.randn(4, 3 * 32 * 32, generator=gen))
        self.u = torch.ones(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            v = nn.functional.normalize(self.weight.T @ self.u, dim=0)
            self.u = nn.functional.normalize(self.weight @ v, dim=0)
        return x.flatten(1) @ (self.weight / (self.u @ self.weight @ v)).T


def build() -> nn.Module:
    return PowerIterNet().eval()


def test_export_writes_a_snapshot_that_loads_without_model_code_and_audits(tmp_path, capsys):
    out = tmp_path / "snap.pt2"
    assert main(["export", "--model", "test_export_cmd:build", "--input-shape", "3,32,32",
                 "--out", str(out)]) == 0
    assert out.exists() and not list(tmp_path.glob(".*.tmp"))
    loaded = load_model(out)
    x = torch.rand(5, 3, 32, 32)
    y = loaded(x)
    assert y.shape == (5, 4) and torch.isfinite(y).all()
    assert not any(type(m).__module__ == __name__ for m in loaded.modules())  # plain ops
    rep = tmp_path / "rep"
    code = main(["audit", str(out), "--lipschitz", "2.0", "--dataset", "synthetic", "--n", "4",
                 "--checks", "lipschitz", "--out", str(rep), "--quiet"])
    report = json.loads((rep / "report.json").read_text())
    upper, lower = report["lipschitz_upper"], report["lipschitz_lower"]
    assert code == 0 and report["verdict"] == "sound"
    assert upper is not None and 0.5 < lower <= upper <= 2.0


def test_export_refuses_bad_options_in_one_line(tmp_path, capsys):
    assert main(["export", "--model", "test_export_cmd:build", "--out",
                 str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ".pt2" in err
