"""Mutation check of the soundness tests: ``python tests/mutation/run.py [NAME ...]``.

The working tree (``git ls-files``: tracked and untracked-but-not-ignored files) is copied once
to a scratch snapshot. For each mutant of :mod:`mutants` (all, or those named): copy the
snapshot, apply the mutant's exact text replacements, run its tests there with pytest, and
record *killed* (every named test fails somewhere) or *survived*. Exit status 1 if any mutant
survives, is only partly caught, or cannot be run (a snippet not found exactly once, a
collection error, a timeout).

Isolation: the scratch copy is what the tests import, whatever is installed (an editable
install points at the original checkout). The child process puts the copy first on
``sys.path`` and ``PYTHONPATH`` (so subprocesses see it too), links ``lipverify/audits`` and
``lipverify/attacks`` to their directories as the package mapping does, drops editable-install
finders, and reports every ``lipverify`` module it imported: one from outside the copy is an
error. A canary run checks this first: a marker planted in the copy's three packages must be
visible in-process and in a subprocess. The unmutated copy must pass every named test
(baseline) before any mutant counts as killed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from mutants import MUTANTS, Edit, Mutant  # noqa: E402

# lipverify's package mapping (pyproject.toml, [tool.setuptools.package-dir])
SUBPACKAGE_DIRS = {"audits": "audits", "attacks": "attacks"}
CANARY = "MUTATION_CANARY"
CANARY_FILES = ("lipverify/__init__.py", "audits/__init__.py", "attacks/__init__.py")


class MutationError(Exception):
    """The mutant list or the set-up is broken (not a survivor: the check could not run)."""


# --------------------------------------------------------------------------------------------
# scratch copies


def tree_files(root: Path) -> list[str]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root, check=True, capture_output=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise MutationError(f"git ls-files failed in {root}: the check needs a git checkout"
                            ) from exc
    return [f for f in out.decode().split("\0") if f and (root / f).is_file()]


def snapshot(dest: Path, files: list[str]) -> Path:
    """Copy ``files`` of the working tree once: every run starts from this same snapshot, even
    if the tree changes meanwhile. ``lipverify/audits`` and ``lipverify/attacks`` become links
    to their directories, as the package mapping has them."""
    for f in files:
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, target)
    for sub, directory in SUBPACKAGE_DIRS.items():
        link = dest / "lipverify" / sub
        if not link.exists():
            link.symlink_to(Path("..") / directory, target_is_directory=True)
    return dest


def make_copy(snap: Path, dest: Path) -> Path:
    shutil.copytree(snap, dest, symlinks=True)
    return dest


def apply_edit(copy: Path, edit: Edit) -> None:
    path = copy / edit.path
    if not path.is_file():
        raise MutationError(f"{edit.path}: no such file")
    text = path.read_text()
    count = text.count(edit.old)
    if count != 1:
        raise MutationError(f"{edit.path}: snippet {edit.old!r} found {count} times, not once; "
                            "update tests/mutation/mutants.py")
    path.write_text(text.replace(edit.old, edit.new))


# --------------------------------------------------------------------------------------------
# the child: pytest inside the copy


def _isolate(copy: Path) -> None:
    sys.path[:] = [str(copy)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    sys.meta_path[:] = [f for f in sys.meta_path
                        if "__editable__" not in getattr(f, "__module__", "")
                        and "__editable__" not in type(f).__module__]


def _foreign_modules(copy: Path) -> list[str]:
    out = []
    for name, mod in list(sys.modules.items()):
        if name.split(".")[0] != "lipverify":
            continue
        origin = getattr(mod, "__file__", None)
        if origin and not Path(origin).resolve().is_relative_to(copy.resolve()):
            out.append(f"{name} ({origin})")
    return out


def child(copy: Path, result: Path, mode: str, args: list[str]) -> int:
    _isolate(copy)
    report: dict = {"failed": [], "passed": [], "errors": []}
    if mode == "canary":
        import importlib

        seen = {}
        for name in ("lipverify", "lipverify.audits", "lipverify.attacks"):
            seen[name] = getattr(importlib.import_module(name), CANARY, None)
        code = ("import lipverify as p, lipverify.audits as b, lipverify.attacks as a; "
                f"print(p.{CANARY}, b.{CANARY}, a.{CANARY})")
        sub = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=copy, env=os.environ.copy())
        report.update(canary=seen, subprocess_canary=sub.stdout.strip(), exit=0)
    else:
        import pytest

        summary = report

        class Collect:  # a pytest plugin: the outcome of every test case
            def pytest_runtest_logreport(self, report):  # noqa: ANN001 (pytest's hook name)
                if report.failed:
                    summary["failed" if report.when == "call" else "errors"].append(report.nodeid)
                elif report.when == "call" and report.passed:
                    summary["passed"].append(report.nodeid)

        report["exit"] = int(pytest.main(args, plugins=[Collect()]))
    report["foreign_modules"] = _foreign_modules(copy)
    result.write_text(json.dumps(report))
    return 0


def run_child(copy: Path, mode: str, tests: list[str], timeout: float) -> dict:
    result = copy.parent / f"result-{mode}.json"
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join([str(copy)] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a stale .pyc can never stand in for a mutated file
    env["HYPOTHESIS_PROFILE"] = "ci"
    env["LIPVERIFY_CACHE_DIR"] = str(copy.parent / "cache")  # no dense operator from elsewhere
    args = ["-q", "-p", "no:cacheprovider", "--tb=line", "-W", "ignore::DeprecationWarning",
            *tests]
    cmd = [sys.executable, str(HERE / "run.py"), "--child", str(copy), str(result), mode,
           "--", *args]
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"timeout": True}
    if not result.exists():
        raise MutationError(f"the child run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rep = json.loads(result.read_text())
    rep["output"] = proc.stdout[-4000:]
    if rep["foreign_modules"]:
        raise MutationError("the tests imported lipverify from outside the scratch copy: "
                            + ", ".join(rep["foreign_modules"][:5]))
    return rep


# --------------------------------------------------------------------------------------------
# the check


def _function(nodeid: str) -> str:
    return nodeid.split("[", 1)[0]


def judge(mutant: Mutant, rep: dict) -> tuple[str, str]:
    if rep.get("timeout"):
        return "error", "timeout"
    if rep["exit"] not in (0, 1):
        return "error", f"pytest exit {rep['exit']} (collection or usage error)\n{rep['output']}"
    failed = {_function(n) for n in rep["failed"] + rep["errors"]}
    caught = [t for t in mutant.tests if t in failed]
    if len(caught) == len(mutant.tests):
        return "killed", f"{len(rep['failed']) + len(rep['errors'])} failing case(s)"
    if not caught:
        return "SURVIVED", "no named test fails"
    missed = ", ".join(t.split("::")[-1] for t in mutant.tests if t not in failed)
    return "PARTLY", f"these named tests still pass: {missed}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        sep = argv.index("--")
        copy, result, mode = argv[1:4]
        return child(Path(copy), Path(result), mode, argv[sep + 1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    opts = parser.parse_args(argv)
    if opts.list:
        for m in MUTANTS:
            print(f"{m.name:30s} {m.why}")
        return 0
    unknown = set(opts.names) - {m.name for m in MUTANTS}
    if unknown:
        print(f"unknown mutants: {sorted(unknown)}", file=sys.stderr)
        return 2
    chosen = [m for m in MUTANTS if not opts.names or m.name in opts.names]
    t0 = time.time()
    scratch = Path(tempfile.mkdtemp(prefix="lipverify-mutation-"))
    rows: list[tuple[str, str, float, str]] = []
    try:
        snap = snapshot(scratch / "snapshot", tree_files(ROOT))
        # every snippet must be found exactly once before anything runs
        for m in chosen:
            probe = scratch / "probe"
            for e in m.edits:
                (probe / e.path).parent.mkdir(parents=True, exist_ok=True)
                if (snap / e.path).is_file():
                    shutil.copy2(snap / e.path, probe / e.path)
            for e in m.edits:
                try:
                    apply_edit(probe, e)
                except MutationError as exc:
                    raise MutationError(f"mutant {m.name}: {exc}") from None
            shutil.rmtree(probe)
        tests = sorted({t for m in chosen for t in m.tests})
        # canary: the copy, not the installed checkout, is what gets imported
        canary = make_copy(snap, scratch / "canary" / "repo")
        for f in CANARY_FILES:
            with open(canary / f, "a") as fh:
                fh.write(f"\n{CANARY} = 'scratch'\n")
        t = time.time()
        rep = run_child(canary, "canary", [], opts.timeout)
        ok = (not rep.get("timeout") and set(rep["canary"].values()) == {"scratch"}
              and rep["subprocess_canary"] == "scratch scratch scratch")
        rows.append(("(canary: imports come from the copy)", "ok" if ok else "error",
                     time.time() - t, json.dumps({k: rep.get(k) for k in
                                                  ("canary", "subprocess_canary")})))
        if not ok:
            raise MutationError(f"canary not seen: {rows[-1][3]}")
        # baseline: the named tests pass on the unmutated copy
        base = make_copy(snap, scratch / "baseline" / "repo")
        t = time.time()
        rep = run_child(base, "baseline", tests, opts.timeout)
        bad = rep.get("timeout") or rep["exit"] != 0
        rows.append(("(baseline: unmutated copy passes)", "error" if bad else "ok",
                     time.time() - t, f"{len(rep.get('passed', []))} passed"))
        if bad:
            raise MutationError("the named tests fail without any mutant:\n"
                                + rep.get("output", "timeout"))
        for m in chosen:
            copy = make_copy(snap, scratch / m.name / "repo")
            for e in m.edits:
                apply_edit(copy, e)
            t = time.time()
            rep = run_child(copy, "mutant", list(m.tests), opts.timeout)
            status, detail = judge(m, rep)
            rows.append((m.name, status, time.time() - t, detail))
            print(f"  {m.name}: {status} ({time.time() - t:.1f} s)", flush=True)
            if not opts.keep:
                shutil.rmtree(scratch / m.name, ignore_errors=True)
    except MutationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        _table(rows, time.time() - t0)
        return 1
    finally:
        if opts.keep:
            print(f"scratch kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    _table(rows, time.time() - t0)
    return 0 if all(r[1] in ("ok", "killed") for r in rows) else 1


def _table(rows: list[tuple[str, str, float, str]], total: float) -> None:
    width = max([len(r[0]) for r in rows] + [6])
    print(f"\n{'mutant':{width}s}  {'result':8s}  {'seconds':>7s}  detail")
    for name, status, secs, detail in rows:
        first = detail.splitlines()[0] if detail else ""
        print(f"{name:{width}s}  {status:8s}  {secs:7.1f}  {first}")
    killed = sum(r[1] == "killed" for r in rows)
    mutants = sum(not r[0].startswith("(") for r in rows)
    print(f"\n{killed}/{mutants} mutants killed; total {total:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
