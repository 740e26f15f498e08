"""Benchmark 1: the NumPy reference's meta-gradients against PyTorch autograd and JAX (jit), CPU, float64.

Run from the repository root (``run.py`` runs it with the others)::

    python benchmarks/bench_speed.py [--quick]

* MAML: the problem, the reference call and the PyTorch loop are those of
  ``benchmarks/bench_reference_maml.py`` (issue 3; imported, not copied):
  sinusoid regression, relu MLPs 1-40-40-1, 1-256-256-1, 8-1024-1024-1
  (1.06M parameters), 25 tasks, 10/10 shots, K = 5, inner_lr 0.01. JAX:
  ``verify.backends.jax.maml.meta_loss_and_grad(..., jit=True)`` (``vmap`` over
  the tasks, unrolled ``jax.grad`` inner loop).
* iMAML (Rajeswaran et al. 2019), CG solve of ``(I + H/lam) g = grad L_q``:
  ``reference.imaml`` vs ``verify.backends.torch.imaml`` vs
  ``verify.backends.jax.imaml`` (jit), tanh MLPs 1-40-40-1 and 1-256-256-1
  (2 sinusoid tasks of ``reference.tasks.sinusoid``) and 8-1024-1024-1 (1.06M
  parameters; the first 2 tasks of the MAML problem, 10/10 shots), lam = 1
  (each implementation solves its inner problem to near machine precision, so
  this is the cost of an *exact* implicit gradient).
* R2-D2 (Bertinetto et al. 2019), dual ridge head: tanh backbones 8-40-40,
  8-256-256, 8-1024-1024 (1.06M parameters), 25 tasks, 5-way 5-shot 15-query
  Gaussian classification, lam = 1, scale = 1, offset = 0.

* The other per-task algorithms of the reference (issue 18: on the same thread
  policy), reference only: ProtoNets, Matching networks and LR-D2 (backbone
  8-256-256, 25 tasks 5-way (LR-D2: 2-way) 5-shot 15-query), Newton-MAML
  (1-10-10-1, 25 sinusoid tasks, K=2), gradient flow (1-10-10-1, 4 tasks,
  T=0.3), Reptile (relu 1-256-256-1, 25 tasks, K=5). Each at default settings,
  pinned to one thread, and with reference/_threads.py switched off (``ref policy
  off``: tasks, or ProtoNets', Matching nets' and LR-D2's stacked blocks of tasks,
  in a plain loop with BLAS at the user's setting, as before issue 18's policy
  reached these algorithms; the stacking is new too and runs either way).

Threads: the main table is at the libraries' default settings (what a user
gets: on the 2-core benchmark machine OpenBLAS and torch use 2 threads, XLA its
own pool), unless ``run.py --threads`` pinned them; in the same rounds the
reference and PyTorch also run pinned to one thread (``threadpoolctl`` for the
BLAS libraries, ``torch.set_num_threads``), the second table. ``ref / ref 1t``
is the reference's default-settings time over its one-thread time (goal <= 1:
extra cores must not slow it down; issue 18).

Per size every timed configuration (each implementation at default threads,
the reference and PyTorch pinned to one thread) gets one untimed warm-up call
first (JAX's first call, its compilation, is timed separately before that),
then they run in alternating rounds whose order rotates from round to round,
so no row is a cold first call and none always runs first. By default the
rounds are whole rotations: 7 / 5 / 3 rounds (smallest / middle / largest size)
rounded up to a multiple of the number of configurations (5 with JAX: 10 / 5 /
5), so each configuration runs equally often at every position and after every
neighbour; ``run.py --rounds N`` runs N (the largest size N - 1) as given. Ratios are
per-round ``t_impl / t_reference``.
Memory: the reference's peak traced allocation (``tracemalloc``) at every
size, and at the largest size of each table the peak-RSS increase of one call
of each implementation, measured in a fresh process (``_common.rss_probe``;
NumPy and PyTorch after one warm-up call, JAX on its first, compiling call).
The gradients are compared (``max rel diff``: max |a - b| / max |reference|).
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

from benchmarks._common import (  # noqa: E402
    Result,
    Span,
    alternate,
    at_threads,
    default_threads,
    fmt_mb,
    fmt_ratio,
    log,
    md_table,
    pairwise,
    rss_probe,
    timed,
    tracemalloc_peak,
)
from reference.models import MLP, flatten  # noqa: E402

IMPLS = ("reference", "torch", "jax")
#: Timed rounds per size (None: 7/5/3 from the smallest to the largest size, in whole rotations);
#: run.py --rounds sets it.
ROUNDS: int | None = None


def _rel(a: list[np.ndarray], ref: list[np.ndarray]) -> float:
    fa, fr = flatten([np.asarray(x, dtype=float) for x in a]), flatten([np.asarray(x, dtype=float) for x in ref])
    return float(np.max(np.abs(fa - fr)) / max(np.max(np.abs(fr)), np.finfo(float).tiny))


def _maml_sizes(quick: bool) -> dict[str, list[int]]:
    from benchmarks.bench_reference_maml import SIZES

    return {"1-8-8-1": [1, 8, 8, 1]} if quick else dict(SIZES)


def _imaml_sizes(quick: bool) -> dict[str, list[int]]:
    return {"1-8-8-1": [1, 8, 8, 1]} if quick else {"1-40-40-1": [1, 40, 40, 1], "1-256-256-1": [1, 256, 256, 1],
                                                    "8-1024-1024-1": [8, 1024, 1024, 1]}


def _r2d2_sizes(quick: bool) -> dict[str, list[int]]:
    return ({"8-16-16": [8, 16, 16]} if quick else
            {"8-40-40": [8, 40, 40], "8-256-256": [8, 256, 256], "8-1024-1024": [8, 1024, 1024]})


def maml_case(label: str, quick: bool) -> tuple[int, dict[str, Callable[[], Any]]]:
    """``(n_params, {impl: zero-argument call returning (loss, grads)})`` of one MAML problem."""
    from benchmarks.bench_reference_maml import INNER_LR, TorchMAML, make_problem, reference_grad

    n_tasks, steps = (2, 2) if quick else (25, 5)
    model, params, tasks = make_problem(_maml_sizes(quick)[label], n_tasks, 10)
    torch_fn = TorchMAML(params, tasks)
    fns: dict[str, Callable[[], Any]] = {"reference": lambda: reference_grad(model, params, tasks, steps),
                                         "torch": lambda: torch_fn(steps)}
    if not quick:  # a JAX compilation costs ~3 s of CPU: not part of a smoke test

        def jax_fn() -> Any:
            from verify.backends.jax import maml as jmaml

            return jmaml.meta_loss_and_grad(model, params, tasks, INNER_LR, steps, jit=True)

        fns["jax"] = jax_fn
    return model.n_params, fns


def imaml_case(label: str, quick: bool) -> tuple[int, dict[str, Callable[[], Any]]]:
    from reference import imaml
    from reference.tasks import sinusoid

    sizes = _imaml_sizes(quick)[label]
    if sizes[0] == 1:
        tasks = sinusoid(1 if quick else 2, 10, 10, seed=0)
    else:  # 8 inputs: MAML's sinusoid problem (x in [-5, 5]^8), its first two tasks
        from benchmarks.bench_reference_maml import make_problem

        tasks = make_problem(sizes, 2, 10)[2]
    model = MLP(sizes, "tanh", "mse")
    params = model.init(0)

    def torch_fn() -> Any:
        from verify.backends.torch import imaml as timaml

        return timaml.meta_loss_and_grad(model, params, tasks, 1.0)

    fns: dict[str, Callable[[], Any]] = {"reference": lambda: imaml.meta_loss_and_grad(model, params, tasks, 1.0),
                                         "torch": torch_fn}
    if not quick:

        def jax_fn() -> Any:
            from verify.backends.jax import imaml as jimaml

            return jimaml.meta_loss_and_grad(model, params, tasks, 1.0, jit=True)

        fns["jax"] = jax_fn
    return model.n_params, fns


def r2d2_case(label: str, quick: bool) -> tuple[int, dict[str, Callable[[], Any]]]:
    from reference import r2d2
    from reference.tasks import gaussian_classification

    tasks = gaussian_classification(5, 1 if quick else 5, 5 if quick else 15, 8, n_tasks=2 if quick else 25, seed=1)
    model = MLP(_r2d2_sizes(quick)[label], "tanh", "mse")
    params = model.init(0)

    def call(backend: str) -> Callable[[], Any]:
        def fn() -> Any:
            import importlib

            mod = r2d2 if backend == "reference" else importlib.import_module(f"verify.backends.{backend}.r2d2")
            kw = {"jit": True} if backend == "jax" else {}
            loss, grads, head = mod.meta_loss_and_grad(model, params, tasks, 5, 1.0, 1.0, 0.0, **kw)
            return loss, list(grads) + [head[h] for h in ("lam", "scale", "offset")]

        return fn

    return model.n_params, {b: call(b) for b in (("reference", "torch") if quick else IMPLS)}


CASES = {"maml": (maml_case, _maml_sizes), "imaml": (imaml_case, _imaml_sizes), "r2d2": (r2d2_case, _r2d2_sizes)}


def other_cases(quick: bool) -> dict[str, tuple[str, int, Callable[[], Any]]]:
    """``name -> (problem, params, zero-argument reference call)`` of the other per-task algorithms."""
    from reference import flow, lrd2, matchingnet, newton, protonet, reptile
    from reference.tasks import gaussian_classification, sinusoid

    n = 2 if quick else 25
    bb = MLP([8, 16, 16] if quick else [8, 256, 256], "tanh", "mse")
    bp = bb.init(0)
    cls = gaussian_classification(5, 5, 15, 8, n_tasks=n, seed=1)
    binary = gaussian_classification(2, 5, 15, 8, n_tasks=n, seed=1)
    small = MLP([1, 10, 10, 1], "tanh", "mse")
    sp = small.init(0)
    reg = MLP([1, 16, 16, 1] if quick else [1, 256, 256, 1], "relu", "mse")
    rp = reg.init(0)
    sin = sinusoid(n, 10, 10, seed=0)
    feat = f"{'-'.join(map(str, bb.sizes))}, {n} tasks"
    return {
        "ProtoNets": (feat + " 5-way 5-shot 15-query", bb.n_params, lambda: protonet.loss_and_grad(bb, bp, cls, 5)),
        "Matching nets": (feat + " 5-way 5-shot 15-query", bb.n_params,
                          lambda: matchingnet.loss_and_grad(bb, bp, cls, 5)),
        "LR-D2": (feat + " 2-way 5-shot 15-query, 3 Newton steps", bb.n_params,
                  lambda: lrd2.meta_loss_and_grad(bb, bp, binary, 1.0, 1.0, 0.0, 3)),
        "Newton-MAML": (f"1-10-10-1, {n} tasks, K=2", small.n_params,
                        lambda: newton.meta_loss_and_grad(small, sp, sin, 0.1, 2, 0.1)),
        "gradient flow": ("1-10-10-1, 2 tasks, T=0.1" if quick else "1-10-10-1, 4 tasks, T=0.3", small.n_params,
                          lambda: flow.meta_loss_and_grad(small, sp, sin[:2] if quick else sin[:4],
                                                          0.1 if quick else 0.3)),
        "Reptile": (f"{'-'.join(map(str, reg.sizes))} relu, {n} tasks, K=5", reg.n_params,
                    lambda: reptile.direction(reg, rp, sin, 0.01, 5)),
    }


def without_policy(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` with reference/_threads.py switched off: tasks in a plain loop, BLAS at the user's setting."""
    from reference import _threads

    def off() -> Any:
        saved = _threads._controller
        _threads._controller = False  # what the module does without threadpoolctl
        try:
            return fn()
        finally:
            _threads._controller = saved

    return off


