"""nox sessions: tests, lint, attack suites, the full audit and benchmarks.

``nox -s tests`` is the README's test command. Sessions that audit take an optional
checkpoint and extra ``lipverify audit`` options after ``--``, e.g.
``nox -s attacks-quick -- runs/digits-x/best.pt --dataset digits``; without a checkpoint they
audit the built-in default model on the digits test split.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True


def _install(session: nox.Session) -> None:
    session.install("-e", ".[test,attacks]")


@nox.session
def tests(session: nox.Session) -> None:
    """Unit, property and integration tests (CPU, under 8 minutes on 2 cores); tests marked
    ``slow`` run in the ``slow`` session."""
    _install(session)
    session.run("pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow and not gpu",
                *session.posargs, env={"HYPOTHESIS_PROFILE": "ci"})


@nox.session
def slow(session: nox.Session) -> None:
    """The tests marked ``slow`` (CI runs them after ``tests``)."""
    _install(session)
    session.run("pytest", "-q", "-p", "no:cacheprovider", "-m", "slow and not gpu",
                *session.posargs, env={"HYPOTHESIS_PROFILE": "ci"}, success_codes=[0, 5])


@nox.session
def mutation(session: nox.Session) -> None:
    """Soundness mutants (tests/mutation/mutants.py) planted one at a time in scratch copies of
    the tree; fails if the tests named for a mutant do not all catch it. Not part of ``tests``.
    Mutant names after ``--`` run only those."""
    _install(session)
    session.run("python", "tests/mutation/run.py", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the three packages, tests, benchmarks and this file."""
    session.install("ruff")
    session.run("ruff", "check", "lipverify", "attacks", "audits", "tests", "benchmarks",
                "noxfile.py")


def _audit(session: nox.Session, *options: str) -> None:
    _install(session)
    session.run("lipverify", "audit", *session.posargs, *options,
                success_codes=[0, 1, 3])  # sound, unsound, inconclusive are all results


@nox.session(name="attacks-quick")
def attacks_quick(session: nox.Session) -> None:
    """The `quick` attack suite at the certified radii; writes the report."""
    _audit(session, "--attacks", "quick")


@nox.session(name="attacks-standard")
def attacks_standard(session: nox.Session) -> None:
    """Full AutoAttack (L2) plus DDN 1000 steps at the certified radii (slow)."""
    _audit(session, "--attacks", "standard")


@nox.session(name="attacks-minimal-norm")
def attacks_minimal_norm(session: nox.Session) -> None:
    """DDN, FMN-L2 and FAB-T minimum-norm attacks: tightness of the certificates (slow)."""
    _audit(session, "--attacks", "minimal-norm")


@nox.session
def audit(session: nox.Session) -> None:
    """The full audit: Lipschitz bounds, GNP checks, standard AutoAttack, then the
    minimum-norm suite for tightness (two reports)."""
    _audit(session, "--attacks", "standard")
    _audit(session, "--attacks", "minimal-norm")


@nox.session(name="autoattack-original")
def autoattack_original(session: nox.Session) -> None:
    """The original AutoAttack (standard, L2) at 36/255 on 8 points of the built-in default,
    through ``lipverify.fast``; fails unless robust accuracy >= certified accuracy. It is not
    on PyPI: ``nox -s autoattack-original -- PATH/TO/auto-attack`` installs it from a source
    tree first. Skipped, saying so, when ``autoattack`` is not importable."""
    _install(session)
    if session.posargs:
        session.install("--no-deps", *session.posargs)
    found = session.run("python", "-c", "import importlib.util as u; "
                        "print(u.find_spec('autoattack') is not None)", silent=True)
    if "True" not in str(found):
        session.skip("the original AutoAttack (package 'autoattack') is not importable; it is "
                     "not on PyPI: nox -s autoattack-original -- PATH/TO/auto-attack")
    session.run("python", "-m", "lipverify.attacks.autoattack_original", "--n", "8",
                "--eps", "36/255")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks (2 threads, median of >= 3 runs); JSON results under benchmarks/results."""
    _install(session)
    import pathlib

    for script in sorted(pathlib.Path("benchmarks").glob("bench_*.py")):
        session.run("python", str(script), "--json",
                    f"benchmarks/results/{script.stem}.json", *session.posargs)
