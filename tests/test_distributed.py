"""Sharded audits and certification under torchrun (issue 16).

* Every option of ``audit`` and ``certify`` reaches lipverify through torchrun's own parser.
* The stage functions give the report of ``audit()`` whatever order the chunks run in, and
  :func:`lipverify.distributed.audit_sharded` does on one rank (in-process, with a TCPStore of
  the test's own), resumes from saved chunks and fails loudly on a missing one.
* 2 gloo processes under torchrun write the same ``report.json`` (and certify JSON) as one
  process with 1 thread; only the provenance differs.
* slow: SIGKILL of a rank mid-run, then ``--resume`` or torchrun's own restart; nothing lost,
  nothing counted twice. The benchmark's smoke run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch import nn

import lipverify
from lipverify import distributed
from lipverify.audits import runner
from lipverify.audits.cli import CliProgress, _sharded_output_dir
from lipverify.audits.runner import ATTACK_CHUNK, AuditState, Progress, audit
from lipverify.cli import build_parser, main
from lipverify.data import load_dataset
from lipverify.distributed import World
from lipverify.errors import InputError
from lipverify.models import LipConvNet

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = shutil.which("torchrun")
ENV = {k: v for k, v in os.environ.items()
       if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
ENV.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
# provenance fields that may differ between a sharded and a single-process run
VARIABLE = ("command", "world_size", "attack_chunks_by_rank", "attack_chunks_reused")
needs_torchrun = pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not on PATH")


def _torchrun(*args: str, nproc: int = 2, restarts: int = 0) -> list[str]:
    return [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}",
            f"--max-restarts={restarts}", "--monitor-interval=0.1", "-m", "lipverify", *args]


def _comparable(doc: dict) -> dict:
    """The report without the provenance fields a sharded run may change."""
    doc = json.loads(json.dumps(doc))
    prov = doc["provenance"]
    for key in list(prov):
        if key.endswith("seconds") or key in VARIABLE:
            prov.pop(key)
    return doc


def _violation_files(out: Path) -> list[dict]:
    return [torch.load(f, weights_only=True) for f in sorted((out / "violations").glob("*.pt"))]


def _same_records(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        ra.keys() == rb.keys() and all(
            torch.equal(ra[k], rb[k]) if isinstance(ra[k], torch.Tensor) else ra[k] == rb[k]
            for k in ra)
        for ra, rb in zip(a, b, strict=True))


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny BCOP LipConvNet (fast in eval mode) for the synthetic data."""
    torch.manual_seed(0)
    model = LipConvNet(conv="bcop", init_channels=2, num_classes=4, activation="maxmin",
                       last_layer="lln")
    path = tmp_path_factory.mktemp("dist") / "tiny.pt"
    lipverify.save_checkpoint(model.eval(), path, dataset={"name": "synthetic"})
    return path


# -- options under torchrun --------------------------------------------------------------------
def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


SAMPLE = {"checks": "lipschitz", "model": "pkg.mod:build", "radii": "36/255",
          "checkpoint": None, "dataset": "synthetic", "split": "train", "attacks": "standard"}


@pytest.mark.parametrize("command", ["audit", "certify"])
def test_every_option_reaches_lipverify_through_torchruns_parser(command) -> None:
    from torch.distributed.run import get_args_parser

    torchrun = get_args_parser()
    torchrun.exit_on_error = False
    options = [a for a in _subparser(command)._actions
               if a.option_strings and not isinstance(a, argparse._HelpAction)]
    assert len(options) >= 9
    for action in options:
        names = [o for o in action.option_strings if o != "--n"]
        assert names, f"{action.option_strings}: no spelling that survives torchrun"
        for name in names:
            value = [] if action.nargs == 0 else [
                SAMPLE.get(action.dest) or (str(action.choices[-1]) if action.choices else "3")]
            argv = [command, name, *value]
            got = torchrun.parse_args(["--nproc-per-node=2", "-m", "lipverify", *argv])
            assert got.module and got.training_script == "lipverify"
            assert got.training_script_args == argv, name  # nothing swallowed or reordered
            ns = build_parser().parse_args(argv)
            assert getattr(ns, action.dest) != action.default, name  # and lipverify reads it
    # --n is what torchrun swallows ("ambiguous option: --n could match --nnodes, ...");
    # outside torchrun it stays an alias of --num-points
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        torchrun.parse_args(["--nproc-per-node=2", "-m", "lipverify", command, "--n", "8"])
    assert build_parser().parse_args([command, "--n", "8"]).n == 8
    assert build_parser().parse_args([command, "--num-points", "8"]).n == 8


