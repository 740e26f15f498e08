"""MAML and first-order MAML in PyTorch (Finn, Abbeel & Levine 2017, ICML).

"Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks".
Practitioner implementation: ``torch.autograd.grad(..., create_graph=True)``
through the ``K`` inner steps, then one reverse pass over the query loss.
Mirrors ``reference.maml``; conventions: ``shared/CONVENTIONS.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from reference import maml as reference_maml
from reference.tasks import Task
from verify.backends.torch import _inner, inner_optim
from verify.backends.torch._model import scalar, tf32, to_numpy

__all__ = ["adapt", "meta_loss", "meta_loss_and_grad"]


def adapt(model: Any, params: Sequence[Any], task: Task, inner_lr: float, inner_steps: int, *,
          dtype: str = "float64", device: str = "cpu", allow_tf32: bool = False) -> list[np.ndarray]:
    """The adapted parameters ``p_K`` of one task: ``p_{k+1} = p_k - inner_lr * grad L_s(p_k)``."""
    with tf32(allow_tf32):
        fm, theta, tasks, alpha, steps = _inner.setup_checked(reference_maml.check_arguments, model, params, [task],
                                                              inner_lr, inner_steps, dtype, device)
        p = _inner.adapt(fm, theta, tasks[0], [alpha] * len(theta), steps, first_order=True)
        return [to_numpy(q) for q in p]


def meta_loss(model: Any, params: Sequence[Any], tasks: Sequence[Task], inner_lr: float, inner_steps: int, *,
              dtype: str = "float64", device: str = "cpu", allow_tf32: bool = False,
              inner_optimizer: Any = None) -> float:
    """MAML meta-loss ``(1/T) sum_t L_q^t(p_K^t)``, ``p_0 = theta``, ``p_{k+1} = p_k - alpha grad L_s^t(p_k)``.

    Args:
        model: a ``reference.models.MLP`` used as the model spec.
        params: ``theta`` as NumPy arrays in CONVENTIONS order.
        tasks: list of ``reference.tasks.Task``.
        inner_lr: ``alpha``.
        inner_steps: ``K >= 1``.
        dtype: ``"float64"`` or ``"float32"`` (the whole computation runs in it).
        device: ``"cpu"`` or ``"cuda"``.
        allow_tf32: allow TF32 matmuls on CUDA for the call (float32 only has an effect).
        inner_optimizer: ``None`` (SGD) or a ``reference.optimizers`` spec, run by
            :mod:`verify.backends.torch.inner_optim` (``p_{k+1} = p_k - alpha d_k``).
    """
    with tf32(allow_tf32):
        fm, theta, ttasks, alpha, steps = _inner.setup_checked(reference_maml.check_arguments, model, params, tasks,
                                                               inner_lr, inner_steps, dtype, device)
        if inner_optimizer is not None:
            return inner_optim.meta_loss(model, params, tasks, [[alpha] * len(theta)] * steps, steps,
                                         optimizer=inner_optimizer, dtype=dtype, device=device)
        return scalar(_inner.meta_loss(fm, theta, ttasks, [alpha] * len(theta), steps))


def meta_loss_and_grad(model: Any, params: Sequence[Any], tasks: Sequence[Task], inner_lr: float, inner_steps: int,
                       first_order: bool = False, *, dtype: str = "float64", device: str = "cpu",
                       allow_tf32: bool = False, inner_optimizer: Any = None) -> tuple[float, list[np.ndarray]]:
    """MAML meta-loss and meta-gradient by autograd through the inner loop.

    Exact (second order): ``(I - alpha H_s(p_0)) ... (I - alpha H_s(p_{K-1})) grad L_q(p_K)``,
    averaged over tasks, obtained by differentiating the unrolled loop built
    with ``create_graph=True``. ``first_order=True`` (FOMAML) builds the inner
    gradients without a graph, giving ``mean_t grad L_q^t(p_K^t)``.

    Returns:
        ``(meta_loss, grad)``: a float and float64 arrays shaped like ``params``
        (computed in ``dtype``).
    """
    with tf32(allow_tf32):
        fm, theta, ttasks, alpha, steps = _inner.setup_checked(reference_maml.check_arguments, model, params, tasks,
                                                               inner_lr, inner_steps, dtype, device)
        if inner_optimizer is not None:
            loss, grad, _ = inner_optim.shared_rates(model, params, tasks, [alpha] * len(theta), steps,
                                                     optimizer=inner_optimizer, first_order=bool(first_order),
                                                     dtype=dtype, device=device)
            return loss, grad
        loss, grads = _inner.meta_loss_and_grad(fm, theta, ttasks, [alpha] * len(theta), steps,
                                                first_order=bool(first_order))
        return scalar(loss), [to_numpy(g) for g in grads]
