"""The ``metaverify`` command line.

Each subcommand lives in its own module under :mod:`verify.commands` exposing
``add_arguments(parser)`` and ``run(args) -> int``; this file only wires them.
Exit codes: 0 success, 1 a check failed, 2 usage error or bad input.
"""

from __future__ import annotations

import argparse
import importlib
import os
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
        # ``self.prog`` is "metaverify audit" for a subcommand's parser: every error line starts with it.
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
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
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (2), --help and --version (0): returned, not raised
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if getattr(args, "_run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        code = int(args._run(args))
        sys.stdout.flush()  # a closed pipe surfaces here, inside the handler, not at interpreter exit
        return code
    except MetaverifyError as exc:
        # Bad input or usage detected after parsing: one line, exit 2.
        print(f"metaverify {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (``metaverify check | head``): stop quietly, as Unix tools do on SIGPIPE.
        # stdout is pointed at /dev/null so that the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141
    except KeyboardInterrupt:
        print(f"metaverify {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
