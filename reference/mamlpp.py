"""MAML++ meta-gradients, analytic (Antoniou, Edwards & Storkey 2019).

"How to train your MAML", ICLR 2019. Conventions: ``shared/CONVENTIONS.md``
("Inner-loop optimisers"). Of MAML++'s changes, the ones that change the
meta-gradient are:

* **LSLR** (learned per-layer per-step learning rates): ``a[k, i]`` is the
  step size of parameter tensor ``i`` at step ``k``, learned by the outer loop;
  :func:`meta_loss_and_grad` returns ``dL/da`` (shape ``(K, n_tensors)``).
* **MSL** (multi-step loss): ``L = sum_{k=1}^{K} w_k L_q(p_k)`` with given
  weights (:func:`msl_weights` is the paper's annealing schedule).
* Tensors kept out of the inner loop (``exclude``: batch-norm parameters in
  MAML++'s backbones; any tensor of the MLP here): they get no inner update
  but a meta-gradient through every ``p_k``.

The loop and its adjoint are :mod:`reference.inner_optim`'s (any inner
optimiser; MAML++ itself uses SGD).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from reference import inner_optim
from reference.validation import check_positive_int
from reference.errors import InvalidInputError
from reference.optimizers import Optimizer
from reference.tasks import Task

__all__ = ["meta_loss", "meta_loss_and_grad", "msl_weights", "schedule"]


def msl_weights(inner_steps: int, epoch: int, msl_epochs: int) -> np.ndarray:
    """MAML++'s multi-step loss weights at ``epoch`` (its ``get_per_step_loss_importance_vector``).

    Start uniform (``1/K``); each non-final weight decays by
    ``epoch / (K msl_epochs)`` to a floor ``0.03 / K``; the final weight grows
    by ``epoch (K - 1) / (K msl_epochs)`` up to ``1 - 0.03 (K - 1) / K``.
    """
    steps = check_positive_int("inner_steps", inner_steps)
    epochs = check_positive_int("msl_epochs", msl_epochs)
    epoch = check_positive_int("epoch", epoch, minimum=0)
    w = np.full(steps, 1.0 / steps)
    decay = 1.0 / steps / epochs
    floor = 0.03 / steps
    w[:-1] = np.maximum(w[:-1] - epoch * decay, floor)
    w[-1] = min(w[-1] + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return w


def schedule(model: Any, lrs: Any, inner_steps: int, exclude: Sequence[int] = ()) -> list[list[Any]]:
    """The loop's ``lrs[k][i]`` from MAML++'s ``(K, n_tensors)`` array (``None`` for excluded tensors)."""
    steps = check_positive_int("inner_steps", inner_steps)
    n = len(model.shapes)
    a = np.asarray(lrs)
    if a.shape != (steps, n) or not np.all(np.isfinite(a)):
        raise InvalidInputError(
            f"lrs has shape {a.shape}, expected ({steps}, {n}) finite numbers: one learning rate per inner step "
            f"and parameter tensor, e.g. np.full(({steps}, {n}), 0.1)")
    bad = [i for i in exclude if not (isinstance(i, (int, np.integer)) and 0 <= i < n)]
    if bad:
        raise InvalidInputError(f"exclude={tuple(exclude)!r} holds {bad!r}: expected tensor indices in [0, {n})")
    return [[None if i in exclude else a[k, i][()] for i in range(n)] for k in range(steps)]


def meta_loss(model: Any, params: Sequence[Any], lrs: Any, tasks: Sequence[Task], inner_steps: int, *,
              weights: Any = None, exclude: Sequence[int] = (), optimizer: Optimizer | None = None) -> Any:
    """MAML++ meta-loss ``(1/T) sum_t sum_k w_k L_q^t(p_k^t)``, ``p_{k+1} = p_k - a[k] * d_k`` (forward only).

    Args:
        model, params, tasks: as :func:`reference.maml.meta_loss`.
        lrs: ``(K, n_tensors)`` learning rates (per step, per parameter tensor).
        inner_steps: ``K``.
        weights: ``(K,)`` multi-step loss weights (default: final step only, plain MAML's loss).
        exclude: indices of tensors kept out of the inner loop.
        optimizer: the inner optimiser (default SGD: MAML++).
    """
    sched = schedule(model, lrs, inner_steps, exclude)
    return inner_optim.meta_loss(model, params, tasks, sched, inner_steps, optimizer=optimizer, weights=weights)


def meta_loss_and_grad(model: Any, params: Sequence[Any], lrs: Any, tasks: Sequence[Task], inner_steps: int, *,
                       weights: Any = None, exclude: Sequence[int] = (), optimizer: Optimizer | None = None,
                       approximation: Any = None) -> tuple[Any, list[np.ndarray], np.ndarray]:
    """MAML++ meta-loss and its exact gradients w.r.t. ``theta`` and the ``(K, n_tensors)`` learning rates.

    Per task, with ``bar_p_K = w_K grad L_q(p_K)`` and SGD:
    ``dL/da[k, i] = -<bar_p_{k+1}[i], g_k[i]>``,
    ``bar_p_k = bar_p_{k+1} - H_s(p_k) (a[k] * bar_p_{k+1}) + w_k grad L_q(p_k)``
    (excluded tensors: ``a[k, i] = 0`` in the product), ``dL/dtheta = bar_p_0``.
    Cost per task: ``K`` gradients, ``K`` Hessian-vector products and one query
    gradient per non-zero weight.

    Returns:
        ``(meta_loss, grad_params, grad_lrs)``; ``grad_lrs`` is ``(K, n_tensors)``, 0 for excluded tensors.
    """
    sched = schedule(model, lrs, inner_steps, exclude)
    r = inner_optim.meta_loss_and_grad(model, params, tasks, sched, inner_steps, optimizer=optimizer,
                                       weights=weights, approximation=approximation)
    grad_lrs = np.array([[0.0 if a is None else float(np.real(a)) for a in row] for row in r.lrs])
    return r.loss, r.params, grad_lrs
