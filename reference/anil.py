"""ANIL ("almost no inner loop") meta-gradients, analytic (Raghu, Raghu, Bengio & Vinyals 2020).

"Rapid Learning or Feature Reuse? Towards Understanding the Effectiveness of
MAML", ICLR 2020. Only the head ``(W_L, b_L)`` adapts in the inner loop; the
meta-gradient is exact with respect to every parameter (CONVENTIONS).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from reference import inner_loop, inner_optim
from reference.maml import check_arguments  # ANIL takes MAML's arguments
from reference.optimizers import Optimizer
from reference.tasks import Task

__all__ = ["check_arguments", "meta_loss", "meta_loss_and_grad"]


def _lrs(model: Any, inner_lr: Any) -> list[Any]:
    head = set(model.head_indices)
    return [inner_lr if i in head else None for i in range(len(model.shapes))]


def meta_loss(model: Any, params: Sequence[Any], tasks: Sequence[Task], inner_lr: float, inner_steps: int, *,
              inner_optimizer: Optimizer | None = None) -> Any:
    """ANIL meta-loss ``(1/T) sum_t L_q^t(p_K^t)`` with only the head adapted.

    ``p_{k+1} = p_k - alpha P grad L_s(p_k)``, ``P`` the projection onto the
    head parameters ``model.head_indices``; the body stays at ``theta``.
    Arguments as :func:`reference.maml.meta_loss` (``inner_optimizer`` acts on the head only).
    """
    params, tasks, alpha, steps, opt = check_arguments(model, params, tasks, inner_lr, inner_steps, inner_optimizer)
    if opt is not None:
        return inner_optim.meta_loss(model, params, tasks, [_lrs(model, alpha)] * steps, steps, optimizer=opt)
    return inner_loop.meta_loss(model, params, tasks, _lrs(model, alpha), steps)


def meta_loss_and_grad(
    model: Any, params: Sequence[Any], tasks: Sequence[Task], inner_lr: float, inner_steps: int, *,
    inner_optimizer: Optimizer | None = None,
) -> tuple[Any, list[np.ndarray]]:
    """ANIL meta-loss and its exact meta-gradient with respect to body and head.

    Per task, with ``P`` the head projection,

        grad = (I - alpha H_s(p_0) P) ... (I - alpha H_s(p_{K-1}) P) grad L_q(p_K),

    computed by reverse accumulation ``v <- v - alpha H_s(p_k) (P v)``. The
    Hessian-vector product has a head-only direction but returns every block,
    so the body receives the cross second derivatives ``d^2 L_s / d body d head``
    (it differs from the plain ``grad L_q`` on the body). Memory ``O(K x head +
    params)``.

    Returns:
        ``(meta_loss, grad)`` with ``grad`` shaped like ``params``.
    """
    params, tasks, alpha, steps, opt = check_arguments(model, params, tasks, inner_lr, inner_steps, inner_optimizer)
    if opt is not None:
        loss, grad, _ = inner_optim.shared_rates(model, params, tasks, _lrs(model, alpha), steps, optimizer=opt)
        return loss, grad
    loss, grad, _ = inner_loop.meta_loss_and_grad(model, params, tasks, _lrs(model, alpha), steps)
    return loss, grad
