"""ANIL in PyTorch (Raghu, Raghu, Bengio & Vinyals 2020, ICLR).

"Rapid Learning or Feature Reuse? Towards Understanding the Effectiveness of
MAML". Only the head ``(W_L, b_L)`` is adapted in the inner loop; the
meta-gradient is exact w.r.t. all parameters (autograd differentiates the
head's inner gradients w.r.t. the body too: the cross second derivatives).
Mirrors ``reference.anil``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from reference import anil as reference_anil
from reference.tasks import Task
from verify.backends.torch import _inner, inner_optim
from verify.backends.torch._model import FunctionalMLP, scalar, tf32, to_numpy

__all__ = ["meta_loss", "meta_loss_and_grad"]


def _lrs(fm: FunctionalMLP, alpha: float) -> list[float | None]:
    return [alpha if i in fm.head_indices else None for i in range(len(fm.shapes))]


def meta_loss(model: Any, params: Sequence[Any], tasks: Sequence[Task], inner_lr: float, inner_steps: int, *,
              dtype: str = "float64", device: str = "cpu", allow_tf32: bool = False,
              inner_optimizer: Any = None) -> float:
    """ANIL meta-loss: as MAML's, with only the head adapted in the inner loop."""
    with tf32(allow_tf32):
        fm, theta, ttasks, alpha, steps = _inner.setup_checked(reference_anil.check_arguments, model, params, tasks,
                                                               inner_lr, inner_steps, dtype, device)
        if inner_optimizer is not None:
            return inner_optim.meta_loss(model, params, tasks, [_lrs(fm, alpha)] * steps, steps,
                                         optimizer=inner_optimizer, dtype=dtype, device=device)
        return scalar(_inner.meta_loss(fm, theta, ttasks, _lrs(fm, alpha), steps))


def meta_loss_and_grad(model: Any, params: Sequence[Any], tasks: Sequence[Task], inner_lr: float, inner_steps: int,
                       *, dtype: str = "float64", device: str = "cpu",
                       allow_tf32: bool = False, inner_optimizer: Any = None) -> tuple[float, list[np.ndarray]]:
    """ANIL meta-loss and its exact meta-gradient w.r.t. body and head.

    ``h_{k+1} = h_k - alpha grad_h L_s(body, h_k)``, task loss ``L_q(body, h_K)``;
    autograd through the ``create_graph=True`` head updates.

    Returns:
        ``(meta_loss, grad)`` with ``grad`` shaped like ``params``.
    """
    with tf32(allow_tf32):
        fm, theta, ttasks, alpha, steps = _inner.setup_checked(reference_anil.check_arguments, model, params, tasks,
                                                               inner_lr, inner_steps, dtype, device)
        if inner_optimizer is not None:
            loss, grad, _ = inner_optim.shared_rates(model, params, tasks, _lrs(fm, alpha), steps,
                                                     optimizer=inner_optimizer, dtype=dtype, device=device)
            return loss, grad
        loss, grads = _inner.meta_loss_and_grad(fm, theta, ttasks, _lrs(fm, alpha), steps)
        return scalar(loss), [to_numpy(g) for g in grads]
