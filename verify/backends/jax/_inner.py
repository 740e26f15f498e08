"""The inner loop shared by MAML, FOMAML, ANIL, Meta-SGD and Reptile (JAX).

``p_{k+1} = p_k - a * grad L_s(p_k)`` for ``K`` steps, with one step size per
parameter tensor: a scalar ``alpha`` everywhere (MAML), ``alpha`` on the head
and ``None`` (not adapted) on the body (ANIL), an array shaped like the tensor
(Meta-SGD). The loop is ``jax.lax.fori_loop`` with a static trip count, which
JAX lowers to a ``scan`` and differentiates in reverse mode through every
step: the meta-gradient is the exact one, second-order terms included,
unless ``first_order`` puts ``jax.lax.stop_gradient`` on the inner gradients
(FOMAML: every step Jacobian replaced by the identity).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from reference.validation import check_finite_scalar, check_positive_int
from reference.errors import InvalidInputError
from reference.tasks import Task, check_tasks
from verify.backends.jax._model import (
    LossFn,
    Params,
    batch_tasks,
    check_dtype,
    check_jit,
    spec_key,
    to_jax_params,
    to_jax_tasks,
)


def sgd_adapt(loss: LossFn, params: Params, x: jax.Array, y: jax.Array, lrs: Sequence[Any], steps: int, *,
              first_order: bool = False) -> Params:
    """``steps`` SGD steps on ``loss(., x, y)`` from ``params`` with per-tensor step sizes ``lrs``.

    ``lrs[i]`` is ``None`` for a tensor that is not adapted (its inner
    gradient is not even computed, as ANIL code does), else a scalar or an
    array shaped like ``params[i]``.
    """
    adapted = [i for i, a in enumerate(lrs) if a is not None]

    def adapted_loss(sub: Params, p: Params) -> jax.Array:
        full = list(p)
        for i, s in zip(adapted, sub):
            full[i] = s
        return loss(full, x, y)

    grad_fn = jax.grad(adapted_loss)

    def step(_: Any, p: Params) -> Params:
        g = grad_fn([p[i] for i in adapted], p)
        if first_order:
            g = jax.lax.stop_gradient(g)
        new = list(p)
        for i, gi in zip(adapted, g):
            new[i] = p[i] - lrs[i] * gi
        return new

    p = list(params)
    for k in range(steps):
        p = step(k, p)
    return p


def check_common(model: Any, params: Any, tasks: Any, inner_steps: Any, dtype: Any, jit: Any):
    """Validate the shared arguments; return ``(key, params, batch, steps)`` ready for JAX.

    ``params`` are converted to ``dtype`` and ``batch`` is the meta-batch
    (stacked for ``jax.vmap`` when all tasks have equal shapes).
    """
    key = spec_key(model)
    check_dtype(dtype)
    check_jit(jit)
    params = model.check_params(params)
    if any(np.iscomplexobj(p) for p in params):
        raise InvalidInputError("params are complex; the JAX backend computes in real float32/float64 only")
    tasks = check_tasks(model, tasks)
    steps = check_positive_int("inner_steps", inner_steps, hint="; the inner loop needs at least one step (K >= 1)")
    return key, to_jax_params(params, dtype), batch_tasks(to_jax_tasks(tasks, dtype)), steps


def check_inner_lr(inner_lr: Any) -> float:
    value = check_finite_scalar("inner_lr", inner_lr, hint="; pass a step size such as inner_lr=0.01")
    if isinstance(value, complex):
        raise InvalidInputError(f"inner_lr={inner_lr!r} must be real for the JAX backend")
    return value


__all__ = ["Task", "check_common", "check_inner_lr", "sgd_adapt"]