def bench_other(quick: bool) -> list[dict[str, Any]]:
    """Every other algorithm at default settings, pinned to one thread, and without the thread policy."""
    rows = []
    for name, (problem, n_params, fn) in other_cases(quick).items():
        fns = {"reference": fn, "reference@1": at_threads(fn, 1), "no policy": without_policy(fn)}
        repeats = 1 if quick else (ROUNDS or 5)
        times, outs, _ = alternate(fns, repeats, warmup=0 if quick else 1, rotate=True)
        flat = {k: flatten([np.asarray(x, dtype=complex) for x in _leaves(v)]) for k, v in outs.items()}
        rows.append({"algorithm": name, "problem": problem, "params": n_params, "times": times, "repeats": repeats,
                     "threads": default_threads(),
                     "ratios": {"reference/reference@1": pairwise(times, "reference", "reference@1"),
                                "reference/no policy": pairwise(times, "reference", "no policy")},
                     # Under the policy the thread count changes nothing (one BLAS thread, fixed blocks, task
                     # order); with it off, multithreaded BLAS rounds large products differently.
                     "identical": bool(np.array_equal(flat["reference@1"], flat["reference"])),
                     "policy_off_rel_diff": float(np.max(np.abs(flat["no policy"] - flat["reference"]))
                                                  / max(float(np.max(np.abs(flat["reference"]))), 1e-300))})
        log(f"  speed {name}: " + ", ".join(f"{k} {times[k].median:.3g} s" for k in fns))
    return rows


