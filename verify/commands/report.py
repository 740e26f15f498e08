"""``metaverify report``: write an offline HTML/Markdown/JSON/JUnit report of the checks (``docs/report.md``).

Exit 0 when every check that ran passed (matrix cells, Taylor tests, audits),
1 when something failed or was inconclusive (the report is written either
way), 2 for usage errors, a backend requested but not installed, or an output
folder that must not be replaced.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from reference.errors import InvalidInputError
from verify.commands import positive_int
from verify.commands import seed as seed_type
from verify._output import Progress
from verify.algorithms import ALGORITHMS, case_algorithms
from verify.backends import BACKENDS, BackendUnavailableError, available_backends, is_available, load_backend
from verify.matrix import DTYPES, plan

DEFAULT_OUT = "reports/latest"
DEFAULT_TITLE = "metaverify report"
DEFAULT_EXAMPLES = 2
#: Backends of ``--quick`` when none is named: JAX's compile times alone can exceed a minute.
QUICK_BACKENDS = ("numpy", "torch")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=DEFAULT_OUT, metavar="FOLDER",
                   help=f"output folder, replaced atomically (default: {DEFAULT_OUT})")
    p.add_argument("--backend", action="append", choices=[*BACKENDS, "all"], metavar="{numpy,torch,jax,all}",
                   help="backend(s) of the check matrix; repeatable (default: every installed backend; "
                        f"with --quick: {' and '.join(QUICK_BACKENDS)})")
    p.add_argument("--algorithm", nargs="+", metavar="NAME",
                   help=f"algorithms (default: all): {', '.join(ALGORITHMS)}; with --audit and a single NAME, also "
                        "the algorithm the audited functions implement")
    p.add_argument("--dtype", choices=[*DTYPES, "all"], default="all", help="precision (default: all)")
    p.add_argument("--examples", type=positive_int, default=None,
                   help=f"random problems per cell (default: {DEFAULT_EXAMPLES}; 1 with --quick)")
    p.add_argument("--seed", type=seed_type, default=0, help="seed of the problems and directions (default: 0)")
    p.add_argument("--quick", action="store_true",
                   help="one problem per cell, NumPy and PyTorch only unless --backend is given, one "
                        "finite-difference figure")
    p.add_argument("--title", default=DEFAULT_TITLE, help=f"report title (default: {DEFAULT_TITLE!r})")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device for torch/JAX (default: cpu)")
    p.add_argument("--audit", action="append", metavar="TARGET", default=[],
                   help="audit an implementation too: path/to/file.py:function or package.module:function "
                        "(repeatable; needs exactly one --algorithm)")
    p.add_argument("--audit-library", action="append", metavar="NAME", default=[],
                   choices=["higher", "torchopt", "learn2learn"],
                   help="audit a library's idiomatic implementation too: higher, torchopt or learn2learn (repeatable)")
    p.add_argument("--audit-algorithm", metavar="NAME", default=None,
                   help="the algorithm the audited functions implement (default: the single --algorithm)")
    p.add_argument("--audit-backend", choices=["torch", "jax"], default=None,
                   help="backend of the audited functions (default: inferred from their signature)")
    p.add_argument("--audit-option", action="append", metavar="KEY=VALUE", default=[],
                   help="a problem option of verify.audit, e.g. inner_lr=0.1, inner_steps=2, model=mlp:2-8-1:tanh "
                        "(repeatable)")


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


#: ``verify.audit`` keywords the report sets itself.
_RESERVED_AUDIT_KEYS = ("fn", "algorithm", "backend", "title", "case")


def _audit_options(items: list[str]) -> dict[str, Any]:
    import inspect

    from verify.auditing import audit

    known = [k for k in inspect.signature(audit).parameters if k not in _RESERVED_AUDIT_KEYS]
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise InvalidInputError(f"--audit-option={item!r} must look like KEY=VALUE, e.g. inner_lr=0.1")
        if key not in known:
            raise InvalidInputError(f"--audit-option={item!r}: {key!r} is not an audit option; use one of "
                                    f"{', '.join(known)}")
        out[key] = _parse_value(value.strip())
    return out


def _backends(args: argparse.Namespace) -> list[str]:
    requested = args.backend or []
    if not requested:
        pool = QUICK_BACKENDS if args.quick else tuple(BACKENDS)
        return [b for b in pool if is_available(b)]
    if "all" in requested:
        return available_backends()
    backends = list(dict.fromkeys(requested))
    for b in backends:
        if not is_available(b):
            raise BackendUnavailableError(
                f"backend {b!r} is requested but {BACKENDS[b][1]} is not installed; install it with: {BACKENDS[b][2]}")
    return backends


def canonical_command(args: argparse.Namespace, backends: list[str], algorithms: list[str], examples: int) -> list[str]:
    """The command line that reproduces the report (resolved defaults made explicit)."""
    cmd = ["metaverify", "report", "--out", str(args.out), "--seed", str(args.seed)]
    if args.quick:
        cmd.append("--quick")
    for b in backends:
        cmd += ["--backend", b]
    if algorithms != list(ALGORITHMS):
        cmd += ["--algorithm", *algorithms]
    if args.dtype != "all":
        cmd += ["--dtype", args.dtype]
    cmd += ["--examples", str(examples)]
    if args.title != DEFAULT_TITLE:
        cmd += ["--title", args.title]
    if args.device != "cpu":
        cmd += ["--device", args.device]
    for target in args.audit:
        cmd += ["--audit", target]
    for lib in args.audit_library:
        cmd += ["--audit-library", lib]
    if args.audit_algorithm:
        cmd += ["--audit-algorithm", args.audit_algorithm]
    if args.audit_backend:
        cmd += ["--audit-backend", args.audit_backend]
    for opt in args.audit_option:
        cmd += ["--audit-option", opt]
    return cmd


def _human(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def run(args: argparse.Namespace) -> int:
    from verify.report import AuditRequest, ReportConfig, build_report
    from verify.report._build import check_output_folder

    examples = args.examples if args.examples is not None else (1 if args.quick else DEFAULT_EXAMPLES)
    if examples < 1:
        raise InvalidInputError(f"--examples={examples} must be >= 1")
    algorithms = list(dict.fromkeys(args.algorithm or case_algorithms()))
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown:
        raise InvalidInputError(f"unknown algorithm(s) {unknown}; choose from {', '.join(case_algorithms())}")
    own = [a for a in algorithms if ALGORITHMS[a].audit]
    if own:
        raise InvalidInputError(f"{', '.join(own)} is not part of the check-matrix report (its reference is checked by "
                                "the test suite; the meta-RL report is reports/meta-rl/, scripts/meta_rl_report.py)")
    audits = bool(args.audit or args.audit_library)
    audit_algorithm = args.audit_algorithm or (algorithms[0] if len(algorithms) == 1 else None)
    if audits and audit_algorithm is None:
        raise InvalidInputError("--audit/--audit-library need the algorithm the audited functions implement: give "
                                "--audit-algorithm NAME or exactly one --algorithm, e.g. --audit my.py:maml "
                                "--algorithm maml")
    if audit_algorithm is not None and audit_algorithm not in ALGORITHMS:
        raise InvalidInputError(f"--audit-algorithm={audit_algorithm!r} is unknown; choose from {', '.join(ALGORITHMS)}")
    if (args.audit_option or args.audit_backend or args.audit_algorithm) and not audits:
        raise InvalidInputError("--audit-option/--audit-backend/--audit-algorithm are given without --audit TARGET "
                                "or --audit-library")
    options = _audit_options(args.audit_option)
    if not args.title.strip():
        raise InvalidInputError(f"--title={args.title!r} is empty; give a title or leave the default")
    backends = _backends(args)
    dtypes = list(DTYPES) if args.dtype == "all" else [args.dtype]
    if args.device == "cuda":
        from verify.commands.check import _require_cuda

        _require_cuda(backends)
    check_output_folder(Path(args.out))  # fail before minutes of checks, not after
    for b in backends:
        load_backend(b)  # installed but failing to import: a clear error now
    if args.audit:
        from verify.commands.audit import check_options_apply, check_problem_size, load_target

        check_options_apply(audit_algorithm, {k: v for k, v in options.items() if k in (
            "model", "loss", "inner_lr", "inner_steps", "n_tasks", "shots", "queries", "n_way", "lam", "scale",
            "offset", "damping", "bias_column", "normalize", "form", "newton_steps")},
                            spell=lambda k: f"--audit-option {k}")

        sized: dict[str, Any] = {k: v if isinstance(v := options.get(k), int) and not isinstance(v, bool) and v > 0
                                 else None for k in ("n_tasks", "shots", "queries", "n_way", "inner_steps")}
        sized["loss"] = options.get("loss") if isinstance(options.get("loss"), str) else None
        check_problem_size(audit_algorithm, options.get("model") if isinstance(options.get("model"), str) else None,
                           **sized)
        for target in args.audit:
            load_target(target)  # a missing file or function is a usage error (exit 2), not a FAIL report

    config = ReportConfig(
        out=Path(args.out), algorithms=algorithms, backends=backends, dtypes=dtypes, examples=examples,
        seed=args.seed, quick=args.quick, title=args.title, device=args.device,
        audits=[AuditRequest(t, audit_algorithm, args.audit_backend, options) for t in args.audit]
        + [AuditRequest(f"--library={lib}", audit_algorithm, "torch", options, library=lib)
           for lib in args.audit_library],
        command=canonical_command(args, backends, algorithms, examples))
    differentiable = [a for a in algorithms if ALGORITHMS[a].differentiable]
    total = (len(plan(algorithms, backends, dtypes)) + len(differentiable)
             + (min(1, len(differentiable)) if args.quick else len(differentiable)) + len(algorithms)
             + len(args.audit) + len(args.audit_library) + 2)
    bar = Progress(total, label="metaverify report ")
    try:
        result = build_report(config, progress=bar.step)
    finally:
        bar.close()
    c = result.counts
    print(f"report written to {result.out}/ in {result.seconds:.1f} s: "
          + ", ".join(f"{name} {_human(size)}" for name, size in result.files.items() if "/" not in name)
          + f", {sum('/' in n for n in result.files)} figure files")
    line = (f"{result.status.upper()}: matrix {c['cells']['pass']} passed, {c['cells']['fail']} failed, "
            f"{c['cells']['inconclusive']} inconclusive, {c['cells']['unsupported']} unsupported; "
            f"Taylor tests {c['taylor']['pass']}/{sum(c['taylor'].values())} passed")
    if audits:
        line += f"; audits {c['audits']['pass']}/{sum(c['audits'].values())} verified"
    print(line)
    print(f"open {result.out / 'index.html'}")
    return 0 if result.status == "pass" else 1
