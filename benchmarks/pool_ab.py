"""The reference's task pool against its sequential loop, in ONE process, interleaved (issue 18).

Usage::

    python benchmarks/pool_ab.py ALGO LABEL ROUNDS [--after-torch]

ALGO/LABEL: a case of ``benchmarks.bench_speed.CASES`` (e.g. ``r2d2 8-256-256``, ``imaml 1-256-256-1``).
At the libraries' default threads, each round runs (order alternating):

* ``seq``: the reference with ``reference/_threads.py``'s pool switched off (every ``map_tasks``
  call in this thread; iMAML's tasks are sequential by default anyway);
* ``pool``: the pool forced on (iMAML's ``POOL_MIN_WORK`` lowered to 0) and never held back by the
  starvation test (``STARVED_PARALLELISM = 0``);
* ``policy``: the shipped behaviour (the pool where the size allows, held back after a starved call).

Printed: medians of wall and CPU time (``time.process_time``, all threads), pool/seq and
policy/seq per-round wall ratios, whether the three results are bitwise equal, and the
starvation holds the policy recorded (``_threads._starved``: a hold there means the policy ran
some calls sequentially). With ``--after-torch`` every timed call follows a torch call of the same
problem (default threads), as in benchmark 1's rotation: a spinning OpenMP pool of torch's would
show as a slower ``pool`` here than without the flag.

Meaningful only on an otherwise idle machine: with other load (and the kernel's per-session
scheduling, ``/proc/sys/kernel/sched_autogroup_enabled``) a 2-thread process gets no more CPU
than a 1-thread one, so a pool cannot show a gain.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_speed  # noqa: E402
from reference import _threads, imaml  # noqa: E402
from reference.models import flatten  # noqa: E402


def main(argv: list[str]) -> int:
    algo, label, rounds = argv[0], argv[1], int(argv[2])
    after_torch = "--after-torch" in argv
    fns = bench_speed.CASES[algo][0](label, False)[1]
    ref, torch_fn = fns["reference"], fns["torch"]
    shipped = (_threads.PARALLEL_MIN_WORK, _threads.STARVED_PARALLELISM, imaml.POOL_MIN_WORK)

    def run(mode: str):
        _threads.PARALLEL_MIN_WORK, _threads.STARVED_PARALLELISM, imaml.POOL_MIN_WORK = shipped
        if mode == "seq":
            _threads.PARALLEL_MIN_WORK, imaml.POOL_MIN_WORK = float("inf"), float("inf")
        elif mode == "pool":
            _threads.STARVED_PARALLELISM, imaml.POOL_MIN_WORK = 0.0, 0.0
        try:
            return ref()
        finally:
            _threads.PARALLEL_MIN_WORK, _threads.STARVED_PARALLELISM, imaml.POOL_MIN_WORK = shipped

    modes = ["seq", "pool", "policy"]
    results = {m: run(m) for m in modes}  # warm-up, and the bitwise comparison
    if after_torch:
        torch_fn()
    flat = {m: flatten([np.asarray(g) for g in (r[1] if isinstance(r[1], list) else list(r[1]))])
            for m, r in results.items()}
    equal = all(np.array_equal(flat["seq"], flat[m]) for m in modes)
    _threads._starved.clear()
    wall: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(rounds):
        for m in modes[r % 3:] + modes[:r % 3]:
            if after_torch:
                torch_fn()
            c0, t0 = time.process_time(), time.perf_counter()
            run(m)
            wall[m].append(time.perf_counter() - t0)
            cpu[m].append(time.process_time() - c0)

    def q(a: str) -> float:
        return float(np.median([x / y for x, y in zip(wall[a], wall["seq"])]))

    print(f"{algo} {label}{' after torch' if after_torch else ''}: "
          + ", ".join(f"{m} wall {np.median(wall[m]) * 1e3:.1f} ms cpu {np.median(cpu[m]) * 1e3:.1f} ms" for m in modes)
          + f"; pool/seq {q('pool'):.2f}, policy/seq {q('policy'):.2f}; bitwise equal {equal}; "
          + f"holds {dict(_threads._starved)}; load {os.getloadavg()[0]:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
