"""The ``lipverify`` command line: ``train``, ``certify``, ``audit``, ``replay``.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``. Bad input exits 2 with a one-line message; internal errors exit 4 with a
one-line message and the path of a log holding the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import traceback

from lipverify import __version__

COMMANDS = {
    "train": ("lipverify.train", "train a LipConvNet (SOC/Cayley/BCOP, HH, LLN, CR)"),
    "certify": ("lipverify.certify_cmd", "print clean and certified accuracy of a checkpoint"),
    "audit": ("lipverify.audits.cli", "audit a checkpoint's certificates: sound or not?"),
    "replay": ("lipverify.audits.replay", "re-check saved violations in float32 and float64"),
    "export": ("lipverify.export_cmd", "write one frozen evaluation of a model as plain ops"),
}

def _int_type(minimum: int):  # noqa: ANN202 - an argparse type
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be >= {minimum}")
        return v

    return parse


def finite_float(text: str) -> float:
    """argparse type: a finite number."""
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return v


def nonneg_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    v = finite_float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return v


positive_int = _int_type(1)  # argparse type: an integer >= 1
nonneg_int = _int_type(0)  # argparse type: an integer >= 0

EXIT_OK, EXIT_UNSOUND, EXIT_BAD_INPUT, EXIT_INCONCLUSIVE, EXIT_INTERNAL = 0, 1, 2, 3, 4


def one_line(text: object, limit: int = 2000) -> str:
    """``text`` as a single line of printable characters: line breaks become spaces and other
    control characters (e.g. terminal escapes from a hostile file) are shown escaped."""
    out = []
    for ch in " ".join(str(text).split("\n")):
        if ch in "\r\t\v\f":
            out.append(" ")
        elif not ch.isprintable():
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)[:limit]


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with a one-line message (no usage dump) on bad options."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"lipverify: error: {one_line(message)} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lipverify", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"lipverify {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            p.set_defaults(_missing=name)
            continue
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings

    from lipverify.errors import LipverifyError

    # attack backends script functions with torch.jit, which warns on every run
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.script.*")

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    if getattr(args, "_missing", None):
        sys.stderr.write(f"lipverify {args._missing}: not yet implemented\n")
        return EXIT_BAD_INPUT
    try:
        return int(args._run(args) or 0)
    except LipverifyError as e:
        sys.stderr.write(f"lipverify {args.command}: error: {one_line(e)}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stderr.write(f"lipverify {args.command}: interrupted\n")
        return 130
    except Exception as e:  # noqa: BLE001 - report internal errors in one line plus a log
        with tempfile.NamedTemporaryFile(
            "w", prefix="lipverify-error-", suffix=".log", delete=False
        ) as log:
            traceback.print_exc(file=log)
        first = one_line((str(e).strip().splitlines() or [""])[0], 200)
        sys.stderr.write(
            f"lipverify {args.command}: internal error: {type(e).__name__}: {first} "
            f"(traceback in {log.name})\n"
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    raise SystemExit(main())
