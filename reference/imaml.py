"""iMAML: implicit meta-gradients through a proximally regularised inner problem.

Rajeswaran, Finn, Kakade & Levine (2019), "Meta-Learning with Implicit
Gradients", NeurIPS. Per ``shared/CONVENTIONS.md``, for one task:

* inner problem ``phi*(theta) = argmin_phi L_s(phi) + (lam/2) ||phi - theta||^2``,
* task loss ``L_q(phi*)``,
* meta-gradient ``(I + H_s(phi*)/lam)^{-1} grad L_q(phi*)``.

The formula follows from the implicit function theorem applied to the
stationarity condition ``grad L_s(phi) + lam (phi - theta) = 0``: it is exact
at an exact stationary point and *wrong* anywhere else. So the reference

1. solves the inner problem to near machine precision with a trust-region
   Newton method on exact Hessian-vector products (``scipy.optimize``'s
   ``trust-krylov``, Gould et al.'s GLTR; for an MLP with large weight blocks
   Steihaug's trust region on the coordinates of the Hessian's range,
   :mod:`reference.imaml_subspace`), polishes with Newton steps if
   needed, and **raises** :class:`~reference.errors.ConvergenceError` with the
   stationarity residual when it cannot reach ``inner_tol``;
2. solves ``(I + H_s/lam) g = grad L_q`` either densely (``solver="direct"``:
   the Hessian built by the R-operator, a Cholesky test of positive
   definiteness, then a solve) or matrix-free (``solver="cg"``: conjugate
   gradient on Hessian-vector products, ``O(params)`` memory; for an MLP with
   large weight blocks on the coordinates of :mod:`reference.imaml_subspace`,
   the same iteration on ~10x shorter vectors); a matrix that
   is not positive definite (``phi*`` a saddle, not a minimum) is an error.

:func:`meta_loss_and_grad_info` returns, per task, the stationarity residual,
the linear-solve iterations and true residual and an estimate of
``cond(I + H_s/lam)``.

Complex step. With complex ``params`` (complex-step differentiation) the
inner problem has no "argmin" but its stationarity equation still defines
``phi*(theta)`` analytically. The real problem is solved at ``Re theta``,
then Newton's method is run on the complex stationarity equation (each real
and imaginary residual tested against its own scale), so ``meta_loss`` is the
analytic continuation of the real meta-loss. That continuation is itself the
implicit function theorem's tangent, so a complex-step check of iMAML checks
the adjoint solve against a forward (tangent) solve; finite differences of
the real ``meta_loss`` with a tight ``inner_tol`` are the check that assumes
nothing about implicit differentiation.

Works on any model with the ``MLP`` interface (``_loss_and_grad``, ``_hvp``,
``hessian``, ``check_params``), e.g. :class:`reference.models.Quadratic`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.optimize

from reference import imaml_subspace
from reference._threads import map_tasks
from reference.features import as_scalar
from reference.linalg import EPS, IN_PLACE_MIN_SIZE, SPDFactor, conjugate_gradient
from reference.validation import check_finite_scalar, check_positive_int
from reference.errors import ConvergenceError, InvalidInputError, SingularMatrixError
from reference.models import MAX_DENSE_HESSIAN, MLP, flatten
from reference.tasks import Task, check_tasks

Params = list[np.ndarray]
SOLVERS = ("cg", "direct")
# Newton polishing steps tried after the trust-region solve and for the complex (complex-step) continuation.
_NEWTON_STEPS = 8
# Inexact Newton in the polish (Dembo, Eisenstat & Steihaug 1982): a step's CG only has to leave a
# linearised residual ||(H_s + lam I) dz + F|| below POLISH_FORCING * eps * lam * ||z||, a quarter of
# the rounding of the proximal term lam * z alone (each entry of z is stored to within eps/2 of itself,
# so no representable z has a residual much below eps * lam * ||z|| / 4 when H_s is positive
# semidefinite), and at most _MAX_FORCING of the residual, never tighter than the former fixed
# min(cg_tol, 1e-12). Then F(z + dz) is the quadratic term plus round-off, as with the tight solve,
# and the loop below still runs until a step stops halving the residual. Measured at 1-256-256-1
# (2 tasks, lam = 1): the polish's CG went from 580 to ~175 Hessian-vector products (the first step's
# CG to ~1e-8 instead of 1e-12, the two steps at the round-off floor to 0.02-0.5), the whole meta-gradient
# from 1,006 to 601; the result moved by 1.8e-13 relative (a 1-ulp perturbation of theta moves the old
# one by 1.6e-13 to 2.5e-12; cond(I + H/lam) ~ 3.7e3). Where lam * ||z|| is tiny (small lam) the
# forcing term is below 1e-12 and nothing changes.
POLISH_FORCING = 0.25
_MAX_FORCING = 0.5


def _polish_rtol(z: np.ndarray, res: float, lam: float, cg_tol: float) -> float:
    """CG tolerance of a polishing Newton step from ``z`` with stationarity residual ``res`` (see above)."""
    rtol = min(cg_tol, 1e-12)
    if res > 0:
        rtol = max(rtol, min(_MAX_FORCING, POLISH_FORCING * EPS * lam * float(np.linalg.norm(z)) / res))
    return rtol


@dataclass(frozen=True)
class TaskInfo:
    """Diagnostics of one task's implicit meta-gradient.

    Attributes:
        phi: the inner solution ``phi*`` (parameter list).
        grad: this task's meta-gradient ``(I + H_s/lam)^{-1} grad L_q(phi*)``.
        query_loss: ``L_q(phi*)``.
        stationarity_residual: ``||grad L_s(phi*) + lam (phi* - theta)||_2`` (real part
            under complex step).
        stationarity_tolerance: the bound it had to meet, ``inner_tol * max(1, ||grad L_s(theta)||)``.
        inner_iterations: trust-region iterations plus Newton polishing steps.
        solver: ``"cg"`` or ``"direct"``.
        linear_iterations: CG iterations (0 for the direct solve).
        linear_residual: true relative residual ``||(I + H/lam) g - grad L_q|| / ||grad L_q||``.
        cond_estimate: estimate of ``cond(I + H_s(phi*)/lam)``: the Lanczos
            estimate from CG's coefficients (a lower bound), or LAPACK's 1-norm
            estimate from the Cholesky factor for the direct solve.
    """

    phi: Params
    grad: Params
    query_loss: float
    stationarity_residual: float
    stationarity_tolerance: float
    inner_iterations: int
    solver: str
    linear_iterations: int
    linear_residual: float
    cond_estimate: float


@dataclass(frozen=True)
class Result:
    """Meta-loss, meta-gradient and the per-task :class:`TaskInfo`."""

    loss: float
    grad: Params
    tasks: list[TaskInfo]


def check_arguments(model: Any, params: Any, tasks: Any, lam: Any, solver: Any, inner_tol: Any, cg_tol: Any,
                    inner_maxiter: Any, cg_maxiter: Any) -> tuple[Params, list[Task], Any, int, int | None]:
    """Validate iMAML's arguments; return ``(params, tasks, lam, inner_maxiter, cg_maxiter)`` checked.

    The backends call this check and add only their framework's limits (real ``lam``, dtype, jit).

    Raises:
        InvalidInputError: bad parameters or tasks, ``lam <= 0``, an unknown ``solver``, a tolerance
            outside ``(0, 1)``, a non-positive iteration limit, or ``solver="direct"`` beyond the dense
            Hessian limit.
    """
    params = model.check_params(params)
    tasks = check_tasks(model, tasks)
    lam = check_finite_scalar(
        "lam", lam, positive=True,
        hint="; iMAML's proximal weight must be positive (the inner problem is regularised by lam/2 ||phi - theta||^2)",
    )
    if solver not in SOLVERS:
        raise InvalidInputError(
            f"solver={solver!r} is unknown; use 'cg' (matrix-free conjugate gradient) or 'direct' (dense solve)"
        )
    for name, tol in (("inner_tol", inner_tol), ("cg_tol", cg_tol)):
        tol = check_finite_scalar(name, tol, positive=True)
        if isinstance(tol, complex) or tol >= 1:
            raise InvalidInputError(f"{name}={tol!r} must be a real relative tolerance in (0, 1), e.g. 1e-12")
    limit = getattr(model, "n_params", 0) if isinstance(model, MLP) else 0
    if solver == "direct" and limit > MAX_DENSE_HESSIAN:
        raise InvalidInputError(
            f"solver='direct' builds the dense Hessian, but {model!r} has {limit} parameters (limit "
            f"{MAX_DENSE_HESSIAN}); use solver='cg' (matrix-free)"
        )
    inner_maxiter = check_positive_int("inner_maxiter", inner_maxiter)
    if cg_maxiter is not None:
        cg_maxiter = check_positive_int("cg_maxiter", cg_maxiter)
    return params, tasks, lam, inner_maxiter, cg_maxiter


def _check(model, params, tasks, lam, solver, inner_tol, cg_tol, inner_maxiter, cg_maxiter):
    """:func:`check_arguments`' ``(params, tasks, lam)`` (the former private check)."""
    return check_arguments(model, params, tasks, lam, solver, inner_tol, cg_tol, inner_maxiter, cg_maxiter)[:3]


