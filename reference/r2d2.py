"""R2-D2: meta-learning with a differentiable ridge-regression head.

Bertinetto, Henriques, Torr & Vedaldi (2019), "Meta-learning with
differentiable closed-form solvers", ICLR. Per ``shared/CONVENTIONS.md``, for
one task with backbone ``f`` and ``c`` classes:

* ``Z = f(x_support)`` (n x d), with a column of ones appended when
  ``bias_column``; ``Y`` the one-hot support labels (n x c) (the targets in
  the regression variant). With ``normalize`` both ``Z`` (ones column
  included) and ``Y`` are divided by ``sqrt(n)``, as the authors' code does.
* Ridge weights, two algebraically equal forms:
  primal ``W = (Z^T Z + lam I_p)^{-1} Z^T Y`` (a p x p solve, p = d (+1)),
  dual (Woodbury) ``W = Z^T (Z Z^T + lam I_n)^{-1} Y`` (an n x n solve).
* Query logits ``O = scale * Z_q W + offset``, ``Z_q = f(x_query)`` (ones
  column too if used, never normalised); loss ``ce`` on the query labels
  (``mse`` on the query targets in the regression variant).

The meta-loss is the mean over tasks; the meta-gradient is exact with respect
to the backbone parameters, ``lam``, ``scale`` and ``offset`` (the paper's
alpha and beta, scalars). Derivatives through the solve are written by hand
from ``d(A^{-1}) = -A^{-1} dA A^{-1}``: with ``G_W = dL/dW``,

* primal, ``A = Z^T Z + lam I``: ``Gb = A^{-1} G_W``, ``dL/dZ = Y Gb^T -
  (Z Gb) W^T - (Z W) Gb^T``, ``dL/dlam = -<Gb, W>``;
* dual, ``K = Z Z^T + lam I``, ``Alpha = K^{-1} Y``: ``Gm = K^{-1} Z G_W``,
  ``dL/dZ = Alpha G_W^T - Gm (Alpha^T Z) - Alpha (Gm^T Z)``,
  ``dL/dlam = -<Gm, Alpha>``;

then ``dL/dZ`` (ones column dropped, ``1/sqrt(n)`` applied) and ``dL/dZ_q``
go back through the backbone by its VJP. Only solves with one factorisation
per task; never an explicit inverse.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from reference.features import (
    StackedFeatures,
    TaskFeatures,
    accumulate,
    append_ones,
    as_scalar,
    check_backbone,
    check_feature_tasks,
    check_lam,
    check_n_classes,
    class_label_check,
    target_check,
    task_blocks,
)
from reference._threads import map_tasks
from reference.linalg import SPDFactor
from reference.validation import check_finite_scalar
from reference.errors import InvalidInputError
from reference.models import MLP, _Loss
from reference.tasks import Task

Params = list[np.ndarray]
FORMS = ("primal", "dual")


def check_arguments(backbone: Any, params: Any, tasks: Any, n_classes: Any, lam: Any, scale: Any, offset: Any,
                    form: Any, regression: bool = False) -> tuple[MLP, Params, list[Task], int, Any, Any, Any]:
    """Validate R2-D2's arguments; return ``(backbone, params, tasks, n_classes, lam, scale, offset)`` checked.

    The backends call this check and add only their framework's limits.

    Raises:
        InvalidInputError: a bad backbone, parameters, tasks or labels, an unknown ``form``,
            ``lam <= 0``, a non-finite ``scale`` or ``offset``.
    """
    backbone = check_backbone(backbone)
    params = backbone.check_params(params)
    if form not in FORMS:
        raise InvalidInputError(
            f"form={form!r} is unknown; use 'primal' ((Z^T Z + lam I)^{{-1}} Z^T Y, cheap when features < shots) "
            "or 'dual' (Woodbury, cheap when shots < features)"
        )
    n_classes = check_n_classes(n_classes, minimum=1 if regression else 2)
    check = target_check(n_classes) if regression else class_label_check(n_classes)
    tasks = check_feature_tasks(backbone, tasks, check)
    lam = check_lam(lam)
    scale = check_finite_scalar("scale", scale, hint="; scale is the logit multiplier (the paper's alpha)")
    offset = check_finite_scalar("offset", offset, hint="; offset is the logit shift (the paper's beta)")
    return backbone, params, tasks, n_classes, lam, scale, offset


_check = check_arguments  # the former private name


def ridge_weights(
    Z: np.ndarray, Y: np.ndarray, lam: Any, *, form: str = "dual", what: str = "the ridge system"
) -> np.ndarray:
    """Ridge-regression weights ``(Z^T Z + lam I)^{-1} Z^T Y`` (primal) or ``Z^T (Z Z^T + lam I)^{-1} Y`` (dual).

    Exposed for the Woodbury check of ``verify.hessian_inverse``. ``Z`` is used
    as given (append the ones column / normalise beforehand).

    Raises:
        SingularMatrixError: the system matrix is singular in floating point.
    """
    W, _ = _ridge(Z, Y, lam, form, what)
    return W


def _ridge(Z, Y, lam, form, what):
    n, p = Z.shape
    hint = "increase lam"
    if form == "primal":
        factor = SPDFactor(Z.T @ Z + lam * np.eye(p), what=f"Z^T Z + lam I of {what}", hint=hint)
        return factor.solve(Z.T @ Y), (factor, None)
    factor = SPDFactor(Z @ Z.T + lam * np.eye(n), what=f"Z Z^T + lam I of {what}", hint=hint)
    alpha = factor.solve(Y)
    return Z.T @ alpha, (factor, alpha)


def _task(feats, task: Task, n_classes, lam, scale, offset, bias_column, normalize, form, regression, where,
          need_grad):
    """One task from its :class:`~reference.features.TaskFeatures` (or anything with ``support``,
    ``query`` and ``vjp``): ``(value, (grads, g_lam, g_scale, g_offset))``."""
    value, out = _head(feats.support, feats.query, task, n_classes, lam, scale, offset, bias_column, normalize,
                       form, regression, where, need_grad)
    if out is None:
        return value, None
    (G_Zs, G_Zq), *hyper = out
    return value, (feats.vjp(G_Zs, G_Zq), *hyper)


def _head(Zs: np.ndarray, Zq: np.ndarray, task: Task, n_classes, lam, scale, offset, bias_column, normalize,
          form, regression, where, need_grad):
    """The ridge head of one task on its features: the query loss and, with ``need_grad``, the feature
    cotangents ``(G_Zs, G_Zq)`` and the head's gradients ``(g_lam, g_scale, g_offset)``."""
    if bias_column:
        Zs, Zq = append_ones(Zs), append_ones(Zq)
    n = Zs.shape[0]
    if regression:
        Y = task.y_support
    else:
        Y = np.zeros((n, n_classes))
        Y[np.arange(n), task.y_support] = 1.0
    if normalize:
        root = np.sqrt(n)
        Zs, Y = Zs / root, Y / root
    W, (factor, alpha) = _ridge(Zs, Y, lam, form, where)
    lin = Zq @ W
    loss = _Loss("mse" if regression else "ce", scale * lin + offset, task.y_query)
    value = loss.value()[()]
    if not need_grad:
        return value, None
    G_O = loss.grad()
    g_scale = np.sum(G_O * lin)
    g_offset = np.sum(G_O)
    G_W = scale * (Zq.T @ G_O)
    G_Zq = scale * (G_O @ W.T)
    if form == "primal":
        Gb = factor.solve(G_W)
        G_Zs = Y @ Gb.T - (Zs @ Gb) @ W.T - (Zs @ W) @ Gb.T
        g_lam = -np.sum(Gb * W)
    else:
        Gm = factor.solve(Zs @ G_W)
        G_Zs = alpha @ G_W.T - Gm @ (alpha.T @ Zs) - alpha @ (Gm.T @ Zs)
        g_lam = -np.sum(Gm * alpha)
    if normalize:
        G_Zs = G_Zs / root
    if bias_column:
        G_Zs, G_Zq = G_Zs[:, :-1], G_Zq[:, :-1]
    return value, ((G_Zs, G_Zq), g_lam, g_scale, g_offset)


