"""Matching networks in JAX, without full-context embeddings.

Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra (2016), "Matching Networks for One Shot Learning", NeurIPS.

Per task: cosine similarities ``C_ij = q_i . s_j / (||q_i|| ||s_j||)``
between query and support features (``jnp.linalg.norm``), attention
``a = jax.nn.softmax(C, axis=1)``, class distribution
``P = a @ one_hot(y_support)``, loss ``-mean log P[i, y_query_i]``; the loss
is the mean over tasks and the gradient w.r.t. the backbone is
``jax.value_and_grad``. Mirrors ``reference.matchingnet``.

The cosines lie in ``[-1, 1]``, so the softmax cannot underflow and the
plain ``log`` of the summed attention is accurate (no log-sum-exp needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from reference import matchingnet as reference_matchingnet
from reference.errors import InvalidInputError
from reference.features import class_label_check
from reference.tasks import Task
from verify.backends.jax._features import check_backbone_common, check_finite_result, features
from verify.backends.jax._model import Params, _apply_from_key, cached, maybe_jit, task_map, to_numpy


@cached
def _build(key: tuple, n_classes: int, with_grad: bool, jit: bool):
    apply = _apply_from_key(key)

    def task_loss(task: Task, params: Params) -> tuple[jax.Array, jax.Array]:
        zs, zq = features(apply, params, task)
        # Smallest feature norm: a zero feature makes the cosine undefined (checked on the host).
        min_norm = jax.lax.stop_gradient(jnp.minimum(jnp.min(jnp.sum(zs * zs, axis=1)),
                                                     jnp.min(jnp.sum(zq * zq, axis=1))))
        sh = zs / jnp.linalg.norm(zs, axis=1, keepdims=True)
        qh = zq / jnp.linalg.norm(zq, axis=1, keepdims=True)
        attention = jax.nn.softmax(qh @ sh.T, axis=1)
        probs = attention @ jax.nn.one_hot(task.y_support, n_classes, dtype=zs.dtype)
        picked = jnp.take_along_axis(probs, task.y_query[:, None], axis=1)
        return -jnp.mean(jnp.log(picked)), min_norm

    def loss(params: Params, batch: Any) -> tuple[jax.Array, jax.Array]:
        losses, min_norms = task_map(task_loss, batch, params)
        return jnp.mean(losses), min_norms

    return maybe_jit(jax.value_and_grad(loss, has_aux=True) if with_grad else loss, jit)


# A squared feature norm at or below this cannot be inverted safely (as reference.matchingnet).
_TINY_NORM_SQ = {dt: float(np.finfo(dt).tiny) ** 0.5 for dt in ("float64", "float32")}


def _prepare(backbone, params, tasks, n_classes, dtype, jit):
    # The reference's check of every argument (every query class has a support example); JAX adds dtype, jit, real.
    backbone, params, tasks, n_classes = reference_matchingnet.check_arguments(backbone, params, tasks, n_classes)
    key, p, batch = check_backbone_common(backbone, params, tasks, class_label_check(n_classes), dtype, jit)
    return key, p, batch, n_classes


def _check_norms(min_norms: Any, dtype: str) -> None:
    norms = np.asarray(min_norms, dtype=np.float64)
    bad = ~(norms > _TINY_NORM_SQ[dtype])
    if np.any(bad):
        i = int(np.argmax(bad))
        raise InvalidInputError(
            f"a backbone feature of tasks[{i}] is the zero vector (norm^2 = {norms[i]:.3g}): its cosine similarity "
            "is undefined; change the backbone so that no feature vanishes"
        )


def loss(backbone: Any, params: Sequence[Any], tasks: Sequence[Any], n_classes: int, *, dtype: str = "float64",
         jit: bool = False) -> float:
    """The matching-network loss alone (mean over tasks), in JAX."""
    key, p, batch, n_classes = _prepare(backbone, params, tasks, n_classes, dtype, jit)
    value, min_norms = _build(key, n_classes, False, jit)(p, batch)
    _check_norms(min_norms, dtype)
    check_finite_result(value, "matching-network loss")
    return to_numpy(value)


def loss_and_grad(backbone: Any, params: Sequence[Any], tasks: Sequence[Any], n_classes: int, *,
                  dtype: str = "float64", jit: bool = False) -> tuple[float, list[Any]]:
    """Matching-network loss and its gradient w.r.t. the backbone parameters, by ``jax.value_and_grad``."""
    key, p, batch, n_classes = _prepare(backbone, params, tasks, n_classes, dtype, jit)
    (value, min_norms), grads = _build(key, n_classes, True, jit)(p, batch)
    _check_norms(min_norms, dtype)
    check_finite_result(value, "matching-network loss")
    return to_numpy(value), to_numpy(grads)


__all__ = ["loss", "loss_and_grad"]
