"""One of benchmark 1's "other" per-task algorithms: the thread policy against its two paths (issue 18).

Usage: ``python benchmarks/other_ab.py NAME ROUNDS`` (NAME: a key of ``benchmarks.bench_speed.other_cases``,
e.g. ``LR-D2``, ``Reptile``, ``"Matching nets"``). In one process, rotating rounds of: ``policy`` (as shipped),
``seq`` (``PARALLEL_MIN_WORK`` = inf: every call in the calling thread, one BLAS thread), ``pool`` (the
starvation test off: always the pool), ``1t`` (BLAS pinned to one thread). Prints medians of wall and CPU
time, the median per-round pool/seq ratio and the starvation records the policy left.
"""
import sys, os, time
sys.path.insert(0, os.getcwd())
import numpy as np
from benchmarks import bench_speed as B
from benchmarks._common import at_threads
from reference import _threads
cases = B.other_cases(False)
if len(sys.argv) != 3 or sys.argv[1] not in cases or not sys.argv[2].isdigit():
    print(__doc__ + "\nNAME is one of: " + ", ".join(map(repr, cases)), file=sys.stderr)
    sys.exit(2)
name, rounds = sys.argv[1], int(sys.argv[2])
_, _, fn = cases[name]
def seq():
    saved = _threads.PARALLEL_MIN_WORK; _threads.PARALLEL_MIN_WORK = float("inf")
    try: return fn()
    finally: _threads.PARALLEL_MIN_WORK = saved
def pool():
    saved = _threads.STARVED_PARALLELISM; _threads.STARVED_PARALLELISM = 0.0
    try: return fn()
    finally: _threads.STARVED_PARALLELISM = saved
cfg = {"policy": fn, "seq": seq, "pool": pool, "1t": at_threads(fn, 1)}
for f in cfg.values(): f()
res = {k: [] for k in cfg}; cpu = {k: [] for k in cfg}
names = list(cfg)
for r in range(rounds):
    k = r % len(names)
    for n in names[k:] + names[:k]:
        c0 = time.process_time(); t0 = time.perf_counter(); cfg[n](); res[n].append(time.perf_counter() - t0); cpu[n].append(time.process_time() - c0)
print(name, " ".join(f"{k} {np.median(v)*1e3:.1f} ms (cpu {np.median(cpu[k])*1e3:.1f})" for k, v in res.items()),
      "| pool/seq %.2f" % np.median([a / b for a, b in zip(res["pool"], res["seq"])]), _threads._starved)
