"""Correct implementations written with float32 constants, as public code often is.

Each is mathematically right; each creates a tensor in torch's default dtype (float32) somewhere:
a ``torch.tensor(0.)`` loss accumulator updated in place, a step size held as ``torch.tensor(lr)``,
``lam * torch.eye(n)`` in R2-D2's ridge system, or the meta-loss returned as
``torch.tensor(total)`` after calling ``backward()``. In a float64 audit these differ from the
reference at float32's round-off level (1e-8..1e-11), and must be named as precision, never as an
unexplained mismatch. Nothing here imports metaverify.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y) if y.dtype == torch.int64 else F.mse_loss(out, y)


def _forward(model, params, x):
    names = [n for n, _ in model.named_parameters()]
    return functional_call(model, dict(zip(names, params)), (x,))


def maml_float32_constants(model, tasks, inner_lr, inner_steps):
    """Correct MAML; ``torch.tensor(0.)`` accumulator (in-place ``+=`` keeps it float32) and a float32 step size."""
    lr = torch.tensor(inner_lr)            # float32
    meta_loss = torch.tensor(0.)           # float32
    for t in tasks:
        fast = list(model.parameters())
        for _ in range(inner_steps):
            grads = torch.autograd.grad(_loss(_forward(model, fast, t.x_support), t.y_support), fast,
                                        create_graph=True)
            fast = [p - lr * g for p, g in zip(fast, grads)]
        meta_loss += _loss(_forward(model, fast, t.x_query), t.y_query)
    return meta_loss / len(tasks)


def maml_float32_step_size(model, tasks, inner_lr, inner_steps):
    """Correct MAML whose only float32 constant is the step size ``torch.tensor(inner_lr)``."""
    lr = torch.tensor(inner_lr)
    total = 0.0
    for t in tasks:
        fast = list(model.parameters())
        for _ in range(inner_steps):
            grads = torch.autograd.grad(_loss(_forward(model, fast, t.x_support), t.y_support), fast,
                                        create_graph=True)
            fast = [p - lr * g for p, g in zip(fast, grads)]
        total = total + _loss(_forward(model, fast, t.x_query), t.y_query)
    return total / len(tasks)


def maml_first_order_float32_constants(model, tasks, inner_lr, inner_steps):
    """Bug (first-order only) in code that also has float32 constants: the bug must still be named."""
    lr = torch.tensor(inner_lr)
    meta_loss = torch.tensor(0.)
    for t in tasks:
        fast = list(model.parameters())
        for _ in range(inner_steps):
            grads = torch.autograd.grad(_loss(_forward(model, fast, t.x_support), t.y_support), fast)
            fast = [p - lr * g for p, g in zip(fast, grads)]
        meta_loss += _loss(_forward(model, fast, t.x_query), t.y_query)
    return meta_loss / len(tasks)


def maml_backward_returns_float32(model, tasks, inner_lr, inner_steps):
    """Correct MAML that calls ``backward()`` itself and returns ``torch.tensor(total)`` (a float32 scalar)."""
    total = 0.0
    for t in tasks:
        fast = list(model.parameters())
        for _ in range(inner_steps):
            grads = torch.autograd.grad(_loss(_forward(model, fast, t.x_support), t.y_support), fast,
                                        create_graph=True)
            fast = [p - inner_lr * g for p, g in zip(fast, grads)]
        loss_q = _loss(_forward(model, fast, t.x_query), t.y_query) / len(tasks)
        loss_q.backward()
        total += loss_q.item()
    return torch.tensor(total)


def r2d2_float32_eye(backbone, tasks, lam, scale, offset):
    """Correct R2-D2 (dual form, ones column, normalisation) with ``lam * torch.eye(n)`` in the default dtype."""
    total = 0.0
    for t in tasks:
        zs, zq = backbone(t.x_support), backbone(t.x_query)
        zs = torch.cat([zs, torch.ones_like(zs[:, :1])], 1)
        zq = torch.cat([zq, torch.ones_like(zq[:, :1])], 1)
        n_classes = int(t.y_support.max()) + 1
        y = F.one_hot(t.y_support, n_classes).to(zs.dtype)
        zs, y = zs / len(zs) ** 0.5, y / len(zs) ** 0.5
        w = zs.T @ torch.linalg.solve(zs @ zs.T + lam * torch.eye(len(zs)), y)
        total = total + F.cross_entropy(scale * (zq @ w) + offset, t.y_query)
    return total / len(tasks)


def maml_returns_none(model, tasks, inner_lr, inner_steps):
    """Bad input: computes the loss but forgets to return it."""
    total = 0.0
    for t in tasks:
        total = total + _loss(model(t.x_query), t.y_query)


def maml_hardcoded_float32_query(model, tasks, inner_lr, inner_steps, *, create_graph=True):
    """Correct MAML whose query loss is computed in float32 (``.float()``): independent of the default dtype."""
    total = 0.0
    for t in tasks:
        fast = list(model.parameters())
        for _ in range(inner_steps):
            grads = torch.autograd.grad(_loss(_forward(model, fast, t.x_support), t.y_support), fast,
                                        create_graph=create_graph)
            fast = [p - inner_lr * g for p, g in zip(fast, grads)]
        out = _forward(model, fast, t.x_query).float()
        y = t.y_query if t.y_query.dtype == torch.int64 else t.y_query.float()
        total = total + _loss(out, y)
    return total / len(tasks)


def maml_first_order_hardcoded_float32_query(model, tasks, inner_lr, inner_steps):
    """Bug (first-order only) in code computing its query loss in float32: still named."""
    return maml_hardcoded_float32_query(model, tasks, inner_lr, inner_steps, create_graph=False)
