"""MAML and FOMAML in JAX (Finn et al. 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks").

``p_0 = theta``, ``p_{k+1} = p_k - alpha * grad L_s(p_k)`` (``jax.grad``),
task loss ``L_q(p_K)``, meta-loss the mean over tasks (``jax.vmap`` over a
stacked meta-batch). The meta-gradient is ``jax.value_and_grad`` of the
meta-loss through the unrolled inner loop, which is the exact second-order
``prod_k (I - alpha H_s(p_k)) grad L_q(p_K)``; FOMAML stops the gradient of
the inner gradients (``jax.lax.stop_gradient``), which gives the mean of
``grad L_q(p_K)``. Mirrors ``reference.maml``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from reference import maml as reference_maml
from reference.tasks import Task
from verify.backends.jax import inner_optim
from verify.backends.jax._inner import setup_checked, sgd_adapt
from verify.backends.jax._model import (
    Params,
    _loss_from_key,
    cached,
    maybe_jit,
    task_mean,
    to_jax_scalar,
    to_numpy,
)


@cached
def _build(key: tuple, steps: int, first_order: bool, with_grad: bool, jit: bool):
    loss = _loss_from_key(key)

    def task_loss(task: Task, params: Params, inner_lr: jax.Array) -> jax.Array:
        adapted = sgd_adapt(loss, params, task.x_support, task.y_support, [inner_lr] * len(params), steps,
                            first_order=first_order)
        return loss(adapted, task.x_query, task.y_query)

    def meta_loss(params: Params, batch: Any, inner_lr: jax.Array) -> jax.Array:
        return task_mean(task_loss, batch, params, inner_lr)

    return maybe_jit(jax.value_and_grad(meta_loss) if with_grad else meta_loss, jit)


def meta_loss(model: Any, params: Sequence[Any], tasks: Sequence[Any], inner_lr: float, inner_steps: int, *,
              dtype: str = "float64", jit: bool = False, inner_optimizer: Any = None) -> float:
    """MAML meta-loss ``mean_tasks L_q(p_K)`` computed in JAX.

    Args:
        model: a ``reference.models.MLP`` (the spec of the network and loss).
        params: ``[W1, b1, ..., WL, bL]`` as NumPy arrays.
        tasks: a list of ``reference.tasks.Task``.
        inner_lr: ``alpha``.
        inner_steps: ``K >= 1``.
        dtype: ``"float64"`` or ``"float32"`` (the whole computation runs in it).
        jit: wrap the computation in ``jax.jit``.
        inner_optimizer: ``None`` (SGD) or a ``reference.optimizers`` spec, run by
            :mod:`verify.backends.jax.inner_optim` (compiled per configuration with ``jit``).
    """
    key, p, batch, alpha, steps = setup_checked(reference_maml.check_arguments, model, params, tasks, inner_lr,
                                                inner_steps, dtype, jit)
    if inner_optimizer is not None:
        return inner_optim.meta_loss(model, params, tasks, [[alpha] * len(p)] * steps, steps,
                                     optimizer=inner_optimizer, dtype=dtype, jit=jit)
    lr = to_jax_scalar(alpha, dtype)
    return to_numpy(_build(key, steps, False, False, jit)(p, batch, lr))


def meta_loss_and_grad(model: Any, params: Sequence[Any], tasks: Sequence[Any], inner_lr: float, inner_steps: int,
                       first_order: bool = False, *, dtype: str = "float64",
                       jit: bool = False, inner_optimizer: Any = None) -> tuple[float, list[Any]]:
    """MAML meta-loss and meta-gradient by JAX reverse-mode autodiff through the inner loop.

    Returns ``(loss, grads)`` with ``grads`` a list of float64 NumPy arrays
    shaped like ``params`` (converted from ``dtype``). ``first_order=True``
    gives FOMAML: ``mean_tasks grad L_q(p_K)``. ``inner_optimizer``: as :func:`meta_loss`.
    """
    key, p, batch, alpha, steps = setup_checked(reference_maml.check_arguments, model, params, tasks, inner_lr,
                                                inner_steps, dtype, jit)
    if inner_optimizer is not None:
        loss, grad, _ = inner_optim.shared_rates(model, params, tasks, [alpha] * len(p), steps,
                                                 optimizer=inner_optimizer, first_order=bool(first_order), dtype=dtype,
                                                 jit=jit)
        return loss, grad
    lr = to_jax_scalar(alpha, dtype)
    value, grads = _build(key, steps, bool(first_order), True, jit)(p, batch, lr)
    return to_numpy(value), to_numpy(grads)


__all__ = ["meta_loss", "meta_loss_and_grad"]
