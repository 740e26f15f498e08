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
go back through the backbone by its VJP. Both are low-rank, grouped by left
factor: dual ``dL/dZ = [Alpha, Gm] [G_W - Z^T Gm, -Z^T Alpha]^T``, primal
``[Y - Z W, -Z Gb] [Gb, W]^T`` (rank ``2c``) and ``dL/dZ_q = (scale G_O) W^T``
(rank ``c``); the backbone's linear output layer takes its products through
those factors when that is cheaper (``reference/lowrank.py``). Only solves with one factorisation
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
from reference.linalg import SPDFactors
from reference.validation import check_finite_scalar
from reference.errors import InvalidInputError
from reference.models import MLP
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
    Y = np.asarray(Y)
    W, _ = _ridge(Z[None], (Y[:, None] if Y.ndim == 1 else Y)[None], lam, form, [what])
    return W[0, :, 0] if Y.ndim == 1 else W[0]


def _ridge(Z, Y, lam, form, where):
    """The ridge weights of a stack of ``T`` tasks, ``Z`` ``(T, n, p)``, ``Y`` ``(T, n, c)``: ``(W, (factors,
    alpha))`` with ``alpha = K^{-1} Y`` in the dual form (``None`` in the primal)."""
    _, n, p = Z.shape
    hint = "increase lam"
    Zt = Z.transpose(0, 2, 1)
    if form == "primal":
        factors = SPDFactors(Zt @ Z + lam * np.eye(p), what=[f"Z^T Z + lam I of {w}" for w in where], hint=hint)
        return factors.solve(Zt @ Y), (factors, None)
    factors = SPDFactors(Z @ Zt + lam * np.eye(n), what=[f"Z Z^T + lam I of {w}" for w in where], hint=hint)
    alpha = factors.solve(Y)
    return Zt @ alpha, (factors, alpha)


def _task(feats, task: Task, n_classes, lam, scale, offset, bias_column, normalize, form, regression, where,
          need_grad):
    """One task from its :class:`~reference.features.TaskFeatures` (or anything with ``support``,
    ``query`` and ``vjp``): ``(value, (grads, g_lam, g_scale, g_offset))``."""
    values, out = _heads(feats.support[None], feats.query[None], [task], n_classes, lam, scale, offset, bias_column,
                         normalize, form, regression, [where], need_grad)
    if out is None:
        return values[0], None
    (fs, fq), *hyper = out
    return values[0], (feats.vjp(_dense(fs)[0], _dense(fq)[0]), *(h[0] for h in hyper))


def _heads(Zs: np.ndarray, Zq: np.ndarray, tasks: list[Task], n_classes, lam, scale, offset, bias_column, normalize,
           form, regression, where, need_grad):
    """The ridge heads of ``T`` tasks of equal shapes on their stacked features ``Zs`` ``(T, n, d)`` and ``Zq``
    ``(T, q, d)``: the query losses ``(T,)`` and, with ``need_grad``, the feature cotangents as factors
    ``((U_s, V_s), (U_q, V_q))`` (``G_Zs = U_s V_s^T``, ``G_Zq = U_q V_q^T``, :func:`_dense`) and the heads'
    gradients ``(g_lam, g_scale, g_offset)``, each ``(T,)``.

    The module docstring's formulas, task by task, as NumPy calls on ``(T, ., .)`` stacks: about 40 calls for
    the whole stack instead of 40 per task (issue 18: small calls hold the GIL for their Python overhead,
    while the task pool's other worker waits; the stacked products release it for their work), and the
    small ridge systems solved by :class:`~reference.linalg.SPDFactors`, matrix by matrix. Every
    operation is the one-task operation slice by slice (stacked ``matmul`` calls the same GEMM per
    slice; :func:`_task_sums` sums each task in its one-task order), so each task's results are bit for
    bit those of a one-task head.
    """
    T, n = Zs.shape[:2]
    q = Zq.shape[1]
    if bias_column:
        Zs = np.concatenate([Zs, np.ones((T, n, 1), dtype=Zs.dtype)], axis=2)
        Zq = np.concatenate([Zq, np.ones((T, q, 1), dtype=Zq.dtype)], axis=2)
    if regression:
        Y = np.stack([t.y_support for t in tasks])
        yq = np.stack([t.y_query for t in tasks])
    else:
        Y = np.zeros((T, n, n_classes))
        Y[np.arange(T)[:, None], np.arange(n), np.stack([t.y_support for t in tasks])] = 1.0
        yq = np.stack([t.y_query for t in tasks])
    if normalize:
        root = np.sqrt(n)
        Zs, Y = Zs / root, Y / root
    W, (factors, alpha) = _ridge(Zs, Y, lam, form, where)
    lin = Zq @ W
    o = scale * lin + offset
    # The query loss and its gradient per task, as reference.models._Loss ("mse", or "ce" on the logits o).
    if regression:
        r = o - yq
        loss_scale = 1.0 / (q * o.shape[2])
        values = _task_sums(r * r) * loss_scale
    else:
        loss_scale = 1.0 / q
        m = np.max(np.real(o), axis=2, keepdims=True)
        e = np.exp(o - m)
        se = np.sum(e, axis=2, keepdims=True)
        picked = np.take_along_axis(o, yq[:, :, None], axis=2)[:, :, 0]
        values = np.sum((m + np.log(se))[:, :, 0] - picked, axis=1) * loss_scale
    if not need_grad:
        return values, None
    if regression:
        G_O = 2.0 * r * loss_scale
    else:
        onehot = np.zeros(o.shape)
        onehot[np.arange(T)[:, None], np.arange(q), yq] = 1.0
        G_O = (e / se - onehot) * loss_scale
    g_scale = _task_sums(G_O * lin)
    g_offset = _task_sums(G_O)
    Zst = Zs.transpose(0, 2, 1)
    G_W = scale * (Zq.transpose(0, 2, 1) @ G_O)
    # The feature cotangents as factors G = U V^T (rank 2c on the support, c on the query; see
    # reference/lowrank.py): the module docstring's dL/dZ with its terms grouped by left factor.
    if form == "primal":
        Gb = factors.solve(G_W)
        U_s, V_s = np.concatenate([Y - Zs @ W, -(Zs @ Gb)], axis=2), np.concatenate([Gb, W], axis=2)
        g_lam = -_task_sums(Gb * W, "F")
    else:
        Gm = factors.solve(Zs @ G_W)
        U_s, V_s = np.concatenate([alpha, Gm], axis=2), np.concatenate([G_W - Zst @ Gm, -(Zst @ alpha)], axis=2)
        g_lam = -_task_sums(Gm * alpha, "F")
    U_q, V_q = scale * G_O, W
    if normalize:
        U_s = U_s / root
    if bias_column:  # the ones column is not a feature: drop its row of the right factors
        V_s, V_q = V_s[:, :-1], V_q[:, :-1]
    return values, (((U_s, V_s), (U_q, V_q)), g_lam, g_scale, g_offset)


