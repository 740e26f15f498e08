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

from reference import inner_loop
from reference.errors import InvalidInputError
from reference.tasks import Task
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


def check_framework(model: Any, dtype: Any, jit: Any) -> tuple:
    """The JAX limits checked before the reference's argument check: a model JAX can build, ``dtype``, ``jit``."""
    key = spec_key(model)
    check_dtype(dtype)
    check_jit(jit)
    return key


def to_jax(params: list[Any], tasks: list[Task], dtype: str) -> tuple[Params, Any]:
    """Checked ``params`` (real only: the JAX limit) and ``tasks`` in ``dtype``, the batch stacked when possible."""
    if any(np.iscomplexobj(p) for p in params):
        raise InvalidInputError("params are complex; the JAX backend computes in real float32/float64 only")
    return to_jax_params(params, dtype), batch_tasks(to_jax_tasks(tasks, dtype))


def real_inner_lr(inner_lr: Any, checked: Any) -> float:
    """The JAX limit on a step size the reference has checked (``checked``): real only."""
    if isinstance(checked, complex):
        raise InvalidInputError(f"inner_lr={inner_lr!r} must be real for the JAX backend")
    return checked


def check_common(model: Any, params: Any, tasks: Any, inner_steps: Any, dtype: Any, jit: Any):
    """The JAX limits around :func:`reference.inner_loop.check_common`; return ``(key, params, batch, steps)``.

    ``params`` are converted to ``dtype`` and ``batch`` is the meta-batch
    (stacked for ``jax.vmap`` when all tasks have equal shapes).
    """
    key = check_framework(model, dtype, jit)
    params, tasks, steps = inner_loop.check_common(model, params, tasks, inner_steps)
    return (key, *to_jax(params, tasks, dtype), steps)


def setup_checked(check: Any, model: Any, params: Any, tasks: Any, inner_lr: Any, inner_steps: Any, dtype: Any,
                  jit: Any) -> tuple[tuple, Params, Any, float, int]:
    """The JAX limits around a reference check of MAML's arguments (``reference.<alg>.check_arguments``).

    Returns ``(key, params, batch, inner_lr, inner_steps)``; the optimiser argument is left to
    :mod:`verify.backends.jax.inner_optim`, which checks it.
    """
    key = check_framework(model, dtype, jit)
    params, tasks, alpha, steps, _ = check(model, params, tasks, inner_lr, inner_steps)
    alpha = real_inner_lr(inner_lr, alpha)
    return (key, *to_jax(params, tasks, dtype), alpha, steps)


__all__ = ["Task", "check_common", "check_framework", "real_inner_lr", "setup_checked", "sgd_adapt", "to_jax"]
