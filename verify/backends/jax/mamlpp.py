"""MAML++ in JAX (Antoniou, Edwards & Storkey 2019, "How to train your MAML", ICLR).

Per-step per-tensor learned learning rates (LSLR) and the multi-step loss
(MSL) by ``jax.value_and_grad`` through the unrolled loop of
:mod:`verify.backends.jax.inner_optim`. Mirrors ``reference.mamlpp``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from reference import mamlpp as _ref
from reference.tasks import Task
from verify.backends.jax import inner_optim

__all__ = ["meta_loss", "meta_loss_and_grad"]


def meta_loss(model: Any, params: Sequence[Any], lrs: Any, tasks: Sequence[Task], inner_steps: int, *,
              weights: Any = None, exclude: Sequence[int] = (), optimizer: Any = None,
              dtype: str = "float64", jit: bool = False) -> float:
    """MAML++ meta-loss ``mean_t sum_k w_k L_q^t(p_k^t)`` (arguments as ``reference.mamlpp.meta_loss``)."""
    sched = _ref.schedule(model, lrs, inner_steps, exclude)
    return inner_optim.meta_loss(model, params, tasks, sched, inner_steps, optimizer=optimizer, weights=weights,
                                 dtype=dtype, jit=jit)


def meta_loss_and_grad(model: Any, params: Sequence[Any], lrs: Any, tasks: Sequence[Task], inner_steps: int, *,
                       weights: Any = None, exclude: Sequence[int] = (), optimizer: Any = None,
                       approximation: Any = None, dtype: str = "float64",
                       jit: bool = False) -> tuple[float, list[np.ndarray], np.ndarray]:
    """MAML++ meta-loss and its gradients w.r.t. ``theta`` and the ``(K, n_tensors)`` rates, by JAX."""
    sched = _ref.schedule(model, lrs, inner_steps, exclude)
    r = inner_optim.meta_loss_and_grad(model, params, tasks, sched, inner_steps, optimizer=optimizer, weights=weights,
                                       approximation=approximation, dtype=dtype, jit=jit)
    grad_lrs = np.array([[0.0 if a is None else float(a) for a in row] for row in r.lrs])
    return r.loss, r.params, grad_lrs
