"""Figures for the torch backend: worst relative error vs the NumPy reference, per algorithm and dtype.

Not a test (no assertions): run it to reproduce the numbers in the issue note::

    python tests/torch/report_torch_backend.py --examples 10 --seed 0

For each algorithm, ``--examples`` random problems from ``verify.algorithms.build_case``
are run through ``verify.backends.torch`` in float64 and float32 and compared with the
reference: normwise ``||g - g_ref|| / max(||g||, ||g_ref||)`` over all differentiated
variables, and ``|l - l_ref| / |l_ref|`` for the loss. ``kappa`` is the sensitivity of the
reference gradient to rounding its inputs to float32 (``verify.matrix.float32_condition``).
The second-order op table follows (``python -m verify.backends.torch.ops``).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--algorithm", nargs="*", default=None)
    parser.add_argument("--no-ops", action="store_true")
    args = parser.parse_args(argv)

    import verify.backends.torch as tb
    from verify.algorithms import build_case, case_algorithms, evaluate
    from verify.matrix import float32_condition

    names = args.algorithm or [a for a in case_algorithms() if a != "mlp"]
    print(f"{'algorithm':12s} {'float64 grad':>12s} {'float64 loss':>12s} {'float32 grad':>12s} "
          f"{'float32 loss':>12s} {'max kappa32':>11s} {'time':>6s}")
    for name in names:
        t0 = time.perf_counter()
        worst = {"float64": [0.0, 0.0], "float32": [0.0, 0.0]}
        kappa = 1.0
        for i in range(args.examples):
            case = build_case(name, seed=args.seed * 1_000_000 + i)
            loss_ref, g_ref = evaluate(case)
            g_ref = np.concatenate([np.ravel(g) for g in g_ref])
            kappa = max(kappa, float32_condition(case, g_ref))
            for dtype in ("float64", "float32"):
                loss, g = evaluate(case, tb, dtype=dtype)
                g = np.concatenate([np.ravel(np.asarray(x, dtype=np.float64)) for x in g])
                scale = max(np.linalg.norm(g), np.linalg.norm(g_ref))
                worst[dtype][0] = max(worst[dtype][0], float(np.linalg.norm(g - g_ref) / scale) if scale else 0.0)
                if loss_ref is not None:
                    worst[dtype][1] = max(worst[dtype][1], abs(loss - loss_ref) / abs(loss_ref))
        loss_cols = [f"{worst[d][1]:12.2e}" if name != "reptile" else f"{'-':>12s}" for d in ("float64", "float32")]
        print(f"{name:12s} {worst['float64'][0]:12.2e} {loss_cols[0]} {worst['float32'][0]:12.2e} {loss_cols[1]} "
              f"{kappa:11.1f} {time.perf_counter() - t0:5.1f}s")
    sys.stdout.flush()
    if not args.no_ops:
        from verify.backends.torch.ops import _main

        print()
        _main(["--seed", str(args.seed)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