# -- the world, the output folder on restart, progress -----------------------------------------
def test_world_from_torchrun_environment(monkeypatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    assert not distributed.launched() and distributed.world_from_env() == World()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    w = distributed.world_from_env()
    assert distributed.launched() and not w.main
    assert (w.rank, w.size, w.local_rank, w.restart, w.run_id) == (3, 4, 1, 2, "job7")
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(InputError, match="RANK=4 outside WORLD_SIZE=4"):
        distributed.world_from_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(InputError, match="RANK='x' is not an integer"):
        distributed.world_from_env()


class _FakeBoard(dict):
    def get(self, key):  # noqa: D401 - dict.get, with the Board's signature
        return super().get(key)

    def set(self, key, value):
        self[key] = value


def _out_args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"out": None, "resume": False, "overwrite": False, **kw})


def test_a_torchrun_restart_resumes_the_first_attempts_folder(tmp_path, monkeypatch) -> None:
    board = _FakeBoard()
    monkeypatch.setattr(distributed, "job_board", lambda world: board)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    (out / ".state").mkdir(parents=True)
    (out / ".state" / "attacks-00000.pt").write_bytes(b"saved before the crash")
    with pytest.raises(InputError, match="already holds results"):  # attempt 0: refused
        _sharded_output_dir(_out_args(out=str(out)), "m", World(size=2))
    args = _out_args(out=str(out), overwrite=True)  # a restart never wipes the saved work
    got, fresh = _sharded_output_dir(args, "m", World(size=2, restart=1))
    assert got == out and not fresh and args.resume and not args.overwrite
    assert (out / ".state" / "attacks-00000.pt").exists()
    # without --out: attempt 0 timestamps a folder and records it; a restart finds it again,
    # also on a node whose own restart count stayed 0 (another node's worker failed)
    board.clear()
    first, fresh = _sharded_output_dir(_out_args(), "m", World(size=2))
    assert fresh and first.parent == Path("audits") and board["audit-out"] == str(
        first.resolve())
    (first / "report-in-progress").write_text("x")
    for restart in (1, 0):
        args = _out_args()
        again, fresh = _sharded_output_dir(args, "m", World(size=2, restart=restart))
        assert again.resolve() == first.resolve() and not fresh and args.resume
    assert sorted(p.name for p in (tmp_path / "audits").iterdir()) == [first.name]


def test_cli_progress_lines_and_bars(capsys) -> None:
    quiet = CliProgress(quiet=True)
    quiet("bounding the Lipschitz constant")
    quiet.attacks_update(64, 32, 1)
    assert capsys.readouterr().err == ""
    lines = CliProgress(quiet=False, tty=False)
    lines("bounding the Lipschitz constant")
    lines("attacking chunk 1/2")  # replaced by the points-done lines
    lines.attacks_update(64, 0, 0)
    time.sleep(0.05)
    lines.attacks_update(64, 32, 1)
    lines.attacks_update(64, 64, 3)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "[audit] bounding the Lipschitz constant"
    assert err[1] == "[audit] attacks: 0/64 points, 0 violation(s)"
    assert re.fullmatch(r"\[audit\] attacks: 32/64 points, 1 violation\(s\), about \d+s left",
                        err[2])
    assert err[3] == "[audit] attacks: 64/64 points, 3 violation(s)" and len(err) == 4
    bars = CliProgress(quiet=False, tty=True)
    bars.stage_begin("lipschitz")
    time.sleep(0.6)  # the clock of the Lipschitz bar moves by itself
    bars.stage_end("lipschitz")
    bars.attacks_update(64, 32, 2)
    bars.attacks_update(64, 64, 5)
    bars.close()
    err = capsys.readouterr().err
    assert "Lipschitz bound" in err and "elapsed" in err
    assert "64/64" in err and "5 violations" in err


# -- stages, in-process ------------------------------------------------------------------------
class _Linear(nn.Module):
    """pixels -> 4 logits, one linear map: exact bounds, cheap attacks."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.fc = nn.Linear(3 * 32 * 32, 4)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(4, 3 * 32 * 32, generator=g) * 0.02)
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def linear_case():
    x, y, _ = load_dataset("synthetic", "test")
    model = _Linear().eval()
    true_l = float(torch.linalg.matrix_norm(model.fc.weight.detach().double(), ord=2))
    # radii overstated by 2%: counterexamples on a few points, not on most
    opts = dict(lipschitz=true_l / 1.02, checks=("lipschitz", "attacks"), seed=4)
    return model, x[: 2 * ATTACK_CHUNK + 5], y[: 2 * ATTACK_CHUNK + 5], opts


@pytest.fixture
def store(monkeypatch):
    """A TCPStore of the test's own, where torchrun would host one."""
    import torch.distributed as dist

    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                           timeout=timedelta(seconds=30))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(master.port))
    yield master


