"""Training: recipe pieces, files written, determinism, kill -9 + resume, torchrun, CIFAR JPEGs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from lipverify.certificates import radii_from_logits
from lipverify.checkpoints import load_checkpoint, read_checkpoint
from lipverify.errors import InputError
from lipverify.layers import LLN
from lipverify.models import LipConvNet
from lipverify.train import (
    RESULT_FILES,
    label_certificates,
    lr_at,
    lr_milestone_steps,
    parameter_groups,
    resolve_config,
    train,
    training_loss,
)

METRIC_KEYS = {"epoch", "lr", "seconds", "train_loss", "train_acc", "test_acc", "cert_acc_36",
               "cert_acc_72", "cert_acc_108"}
TINY = dict(dataset="synthetic", init_channels=2, limit_train=64, limit_test=32, batch_size=16)
# Subprocesses: one thread each, so float results do not depend on the thread count.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TINY_ARGS = ["--dataset", "synthetic", "--init-channels", "2", "--limit-test", "32",
             "--device", "cpu"]


def _state(path: Path) -> dict:
    return read_checkpoint(path)["state_dict"]


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


# -- recipe pieces -----------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["hh1", "hh2", "maxmin"])
@pytest.mark.parametrize("last_layer", ["lln", "ortho"])
def test_weight_decay_excludes_activation_angles(activation: str, last_layer: str) -> None:
    model = LipConvNet(activation=activation, init_channels=4, last_layer=last_layer)
    groups = parameter_groups(model, 5e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    by_decay = {g["weight_decay"]: [names[id(p)] for p in g["params"]] for g in groups}
    assert sum(len(v) for v in by_decay.values()) == len(names)
    angles = by_decay.get(0.0, [])
    assert all(n.rsplit(".", 1)[-1] in ("theta", "theta0", "theta1", "theta2") for n in angles)
    expected = {"hh1": 5, "hh2": 15, "maxmin": 0}[activation]
    assert len(angles) == expected
    assert all("activation" not in n for n in by_decay[5e-4])
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == sorted(by_decay)


@pytest.mark.parametrize("total", [4, 10, 391 * 200])
def test_lr_drops_tenfold_at_half_and_three_quarters(total: int) -> None:
    m1, m2 = lr_milestone_steps(total, (0.5, 0.75))
    assert (m1, m2) == (total // 2, (3 * total) // 4)
    lrs = [lr_at(s, 0.1, total) for s in range(total)]
    assert all(lr == pytest.approx(0.1) for lr in lrs[:m1])
    assert all(lr == pytest.approx(0.01) for lr in lrs[m1:m2])
    assert all(lr == pytest.approx(0.001) for lr in lrs[m2:])


@pytest.mark.parametrize("kind", ["ortho", "lln"])
@pytest.mark.parametrize("batch,classes", [(8, 10), (5, 3)])
def test_label_certificates_match_library_and_have_finite_gradients(kind, batch, classes):
    torch.manual_seed(1)
    layer = LLN(12, classes)
    with torch.no_grad():  # two identical rows: the 0/0 case
        layer.weight[1] = layer.weight[0]
    logits = layer(torch.randn(batch, 12))
    y = torch.randint(0, classes, (batch,))
    w = layer.normalized_weight()
    ours = label_certificates(logits, y, 3.0, kind, w if kind == "lln" else None)
    ref = radii_from_logits(logits, 3.0, kind, w if kind == "lln" else None, target=y)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert ours.shape == (batch,)
    torch.nn.functional.relu(ours).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_certificate_regularization_sign(gamma: float) -> None:
    torch.manual_seed(0)
    model = LipConvNet(init_channels=4, num_classes=4, last_layer="lln").train()
    x = torch.rand(6, 3, 32, 32)
    logits = model(x)
    y = logits.argmax(1).clone()
    y[:2] = (y[:2] + 1) % 4  # two misclassified samples
    loss, cert = training_loss(model, logits, y, gamma)
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    if gamma == 0:
        torch.testing.assert_close(loss, ce)
        return
    assert (cert[:2] < 0).all() and (cert[2:] > 0).all()
    torch.testing.assert_close(loss, ce - gamma * cert.clamp_min(0))
    torch.testing.assert_close(loss[:2], ce[:2])  # no CR reward for wrong predictions
    assert (loss[2:] < ce[2:]).all()  # the CR term lowers the loss of certified samples
    # Gradient descent on the CR term raises the certificates.
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(-torch.relu(cert).sum(), params, retain_graph=True)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p -= 1e-3 * g
    w = model.last_layer.normalized_weight()
    after = label_certificates(model(x), y, model.lipschitz_claim, "lln", w)
    assert after[2:].sum() > cert[2:].sum()


def test_resolve_config_defaults_and_validation() -> None:
    d = resolve_config({"dataset": "digits"})
    assert (d.init_channels, d.num_layers, d.last_layer, d.activation, d.conv) == (
        8, 5, "lln", "hh1", "soc")
    c = resolve_config({"dataset": "cifar10"})
    assert (c.epochs, c.batch_size, c.lr, c.momentum, c.weight_decay) == (200, 128, 0.1, 0.9,
                                                                          5e-4)
    assert c.lr_milestones == (0.5, 0.75) and c.gamma == 0.0 and c.init_channels == 32
    for bad in ({"epochs": 0}, {"lr": float("nan")}, {"val_split": 1.5}, {"resume": True},
                {"dataset": "mnist"}, {"bogus": 1}, {"std": (0.0,)}):
        with pytest.raises(InputError):
            resolve_config({"dataset": "synthetic", **bad})


# -- a run through the API ---------------------------------------------------------------------
def test_train_writes_files_and_checkpoints(tmp_path) -> None:
    res = train({**TINY, "epochs": 2, "out": str(tmp_path / "run"), "gamma": 0.1})
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir()) == sorted(RESULT_FILES)
    rows = _metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2] and all(METRIC_KEYS <= r.keys() for r in rows)
    assert all(0 <= r[k] <= 1 for r in rows for k in METRIC_KEYS - {"epoch", "lr", "seconds",
                                                                      "train_loss"})
    assert rows[0]["lr"] == pytest.approx(0.1) and rows[1]["lr"] == pytest.approx(0.001)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("best.pt", "last.pt"):
        model = load_checkpoint(out / name)
        assert not model.training and model.config["num_classes"] == 4
        meta = model.metadata
        assert meta["config"]["gamma"] == 0.1 and meta["seed"] == 0
        assert _without_seconds(meta["metrics"])[: len(meta["metrics"])] == _without_seconds(
            rows[: len(meta["metrics"])])
        assert meta["command_equivalent"].startswith("lipverify train --dataset synthetic")
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 4)
    best = load_checkpoint(out / "best.pt").metadata
    assert best["epoch"] == res.best_epoch
    assert rows[res.best_epoch - 1]["cert_acc_36"] == max(r["cert_acc_36"] for r in rows)
    extra = read_checkpoint(out / "last.pt")["extra"]
    assert {"optimizer", "step", "rng", "soc_total_iters", "metrics"} <= extra.keys()
    assert extra["step"] == 2 * 4
    assert res.metrics == rows and res.model.config == model.config


def test_same_seed_same_weights_and_different_seed_differs(tmp_path) -> None:
    runs = [train({**TINY, "epochs": 1, "out": str(tmp_path / f"r{i}"), "seed": s,
                   "augment": "crop-flip"})
            for i, s in enumerate((5, 5, 6))]
    a, b, c = (_state(r.last_path) for r in runs)
    _assert_same_weights(a, b)
    assert _without_seconds(runs[0].metrics) == _without_seconds(runs[1].metrics)
    assert not torch.equal(a["last_layer.weight"], c["last_layer.weight"])
    # --amp is a GPU feature: on CPU the run is the float32 run.
    amp = train({**TINY, "epochs": 1, "out": str(tmp_path / "amp"), "seed": 5,
                 "augment": "crop-flip", "amp": True, "device": "cpu"})
    _assert_same_weights(a, _state(amp.last_path))


def test_out_dir_rules(tmp_path, monkeypatch) -> None:
    out = tmp_path / "run"
    train({**TINY, "epochs": 1, "limit_train": 16, "out": str(out)})
    with pytest.raises(InputError, match="already holds results"):
        train({**TINY, "epochs": 1, "limit_train": 16, "out": str(out)})
    res = train({**TINY, "epochs": 1, "limit_train": 16, "out": str(out), "overwrite": True})
    assert len(_metrics(out / "metrics.jsonl")) == 1 and res.out_dir == out
    with pytest.raises(InputError, match="--resume continues the saved config"):
        train({**TINY, "epochs": 1, "limit_train": 16, "out": str(out), "resume": True,
               "lr": 0.5})
    monkeypatch.chdir(tmp_path)
    r1 = train({**TINY, "epochs": 1, "limit_train": 16})
    r2 = train({**TINY, "epochs": 1, "limit_train": 16})
    assert r1.out_dir != r2.out_dir and r1.out_dir.parent == Path("runs")
    assert r1.out_dir.name.startswith("synthetic-")


def test_val_split_selects_on_validation(tmp_path) -> None:
    res = train({**TINY, "epochs": 2, "val_split": 0.25, "out": str(tmp_path / "v")})
    rows = res.metrics
    assert all({"val_acc", "val_cert_acc_36"} <= r.keys() for r in rows)
    scores = [r["val_cert_acc_36"] for r in rows]
    assert res.best_epoch == max(i + 1 for i, s in enumerate(scores) if s == max(scores))
    meta = load_checkpoint(res.best_path).metadata
    assert meta["dataset"]["selection_split"] == "val" and meta["dataset"]["train_size"] == 48


def test_resume_without_checkpoint_starts_fresh_and_resume_when_done(tmp_path) -> None:
    a = train({**TINY, "epochs": 1, "out": str(tmp_path / "a")})
    b = train({**TINY, "epochs": 1, "out": str(tmp_path / "b"), "resume": True})
    _assert_same_weights(_state(a.last_path), _state(b.last_path))
    c = train({**TINY, "out": str(tmp_path / "b"), "resume": True})  # finished: no new epoch
    assert _without_seconds(c.metrics) == _without_seconds(b.metrics)


def test_cli_errors_exit_2(capsys) -> None:
    from lipverify.cli import main

    for argv in (["train", "--dataset", "nope"],
                 ["train", "--dataset", "synthetic", "--epochs", "zero"],
                 ["train", "--dataset", "synthetic", "--lr", "nan"],
                 ["train", "--dataset", "synthetic", "--resume"]):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        assert code == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "error" in err


# -- subprocesses: kill -9 + resume, torchrun --------------------------------------------------
def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lipverify", "train", *args]


def test_kill_9_mid_epoch_then_resume_equals_uninterrupted(tmp_path) -> None:
    args = [*TINY_ARGS, "--epochs", "4", "--limit-train", "256", "--batch-size", "16",
            "--gamma", "0.05", "--augment", "crop-flip", "--seed", "3"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = subprocess.Popen(_cli(*args, "--out", str(cut)), env=ENV, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ref = subprocess.Popen(_cli(*args, "--out", str(full)), env=ENV, cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = cut / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.01)
    time.sleep(0.05)  # into epoch 2
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(_metrics(metrics))
    assert 1 <= done < 4  # killed after epoch 1 and before the end
    assert read_checkpoint(cut / "last.pt")["extra"]["epoch"] == done  # loadable, not corrupt
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    res = subprocess.run(_cli(*args, "--out", str(cut), "--resume"), env=ENV, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    for name in ("last.pt", "best.pt"):
        _assert_same_weights(_state(full / name), _state(cut / name))
    assert _without_seconds(_metrics(cut / "metrics.jsonl")) == _without_seconds(
        _metrics(full / "metrics.jsonl"))
    meta = read_checkpoint(cut / "last.pt")["metadata"]
    assert meta["argv"][-2:] == ["--out", str(cut)] and meta["resumed_by"][0][-1] == "--resume"
    assert meta["command"].startswith("lipverify train --dataset synthetic")
    assert not list(cut.glob(".*.tmp"))  # the resume removed any write cut short by the kill


def test_torchrun_two_ranks_match_single_process(tmp_path) -> None:
    # 65 images in batches of 16: the last batch has one image, so rank 1 gets none.
    args = [*TINY_ARGS, "--epochs", "1", "--limit-train", "65", "--batch-size", "16",
            "--no-shuffle", "--augment", "none", "--gamma", "0.1"]
    single = subprocess.run(_cli(*args, "--out", str(tmp_path / "one")), env=ENV,
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "lipverify", "train", *args, "--out", str(tmp_path / "two")],
        env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-6000:]
    one, two = _metrics(tmp_path / "one" / "metrics.jsonl"), _metrics(
        tmp_path / "two" / "metrics.jsonl")
    assert two[0]["train_loss"] == pytest.approx(one[0]["train_loss"], abs=1e-5)
    assert two[0]["train_acc"] == one[0]["train_acc"]
    _assert_same_weights(_state(tmp_path / "one" / "last.pt"),
                         _state(tmp_path / "two" / "last.pt"), atol=1e-5)
    assert "world_size\": 2" in ddp.stdout and ddp.stdout.count("effective config") == 1


# -- real images -------------------------------------------------------------------------------
def _extract_cifar_subset(archive: Path, dest: Path, train_per_class: int, test_per_class: int):
    """Copy the first JPEGs of each class of the mirror's ``test/`` folder (the archive's
    first sixth, so the stream stops early) into ``dest/train`` and ``dest/test``."""
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if parts[0] == "train":
                break
            if not member.isfile() or len(parts) != 3:
                continue
            cls = parts[1]
            seen = sum(v for (_, c), v in counts.items() if c == cls)
            if seen >= train_per_class + test_per_class:
                continue
            split = "train" if seen < train_per_class else "test"
            counts[(split, cls)] = counts.get((split, cls), 0) + 1
            target = dest / split / cls / parts[2]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    return counts


def test_one_epoch_on_cifar10_jpegs(tmp_path, shared) -> None:
    archive = shared("datasets", "cifar10-jpg.tar.gz")
    data = tmp_path / "cifar"
    counts = _extract_cifar_subset(archive, data, train_per_class=30, test_per_class=10)
    assert len(counts) == 20 and sum(counts.values()) == 400
    res = train({"dataset": "imagefolder", "data_dir": str(data), "init_channels": 8,
                 "epochs": 1, "batch_size": 64, "out": str(tmp_path / "run"),
                 "cache_dir": str(tmp_path / "cache")})
    row = res.metrics[0]
    assert METRIC_KEYS <= row.keys() and math.isfinite(row["train_loss"])
    assert res.model.config["init_channels"] == 8 and res.model.config["num_classes"] == 10
    meta = load_checkpoint(res.last_path).metadata
    assert meta["dataset"]["classes"][0] == "airplane" and meta["dataset"]["augment"] == (
        "crop-flip")
    assert list((tmp_path / "cache").glob("imagefolder-train-*.pt"))
    # Decoding in two worker processes gives the same pixels as the cached in-process decode.
    from lipverify.data import load_raw

    x1, y1, _ = load_raw("imagefolder", "train", data_dir=data, cache_dir=tmp_path / "cache")
    x2, y2, _ = load_raw("imagefolder", "train", data_dir=data, cache_dir=tmp_path / "c2",
                         workers=2)
    assert x1.shape == (300, 3, 32, 32) and torch.equal(x1, x2) and torch.equal(y1, y2)
    # certify finds the dataset and its folder in the checkpoint's metadata.
    from lipverify.cli import main

    out = tmp_path / "cert.json"
    assert main(["certify", str(res.best_path), "--cache-dir", str(tmp_path / "cache"),
                 "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["dataset"] == "imagefolder" and doc["n"] == 100
    assert doc["clean_accuracy"] == pytest.approx(res.metrics[0]["test_acc"])
    assert doc["certified_accuracy"]["%.6f" % (36 / 255)] == pytest.approx(
        res.metrics[0]["cert_acc_36"])
