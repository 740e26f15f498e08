"""The check matrix: algorithm x backend x dtype -> verdict.

For every cell, ``examples`` seeded random problems (:func:`verify.algorithms.build_case`)
are checked:

* ``numpy`` (the analytic reference, float64 only): the meta-gradient against
  directional derivatives of the reference meta-loss (complex step, or
  Richardson where the function is not analytic) and the Taylor remainder rate
  (2 with the gradient);
* ``torch`` / ``jax``: the meta-loss and meta-gradient against the reference
  (normwise relative error, per tensor for the report), and in float64
  independently against directional derivatives of the reference meta-loss,
  so that a disagreement says which side is wrong.

float32 cells use float32's tolerance row, scaled by a condition estimate:
the relative change of the float64 reference gradient when its inputs are
rounded to float32 (no float32 computation can do better than that), divided
by float32's eps.

Length: a little over 500 lines: the cell runner, its tolerance rows and the
condition estimate it shares with the audit.
"""

from __future__ import annotations

import contextlib
import math
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from reference.errors import MetaverifyError
from reference.models import flatten, unflatten
from verify._verdict import FAIL, INCONCLUSIVE, PASS, combine_statuses, record
from verify.algorithms import ALGORITHMS, BACKBONE_ALGORITHMS, Case, build_case, evaluate
from verify.tolerance import TF32, tolerance

#: Status of a cell that could not run (backend missing, not implemented).
UNSUPPORTED = "unsupported"
DTYPES = ("float64", "float32")
#: Every precision a cell can have: ``"tf32"`` is float32 with TensorFloat-32
#: matrix products (real on a CUDA GPU, emulated for torch on the CPU).
PRECISIONS = (*DTYPES, TF32)


@dataclass
class CaseResult:
    """The checks of one problem in one cell."""

    description: str
    status: str
    error: float
    tolerance: float
    checks: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Cell:
    """One algorithm x backend x dtype entry of the matrix."""

    algorithm: str
    backend: str
    dtype: str
    status: str = PASS
    worst_error: float = 0.0
    tolerance: float = math.nan
    cases: list[CaseResult] = field(default_factory=list)
    note: str = ""
    seconds: float = 0.0

    def add(self, result: CaseResult) -> None:
        """Record one problem's result; the cell keeps the worst error/tolerance ratio."""
        self.cases.append(result)
        self.seconds += result.seconds
        self.status = combine_statuses([self.status, result.status])
        ratio = _ratio(result.error, result.tolerance)
        if len(self.cases) == 1 or ratio > _ratio(self.worst_error, self.tolerance):
            self.worst_error, self.tolerance = result.error, result.tolerance

    def to_dict(self) -> dict[str, Any]:
        return record(
            self, ("algorithm", "backend", "dtype", "status", "worst_error", "tolerance", "examples", "note", "seconds",
                   "failures"),
            examples=len(self.cases), seconds=round(self.seconds, 3),
            failures=[{"problem": c.description, "checks": [k for k in c.checks if k["status"] != PASS]}
                      for c in self.cases if c.status != PASS],
        )


def _ratio(error: float, tol: float) -> float:
    if math.isnan(error):
        return math.inf
    if tol > 0:
        return error / tol
    return math.inf if error > 0 else 0.0


def _relative(a: np.ndarray, b: np.ndarray, floor: float = 0.0) -> tuple[float, int]:
    """Normwise relative difference ``max|a - b| / max(max|b|, floor, tiny)`` and the worst index."""
    diff = np.abs(a - b)
    idx = int(np.argmax(diff)) if diff.size else 0
    scale = max(float(np.max(np.abs(b))) if b.size else 0.0, floor, np.finfo(np.float64).tiny)
    return (float(diff[idx]) / scale if diff.size else 0.0), idx


def _locate(case: Case, flat_index: int) -> str:
    """``W2[3, 1]`` for a flat index into the case's variables."""
    offset = 0
    for name, shape in zip(case.names, case.shapes):
        size = int(np.prod(shape))
        if flat_index < offset + size:
            local = np.unravel_index(flat_index - offset, shape) if shape else ()
            return f"{name}[{', '.join(str(int(i)) for i in local)}]" if shape else name
        offset += size
    return f"[{flat_index}]"