def _same_report(a, b) -> None:
    da, db = _comparable(a.to_dict()), _comparable(b.to_dict())
    assert da == db
    assert _same_records(a.violation_tensors, b.violation_tensors)


class _Recorder(Progress):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple] = []

    def __call__(self, message: str) -> None:
        self.events.append(("say", message))

    def stage_begin(self, name: str) -> None:
        self.events.append(("begin", name))

    def stage_end(self, name: str) -> None:
        self.events.append(("end", name))

    def attacks_update(self, total: int, done: int, violations: int) -> None:
        self.events.append(("points", total, done, violations))


@pytest.fixture(scope="module")
def linear_ref(linear_case):
    """audit() of the linear case with 1 thread, and the progress events it reported."""
    model, x, y, opts = linear_case
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rec = _Recorder()
        return audit(model, x, y, progress=rec, **opts), rec.events
    finally:
        torch.set_num_threads(before)


def test_stages_in_any_chunk_order_give_the_audit_report(linear_case, linear_ref, tmp_path,
                                                         one_thread) -> None:
    model, x, y, opts = linear_case
    ref, events = linear_ref
    assert 0 < len(ref.violations) < x.shape[0] and ref.verdict == "unsound"
    n = x.shape[0]
    assert [e for e in events if e[0] in ("begin", "end")] == [
        ("begin", "certify"), ("end", "certify"), ("begin", "lipschitz"), ("end", "lipschitz"),
        ("begin", "attacks"), ("end", "attacks")]
    points = [e for e in events if e[0] == "points"]
    assert points[0] == ("points", n, 0, 0)
    assert points[-1] == ("points", n, n, len(ref.violations))
    assert ("say", "attacking chunk 3/3") in events
    # each "rank" runs its own chunks into one shared state folder, in any order
    plan = runner.plan_audit(model, x, y, **opts)
    state = AuditState(tmp_path / "state", plan.fingerprint)
    lip = runner.lipschitz_stage(plan, state)
    with runner.attack_context(plan) as mat:
        for c in (2, 0, 1):
            runner.attack_chunk(plan, state, c)
    chunks = [state.load(runner.chunk_name(c), runner._CHUNK_KEYS) for c in range(3)]
    got = runner.assemble_report(plan, lip=lip, attacks=runner.merge_attacks(plan, chunks, mat))
    _same_report(ref, got)
    assert got.attacks["n_attacked"] == ref.attacks["n_attacked"] > 0


def test_audit_sharded_on_one_rank_resumes_and_refuses_a_missing_chunk(
        linear_case, linear_ref, tmp_path, store, one_thread) -> None:
    model, x, y, opts = linear_case
    ref, _ = linear_ref
    state_dir = tmp_path / "out" / ".state"
    got = distributed.audit_sharded(model, x, y, state_dir=state_dir, world=World(), **opts)
    _same_report(ref, got)
    assert got.provenance["world_size"] == 1
    assert got.provenance["attack_chunks_by_rank"] == {"0": [0, 1, 2]}
    with pytest.MonkeyPatch.context() as mp:
        # a second run (a resume) attacks nothing again and counts nothing twice
        mp.setattr(runner, "compute_chunk", lambda *a: pytest.fail("recomputed a chunk"))
        again = distributed.audit_sharded(model, x, y, state_dir=state_dir, world=World(),
                                          **opts)
        _same_report(ref, again)
        assert again.provenance["attack_chunks_reused"] == 3
        assert again.attacks["n_attacked"] == ref.attacks["n_attacked"]
        # other points, options or weights are refused, not mixed in
        with pytest.raises(InputError, match="different audit"):
            distributed.audit_sharded(model, x, y, state_dir=state_dir, world=World(),
                                      **{**opts, "seed": 5})
        # the state is the one a single process keeps: audit() resumes it as it is
        _same_report(ref, audit(model, x, y, state_dir=state_dir, **opts))
    # a chunk that no rank saved fails the job, never a partial report
    from lipverify.checkpoints import safe_torch_load

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "compute_chunk",  # the records of the run above, at no cost
                   lambda plan, c: safe_torch_load(state_dir / runner.chunk_name(c)))
        real_save = AuditState.save

        def lose_chunk_1(self, name, obj):
            if name != runner.chunk_name(1):
                real_save(self, name, obj)

        mp.setattr(AuditState, "save", lose_chunk_1)
        with pytest.raises(RuntimeError, match=r"attack chunk 1 \(points 32-63\) is missing"):
            distributed.audit_sharded(model, x, y, state_dir=tmp_path / "lost" / ".state",
                                      world=World(), **opts)
    assert not (tmp_path / "lost" / "report.json").exists()


