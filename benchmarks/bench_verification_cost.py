"""Benchmark 2: what a verification costs, as a multiple of one meta-gradient evaluation, as the model grows.

Run from the repository root (``run.py`` runs it with the others)::

    python benchmarks/bench_verification_cost.py [--quick]

The problem: MAML on the sinusoid tasks of ``bench_reference_maml.make_problem``
(10/10 shots, K = 5, inner_lr 0.01), tanh MLPs 1-10-10-1, 1-40-40-1,
1-256-256-1 and 8-1024-1024-1 (1.06M parameters), **one task** (every tool's
cost is linear in the number of tasks, so the multiples do not depend on it,
and one task keeps the 1M-parameter checks within the time budget).

Three implementations of the same meta-loss and meta-gradient, each timed in
the same rounds as the checks that use it:

* reference: ``reference.maml.meta_loss_and_grad`` (NumPy, analytic);
* torch: a user-style functional loop (``torch.autograd.grad(...,
  create_graph=True)``), called under the audit's contract
  ``fn(model, tasks, inner_lr, inner_steps) -> meta-loss``;
* jax: the same loop with ``jax.grad``, ``jax.jit``-compiled (compilation
  excluded: one untimed call first).

Checks, each divided by the meta-gradient time of the implementation it runs:

* ``verify.check_gradient(f, g, x)`` on the reference (default
  ``budget="thorough"``: 8 random directions, complex step; with
  ``directions=1``; and ``budget="fast"``: one direction along the claimed
  gradient plus a random one, 2 complex + 7 real evaluations) / reference
  meta-gradient;
* ``verify.audit(fn, "maml", case=...)`` on the torch function, default (the
  reference meta-gradient twice, the claim, and on a match a one-direction
  central-difference confirmation on ``fn``'s own loss: 5 evaluations) and
  ``thorough=True`` (Richardson on ``fn``'s own loss in 4 directions, ~137
  evaluations: the audit's default before the fast confirmation) / torch
  meta-gradient;
* ``torch.autograd.gradcheck`` on ``x -> meta-loss`` (torch, float64),
  ``fast_mode=True`` (one random projection) and ``fast_mode=False`` (``2n``
  forward evaluations: measured where the estimate ``2n x forward`` is under
  the budget, else extrapolated from the measured forward time and marked
  *est.*) / torch meta-gradient;
* ``jax.test_util.check_grads(f, (x,), 1, modes=("rev",))`` on the jitted JAX
  meta-loss / JAX meta-gradient.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (  # noqa: E402
    MEMO,
    Result,
    Span,
    alternate,
    fmt_ratio,
    fmt_seconds,
    log,
    loglog_slope,
    md_table,
    pairwise,
    timed,
)
from reference import maml  # noqa: E402
from reference.models import MLP, flatten, unflatten  # noqa: E402

INNER_LR = 0.01
STEPS = 5
SIZES = {"1-10-10-1": [1, 10, 10, 1], "1-40-40-1": [1, 40, 40, 1], "1-256-256-1": [1, 256, 256, 1],
         "8-1024-1024-1": [8, 1024, 1024, 1]}
QUICK_SIZES = {"1-6-6-1": [1, 6, 6, 1]}
#: gradcheck full mode is run for real only when 2n x forward time is below this (seconds).
FULL_GRADCHECK_BUDGET = 20.0
CHECKS = ("check_gradient", "check_gradient 1 dir", "check_gradient fast", "audit", "audit thorough",
          "gradcheck fast", "gradcheck full", "check_grads")
DENOMINATOR = {"check_gradient": "reference", "check_gradient 1 dir": "reference", "check_gradient fast": "reference",
               "audit": "torch", "audit thorough": "torch", "gradcheck fast": "torch",
               "gradcheck full": "torch", "check_grads": "jax"}
#: The goal of issue #9: a verification costs at most this many meta-gradient evaluations.
GOAL = 10.0


def problem(sizes: list[int], n_tasks: int = 1) -> tuple[MLP, list[np.ndarray], list[Any]]:
    """The sinusoid problem of ``bench_reference_maml`` with a tanh network (complex-step capable)."""
    from benchmarks.bench_reference_maml import make_problem

    _, params, tasks = make_problem(sizes, n_tasks, 10)
    return MLP(sizes, "tanh", "mse"), params, tasks


def torch_meta_loss(ps: list[Any], tasks: list[Any], inner_lr: float, inner_steps: int) -> Any:
    """The MAML meta-loss as PyTorch users write it: functional layers, ``create_graph=True``."""
    import torch
    import torch.nn.functional as F

    def net(p: list[Any], x: Any) -> Any:
        h = x
        for i in range(0, len(p), 2):
            h = F.linear(h, p[i], p[i + 1])
            if i + 2 < len(p):
                h = torch.tanh(h)
        return h

    total = 0.0
    for t in tasks:
        fast = list(ps)
        for _ in range(inner_steps):
            g = torch.autograd.grad(F.mse_loss(net(fast, t.x_support), t.y_support), fast, create_graph=True)
            fast = [p - inner_lr * gi for p, gi in zip(fast, g)]
        total = total + F.mse_loss(net(fast, t.x_query), t.y_query)
    return total / len(tasks)


def audited_fn(model: Any, tasks: Any, inner_lr: float, inner_steps: int) -> Any:
    """The audit's calling contract around :func:`torch_meta_loss`."""
    return torch_meta_loss(list(model.parameters()), tasks, inner_lr, inner_steps)


