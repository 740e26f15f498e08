"""Backbone plumbing shared by the JAX R2-D2, LR-D2, prototypical and matching networks.

Arguments are validated with the NumPy reference's own checks
(``reference.features``: backbone, labels, tasks) so both raise the same
errors on bad input; then the parameters and tasks are converted to JAX.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from reference.features import check_backbone, check_feature_tasks
from reference.validation import check_finite_scalar
from reference.errors import InvalidInputError
from reference.tasks import Task
from verify.backends.jax._model import (
    ApplyFn,
    Params,
    batch_tasks,
    check_dtype,
    check_jit,
    spec_key,
    to_jax_params,
    to_jax_scalar,
    to_jax_tasks,
)


def check_backbone_common(backbone: Any, params: Any, tasks: Any, label_check: Callable[..., np.ndarray],
                          dtype: Any, jit: Any) -> tuple[tuple, Params, Task | tuple[Task, ...]]:
    """Validate; return ``(key, params, batch)`` in ``dtype`` (batch stacked for ``jax.vmap`` when possible)."""
    backbone = check_backbone(backbone)
    key = spec_key(backbone)
    check_dtype(dtype)
    check_jit(jit)
    params = backbone.check_params(params)
    if any(np.iscomplexobj(p) for p in params):
        raise InvalidInputError("params are complex; the JAX backend computes in real float32/float64 only")
    tasks = check_feature_tasks(backbone, tasks, label_check)
    return key, to_jax_params(params, dtype), batch_tasks(to_jax_tasks(tasks, dtype))


def check_real(name: str, value: Any, **kwargs: Any) -> float:
    out = check_finite_scalar(name, value, **kwargs)
    if isinstance(out, complex):
        raise InvalidInputError(f"{name}={value!r} must be real for the JAX backend")
    return out


def real_hyper(dtype: str, lam: Any, scale: Any, offset: Any) -> list[Any]:
    """R2-D2's and LR-D2's ``lam``, ``scale``, ``offset`` (checked by the reference) as real JAX scalars."""
    named = (("lam", lam), ("scale", scale), ("offset", offset))
    return [to_jax_scalar(check_real(name, v), dtype) for name, v in named]


def append_ones(z: jax.Array) -> jax.Array:
    """``[Z, 1]``: the bias column of the closed-form heads (in ``Z``'s dtype)."""
    return jnp.concatenate([z, jnp.ones((z.shape[0], 1), dtype=z.dtype)], axis=1)


def features(apply: ApplyFn, params: Params, task: Task) -> tuple[jax.Array, jax.Array]:
    """Backbone features of the support and query inputs of one task.

    Two batches (transductive batch norm, CONVENTIONS' default), or one for a
    ``reference.nets.Network`` made with ``joint_batch()``.
    """
    if getattr(apply, "joint", False):
        n = task.x_support.shape[0]
        out = apply(params, jnp.concatenate([task.x_support, task.x_query], axis=0))
        return out[:n], out[n:]
    return apply(params, task.x_support), apply(params, task.x_query)


def check_finite_result(value: Any, what: str) -> None:
    if not np.all(np.isfinite(np.asarray(value))):
        raise InvalidInputError(
            f"the {what} is not finite (NaN/inf): the backbone features overflowed or a solve failed; "
            "rescale the inputs or the parameters"
        )


__all__ = ["append_ones", "check_backbone_common", "check_finite_result", "check_real", "features", "real_hyper"]
