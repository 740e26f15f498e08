"""Meta-SGD in JAX (Li et al. 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning").

The inner step size is a list ``a`` shaped like the parameters:
``p_{k+1} = p_k - a * grad L_s(p_k)`` (elementwise). The meta-gradient with
respect to both ``theta`` and ``a`` is ``jax.value_and_grad(..., argnums=(0, 1))``
through the unrolled inner loop. Mirrors ``reference.metasgd``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from reference.errors import InvalidInputError
from reference.metasgd import check_lrs
from reference.tasks import Task
from verify.backends.jax import inner_optim
from verify.backends.jax._inner import check_common, sgd_adapt
from verify.backends.jax._model import Params, _loss_from_key, cached, maybe_jit, task_mean, to_jax_params, to_numpy


@cached
def _build(key: tuple, steps: int, with_grad: bool, jit: bool):
    loss = _loss_from_key(key)

    def task_loss(task: Task, params: Params, lrs: Params) -> jax.Array:
        adapted = sgd_adapt(loss, params, task.x_support, task.y_support, lrs, steps)
        return loss(adapted, task.x_query, task.y_query)

    def meta_loss(params: Params, lrs: Params, batch: Any) -> jax.Array:
        return task_mean(task_loss, batch, params, lrs)

    return maybe_jit(jax.value_and_grad(meta_loss, argnums=(0, 1)) if with_grad else meta_loss, jit)


def _check_lrs(model: Any, lrs: Any, dtype: str) -> Params:
    checked = check_lrs(model, lrs)  # the reference's check; the JAX limit (real only) below
    if any(np.iscomplexobj(a) for a in checked):
        raise InvalidInputError("lrs are complex; the JAX backend computes in real float32/float64 only")
    return to_jax_params(checked, dtype)


def meta_loss(model: Any, params: Sequence[Any], lrs: Sequence[Any], tasks: Sequence[Any], inner_steps: int, *,
              dtype: str = "float64", jit: bool = False, inner_optimizer: Any = None) -> float:
    """Meta-SGD meta-loss with per-parameter learning rates ``lrs`` (shaped like ``params``), in JAX."""
    key, p, batch, steps = check_common(model, params, tasks, inner_steps, dtype, jit)
    if inner_optimizer is not None:
        _check_lrs(model, lrs, dtype)
        return inner_optim.meta_loss(model, params, tasks, [list(lrs)] * steps, steps, optimizer=inner_optimizer,
                                     dtype=dtype, jit=jit)
    a = _check_lrs(model, lrs, dtype)
    return to_numpy(_build(key, steps, False, jit)(p, a, batch))


def meta_loss_and_grad(model: Any, params: Sequence[Any], lrs: Sequence[Any], tasks: Sequence[Any],
                       inner_steps: int, *, dtype: str = "float64",
                       jit: bool = False, inner_optimizer: Any = None) -> tuple[float, list[Any], list[Any]]:
    """Meta-SGD meta-loss, its gradient w.r.t. ``params`` and w.r.t. the learning rates ``lrs``."""
    key, p, batch, steps = check_common(model, params, tasks, inner_steps, dtype, jit)
    if inner_optimizer is not None:
        _check_lrs(model, lrs, dtype)
        return inner_optim.shared_rates(model, params, tasks, list(lrs), steps, optimizer=inner_optimizer, dtype=dtype,
                                         jit=jit)
    a = _check_lrs(model, lrs, dtype)
    value, (g_params, g_lrs) = _build(key, steps, True, jit)(p, a, batch)
    return to_numpy(value), to_numpy(g_params), to_numpy(g_lrs)


__all__ = ["meta_loss", "meta_loss_and_grad"]
