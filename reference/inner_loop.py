"""Shared inner-loop machinery of MAML, FOMAML, ANIL, Meta-SGD and Reptile.

All of them run ``K`` gradient steps on the support loss,

    p_{k+1} = p_k - a * grad L_s(p_k),

and differ only in the step ``a`` of each parameter tensor: a scalar ``alpha``
everywhere (MAML), ``alpha`` on the head and nothing on the body (ANIL), an
array shaped like the tensor (Meta-SGD). Here ``a`` is a list ``lrs`` with one
entry per parameter tensor: ``None`` (tensor not adapted), a scalar, or an
array. The meta-gradient is obtained by reverse accumulation through the steps:
with ``D = diag(a)`` the step Jacobian is ``dp_{k+1}/dp_k = I - D H_s(p_k)``,
whose transpose is ``I - H_s(p_k) D`` (``H_s`` symmetric), so the adjoint obeys

    v_K = grad L_q(p_K),   v_k = v_{k+1} - H_s(p_k) (a * v_{k+1}),

applied from ``k = K-1`` down to ``0`` (the Hessians at different iterates do
not commute, so the order matters), and ``dL/dtheta = v_0``. The learning-rate
adjoint is ``dL/da = - sum_k grad L_s(p_k) * v_{k+1}``. Each ``H_s v`` is an
exact Hessian-vector product (``model._hvp``); no Hessian is formed. Memory is
``O(K x params)``: the ``K + 1`` iterates (and, for the learning-rate
gradient, the ``K`` support gradients) are stored for the reverse pass.

The functions here take validated inputs (see :func:`check_common`) and use
the models' unvalidated internals ``_loss_and_grad`` and ``_hvp``, so they run
on any model with that interface (``MLP``, ``Quadratic``). For an ``MLP`` the
same recursion runs in :class:`_MLPEngine`, which reuses each inner step's
forward pass in the reverse pass and fuses the weight-sized updates into BLAS
calls (notes before the class); it additionally keeps ``O(K x examples x
width)`` activations. MAML's second-order gradient on an MLP whose layers are
wide next to the tasks' rows goes through :mod:`reference.factored` instead,
which keeps each task's adapted weights as low-rank corrections of ``theta``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy.linalg.blas import get_blas_funcs

from reference import _threads
from reference._threads import map_tasks, pool_size
from reference.validation import check_finite_scalar, check_positive_int
from reference.models import MLP, _Loss, activation_derivatives
from reference.tasks import Task, check_tasks

Params = list[np.ndarray]
# One entry per parameter tensor: None (not adapted), a scalar or an array shaped like the tensor.
LearningRates = Sequence[Any]


def check_common(model: Any, params: Any, tasks: Any, inner_steps: Any) -> tuple[Params, list[Task], int]:
    """Validate the arguments every gradient-based algorithm shares (once, at the boundary)."""
    params = model.check_params(params)
    tasks = check_tasks(model, tasks)
    steps = check_positive_int(
        "inner_steps", inner_steps, hint="; the inner loop needs at least one step (K >= 1)"
    )
    return params, tasks, steps


def check_inner_lr(inner_lr: Any) -> Any:
    """A finite scalar step size (complex allowed, for complex-step checks in ``alpha``)."""
    return check_finite_scalar("inner_lr", inner_lr, hint="; pass a step size such as inner_lr=0.01")


def as_scalar(value: Any) -> float | complex:
    """A NumPy scalar as a Python ``float`` (``complex`` under complex step)."""
    value = np.asarray(value)[()]
    return complex(value) if np.iscomplexobj(value) else float(value)


def adapt(model: Any, params: Params, x: np.ndarray, y: np.ndarray, lrs: LearningRates, steps: int,
          *, keep_iterates: bool = True, keep_grads: bool = False) -> tuple[list[Params], list[Params]]:
    """Run the inner loop; return the iterates ``[p_0, ..., p_K]`` and, if asked, the support gradients.

    With ``keep_iterates=False`` only ``[p_K]`` is returned (O(params) memory).
    Tensors whose learning rate is ``None`` are shared (not copied) between
    iterates, which keeps ANIL's memory at ``K x head``.
    """
    p = list(params)
    iterates, grads = [p], []
    for _ in range(steps):
        _, g = model._loss_and_grad(p, x, y)
        p = [pi if a is None else pi - a * gi for pi, gi, a in zip(p, g, lrs)]
        if keep_iterates:
            iterates.append(p)
        else:
            iterates[0] = p
        if keep_grads:
            grads.append(g)
    return iterates, grads


def task_loss_and_grad(model: Any, params: Params, task: Task, lrs: LearningRates, steps: int, *,
                       first_order: bool = False, lr_grad: bool = False, keep: Callable[[int], bool] | None = None,
                       transpose: bool = False) -> tuple[Any, Params, Params | None]:
    """Query loss after adaptation and its exact gradient for one task.

    Returns ``(L_q(p_K), dL/dtheta, dL/da)``; ``dL/da`` (only with
    ``lr_grad``) has one array per tensor, ``None`` for tensors not adapted.
    With ``first_order`` the gradient is ``grad L_q(p_K)`` (FOMAML: every step
    Jacobian replaced by the identity).

    ``keep`` and ``transpose`` change the adjoint into the one of a known bug
    (the audit's diagnosis catalogue, :mod:`verify.auditing.diagnosis`): a step
    ``k`` with ``keep(k)`` False contributes the identity (its inner gradient
    treated as a constant; the learning-rate adjoint still counts the step),
    and ``transpose`` applies the step Jacobian transposed, ``v - a * (H_s v)``
    instead of ``v - H_s (a * v)``.
    """
    iterates, grads = adapt(model, params, task.x_support, task.y_support, lrs, steps, keep_grads=lr_grad)
    loss, v = model._loss_and_grad(iterates[-1], task.x_query, task.y_query)
    if first_order:
        return loss, v, None
    grad_lrs = [None if a is None else 0.0 for a in lrs] if lr_grad else None
    for k in reversed(range(steps)):
        if grad_lrs is not None:
            # d p_{k+1} / d a = -grad L_s(p_k) (elementwise), contracted with v_{k+1}.
            grad_lrs = [None if a is None else acc - gk * vk
                        for acc, gk, vk, a in zip(grad_lrs, grads[k], v, lrs)]
        if keep is not None and not keep(k):
            continue
        if transpose:
            hv = model._hvp(iterates[k], task.x_support, task.y_support, v)
            v = [vk if a is None else vk - a * hk for vk, hk, a in zip(v, hv, lrs)]
            continue
        direction = [np.zeros_like(vk) if a is None else a * vk for vk, a in zip(v, lrs)]
        hv = model._hvp(iterates[k], task.x_support, task.y_support, direction)
        v = [vk - hk for vk, hk in zip(v, hv)]
    return loss, v, grad_lrs


def meta_loss(model: Any, params: Params, tasks: Sequence[Task], lrs: LearningRates, steps: int) -> Any:
    """Mean over tasks of ``L_q(p_K)`` (forward pass only)."""

    def per_task(task: Task) -> Any:
        iterates, _ = adapt(model, params, task.x_support, task.y_support, lrs, steps, keep_iterates=False)
        return model._loss_and_grad(iterates[-1], task.x_query, task.y_query)[0]

    total = 0.0
    for loss in map_tasks(per_task, tasks, work=_work(model, tasks)):
        total = total + loss
    return as_scalar(total / len(tasks))


def _work(model: Any, tasks: Sequence[Task]) -> float:
    """Size of one matrix product of the inner loop (rows x parameters): ``map_tasks``'s parallel/sequential
    decision (below its threshold the products are too small to free the GIL for long)."""
    return float(getattr(model, "n_params", 0)) * max(np.shape(t.x_support)[0] for t in tasks)


def meta_loss_and_grad(model: Any, params: Params, tasks: Sequence[Task], lrs: LearningRates, steps: int, *,
                       first_order: bool = False, lr_grad: bool = False,
                       fused: bool = True) -> tuple[Any, Params, Params | None]:
    """Mean over tasks of the per-task loss and gradients.

    An ``MLP`` goes through the fused engine (:class:`_MLPEngine`) unless
    ``fused=False``; other models through :func:`task_loss_and_grad`.
    """
    n = len(tasks)
    from reference import factored  # (imports this module)

    if fused and factored.applicable(model, params, tasks, lrs, steps, first_order=first_order, lr_grad=lr_grad):
        # MAML on an MLP wide enough: adapted weights as low-rank corrections of theta (reference/factored.py).
        # Its results are per batch of tasks (sums over the batch's tasks, in task order): summed below likewise.
        results: Any = factored.batch_results(model, params, tasks, lrs[0], steps)
    elif fused and isinstance(model, MLP):
        # Batches of equal-shaped tasks through the stacked engine; per-task results, reduced in task order.
        batched = _MLPEngine(model)
        batches = task_batches(model, tasks, pool_size(n))
        work = _work(model, tasks) * max(len(b) for b in batches)
        if work < _threads.PARALLEL_MIN_WORK:
            # map_tasks runs these in this thread: batches for one worker, not cut for a pool that will not run
            # (MAML 1-40-40-1: one batch of 25 tasks instead of two of 13, ~10% faster; the same numbers, since a
            # batch gives each task its one-task results bit for bit).
            batches = task_batches(model, tasks, 1)
            work = _work(model, tasks) * max(len(b) for b in batches)

        def per_batch(batch: list[int]) -> list[tuple[Any, Params, Params | None]]:
            return batched.tasks(params, [tasks[i] for i in batch], lrs, steps, first_order=first_order,
                                 lr_grad=lr_grad)

        results = (r for rs in map_tasks(per_batch, batches, work=work) for r in rs)
    elif fused and hasattr(model, "_maml_task"):
        # reference.nets.Network: the same recursion, reusing each inner step's forward pass.

        def per_task(task: Task) -> tuple[Any, Params, Params | None]:
            return model._maml_task(params, task, lrs, steps, first_order=first_order, lr_grad=lr_grad)
    else:

        def per_task(task: Task) -> tuple[Any, Params, Params | None]:
            return task_loss_and_grad(model, params, task, lrs, steps, first_order=first_order, lr_grad=lr_grad)

    if not (fused and isinstance(model, MLP)):
        results = map_tasks(per_task, tasks, work=_work(model, tasks))
    total, grad, grad_lrs = 0.0, None, None
    # Tasks (or batches) in parallel, one BLAS thread each (reference/_threads.py); reduced in task order.
    for loss, g, gl in results:
        total = total + loss
        grad = g if grad is None else [a + b for a, b in zip(grad, g)]
        if gl is not None:
            grad_lrs = gl if grad_lrs is None else [None if a is None else a + b for a, b in zip(grad_lrs, gl)]
    grad = [g / n for g in grad]
    if grad_lrs is not None:
        grad_lrs = [None if g is None else g / n for g in grad_lrs]
    return as_scalar(total / n), grad, grad_lrs


# ---------------------------------------------------------------------------
# Fused engine for reference.models.MLP
# ---------------------------------------------------------------------------
#
# The generic loop above calls ``model._hvp``, which recomputes the forward pass
# at ``p_k`` and materialises ``H v`` before ``v - a H v`` is formed. For an MLP
# with few examples per task (n << width) the cost is dominated by passes over
# the weight matrices, so the engine below
#
# * caches the forward/backward quantities of each inner step (activations,
#   their derivatives, the backpropagated deltas: O(K x n x width) memory,
#   small next to the iterates) and reuses them in the reverse pass, so the
#   Hessian-vector product at ``p_k`` needs no new forward pass;
# * uses linearity, ``H (a v) = a H v`` for a shared scalar ``a`` (MAML, ANIL),
#   instead of materialising the scaled direction;
# * writes the two outer products of the R-backward pass
#   ``R{dW} = R{g}^T h + g^T R{h}`` as one GEMM over stacked rows, accumulated
#   straight into ``v`` by BLAS ``gemm`` with ``beta = 1`` (no temporary), and
#   likewise forms ``p_{k+1} = p_k - a g^T h`` with one GEMM.
#
# It computes exactly the same recursion; tests compare it with the generic
# loop and with complex-step derivatives of the meta-loss.


class _CblasGemm:
    """SciPy's own OpenBLAS ``cblas_dgemm`` / ``cblas_zgemm`` called through ``ctypes``, which releases the GIL.

    SciPy's f2py BLAS wrappers (``get_blas_funcs``) hold the GIL for the whole call (its ``_fblas``
    extension never releases it), so the engine's weight-sized GEMMs -- a quarter of a MAML call's
    time at 1-256-256-1 and 8-1024-1024-1 -- ran one at a time on the task pool of
    ``reference/_threads.py`` (issue 18). The same library, the same routine: ``cblas_xgemm`` in
    row-major order with ``a`` transposed is the column-major ``xgemm('N', 'T', q, p, m, ...)`` the
    f2py call makes, so the numbers are the same. Found among the BLAS libraries ``threadpoolctl``
    lists (SciPy's wheel's ``libscipy_openblas``, 32-bit integers, symbols ``scipy_cblas_*``);
    unavailable (``None``) otherwise, and then the f2py wrapper is used.
    """

    ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112

    def __init__(self, lib: Any):
        import ctypes

        i, p, d = ctypes.c_int, ctypes.c_void_p, ctypes.c_double
        self.d = lib.scipy_cblas_dgemm
        self.d.restype = None
        self.d.argtypes = [i, i, i, i, i, i, d, p, i, p, i, d, p, i]
        self.z = lib.scipy_cblas_zgemm
        self.z.restype = None
        self.z.argtypes = [i, i, i, i, i, i, p, p, i, p, i, p, p, i]

    def __call__(self, c: np.ndarray, a: np.ndarray, b: np.ndarray, alpha: Any) -> None:
        """``c <- c + alpha a^T b`` in place: C-ordered ``c`` (p, q), ``a`` (m, p), ``b`` (m, q), one dtype."""
        (m, p), q = a.shape, b.shape[1]
        args = (self.ROW_MAJOR, self.TRANS, self.NO_TRANS, p, q, m)
        if c.dtype == np.float64:
            self.d(*args, float(alpha), a.ctypes.data, p, b.ctypes.data, q, 1.0, c.ctypes.data, q)
        else:
            scalars = np.array([alpha, 1.0], dtype=np.complex128)
            self.z(*args, scalars.ctypes.data, a.ctypes.data, p, b.ctypes.data, q, scalars[1:].ctypes.data,
                   c.ctypes.data, q)


_cblas: Any = None  # the _CblasGemm, built on first use (False: unavailable)


def _cblas_gemm() -> Any:
    """The :class:`_CblasGemm` of the loaded SciPy OpenBLAS, found once; ``False`` if there is none.

    A library is taken only if its ``cblas_xgemm`` reproduces the f2py wrapper's result bit for bit on
    a probe (real and complex): then it is the library (and routine) the wrapper calls, so a pool
    worker's GEMM equals a sequential run's.
    """
    global _cblas
    if _cblas is None:
        import ctypes

        from reference._threads import _blas

        found: Any = False
        blas = _blas()  # threadpoolctl's controller of the loaded BLAS libraries (False without threadpoolctl)
        for lib in blas.lib_controllers if blas else []:
            try:
                handle = ctypes.CDLL(lib.filepath)
            except OSError:  # pragma: no cover - a library threadpoolctl found but cannot be opened again
                continue
            if hasattr(handle, "scipy_cblas_dgemm") and hasattr(handle, "scipy_cblas_zgemm"):
                candidate = _CblasGemm(handle)
                if _same_as_f2py(candidate):
                    found = candidate
                    break
        _cblas = found
    return _cblas


def _same_as_f2py(cblas: _CblasGemm) -> bool:
    """Whether ``cblas`` computes ``c + alpha a^T b`` bit for bit as SciPy's f2py ``xgemm`` on a probe."""
    rng = np.random.default_rng(0)
    for dtype in (np.float64, np.complex128):
        a, b, c = (rng.standard_normal(s).astype(dtype) for s in ((7, 33), (7, 17), (33, 17)))
        if dtype == np.complex128:
            a, c = a + 1j * rng.standard_normal(a.shape), c + 1j * rng.standard_normal(c.shape)
        alpha = dtype(-0.3) if dtype == np.float64 else -0.3 + 0.1j
        want = get_blas_funcs("gemm", dtype=dtype)(alpha, b.T, a.T, beta=1.0, c=c.T, trans_b=1).T
        cblas(c, a, b, alpha)
        if not np.array_equal(c, want):
            return False
    return True