class Setup:
    """One problem in the three frameworks, plus the checks as zero-argument callables."""

    def __init__(self, sizes: list[int], jit: bool, steps: int = STEPS):
        import jax
        import jax.numpy as jnp
        import torch

        from verify.algorithms import Case
        from verify.backends.jax import build_apply, to_jax_tasks  # enables float64
        from verify.backends.torch import to_torch_tasks

        self.steps = steps
        self.model, self.params, self.tasks = problem(sizes)
        self.n = self.model.n_params
        self.shapes = self.model.shapes
        self.x0 = flatten(self.params)
        self.case = Case("maml", self.model, list(self.params), list(self.tasks),
                         {"inner_lr": INNER_LR, "inner_steps": steps}, 0)
        self.ttasks = to_torch_tasks(self.tasks, "float64")
        self.tparams = [torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in self.params]
        self.xt = torch.tensor(self.x0, dtype=torch.float64, requires_grad=True)
        sizes_flat = [int(np.prod(s)) for s in self.shapes]
        self._splits = sizes_flat

        apply = build_apply(self.model)
        jtasks = to_jax_tasks(self.tasks, "float64")
        shapes = self.shapes
        offsets = np.cumsum([0] + sizes_flat)

        def jf(x: Any) -> Any:
            ps = [x[a:b].reshape(s) for a, b, s in zip(offsets[:-1], offsets[1:], shapes)]
            total = 0.0
            for t in jtasks:
                p = ps
                for _ in range(steps):
                    g = jax.grad(lambda q, t=t: jnp.mean((apply(q, t.x_support) - t.y_support) ** 2))(p)
                    p = [a - INNER_LR * b for a, b in zip(p, g)]
                total = total + jnp.mean((apply(p, t.x_query) - t.y_query) ** 2)
            return total / len(jtasks)

        self.jf = jax.jit(jf) if jit else jf
        self.jgrad = jax.jit(jax.grad(jf)) if jit else jax.grad(jf)
        self.xj = jnp.asarray(self.x0)

    # meta-gradients ------------------------------------------------------
    def ref_grad(self) -> np.ndarray:
        return flatten(maml.meta_loss_and_grad(self.model, self.params, self.tasks, INNER_LR, self.steps)[1])

    def ref_loss(self, x: np.ndarray) -> Any:
        return maml.meta_loss(self.model, unflatten(x, self.shapes), self.tasks, INNER_LR, self.steps)

    def torch_grad(self) -> np.ndarray:
        import torch

        loss = torch_meta_loss(self.tparams, self.ttasks, INNER_LR, self.steps)
        return np.concatenate([g.detach().numpy().ravel() for g in torch.autograd.grad(loss, self.tparams)])

    def torch_flat_loss(self, x: Any) -> Any:
        ps = [c.reshape(s) for c, s in zip(x.split(self._splits), self.shapes)]
        return torch_meta_loss(ps, self.ttasks, INNER_LR, self.steps)

    def torch_forward(self) -> float:
        """One evaluation of ``x -> meta-loss`` as gradcheck makes it (the inner loop needs autograd)."""
        return float(self.torch_flat_loss(self.xt.detach().requires_grad_(True)).detach())

    def jax_grad(self) -> np.ndarray:
        return np.asarray(self.jgrad(self.xj))

    # checks --------------------------------------------------------------
    def check_gradient(self, g: np.ndarray, directions: int | None = None, budget: str = "thorough") -> str:
        import verify

        return verify.check_gradient(self.ref_loss, g, self.x0, directions=directions, budget=budget).status

    def audit(self, thorough: bool = False) -> str:
        try:
            from verify import audit
        except ImportError:  # not re-exported yet
            from verify._audit import audit
        return audit(audited_fn, "maml", "torch", case=self.case, thorough=thorough).status

    def gradcheck(self, fast: bool) -> str:
        import torch

        torch.manual_seed(0)
        ok = torch.autograd.gradcheck(self.torch_flat_loss, (self.xt,), fast_mode=fast, raise_exception=False)
        return "pass" if ok else "fail"

    def check_grads(self) -> str:
        from jax.test_util import check_grads

        try:
            check_grads(self.jf, (self.xj,), 1, modes=("rev",))
        except AssertionError:
            return "fail"
        return "pass"


