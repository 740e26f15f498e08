"""The Reptile direction (Nichol, Achiam & Schulman 2018).

"On First-Order Meta-Learning Algorithms", arXiv:1803.02999. Not the gradient
of any function; the outer update is ``theta <- theta - eps * direction``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from reference import inner_loop, inner_optim
from reference._threads import map_tasks, work
from reference.maml import check_arguments  # Reptile takes MAML's arguments
from reference.optimizers import Optimizer
from reference.tasks import Task

__all__ = ["check_arguments", "direction", "meta_loss"]


def direction(
    model: Any, params: Sequence[Any], tasks: Sequence[Task], inner_lr: float, inner_steps: int, *,
    inner_optimizer: Optimizer | None = None,
) -> list[np.ndarray]:
    """Reptile meta-batch direction ``(1/T) sum_t (theta - p_K^t)``.

    ``p_0 = theta``, ``p_{k+1} = p_k - alpha grad L_s^t(p_k)`` (``K`` SGD steps
    on the support set, as CONVENTIONS defines); for ``K = 1`` it is
    ``alpha * mean_t grad L_s^t(theta)``. The query sets are not used. With an
    ``inner_optimizer`` (Nichol et al. use Adam) ``p_K`` comes from
    ``p_{k+1} = p_k - alpha d_k`` (:mod:`reference.optimizers`).
    """
    params, tasks, alpha, steps, opt = check_arguments(model, params, tasks, inner_lr, inner_steps, inner_optimizer)
    lrs = [alpha] * len(params)
    total = [np.zeros_like(p) for p in params]

    def per_task(task: Task) -> list[np.ndarray]:
        if opt is not None:
            sched, active = inner_optim.check_lrs(model, [lrs] * steps, steps)
            return inner_optim.unroll(model, params, task, opt, sched, active, steps, np.zeros(steps), keep=False)[2]
        return inner_loop.adapt(model, params, task.x_support, task.y_support, lrs, steps, keep_iterates=False)[0][0]

    # Tasks on reference/_threads.py's pool, one BLAS thread each, reduced in task order (the sequential sums).
    for p_k in map_tasks(per_task, tasks, work=work(getattr(model, "n_params", 0), tasks, query=False)):
        total = [acc + (p - q) for acc, p, q in zip(total, params, p_k)]
    return [acc / len(tasks) for acc in total]


def meta_loss(model: Any, params: Sequence[Any], tasks: Sequence[Task], inner_lr: float, inner_steps: int, *,
              inner_optimizer: Optimizer | None = None) -> Any:
    """The query loss after Reptile's inner loop: identical to MAML's meta-loss.

    Provided so every module exposes its loss; Reptile's direction is not its gradient.
    """
    from reference import maml

    return maml.meta_loss(model, params, tasks, inner_lr, inner_steps, inner_optimizer=inner_optimizer)
