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


def _maml(model, tasks, inner_lr, inner_steps, create_graph=True, eval_inner=False, adapted=None, keep_mode=False):
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
        if not keep_mode:
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


def make_conv4_eval() -> nn.Module:
    """The Conv4 in eval mode (running statistics), as after ``model.eval()``."""
    return make_conv4().eval()


def maml_keep_mode(model, tasks, inner_lr, inner_steps):
    """Correct MAML for a model in any mode: the module's modes are left as given."""
    return _maml(model, tasks, inner_lr, inner_steps, keep_mode=True)


def maml_train_mode(model, tasks, inner_lr, inner_steps):
    """Bug for an eval-mode model: model.train() (batch statistics) where the running statistics were meant."""
    model.train()
    return _maml(model, tasks, inner_lr, inner_steps)


def make_features() -> nn.Module:
    """The Conv4 feature extractor (no head) for ProtoNets."""
    return make_conv4().features


def _protonet(model, tasks, n_classes, joint=False):
    total = 0.0
    for xs, ys, xq, yq in tasks:
        if joint:
            z = model(torch.cat([xs, xq]))
            zs, zq = z[: len(xs)], z[len(xs):]
        else:
            zs, zq = model(xs), model(xq)
        protos = torch.stack([zs[ys == c].mean(0) for c in range(n_classes)])
        logits = -((zq[:, None, :] - protos[None]) ** 2).sum(-1)
        total = total + F.cross_entropy(logits, yq)
    return total / len(tasks)


def protonet(model, tasks, n_classes):
    """Correct ProtoNets (support and query encoded as two batches)."""
    return _protonet(model, tasks, n_classes)


def protonet_joint(model, tasks, n_classes):
    """Bug: support and query encoded as one batch (batch norm normalises them together)."""
    return _protonet(model, tasks, n_classes, joint=True)
