"""MAML, FOMAML and ANIL with ``higher`` (Grefenstette et al. 2019), the library's documented idiom.

``higher.innerloop_ctx(model, opt)`` yields a functional copy ``fmodel`` and a
differentiable optimiser ``diffopt``; ``diffopt.step(loss)`` makes an SGD step
that stays in the autograd graph. ``copy_initial_weights=False`` is what MAML
needs: with the default ``True`` the initial fast weights are *copies* cut
from ``model.parameters()``, so no meta-gradient reaches the model (the audit
names that bug "disconnected").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import higher
import torch

from verify.adapters._common import accumulate_grad, task_loss


def maml(model: torch.nn.Module, tasks: Sequence[Any], inner_lr: float, inner_steps: int) -> torch.Tensor:
    """MAML meta-loss ``mean_t L_q(p_K)``; autograd through ``diffopt.step`` gives the exact meta-gradient."""
    opt = torch.optim.SGD(model.parameters(), lr=inner_lr)
    total = 0.0
    for t in tasks:
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(inner_steps):
                diffopt.step(task_loss(fmodel(t.x_support), t.y_support))
            total = total + task_loss(fmodel(t.x_query), t.y_query)
    return total / len(tasks)


def fomaml(model: torch.nn.Module, tasks: Sequence[Any], inner_lr: float, inner_steps: int) -> torch.Tensor:
    """FOMAML: ``track_higher_grads=False``; the query gradient at the adapted weights goes to ``.grad``."""
    opt = torch.optim.SGD(model.parameters(), lr=inner_lr)
    params = list(model.parameters())
    total = 0.0
    for t in tasks:
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, track_higher_grads=False) as (fmodel,
                                                                                                        diffopt):
            for _ in range(inner_steps):
                diffopt.step(task_loss(fmodel(t.x_support), t.y_support))
            query = task_loss(fmodel(t.x_query), t.y_query)
            accumulate_grad(params, torch.autograd.grad(query, list(fmodel.parameters())), 1.0 / len(tasks))
            total += float(query.detach())
    return torch.tensor(total / len(tasks), dtype=torch.float64)


def anil(model: torch.nn.Sequential, tasks: Sequence[Any], inner_lr: float, inner_steps: int) -> torch.Tensor:
    """ANIL: the inner SGD has learning rate 0 on the body and ``inner_lr`` on the head (``model[-1]``)."""
    head = list(model[-1].parameters())
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    opt = torch.optim.SGD([{"params": body, "lr": 0.0}, {"params": head, "lr": inner_lr}], lr=inner_lr)
    total = 0.0
    for t in tasks:
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(inner_steps):
                diffopt.step(task_loss(fmodel(t.x_support), t.y_support))
            total = total + task_loss(fmodel(t.x_query), t.y_query)
    return total / len(tasks)
