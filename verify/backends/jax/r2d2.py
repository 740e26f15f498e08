"""R2-D2 in JAX (Bertinetto, Henriques, Torr & Vedaldi 2019, "Meta-learning with differentiable closed-form solvers").

Per task: ``Z = f(x_support)`` (a ones column appended when ``bias_column``),
``Y`` the one-hot labels (``jax.nn.one_hot``; the targets in the regression
variant), both divided by ``sqrt(n)`` when ``normalize``; ridge weights

* primal ``W = jnp.linalg.solve(Z^T Z + lam I, Z^T Y)``,
* dual (Woodbury) ``W = Z^T jnp.linalg.solve(Z Z^T + lam I, Y)``;

query logits ``scale * Z_q W + offset`` (``Z_q`` never normalised), loss
``ce`` (``mse`` in the regression variant), mean over tasks. The
meta-gradient w.r.t. the backbone parameters, ``lam``, ``scale`` and
``offset`` is ``jax.value_and_grad(..., argnums=(0, 1, 2, 3))``, i.e. JAX
differentiates through ``jnp.linalg.solve``. Mirrors ``reference.r2d2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from reference import r2d2 as reference_r2d2
from reference.features import class_label_check, target_check
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

FORMS = ("primal", "dual")


def ridge_head(zs: jax.Array, y: jax.Array, lam: jax.Array, form: str) -> tuple[jax.Array, jax.Array]:
    """Ridge weights by the primal or the dual (Woodbury) solve; also ``[lambda_min, lambda_max]`` of the system."""
    n, p = zs.shape
    if form == "primal":
        a = zs.T @ zs + lam * jnp.eye(p, dtype=zs.dtype)
        return jnp.linalg.solve(a, zs.T @ y), eig_extremes(a)
    a = zs @ zs.T + lam * jnp.eye(n, dtype=zs.dtype)
    return zs.T @ jnp.linalg.solve(a, y), eig_extremes(a)


@cached
def _build(key: tuple, n_classes: int, bias_column: bool, normalize: bool, form: str, regression: bool,
           with_grad: bool, jit: bool):
    apply = _apply_from_key(key)

    def task_loss(task: Task, params: Params, lam: jax.Array, scale: jax.Array,
                  offset: jax.Array) -> tuple[jax.Array, jax.Array]:
        zs, zq = features(apply, params, task)
        if bias_column:
            zs, zq = append_ones(zs), append_ones(zq)
        y = task.y_support if regression else jax.nn.one_hot(task.y_support, n_classes, dtype=zs.dtype)
        if normalize:
            root = jnp.sqrt(jnp.asarray(zs.shape[0], dtype=zs.dtype))
            zs, y = zs / root, y / root
        w, extremes = ridge_head(zs, y, lam, form)
        out = scale * (zq @ w) + offset
        return loss_from_output("mse" if regression else "ce", out, task.y_query), extremes

    def meta_loss(params: Params, lam: jax.Array, scale: jax.Array, offset: jax.Array,
                  batch: Any) -> tuple[jax.Array, jax.Array]:
        losses, extremes = task_map(task_loss, batch, params, lam, scale, offset)
        return jnp.mean(losses), extremes

    fn = jax.value_and_grad(meta_loss, argnums=(0, 1, 2, 3), has_aux=True) if with_grad else meta_loss
    return maybe_jit(fn, jit)


def _prepare(backbone, params, tasks, n_classes, lam, scale, offset, form, regression, dtype, jit):
    # The reference's check of every argument; JAX adds its own limits (dtype, jit, real values only).
    backbone, params, tasks, n_classes, _, _, _ = reference_r2d2.check_arguments(
        backbone, params, tasks, n_classes, lam, scale, offset, form, regression)
    check = target_check(n_classes) if regression else class_label_check(n_classes)
    key, p, batch = check_backbone_common(backbone, params, tasks, check, dtype, jit)
    return key, p, batch, n_classes, real_hyper(dtype, lam, scale, offset)


def _check_systems(extremes: Any, form: str, dtype: str) -> None:
    name = "Z^T Z + lam I" if form == "primal" else "Z Z^T + lam I"
    check_spd(extremes, dtype, lambda idx: f"{name} of tasks[{idx[0]}]")


def meta_loss(backbone: Any, params: Sequence[Any], tasks: Sequence[Any], n_classes: int, lam: float, scale: float,
              offset: float, *, bias_column: bool = True, normalize: bool = True, form: str = "dual",
              regression: bool = False, dtype: str = "float64", jit: bool = False) -> float:
    """The R2-D2 meta-loss alone (mean query loss over tasks), in JAX; see :func:`meta_loss_and_grad`."""
    key, p, batch, n_classes, hyper = _prepare(backbone, params, tasks, n_classes, lam, scale, offset, form,
                                               regression, dtype, jit)
    value, extremes = _build(key, n_classes, bool(bias_column), bool(normalize), form, bool(regression), False,
                             jit)(p, *hyper, batch)
    _check_systems(extremes, form, dtype)
    check_finite_result(value, "R2-D2 meta-loss")
    return to_numpy(value)


def meta_loss_and_grad(backbone: Any, params: Sequence[Any], tasks: Sequence[Any], n_classes: int, lam: float,
                       scale: float, offset: float, *, bias_column: bool = True, normalize: bool = True,
                       form: str = "dual", regression: bool = False, dtype: str = "float64",
                       jit: bool = False) -> tuple[float, list[Any], dict[str, float]]:
    """R2-D2 meta-loss and its exact gradient by JAX autodiff through ``jnp.linalg.solve``.

    Args:
        backbone: a ``reference.models.MLP`` whose output is the feature vector.
        params: backbone parameters; tasks: integer labels in ``[0, n_classes)``
            (regression: targets ``(n, n_classes)``).
        lam, scale, offset: ridge ``> 0`` and the query-logit affine map.
        bias_column, normalize, form, regression: as ``reference.r2d2``.
        dtype: ``"float64"`` or ``"float32"``; jit: wrap in ``jax.jit``.

    Returns:
        ``(meta_loss, grads, {"lam": ..., "scale": ..., "offset": ...})`` (float64).

    Raises:
        SingularMatrixError: a ridge system is not SPD or is ill-conditioned for ``dtype``.
    """
    key, p, batch, n_classes, hyper = _prepare(backbone, params, tasks, n_classes, lam, scale, offset, form,
                                               regression, dtype, jit)
    (value, extremes), (g_params, g_lam, g_scale, g_offset) = _build(
        key, n_classes, bool(bias_column), bool(normalize), form, bool(regression), True, jit)(p, *hyper, batch)
    _check_systems(extremes, form, dtype)
    check_finite_result(value, "R2-D2 meta-loss")
    return to_numpy(value), to_numpy(g_params), {"lam": to_numpy(g_lam), "scale": to_numpy(g_scale),
                                                 "offset": to_numpy(g_offset)}


__all__ = ["FORMS", "meta_loss", "meta_loss_and_grad", "ridge_head"]
