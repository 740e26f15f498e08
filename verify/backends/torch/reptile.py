"""The Reptile direction in PyTorch (Nichol, Achiam & Schulman 2018, arXiv:1803.02999).

"On First-Order Meta-Learning Algorithms". Written the way the authors'
PyTorch ports do it: clone the model, run ``K`` plain SGD steps on the full
support batch (``loss.backward()``, then ``p -= alpha * p.grad`` under
``no_grad``; ``torch.optim.SGD`` would do the same but refuses ``lr < 0`` and
its first use imports ``torch._dynamo``, seconds of start-up), and read off
``theta - p_K``. Not the gradient of anything. Mirrors ``reference.reptile``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from reference import reptile as reference_reptile
from reference.tasks import Task
from verify.backends.torch import _inner
from verify.backends.torch._model import build_model, loss_fn, tf32, to_numpy, to_torch_tasks

__all__ = ["direction", "meta_loss"]


def direction(model: Any, params: Sequence[Any], tasks: Sequence[Task], inner_lr: float, inner_steps: int, *,
              dtype: str = "float64", device: str = "cpu", allow_tf32: bool = False) -> list[np.ndarray]:
    """Reptile meta-batch direction ``(1/T) sum_t (theta - p_K^t)``, ``K`` SGD steps of size ``alpha``.

    Returns:
        float64 arrays shaped like ``params`` (computed in ``dtype``).
    """
    with tf32(allow_tf32):
        params, tasks, alpha, steps, _ = reference_reptile.check_arguments(model, params, tasks, inner_lr, inner_steps)
        alpha = _inner.real_inner_lr(inner_lr, alpha)  # the torch limit: real arithmetic
        net = build_model(model, params, dtype, device)
        ttasks = to_torch_tasks(tasks, next(net.parameters()).dtype, next(net.parameters()).device)
        total = [torch.zeros_like(p) for p in net.parameters()]
        for t in ttasks:
            inner = copy.deepcopy(net)
            for _ in range(steps):
                inner.zero_grad()
                loss_fn(model.loss_name, inner(t.x_support), t.y_support).backward()
                with torch.no_grad():
                    for p in inner.parameters():
                        p.sub_(alpha * p.grad)
            with torch.no_grad():
                for acc, p0, pk in zip(total, net.parameters(), inner.parameters()):
                    acc += p0 - pk
        return [to_numpy(acc / len(ttasks)) for acc in total]


def meta_loss(model: Any, params: Sequence[Any], tasks: Sequence[Task], inner_lr: float, inner_steps: int, *,
              dtype: str = "float64", device: str = "cpu", allow_tf32: bool = False) -> float:
    """The query loss after Reptile's inner loop (identical to MAML's meta-loss)."""
    from verify.backends.torch import maml

    return maml.meta_loss(model, params, tasks, inner_lr, inner_steps, dtype=dtype, device=device,
                          allow_tf32=allow_tf32)
