"""The built-in default model: shipped, loadable, documented, and reproducible by its command."""

from __future__ import annotations

import shlex

import torch

import lipverify
from lipverify.cli import main
from lipverify.default import default_checkpoint


def test_default_is_small_and_records_its_command() -> None:
    path = default_checkpoint()
    assert path.is_file() and path.stat().st_size <= 5 * 2**20
    model = lipverify.load_checkpoint(path)
    assert model.config["init_channels"] == 8
    meta = model.metadata
    assert meta["command"].startswith("lipverify train --dataset digits")
    assert meta["seed"] == 0 and meta["config"]["dataset"] == "digits"


def test_load_default_returns_eval_model_and_digits_test_split() -> None:
    model, (x, y) = lipverify.load_default()
    assert not model.training
    assert x.dtype == torch.float32 and x.dim() == 4 and x.shape[1:] == (3, 32, 32)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
    acc = lipverify.certified_accuracy(model, x, y, radii=[36 / 255])
    assert acc["clean_accuracy"] >= 0.95  # the measured 97.8% with room for float noise
    assert acc["certified_accuracy"]["%.6f" % (36 / 255)] >= 0.90


def test_recorded_command_still_runs_in_reduced_form(tmp_path) -> None:
    meta = lipverify.load_checkpoint(default_checkpoint()).metadata
    argv = shlex.split(meta["command_equivalent"])[1:]  # drop the program name
    assert argv[:3] == ["train", "--dataset", "digits"]
    reduced = ["--epochs", "1", "--limit-train", "64", "--limit-test", "32", "--device", "cpu",
               "--out", str(tmp_path / "run")]
    assert main(argv + reduced) == 0
    for name in ("last.pt", "best.pt", "metrics.jsonl", "curves.png"):
        assert (tmp_path / "run" / name).is_file()
    retrained = lipverify.load_checkpoint(tmp_path / "run" / "last.pt")
    assert retrained.config == lipverify.load_checkpoint(default_checkpoint()).config


def test_certify_without_checkpoint_prints_the_table(capsys) -> None:
    assert main(["certify", "--n", "50"]) == 0
    out = capsys.readouterr().out
    assert "clean" in out and "0.141176" in out
