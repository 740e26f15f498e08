"""Two checkouts' reference against each other and torch, in ONE process, interleaved (issue 18).

Usage::

    python benchmarks/ab_versions.py OLD_ROOT NEW_ROOT ALGO LABEL ROUNDS [THREADS]

ALGO/LABEL: a case of ``benchmarks.bench_speed.CASES`` (e.g. ``imaml 1-256-256-1``). THREADS: ``1``
(default: BLAS pinned with threadpoolctl and ``torch.set_num_threads(1)`` for the whole run, the
figure least sensitive to other load) or ``default`` (the libraries' own thread settings).

Both checkouts' ``reference`` packages are imported into this process one after the other (the
first one's modules are dropped from ``sys.modules`` once its benchmark calls are built, so its
functions keep their own module globals). Each of the three calls (old reference, new reference,
torch) runs once untimed, then ROUNDS rounds whose order rotates; printed: medians of wall time
and of CPU time (``time.process_time``, all threads of the process) and the medians of the
per-round ratios new/old, old/torch, new/torch. Under load, CPU time is the steadier figure (wall
time includes waiting for a core). A reference module imported lazily inside a function would
come from NEW_ROOT for both; the benchmark cases' hot paths import at module level.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np


def _load(root: str, algo: str, label: str) -> dict:
    for k in [k for k in sys.modules if k.split(".")[0] in ("reference", "benchmarks", "verify")]:
        del sys.modules[k]
    sys.path.insert(0, root)
    try:
        from benchmarks import bench_speed

        return bench_speed.CASES[algo][0](label, False)[1]
    finally:
        sys.path.remove(root)


def main(argv: list[str]) -> int:
    old_root, new_root, algo, label, rounds = argv[:4] + [int(argv[4])]
    threads = argv[5] if len(argv) > 5 else "1"
    old = _load(os.path.abspath(old_root), algo, label)["reference"]
    fns = _load(os.path.abspath(new_root), algo, label)
    cfg = {"old": old, "new": fns["reference"], "torch": fns["torch"]}
    if threads == "1":
        import torch
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
        torch.set_num_threads(1)
    for f in cfg.values():
        f()
    wall: dict[str, list[float]] = {k: [] for k in cfg}
    cpu: dict[str, list[float]] = {k: [] for k in cfg}
    names = list(cfg)
    for r in range(rounds):
        for k in names[r % 3:] + names[:r % 3]:
            c0, t0 = time.process_time(), time.perf_counter()
            cfg[k]()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    for what, T in (("wall", wall), ("cpu", cpu)):
        def q(a: str, b: str) -> float:
            return float(np.median([x / y for x, y in zip(T[a], T[b])]))

        print(f"{algo} {label} threads={threads} {what}: "
              + ", ".join(f"{k} {np.median(v):.4g} s" for k, v in T.items())
              + f"; new/old {q('new', 'old'):.2f}, old/torch {q('old', 'torch'):.2f}, new/torch {q('new', 'torch'):.2f}"
              + f" (load {os.getloadavg()[0]:.1f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