def _addmm_t(c: np.ndarray, a: np.ndarray, b: np.ndarray, alpha: Any, *, inplace: bool) -> np.ndarray:
    """``c + alpha * a^T @ b`` for C-ordered ``c`` (p, q), ``a`` (m, p), ``b`` (m, q), by one BLAS gemm.

    In place when ``inplace`` and the dtypes allow it. A C-ordered ``c`` is the
    Fortran-ordered ``c^T``, so BLAS computes ``c^T <- c^T + alpha b^T a``. On a worker of the task
    pool through :class:`_CblasGemm` (GIL released) where available, else SciPy's f2py wrapper:
    the same routine of the same library, the same numbers.
    """
    dtype = np.result_type(c, a, b, alpha)
    # Only on the task pool's workers, where the GIL is contended; elsewhere the f2py call, whose
    # per-call overhead is lower (~3 vs ~8 us: ctypes' pointer and argument conversions).
    cblas = getattr(_threads._local, "inside", False) and _cblas_gemm()
    if cblas and dtype in (np.float64, np.complex128) and min(a.shape + b.shape) > 0 \
            and max(a.shape + b.shape) < 2**31 and c.shape == (a.shape[1], b.shape[1]):
        if not (inplace and c.dtype == dtype and c.flags.c_contiguous and c.flags.writeable):
            c = np.array(c, dtype=dtype, order="C")
        cblas(c, np.ascontiguousarray(a, dtype=dtype), np.ascontiguousarray(b, dtype=dtype), alpha)
        return c
    gemm = get_blas_funcs("gemm", dtype=dtype)
    if c.dtype != dtype:
        c, inplace = c.astype(dtype), True
    out = gemm(alpha, b.T.astype(dtype, copy=False), a.T.astype(dtype, copy=False), beta=1.0, c=c.T,
               trans_b=1, overwrite_c=inplace)
    return out.T


