"""MAML and ANIL with ``torchopt`` (Ren et al. 2023), the library's documented MAML idiom.

``torchopt.MetaSGD(model, lr)`` is a *differentiable optimiser*: its
``step(loss)`` replaces the module's parameters by ``p - lr * grad`` with the
graph kept (``create_graph=True``). It is plain SGD kept in the graph, not Li et
al.'s Meta-SGD (no learned per-parameter rates). Between tasks the initial
parameters are restored with ``extract_state_dict`` / ``recover_state_dict``,
and each task's query loss is back-propagated (here divided by the number of
tasks: the meta-loss is the mean).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torchopt

from verify.adapters._common import task_loss


def _run(module: torch.nn.Module, model: torch.nn.Module, tasks: Sequence[Any], inner_lr: float,
         inner_steps: int) -> torch.Tensor:
    inner_opt = torchopt.MetaSGD(module, lr=inner_lr)
    net_state = torchopt.extract_state_dict(module, by="reference", detach_buffers=True)
    opt_state = torchopt.extract_state_dict(inner_opt, by="reference")
    total = torch.zeros((), dtype=torch.float64)
    for t in tasks:
        for _ in range(inner_steps):
            inner_opt.step(task_loss(model(t.x_support), t.y_support))
        query = task_loss(model(t.x_query), t.y_query) / len(tasks)
        query.backward()
        total = total + query.detach()
        torchopt.recover_state_dict(module, net_state)
        torchopt.recover_state_dict(inner_opt, opt_state)
    return total


def maml(model: torch.nn.Module, tasks: Sequence[Any], inner_lr: float, inner_steps: int) -> torch.Tensor:
    """MAML: every parameter adapted by the differentiable SGD; gradients left in ``.grad``."""
    return _run(model, model, tasks, inner_lr, inner_steps)


def anil(model: torch.nn.Sequential, tasks: Sequence[Any], inner_lr: float, inner_steps: int) -> torch.Tensor:
    """ANIL: the differentiable SGD over the head ``model[-1]`` only."""
    return _run(model[-1], model, tasks, inner_lr, inner_steps)
