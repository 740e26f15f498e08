"""R2-D2 in PyTorch: a differentiable ridge-regression head (Bertinetto et al. 2019, ICLR).

"Meta-learning with differentiable closed-form solvers". As in the authors'
code: support features ``Z`` (ones column appended when ``bias_column``),
one-hot ``Y``; with ``normalize`` both divided by ``sqrt(n)``; ridge weights
by ``torch.linalg.solve``, primal ``(Z^T Z + lam I)^{-1} Z^T Y`` or dual
(Woodbury) ``Z^T (Z Z^T + lam I)^{-1} Y``; query logits
``scale * Z_q W + offset`` and ``F.cross_entropy`` (``F.mse_loss`` on targets
in the regression variant). ``lam``, ``scale`` and ``offset`` are 0-dim leaf
tensors, so autograd through the solve gives the exact gradient w.r.t. the
backbone and all three. Mirrors ``reference.r2d2``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from reference import r2d2 as reference_r2d2
from reference.features import class_label_check, target_check
from reference.tasks import Task
from verify.backends.torch import _features
from verify.backends.torch._model import FunctionalMLP, TorchTask, scalar, tf32, to_numpy

__all__ = ["FORMS", "meta_loss", "meta_loss_and_grad", "ridge_weights"]

FORMS = reference_r2d2.FORMS


def ridge_weights(Z: torch.Tensor, Y: torch.Tensor, lam: torch.Tensor, *, form: str = "dual",
                  what: str = "the ridge system") -> torch.Tensor:
    """Ridge weights by ``torch.linalg.solve`` (differentiable); ``Z`` used as given.

    Raises:
        SingularMatrixError: the system matrix is not SPD or too ill-conditioned for its dtype.
    """
    n, p = Z.shape
    if form == "primal":
        A = Z.T @ Z + lam * torch.eye(p, dtype=Z.dtype, device=Z.device)
        _features.check_spd(A, f"Z^T Z + lam I of {what}")
        return torch.linalg.solve(A, Z.T @ Y)
    K = Z @ Z.T + lam * torch.eye(n, dtype=Z.dtype, device=Z.device)
    _features.check_spd(K, f"Z Z^T + lam I of {what}")
    return Z.T @ torch.linalg.solve(K, Y)


def _task_loss(fm: FunctionalMLP, theta, task: TorchTask, n_classes: int, lam, scale, offset, bias_column: bool,
               normalize: bool, form: str, regression: bool, where: str) -> torch.Tensor:
    Zs, Zq = _features.features(fm, theta, task, where)
    if bias_column:
        Zs, Zq = _features.append_ones(Zs), _features.append_ones(Zq)
    n = Zs.shape[0]
    Y = task.y_support if regression else F.one_hot(task.y_support, n_classes).to(Zs.dtype)
    if normalize:
        root = math.sqrt(n)
        Zs, Y = Zs / root, Y / root
    W = ridge_weights(Zs, Y, lam, form=form, what=where)
    out = scale * (Zq @ W) + offset
    return F.mse_loss(out, task.y_query) if regression else F.cross_entropy(out, task.y_query)


def _setup(backbone, params, tasks, n_classes, lam, scale, offset, form, regression, dtype, device):
    # The reference's check of every argument; torch adds its own limits (dtype, device, real hyper-parameters).
    backbone, params, tasks, n_classes, lam, scale, offset = reference_r2d2.check_arguments(
        backbone, params, tasks, n_classes, lam, scale, offset, form, regression)
    check = target_check(n_classes) if regression else class_label_check(n_classes)
    fm, theta, ttasks = _features.setup(backbone, params, tasks, check, dtype, device)
    return fm, theta, ttasks, n_classes, _features.head_hyper(fm, lam, scale, offset)


def meta_loss(backbone: Any, params: list[Any], tasks: list[Task], n_classes: int, lam: float, scale: float,
              offset: float, *, bias_column: bool = True, normalize: bool = True, form: str = "dual",
              regression: bool = False, dtype: str = "float64", device: str = "cpu",
              allow_tf32: bool = False) -> float:
    """The R2-D2 meta-loss alone (mean query loss over tasks); see :func:`meta_loss_and_grad`."""
    with tf32(allow_tf32), torch.no_grad():
        fm, theta, ttasks, n_classes, h = _setup(backbone, params, tasks, n_classes, lam, scale, offset, form,
                                                 regression, dtype, device)
        total = sum(scalar(_task_loss(fm, theta, t, n_classes, h["lam"], h["scale"], h["offset"], bias_column,
                                      normalize, form, regression, f"tasks[{i}]")) for i, t in enumerate(ttasks))
        return total / len(ttasks)


def meta_loss_and_grad(backbone: Any, params: list[Any], tasks: list[Task], n_classes: int, lam: float,
                       scale: float, offset: float, *, bias_column: bool = True, normalize: bool = True,
                       form: str = "dual", regression: bool = False, dtype: str = "float64", device: str = "cpu",
                       allow_tf32: bool = False) -> tuple[float, list[np.ndarray], dict[str, float]]:
    """R2-D2 meta-loss and its exact gradient by autograd through ``torch.linalg.solve``.

    Args: as ``reference.r2d2.meta_loss_and_grad``, plus ``dtype``, ``device``, ``allow_tf32``.

    Returns:
        ``(meta_loss, grads, {"lam": ..., "scale": ..., "offset": ...})``.

    Raises:
        InvalidInputError: bad arguments, labels out of range, non-finite features.
        SingularMatrixError: a system matrix is singular / ill-conditioned in ``dtype``.
    """
    with tf32(allow_tf32):
        fm, theta, ttasks, n_classes, h = _setup(backbone, params, tasks, n_classes, lam, scale, offset, form,
                                                 regression, dtype, device)
        wrt = [*theta, h["lam"], h["scale"], h["offset"]]
        total, grads = 0.0, [torch.zeros_like(w) for w in wrt]
        for i, t in enumerate(ttasks):
            loss = _task_loss(fm, theta, t, n_classes, h["lam"], h["scale"], h["offset"], bias_column, normalize,
                              form, regression, f"tasks[{i}]") / len(ttasks)
            for acc, g in zip(grads, torch.autograd.grad(loss, wrt)):
                acc += g
            total += scalar(loss)
        n = len(theta)
        return total, [to_numpy(g) for g in grads[:n]], {k: scalar(g) for k, g in zip(("lam", "scale", "offset"),
                                                                                     grads[n:])}
