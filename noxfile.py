"""nox sessions: tests, lint, attack suites, the full audit and benchmarks.

``nox -s tests`` is the README's test command. Sessions that take a checkpoint read it after
``--`` (e.g. ``nox -s attacks-quick -- path/to/best.pt``); without one they use the built-in
default model.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """Unit, property and integration tests (CPU, under 10 minutes on 2 cores)."""
    session.install("-e", ".[test,attacks]")
    session.run("pytest", "-q", "-p", "no:cacheprovider", *session.posargs,
                env={"HYPOTHESIS_PROFILE": "ci"})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the three packages, tests, benchmarks and this file."""
    session.install("ruff")
    session.run("ruff", "check", "lipverify", "attacks", "audits", "tests", "benchmarks",
                "noxfile.py")
