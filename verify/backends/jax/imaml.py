"""iMAML in JAX: implicit meta-gradients.

Rajeswaran, Finn, Kakade & Levine (2019), "Meta-Learning with Implicit Gradients", NeurIPS.

Per task:

* inner problem ``phi* = argmin_phi L_s(phi) + (lam/2) ||phi - theta||^2``, solved
  with ``scipy.optimize.minimize(method="trust-krylov")`` whose objective,
  gradient (``jax.value_and_grad``) and Hessian-vector products
  (``jax.jvp`` of ``jax.grad``, forward-over-reverse) are JAX functions
  evaluated in ``dtype``, then polished by Newton steps whose systems are
  solved by ``jax.scipy.sparse.linalg.cg`` on the same HVPs; the stationarity
  residual ``||grad L_s(phi) + lam (phi - theta)||`` must reach
  ``tol = max(inner_tol, floor) * max(1, ||grad L_s(theta)||)``, else
  :class:`~reference.errors.ConvergenceError` (the implicit formula is wrong
  away from a stationary point). ``floor = 64 sqrt(n) eps`` is what a
  gradient evaluated in ``dtype`` can resolve (it only matters in float32);
* meta-gradient ``(I + H_s(phi*)/lam)^{-1} grad L_q(phi*)``: ``solver="cg"``
  runs ``jax.scipy.sparse.linalg.cg`` on the matrix-free operator
  ``v -> v + H_s v / lam`` (JAX HVPs); ``solver="direct"`` builds
  ``H_s = jax.hessian`` and calls ``jnp.linalg.solve``. The true relative
  residual of the solve must reach ``max(cg_tol, floor)``.

Mirrors ``reference.imaml`` (same arguments, same errors, the same
:class:`reference.imaml.Result`/:class:`~reference.imaml.TaskInfo` from
:func:`meta_loss_and_grad_info`). With ``dtype="float32"`` every JAX
evaluation is float32; SciPy's trust-region bookkeeping works on float64
copies of the float32 iterates (it only proposes steps; stationarity is
judged on the float32 gradient). ``jit=True`` jits the JAX functions the
inner solver and the implicit solve call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from reference import imaml as reference_imaml
from reference.formatting import short
from reference.errors import ConvergenceError, InvalidInputError, SingularMatrixError
from reference.imaml import Result, TaskInfo
from verify.backends.jax._linalg import MAX_COND
from verify.backends.jax._model import (
    _loss_from_key,
    cached,
    check_dtype,
    check_jit,
    maybe_jit,
    spec_key,
    to_jax_params,
    to_jax_tasks,
)
from verify.tolerance import TF32_EPS

SOLVERS = reference_imaml.SOLVERS
# Newton polishing steps after the trust-region solve (as reference.imaml).
_NEWTON_STEPS = 8
_SADDLE_HINT = "the inner solution is not a strict local minimum of L_s + lam/2 ||phi - theta||^2; increase lam"


def _shapes(key: tuple) -> list[tuple[int, ...]]:
    sizes, _, _, bias = key
    shapes: list[tuple[int, ...]] = []
    for d_in, d_out in zip(sizes[:-1], sizes[1:]):
        shapes.append((d_out, d_in))
        if bias:
            shapes.append((d_out,))
    return shapes


def _working_eps(dtype: str) -> float:
    """``dtype``'s eps, or TF32's (2**-10) for float32 under ``jax.default_matmul_precision("tensorfloat32")``
    on a GPU, where every matrix product (so every gradient and HVP) is resolved only to TF32."""
    eps = float(np.finfo(dtype).eps)
    precision = str(jax.config.jax_default_matmul_precision or "").lower()
    device = jax.config.jax_default_device
    platform = device.platform if device is not None and not isinstance(device, str) else jax.default_backend()
    if np.dtype(dtype) == np.float32 and precision in ("tensorfloat32", "high", "bfloat16_3x") and platform == "gpu":
        return TF32_EPS
    return eps


def _floor(n: int, dtype: str) -> float:
    """Smallest relative residual a gradient/HVP evaluated in ``dtype`` resolves: ``64 sqrt(n) eps``."""
    return 64.0 * float(np.sqrt(n)) * _working_eps(dtype)


@cached
def _build(key: tuple, jit: bool):
    """Flat-vector JAX functions of one task (compiled once per model spec)."""
    loss = _loss_from_key(key)
    shapes = _shapes(key)
    sizes = [int(np.prod(s)) for s in shapes]
    offsets = np.cumsum([0] + sizes)

    def unflatten(z: jax.Array) -> list[jax.Array]:
        return [z[a:b].reshape(s) for a, b, s in zip(offsets[:-1], offsets[1:], shapes)]

    def flat_loss(z: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
        return loss(unflatten(z), x, y)

    flat_grad = jax.grad(flat_loss)

    def inner_objective(z, theta, x, y, lam):
        d = z - theta
        return flat_loss(z, x, y) + 0.5 * lam * jnp.vdot(d, d)

    def hvp_s(z, v, x, y):
        # Forward-over-reverse: the JVP of the gradient, H_s(z) v.
        return jax.jvp(lambda q: flat_grad(q, x, y), (z,), (v,))[1]

    def cg_solve(z, b, x, y, shift, scale, tol, maxiter):
        """Solve ``(shift I + scale H_s(z)) u = b`` by JAX's CG; also the true relative residual."""
        def matvec(v):
            return shift * v + scale * hvp_s(z, v, x, y)

        u, _ = jax.scipy.sparse.linalg.cg(matvec, b, tol=tol, atol=0.0, maxiter=maxiter)
        b_norm = jnp.linalg.norm(b)
        res = jnp.where(b_norm > 0, jnp.linalg.norm(matvec(u) - b) / jnp.where(b_norm > 0, b_norm, 1), 0)
        return u, res

    def direct_solve(z, b, x, y, shift, scale):
        """Solve ``(shift I + scale H_s(z)) u = b`` densely; also the residual and the eigenvalue extremes."""
        a = shift * jnp.eye(z.size, dtype=z.dtype) + scale * jax.hessian(flat_loss)(z, x, y)
        u = jnp.linalg.solve(a, b)
        eig = jnp.linalg.eigvalsh(a)
        b_norm = jnp.linalg.norm(b)
        res = jnp.where(b_norm > 0, jnp.linalg.norm(a @ u - b) / jnp.where(b_norm > 0, b_norm, 1), 0)
        return u, res, jnp.stack([eig[0], eig[-1]])

    return {
        "unflatten": unflatten,
        "value_and_grad": maybe_jit(jax.value_and_grad(inner_objective), jit),
        "hvp_s": maybe_jit(hvp_s, jit),
        "query": maybe_jit(jax.value_and_grad(flat_loss), jit),
        "query_loss": maybe_jit(flat_loss, jit),
        "cg": maybe_jit(cg_solve, jit, static_argnames=("tol", "maxiter")),
        "direct": maybe_jit(direct_solve, jit),
    }