#: Public names of the comparison helpers, shared with the audit (:mod:`verify.auditing`).
relative = _relative
locate = _locate


def _check(name: str, status: str, error: float, tol: float, detail: str, kind: str = "error") -> dict[str, Any]:
    """One check's record; ``kind`` is ``"error"`` (a relative error) or ``"rate"`` (a Taylor slope deficit)."""
    return {"check": name, "status": status, "error": error, "tolerance": tol, "detail": detail, "kind": kind}


def reference_loss_function(case: Case) -> Callable[[np.ndarray], Any]:
    """``f(flat variables) -> meta-loss`` of the reference, complex-step safe where analytic."""
    shapes = case.shapes

    def f(x: np.ndarray) -> Any:
        return evaluate(case, variables=[np.asarray(v) for v in unflatten(x, shapes)])[0]

    return f


def _float32_condition(case: Case, g_ref: np.ndarray, *, optimizer_step: bool = True) -> float:
    """Sensitivity of the reference gradient to float32 rounding, in units of eps32.

    The inputs are rounded to float32; a row with a differentiable inner optimiser also evaluates the
    optimiser's step and its VJP in float32 (:func:`verify.step_rounding.float32_step`: Adam's step
    Jacobian is a cancellation that amplifies float32's rounding by ``1 / |g|``, which rounding the inputs
    of an exact computation does not see); ``optimizer_step=False`` rounds the inputs only (the audit's
    float64 tolerance keeps that estimate).
    """
    def r32(a):
        return np.asarray(a).astype(np.float32).astype(np.float64) if np.asarray(a).dtype.kind == "f" else a

    rounded = Case(
        case.algorithm, case.model, [r32(p) for p in case.params],
        [type(t)(*(r32(a) for a in t)) for t in case.tasks], dict(case.hyper), case.seed,
        {k: r32(v) for k, v in case.extra.items()},
    )
    make = getattr(ALGORITHMS[case.algorithm].call, "make_optimizer", None)
    if make is None or not optimizer_step:
        _, g_r = evaluate(rounded)
    else:
        from verify.step_rounding import float32_step

        _, g_r = evaluate(rounded, inner_optimizer=float32_step(make()))
    rel, _ = _relative(flatten(g_r), g_ref)
    return max(1.0, rel / float(np.finfo(np.float32).eps))


#: Public name of the float32 input-rounding condition estimate, shared with the audit.
float32_condition = _float32_condition


def rounding_floor(case: Case, loss: Any, x0: np.ndarray) -> float:
    """The absolute scale below which a low-precision gradient entry is pure rounding.

    A meta-gradient entry is a sum of terms of the size of the loss per unit
    parameter (means of O(1) per-example terms); when the terms cancel (R2-D2's
    offset gradient under cross-entropy is exactly 0, a matching network near
    log 2 has a tiny gradient) float32 leaves ``eps32 * |L| / max(1, |theta|)``
    behind, which the normwise relative error must not call a bug. Reptile's
    direction ``theta - p_K`` cancels at the scale of ``|theta|``.
    """
    if case.algorithm == "reptile" or loss is None:
        return float(np.max(np.abs(flatten(case.params))))
    return abs(float(np.real(loss))) / max(1.0, float(np.max(np.abs(x0))))


class ReferenceData:
    """The reference side of one case, computed once and shared by every cell.

    The meta-loss function is memoised on its exact input (bytes and dtype), so
    the directional derivatives and Taylor remainders of the reference, which
    every backend and dtype is checked against at the same seeded points, are
    evaluated once per case.
    """

    def __init__(self, case: Case):
        self.case = case
        self.loss, grads = evaluate(case)
        self.grad = flatten(grads)
        self.x0 = flatten(case.variables)
        self._f = reference_loss_function(case)
        self._memo: dict[tuple[str, bytes], Any] = {}
        self._cond32: float | None = None

    def f(self, x: np.ndarray) -> Any:
        x = np.asarray(x)
        key = (x.dtype.str, x.tobytes())
        if key not in self._memo:
            self._memo[key] = self._f(x)
        return self._memo[key]

    @property
    def condition32(self) -> float:
        if self._cond32 is None:
            self._cond32 = _float32_condition(self.case, self.grad)
        return self._cond32