def count_evaluations(s: Setup, g: np.ndarray) -> dict[str, str]:
    """Meta-loss evaluations of each metaverify check (real / complex), by wrapping the function."""
    import verify
    from verify._audit import audit

    out: dict[str, str] = {}
    calls = {"real": 0, "complex": 0}

    def f(x: np.ndarray) -> Any:
        calls["complex" if np.iscomplexobj(x) else "real"] += 1
        return s.ref_loss(x)

    for label, kw in (("check_gradient", {}), ("check_gradient 1 dir", {"directions": 1}),
                      ("check_gradient fast", {"budget": "fast"})):
        calls.update(real=0, complex=0)
        verify.check_gradient(f, g, s.x0, **kw)
        out[label] = f"{calls['real']} real + {calls['complex']} complex"
    n_calls = [0]

    def fn(*args: Any) -> Any:
        n_calls[0] += 1
        return audited_fn(*args)

    for label, thorough in (("audit", False), ("audit thorough", True)):
        n_calls[0] = 0
        audit(fn, "maml", "torch", case=s.case, thorough=thorough)
        out[label] = f"{n_calls[0]} calls of the audited function (1 for the claim)"
    return out


def bench(quick: bool) -> list[dict[str, Any]]:
    sizes = QUICK_SIZES if quick else SIZES
    rows = []
    for i, (label, sz) in enumerate(sizes.items()):
        t_label = time.perf_counter()
        s = Setup(sz, jit=True, steps=1 if quick else STEPS)  # quick: one inner step, no JAX
        g_ref = s.ref_grad()
        if not quick:
            s.jax_grad()  # compile (excluded)
            s.check_grads()  # compile the VJP used by check_grads (excluded)
        t_fwd, _ = timed(s.torch_forward)
        est_full = 2 * s.n * t_fwd
        run_full = est_full <= (3.0 if quick else FULL_GRADCHECK_BUDGET)
        fns: dict[str, Callable[[], Any]] = {
            "reference": s.ref_grad, "torch": s.torch_grad,
            "check_gradient": lambda: s.check_gradient(g_ref),
            "check_gradient 1 dir": lambda: s.check_gradient(g_ref, 1),
            "check_gradient fast": lambda: s.check_gradient(g_ref, budget="fast"),
            "audit": s.audit,
            "audit thorough": lambda: s.audit(True),
            "gradcheck fast": lambda: s.gradcheck(True),
        }
        if not quick:  # a JAX compilation costs seconds of CPU: not part of the smoke test
            fns.update({"jax": s.jax_grad, "check_grads": s.check_grads})
        if run_full:
            fns["gradcheck full"] = lambda: s.gradcheck(False)
        big = s.n > 100_000
        repeats = 1 if (quick or big) else 3
        counts = count_evaluations(s, g_ref) if i == 0 else {}
        times, outs, _ = alternate(fns, repeats)
        fwd = Span([timed(s.torch_forward)[0] for _ in range(repeats)])
        ratios = {c: pairwise(times, c, DENOMINATOR[c]) for c in CHECKS if c in times}
        ratios.update({c: Span([]) for c in CHECKS if c not in ratios and c != "gradcheck full"})
        if not run_full:
            t_torch = times["torch"].median
            ratios["gradcheck full"] = Span([2 * s.n * fwd.median / t_torch])
        statuses = {c: outs[c] for c in CHECKS if c in outs}
        row = {"model": label, "params": s.n, "repeats": repeats, "times": times, "ratios": ratios,
               "statuses": statuses, "gradcheck_full_measured": run_full,
               "gradcheck_full_estimate_s": 2 * s.n * fwd.median, "torch_forward": fwd, "steps": s.steps,
               "quick": quick, "counts": counts}
        MEMO[("audit", tuple(sz), 1, s.steps)] = {"seconds": times["audit"].median}
        rows.append(row)
        log(f"  cost {label}: {time.perf_counter() - t_label:.1f} s; " +
            ", ".join(f"{c} {ratios[c].median:.3g}x" for c in CHECKS if c in ratios))
    return rows


