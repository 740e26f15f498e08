"""Run metaverify's benchmarks and write ``reports/benchmarks/`` (Markdown tables, plots, JSON).

Usage, from the repository root::

    python benchmarks/run.py            # full run -> reports/benchmarks/
    python benchmarks/run.py --quick    # smoke run (tiny sizes) -> reports/latest/benchmarks-quick/
    python benchmarks/run.py --only 3 4 --out /tmp/bench

Benchmarks (one module each; every module also runs on its own):

1. ``bench_speed``: NumPy reference vs PyTorch autograd vs JAX jit (MAML, iMAML, R2-D2);
2. ``bench_verification_cost``: ``verify.check_gradient`` / ``verify.audit`` vs
   ``torch.autograd.gradcheck`` (fast, full) vs ``jax.test_util.check_grads``, as
   multiples of one meta-gradient evaluation, 141 to 1.06M parameters;
3. ``bench_sensitivity``: the smallest injected meta-gradient error each tool
   catches, with its false-alarm rate on correct implementations;
4. ``bench_fd_accuracy``: complex step / central / Richardson against the exact
   derivative, per step and dtype;
5. ``bench_scale``: time and memory of the reference meta-gradient and of an audit,
   1e3 to 1e6 parameters, log-log slopes.

Output: ``README.md`` (environment, headline figures, links), one Markdown file
per benchmark, one PNG per benchmark, ``results.json``. Times are wall-clock on
a shared machine: medians of several runs with min-max, ratios per round
(alternating implementations), the load average recorded before and after each
benchmark.

Threads: by default nothing is pinned: every library runs with its own default
thread pools (BLAS and torch use all cores), which is what a user gets.
``--threads N`` pins BLAS, OpenMP, torch and XLA to ``N`` threads for the whole
run; ``--quick`` pins one thread unless ``--threads`` is given (a smoke test on a
shared CI machine). Benchmark 1 also times the reference and PyTorch pinned to
one thread, in the same rounds, as a second table.
A benchmark that raises is reported as failed (traceback in its page) and the
others still run; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import _common  # noqa: E402  (no numpy import: thread settings must come first)

BENCHMARKS = {
    "1": ("bench_speed", "Reference speed"),
    "2": ("bench_verification_cost", "Verification cost"),
    "3": ("bench_sensitivity", "Sensitivity"),
    "4": ("bench_fd_accuracy", "Finite-difference accuracy"),
    "5": ("bench_scale", "Scale"),
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one run each: a smoke test of every path")
    ap.add_argument("--out", default=None, help="output folder (default: reports/benchmarks, or "
                                                "reports/latest/benchmarks-quick with --quick)")
    ap.add_argument("--only", nargs="*", choices=list(BENCHMARKS), default=None, help="run these benchmarks only")
    ap.add_argument("--threads", type=int, default=None,
                    help="pin BLAS, OpenMP, torch and XLA to this many threads (default: the libraries' own "
                         "defaults, what a user gets; 1 with --quick; 0: the defaults, also with --quick)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="timed rounds per size in benchmark 1 (default 7/5/3 from the smallest size to the "
                         "largest, rounded up to whole rotations of the configurations: 10/5/5 with JAX; "
                         "given: as given, the largest size one fewer)")
    return ap.parse_args(argv)


def _plot(path: str, draw, dpi: int) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        draw(plt)
        plt.savefig(path, dpi=dpi)
        return None
    except Exception:  # a broken plot must not lose the tables
        return traceback.format_exc()
    finally:
        plt.close("all")


def _page(res: _common.Result, command: str, plots: list[str]) -> str:
    lines = [f"# {res.title}", "", f"Command: `{command}`. Wall time {res.seconds:.0f} s; load average "
             f"(1, 5, 15 min) before {res.load_before}, after {res.load_after}.", "", res.markdown, ""]
    for p in plots:
        lines += [f"![{p}]({p})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    threads = (1 if args.quick else None) if args.threads is None else (None if args.threads == 0 else args.threads)
    _common.set_thread_env(threads)  # before numpy / torch / jax are imported
    import importlib

    _common.set_torch_threads(threads)
    default = ("reports", "latest", "benchmarks-quick") if args.quick else ("reports", "benchmarks")
    out = args.out or os.path.join(ROOT, *default)
    os.makedirs(out, exist_ok=True)
    command = "python benchmarks/run.py" + (" --quick" if args.quick else "") + (
        f" --only {' '.join(args.only)}" if args.only else "") + (
        f" --threads {args.threads}" if args.threads is not None else "") + (
        f" --rounds {args.rounds}" if args.rounds is not None else "")
    chosen = args.only or list(BENCHMARKS)
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.perf_counter()
    env_before = _common.environment(threads)
    results: list[_common.Result] = []
    failed: list[tuple[str, str]] = []
    for key in BENCHMARKS:
        if key not in chosen:
            continue
        module_name, title = BENCHMARKS[key]
        _common.log(f"[{key}] {title} ...")
        load_before = _common.load()
        t1 = time.perf_counter()
        try:
            module = importlib.import_module(f"benchmarks.{module_name}")
            if args.rounds is not None and hasattr(module, "ROUNDS"):
                module.ROUNDS = args.rounds
            res = module.run(args.quick)
        except Exception:
            tb = traceback.format_exc()
            _common.log(tb)
            failed.append((key, title))
            res = _common.Result(f"{key}-failed", f"{title} (FAILED)", "```\n" + tb + "```", {"traceback": tb})
        res.seconds = time.perf_counter() - t1
        res.load_before, res.load_after = load_before, _common.load()
        plots = []
        for fname, draw in res.plots:
            err = _plot(os.path.join(out, fname), draw, 50 if args.quick else 110)
            if err:
                res.markdown += f"\n\nPlot {fname} failed:\n```\n{err}```"
            else:
                plots.append(fname)
        with open(os.path.join(out, f"{res.name}.md"), "w") as fh:
            fh.write(_page(res, command, plots))
        results.append(res)
        _common.log(f"[{key}] done in {res.seconds:.0f} s (load {res.load_after})")
    total = time.perf_counter() - t0
    env = _common.environment(threads)
    env["load_average"] = f"{env_before['load_average']} at start, {env['load_average']} at end"
    mode = "quick (smoke test: tiny sizes, single runs; not for quoting)" if args.quick else "full"
    lines = [
        "# metaverify benchmarks",
        "",
        f"Command: `{command}` ({mode}). Started {started:%Y-%m-%d %H:%M} UTC, total wall time {total / 60:.1f} min.",
        "",
        "Times are wall-clock on a shared machine (see the load averages): medians with min-max over runs; every "
        "ratio is measured pairwise in the same run (implementations alternate). Thread pools: "
        + (f"pinned to {threads} thread(s) each (`--threads`)." if threads else
           f"the libraries' defaults, what a user gets ({_common.default_threads()} threads on this "
           f"{os.cpu_count()}-core machine); benchmark 1 adds a one-thread table."),
        "",
        "## Headline",
        "",
    ]
    for res in results:
        lines += [f"- {h}" for h in res.headline]
    if failed:
        lines += ["", "**Failed:** " + ", ".join(f"{k} ({t})" for k, t in failed)]
    lines += ["", "## Benchmarks", ""]
    for res in results:
        lines += [f"- [{res.title}]({res.name}.md): {res.seconds:.0f} s, load {res.load_before} -> {res.load_after}"]
    lines += ["", "## Machine and libraries", "", _common.environment_markdown(env), ""]
    for res in results:
        lines += [f"## {res.title}", "", res.markdown, ""]
        lines += [f"![{f}]({f})" for f, _ in res.plots if os.path.exists(os.path.join(out, f))] + [""]
    with open(os.path.join(out, "README.md"), "w") as fh:
        fh.write("\n".join(lines))
    _common.write_json(os.path.join(out, "results.json"), {
        "command": command, "mode": mode, "started": started.isoformat(), "seconds": total, "environment": env,
        "benchmarks": {r.name: {"title": r.title, "seconds": r.seconds, "load_before": r.load_before,
                                "load_after": r.load_after, "headline": r.headline, "data": r.data}
                       for r in results},
    })
    _common.log(f"wrote {out} in {total:.0f} s" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