def _gradient_checks(ref: ReferenceData, g: np.ndarray, dtype: str, label: str, directions: int) -> list[dict]:
    """``g`` against directional derivatives of the reference meta-loss, and (float64) the Taylor rate."""
    from verify._check import check_gradient  # engine imports kept local: cheap CLI start-up
    from verify._taylor import taylor_test

    case = ref.case
    # float32: a gradient smaller than the rounding floor (loss per unit parameter, see rounding_floor) is
    # resolved only to eps32 times the floor (a matching net at log 2, |g| ~ 1e-4): measure against
    # max(||g||, floor), as the reference comparison does
    floor = rounding_floor(case, ref.loss, ref.x0) if dtype == "float32" else 0.0
    v = check_gradient(ref.f, g.astype(np.float32 if dtype == "float32" else np.float64), ref.x0,
                       directions=directions, seed=case.seed, scale_floor=floor)
    checks = [_check(f"{label} vs {v.method or 'finite differences'}", v.status, v.error, v.tolerance, v.reason)]
    if dtype == "float64":
        t = taylor_test(ref.f, ref.x0, taylor_direction(case, ref.x0), grad=g)
        # the "error" of a Taylor check is the rate deficit; its "tolerance" the allowed deficit (0.25)
        deficit = max(0.0, t.expected_rate - t.slope) if not math.isnan(t.slope) else 0.0
        checks.append(_check(f"{label} Taylor rate", t.status, deficit, 0.25,
                             f"slope {t.slope:.3f} (expected {t.expected_rate}): {t.reason}", kind="rate"))
    return checks


#: Differentiated variables that must stay positive (the ridge lam of R2-D2 / LR-D2).
POSITIVE_VARIABLES = ("lam",)


def taylor_direction(case: Case, x0: np.ndarray, v: np.ndarray | None = None) -> np.ndarray:
    """The seeded random Taylor-test direction of ``case``, kept inside the variables' domain.

    The Taylor test's largest step moves a coordinate by up to
    ``TAYLOR_MAX_STEP * log(e + ||x||_inf)`` times ``|v_i| / ||v||_inf``
    (:mod:`verify._taylor`), which can push a ridge ``lam`` drawn from
    [0.5, 2] below zero, where the meta-loss is undefined and the reference
    rightly refuses it. Each positive variable's component is shrunk so that
    its largest displacement is at most half its value (0.71 of it once the
    test rounds its step to the nearest power of two). ``v`` overrides the
    seeded random direction (it is copied, not modified).
    """
    from verify._taylor import TAYLOR_MAX_STEP

    v = np.random.default_rng(case.seed).standard_normal(x0.shape) if v is None else np.array(v, dtype=np.float64)
    offset, fixed = 0, []
    for name, shape in zip(case.names, case.shapes):
        size = int(np.prod(shape))
        if name in POSITIVE_VARIABLES:
            fixed.extend(range(offset, offset + size))
        offset += size
    if fixed:
        others = np.delete(np.abs(v), fixed)
        vmax = float(np.max(others)) if others.size else 1.0
        reach = TAYLOR_MAX_STEP * math.log(math.e + float(np.max(np.abs(x0))))  # max displacement per unit |v_i|/vmax
        for i in fixed:
            limit = 0.5 * abs(float(x0[i])) / reach * vmax
            v[i] = math.copysign(min(abs(v[i]), limit), v[i])
    return v


