"""The Reptile direction (Nichol, Achiam & Schulman 2018).

"On First-Order Meta-Learning Algorithms", arXiv:1803.02999. Not the gradient
of any function; the outer update is ``theta <- theta - eps * direction``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from reference import inner_loop
from reference.tasks import Task

__all__ = ["direction", "meta_loss"]


def direction(
    model: Any, params: Sequence[Any], tasks: Sequence[Task], inner_lr: float, inner_steps: int
) -> list[np.ndarray]:
    """Reptile meta-batch direction ``(1/T) sum_t (theta - p_K^t)``.

    ``p_0 = theta``, ``p_{k+1} = p_k - alpha grad L_s^t(p_k)`` (``K`` SGD steps
    on the support set, as CONVENTIONS defines); for ``K = 1`` it is
    ``alpha * mean_t grad L_s^t(theta)``. The query sets are not used.
    """
    params, tasks, steps = inner_loop.check_common(model, params, tasks, inner_steps)
    alpha = inner_loop.check_inner_lr(inner_lr)
    lrs = [alpha] * len(params)
    total = [np.zeros_like(p) for p in params]
    for task in tasks:
        p_k = inner_loop.adapt(model, params, task.x_support, task.y_support, lrs, steps, keep_iterates=False)[0][0]
        total = [acc + (p - q) for acc, p, q in zip(total, params, p_k)]
    return [acc / len(tasks) for acc in total]


def meta_loss(model: Any, params: Sequence[Any], tasks: Sequence[Task], inner_lr: float, inner_steps: int) -> Any:
    """The query loss after Reptile's inner loop: identical to MAML's meta-loss.

    Provided so every module exposes its loss; Reptile's direction is not its gradient.
    """
    from reference import maml

    return maml.meta_loss(model, params, tasks, inner_lr, inner_steps)
