"""``metaverify audit``: audit someone's meta-gradient implementation and diagnose the bug.

``metaverify audit TARGET --algorithm NAME [--backend torch|jax] [--model mlp:1-40-40-1:tanh[:nobias]]
[--loss mse|ce] [--inner-lr A] [--inner-steps K] [--tasks N] [--shots K] [--queries Q] [--n-way C]
[--lam L] [--seed S] [--directions N] [--thorough] [--approximation SPEC] [--json PATH] [--junit PATH] [--title TEXT]``

``TARGET`` is ``path/to/file.py:function`` or ``package.module:function``;
``--library higher|torchopt|learn2learn`` instead of ``TARGET`` audits that
library's idiomatic implementation (:mod:`verify.adapters`). ``--algorithm maml-rl``
(a row with an audit of its own) goes to :mod:`verify.commands.audit_rl`. Exit codes: 0
verified, 1 mismatch, 2 usage or bad input (file or function missing, the
function raises -- its traceback is shown --, non-scalar or non-finite output,
wrong number of gradients).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from reference.errors import InvalidInputError
from reference.formatting import article
from verify.auditing.problem import check_options_apply
from verify.commands import nonnegative_int, positive_int
from verify.commands import seed as seed_type

LIBRARIES = ("higher", "torchopt", "learn2learn")


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; use true or false")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="?", metavar="TARGET",
                   help="the function to audit: path/to/file.py:function or package.module:function")
    p.add_argument("--library", choices=LIBRARIES, help="audit this library's idiomatic implementation instead")
    from verify.algorithms import auditable

    choices = auditable()  # the rows with an audit calling contract, read when the parser is built
    p.add_argument("--algorithm", required=True, choices=choices, metavar="NAME",
                   help=f"the algorithm the function implements: {', '.join(choices)}")
    p.add_argument("--backend", choices=("torch", "jax"),
                   help="calling contract (default: jax if the function's 2nd parameter is apply_fn, else torch)")
    p.add_argument("--model", metavar="SPEC", help="model spec mlp:SIZES[:ACTIVATION][:nobias], e.g. mlp:1-40-40-1:tanh; "
                   "conv4:1x28x28:5[:hidden=64], resnet12:3x84x84:5, or FILE.py:factory[:CxHxW] (your torch module) "
                   "(default: a small random MLP drawn from the seed)")
    p.add_argument("--loss", choices=("mse", "ce"), help="task loss of the gradient-based algorithms")
    p.add_argument("--inner-lr", type=float, metavar="A", help="inner learning rate (Meta-SGD: base of the lrs)")
    p.add_argument("--inner-steps", type=positive_int, metavar="K", help="inner steps")
    p.add_argument("--tasks", type=positive_int, metavar="N", dest="n_tasks", help="tasks in the meta-batch")
    p.add_argument("--shots", type=positive_int, metavar="K", help="support examples (per class for classification)")
    p.add_argument("--queries", type=positive_int, metavar="Q", help="query examples (per class for classification)")
    p.add_argument("--n-way", type=positive_int, metavar="C", help="classes per task (backbone algorithms)")
    p.add_argument("--lam", type=float, metavar="L", help="iMAML proximal weight / R2-D2 and LR-D2 ridge")
    p.add_argument("--scale", type=float, help="R2-D2/LR-D2 logit scale")
    p.add_argument("--offset", type=float, help="R2-D2/LR-D2 logit offset")
    p.add_argument("--damping", type=float, help="Newton-MAML damping")
    p.add_argument("--bias-column", type=_bool, metavar="BOOL", help="R2-D2/LR-D2: append a ones column")
    p.add_argument("--normalize", type=_bool, metavar="BOOL", help="R2-D2: divide Z and Y by sqrt(n)")
    p.add_argument("--form", choices=("primal", "dual"), help="R2-D2 ridge form")
    p.add_argument("--newton-steps", type=positive_int, metavar="K", help="LR-D2 Newton steps")
    p.add_argument("--seed", type=seed_type, default=0,
                   help="seed of the problem and the random directions (default 0)")
    p.add_argument("--directions", type=nonnegative_int, default=4,
                   help="random directions of the full finite-difference check of the function's own meta-loss "
                        "(default 4; 0 skips every finite-difference check)")
    p.add_argument("--thorough", action="store_true",
                   help="run the full finite-difference check even when the gradient matches the reference "
                        "(default: only on a mismatch; a match is confirmed in one direction, ~5 evaluations)")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                   help="float64 (default): the audit in float64; a function whose result depends on torch's default "
                        "dtype is re-run with float64 as the default and named as float32 constants when that "
                        "verifies. float32: the whole audit in float32 with float32's tolerances (torch)")
    p.add_argument("--approximation", metavar="SPEC",
                   help="a declared approximation to verify the gradient against, reporting its distance from the "
                        "exact meta-gradient: first_order, truncated:K, stop_gradient, inner_steps:N (maml, anil, "
                        "maml-momentum, maml-adam, anil-adam, lstm-optimizer, meta-lstm; metasgd and mamlpp: no "
                        "stop_gradient, mamlpp no inner_steps:N) or cg:M, inner_steps:N, damping:D (imaml: the "
                        "authors' solver, inner step --inner-lr, default 0.05), joined by '+', e.g. "
                        "cg:5+inner_steps:16")
    p.add_argument("--json", metavar="PATH", help="write the verdict (versioned schema, docs/audit.md) to PATH")
    p.add_argument("--junit", metavar="PATH", help="write JUnit XML to PATH")
    p.add_argument("--title", default="", metavar="TEXT", help="a label for the report")


def _traceback_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()


def load_target(spec: str) -> Callable[..., Any]:
    """Resolve ``path/to/file.py:function`` or ``package.module:function`` to the function.

    Raises:
        InvalidInputError: malformed spec, missing file/module/function, or an
            error while importing (with its traceback).
    """
    if ":" not in spec:
        raise InvalidInputError(f"TARGET={spec!r} must look like path/to/file.py:function or package.module:function")
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise InvalidInputError(f"TARGET={spec!r} must look like path/to/file.py:function or package.module:function")
    is_path = where.endswith(".py") or "/" in where or "\\" in where
    if is_path:
        path = Path(where)
        if not path.is_file():
            raise InvalidInputError(f"TARGET={spec!r}: file {where!r} does not exist")
        module_name = f"_metaverify_target_{abs(hash(str(path.resolve())))}"
        mod_spec = importlib.util.spec_from_file_location(module_name, path)
        if mod_spec is None or mod_spec.loader is None:
            raise InvalidInputError(f"TARGET={spec!r}: {where!r} cannot be imported as a Python file")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[module_name] = module
        folder = str(path.resolve().parent)
        sys.path.insert(0, folder)  # so the file can import its siblings
        try:
            mod_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(module_name, None)
            raise InvalidInputError(f"TARGET={spec!r}: importing {where!r} raised {type(exc).__name__}: {exc}\n"
                                    f"{_traceback_text(exc)}") from exc
        finally:
            if folder in sys.path:
                sys.path.remove(folder)
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as exc:
            if exc.name and where.startswith(exc.name):
                raise InvalidInputError(f"TARGET={spec!r}: module {where!r} not found (is it on PYTHONPATH?)") from exc
            raise InvalidInputError(f"TARGET={spec!r}: importing {where!r} raised {exc}\n{_traceback_text(exc)}") from exc
        except Exception as exc:
            raise InvalidInputError(f"TARGET={spec!r}: importing {where!r} raised {type(exc).__name__}: {exc}\n"
                                    f"{_traceback_text(exc)}") from exc
    obj: Any = module
    for part in name.split("."):
        if not hasattr(obj, part):
            available = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise InvalidInputError(f"TARGET={spec!r}: {where!r} has no function {name!r}; callables there: "
                                    f"{', '.join(available) or '(none)'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InvalidInputError(f"TARGET={spec!r}: {name!r} is {article(type(obj).__name__)}, not a function")
    return obj


def check_problem_size(algorithm: str, model: str | None, **sizes: Any) -> None:
    """Refuse, before any work, a problem whose memory estimate exceeds the memory available."""
    from verify._limits import check_problem_fits
    from verify.auditing.problem import parse_model

    spec = parse_model(model) if model is not None and model.startswith("mlp:") else None
    check_problem_fits(algorithm, sizes=spec["sizes"] if spec else None, **sizes)


def run(args: argparse.Namespace) -> int:
    from verify._calls import print_once
    from verify._output import check_writable, results_document, write_json, write_junit
    from verify.auditing import audit

    from verify.algorithms import ALGORITHMS

    if ALGORITHMS[args.algorithm].audit:  # e.g. maml-rl: trajectory batches instead of a Case
        if args.approximation:
            raise InvalidInputError(f"approximation={args.approximation!r} does not apply to algorithm="
                                    f"{args.algorithm!r}: its audit has no declared approximations")
        from verify.commands.audit_rl import run_maml_rl

        return run_maml_rl(args)
    if (args.target is None) == (args.library is None):
        raise InvalidInputError("give either TARGET (path/to/file.py:function or package.module:function) or "
                                "--library higher|torchopt|learn2learn, not both or neither")
    # Everything that can be refused is refused before the target is imported or anything runs.
    if args.json:
        check_writable(args.json, "--json")
    if args.junit:
        check_writable(args.junit, "--junit")
    given = {k: getattr(args, k) for k in (
        "model", "loss", "inner_lr", "inner_steps", "n_tasks", "shots", "queries", "n_way", "lam", "scale", "offset",
        "damping", "bias_column", "normalize", "form", "newton_steps")}
    if args.approximation and args.approximation.strip() not in ("", "exact"):
        from verify import inner_audit

        # a malformed or inapplicable declaration is the first thing to say
        if inner_audit.declare(args.algorithm, args.approximation).kind == "imaml":
            given.pop("inner_lr")  # the iMAML authors' solver's inner step (docs/audit.md)
    check_options_apply(args.algorithm, given)
    check_problem_size(args.algorithm, args.model, n_tasks=args.n_tasks, shots=args.shots, queries=args.queries,
                       n_way=args.n_way, inner_steps=args.inner_steps, loss=args.loss)
    if args.library:
        from verify.adapters import load_adapter

        fn = load_adapter(args.library, args.algorithm)
        backend = "torch"
        title = args.title or f"{args.library} ({args.algorithm})"
    else:
        fn = load_target(args.target)
        backend = args.backend
        title = args.title
    fn = print_once(fn)
    result = audit(
        fn, args.algorithm, backend, model=args.model, loss=args.loss, inner_lr=args.inner_lr,
        inner_steps=args.inner_steps, n_tasks=args.n_tasks, shots=args.shots, queries=args.queries,
        n_way=args.n_way, lam=args.lam, scale=args.scale, offset=args.offset, damping=args.damping,
        bias_column=args.bias_column, normalize=args.normalize, form=args.form, newton_steps=args.newton_steps,
        seed=args.seed, directions=args.directions, thorough=args.thorough, title=title, dtype=args.dtype,
        approximation=args.approximation,
    )
    note = fn.output.note()
    if note:
        result.notes.append(note)
    print(result.report())
    argv = sys.argv[1:] if sys.argv and sys.argv[0].endswith(("metaverify", "__main__.py")) else []
    if args.json:
        write_json(args.json, results_document(argv or ["audit", args.target or f"--library={args.library}"],
                                               {"audit": result.to_dict()}))
    if args.junit:
        write_junit(args.junit, "metaverify audit", result.junit_cases())
    return 0 if result.passed else 1
