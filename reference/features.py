"""Backbone plumbing shared by R2-D2, LR-D2, prototypical and matching networks.

These algorithms run a backbone ``f`` (a :class:`reference.models.MLP` whose
output is the feature vector) on the support and query inputs of a task,
build something analytic from the features, and backpropagate the feature
cotangents through the backbone. This module holds what they share:

* argument checks (backbone, labels, tasks), raising
  :class:`~reference.errors.InvalidInputError` naming the culprit;
* :class:`TaskFeatures`: one forward pass over ``[x_support; x_query]``,
  a finiteness check of the features, and the matching VJP;
* the optional ones column (bias) and its removal from a cotangent.

The backbone's own ``loss``/``check_y`` are irrelevant here: the labels are
validated by the helpers below.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from reference.validation import as_float_array, check_finite_scalar, check_positive_int
from reference.errors import InvalidInputError
from reference.models import MLP
from reference.tasks import Task, as_tasks

Params = list[np.ndarray]
LabelCheck = Callable[[str, Any, int], np.ndarray]


def as_scalar(value: Any) -> float | complex:
    """A NumPy scalar as a Python ``float`` (``complex`` under complex step)."""
    value = np.asarray(value)[()]
    return complex(value) if np.iscomplexobj(value) else float(value)


def check_backbone(backbone: Any) -> Any:
    from reference.nets.network import Network

    if not isinstance(backbone, (MLP, Network)):
        raise InvalidInputError(
            f"backbone={backbone!r} must be a reference.models.MLP or a reference.nets.Network whose output is the "
            "feature vector, e.g. MLP([d_in, 32, 16], activation='tanh') or conv4((1, 28, 28), 0, head=False)"
        )
    return backbone


def check_n_classes(n_classes: Any, *, minimum: int = 2) -> int:
    return check_positive_int(
        "n_classes", n_classes, minimum=minimum, hint="; pass the number of classes of each task (the N of N-way)"
    )


def check_lam(lam: Any) -> Any:
    """A finite ridge ``lam > 0`` (complex allowed for complex step; the sign is tested on the real part)."""
    return check_finite_scalar(
        "lam", lam, positive=True, hint="; the ridge must be positive for the regularised solve to exist, e.g. lam=1.0"
    )


def class_label_check(n_classes: int) -> LabelCheck:
    """A label check for integer class labels in ``[0, n_classes)``."""

    def check(name: str, y: Any, n: int) -> np.ndarray:
        arr = np.asarray(y)
        if arr.ndim != 1 or arr.shape[0] != n:
            raise InvalidInputError(f"{name} has shape {arr.shape}; expected integer class labels of shape ({n},)")
        if np.issubdtype(arr.dtype, np.floating):
            if not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
                raise InvalidInputError(f"{name} must hold integer class labels, got non-integer floats")
        elif not np.issubdtype(arr.dtype, np.integer):
            raise InvalidInputError(f"{name} must hold integer class labels, got dtype {arr.dtype}")
        arr = arr.astype(np.int64)
        if arr.min() < 0 or arr.max() >= n_classes:
            raise InvalidInputError(
                f"{name} has labels in [{arr.min()}, {arr.max()}] but n_classes={n_classes}; "
                f"labels must lie in [0, {n_classes - 1}]"
            )
        return arr

    return check


def binary_label_check(name: str, y: Any, n: int) -> np.ndarray:
    """Labels that are exactly 0 or 1 (LR-D2), returned as float64."""
    arr = np.asarray(y)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1 or arr.shape[0] != n:
        raise InvalidInputError(f"{name} has shape {arr.shape}; expected binary labels of shape ({n},)")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) or np.iscomplexobj(arr):
        raise InvalidInputError(f"{name} must hold binary labels 0/1, got dtype {arr.dtype}")
    bad = ~((arr == 0) | (arr == 1))
    if np.any(bad):
        i = int(np.argmax(bad))
        raise InvalidInputError(
            f"{name}[{i}]={arr[i]!r} is not binary: LR-D2 is binary logistic regression and needs labels 0/1 "
            "(for more classes use reference.r2d2)"
        )
    return arr.astype(np.float64)


def target_check(n_out: int) -> LabelCheck:
    """Real regression targets of shape ``(n, n_out)`` (``(n,)`` accepted when ``n_out == 1``)."""

    def check(name: str, y: Any, n: int) -> np.ndarray:
        arr = as_float_array(name, y, allow_complex=False)
        if arr.ndim == 1 and n_out == 1:
            arr = arr.reshape(-1, 1)
        if arr.shape != (n, n_out):
            raise InvalidInputError(f"{name} has shape {arr.shape}, expected ({n}, {n_out}) regression targets")
        return arr

    return check


def check_feature_tasks(backbone: MLP, tasks: Any, label_check: LabelCheck, name: str = "tasks") -> list[Task]:
    """Validate inputs against the backbone and labels with ``label_check``."""
    out = []
    for i, t in enumerate(as_tasks(tasks, name)):
        xs = backbone.check_x(t.x_support, f"{name}[{i}].x_support")
        xq = backbone.check_x(t.x_query, f"{name}[{i}].x_query")
        if np.iscomplexobj(xs) or np.iscomplexobj(xq):
            raise InvalidInputError(f"{name}[{i}] has complex inputs; inputs must be real (perturb params instead)")
        ys = label_check(f"{name}[{i}].y_support", t.y_support, xs.shape[0])
        yq = label_check(f"{name}[{i}].y_query", t.y_query, xq.shape[0])
        out.append(Task(xs, ys, xq, yq))
    return out


class TaskFeatures:
    """Features of one task's support and query inputs, and the VJP back to the parameters.

    An MLP: one forward pass over ``[x_support; x_query]`` (the backbone is
    applied row by row, so stacking changes nothing but the cost). A
    ``reference.nets.Network``: batch norm in train mode couples the rows, so
    support and query are two batches (transductive, CONVENTIONS' default)
    unless the network was made with ``joint_batch()`` (one batch, R2-D2's
    encoder); without train-mode batch norm both give the same features.
    Non-finite features (overflow in a saturating backbone, say) are an error
    naming the task.
    """

    def __init__(self, backbone: Any, params: Params, task: Task, where: str):
        self.backbone, self.params = backbone, params
        self.n_support = task.x_support.shape[0]
        x = np.concatenate([task.x_support, task.x_query], axis=0)
        self._passes: list[tuple[Any, Any]] | None = None
        with np.errstate(over="ignore", invalid="ignore"):
            if isinstance(backbone, MLP):
                # Overflow is detected and reported below as a clear error; silence NumPy's warning about it.
                out, self._hs, self._derivs = backbone._forward(params, x, order=1)
            elif backbone.batch_coupled and not backbone.joint:
                outs, self._passes = [], []
                for part in (task.x_support, task.x_query):
                    o, caches, tree = backbone._forward(params, part)
                    outs.append(o)
                    self._passes.append((caches, tree))
                out = np.concatenate(outs, axis=0)
            else:
                out, caches, tree = backbone._forward(params, x)
                self._passes = [(caches, tree)]
        finite = np.isfinite(out)
        if not np.all(finite):
            row = int(np.argwhere(~finite)[0][0])
            part = "x_support" if row < self.n_support else "x_query"
            row = row if row < self.n_support else row - self.n_support
            raise InvalidInputError(
                f"the backbone features of {where}.{part}[{row}] are not finite (NaN/inf): the backbone "
                "overflowed; rescale the inputs or the parameters"
            )
        self.support = out[: self.n_support]
        self.query = out[self.n_support :]

    def vjp(self, g_support: np.ndarray | None, g_query: np.ndarray | None) -> Params:
        """Gradient w.r.t. the parameters of ``<g_support, Z_s> + <g_query, Z_q>``."""
        if g_support is None:
            g_support = np.zeros_like(self.support)
        if g_query is None:
            g_query = np.zeros_like(self.query)
        if self._passes is None:
            g = np.concatenate([g_support, g_query], axis=0)
            return self.backbone._backward(self.params, self._hs, self._derivs, g)
        net = self.backbone
        cots = [g_support, g_query] if len(self._passes) == 2 else [np.concatenate([g_support, g_query], axis=0)]
        total = None
        for (caches, tree), cot in zip(self._passes, cots):
            grads, _ = net.body.bwd(tree, caches, cot, need_gx=False)
            total = grads if total is None else [a + b for a, b in zip(total, grads)]
        return net._to_public(total)


def append_ones(Z: np.ndarray) -> np.ndarray:
    """``[Z, 1]``: the bias column of the closed-form solvers."""
    return np.concatenate([Z, np.ones((Z.shape[0], 1), dtype=Z.dtype)], axis=1)


def accumulate(total: Params | None, grads: Sequence[np.ndarray]) -> Params:
    return list(grads) if total is None else [a + b for a, b in zip(total, grads)]


__all__: list[str] = []