def _slope(x: float) -> str:
    return f"{x:+.2f}" if math.isfinite(x) else "n/a (one size)"


def report(rows: list[dict[str, Any]]) -> tuple[str, list[str]]:
    table = []
    for r in rows:
        t = r["times"]
        cells = [r["model"], f"{r['params']:,}", r["repeats"], t["reference"].fmt(), t["torch"].fmt(),
                 t["jax"].fmt() if "jax" in t else "not run"]
        for c in CHECKS:
            if c not in t and c != "gradcheck full":
                cells.append("not run")
            elif c == "gradcheck full" and not r["gradcheck_full_measured"]:
                cells.append(f"*est.* {fmt_seconds(r['gradcheck_full_estimate_s'])} = "
                             f"{r['ratios'][c].median:.3g}x")
            else:
                cells.append(f"{t[c].fmt()} = {fmt_ratio(r['ratios'][c])}")
        table.append(cells)
    slopes = {}
    goal = {c: (max(r["ratios"][c].median for r in rows), max(r["ratios"][c].hi for r in rows))
            for c in CHECKS if c != "gradcheck full" and all(r["ratios"][c].values for r in rows)}
    params = [r["params"] for r in rows]
    for c in CHECKS:
        ys = [r["ratios"][c].median for r in rows]
        slopes[c] = loglog_slope(params, ys)
    status = [[r["model"], *(r["statuses"].get(c, "not run") for c in CHECKS)] for r in rows]
    md = [
        "Each check cell: median time (min-max over rounds) = multiple of one meta-gradient evaluation of the "
        "implementation it runs (per-round ratio, median (min-max)): check_gradient / reference, audit and "
        "gradcheck / torch, check_grads / jax. One sinusoid task, "
        f"K={rows[0]['steps']}, tanh." + (" Quick mode: no JAX." if rows[0]["quick"] else ""),
        "",
        md_table(["model", "params", "rounds", "reference grad", "torch grad", "jax grad (jit)",
                  "verify.check_gradient", "check_gradient directions=1", "check_gradient budget=fast",
                  "verify.audit", "audit thorough=True", "gradcheck fast", "gradcheck full", "check_grads"],
                 table),
        "",
        "Growth of the multiple with the parameter count (log-log slope over the sizes; 0 = flat): " +
        ", ".join(f"{c} {_slope(slopes[c])}" for c in CHECKS) + ".",
        "",
        f"Goal (issue #9: at most {GOAL:.0f}x one meta-gradient, flat in the parameter count), worst median "
        "multiple over the sizes (worst single round in parentheses): " +
        ", ".join(f"{c} {goal[c][0]:.3g}x ({goal[c][1]:.3g}x) {'met' if goal[c][0] <= GOAL else 'not met'}"
                  for c in CHECKS if c in goal) + ".",
        "",
        "Evaluations per check at " + f"{rows[0]['model']} (the counts do not depend on the size): " +
        "; ".join(f"{c}: {txt}" for c, txt in rows[0].get("counts", {}).items()) + ".",
        "",
        "*est.*: gradcheck full mode needs 2n forward evaluations; where 2n x (measured forward time) exceeds "
        f"{FULL_GRADCHECK_BUDGET:.0f} s it was not run and the estimate is shown.",
        "",
        "Memory: benchmark 5 measures the audit's and the reference's peak memory from 1e3 to 1e6 parameters.",
        "",
        "Verdicts on the correct implementations (every check should pass):",
        "",
        md_table(["model", *CHECKS], status, ["l"] + ["l"] * len(CHECKS)),
    ]
    big = rows[-1]
    head = [f"verification cost at {big['model']} ({big['params']:,} params), multiples of one meta-gradient: " +
            ", ".join(f"{c} {big['ratios'][c].median:.3g}x" + (" (est.)" if c == "gradcheck full" and
                                                                 not big["gradcheck_full_measured"] else "")
                      for c in CHECKS if big["ratios"][c].values)]
    head.append("verification cost growth (log-log slope of the multiple vs params): " +
                ", ".join(f"{c} {_slope(slopes[c])}" for c in CHECKS))
    return "\n".join(md), head