def _blocks(backbone, params, tasks, n_classes, lam, scale, offset, bias_column, normalize, form, regression, *,
            need_grad):
    """Per block of tasks (``task_blocks``, fixed size): ``(values, (summed backbone grads, heads))``, in order.

    MLP backbones only. The backbone is shared by the tasks: one stacked forward pass and one VJP
    per block (reference/features.py) around the small per-task ridge solves; the blocks run on the thread pool of
    reference/_threads.py, each with one BLAS thread, and are reduced in order by the caller.
    """

    def block(indices: list[int]) -> tuple[list[Any], Any]:
        feats = StackedFeatures(backbone, params, [tasks[i] for i in indices], indices)
        values, cotangents, heads = [], {}, []
        for i in indices:
            value, out = _head(feats.support(i), feats.query(i), tasks[i], n_classes, lam, scale, offset,
                               bias_column, normalize, form, regression, f"tasks[{i}]", need_grad)
            values.append(value)
            if need_grad:
                cotangents[i], *head = out
                heads.append(head)
        return values, ((feats.vjp(cotangents), heads) if need_grad else None)

    blocks = task_blocks(tasks)
    # One call's products are a whole block's rows against the backbone's weights.
    rows = max(sum(tasks[i].x_support.shape[0] + tasks[i].x_query.shape[0] for i in b) for b in blocks)
    return map_tasks(block, blocks, work=rows * backbone.n_params)