# Where _times_t reorders its product: few rows against a weight matrix of 128 x 128 to 512 x 512 entries.
# Measured single-threaded (issue 18): 10 x 256 rows by a 256 x 256 weight, 60 us as h @ W^T against 31 us as
# (W @ h^T)^T; at 40 x 40 the two copies cost more than they save (2.5 vs 3.6 us), at 1024 x 1024 the
# product is bound by reading W either way (1.2-1.4 ms both), and at 100 rows h @ W^T is faster.
_TT_MAX_ROWS = 16
_TT_SIZES = (2**14, 2**18)


def _times_t(h: np.ndarray, W: np.ndarray) -> np.ndarray:
    """``h @ W^T`` (``h``: ``(..., n, in)``, ``W``: ``(..., out, in)``).

    For few rows ``n`` against a mid-sized ``W`` it is formed as ``(W @ h^T)^T``: BLAS reads a C-ordered
    ``W`` ~2x faster as the left operand than transposed on the right (``_TT_*`` above). ``h^T`` and the
    result are small copies, kept C-ordered so that every later operation sees the layouts it saw
    before, and the decision depends only on the last two axes' shapes, so a batch's slices take the
    same path as one task (the engine's bitwise batch = one task). Either way the same sums; the
    reordered product may round differently (last bits).
    """
    n, size = h.shape[-2], W.shape[-1] * W.shape[-2]
    if n > _TT_MAX_ROWS or not _TT_SIZES[0] <= size <= _TT_SIZES[1]:
        return h @ _t(W)
    hT = np.ascontiguousarray(np.swapaxes(h, -1, -2))
    return np.ascontiguousarray(np.swapaxes(W @ hT, -1, -2))


