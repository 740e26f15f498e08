"""``metaverify audit FILE.py:fn --algorithm maml-rl``: audit a meta-policy-gradient estimator.

The function's calling contract and what the audit does are in
:mod:`verify.rl_audit`. Options read here: ``--backend torch|jax`` (default:
``jax`` when the function's module imports JAX and not PyTorch, else
``torch``), ``--inner-lr`` (the step size ``alpha``, default 1.5), ``--seed``
(the random MDP and the Monte-Carlo samples), ``--title``, ``--json PATH``.
Exit codes: 0 unbiased, 1 biased (named or unexplained), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from reference.errors import InvalidInputError


def _guess_backend(fn: Callable[..., Any]) -> str:
    mod = sys.modules.get(getattr(fn, "__module__", "") or "")
    names = set(vars(mod)) if mod is not None else set()
    glob = getattr(fn, "__globals__", {})
    has = {k for k in ("torch", "jax", "jnp") if k in names or k in glob}
    return "jax" if has & {"jax", "jnp"} and "torch" not in has else "torch"


def run_maml_rl(args: argparse.Namespace) -> int:
    """Run the MAML-RL audit for the parsed ``metaverify audit`` arguments; print the verdict; exit code."""
    from verify.commands.audit import load_target
    from verify.rl_audit import audit_function, default_problem

    if getattr(args, "library", None):
        raise InvalidInputError("--library has no MAML-RL implementation; give TARGET (path/to/file.py:function)")
    if args.target is None:
        raise InvalidInputError("give TARGET (path/to/file.py:function) to audit with --algorithm maml-rl")
    fn = load_target(args.target)
    backend = args.backend or _guess_backend(fn)
    alpha = 1.5 if args.inner_lr is None else float(args.inner_lr)
    problem = default_problem(args.seed, alpha=alpha)
    result = audit_function(fn, backend, problem=problem, seed=args.seed, title=args.title)
    print(result.report())
    if getattr(args, "json", None):
        with open(args.json, "w") as fh:
            json.dump({"command": "audit", "target": args.target, "audit": result.to_dict()}, fh, indent=1)
    return 0 if result.passed else 1