class _Problem:
    """One task's inner objective ``F(phi) = L_s(phi) + lam/2 ||phi - theta||^2`` on flat vectors."""

    def __init__(self, model, params, task: Task, lam, where: str):
        self.model, self.task, self.lam, self.where = model, task, lam, where
        self.shapes = [p.shape for p in params]
        self._bounds = np.cumsum([0] + [p.size for p in params]).tolist()
        self.theta = flatten(params)
        # The forward pass of the last point Hessian-vector products were taken at: CG and the
        # trust-region subproblem take many H v at one point (models with ``_hvp_point`` only).
        self._point_z: np.ndarray | None = None
        self._point: Any = None
        self._flat = _use_flat_hvp(model)  # decided once (hvp_at runs once per trust-region product)
        # The layers the CG solves factor (reference/imaml_subspace.py): an MLP's large weight blocks.
        self._factored = (imaml_subspace.layers(model, np.shape(task.x_support)[0])
                          if isinstance(model, MLP) else ())
        self._sub_z: np.ndarray | None = None
        self._sub: imaml_subspace.Subspace | None = None

    def unflat(self, z):
        # unflatten() without its checks and size computations (called for every product).
        b = self._bounds
        return [z[b[i]:b[i + 1]].reshape(shape) for i, shape in enumerate(self.shapes)]

    def grad(self, z, theta=None):
        theta = self.theta if theta is None else theta
        _, g = self.model._loss_and_grad(self.unflat(z), self.task.x_support, self.task.y_support)
        return flatten(g) + self.lam * (z - theta)

    def hvp_s(self, z, v):
        """``H_s(z) v`` (support loss only, no proximal term)."""
        return self.hvp_at(z)(v)

    def hvp_at(self, z):
        """``v -> H_s(z) v`` with the forward pass at ``z`` computed once (or reused from the last point):
        for a CG solve, whose point does not change, no per-product comparison of ``z``."""
        model, x, y = self.model, self.task.x_support, self.task.y_support
        if not hasattr(model, "_hvp_point"):
            z = z.copy()
            return lambda v: flatten(model._hvp(self.unflat(z), x, y, self.unflat(v)))
        flat = self._flat
        if self._point_z is None or self._point_z.dtype != z.dtype or not np.array_equal(self._point_z, z):
            self._point_z = z.copy()
            point = model._hvp_flat_point if flat else model._hvp_point
            self._point = point(self.unflat(self._point_z), x, y)
        at = self._point
        if flat:  # a large MLP: the product written straight into one flat array
            return lambda v: model._hvp_flat(at, v)
        return lambda v: flatten(model._hvp_at(at, self.unflat(v)))

    def subspace_at(self, z) -> imaml_subspace.Subspace | None:
        """The coordinates of the Hessian's range at the real point ``z`` (None: no factored layer, or complex)."""
        if not self._factored or np.iscomplexobj(z) or np.iscomplexobj(self.lam) or np.iscomplexobj(self.theta):
            return None
        if self._sub_z is None or not np.array_equal(self._sub_z, z):
            self._sub_z = z.copy()
            point = self.model._hvp_point(self.unflat(self._sub_z), self.task.x_support, self.task.y_support)
            self._sub = imaml_subspace.Subspace(self.model, point, self._factored)
        return self._sub

    def solve(self, z, b, combine, **cg):
        """Conjugate gradient on ``v -> combine(H_s(z) v, v)`` (``alpha v + beta H_s v``) for ``b``: on the
        coordinates of :meth:`subspace_at` where it applies (the same iteration in exact arithmetic), else on
        the flat vectors. Returns ``(x, CGInfo)``."""
        sub = self.subspace_at(z)
        if sub is None:
            hvp = self.hvp_at(z)
            return conjugate_gradient(lambda v: combine(hvp(v), v), b, **cg)
        y, e = sub.project(b)
        x, info = conjugate_gradient(lambda v: combine(sub.hvp(v), v), y, **cg)
        return sub.expand(x, e), info

    def shifted_hvp(self, z, v, shift):
        """``H_s(z) v + shift * v`` (a fresh array; ``H_s v`` is updated in place, the same numbers)."""
        hv = self.hvp_s(z, v)
        return _axpy_into(hv, shift, v)