def _stack(parts: list[np.ndarray]) -> np.ndarray:
    # Rows stacked: axis 0 of one task's (n, w), axis 1 of a batch's (B, n, w).
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-2)


class _Pass(NamedTuple):
    """What one forward/backward pass at ``p`` leaves for the reverse pass."""

    params: Params
    hs: list[np.ndarray]          # hs[l]: input of layer l (hs[0] = x)
    derivs: list[list[np.ndarray]]  # derivs[j]: [act, act', act''] at hidden layer j's pre-activation
    deltas: list[np.ndarray]      # deltas[l]: d loss / d z_l (z_l the pre-activation of layer l)
    back: list[np.ndarray | None]  # back[l] = deltas[l] @ W_l (l >= 1), the delta before act'
    loss: Any                     # the _Loss object at the output


# The engine runs one task (arrays ``(n, width)``, weights ``(out, in)``) or a batch of ``B`` tasks of
# equal shapes at once (issue 18). A task's inner loop at 1-256-256-1 is ~300 NumPy calls on 10-row
# arrays, a quarter of them Python overhead, and 25 tasks on a 2-thread pool contend for the GIL once
# per call. Tasks of the same shapes are independent and do the same operations, so a batch runs as
# one NumPy call per operation on stacked arrays: a leading task axis on the activations
# ``(B, n, width)`` and on the adapted weights ``(B, out, in)`` (``theta`` itself, unstacked, until the
# first step). The code is the same for both: products and reductions act on the last two axes, and
# only the fused ``c + alpha a^T b`` (one scipy GEMM per task) and the loss dispatch on the task axis.
# Every operation on a batch is the one-task operation applied slice by slice -- ``np.matmul`` over a
# stack calls the same BLAS GEMM per slice as on one matrix, elementwise operations and the row
# reductions see the same elements in the same order -- so each task's results are bit-for-bit those
# of a one-task run (tests/test_ref_threads.py checks it), and the caller reduces them in task order.