def _check(model, params, tasks, lam, solver, inner_tol, cg_tol, inner_maxiter, cg_maxiter, dtype, jit):
    key = spec_key(model)
    check_dtype(dtype)
    check_jit(jit)
    # The reference's check of every argument, then JAX's own limits: real arithmetic.
    params, tasks, lam, inner_maxiter, cg_maxiter = reference_imaml.check_arguments(
        model, params, tasks, lam, solver, inner_tol, cg_tol, inner_maxiter, cg_maxiter)
    if any(np.iscomplexobj(p) for p in params):
        raise InvalidInputError("params are complex; the JAX backend computes in real float32/float64 only")
    if isinstance(lam, complex):
        raise InvalidInputError(f"lam={short(lam)} must be real for the JAX backend")
    return key, params, tasks, float(lam), inner_maxiter, cg_maxiter


class _Task:
    """One task's inner problem and implicit solve, in ``dtype``."""

    def __init__(self, fns, theta, task, lam, dtype, where, solver, cg_tol, cg_maxiter):
        self.fns, self.dtype, self.where, self.solver = fns, dtype, where, solver
        self.jdt = check_dtype(dtype)
        self.theta = theta
        self.x, self.y = task.x_support, task.y_support
        self.xq, self.yq = task.x_query, task.y_query
        self.lam = jnp.asarray(lam, dtype=self.jdt)
        self.n = int(theta.size)
        self.floor = _floor(self.n, dtype)
        # Accept a solve whose true relative residual reaches cg_tol (floored for the dtype), but let CG
        # iterate towards cg_tol itself (capped below at eps): stopping at the floor would leave
        # avoidable error in float32 (the floor is a bound on what is attainable, not a target).
        self.cg_tol = max(cg_tol, self.floor)
        self.cg_stop = max(cg_tol, _working_eps(dtype))
        self.cg_maxiter = cg_maxiter or 2 * self.n + 100
        self.one = jnp.asarray(1.0, dtype=self.jdt)

    def grad_f(self, z):
        # The gradient half of the objective's value_and_grad (one compiled function serves both).
        return self.fns["value_and_grad"](z, self.theta, self.x, self.y, self.lam)[1]

    def solve(self, z, b, shift, scale, what):
        """``(shift I + scale H_s(z))^{-1} b`` with the chosen solver; returns ``(u, residual, cond)``."""
        if self.solver == "direct":
            u, res, ext = self.fns["direct"](z, b, self.x, self.y, shift, scale)
            small, large = (float(e) for e in np.asarray(ext, dtype=np.float64))
            if not small > 0:
                raise SingularMatrixError(
                    f"{what} is not positive definite in floating point (smallest eigenvalue {small:.3g}); "
                    f"{_SADDLE_HINT}"
                )
            cond = large / small
            if not cond <= MAX_COND[self.dtype]:
                raise SingularMatrixError(
                    f"{what} is singular in floating point: cond = {cond:.3g} > {MAX_COND[self.dtype]:.3g} for "
                    f"{self.dtype}; {_SADDLE_HINT}"
                )
        else:
            u, res = self.fns["cg"](z, b, self.x, self.y, shift, scale, tol=self.cg_stop, maxiter=self.cg_maxiter)
            cond = float("nan")  # JAX's CG does not expose its Lanczos coefficients
        res = float(res)
        if not res <= self.cg_tol:
            raise ConvergenceError(
                f"{self.solver} solve of {what} did not converge: relative residual {res:.3g} > "
                f"{self.cg_tol:.3g} (cg_tol, floored at 64 sqrt(n) eps for {self.dtype}); {_SADDLE_HINT}"
            )
        return u, res, cond

    def inner_solve(self, inner_tol: float, inner_maxiter: int):
        """Trust-region Newton on the inner objective, then Newton polishing; returns ``(phi, residual, tol, its)``."""
        fns, jdt = self.fns, self.jdt
        args = (self.theta, self.x, self.y, self.lam)
        g0 = self.grad_f(self.theta)
        tol = max(inner_tol, self.floor) * max(1.0, float(jnp.linalg.norm(g0)))

        def fun(z64):
            value, grad = fns["value_and_grad"](jnp.asarray(z64, dtype=jdt), *args)
            # np.array copies: a view of a JAX buffer is read-only, and SciPy's trust-region code writes in place.
            return float(value), np.array(grad, dtype=np.float64)

        def hessp(z64, v64):
            z, v = jnp.asarray(z64, dtype=jdt), jnp.asarray(v64, dtype=jdt)
            return np.array(fns["hvp_s"](z, v, self.x, self.y) + self.lam * v, dtype=np.float64)

        def newton_polish(z, res):
            # Full Newton steps while they lower the residual, down to the gradient's round-off floor
            # (as reference.imaml: the meta-gradient error is about residual / lam, so digits count).
            for k in range(_NEWTON_STEPS):
                try:
                    step, _, _ = self.solve(z, -self.grad_f(z), self.lam, self.one,
                                            f"the inner Newton matrix H_s + lam I of {self.where}")
                except (SingularMatrixError, ConvergenceError):
                    return z, res, k + 1  # not in a convex neighbourhood yet; the residual test decides
                new_res = float(jnp.linalg.norm(self.grad_f(z + step)))
                if not new_res < res:
                    return z, res, k + 1
                z, res, progress = z + step, new_res, new_res / res
                if progress > 0.5 and res <= tol:
                    return z, res, k + 1
            return z, res, _NEWTON_STEPS

        z64, iterations, message = np.array(self.theta, dtype=np.float64), 0, "not started"
        z, res = self.theta, float("inf")
        scale = max(1.0, float(jnp.linalg.norm(g0)))
        # Trust region to a loose gradient (the quadratic region), Newton polish; if not enough, the
        # trust region to the full tolerance and polish again (reference.imaml's schedule).
        for gtol in (max(tol, 1e-8 * scale), tol):
            # NumPy may warn inside SciPy's GLTR subproblem on degenerate steps; the residual test
            # below decides convergence, so those warnings carry no information.
            with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
                result = scipy.optimize.minimize(fun, z64, jac=True, hessp=hessp, method="trust-krylov",
                                                 options={"gtol": gtol, "maxiter": max(1, inner_maxiter - iterations)})
            message = result.message
            iterations += int(result.nit)
            z = jnp.asarray(result.x, dtype=jdt)
            res = float(jnp.linalg.norm(self.grad_f(z)))
            z, res, polish = newton_polish(z, res)
            iterations += polish
            z64 = np.array(z, dtype=np.float64)
            if res <= tol or iterations >= inner_maxiter or not np.isfinite(res):
                break
        if not res <= tol:
            raise ConvergenceError(
                f"iMAML inner problem of {self.where} did not converge: stationarity residual "
                f"||grad L_s(phi) + lam (phi - theta)|| = {res:.3g} > tol = {tol:.3g} after {iterations} iterations "
                f"(scipy: {message!r}, {self.dtype}). The implicit meta-gradient is only valid at a stationary "
                "point, so no answer is given; increase lam, raise inner_maxiter, or loosen inner_tol"
            )
        return z, res, tol, iterations


