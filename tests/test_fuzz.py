"""Hypothesis fuzzing (issue 7): the CLI argument handling and the checkpoint loader.

Runs at the fixed profile from ``tests/conftest.py`` (``ci``: derandomized, no deadline); only
the number of examples is set here, per test, to keep the file fast.

* CLI: random argument lists give exit status 0 or 2 (never an exception or a traceback), and
  an error is exactly one line on stderr. First with every command stubbed (the parser alone),
  then running ``certify`` and ``audit`` for real on a tiny model (the audit's attack and bound
  stages are left out, so only the command-line handling is fuzzed).
* Loader, our format: random bytes, truncations, bit flips and overwritten runs of bytes of a
  real checkpoint are always detected (:class:`CheckpointError`) unless the model that loads
  computes exactly the original logits.
* Loader, reference format: a clean :class:`CheckpointError` or a working model, nothing else.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import lipverify
from lipverify.checkpoints import load_checkpoint, load_model
from lipverify.cli import COMMANDS, build_parser, main
from lipverify.errors import CheckpointError
from lipverify.models import LipConvNet

TINY_ARCH = dict(conv="bcop", init_channels=2, num_classes=4, activation="maxmin",
                 last_layer="lln")
REF_CONFIG = {"conv": "soc", "activation": "hh1", "lln": True, "block_size": 1,
              "num_layers": 5, "init_channels": 2, "num_classes": 4, "input_side": 32,
              "cifar_mean": [0.5, 0.5, 0.5], "cifar_std": [0.25, 0.25, 0.25]}


class _Evil:
    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    ours = lipverify.save_checkpoint(LipConvNet(**TINY_ARCH).eval(), d / "tiny.pt")
    torch.manual_seed(0)
    ref = LipConvNet(conv="soc", activation="hh1", init_channels=2, num_classes=4,
                     last_layer="lln")
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("normalize.")}
    torch.save({"state_dict": state, "config": REF_CONFIG}, d / "ref.pt")
    torch.save({"state_dict": {}, "payload": _Evil(d / "pwned")}, d / "evil.pt")
    (d / "truncated.pt").write_bytes(ours.read_bytes()[:5000])
    return {"dir": d, "ours": ours, "ref": d / "ref.pt", "evil": d / "evil.pt",
            "truncated": d / "truncated.pt", "pwned": d / "pwned"}


def _run_main(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = 0 if e.code is None else e.code
    return code, err.getvalue()


def _assert_clean(code: int, err: str, allowed: tuple[int, ...], argv: list[str]) -> None:
    event(f"exit {code}")  # see --hypothesis-show-statistics
    assert code in allowed, (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    if code == 2 and err:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "error" in lines[0], (argv, err)


# -- the CLI: the parser alone ----------------------------------------------------------------
def _options() -> list[str]:
    found: set[str] = set()
    parser = build_parser()
    for action in parser._actions:
        found.update(action.option_strings)
        for sub in getattr(action, "choices", None) or {}:
            p = action.choices[sub]
            for a in getattr(p, "_actions", []):
                found.update(a.option_strings)
    return sorted(found)


VALUES = ["0", "1", "-1", "2", "100", "1e309", "nan", "inf", "-inf", "36/255", "1/0", "0.5",
          "abc", "", " ", "-", "--", "cpu", "cuda", "synthetic", "cifar10", "digits",
          "imagefolder", "quick", "standard", "minimal-norm", "lipschitz,gnp", "attacks,",
          "test", "train", "soc", "hh1", "lln", "x" * 300, "a:b", "\u00e9\u4e2d", "\x1b[2J"]
printable = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
TOKENS = st.one_of(st.sampled_from(VALUES), st.text(printable, max_size=12))


@pytest.fixture(scope="module")
def options() -> list[str]:
    return _options()


@settings(max_examples=200)
@given(data=st.data())
def test_parser_fuzz_exits_0_or_2_with_one_line(options, data) -> None:
    words = st.one_of(st.sampled_from(options), TOKENS)
    head = data.draw(st.one_of(st.just([]), st.sampled_from(sorted(COMMANDS)).map(lambda c: [c])))
    argv = head + data.draw(st.lists(words, max_size=8))
    ran: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        for name, (module, _) in COMMANDS.items():
            mp.setattr(module + ".run", lambda args, name=name: ran.append(name) or 0)
        code, err = _run_main(argv)
    _assert_clean(code, err, (0, 2), argv)
    if ran:
        assert code == 0 and len(ran) == 1 and ran[0] in argv, (argv, ran)


# -- the CLI: certify and audit, run for real --------------------------------------------------
def _pick(data, choices: list) -> object:
    return data.draw(st.sampled_from(choices))


def _checkpoint_arg(data, files) -> list[str]:
    good = [files["ours"]] * 6 + [files["ref"]] * 2  # mostly runs that can succeed
    bad = [files["evil"], files["truncated"], "missing.pt", ".", "--model"]
    return [str(_pick(data, good + bad))]


@settings(max_examples=60)
@given(data=st.data())
def test_certify_fuzz_never_crashes(files, data) -> None:
    opts = {
        "--dataset": ["synthetic"] * 4 + ["imagefolder", "digits", "nope"],
        "--data-dir": [".", "nowhere", "sub"],
        "--split": ["test", "train", "val"],
        "--radii": ["36/255", "0", "0.5 1", "1e-9 2", "-1", "nan", "abc", "1/0", "1e309"],
        "--n": ["1", "5", "0", "-3", "x", "1000000"],
        "--batch-size": ["3", "300", "0", "big", "100000000000000000000"],
        "--json": ["out.json", ".", "sub/dir/out.json", "tiny.pt/x.json"],
        "--device": ["cpu"],  # see test_reliability: other values are a known gap
    }
    argv = ["certify", *_checkpoint_arg(data, files), "--no-download", "--dataset", "synthetic",
            "--n", "8"]  # a later --n overrides
    for key in data.draw(st.lists(st.sampled_from(sorted(opts)), max_size=4, unique=True)):
        argv += [key, *str(_pick(data, opts[key])).split()]
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        Path("tiny.pt").write_bytes(b"a file, not a folder")
        code, err = _run_main(argv)
    _assert_clean(code, err, (0, 2), argv)
    assert not files["pwned"].exists()


@settings(max_examples=60)
@given(data=st.data())
def test_audit_fuzz_never_crashes(files, data) -> None:
    opts = {
        "--dataset": ["synthetic"] * 4 + ["imagefolder", "digits", "nope"],
        "--n": ["1", "3", "40", "0", "-1", "x", "1000000"],
        "--checks": ["attacks", "lipschitz,gnp", "attacks,gnp,lipschitz", "", ",", "vibes"],
        "--attacks": ["quick", "minimal-norm", "none"],
        "--out": ["o", "o/p", "tiny.pt", ".", ""],
        "--seed": ["0", "7", "4294967295", "-1", "1e3", "99999999999999999999999"],
        "--tolerance": ["0", "0.01", "0.5", "1", "-0.1", "nan", "x"],
        "--lipschitz": ["1", "4", "0", "-2", "inf", "x", "1e-300"],
        "--device": ["cpu", "cpu", "cpu:0", "cuda", "cuda:5", "foo", "meta", ""],
        "--model": ["os:getcwd", "math:pi", "nowhere:f", "os:nothing", "x", ":"],
        "--split": ["test", "train"],
        "--data-dir": ["nowhere", "."],
    }
    flags = ["--resume", "--overwrite"]
    argv = ["audit", *_checkpoint_arg(data, files), "--quiet", "--dataset", "synthetic"]
    if argv[1] == "--model":
        argv = ["audit", "--quiet", "--dataset", "synthetic"]
    for key in data.draw(st.lists(st.sampled_from(sorted(opts) + flags), max_size=4,
                                  unique=True)):
        argv += [key] if key in flags else [key, str(_pick(data, opts[key]))]
    from lipverify.audits import runner
    from lipverify.audits.report import AuditReport

    real = runner.audit
    with pytest.MonkeyPatch.context() as mp, tempfile.TemporaryDirectory() as tmp, \
            contextlib.chdir(tmp):
        # the stages that cost seconds are not what is fuzzed here
        mp.setattr(runner, "audit", lambda *a, **k: real(*a, **{**k, "checks": ()}))
        mp.setattr(AuditReport, "plots", lambda self: {})
        Path("tiny.pt").write_bytes(b"a file, not a folder")
        code, err = _run_main(argv)
    _assert_clean(code, err, (0, 1, 2, 3), argv)
    assert not files["pwned"].exists()


# -- the checkpoint loader ---------------------------------------------------------------------
def _mutations(size: int) -> st.SearchStrategy:
    pos = st.integers(0, size - 1)
    near_start = st.integers(0, min(size, 4096) - 1)  # the pickle and the zip headers
    near_end = st.integers(max(0, size - 2048), size - 1)  # the zip directory
    flips = st.lists(st.tuples(st.one_of(pos, near_start, near_end), st.integers(0, 7)),
                     min_size=1, max_size=4)
    return st.one_of(
        flips.map(lambda f: ("flip", f)),
        pos.map(lambda n: ("truncate", n)),
        st.tuples(st.one_of(pos, near_start), st.binary(min_size=1, max_size=64)).map(
            lambda t: ("overwrite", t)),
        st.binary(max_size=2048).map(lambda b: ("replace", b)),
    )


def _apply(data: bytes, mutation: tuple) -> bytes:
    kind, arg = mutation
    if kind == "flip":
        out = bytearray(data)
        for at, bit in arg:
            out[at] ^= 1 << bit
        return bytes(out)
    if kind == "truncate":
        return data[:arg]
    if kind == "overwrite":
        at, chunk = arg
        return data[:at] + chunk + data[at + len(chunk):]
    return arg


@pytest.fixture(scope="module")
def originals(files) -> dict:
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model = load_checkpoint(files["ours"])
        return {"x": x, "ours": model(x), "config": model.config,
                "ours_bytes": files["ours"].read_bytes(), "ref_bytes": files["ref"].read_bytes()}


@settings(max_examples=250)
@given(data=st.data())
def test_every_corruption_of_our_format_is_detected(files, originals, data) -> None:
    blob = originals["ours_bytes"]
    mutated = _apply(blob, data.draw(_mutations(len(blob))))
    path = files["dir"] / "mutated.pt"
    path.write_bytes(mutated)
    for loader in (load_checkpoint, load_model):
        try:
            model = loader(path)
        except CheckpointError as e:
            assert str(e).startswith(str(path)) and "\n" not in str(e)
            event(f"{loader.__name__}: {str(e)[len(str(path)) + 2:][:28]}")
            continue
        event(f"{loader.__name__}: loaded, same logits")
        # it loaded: then it must be the very same network, never a silently different one
        with torch.no_grad():
            assert torch.equal(model(originals["x"]), originals["ours"])
        assert model.config == originals["config"]


@settings(max_examples=150)
@given(data=st.data())
def test_reference_format_corruption_is_a_clean_error_or_a_model(files, originals, data):
    blob = originals["ref_bytes"]
    mutated = _apply(blob, data.draw(_mutations(len(blob))))
    path = files["dir"] / "mutated-ref.pt"
    path.write_bytes(mutated)
    try:
        model = load_model(path)
    except CheckpointError as e:
        assert "\n" not in str(e)
        event(f"refused: {str(e)[len(str(path)) + 2:][:28]}")
        return
    event("loaded")
    cfg = model.config
    x = torch.rand(2, cfg["in_channels"], cfg["input_size"], cfg["input_size"])
    with torch.no_grad():
        assert model(x).shape == (2, cfg["num_classes"]) and not model.training


def test_fuzz_inputs_are_real(files, originals) -> None:
    """The unmutated files load (so the fuzz tests exercise real checkpoints)."""
    assert isinstance(load_model(files["ref"]), LipConvNet)
    with torch.no_grad():
        assert torch.equal(load_model(files["ours"])(originals["x"]), originals["ours"])
    assert os.path.getsize(files["ours"]) > 10_000