def _hessian_inverse_checks(case: Case) -> list[dict[str, Any]]:
    """iMAML's implicit-function residuals and R2-D2's primal/Woodbury agreement, per task (reference side)."""
    from verify import hessian_inverse as hi

    checks = []
    if case.algorithm == "imaml":
        from reference import imaml

        info = imaml.meta_loss_and_grad_info(case.model, case.params, case.tasks, case.hyper["lam"])
        for i, (task, ti) in enumerate(zip(case.tasks, info.tasks)):
            v = hi.check_imaml(case.model, case.params, task, case.hyper["lam"], ti.phi, ti.grad,
                               inner_tol=ti.stationarity_tolerance, rtol=max(ti.linear_residual, 1e-12))
            checks.append(_check(f"iMAML residuals, task {i}", v.status, v.error, v.tolerance, v.reason))
    elif case.algorithm == "r2d2" and not case.hyper.get("regression", False):
        from reference.features import append_ones
        from reference.r2d2 import ridge_weights

        lam = float(case.extra["lam"])
        for i, task in enumerate(case.tasks):
            Z = case.model.forward(case.params, task.x_support)
            Z = append_ones(Z) if case.hyper["bias_column"] else Z
            Y = np.eye(case.hyper["n_classes"])[task.y_support]
            if case.hyper["normalize"]:
                Z, Y = Z / np.sqrt(Z.shape[0]), Y / np.sqrt(Z.shape[0])
            v = hi.check_woodbury(Z, Y, lam, primal=ridge_weights(Z, Y, lam, form="primal"),
                                  dual=ridge_weights(Z, Y, lam, form="dual"))
            checks.append(_check(f"primal vs Woodbury ridge weights, task {i}", v.status, v.error, v.tolerance,
                                 v.reason))
    return checks


def check_case(
    case: Case,
    backend: str,
    dtype: str,
    *,
    directions: int = 4,
    module: Any = None,
    device: str = "cpu",
    ref: ReferenceData | None = None,
) -> CaseResult:
    """Run every applicable check of one problem on one backend and dtype.

    Pass ``ref`` (a :class:`ReferenceData` of ``case``) to share the reference
    evaluations across cells.
    """
    t0 = time.perf_counter()
    ref = ref if ref is not None else ReferenceData(case)
    spec = ALGORITHMS[case.algorithm]
    checks: list[dict[str, Any]] = []
    g_ref = ref.grad

    if backend == "numpy":
        if spec.differentiable:
            checks += _gradient_checks(ref, g_ref, "float64", "reference", directions)
            checks += _hessian_inverse_checks(case)
        else:
            checks.append(_check("reference (defined direction)", PASS, 0.0, 0.0,
                                 f"{case.algorithm} is not the gradient of a loss; checked against backends and "
                                 "structural identities in the test suite"))
    else:
        with _backend_context(backend, dtype, device) as kwargs:
            loss_b, g_b_list = spec.call(module, case, case.variables, **kwargs)
        g_b = flatten([np.asarray(g, dtype=np.float64) for g in g_b_list])
        if g_b.shape != g_ref.shape:
            checks.append(_check("gradient shape", FAIL, math.inf, 0.0,
                                 f"backend returned {g_b.size} gradient entries, reference {g_ref.size}"))
        else:
            low = dtype != "float64"
            cond = ref.condition32 if low else 1.0
            tol = tolerance(dtype, "reference_match", condition=cond)
            if loss_b is not None and ref.loss is not None:
                loss_ref = float(ref.loss)
                err = abs(float(loss_b) - loss_ref) / max(abs(loss_ref), np.finfo(float).tiny)
                checks.append(_check("meta-loss vs reference", PASS if err <= tol else FAIL, err, tol,
                                     f"backend {float(loss_b)!r} reference {loss_ref!r}"))
            # float32/TF32: errors are measured against max(|g|, the rounding floor); float64 purely relative
            floor = rounding_floor(case, ref.loss, ref.x0) if low else 0.0
            err, idx = _relative(g_b, g_ref, floor)
            where = _locate(case, idx)
            detail = (f"worst at {where}: reference={g_ref[idx]:.10g} got={g_b[idx]:.10g}"
                      + (f" (tolerance scaled by condition estimate {cond:.3g})" if cond > 1 else ""))
            if dtype == TF32:
                # the point of a TF32 cell is to show what TF32 costs: say it in float32's units
                tol32 = tolerance("float32", "reference_match", condition=cond)
                detail += (f"; TF32 {'on ' + device if device == 'cuda' else 'emulated on the CPU'}: the error is "
                           f"{err / tol32:.3g}x float32's tolerance {tol32:.2e}")
            checks.append(_check("meta-gradient vs reference", PASS if err <= tol else FAIL, err, tol, detail))
            # TF32 is float32 with coarser matrix products: its directional-derivative check would only repeat
            # the reference comparison at a looser tolerance (the reference is checked in its own cell)
            if spec.differentiable and dtype != TF32:
                checks += _gradient_checks(ref, g_b, dtype, "meta-gradient", directions)
    status = combine_statuses([c["status"] for c in checks])
    # the reported worst error is a relative error; rate checks decide the status only
    errors = [c for c in checks if c["kind"] == "error"] or checks
    worst = max(errors, key=lambda c: _ratio(c["error"], c["tolerance"]))
    return CaseResult(case.describe(), status, float(worst["error"]), float(worst["tolerance"]), checks,
                      time.perf_counter() - t0)


