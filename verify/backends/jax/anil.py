"""ANIL in JAX (Raghu et al. 2020, "Rapid Learning or Feature Reuse? Towards Understanding the Effectiveness of MAML").

As MAML, but the inner loop adapts only the head ``(W_L, b_L)``: the inner
gradient is ``jax.grad`` with respect to the head alone, with the body held
at ``theta``. The meta-gradient is ``jax.value_and_grad`` of the meta-loss
with respect to *all* parameters, so it contains the body/head cross second
derivatives. Mirrors ``reference.anil``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from reference import anil as reference_anil
from reference.tasks import Task
from verify.backends.jax import inner_optim
from verify.backends.jax._inner import setup_checked, sgd_adapt
from verify.backends.jax._model import Params, _loss_from_key, cached, maybe_jit, task_mean, to_jax_scalar, to_numpy


def _head_indices(key: tuple) -> tuple[int, ...]:
    if key[0] == "network":  # reference.nets.Network: the last Linear's tensors, recorded in the key
        return tuple(key[3])
    n_tensors = (len(key[0]) - 1) * (2 if key[3] else 1)
    k = 2 if key[3] else 1
    return tuple(range(n_tensors - k, n_tensors))


@cached
def _build(key: tuple, steps: int, with_grad: bool, jit: bool):
    loss = _loss_from_key(key)
    head = _head_indices(key)

    def task_loss(task: Task, params: Params, inner_lr: jax.Array) -> jax.Array:
        lrs = [inner_lr if i in head else None for i in range(len(params))]
        adapted = sgd_adapt(loss, params, task.x_support, task.y_support, lrs, steps)
        return loss(adapted, task.x_query, task.y_query)

    def meta_loss(params: Params, batch: Any, inner_lr: jax.Array) -> jax.Array:
        return task_mean(task_loss, batch, params, inner_lr)

    return maybe_jit(jax.value_and_grad(meta_loss) if with_grad else meta_loss, jit)


def _rates(model: Any, alpha: float) -> list[Any]:
    """The head's tensors adapted at ``alpha``, the body's not (``None``): the optimiser loop's rates."""
    return [alpha if i in model.head_indices else None for i in range(len(model.shapes))]


def meta_loss(model: Any, params: Sequence[Any], tasks: Sequence[Any], inner_lr: float, inner_steps: int, *,
              dtype: str = "float64", jit: bool = False, inner_optimizer: Any = None) -> float:
    """ANIL meta-loss ``mean_tasks L_q(body, head_K)`` (only the head adapted), computed in JAX."""
    key, p, batch, alpha, steps = setup_checked(reference_anil.check_arguments, model, params, tasks, inner_lr,
                                                inner_steps, dtype, jit)
    if inner_optimizer is not None:
        return inner_optim.meta_loss(model, params, tasks, [_rates(model, alpha)] * steps, steps,
                                     optimizer=inner_optimizer, dtype=dtype, jit=jit)
    lr = to_jax_scalar(alpha, dtype)
    return to_numpy(_build(key, steps, False, jit)(p, batch, lr))


def meta_loss_and_grad(model: Any, params: Sequence[Any], tasks: Sequence[Any], inner_lr: float, inner_steps: int,
                       *, dtype: str = "float64", jit: bool = False,
                       inner_optimizer: Any = None) -> tuple[float, list[Any]]:
    """ANIL meta-loss and its exact gradient w.r.t. every parameter (body and head), by ``jax.value_and_grad``."""
    key, p, batch, alpha, steps = setup_checked(reference_anil.check_arguments, model, params, tasks, inner_lr,
                                                inner_steps, dtype, jit)
    if inner_optimizer is not None:
        loss, grad, _ = inner_optim.shared_rates(model, params, tasks, _rates(model, alpha), steps,
                                                 optimizer=inner_optimizer, dtype=dtype, jit=jit)
        return loss, grad
    lr = to_jax_scalar(alpha, dtype)
    value, grads = _build(key, steps, True, jit)(p, batch, lr)
    return to_numpy(value), to_numpy(grads)


__all__ = ["meta_loss", "meta_loss_and_grad"]
