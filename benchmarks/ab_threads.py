"""Warm A/B of one reference benchmark problem: default threads vs pinned to one thread (issue 18).

Usage: ``python benchmarks/ab_threads.py ROOT ALGO LABEL ROUNDS`` (ROOT: a checkout of this project, so two
commits can be compared side by side; ALGO/LABEL: a case of ``benchmarks.bench_speed.CASES``, e.g.
``r2d2 8-1024-1024``). One untimed call first, then ROUNDS alternating default / one-thread calls; prints the
medians of wall time and CPU time (``time.process_time``, all threads) and the default / one-thread ratios.
Figures: ``reports/benchmarks/threads-default-3/ab-quiet.txt``.
"""
import json
import os
import sys
import time

root = sys.argv[1]
sys.path.insert(0, root)
os.chdir(root)
import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from benchmarks import bench_speed as B  # noqa: E402

algo, label, rounds = sys.argv[2], sys.argv[3], int(sys.argv[4])
_, fns = B.CASES[algo][0](label, False)
f = fns["reference"]
f()  # warm: imports, first-touch allocations, BLAS pools
res: dict[str, list[float]] = {"d": [], "1": [], "dc": [], "1c": []}
for _ in range(rounds):
    c0, t0 = time.process_time(), time.perf_counter()
    f()
    res["d"].append(time.perf_counter() - t0)
    res["dc"].append(time.process_time() - c0)
    with threadpool_limits(1):
        c0, t0 = time.process_time(), time.perf_counter()
        f()
        res["1"].append(time.perf_counter() - t0)
        res["1c"].append(time.process_time() - c0)
print(os.path.basename(root), algo, label, json.dumps({k: round(float(np.median(v)), 4) for k, v in res.items()}),
      "wall d/1t %.2f" % np.median([a / b for a, b in zip(res["d"], res["1"])]),
      "cpu d/1t %.2f" % np.median([a / b for a, b in zip(res["dc"], res["1c"])]), flush=True)
