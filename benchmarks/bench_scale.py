"""Benchmark 5: time and peak memory of the reference meta-gradient and of an audit, 1e3 to 1e6 parameters.

Run from the repository root (``run.py`` runs it with the others)::

    /work/venv/bin/python benchmarks/bench_scale.py [--quick]

MLPs ``8-w-w-1`` (tanh) with ``w`` = 28, 96, 312, 1024: 1.1e3, 1.0e4, 1.0e5 and
1.06e6 parameters; MAML on one sinusoid task of
``bench_reference_maml.make_problem`` (10/10 shots, K = 5, inner_lr 0.01), the
problem of benchmark 2 (whose 8-1024-1024-1 audit is reused when both run in
one ``run.py`` process, so the 1M-parameter audit is timed once).

* reference: ``reference.maml.meta_loss_and_grad``: time (median of 3 runs;
  one at the largest size), peak traced allocation (``tracemalloc``) and
  peak-RSS increase;
* audit: ``verify.audit`` of the user-style PyTorch MAML of benchmark 2
  (reference meta-gradient twice, the claim, Richardson on the function's own
  meta-loss in 4 directions): time and peak-RSS increase (one run per size).

The log-log slope of each quantity against the parameter count is the
empirical exponent (goal: 1, linear). Small sizes carry fixed costs (Python
overhead, allocator pools), which pull the slope below 1; the slope over the
two largest sizes is shown too.
"""

from __future__ import annotations

import argparse
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
    measure_rss,
    timed,
    tracemalloc_peak,
)

WIDTHS = (28, 96, 312, 1024)
QUICK_WIDTHS = (4, 8)


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
        (t_first, _), rss_ref = measure_rss(lambda grad=grad: timed(grad))
        times = [t_first] + [timed(grad)[0] for _ in range(repeats - 1)]
        _, tm_peak = tracemalloc_peak(grad)
        key = ("audit", tuple(sizes), 1, STEPS)
        if key in MEMO:
            a = MEMO[key]
            t_audit, rss_audit, shared = a["seconds"], a["rss"], True
        else:
            case = Case("maml", model, list(params), list(tasks), {"inner_lr": INNER_LR, "inner_steps": STEPS}, 0)
            (t_audit, res), rss_audit = measure_rss(lambda case=case: timed(
                lambda: audit(audited_fn, "maml", "torch", case=case)))
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
                 [[q, f"{a:.2f}", f"{b:.2f}"] for q, (a, b) in slopes.items()]),
        "",
        "Slope 1 = linear in the parameter count. RSS deltas of small calls sit at the allocator's granularity "
        "(0 MB when the call reuses freed pages), so their slope is the least informative.",
    ]
    head = [f"scale: reference meta-gradient time slope {slopes['reference time'][0]:.2f} "
            f"(two largest {slopes['reference time'][1]:.2f}), memory slope "
            f"{slopes['reference tracemalloc peak'][0]:.2f}; audit time slope {slopes['audit time'][0]:.2f} "
            f"(two largest {slopes['audit time'][1]:.2f})"]
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
        axes[1].loglog(n, [max(r["ref_rss"], 1) / 2**20 for r in rows], "^-", label="reference RSS")
        axes[1].loglog(n, [max(r["audit_rss"] or 1, 1) / 2**20 for r in rows], "s-", label="audit RSS")
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
