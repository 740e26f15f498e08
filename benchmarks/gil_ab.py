"""How much of a reference call holds the GIL: two checkouts, ONE process, a counter thread (issue 18).

Usage::

    python benchmarks/gil_ab.py OLD_ROOT NEW_ROOT ALGO LABEL ROUNDS [seq|policy]

ALGO/LABEL: a case of ``benchmarks.bench_speed.CASES`` (e.g. ``r2d2 8-256-256``). Both checkouts'
``reference`` packages are loaded as in ``benchmarks/ab_versions.py``. While a call runs, a second
Python thread increments a counter as fast as it can; it advances only while it holds the GIL, so its
rate during the call, as a fraction of its rate while the main thread sleeps, is the share of the time
the call leaves the GIL free (NumPy's BLAS calls, large ufunc loops and linear-algebra gufuncs release
it; Python code, small NumPy calls and SciPy's f2py wrappers of the non-threadsafe LAPACK routines
hold it). ``seq`` (default) runs the call in this thread as a worker of ``reference/_threads.py``'s
pool runs its share (no pool, worker code paths: one thread doing the work, so the other core is
the counter's); ``policy`` the shipped behaviour.

Printed per checkout: median wall and CPU time of the call with the counter running, and the median
counter rate during the call / idle. The counter competes for the GIL, so calls are slower than
without it (each return from a GIL-free call waits for the counter's switch interval, set here to
0.1 ms): compare the two checkouts, not these times with ``ab_versions``'s. Meaningful only when a
core is free for the counter (quote ``uptime``).
"""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))



class Counter:
    """A thread incrementing a counter while ``running``; ``rate()`` is its increments per second."""

    def __init__(self) -> None:
        self.count, self.running, self.stop = 0, False, False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self.stop:
            if self.running:
                n += 1
                self.count = n
            else:
                time.sleep(1e-4)

    def measure(self, fn) -> tuple[float, float, float]:
        """``(counter increments per second, wall s, CPU s)`` while ``fn()`` runs (``None``: sleep 50 ms)."""
        c0, n0 = time.process_time(), self.count
        self.running = True
        t0 = time.perf_counter()
        if fn is None:
            time.sleep(0.05)
        else:
            fn()
        wall = time.perf_counter() - t0
        self.running = False
        return (self.count - n0) / wall, wall, time.process_time() - c0


def _load(root: str, algo: str, label: str):
    """The reference call of a checkout's benchmark case and that checkout's ``reference._threads`` module."""
    for k in [k for k in sys.modules if k.split(".")[0] in ("reference", "benchmarks", "verify")]:
        del sys.modules[k]
    sys.path.insert(0, root)
    try:
        from benchmarks import bench_speed
        from reference import _threads

        return bench_speed.CASES[algo][0](label, False)[1]["reference"], _threads
    finally:
        sys.path.remove(root)


def main(argv: list[str]) -> int:
    old_root, new_root, algo, label, rounds = argv[:4] + [int(argv[4])]
    mode = argv[5] if len(argv) > 5 else "seq"
    fns = {}
    for k, root in (("old", old_root), ("new", new_root)):
        fns[k], threads = _load(os.path.abspath(root), algo, label)
        if mode == "seq":
            # This thread runs as one of the pool's workers would: map_tasks calls in it (no nested pool),
            # and the code paths chosen for workers (the MAML engine's GIL-free GEMM).
            threads._local.inside = True
    sys.setswitchinterval(1e-4)
    counter = Counter()
    for f in fns.values():
        f()
    rate: dict[str, list[float]] = {k: [] for k in fns}
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    idle: list[float] = []
    names = list(fns)
    for r in range(rounds):
        idle.append(counter.measure(None)[0])
        for k in names[r % 2:] + names[:r % 2]:
            x, w, c = counter.measure(fns[k])
            rate[k].append(x)
            wall[k].append(w)
            cpu[k].append(c)
    counter.stop = True
    base = float(np.median(idle))
    print(f"{algo} {label} mode={mode}: " + "; ".join(
        f"{k} wall {np.median(wall[k]) * 1e3:.1f} ms cpu {np.median(cpu[k]) * 1e3:.1f} ms, counter "
        f"{np.median(rate[k]) / base:.2f} of idle" for k in names) + f" (load {os.getloadavg()[0]:.1f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