@contextlib.contextmanager
def _backend_context(backend: str, dtype: str, device: str) -> Iterator[dict[str, Any]]:
    """Keyword arguments and the device/precision context for one backend call.

    float32 cells run with TF32 off (true float32, whatever the framework's
    default on the GPU); ``"tf32"`` cells with it on: torch's ``allow_tf32`` on
    CUDA or :func:`verify.backends.torch.emulate_tf32` on the CPU, JAX's
    ``"tensorfloat32"`` matmul precision (GPU only: XLA on the CPU has no TF32).
    JAX cells are pinned to ``device`` (on a GPU machine JAX's default is the GPU).
    """
    precision = "float32" if dtype == TF32 else dtype
    tf32_on = dtype == TF32
    with contextlib.ExitStack() as stack:
        kwargs: dict[str, Any] = {"dtype": precision}
        if backend == "torch":
            kwargs["device"] = device
            kwargs["allow_tf32"] = tf32_on and device == "cuda"
            if tf32_on and device == "cpu":
                from verify.backends.torch import emulate_tf32

                stack.enter_context(emulate_tf32())
        elif backend == "jax":
            if tf32_on and device == "cpu":
                raise NotImplementedError("JAX has no TF32 on the CPU (XLA:CPU ignores the precision); "
                                          "run the tf32 cells with --device cuda")
            from verify.backends.jax import placement, quick_compile

            stack.enter_context(placement(device, tf32=tf32_on))
            # each program runs once or twice here: compile time is the cost (see quick_compile)
            stack.enter_context(quick_compile(device == "cpu"))
            kwargs["jit"] = True  # eager JAX compiles every primitive per shape: jit is several times faster
        elif tf32_on or device != "cpu":
            raise NotImplementedError(f"backend {backend!r} has no device or TF32 option")
        yield kwargs


@dataclass
class MatrixResult:
    cells: list[Cell]
    seed: int
    examples: int

    @property
    def status(self) -> str:
        ran = [c.status for c in self.cells if c.status != UNSUPPORTED]
        return combine_statuses(ran) if ran else INCONCLUSIVE

    def to_dict(self) -> dict[str, Any]:
        return record(self, ("seed", "examples", "status", "cells"))


def cell_name(algorithm: str, backbone: str = "mlp") -> str:
    """The algorithm column of a cell: ``maml`` on the MLP, ``maml[conv4:1x8x8]`` on a backbone."""
    return algorithm if backbone == "mlp" else f"{algorithm}[{backbone}]"


def split_cell_name(name: str) -> tuple[str, str]:
    """``"maml[conv4:1x8x8]"`` -> ``("maml", "conv4:1x8x8")``; ``"maml"`` -> ``("maml", "mlp")``."""
    if name.endswith("]") and "[" in name:
        algorithm, _, rest = name.partition("[")
        return algorithm, rest[:-1]
    return name, "mlp"