def _run(model, params, tasks, lam, *, solver, inner_tol, cg_tol, inner_maxiter, cg_maxiter, dtype, jit, need_grad):
    key, params, tasks, lam, inner_maxiter, cg_maxiter = _check(model, params, tasks, lam, solver, inner_tol,
                                                                cg_tol, inner_maxiter, cg_maxiter, dtype, jit)
    fns = _build(key, jit)
    theta = jnp.concatenate([p.ravel() for p in to_jax_params(params, dtype)])
    total, grad, infos = 0.0, None, []
    for i, task in enumerate(to_jax_tasks(tasks, dtype)):
        where = f"tasks[{i}]"
        t = _Task(fns, theta, task, lam, dtype, where, solver, cg_tol, cg_maxiter)
        z, res, tol, iterations = t.inner_solve(inner_tol, inner_maxiter)
        if not need_grad:
            total += float(fns["query_loss"](z, t.xq, t.yq))
            continue
        loss_q, b = fns["query"](z, t.xq, t.yq)
        # (I + H_s/lam) g = grad L_q(phi*)
        g, lin_res, cond = t.solve(z, b, t.one, 1 / t.lam, f"I + H_s(phi*)/lam of {where}")
        g64 = [np.asarray(a, dtype=np.float64) for a in fns["unflatten"](g)]
        phi64 = [np.asarray(a, dtype=np.float64) for a in fns["unflatten"](z)]
        total += float(loss_q)
        grad = g64 if grad is None else [a + b for a, b in zip(grad, g64)]
        infos.append(TaskInfo(phi64, g64, float(loss_q), res, tol, iterations, solver, -1 if solver == "cg" else 0,
                              lin_res, cond))
    m = len(tasks)
    if not need_grad:
        return total / m
    return Result(total / m, [g / m for g in grad], infos)


