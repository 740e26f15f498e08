"""iMAML in PyTorch: implicit meta-gradients by conjugate gradient on autograd HVPs.

Rajeswaran, Finn, Kakade & Levine (2019), "Meta-Learning with Implicit
Gradients", NeurIPS. For one task:

* inner problem ``phi* = argmin_phi L_s(phi) + (lam/2) ||phi - theta||^2``,
  solved here by a line-search Newton-CG method whose Hessian-vector products
  are double backward (``torch.autograd.grad`` of a ``create_graph=True``
  gradient), to the reference's stationarity tolerance;
* meta-gradient ``(I + H_s(phi*)/lam)^{-1} grad L_q(phi*)`` by conjugate
  gradient on the same double-backward HVPs (``solver="cg"``, the authors'
  ``cg_solve``) or a dense ``torch.autograd.functional.hessian`` and
  ``torch.linalg.solve`` (``solver="direct"``).

The implicit formula is exact only at a stationary point, so an inner problem
that does not reach its tolerance raises :class:`~reference.errors.ConvergenceError`
(as the reference does) instead of answering. In float32 the tolerances
cannot go below the dtype's round-off floor (``TOL_FLOOR``, ``CG_TOL_FLOOR``): a
float32 gradient of an O(1) loss is only accurate to ~eps32 relative. A stationarity residual
``r`` acts like a perturbation ``r / lam`` of ``theta``; with ``r`` at the float32 floor that is
usually far more than rounding ``theta`` to float32, so float32 iMAML meta-gradients are less
accurate than float32 MAML ones (by ``16 max(1, ||grad L_s(theta)||) / (lam ||theta||)``).
Mirrors ``reference.imaml``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from reference import imaml as reference_imaml
from reference.formatting import short
from reference.errors import ConvergenceError, InvalidInputError, SingularMatrixError
from reference.tasks import Task
from verify.backends.torch import _features
from verify.backends.torch._model import FunctionalMLP, TorchTask, resolve_device, resolve_dtype, scalar, tf32
from verify.backends.torch._model import to_numpy, to_torch_tasks, working_eps

__all__ = ["CG_ACCEPT", "CG_TOL_FLOOR", "Result", "SOLVERS", "TOL_FLOOR", "TaskInfo", "meta_loss", "meta_loss_and_grad",
           "meta_loss_and_grad_info"]

SOLVERS = reference_imaml.SOLVERS
_EPS32 = float(torch.finfo(torch.float32).eps)
# Smallest relative tolerances a solve in this dtype can meet. float64: none below the caller's
# (the 1e-12 defaults are reachable). float32: Newton-CG stalls at a stationarity residual of
# 0.1-2 eps32 * max(1, ||grad L_s(theta)||) (measured on small MLPs), so the inner floor is 16 eps32.
# CG in float32 reaches a true relative residual of 2-4 eps32 even at cond ~1e3 (measured), so it
# aims at CG_TOL_FLOOR = 4 eps32 and, if it stagnates above that, accepts up to CG_ACCEPT = 64 eps32
# (the round-off of a float32 HVP is a few eps32 times the norms involved) before raising.
TOL_FLOOR: dict[torch.dtype, float] = {torch.float64: 0.0, torch.float32: 16 * _EPS32}
CG_TOL_FLOOR: dict[torch.dtype, float] = {torch.float64: 0.0, torch.float32: 4 * _EPS32}
CG_ACCEPT: dict[torch.dtype, float] = {torch.float64: 0.0, torch.float32: 64 * _EPS32}

# Newton steps taken after the inner tolerance is met (towards the round-off floor).
_POLISH = 2

_SADDLE_HINT = "the inner solution is not a strict local minimum of L_s + lam/2 ||phi - theta||^2; increase lam"


@dataclass(frozen=True)
class TaskInfo:
    """Diagnostics of one task (same fields as ``reference.imaml.TaskInfo``)."""

    phi: list[np.ndarray]
    grad: list[np.ndarray]
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
    loss: float
    grad: list[np.ndarray]
    tasks: list[TaskInfo]


@dataclass(frozen=True)
class _CG:
    x: torch.Tensor
    iterations: int
    residual: float
    cond_estimate: float


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, *, rtol: float, maxiter: int,
                       what: str, accept_rtol: float | None = None) -> _CG:
    """Hestenes-Stiefel CG for an SPD operator; convergence judged on the true residual.

    CG aims at ``rtol``; when the true residual stops decreasing between
    restarts (round-off floor) or ``maxiter`` is spent, a residual up to
    ``accept_rtol`` (default ``rtol``) is accepted.

    Returns the solution, the iterations, the true relative residual and the
    Lanczos estimate of ``cond(A)`` from the CG coefficients.

    Raises:
        SingularMatrixError: a direction with ``p^T A p <= 0`` (not positive definite).
        ConvergenceError: stagnation or ``maxiter`` iterations above ``accept_rtol``.
    """
    accept_rtol = rtol if accept_rtol is None else max(rtol, accept_rtol)
    prev_res = math.inf
    b_norm = float(torch.linalg.vector_norm(b))
    x = torch.zeros_like(b)
    if b_norm == 0.0:
        return _CG(x, 0, 0.0, 1.0)
    r, it, restarts = b.clone(), 0, 0
    diag: list[float] = []
    off: list[float] = []
    while True:
        p, rr = r.clone(), torch.dot(r, r)
        alpha_prev = beta_prev = None
        while it < maxiter:
            Ap = matvec(p)
            pAp = torch.dot(p, Ap)
            if not float(pAp) > 0:
                raise SingularMatrixError(
                    f"{what} is not positive definite: conjugate gradient found p^T A p = {float(pAp):.3g} <= 0 "
                    f"at iteration {it}; {_SADDLE_HINT}"
                )
            alpha = rr / pAp
            x = x + alpha * p
            r = r - alpha * Ap
            it += 1
            if restarts == 0:  # Lanczos tridiagonal from the CG coefficients (Golub & Van Loan 11.3.5)
                d = 1.0 / float(alpha)
                if alpha_prev is not None:
                    d += float(beta_prev) / float(alpha_prev)
                    off.append(math.sqrt(max(float(beta_prev), 0.0)) / float(alpha_prev))
                diag.append(d)
            if float(torch.linalg.vector_norm(r)) <= rtol * b_norm:
                break
            rr_new = torch.dot(r, r)
            beta = rr_new / rr
            p, rr = r + beta * p, rr_new
            alpha_prev, beta_prev = alpha, beta
        r = b - matvec(x)  # the recursive residual drifts; judge (and restart) on the true one
        res = float(torch.linalg.vector_norm(r)) / b_norm
        if res <= rtol:
            break
        if it >= maxiter or not res < prev_res:
            if res <= accept_rtol:
                break
            why = f"after {it} iterations (maxiter={maxiter})" if it >= maxiter else f"stagnated after {it} iterations"
            raise ConvergenceError(
                f"conjugate gradient on {what} did not converge: relative residual {res:.3g} > "
                f"{accept_rtol:.3g} {why}"
            )
        prev_res = res
        restarts += 1
    if len(diag) <= 1:
        cond = 1.0
    else:
        T = np.diag(diag) + np.diag(off[: len(diag) - 1], 1) + np.diag(off[: len(diag) - 1], -1)
        ritz = np.linalg.eigvalsh(T)
        cond = float(ritz[-1] / ritz[0]) if ritz[0] > 0 else float("inf")
    return _CG(x, it, res, cond)


def _truncated_cg(hvp: Callable[[torch.Tensor], torch.Tensor], g: torch.Tensor, rtol: float,
                  maxiter: int) -> torch.Tensor:
    """Approximate Newton direction ``-H^{-1} g`` by CG, stopped at negative curvature (Steihaug)."""
    x, r = torch.zeros_like(g), -g
    p, rr = r.clone(), torch.dot(r, r)
    g_norm = float(torch.linalg.vector_norm(g))
    for _ in range(maxiter):
        Hp = hvp(p)
        pHp = torch.dot(p, Hp)
        if not float(pHp) > 0:
            return -g if not bool(x.any()) else x
        alpha = rr / pHp
        x, r = x + alpha * p, r - alpha * Hp
        rr_new = torch.dot(r, r)
        if math.sqrt(float(rr_new)) <= rtol * g_norm:
            break
        p, rr = r + (rr_new / rr) * p, rr_new
    return x


class _Problem:
    """One task's inner objective ``F(phi) = L_s(phi) + lam/2 ||phi - theta||^2`` on flat vectors."""

    def __init__(self, fm: FunctionalMLP, theta: torch.Tensor, task: TorchTask, lam: float):
        self.fm, self.theta, self.task, self.lam = fm, theta, task, lam

    def support_loss(self, z: torch.Tensor) -> torch.Tensor:
        return self.fm.flat_loss(z, self.task.x_support, self.task.y_support)

    def value(self, z: torch.Tensor) -> float:
        with torch.no_grad():
            d = z - self.theta
            return scalar(self.support_loss(z) + 0.5 * self.lam * torch.dot(d, d))

    def grad_graph(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(leaf z, grad L_s(z))`` with ``create_graph=True`` so HVPs are one more backward."""
        z = z.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(self.support_loss(z), z, create_graph=True)
        return z, g


def _inner_solve(prob: _Problem, tol: float, scale: float, maxiter: int, cg_maxiter: int
                 ) -> tuple[torch.Tensor, float, int]:
    """Newton-CG with Armijo backtracking from ``phi = theta``; returns ``(phi, residual, iterations)``.

    Once the residual is below ``tol``, up to ``_POLISH`` more Newton steps push it towards the
    round-off floor (quadratic convergence makes them cheap), so the implicit gradient is evaluated
    as close to the exact stationary point as the dtype allows. The best iterate is returned.
    """
    z = prob.theta.clone()
    best_z, best_res, stalls, polish, f_prev = z, math.inf, 0, 0, math.inf
    eps = working_eps(z.dtype, z.device)
    for it in range(maxiter + 1):
        zl, gs = prob.grad_graph(z)
        g = (gs + prob.lam * (zl - prob.theta)).detach()
        res = float(torch.linalg.vector_norm(g))
        f0 = prob.value(z)
        # Progress is a smaller residual or a lower objective (far from the solution of a nonconvex
        # problem the gradient norm may grow while F decreases); neither for 5 iterations = stalled.
        slack = 16 * eps * max(1.0, abs(f0))
        if res < best_res:
            best_z, best_res, stalls = z, res, 0
        elif f0 < f_prev - slack:
            stalls = 0
        else:
            stalls += 1
        f_prev = min(f_prev, f0)
        if best_res <= tol:
            polish += 1
        if polish > _POLISH or stalls >= 5 or not math.isfinite(res) or it == maxiter:
            return best_z, best_res, it

        def hvp(v: torch.Tensor) -> torch.Tensor:
            (hv,) = torch.autograd.grad(gs, zl, v, retain_graph=True)
            return hv + prob.lam * v

        # Forcing term min(0.5, sqrt(||g|| / scale)) (Eisenstat-Walker style): superlinear near the solution.
        d = _truncated_cg(hvp, g, min(0.5, math.sqrt(res / scale)), cg_maxiter)
        slope, t = float(torch.dot(g, d)), 1.0
        # Armijo, with a round-off allowance on F: near the solution the decrease ~ ||g||^2 is below
        # eps |F|, and the (then accurate) Newton step must still be taken.
        while prob.value(z + t * d) > f0 + 1e-4 * t * slope + slack and t > 1e-12:
            t *= 0.5
        z = (z + t * d).detach()
    raise AssertionError("unreachable")  # pragma: no cover


def _check(model, params, tasks, lam, solver, inner_tol, cg_tol, inner_maxiter, cg_maxiter):
    # The reference's check of every argument, then torch's own limit: real arithmetic.
    params, tasks, lam, inner_maxiter, cg_maxiter = reference_imaml.check_arguments(
        model, params, tasks, lam, solver, inner_tol, cg_tol, inner_maxiter, cg_maxiter)
    if isinstance(lam, complex):
        raise InvalidInputError(f"lam={short(lam)} is complex; the torch backend computes in real arithmetic")
    return params, tasks, float(lam), inner_maxiter, cg_maxiter


def _task(prob: _Problem, *, solver: str, inner_tol: float, cg_tol: float, inner_maxiter: int, cg_maxiter: int,
          where: str, need_grad: bool) -> tuple[torch.Tensor, TaskInfo | None]:
    fm, dtype = prob.fm, prob.theta.dtype
    # under TF32 every HVP/gradient is resolved only to TF32's rounding: the floors scale with it
    widen = working_eps(dtype, prob.theta.device) / float(torch.finfo(dtype).eps)
    floor, cg_floor, cg_accept = TOL_FLOOR[dtype] * widen, CG_TOL_FLOOR[dtype] * widen, CG_ACCEPT[dtype] * widen
    _, g0 = prob.grad_graph(prob.theta)
    scale = max(1.0, float(torch.linalg.vector_norm(g0.detach())))
    tol = max(inner_tol, floor) * scale
    phi, res, iterations = _inner_solve(prob, tol, scale, inner_maxiter, cg_maxiter)
    if not res <= tol:
        raise ConvergenceError(
            f"iMAML inner problem of {where} did not converge: stationarity residual "
            f"||grad L_s(phi) + lam (phi - theta)|| = {res:.3g} > inner_tol * max(1, ||grad L_s(theta)||) = {tol:.3g} "
            f"after {iterations} Newton-CG iterations ({str(dtype).replace('torch.', '')}). The implicit "
            "meta-gradient is only valid at a stationary point, so no answer is given; increase lam, raise "
            "inner_maxiter, or loosen inner_tol"
        )
    zl = phi.detach().requires_grad_(True)
    loss_q = fm.flat_loss(zl, prob.task.x_query, prob.task.y_query)
    if not need_grad:
        return loss_q.detach(), None
    (b,) = torch.autograd.grad(loss_q, zl)
    what = f"I + H_s(phi*)/lam of {where}"
    lam = prob.lam
    if solver == "direct":
        H = torch.autograd.functional.hessian(prob.support_loss, zl.detach(), vectorize=True)
        A = torch.eye(H.shape[0], dtype=dtype, device=H.device) + H / lam
        _features.check_spd(A, what, _SADDLE_HINT)
        x = torch.linalg.solve(A, b)
        b_norm = float(torch.linalg.vector_norm(b))
        lin_res = float(torch.linalg.vector_norm(A @ x - b)) / b_norm if b_norm > 0 else 0.0
        iters, cond = 0, float(torch.linalg.cond(A))
    else:
        leaf, gs = prob.grad_graph(zl)

        def matvec(v: torch.Tensor) -> torch.Tensor:
            # Double backward: d/dphi <grad L_s(phi), v> = H_s(phi) v (the authors' hvp).
            (hv,) = torch.autograd.grad(gs, leaf, v, retain_graph=True)
            return v + hv / lam

        cg = conjugate_gradient(matvec, b, rtol=max(cg_tol, cg_floor), maxiter=cg_maxiter, what=what,
                                accept_rtol=max(cg_tol, cg_accept))
        x, iters, lin_res, cond = cg.x, cg.iterations, cg.residual, cg.cond_estimate
    info = TaskInfo([to_numpy(p) for p in fm.unflatten(phi)], [to_numpy(p) for p in fm.unflatten(x)],
                    scalar(loss_q), res, tol, iterations, solver, iters, lin_res, cond)
    return loss_q.detach(), info


def _setup(model, params, tasks, lam, solver, inner_tol, cg_tol, inner_maxiter, cg_maxiter, dtype, device):
    resolve_dtype(dtype), resolve_device(device)
    params, tasks, lam, inner_maxiter, cg_maxiter = _check(model, params, tasks, lam, solver, inner_tol, cg_tol,
                                                           inner_maxiter, cg_maxiter)
    fm = FunctionalMLP(model, dtype, device)
    theta = torch.cat([t.reshape(-1) for t in fm.tensors(params)])
    cg_maxiter = cg_maxiter or 2 * theta.numel() + 100
    ttasks = to_torch_tasks(tasks, fm.dtype, fm.device)
    return fm, theta, ttasks, lam, inner_maxiter, cg_maxiter


def meta_loss(model: Any, params: Sequence[Any], tasks: Sequence[Task], lam: float, *, inner_tol: float = 1e-12,
              inner_maxiter: int = 1000, solver: str = "cg", cg_tol: float = 1e-12, cg_maxiter: int | None = None,
              dtype: str = "float64", device: str = "cpu", allow_tf32: bool = False) -> float:
    """The iMAML meta-loss alone: mean over tasks of ``L_q(phi*(theta))``."""
    with tf32(allow_tf32):
        fm, theta, ttasks, lam, inner_maxiter, cg_maxiter = _setup(model, params, tasks, lam, solver, inner_tol,
                                                                   cg_tol, inner_maxiter, cg_maxiter, dtype, device)
        total = 0.0
        for i, t in enumerate(ttasks):
            loss_q, _ = _task(_Problem(fm, theta, t, lam), solver=solver, inner_tol=inner_tol, cg_tol=cg_tol,
                              inner_maxiter=inner_maxiter, cg_maxiter=cg_maxiter, where=f"tasks[{i}]",
                              need_grad=False)
            total += scalar(loss_q)
        return total / len(ttasks)


def meta_loss_and_grad_info(model: Any, params: Sequence[Any], tasks: Sequence[Task], lam: float, *,
                            solver: str = "cg", inner_tol: float = 1e-12, cg_tol: float = 1e-12,
                            inner_maxiter: int = 1000, cg_maxiter: int | None = None, dtype: str = "float64",
                            device: str = "cpu", allow_tf32: bool = False) -> Result:
    """:func:`meta_loss_and_grad` plus the per-task diagnostics (:class:`TaskInfo`)."""
    with tf32(allow_tf32):
        fm, theta, ttasks, lam, inner_maxiter, cg_maxiter = _setup(model, params, tasks, lam, solver, inner_tol,
                                                                   cg_tol, inner_maxiter, cg_maxiter, dtype, device)
        total, grad, infos = 0.0, None, []
        for i, t in enumerate(ttasks):
            loss_q, info = _task(_Problem(fm, theta, t, lam), solver=solver, inner_tol=inner_tol, cg_tol=cg_tol,
                                 inner_maxiter=inner_maxiter, cg_maxiter=cg_maxiter, where=f"tasks[{i}]",
                                 need_grad=True)
            total += scalar(loss_q)
            grad = list(info.grad) if grad is None else [a + b for a, b in zip(grad, info.grad)]
            infos.append(info)
        m = len(ttasks)
        return Result(total / m, [g / m for g in grad], infos)


def meta_loss_and_grad(model: Any, params: Sequence[Any], tasks: Sequence[Task], lam: float, *, solver: str = "cg",
                       inner_tol: float = 1e-12, cg_tol: float = 1e-12, inner_maxiter: int = 1000,
                       cg_maxiter: int | None = None, dtype: str = "float64", device: str = "cpu",
                       allow_tf32: bool = False) -> tuple[float, list[np.ndarray]]:
    """iMAML meta-loss and implicit meta-gradient (Rajeswaran et al. 2019), torch autograd HVPs.

    ``meta_loss = mean_tasks L_q(phi*)``, ``grad = mean_tasks (I + H_s(phi*)/lam)^{-1} grad L_q(phi*)``.

    Args: as ``reference.imaml.meta_loss_and_grad`` (``inner_tol`` is relative:
        ``||grad L_s(phi) + lam (phi - theta)|| <= inner_tol * max(1, ||grad L_s(theta)||)``;
        in float32 they are raised to ``TOL_FLOOR`` / ``CG_TOL_FLOOR``, see there), plus ``dtype``,
        ``device`` and ``allow_tf32``.

    Returns:
        ``(meta_loss, grads)``.

    Raises:
        ConvergenceError: the inner problem or CG did not reach its tolerance.
        SingularMatrixError: ``I + H_s(phi*)/lam`` is not positive definite / singular in ``dtype``.
        InvalidInputError: bad arguments.
    """
    result = meta_loss_and_grad_info(model, params, tasks, lam, solver=solver, inner_tol=inner_tol, cg_tol=cg_tol,
                                     inner_maxiter=inner_maxiter, cg_maxiter=cg_maxiter, dtype=dtype, device=device,
                                     allow_tf32=allow_tf32)
    return result.loss, result.grad
