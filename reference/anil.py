"""ANIL ("almost no inner loop") meta-gradients, analytic (Raghu, Raghu, Bengio & Vinyals 2020).

"Rapid Learning or Feature Reuse? Towards Understanding the Effectiveness of
MAML", ICLR 2020. Only the head ``(W_L, b_L)`` adapts in the inner loop; the
meta-gradient is exact with respect to every parameter (CONVENTIONS).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from reference import inner_loop
from reference.tasks import Task

__all__ = ["meta_loss", "meta_loss_and_grad"]


def _lrs(model: Any, inner_lr: Any) -> list[Any]:
    head = set(model.head_indices)
    return [inner_lr if i in head else None for i in range(len(model.shapes))]


def meta_loss(model: Any, params: Sequence[Any], tasks: Sequence[Task], inner_lr: float, inner_steps: int) -> Any:
    """ANIL meta-loss ``(1/T) sum_t L_q^t(p_K^t)`` with only the head adapted.

    ``p_{k+1} = p_k - alpha P grad L_s(p_k)``, ``P`` the projection onto the
    head parameters ``model.head_indices``; the body stays at ``theta``.
    Arguments as :func:`reference.maml.meta_loss`.
    """
    params, tasks, steps = inner_loop.check_common(model, params, tasks, inner_steps)
    alpha = inner_loop.check_inner_lr(inner_lr)
    return inner_loop.meta_loss(model, params, tasks, _lrs(model, alpha), steps)


def meta_loss_and_grad(
    model: Any, params: Sequence[Any], tasks: Sequence[Task], inner_lr: float, inner_steps: int
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
    params, tasks, steps = inner_loop.check_common(model, params, tasks, inner_steps)
    alpha = inner_loop.check_inner_lr(inner_lr)
    loss, grad, _ = inner_loop.meta_loss_and_grad(model, params, tasks, _lrs(model, alpha), steps)
    return loss, grad