def build_cell_case(name: str, seed: int) -> Case:
    """The seeded problem of a cell's algorithm column (see :func:`cell_name`)."""
    algorithm, backbone = split_cell_name(name)
    return build_case(algorithm, seed=seed, backbone=None if backbone == "mlp" else backbone)


def plan(algorithms: Sequence[str], backends: Sequence[str], dtypes: Sequence[str],
         backbones: Sequence[str] = ("mlp",)) -> list[tuple[str, str, str]]:
    """The cells to run, in table order (the numpy reference is float64 only).

    ``backbones``: ``"mlp"`` (each algorithm's random MLP problem) and/or names of
    :data:`verify.algorithms.BACKBONES`; a backbone cell exists for the algorithms of
    :data:`verify.algorithms.BACKBONE_ALGORITHMS` only and is named ``maml[conv4:1x8x8]``.
    """
    cells = []
    names = [cell_name(a, b) for b in backbones for a in algorithms
             if b == "mlp" or a in BACKBONE_ALGORITHMS]
    for name in names:
        algorithm, _ = split_cell_name(name)
        for backend in backends:
            for dtype in dtypes:
                if backend == "numpy" and dtype != "float64":
                    continue
                if backend not in ALGORITHMS[algorithm].backends:
                    continue
                cells.append((name, backend, dtype))
    return cells


def run_matrix(
    algorithms: Sequence[str],
    backends: Sequence[str],
    dtypes: Sequence[str],
    *,
    examples: int = 3,
    seed: int = 0,
    cells: Iterable[tuple[str, str, str]] | None = None,
    progress: Callable[[str], None] | None = None,
    device: str = "cpu",
) -> MatrixResult:
    """Run the matrix; ``cells`` (from :func:`plan`, possibly sharded) overrides the product.

    Without ``cells`` the product covers the MLP problems only; backbone cells come from
    ``plan(..., backbones=...)``.
    """
    from verify.backends import load_backend

    todo = list(cells) if cells is not None else plan(algorithms, backends, dtypes)
    results = {key: Cell(*key) for key in todo}
    modules: dict[str, Any] = {}
    for backend in dict.fromkeys(b for _, b, _ in todo):
        if backend == "numpy":
            continue
        try:
            modules[backend] = load_backend(backend)
        except MetaverifyError as exc:
            for key, cell in results.items():
                if key[1] == backend:
                    cell.status, cell.note = UNSUPPORTED, str(exc)
    # Cases are the outer loop so that each problem's reference side is computed once.
    for algorithm in dict.fromkeys(a for a, _, _ in todo):
        keys = [k for k in todo if k[0] == algorithm and results[k].status != UNSUPPORTED]
        for k in range(examples):
            case = build_cell_case(algorithm, seed * 1_000_003 + k)
            ref: ReferenceData | None = None
            for key in keys:
                cell = results[key]
                if cell.status == UNSUPPORTED:
                    continue
                if progress:
                    progress(f"{algorithm} / {key[1]} / {key[2]} ({k + 1}/{examples})")
                try:
                    ref = ref if ref is not None else ReferenceData(case)
                    cell.add(check_case(case, key[1], key[2], module=modules.get(key[1]), device=device, ref=ref))
                except (ModuleNotFoundError, NotImplementedError) as exc:
                    cell.status, cell.note = UNSUPPORTED, f"not implemented: {exc}"
                except Exception as exc:  # a crash of the implementation under test is a failure, shown in full
                    tb = traceback.format_exc(limit=4)
                    cell.add(CaseResult(case.describe(), FAIL, math.inf, 0.0,
                                        [_check("run", FAIL, math.inf, 0.0, f"{type(exc).__name__}: {exc}\n{tb}")]))
    return MatrixResult([results[k] for k in todo], seed, examples)


__all__ = ["Cell", "CaseResult", "build_cell_case", "cell_name", "split_cell_name", "DTYPES", "PRECISIONS", "MatrixResult", "ReferenceData", "UNSUPPORTED", "check_case", "rounding_floor", "float32_condition", "taylor_direction",
           "locate", "plan", "reference_loss_function", "relative", "run_matrix"]