# MLP._hvp_flat pays where a weight block reaches 2^14 entries (128 KiB in float64, glibc's default
# threshold for serving an allocation by mmap, i.e. fresh zeroed pages for every weight-sized temporary
# of the list-form product): measured single-threaded per product, 1-256-256-1 0.38-0.41 ms against
# 1.5 ms (and 0.3 vs 0.42 ms in a warmed-up loop); at 1-40-40-1 to 1-128-128-1 the two are within noise
# (the flat form's scipy GEMM calls cost a few microseconds more each).
FLAT_HVP_MIN_BLOCK = 2**14


def _use_flat_hvp(model: Any) -> bool:
    return hasattr(model, "_hvp_flat") and max((int(np.prod(s)) for s in model.shapes), default=0) >= FLAT_HVP_MIN_BLOCK


def _axpy_into(hv: np.ndarray, a: Any, v: np.ndarray) -> np.ndarray:
    """``hv + a * v``, in ``hv``'s array for long vectors when the dtypes allow (``hv`` is a fresh product)."""
    if hv.size < IN_PLACE_MIN_SIZE or hv.dtype != np.result_type(hv, a, v):
        return hv + a * v
    av = np.multiply(a, v)
    return np.add(hv, av, out=hv)


def _newton_solve(prob: _Problem, z, rhs, solver, cg_tol, cg_maxiter, what):
    """Solve ``(H_s(z) + lam I) dz = rhs`` (the inner Newton system)."""
    if solver == "direct":
        H = prob.model.hessian(prob.unflat(z), prob.task.x_support, prob.task.y_support)
        factor = SPDFactor(H + prob.lam * np.eye(H.shape[0]), what=what, hint=_SADDLE_HINT)
        return factor.solve(rhs)
    dz, _ = prob.solve(z, rhs, lambda hv, v: _axpy_into(hv, prob.lam, v), rtol=cg_tol, maxiter=cg_maxiter,
                       what=what, hint=_SADDLE_HINT)
    return dz


