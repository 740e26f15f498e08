"""Matching networks (no full-context embeddings): cosine attention over the support set.

Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra (2016), "Matching
Networks for One Shot Learning", NeurIPS. Per ``shared/CONVENTIONS.md``, for
one task with backbone ``f``, query ``q_i = f(xq_i)`` and support
``s_j = f(xs_j)``:

* ``C_ij = cos(q_i, s_j) = q_i . s_j / (||q_i|| ||s_j||)``,
* attention ``a_ij = softmax_j(C_ij)``, class distribution
  ``P_ik = sum_j a_ij [y_j = k]``,
* loss ``-mean_i log P_{i, y_i}``.

Computed stably as ``log P_{i,y} = logsumexp_{j: y_j = y}(C_ij) -
logsumexp_j(C_ij)``. The loss is the mean over tasks. Gradient, with
``m_ij = [y_j = yq_i]``, ``a~_ij`` the softmax restricted to the true class:

* ``dL/dC_ij = (a_ij - a~_ij) / n_q``,
* with ``q^ = q / ||q||``: ``dL/dq^ = G_C s^``, ``dL/ds^ = G_C^T q^``, and
  ``dL/dx = (dL/dx^ - (dL/dx^ . x^) x^) / ||x||`` (the normalisation's VJP).

The norms are ``sqrt(x . x)`` (no ``abs``), so complex step applies. A zero
feature vector makes the cosine undefined, and a query whose class has no
support example has probability 0 (infinite loss): both are errors.
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
from reference.models import MLP
from reference.tasks import Task

Params = list[np.ndarray]
# A squared norm at or below this (about 1e-154 squared) cannot be inverted without overflow.
_TINY_NORM_SQ = float(np.finfo(np.float64).tiny) ** 0.5


def check_arguments(backbone: Any, params: Any, tasks: Any, n_classes: Any) -> tuple[MLP, Params, list[Task], int]:
    """Validate Matching networks' arguments; return ``(backbone, params, tasks, n_classes)`` checked.

    The backends call this check and add only their framework's limits.

    Raises:
        InvalidInputError: a bad backbone or params, labels out of ``[0, n_classes)``, or
            a query class without a support example.
    """
    backbone = check_backbone(backbone)
    params = backbone.check_params(params)
    n_classes = check_n_classes(n_classes)
    tasks = check_feature_tasks(backbone, tasks, class_label_check(n_classes))
    for i, task in enumerate(tasks):
        missing = np.setdiff1d(task.y_query, task.y_support)
        if missing.size:
            raise InvalidInputError(
                f"tasks[{i}].y_query has class {int(missing[0])}, which has no example in tasks[{i}].y_support: "
                "its attention probability is 0 and the loss is infinite; give every query class a support example"
            )
    return backbone, params, tasks, n_classes


def _normalise(X: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    sq = np.sum(X * X, axis=1)
    bad = np.real(sq) <= _TINY_NORM_SQ
    if np.any(bad):
        row = int(np.argmax(bad))
        raise InvalidInputError(
            f"the backbone feature of {where}[{row}] is the zero vector (norm^2 = {np.real(sq[row]):.3g}): "
            "its cosine similarity is undefined; change the backbone (e.g. a bias, or a non-relu output) "
            "so that no feature vanishes"
        )
    norm = np.sqrt(sq)
    return X / norm[:, None], norm


def _lse(C: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise logsumexp and softmax of ``C`` restricted to ``mask`` (complex safe: max on the real part)."""
    real = np.real(C) if mask is None else np.where(mask, np.real(C), -np.inf)
    m = np.max(real, axis=1, keepdims=True)
    e = np.exp(C - m)
    if mask is not None:
        e = np.where(mask, e, 0.0)
    total = np.sum(e, axis=1, keepdims=True)
    return (m + np.log(total))[:, 0], e / total


