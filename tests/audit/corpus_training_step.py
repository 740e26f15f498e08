"""Meta-learning code written as a training step, the way public repositories write it.

``Meta`` follows the structure of MAML-Pytorch's ``meta.py`` (dragen1860/MAML-Pytorch): a module
holding the network and its meta-optimiser, whose ``forward(x_spt, y_spt, x_qry, y_qry)`` takes the
episode batch stacked as ``[tasks, n, ...]`` tensors, runs the inner loop per task, calls
``zero_grad(); loss_q.backward(); meta_optim.step()`` and returns the query accuracies. As in that
repository, the inner gradients are taken with ``torch.autograd.grad(loss, params)`` -- without
``create_graph=True`` unless ``second_order`` is set, which makes the original first-order only.

Nothing here imports metaverify except the three-line adapters at the bottom (``@training_step``);
the audit's expectations come from the analytic reference.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.func import functional_call

from verify.backends.torch.training_step import training_step


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y) if y.dtype == torch.int64 else F.mse_loss(out, y)


class Meta(nn.Module):
    """MAML-Pytorch's meta-learner, written against an ``nn.Sequential`` (``functional_call`` for the
    fast weights instead of the repository's ``Learner(x, vars)``)."""

    def __init__(self, net: nn.Module, update_lr: float, update_step: int, meta_lr: float = 1e-3,
                 second_order: bool = True):
        super().__init__()
        self.net = net
        self.update_lr = update_lr
        self.update_step = update_step
        self.second_order = second_order
        self.meta_optim = optim.Adam(self.net.parameters(), lr=meta_lr)

    def _fwd(self, x: torch.Tensor, weights: list[torch.Tensor] | None = None) -> torch.Tensor:
        if weights is None:
            return self.net(x)
        names = [n for n, _ in self.net.named_parameters()]
        return functional_call(self.net, dict(zip(names, weights)), (x,))

    def forward(self, x_spt, y_spt, x_qry, y_qry):
        task_num = x_spt.size(0)
        querysz = x_qry.size(1)
        losses_q = [0 for _ in range(self.update_step + 1)]
        corrects = [0 for _ in range(self.update_step + 1)]
        for i in range(task_num):
            logits = self._fwd(x_spt[i])
            loss = _loss(logits, y_spt[i])
            grad = torch.autograd.grad(loss, list(self.net.parameters()), create_graph=self.second_order)
            fast_weights = list(map(lambda p: p[1] - self.update_lr * p[0], zip(grad, self.net.parameters())))
            with torch.no_grad():
                logits_q = self._fwd(x_qry[i])
                losses_q[0] += _loss(logits_q, y_qry[i])
            for k in range(1, self.update_step):
                logits = self._fwd(x_spt[i], fast_weights)
                loss = _loss(logits, y_spt[i])
                grad = torch.autograd.grad(loss, fast_weights, create_graph=self.second_order)
                fast_weights = list(map(lambda p: p[1] - self.update_lr * p[0], zip(grad, fast_weights)))
            logits_q = self._fwd(x_qry[i], fast_weights)
            loss_q = _loss(logits_q, y_qry[i])
            losses_q[self.update_step] += loss_q
            if y_qry.dtype == torch.int64:
                with torch.no_grad():
                    corrects[self.update_step] += torch.eq(logits_q.argmax(dim=1), y_qry[i]).sum().item()
        loss_q = losses_q[-1] / task_num
        self.meta_optim.zero_grad()
        loss_q.backward()
        self.meta_optim.step()
        return np.array(corrects) / (querysz * task_num)


def per_task_backward_step(model, batch, inner_lr, inner_steps, optimizer):
    """A correct MAML that calls ``backward()`` once per task on ``loss_q / tasks`` (gradient accumulation)."""
    x_spt, y_spt, x_qry, y_qry = batch
    names = [n for n, _ in model.named_parameters()]
    optimizer.zero_grad()
    for i in range(x_spt.size(0)):
        fast = list(model.parameters())
        for _ in range(inner_steps):
            out = functional_call(model, dict(zip(names, fast)), (x_spt[i],))
            grads = torch.autograd.grad(_loss(out, y_spt[i]), fast, create_graph=True)
            fast = [p - inner_lr * g for p, g in zip(fast, grads)]
        loss_q = _loss(functional_call(model, dict(zip(names, fast)), (x_qry[i],)), y_qry[i])
        (loss_q / x_spt.size(0)).backward()
    optimizer.step()


# -- the three-line adapters a user writes ---------------------------------------------------------


@training_step
def maml_pytorch(model, batch, inner_lr, inner_steps, optimizer):
    meta = Meta(model, update_lr=inner_lr, update_step=inner_steps)
    meta.meta_optim = optimizer
    return meta(*batch)


@training_step
def maml_pytorch_first_order(model, batch, inner_lr, inner_steps, optimizer):
    meta = Meta(model, update_lr=inner_lr, update_step=inner_steps, second_order=False)
    meta.meta_optim = optimizer
    return meta(*batch)


maml_per_task_backward = training_step(per_task_backward_step)
