"""Prototypical networks in PyTorch (Snell, Swersky & Zemel 2017, NeurIPS).

"Prototypical Networks for Few-shot Learning". Prototypes are the class means
of the support features; query logits are ``-||f(x_q) - c_k||^2`` computed by
broadcasting, as the authors' ``euclidean_dist`` does (not ``torch.cdist``,
whose gradient at zero distance is undefined and whose double backward is not
implemented, see ``ops``); loss ``F.cross_entropy``. Mirrors
``reference.protonet``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from reference import protonet as reference_protonet
from reference.features import class_label_check
from reference.tasks import Task
from verify.backends.torch import _features
from verify.backends.torch._model import FunctionalMLP, TorchTask, scalar, tf32, to_numpy

__all__ = ["loss", "loss_and_grad"]


def _setup(backbone, params, tasks, n_classes, dtype, device):
    # The reference's check of every argument (every class has a support example); torch adds dtype, device.
    backbone, params, tasks, n_classes = reference_protonet.check_arguments(backbone, params, tasks, n_classes)
    fm, theta, ttasks = _features.setup(backbone, params, tasks, class_label_check(n_classes), dtype, device)
    return fm, theta, ttasks, n_classes


def _task_loss(fm: FunctionalMLP, theta, task: TorchTask, n_classes: int, where: str) -> torch.Tensor:
    Zs, Zq = _features.features(fm, theta, task, where)
    onehot = F.one_hot(task.y_support, n_classes).to(Zs.dtype)
    protos = (onehot.T @ Zs) / onehot.sum(0)[:, None]
    dists = ((Zq[:, None, :] - protos[None, :, :]) ** 2).sum(-1)
    return F.cross_entropy(-dists, task.y_query)


def loss(backbone: Any, params: list[Any], tasks: list[Task], n_classes: int, *, dtype: str = "float64",
         device: str = "cpu", allow_tf32: bool = False) -> float:
    """The prototypical-network loss alone (mean over tasks)."""
    with tf32(allow_tf32), torch.no_grad():
        fm, theta, ttasks, n_classes = _setup(backbone, params, tasks, n_classes, dtype, device)
        return sum(scalar(_task_loss(fm, theta, t, n_classes, f"tasks[{i}]"))
                   for i, t in enumerate(ttasks)) / len(ttasks)


def loss_and_grad(backbone: Any, params: list[Any], tasks: list[Task], n_classes: int, *, dtype: str = "float64",
                  device: str = "cpu", allow_tf32: bool = False) -> tuple[float, list[np.ndarray]]:
    """Prototypical-network loss and its gradient w.r.t. the backbone (``loss.backward`` style).

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
