"""Newton-MAML: MAML with a Hessian-preconditioned (damped Newton) inner step.

Inner step (CONVENTIONS, "Newton-MAML"):

    p_{k+1} = p_k - alpha (H_s(p_k) + delta I)^{-1} grad L_s(p_k),

the damped Newton / Levenberg step of the inner problem (the preconditioned
inner loop studied as a MAML variant e.g. by Park & Oliva 2019, "Meta-Curvature",
and the Newton-step inner loops of Rajeswaran et al. 2019, "Meta-Learning with
Implicit Gradients", section 3). The meta-gradient is exact: it contains the
third derivatives of the support loss.

Dense Hessians are formed, so models are limited to ``MAX_PARAMS`` parameters;
the ``K`` LU factorisations of one task are kept for the reverse pass
(memory ``8 K n^2`` bytes for ``n`` parameters: 640 MB at ``n = 4000, K = 5``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.linalg

from reference import inner_loop
from reference._threads import map_tasks
from reference.validation import check_finite_scalar
from reference.errors import InvalidInputError, SingularMatrixError
from reference.models import MAX_DENSE_HESSIAN, flatten, unflatten
from reference.tasks import Task

__all__ = ["MAX_CONDITION", "MAX_PARAMS", "adapt", "check_arguments", "meta_loss", "meta_loss_and_grad"]

# Largest model (parameter count) whose dense Hessian is formed, as reference.models.hessian allows.
MAX_PARAMS = MAX_DENSE_HESSIAN
# A damped Hessian whose 2-norm condition number exceeds this is refused: its solve would lose
# more than 12 of float64's ~16 digits, so the step (and its derivative) would be noise.
MAX_CONDITION = 1e12


def check_arguments(model: Any, params: Any, tasks: Any, inner_lr: Any, inner_steps: Any, damping: Any
                    ) -> tuple[list[np.ndarray], list[Task], int, Any, Any]:
    """Validate Newton-MAML's arguments; return ``(params, tasks, inner_steps, inner_lr, damping)`` checked.

    The backends call this check and add only their framework's limits.

    Raises:
        InvalidInputError: the shared gradient-family checks, a negative or non-finite ``damping``,
            a model over ``MAX_PARAMS`` parameters.
    """
    params, tasks, steps = inner_loop.check_common(model, params, tasks, inner_steps)
    alpha = inner_loop.check_inner_lr(inner_lr)
    delta = check_finite_scalar("damping", damping, nonnegative=True,
                                hint="; damping adds delta * I to the support Hessian")
    if model.n_params > MAX_PARAMS:
        raise InvalidInputError(
            f"{model!r} has {model.n_params} parameters; Newton-MAML forms dense Hessians and is limited to "
            f"MAX_PARAMS={MAX_PARAMS} (8 n^2 bytes each, one per inner step). Use reference.maml or a smaller model"
        )
    return params, tasks, steps, alpha, delta


class _Factor:
    """LU factorisation of the damped Hessian ``A = H + delta I``, after a conditioning check."""

    def __init__(self, hessian: np.ndarray, delta: Any, where: str):
        a = hessian + delta * np.eye(hessian.shape[0])
        if not np.all(np.isfinite(a)):
            # Overflow in the model's second derivatives. Checked first: LAPACK's eigvalsh may fail to
            # converge on it, or return finite eigenvalues for a NaN on the diagonal (the step would be NaN).
            raise SingularMatrixError(
                f"Newton-MAML: the damped support Hessian H + delta*I at {where} is not finite (overflow in the "
                f"support loss's second derivatives); rescale the inputs or the parameters"
            )
        # The condition number is judged on the real part (the Hessian at the real point; under
        # complex step the imaginary part is an O(h) perturbation). A is symmetric, so its
        # singular values are the moduli of its eigenvalues.
        eig = np.abs(np.linalg.eigvalsh(np.real(a)))
        small, large = float(eig.min()), float(eig.max())
        cond = np.inf if small == 0.0 else large / small
        if not cond <= MAX_CONDITION:
            raise SingularMatrixError(
                f"Newton-MAML: the damped support Hessian H + delta*I at {where} is singular or ill-conditioned "
                f"(condition number {cond:.3e} > MAX_CONDITION={MAX_CONDITION:.0e}, eigenvalue moduli in "
                f"[{small:.3e}, {large:.3e}], delta={delta!r}); increase damping"
            )
        self.lu = scipy.linalg.lu_factor(a, check_finite=False)
        self.complex = np.iscomplexobj(a)

    def solve(self, b: np.ndarray) -> np.ndarray:
        if np.iscomplexobj(b) and not self.complex:
            # A real factorisation cannot take a complex right-hand side: solve both parts.
            return self.solve(np.real(b)) + 1j * self.solve(np.imag(b))
        return scipy.linalg.lu_solve(self.lu, b, check_finite=False)


def _adapt(model, params, x, y, alpha, delta, steps, *, keep: bool, label: str):
    """Inner loop; returns ``p_K`` and, with ``keep``, ``[(p_k, factor_k, s_k)]`` for the reverse pass."""
    p, record = list(params), []
    for k in range(steps):
        _, g = model._loss_and_grad(p, x, y)
        factor = _Factor(model.hessian(p, x, y), delta, f"{label}, inner step k={k}")
        s = factor.solve(flatten(g))
        if keep:
            record.append((p, factor, s))
        p = [pi - alpha * si for pi, si in zip(p, unflatten(s, model.shapes))]
    return p, record


def adapt(model: Any, params: Sequence[Any], task: Task, inner_lr: float, inner_steps: int,
          damping: float = 0.0) -> list[np.ndarray]:
    """Adapted parameters ``p_K`` of one task after ``K`` damped Newton steps on its support loss."""
    params, tasks, steps, alpha, delta = check_arguments(model, params, [task], inner_lr, inner_steps, damping)
    t = tasks[0]
    return _adapt(model, params, t.x_support, t.y_support, alpha, delta, steps, keep=False, label="task 0")[0]


def meta_loss(model: Any, params: Sequence[Any], tasks: Sequence[Task], inner_lr: float, inner_steps: int,
              damping: float = 0.0) -> Any:
    """Newton-MAML meta-loss ``(1/T) sum_t L_q^t(p_K^t)``.

    ``p_{k+1} = p_k - alpha (H_s(p_k) + delta I)^{-1} grad L_s(p_k)``, ``p_0 = theta``.
    Raises :class:`~reference.errors.SingularMatrixError` when a damped Hessian
    is not finite or has condition number above ``MAX_CONDITION``.
    """
    params, tasks, steps, alpha, delta = check_arguments(model, params, tasks, inner_lr, inner_steps, damping)
    total = 0.0

    def per_task(i: int) -> Any:
        t = tasks[i]
        p_k, _ = _adapt(model, params, t.x_support, t.y_support, alpha, delta, steps, keep=False, label=f"task {i}")
        return model._loss_and_grad(p_k, t.x_query, t.y_query)[0]

    for loss in map_tasks(per_task, range(len(tasks)), work=_work(model)):
        total = total + loss
    return inner_loop.as_scalar(total / len(tasks))


def _work(model: Any) -> float:
    # Each step forms and factors an n x n Hessian (n <= MAX_PARAMS): dense O(n^2)-memory work per task.
    n = sum(int(np.prod(s)) for s in model.shapes)
    return float(n) * n


def meta_loss_and_grad(model: Any, params: Sequence[Any], tasks: Sequence[Task], inner_lr: float, inner_steps: int,
                       damping: float = 0.0) -> tuple[Any, list[np.ndarray]]:
    """Newton-MAML meta-loss and its exact meta-gradient (third derivatives included).

    With ``A_k = H_s(p_k) + delta I`` and ``s_k = A_k^{-1} grad L_s(p_k)``,
    differentiating ``A_k s_k = grad L_s`` gives the step Jacobian

        dp_{k+1}/dp_k = I - alpha A_k^{-1} (H_s(p_k) - T_k),   T_k = D^3 L_s(p_k)[s_k, ., .],

    a symmetric matrix (the derivative of the Hessian contracted with
    ``s_k``). Reverse accumulation from ``v_K = grad L_q(p_K)``:

        u = A_k^{-1} v_{k+1},   v_k = v_{k+1} - alpha (H_s u - T_k u),

    where ``H_s u = v_{k+1} - delta u`` and ``T_k u = grad_p (u^T H_s(p) s_k)``
    comes from ``model._third`` (exact, hyper-dual backpropagation).

    Args:
        damping: ``delta >= 0`` added to the Hessian's diagonal.

    Raises:
        SingularMatrixError: a damped Hessian is not finite or its condition number exceeds ``MAX_CONDITION``.
        InvalidInputError: bad arguments, or more than ``MAX_PARAMS`` parameters.
    """
    params, tasks, steps, alpha, delta = check_arguments(model, params, tasks, inner_lr, inner_steps, damping)
    shapes = model.shapes
    total, grad = 0.0, 0.0

    def per_task(i: int) -> tuple[Any, np.ndarray]:
        t = tasks[i]
        p_k, record = _adapt(model, params, t.x_support, t.y_support, alpha, delta, steps, keep=True,
                             label=f"task {i}")
        loss, g_q = model._loss_and_grad(p_k, t.x_query, t.y_query)
        v = flatten(g_q)
        for p, factor, s in reversed(record):
            u = factor.solve(v)
            t_u = flatten(model._third(p, t.x_support, t.y_support, unflatten(u, shapes), unflatten(s, shapes)))
            v = v - alpha * ((v - delta * u) - t_u)
        return loss, v

    # Tasks on reference/_threads.py's pool, one BLAS thread each, reduced in task order (the sequential sums).
    for loss, v in map_tasks(per_task, range(len(tasks)), work=_work(model)):
        total = total + loss
        grad = grad + v
    return inner_loop.as_scalar(total / len(tasks)), unflatten(grad / len(tasks), shapes)
