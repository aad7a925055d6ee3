"""Reliability and security (issue 7): untrusted checkpoints, hostile inputs, atomic outputs,
kill -9 + resume of an audit, determinism, concurrent audits, the internal-error path.

Every test here fails when the guarantee it names is removed. Subprocess tests run
``python -m lipverify`` with one thread each; the audit runs use a tiny BCOP LipConvNet (fast
in eval mode: its orthogonal weights are cached) on the built-in ``synthetic`` data.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import lipverify
from lipverify.atomic import atomic_write, atomic_write_text
from lipverify.audits import audit
from lipverify.audits.report import AuditReport
from lipverify.audits.runner import ATTACK_CHUNK
from lipverify.checkpoints import (
    content_sha256,
    load_checkpoint,
    load_model,
    read_checkpoint,
    safe_torch_load,
)
from lipverify.cli import main
from lipverify.errors import CheckpointError, InputError
from lipverify.models import LipConvNet

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
CMD = [sys.executable, "-m", "lipverify"]
TINY_ARCH = dict(conv="bcop", init_channels=2, num_classes=4, activation="maxmin",
                 last_layer="lln")
REF_CONFIG = {"conv": "soc", "activation": "maxmin", "lln": True, "block_size": 1,
              "num_layers": 5, "init_channels": 2, "num_classes": 4, "input_side": 32,
              "cifar_mean": [0.5, 0.5, 0.5], "cifar_std": [0.25, 0.25, 0.25]}


def _tiny_model(**kw) -> LipConvNet:
    torch.manual_seed(0)
    return LipConvNet(**{**TINY_ARCH, **kw}).eval()


def _reference_state() -> dict:
    torch.manual_seed(0)
    m = LipConvNet(conv="soc", activation="maxmin", init_channels=2, num_classes=4,
                   last_layer="lln")
    return {k: v for k, v in m.state_dict().items() if not k.startswith("normalize.")}


def _one_line_error(err: str, prefix: str) -> str:
    """The whole of stderr is one line starting with ``prefix``; no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix) and "Traceback" not in err, err
    return lines[0]


def _code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse errors
        return int(e.code or 0)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("rel")
    lipverify.save_checkpoint(_tiny_model(), d / "tiny.pt", dataset={"name": "synthetic"})
    return d