def _leaves(out: Any) -> list[Any]:
    if isinstance(out, dict):
        return [y for k in sorted(out) for y in _leaves(out[k])]
    if isinstance(out, (list, tuple)):
        return [y for x in out for y in _leaves(x)]
    return [out]


def _other_table(rows: list[dict[str, Any]]) -> str:
    out = [[r["algorithm"], r["problem"], f"{r['params']:,}", r["repeats"], _threads_label(r),
            r["times"]["reference"].fmt(), r["times"]["reference@1"].fmt(), r["times"]["no policy"].fmt(),
            fmt_ratio(r["ratios"]["reference/reference@1"]), fmt_ratio(r["ratios"]["reference/no policy"]),
            "yes" if r["identical"] else "no", f"{r['policy_off_rel_diff']:.1e}"] for r in rows]
    return md_table(["algorithm", "problem", "params", "runs", "threads (BLAS / torch)", "reference",
                     "reference, 1 thread", "ref policy off", "ref / ref 1t", "ref / ref policy off",
                     "default = 1 thread, bitwise", "policy off: max rel diff"], out)


def probe(algo: str, label: str, impl: str, quick: bool) -> Callable[[], Any]:
    """The zero-argument call of one implementation (the memory probe's factory)."""
    return CASES[algo][0](label, quick)[1][impl]


