"""Reference MAML meta-gradient (NumPy, analytic) against PyTorch autograd, CPU, float64.

Run from the repository root::

    python benchmarks/bench_reference_maml.py            # full table (minutes)
    python benchmarks/bench_reference_maml.py --quick    # smoke run, < 30 s

Problem (Finn et al. 2017, sinusoid regression): 25 tasks, 10 support / 10
query examples, K = 5 inner steps, inner_lr = 0.01, mse, relu MLPs
1-40-40-1, 1-256-256-1 and 8-1024-1024-1 (the 8-input net gets sinusoid
targets of its first input, the other 7 inputs are uniform distractors).

* reference: ``reference.maml.meta_loss_and_grad`` (reverse accumulation,
  exact Hessian-vector products, no autodiff).
* torch: the usual functional MAML loop: per task, ``K`` steps with
  ``torch.autograd.grad(..., create_graph=True)``, then ``autograd.grad`` of
  the task's query loss (divided by the task count) w.r.t. theta, accumulated.
  One task's graph is alive at a time, as in the reference.

Both run on the same parameters and tasks in the same process, alternating
(reference, torch, reference, ...) so machine load hits both alike; the
gradients are compared. Time: wall-clock median and min-max over ``--repeats``
runs after one warm-up; ``ratio`` = reference median / torch median. ``cpu
ratio`` is the same for process CPU time (all threads, spin-waits included),
steadier than wall time on a shared machine. Memory:

* ``tracemalloc peak``: the reference's peak traced allocation (NumPy
  registers its data buffers with tracemalloc) during one call.
* ``RSS peak delta``: for both, in a fresh subprocess, the peak resident set
  size during one call minus the resident size just before it (peak reset
  through ``/proc/self/clear_refs``); torch's CPU allocator has no statistics
  of its own, so this is the like-for-like figure.

Thread counts (OpenBLAS for NumPy, intra-op threads for torch) are printed;
neither is changed unless ``--threads`` is given, except that ``--quick``
defaults to ``--threads 1`` (on a loaded machine, multithreaded BLAS and
OpenMP spin-wait on descheduled threads and a smoke run can take minutes).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from typing import Any

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def _set_threads_env(argv: list[str]) -> None:
    # BLAS reads its thread count at load time, so this must precede "import numpy".
    if "--quick" in argv and "--threads" not in argv:
        argv += ["--threads", "1"]
    if "--threads" in argv:
        n = argv[argv.index("--threads") + 1]
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = n


_set_threads_env(sys.argv)

import numpy as np  # noqa: E402

from reference import maml  # noqa: E402
from reference.models import MLP  # noqa: E402
from reference.tasks import Task  # noqa: E402

SIZES = {"1-40-40-1": [1, 40, 40, 1], "1-256-256-1": [1, 256, 256, 1], "8-1024-1024-1": [8, 1024, 1024, 1]}
INNER_LR = 0.01


def blas_threads() -> str:
    try:
        maps = open("/proc/self/maps").read()
        libs = sorted({line.split()[-1] for line in maps.splitlines() if "openblas" in line.lower()})
        for lib in libs:
            handle = ctypes.CDLL(lib)
            for name in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_",
                         "openblas_get_num_threads"):
                if hasattr(handle, name):
                    return str(getattr(handle, name)())
    except OSError:
        pass
    return "unknown"


def make_problem(sizes: list[int], n_tasks: int, shots: int, seed: int = 0) -> tuple[MLP, list, list[Task]]:
    """Sinusoid tasks ``y = A sin(x_0 - phase)``, ``A ~ U[0.1, 5]``, ``phase ~ U[0, pi]``, ``x ~ U[-5, 5]^d``."""
    rng = np.random.default_rng(seed)
    model = MLP(sizes, "relu", "mse")
    tasks = []
    for _ in range(n_tasks):
        amp, phase = rng.uniform(0.1, 5.0), rng.uniform(0.0, np.pi)
        xs, xq = rng.uniform(-5, 5, size=(shots, sizes[0])), rng.uniform(-5, 5, size=(shots, sizes[0]))
        tasks.append(Task(xs, amp * np.sin(xs[:, :1] - phase), xq, amp * np.sin(xq[:, :1] - phase)))
    return model, model.init(seed), tasks


def reference_grad(model: MLP, params: list, tasks: list[Task], steps: int) -> tuple[float, list[np.ndarray]]:
    return maml.meta_loss_and_grad(model, params, tasks, INNER_LR, steps)


class TorchMAML:
    """The standard functional MAML meta-gradient with ``create_graph=True`` (float64, CPU)."""

    def __init__(self, params: list, tasks: list[Task]):
        import torch

        self.torch = torch
        self.params = [torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in params]
        self.tasks = [tuple(torch.tensor(a, dtype=torch.float64) for a in t) for t in tasks]

    def forward(self, ps: list, x: Any) -> Any:
        torch = self.torch
        h = x
        n = len(ps) // 2
        for i in range(n):
            h = torch.nn.functional.linear(h, ps[2 * i], ps[2 * i + 1])
            if i < n - 1:
                h = torch.relu(h)
        return h

    def __call__(self, steps: int) -> tuple[float, list[np.ndarray]]:
        torch = self.torch
        mse = torch.nn.functional.mse_loss
        total, grad = 0.0, [torch.zeros_like(p) for p in self.params]
        for xs, ys, xq, yq in self.tasks:
            fast = list(self.params)
            for _ in range(steps):
                g = torch.autograd.grad(mse(self.forward(fast, xs), ys), fast, create_graph=True)
                fast = [p - INNER_LR * gi for p, gi in zip(fast, g)]
            loss = mse(self.forward(fast, xq), yq) / len(self.tasks)
            for acc, gi in zip(grad, torch.autograd.grad(loss, self.params)):
                acc += gi
            total += float(loss.detach())
        return total, [g.numpy() for g in grad]


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(impl: str, size: str, n_tasks: int, shots: int, steps: int) -> None:
    """Subprocess body: print the peak-RSS increase (bytes) of one meta-gradient call."""
    model, params, tasks = make_problem(SIZES[size], n_tasks, shots)
    fn = TorchMAML(params, tasks) if impl == "torch" else None
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    if fn is None:
        reference_grad(model, params, tasks, steps)
    else:
        fn(steps)
    print(json.dumps({"rss_peak_delta": 1024 * (_rss_kib("VmHWM") - before)}))


def rss_delta(impl: str, size: str, n_tasks: int, shots: int, steps: int, threads: str | None) -> float | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-probe", impl, size, "--tasks", str(n_tasks),
           "--shots", str(shots), "--steps", str(steps)]
    if threads:
        cmd += ["--threads", threads]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=900).stdout
        return json.loads(out.strip().splitlines()[-1])["rss_peak_delta"]
    except (subprocess.SubprocessError, ValueError, KeyError, OSError):
        return None


def tracemalloc_peak(model: MLP, params: list, tasks: list[Task], steps: int) -> int:
    tracemalloc.start()
    try:
        reference_grad(model, params, tasks, steps)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: one timed run on 5 tasks (2 for the 1024-wide net), no RSS probes")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--tasks", type=int, default=25)
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", default=None,
                    help="set BLAS and torch thread counts (default: leave as is; 1 with --quick)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--memory-probe", nargs=2, metavar=("IMPL", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)

    import torch

    if args.threads:
        torch.set_num_threads(int(args.threads))
    if args.memory_probe:
        memory_probe(args.memory_probe[0], args.memory_probe[1], args.tasks, args.shots, args.steps)
        return 0
    torch.set_default_dtype(torch.float64)
    repeats = 1 if args.quick else args.repeats
    print(f"# CPU count {os.cpu_count()}, NumPy {np.__version__} (OpenBLAS threads {blas_threads()}), "
          f"torch {torch.__version__} (intra-op threads {torch.get_num_threads()}), load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"# {args.tasks} tasks, {args.shots}/{args.shots} shots, K={args.steps}, inner_lr={INNER_LR}, relu, "
          f"mse, float64; {repeats} timed run(s) after one warm-up, alternating reference/torch")
    header = (f"{'model':>14} {'params':>9} {'reference s (min-max)':>24} {'torch s (min-max)':>24} {'ratio':>6} "
              f"{'cpu ratio':>9} {'ref tracemalloc MB':>18} {'ref RSS MB':>10} {'torch RSS MB':>12} "
              f"{'max rel diff':>12}")
    print(header)
    results = []
    for name in args.sizes:
        n_tasks = (2 if name == "8-1024-1024-1" else 5) if args.quick else args.tasks
        model, params, tasks = make_problem(SIZES[name], n_tasks, args.shots)
        torch_fn = TorchMAML(params, tasks)
        loss_r, g_r = reference_grad(model, params, tasks, args.steps)  # warm-up (and the comparison)
        loss_t, g_t = torch_fn(args.steps)
        scale = max(float(np.max(np.abs(g))) for g in g_t)
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(g_r, g_t)) / scale
        times: dict[str, list[float]] = {"reference": [], "torch": []}
        cpu: dict[str, list[float]] = {"reference": [], "torch": []}
        for _ in range(repeats):
            for impl, call in (("reference", lambda: reference_grad(model, params, tasks, args.steps)),
                               ("torch", lambda: torch_fn(args.steps))):
                t0, c0 = time.perf_counter(), time.process_time()
                call()
                times[impl].append(time.perf_counter() - t0)
                cpu[impl].append(time.process_time() - c0)
        med = {k: statistics.median(v) for k, v in times.items()}
        cpu_ratio = statistics.median(cpu["reference"]) / statistics.median(cpu["torch"])
        peak = tracemalloc_peak(model, params, tasks, args.steps)
        rss = {impl: (None if args.quick else rss_delta(impl, name, n_tasks, args.shots, args.steps, args.threads))
               for impl in ("reference", "torch")}
        row = {"model": name, "params": model.n_params, "tasks": n_tasks, "times": times, "cpu_times": cpu,
               "median": med, "ratio": med["reference"] / med["torch"], "cpu_ratio": cpu_ratio,
               "tracemalloc_peak": peak, "rss_peak_delta": rss, "max_rel_diff": diff, "loss_diff": abs(loss_r - loss_t)}
        results.append(row)

        def span(k: str) -> str:
            return f"{med[k]:.4f} ({min(times[k]):.4f}-{max(times[k]):.4f})"

        label = name + ("*" if n_tasks != args.tasks else "")
        print(f"{label:>14} {model.n_params:>9} {span('reference'):>24} {span('torch'):>24} {row['ratio']:>6.2f} "
              f"{cpu_ratio:>9.2f} {_mb(peak):>18} {_mb(rss['reference']):>10} {_mb(rss['torch']):>12} "
              f"{diff:>12.1e}", flush=True)
    if args.quick:
        print("# * --quick: 5 tasks (2 for the 1024-wide net); RSS probes skipped")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": {"blas": blas_threads(), "torch": torch.get_num_threads()}, "results": results}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
