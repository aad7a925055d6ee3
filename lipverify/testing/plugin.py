"""pytest plugin (entry point ``pytest11``): lipverify's options and fixtures.

Loaded in every pytest run of an environment where lipverify is installed, so importing it
must not import torch; everything heavy is imported on first use.
"""

from __future__ import annotations


def pytest_addoption(parser) -> None:  # noqa: ANN001 - pytest's Parser
    group = parser.getgroup("lipverify", "lipverify certificate audits")
    group.addoption(
        "--lipverify-audit",
        metavar="CKPT",
        default=None,
        help="add an audit of this checkpoint (lipverify or reference format) to the session",
    )
