"""Benchmark of the NumPy reference's linear algebra: iMAML CG vs direct, R2-D2 primal vs dual.

Not a test: it measures, it asserts nothing except that the two ways agree.

1. iMAML. For an MLP ``[1, h, h, 1]`` (sinusoid task, 10 support / 10 query
   points, ``lam = 1``) with ``n`` parameters from ~1e2 to ~1e5, the inner
   problem is solved once (``reference.imaml.inner_solve``) and the implicit
   system ``(I + H_s(phi*)/lam) g = grad L_q(phi*)`` is then solved two ways,
   exactly as ``reference.imaml`` does:

   * ``cg``: conjugate gradient on Hessian-vector products (R-operator),
     ``O(n)`` memory, cost ``iterations x HVP``;
   * ``direct``: the dense Hessian built by the R-operator on blocks of basis
     directions, a Cholesky test, an LU/Cholesky solve: ``O(n^2)`` memory,
     ``O(n)`` HVPs (vectorised in blocks) + ``O(n^3)`` flops.

   Reported per size: wall time (best of ``--repeat``), peak memory
   (``tracemalloc``, separate run), CG iterations, and the relative difference
   of the two solutions. Direct is skipped when the dense Hessian would exceed
   ``--max-dense-gb``. The crossover is the first size where CG is faster.
   BLAS runs single-threaded unless ``OPENBLAS_NUM_THREADS`` is set.

2. R2-D2. ``reference.r2d2.meta_loss_and_grad`` with ``form="primal"``
   (a ``p x p`` solve, ``p`` = features + 1) against ``form="dual"`` (an
   ``n x n`` solve, ``n`` = support examples) as the feature width and the
   number of shots vary (5-way tasks, backbone ``[8, 32, d]`` tanh).

Usage (from the repository root)::

    python -m benchmarks.bench_reference_imaml_r2d2            # full: iMAML up to ~1e5 params
    python -m benchmarks.bench_reference_imaml_r2d2 --quick    # < 30 s
    python -m benchmarks.bench_reference_imaml_r2d2 --json out.json
"""

from __future__ import annotations

import os

# Single-threaded BLAS unless the caller says otherwise: on a shared machine, BLAS threads
# that busy-wait for a descheduled sibling turn a 1 ms solve into hundreds of ms at random,
# which swamps the comparison. (Set before NumPy is imported; at most a 2x loss on 2 cores
# for the dense direct solve, which is the one that could use the threads.)
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reference import imaml, r2d2  # noqa: E402
from reference.linalg import SPDFactor, conjugate_gradient  # noqa: E402
from reference.models import MLP, flatten, unflatten  # noqa: E402
from reference.tasks import gaussian_classification, sinusoid  # noqa: E402

# Hidden widths h of MLP [1, h, h, 1]: n = h^2 + 4h + 1 parameters.
FULL_WIDTHS = (8, 14, 30, 45, 61, 98, 175, 314)  # ~1e2 ... ~1e5
QUICK_WIDTHS = (8, 14, 30, 45)  # ~1e2 ... ~2e3
FULL_R2D2 = {"features": (16, 64, 256, 1024), "k_shot": (1, 5, 20, 100)}
QUICK_R2D2 = {"features": (16, 128, 512), "k_shot": (1, 10, 40)}
_BLOCK = 256  # basis directions per vectorised R-operator call when building a dense Hessian


