"""Helpers shared by the benchmark scripts: timing, memory, environment, Markdown, plots.

Nothing here asserts anything about speed. The rules every benchmark follows
(the machines are shared and noisy):

* **alternate**: the implementations compared are run in rounds
  (``a, b, c, a, b, c, ...``), so a burst of load hits all of them alike;
* **pairwise ratios**: a ratio is the median over rounds of the per-round
  ratio ``t_a / t_b`` (both measured in the same round), shown with its
  min-max over rounds, never a ratio of medians taken at different times;
* **median (min-max)** of the repeats for every time;
* **load**: ``os.getloadavg()`` is recorded before and after each benchmark.

Memory: ``measure_rss`` gives the increase of the process's peak resident
set size during one call over its resident size just before it (the kernel's
``VmHWM`` is reset through ``/proc/self/clear_refs``), comparable across
NumPy, PyTorch and JAX (whose allocators tracemalloc does not see);
``tracemalloc_peak`` is the peak of Python-traced allocations (NumPy data
buffers included), the reference's own figure.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Measurements shared between benchmarks of one ``run.py`` process (e.g. the audit of the
#: 1M-parameter problem, timed once by benchmark 2 and reused by benchmark 5).
MEMO: dict[Any, Any] = {}


# ---------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------


def set_thread_env(threads: int | None) -> None:
    """Fix the thread pools of OpenBLAS/OpenMP/MKL and XLA; call before importing numpy or jax.

    On a shared 2-core machine, multithreaded BLAS and OpenMP spin-wait on
    descheduled threads and make every time depend on the neighbours' load;
    one thread per library makes the comparison like for like.
    """
    if threads is None:
        return
    n = str(int(threads))
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = n
    if int(threads) == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_cpu_multi_thread_eigen" not in flags:
            os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false "
                                       "intra_op_parallelism_threads=1").strip()


def set_torch_threads(threads: int | None) -> None:
    if threads is None:
        return
    import torch

    torch.set_num_threads(int(threads))


def at_threads(fn: Callable[[], Any], threads: int) -> Callable[[], Any]:
    """``fn`` run with its BLAS libraries (threadpoolctl) and torch's intra-op pool pinned to ``threads``.

    The settings in force outside (the libraries' defaults, unless ``run.py --threads`` pinned
    them) are restored after each call, so pinned and default runs alternate in one process.
    XLA's thread pool is fixed at start-up: JAX cannot be pinned this way.
    """

    def pinned() -> Any:
        from threadpoolctl import threadpool_limits

        torch = sys.modules.get("torch")
        before = torch.get_num_threads() if torch is not None else None
        with threadpool_limits(limits=int(threads), user_api="blas"):
            if torch is not None:
                torch.set_num_threads(int(threads))
            try:
                return fn()
            finally:
                if torch is not None:
                    torch.set_num_threads(before)

    return pinned


def default_threads() -> dict[str, int]:
    """Threads the libraries use now: BLAS (the most among the loaded BLAS libraries) and torch."""
    out: dict[str, int] = {}
    try:
        from threadpoolctl import threadpool_info

        out["blas"] = max([i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"] or [0])
    except ImportError:
        pass
    if "torch" in sys.modules:
        out["torch"] = sys.modules["torch"].get_num_threads()
    return out


def blas_description() -> str:
    """The loaded BLAS libraries as threadpoolctl sees them: implementation, version, kernel, threads."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (threadpoolctl not installed)"
    return "; ".join(f"{os.path.basename(i['filepath'])}: {i.get('internal_api')} {i.get('version')} "
                     f"{i.get('architecture', '')} x{i['num_threads']}"
                     for i in threadpool_info() if i["user_api"] == "blas") or "none loaded"


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------


