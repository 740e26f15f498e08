"""``metaverify derive``: print an exact SymPy derivation of a toy meta-gradient.

``metaverify derive PROBLEM [--dim D] [--steps K] [--format latex|text|sympy]``
builds ``reference.symbolic``'s derivation (problem names are the constructor
names with dashes) and prints it; ``--list`` lists the problems with their
sizes and limits. Exit 0 on success, 2 for an unknown problem, a size the
problem does not take, or a size above its limit (symbolic sizes that would
run for minutes are refused with the limit stated).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from reference.errors import InvalidInputError

FORMATS = ("latex", "text", "sympy")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("problem", nargs="?", metavar="PROBLEM",
                   help="problem name, e.g. quadratic-maml (see --list)")
    p.add_argument("--list", action="store_true", help="list the problems, their sizes and limits, and exit")
    p.add_argument("--dim", type=int, default=None, help="dimension of the problem (meaning per problem; see --list)")
    p.add_argument("--steps", type=int, default=None, help="inner steps K (for the Nichol problems: the paper's k)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="another argument of the constructor, e.g. shots=3, first_order=true, bias_column=true "
                        "(repeatable)")
    p.add_argument("--format", choices=FORMATS, default="latex",
                   help="latex (an aligned environment for KaTeX/MathJax), text, or sympy (Python code "
                        "rebuilding the expressions); default latex")


def _parse_value(key: str, text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    try:
        return int(low)
    except ValueError:
        raise InvalidInputError(f"--option {key}={text!r}: the value must be an integer or true/false") from None


def _list_problems() -> str:
    from reference.symbolic import PROBLEMS

    lines = ["Problems (metaverify derive PROBLEM [--dim D] [--steps K] [--option KEY=VALUE]):", ""]
    width = max(len(n) for n in PROBLEMS)
    for name, prob in PROBLEMS.items():
        sizes = ", ".join(f"{k}={v} (max {prob.limits.get(k, '-')})" for k, v in prob.sizes.items())
        lines.append(f"  {name:<{width}}  {prob.summary}")
        lines.append(f"  {'':<{width}}  sizes: {sizes}")
    return "\n".join(lines)


def _constructor_args(prob: Any, args: argparse.Namespace) -> dict[str, Any]:
    import inspect

    params = inspect.signature(prob.constructor).parameters
    kwargs: dict[str, Any] = {}
    for flag in ("dim", "steps"):
        value = getattr(args, flag)
        if value is None:
            continue
        if flag not in params:
            takes = ", ".join(params) or "nothing"
            raise InvalidInputError(f"--{flag}={value} does not apply to {prob.name} (it takes: {takes})")
        kwargs[flag] = value
    for item in args.option:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InvalidInputError(f"--option {item!r} must look like KEY=VALUE, e.g. shots=3")
        if key not in params:
            raise InvalidInputError(f"--option {key}=... is not an argument of {prob.name}; it takes: {', '.join(params)}")
        if key in kwargs:
            raise InvalidInputError(f"{key} is given twice")
        kwargs[key] = _parse_value(key, text)
    return kwargs


def run(args: argparse.Namespace) -> int:
    if args.list:
        print(_list_problems())
        return 0
    if not args.problem:
        print("metaverify derive: error: give a PROBLEM (e.g. quadratic-maml) or --list", file=sys.stderr)
        return 2
    from reference.symbolic import get_problem

    prob = get_problem(args.problem)
    derivation = prob.build(**_constructor_args(prob, args))
    if args.format == "latex":
        print(derivation.latex())
    elif args.format == "text":
        print(derivation.text())
    else:
        print(derivation.sympy_code())
    return 0
