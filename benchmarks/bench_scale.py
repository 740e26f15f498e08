"""Benchmark 5: time and peak memory of the reference meta-gradient and of an audit, 1e3 to 1e6 parameters.

Run from the repository root (``run.py`` runs it with the others)::

    python benchmarks/bench_scale.py [--quick]

MLPs ``8-w-w-1`` (tanh) with ``w`` = 28, 96, 312, 1024: 1.1e3, 1.0e4, 1.0e5 and
1.06e6 parameters; MAML on one sinusoid task of
``bench_reference_maml.make_problem`` (10/10 shots, K = 5, inner_lr 0.01), the
problem of benchmark 2 (whose 8-1024-1024-1 audit is reused when both run in
one ``run.py`` process, so the 1M-parameter audit is timed once).

* reference: ``reference.maml.meta_loss_and_grad``: time (median of 3 runs;
  one at the largest size), peak traced allocation (``tracemalloc``) and
  peak-RSS increase (one call in a fresh process, ``_common.rss_probe``);
* audit: ``verify.audit`` of the user-style PyTorch MAML of benchmark 2 with
  its default budget (reference meta-gradient, the claim, a one-direction
  confirmation on the function's own meta-loss; the full Richardson check in
  4 directions only on a mismatch or with ``thorough=True``): time (one run per size) and peak-RSS increase
  (fresh process, after a warm-up audit of a tiny problem so that PyTorch's
  one-time initialisation is not counted).

The log-log slope of each quantity against the parameter count is the
empirical exponent (goal: 1, linear). Small sizes carry fixed costs (Python
overhead, allocator pools), which pull the slope below 1; the slope over the
two largest sizes is shown too.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (  # noqa: E402
    MEMO,
    Result,
    Span,
    fmt_mb,
    log,
    loglog_slope,
    md_table,
    rss_probe,
    timed,
    tracemalloc_peak,
)

WIDTHS = (28, 96, 312, 1024)
QUICK_WIDTHS = (4, 8)


def probe(what: str, width: int) -> Callable[[], Any]:
    """Memory-probe factory: one reference meta-gradient or one audit of the 8-w-w-1 problem."""
    from benchmarks.bench_verification_cost import INNER_LR, STEPS, audited_fn, problem
    from reference import maml
    from verify.algorithms import Case

    model, params, tasks = problem([8, width, width, 1])
    if what == "reference":
        return lambda: maml.meta_loss_and_grad(model, params, tasks, INNER_LR, STEPS)
    try:
        from verify import audit
    except ImportError:  # not re-exported yet
        from verify._audit import audit
    # Warm-up on a tiny problem: PyTorch's one-time initialisation (~200 MB resident) is not the audit's.
    tm, tp, tt = problem([8, 4, 4, 1])
    audit(audited_fn, "maml", "torch", case=Case("maml", tm, list(tp), list(tt),
                                                 {"inner_lr": INNER_LR, "inner_steps": STEPS}, 0))
    case = Case("maml", model, list(params), list(tasks), {"inner_lr": INNER_LR, "inner_steps": STEPS}, 0)
    return lambda: audit(audited_fn, "maml", "torch", case=case)


def run(quick: bool = False) -> Result:
    from benchmarks.bench_verification_cost import INNER_LR, STEPS, audited_fn, problem
    from reference import maml
    from verify.algorithms import Case

    try:
        from verify import audit
    except ImportError:  # not re-exported yet
        from verify._audit import audit

    t_start = time.perf_counter()
    rows = []
    widths = QUICK_WIDTHS if quick else WIDTHS
    for i, w in enumerate(widths):
        sizes = [8, w, w, 1]
        model, params, tasks = problem(sizes)
        largest = i == len(widths) - 1

        def grad(model: Any = model, params: Any = params, tasks: Any = tasks) -> Any:
            return maml.meta_loss_and_grad(model, params, tasks, INNER_LR, STEPS)

        repeats = 1 if (quick or (largest and model.n_params > 500_000)) else 3
        times = [timed(grad)[0] for _ in range(repeats)]
        _, tm_peak = tracemalloc_peak(grad)
        # Quick: one probe (the reference's, which does not import torch) to exercise the path.
        rss_ref = (rss_probe("benchmarks.bench_scale", "probe", {"what": "reference", "width": w})
                   if (largest or not quick) else math.nan)
        rss_audit = (rss_probe("benchmarks.bench_scale", "probe", {"what": "audit", "width": w})
                     if not quick else math.nan)
        key = ("audit", tuple(sizes), 1, STEPS)
        if key in MEMO:
            t_audit, shared = MEMO[key]["seconds"], True
        else:
            case = Case("maml", model, list(params), list(tasks), {"inner_lr": INNER_LR, "inner_steps": STEPS}, 0)
            t_audit, res = timed(lambda case=case: audit(audited_fn, "maml", "torch", case=case))
            shared = False
            if not res.passed:
                log(f"  scale: the audit of the correct implementation failed at {sizes}: {res.headline()}")
        rows.append({"model": "-".join(map(str, sizes)), "params": model.n_params, "ref_times": Span(times),
                     "ref_rss": rss_ref, "ref_tracemalloc": tm_peak, "audit_s": t_audit, "audit_rss": rss_audit,
                     "audit_shared": shared, "repeats": repeats})
        log(f"  scale {sizes}: reference {Span(times).median:.3g} s, audit {t_audit:.3g} s"
            + (" (from benchmark 2)" if shared else ""))
    md, head = report(rows)
    return Result("5-scale", "Scale: reference meta-gradient and audit from 1e3 to 1e6 parameters", md,
                  {"rows": rows}, plots=[("scale.png", plot(rows))], headline=head,
                  seconds=time.perf_counter() - t_start)


def _slopes(rows: list[dict[str, Any]], get: Callable[[dict[str, Any]], float]) -> tuple[float, float]:
    n = [r["params"] for r in rows]
    y = [get(r) for r in rows]
    return loglog_slope(n, y), loglog_slope(n[-2:], y[-2:])


QUANTITIES: dict[str, Callable[[dict[str, Any]], float]] = {
    "reference time": lambda r: r["ref_times"].median,
    "reference tracemalloc peak": lambda r: float(r["ref_tracemalloc"]),
    "reference RSS peak": lambda r: r["ref_rss"],
    "audit time": lambda r: r["audit_s"],
    "audit RSS peak": lambda r: r["audit_rss"],
}


def _fmt_slope(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else "n/a"


def report(rows: list[dict[str, Any]]) -> tuple[str, list[str]]:
    table = [[r["model"], f"{r['params']:,}", r["ref_times"].fmt(), fmt_mb(r["ref_tracemalloc"]), fmt_mb(r["ref_rss"]),
              f"{r['audit_s']:.3g} s" + (" (bench 2)" if r["audit_shared"] else ""), fmt_mb(r["audit_rss"]),
              f"{r['audit_s'] / r['ref_times'].median:.3g}x"] for r in rows]
    slopes = {q: _slopes(rows, get) for q, get in QUANTITIES.items()}
    md = [
        "One sinusoid task, K=5, tanh, float64. Reference time: median (min-max) of the runs; memory in MB.",
        "",
        md_table(["model", "params", "reference meta-gradient", "ref tracemalloc peak", "ref RSS peak",
                  "audit", "audit RSS peak", "audit / ref grad"], table),
        "",
        md_table(["quantity", "log-log slope (all sizes)", "slope (two largest)"],
                 [[q, _fmt_slope(a), _fmt_slope(b)] for q, (a, b) in slopes.items()]),
        "",
        "Slope 1 = linear in the parameter count. RSS: peak resident-set increase of one call in a fresh process "
        "(glibc's mmap threshold fixed so freed buffers leave the resident set); small calls sit at the "
        "allocator's granularity, so the slope over all sizes is the least informative. The audit's RSS includes "
        "PyTorch's autograd graphs of the audited function.",
    ]
    sl = {q: tuple(_fmt_slope(v) for v in ab) for q, ab in slopes.items()}
    head = [f"scale (log-log slopes, 1 = linear; all sizes / two largest): reference time "
            f"{'/'.join(sl['reference time'])}, reference memory (tracemalloc) "
            f"{'/'.join(sl['reference tracemalloc peak'])}, audit time {'/'.join(sl['audit time'])}, "
            f"audit RSS {'/'.join(sl['audit RSS peak'])}"]
    return "\n".join(md), head


def plot(rows: list[dict[str, Any]]) -> Callable[[Any], None]:
    def draw(plt: Any) -> None:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        n = [r["params"] for r in rows]
        axes[0].loglog(n, [r["ref_times"].median for r in rows], "o-", label="reference meta-gradient")
        axes[0].loglog(n, [r["audit_s"] for r in rows], "s-", label="audit")
        axes[0].loglog(n, [rows[-1]["ref_times"].median * x / n[-1] for x in n], "k:", lw=1, label="linear")
        axes[0].set_ylabel("seconds")
        axes[1].loglog(n, [max(r["ref_tracemalloc"], 1) / 2**20 for r in rows], "o-", label="reference tracemalloc")
        for key, style, name in (("ref_rss", "^-", "reference RSS"), ("audit_rss", "s-", "audit RSS")):
            pts = [(x, r[key] / 2**20) for x, r in zip(n, rows) if math.isfinite(r[key]) and r[key] > 0]
            if pts:
                axes[1].loglog(*zip(*pts), style, label=name)
        axes[1].loglog(n, [max(rows[-1]["ref_tracemalloc"], 1) / 2**20 * x / n[-1] for x in n], "k:", lw=1,
                       label="linear")
        axes[1].set_ylabel("MB")
        for ax in axes:
            ax.set_xlabel("parameters")
            ax.legend(fontsize=8)
        fig.tight_layout()

    return draw


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    res = run(args.quick)
    print(res.markdown)
    print("\n".join(res.headline))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