#: Bytes of stacked parameters per batch (``B x n_params x itemsize``): the iterates of a batch stay in
#: the per-core L2 cache region's order of magnitude; 1-40-40-1 runs every task at once, 1-256-256-1
#: (66,561 parameters) 2 tasks a batch, an 8-1024-1024-1 task alone.
BATCH_BYTES = 3 * 2**19


def _t(a: np.ndarray) -> np.ndarray:
    return np.swapaxes(a, -1, -2)


def _row_bias(b: np.ndarray) -> np.ndarray:
    """A bias ``(out,)`` (shared, or one task's) or ``(B, out)`` (per task) broadcastable against the
    pre-activations ``(n, out)`` / ``(B, n, out)``."""
    return b if b.ndim == 1 else b[:, None, :]


class _BatchedLoss:
    """:class:`reference.models._Loss` of ``B`` tasks at once: the rows stacked into one ``(B n, d)`` loss whose
    per-row formulas are the per-task ones (``scale`` is the per-task ``1/(n d)`` or ``1/n``)."""

    def __init__(self, name: str, o: np.ndarray, y: np.ndarray):
        B, n, d = o.shape
        self.shape, self.name = o.shape, name
        self.o, self.y = o, y
        self.flat = _Loss(name, o.reshape(B * n, d), y.reshape((B * n,) + y.shape[2:]))
        self.flat.scale = _Loss(name, o[0], y[0]).scale

    def values(self) -> list[Any]:
        return [_Loss(self.name, self.o[b], self.y[b]).value()[()] for b in range(self.shape[0])]

    def grad(self) -> np.ndarray:
        return self.flat.grad().reshape(self.shape)

    def hvp(self, do: np.ndarray) -> np.ndarray:
        return self.flat.hvp(np.broadcast_to(do, self.shape).reshape(self.flat.o.shape)).reshape(self.shape)


