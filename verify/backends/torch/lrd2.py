"""LR-D2 in PyTorch: a differentiable logistic-regression head by Newton/IRLS steps.

Bertinetto, Henriques, Torr & Vedaldi (2019), "Meta-learning with
differentiable closed-form solvers", ICLR, section 3.3. Support features
``Z`` (ones column when ``bias_column``, no normalisation), ``K`` IRLS steps
from ``w = 0``: ``w <- w - (Z^T S Z + lam I)^{-1} (Z^T (s - y) + lam w)``,
``s = sigmoid(Z w)``, ``S = diag(s (1 - s))``, each solve a
``torch.linalg.solve`` inside the graph; query loss
``F.binary_cross_entropy_with_logits(scale * Z_q w + offset, y_q)``. Autograd
through all ``K`` steps gives the exact gradient (the derivative of ``S`` brings
third derivatives of the logistic loss). Mirrors ``reference.lrd2``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from reference import lrd2 as reference_lrd2
from reference.features import binary_label_check
from reference.tasks import Task
from verify.backends.torch import _features
from verify.backends.torch._model import FunctionalMLP, TorchTask, scalar, tf32, to_numpy

__all__ = ["meta_loss", "meta_loss_and_grad", "newton_weights"]


def newton_weights(Z: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, newton_steps: int, *,
                   what: str = "the task") -> list[torch.Tensor]:
    """The IRLS iterates ``[w_0 = 0, w_1, ..., w_K]`` (differentiable); ``Z`` used as given.

    Raises:
        SingularMatrixError: a Newton matrix ``Z^T S Z + lam I`` is not SPD or too ill-conditioned.
    """
    p = Z.shape[1]
    eye = torch.eye(p, dtype=Z.dtype, device=Z.device)
    w = torch.zeros(p, dtype=Z.dtype, device=Z.device)
    iterates = [w]
    for k in range(newton_steps):
        s = torch.sigmoid(Z @ w)
        H = Z.T @ ((s * (1 - s))[:, None] * Z) + lam * eye
        _features.check_spd(H, f"the Newton matrix Z^T S Z + lam I of {what} at step k={k}")
        w = w - torch.linalg.solve(H, Z.T @ (s - y) + lam * w)
        iterates.append(w)
    return iterates


def _task_loss(fm: FunctionalMLP, theta, task: TorchTask, lam, scale, offset, steps: int, bias_column: bool,
               where: str) -> torch.Tensor:
    Zs, Zq = _features.features(fm, theta, task, where)
    if bias_column:
        Zs, Zq = _features.append_ones(Zs), _features.append_ones(Zq)
    w = newton_weights(Zs, task.y_support, lam, steps, what=where)[-1]
    return F.binary_cross_entropy_with_logits(scale * (Zq @ w) + offset, task.y_query)


def _setup(backbone, params, tasks, lam, scale, offset, newton_steps, dtype, device):
    # The reference's check of every argument; torch adds its own limits (dtype, device, real hyper-parameters).
    backbone, params, tasks, lam, scale, offset, steps = reference_lrd2.check_arguments(
        backbone, params, tasks, lam, scale, offset, newton_steps)
    fm, theta, ttasks = _features.setup(backbone, params, tasks, binary_label_check, dtype, device)
    return fm, theta, ttasks, _features.head_hyper(fm, lam, scale, offset), steps


def meta_loss(backbone: Any, params: list[Any], tasks: list[Task], lam: float, scale: float, offset: float,
              newton_steps: int, *, bias_column: bool = True, dtype: str = "float64", device: str = "cpu",
              allow_tf32: bool = False) -> float:
    """The LR-D2 meta-loss alone (mean query ``bce`` over tasks)."""
    with tf32(allow_tf32), torch.no_grad():
        fm, theta, ttasks, h, steps = _setup(backbone, params, tasks, lam, scale, offset, newton_steps, dtype, device)
        total = sum(scalar(_task_loss(fm, theta, t, h["lam"], h["scale"], h["offset"], steps, bias_column,
                                      f"tasks[{i}]")) for i, t in enumerate(ttasks))
        return total / len(ttasks)


def meta_loss_and_grad(backbone: Any, params: list[Any], tasks: list[Task], lam: float, scale: float,
                       offset: float, newton_steps: int, *, bias_column: bool = True, dtype: str = "float64",
                       device: str = "cpu", allow_tf32: bool = False
                       ) -> tuple[float, list[np.ndarray], dict[str, float]]:
    """LR-D2 meta-loss and its exact gradient w.r.t. the backbone, ``lam``, ``scale``, ``offset``.

    Returns:
        ``(meta_loss, grads, {"lam": ..., "scale": ..., "offset": ...})``.

    Raises:
        InvalidInputError: bad arguments, non-binary labels, non-finite features.
        SingularMatrixError: a Newton matrix is singular / ill-conditioned in ``dtype``.
    """
    with tf32(allow_tf32):
        fm, theta, ttasks, h, steps = _setup(backbone, params, tasks, lam, scale, offset, newton_steps, dtype, device)
        wrt = [*theta, h["lam"], h["scale"], h["offset"]]
        total, grads = 0.0, [torch.zeros_like(w) for w in wrt]
        for i, t in enumerate(ttasks):
            loss = _task_loss(fm, theta, t, h["lam"], h["scale"], h["offset"], steps, bias_column,
                              f"tasks[{i}]") / len(ttasks)
            for acc, g in zip(grads, torch.autograd.grad(loss, wrt)):
                acc += g
            total += scalar(loss)
        n = len(theta)
        return total, [to_numpy(g) for g in grads[:n]], {k: scalar(g) for k, g in zip(("lam", "scale", "offset"),
                                                                                     grads[n:])}