def _cg_maxiter(n: int) -> int:
    # Exact arithmetic needs n iterations; round-off delays CG on ill-conditioned systems.
    return 2 * n + 100


_SADDLE_HINT = (
    "the inner solution is not a strict local minimum of L_s + lam/2 ||phi - theta||^2; increase lam"
)


def _relu_kink(model: Any, phi: Params, x: np.ndarray,
               rel_tol: float = 1e-9) -> tuple[int, int, int, float, float] | None:
    """Where a relu network's hidden pre-activation sits at zero (a kink of the loss) at ``phi``.

    Returns ``(layer, unit, example, value, relative)`` of the pre-activation smallest relative to its
    layer's largest, when that ratio is below ``rel_tol`` (a minimiser driven onto the kink: the solver
    leaves it at round-off, ~1e-15), else None; None for smooth activations.
    """
    if getattr(model, "activation", None) != "relu" or not hasattr(model, "_split"):
        return None
    Ws, bs = model._split([np.asarray(p).real for p in phi])
    h = np.asarray(x, dtype=float)
    worst: tuple[int, int, int, float, float] | None = None
    for layer in range(model.n_layers - 1):
        z = h @ Ws[layer].T
        if bs[layer] is not None:
            z = z + bs[layer]
        top = float(np.max(np.abs(z), initial=0.0))
        if z.size:
            i, j = np.unravel_index(int(np.argmin(np.abs(z))), z.shape)
            # A layer whose pre-activations are all exactly zero sits wholly on the kink (ratio 0).
            rel = abs(float(z[i, j])) / top if top > 0 else 0.0
            if rel <= rel_tol and (worst is None or rel < worst[4]):
                worst = (layer + 1, int(j), int(i), float(z[i, j]), rel)
        h = np.maximum(z, 0.0)
    return worst


