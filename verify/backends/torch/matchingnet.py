"""Matching networks in PyTorch, without full-context embeddings (Vinyals et al. 2016, NeurIPS).

"Matching Networks for One Shot Learning". Attention
``softmax_j(cos(f(x_q), f(x_j)))`` over the support set with
``F.cosine_similarity``, class distribution ``a @ onehot(y_support)``, loss
``F.nll_loss(log P, y_q)`` (the negative log-probability of the true class,
mean over queries, then over tasks). Mirrors ``reference.matchingnet``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from reference import matchingnet as reference_matchingnet
from reference.errors import InvalidInputError
from reference.features import class_label_check
from reference.tasks import Task
from verify.backends.torch import _features
from verify.backends.torch._model import FunctionalMLP, TorchTask, scalar, tf32, to_numpy

__all__ = ["loss", "loss_and_grad"]

# F.cosine_similarity clamps each norm at eps=1e-8; a feature that small would be silently
# rescaled, so (like the reference, which refuses a zero vector) such features are an error.
_MIN_NORM = 1e-8


def _setup(backbone, params, tasks, n_classes, dtype, device):
    # The reference's check of every argument (every query class has a support example); torch adds dtype, device.
    backbone, params, tasks, n_classes = reference_matchingnet.check_arguments(backbone, params, tasks, n_classes)
    fm, theta, ttasks = _features.setup(backbone, params, tasks, class_label_check(n_classes), dtype, device)
    return fm, theta, ttasks, n_classes


def _check_norms(Z: torch.Tensor, where: str) -> None:
    norms = torch.linalg.vector_norm(Z.detach(), dim=1)
    bad = norms <= _MIN_NORM
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0, 0])
        raise InvalidInputError(
            f"the backbone feature of {where}[{row}] is (numerically) the zero vector (norm {float(norms[row]):.3g}): "
            "its cosine similarity is undefined; change the backbone (e.g. a bias, or a non-relu output) "
            "so that no feature vanishes"
        )


def _task_loss(fm: FunctionalMLP, theta, task: TorchTask, n_classes: int, where: str) -> torch.Tensor:
    Zs, Zq = _features.features(fm, theta, task, where)
    _check_norms(Zq, f"{where}.x_query")
    _check_norms(Zs, f"{where}.x_support")
    cos = F.cosine_similarity(Zq[:, None, :], Zs[None, :, :], dim=-1)
    attention = torch.softmax(cos, dim=1)
    probs = attention @ F.one_hot(task.y_support, n_classes).to(Zs.dtype)
    return F.nll_loss(torch.log(probs), task.y_query)


def loss(backbone: Any, params: list[Any], tasks: list[Task], n_classes: int, *, dtype: str = "float64",
         device: str = "cpu", allow_tf32: bool = False) -> float:
    """The matching-network loss alone (mean over tasks)."""
    with tf32(allow_tf32), torch.no_grad():
        fm, theta, ttasks, n_classes = _setup(backbone, params, tasks, n_classes, dtype, device)
        return sum(scalar(_task_loss(fm, theta, t, n_classes, f"tasks[{i}]"))
                   for i, t in enumerate(ttasks)) / len(ttasks)


def loss_and_grad(backbone: Any, params: list[Any], tasks: list[Task], n_classes: int, *, dtype: str = "float64",
                  device: str = "cpu", allow_tf32: bool = False) -> tuple[float, list[np.ndarray]]:
    """Matching-network loss and its gradient w.r.t. the backbone.

    Returns:
        ``(loss, grads)`` with ``grads`` shaped like ``params``.
    """
    with tf32(allow_tf32):
        fm, theta, ttasks, n_classes = _setup(backbone, params, tasks, n_classes, dtype, device)
        total, grads = 0.0, [torch.zeros_like(p) for p in theta]
        for i, t in enumerate(ttasks):
            value = _task_loss(fm, theta, t, n_classes, f"tasks[{i}]") / len(ttasks)
            for acc, g in zip(grads, torch.autograd.grad(value, theta)):
                acc += g
            total += scalar(value)
        return total, [to_numpy(g) for g in grads]
