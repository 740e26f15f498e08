"""Benchmark 1: the NumPy reference's meta-gradients against PyTorch autograd and JAX (jit), CPU, float64.

Run from the repository root (``run.py`` runs it with the others)::

    /work/venv/bin/python benchmarks/bench_speed.py [--quick]

* MAML: the problem, the reference call and the PyTorch loop are those of
  ``benchmarks/bench_reference_maml.py`` (issue 3; imported, not copied):
  sinusoid regression, relu MLPs 1-40-40-1, 1-256-256-1, 8-1024-1024-1
  (1.06M parameters), 25 tasks, 10/10 shots, K = 5, inner_lr 0.01. JAX:
  ``verify.backends.jax.maml.meta_loss_and_grad(..., jit=True)`` (``vmap`` over
  the tasks, unrolled ``jax.grad`` inner loop).
* iMAML (Rajeswaran et al. 2019), CG solve of ``(I + H/lam) g = grad L_q``:
  ``reference.imaml`` vs ``verify.backends.torch.imaml`` vs
  ``verify.backends.jax.imaml`` (jit), tanh MLPs 1-40-40-1 and 1-256-256-1,
  2 sinusoid tasks, lam = 1 (each implementation solves its inner problem to
  near machine precision, so this is the cost of an *exact* implicit gradient).
* R2-D2 (Bertinetto et al. 2019), dual ridge head: tanh backbones 8-40-40,
  8-256-256, 8-1024-1024 (1.06M parameters), 25 tasks, 5-way 5-shot 15-query
  Gaussian classification, lam = 1, scale = 1, offset = 0.

Per size the implementations run in alternating rounds after one warm-up
round (the JAX warm-up is its compilation, reported separately); the largest
size runs one timed round and no warm-up for NumPy/PyTorch (their first call
is the timed one). Ratios are per-round ``t_impl / t_reference``. Memory: the
peak-RSS increase during the first timed call. The gradients are compared
(``max rel diff``: max |a - b| / max |reference|).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import Result, Span, alternate, fmt_mb, fmt_ratio, log, md_table, pairwise, timed  # noqa: E402
from reference.models import MLP, flatten  # noqa: E402

IMPLS = ("reference", "torch", "jax")


def _rel(a: list[np.ndarray], ref: list[np.ndarray]) -> float:
    fa, fr = flatten([np.asarray(x, dtype=float) for x in a]), flatten([np.asarray(x, dtype=float) for x in ref])
    return float(np.max(np.abs(fa - fr)) / max(np.max(np.abs(fr)), np.finfo(float).tiny))


def _measure(label: str, n_params: int, fns: dict[str, Callable[[], Any]], repeats: int, largest: bool,
             grads: Callable[[dict[str, Any]], dict[str, list[np.ndarray]]]) -> dict[str, Any]:
    """Compile JAX, warm up (unless ``largest``), time alternating rounds, compare gradients."""
    compile_s, _ = timed(fns["jax"]) if "jax" in fns else (float("nan"), None)
    times, outs, rss = alternate(fns, repeats, warmup=0 if largest else 1, memory=True)
    g = grads(outs)
    row = {"model": label, "params": n_params, "times": times, "rss": rss, "repeats": repeats,
           "jax_first_call": compile_s,
           "ratios": {k: pairwise(times, k, "reference") for k in fns if k != "reference"},
           "max_rel_diff": {k: _rel(g[k], g["reference"]) for k in g if k != "reference"}}
    log(f"  speed {label}: " + ", ".join(f"{k} {times[k].median:.3g} s" for k in fns))
    return row


def bench_maml(quick: bool) -> list[dict[str, Any]]:
    from benchmarks.bench_reference_maml import INNER_LR, SIZES, TorchMAML, make_problem, reference_grad
    from verify.backends.jax import maml as jmaml

    sizes = {"1-8-8-1": [1, 8, 8, 1]} if quick else SIZES
    n_tasks, steps = (2, 2) if quick else (25, 5)
    rows = []
    for i, (label, sz) in enumerate(sizes.items()):
        model, params, tasks = make_problem(sz, n_tasks, 10)
        torch_fn = TorchMAML(params, tasks)
        largest = not quick and i == len(sizes) - 1
        fns = {
            "reference": lambda: reference_grad(model, params, tasks, steps),
            "torch": lambda: torch_fn(steps),
        }
        if not quick:  # a JAX compilation costs ~3 s of CPU: not part of a smoke test
            fns["jax"] = lambda: jmaml.meta_loss_and_grad(model, params, tasks, INNER_LR, steps, jit=True)
        repeats = 1 if (quick or largest) else (5 if i == 0 else 3)
        rows.append(_measure(label, model.n_params, fns, repeats, largest,
                             lambda outs: {k: v[1] for k, v in outs.items()}))
    return rows


def bench_imaml(quick: bool) -> list[dict[str, Any]]:
    from reference import imaml
    from reference.tasks import sinusoid
    from verify.backends.jax import imaml as jimaml
    from verify.backends.torch import imaml as timaml

    sizes = {"1-8-8-1": [1, 8, 8, 1]} if quick else {"1-40-40-1": [1, 40, 40, 1], "1-256-256-1": [1, 256, 256, 1]}
    tasks = sinusoid(1 if quick else 2, 10, 10, seed=0)
    rows = []
    for i, (label, sz) in enumerate(sizes.items()):
        model = MLP(sz, "tanh", "mse")
        params = model.init(0)
        largest = not quick and i == len(sizes) - 1
        fns = {
            "reference": lambda: imaml.meta_loss_and_grad(model, params, tasks, 1.0),
            "torch": lambda: timaml.meta_loss_and_grad(model, params, tasks, 1.0),
        }
        if not quick:
            fns["jax"] = lambda: jimaml.meta_loss_and_grad(model, params, tasks, 1.0, jit=True)
        rows.append(_measure(label, model.n_params, fns, 1 if (quick or largest) else 3, largest,
                             lambda outs: {k: v[1] for k, v in outs.items()}))
    return rows


def bench_r2d2(quick: bool) -> list[dict[str, Any]]:
    from reference import r2d2
    from reference.tasks import gaussian_classification
    from verify.backends.jax import r2d2 as jr2d2
    from verify.backends.torch import r2d2 as tr2d2

    sizes = ({"8-16-16": [8, 16, 16]} if quick else
             {"8-40-40": [8, 40, 40], "8-256-256": [8, 256, 256], "8-1024-1024": [8, 1024, 1024]})
    tasks = gaussian_classification(5, 1 if quick else 5, 5 if quick else 15, 8, n_tasks=2 if quick else 25, seed=1)
    rows = []
    for i, (label, sz) in enumerate(sizes.items()):
        model = MLP(sz, "tanh", "mse")
        params = model.init(0)
        largest = not quick and i == len(sizes) - 1
        impls = [("reference", r2d2, {}), ("torch", tr2d2, {})] + ([] if quick else [("jax", jr2d2, {"jit": True})])
        fns = {name: (lambda mod=mod, kw=kw: mod.meta_loss_and_grad(model, params, tasks, 5, 1.0, 1.0, 0.0, **kw))
               for name, mod, kw in impls}
        repeats = 1 if (quick or largest) else (5 if i == 0 else 3)
        rows.append(_measure(label, model.n_params, fns, repeats, largest,
                             lambda outs: {k: list(v[1]) + [v[2][h] for h in ("lam", "scale", "offset")]
                                           for k, v in outs.items()}))
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        t: dict[str, Span] = r["times"]
        has_jax = "jax" in t
        out.append([r["model"], f"{r['params']:,}", r["repeats"], t["reference"].fmt(), t["torch"].fmt(),
                    t["jax"].fmt() if has_jax else "not run", f"{r['jax_first_call']:.2f} s" if has_jax else "",
                    fmt_ratio(r["ratios"]["torch"]), fmt_ratio(r["ratios"]["jax"]) if has_jax else "",
                    fmt_mb(r["rss"].get("reference")), fmt_mb(r["rss"].get("torch")), fmt_mb(r["rss"].get("jax")),
                    f"{max(r['max_rel_diff'].values()):.1e}"])
    return md_table(["model", "params", "runs", "reference", "torch", "jax (jit)", "jax 1st call (compile)",
                     "torch / ref", "jax / ref", "ref RSS MB", "torch RSS MB", "jax RSS MB", "max rel diff"], out)


def run(quick: bool = False) -> Result:
    t0 = time.perf_counter()
    data = {"maml": bench_maml(quick), "imaml": bench_imaml(quick), "r2d2": bench_r2d2(quick)}
    md = [
        "Times: median (min-max) over the timed rounds; ratios: per-round time / reference time, median (min-max). "
        "RSS: peak resident-set increase during the first timed call (MB). `max rel diff`: largest "
        "|gradient - reference| / max |reference| over torch and jax.",
        "",
        "### MAML (sinusoid, relu, " + ("2 tasks, K=2 [quick]" if quick else "25 tasks, 10/10 shots, K=5") +
        ", inner_lr 0.01; problem and PyTorch loop from `bench_reference_maml.py`)",
        "",
        _table(data["maml"]),
        "",
        "### iMAML (CG implicit solve, tanh, " + ("1 task" if quick else "2 tasks") + ", lam=1)",
        "",
        _table(data["imaml"]),
        "",
        "### R2-D2 (dual ridge head, tanh backbone, " + ("2 tasks 5-way 1-shot [quick]" if quick else
                                                         "25 tasks 5-way 5-shot 15-query") + ")",
        "",
        _table(data["r2d2"]),
        "",
        "The largest size of each table has one timed run (no warm-up for NumPy/PyTorch; JAX's first call, "
        "with compilation, is the separate column)."
        + (" Quick mode: no JAX (each compilation costs seconds of CPU; the full run has it)." if quick else ""),
    ]
    head = []
    for algo in ("maml", "imaml", "r2d2"):
        r = data[algo][-1]
        jax = f", jax/reference {r['ratios']['jax'].median:.2g}x" if "jax" in r["ratios"] else ""
        head.append(f"speed {algo} {r['model']} ({r['params']:,} params): torch/reference "
                    f"{r['ratios']['torch'].median:.2g}x{jax}")
    return Result("1-speed", "Reference speed: NumPy reference vs PyTorch autograd vs JAX jit", "\n".join(md), data,
                  plots=[("speed.png", plot(data))], headline=head, seconds=time.perf_counter() - t0)


def plot(data: dict[str, Any]) -> Callable[[Any], None]:
    def draw(plt: Any) -> None:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for ax, algo in zip(axes, ("maml", "imaml", "r2d2")):
            rows = data[algo]
            x = np.arange(len(rows))
            for k, impl in enumerate(IMPLS):
                if any(impl not in r["times"] for r in rows):
                    continue
                med = [r["times"][impl].median for r in rows]
                lo = [r["times"][impl].median - r["times"][impl].lo for r in rows]
                hi = [r["times"][impl].hi - r["times"][impl].median for r in rows]
                ax.bar(x + (k - 1) * 0.27, med, 0.27, yerr=[lo, hi], label=impl, color=f"C{k}")
            ax.set_xticks(x)
            ax.set_xticklabels([f"{r['model']}\n{r['params']:,}" for r in rows], fontsize=8)
            ax.set_yscale("log")
            ax.set_ylabel("seconds per meta-gradient")
            ax.set_title(algo)
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