def inner_solve(
    model: Any, params: Params, task: Task, lam: Any, *, inner_tol: float = 1e-12, inner_maxiter: int = 1000,
    solver: str = "cg", cg_tol: float = 1e-12, where: str = "task",
) -> tuple[np.ndarray, float, float, int]:
    """Solve ``min_phi L_s(phi) + lam/2 ||phi - theta||^2`` to ``inner_tol`` (inputs already validated).

    Returns ``(phi_flat, residual, tolerance, iterations)``.

    Raises:
        ConvergenceError: the stationarity residual ``||grad L_s(phi) + lam (phi - theta)||``
            stays above ``inner_tol * max(1, ||grad L_s(theta)||)``.
    """
    prob = _Problem(model, params, task, lam, where)
    n = prob.theta.size
    # The Newton systems here get their own CG budget (cg_maxiter is the meta-gradient solve's).
    newton_maxiter = _cg_maxiter(n)
    theta_r = prob.theta.real.copy()
    lam_r = float(np.real(lam))
    real_prob = _Problem(model, [p.real for p in params], task, lam_r, where)
    g0 = real_prob.grad(theta_r)
    tol = inner_tol * max(1.0, float(np.linalg.norm(g0)))

    def fun(z):
        loss, g = model._loss_and_grad(real_prob.unflat(z), task.x_support, task.y_support)
        d = z - theta_r
        return float(loss) + 0.5 * lam_r * float(d @ d), flatten(g) + lam_r * d

    hessp = lambda z, v: real_prob.shifted_hvp(z, v, lam_r)  # noqa: E731

    def newton_polish(z, res):
        # Full Newton steps on the stationarity equation, kept while they lower the residual:
        # quadratic convergence from where the trust region leaves off, down to the round-off
        # floor of the gradient (past inner_tol: the meta-gradient's error is about
        # residual / (lam * lambda_min(I + H/lam)), so every digit here counts). A trust-region
        # method stalls before that floor, once round-off in F hides the predicted decrease.
        for k in range(_NEWTON_STEPS):
            try:
                # Inexact Newton: the step's CG only as tight as the round-off floor needs (_polish_rtol).
                step = _newton_solve(real_prob, z, -real_prob.grad(z), solver, _polish_rtol(z, res, lam_r, cg_tol),
                                     newton_maxiter,
                                     f"the inner Newton matrix H_s + lam I of {where}")
            except (SingularMatrixError, ConvergenceError):
                # Not (yet) in a convex neighbourhood of a minimum: no Newton step from here.
                # The residual test below turns this into the inner problem's ConvergenceError.
                return z, res, k + 1
            new_res = float(np.linalg.norm(real_prob.grad(z + step)))
            if not new_res < res:
                return z, res, k + 1
            z, res, progress = z + step, new_res, new_res / res
            if progress > 0.5 and res <= tol:
                return z, res, k + 1
        return z, res, _NEWTON_STEPS

    z, iterations, message = theta_r, 0, "not started"
    # Globalise with the trust region to a loose gradient (quadratic region), polish with Newton;
    # if that is not enough, run the trust region to the full tolerance and polish again.
    for gtol in (max(tol, 1e-8 * max(1.0, float(np.linalg.norm(g0)))), tol):
        # NumPy may warn inside scipy's GLTR subproblem in degenerate steps; the residual
        # check below decides convergence, so those warnings carry no information.
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            if real_prob._factored:  # real_prob is real: its subspace_at applies
                # Large weight blocks: Steihaug's trust region with its CG on the coordinates of the
                # Hessian's range (reference/imaml_subspace.py), not scipy's on the full vectors.
                z, nit, message = imaml_subspace.trust_region(fun, real_prob.subspace_at, lam_r, z, gtol=gtol,
                                                              maxiter=max(1, inner_maxiter - iterations))
            else:
                result = scipy.optimize.minimize(
                    fun, z, jac=True, hessp=hessp, method="trust-krylov",
                    options={"gtol": gtol, "maxiter": max(1, inner_maxiter - iterations)},
                )
                z, message, nit = result.x, result.message, result.nit
        iterations += int(nit)
        res = float(np.linalg.norm(real_prob.grad(z)))
        z, res, polish = newton_polish(z, res)
        iterations += polish
        if res <= tol or iterations >= inner_maxiter or not np.isfinite(res):
            break
    if not res <= tol:
        kink = _relu_kink(model, real_prob.unflat(z), task.x_support)
        if kink is not None:
            layer, unit, example, value, rel = kink
            error = ConvergenceError(
                f"iMAML inner problem of {where} has no stationary point to solve for: its minimiser lies on a kink "
                f"of relu (hidden layer {layer}, unit {unit} has pre-activation {value:.2e}, {rel:.1e} of the layer's "
                f"largest, at support example {example}), where the support loss is not differentiable; the "
                f"stationarity residual stays at {res:.3g} (tol {tol:.3g}). The implicit meta-gradient needs "
                "grad L_s = -lam (phi - theta) and the Hessian at phi*, which do not exist there: this is the "
                "problem, not conditioning (a larger lam does not make the kink go away unless it moves phi* off "
                "it). Use a smooth activation (softplus, tanh) or another problem (seed, data)")
            error.residual, error.tolerance, error.phi = res, tol, real_prob.unflat(z)
            raise error
        error = ConvergenceError(
            f"iMAML inner problem of {where} did not converge: stationarity residual "
            f"||grad L_s(phi) + lam (phi - theta)|| = {res:.3g} > inner_tol * max(1, ||grad L_s(theta)||) = {tol:.3g} "
            f"after {iterations} iterations (trust region: {message!r}). The implicit meta-gradient is only valid "
            "at a stationary point, so no answer is given; increase lam (a better-conditioned inner problem), "
            "raise inner_maxiter, or loosen inner_tol"
        )
        # What the solver reached, for callers (and tests) that want to examine the refusal.
        error.residual, error.tolerance, error.phi = res, tol, real_prob.unflat(z)
        raise error
    if np.iscomplexobj(prob.theta) or np.iscomplexobj(lam):
        z = _complex_continuation(prob, z, tol, inner_tol, solver, cg_tol, newton_maxiter)
        iterations += 1
    return z, res, tol, iterations