def plot(rows: list[dict[str, Any]]) -> Callable[[Any], None]:
    def draw(plt: Any) -> None:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        params = [r["params"] for r in rows]
        for k, c in enumerate(CHECKS):
            if any(not r["ratios"][c].values for r in rows):
                continue
            ys = [r["ratios"][c].median for r in rows]
            lo = [r["ratios"][c].median - r["ratios"][c].lo for r in rows]
            hi = [r["ratios"][c].hi - r["ratios"][c].median for r in rows]
            ax.errorbar(params, ys, yerr=[lo, hi], marker="o", capsize=3, label=c, color=f"C{k}")
            est = [(p, y) for p, y, r in zip(params, ys, rows) if c == "gradcheck full"
                   and not r["gradcheck_full_measured"]]
            if est:
                ax.scatter(*zip(*est), marker="x", s=60, color=f"C{k}", zorder=5)
        ax.axhline(10, color="k", ls=":", lw=1, label="goal 10x")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("check time / one meta-gradient")
        ax.set_title("verification cost (x: gradcheck full extrapolated)")
        ax.legend(fontsize=8)
        fig.tight_layout()

    return draw


def run(quick: bool = False) -> Result:
    t0 = time.perf_counter()
    rows = bench(quick)
    md, head = report(rows)
    return Result("2-verification-cost", "Verification cost as a multiple of one meta-gradient", md, {"rows": rows},
                  plots=[("verification_cost.png", plot(rows))], headline=head, seconds=time.perf_counter() - t0)


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
