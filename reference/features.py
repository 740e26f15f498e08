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

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from reference._threads import map_tasks
from reference.validation import as_float_array, check_finite_scalar, check_positive_int
from reference.errors import InvalidInputError
from reference.lowrank import LowRankRows
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


# Rows of one stacked forward pass (see StackedFeatures): large enough for efficient matrix products
# (a 512-row product is as fast per row as a 2048-row one on a 1024-wide layer), small enough that a
# task list gives several blocks for the thread pool and the activations kept stay small. Fixed (not
# derived from the thread count), so the result does not depend on the number of threads; task_blocks
# shares the rows evenly between a multiple of BLOCK_MULTIPLE blocks of at most this size.
STACK_ROWS = 512
# The number of blocks is rounded up to a multiple of this (task_blocks): equal work for a 2-worker pool
# (the 2-core machines the benchmarks run on), and for 4 workers at 4, 8, ... blocks.
BLOCK_MULTIPLE = 2


class StackedFeatures:
    """The features of several tasks from one forward pass, and one VJP back for all of them.

    The backbone's parameters are shared by every task, so the tasks' inputs
    ``[x_support_0; x_query_0; x_support_1; ...]`` go through the backbone as
    one stack: each layer is one large matrix product instead of one per task
    (3x faster for the weight gradients of a 1024-wide layer, and a product
    that large uses several BLAS threads productively), and the VJP

        sum_t (grad_params <G_s^t, Z_s^t> + <G_q^t, Z_q^t>)

    is one backward pass whose weight gradients sum over all the rows at once
    (equal to the per-task sum up to round-off). Use :func:`feature_blocks` to
    cut a task list into stacks of at most :data:`STACK_ROWS` rows.
    Non-finite features are an error naming the task, part and row.
    """

    def __init__(self, backbone: MLP, params: Params, tasks: Sequence[Task], indices: Sequence[int],
                 name: str = "tasks"):
        self.backbone, self.params, self.indices = backbone, params, list(indices)
        parts, self._rows = [], {}
        start = 0
        for i, t in zip(self.indices, tasks):
            ns, nq = t.x_support.shape[0], t.x_query.shape[0]
            self._rows[i] = (start, start + ns, start + ns + nq)
            parts += [t.x_support, t.x_query]
            start += ns + nq
        x = np.concatenate(parts, axis=0)
        # Overflow is detected and reported below as a clear error; silence NumPy's warning about it.
        with np.errstate(over="ignore", invalid="ignore"):
            self.out, self._hs, self._derivs = backbone._forward(params, x, order=1)
        finite = np.isfinite(self.out)
        if not np.all(finite):
            row = int(np.argwhere(~finite)[0][0])
            i = next(i for i, (a, b, c) in self._rows.items() if a <= row < c)
            a, b, _ = self._rows[i]
            part, row = ("x_support", row - a) if row < b else ("x_query", row - b)
            raise InvalidInputError(
                f"the backbone features of {name}[{i}].{part}[{row}] are not finite (NaN/inf): the backbone "
                "overflowed; rescale the inputs or the parameters"
            )

    def support(self, i: int) -> np.ndarray:
        """``Z_s`` of task ``i`` (its index in the full task list)."""
        a, b, _ = self._rows[i]
        return self.out[a:b]

    def query(self, i: int) -> np.ndarray:
        """``Z_q`` of task ``i``."""
        _, b, c = self._rows[i]
        return self.out[b:c]

    def vjp(self, cotangents: dict[int, tuple[np.ndarray | None, np.ndarray | None]]) -> Params:
        """Sum over the tasks of this stack of the gradients of ``<G_s^t, Z_s^t> + <G_q^t, Z_q^t>``.

        ``cotangents[i] = (G_s, G_q)``; a missing task or a ``None`` part counts as zero.
        """
        g = np.empty(self.out.shape, dtype=np.result_type(self.out, *[c for pair in cotangents.values()
                                                                       for c in pair if c is not None]))
        for i in cotangents:
            if i not in self._rows:
                raise KeyError(i)  # not a task of this stack
        # Every row is written once: the cotangent where given, zero elsewhere (no zero-filled pass first).
        for i, (a, b, c) in self._rows.items():
            gs, gq = cotangents.get(i, (None, None))
            g[a:b] = 0.0 if gs is None else gs
            g[b:c] = 0.0 if gq is None else gq
        return self.backbone._backward(self.params, self._hs, self._derivs, g)

    def vjp_factored(self, factors: dict[int, tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]]
                     ) -> Params:
        """:meth:`vjp` with each task's cotangents as factors: ``factors[i] = ((U_s, V_s), (U_q, V_q))`` for
        ``G_s = U_s V_s^T`` and ``G_q = U_q V_q^T`` (a missing task counts as zero).

        The output layer's products go through the factors (:class:`reference.lowrank.LowRankRows`) when
        that costs fewer operations than the dense cotangent, which is used otherwise; the same gradient up
        to round-off either way.
        """
        blocks = []
        for i, ((us, vs), (uq, vq)) in factors.items():
            if i not in self._rows:
                raise KeyError(i)  # not a task of this stack
            a, b, _ = self._rows[i]
            blocks += [(a, us, vs), (b, uq, vq)]
        g = LowRankRows(self.out.shape[0], blocks)
        return self.backbone._backward(self.params, self._hs, self._derivs,
                                       g if g.cheaper_than_dense else g.dense())