def _addmm_t_batch(c: np.ndarray, a: np.ndarray, b: np.ndarray, alpha: Any, *, inplace: bool) -> np.ndarray:
    """``c[t] + alpha * a[t]^T @ b[t]`` for every task ``t``: :func:`_addmm_t` slice by slice (one GEMM each).

    ``c`` is ``(B, p, q)``, or ``(p, q)`` shared by the tasks (then copied, never written).
    """
    dtype = np.result_type(c, a, b, alpha)
    if c.ndim == 2 or not inplace or c.dtype != dtype or not c.flags.c_contiguous:
        out = np.empty((a.shape[0],) + c.shape[-2:], dtype=dtype)
        out[...] = c
    else:
        out = c
    for t in range(a.shape[0]):
        r = _addmm_t(out[t], a[t], b[t], alpha, inplace=True)
        if not np.may_share_memory(r, out[t]):  # pragma: no cover - gemm wrote a copy
            out[t] = r
    return out


def _addmm(c: np.ndarray, a: np.ndarray, b: np.ndarray, alpha: Any, *, inplace: bool) -> np.ndarray:
    """``c + alpha a^T b`` for one task (``a`` 2-D) or per task of a batch (``a`` 3-D)."""
    if a.ndim == 2:
        return _addmm_t(c, a, b, alpha, inplace=inplace)
    return _addmm_t_batch(c, a, b, alpha, inplace=inplace)


