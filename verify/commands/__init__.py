"""Subcommands of the ``metaverify`` CLI, one module each (see :mod:`verify.cli`).

Shared argument types: every bad value is an argparse error (exit code 2, one line starting with
``metaverify SUBCOMMAND: error:``) before any work starts.
"""

from __future__ import annotations

import argparse


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; {what}") from None


def seed(text: str) -> int:
    """A seed: an integer >= 0 (NumPy's generators take no negative seeds)."""
    value = _int(text, "give a seed >= 0, e.g. 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give a seed >= 0, e.g. 0")
    return value


def positive_int(text: str) -> int:
    """A count that must be at least 1 (tasks, shots, steps, examples)."""
    value = _int(text, "give an integer >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def nonnegative_int(text: str) -> int:
    """A count that may be 0 (e.g. ``--directions 0`` skips the finite-difference check)."""
    value = _int(text, "give an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value