def _task(feats: TaskFeatures, task: Task, where: str, need_grad: bool):
    qh, qn = _normalise(feats.query, f"{where}.x_query")
    sh, sn = _normalise(feats.support, f"{where}.x_support")
    C = qh @ sh.T
    mask = task.y_query[:, None] == task.y_support[None, :]
    lse_all, a = _lse(C)
    lse_true, a_true = _lse(C, mask)
    nq = C.shape[0]
    value = np.sum(lse_all - lse_true) / nq
    if not need_grad:
        return value, None
    G_C = (a - a_true) / nq
    G_qh, G_sh = G_C @ sh, G_C.T @ qh
    G_q = (G_qh - np.sum(G_qh * qh, axis=1, keepdims=True) * qh) / qn[:, None]
    G_s = (G_sh - np.sum(G_sh * sh, axis=1, keepdims=True) * sh) / sn[:, None]
    return value, feats.vjp(G_s, G_q)


def loss(backbone: MLP, params: list[Any], tasks: list[Task], n_classes: int) -> float:
    """The matching-network loss alone (mean over tasks); see :func:`loss_and_grad`."""
    backbone, params, tasks, n_classes = check_arguments(backbone, params, tasks, n_classes)
    total = 0.0
    if isinstance(backbone, MLP):  # stacked blocks of tasks through the shared backbone
        for values, _ in stacked_task_map(backbone, params, tasks,
                                          lambda f, i: _task(f, tasks[i], f"tasks[{i}]", False)[0], need_grad=False):
            for value in values:
                total = total + value
        return as_scalar(total / len(tasks))
    for value in map_tasks(lambda i: _task(TaskFeatures(backbone, params, tasks[i], f"tasks[{i}]"), tasks[i],
                                           f"tasks[{i}]", False)[0], range(len(tasks)),
                           work=work(backbone.n_params, tasks)):
        total = total + value
    return as_scalar(total / len(tasks))


def loss_and_grad(backbone: MLP, params: list[Any], tasks: list[Task], n_classes: int, *,
                  features: Callable[..., TaskFeatures] = TaskFeatures) -> tuple[float, Params]:
    """Matching-network loss and its exact gradient w.r.t. the backbone (Vinyals et al. 2016).

    Args:
        backbone: an MLP whose output is the feature vector.
        params: the backbone parameters.
        tasks: list of :class:`reference.tasks.Task`, integer labels in ``[0, n_classes)``.
        n_classes: classes per task (labels are validated against it).

        features: the per-task feature factory ``features(backbone, params, task, where)``
            (default :class:`reference.features.TaskFeatures`); the audit's diagnosis passes one
            whose VJP drops the support branch (the "support detached" bug).

    Returns:
        ``(loss, grads)``.

    Raises:
        InvalidInputError: bad arguments, a zero feature vector, a query class
            absent from the support set, non-finite features.
    """
    backbone, params, tasks, n_classes = check_arguments(backbone, params, tasks, n_classes)
    total, grads = 0.0, None
    m = len(tasks)
    if features is TaskFeatures and isinstance(backbone, MLP):
        # Stacked blocks of tasks: one forward pass and one VJP per block (reference.features.stacked_task_map).
        for values, g in stacked_task_map(backbone, params, tasks,
                                          lambda f, i: _task(f, tasks[i], f"tasks[{i}]", True)[0], need_grad=True):
            for value in values:
                total = total + value
            grads = accumulate(grads, g)
        return as_scalar(total / m), [g / m for g in grads]
    # A custom feature factory (the audit's diagnosis) or a Network backbone: task by task.
    # Tasks on reference/_threads.py's pool, one BLAS thread each, reduced in task order (the sequential sums).
    for value, g in map_tasks(lambda i: _task(features(backbone, params, tasks[i], f"tasks[{i}]"), tasks[i],
                                              f"tasks[{i}]", True), range(len(tasks)),
                              work=work(backbone.n_params, tasks)):
        total = total + value
        grads = accumulate(grads, g)
    m = len(tasks)
    return as_scalar(total / m), [g / m for g in grads]


__all__ = ["check_arguments", "loss", "loss_and_grad"]
