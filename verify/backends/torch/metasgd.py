"""Meta-SGD in PyTorch (Li, Zhou, Chen & Li 2017, arXiv:1707.09835).

"Meta-SGD: Learning to Learn Quickly for Few-Shot Learning". The inner step
size is a list ``lrs`` of tensors shaped like the parameters (elementwise),
learned jointly: autograd gives the gradient w.r.t. both. Mirrors
``reference.metasgd``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from reference.metasgd import check_lrs
from reference.tasks import Task
from verify.backends.torch import _inner
from verify.backends.torch._model import scalar, tf32, to_numpy

__all__ = ["meta_loss", "meta_loss_and_grad"]


def meta_loss(model: Any, params: Sequence[Any], lrs: Sequence[Any], tasks: Sequence[Task], inner_steps: int, *,
              dtype: str = "float64", device: str = "cpu", allow_tf32: bool = False) -> float:
    """Meta-SGD meta-loss ``(1/T) sum_t L_q^t(p_K^t)``, ``p_{k+1} = p_k - a * grad L_s^t(p_k)``."""
    with tf32(allow_tf32):
        fm, theta, ttasks, steps = _inner.setup(model, params, tasks, inner_steps, dtype, device)
        a = fm.tensors(check_lrs(model, lrs))
        return scalar(_inner.meta_loss(fm, theta, ttasks, a, steps))


def meta_loss_and_grad(model: Any, params: Sequence[Any], lrs: Sequence[Any], tasks: Sequence[Task],
                       inner_steps: int, *, dtype: str = "float64", device: str = "cpu",
                       allow_tf32: bool = False) -> tuple[float, list[np.ndarray], list[np.ndarray]]:
    """Meta-SGD meta-loss and its exact gradients w.r.t. ``theta`` and the learning rates ``a``.

    ``a`` are leaf tensors with ``requires_grad=True`` used inside the
    ``create_graph=True`` inner updates, so one reverse pass gives both.

    Returns:
        ``(meta_loss, grad_params, grad_lrs)``, both gradients shaped like ``params``.
    """
    with tf32(allow_tf32):
        fm, theta, ttasks, steps = _inner.setup(model, params, tasks, inner_steps, dtype, device)
        a = fm.tensors(check_lrs(model, lrs), requires_grad=True)
        loss, grads = _inner.meta_loss_and_grad(fm, theta, ttasks, a, steps, wrt=[*theta, *a])
        n = len(theta)
        return scalar(loss), [to_numpy(g) for g in grads[:n]], [to_numpy(g) for g in grads[n:]]
