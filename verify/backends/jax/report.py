"""Figures of the JAX backend: agreement with the NumPy reference, jit vs eager, op checks.

Run from the repository root::

    python -m verify.backends.jax.report [--seeds N] [--no-eager] [--no-ops]

For every algorithm of ``verify.algorithms.ALGORITHMS`` (except the base
``mlp`` row) and seeds ``0..N-1`` (``verify.algorithms.build_case``), prints
the worst normwise relative error ``||g - g_ref|| / max(||g||, ||g_ref||)`` of
the meta-gradient (and of the meta-loss) against the reference in float64
and float32 under ``jax.jit``, and the worst relative difference between the
eager (``jit=False``) and jitted float64 and float32 results; then the table
of :func:`verify.backends.jax.ops.check_second_order_ops` for both dtypes.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from reference.models import flatten
from verify.algorithms import build_case, case_algorithms, evaluate


def _rel(a: Any, b: Any) -> float:
    a, b = flatten([np.asarray(x, dtype=np.float64) for x in a]), flatten([np.asarray(x, dtype=np.float64) for x in b])
    scale = max(np.linalg.norm(a), np.linalg.norm(b))
    return 0.0 if scale == 0 else float(np.linalg.norm(a - b) / scale)


def _rel_loss(a: Any, b: Any) -> float:
    if a is None or b is None:
        return 0.0
    return abs(float(a) - float(b)) / max(abs(float(b)), np.finfo(float).tiny)


def algorithm_table(seeds: int, eager: bool) -> list[dict[str, Any]]:
    import verify.backends.jax as backend

    rows = []
    for name in case_algorithms():
        if name == "mlp":
            continue
        row: dict[str, Any] = {"algorithm": name}
        t0 = time.perf_counter()
        for seed in range(seeds):
            case = build_case(name, seed=seed)
            loss_ref, g_ref = evaluate(case)
            for dtype in ("float64", "float32"):
                loss_j, g_j = evaluate(case, backend, dtype=dtype, jit=True)
                row[f"grad_{dtype}"] = max(row.get(f"grad_{dtype}", 0.0), _rel(g_j, g_ref))
                row[f"loss_{dtype}"] = max(row.get(f"loss_{dtype}", 0.0), _rel_loss(loss_j, loss_ref))
                if eager:
                    loss_e, g_e = evaluate(case, backend, dtype=dtype, jit=False)
                    row[f"jit_vs_eager_{dtype}"] = max(row.get(f"jit_vs_eager_{dtype}", 0.0), _rel(g_e, g_j),
                                                       _rel_loss(loss_e, loss_j))
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m verify.backends.jax.report", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="problems per algorithm (build_case seeds 0..N-1)")
    parser.add_argument("--no-eager", action="store_true", help="skip the jit=False runs (slow: op-by-op compiles)")
    parser.add_argument("--no-ops", action="store_true", help="skip the second-order op checks")
    args = parser.parse_args(argv)

    import jax

    from verify.backends.jax.ops import check_second_order_ops

    print(f"JAX {jax.__version__} on {jax.devices()[0].platform}; seeds 0..{args.seeds - 1} per algorithm")
    cols = ["grad_float64", "loss_float64", "grad_float32", "loss_float32"]
    if not args.no_eager:
        cols += ["jit_vs_eager_float64", "jit_vs_eager_float32"]
    print(f"{'algorithm':12s} " + " ".join(f"{c:>20s}" for c in cols) + f" {'seconds':>8s}")
    for row in algorithm_table(args.seeds, not args.no_eager):
        print(f"{row['algorithm']:12s} " + " ".join(f"{row[c]:20.2e}" for c in cols) + f" {row['seconds']:8.1f}")
    if not args.no_ops:
        for dtype in ("float64", "float32"):
            print(f"\nsecond-order op checks, {dtype} (HVPs vs Richardson of the float64 gradient)")
            for r in check_second_order_ops(dtype=dtype):
                err = "-" if r["error"] is None else f"{r['error']:.2e}"
                tol = "-" if r["tolerance"] is None else f"{r['tolerance']:.2e}"
                print(f"  {r['op']:50s} {r['status']:11s} error {err:>9s}  tol {tol:>9s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