def meta_loss(model: Any, params: Sequence[Any], tasks: Sequence[Any], lam: float, *, inner_tol: float = 1e-12,
              inner_maxiter: int = 1000, solver: str = "cg", cg_tol: float = 1e-12, cg_maxiter: int | None = None,
              dtype: str = "float64", jit: bool = False) -> float:
    """The iMAML meta-loss alone: mean over tasks of ``L_q(phi*(theta))``, in JAX."""
    return _run(model, params, tasks, lam, solver=solver, inner_tol=inner_tol, cg_tol=cg_tol,
                inner_maxiter=inner_maxiter, cg_maxiter=cg_maxiter, dtype=dtype, jit=jit, need_grad=False)


def meta_loss_and_grad_info(model: Any, params: Sequence[Any], tasks: Sequence[Any], lam: float, *,
                            solver: str = "cg", inner_tol: float = 1e-12, cg_tol: float = 1e-12,
                            inner_maxiter: int = 1000, cg_maxiter: int | None = None, dtype: str = "float64",
                            jit: bool = False) -> Result:
    """:func:`meta_loss_and_grad` plus per-task diagnostics (``reference.imaml.TaskInfo``).

    ``linear_iterations`` is ``-1`` for ``solver="cg"`` (JAX's CG does not
    report it) and ``cond_estimate`` is NaN there; for ``"direct"`` it is the
    exact 2-norm condition number of ``I + H_s/lam`` (from ``eigvalsh``).
    """
    return _run(model, params, tasks, lam, solver=solver, inner_tol=inner_tol, cg_tol=cg_tol,
                inner_maxiter=inner_maxiter, cg_maxiter=cg_maxiter, dtype=dtype, jit=jit, need_grad=True)


