"""The mutant list of ``nox -s mutation`` stays in step with the code and the tests (fast: text
only). Each snippet must occur exactly once in its file, and each named test must exist."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _mutants():
    spec = importlib.util.spec_from_file_location("lipverify_mutants",
                                                  ROOT / "tests" / "mutation" / "mutants.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod.MUTANTS


MUTANTS = _mutants()


def test_mutant_names_are_unique():
    names = [m.name for m in MUTANTS]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_each_snippet_occurs_once_and_each_test_exists(mutant):
    for edit in mutant.edits:
        text = (ROOT / edit.path).read_text()
        assert text.count(edit.old) == 1, (edit.path, edit.old)
        assert edit.new != edit.old
    assert mutant.tests
    for node in mutant.tests:
        path, func = node.split("::")
        source = (ROOT / path).read_text()
        assert re.search(rf"^def {re.escape(func)}\(", source, re.M), node