def task_blocks(tasks: Sequence[Task], max_rows: int = STACK_ROWS, parts: int = BLOCK_MULTIPLE) -> list[list[int]]:
    """Consecutive groups of task indices of at most ``max_rows`` rows (support + query; at least one task each).

    The number of groups is rounded up to a multiple of ``parts`` and the rows
    are shared evenly between them, so that a pool of ``parts`` workers gets
    equal work: 25 R2-D2 tasks of 100 rows in 512-row groups are 5 groups, 3
    rounds on 2 workers, against 6 groups of ~417 rows, 3 per worker, in the
    time of 2.5 groups (issue 18). ``parts`` is a constant, not the thread
    count, so the grouping (and the round-off of the summed gradient) is the
    same whatever the threads. The greedy split is kept when the even one
    would put more than ``max_rows`` rows in a group (tasks of very different sizes).
    """
    sizes = [t.x_support.shape[0] + t.x_query.shape[0] for t in tasks]
    blocks: list[list[int]] = []
    rows = 0
    for i, n in enumerate(sizes):
        if not blocks or rows + n > max_rows:
            blocks.append([])
            rows = 0
        blocks[-1].append(i)
        rows += n
    # At least the greedy count (an even split of fewer groups would overfill one), even when that count is
    # already a multiple of parts: greedy groups of 500, 500, 500 and 100 rows take 1000 rows' time on 2
    # workers, 4 even groups of 400 rows 800.
    count = min(-(-len(blocks) // max(parts, 1)) * max(parts, 1), len(sizes))
    # Even split: task i goes to the group where the middle of its rows falls.
    total, start = float(sum(sizes)), 0
    even: list[list[int]] = [[] for _ in range(count)]
    for i, n in enumerate(sizes):
        even[min(int((start + n / 2) * count / total), count - 1)].append(i)
        start += n
    even = [b for b in even if b]
    if any(sum(sizes[i] for i in b) > max_rows and len(b) > 1 for b in even):
        return blocks
    return even


class _DeferredFeatures:
    """One task's features inside a :class:`StackedFeatures` block, used where a :class:`TaskFeatures` is:
    ``vjp`` only records the cotangents (for the block's one backward pass) and returns ``None``."""

    def __init__(self, block: StackedFeatures, i: int):
        self.support, self.query = block.support(i), block.query(i)
        self.cotangents: tuple[np.ndarray | None, np.ndarray | None] | None = None

    def vjp(self, g_support: np.ndarray | None, g_query: np.ndarray | None) -> None:
        self.cotangents = (g_support, g_query)


def stacked_task_map(backbone: MLP, params: Params, tasks: Sequence[Task], per_task: Callable[[Any, int], Any], *,
                     need_grad: bool, name: str = "tasks") -> Iterator[tuple[list[Any], Params | None]]:
    """``per_task(features, i)`` for every task, on stacked blocks of tasks (an MLP backbone is shared by the tasks).

    Per block of :func:`task_blocks`: one forward pass for its tasks, ``per_task``
    on each of them in order (``features`` duck-types :class:`TaskFeatures`; its
    ``vjp`` is deferred and returns ``None``), then one VJP for the whole block.
    The blocks run on reference/_threads.py's pool (one BLAS thread each) and
    come back in order as ``(per-task outputs, the block's summed gradient or
    None)``. The gradient is the per-task sum up to round-off (the rows of a
    block are summed inside one GEMM). This is what R2-D2 does, for the
    algorithms whose per-task head takes a :class:`TaskFeatures` (ProtoNets,
    Matching networks, LR-D2).
    """

    def block(indices: list[int]) -> tuple[list[Any], Params | None]:
        feats = StackedFeatures(backbone, params, [tasks[i] for i in indices], indices, name)
        views = [_DeferredFeatures(feats, i) for i in indices]
        outs = [per_task(view, i) for view, i in zip(views, indices)]
        if not need_grad:
            return outs, None
        return outs, feats.vjp({i: v.cotangents for i, v in zip(indices, views) if v.cotangents is not None})

    blocks = task_blocks(tasks)
    # One call's products are a whole block's rows against the backbone's weights.
    rows = max(sum(tasks[i].x_support.shape[0] + tasks[i].x_query.shape[0] for i in b) for b in blocks)
    return map_tasks(block, blocks, work=rows * backbone.n_params)


def feature_blocks(backbone: MLP, params: Params, tasks: Sequence[Task], name: str = "tasks",
                   max_rows: int = STACK_ROWS) -> Iterator[StackedFeatures]:
    """:func:`task_blocks` as :class:`StackedFeatures`, one block at a time."""
    for group in task_blocks(tasks, max_rows):
        yield StackedFeatures(backbone, params, [tasks[j] for j in group], group, name)


def append_ones(Z: np.ndarray) -> np.ndarray:
    """``[Z, 1]``: the bias column of the closed-form solvers."""
    return np.concatenate([Z, np.ones((Z.shape[0], 1), dtype=Z.dtype)], axis=1)


def accumulate(total: Params | None, grads: Sequence[np.ndarray]) -> Params:
    return list(grads) if total is None else [a + b for a, b in zip(total, grads)]


__all__: list[str] = []
