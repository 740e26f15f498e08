"""Cost of the exact meta-RL sums (``reference.rl``) versus ``S``, ``A``, ``H``, ``n``; the largest size under 10 s.

Usage, from the repository root::

    /work/main/.venv/bin/python benchmarks/bench_rl.py            # table on stdout
    /work/main/.venv/bin/python benchmarks/bench_rl.py --out reports/benchmarks --budget 10

What is timed, per size (random MDP, ``A`` actions, dense transitions):

* ``grad J``: :func:`reference.rl.meta_objective_and_gradient` (``T^n`` inner
  batches, value recursion with gradient at each adapted ``theta'``);
* ``E[DiCE]``: :func:`reference.rl.exact_expectation` of the DiCE estimator
  (``T^n`` inner batches times ``T`` outer trajectories).

``T = S (S A)^(H-1) A`` trajectories (dense transitions); the cost is linear in
``T^n`` (times ``T`` for the estimator). Four sweeps start from ``S = A = H = n
= 2`` (one dimension grows at a time); a sweep stops at the first size whose
time exceeds the budget (default 10 s), or earlier when the time predicted from
the previous size (per-batch cost times the new batch count) exceeds 3 budgets,
which is reported as "skipped (predicted ...)". Times are single runs
(min of ``--repeats``) on a shared machine: the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from reference.rl import batch_count, count_trajectories, exact_expectation, meta_objective_and_gradient  # noqa: E402
from reference.rl import random_mdp  # noqa: E402

BASE = {"S": 2, "A": 2, "H": 2, "n": 2}
SWEEPS = {"S": [2, 3, 4, 5, 6, 8, 10, 12, 16], "A": [2, 3, 4, 5, 6, 8, 10, 12], "H": [1, 2, 3, 4, 5, 6, 7],
          "n": [1, 2, 3, 4, 5, 6]}


def _time(fn, repeats: int) -> float:
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return float(best)


def measure(size: dict[str, int], what: str, repeats: int) -> tuple[float, int, int]:
    mdp = random_mdp(size["S"], size["A"], size["H"], seed=0)
    theta = np.random.default_rng(0).standard_normal((size["S"], size["A"]))
    T = count_trajectories(mdp)
    N = batch_count(mdp, size["n"])
    big = 10**12
    if what == "grad J":
        fn = lambda: meta_objective_and_gradient(mdp, theta, 0.5, size["n"], max_batches=big)  # noqa: E731
    else:
        fn = lambda: exact_expectation(mdp, theta, 0.5, size["n"], "dice", max_batches=big)  # noqa: E731
    return _time(fn, repeats), T, N


def work(T: int, N: int, what: str) -> int:
    return N if what == "grad J" else N * T


def run(budget: float = 10.0, repeats: int = 1) -> dict:
    rows = []
    largest: dict[str, dict[str, dict[str, int]]] = {}
    for what in ("grad J", "E[DiCE]"):
        largest[what] = {}
        for dim, values in SWEEPS.items():
            per_unit = None
            for v in values:
                size = dict(BASE, **{dim: v})
                mdp = random_mdp(size["S"], size["A"], size["H"], seed=0)
                T = count_trajectories(mdp)
                N = T ** size["n"]
                if per_unit is not None and per_unit * work(T, N, what) > 3 * budget:
                    rows.append(dict(what=what, sweep=dim, **size, T=T, batches=N, seconds=None,
                                     note=f"skipped (predicted {per_unit * work(T, N, what):.0f} s)"))
                    break
                sec, T, N = measure(size, what, repeats)
                per_unit = sec / work(T, N, what)
                rows.append(dict(what=what, sweep=dim, **size, T=T, batches=N, seconds=sec, note=""))
                print(f"{what:8s} {dim}: S={size['S']} A={size['A']} H={size['H']} n={size['n']}  T={T:>6d}  "
                      f"T^n={N:>9d}  {sec:8.3f} s", flush=True)
                if sec <= budget:
                    largest[what][dim] = size
                else:
                    break
    return {"rows": rows, "largest": largest, "budget": budget, "load": os.getloadavg()}


def markdown(res: dict) -> str:
    out = ["# Exact meta-RL sums: cost versus S, A, H, n", "",
           f"Load average at the end: {', '.join(f'{x:.1f}' for x in res['load'])} (shared 2-core machine). "
           "One-thread NumPy not enforced; single runs. Command: "
           "`/work/main/.venv/bin/python benchmarks/bench_rl.py --out reports/benchmarks`.", "",
           "| quantity | sweep | S | A | H | n | trajectories T | inner batches T^n | time |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        t = f"{r['seconds']:.3f} s" if r["seconds"] is not None else r["note"]
        out.append(f"| {r['what']} | {r['sweep']} | {r['S']} | {r['A']} | {r['H']} | {r['n']} | {r['T']} | "
                   f"{r['batches']} | {t} |")
    out += ["", f"Largest size per sweep with time <= {res['budget']:g} s (the other three at S = A = H = n = 2):", ""]
    for what, per in res["largest"].items():
        items = ", ".join(f"{dim} = {size[dim]}" for dim, size in per.items())
        out.append(f"* {what}: {items}")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=10.0, help="seconds (default 10)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=None, help="folder for rl-enumeration.md and rl-enumeration.json")
    args = ap.parse_args(argv)
    res = run(args.budget, args.repeats)
    text = markdown(res)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "rl-enumeration.md"), "w") as fh:
            fh.write(text)
        with open(os.path.join(args.out, "rl-enumeration.json"), "w") as fh:
            json.dump(res, fh, indent=1, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
