"""Prototypical networks: class prototypes and squared Euclidean logits.

Snell, Swersky & Zemel (2017), "Prototypical Networks for Few-shot Learning",
NeurIPS. Per ``shared/CONVENTIONS.md``, for one task with backbone ``f``:

* prototypes ``c_k = mean{ f(x_j) : y_j = k }`` over the support set,
* query logits ``O_ik = -||f(xq_i) - c_k||^2``, loss ``ce`` (mean over queries).

The loss is the mean over tasks. Gradient, with ``G = dL/dO = (softmax(O) -
onehot) / n_q``:

* ``dL/dzq_i = -2 sum_k G_ik (zq_i - c_k)``,
* ``dL/dc_k = 2 sum_i G_ik (zq_i - c_k)``, and each support feature of class
  ``k`` receives ``dL/dc_k / n_k``,

then both go back through the backbone by its VJP. Every class in
``[0, n_classes)`` needs a support example: an empty class has no prototype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from reference.features import (
    TaskFeatures,
    accumulate,
    as_scalar,
    check_backbone,
    check_feature_tasks,
    check_n_classes,
    class_label_check,
    stacked_task_map,
)
from reference._threads import map_tasks, work
from reference.errors import InvalidInputError
from reference.models import MLP, _Loss
from reference.tasks import Task

Params = list[np.ndarray]


def check_arguments(backbone: Any, params: Any, tasks: Any, n_classes: Any) -> tuple[MLP, Params, list[Task], int]:
    """Validate Prototypical networks' arguments; return ``(backbone, params, tasks, n_classes)`` checked.

    The backends call this check and add only their framework's limits.

    Raises:
        InvalidInputError: a bad backbone or params, labels out of ``[0, n_classes)``, or
            a class without a support example.
    """
    backbone = check_backbone(backbone)
    params = backbone.check_params(params)
    n_classes = check_n_classes(n_classes)
    tasks = check_feature_tasks(backbone, tasks, class_label_check(n_classes))
    for i, task in enumerate(tasks):
        counts = np.bincount(task.y_support, minlength=n_classes)
        if np.any(counts == 0):
            k = int(np.argmin(counts))
            raise InvalidInputError(
                f"tasks[{i}].y_support has no example of class {k} (n_classes={n_classes}): its prototype "
                "(the mean of its support features) is undefined; give every class at least one support example"
            )
    return backbone, params, tasks, n_classes


def _task(feats: TaskFeatures, task: Task, n_classes: int, need_grad: bool):
    Zs, Zq = feats.support, feats.query
    onehot = np.zeros((Zs.shape[0], n_classes))
    onehot[np.arange(Zs.shape[0]), task.y_support] = 1.0
    counts = onehot.sum(axis=0)
    C = (onehot.T @ Zs) / counts[:, None]
    # Differences, not ||q||^2 - 2 q.c + ||c||^2: no cancellation when queries sit near prototypes.
    D = Zq[:, None, :] - C[None, :, :]
    loss = _Loss("ce", -np.sum(D * D, axis=-1), task.y_query)
    value = loss.value()[()]
    if not need_grad:
        return value, None
    G = loss.grad()
    GD = G[:, :, None] * D
    G_Zq = -2.0 * GD.sum(axis=1)
    G_C = 2.0 * GD.sum(axis=0)
    G_Zs = onehot @ (G_C / counts[:, None])
    return value, feats.vjp(G_Zs, G_Zq)


def loss(backbone: MLP, params: list[Any], tasks: list[Task], n_classes: int) -> float:
    """The prototypical-network loss alone (mean over tasks); see :func:`loss_and_grad`."""
    backbone, params, tasks, n_classes = check_arguments(backbone, params, tasks, n_classes)
    total = 0.0
    if isinstance(backbone, MLP):  # stacked blocks of tasks through the shared backbone
        for values, _ in stacked_task_map(backbone, params, tasks, lambda f, i: _task(f, tasks[i], n_classes, False)[0],
                                          need_grad=False):
            for value in values:
                total = total + value
        return as_scalar(total / len(tasks))
    for value in map_tasks(lambda i: _task(TaskFeatures(backbone, params, tasks[i], f"tasks[{i}]"), tasks[i],
                                           n_classes, False)[0], range(len(tasks)), work=work(backbone.n_params, tasks)):
        total = total + value
    return as_scalar(total / len(tasks))


def loss_and_grad(backbone: MLP, params: list[Any], tasks: list[Task], n_classes: int, *,
                  features: Callable[..., TaskFeatures] = TaskFeatures) -> tuple[float, Params]:
    """Prototypical-network loss and its exact gradient w.r.t. the backbone (Snell et al. 2017).

    Args:
        backbone: an MLP whose output is the feature vector.
        params: the backbone parameters.
        tasks: list of :class:`reference.tasks.Task`, integer labels in ``[0, n_classes)``.
        n_classes: classes per task; every class needs a support example.

        features: the per-task feature factory ``features(backbone, params, task, where)``
            (default :class:`reference.features.TaskFeatures`); the audit's diagnosis passes one
            whose VJP drops the support branch (the "support detached" bug).

    Returns:
        ``(loss, grads)``.

    Raises:
        InvalidInputError: bad arguments, a class without support examples, non-finite features.
    """
    backbone, params, tasks, n_classes = check_arguments(backbone, params, tasks, n_classes)
    total, grads = 0.0, None
    m = len(tasks)
    if features is TaskFeatures and isinstance(backbone, MLP):
        # Stacked blocks of tasks: one forward pass and one VJP per block (reference.features.stacked_task_map).
        for values, g in stacked_task_map(backbone, params, tasks, lambda f, i: _task(f, tasks[i], n_classes, True)[0],
                                          need_grad=True):
            for value in values:
                total = total + value
            grads = accumulate(grads, g)
        return as_scalar(total / m), [g / m for g in grads]
    # A custom feature factory (the audit's diagnosis) or a Network backbone: task by task.
    # Tasks on reference/_threads.py's pool, one BLAS thread each, reduced in task order (the sequential sums).
    for value, g in map_tasks(lambda i: _task(features(backbone, params, tasks[i], f"tasks[{i}]"), tasks[i], n_classes,
                                              True), range(len(tasks)), work=work(backbone.n_params, tasks)):
        total = total + value
        grads = accumulate(grads, g)
    m = len(tasks)
    return as_scalar(total / m), [g / m for g in grads]


__all__ = ["check_arguments", "loss", "loss_and_grad"]
