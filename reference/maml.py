"""MAML and first-order MAML meta-gradients, analytic (Finn, Abbeel & Levine 2017).

"Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", ICML 2017.
Conventions: ``shared/CONVENTIONS.md`` (section "Gradient-based algorithms").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from reference import inner_loop, inner_optim
from reference.optimizers import Optimizer
from reference.tasks import Task

__all__ = ["adapt", "check_arguments", "meta_loss", "meta_loss_and_grad"]


def check_arguments(model: Any, params: Any, tasks: Any, inner_lr: Any, inner_steps: Any,
                    inner_optimizer: Any = None) -> tuple[list[np.ndarray], list[Task], Any, int, Optimizer | None]:
    """Validate the arguments of MAML, FOMAML, ANIL and Reptile; return ``(params, tasks, inner_lr, inner_steps,
    inner_optimizer)`` checked.

    The backends call this check and add only their framework's limits (dtype, device, real ``inner_lr``).

    Raises:
        InvalidInputError: params not shaped like the model, bad tasks, ``inner_steps < 1``, a non-finite
            ``inner_lr``, an ``inner_optimizer`` that is not a :mod:`reference.optimizers` spec.
    """
    params, tasks, steps = inner_loop.check_common(model, params, tasks, inner_steps)
    alpha = inner_loop.check_inner_lr(inner_lr)
    return params, tasks, alpha, steps, inner_optim.check_inner_optimizer(inner_optimizer)


def _lrs(model: Any, inner_lr: Any) -> list[Any]:
    return [inner_lr] * len(model.shapes)


def adapt(model: Any, params: Sequence[Any], task: Task, inner_lr: float, inner_steps: int, *,
          inner_optimizer: Optimizer | None = None) -> list[np.ndarray]:
    """The adapted parameters ``p_K`` of one task: ``K`` gradient steps on its support loss.

    ``p_0 = theta``, ``p_{k+1} = p_k - inner_lr * grad L_s(p_k)`` (``- inner_lr * d_k``
    with an ``inner_optimizer``, :mod:`reference.optimizers`).
    """
    params, tasks, alpha, steps, opt = check_arguments(model, params, [task], inner_lr, inner_steps, inner_optimizer)
    t = tasks[0]
    if opt is not None:
        lrs, active = inner_optim.check_lrs(model, [_lrs(model, alpha)] * steps, steps)
        return inner_optim.unroll(model, params, t, opt, lrs, active, steps, np.zeros(steps), keep=False)[2]
    return inner_loop.adapt(model, params, t.x_support, t.y_support, _lrs(model, alpha), steps, keep_iterates=False)[0][0]


def meta_loss(model: Any, params: Sequence[Any], tasks: Sequence[Task], inner_lr: float, inner_steps: int, *,
              inner_optimizer: Optimizer | None = None) -> Any:
    """MAML meta-loss ``(1/T) sum_t L_q^t(p_K^t)``, ``p_{k+1} = p_k - alpha grad L_s^t(p_k)``, ``p_0 = theta``.

    Forward pass only, ``O(params)`` memory; meant for finite differences and
    complex step (returns a ``complex`` when ``params`` or ``inner_lr`` are complex).

    Args:
        model: a ``reference.models.MLP`` (or any model with its interface, e.g. ``Quadratic``).
        params: parameter list ``theta`` in CONVENTIONS order.
        tasks: non-empty list of ``Task(x_support, y_support, x_query, y_query)``.
        inner_lr: the inner step size ``alpha`` (finite scalar).
        inner_steps: the number ``K >= 1`` of inner gradient steps.
        inner_optimizer: ``None`` (SGD) or a differentiable optimiser from
            :mod:`reference.optimizers` / :mod:`reference.learned_optimizers`
            (``p_{k+1} = p_k - alpha d_k``, CONVENTIONS "Inner-loop optimisers").
    """
    params, tasks, alpha, steps, opt = check_arguments(model, params, tasks, inner_lr, inner_steps, inner_optimizer)
    if opt is not None:
        return inner_optim.meta_loss(model, params, tasks, [_lrs(model, alpha)] * steps, steps, optimizer=opt)
    return inner_loop.meta_loss(model, params, tasks, _lrs(model, alpha), steps)


def meta_loss_and_grad(
    model: Any,
    params: Sequence[Any],
    tasks: Sequence[Task],
    inner_lr: float,
    inner_steps: int,
    first_order: bool = False,
    *,
    inner_optimizer: Optimizer | None = None,
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

    With ``inner_optimizer`` the steps are ``p_{k+1} = p_k - alpha d_k`` and the
    gradient is the exact one through parameters and optimiser state
    (:func:`reference.inner_optim.meta_loss_and_grad`); ``first_order`` then
    makes the optimiser's gradient inputs constants.

    Args: as :func:`meta_loss`, plus ``first_order``.

    Returns:
        ``(meta_loss, grad)`` with ``grad`` a list shaped like ``params``.
    """
    params, tasks, alpha, steps, opt = check_arguments(model, params, tasks, inner_lr, inner_steps, inner_optimizer)
    if opt is not None:
        loss, grad, _ = inner_optim.shared_rates(model, params, tasks, _lrs(model, alpha), steps, optimizer=opt,
                                                 first_order=bool(first_order))
        return loss, grad
    loss, grad, _ = inner_loop.meta_loss_and_grad(model, params, tasks, _lrs(model, alpha), steps,
                                              first_order=bool(first_order))
    return loss, grad