def bench(algo: str, quick: bool) -> list[dict[str, Any]]:
    """Time every implementation on every size (alternating rounds); tracemalloc for the reference; a
    peak-RSS probe (fresh process) per implementation at the largest size."""
    case, sizes = CASES[algo]
    labels = list(sizes(quick))
    rows = []
    for i, label in enumerate(labels):
        n_params, fns = case(label, quick)
        largest = i == len(labels) - 1
        repeats = 1 if quick else (3 if largest else (7 if i == 0 else 5))
        if ROUNDS is not None:  # run.py --rounds: a shorter run (torch's default threads can be slow under load)
            repeats = ROUNDS if not largest else max(1, ROUNDS - 1)
        compile_s, _ = timed(fns["jax"]) if "jax" in fns else (float("nan"), None)
        # Default settings and, in the same rounds, the reference and torch pinned to one thread.
        timed_fns = {**fns, **{f"{k}@1": at_threads(fns[k], 1) for k in ("reference", "torch")}}
        if ROUNDS is None and not quick:
            # Whole rotations: every configuration runs equally often at every position and after every
            # neighbour (3 rounds of 5 configurations put the reference after torch@1 twice and never first).
            repeats = -(-repeats // len(timed_fns)) * len(timed_fns)
        threads = default_threads()
        # One untimed call of every configuration first (imports, first-touch allocations, BLAS and torch
        # thread pools, the reference's thread policy), at every size; rounds rotate their order.
        times, outs, _ = alternate(timed_fns, repeats, warmup=0 if quick else 1, rotate=True)
        _, tm_peak = tracemalloc_peak(fns["reference"])
        rss: dict[str, float] = {}
        if largest and not quick:  # (benchmark 5 exercises the probe in the quick run)
            for impl in fns:
                # NumPy and PyTorch after one warm-up call (PyTorch's one-time initialisation holds ~200 MB);
                # JAX on its first call, compilation included: XLA keeps the buffers of that call for the
                # next ones, so a second call's increase (~3 MB for R2-D2 at 1M) hides its working memory.
                rss[impl] = rss_probe("benchmarks.bench_speed", "probe",
                                      {"algo": algo, "label": label, "impl": impl, "quick": quick},
                                      warmup=0 if impl == "jax" else 1)
        g = {k: v[1] for k, v in outs.items()}
        ratios = {k: pairwise(times, k, "reference") for k in fns if k != "reference"}
        ratios["torch@1"] = pairwise(times, "torch@1", "reference@1")
        ratios["reference/reference@1"] = pairwise(times, "reference", "reference@1")
        ratios["torch/torch@1"] = pairwise(times, "torch", "torch@1")
        rows.append({"model": label, "params": n_params, "times": times, "rss": rss, "repeats": repeats,
                     "threads": threads, "jax_first_call": compile_s, "ref_tracemalloc": tm_peak,
                     "ratios": ratios,
                     "max_rel_diff": {k: _rel(g[k], g["reference"]) for k in g if k != "reference"}})
        log(f"  speed {algo} {label}: " + ", ".join(f"{k} {times[k].median:.3g} s" for k in timed_fns)
            + (f"; RSS MB {', '.join(f'{k} {v / 2**20:.0f}' for k, v in rss.items())}" if rss else ""))
    return rows


def _threads_label(r: dict[str, Any]) -> str:
    th = r.get("threads", {})
    return f"{th.get('blas', '?')} / {th.get('torch', '?')}"


def _table(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        t: dict[str, Span] = r["times"]
        has_jax = "jax" in t
        out.append([r["model"], f"{r['params']:,}", r["repeats"], _threads_label(r), t["reference"].fmt(),
                    t["torch"].fmt(), t["jax"].fmt() if has_jax else "not run",
                    f"{r['jax_first_call']:.2f} s" if has_jax else "",
                    fmt_ratio(r["ratios"]["torch"]), fmt_ratio(r["ratios"]["jax"]) if has_jax else "",
                    fmt_ratio(r["ratios"]["reference/reference@1"]),
                    fmt_mb(r["ref_tracemalloc"]), _mb(r, "reference"), _mb(r, "torch"), _mb(r, "jax"),
                    f"{max(r['max_rel_diff'].values()):.1e}"])
    return md_table(["model", "params", "runs", "threads (BLAS / torch)", "reference", "torch", "jax (jit)",
                     "jax 1st call (compile)", "torch / ref", "jax / ref", "ref / ref 1t", "ref tracemalloc MB",
                     "ref RSS MB", "torch RSS MB", "jax RSS MB (1st call)", "max rel diff"], out)


def _pinned_table(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        t: dict[str, Span] = r["times"]
        out.append([r["model"], f"{r['params']:,}", r["repeats"], t["reference@1"].fmt(), t["torch@1"].fmt(),
                    fmt_ratio(r["ratios"]["torch@1"]), fmt_ratio(r["ratios"]["reference/reference@1"]),
                    fmt_ratio(r["ratios"]["torch/torch@1"])])
    return md_table(["model", "params", "runs", "reference, 1 thread", "torch, 1 thread", "torch / ref (1 thread)",
                     "ref default / ref 1t", "torch default / torch 1t"], out)


def _mb(row: dict[str, Any], impl: str) -> str:
    return fmt_mb(row["rss"][impl]) if impl in row["rss"] else "-"


def run(quick: bool = False) -> Result:
    t0 = time.perf_counter()
    data: dict[str, Any] = {algo: bench(algo, quick) for algo in CASES}
    data["other"] = bench_other(quick)
    md = [
        "Times: median (min-max) over the timed rounds; ratios: per-round time / reference time, median (min-max). "
        "Memory (MB): `ref tracemalloc`, the reference's peak traced allocation during one call (NumPy buffers); "
        "`RSS`, the peak resident-set increase of one call in a fresh process, at the largest size of each table "
        "(`-`: not probed): NumPy and PyTorch after one warm-up call (PyTorch's one-time initialisation holds "
        "~200 MB), JAX on its first call, compilation included (XLA keeps that call's buffers for the next "
        "ones, so a second call's increase would hide its working memory). "
        "`max rel diff`: largest |gradient - reference| / max |reference| over torch and jax. "
        "`threads`: the libraries' thread counts in the main table (their defaults unless `run.py --threads` "
        "pinned them); `ref / ref 1t`: the reference's time there over its time pinned to one thread, same round "
        "(<= 1: the extra cores do not slow it down). The second table of each algorithm is the one-thread run.",
        "",
        "### MAML (sinusoid, relu, " + ("2 tasks, K=2 [quick]" if quick else "25 tasks, 10/10 shots, K=5") +
        ", inner_lr 0.01; problem and PyTorch loop from `bench_reference_maml.py`)",
        "",
        _table(data["maml"]),
        "",
        "Pinned to one thread (same rounds):",
        "",
        _pinned_table(data["maml"]),
        "",
        "### iMAML (CG implicit solve, tanh, " + ("1 task" if quick else "2 tasks") + ", lam=1)",
        "",
        _table(data["imaml"]),
        "",
        "Pinned to one thread (same rounds):",
        "",
        _pinned_table(data["imaml"]),
        "",
        "iMAML's `ref tracemalloc` at 1-40-40-1 counts the Lanczos workspace that scipy's `trust-krylov` (the "
        "reference's inner solver there) preallocates with `np.empty` and mostly never touches (three arrays of "
        "min(2n^2, 1e9) float64 entries): address space, not memory. At 1-256-256-1 and 8-1024-1024-1 the "
        "reference solves on the coordinates of the support Hessian's range (`reference/imaml_subspace.py`: "
        "Steihaug's trust region and CG on ~6,100 and ~20,500 coordinates instead of 66,561 and 1,059,841 "
        "parameters), without scipy's workspace. 8-1024-1024-1 uses MAML's input (x in [-5, 5]^8), not the "
        "1-d sinusoid of the smaller rows.",
        "",
        "### R2-D2 (dual ridge head, tanh backbone, " + ("2 tasks 5-way 1-shot [quick]" if quick else
                                                         "25 tasks 5-way 5-shot 15-query") + ")",
        "",
        _table(data["r2d2"]),
        "",
        "Pinned to one thread (same rounds):",
        "",
        _pinned_table(data["r2d2"]),
        "",
        "### The other per-task algorithms (reference only: its default threads against one thread)",
        "",
        _other_table(data["other"]),
        "",
        "`ref policy off`: the same call with reference/_threads.py switched off (tasks, or the stacked blocks of "
        "tasks of ProtoNets, Matching nets and LR-D2, in a plain loop with BLAS at the user's thread setting: the "
        "thread handling before issue 18's policy reached these algorithms); `ref / ref policy off` < 1: the policy "
        "is faster. `default = 1 thread, bitwise`: the outputs at default threads and pinned to one thread are "
        "bitwise equal; `policy off: max rel diff`: max |policy off - default| / max |default| (multithreaded BLAS "
        "rounds large products differently).",
        "",
        "Every configuration (implementation and thread setting) has one untimed warm-up call before its timed "
        "runs, at every size, and the rounds rotate the order of the configurations; the largest size of each table "
        "has one timed run fewer than the others (JAX's first call, with compilation, is the separate column)."
        + (" Quick mode: no JAX (each compilation costs seconds of CPU; the full run has it)." if quick else ""),
    ]
    head = []
    for algo in ("maml", "imaml", "r2d2"):
        rows = data[algo]
        th = _threads_label(rows[-1])
        sizes = "; ".join(
            f"{r['model']} {r['ratios']['torch'].median:.2g}x"
            + (f" (jax {r['ratios']['jax'].median:.2g}x)" if "jax" in r["ratios"] else "")
            + f", ref/ref-1-thread {r['ratios']['reference/reference@1'].median:.2g}" for r in rows)
        pinned = "; ".join(f"{r['model']} {r['ratios']['torch@1'].median:.2g}x" for r in rows)
        head.append(f"speed {algo}, torch/reference at default threads (BLAS/torch {th}): {sizes}. "
                    f"Pinned to one thread: {pinned}")
    rows = data["other"]
    head.append("speed of the other per-task algorithms, reference default / one thread (BLAS "
                f"{_threads_label(rows[-1])}): " + "; ".join(
                    f"{r['algorithm']} {r['ratios']['reference/reference@1'].median:.2g}" for r in rows)
                + "; default / policy off: " + "; ".join(
                    f"{r['algorithm']} {r['ratios']['reference/no policy'].median:.2g}" for r in rows))
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
