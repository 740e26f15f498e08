"""Benchmark 4: accuracy of the engine's derivative estimators against the exact derivative, per step and dtype.

Run from the repository root (``run.py`` runs it with the others)::

    python benchmarks/bench_fd_accuracy.py [--quick]

The function: the mean-squared-error loss of a small tanh network
``[2, 5, 1]`` on 8 fixed samples plus ``0.1 log(1 + ||x||^2)``, as a function of
its 21 parameters ``x`` (an MLP loss like the ones metaverify differentiates,
with curvature in every direction). For a few seeded points ``x`` and unit
directions ``v`` (``||v||_inf = 1``, so a step ``t`` moves ``x`` by at most ``t``
per coordinate):

* exact: ``d/dt f(x + t v)`` at ``t = 0`` by ``mpmath.diff`` on the same
  formula evaluated with 40 significant digits (independent of the estimators);
* estimators: ``verify.directional_derivative(f, x, v, method=m, step=h)`` for
  ``m`` in complex / central / richardson over a sweep of steps ``h`` (for
  Richardson ``h`` is the smallest of its 14 steps), and with the automatic
  step (``step=None``), whose reported error bound is shown next to the true
  error.

Dtypes: float64 (``f`` computes in float64 / complex128) and float32 (``f``
casts ``x`` and the data to float32 / complex64, computes and returns float32;
the exact derivative is that of the same formula at the float32-rounded point
and data). Relative error: ``|D - exact| / |exact|`` (directions with
``|exact|`` below 0.1 ``||grad f|| ||v||`` are redrawn so the ratio means something).
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

from benchmarks._common import Result, log, md_table  # noqa: E402

METHODS = ("complex", "central", "richardson")
DTYPES = ("float64", "float32")
GOALS = {("complex", "float64"): 1e-13, ("richardson", "float64"): 1e-10}
SIZES = (2, 5, 1)
N_SAMPLES = 8
DIGITS = 40


class Function:
    """``f(x) = mean((net(x; s) - y)^2) + 0.1 log(1 + ||x||^2)``, generic over float, complex and mpmath."""

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        d, h, _ = SIZES
        self.n = h * d + h + h + 1
        self.s = rng.uniform(-2, 2, size=(N_SAMPLES, d))
        self.y = np.sin(self.s[:, 0]) + 0.5 * self.s[:, 1]
        self.x = rng.normal(scale=0.8, size=self.n)

    def evaluate(self, x: np.ndarray, s: np.ndarray, y: np.ndarray) -> Any:
        d, h, _ = SIZES
        if x.dtype == object:
            import mpmath as mp

            tanh = np.vectorize(mp.tanh, otypes=[object])
            log = mp.log
        else:
            tanh, log = np.tanh, np.log
        W1, b1 = x[: h * d].reshape(h, d), x[h * d: h * d + h]
        w2, b2 = x[h * d + h: h * d + 2 * h], x[-1]
        hidden = tanh(s.dot(W1.T) + b1)
        r = hidden.dot(w2) + b2 - y
        return (r * r).sum() / len(y) + 0.1 * log(1 + (x * x).sum())

    def f(self, dtype: str) -> Callable[[np.ndarray], Any]:
        """The function computed in ``dtype`` (complex input -> complex128 / complex64)."""
        real = np.float32 if dtype == "float32" else np.float64
        cplx = np.complex64 if dtype == "float32" else np.complex128
        s, y = self.s.astype(real), self.y.astype(real)

        def f(x: np.ndarray) -> Any:
            x = np.asarray(x)
            x = x.astype(cplx) if np.iscomplexobj(x) else x.astype(real)
            return self.evaluate(x, s, y)

        return f

    def exact(self, x: np.ndarray, v: np.ndarray, dtype: str) -> float:
        """``D_v f(x)`` of the formula with the data rounded to ``dtype``, by mpmath at 40 digits."""
        import mpmath as mp

        real = np.float32 if dtype == "float32" else np.float64
        with mp.workdps(DIGITS):
            s = np.array([[mp.mpf(float(a)) for a in row] for row in self.s.astype(real)], dtype=object)
            y = np.array([mp.mpf(float(a)) for a in self.y.astype(real)], dtype=object)
            xm = np.array([mp.mpf(float(a)) for a in x], dtype=object)
            vm = np.array([mp.mpf(float(a)) for a in v], dtype=object)
            return float(mp.diff(lambda t: self.evaluate(xm + t * vm, s, y), 0))

    def grad_norm(self, x: np.ndarray, dtype: str) -> float:
        """``||grad f(x)||`` by complex step per coordinate (only to screen directions)."""
        f = self.f("float64")
        x = x.astype(np.float64)
        return float(np.linalg.norm([f(x + 1e-30j * e).imag / 1e-30 for e in np.eye(len(x))]))


def points(n_points: int) -> list[tuple[Function, dict[str, tuple[np.ndarray, np.ndarray, float]]]]:
    """Seeded ``(function, {dtype: (x, v, exact)})`` with ``|exact| >= 0.1 ||g|| ||v||``."""
    out = []
    for seed in range(n_points):
        fn = Function(seed)
        rng = np.random.default_rng(1000 + seed)
        per: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
        for dtype in DTYPES:
            x = fn.x.astype(np.float32).astype(np.float64) if dtype == "float32" else fn.x.copy()
            gnorm = fn.grad_norm(x, dtype)
            for _ in range(50):
                v = rng.standard_normal(fn.n)
                v /= np.max(np.abs(v))
                if dtype == "float32":
                    v = v.astype(np.float32).astype(np.float64)
                exact = fn.exact(x, v, dtype)
                if abs(exact) >= 0.1 * gnorm * np.linalg.norm(v):
                    break
            per[dtype] = (x, v, exact)
        out.append((fn, per))
    return out


def steps(method: str, dtype: str, quick: bool) -> list[float]:
    if method == "complex":
        ks = range(1, 61, 4) if not quick else range(1, 61, 15)
        if dtype == "float32":  # complex64 underflows below ~1e-38
            ks = range(1, 40, 3 if not quick else 12)
        return [10.0 ** -k for k in ks]
    lo = 16 if dtype == "float64" else 9
    return [10.0 ** (-k / 2) for k in range(2, 2 * lo + 1, 1 if not quick else 4)]


def run(quick: bool = False, *, n_points: int | None = None) -> Result:
    import verify

    t_start = time.perf_counter()
    pts = points(n_points or (1 if quick else 3))
    data: dict[str, Any] = {"sweep": {}, "auto": {}, "n_points": len(pts)}
    for dtype in DTYPES:
        for method in METHODS:
            hs = steps(method, dtype, quick)
            errs = np.full((len(pts), len(hs)), np.nan)
            auto = []
            for i, (fn, per) in enumerate(pts):
                x, v, exact = per[dtype]
                f = fn.f(dtype)
                x_in = x.astype(np.float32) if dtype == "float32" else x
                for j, h in enumerate(hs):
                    try:
                        est = verify.directional_derivative(f, x_in, v, method=method, step=h)
                    except Exception as exc:  # an estimator that cannot be formed at this step: recorded as NaN
                        log(f"  fd {method} {dtype} step {h:.0e}: {type(exc).__name__}: {exc}")
                        continue
                    errs[i, j] = abs(est.value - exact) / abs(exact)
                est = verify.directional_derivative(f, x_in, v, method=method)
                auto.append({"step": est.step, "true": abs(est.value - exact) / abs(exact),
                             "reported": est.error / abs(exact), "evaluations": est.evaluations})
            med = [float(np.nanmedian(c)) if np.any(np.isfinite(c)) else math.nan for c in errs.T]
            data["sweep"][f"{method}/{dtype}"] = {"steps": hs, "median": med, "max": [
                float(np.nanmax(c)) if np.any(np.isfinite(c)) else math.nan for c in errs.T]}
            data["auto"][f"{method}/{dtype}"] = auto
    md, head = report(data)
    return Result("4-fd-accuracy", "Finite-difference accuracy against the exact derivative", md, data,
                  plots=[("fd_accuracy.png", plot(data))], headline=head, seconds=time.perf_counter() - t_start)


def report(data: dict[str, Any]) -> tuple[str, list[str]]:
    rows, head = [], []
    for key, sw in data["sweep"].items():
        method, dtype = key.split("/")
        med = np.array(sw["median"], dtype=float)
        j = int(np.nanargmin(med)) if np.any(np.isfinite(med)) else 0
        auto = data["auto"][key]
        true = max(a["true"] for a in auto)
        reported = min(a["reported"] / a["true"] if a["true"] > 0 else math.inf for a in auto)
        goal = GOALS.get((method, dtype))
        verdict = "" if goal is None else ("met" if true <= goal else "NOT met")
        rows.append([method, dtype, f"{med[j]:.1e} at step {sw['steps'][j]:.0e}",
                     f"{true:.1e}", f"{max(a['reported'] for a in auto):.1e}",
                     f"{reported:.2g}" if math.isfinite(reported) else "exact",
                     f"{int(np.median([a['evaluations'] for a in auto]))}",
                     f"<= {goal:.0e}: {verdict}" if goal else ""])
        if goal:
            head.append(f"fd accuracy {method} {dtype}: {true:.1e} relative at the automatic step (goal {goal:.0e}, "
                        f"{verdict})")
    md = [
        f"Exact derivative: mpmath at {DIGITS} digits. Function: MSE loss of a tanh MLP "
        f"{'-'.join(map(str, SIZES))} on {N_SAMPLES} samples + 0.1 log(1 + ||x||^2), 21 parameters; "
        f"{data['n_points']} seeded points and directions. Errors are relative to |D_v f|.",
        "",
        md_table(["method", "dtype", "best error over the step sweep (median)", "error at automatic step (worst)",
                  "reported error bound (worst)", "bound / true error (min)", "f evaluations", "goal"], rows,
                 ["l", "l", "r", "r", "r", "r", "r", "l"]),
        "",
        "`bound / true error` >= 1 means the reported error bound held at every point (the bound is honest).",
    ]
    return "\n".join(md), head


def plot(data: dict[str, Any]) -> Callable[[Any], None]:
    def draw(plt: Any) -> None:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        for ax, dtype in zip(axes, DTYPES):
            for c, method in enumerate(METHODS):
                sw = data["sweep"][f"{method}/{dtype}"]
                ax.loglog(sw["steps"], np.maximum(np.array(sw["median"], dtype=float), 1e-18), "-o", ms=3,
                          color=f"C{c}", label=method)
                for a in data["auto"][f"{method}/{dtype}"]:
                    ax.scatter([a["step"]], [max(a["true"], 1e-18)], marker="*", s=90, color=f"C{c}",
                               edgecolors="k", zorder=5)
            for (m, d), g in GOALS.items():
                if d == dtype:
                    ax.axhline(g, ls=":", lw=1, color=f"C{METHODS.index(m)}")
            ax.set_title(f"{dtype}: relative error vs step (star: automatic step; 0 drawn at 1e-18)")
            ax.set_xlabel("step t (displacement t v, ||v||_inf = 1)")
            ax.set_ylabel("|D - exact| / |exact|")
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
