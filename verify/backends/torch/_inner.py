"""The inner loop shared by MAML, FOMAML, ANIL and Meta-SGD, written with torch autograd.

This is the loop practitioners write (``higher``/``learn2learn`` style)::

    for k in range(K):
        loss = F.<loss>(model(x_support; p), y_support)
        grads = torch.autograd.grad(loss, p, create_graph=True)
        p = [p_i - a_i * g_i for ...]

With ``create_graph=True`` the adapted weights keep the graph of every inner
gradient, so one reverse pass over the query loss gives the exact
second-order meta-gradient (autograd does the double backward). With
``first_order=True`` the inner gradients are computed without a graph
(``create_graph=False`` returns tensors that do not require grad), so every
step Jacobian ``dp_{k+1}/dp_k`` becomes the identity: FOMAML.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from reference import inner_loop
from reference.errors import InvalidInputError
from reference.tasks import Task
from verify.backends.torch._model import FunctionalMLP, TorchTask, resolve_device, resolve_dtype, to_torch_tasks

# One entry per parameter tensor: None (not adapted), a float or a tensor shaped like the parameter.
LearningRates = Sequence[Any]


def check_device(dtype: Any, device: Any) -> None:
    """The torch limits checked before the reference's argument check: a known ``dtype`` and ``device``."""
    resolve_dtype(dtype), resolve_device(device)


def real_inner_lr(inner_lr: Any, checked: Any) -> float:
    """The torch limit on a step size the reference has checked (``checked``): real arithmetic only."""
    if isinstance(checked, complex):
        raise InvalidInputError(f"inner_lr={inner_lr!r} is complex; the torch backend computes in real arithmetic")
    return float(checked)


def build(model: Any, params: list[Any], tasks: list[Task], dtype: Any, device: Any
          ) -> tuple[FunctionalMLP, list[torch.Tensor], list[TorchTask]]:
    """The functional model, leaf parameters (requiring grad) and tensor tasks of checked arguments."""
    fm = FunctionalMLP(model, dtype, device)
    return fm, fm.tensors(params, requires_grad=True), to_torch_tasks(tasks, fm.dtype, fm.device)


def setup_checked(check: Any, model: Any, params: Any, tasks: Any, inner_lr: Any, inner_steps: Any, dtype: Any,
                  device: Any) -> tuple[FunctionalMLP, list[torch.Tensor], list[TorchTask], float, int]:
    """The torch limits around a reference check of MAML's arguments (``reference.<alg>.check_arguments``).

    Returns ``(fm, theta, tasks, inner_lr, inner_steps)``; the optimiser argument is left to
    :mod:`verify.backends.torch.inner_optim`, which checks it.
    """
    check_device(dtype, device)
    params, tasks, alpha, steps, _ = check(model, params, tasks, inner_lr, inner_steps)
    alpha = real_inner_lr(inner_lr, alpha)
    return (*build(model, params, tasks, dtype, device), alpha, steps)


def setup(model: Any, params: Any, tasks: Any, inner_steps: Any, dtype: Any, device: Any
          ) -> tuple[FunctionalMLP, list[torch.Tensor], list[TorchTask], int]:
    """The torch limits, the reference's shared check (:func:`reference.inner_loop.check_common`), then :func:`build`."""
    check_device(dtype, device)
    params, tasks, steps = inner_loop.check_common(model, params, tasks, inner_steps)
    return (*build(model, params, tasks, dtype, device), steps)


def adapt(fm: FunctionalMLP, params: Sequence[torch.Tensor], task: TorchTask, lrs: LearningRates, steps: int,
          *, first_order: bool = False) -> list[torch.Tensor]:
    """``K`` gradient steps on the support loss, differentiable unless ``first_order``.

    ``p_{k+1} = p_k - a * grad L_s(p_k)``; tensors whose learning rate is
    ``None`` are not adapted (ANIL's body) but stay in the graph.
    """
    p = list(params)
    adapted = [i for i, a in enumerate(lrs) if a is not None]
    for _ in range(steps):
        loss = fm.loss(p, task.x_support, task.y_support)
        grads = torch.autograd.grad(loss, [p[i] for i in adapted], create_graph=not first_order)
        for i, g in zip(adapted, grads):
            p[i] = p[i] - lrs[i] * g
    return p


def meta_loss(fm: FunctionalMLP, theta: Sequence[torch.Tensor], tasks: Sequence[TorchTask], lrs: LearningRates,
              steps: int) -> torch.Tensor:
    """Mean over tasks of ``L_q(p_K)``; the inner gradients carry no graph (value only)."""
    losses = [fm.loss(adapt(fm, theta, t, lrs, steps, first_order=True), t.x_query, t.y_query) for t in tasks]
    return torch.stack(losses).mean().detach()


def meta_loss_and_grad(fm: FunctionalMLP, theta: Sequence[torch.Tensor], tasks: Sequence[TorchTask],
                       lrs: LearningRates, steps: int, *, first_order: bool = False,
                       wrt: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Meta-loss and its gradient w.r.t. ``wrt`` (default ``theta``) by reverse-mode autograd.

    The per-task losses are differentiated one task at a time (the graph of
    one task is freed before the next is built, as a training loop that calls
    ``(loss / T).backward()`` per task would do) and the gradients summed.
    """
    wrt = list(theta) if wrt is None else list(wrt)
    n = len(tasks)
    total = None
    grads: list[torch.Tensor] | None = None
    for t in tasks:
        p = adapt(fm, theta, t, lrs, steps, first_order=first_order)
        loss = fm.loss(p, t.x_query, t.y_query) / n
        g = torch.autograd.grad(loss, wrt, allow_unused=True)
        g = [torch.zeros_like(w) if gi is None else gi for gi, w in zip(g, wrt)]
        grads = g if grads is None else [a + b for a, b in zip(grads, g)]
        total = loss.detach() if total is None else total + loss.detach()
    return total, tuple(grads)