@dataclass
class Span:
    """Median and range of repeated measurements."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else math.nan

    @property
    def lo(self) -> float:
        return min(self.values) if self.values else math.nan

    @property
    def hi(self) -> float:
        return max(self.values) if self.values else math.nan

    def fmt(self, unit: str = "s", digits: int = 3) -> str:
        """``"0.123 (0.120-0.131)"``; a single value without the range."""
        if not self.values:
            return "n/a"
        f = fmt_seconds if unit == "s" else (lambda v: f"{v:.{digits}g}")
        if len(self.values) == 1:
            return f(self.median)
        return f"{f(self.median)} ({f(self.lo)}-{f(self.hi)})"

    def to_dict(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.lo, "max": self.hi, "values": list(self.values)}


def fmt_seconds(t: float) -> str:
    if t is None or not math.isfinite(t):
        return "n/a"
    if t >= 86400:
        return f"{t / 86400:.1f} days"
    if t >= 3600:
        return f"{t / 3600:.1f} h"
    if t < 1e-3:
        return f"{t * 1e6:.0f} us"
    if t < 1:
        return f"{t * 1e3:.1f} ms"
    return f"{t:.2f} s"


def fmt_ratio(span: Span) -> str:
    if not span.values:
        return "n/a"
    def f(v: float) -> str:
        return f"{v:.3g}"
    if len(span.values) == 1:
        return f"{f(span.median)}x"
    return f"{f(span.median)}x ({f(span.lo)}-{f(span.hi)})"


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def alternate(fns: dict[str, Callable[[], Any]], repeats: int, *, warmup: int = 0,
              memory: bool = False, rotate: bool = False) -> tuple[dict[str, Span], dict[str, Any], dict[str, float]]:
    """Run ``fns`` in alternating rounds; return per-name time spans, last outputs, RSS peak deltas.

    ``warmup`` untimed rounds come first (compilation, caches, page faults).
    With ``memory=True`` the peak-RSS increase of each function is read on
    the first timed round (bytes; NaN where ``/proc`` is unavailable).
    With ``rotate=True`` round ``r`` starts at the ``r``-th function (cyclically),
    so no function always runs first, or always right after the same one (a
    thread pool left spinning, caches filled by the previous call).
    """
    outs: dict[str, Any] = {}
    names = list(fns)
    for _ in range(warmup):
        for name, fn in fns.items():
            outs[name] = fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    rss: dict[str, float] = {}
    for r in range(repeats):
        k = r % len(names) if rotate and names else 0
        for name in names[k:] + names[:k]:
            fn = fns[name]
            if memory and r == 0:
                (t, outs[name]), rss[name] = measure_rss(lambda fn=fn: timed(fn))
            else:
                t, outs[name] = timed(fn)
            times[name].append(t)
    return {k: Span(v) for k, v in times.items()}, outs, rss


def pairwise(times: dict[str, Span], num: str, den: str) -> Span:
    """Per-round ratios ``times[num][i] / times[den][i]`` (same round, so the same load)."""
    return Span([a / b for a, b in zip(times[num].values, times[den].values) if b > 0])


# ---------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def measure_rss(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), peak RSS during the call minus RSS before it, in bytes)``; NaN without ``/proc``."""
    before = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM (the peak) to the current RSS
    except OSError:
        before = None
    out = fn()
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return out, math.nan
    return out, 1024.0 * max(peak - before, 0)


#: Set in the memory-probe processes only. glibc's dynamic mmap threshold rises after the first large
#: free, after which freed buffers stay resident and later peaks hide below the resident size; a
#: fixed threshold returns every buffer above 64 KiB to the kernel on free, so a call's peak-RSS
#: increase is its own even after a warm-up. It also makes every large allocation page-fault afresh
#: (measured: the reference iMAML runs 3x slower), which is why no timing is taken under it.
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def rss_probe(module: str, factory: str, kwargs: dict[str, Any], *, warmup: int = 0,
              timeout: float = 1800.0) -> float:
    """Peak-RSS increase (bytes) of one call of ``module.factory(**kwargs)()`` in a fresh process.

    The factory builds the problem and returns a zero-argument callable; ``warmup`` untimed calls
    (e.g. a JAX compilation) precede the measured one. A fresh process (with :data:`PROBE_ENV`)
    sees no memory left over from other benchmarks. NaN if the probe fails (its error is logged).
    """
    import subprocess

    code = ("import sys; sys.path.insert(0, sys.argv[1]); from benchmarks._common import _probe_main; "
            "_probe_main(sys.argv[2:])")
    cmd = [sys.executable, "-c", code, ROOT, module, factory, json.dumps(kwargs), str(int(warmup))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **PROBE_ENV})
        if proc.returncode != 0:
            log(f"  memory probe {module}.{factory}({kwargs}) failed:\n{proc.stderr[-2000:]}")
            return math.nan
        return float(json.loads(proc.stdout.strip().splitlines()[-1])["rss"])
    except (subprocess.SubprocessError, ValueError, KeyError, IndexError, OSError) as exc:
        log(f"  memory probe {module}.{factory}({kwargs}) failed: {exc!r}")
        return math.nan