class _MLPEngine:
    """Inner loop and reverse accumulation for ``reference.models.MLP`` (see the notes above), for one
    task (:meth:`task`) or a batch of tasks of equal shapes (:meth:`tasks`)."""

    def __init__(self, model: MLP):
        self.model = model
        self.k = 2 if model.bias else 1
        self.n_layers = model.n_layers

    def _split(self, params: Sequence[Any]) -> tuple[list[Any], list[Any]]:
        if self.k == 2:
            return list(params[0::2]), list(params[1::2])
        return list(params), [None] * self.n_layers

    def run(self, params: Params, x: np.ndarray, y: np.ndarray, order: int) -> _Pass:
        """Forward and backward pass at ``params`` on ``x`` (``(n, d)``, or ``(B, n, d)`` for a batch)."""
        m = self.model
        Ws, bs = self._split(params)
        h, hs, derivs = x, [x], []
        for l in range(self.n_layers):
            z = _times_t(h, Ws[l])
            if bs[l] is not None:
                z = z + _row_bias(bs[l])
            if l == self.n_layers - 1:
                break
            ds = activation_derivatives(m.activation, z, order)
            derivs.append(ds)
            h = ds[0]
            hs.append(h)
        loss = _Loss(m.loss_name, z, y) if z.ndim == 2 else _BatchedLoss(m.loss_name, z, y)
        g = loss.grad()
        deltas: list[np.ndarray] = [None] * self.n_layers  # type: ignore[list-item]
        back: list[np.ndarray | None] = [None] * self.n_layers
        for l in reversed(range(self.n_layers)):
            deltas[l] = g
            if l > 0:
                back[l] = g @ Ws[l]
                g = back[l] * derivs[l - 1][1]
        return _Pass(list(params), hs, derivs, deltas, back, loss)

    def grads(self, state: _Pass) -> Params:
        out: Params = []
        for l in range(self.n_layers):
            out.append(_t(state.deltas[l]) @ state.hs[l])
            if self.k == 2:
                out.append(np.sum(state.deltas[l], axis=-2))
        return out

    def step(self, state: _Pass, lrs: LearningRates) -> Params:
        """``p - a * grad L(p)``; a scalar ``a`` on a weight matrix is folded into one GEMM (per task)."""
        new: Params = []
        k = self.k
        for i, (p, a) in enumerate(zip(state.params, lrs)):
            l, is_bias = divmod(i, k)
            if a is None:
                new.append(p)
            elif is_bias:
                new.append(p - a * np.sum(state.deltas[l], axis=-2))
            elif np.ndim(a) == 0:
                new.append(_addmm(p, state.deltas[l], state.hs[l], -a, inplace=False))
            else:
                new.append(p - a * (_t(state.deltas[l]) @ state.hs[l]))
        return new

    def reverse(self, state: _Pass, v: Params, lrs: LearningRates) -> Params:
        """``v - H(p) (a * v)`` at the cached pass, updating ``v``'s arrays in place where possible."""
        Ws, _ = self._split(state.params)
        active = [a for a in lrs if a is not None]
        if not active:
            return v
        if all(np.ndim(a) == 0 for a in active) and all(a is active[0] for a in active):
            # One shared scalar: H (a P v) = a H (P v); direction = P v, scale applied at accumulation.
            scale = active[0]
            direction = [None if a is None else vi for vi, a in zip(v, lrs)]
        else:
            scale = 1.0
            direction = [None if a is None else a * vi for vi, a in zip(v, lrs)]
        DW, Db = self._split(direction)
        hs, derivs = state.hs, state.derivs
        # R-forward: r_z[l] = h_l DW_l^T + Db_l + R{h_l} W_l^T, R{h_{l+1}} = act'(z_l) r_z[l].
        r_h: np.ndarray | None = None
        r_hs: list[np.ndarray | None] = [None]
        r_zs: list[np.ndarray | None] = []
        for l in range(self.n_layers):
            r_z = None
            if DW[l] is not None:
                r_z = _times_t(hs[l], DW[l])
            if Db[l] is not None:
                r_z = _row_bias(Db[l]) if r_z is None else r_z + _row_bias(Db[l])
            if r_h is not None:
                r_z = _times_t(r_h, Ws[l]) if r_z is None else r_z + _times_t(r_h, Ws[l])
            r_zs.append(r_z)
            if l < self.n_layers - 1:
                r_h = None if r_z is None else derivs[l][1] * r_z
                r_hs.append(r_h)
        r_out = r_zs[-1]
        if r_out is None:
            return v
        r_g = state.loss.hvp(np.broadcast_to(r_out, state.deltas[-1].shape))
        v = list(v)
        for l in reversed(range(self.n_layers)):
            g = state.deltas[l]
            # R{dL/dW_l} = R{g}^T h_l + g^T R{h_l}: one GEMM over stacked rows.
            left, right = [r_g], [hs[l]]
            if r_hs[l] is not None:
                left.append(g)
                right.append(r_hs[l])
            r_g_below = None
            if l > 0:
                # Needs DW_l before v (which may be the same array) is updated below.
                r_back = r_g @ Ws[l]
                if DW[l] is not None:
                    r_back = r_back + g @ DW[l]
                d = derivs[l - 1]
                r_g_below = r_back * d[1]
                if r_zs[l - 1] is not None:
                    r_g_below = r_g_below + state.back[l] * d[2] * r_zs[l - 1]
            i = self.k * l
            v[i] = _addmm(v[i], _stack(left), _stack(right), -scale, inplace=True)
            if self.k == 2:
                v[i + 1] = v[i + 1] - scale * np.sum(r_g, axis=-2)
            r_g = r_g_below
        return v

    def _loop(self, params: Params, xs: np.ndarray, ys: np.ndarray, xq: np.ndarray, yq: np.ndarray,
              lrs: LearningRates, steps: int, first_order: bool, lr_grad: bool) -> tuple[_Pass, Params, Any]:
        """The inner loop and the reverse pass: ``(query pass, v_0, learning-rate adjoint or None)``."""
        order = 1 if first_order else 2
        states = []
        p = params
        for _ in range(steps):
            state = self.run(p, xs, ys, order)
            if not first_order:
                states.append(state)
            p = self.step(state, lrs)
        query = self.run(p, xq, yq, 1)
        v = self.grads(query)
        grad_lrs = None
        if not first_order:
            grad_lrs = [None if a is None else 0.0 for a in lrs] if lr_grad else None
            for state in reversed(states):
                if grad_lrs is not None:
                    # d p_{k+1} / d a = -grad L_s(p_k) (elementwise), contracted with v_{k+1}.
                    grad_lrs = [None if a is None else acc - gk * vk
                                for acc, gk, vk, a in zip(grad_lrs, self.grads(state), v, lrs)]
                v = self.reverse(state, v, lrs)
        return query, v, grad_lrs

    def task(self, params: Params, task: Task, lrs: LearningRates, steps: int, *,
             first_order: bool, lr_grad: bool) -> tuple[Any, Params, Params | None]:
        """One task: ``(L_q(p_K), dL/dtheta, dL/da or None)``."""
        query, v, grad_lrs = self._loop(params, task.x_support, task.y_support, task.x_query, task.y_query, lrs,
                                        steps, first_order, lr_grad)
        return query.loss.value()[()], v, grad_lrs

    def tasks(self, params: Params, tasks: Sequence[Task], lrs: LearningRates, steps: int, *,
              first_order: bool, lr_grad: bool) -> list[tuple[Any, Params, Params | None]]:
        """Per task of ``tasks`` (equal shapes, run as one batch): what :meth:`task` returns, bit for bit."""
        if len(tasks) == 1:  # one task: no stacking (the same numbers)
            return [self.task(params, tasks[0], lrs, steps, first_order=first_order, lr_grad=lr_grad)]
        query, v, grad_lrs = self._loop(
            params, np.stack([t.x_support for t in tasks]), np.stack([t.y_support for t in tasks]),
            np.stack([t.x_query for t in tasks]), np.stack([t.y_query for t in tasks]), lrs, steps, first_order,
            lr_grad)
        losses = query.loss.values()
        return [(losses[t], [vi[t] for vi in v],
                 None if grad_lrs is None else [None if g is None else _task_slice(g, t) for g in grad_lrs])
                for t in range(len(tasks))]


