"""Replay benchmark 1's rotation for one problem and log the thread policy's readings (issue 18, session 8).

Usage: ``python benchmarks/policy_replay.py ALGO LABEL ROUNDS ORDER`` (ALGO/LABEL: a case of
``benchmarks.bench_speed.CASES``; ORDER: the configurations of a round, comma-separated, ``@1`` for one thread,
e.g. ``reference,torch,jax,reference@1,torch@1`` as benchmark 1 runs them). After each reference call: its time,
every pooled call's CPU seconds per wall second and each sequential probe as ``reference/_threads.py`` recorded
them, and the starved-call holds then in force (seconds left, strikes). Figures: docs/benchmarks.md ("eighth
pass").
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from threadpoolctl import threadpool_limits  # noqa: E402

from benchmarks import bench_speed  # noqa: E402
from reference import _threads  # noqa: E402

algo, label, rounds, order = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(",")
_, fns = bench_speed.CASES[algo][0](label, False)
log: list = []
record, probed = _threads._record, _threads._probed


def _record(fn, work, cpu, wall, items=1):  # noqa: ANN001, ANN202 - the policy's reading, passed on
    log.append(("pooled", round(cpu / wall, 2), round(wall * 1e3, 1)))
    return record(fn, work, cpu, wall, items)


def _probed(fn, work, wall, items):  # noqa: ANN001, ANN202
    log.append(("probe", round(wall * 1e3, 1)))
    return probed(fn, work, wall, items)


_threads._record, _threads._probed = _record, _probed
for k in order:
    fns[k.split("@")[0]]()
for r in range(rounds):
    for k in order:
        name, _, pinned = k.partition("@")
        log.clear()
        t0 = time.perf_counter()
        if pinned:
            import torch

            n = torch.get_num_threads()
            with threadpool_limits(1):
                torch.set_num_threads(1)
                fns[name]()
                torch.set_num_threads(n)
        else:
            fns[name]()
        dt = time.perf_counter() - t0
        if name == "reference":
            holds = {key[0].rsplit(".", 2)[-2]: (round(v[0] - time.monotonic(), 2), v[1])
                     for key, v in _threads._starved.items()}
            print(r, k, f"{dt * 1e3:.1f} ms", log, holds, flush=True)
