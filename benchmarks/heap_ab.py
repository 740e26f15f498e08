"""The reference with and without its heap policy (reference/_heap.py), in alternating processes (issue 18).

Usage::

    python benchmarks/heap_ab.py ALGO LABEL ROUNDS [PROCESSES] [--threads 1]

ALGO/LABEL: a case of ``benchmarks.bench_speed.CASES`` (e.g. ``r2d2 8-256-256``). The policy is
process-wide and cannot be undone, so the two arms cannot share a process: PROCESSES (default 4)
pairs of fresh processes run one after the other, one with ``METAVERIFY_MALLOC=off`` (glibc's
defaults) and one without (the policy), their order alternating. Each process builds the case,
calls the reference and torch once untimed, then times ROUNDS alternating reference / torch calls
at the libraries' default threads (``--threads 1``: BLAS and torch pinned to one thread), reading
the process's minor page faults around each reference call (``resource.getrusage``).

Printed per arm: medians over all rounds of the reference's wall time, its CPU time, torch's wall
time, the per-round ratio reference/torch and the page faults per reference call; then the
medians of policy/off per process pair.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


def _child(algo: str, label: str, rounds: int, threads: int | None) -> None:
    sys.path.insert(0, os.getcwd())
    from benchmarks import bench_speed as B
    from benchmarks._common import at_threads

    _, fns = B.CASES[algo][0](label, False)
    ref, torch_fn = fns["reference"], fns["torch"]
    if threads is not None:
        ref, torch_fn = at_threads(ref, threads), at_threads(torch_fn, threads)
    ref()
    torch_fn()
    out: dict[str, list[float]] = {"ref": [], "ref_cpu": [], "torch": [], "faults": []}
    for r in range(rounds):
        for name in (("ref", "torch") if r % 2 == 0 else ("torch", "ref")):
            fn = ref if name == "ref" else torch_fn
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            out[name].append(wall)
            if name == "ref":
                out["ref_cpu"].append(cpu)
                out["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    from reference import _heap

    out["policy"] = [float(bool(_heap.tune_heap()))]
    print("RESULT " + json.dumps(out), flush=True)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--child":
        _child(argv[1], argv[2], int(argv[3]), None if argv[4] == "default" else int(argv[4]))
        return 0
    threads = "default"
    if "--threads" in argv:
        i = argv.index("--threads")
        threads = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    if len(argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    algo, label, rounds = argv[0], argv[1], int(argv[2])
    pairs = int(argv[3]) if len(argv) == 4 else 4
    arms: dict[str, list[dict[str, list[float]]]] = {"off": [], "policy": []}
    for p in range(pairs):
        for arm in (("off", "policy") if p % 2 == 0 else ("policy", "off")):
            env = dict(os.environ)
            env.pop("METAVERIFY_MALLOC", None)
            if arm == "off":
                env["METAVERIFY_MALLOC"] = "off"
            res = subprocess.run([sys.executable, __file__, "--child", algo, label, str(rounds), threads],
                                 capture_output=True, text=True, env=env, check=True)
            line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")][-1]
            arms[arm].append(json.loads(line[len("RESULT "):]))
    med = {}
    for arm, runs in arms.items():
        ref = [x for r in runs for x in r["ref"]]
        ratio = [a / b for r in runs for a, b in zip(r["ref"], r["torch"])]
        med[arm] = [float(np.median([np.median(r["ref"]) for r in runs]))]
        print(f"{arm:7s} ref {np.median(ref):.4f} s  ref cpu {np.median([x for r in runs for x in r['ref_cpu']]):.4f} s"
              f"  torch {np.median([x for r in runs for x in r['torch']]):.4f} s  ref/torch {np.median(ratio):.2f}"
              f"  faults/call {np.median([x for r in runs for x in r['faults']]):.0f}"
              f"  policy applied {sorted({r['policy'][0] for r in runs})}")
    per_pair = [np.median(p["ref"]) / np.median(o["ref"]) for p, o in zip(arms["policy"], arms["off"])]
    print(f"{algo} {label} threads={threads}: policy/off per process pair "
          + " ".join(f"{x:.2f}" for x in per_pair) + f"; median {np.median(per_pair):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