#: The former name of the batched engine (one engine serves both now).
_BatchedMLPEngine = _MLPEngine


def _task_slice(g: Any, t: int) -> Any:
    # A learning-rate adjoint is a stacked array, or the 0.0 it started from (K = 0 never happens; kept safe).
    return g[t] if np.ndim(g) else g


def task_batches(model: Any, tasks: Sequence[Task], workers: int) -> list[list[int]]:
    """Consecutive groups of tasks of equal array shapes, at most ``BATCH_BYTES`` of stacked parameters each,
    as many as a multiple of ``workers`` where the tasks allow (equal work per pool worker)."""
    itemsize = 16 if any(np.iscomplexobj(t.x_support) for t in tasks) else 8
    cap = max(1, int(BATCH_BYTES // max(1, getattr(model, "n_params", 1) * itemsize)))
    runs = equal_shape_runs(tasks)
    out: list[list[int]] = []
    for run in runs:
        count = -(-len(run) // cap)
        if len(runs) == 1 and workers > 1:
            count = min(-(-count // workers) * workers, len(run))
        out += split_evenly(run, count)
    return out


def equal_shape_runs(tasks: Sequence[Task]) -> list[list[int]]:
    """The indices of ``tasks`` cut into runs of consecutive tasks whose arrays have equal shapes and dtypes (what
    one stacked batch can hold), in order."""

    def key(t: Task) -> tuple:
        return tuple((a.shape, a.dtype) for a in t)

    runs: list[list[int]] = []
    for i, t in enumerate(tasks):
        if runs and key(tasks[runs[-1][0]]) == key(t):
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def split_evenly(run: list[int], count: int) -> list[list[int]]:
    """``run`` cut into ``count`` consecutive pieces whose sizes differ by at most one, the larger first."""
    size, extra = divmod(len(run), count)
    out, start = [], 0
    for j in range(count):
        n = size + (j < extra)
        out.append(run[start:start + n])
        start += n
    return out