def _complex_continuation(prob: _Problem, z, tol, inner_tol, solver, cg_tol, cg_maxiter):
    """Newton's method on the complex stationarity equation from the real solution (complex step)."""
    z = z.astype(complex)
    F = prob.grad(z)
    imag_scale = float(np.linalg.norm(F.imag))
    for _ in range(_NEWTON_STEPS):
        if np.linalg.norm(F.real) <= tol and np.linalg.norm(F.imag) <= inner_tol * imag_scale:
            return z
        z = z + _newton_solve(prob, z, -F, solver, cg_tol, cg_maxiter,
                              f"the inner Newton matrix H_s + lam I of {prob.where}")
        F = prob.grad(z)
    if np.linalg.norm(F.real) <= tol and np.linalg.norm(F.imag) <= inner_tol * imag_scale:
        return z
    raise ConvergenceError(
        f"iMAML complex-step continuation of {prob.where} did not converge: stationarity residual real "
        f"{np.linalg.norm(F.real):.3g} (tol {tol:.3g}), imaginary {np.linalg.norm(F.imag):.3g} "
        f"(tol {inner_tol * imag_scale:.3g}); use finite differences instead"
    )


def _task(model, params, task, lam, where, *, solver, inner_tol, cg_tol, inner_maxiter, cg_maxiter, need_grad):
    z, res, tol, iterations = inner_solve(
        model, params, task, lam, inner_tol=inner_tol, inner_maxiter=inner_maxiter, solver=solver,
        cg_tol=cg_tol, where=where,
    )
    prob = _Problem(model, params, task, lam, where)
    phi = prob.unflat(z)
    loss_q, g_q = model._loss_and_grad(phi, task.x_query, task.y_query)
    if not need_grad:
        return loss_q, None
    b = flatten(g_q)
    n = b.size
    what = f"I + H_s(phi*)/lam of {where}"

    def combine(hv, v):
        # v + H v / lam, with the quotient and the sum formed in H v's fresh array (the same numbers).
        if hv.size < IN_PLACE_MIN_SIZE or hv.dtype != np.result_type(hv, v, lam):
            return v + hv / lam
        np.divide(hv, lam, out=hv)
        return np.add(v, hv, out=hv)

    if solver == "direct":
        hvp = prob.hvp_at(z)
        H = model.hessian(phi, task.x_support, task.y_support)
        factor = SPDFactor(np.eye(n) + H / lam, what=what, hint=_SADDLE_HINT)
        x = factor.solve(b)
        iters, cond = 0, factor.cond
        b_norm = np.linalg.norm(b)
        lin_res = float(np.linalg.norm(combine(hvp(x), x) - b) / b_norm) if b_norm > 0 else 0.0
    else:
        x, info = prob.solve(z, b, combine, rtol=cg_tol, maxiter=cg_maxiter or _cg_maxiter(n), what=what,
                             hint=_SADDLE_HINT)
        iters, cond, lin_res = info.iterations, info.cond_estimate, info.residual
    g = prob.unflat(x)
    info = TaskInfo(phi, g, as_scalar(loss_q), res, tol, iterations, solver, iters, lin_res, cond)
    return loss_q, info


