"""Why Adam's float32 meta-gradients differ from the float64 reference, measured (issue #17).

Run from the repository root::

    python scripts/adam_float32.py > reports/inner-optimizers/adam-float32.md
    python scripts/adam_float32.py --examples 40 --jax 6   # + JAX float32 on the Adam rows' seeds 0-5 (slow)

For the check matrix's own problems (``build_case(row, seed=k)``, ``k < --examples``, i.e. the
cases ``metaverify check --examples N`` runs) of the rows ``maml-adam``, ``anil-adam`` and
``maml-momentum`` it prints Markdown tables of:

1. where the float32 error comes from: the torch float32 error against the float64
   reference (normwise, as the matrix measures it), the same with only the optimiser's
   step computed in float64 (everything else float32), and float64 with only the step in
   float32; then the float64 reference on float32-rounded inputs (the old condition
   estimate), with the optimiser's forward step in float32, with its VJP in float32, with
   both (:func:`verify.step_rounding.float32_step`; the new estimate);
2. the verdicts under the old tolerance (input rounding only) and the new one, and the
   margin ``tolerance / error``;
3. what the new tolerance still catches: the diagnosis variants (planted bugs:
   ``first_order``, Adam's eps placement, detached state, ...) as distances from the exact
   meta-gradient, in units of the float32 and float64 tolerances;
4. the correlation of the excess with the smallest first-step support gradient ``|g|``
   (Adam's step Jacobian carries float32 rounding ``~eps32 / |g|``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.getcwd())

from reference.models import flatten  # noqa: E402
from verify.algorithms import ALGORITHMS, Case, build_case, evaluate  # noqa: E402
from verify.matrix import ReferenceData, _relative, rounding_floor  # noqa: E402
from verify.step_rounding import float32_step  # noqa: E402
from verify.tolerance import tolerance  # noqa: E402

EPS32 = float(np.finfo(np.float32).eps)
ROWS = ("maml-adam", "anil-adam", "maml-momentum")


def _r32(a: Any) -> Any:
    return np.asarray(a).astype(np.float32).astype(np.float64) if np.asarray(a).dtype.kind == "f" else a


def rounded(case: Case) -> Case:
    return Case(case.algorithm, case.model, [_r32(p) for p in case.params],
                [type(t)(*(_r32(a) for a in t)) for t in case.tasks], dict(case.hyper), case.seed,
                {k: _r32(v) for k, v in case.extra.items()})


def torch_grad(case: Case, dtype: str, step_dtype: Any = None, hyper32: bool = False) -> np.ndarray:
    """The torch backend's meta-gradient in ``dtype``; ``step_dtype``: compute the optimiser step in that dtype;
    ``hyper32``: the hyper-parameter tensors in the run's dtype (the backend before the fix: Adam's bias
    corrections ``1 - b^t`` computed in float32)."""
    import torch

    import verify.backends.torch.inner_optim as tio
    from verify.backends import load_backend

    orig, orig_hyper = tio.direction, tio.hyper_tensors

    def direction(opt, k, params, state, grads, loss, active, phi, hp=None):
        def c(t):
            return None if t is None else t.to(step_dtype)

        pd = next(p for p in params if p is not None).dtype
        st = [None if s is None else tuple(c(x) for x in s) for s in state]
        # hp: the hyper-parameters stay the backend's float64 scalars (bias corrections in double)
        d, s = orig(opt, k, [c(p) for p in params], st, [c(g) for g in grads], loss, active, phi, hp)
        return [None if x is None else x.to(pd) for x in d], s

    if step_dtype is not None:
        step_dtype = {"float32": torch.float32, "float64": torch.float64}[step_dtype]
        tio.direction = direction
    if hyper32:
        tio.hyper_tensors = lambda opt, _dtype, device: orig_hyper(opt, torch.float32, device)
    try:
        _, g = ALGORITHMS[case.algorithm].call(load_backend("torch"), case, case.variables, dtype=dtype,
                                               device="cpu", allow_tf32=False)
    finally:
        tio.direction, tio.hyper_tensors = orig, orig_hyper
    return flatten([np.asarray(x, dtype=np.float64) for x in g])


def hyper32_step(opt: Any) -> Any:
    """:func:`float32_step` with the hyper-parameters float32 too (``1 - b^t``, ``1 - b`` computed in float32)."""
    out = float32_step(opt)
    for name in ("b1", "b2", "momentum", "dampening"):
        if hasattr(out, name):
            setattr(out, name, np.float32(getattr(out, name)))
    return out


def jax_grad(case: Case) -> np.ndarray:
    from verify.backends import load_backend

    _, g = ALGORITHMS[case.algorithm].call(load_backend("jax"), case, case.variables, dtype="float32")
    return flatten([np.asarray(x, dtype=np.float64) for x in g])


def min_first_step_gradient(case: Case) -> float:
    """Smallest ``|dL_s/dtheta_i|`` over the adapted coordinates and tasks at the first inner step."""
    head = set(case.model.head_indices)
    adapted = [i for i in range(len(case.params)) if case.algorithm.startswith("maml") or i in head]
    out = np.inf
    for t in case.tasks:
        g = case.model.grad(case.params, t.x_support, t.y_support)
        out = min(out, min(float(np.min(np.abs(g[i]))) for i in adapted))
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=40, help="seeds 0..N-1 per row (default 40)")
    ap.add_argument("--rows", nargs="+", default=list(ROWS))
    ap.add_argument("--jax", type=int, default=0, metavar="N",
                    help="also the JAX float32 error on the Adam rows' first N seeds (slow: eager JAX loop)")
    args = ap.parse_args()
    tol0 = tolerance("float32", "reference_match")
    t_start = time.perf_counter()
    data: list[dict[str, Any]] = []
    for row in args.rows:
        make = ALGORITHMS[row].call.make_optimizer
        for k in range(args.examples):
            case = build_case(row, seed=k)
            ref = ReferenceData(case)
            g = ref.grad
            floor = rounding_floor(case, ref.loss, ref.x0)
            rc = rounded(case)

            def dev(**kw):
                return _relative(flatten(evaluate(rc, **kw)[1]), g)[0]

            d = {
                "row": row, "seed": k, "K": case.hyper["inner_steps"], "lr": case.hyper["inner_lr"],
                "n": g.size, "case": case,
                "t32": _relative(torch_grad(case, "float32"), g, floor)[0],
                "t32_step64": _relative(torch_grad(case, "float32", "float64"), g, floor)[0],
                "t64_step32": _relative(torch_grad(case, "float64", "float32"), g, floor)[0],
                "in": dev(),
                "in_fwd": dev(inner_optimizer=float32_step(make(), ("direction",))),
                "in_vjp": dev(inner_optimizer=float32_step(make(), ("vjp",))),
                "in_both": dev(inner_optimizer=float32_step(make())),
                "t32_hyper32": _relative(torch_grad(case, "float32", hyper32=True), g, floor)[0],
                "in_both_hyper32": dev(inner_optimizer=hyper32_step(make())),
                "min_g": min_first_step_gradient(case),
            }
            if k < args.jax and "adam" in row:
                d["j32"] = _relative(jax_grad(case), g, floor)[0]
            d["cond_old"] = max(1.0, d["in"] / EPS32)
            d["cond_new"] = max(1.0, d["in_both"] / EPS32)
            d["tol_old"] = tol0 * d["cond_old"]
            d["tol_new"] = tol0 * d["cond_new"]
            # planted bugs: the diagnosis catalogue's variants, distance from the exact meta-gradient
            from verify.auditing.diagnosis import optimizer as diag

            d["bugs"] = {}
            for key, label, run in diag.variants(case):
                if key == "wrong_inner_steps":
                    continue
                dist = _relative(run()[1], g, floor)[0]
                d["bugs"][label] = min(d["bugs"].get(label, np.inf), dist)
            data.append(d)
            print(f"{row} {k}: t32 {d['t32']:.2e} tol_old {d['tol_old']:.2e} tol_new {d['tol_new']:.2e}",
                  file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t_start
    report(data, args, seconds)


def _e(x: float) -> str:
    return f"{x:.1e}"


def report(data: list[dict[str, Any]], args: argparse.Namespace, seconds: float) -> None:
    tol0 = tolerance("float32", "reference_match")
    jax = args.jax > 0
    print("# Adam in float32: where the error comes from (issue #17)\n")
    print(f"`python scripts/adam_float32.py --examples {args.examples}{f' --jax {args.jax}' if jax else ''}` "
          f"({len(data)} cases, {seconds:.0f} s at load {os.getloadavg()[0]:.1f}; the check matrix's problems "
          f"`build_case(row, seed=k)`, "
          f"k < {args.examples}). Errors are the matrix's normwise relative error against the float64 "
          f"reference; float32's `reference_match` row is eps32^(3/4) = {tol0:.2e}.\n")
    print("## 1. Summary per row\n")
    print("Before the fix the torch backend built Adam's hyper-parameter tensors in the run's dtype, so in float32 "
          "it computed the bias corrections `1 - b^t` in float32 (first three columns after `cases`); now "
          "they are float64 scalars as in torch.optim (the rest). Old tolerance: float32's row times the input-"
          "rounding condition; new: times the input-rounding + float32-step condition "
          "(`verify.matrix.float32_condition`).\n")
    print("| row | cases | before: max err | before: fail, old tol | before: max err / old tol "
          "| before: fail, new tol | torch f32 err: max | fail, old tol | max err / old tol | fail, new tol "
          "| max err / new tol | max new tol / old tol | torch f32, step in f64: max "
          "| torch f64, step in f32: max |"
          + (f" JAX f32 (seeds < {args.jax}) err: max | JAX fail, old tol | JAX fail, new tol |" if jax else ""))
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if jax else ""))
    for row in args.rows:
        ds = [d for d in data if d["row"] == row]
        if not ds:
            continue
        line = (f"| {row} | {len(ds)} | {_e(max(d['t32_hyper32'] for d in ds))} "
                f"| {sum(d['t32_hyper32'] > d['tol_old'] for d in ds)} "
                f"| {max(d['t32_hyper32'] / d['tol_old'] for d in ds):.3f} "
                f"| {sum(d['t32_hyper32'] > d['tol_new'] for d in ds)} | {_e(max(d['t32'] for d in ds))} "
                f"| {sum(d['t32'] > d['tol_old'] for d in ds)} | {max(d['t32'] / d['tol_old'] for d in ds):.3f} "
                f"| {sum(d['t32'] > d['tol_new'] for d in ds)} "
                f"| {max(d['t32'] / d['tol_new'] for d in ds):.3f} "
                f"| {max(d['tol_new'] / d['tol_old'] for d in ds):.3g} "
                f"| {_e(max(d['t32_step64'] for d in ds))} | {_e(max(d['t64_step32'] for d in ds))} |")
        js = [d for d in ds if "j32" in d]
        if jax and js:
            line += (f" {_e(max(d['j32'] for d in js))} | {sum(d['j32'] > d['tol_old'] for d in js)} / {len(js)} "
                     f"| {sum(d['j32'] > d['tol_new'] for d in js)} / {len(js)} |")
        elif jax:
            line += " | | |"
        print(line)

    adam = [d for d in data if "adam" in d["row"]]
    before = [d for d in adam if d["t32_hyper32"] > d["tol_old"]]
    if before:
        print("\n## 2. The cases that failed before the fix: Adam's bias corrections in float32\n")
        print("Torch float32 error with the hyper-parameter tensors in float32 (the backend before the fix); the "
              "float64 reference on float32-rounded inputs with the Adam step in float32 *and its bias corrections "
              "`1 - b^t` computed in float32* (`hyper32_step` here); the torch float32 error after the fix "
              "(bias corrections in double); the old tolerance.\n")
        print("| row | seed | K | before | reference, bias corrections in float32 | after | tol old |")
        print("|---|---|---|---|---|---|---|")
        for d in sorted(before, key=lambda d: -d["t32_hyper32"]):
            print(f"| {d['row']} | {d['seed']} | {d['K']} | {_e(d['t32_hyper32'])} | {_e(d['in_both_hyper32'])} "
                  f"| {_e(d['t32'])} | {_e(d['tol_old'])} |")
    if adam:
        print("\n## 3. After the fix: the Adam cases with the largest torch float32 error\n")
        print("Columns: torch float32 error; torch float32 with the Adam step (forward and its autograd "
              "backward) in float64; torch float64 with only the Adam step in float32; the float64 reference "
              "on float32-rounded inputs (`in`, the old estimate), plus the Adam step in float32 (forward "
              "only / VJP only / both = the new estimate, `verify.step_rounding.float32_step`); the old and "
              "new tolerance; the smallest first-step support gradient.\n")
        print("| row | seed | K | lr | torch f32 | f32, step f64 | f64, step f32 | ref: in | in + fwd f32 "
              "| in + VJP f32 | in + both | tol old | tol new | min first-step abs(g) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for d in sorted(adam, key=lambda d: -d["t32"])[:12]:
            print(f"| {d['row']} | {d['seed']} | {d['K']} | {d['lr']:.3f} | {_e(d['t32'])} | {_e(d['t32_step64'])} "
                  f"| {_e(d['t64_step32'])} | {_e(d['in'])} | {_e(d['in_fwd'])} | {_e(d['in_vjp'])} "
                  f"| {_e(d['in_both'])} | {_e(d['tol_old'])} | {_e(d['tol_new'])} | {d['min_g']:.1e} |")
        t32 = np.array([d["t32"] for d in adam])
        fix = np.array([d["t32_step64"] for d in adam])
        only = np.array([d["t64_step32"] for d in adam])
        both = np.array([d["in_both"] for d in adam])
        fwd = np.array([d["in_fwd"] for d in adam])
        vjp = np.array([d["in_vjp"] for d in adam])
        inp = np.array([d["in"] for d in adam])
        ming = np.array([d["min_g"] for d in adam])
        print("\n## 4. Attribution over all Adam cases after the fix (medians, Spearman rank correlations)\n")
        print(f"* median torch float32 error {_e(np.median(t32))}; with the Adam step in float64 "
              f"{_e(np.median(fix))} ({np.median(t32 / np.maximum(fix, 1e-300)):.1f}x smaller, median ratio); "
              f"float64 with only the Adam step in float32 {_e(np.median(only))}.")
        print(f"* reference deviation, median: input rounding {_e(np.median(inp))}; + forward step in float32 "
              f"{_e(np.median(fwd))}; + VJP in float32 {_e(np.median(vjp))}; + both {_e(np.median(both))}.")
        print(f"* rank correlation of the torch float32 error with: the new estimate (in + both) "
              f"{spearman(t32, both):.2f}; the old estimate (inputs) {spearman(t32, inp):.2f}; "
              f"1 / (smallest first-step abs(g)) {spearman(t32, 1 / ming):.2f}; the new estimate with "
              f"1 / (smallest abs(g)) {spearman(both, 1 / ming):.2f}.")
        r = t32 / both
        print(f"* torch float32 error / new estimate's deviation: median {np.median(r):.2f}, max {r.max():.2f} "
              f"(the tolerance allows eps32^(3/4) / eps32 = {tol0 / EPS32:.0f} times the deviation).")

    print("\n## 5. Planted bugs against the new float32 tolerance\n")
    print("Distance of each diagnosis variant (`verify.auditing.diagnosis.optimizer.variants`) from the exact "
          "meta-gradient, per case; a float32 cell catches the bug where the distance exceeds the new tolerance "
          "plus the float32 error (shown: cases caught / cases where the variant differs from the exact "
          "meta-gradient by more than float64's `reference_match`, 1.8e-12, i.e. where a float64 cell "
          "catches it; median distance / new float32 tolerance).\n")
    print("| row | planted bug | caught, float32 (new tol) | caught, float32 (old tol) | median distance / new tol "
          "| caught, float64 |")
    print("|---|---|---|---|---|---|")
    tol64 = tolerance("float64", "reference_match")
    for row in args.rows:
        ds = [d for d in data if d["row"] == row]
        labels = dict.fromkeys(lbl for d in ds for lbl in d["bugs"])
        for lbl in labels:
            # a variant that computes the same function on a case (detached state with K = 1) is no bug there
            have = [d for d in ds if lbl in d["bugs"] and d["bugs"][lbl] > tol64]
            c32 = sum(d["bugs"][lbl] > d["tol_new"] + d["t32"] for d in have)
            c32_old = sum(d["bugs"][lbl] > d["tol_old"] + d["t32"] for d in have)
            if not have:
                continue
            med = float(np.median([d["bugs"][lbl] / d["tol_new"] for d in have]))
            print(f"| {row} | {lbl} | {c32} / {len(have)} | {c32_old} / {len(have)} | {med:.3g} "
                  f"| {len(have)} / {len(have)} |")


if __name__ == "__main__":
    main()
