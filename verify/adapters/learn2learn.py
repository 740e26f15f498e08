"""MAML, FOMAML, ANIL and Meta-SGD with ``learn2learn`` (Arnold et al. 2020), the library's idiom.

``l2l.algorithms.MAML(model, lr, first_order)`` wraps the model; per task
``learner = maml.clone()`` and ``learner.adapt(loss)`` (an SGD step through
``torch.autograd.grad(create_graph=not first_order)``); the query loss of the
adapted learner is back-propagated to the wrapped model's parameters.
``l2l.algorithms.MetaSGD(model, lr, lrs=...)`` learns per-parameter rates.

learn2learn 0.2.0 does not build from source on Python 3.11 (its Cython
extension includes ``longintrepr.h``, which CPython 3.11 moved); where it is
not importable the adapter is unavailable and the tests skip with that reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import learn2learn as l2l
import torch

from verify.adapters._common import task_loss


def _maml(model: torch.nn.Module, tasks: Sequence[Any], inner_lr: float, inner_steps: int,
          first_order: bool) -> torch.Tensor:
    maml_model = l2l.algorithms.MAML(model, lr=inner_lr, first_order=first_order)
    total = 0.0
    for t in tasks:
        learner = maml_model.clone()
        for _ in range(inner_steps):
            learner.adapt(task_loss(learner(t.x_support), t.y_support))
        total = total + task_loss(learner(t.x_query), t.y_query)
    return total / len(tasks)


def maml(model: torch.nn.Module, tasks: Sequence[Any], inner_lr: float, inner_steps: int) -> torch.Tensor:
    """MAML (second order)."""
    return _maml(model, tasks, inner_lr, inner_steps, first_order=False)


def fomaml(model: torch.nn.Module, tasks: Sequence[Any], inner_lr: float, inner_steps: int) -> torch.Tensor:
    """FOMAML (``first_order=True``)."""
    return _maml(model, tasks, inner_lr, inner_steps, first_order=True)


def anil(model: torch.nn.Sequential, tasks: Sequence[Any], inner_lr: float, inner_steps: int) -> torch.Tensor:
    """ANIL: the body ``model[:-1]`` shared, the head ``model[-1]`` wrapped in ``l2l.algorithms.MAML``."""
    body, head = model[:-1], l2l.algorithms.MAML(model[-1], lr=inner_lr)
    total = 0.0
    for t in tasks:
        learner = head.clone()
        for _ in range(inner_steps):
            learner.adapt(task_loss(learner(body(t.x_support)), t.y_support))
        total = total + task_loss(learner(body(t.x_query)), t.y_query)
    return total / len(tasks)


def metasgd(model: torch.nn.Module, lrs: Sequence[torch.Tensor], tasks: Sequence[Any],
            inner_steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Meta-SGD: ``l2l.algorithms.MetaSGD`` initialised with the given rates; returns ``(loss, grads)``.

    learn2learn wraps the rates in its own ``nn.Parameter`` objects, so the
    gradients are taken with respect to those (``meta.lrs``) and returned.
    """
    meta = l2l.algorithms.MetaSGD(model, lr=1.0, lrs=[lr.detach().clone() for lr in lrs])
    total = 0.0
    for t in tasks:
        learner = meta.clone()
        for _ in range(inner_steps):
            learner.adapt(task_loss(learner(t.x_support), t.y_support))
        total = total + task_loss(learner(t.x_query), t.y_query)
    loss = total / len(tasks)
    grads = torch.autograd.grad(loss, list(model.parameters()) + list(meta.lrs))
    return loss.detach(), list(grads)
