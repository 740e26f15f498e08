"""A user's Conv4 MAML in PyTorch, as a practitioner writes it, with a factory for ``--model FILE.py:factory``.

Nothing here uses metaverify. ``make_conv4`` builds the model (small: 1x16x16 images, hidden 4, so an
audit runs in seconds); ``maml`` is correct; ``maml_first_order`` forgets ``create_graph=True``;
``maml_bn_eval_inner`` runs the inner loop with batch norm in eval mode (running statistics where the
batch statistics were meant); ``maml_bn_frozen`` leaves the batch-norm weight and bias out of the inner
update; ``anil_bn_adapted`` (ANIL) adapts them with the head. Every train-mode forward updates the
module's running statistics in place (the audit notes it and restores them before each call).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


class Conv4(nn.Module):
    def __init__(self, n_way: int = 5, hidden: int = 4):
        super().__init__()
        blocks = []
        c = 1
        for _ in range(4):
            blocks += [nn.Conv2d(c, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(), nn.MaxPool2d(2)]
            c = hidden
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.head = nn.Linear(hidden, n_way)

    def forward(self, x):
        return self.head(self.features(x))


def make_conv4() -> nn.Module:
    torch.manual_seed(0)
    return Conv4()


def _loss(model, params, x, y):
    names = [n for n, _ in model.named_parameters()]
    return F.cross_entropy(functional_call(model, dict(zip(names, params)), (x,)), y)


def _maml(model, tasks, inner_lr, inner_steps, create_graph=True, eval_inner=False, adapted=None):
    theta = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    adapted = adapted or (lambda name: True)
    total = 0.0
    for xs, ys, xq, yq in tasks:
        fast = theta
        if eval_inner:
            model.eval()
        for _ in range(inner_steps):
            grads = torch.autograd.grad(_loss(model, fast, xs, ys), fast, create_graph=create_graph)
            fast = [p - inner_lr * g if adapted(n) else p for n, p, g in zip(names, fast, grads)]
        model.train()
        total = total + _loss(model, fast, xq, yq)
    return total / len(tasks)


def maml(model, tasks, inner_lr, inner_steps):
    """Correct MAML."""
    return _maml(model, tasks, inner_lr, inner_steps)


def maml_first_order(model, tasks, inner_lr, inner_steps):
    """Bug: create_graph=False."""
    return _maml(model, tasks, inner_lr, inner_steps, create_graph=False)


def maml_bn_eval_inner(model, tasks, inner_lr, inner_steps):
    """Bug: batch norm in eval mode (running statistics) during the inner loop."""
    return _maml(model, tasks, inner_lr, inner_steps, eval_inner=True)


def _is_bn(name):
    return name.startswith("features.") and int(name.split(".")[1]) % 4 == 1


def maml_bn_frozen(model, tasks, inner_lr, inner_steps):
    """Bug: the batch-norm weight and bias are not adapted in the inner loop."""
    return _maml(model, tasks, inner_lr, inner_steps, adapted=lambda n: not _is_bn(n))


def anil(model, tasks, inner_lr, inner_steps):
    """Correct ANIL: only the head adapted."""
    return _maml(model, tasks, inner_lr, inner_steps, adapted=lambda n: n.startswith("head."))


def anil_bn_adapted(model, tasks, inner_lr, inner_steps):
    """Bug (ANIL): the batch-norm weight and bias adapted with the head."""
    return _maml(model, tasks, inner_lr, inner_steps, adapted=lambda n: n.startswith("head.") or _is_bn(n))
