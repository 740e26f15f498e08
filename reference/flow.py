"""Gradient flow: the inner loop in continuous time and its adjoint meta-gradient.

CONVENTIONS, "Continuous time": the support loss is minimised by the ODE

    dp/dt = -grad L_s(p),   p(0) = theta,

up to time ``T``, and the task loss is ``L_q(p(T))``. Its meta-gradient comes
from the adjoint (costate) system integrated backwards in time,

    da/dt = H_s(p(t)) a,    a(T) = grad L_q(p(T)),    dL_q(p(T))/dtheta = a(0),

(Pontryagin; for neural ODEs, Chen et al. 2018, "Neural Ordinary Differential
Equations"; as the limit of MAML, the "continuous-time" view of Finn et al.'s
inner loop). MAML with ``K`` steps of size ``T / K`` is the explicit Euler
discretisation of the flow and its meta-gradient converges to this one at the
rate ``O(1/K)``.

Both systems are solved with ``scipy.integrate.solve_ivp`` at tight tolerances
(DOP853, ``rtol = 1e-12`` by default). The backward pass evaluates ``p(t)``
from the forward solution's dense output (a 7th-order interpolant), so the
adjoint never integrates the flow backwards (which is unstable where ``L_s``
is strongly convex), and it uses exact Hessian-vector products
(``model._hvp``), never a Hessian (except for the implicit methods' Jacobians).
Complex parameters are supported by the explicit methods (complex step); the
adaptive step sizes are then governed by the real part, so the derivative of
the computed flow is obtained.

Accuracy: the result is the exact meta-gradient up to the ODE solver's
tolerance (about ``1e-10`` relative at the defaults, not machine precision);
``rtol`` below ``1e-13`` is refused because SciPy cannot honour it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.integrate import solve_ivp

from reference._threads import map_tasks, work
from reference.validation import check_finite_scalar
from reference.errors import ConvergenceError, InvalidInputError
from reference.models import flatten, unflatten
from reference.tasks import Task, check_tasks

Params = list[np.ndarray]

#: Explicit Runge-Kutta methods (complex-step capable) and implicit ones (for stiff flows; dense Hessians).
EXPLICIT_METHODS = ("DOP853", "RK45")
IMPLICIT_METHODS = ("Radau", "BDF")
DEFAULT_RTOL = 1e-12
DEFAULT_ATOL = 1e-14
# SciPy raises rtol below 100 * eps (~2.2e-14) with a warning; stay clear of that floor.
MIN_RTOL = 1e-13


@dataclass(frozen=True)
class FlowSolution:
    """Result of the flow on one task.

    Attributes:
        params_T: ``p(T)`` as a parameter list.
        loss: ``L_q(p(T))``.
        grad: ``dL_q(p(T))/dtheta = a(0)`` as a parameter list (None if not asked).
        nfev_forward, nfev_adjoint: right-hand-side evaluations of the two solves.
    """

    params_T: Params
    loss: Any
    grad: Params | None
    nfev_forward: int
    nfev_adjoint: int


def _check_options(T: Any, rtol: Any, atol: Any, method: Any) -> tuple[float, float, float, str]:
    T = check_finite_scalar("T", T, nonnegative=True, hint="; T is the integration time of the flow, e.g. T=1.0")
    if isinstance(T, complex):
        raise InvalidInputError(f"T={T!r} must be real; complex step applies to the parameters, not the time")
    rtol = check_finite_scalar("rtol", rtol, positive=True)
    if not MIN_RTOL <= rtol < 1:
        why = (f"a relative tolerance of 1 or more accepts any answer; the default is {DEFAULT_RTOL}" if rtol >= 1
               else "SciPy cannot honour a tighter tolerance")
        raise InvalidInputError(f"rtol={rtol!r} must lie in [{MIN_RTOL}, 1): {why}")
    atol = check_finite_scalar("atol", atol, positive=True)
    if method not in EXPLICIT_METHODS + IMPLICIT_METHODS:
        raise InvalidInputError(f"method={method!r} is unknown; choose one of {EXPLICIT_METHODS + IMPLICIT_METHODS}")
    return float(T), float(rtol), float(atol), str(method)


def _solve(fun, t_span, y0, method, rtol, atol, jac, dense: bool, what: str):
    kwargs = {"jac": jac} if method in IMPLICIT_METHODS else {}
    hint = "try a smaller T, a stiff method (method='Radau') or looser tolerances"
    try:
        # A flow that diverges (a concave support loss, a too-long T) overflows:
        # report it as a failed solve rather than a warning followed by inf/NaN.
        with np.errstate(over="raise", invalid="raise"):
            sol = solve_ivp(fun, t_span, y0, method=method, rtol=rtol, atol=atol, dense_output=dense, **kwargs)
    except FloatingPointError as exc:
        raise ConvergenceError(f"the {what} overflowed before t={t_span[1]!r} ({method}): {exc}; {hint}") from exc
    if sol.status != 0 or not np.all(np.isfinite(sol.y[:, -1])):
        raise ConvergenceError(
            f"the {what} did not reach t={t_span[1]!r} ({method}, rtol={rtol}, atol={atol}): {sol.message}; {hint}"
        )
    return sol


def _task_flow(model, params: Params, task: Task, T: float, rtol: float, atol: float, method: str,
               need_grad: bool) -> FlowSolution:
    shapes = [p.shape for p in params]
    theta = flatten(params)
    if np.iscomplexobj(theta) and method in IMPLICIT_METHODS:
        raise InvalidInputError(f"method={method!r} does not support complex parameters; use 'DOP853' for complex step")
    xs, ys, xq, yq = task

    def rhs(_t, y):
        return -flatten(model._loss_and_grad(unflatten(y, shapes), xs, ys)[1])

    def hessian(y):
        return model.hessian(unflatten(y, shapes), xs, ys)

    if T == 0.0:
        p_T, nfev_f, dense = theta, 0, None
    else:
        fwd = _solve(rhs, (0.0, T), theta, method, rtol, atol, lambda t, y: -hessian(y), need_grad, "gradient flow")
        p_T, nfev_f, dense = fwd.y[:, -1], fwd.nfev, fwd.sol
    params_T = unflatten(p_T.copy(), shapes)
    loss, g_q = model._loss_and_grad(params_T, xq, yq)
    if not need_grad:
        return FlowSolution(params_T, loss, None, nfev_f, 0)
    a_T = flatten(g_q)
    if T == 0.0:
        return FlowSolution(params_T, loss, unflatten(a_T.copy(), shapes), nfev_f, 0)

    def adjoint_rhs(t, a):
        p_t = unflatten(dense(t), shapes)
        return flatten(model._hvp(p_t, xs, ys, unflatten(a, shapes)))

    back = _solve(adjoint_rhs, (T, 0.0), a_T, method, rtol, atol, lambda t, a: hessian(dense(t)), False,
                  "adjoint system")
    return FlowSolution(params_T, loss, unflatten(back.y[:, -1].copy(), shapes), nfev_f, back.nfev)


def solve_task(model: Any, params: Sequence[Any], task: Task, T: float, *, rtol: float = DEFAULT_RTOL,
               atol: float = DEFAULT_ATOL, method: str = "DOP853", need_grad: bool = True) -> FlowSolution:
    """The flow, its query loss and (``need_grad``) the adjoint meta-gradient of one task.

    Args:
        model: an ``MLP`` or any model with its interface (``Quadratic``).
        params: ``theta``, the initial point of the flow.
        task: ``Task(x_support, y_support, x_query, y_query)``.
        T: integration time ``>= 0`` (``T = 0``: no adaptation).
        rtol, atol: ``solve_ivp`` tolerances (``rtol >= 1e-13``).
        method: ``"DOP853"`` (default), ``"RK45"``, or the implicit ``"Radau"`` /
            ``"BDF"`` for stiff flows (they build dense Hessians as Jacobians).

    Raises:
        ConvergenceError: ``solve_ivp`` failed (message included).
    """
    params = model.check_params(params)
    task = check_tasks(model, [task])[0]
    T, rtol, atol, method = _check_options(T, rtol, atol, method)
    return _task_flow(model, params, task, T, rtol, atol, method, bool(need_grad))


def flow(model: Any, params: Sequence[Any], x: Any, y: Any, T: float, *, rtol: float = DEFAULT_RTOL,
         atol: float = DEFAULT_ATOL, method: str = "DOP853") -> Params:
    """``p(T)`` for ``dp/dt = -grad L(p; x, y)``, ``p(0) = params`` (the adapted parameters)."""
    params = model.check_params(params)
    x = model.check_x(x)
    y = model.check_y(y, np.shape(x)[0])
    T, rtol, atol, method = _check_options(T, rtol, atol, method)
    return _task_flow(model, params, Task(x, y, x, y), T, rtol, atol, method, False).params_T


def meta_loss(model: Any, params: Sequence[Any], tasks: Sequence[Task], T: float, *, rtol: float = DEFAULT_RTOL,
              atol: float = DEFAULT_ATOL, method: str = "DOP853") -> Any:
    """Gradient-flow meta-loss ``(1/n) sum_t L_q^t(p^t(T))`` (forward solves only)."""
    params = model.check_params(params)
    tasks = check_tasks(model, tasks)
    T, rtol, atol, method = _check_options(T, rtol, atol, method)
    total = sum(map_tasks(lambda t: _task_flow(model, params, t, T, rtol, atol, method, False).loss, tasks,
                          work=work(getattr(model, "n_params", 0), tasks, query=False)))
    value = np.asarray(total / len(tasks))[()]
    return complex(value) if np.iscomplexobj(value) else float(value)


def meta_loss_and_grad(model: Any, params: Sequence[Any], tasks: Sequence[Task], T: float, *,
                       rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL,
                       method: str = "DOP853") -> tuple[Any, Params]:
    """Gradient-flow meta-loss and its meta-gradient by the adjoint method (CONVENTIONS, "Continuous time").

    Per task: forward ``dp/dt = -grad L_s(p)`` on ``[0, T]`` with dense output,
    then backward ``da/dt = H_s(p(t)) a`` from ``a(T) = grad L_q(p(T))`` to
    ``t = 0``; the task's meta-gradient is ``a(0)``. Averaged over the tasks.

    Returns:
        ``(meta_loss, grad)`` with ``grad`` a list shaped like ``params``.
    """
    params = model.check_params(params)
    tasks = check_tasks(model, tasks)
    T, rtol, atol, method = _check_options(T, rtol, atol, method)
    total, grad = 0.0, None
    # Tasks on reference/_threads.py's pool, one BLAS thread each, reduced in task order (the sequential sums).
    for sol in map_tasks(lambda t: _task_flow(model, params, t, T, rtol, atol, method, True), tasks,
                         work=work(getattr(model, "n_params", 0), tasks, query=False)):
        total = total + sol.loss
        grad = sol.grad if grad is None else [a + b for a, b in zip(grad, sol.grad)]
    n = len(tasks)
    value = np.asarray(total / n)[()]
    return (complex(value) if np.iscomplexobj(value) else float(value)), [g / n for g in grad]


__all__ = ["FlowSolution", "flow", "meta_loss", "meta_loss_and_grad", "solve_task"]
