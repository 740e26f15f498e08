"""The ``metaverify`` command line.

Each subcommand lives in its own module under :mod:`verify.commands` exposing
``add_arguments(parser)`` and ``run(args) -> int``; this file only wires them.
Exit codes: 0 success, 1 a check failed, 2 usage error or bad input.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from reference.errors import MetaverifyError

#: subcommand -> (module, one-line help). Modules are imported lazily so that
#: ``metaverify derive`` never pays for torch, and a missing module is a clear error.
COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("verify.commands.check", "check implementations against the reference and finite differences"),
    "derive": ("verify.commands.derive", "print an exact SymPy derivation of a toy meta-gradient"),
    "audit": ("verify.commands.audit", "audit someone's meta-gradient implementation and diagnose bugs"),
    "report": ("verify.commands.report", "write an offline HTML/Markdown/JSON math report"),
}


class UsageError(MetaverifyError, ValueError):
    """Bad command-line usage; reported with exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too; keep one format
        self.print_usage(sys.stderr)
        print(f"metaverify: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="metaverify", description=__doc__.splitlines()[0])
    from verify import __version__

    parser.add_argument("--version", action="version", version=f"metaverify {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # subcommand not built yet
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``metaverify`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args._run(args))
    except MetaverifyError as exc:
        # Bad input or usage detected after parsing: one line, exit 2.
        print(f"metaverify {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metaverify: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