def _probe_main(argv: list[str]) -> None:
    """Body of :func:`rss_probe`'s subprocess: build, warm up, measure, print ``{"rss": bytes}``."""
    import importlib

    module, factory, kwargs, warmup = argv[0], argv[1], json.loads(argv[2]), int(argv[3])
    fn = getattr(importlib.import_module(module), factory)(**kwargs)
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "")  # run.py's --threads, inherited
    if threads.isdigit() and "torch" in sys.modules:
        set_torch_threads(int(threads))
    for _ in range(warmup):
        fn()
    _, rss = measure_rss(fn)
    print(json.dumps({"rss": rss}))


def tracemalloc_peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``(fn(), peak traced allocation in bytes)`` (NumPy buffers are traced; torch/XLA are not)."""
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def fmt_mb(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x / 2**20:.1f}"


# ---------------------------------------------------------------------------
# fits
# ---------------------------------------------------------------------------


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x`` (the exponent of a power law)."""
    if any(not (b > 0 and math.isfinite(b)) for b in y):
        return math.nan  # a zero or missing value has no logarithm: no fit rather than a biased one
    pts = [(math.log(a), math.log(b)) for a, b in zip(x, y)]
    if len(pts) < 2:
        return math.nan
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx > 0 else math.nan


# ---------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------


def _version(dist: str) -> str:
    """The installed version of a distribution, read from its metadata (importing jax or matplotlib
    just to print a version costs seconds)."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def environment(threads: int | None) -> dict[str, Any]:
    """Machine, library versions and thread settings."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average": load(),
        "threads": threads if threads is not None else "library defaults",
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "unset"),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "unset"),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "unset"),
    }
    mem = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1])
    except OSError:
        pass
    env["memory_gib"] = round(mem / 2**20, 1) if mem else "unknown"
    for name in ("numpy", "scipy", "torch", "jax", "jaxlib", "matplotlib"):
        env[name] = _version(name)
    if "torch" in sys.modules:
        env["torch_threads"] = sys.modules["torch"].get_num_threads()
    if "numpy" in sys.modules:
        env["blas"] = blas_description()
    return env


def environment_markdown(env: dict[str, Any]) -> str:
    rows = [(k, str(v)) for k, v in env.items()]
    return md_table(["", ""], rows)


# ---------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table; ``align`` per column ``"l"`` or ``"r"`` (default: first left, others right)."""
    align = align or ["l"] + ["r"] * (len(headers) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "| " + " | ".join(sep) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)


@dataclass
class Result:
    """What a benchmark returns to ``run.py``: Markdown, JSON-able data, plots, headline lines."""

    name: str
    title: str
    markdown: str
    data: dict[str, Any]
    plots: list[tuple[str, Callable[[Any], None]]] = field(default_factory=list)
    headline: list[str] = field(default_factory=list)
    seconds: float = 0.0
    load_before: list[float] = field(default_factory=list)
    load_after: list[float] = field(default_factory=list)


def jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Span):
        return obj.to_dict()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "shape", None) == ():
        return jsonable(obj.item())
    if isinstance(obj, (int, str, bool)) or obj is None:
        return obj
    return str(obj)


def write_json(path: str, obj: Any) -> None:
    with open(path, "w") as fh:
        json.dump(jsonable(obj), fh, indent=1)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
