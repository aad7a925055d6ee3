"""``lipverify certify``: table, JSON content, radius parsing, bad input, hostile files."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from lipverify.certificates import certify
from lipverify.certify_cmd import certify_dataset, format_table, parse_radius
from lipverify.checkpoints import load_model, save_checkpoint
from lipverify.cli import main
from lipverify.data import load_dataset
from lipverify.errors import InputError
from lipverify.models import LipConvNet

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def tiny_ckpt(tmp_path):
    torch.manual_seed(0)
    model = LipConvNet(init_channels=2, num_classes=4, last_layer="lln", activation="hh1",
                       mean=(0.5,) * 3, std=(0.25,) * 3)
    with torch.no_grad():  # a model that is right on some samples: bias towards class 0
        model.last_layer.bias.copy_(torch.tensor([0.3, 0.0, 0.0, 0.0]))
    path = tmp_path / "tiny.pt"
    save_checkpoint(model.eval(), path, dataset={"name": "synthetic"})
    return path


def _check_json(doc: dict, model, x, y, radii) -> None:
    n = x.shape[0]
    assert doc["n"] == n and len(doc["samples"]) == n
    assert [s["index"] for s in doc["samples"]] == list(range(n))
    assert [s["label"] for s in doc["samples"]] == y.tolist()
    ref = certify(model, x)
    assert [s["pred"] for s in doc["samples"]] == ref.pred.tolist()
    torch.testing.assert_close(torch.tensor([s["radius"] for s in doc["samples"]]),
                               ref.radius, rtol=1e-4, atol=1e-6)
    correct = [s["pred"] == s["label"] for s in doc["samples"]]
    assert doc["clean_accuracy"] == pytest.approx(sum(correct) / n)
    assert sorted(doc["certified_accuracy"]) == sorted("%.6f" % r for r in radii)
    for r in radii:
        frac = sum(c and s["radius"] > r for c, s in zip(correct, doc["samples"], strict=True))
        assert doc["certified_accuracy"]["%.6f" % r] == pytest.approx(frac / n)
    assert all(s["radius"] >= 0 for s in doc["samples"])


def test_certify_cli_in_process_json(tiny_ckpt, tmp_path, capsys) -> None:
    out = tmp_path / "c.json"
    code = main(["certify", str(tiny_ckpt), "--n", "40", "--json", str(out), "--radii",
                 "36/255", "0.25", "1/10"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "clean (r = 0)" in printed and "36/255 (0.141176)" in printed
    doc = json.loads(out.read_text())
    assert doc["dataset"] == "synthetic" and doc["split"] == "test"
    x, y, _ = load_dataset("synthetic", "test")
    _check_json(doc, load_model(tiny_ckpt), x[:40], y[:40], [36 / 255, 0.25, 0.1])
    assert 0 < doc["clean_accuracy"] < 1  # the table is not trivially 0 or 1


def test_certify_cli_subprocess_default_radii(tiny_ckpt, tmp_path) -> None:
    out = tmp_path / "c.json"
    res = subprocess.run(
        [sys.executable, "-m", "lipverify", "certify", str(tiny_ckpt), "--dataset", "synthetic",
         "--n", "24", "--json", str(out)],
        env=ENV, capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    for label in ("36/255", "72/255", "108/255"):
        assert label in res.stdout
    doc = json.loads(out.read_text())
    x, y, _ = load_dataset("synthetic", "test")
    _check_json(doc, load_model(tiny_ckpt), x[:24], y[:24], [36 / 255, 72 / 255, 108 / 255])
    bad = subprocess.run(
        [sys.executable, "-m", "lipverify", "certify", str(tiny_ckpt), "--radii", "abc"],
        env=ENV, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "abc" in bad.stderr and not out.with_name("x").exists()


@pytest.mark.parametrize("text,value", [("36/255", 36 / 255), ("0.5", 0.5), ("0", 0.0),
                                        ("1e-3", 1e-3), (" 72 / 255 ", 72 / 255)])
def test_parse_radius_accepts(text: str, value: float) -> None:
    assert parse_radius(text) == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("text", ["abc", "-1", "nan", "inf", "1/0", "-36/255", "", "1/2/3"])
def test_bad_radius_exits_2_with_one_line(text: str, tiny_ckpt, capsys) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_radius(text)
    with pytest.raises(SystemExit) as e:
        main(["certify", str(tiny_ckpt), f"--radii={text}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "radius" in err


@pytest.mark.parametrize("argv", [["--n", "0"], ["--n", "x"], ["--dataset", "mnist"]])
def test_bad_options_exit_2(argv, tiny_ckpt, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["certify", str(tiny_ckpt), *argv])
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_no_checkpoint_without_default_exits_2(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "lipverify.default", None)  # not importable
    assert main(["certify"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint given" in err and len(err.strip().splitlines()) == 1


def test_labels_out_of_range_and_wrong_images(tiny_ckpt, capsys) -> None:
    # digits has 10 classes, the model 4.
    assert main(["certify", str(tiny_ckpt), "--dataset", "digits", "--n", "5"]) == 2
    assert "classes" in capsys.readouterr().err
    model = load_model(tiny_ckpt)
    y = torch.zeros(2, dtype=torch.long)
    for x, match in ((torch.rand(2, 1, 32, 32), "channels"), (torch.rand(2, 3, 16, 16), "16"),
                     (torch.full((2, 3, 32, 32), 2.0), r"\[0, 1\]"),
                     (torch.full((2, 3, 32, 32), float("nan")), "NaN")):
        with pytest.raises(InputError, match=match):
            certify_dataset(model, x, y, [0.1])
    with pytest.raises(InputError, match="labels"):
        certify_dataset(model, torch.rand(2, 3, 32, 32), torch.tensor([0, 7]), [0.1])


def test_reference_checkpoint(shared, tmp_path) -> None:
    path = shared("compat", "soc-lipconvnet5-hh2-lln-c100.pt")
    out = tmp_path / "ref.json"
    assert main(["certify", str(path), "--dataset", "synthetic", "--n", "16", "--json",
                 str(out)]) == 0
    doc = json.loads(out.read_text())
    x, y, _ = load_dataset("synthetic", "test")
    model = load_model(path)
    _check_json(doc, model, x[:16], y[:16], [36 / 255, 72 / 255, 108 / 255])
    ref = torch.load(path, weights_only=True)
    table = certify_dataset(model, ref["inputs_pixels"], ref["labels_cifar10"], [0.0])
    assert [s["pred"] for s in table["samples"]] == ref["pred"].tolist()
    torch.testing.assert_close(torch.tensor([s["radius"] for s in table["samples"]]),
                               ref["certificates_pixel_space"].float().clamp_min(0),
                               rtol=1e-4, atol=1e-5)
    assert "clean (r = 0)" in format_table(table, [0.0])


class _Hostile:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_hostile_pickle_is_refused_and_runs_nothing(tmp_path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pt"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict": _Hostile(str(marker))}, f)
    torch.save({"x": _Hostile(str(marker))}, tmp_path / "bad2.pt")
    marker.unlink(missing_ok=True)  # torch.save above must not have left it either
    for path in (bad, tmp_path / "bad2.pt"):
        res = subprocess.run(
            [sys.executable, "-m", "lipverify", "certify", str(path), "--dataset", "synthetic"],
            env=ENV, capture_output=True, text=True, timeout=120,
        )
        assert res.returncode == 2, res.stderr
        # torch may warn about the pickle protocol first; the error itself is one line.
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("lipverify certify: error:") and "Traceback" not in res.stderr
        assert not marker.exists()
