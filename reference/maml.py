"""MAML and first-order MAML meta-gradients, analytic (Finn, Abbeel & Levine 2017).

"Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", ICML 2017.
Conventions: ``shared/CONVENTIONS.md`` (section "Gradient-based algorithms").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from reference import inner_loop
from reference.tasks import Task

__all__ = ["adapt", "meta_loss", "meta_loss_and_grad"]


def _lrs(model: Any, inner_lr: Any) -> list[Any]:
    return [inner_lr] * len(model.shapes)


def adapt(model: Any, params: Sequence[Any], task: Task, inner_lr: float, inner_steps: int) -> list[np.ndarray]:
    """The adapted parameters ``p_K`` of one task: ``K`` gradient steps on its support loss.

    ``p_0 = theta``, ``p_{k+1} = p_k - inner_lr * grad L_s(p_k)``.
    """
    params, tasks, steps = inner_loop.check_common(model, params, [task], inner_steps)
    alpha = inner_loop.check_inner_lr(inner_lr)
    t = tasks[0]
    return inner_loop.adapt(model, params, t.x_support, t.y_support, _lrs(model, alpha), steps,
                            keep_iterates=False)[0][0]


def meta_loss(model: Any, params: Sequence[Any], tasks: Sequence[Task], inner_lr: float, inner_steps: int) -> Any:
    """MAML meta-loss ``(1/T) sum_t L_q^t(p_K^t)``, ``p_{k+1} = p_k - alpha grad L_s^t(p_k)``, ``p_0 = theta``.

    Forward pass only, ``O(params)`` memory; meant for finite differences and
    complex step (returns a ``complex`` when ``params`` or ``inner_lr`` are complex).

    Args:
        model: a ``reference.models.MLP`` (or any model with its interface, e.g. ``Quadratic``).
        params: parameter list ``theta`` in CONVENTIONS order.
        tasks: non-empty list of ``Task(x_support, y_support, x_query, y_query)``.
        inner_lr: the inner step size ``alpha`` (finite scalar).
        inner_steps: the number ``K >= 1`` of inner gradient steps.
    """
    params, tasks, steps = inner_loop.check_common(model, params, tasks, inner_steps)
    alpha = inner_loop.check_inner_lr(inner_lr)
    return inner_loop.meta_loss(model, params, tasks, _lrs(model, alpha), steps)


def meta_loss_and_grad(
    model: Any,
    params: Sequence[Any],
    tasks: Sequence[Task],
    inner_lr: float,
    inner_steps: int,
    first_order: bool = False,
) -> tuple[Any, list[np.ndarray]]:
    """MAML meta-loss and its exact meta-gradient (FOMAML's with ``first_order=True``).

    For each task, with ``H_s(p)`` the Hessian of the support loss,

        grad = (I - alpha H_s(p_0)) (I - alpha H_s(p_1)) ... (I - alpha H_s(p_{K-1})) grad L_q(p_K),

    averaged over the tasks. It is computed by reverse accumulation: starting
    from ``v = grad L_q(p_K)``, ``v <- v - alpha H_s(p_k) v`` for ``k = K-1, ..., 0``
    (rightmost factor first: the Hessians at different iterates do not
    commute), each ``H_s v`` an exact Hessian-vector product (Pearlmutter's
    R-operator). No Hessian is formed. Memory: the ``K + 1`` iterates of one
    task at a time, ``O(K x params)``; time about ``K`` gradients plus ``K``
    Hessian-vector products (``~3K`` gradients) per task.

    ``first_order=True`` gives FOMAML (Finn et al. 2017, section 5.2;
    CONVENTIONS): the same loss, gradient ``mean_t grad L_q^t(p_K^t)``, which
    is not the gradient of the meta-loss.

    Args: as :func:`meta_loss`, plus ``first_order``.

    Returns:
        ``(meta_loss, grad)`` with ``grad`` a list shaped like ``params``.
    """
    params, tasks, steps = inner_loop.check_common(model, params, tasks, inner_steps)
    alpha = inner_loop.check_inner_lr(inner_lr)
    loss, grad, _ = inner_loop.meta_loss_and_grad(model, params, tasks, _lrs(model, alpha), steps,
                                              first_order=bool(first_order))
    return loss, grad