# -- safe loading: a hostile pickle runs nothing -----------------------------------------------
class _Evil:
    """Unpickling this object calls ``open(target, "w")``: it creates ``target``."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def _write_evil(path: Path, target: Path, kind: str = "zip") -> Path:
    obj = {"state_dict": {"w": torch.zeros(2)}, "config": {}, "payload": _Evil(target)}
    if kind == "zip":
        torch.save(obj, path)
    else:  # a bare pickle (legacy format), protocol 2 or 4
        path.write_bytes(pickle.dumps(obj, protocol=int(kind[-1])))
    return path


def test_the_hostile_pickle_really_creates_a_file_when_unpickled_unsafely(tmp_path) -> None:
    # The positive control: the payload works, so "no file" below means "nothing ran".
    target = tmp_path / "pwned"
    evil = _write_evil(tmp_path / "evil.pt", target)
    assert not target.exists()
    obj = torch.load(evil, weights_only=False)
    obj["payload"].close()
    assert target.exists()


@pytest.mark.parametrize("kind", ["zip", "legacy2", "legacy4"])
@pytest.mark.parametrize("loader", [load_checkpoint, load_model, lipverify.load_soc_reference,
                                    read_checkpoint, safe_torch_load])
def test_hostile_pickle_through_the_api_runs_nothing(tmp_path, loader, kind: str) -> None:
    target = tmp_path / "pwned"
    evil = _write_evil(tmp_path / "evil.pt", target, kind)
    with pytest.raises(CheckpointError) as e:
        loader(evil)
    msg = str(e.value)
    assert "\n" not in msg and "nothing in it was executed" in msg and "evil.pt" in msg
    if kind == "zip":  # torch's unpickler names the callable it refused
        assert "arbitrary unpickling (it calls io.open)" in msg
    assert not target.exists()


def test_hostile_pickle_through_every_cli_command_runs_nothing(work, tmp_path) -> None:
    """Subprocesses of certify, audit, replay --checkpoint and train --resume on a hostile
    pickle: exit 2, one line on stderr, no traceback, and no file created."""
    cases: dict[str, list[str]] = {}

    def evil(name: str) -> Path:
        return _write_evil(tmp_path / f"{name}.pt", tmp_path / f"pwned-{name}")

    cases["certify"] = ["certify", str(evil("certify")), "--dataset", "synthetic"]
    cases["audit"] = ["audit", str(evil("audit")), "--dataset", "synthetic",
                      "--out", str(tmp_path / "a1")]
    rep = tmp_path / "rep"
    rep.mkdir()
    (rep / "report.json").write_text(json.dumps(
        {"provenance": {"model_source": {"checkpoint": str(work / "tiny.pt")}},
         "tolerance": 1e-3}))
    cases["replay"] = ["replay", str(rep), "--checkpoint", str(evil("replay"))]
    run = tmp_path / "run"
    run.mkdir()
    _write_evil(run / "last.pt", tmp_path / "pwned-train")
    cases["train"] = ["train", "--dataset", "synthetic", "--out", str(run), "--resume",
                      "--device", "cpu"]
    procs = {name: subprocess.Popen(CMD + argv, env=ENV, cwd=tmp_path, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, argv in cases.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 2, (name, err)
        line = _one_line_error(err, f"lipverify {name}: error:")
        assert "arbitrary unpickling" in line and "nothing in it was executed" in line, line
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("pwned")) == []


def test_hostile_violation_and_audit_state_files_run_nothing(work, tmp_path, capsys) -> None:
    """The other files the CLI reads back: a replayed violation record and a resumed audit's
    saved attack chunk."""
    rep = tmp_path / "rep"
    (rep / "violations").mkdir(parents=True)
    (rep / "report.json").write_text(json.dumps(
        {"provenance": {"model_source": {"checkpoint": str(work / "tiny.pt")}},
         "tolerance": 1e-3}))
    _write_evil(rep / "violations" / "0000.pt", tmp_path / "pwned-violation")
    state = tmp_path / "a2" / ".state"
    state.mkdir(parents=True)
    _write_evil(state / "attacks-00000.pt", tmp_path / "pwned-state")
    for argv in (["replay", str(rep)],
                 ["audit", str(work / "tiny.pt"), "--dataset", "synthetic", "--n", "2",
                  "--checks", "attacks", "--out", str(state.parent), "--resume", "--quiet"]):
        assert main(argv) == 2
        line = _one_line_error(capsys.readouterr().err, f"lipverify {argv[0]}: error:")
        assert "arbitrary unpickling" in line, line
    assert not (tmp_path / "pwned-violation").exists() and not (tmp_path / "pwned-state").exists()
    # a well-formed pickle that is not ours is refused by structure
    torch.save({"rows": "[]"}, state / "attacks-00000.pt")
    assert main(argv) == 2
    assert "not a lipverify audit state file" in capsys.readouterr().err
    torch.save({"x": "not a tensor", "x_adv": 1, "radius": 0.1, "pred": 0, "index": 0},
               rep / "violations" / "0000.pt")
    assert main(["replay", str(rep)]) == 2
    assert "not a lipverify violation record" in capsys.readouterr().err


def test_every_torch_load_in_the_package_is_weights_only() -> None:
    """Static guard: every ``torch.load`` call passes ``weights_only=True``; no pickle.load."""
    import ast

    root = Path(lipverify.__file__).resolve().parents[1]
    files = [p for d in ("lipverify", "audits", "attacks") for p in (root / d).rglob("*.py")]
    assert len(files) > 10
    calls = 0
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value
            name = owner.id if isinstance(owner, ast.Name) else None
            if name == "torch" and node.func.attr == "load":
                calls += 1
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw[
                    "weights_only"].value is True
                assert ok, f"{path}:{node.lineno}: torch.load without weights_only=True"
            assert not (name == "pickle" and node.func.attr in ("load", "loads", "Unpickler")), (
                f"{path}:{node.lineno}: pickle.{node.func.attr}")
    assert calls >= 2


# -- corrupt, mismatched, non-finite checkpoints -----------------------------------------------
def _resigned(payload: dict, path: Path) -> Path:
    """Save ``payload`` with a valid checksum (a crafted, not a damaged, file)."""
    payload["sha256"] = content_sha256(payload)
    torch.save(payload, path)
    return path


def _make_bad(kind: str, d: Path) -> Path:
    good = lipverify.save_checkpoint(_tiny_model(), d / "good.pt")
    raw = good.read_bytes()
    path = d / f"{kind}.pt"
    payload = torch.load(good, weights_only=True)
    if kind == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("these are not the weights you are looking for\n")
    elif kind == "flipped":
        w = _tiny_model().last_layer.weight.detach().numpy().tobytes()
        at = raw.find(w[:32])
        assert at > 0
        data = bytearray(raw)
        data[at + 9] ^= 0x04
        path.write_bytes(bytes(data))
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "arch-mismatch":
        payload["architecture"]["init_channels"] = 4
        _resigned(payload, path)
    elif kind == "shape-mismatch":
        payload["state_dict"]["last_layer.bias"] = torch.zeros(5)
        payload["architecture"]["num_classes"] = 5
        payload["state_dict"]["last_layer.weight"] = torch.zeros(5, 3)
        _resigned(payload, path)
    elif kind == "nan":
        m = _tiny_model()
        with torch.no_grad():
            m.last_layer.weight[1, 2] = float("nan")
        lipverify.save_checkpoint(m, path)
    elif kind == "inf":
        payload["state_dict"]["layer2.0.conv.bias"][0] = float("inf")
        _resigned(payload, path)
    elif kind == "negative-std":
        payload["state_dict"]["normalize.std"] = -payload["state_dict"]["normalize.std"]
        _resigned(payload, path)
    elif kind == "ref-arch-mismatch":
        torch.save({"state_dict": _reference_state(), "config": {**REF_CONFIG,
                                                                 "init_channels": 4}}, path)
    elif kind == "ref-shape-mismatch":
        state = _reference_state()
        state["layer3.0.conv.bias"] = torch.zeros(3)
        torch.save({"state_dict": state, "config": REF_CONFIG}, path)
    elif kind == "ref-inf":
        state = _reference_state()
        state["last_layer.weight"][0, 0] = float("-inf")
        torch.save({"state_dict": state, "config": REF_CONFIG}, path)
    elif kind == "ref-bad-config":
        torch.save({"state_dict": _reference_state(),
                    "config": {**REF_CONFIG, "cifar_mean": "not numbers"}}, path)
    else:
        raise AssertionError(kind)
    return path


BAD_FILES = {  # kind -> what the message must name
    "truncated": r"truncated, corrupt or not a checkpoint",
    "empty": r"truncated, corrupt or not a checkpoint",
    "text": r"corrupt or not a checkpoint",
    "flipped": r"checksum mismatch",
    "tensor": r"not a (reference )?checkpoint",
    "arch-mismatch": r"architecture mismatch, it says init_channels = 4 but the weights imply 2",
    "shape-mismatch": r"architecture mismatch at 'last_layer.weight'",
    "nan": r"'last_layer.weight' holds NaN or Inf weights",
    "inf": r"'layer2.0.conv.bias' holds NaN or Inf weights",
    "negative-std": r"std must be positive",
    "ref-arch-mismatch": r"architecture mismatch, it says init_channels = 4",
    "ref-shape-mismatch": r"architecture mismatch at 'layer3.0.conv.bias'",
    "ref-inf": r"'last_layer.weight' holds NaN or Inf weights",
    "ref-bad-config": r"unusable reference checkpoint \(ValueError",
}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    return {kind: _make_bad(kind, d) for kind in BAD_FILES}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_checkpoint_is_refused_by_the_api_with_a_named_problem(bad_files, kind) -> None:
    path = bad_files[kind]
    loaders = [load_model] + ([] if kind.startswith("ref-") else [load_checkpoint])
    for loader in loaders:
        with pytest.raises(CheckpointError, match=BAD_FILES[kind]) as e:
            loader(path)
        assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


@pytest.mark.parametrize("kind", list(BAD_FILES))
@pytest.mark.parametrize("command", ["certify", "audit"])
def test_bad_checkpoint_is_refused_by_the_cli(bad_files, tmp_path, capsys, kind, command):
    argv = [command, str(bad_files[kind]), "--dataset", "synthetic"]
    if command == "audit":
        argv += ["--out", str(tmp_path / "out")]
    assert main(argv) == 2
    line = _one_line_error(capsys.readouterr().err, f"lipverify {command}: error:")
    assert re.search(BAD_FILES[kind], line), line


def test_a_huge_architecture_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    """A flipped bit in a config (init_channels 2 -> 130) must not make us build a network
    with 130 channels (seconds to minutes, gigabytes) before noticing the mismatch."""
    path = tmp_path / "ref.pt"
    torch.save({"state_dict": _reference_state(), "config": {**REF_CONFIG,
                                                             "init_channels": 130}}, path)
    good = torch.load(lipverify.save_checkpoint(_tiny_model(), tmp_path / "g.pt"),
                      weights_only=True)
    built: list[dict] = []
    init = LipConvNet.__init__

    @functools.wraps(init)
    def spy(self, *args, **kwargs):
        built.append(kwargs)
        init(self, *args, **kwargs)

    monkeypatch.setattr(LipConvNet, "__init__", spy)
    with pytest.raises(CheckpointError, match="init_channels = 130 but the weights imply 2"):
        load_model(path)
    for arch, msg in (({"init_channels": 10**9}, "init_channels = 1000000000"),
                      ({"num_layers": 40}, "num_layers = 40 but the weights imply 5"),
                      ({"input_size": -32}, "input_size = -32")):
        crafted = {**good, "architecture": {**good["architecture"], **arch}}
        with pytest.raises(CheckpointError, match=msg):
            load_checkpoint(_resigned(crafted, tmp_path / "c.pt"))
    assert built == [], "a model was constructed from a mismatched architecture"
    load_checkpoint(tmp_path / "g.pt")  # the spy sees real constructions
    assert len(built) == 1


# -- hostile inputs: the APIs ------------------------------------------------------------------
def _x(n: int = 4, c: int = 3, s: int = 32) -> torch.Tensor:
    return torch.rand(n, c, s, s, generator=torch.Generator().manual_seed(1))


def _poke(x: torch.Tensor, value: float) -> torch.Tensor:
    x = x.clone()
    x[1, 2, 3, 4] = value
    return x


HOSTILE_IMAGES = {
    "nan": (lambda: _poke(_x(), float("nan")), r"NaN or Inf pixels"),
    "inf": (lambda: _poke(_x(), float("inf")), r"NaN or Inf pixels"),
    "negative": (lambda: _poke(_x(), -0.01), r"pixels must lie in \[0, 1\]"),
    "above-one": (lambda: _poke(_x(), 1.5), r"pixels must lie in \[0, 1\]"),
    "normalized": (lambda: (_x() - 0.5) / 0.25, r"pixels must lie in \[0, 1\]"),
    "uint8": (lambda: (_x() * 255).to(torch.uint8), r"floating point"),
    "one-channel": (lambda: _x(c=1), r"takes 3 channels, the images have 1"),
    "four-channels": (lambda: _x(c=4), r"takes 3 channels, the images have 4"),
    "16px": (lambda: _x(s=16), r"takes 32x32 images, got 16x16"),
    "64px": (lambda: _x(s=64), r"takes 32x32 images, got 64x64"),
    "empty": (lambda: _x(n=0), r"empty"),
    "3-d": (lambda: _x()[0], r"4-D"),
}

@pytest.mark.parametrize("name", list(HOSTILE_IMAGES))
@pytest.mark.parametrize("api", ["certify", "audit"])
def test_hostile_images_get_a_clear_error_from_the_apis(api: str, name: str) -> None:
    make, msg = HOSTILE_IMAGES[name]
    model = _tiny_model()
    with pytest.raises(InputError, match=msg):
        if api == "certify":
            lipverify.certify(model, make())
        else:
            audit(model, make(), checks=("attacks",))


@pytest.mark.parametrize("kwargs,msg", [
    ({"y": torch.tensor([0, 1, 2, 4])}, r"labels must lie in \[0, 4\)"),
    ({"y": torch.tensor([0, -1, 2, 3])}, r"labels must lie in \[0, 4\)"),
    ({"y": torch.tensor([0.0, 1.0, 2.0, 3.0])}, r"labels must be integers"),
    ({"y": torch.tensor([0, 1, 2])}, r"labels must have shape \(4,\)"),
    ({"radii": [-0.1]}, r"radius must be finite and non-negative"),
    ({"radii": [float("nan")]}, r"radius must be finite and non-negative"),
    ({"radii": ["wide"]}, r"radius 'wide' is not a number"),
    ({"tolerance": float("nan")}, r"tolerance must be a number"),
    ({"tolerance": "small"}, r"tolerance must be a number"),
    ({"seed": "zero"}, r"seed must be an integer"),
    ({"seed": 2**70}, r"seed must be an integer"),
    ({"lipschitz": "one"}, r"lipschitz must be a number"),
    ({"lipschitz": float("nan")}, r"Lipschitz bound must be positive and finite"),
    ({"lipschitz": -1.0}, r"Lipschitz bound must be positive and finite"),
    ({"attacks": "strongest"}, r"unknown attack suite"),
    ({"checks": ("attacks", "vibes")}, r"unknown checks"),
])
def test_audit_api_refuses_bad_labels_and_options(kwargs: dict, msg: str) -> None:
    kwargs = {"checks": ("attacks",), **kwargs}
    with pytest.raises(InputError, match=msg):
        audit(_tiny_model(), _x(), **kwargs)


@pytest.mark.parametrize("y,radii,msg", [
    (torch.tensor([0, 1, 2, 9]), [0.1], r"labels must lie in \[0, 4\)"),
    (torch.tensor([0, 1, 2, 3]), [-1.0], r"radius must be finite and non-negative"),
    (torch.tensor([0, 1, 2, 3]), [float("nan")], r"radius must be finite and non-negative"),
    (torch.tensor([0, 1, 2, 3]), ["x"], r"is not a number"),
])
def test_certified_accuracy_api_refuses_bad_labels_and_radii(y, radii, msg) -> None:
    with pytest.raises(InputError, match=msg):
        lipverify.certified_accuracy(_tiny_model(), _x(), y, radii)


# -- hostile inputs: the CLI -------------------------------------------------------------------
def _image_folder(root: Path, classes: int, size: int, empty_test: bool = False) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            if split == "test" and empty_test:
                continue
            for i in range(2):
                pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folders(work) -> dict[str, Path]:
    lipverify.save_checkpoint(_tiny_model(in_channels=1, mean=(0.5,), std=(0.25,)),
                              work / "gray.pt")
    return {"small": _image_folder(work / "small", 4, 16),
            "five": _image_folder(work / "five", 5, 32),
            "empty": _image_folder(work / "empty", 4, 32, empty_test=True),
            "rgb": _image_folder(work / "rgb", 4, 32)}


CLI_BAD_INPUT = [
    # (command line with {ckpt}/{gray}/{dir:NAME}/{tmp} placeholders, expected message)
    ("{cmd} {ckpt} --dataset imagefolder --data-dir {dir:small}", r"takes 32x32 images, got 16x16"),
    ("{cmd} {gray} --dataset imagefolder --data-dir {dir:rgb}", r"takes 1 channels, the images"),
    ("{cmd} {ckpt} --dataset imagefolder --data-dir {dir:five}", r"5 classes, the model (only )?4"),
    ("{cmd} {ckpt} --dataset imagefolder --data-dir {dir:empty}", r"test: no images"),
    ("{cmd} {ckpt} --dataset imagefolder", r"imagefolder needs --data-dir"),
    ("{cmd} {ckpt} --dataset imagefolder --data-dir {tmp}/nowhere", r"no such directory"),
    ("{cmd} {ckpt} --dataset nonsense", r"invalid choice|unknown dataset"),
    ("{cmd} {ckpt} --dataset synthetic --n abc", r"--n: 'abc' is not an integer"),
    ("{cmd} {ckpt} --dataset synthetic --n 0", r"--n: .*(positive|>= 1)"),
    ("{cmd} {tmp}/missing.pt --dataset synthetic", r"no such checkpoint file"),
    ("certify {ckpt} --dataset synthetic --radii abc", r"radius 'abc' is not a number"),
    ("certify {ckpt} --dataset synthetic --radii -1", r"radius '-1' must be finite and >= 0"),
    ("certify {ckpt} --dataset synthetic --radii nan", r"radius 'nan' must be finite and >= 0"),
    ("certify {ckpt} --dataset synthetic --radii 1/0", r"radius '1/0' is not a number"),
    ("certify {ckpt} --dataset synthetic --batch-size many", r"'many' is not an integer"),
    ("certify {ckpt} --dataset synthetic --n 4 --json {tmp}", r"cannot write .*directory"),
    ("audit {ckpt} --dataset synthetic --seed abc", r"--seed: 'abc' is not an integer"),
    ("audit {ckpt} --dataset synthetic --seed 100000000000000000000", r"--seed: must lie in"),
    ("audit {ckpt} --dataset synthetic --tolerance x", r"--tolerance: 'x' is not a number"),
    ("audit {ckpt} --dataset synthetic --tolerance nan", r"--tolerance: must be finite"),
    ("audit {ckpt} --dataset synthetic --tolerance 2", r"tolerance must be"),
    ("audit {ckpt} --dataset synthetic --lipschitz inf", r"--lipschitz: must be finite"),
    ("audit {ckpt} --dataset synthetic --lipschitz -1", r"bound must be positive"),
    ("audit {ckpt} --dataset synthetic --lipschitz -1 --out {tmp}/o", r"bound must be positive"),
    ("audit {ckpt} --dataset synthetic --checks attacks,vibes", r"--checks takes"),
    ("audit {ckpt} --dataset synthetic --attacks strongest", r"invalid choice"),
    ("audit {ckpt} --dataset synthetic --device foo", r"--device 'foo' is not a torch device"),
    ("audit {ckpt} --dataset synthetic --device cuda:99", r"--device 'cuda:99' is not available"),
    ("audit {ckpt} --dataset synthetic --out {ckpt}", r"exists and is not a directory"),
    ("audit {ckpt} --dataset synthetic --resume", r"--resume needs the --out"),
    ("audit --model nowhere:build --lipschitz 1 --dataset synthetic", r"cannot import nowhere"),
    ("audit --model os --lipschitz 1 --dataset synthetic", r"--model takes MODULE:FACTORY"),
    ("replay {tmp}", r"has no report.json"),
]


def _argv(template: str, command: str, work: Path, folders: dict, tmp: Path) -> list[str]:
    out = []
    for tok in template.split():
        tok = tok.replace("{cmd}", command).replace("{ckpt}", str(work / "tiny.pt"))
        tok = tok.replace("{gray}", str(work / "gray.pt")).replace("{tmp}", str(tmp))
        m = re.fullmatch(r"\{dir:(\w+)\}", tok)
        out.append(str(folders[m.group(1)]) if m else tok)
    return out


@pytest.mark.parametrize("template,msg", CLI_BAD_INPUT,
                         ids=[f"{i}" for i in range(len(CLI_BAD_INPUT))])
def test_cli_bad_input_exits_2_with_one_clear_line(work, folders, tmp_path, capsys, monkeypatch,
                                                   template: str, msg: str) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIPVERIFY_CACHE_DIR", str(tmp_path / "cache"))
    commands = ["certify", "audit"] if "{cmd}" in template else [None]
    for command in commands:
        argv = _argv(template, command or "", work, folders, tmp_path)
        assert _code(argv) == 2, argv
        err = capsys.readouterr().err
        line = _one_line_error(err, "lipverify")
        assert re.search(msg, line), (argv, line)
    # refused before any work: no empty report folder is left behind
    assert not (tmp_path / "audits").exists() or not any((tmp_path / "audits").iterdir())
    assert not (tmp_path / "o").exists()


def test_certify_cli_bad_device_exits_2(work, capsys) -> None:
    code = _code(["certify", str(work / "tiny.pt"), "--dataset", "synthetic", "--n", "2",
                  "--device", "foo"])
    assert code == 2
    _one_line_error(capsys.readouterr().err, "lipverify certify: error:")


@pytest.mark.parametrize("option", [["--seed", str(10**20)], ["--init-channels", "100000"]])
def test_train_cli_out_of_range_numbers_exit_2(tmp_path, capsys, option) -> None:
    code = _code(["train", "--dataset", "synthetic", "--epochs", "1", "--limit-train", "8",
                  "--limit-test", "8", "--device", "cpu", "--out", str(tmp_path / "r"), *option])
    err = capsys.readouterr().err
    assert code == 2
    _one_line_error(err, "lipverify")


def test_error_messages_cannot_break_the_line_or_inject_terminal_escapes(capsys) -> None:
    hostile = "evil\nlipverify: a forged second line\x1b[2J\r.pt"
    assert main(["certify", hostile, "--dataset", "synthetic"]) == 2
    err = capsys.readouterr().err
    line = _one_line_error(err, "lipverify certify: error:")
    assert "\x1b" not in err and "\r" not in err and "no such checkpoint file" in line
    assert "evil lipverify: a forged second line\\x1b[2J .pt" in line


# -- atomic outputs ----------------------------------------------------------------------------
class _CrashingFile:
    """Writes half of the first chunk it is given, then raises (a crash mid-write)."""

    def __init__(self, f) -> None:
        self._f = f

    def write(self, data) -> int:
        data = bytes(data)
        self._f.write(data[: max(1, len(data) // 2)])
        self._f.flush()
        raise OSError(28, "No space left on device (injected)")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


@pytest.fixture
def crash_on(monkeypatch):
    """``crash_on("report.json", skip=0)``: after ``skip`` good ones, the next write of that
    file name through :mod:`lipverify.atomic` dies midway. The file is recognised by the path
    behind the descriptor (its temporary ``.NAME.*.tmp`` or NAME itself), so a non-atomic
    writer would be caught leaving half a file."""
    import lipverify.atomic as atomic_mod

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the file behind a descriptor")
    targets: list[list] = []
    real_fdopen = os.fdopen

    class _Os:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def fdopen(fd, *args, **kwargs):
            name = Path(os.readlink(f"/proc/self/fd/{fd}")).name
            f = real_fdopen(fd, *args, **kwargs)
            for t in targets:
                if name == t[0] or name.startswith(f".{t[0]}."):
                    t[1] -= 1
                    if t[1] < 0:
                        targets.remove(t)
                        return _CrashingFile(f)
            return f

    monkeypatch.setattr(atomic_mod, "os", _Os())
    return lambda name, skip=0: targets.append([name, skip])


def _no_temporaries(d: Path) -> None:
    assert not [p for p in d.rglob(".*.tmp")], list(d.rglob(".*.tmp"))


def test_atomic_write_crash_keeps_the_previous_file(tmp_path, crash_on) -> None:
    path = tmp_path / "f.bin"
    atomic_write(path, lambda f: f.write(b"old version"))
    crash_on("f.bin")
    with pytest.raises(OSError, match="injected"):
        atomic_write(path, lambda f: f.write(b"new version, much longer" * 100))
    assert path.read_bytes() == b"old version"
    _no_temporaries(tmp_path)
    crash_on("g.bin")
    with pytest.raises(OSError, match="injected"):
        atomic_write_text(tmp_path / "g.bin", "first version")
    assert not (tmp_path / "g.bin").exists()
    _no_temporaries(tmp_path)


def test_atomic_write_gives_ordinary_permissions(tmp_path) -> None:
    mask = os.umask(0o022)
    os.umask(mask)
    new = atomic_write_text(tmp_path / "new.txt", "x")
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~mask  # not mkstemp's private 0o600
    kept = tmp_path / "kept.txt"
    kept.write_text("a")
    kept.chmod(0o640)
    atomic_write_text(kept, "b")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and kept.read_text() == "b"


def test_checkpoint_write_crash_keeps_the_previous_checkpoint(tmp_path, crash_on) -> None:
    old = _tiny_model()
    path = lipverify.save_checkpoint(old, tmp_path / "m.pt", epoch=1)
    other = _tiny_model(activation="maxmin")
    with torch.no_grad():
        other.last_layer.weight.mul_(2)
    crash_on("m.pt")
    with pytest.raises(OSError, match="injected"):
        lipverify.save_checkpoint(other, path, epoch=2)
    loaded = load_checkpoint(path)
    x = _x()
    assert loaded.metadata == {"epoch": 1} and torch.equal(loaded(x), old(x))
    _no_temporaries(tmp_path)


def _report(verdict: str) -> AuditReport:
    return AuditReport(
        verdict=verdict, reasons=[f"{verdict} because"], violations=[], lipschitz_claim=4.0,
        lipschitz_lower=3.0, lipschitz_upper=4.0, layers=[],
        certified_accuracy={"clean_accuracy": 0.5, "certified_accuracy": {"0.141176": 0.25}},
        provenance={"seed": 0}, tolerance=1e-3,
    )


@pytest.mark.parametrize("victim", ["report.json", "report.md", "report.html"])
def test_report_write_crash_leaves_complete_files(tmp_path, crash_on, victim: str) -> None:
    _report("sound").save(tmp_path)
    before = {f: (tmp_path / f).read_bytes() for f in ("report.json", "report.md", "report.html")}
    crash_on(victim)
    with pytest.raises(OSError, match="injected"):
        _report("unsound").save(tmp_path)
    assert (tmp_path / victim).read_bytes() == before[victim]  # the old file, whole
    assert json.loads((tmp_path / "report.json").read_text())["verdict"] in ("sound", "unsound")
    _no_temporaries(tmp_path)


def test_metrics_write_crash_keeps_the_previous_metrics(tmp_path, crash_on) -> None:
    from lipverify.train import train

    out = tmp_path / "run"
    cfg = dict(dataset="synthetic", init_channels=2, limit_train=16, limit_test=8,
               batch_size=16, epochs=2, out=str(out), device="cpu")

    def epochs() -> list[int]:
        return [json.loads(r)["epoch"] for r in (out / "metrics.jsonl").read_text().splitlines()]

    crash_on("metrics.jsonl", skip=1)  # epoch 2's metrics write dies midway
    with pytest.raises(OSError, match="injected"):
        train(cfg)
    assert epochs() == [1]  # the previous version, complete
    _no_temporaries(out)
    crash_on("curves.png")  # the resumed run finishes; its final plot dies midway
    with pytest.raises(OSError, match="injected"):
        train({**cfg, "resume": True})
    assert epochs() == [1, 2] and read_checkpoint(out / "last.pt")["extra"]["epoch"] == 2
    assert not (out / "curves.png").exists()  # no partial file under the final name
    _no_temporaries(out)


# -- kill -9 + resume, concurrency and determinism of audits (subprocesses) --------------------
N_AUDIT = ATTACK_CHUNK + 8  # two chunks: the kill falls between them
AUDIT_ARGS = ["--dataset", "synthetic", "--n", str(N_AUDIT), "--checks", "attacks",
              "--lipschitz", "1", "--seed", "3", "--quiet"]  # L = 1 overstates the radii


def _report_json(d: Path) -> dict:
    doc = json.loads((d / "report.json").read_text())
    for key in list(doc["provenance"]):  # wall-clock times, and the command line itself
        if key.endswith("seconds") or key == "command":
            doc["provenance"].pop(key)
    return doc


def _violations(d: Path) -> list[dict]:
    return [torch.load(f, weights_only=True) for f in sorted((d / "violations").glob("*.pt"))]


def _same_records(a: list[dict], b: list[dict]) -> bool:
    if len(a) != len(b):
        return False
    for ra, rb in zip(a, b, strict=True):
        if ra.keys() != rb.keys():
            return False
        for k in ra:
            va, vb = ra[k], rb[k]
            if isinstance(va, torch.Tensor) and not torch.equal(va, vb):
                return False
            if not isinstance(va, torch.Tensor) and va != vb:
                return False
    return True


@pytest.fixture(scope="module")
def audit_runs(work, tmp_path_factory) -> dict:
    """Three audits started together in one folder: A and B with default output dirs, C into
    ``cut`` and killed with SIGKILL once its first chunk is saved; then C resumes."""
    cwd = tmp_path_factory.mktemp("audits")
    ckpt = str(work / "tiny.pt")
    cut = cwd / "cut"

    def start(*extra: str) -> subprocess.Popen:
        return subprocess.Popen(CMD + ["audit", ckpt, *AUDIT_ARGS, *extra], env=ENV, cwd=cwd,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    a, b, c = start(), start(), start("--out", str(cut))
    first, second = cut / ".state" / "attacks-00000.pt", cut / ".state" / "attacks-00001.pt"
    deadline = time.time() + 300
    while time.time() < deadline and c.poll() is None and not first.exists():
        time.sleep(0.01)
    alive, had_second = c.poll() is None, second.exists()
    c.send_signal(signal.SIGKILL)
    c.wait()
    killed_report = (cut / "report.json").exists()
    saved = first.stat() if first.exists() else None
    codes = [a.wait(timeout=300), b.wait(timeout=300)]
    errs = [a.stderr.read(), b.stderr.read()]
    resumed = subprocess.run(CMD + ["audit", ckpt, *AUDIT_ARGS, "--out", str(cut), "--resume"],
                             env=ENV, cwd=cwd, capture_output=True, text=True, timeout=300)
    after = first.stat()
    reused = saved is not None and (saved.st_ino, saved.st_mtime_ns) == (after.st_ino,
                                                                          after.st_mtime_ns)
    return {"cwd": cwd, "cut": cut, "alive": alive, "had_second": had_second,
            "first": saved is not None, "killed_report": killed_report, "codes": codes,
            "errs": errs, "resumed": resumed, "reused": reused}


def test_concurrent_audits_in_default_dirs_do_not_interfere(audit_runs) -> None:
    r = audit_runs
    assert r["codes"] == [1, 1], r["errs"]  # both finished: unsound (the radii are overstated)
    dirs = sorted(p for p in (r["cwd"] / "audits").iterdir())
    assert len(dirs) == 2 and dirs[0] != dirs[1]  # default output dirs are always new
    assert all(p.name.startswith("tiny-") for p in dirs)
    ra, rb = (_report_json(d) for d in dirs)
    assert ra["verdict"] == "unsound" and ra["violations"]
    assert ra == rb  # same seed, same machine: the same report, field for field
    assert _same_records(_violations(dirs[0]), _violations(dirs[1]))
    assert len(_violations(dirs[0])) == len(ra["violations"])


def test_kill_9_then_resume_equals_the_uninterrupted_audit(audit_runs) -> None:
    r = audit_runs
    assert r["alive"] and r["first"] and not r["had_second"], "not killed between chunks"
    assert not r["killed_report"]  # the killed run wrote no report
    assert r["reused"], "the resumed audit recomputed the chunk saved before the kill"
    res = r["resumed"]
    assert res.returncode == 1, res.stderr
    reference = sorted((r["cwd"] / "audits").iterdir())[0]
    resumed = _report_json(r["cut"])
    assert resumed == _report_json(reference)
    assert _same_records(_violations(r["cut"]), _violations(reference))
    assert resumed["provenance"]["n_points"] == N_AUDIT
    assert resumed["attacks"]["n_attacked"] == N_AUDIT


def test_explicit_out_with_results_is_refused_unless_overwrite(audit_runs, work, tmp_path,
                                                               capsys) -> None:
    out = tmp_path / "copy"
    shutil.copytree(audit_runs["cut"], out)
    before = (out / "report.json").read_bytes()
    base = ["audit", str(work / "tiny.pt"), "--dataset", "synthetic", "--checks", "attacks",
            "--quiet", "--out", str(out)]
    assert main(base + ["--n", "2"]) == 2
    assert "already holds results" in _one_line_error(capsys.readouterr().err, "lipverify audit")
    assert (out / "report.json").read_bytes() == before
    # a resume whose settings differ from the saved state is refused too
    same = base + ["--n", str(N_AUDIT), "--lipschitz", "1", "--resume"]
    assert main(same + ["--seed", "4"]) == 2
    assert "different audit" in _one_line_error(capsys.readouterr().err, "lipverify audit")
    # resuming a finished audit redoes no attack, gives the same report, and removes the
    # temporary files of writes that a kill cut short
    stale = [out / ".report.json.x1.tmp", out / ".state" / ".attacks-00001.pt.x2.tmp"]
    for f in stale:
        f.write_bytes(b"half a fi")
    assert main(same + ["--seed", "3"]) == 1
    capsys.readouterr()
    assert _report_json(out) == _report_json(audit_runs["cut"])
    assert not any(f.exists() for f in stale)
    assert main(base + ["--n", "2", "--overwrite"]) in (0, 3)
    capsys.readouterr()
    doc = json.loads((out / "report.json").read_text())
    assert doc["provenance"]["n_points"] == 2 and doc["violations"] == []
    assert not (out / "violations").exists() or not any((out / "violations").iterdir())


# -- determinism: train and certify ------------------------------------------------------------
def test_train_twice_gives_identical_weights_and_metrics(tmp_path) -> None:
    from lipverify.train import train

    cfg = dict(dataset="synthetic", init_channels=2, limit_train=32, limit_test=16,
               batch_size=16, epochs=1, seed=7, augment="crop-flip", device="cpu")
    a, b = (train({**cfg, "out": str(tmp_path / n)}) for n in ("a", "b"))
    sa, sb = (read_checkpoint(r.last_path)["state_dict"] for r in (a, b))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    strip = [{k: v for k, v in m.items() if k != "seconds"} for m in a.metrics]
    assert strip == [{k: v for k, v in m.items() if k != "seconds"} for m in b.metrics]


def test_certify_twice_gives_identical_json(work, tmp_path, capsys) -> None:
    outs = [tmp_path / "a.json", tmp_path / "b.json"]
    for out in outs:
        assert main(["certify", str(work / "tiny.pt"), "--dataset", "synthetic", "--n", "64",
                     "--json", str(out), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert len(json.loads(outs[0].read_text())["samples"]) == 64


# -- the internal-error path -------------------------------------------------------------------
def test_internal_error_exits_4_with_one_line_and_a_traceback_log(tmp_path, capsys,
                                                                  monkeypatch) -> None:
    (tmp_path / "rel_boom_factory.py").write_text(
        "def build():\n    raise RuntimeError('factory exploded\\nsecond line')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code = main(["audit", "--model", "rel_boom_factory:build", "--lipschitz", "1",
                 "--dataset", "synthetic"])
    assert code == 4
    line = _one_line_error(capsys.readouterr().err, "lipverify audit: internal error:")
    m = re.fullmatch(r".*RuntimeError: factory exploded \(traceback in (\S+)\)", line)
    assert m, line
    log = Path(m.group(1)).read_text()
    assert "Traceback (most recent call last)" in log and "rel_boom_factory.py" in log
    assert "factory exploded" in log


def test_parse_error_output_is_one_line(capsys) -> None:
    for argv in (["nonsense"], ["audit", "--n"], ["certify", "--radii"], ["train"]):
        assert _code(argv) == 2
        _one_line_error(capsys.readouterr().err, "lipverify: error:")
