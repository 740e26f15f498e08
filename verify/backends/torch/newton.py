"""Newton-MAML in PyTorch: MAML with a damped Newton inner step.

``p_{k+1} = p_k - alpha (H_s(p_k) + delta I)^{-1} grad L_s(p_k)`` (CONVENTIONS,
"Newton-MAML"). Practitioner implementation: the support Hessian from
``torch.autograd.functional.hessian(..., create_graph=True)``, the step from
``torch.linalg.solve`` inside the graph, and one reverse pass over the query
loss; autograd then supplies the third derivatives of ``L_s`` (the derivative
of the Hessian) that the exact meta-gradient contains. Mirrors
``reference.newton``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from reference import newton as reference_newton
from reference.errors import InvalidInputError, SingularMatrixError
from reference.models import MAX_DENSE_HESSIAN
from reference.tasks import Task
from verify.backends.torch import _inner
from verify.backends.torch._model import FunctionalMLP, TorchTask, scalar, tf32, to_numpy

__all__ = ["MAX_CONDITION", "MAX_PARAMS", "adapt", "meta_loss", "meta_loss_and_grad"]

MAX_PARAMS = MAX_DENSE_HESSIAN
# The reference refuses a damped Hessian with cond > 1e12 in float64 (more than 12 of ~16 digits
# lost). float32 has ~7 digits: the same rule "keep at least 2 digits" gives 1e-2 / eps32 ~ 8e4.
MAX_CONDITION: dict[torch.dtype, float] = {
    torch.float64: 1e12,
    torch.float32: 1e-2 / float(torch.finfo(torch.float32).eps),
}


def _check_size(model: Any) -> None:
    # Checked before the reference's check so that the advice names this backend's maml.
    if model.n_params > MAX_PARAMS:
        raise InvalidInputError(
            f"{model!r} has {model.n_params} parameters; Newton-MAML forms dense Hessians and is limited to "
            f"MAX_PARAMS={MAX_PARAMS}. Use maml or a smaller model"
        )


def _check_conditioning(A: torch.Tensor, delta: float, where: str) -> None:
    """Refuse a singular / ill-conditioned damped Hessian instead of returning NaN or noise."""
    eig = torch.linalg.eigvalsh(A.detach()).abs()
    small, large = float(eig.min()), float(eig.max())
    cond = float("inf") if small == 0.0 else large / small
    limit = MAX_CONDITION[A.dtype]
    if not cond <= limit:
        raise SingularMatrixError(
            f"Newton-MAML: the damped support Hessian H + delta*I at {where} is singular or ill-conditioned in "
            f"{str(A.dtype).replace('torch.', '')} (condition number {cond:.3e} > {limit:.1e}, eigenvalue moduli in "
            f"[{small:.3e}, {large:.3e}], delta={delta!r}); increase damping"
        )


def _adapt(fm: FunctionalMLP, p: torch.Tensor, task: TorchTask, alpha: float, delta: float, steps: int,
           *, create_graph: bool, label: str) -> torch.Tensor:
    """``K`` damped Newton steps on the flat parameter vector ``p`` (differentiable with ``create_graph``)."""
    eye = torch.eye(p.numel(), dtype=p.dtype, device=p.device)

    def support_loss(q: torch.Tensor) -> torch.Tensor:
        return fm.flat_loss(q, task.x_support, task.y_support)

    for k in range(steps):
        (g,) = torch.autograd.grad(support_loss(p), p, create_graph=create_graph)
        H = torch.autograd.functional.hessian(support_loss, p, create_graph=create_graph, vectorize=True)
        A = H + delta * eye
        _check_conditioning(A, delta, f"{label}, inner step k={k}")
        p = p - alpha * torch.linalg.solve(A, g)
    return p


def _setup(model, params, tasks, inner_lr, inner_steps, damping, dtype, device):
    _inner.check_device(dtype, device)
    _check_size(model)
    # The reference's check of every argument; torch adds real arithmetic, dtype and device.
    params, tasks, steps, alpha, delta = reference_newton.check_arguments(model, params, tasks, inner_lr, inner_steps,
                                                                         damping)
    alpha, delta = _inner.real_inner_lr(inner_lr, alpha), float(delta)
    fm, theta, ttasks = _inner.build(model, params, tasks, dtype, device)
    flat = torch.cat([t.detach().reshape(-1) for t in theta]).requires_grad_(True)
    return fm, flat, ttasks, steps, alpha, delta


def adapt(model: Any, params: Sequence[Any], task: Task, inner_lr: float, inner_steps: int, damping: float = 0.0,
          *, dtype: str = "float64", device: str = "cpu", allow_tf32: bool = False) -> list[np.ndarray]:
    """Adapted parameters ``p_K`` of one task after ``K`` damped Newton steps."""
    with tf32(allow_tf32):
        fm, flat, ttasks, steps, alpha, delta = _setup(model, params, [task], inner_lr, inner_steps, damping,
                                                       dtype, device)
        p = _adapt(fm, flat, ttasks[0], alpha, delta, steps, create_graph=False, label="task 0")
        return [to_numpy(q) for q in fm.unflatten(p)]


def meta_loss(model: Any, params: Sequence[Any], tasks: Sequence[Task], inner_lr: float, inner_steps: int,
              damping: float = 0.0, *, dtype: str = "float64", device: str = "cpu",
              allow_tf32: bool = False) -> float:
    """Newton-MAML meta-loss ``(1/T) sum_t L_q^t(p_K^t)``.

    Raises:
        SingularMatrixError: a damped Hessian is singular or ill-conditioned
            (``MAX_CONDITION`` per dtype).
    """
    with tf32(allow_tf32):
        fm, flat, ttasks, steps, alpha, delta = _setup(model, params, tasks, inner_lr, inner_steps, damping,
                                                       dtype, device)
        total = 0.0
        for i, t in enumerate(ttasks):
            p = _adapt(fm, flat, t, alpha, delta, steps, create_graph=False, label=f"task {i}")
            total += scalar(fm.flat_loss(p, t.x_query, t.y_query))
        return total / len(ttasks)


def meta_loss_and_grad(model: Any, params: Sequence[Any], tasks: Sequence[Task], inner_lr: float, inner_steps: int,
                       damping: float = 0.0, *, dtype: str = "float64", device: str = "cpu",
                       allow_tf32: bool = False) -> tuple[float, list[np.ndarray]]:
    """Newton-MAML meta-loss and its exact meta-gradient by autograd through Hessian and solve.

    The inner step is built with ``create_graph=True`` (gradient and Hessian
    both differentiable), so the reverse pass contains the third-derivative
    term ``D^3 L_s[(H + delta I)^{-1} g]``.

    Returns:
        ``(meta_loss, grad)`` with ``grad`` shaped like ``params``.
    """
    with tf32(allow_tf32):
        fm, flat, ttasks, steps, alpha, delta = _setup(model, params, tasks, inner_lr, inner_steps, damping,
                                                       dtype, device)
        n = len(ttasks)
        total, grad = 0.0, torch.zeros_like(flat)
        for i, t in enumerate(ttasks):
            p = _adapt(fm, flat, t, alpha, delta, steps, create_graph=True, label=f"task {i}")
            loss = fm.flat_loss(p, t.x_query, t.y_query) / n
            (g,) = torch.autograd.grad(loss, flat)
            grad += g
            total += scalar(loss)
        return total, [to_numpy(g) for g in fm.unflatten(grad)]
