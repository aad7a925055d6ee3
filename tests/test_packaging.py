"""Package layout: lazy top-level import, mapped subpackages, console script."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd="/").stdout


def test_import_is_lazy_and_subpackages_are_mapped() -> None:
    out = _run(
        "import sys, lipverify; print('torch' in sys.modules);"
        "import lipverify.attacks, lipverify.audits;"
        "print('torchattacks' in sys.modules, 'foolbox' in sys.modules);"
        "print(lipverify.audits.__file__)"
    )
    lines = out.splitlines()
    assert lines[0] == "False"  # import lipverify stays light (the pytest plugin needs it)
    assert lines[1] == "False False"  # no attack library until an attack runs
    assert "audits" in lines[2] and "lipverify/audits" not in lines[2]


def test_no_generic_top_level_names_installed() -> None:
    out = _run("import importlib.util as u; print(u.find_spec('audits'), u.find_spec('attacks'))")
    assert out.strip() == "None None"


def test_cli_help_lists_subcommands() -> None:
    out = subprocess.run([sys.executable, "-m", "lipverify", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for cmd in ("train", "certify", "audit", "replay"):
        assert cmd in out
