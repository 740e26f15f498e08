"""Newton-MAML in JAX: MAML with a damped-Newton inner step.

``p_{k+1} = p_k - alpha (H_s(p_k) + delta I)^{-1} grad L_s(p_k)`` (CONVENTIONS),
written the way JAX code writes it: the parameters are flattened with
``jax.flatten_util.ravel_pytree``, ``H_s = jax.hessian`` of the support loss,
the step is ``jnp.linalg.solve`` (LU) of the damped Hessian, and the
meta-gradient is ``jax.value_and_grad`` through all of it, so it contains
the third derivatives of ``L_s`` (the derivative of ``jax.hessian`` inside
the differentiated graph). Mirrors ``reference.newton``.

A damped Hessian whose condition number exceeds :data:`MAX_CONDITION` raises
:class:`~reference.errors.SingularMatrixError` (``jnp.linalg.solve`` would
silently return noise or NaN). The condition numbers are computed inside the
(jitted) function from ``jnp.linalg.eigvalsh`` of the stop-gradient'ed matrix
and checked on the host afterwards, since a jitted function cannot raise on
values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from reference import newton as reference_newton
from reference.errors import InvalidInputError, SingularMatrixError
from reference.models import MAX_DENSE_HESSIAN
from reference.tasks import Task
from verify.backends.jax._inner import check_framework, real_inner_lr, to_jax
from verify.backends.jax._model import (
    LossFn,
    Params,
    _loss_from_key,
    cached,
    maybe_jit,
    task_map,
    to_jax_scalar,
    to_numpy,
)

# Largest model whose dense Hessian is formed (as reference.newton.MAX_PARAMS).
MAX_PARAMS = MAX_DENSE_HESSIAN
# reference.newton refuses cond > 1e12 in float64, i.e. cond * eps > 2.2e-4 (fewer than ~4 digits left).
# The same rule in each dtype: float64 1e12, float32 ~1.9e3.
MAX_CONDITION: dict[str, float] = {
    dt: 1e12 * float(np.finfo(np.float64).eps) / float(np.finfo(dt).eps) for dt in ("float64", "float32")
}


def newton_adapt(loss: LossFn, params: Params, x: jax.Array, y: jax.Array, alpha: jax.Array, delta: jax.Array,
                 steps: int) -> tuple[Params, jax.Array]:
    """``steps`` damped Newton steps on ``loss(., x, y)``; returns ``p_K`` and the condition numbers per step."""
    flat, unravel = ravel_pytree(list(params))

    def flat_loss(q: jax.Array) -> jax.Array:
        return loss(unravel(q), x, y)

    grad_fn, hess_fn = jax.grad(flat_loss), jax.hessian(flat_loss)
    eye = jnp.eye(flat.size, dtype=flat.dtype)
    q, conds = flat, []
    for _ in range(steps):
        a = hess_fn(q) + delta * eye
        # Conditioning diagnostic only: no gradient flows through it.
        eig = jnp.abs(jnp.linalg.eigvalsh(jax.lax.stop_gradient(a)))
        conds.append(jnp.max(eig) / jnp.min(eig))
        q = q - alpha * jnp.linalg.solve(a, grad_fn(q))
    return unravel(q), jnp.stack(conds)


@cached
def _build(key: tuple, steps: int, with_grad: bool, jit: bool):
    loss = _loss_from_key(key)

    def task_loss(task: Task, params: Params, alpha: jax.Array, delta: jax.Array) -> tuple[jax.Array, jax.Array]:
        adapted, conds = newton_adapt(loss, params, task.x_support, task.y_support, alpha, delta, steps)
        return loss(adapted, task.x_query, task.y_query), conds

    def meta_loss(params: Params, batch: Any, alpha: jax.Array, delta: jax.Array) -> tuple[jax.Array, jax.Array]:
        losses, conds = task_map(task_loss, batch, params, alpha, delta)
        return jnp.mean(losses), conds

    return maybe_jit(jax.value_and_grad(meta_loss, has_aux=True) if with_grad else meta_loss, jit)


def _check(model, params, tasks, inner_lr, inner_steps, damping, dtype, jit):
    key = check_framework(model, dtype, jit)
    if model.n_params > MAX_PARAMS:  # before the reference's check, so that the advice names this backend's maml
        raise InvalidInputError(
            f"{model!r} has {model.n_params} parameters; Newton-MAML forms dense Hessians and is limited to "
            f"MAX_PARAMS={MAX_PARAMS}. Use maml or a smaller model"
        )
    # The reference's check of every argument; JAX adds real values only, dtype and jit.
    params, tasks, steps, alpha, delta = reference_newton.check_arguments(model, params, tasks, inner_lr, inner_steps,
                                                                         damping)
    alpha = to_jax_scalar(real_inner_lr(inner_lr, alpha), dtype)
    if isinstance(delta, complex):
        raise InvalidInputError(f"damping={damping!r} must be real for the JAX backend")
    p, batch = to_jax(params, tasks, dtype)
    return key, p, batch, steps, alpha, to_jax_scalar(delta, dtype)


def _check_conditioning(conds: jax.Array, damping: Any, dtype: str) -> None:
    conds = np.asarray(conds, dtype=np.float64)  # (n_tasks, K)
    limit = MAX_CONDITION[dtype]
    bad = ~(conds <= limit)  # NaN counts as bad
    if np.any(bad):
        task, step = (int(i) for i in np.argwhere(bad)[0])
        raise SingularMatrixError(
            f"Newton-MAML: the damped support Hessian H + delta*I at task {task}, inner step k={step} is singular "
            f"or ill-conditioned (condition number {conds[task, step]:.3e} > MAX_CONDITION={limit:.3g} for "
            f"{dtype}, delta={damping!r}); increase damping"
        )


def meta_loss(model: Any, params: Sequence[Any], tasks: Sequence[Any], inner_lr: float, inner_steps: int,
              damping: float = 0.0, *, dtype: str = "float64", jit: bool = False) -> float:
    """Newton-MAML meta-loss ``mean_tasks L_q(p_K)`` in JAX.

    Raises:
        SingularMatrixError: a damped Hessian's condition number exceeds ``MAX_CONDITION[dtype]``.
    """
    key, p, batch, steps, alpha, delta = _check(model, params, tasks, inner_lr, inner_steps, damping, dtype, jit)
    value, conds = _build(key, steps, False, jit)(p, batch, alpha, delta)
    _check_conditioning(conds, damping, dtype)
    return to_numpy(value)


def meta_loss_and_grad(model: Any, params: Sequence[Any], tasks: Sequence[Any], inner_lr: float, inner_steps: int,
                       damping: float = 0.0, *, dtype: str = "float64",
                       jit: bool = False) -> tuple[float, list[Any]]:
    """Newton-MAML meta-loss and its exact meta-gradient (third derivatives included) by ``jax.value_and_grad``.

    Raises:
        SingularMatrixError: a damped Hessian's condition number exceeds ``MAX_CONDITION[dtype]``.
        InvalidInputError: bad arguments, or more than ``MAX_PARAMS`` parameters.
    """
    key, p, batch, steps, alpha, delta = _check(model, params, tasks, inner_lr, inner_steps, damping, dtype, jit)
    (value, conds), grads = _build(key, steps, True, jit)(p, batch, alpha, delta)
    _check_conditioning(conds, damping, dtype)
    return to_numpy(value), to_numpy(grads)


__all__ = ["MAX_CONDITION", "MAX_PARAMS", "meta_loss", "meta_loss_and_grad", "newton_adapt"]
