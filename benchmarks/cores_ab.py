"""The ceiling of any 2-worker pool: one process against two at once, no threads, no GIL (issue 18).

Usage::

    python benchmarks/cores_ab.py ALGO LABEL ROUNDS

ALGO/LABEL: a case of ``benchmarks.bench_speed.CASES`` (e.g. ``r2d2 8-256-256``). The reference call
runs with one BLAS thread and its task pool off, ROUNDS times in one process, then in two processes
at once (each ROUNDS times), then in one process again. Printed: the median call time alone and
side by side, and their ratio. With two independent cores the ratio is ~1.0 and a perfect pool
would halve the call; a ratio r above 1 (cores sharing a physical core, caches or memory
bandwidth) caps the pool's speed-up at 2 / r, whatever the GIL does. Meaningful only on an
otherwise idle machine.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _worker(algo: str, label: str, rounds: int, start, out) -> None:
    from threadpoolctl import threadpool_limits

    from benchmarks import bench_speed
    from reference import _threads

    threadpool_limits(1)
    _threads.PARALLEL_MIN_WORK = float("inf")
    fn = bench_speed.CASES[algo][0](label, False)[1]["reference"]
    fn()
    start.wait()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    out.put(float(np.median(times)))


def _run(algo: str, label: str, rounds: int, procs: int) -> float:
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(procs), ctx.Queue()
    ps = [ctx.Process(target=_worker, args=(algo, label, rounds, start, out)) for _ in range(procs)]
    for p in ps:
        p.start()
    results = [out.get() for _ in ps]
    for p in ps:
        p.join()
    return float(np.median(results))


def main(argv: list[str]) -> int:
    algo, label, rounds = argv[0], argv[1], int(argv[2])
    alone = [_run(algo, label, rounds, 1)]
    pair = _run(algo, label, rounds, 2)
    alone.append(_run(algo, label, rounds, 1))
    one = float(np.mean(alone))
    print(f"{algo} {label}: alone {one * 1e3:.1f} ms ({alone[0] * 1e3:.1f}, {alone[1] * 1e3:.1f}), two processes at "
          f"once {pair * 1e3:.1f} ms each: ratio {pair / one:.2f}, pool ceiling {2 * one / pair:.2f}x "
          f"(load {os.getloadavg()[0]:.1f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
