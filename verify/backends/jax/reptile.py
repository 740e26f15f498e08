"""Reptile in JAX (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms").

``K`` SGD steps on the support loss from ``theta`` (``jax.grad``); the task
direction is ``theta - p_K`` and the meta-batch direction its mean over tasks.
It is not the gradient of anything, so no outer autodiff is involved; the
outer update is ``theta <- theta - eps * direction``. Mirrors
``reference.reptile``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from reference import reptile as reference_reptile
from reference.tasks import Task
from verify.backends.jax._inner import setup_checked, sgd_adapt
from verify.backends.jax._model import Params, _loss_from_key, cached, maybe_jit, task_mean, to_jax_scalar, to_numpy


@cached
def _build(key: tuple, steps: int, jit: bool):
    loss = _loss_from_key(key)

    def task_direction(task: Task, params: Params, inner_lr: jax.Array) -> Params:
        adapted = sgd_adapt(loss, params, task.x_support, task.y_support, [inner_lr] * len(params), steps)
        return [p - q for p, q in zip(params, adapted)]

    def direction(params: Params, batch: Any, inner_lr: jax.Array) -> Params:
        return task_mean(task_direction, batch, params, inner_lr)

    return maybe_jit(direction, jit)


def direction(model: Any, params: Sequence[Any], tasks: Sequence[Any], inner_lr: float, inner_steps: int, *,
              dtype: str = "float64", jit: bool = False) -> list[Any]:
    """Reptile direction ``mean_tasks (theta - p_K)`` as float64 NumPy arrays shaped like ``params``."""
    key, p, batch, alpha, steps = setup_checked(reference_reptile.check_arguments, model, params, tasks, inner_lr,
                                                inner_steps, dtype, jit)
    lr = to_jax_scalar(alpha, dtype)
    return to_numpy(_build(key, steps, jit)(p, batch, lr))


__all__ = ["direction"]
