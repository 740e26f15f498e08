"""Prototypical networks in JAX (Snell, Swersky & Zemel 2017, "Prototypical Networks for Few-shot Learning").

Per task: prototypes ``c_k`` = mean of the support features of class ``k``
(``jax.nn.one_hot(y).T @ Z / counts``), query logits
``-||f(x_q) - c_k||^2`` (broadcast differences, summed over features), loss
``ce``; the loss is the mean over tasks and the gradient w.r.t. the backbone
is ``jax.value_and_grad``. Mirrors ``reference.protonet``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from reference import protonet as reference_protonet
from reference.features import class_label_check
from reference.tasks import Task
from verify.backends.jax._features import check_backbone_common, check_finite_result, features
from verify.backends.jax._model import Params, _apply_from_key, cached, loss_from_output, maybe_jit, task_mean, to_numpy


def squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
    """``D_ij = ||a_i - b_j||^2`` by broadcasting (no ``|a|^2 + |b|^2 - 2 a.b`` cancellation)."""
    return jnp.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=-1)


@cached
def _build(key: tuple, n_classes: int, with_grad: bool, jit: bool):
    apply = _apply_from_key(key)

    def task_loss(task: Task, params: Params) -> jax.Array:
        zs, zq = features(apply, params, task)
        onehot = jax.nn.one_hot(task.y_support, n_classes, dtype=zs.dtype)
        prototypes = (onehot.T @ zs) / jnp.sum(onehot, axis=0)[:, None]
        return loss_from_output("ce", -squared_distances(zq, prototypes), task.y_query)

    def loss(params: Params, batch: Any) -> jax.Array:
        return task_mean(task_loss, batch, params)

    return maybe_jit(jax.value_and_grad(loss) if with_grad else loss, jit)


def _prepare(backbone, params, tasks, n_classes, dtype, jit):
    # The reference's check of every argument (every class has a support example); JAX adds dtype, jit, real.
    backbone, params, tasks, n_classes = reference_protonet.check_arguments(backbone, params, tasks, n_classes)
    key, p, batch = check_backbone_common(backbone, params, tasks, class_label_check(n_classes), dtype, jit)
    return key, p, batch, n_classes


def loss(backbone: Any, params: Sequence[Any], tasks: Sequence[Any], n_classes: int, *, dtype: str = "float64",
         jit: bool = False) -> float:
    """The prototypical-network loss alone (mean over tasks), in JAX."""
    key, p, batch, n_classes = _prepare(backbone, params, tasks, n_classes, dtype, jit)
    value = _build(key, n_classes, False, jit)(p, batch)
    check_finite_result(value, "prototypical-network loss")
    return to_numpy(value)


def loss_and_grad(backbone: Any, params: Sequence[Any], tasks: Sequence[Any], n_classes: int, *,
                  dtype: str = "float64", jit: bool = False) -> tuple[float, list[Any]]:
    """Prototypical-network loss and its gradient w.r.t. the backbone parameters, by ``jax.value_and_grad``."""
    key, p, batch, n_classes = _prepare(backbone, params, tasks, n_classes, dtype, jit)
    value, grads = _build(key, n_classes, True, jit)(p, batch)
    check_finite_result(value, "prototypical-network loss")
    return to_numpy(value), to_numpy(grads)


__all__ = ["loss", "loss_and_grad", "squared_distances"]