def meta_loss(
    model: Any, params: Sequence[Any], tasks: Sequence[Task], lam: float, *, inner_tol: float = 1e-12,
    inner_maxiter: int = 1000, solver: str = "cg", cg_tol: float = 1e-12, cg_maxiter: int | None = None,
) -> float:
    """The iMAML meta-loss alone: mean over tasks of ``L_q(phi*(theta))`` (for finite differences).

    ``solver`` only matters for Newton polishing and the complex-step continuation.
    """
    params, tasks, lam = _check(model, params, tasks, lam, solver, inner_tol, cg_tol, inner_maxiter, cg_maxiter)

    def per_task(i: int) -> Any:
        return _task(model, params, tasks[i], lam, f"tasks[{i}]", solver=solver, inner_tol=inner_tol,
                     cg_tol=cg_tol, inner_maxiter=inner_maxiter, cg_maxiter=cg_maxiter, need_grad=False)[0]

    total = 0.0
    for loss in map_tasks(per_task, range(len(tasks)), work=_work(model, tasks)):
        total = total + loss
    return as_scalar(total / len(tasks))


# An iMAML task is hundreds of Hessian-vector products chained by trust-region and CG loops, much of its
# time in Python holding the GIL: two tasks on two threads take turns more than they overlap. Measured at
# 1-256-256-1 (10 rows x 66,561 parameters, 2 tasks; ``python benchmarks/pool_ab.py imaml 1-256-256-1 9``):
# pooled 1.33x the sequential time on a quiet 2-core machine, 2.6x at load 5 (scipy's gemm wrapper holding
# the GIL, issue 18 third pass); 0.79x with GIL-free flat products (2-vCPU EPYC, issue 18 ninth pass); 0.91x with the
# products on coordinates (reference/imaml_subspace.py: small products, mostly Python), which the pool's
# own starvation test (CPU 1.26 cores' worth) would refuse anyway. So tasks run sequentially unless one
# product is large enough (>= 1e7 rows x parameters, ~1 ms of BLAS) for the GIL-free part to dominate.
POOL_MIN_WORK = 1e7