def meta_loss_and_grad(model: Any, params: Sequence[Any], tasks: Sequence[Any], lam: float, *, solver: str = "cg",
                       inner_tol: float = 1e-12, cg_tol: float = 1e-12, inner_maxiter: int = 1000,
                       cg_maxiter: int | None = None, dtype: str = "float64",
                       jit: bool = False) -> tuple[float, list[Any]]:
    """iMAML meta-loss and implicit meta-gradient ``mean_tasks (I + H_s(phi*)/lam)^{-1} grad L_q(phi*)`` in JAX.

    Args:
        model: a ``reference.models.MLP`` spec.
        params: ``theta``; tasks: list of ``reference.tasks.Task``; lam: proximal weight ``> 0``.
        solver: ``"cg"`` (``jax.scipy.sparse.linalg.cg`` on JAX HVPs) or ``"direct"`` (``jax.hessian`` + solve).
        inner_tol, cg_tol: relative tolerances (floored at ``64 sqrt(n) eps`` of ``dtype``).
        inner_maxiter, cg_maxiter: iteration limits (``cg_maxiter`` default ``2 n + 100``).
        dtype: ``"float64"`` or ``"float32"``; jit: ``jax.jit`` the JAX functions.

    Raises:
        ConvergenceError: the inner problem or the linear solve did not reach its tolerance.
        SingularMatrixError: (``direct``) ``I + H_s/lam`` is not SPD or is ill-conditioned.
    """
    result = meta_loss_and_grad_info(model, params, tasks, lam, solver=solver, inner_tol=inner_tol, cg_tol=cg_tol,
                                     inner_maxiter=inner_maxiter, cg_maxiter=cg_maxiter, dtype=dtype, jit=jit)
    return result.loss, result.grad


__all__ = ["SOLVERS", "meta_loss", "meta_loss_and_grad", "meta_loss_and_grad_info"]
