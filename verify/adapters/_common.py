"""What every adapter shares: the task loss a practitioner writes (mse for float targets, cross-entropy for labels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def task_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy`` for integer labels, ``F.mse_loss`` otherwise (CONVENTIONS, reduction ``"mean"``)."""
    if y.dtype in (torch.int64, torch.int32):
        return F.cross_entropy(out, y)
    return F.mse_loss(out, y)


def accumulate_grad(params: list[torch.Tensor], grads: tuple[torch.Tensor, ...], weight: float) -> None:
    """``p.grad += weight * g`` (creating ``.grad`` when absent), as optimisers expect gradients."""
    for p, g in zip(params, grads):
        g = weight * g.detach()
        p.grad = g if p.grad is None else p.grad + g