def meta_loss(
    backbone: MLP,
    params: list[Any],
    tasks: list[Task],
    n_classes: int,
    lam: float,
    scale: float,
    offset: float,
    *,
    bias_column: bool = True,
    normalize: bool = True,
    form: str = "dual",
    regression: bool = False,
) -> float:
    """The R2-D2 meta-loss alone (mean query loss over tasks); see :func:`meta_loss_and_grad`."""
    backbone, params, tasks, n_classes, lam, scale, offset = _check(
        backbone, params, tasks, n_classes, lam, scale, offset, form, regression
    )
    total = 0.0
    if isinstance(backbone, MLP):
        for values, _ in _blocks(backbone, params, tasks, n_classes, lam, scale, offset, bias_column, normalize,
                                 form, regression, need_grad=False):
            for value in values:
                total = total + value
    else:  # a reference.nets.Network: batch norm couples the rows, so no stacking across tasks
        for i, task in enumerate(tasks):
            value, _ = _task(TaskFeatures(backbone, params, task, f"tasks[{i}]"), task, n_classes, lam, scale,
                             offset, bias_column, normalize, form, regression, f"tasks[{i}]", False)
            total = total + value
    return as_scalar(total / len(tasks))


def meta_loss_and_grad(
    backbone: MLP,
    params: list[Any],
    tasks: list[Task],
    n_classes: int,
    lam: float,
    scale: float,
    offset: float,
    *,
    bias_column: bool = True,
    normalize: bool = True,
    form: str = "dual",
    regression: bool = False,
    features: Callable[..., TaskFeatures] = TaskFeatures,
) -> tuple[float, Params, dict[str, float]]:
    """R2-D2 meta-loss and its exact gradient (Bertinetto et al. 2019).

    Formulas in the module docstring. ``form="primal"`` solves the ``p x p``
    system ``Z^T Z + lam I`` (cheap when features < shots), ``"dual"`` the
    ``n x n`` Woodbury system ``Z Z^T + lam I`` (cheap when shots < features);
    both give the same numbers up to round-off.

    Args:
        backbone: an MLP whose output is the feature vector (its ``loss`` is unused).
        params: the backbone parameters.
        tasks: list of :class:`reference.tasks.Task`; labels are integers in
            ``[0, n_classes)`` (regression: targets of shape ``(n, n_classes)``).
        n_classes: classes per task (regression: number of target columns).
        lam: ridge ``> 0``; scale, offset: the query-logit affine map.
        bias_column: append a column of ones to the features.
        normalize: divide the support ``Z`` and ``Y`` by ``sqrt(n)``.
        form: ``"primal"`` or ``"dual"``.
        regression: the regression variant (targets, ``mse``).
        features: the per-task feature factory ``features(backbone, params, task, where)``
            (default :class:`reference.features.TaskFeatures`); the audit's diagnosis passes one
            whose VJP drops the support branch (the "support detached" bug).

    Returns:
        ``(meta_loss, grads, {"lam": ..., "scale": ..., "offset": ...})``.

    Raises:
        InvalidInputError: bad arguments, labels out of range, non-finite features.
        SingularMatrixError: the system matrix is singular in floating point.
    """
    backbone, params, tasks, n_classes, lam, scale, offset = _check(
        backbone, params, tasks, n_classes, lam, scale, offset, form, regression
    )
    total, grads = 0.0, None
    hyper = {"lam": 0.0, "scale": 0.0, "offset": 0.0}
    if features is TaskFeatures and isinstance(backbone, MLP):
        for values, (g, heads) in _blocks(backbone, params, tasks, n_classes, lam, scale, offset, bias_column,
                                          normalize, form, regression, need_grad=True):
            for value, (g_lam, g_scale, g_offset) in zip(values, heads):
                total = total + value
                hyper["lam"] += g_lam
                hyper["scale"] += g_scale
                hyper["offset"] += g_offset
            # The blocks' summed gradients are fresh arrays: add in place (the same numbers).
            grads = list(g) if grads is None else [np.add(a, b, out=a) if a.dtype == np.result_type(a, b) else a + b
                                                   for a, b in zip(grads, g)]
    else:  # a custom feature factory (the audit's diagnosis) or a Network backbone (batch norm couples the
        # rows of a batch, so tasks are not stacked): task by task
        for i, task in enumerate(tasks):
            feats = features(backbone, params, task, f"tasks[{i}]")
            value, (g, g_lam, g_scale, g_offset) = _task(
                feats, task, n_classes, lam, scale, offset, bias_column, normalize, form, regression, f"tasks[{i}]",
                True
            )
            total = total + value
            hyper["lam"] += g_lam
            hyper["scale"] += g_scale
            hyper["offset"] += g_offset
            grads = accumulate(grads, g)
    m = len(tasks)
    return as_scalar(total / m), [g / m for g in grads], {k: as_scalar(v / m) for k, v in hyper.items()}


__all__ = ["FORMS", "meta_loss", "meta_loss_and_grad", "ridge_weights"]
