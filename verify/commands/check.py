"""``metaverify check``: the algorithm x backend x dtype matrix.

Exit 0 when every cell that ran passed, 1 when something failed or was
inconclusive, 2 for usage errors or a backend that is requested but not
installed.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from reference.errors import InvalidInputError
from verify._output import Progress, check_writable, results_document, write_json, write_junit
from verify.algorithms import ALGORITHMS, BACKBONE_ALGORITHMS, BACKBONES, case_algorithms, default_algorithms
from verify.backends import BACKENDS, BackendUnavailableError, available_backends, is_available, load_backend
from verify.commands import positive_int
from verify.commands import seed as seed_type
from verify.matrix import DTYPES, PRECISIONS, UNSUPPORTED, MatrixResult, plan, run_matrix
from verify.tolerance import TF32

DEFAULT_EXAMPLES = 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", action="append", choices=[*BACKENDS, "all"], metavar="{numpy,torch,jax,all}",
                   help="backend(s) to check; repeatable (default: every installed backend)")
    p.add_argument("--algorithm", nargs="+", action="extend", metavar="NAME",
                   help=f"algorithms to check: {', '.join(ALGORITHMS)} (default: all but "
                        f"{', '.join(sorted(set(case_algorithms()) - set(default_algorithms()))) or 'none'}, "
                        "which lengthen the matrix: name them to check them)")
    p.add_argument("--dtype", choices=[*PRECISIONS, "all"], default="all",
                   help="precision (default: all = float64 and float32, plus tf32 with --device cuda). tf32 is "
                        "float32 with TensorFloat-32 matrix products: on the GPU for torch and JAX, emulated on "
                        "the CPU for torch")
    p.add_argument("--backbone", action="append", choices=["mlp", *BACKBONES, "conv4", "all"], metavar="NAME",
                   help="problems to check on, repeatable: mlp (each algorithm's random MLP; the default), "
                        f"{', '.join(BACKBONES)} (a small Conv4 with train-mode batch norm and max-pooling, cells "
                        f"named maml[conv4:1x8x8], for {', '.join(BACKBONE_ALGORITHMS)}), conv4 (both), all "
                        "(mlp and both). The conv4 cells take ~10 min on 2 CPU cores, mostly JAX compiling")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device for torch/JAX (default: cpu)")
    p.add_argument("--examples", type=positive_int, default=DEFAULT_EXAMPLES,
                   help=f"random problems per cell (default: {DEFAULT_EXAMPLES})")
    p.add_argument("--seed", type=seed_type, default=0, help="seed of the generated problems (default: 0)")
    p.add_argument("--shard", metavar="I/N", help="run only shard I of N (1-based), for CI matrices")
    p.add_argument("--json", metavar="PATH", help="write the results (versioned schema) to PATH")
    p.add_argument("--junit", metavar="PATH", help="write JUnit XML to PATH")
    p.add_argument("--verbose", "-v", action="store_true", help="print every failing check in full")


def _backbones(requested: list[str] | None) -> list[str]:
    """``--backbone`` values -> the ordered list of problem kinds (``mlp`` and :data:`BACKBONES` names)."""
    out: list[str] = []
    for b in requested or ["mlp"]:
        if b == "all":
            out += ["mlp", *BACKBONES]
        elif b == "conv4":
            out += [name for name in BACKBONES if name.startswith("conv4:")]
        else:
            out.append(b)
    return list(dict.fromkeys(out))


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        i, n = (int(t) for t in text.split("/"))
    except ValueError:
        raise InvalidInputError(f"--shard={text!r} must look like I/N, e.g. 1/4") from None
    if not (n >= 1 and 1 <= i <= n):
        raise InvalidInputError(f"--shard={text!r} needs 1 <= I <= N")
    return i, n


def _fmt(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2e}"


def format_table(result: MatrixResult) -> str:
    header = ("algorithm", "backend", "dtype", "verdict", "worst error", "tolerance", "examples", "time")
    rows = [header]
    for c in result.cells:
        rows.append((c.algorithm, c.backend, c.dtype, c.status.upper() if c.status != "pass" else "pass",
                     _fmt(c.worst_error) if c.cases else "-", _fmt(c.tolerance) if c.cases else "-",
                     str(len(c.cases)), f"{c.seconds:.1f}s"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _details(result: MatrixResult, verbose: bool) -> list[str]:
    out = []
    for c in result.cells:
        if c.status == UNSUPPORTED:
            out.append(f"- {c.algorithm}/{c.backend}/{c.dtype}: unsupported: {c.note}")
            continue
        bad = [r for r in c.cases if r.status != "pass"]
        for r in bad[: None if verbose else 1]:
            out.append(f"- {c.algorithm}/{c.backend}/{c.dtype} {r.status.upper()}: {r.description}")
            for k in r.checks:
                if k["status"] != "pass":
                    detail = k["detail"] if verbose else k["detail"].splitlines()[0]
                    out.append(f"    {k['check']}: {k['status']} error={_fmt(k['error'])} "
                               f"tol={_fmt(k['tolerance'])}: {detail}")
    return out


def junit_cases(result: MatrixResult) -> list[dict[str, Any]]:
    cases = []
    for c in result.cells:
        detail = "\n".join(_details(MatrixResult([c], result.seed, result.examples), True))
        cases.append({
            "classname": f"metaverify.check.{c.backend}.{c.dtype}", "name": c.algorithm,
            "status": c.status if c.status in ("pass", "fail") else "skipped",
            "message": f"{c.status}: worst error {_fmt(c.worst_error)} (tolerance {_fmt(c.tolerance)})",
            "detail": detail or c.note, "seconds": c.seconds,
        })
    return cases


def run(args: argparse.Namespace) -> int:
    if args.examples < 1:
        raise InvalidInputError(f"--examples={args.examples} must be >= 1")
    algorithms = args.algorithm or list(default_algorithms())
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown:
        raise InvalidInputError(f"unknown algorithm(s) {unknown}; choose from {', '.join(case_algorithms())}")
    own = [a for a in algorithms if ALGORITHMS[a].audit]
    if own:
        raise InvalidInputError(f"{', '.join(own)} has no check-matrix cell (its reference is checked by the test "
                                f"suite); audit an implementation with: metaverify audit FILE.py:fn --algorithm {own[0]}")
    requested = args.backend or []
    if not requested or "all" in requested:
        backends = available_backends()
    else:
        backends = list(dict.fromkeys(requested))
        for b in backends:
            if not is_available(b):
                raise BackendUnavailableError(
                    f"backend {b!r} is requested but {BACKENDS[b][1]} is not installed; install it with: "
                    f"{BACKENDS[b][2]}")
    if args.dtype == "all":
        # on a GPU the effect of TF32 on float32 meta-gradients is reported, not hidden
        dtypes = [*DTYPES, TF32] if args.device == "cuda" else list(DTYPES)
    else:
        dtypes = [args.dtype]
    if TF32 in dtypes and args.device == "cpu" and "torch" not in backends:
        raise InvalidInputError(f"--dtype tf32 on the CPU is emulated for torch only; backends {backends} have no "
                                "TF32 there: add --backend torch, or run on a GPU with --device cuda")
    if args.device == "cuda":
        _require_cuda(backends)
    if args.json:
        check_writable(args.json, "--json")
    if args.junit:
        check_writable(args.junit, "--junit")
    for b in backends:
        load_backend(b)  # installed but failing to import: a clear error now, not a crash mid-run
    backbones = _backbones(args.backbone)
    cells = plan(algorithms, backends, dtypes, backbones)
    if not cells and backbones != ["mlp"]:
        raise InvalidInputError(f"no cell to run: --backbone {' '.join(backbones)} has cells for "
                                f"{', '.join(BACKBONE_ALGORITHMS)} only (asked: {', '.join(algorithms)})")
    shard = _parse_shard(args.shard)
    if shard:
        i, n = shard
        cells = cells[i - 1 :: n]
    if not cells:
        raise InvalidInputError(empty_selection_reason(algorithms, backends, dtypes, shard, len(plan(
            algorithms, backends, dtypes, backbones))))
    bar = Progress(len(cells), label="metaverify check ")
    try:
        result = run_matrix(algorithms, backends, dtypes, examples=args.examples, seed=args.seed, cells=cells,
                            progress=bar.step, device=args.device)
    finally:
        bar.close()
    print(format_table(result))
    details = _details(result, args.verbose)
    if details:
        print("\n" + "\n".join(details))
    counts = {s: sum(c.status == s for c in result.cells) for s in ("pass", "fail", "inconclusive", UNSUPPORTED)}
    print(f"\n{counts['pass']} passed, {counts['fail']} failed, {counts['inconclusive']} inconclusive, "
          f"{counts[UNSUPPORTED]} unsupported ({len(result.cells)} cells, {args.examples} example(s) each, "
          f"seed {args.seed})")
    argv = sys.argv[1:] if sys.argv and sys.argv[0].endswith(("metaverify", "__main__.py")) else []
    if args.json:
        data = result.to_dict()
        # timings vary run to run: keep them out of the deterministic part of the document
        timings = {f"{c['algorithm']}/{c['backend']}/{c['dtype']}": c.pop("seconds") for c in data["cells"]}
        doc = results_document(argv or ["check"], {"check": data}, device=args.device)
        doc["generated"]["seconds"] = timings
        write_json(args.json, doc)
    if args.junit:
        write_junit(args.junit, "metaverify check", junit_cases(result))
    return 0 if result.status == "pass" else 1


def empty_selection_reason(algorithms: list[str], backends: list[str], dtypes: list[str],
                           shard: tuple[int, int] | None, planned: int) -> str:
    """Why a selection of the matrix holds no cell, and what would select one."""
    if not backends:
        return ("no backend to check: none of numpy, torch, jax is installed or selected; install one "
                "(pip install 'metaverify[torch]') or pass --backend")
    if shard and planned:
        return (f"--shard {shard[0]}/{shard[1]} is empty: the selection has {planned} cell(s), fewer than "
                f"{shard[1]} shards; use at most {planned} shards")
    why = []
    if set(backends) == {"numpy"} and "float64" not in dtypes:
        why.append(f"the numpy reference is float64 only (--dtype {' '.join(dtypes)} was asked)")
    if set(algorithms) == {"mlp"} and "numpy" not in backends:
        why.append("the base 'mlp' check runs on the numpy backend only")
    reason = "; ".join(why) or "no (algorithm, backend, dtype) combination is supported"
    return (f"the selection --algorithm {' '.join(algorithms)} --backend {' '.join(backends)} --dtype "
            f"{' '.join(dtypes)} holds no check: {reason}; widen the selection")


def _require_cuda(backends: list[str]) -> None:
    if "torch" in backends:
        import torch

        if not torch.cuda.is_available():
            raise InvalidInputError("--device cuda: torch sees no CUDA device on this machine; use --device cpu")
    if "jax" in backends:
        import jax

        if not any(d.platform == "gpu" for d in jax.devices()):
            raise InvalidInputError("--device cuda: JAX sees no GPU on this machine (install a CUDA jaxlib) "
                                    "or use --device cpu")
