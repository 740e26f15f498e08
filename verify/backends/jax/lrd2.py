"""LR-D2 in JAX: a logistic-regression head fitted by Newton (IRLS) steps (Bertinetto et al. 2019, section 3.3).

Per binary task: ``Z = f(x_support)`` (ones column when ``bias_column``, no
normalisation), ``K`` IRLS steps from ``w = 0`` on the ridge-regularised
logistic loss ``sum_i bce(z_i^T w; y_i) + lam/2 ||w||^2``::

    s = sigmoid(Z w);  g = Z^T (s - y) + lam w;  H = Z^T diag(s (1 - s)) Z + lam I
    w <- w - jnp.linalg.solve(H, g)

query loss ``bce`` of ``scale * Z_q w + offset``, mean over tasks. The
meta-gradient w.r.t. the backbone, ``lam``, ``scale`` and ``offset`` is
``jax.value_and_grad`` through all ``K`` solves (third derivatives of the
logistic loss enter through ``dH``). Mirrors ``reference.lrd2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from reference import lrd2 as reference_lrd2
from reference.features import binary_label_check
from reference.tasks import Task
from verify.backends.jax._features import append_ones, check_backbone_common, check_finite_result, features, real_hyper
from verify.backends.jax._linalg import check_spd, eig_extremes
from verify.backends.jax._model import (
    Params,
    _apply_from_key,
    cached,
    loss_from_output,
    maybe_jit,
    task_map,
    to_numpy,
)


def irls(z: jax.Array, y: jax.Array, lam: jax.Array, steps: int) -> tuple[jax.Array, jax.Array]:
    """``steps`` Newton steps from ``w = 0``; returns ``w_K`` and ``[lambda_min, lambda_max]`` of each Newton matrix."""
    p = z.shape[1]
    eye = jnp.eye(p, dtype=z.dtype)
    w = jnp.zeros(p, dtype=z.dtype)
    extremes = []
    for _ in range(steps):
        s = jax.nn.sigmoid(z @ w)
        g = z.T @ (s - y) + lam * w
        h = z.T @ ((s * (1 - s))[:, None] * z) + lam * eye
        extremes.append(eig_extremes(h))
        w = w - jnp.linalg.solve(h, g)
    return w, jnp.stack(extremes)


@cached
def _build(key: tuple, steps: int, bias_column: bool, with_grad: bool, jit: bool):
    apply = _apply_from_key(key)

    def task_loss(task: Task, params: Params, lam: jax.Array, scale: jax.Array,
                  offset: jax.Array) -> tuple[jax.Array, jax.Array]:
        zs, zq = features(apply, params, task)
        if bias_column:
            zs, zq = append_ones(zs), append_ones(zq)
        w, extremes = irls(zs, task.y_support, lam, steps)
        return loss_from_output("bce", scale * (zq @ w) + offset, task.y_query), extremes

    def meta_loss(params: Params, lam: jax.Array, scale: jax.Array, offset: jax.Array,
                  batch: Any) -> tuple[jax.Array, jax.Array]:
        losses, extremes = task_map(task_loss, batch, params, lam, scale, offset)
        return jnp.mean(losses), extremes

    fn = jax.value_and_grad(meta_loss, argnums=(0, 1, 2, 3), has_aux=True) if with_grad else meta_loss
    return maybe_jit(fn, jit)


def _prepare(backbone, params, tasks, lam, scale, offset, newton_steps, dtype, jit):
    # The reference's check of every argument; JAX adds its own limits (dtype, jit, real values only).
    backbone, params, tasks, _, _, _, steps = reference_lrd2.check_arguments(
        backbone, params, tasks, lam, scale, offset, newton_steps)
    key, p, batch = check_backbone_common(backbone, params, tasks, binary_label_check, dtype, jit)
    return key, p, batch, steps, real_hyper(dtype, lam, scale, offset)


def _check_systems(extremes: Any, dtype: str) -> None:
    check_spd(extremes, dtype, lambda idx: f"the Newton matrix Z^T S Z + lam I of tasks[{idx[0]}] at step {idx[1]}")


def meta_loss(backbone: Any, params: Sequence[Any], tasks: Sequence[Any], lam: float, scale: float, offset: float,
              newton_steps: int, *, bias_column: bool = True, dtype: str = "float64", jit: bool = False) -> float:
    """The LR-D2 meta-loss alone (mean query ``bce`` over tasks), in JAX."""
    key, p, batch, steps, hyper = _prepare(backbone, params, tasks, lam, scale, offset, newton_steps, dtype, jit)
    value, extremes = _build(key, steps, bool(bias_column), False, jit)(p, *hyper, batch)
    _check_systems(extremes, dtype)
    check_finite_result(value, "LR-D2 meta-loss")
    return to_numpy(value)


def meta_loss_and_grad(backbone: Any, params: Sequence[Any], tasks: Sequence[Any], lam: float, scale: float,
                       offset: float, newton_steps: int, *, bias_column: bool = True, dtype: str = "float64",
                       jit: bool = False) -> tuple[float, list[Any], dict[str, float]]:
    """LR-D2 meta-loss and its exact gradient through ``newton_steps`` IRLS solves, by ``jax.value_and_grad``.

    Returns:
        ``(meta_loss, grads, {"lam": ..., "scale": ..., "offset": ...})`` (float64).

    Raises:
        SingularMatrixError: a Newton matrix is not SPD or is ill-conditioned for ``dtype``.
    """
    key, p, batch, steps, hyper = _prepare(backbone, params, tasks, lam, scale, offset, newton_steps, dtype, jit)
    (value, extremes), (g_params, g_lam, g_scale, g_offset) = _build(key, steps, bool(bias_column), True, jit)(
        p, *hyper, batch)
    _check_systems(extremes, dtype)
    check_finite_result(value, "LR-D2 meta-loss")
    return to_numpy(value), to_numpy(g_params), {"lam": to_numpy(g_lam), "scale": to_numpy(g_scale),
                                                 "offset": to_numpy(g_offset)}


__all__ = ["irls", "meta_loss", "meta_loss_and_grad"]
