"""Measure the derivative-checking engine: estimator accuracy and the smallest caught gradient error.

Run from the repository root::

    python scripts/engine_sensitivity.py [--cases 200] [--seed 0]

A development script beside the engine tests, not one of ``benchmarks/``: it
draws its cases from the tests' generator (``tests/test_engine_cases.py``),
and ``benchmarks/`` imports nothing from ``tests/``.

Prints, for each directional-derivative method, the median and maximum relative
error against 30-digit mpmath (relative to max(|D|, ||g|| ||v||, |f|/max(1,||x||)))
and the largest true/reported error ratio (honesty: < 1 means every bound held);
then, for relative gradient errors delta = 1e-5 ... 1e-12
(``g + delta ||g|| u``, u a random unit vector), the fraction of cases
``check_gradient`` reports as "fail", in float64 (complex step, Richardson,
central) and float32 (float32 claimed gradient; and an f that computes in float32).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from test_engine_cases import FAMILIES, exact_directional, make_case  # noqa: E402

from verify import check_gradient, directional_derivative  # noqa: E402


def accuracy(cases: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows: dict[str, list[tuple[float, float]]] = {m: [] for m in ("complex", "central", "richardson")}
    for i in range(cases):
        case = make_case(FAMILIES[i % len(FAMILIES)], int(rng.integers(1, 13)), int(rng.integers(2**31)),
                         float(rng.choice([0.01, 0.3, 1.0, 3.0])))
        v = rng.standard_normal(case.n)
        exact = exact_directional(case, case.x, v, dps=30)
        scale = max(abs(exact), np.linalg.norm(case.grad(case.x)) * np.linalg.norm(v),
                    abs(case.f(case.x)) / max(1.0, np.max(np.abs(case.x))))
        if scale == 0:  # f identically 0 (Rosenbrock in 1-D)
            continue
        for m in rows:
            est = directional_derivative(case.f, case.x, v, method=m)
            true = abs(est.value - exact)
            rows[m].append((true / scale, true / est.error if est.error > 0 else (0.0 if true == 0 else np.inf)))
    print(f"directional_derivative accuracy over {cases} random smooth cases (n <= 12):")
    for m, r in rows.items():
        a = np.array(r)
        print(f"  {m:10s} median rel err {np.median(a[:, 0]):.1e}  max {a[:, 0].max():.1e}  "
              f"max true/reported error {a[:, 1].max():.2f}")


def sensitivity(cases: int, seed: int) -> None:
    d64 = [1e-6, 1e-7, 1e-8, 1e-9, 1e-10, 1e-11, 1e-12]
    d32 = [1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7]
    configs = ["float64 complex", "float64 richardson", "float64 central", "float32 grad (complex)",
               "float32 f (richardson)"]
    print(f"\nfraction of 'fail' for g + delta ||g|| u over {cases} random cases (n <= 30), 8 directions:")
    for cfg in configs:
        deltas = d32 if cfg.startswith("float32") else d64
        print("  " + " " * 24 + " ".join(f"{d:8.0e}" for d in deltas))
        rng = np.random.default_rng(seed)
        fails = np.zeros(len(deltas))
        false_alarms = 0
        for i in range(cases):
            case = make_case(FAMILIES[i % len(FAMILIES)], int(rng.integers(2, 31)), int(rng.integers(2**31)),
                             float(rng.choice([0.3, 1.0, 3.0])))
            u = rng.standard_normal(case.n)
            u /= np.linalg.norm(u)
            x, f, method = case.x, case.f, None
            if cfg.startswith("float64"):
                method = cfg.split()[1]
                g = case.grad(x)
            elif cfg.startswith("float32 grad"):
                x = x.astype(np.float32)
                g = case.grad(x.astype(np.float64))
            else:
                x = x.astype(np.float32)
                g = case.grad(x.astype(np.float64))

                def f(y, case=case):  # computes (and rounds its result) in float32
                    return np.float32(case.f(np.asarray(y).astype(np.float32).astype(np.float64)))
            gn = np.linalg.norm(g)
            if gn == 0:
                continue
            dt = np.float32 if cfg.startswith("float32") else np.float64
            false_alarms += check_gradient(f, g.astype(dt), x, method=method, seed=i).status == "fail"
            for j, d in enumerate(deltas):
                bad = (g + d * gn * u).astype(dt)
                fails[j] += check_gradient(f, bad, x, method=method, seed=i).status == "fail"
        print(f"  {cfg:24s}" + " ".join(f"{fr:8.2f}" for fr in fails / cases) + f"   false alarms: {false_alarms}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.time()
    accuracy(args.cases, args.seed)
    sensitivity(args.cases, args.seed)
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
