"""Benchmark 3: the smallest meta-gradient error each checker catches, at its measured false-alarm rate.

Run from the repository root (``run.py`` runs it with the others)::

    python benchmarks/bench_sensitivity.py [--quick]

The problem: MAML (Finn et al. 2017) on sinusoid tasks (``reference.tasks.sinusoid``),
a tanh MLP, ``K`` inner steps; one problem per seed (initial parameters and
tasks drawn from the seed). The correct implementation is PyTorch autograd
through the unrolled inner loop (``verify.backends.torch.maml``, float64;
float32 for the float32 row). Errors injected into its meta-gradient ``g``:

* ``scale``: ``g_W2 <- (1 + eps) g_W2`` (one tensor, the hidden-to-hidden weights);
* ``random``: ``g <- g + eps ||g|| u``, ``u`` a seeded random unit vector
  (normwise relative error exactly ``eps``);
* ``fomaml``: the first-order (FOMAML) direction returned for MAML at inner
  learning rate ``alpha``; its relative gap ``||g_FO - g|| / ||g||`` shrinks
  with ``alpha`` and is the reported size.

Every checker sees the *same* claimed gradient and the *same* meta-loss: the
NumPy reference's ``maml.meta_loss`` (float64, complex-step capable). The
claimed gradient is delivered the way each tool consumes gradients:

* ``verify.check_gradient(f, g, x)`` (8 random directions, complex step; with
  ``directions=1``; and ``budget="fast"``: one direction along the claimed
  gradient plus a random one, the cheapest setting);
* ``verify.audit(fn, "maml", case=...)``: ``fn`` returns the meta-loss from a
  ``torch.autograd.Function`` whose forward is the reference meta-loss and
  whose backward returns the claimed gradient (the audit differentiates it
  with ``torch.autograd.grad``, compares with the reference meta-gradient and
  with finite differences of ``fn``'s own loss (one fast direction when the
  gradient matches the reference, 4 Richardson directions on a mismatch), and
  names the bug);
* ``torch.autograd.gradcheck`` (``fast_mode=True`` and ``False``, defaults
  ``eps=1e-6, atol=1e-5, rtol=1e-3``) on that same ``autograd.Function``;
* ``jax.test_util.check_grads(f, (x,), order=1, modes=("rev",))`` (defaults
  ``eps=1e-4``, float64 ``atol=rtol=1e-5``) on a ``jax.custom_vjp`` function
  whose forward calls the reference (``jax.pure_callback``) and whose VJP
  returns the claimed gradient.

The backward/VJP refuses to run anywhere but at the checked point (none of
the tools needs it elsewhere), so no tool can see a different gradient.

Sensitivity: per tool, kind and seed, the smallest ``eps`` on a half-decade
grid that the tool flags (bisection on the grid: detection is monotone in
``eps`` for ``scale`` and ``random``, whose claimed-gradient error is linear in
``eps``; for ``fomaml`` the grid is ``alpha``). Reported: the worst seed
(every error at least that large was caught on every seed) and the median.
False alarms: each tool at its default settings on the uninjected gradient,
over ``--fa-seeds`` problems. No tool's settings are tuned, so each tool runs at
its own (measured) false-alarm rate; the table shows it next to the threshold.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import Result, Span, fmt_seconds, log, md_table  # noqa: E402
from reference import maml  # noqa: E402
from reference.models import MLP, flatten, unflatten  # noqa: E402
from reference.tasks import sinusoid  # noqa: E402

KINDS = ("scale", "random", "fomaml")
KIND_LABEL = {
    "scale": "(1+eps) on one tensor (W2)",
    "random": "random direction, rel. size eps",
    "fomaml": "FOMAML for MAML, rel. gap",
}
#: Half-decade grid of error sizes, large to small.
EPS_GRID = tuple(10.0 ** (-k / 2) for k in range(2, 31))  # 1e-1 ... 1e-15
#: Inner learning rates of the FOMAML substitution, large to small (the gap shrinks about linearly).
LR_GRID = tuple(10.0 ** (-k / 2) for k in range(1, 29))  # 0.316 ... 1e-14
#: The perturbed tensor of the ``scale`` kind (index in [W1, b1, W2, b2, W3, b3]).
SCALED_TENSOR = 2
ANCHOR_GRADCHECK_FAST_FOMAML = 2e-2  # the anchor: gradcheck fast passes FOMAML at this relative gap


@dataclass(frozen=True)
class Config:
    sizes: tuple[int, ...] = (1, 10, 10, 1)
    activation: str = "tanh"
    n_tasks: int = 2
    shots: int = 10
    inner_steps: int = 2
    inner_lr: float = 0.1

    def describe(self) -> str:
        return (f"MAML, MLP {'-'.join(map(str, self.sizes))} {self.activation}, mse, {self.n_tasks} sinusoid tasks "
                f"({self.shots}/{self.shots} shots), K={self.inner_steps}, inner_lr={self.inner_lr} "
                f"(the FOMAML row varies inner_lr)")


class Problem:
    """One seeded MAML problem at one inner learning rate, with its correct gradients."""

    def __init__(self, cfg: Config, seed: int, inner_lr: float):
        self.cfg, self.seed, self.inner_lr = cfg, seed, float(inner_lr)
        self.model = MLP(list(cfg.sizes), cfg.activation, "mse")
        self.params = self.model.init(seed)
        self.tasks = sinusoid(cfg.n_tasks, cfg.shots, cfg.shots, seed=seed)
        self.shapes = self.model.shapes
        self.x0 = flatten(self.params)
        self._grads: dict[tuple[str, bool], np.ndarray] = {}

    def f(self, x: np.ndarray) -> Any:
        """The reference meta-loss of the flat parameters (float64, or complex128 for complex step)."""
        x = np.asarray(x)
        x = x.astype(np.complex128) if np.iscomplexobj(x) else x.astype(np.float64)
        return maml.meta_loss(self.model, unflatten(x, self.shapes), self.tasks, self.inner_lr,
                              self.cfg.inner_steps)

    def torch_grad(self, dtype: str = "float64", first_order: bool = False) -> np.ndarray:
        """The PyTorch-autograd meta-gradient (flat; float32 values for ``dtype="float32"``)."""
        key = (dtype, first_order)
        if key not in self._grads:
            from verify.backends.torch import maml as tmaml

            _, g = tmaml.meta_loss_and_grad(self.model, self.params, self.tasks, self.inner_lr,
                                            self.cfg.inner_steps, first_order=first_order, dtype=dtype)
            flat = flatten(g)
            self._grads[key] = flat.astype(np.float32) if dtype == "float32" else flat
        return self._grads[key]

    def case(self) -> Any:
        from verify.algorithms import Case

        return Case("maml", self.model, list(self.params), list(self.tasks),
                    {"inner_lr": self.inner_lr, "inner_steps": self.cfg.inner_steps}, self.seed)

    def block(self, index: int) -> slice:
        sizes = [int(np.prod(s)) for s in self.shapes]
        start = sum(sizes[:index])
        return slice(start, start + sizes[index])


# ---------------------------------------------------------------------------
# the tools
# ---------------------------------------------------------------------------


@dataclass
class Outcome:
    caught: bool
    note: str = ""
    seconds: float = 0.0


def _torch_function(prob: Problem, claimed: np.ndarray) -> Any:
    """An ``autograd.Function``: forward = the reference meta-loss, backward = the claimed gradient."""
    import torch

    x0 = torch.from_numpy(prob.x0.copy())
    g = torch.from_numpy(np.asarray(claimed, dtype=np.float64).copy())

    class InjectedMetaLoss(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any) -> Any:
            ctx.at_point = bool(torch.equal(x.detach(), x0))
            return torch.tensor(float(prob.f(x.detach().numpy())), dtype=torch.float64)

        @staticmethod
        def backward(ctx: Any, grad_out: Any) -> Any:
            if not ctx.at_point:
                raise RuntimeError("the injected backward was evaluated away from the checked point")
            return grad_out * g

    return InjectedMetaLoss


def tool_check_gradient(prob: Problem, claimed: np.ndarray, seed: int, directions: int = 8) -> Outcome:
    import verify

    x = prob.x0.astype(claimed.dtype)  # a float32 claim is checked at the float32-rounded point, float32 row
    v = verify.check_gradient(prob.f, claimed, x, seed=seed, directions=directions)
    return Outcome(v.status == verify.FAIL, "" if v.status != verify.INCONCLUSIVE else "inconclusive")


def tool_check_gradient_1(prob: Problem, claimed: np.ndarray, seed: int) -> Outcome:
    return tool_check_gradient(prob, claimed, seed, directions=1)


def tool_check_gradient_fast(prob: Problem, claimed: np.ndarray, seed: int) -> Outcome:
    import verify

    v = verify.check_gradient(prob.f, claimed, prob.x0, seed=seed, budget="fast")
    return Outcome(v.status == verify.FAIL, "" if v.status != verify.INCONCLUSIVE else "inconclusive")


def tool_audit(prob: Problem, claimed: np.ndarray, seed: int) -> Outcome:
    import torch

    try:
        from verify import audit
    except ImportError:  # not re-exported yet
        from verify._audit import audit
    fn_cls = _torch_function(prob, claimed)

    def fn(model: Any, tasks: Any, inner_lr: float, inner_steps: int) -> Any:
        return fn_cls.apply(torch.cat([p.reshape(-1) for p in model.parameters()]))

    r = audit(fn, "maml", "torch", case=prob.case(), seed=seed)
    if r.passed:
        return Outcome(False)
    if r.diagnosis is not None:
        return Outcome(True, f"named: {r.diagnosis.key}")
    bad = [t for t in r.tensors if t.status == "fail"]
    where = max(bad, key=lambda t: t.error).where if bad else "own-loss finite differences"
    return Outcome(True, f"located: {where.split('[')[0]}")


def _tool_gradcheck(fast: bool) -> Callable[[Problem, np.ndarray, int], Outcome]:
    def tool(prob: Problem, claimed: np.ndarray, seed: int) -> Outcome:
        import torch

        torch.manual_seed(seed)  # fast mode's random vectors
        x = torch.from_numpy(prob.x0.copy()).requires_grad_(True)
        ok = torch.autograd.gradcheck(_torch_function(prob, claimed).apply, (x,), fast_mode=fast,
                                      raise_exception=False)
        return Outcome(not ok)

    return tool


def tool_check_grads(prob: Problem, claimed: np.ndarray, seed: int) -> Outcome:
    import jax
    import jax.numpy as jnp
    from jax.test_util import check_grads

    jax.config.update("jax_enable_x64", True)  # float64, like the other tools (verify.backends.jax does the same)

    g = jnp.asarray(np.asarray(claimed, dtype=np.float64))
    x0 = prob.x0

    def host_f(x: Any) -> np.ndarray:
        return np.asarray(prob.f(np.asarray(x)), dtype=np.float64)

    @jax.custom_vjp
    def f(x: Any) -> Any:
        return jax.pure_callback(host_f, jax.ShapeDtypeStruct((), jnp.float64), x)

    def f_fwd(x: Any) -> Any:
        if not np.array_equal(np.asarray(x), x0):
            raise RuntimeError("the injected VJP was requested away from the checked point")
        return f(x), None

    def f_bwd(_: Any, ct: Any) -> Any:
        return (ct * g,)

    f.defvjp(f_fwd, f_bwd)
    try:
        check_grads(f, (jnp.asarray(x0),), 1, modes=("rev",))
    except AssertionError:
        return Outcome(True)
    return Outcome(False)


#: name -> (function, dtype of the claimed gradient, seeds factor); float32 only for check_gradient
#: (the audit is float64 by design; gradcheck wants double inputs).
TOOLS: dict[str, tuple[Callable[[Problem, np.ndarray, int], Outcome], str]] = {
    "verify.check_gradient": (tool_check_gradient, "float64"),
    "verify.check_gradient directions=1": (tool_check_gradient_1, "float64"),
    "verify.check_gradient budget=fast": (tool_check_gradient_fast, "float64"),
    "verify.audit": (tool_audit, "float64"),
    "gradcheck fast_mode=True": (_tool_gradcheck(True), "float64"),
    "gradcheck fast_mode=False": (_tool_gradcheck(False), "float64"),
    "jax check_grads (rev)": (tool_check_grads, "float64"),
    "verify.check_gradient float32": (tool_check_gradient, "float32"),
}
METAVERIFY = ("verify.check_gradient", "verify.audit")


# ---------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------


class Sweep:
    """Problems and claimed gradients, cached so that every tool sees the same arrays."""

    def __init__(self, cfg: Config, eps_grid: tuple[float, ...] = EPS_GRID, lr_grid: tuple[float, ...] = LR_GRID):
        self.cfg, self.eps_grid, self.lr_grid = cfg, eps_grid, lr_grid
        self._problems: dict[tuple[int, float], Problem] = {}
        self._dirs: dict[int, np.ndarray] = {}

    def problem(self, seed: int, inner_lr: float | None = None) -> Problem:
        lr = self.cfg.inner_lr if inner_lr is None else float(inner_lr)
        key = (seed, lr)
        if key not in self._problems:
            self._problems[key] = Problem(self.cfg, seed, lr)
        return self._problems[key]

    def direction(self, seed: int, n: int) -> np.ndarray:
        if seed not in self._dirs:
            u = np.random.default_rng(10_000 + seed).standard_normal(n)
            self._dirs[seed] = u / np.linalg.norm(u)
        return self._dirs[seed]

    def claim(self, kind: str, seed: int, size: float | None, dtype: str) -> tuple[Problem, np.ndarray, float]:
        """``(problem, claimed gradient, normwise relative error vs the correct float64 gradient)``.

        ``size=None``: the correct implementation (false-alarm runs).
        """
        if kind == "fomaml":
            prob = self.problem(seed, size)
            g = prob.torch_grad("float64")
            claimed = prob.torch_grad(dtype, first_order=size is not None)
            if size is None:
                claimed = prob.torch_grad(dtype)
            return prob, claimed, float(np.linalg.norm(claimed.astype(float) - g) / np.linalg.norm(g))
        prob = self.problem(seed)
        g = prob.torch_grad(dtype).astype(np.float64)
        if size is None:
            claimed = g
        elif kind == "scale":
            claimed = g.copy()
            claimed[prob.block(SCALED_TENSOR)] *= 1.0 + size
        else:
            claimed = g + size * np.linalg.norm(g) * self.direction(seed, g.size)
        claimed = claimed.astype(np.float32) if dtype == "float32" else claimed
        g64 = prob.torch_grad("float64")
        return prob, claimed, float(np.linalg.norm(claimed.astype(float) - g64) / np.linalg.norm(g64))


@dataclass
class SeedResult:
    seed: int
    threshold: float | None  # smallest caught grid value (eps or inner_lr); None: not even the largest
    rel_error: float | None  # normwise relative error of the claim at the threshold
    bound: str  # "", ">" (not caught at the largest size) or "<=" (caught at the smallest)
    note: str
    probes: list[tuple[float, float, bool]]  # (grid value, relative error, caught)


def search(grid: tuple[float, ...], caught: Callable[[int], tuple[bool, float, str]],
           hint: int | None = None) -> tuple[int | None, str, str]:
    """Index of the smallest grid value caught (grid is large -> small), assuming monotone detection.

    Without a hint: test both ends, then bisect (about ``2 + log2(len(grid))`` calls). With a hint
    (the previous seed's answer): test ``hint`` and ``hint + 1`` and gallop outwards only if the
    boundary moved, so a tool whose threshold is stable across seeds costs about 2 calls per seed.
    """
    last = len(grid) - 1

    def boundary(a: int, b: int, note: str) -> tuple[int, str, str]:
        # invariant: caught(a), not caught(b), a < b
        while b - a > 1:
            m = (a + b) // 2
            hit, _, n = caught(m)
            if hit:
                a, note = m, n
            else:
                b = m
        return a, "", note

    if hint is not None and 0 <= hint < last:
        hit, _, note = caught(hint)
        if hit:
            step, a = 1, hint
            while True:
                b = min(a + step, last)
                hit_b, _, note_b = caught(b)
                if not hit_b:
                    return boundary(a, b, note)
                if b == last:
                    return last, "<=", note_b
                a, note, step = b, note_b, step * 2
        step, b = 1, hint
        while True:
            a = max(b - step, 0)
            hit_a, _, note_a = caught(a)
            if hit_a:
                return boundary(a, b, note_a)
            if a == 0:
                return None, ">", ""
            b, step = a, step * 2
    first, _, note0 = caught(0)
    if not first:
        return None, ">", ""
    hit_last, _, note_last = caught(last)
    if hit_last:
        return last, "<=", note_last
    return boundary(0, last, note0)


def sweep_tool(sweep: Sweep, name: str, kind: str, seeds: list[int]) -> tuple[list[SeedResult], list[float]]:
    fn, dtype = TOOLS[name]
    grid = sweep.lr_grid if kind == "fomaml" else sweep.eps_grid
    results, secs = [], []
    hint: int | None = None
    for seed in seeds:
        probes: list[tuple[float, float, bool]] = []
        memo: dict[int, tuple[bool, float, str]] = {}

        def caught(i: int, seed: int = seed) -> tuple[bool, float, str]:
            if i not in memo:
                prob, claimed, rel = sweep.claim(kind, seed, grid[i], dtype)
                t0 = time.perf_counter()
                out = fn(prob, claimed, seed)
                secs.append(time.perf_counter() - t0)
                memo[i] = (out.caught, rel, out.note)
                probes.append((grid[i], rel, out.caught))
            return memo[i]

        idx, bound, note = search(grid, caught, hint)
        rel = memo[idx][1] if idx is not None else None
        hint = idx if idx is not None else hint
        results.append(SeedResult(seed, grid[idx] if idx is not None else None, rel, bound, note, sorted(probes)))
    return results, secs


def false_alarms(sweep: Sweep, name: str, seeds: list[int]) -> tuple[int, int, list[float]]:
    fn, dtype = TOOLS[name]
    hits, inconclusive, secs = 0, 0, []
    for seed in seeds:
        prob, claimed, _ = sweep.claim("random", seed, None, dtype)
        t0 = time.perf_counter()
        out = fn(prob, claimed, seed)
        secs.append(time.perf_counter() - t0)
        hits += out.caught
        inconclusive += out.note == "inconclusive"
    return hits, inconclusive, secs


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def _size(r: SeedResult, kind: str) -> float | None:
    """The reported size: eps for scale/random, the relative gap for fomaml."""
    if r.threshold is None:
        return None
    return r.rel_error if kind == "fomaml" else r.threshold


def _cell(results: list[SeedResult], kind: str, grid_max: float) -> str:
    if not results:
        return "not run"
    sizes = [_size(r, kind) for r in results]
    if any(s is None for s in sizes):
        missed = sum(s is None for s in sizes)
        return f"not caught at any size on {missed}/{len(sizes)} seeds (up to {grid_max:.1e})"
    worst = max(sizes)
    med = float(np.median(sizes))
    le = "<=" if all(r.bound == "<=" for r in results) else ""
    return f"{le}{worst:.1e} (median {med:.1e})"


def report(cfg: Config, data: dict[str, Any], seeds: dict[str, int], *,
           float32_note: bool = True) -> tuple[str, list[str]]:
    lines = [
        f"Problem: {cfg.describe()}; {data['n_params']} parameters. Correct implementation: PyTorch autograd "
        "(create_graph) MAML meta-gradient; every tool sees the same claimed gradient and the reference "
        "meta-loss as the function.",
        "",
        "Cells: the smallest injected error the tool flags on **every** seed (worst seed; median over seeds in "
        "parentheses). `scale`: eps of `g_W2 <- (1+eps) g_W2`; `random`: normwise relative error; `fomaml`: "
        "relative gap `||g_FO - g|| / ||g||` at the smallest inner_lr caught. Grid: "
        f"{len(data['grid'])} sizes {data['grid'][0]:.0e} ... {data['grid'][-1]:.0e} (inner_lr "
        f"{data['lr_grid'][0]:.2g} ... {data['lr_grid'][-1]:.0e}). False alarms: flags on the uninjected "
        "gradient (column: flagged/problems), every tool at its default settings."
        + (" **Quick mode: two sizes per kind only; the cells are bounds, not thresholds.**" if data["quick"]
           else ""),
        "",
    ]
    rows = []
    for name in TOOLS:
        d = data["tools"].get(name)
        if d is None:
            continue
        fa = d["false_alarms"]
        fa_txt = f"{fa['hits']}/{fa['n']}" + (f" ({fa['inconclusive']} inconclusive)" if fa["inconclusive"] else "")
        cells = [_cell([SeedResult(**r) for r in d["kinds"][k]], k, (data["lr_grid"] if k == "fomaml"
                                                                        else data["grid"])[0]) for k in KINDS]
        if fa["hits"]:  # a tool that flags correct gradients has no threshold worth the name
            cells = [f"n/a: flags the correct gradient ({fa['hits']}/{fa['n']}); raw {c}" for c in cells]
        names = ""
        if name == "verify.audit":
            notes = [r["note"] for k in KINDS for r in d["kinds"][k] if r["note"]]
            fo = [r["note"] for r in d["kinds"]["fomaml"]]
            named = sum(n == "named: first_order" for n in fo)
            names = (f"FOMAML named `first_order` on {named}/{len(fo)} seeds at the threshold; "
                     f"(1+eps): {', '.join(sorted({n for n in (r['note'] for r in d['kinds']['scale']) if n}))}"
                     if notes else "")
        rows.append([name, f"{seeds.get(name, 0)}", fa_txt, *cells, fmt_seconds(d["seconds_median"]), names])
    lines.append(md_table(["tool", "seeds", "false alarms", *(KIND_LABEL[k] for k in KINDS), "time/call",
                           "names the bug"], rows, ["l", "r", "r", "r", "r", "r", "r", "l"]))
    scale_ratio = data.get("w2_share")
    if scale_ratio:
        lines += ["", f"`scale` perturbs W2, which holds a median {scale_ratio:.2f} of the gradient's norm: the "
                  f"normwise relative error is eps x {scale_ratio:.2f}."]
    if float32_note:
        lines += ["", "Float32 row: the correct implementation runs in float32 (torch), the claimed gradient is "
                  "float32, the point is rounded to float32, and `check_gradient` uses float32's tolerance row "
                  "(`eps32^(2/3)` = 2.4e-5 relative to `||g|| ||v||`); the audit is float64 by design and "
                  "gradcheck asks for double inputs, so they have no float32 row."]
    else:
        lines += ["", "gradcheck is left out at this size: when fast mode fails it recomputes the full "
                  "2n-evaluation Jacobian for its error message. `check_gradient` sees a relative error delta as "
                  "about delta / sqrt(n) in a random direction; its fast budget's first direction, "
                  "(g/||g|| + r)/||g/||g|| + r||, sees the part of the error along g at full size (`scale`, and "
                  "most of `fomaml`) and the rest as about delta / sqrt(2n); the audit compares each tensor with "
                  "the reference "
                  "(its tolerance grows with the problem's condition estimate). JAX `check_grads` perturbs x by "
                  "1e-4 times a standard normal tangent, whose norm grows as sqrt(n): its finite difference's "
                  "truncation error then exceeds its 1e-5 tolerance on correct gradients."]
    head = headline(data)
    return "\n".join(lines), head


def headline(data: dict[str, Any]) -> list[str]:
    out = []
    tools = data["tools"]

    def worst(name: str, kind: str) -> float | None:
        d = tools.get(name)
        if d is None or d["false_alarms"]["hits"]:
            return None
        sizes = [_size(SeedResult(**r), kind) for r in d["kinds"][kind]]
        return None if not sizes or any(s is None for s in sizes) else max(sizes)

    for kind in KINDS:
        parts = []
        for name in (n for n in TOOLS if n in tools):
            w = worst(name, kind)
            fa = tools[name]["false_alarms"]
            parts.append(f"{name} " + (f"n/a (false alarms {fa['hits']}/{fa['n']})" if fa["hits"] else
                                       ("missed" if w is None else f"{w:.0e}")))
        out.append(f"sensitivity, {KIND_LABEL[kind]}: " + "; ".join(parts))
    return out


def plot(data: dict[str, Any]) -> Callable[[Any], None]:
    def draw(plt: Any) -> None:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
        names = [n for n in TOOLS if n in data["tools"]]
        for ax, kind in zip(axes, KINDS):
            for i, name in enumerate(names):
                rs = [SeedResult(**r) for r in data["tools"][name]["kinds"][kind]]
                for r in rs:
                    xs = [p[1] if kind == "fomaml" else p[0] for p in r.probes]
                    cs = [p[2] for p in r.probes]
                    ax.scatter([x for x, c in zip(xs, cs) if c], [i] * sum(cs), marker="o", color="C3", s=14,
                               alpha=0.5)
                    ax.scatter([x for x, c in zip(xs, cs) if not c], [i] * (len(cs) - sum(cs)), marker="o",
                               facecolors="none", edgecolors="C0", s=14, alpha=0.5)
                    s = _size(r, kind)
                    if s is not None:
                        ax.scatter([s], [i], marker="|", color="k", s=150)
            ax.axvline(1e-8, color="C2", ls="--", lw=1, label="goal 1e-8")
            if kind == "fomaml":
                ax.axvline(ANCHOR_GRADCHECK_FAST_FOMAML, color="C1", ls=":", lw=1, label="anchor 2e-2")
            ax.set_xscale("log")
            ax.set_title(KIND_LABEL[kind])
            ax.set_xlabel("relative error size (filled: caught, hollow: missed, |: threshold)")
            ax.legend(loc="lower left", fontsize=7)
        axes[0].set_yticks(range(len(names)))
        axes[0].set_yticklabels(names, fontsize=8)
        fig.tight_layout()

    return draw


#: Quick (smoke) mode: two error sizes per kind, a must-catch one and one below every tool.
QUICK_EPS = (1e-2, 1e-13)
QUICK_LR = (0.3, 1e-12)
#: Tools whose calls cost 2n evaluations or a full audit: fewer seeds (full mode).
EXPENSIVE = {"gradcheck fast_mode=False": 3, "verify.audit": 5, "verify.check_gradient float32": 5}


#: The second, larger problem (full mode): the tools whose cost does not grow with n. gradcheck is
#: left out there: a failing fast mode recomputes the full 2n-evaluation Jacobian for its message.
LARGE = Config(sizes=(1, 256, 256, 1), n_tasks=1, inner_steps=2)
LARGE_TOOLS = ("verify.check_gradient", "verify.check_gradient directions=1", "verify.check_gradient budget=fast",
               "verify.audit", "jax check_grads (rev)")


def sweep_all(cfg: Config, sweep: Sweep, names: list[str], per_tool: dict[str, int],
              fa_tool: dict[str, int], quick: bool) -> dict[str, Any]:
    """False alarms and thresholds of every tool in ``names`` on ``cfg``'s problems."""
    data: dict[str, Any] = {"config": cfg.__dict__, "tools": {}, "grid": list(sweep.eps_grid),
                            "lr_grid": list(sweep.lr_grid), "quick": quick, "seeds": per_tool}
    data["n_params"] = sweep.problem(0).model.n_params
    shares = []
    for s in range(max(per_tool.values())):
        p = sweep.problem(s)
        g = p.torch_grad()
        shares.append(float(np.linalg.norm(g[p.block(SCALED_TENSOR)]) / np.linalg.norm(g)))
    data["w2_share"] = float(np.median(shares))
    for name in names:
        t0 = time.perf_counter()
        hits, inc, fa_secs = false_alarms(sweep, name, list(range(fa_tool[name])))
        kinds, secs = {}, list(fa_secs)
        for kind in KINDS:
            res, s = sweep_tool(sweep, name, kind, list(range(per_tool[name])))
            kinds[kind] = [r.__dict__ for r in res]
            secs += s
        data["tools"][name] = {"false_alarms": {"hits": hits, "inconclusive": inc, "n": fa_tool[name]},
                               "kinds": kinds, "seconds_median": Span(secs).median, "calls": len(secs)}
        log(f"  sensitivity {data['n_params']} params, {name}: {time.perf_counter() - t0:.1f} s, {len(secs)} calls, "
            f"false alarms {hits}/{fa_tool[name]}")
    return data


def run(quick: bool = False, *, seeds: int | None = None, fa_seeds: int | None = None,
        tools: list[str] | None = None, cfg: Config | None = None) -> Result:
    """Run the sensitivity sweep (``quick``: a tiny problem, one seed, two sizes per kind, no large problem)."""
    cfg = cfg or (Config(sizes=(1, 6, 6, 1), n_tasks=1, shots=6, inner_steps=1) if quick else Config())
    n_seeds = seeds or (1 if quick else 8)
    n_fa = fa_seeds or (1 if quick else 16)
    names = tools or list(TOOLS)
    per_tool = {n: min(n_seeds, EXPENSIVE.get(n, n_seeds)) for n in names}
    fa_tool = {n: (n_fa if n not in EXPENSIVE else min(n_fa, 2 * EXPENSIVE[n])) for n in names}
    t_start = time.perf_counter()
    sweep = Sweep(cfg, QUICK_EPS, QUICK_LR) if quick else Sweep(cfg)
    data = sweep_all(cfg, sweep, names, per_tool, fa_tool, quick)
    md, head = report(cfg, data, per_tool)
    if not quick and tools is None:
        large_names = list(LARGE_TOOLS)
        large = sweep_all(LARGE, Sweep(LARGE), large_names, {n: 3 for n in large_names},
                          {n: 4 for n in large_names}, False)
        data["large"] = large
        md_large, head_large = report(LARGE, large, large["seeds"], float32_note=False)
        md += "\n\n### The same at " + f"{large['n_params']:,} parameters\n\n" + md_large
        head += [h.replace("sensitivity,", f"sensitivity at {large['n_params']:,} params,") for h in head_large]
    return Result("3-sensitivity", "Sensitivity: smallest caught meta-gradient error", md, data,
                  plots=[("sensitivity.png", plot(data))], headline=head, seconds=time.perf_counter() - t_start)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--fa-seeds", type=int, default=None)
    ap.add_argument("--tools", nargs="*", default=None, choices=list(TOOLS))
    args = ap.parse_args(argv)
    res = run(args.quick, seeds=args.seeds, fa_seeds=args.fa_seeds, tools=args.tools)
    print(res.markdown)
    print("\n".join(res.headline))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