def _dense(factor: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """``U V^T`` of a stack of factors ``(U, V)``, ``(T, m, r)`` and ``(T, d, r)``."""
    U, V = factor
    return U @ V.transpose(0, 2, 1)


def _task_sums(x: np.ndarray, order: str = "C") -> np.ndarray:
    """``np.sum(x[t])`` for every task ``t`` of a ``(T, ., .)`` stack, each task's entries summed as one contiguous
    row in ``order`` (NumPy's pairwise summation runs in memory order): ``"C"`` for quantities that are C-ordered
    per task, ``"F"`` for products of LAPACK solves (Fortran-ordered), so each sum is the one-task sum."""
    if order == "F":
        x = np.ascontiguousarray(x.transpose(0, 2, 1))
    return np.sum(x.reshape(x.shape[0], -1), axis=1)


def _runs(tasks: list[Task], indices: list[int]) -> list[list[int]]:
    """``indices`` cut into runs of consecutive tasks with equal support and query sizes (one batched head
    each; runs keep the task order, so the first failing task is the one a task-by-task loop would name)."""
    runs: list[list[int]] = []
    shape = None
    for i in indices:
        s = (tasks[i].x_support.shape[0], tasks[i].x_query.shape[0])
        if s != shape:
            runs.append([])
            shape = s
        runs[-1].append(i)
    return runs


def _blocks(backbone, params, tasks, n_classes, lam, scale, offset, bias_column, normalize, form, regression, *,
            need_grad):
    """Per block of tasks (``task_blocks``, fixed size): ``(values, (summed backbone grads, heads))``, in order.

    MLP backbones only. The backbone is shared by the tasks: one stacked forward pass and one VJP
    per block (reference/features.py) around the ridge heads, batched over each run of equal-sized tasks
    (:func:`_heads`); the blocks run on the thread pool of reference/_threads.py, each with one BLAS thread,
    and are reduced in order by the caller.
    """

    def block(indices: list[int]) -> tuple[list[Any], Any]:
        feats = StackedFeatures(backbone, params, [tasks[i] for i in indices], indices)
        values, cotangents, heads = [], {}, []
        for run in _runs(tasks, indices):
            ns = tasks[run[0]].x_support.shape[0]
            if len(run) == len(indices):
                # The block's rows are [x_support_0; x_query_0; x_support_1; ...] of equal sizes: views.
                rows = feats.out.reshape(len(run), -1, feats.out.shape[1])
                Zs, Zq = rows[:, :ns], rows[:, ns:]
            else:
                Zs = np.stack([feats.support(i) for i in run])
                Zq = np.stack([feats.query(i) for i in run])
            vals, out = _heads(Zs, Zq, [tasks[i] for i in run], n_classes, lam, scale, offset, bias_column, normalize,
                               form, regression, [f"tasks[{i}]" for i in run], need_grad)
            values.extend(vals)
            if need_grad:
                ((U_s, V_s), (U_q, V_q)), g_lam, g_scale, g_offset = out
                for k, i in enumerate(run):
                    cotangents[i] = ((U_s[k], V_s[k]), (U_q[k], V_q[k]))
                    heads.append((g_lam[k], g_scale[k], g_offset[k]))
        return values, ((feats.vjp_factored(cotangents), heads) if need_grad else None)

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
