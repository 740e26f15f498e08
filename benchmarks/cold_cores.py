"""Does a second core get going at once after the process idles? (issue 18, session 8)

Usage: ``python benchmarks/cold_cores.py [ROUNDS]``, or ``python benchmarks/cold_cores.py --after torch|jax``.
Two threads each run 40 products of 130 x 256 by
256 x 256 (one BLAS thread each, NumPy releases the GIL inside BLAS) after the process has slept 0, 10, 50,
100 or 300 ms; prints each call's wall time and the CPU time it got per wall second (2.0: both threads ran
throughout), then one thread's time for the same 40 products. On the 2-core VM of session 8 (AMD EPYC) the
calls after 50 ms or more of idleness often read 1.2-1.4 cores and took 1.4-1.6x the back-to-back time: the
pool's measurement (reference/_threads.py) then reads a starved call on an idle machine. With ``--after
LIB``: benchmark 1's MAML 1-256-256-1 call of LIB, a sleep, then the reference's call (its pooled call's cores
per wall second as the thread policy measures them), 4 times per sleep. Figures: docs/benchmarks.md ("eighth
pass").
"""
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_limits

if len(sys.argv) > 2 and sys.argv[1] == "--after":
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import bench_speed
    from reference import _threads

    _, fns = bench_speed.CASES["maml"][0]("1-256-256-1", False)
    seen: list[float] = []
    record = _threads._record

    def _spy(fn, work, cpu, wall, items=1):  # noqa: ANN001, ANN202 - the policy's own reading, passed on
        seen.append(cpu / wall)
        return record(fn, work, cpu, wall, items)

    _threads._record = _spy
    for name in ("reference", sys.argv[2]):
        fns[name]()
    for delay in (0.0, 0.005, 0.02, 0.05, 0.1, 0.25, 0.5):
        res = []
        for _ in range(4):
            fns[sys.argv[2]]()
            time.sleep(delay)
            seen.clear()
            t0 = time.perf_counter()
            fns["reference"]()
            cores = f"{seen[0]:.2f} cores" if seen else "not pooled"
            res.append(f"{(time.perf_counter() - t0) * 1e3:.1f} ms / {cores}")
        print(f"after {sys.argv[2]} and {delay * 1e3:.0f} ms: " + ", ".join(res), flush=True)
    sys.exit(0)

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
rng = np.random.default_rng(0)
a, W = rng.standard_normal((130, 256)), rng.standard_normal((256, 256))


def work(_: object = None) -> None:
    for _ in range(40):
        a @ W


pool = ThreadPoolExecutor(2)
with threadpool_limits(1):
    work()
    for delay in (0.0, 0.01, 0.05, 0.1, 0.3):
        res = []
        for _ in range(rounds):
            time.sleep(delay)
            c0, t0 = time.process_time(), time.perf_counter()
            list(pool.map(work, range(2)))
            wall = time.perf_counter() - t0
            res.append(f"{wall * 1e3:.1f} ms / {(time.process_time() - c0) / wall:.2f} cores")
        print(f"after {delay * 1e3:.0f} ms idle: " + ", ".join(res), flush=True)
    t0 = time.perf_counter()
    work()
    print(f"one thread, the same products: {(time.perf_counter() - t0) * 1e3:.1f} ms")