def _best_time(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _peak_bytes(fn: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _dense_hessian(model: MLP, phi, x, y) -> np.ndarray:
    """The R-operator on blocks of basis directions (as ``MLP.hessian``, without its size cap)."""
    n = model.n_params
    H = np.empty((n, n))
    offsets = np.cumsum([0] + [int(np.prod(s)) for s in model.shapes])
    for start in range(0, n, _BLOCK):
        stop = min(start + _BLOCK, n)
        m = stop - start
        basis = np.zeros((m, n))
        basis[np.arange(m), np.arange(start, stop)] = 1.0
        v = [basis[:, a:b].reshape((m, *s)) for a, b, s in zip(offsets[:-1], offsets[1:], model.shapes)]
        cols = model._hvp(phi, x, y, v)
        H[:, start:stop] = np.concatenate([c.reshape(m, -1) for c in cols], axis=1).T
    return H


def bench_imaml(widths, *, lam: float, repeat: int, max_dense_gb: float, log) -> list[dict[str, Any]]:
    rows = []
    (task,) = sinusoid(1, 10, 10, seed=0)
    for h in widths:
        model = MLP([1, h, h, 1], activation="tanh")
        params = model.init(0)
        n = model.n_params
        t0 = time.perf_counter()
        z, res, _, inner_it = imaml.inner_solve(model, params, task, lam, solver="cg")
        t_inner = time.perf_counter() - t0
        phi = unflatten(z, model.shapes)
        b = flatten(model.grad(phi, task.x_query, task.y_query))

        def matvec(v, phi=phi, model=model):
            return v + flatten(model._hvp(phi, task.x_support, task.y_support, unflatten(v, model.shapes))) / lam

        def run_cg(matvec=matvec, b=b, n=n):
            return conjugate_gradient(matvec, b, rtol=1e-12, maxiter=2 * n + 100, what="I + H/lam")

        t_cg, (x_cg, info) = _best_time(run_cg, repeat)
        m_cg = _peak_bytes(run_cg)
        row = {"n_params": n, "inner_s": t_inner, "inner_iterations": inner_it, "stationarity": res,
               "cg_s": t_cg, "cg_iterations": info.iterations, "cg_peak_mb": m_cg / 1e6,
               "cond_estimate": info.cond_estimate}
        if 8 * n * n / 1e9 <= max_dense_gb:
            def run_direct(model=model, phi=phi, b=b, n=n):
                H = _dense_hessian(model, phi, task.x_support, task.y_support)
                return SPDFactor(np.eye(n) + H / lam, what="I + H/lam").solve(b)

            t_d, x_d = _best_time(run_direct, repeat)
            row.update(direct_s=t_d, direct_peak_mb=_peak_bytes(run_direct) / 1e6,
                       rel_diff=float(np.linalg.norm(x_cg - x_d) / np.linalg.norm(x_d)))
        else:
            row.update(direct_s=None, direct_peak_mb=8 * n * n / 1e6, rel_diff=None)
        rows.append(row)
        log(f"  iMAML n={n}: inner {t_inner:.2f}s, cg {t_cg:.3f}s ({info.iterations} it), "
            f"direct {row['direct_s'] if row['direct_s'] is None else round(row['direct_s'], 3)}s")
    return rows


def bench_r2d2(features, k_shots, *, repeat: int, log) -> list[dict[str, Any]]:
    rows = []
    for d in features:
        backbone = MLP([8, 32, d], activation="tanh")
        params = backbone.init(0)
        for k in k_shots:
            tasks = gaussian_classification(5, k, 5, 8, seed=1)
            times = {}
            out = {}
            for form in r2d2.FORMS:
                def run(form=form, backbone=backbone, params=params, tasks=tasks):
                    return r2d2.meta_loss_and_grad(backbone, params, tasks, 5, 1.0, 1.0, 0.0, form=form)

                times[form], out[form] = _best_time(run, repeat)
            gp, gd = flatten(out["primal"][1]), flatten(out["dual"][1])
            rows.append({"features": d, "shots": 5 * k, "primal_s": times["primal"], "dual_s": times["dual"],
                         "faster": min(times, key=times.get),
                         "rel_diff": float(np.linalg.norm(gp - gd) / np.linalg.norm(gp))})
            log(f"  R2-D2 d={d} n={5 * k}: primal {times['primal'] * 1e3:.1f} ms, dual {times['dual'] * 1e3:.1f} ms")
    return rows


def _fmt_time(t: float | None) -> str:
    return "n/a" if t is None else (f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s")


def report(imaml_rows, r2d2_rows, lam) -> str:
    lines = [f"## iMAML implicit solve (I + H/lam) g = grad L_q, lam={lam}, MLP [1,h,h,1], 10 support points", "",
             "| params | CG time | CG iters | CG peak MB | direct time | direct peak MB | rel diff | inner solve |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    crossover = None
    for r in imaml_rows:
        direct_mb = f"{r['direct_peak_mb']:.1f}" if r["direct_s"] is not None else f"({r['direct_peak_mb']:.0f} needed)"
        rel = "n/a" if r["rel_diff"] is None else f"{r['rel_diff']:.1e}"
        lines.append(f"| {r['n_params']} | {_fmt_time(r['cg_s'])} | {r['cg_iterations']} | {r['cg_peak_mb']:.1f} | "
                     f"{_fmt_time(r['direct_s'])} | {direct_mb} | {rel} | {_fmt_time(r['inner_s'])} |")
        if crossover is None and (r["direct_s"] is None or r["cg_s"] < r["direct_s"]):
            crossover = r["n_params"]
    lines += ["", f"Crossover: CG is faster from n = {crossover} parameters on" if crossover else
              "Crossover: not reached in this range (direct faster everywhere)", ""]
    lines += ["## R2-D2 primal (p x p) vs dual (n x n) meta_loss_and_grad, 5-way, backbone [8, 32, d]", "",
              "| features d | support n | primal | dual | faster | rel diff |", "|---:|---:|---:|---:|:--|---:|"]
    for r in r2d2_rows:
        lines.append(f"| {r['features']} | {r['shots']} | {_fmt_time(r['primal_s'])} | {_fmt_time(r['dual_s'])} | "
                     f"{r['faster']} | {r['rel_diff']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, two repeats (< 30 s on an idle 2-core machine)")
    ap.add_argument("--repeat", type=int, default=None, help="timing repeats (best of); default 3, quick 2")
    ap.add_argument("--lam", type=float, default=1.0, help="iMAML proximal weight")
    ap.add_argument("--max-dense-gb", type=float, default=1.5, help="largest dense Hessian the direct solve may build")
    ap.add_argument("--json", default=None, help="also write the raw rows to this file")
    args = ap.parse_args(argv)
    repeat = args.repeat or (2 if args.quick else 3)
    widths = QUICK_WIDTHS if args.quick else FULL_WIDTHS
    grid = QUICK_R2D2 if args.quick else FULL_R2D2

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    imaml_rows = bench_imaml(widths, lam=args.lam, repeat=repeat, max_dense_gb=args.max_dense_gb, log=log)
    r2d2_rows = bench_r2d2(grid["features"], grid["k_shot"], repeat=repeat, log=log)
    # Wall-clock times: on a shared machine they depend on its load, so the load is reported too.
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    env = (f"numpy {np.__version__}, Python {platform.python_version()}, {platform.machine()}, "
           f"{os.cpu_count()} CPUs, BLAS threads {os.environ.get('OPENBLAS_NUM_THREADS')}, "
           f"load average {load:.1f}, total {time.perf_counter() - t0:.1f} s")
    print(report(imaml_rows, r2d2_rows, args.lam))
    print(f"\n({env})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"imaml": imaml_rows, "r2d2": r2d2_rows, "environment": env}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