def test_a_rank_that_does_not_see_the_state_folder_is_refused(tmp_path) -> None:
    with pytest.raises(InputError, match="not visible from every process"):
        AuditState(tmp_path / "elsewhere", "fp", join=True)
    assert not (tmp_path / "elsewhere").exists()  # joining writes nothing
    AuditState(tmp_path / "shared", "fp")
    AuditState(tmp_path / "shared", "fp", join=True)  # rank 0 set it up: fine
    with pytest.raises(InputError, match="different audit"):
        AuditState(tmp_path / "shared", "other", join=True)


# -- 2 gloo processes under torchrun -----------------------------------------------------------
AUDIT = ["--dataset", "synthetic", "--num-points", str(ATTACK_CHUNK + 8), "--lipschitz", "2.5",
         "--seed", "3", "--checks", "lipschitz,gnp,attacks", "--quiet"]


@needs_torchrun
def test_two_gloo_processes_write_the_single_process_report(tiny, tmp_path, one_thread,
                                                            capsys) -> None:
    single = tmp_path / "single"
    assert main(["audit", str(tiny), *AUDIT, "--out", str(single), "--device", "cpu"]) == 1
    capsys.readouterr()
    sharded = tmp_path / "sharded"
    res = subprocess.run(_torchrun("audit", str(tiny), *AUDIT, "--out", str(sharded)),
                         env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("verdict: UNSOUND") == 1  # one summary: rank 0's
    a = json.loads((single / "report.json").read_text())
    b = json.loads((sharded / "report.json").read_text())
    assert b["provenance"]["world_size"] == 2 and "world_size" not in a["provenance"]
    owners = b["provenance"]["attack_chunks_by_rank"]
    assert sorted(c for cs in owners.values() for c in cs) == [0, 1]  # each chunk once
    assert "1" in owners  # rank 1 attacked while rank 0 bounded the Lipschitz constant
    assert a["verdict"] == "unsound" and a["violations"]
    assert _comparable(a) == _comparable(b)  # samples, violations, accuracy, verdict, bounds
    assert _same_records(_violation_files(single), _violation_files(sharded))


@needs_torchrun
def test_two_gloo_processes_write_the_single_process_certify_json(tiny, tmp_path,
                                                                  one_thread, capsys) -> None:
    args = ["certify", str(tiny), "--dataset", "synthetic", "--num-points", "100",
            "--batch-size", "16"]
    assert main([*args, "--json", str(tmp_path / "one.json"), "--device", "cpu"]) == 0
    capsys.readouterr()
    res = subprocess.run(_torchrun(*args, "--json", str(tmp_path / "two.json")), env=ENV,
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("clean (r = 0)") == 1  # rank 0 prints, once
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one.pop("provenance") == {"world_size": 1}
    assert two.pop("provenance") == {"world_size": 2}
    assert one == two and len(two["samples"]) == 100


# -- slow: SIGKILL of a rank, then --resume or torchrun's restart ------------------------------
KILL_POINTS = 3 * ATTACK_CHUNK + 8  # 4 chunks
KILL_AUDIT = ["--dataset", "synthetic", "--num-points", str(KILL_POINTS), "--lipschitz", "2.5",
              "--seed", "3", "--checks", "attacks", "--quiet"]


def _rank_pid(launcher: subprocess.Popen, rank: int, deadline: float) -> int | None:
    """The pid of the worker of ``launcher`` (torchrun) whose RANK is ``rank``."""
    while time.time() < deadline and launcher.poll() is None:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                env = (proc / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if ppid == launcher.pid and f"RANK={rank}".encode() in env:
                return int(proc.name)
        time.sleep(0.05)
    return None


def _kill_rank_after_first_chunk(launcher: subprocess.Popen, state: Path) -> dict:
    """SIGKILL rank 1 once a chunk is saved; the saved chunks and their inodes."""
    deadline = time.time() + 300
    pid = _rank_pid(launcher, 1, deadline)
    assert pid is not None, "no rank 1"
    while time.time() < deadline and launcher.poll() is None and not list(
            state.glob("attacks-*.pt")):
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    return {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in state.glob("attacks-*.pt")}


@pytest.fixture(scope="module")
def kill_reference(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("killref") / "ref"
    res = subprocess.run([sys.executable, "-m", "lipverify", "audit", str(tiny), *KILL_AUDIT,
                          "--out", str(out)], env=ENV, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 1, res.stderr
    return out


def _check_complete(out: Path, reference: Path, saved: dict) -> None:
    doc = json.loads((out / "report.json").read_text())
    ref = json.loads((reference / "report.json").read_text())
    assert _comparable(doc) == _comparable(ref)
    assert doc["attacks"]["n_attacked"] == KILL_POINTS  # nothing lost, nothing twice
    indices = [v["index"] for v in doc["violations"]]
    assert len(indices) == len(set(indices))
    assert _same_records(_violation_files(out), _violation_files(reference))
    for name, stamp in saved.items():  # chunks saved before the kill were reused as they were
        f = out / ".state" / name
        assert (f.stat().st_ino, f.stat().st_mtime_ns) == stamp, name
    assert doc["provenance"]["attack_chunks_reused"] >= len(saved)


@pytest.mark.slow
@needs_torchrun
def test_sigkill_of_a_rank_then_resume(tiny, tmp_path, kill_reference) -> None:
    out = tmp_path / "cut"
    launcher = subprocess.Popen(_torchrun("audit", str(tiny), *KILL_AUDIT, "--out", str(out)),
                                env=ENV, cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    saved = _kill_rank_after_first_chunk(launcher, out / ".state")
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode != 0  # the job failed ...
    assert not (out / "report.json").exists()  # ... and wrote no partial report
    assert saved, "killed before any chunk was saved"
    assert len(saved) < 4, "killed after the last chunk"
    res = subprocess.run(_torchrun("audit", str(tiny), *KILL_AUDIT, "--out", str(out),
                                   "--resume"),
                         env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    _check_complete(out, kill_reference, saved)


@pytest.mark.slow
@needs_torchrun
def test_sigkill_of_a_rank_then_torchrun_restart(tiny, tmp_path, kill_reference) -> None:
    # no --out: the restarted workers must find the folder of the first attempt
    launcher = subprocess.Popen(_torchrun("audit", str(tiny), *KILL_AUDIT, restarts=1),
                                env=ENV, cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(tmp_path.glob("audits/*/.state")):
        time.sleep(0.01)
    (out,) = (p.parent for p in tmp_path.glob("audits/*/.state"))
    saved = _kill_rank_after_first_chunk(launcher, out / ".state")
    stdout, err = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, err[-3000:]
    assert saved and len(saved) < 4
    assert [p.name for p in (tmp_path / "audits").iterdir()] == [out.name]
    assert stdout.count("verdict: UNSOUND") == 1
    _check_complete(out, kill_reference, saved)


@pytest.mark.slow
@needs_torchrun
def test_ranks_with_different_weights_are_refused_in_one_line(tmp_path) -> None:
    (tmp_path / "rank_model.py").write_text(
        "import os, torch\n"
        "def build():\n"
        "    torch.manual_seed(int(os.environ.get('RANK', '0')))\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, 4))\n")
    env = {**ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ENV.get('PYTHONPATH', '')}"}
    res = subprocess.run(_torchrun("audit", "--model", "rank_model:build", "--lipschitz", "1",
                                   "--dataset", "synthetic", "--num-points", "4", "--checks",
                                   "lipschitz", "--quiet", "--out", str(tmp_path / "o")),
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    ours = [ln for ln in res.stderr.splitlines() if ln.startswith("lipverify audit")]
    assert ours == ["lipverify audit: error: rank 1: audits other weights, points or options "
                    "than rank 0 (the fingerprints differ): give every rank the same "
                    "checkpoint, data and options"]
    frames = [ln for ln in res.stderr.splitlines() if ln.strip().startswith('File "')]
    assert all("torch" in ln for ln in frames), frames  # torchrun's own report, none of ours
    assert not (tmp_path / "o" / "report.json").exists()


@pytest.mark.slow
@needs_torchrun
def test_benchmark_smoke_run(tmp_path) -> None:
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_sharded.py"),
                          "--quick", "--json", str(out)], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (row,) = json.loads(out.read_text())["results"]
    assert set(row["median_s"]) == {"1proc_x2threads", "2proc_x1thread"}
    assert row["ratio"]["1proc_x2threads"] == 1.0 and row["ratio"]["2proc_x1thread"] > 0
    assert "ratio" in res.stdout and "2proc_x1thread" in res.stdout


def test_progress_base_class_forwards_messages_only() -> None:
    said: list[str] = []
    p = Progress(said.append)
    p("certifying")
    p.stage_begin("lipschitz")
    p.attacks_update(10, 5, 1)
    p.close()
    assert said == ["certifying"]
    buf = io.StringIO()
    Progress(lambda m: buf.write(m))("x")
    assert buf.getvalue() == "x"