def _work(model: Any, tasks: Sequence[Task]) -> float:
    """Size of one Hessian-vector product (rows x parameters), 0 (sequential) below :data:`POOL_MIN_WORK`."""
    work = float(getattr(model, "n_params", 0)) * max(np.shape(t.x_support)[0] for t in tasks)
    return work if work >= POOL_MIN_WORK else 0.0


def meta_loss_and_grad_info(
    model: Any, params: Sequence[Any], tasks: Sequence[Task], lam: float, *, solver: str = "cg",
    inner_tol: float = 1e-12, cg_tol: float = 1e-12, inner_maxiter: int = 1000, cg_maxiter: int | None = None,
) -> Result:
    """:func:`meta_loss_and_grad` plus the per-task diagnostics (:class:`TaskInfo`)."""
    params, tasks, lam = _check(model, params, tasks, lam, solver, inner_tol, cg_tol, inner_maxiter, cg_maxiter)

    def per_task(i: int) -> tuple[Any, TaskInfo]:
        return _task(model, params, tasks[i], lam, f"tasks[{i}]", solver=solver, inner_tol=inner_tol,
                     cg_tol=cg_tol, inner_maxiter=inner_maxiter, cg_maxiter=cg_maxiter, need_grad=True)

    total, grad, infos = 0.0, None, []
    # Tasks in parallel, one BLAS thread each (reference/_threads.py); reduced in task order.
    for loss_q, info in map_tasks(per_task, range(len(tasks)), work=_work(model, tasks)):
        total = total + loss_q
        grad = list(info.grad) if grad is None else [a + b for a, b in zip(grad, info.grad)]
        infos.append(info)
    m = len(tasks)
    return Result(as_scalar(total / m), [g / m for g in grad], infos)


def meta_loss_and_grad(
    model: Any, params: Sequence[Any], tasks: Sequence[Task], lam: float, *, solver: str = "cg",
    inner_tol: float = 1e-12, cg_tol: float = 1e-12, inner_maxiter: int = 1000, cg_maxiter: int | None = None,
) -> tuple[float, Params]:
    """iMAML meta-loss and implicit meta-gradient (Rajeswaran et al. 2019).

    ``meta_loss = mean_tasks L_q(phi*)``, ``grad = mean_tasks (I + H_s(phi*)/lam)^{-1} grad L_q(phi*)``
    with ``phi* = argmin_phi L_s(phi) + lam/2 ||phi - theta||^2`` (module docstring).

    Args:
        model: an ``MLP`` or any model with its interface (e.g. ``Quadratic``).
        params: ``theta``, the meta-parameters.
        tasks: list of :class:`reference.tasks.Task`.
        lam: proximal weight ``> 0``.
        solver: ``"cg"`` (matrix-free, ``O(params)`` memory) or ``"direct"``
            (dense Hessian, ``O(params^2)`` memory, limited to
            ``reference.models.MAX_DENSE_HESSIAN`` parameters for an MLP).
        inner_tol: relative stationarity tolerance of the inner problem:
            ``||grad L_s(phi) + lam (phi - theta)|| <= inner_tol * max(1, ||grad L_s(theta)||)``.
        cg_tol: relative residual tolerance of the CG solves.
        inner_maxiter: trust-region iterations allowed.
        cg_maxiter: CG iterations allowed (default ``2 n + 100``).

    Returns:
        ``(meta_loss, grads)``; :func:`meta_loss_and_grad_info` also returns the diagnostics.

    Raises:
        ConvergenceError: the inner problem (or CG) did not reach its tolerance.
        SingularMatrixError: ``I + H_s(phi*)/lam`` is not positive definite or is
            singular in floating point.
        InvalidInputError: bad arguments.
    """
    result = meta_loss_and_grad_info(model, params, tasks, lam, solver=solver, inner_tol=inner_tol, cg_tol=cg_tol,
                                     inner_maxiter=inner_maxiter, cg_maxiter=cg_maxiter)
    return result.loss, result.grad


__all__ = ["Result", "SOLVERS", "TaskInfo", "check_arguments", "inner_solve", "meta_loss", "meta_loss_and_grad",
           "meta_loss_and_grad_info"]
