"""Meta-SGD meta-gradients, analytic (Li, Zhou, Chen & Li 2017).

"Meta-SGD: Learning to Learn Quickly for Few-Shot Learning", arXiv:1707.09835.
The inner step size is a list ``lrs`` shaped like the parameters (elementwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from reference import inner_loop
from reference.errors import InvalidInputError
from reference.tasks import Task

__all__ = ["check_lrs", "meta_loss", "meta_loss_and_grad"]


def check_lrs(model: Any, lrs: Any) -> list[np.ndarray]:
    """Meta-SGD's per-parameter learning rates: one array shaped like each parameter tensor.

    The backends call this check and add only their framework's limits.

    Raises:
        InvalidInputError: a missing, extra or mis-shaped entry, or a non-finite rate.
    """
    try:
        return model.check_params(lrs, name="lrs")
    except InvalidInputError as exc:
        raise InvalidInputError(
            f"{exc}; lrs holds one per-parameter learning rate for each entry of params, "
            f"e.g. [np.full_like(p, 0.01) for p in params]"
        ) from exc


_check_lrs = check_lrs  # the former private name


def meta_loss(model: Any, params: Sequence[Any], lrs: Sequence[Any], tasks: Sequence[Task], inner_steps: int) -> Any:
    """Meta-SGD meta-loss ``(1/T) sum_t L_q^t(p_K^t)``, ``p_{k+1} = p_k - a * grad L_s^t(p_k)``.

    ``a`` (``lrs``) is a list of arrays shaped like ``params``; ``*`` is
    elementwise. Complex ``params`` or ``lrs`` give a complex loss (complex step).
    """
    params, tasks, steps = inner_loop.check_common(model, params, tasks, inner_steps)
    return inner_loop.meta_loss(model, params, tasks, _check_lrs(model, lrs), steps)


def meta_loss_and_grad(
    model: Any, params: Sequence[Any], lrs: Sequence[Any], tasks: Sequence[Task], inner_steps: int
) -> tuple[Any, list[np.ndarray], list[np.ndarray]]:
    """Meta-SGD meta-loss and its exact gradients with respect to ``theta`` and ``a``.

    Per task, reverse accumulation from ``v_K = grad L_q(p_K)``:

        v_k = v_{k+1} - H_s(p_k) (a * v_{k+1}),        dL/dtheta = v_0,
        dL/da = - sum_{k=0}^{K-1} grad L_s(p_k) * v_{k+1},

    averaged over the tasks (exact Hessian-vector products, no Hessian
    formed). Memory ``O(K x params)``: iterates and support gradients.

    Returns:
        ``(meta_loss, grad_params, grad_lrs)``, both gradients shaped like ``params``.
    """
    params, tasks, steps = inner_loop.check_common(model, params, tasks, inner_steps)
    lrs = _check_lrs(model, lrs)
    loss, grad, grad_lrs = inner_loop.meta_loss_and_grad(model, params, tasks, lrs, steps, lr_grad=True)
    return loss, grad, grad_lrs
