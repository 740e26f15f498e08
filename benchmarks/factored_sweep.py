"""Batch-size sweep of the factored MAML engine (issue 18): time, peak heap and page faults per call.

Usage: ``python benchmarks/factored_sweep.py LABEL MIB[,MIB...] ROUNDS`` (LABEL a size of
``benchmarks.bench_reference_maml.SIZES``, e.g. ``8-1024-1024-1``; MIB values of
``reference.factored.BATCH_BYTES``). 25 tasks, K = 5; per value: the batches, the median wall time at
default threads (``d``) and pinned to one BLAS thread (``1``), alternating, the minor page faults of a
default call and tracemalloc's peak. Figures: ``reference/factored.py`` (BATCH_BYTES) and docs/benchmarks.md.
"""
import os
import resource
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from benchmarks.bench_reference_maml import INNER_LR, SIZES, make_problem  # noqa: E402
from reference import factored, maml  # noqa: E402

label, values, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
model, params, tasks = make_problem(SIZES[label], 25, 10)
for mib in (float(x) for x in values.split(",")):
    factored.BATCH_BYTES = int(mib * 2**20)
    maml.meta_loss_and_grad(model, params, tasks, INNER_LR, 5)
    tracemalloc.start()
    maml.meta_loss_and_grad(model, params, tasks, INNER_LR, 5)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    res: dict[str, list[float]] = {"d": [], "1": []}
    faults = []
    for _ in range(rounds):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        maml.meta_loss_and_grad(model, params, tasks, INNER_LR, 5)
        res["d"].append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        with threadpool_limits(1):
            t0 = time.perf_counter()
            maml.meta_loss_and_grad(model, params, tasks, INNER_LR, 5)
            res["1"].append(time.perf_counter() - t0)
    print(f"{label} BATCH_BYTES {mib:g} MiB: {len(factored._batches(model, tasks, 5))} batches, "
          f"default {np.median(res['d']) * 1e3:.1f} ms, one thread {np.median(res['1']) * 1e3:.1f} ms, "
          f"faults {int(np.median(faults))}, peak {peak / 2**20:.1f} MiB", flush=True)
