"""MAML's meta-gradient for an MLP with the adapted weights kept as low-rank corrections of ``theta`` (issue 18).

One inner step changes a weight matrix by a product of the step's rows,

    W_{k+1} = W_k - a * delta_k^T h_k      (delta_k: n x out, h_k: n x in),

so after ``k`` steps a task's adapted weight is ``W_k = W - a * D_k^T H_k`` with ``D_k`` and ``H_k`` the
``k n`` rows of the steps so far stacked. Every product the inner loop and its reverse pass make with an
adapted weight then splits into one with the shared ``W`` and a thin correction,

    h W_k^T = h W^T - a (h H_k^T) D_k,       g W_k = g W - a (g D_k^T) H_k,

and the product with the shared ``W`` is one GEMM over the rows of every task at once (25 tasks of 10
rows: 250 x 256 against 256 x 256 at 1-256-256-1) instead of one 10-row GEMM per task against its own
weight: ~2x the multiply-adds per second on one core (measured 25 against ~11 GMAC/s), no weight-sized
array per task and step. The reverse pass's adjoint has the same structure: it starts as the
query gradient ``delta_q^T h_q`` and each step adds ``R{delta}^T h + delta^T R{h}`` (Pearlmutter's
R-operator, :mod:`reference.inner_loop`), so it is kept as factors ``v = A^T B`` (rows appended, never a
weight-sized update), and a batch's ``sum_t A_t^T B_t`` is one GEMM at the end.

A layer is kept factored when that is the cheaper form: when its factors' rows (the adjoint's
``n_q + 2 n K`` at most) times ``out + in`` are fewer than its ``out x in`` entries. Others (the thin first
and last layers of a regression MLP, every layer of a small one) are kept dense, one adapted weight and
adjoint per task, as the fused engine of :mod:`reference.inner_loop` keeps them. Where no layer is
factored that engine is used instead (:func:`applicable`).

The same recursion as :mod:`reference.inner_loop`, so the same meta-gradient up to rounding (tests
compare it with the generic loop and with complex-step derivatives of the meta-loss). Tasks of equal
shapes run in batches (:func:`_batches`, cut by sizes alone) on the task pool of
:mod:`reference._threads`, each batch summing its tasks' losses and gradients; a batch alone splits its
largest products between threads in pieces fixed by the sizes. So the numbers are a function of the
inputs: they do not depend on the thread count (``tests/test_ref_factored.py`` checks it bit for bit).
They are not a one-task run's bit for bit: a task's rows stacked with others' may round differently in
the last bits (OpenBLAS's one-row tail kernel).

Scope: MAML with one shared scalar step size on every tensor, second order, no learning-rate gradient,
real float64 (complex-step and other calls take the engine of :mod:`reference.inner_loop`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from reference import _threads
from reference.features import BLOCK_MULTIPLE
from reference.inner_loop import _BatchedLoss, _t, equal_shape_runs, split_evenly
from reference.models import MLP, activation_derivatives
from reference.tasks import Task

__all__ = ["BATCH_BYTES", "applicable", "batch_results", "factored_layers"]

#: Bytes of per-step intermediates a batch of tasks keeps for the reverse pass (estimated as 6 arrays of
#: ``rows x width`` per layer and step, ``_batches``). Batches run two at a time on a 2-worker pool; larger
#: batches make longer stacked GEMMs, smaller ones a lower peak heap. Measured (issue 18, 25 tasks, K = 5,
#: default threads, tracemalloc peak, minor faults per call; ``python benchmarks/factored_sweep.py LABEL
#: 8,12,24,32,40 3``): 8-1024-1024-1 at 8 / 12 / 24 / 32 / 40 MiB: 0.42 / 0.33 / 0.27 / 0.23 / 0.23 s, peak
#: 37 / 49 / 66 / 82 / 114 MB (40 MiB: ~1,000 faults a call, the heap trimmed back to the kernel between
#: calls); 1-256-256-1: 38 / 33 / 23 / 23 / 22 ms.
BATCH_BYTES = 32 * 2**20


def _adjoint_rows(l: int, n_support: int, n_query: int, steps: int) -> int:
    """Rows of layer ``l``'s factored adjoint at the end: the query's, then each step's ``R{g}`` and (above the
    first layer, whose input has no ``R{h}``) ``g`` rows."""
    return n_query + (1 if l == 0 else 2) * n_support * steps


def factored_layers(model: MLP, n_support: int, n_query: int, steps: int) -> list[bool]:
    """Per layer, whether its adapted weight and adjoint are kept as factors: the adjoint's rows at most
    (``n_q + n K`` on the first layer, which has no ``R{h}``; ``n_q + 2 n K`` above) times ``out + in``
    fewer than the ``out x in`` entries of the dense form."""
    out = []
    for l, (o, i) in enumerate(model._split(model.shapes)[0]):
        rank = _adjoint_rows(l, n_support, n_query, steps)
        out.append(rank * (o + i) < o * i)
    return out


def applicable(model: Any, params: Sequence[Any], tasks: Sequence[Task], lrs: Sequence[Any], steps: int, *,
               first_order: bool, lr_grad: bool) -> bool:
    """Whether :func:`batch_results` serves this call: an ``MLP``, MAML's one real scalar step size on every
    tensor, the exact (second-order) gradient without the learning-rate adjoint, real tasks, and at least one
    layer where the factors are the cheaper form for every task's shapes (complex parameters, step size or
    data -- a complex-step check -- take the engine of :mod:`reference.inner_loop`)."""
    if not isinstance(model, MLP) or first_order or lr_grad or not tasks:
        return False
    a = lrs[0]
    if any(b is not a for b in lrs) or np.ndim(a) != 0 or np.iscomplexobj(a):
        return False
    if any(np.iscomplexobj(p) for p in params) or any(np.iscomplexobj(x) for t in tasks for x in t) or \
            any(x.dtype != np.float64 for t in tasks for x in (t.x_support, t.x_query)):
        return False
    return all(any(factored_layers(model, t.x_support.shape[0], t.x_query.shape[0], steps)) for t in tasks)


def _rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for stacked rows ``a`` ``(T, n, p)`` and one matrix ``b`` ``(p, q)``: one GEMM over the
    ``T n`` rows, its columns cut in pieces fixed by the sizes and shared between this thread and the task
    pool's workers when large (:func:`reference._threads.split_range`). By columns, not rows: each thread then
    reads its part of ``b`` once (by rows every thread read all of a 1024 x 1024 ``b``: 1.0x against 1.9x
    on 2 threads at 90 x 1024 @ 1024 x 1024)."""
    T, n, p = a.shape
    q = b.shape[1]
    flat = a.reshape(T * n, p)
    out = np.empty((T * n, q), dtype=np.result_type(a, b))

    def part(start: int, stop: int) -> None:
        np.matmul(flat, b[:, start:stop], out=out[:, start:stop])

    _threads.split_range(part, q, work=float(T * n) * p * q, min_piece=64)
    return out.reshape(T, n, q)


class _DenseWeight:
    """An adapted weight per task, ``(T, out, in)``, or ``theta``'s ``(out, in)`` before the first step."""

    def __init__(self, W: np.ndarray):
        self.W = W

    def times_t(self, h: np.ndarray, a: Any) -> np.ndarray:
        return _rows(h, _t(self.W)) if self.W.ndim == 2 else h @ _t(self.W)

    def times(self, g: np.ndarray, a: Any) -> np.ndarray:
        return _rows(g, self.W) if self.W.ndim == 2 else g @ self.W

    def step(self, d: np.ndarray, h: np.ndarray, a: Any) -> _DenseWeight:
        return _DenseWeight(self.W - a * (_t(d) @ h))


class _FactoredWeight:
    """Task ``t``'s adapted weight ``W - a D[t, :m]^T H[t, :m]``; ``D`` and ``H`` are shared with the later
    steps' weights, which fill the rows after ``m``."""

    def __init__(self, W: np.ndarray, D: np.ndarray, H: np.ndarray, m: int):
        self.W, self.D, self.H, self.m = W, D, H, m

    def times_t(self, h: np.ndarray, a: Any) -> np.ndarray:
        z = _rows(h, _t(self.W))
        if self.m:
            z -= a * ((h @ _t(self.H[:, :self.m])) @ self.D[:, :self.m])
        return z

    def times(self, g: np.ndarray, a: Any) -> np.ndarray:
        z = _rows(g, self.W)
        if self.m:
            z -= a * ((g @ _t(self.D[:, :self.m])) @ self.H[:, :self.m])
        return z

    def step(self, d: np.ndarray, h: np.ndarray, a: Any) -> _FactoredWeight:
        m, n = self.m, d.shape[1]
        self.D[:, m:m + n] = d
        self.H[:, m:m + n] = h
        return _FactoredWeight(self.W, self.D, self.H, m + n)


class _DenseAdjoint:
    """The adjoint of a weight, one ``(out, in)`` array per task: ``V`` ``(T, out, in)``."""

    def __init__(self, delta: np.ndarray, h: np.ndarray, rows: int):
        self.V = _t(delta) @ h

    def dir_t(self, h: np.ndarray) -> np.ndarray:  # h V^T
        return h @ _t(self.V)

    def dir(self, g: np.ndarray) -> np.ndarray:  # g V
        return g @ self.V

    def add(self, c: Any, lefts: list[np.ndarray], rights: list[np.ndarray]) -> None:
        # One GEMM over the stacked rows (a copy even of one part: layer sizes where this form is chosen are small).
        self.V += c * (_t(np.concatenate(lefts, axis=1)) @ np.concatenate(rights, axis=1))

    def total(self) -> np.ndarray:
        """The batch's tasks' adjoints summed (task order)."""
        return np.sum(self.V, axis=0)


class _FactoredAdjoint:
    """The adjoint of a weight as factors: task ``t``'s is ``A[t, :r]^T B[t, :r]``; a step appends rows."""

    def __init__(self, delta: np.ndarray, h: np.ndarray, rows: int):
        T, n, _ = delta.shape
        self.A = np.empty((T, rows, delta.shape[2]))
        self.B = np.empty((T, rows, h.shape[2]))
        self.A[:, :n] = delta
        self.B[:, :n] = h
        self.r = n

    def dir_t(self, h: np.ndarray) -> np.ndarray:
        return (h @ _t(self.B[:, :self.r])) @ self.A[:, :self.r]

    def dir(self, g: np.ndarray) -> np.ndarray:
        return (g @ _t(self.A[:, :self.r])) @ self.B[:, :self.r]

    def add(self, c: Any, lefts: list[np.ndarray], rights: list[np.ndarray]) -> None:
        for left, right in zip(lefts, rights):
            r, n = self.r, left.shape[1]
            np.multiply(left, c, out=self.A[:, r:r + n])
            self.B[:, r:r + n] = right
            self.r = r + n

    def total(self) -> np.ndarray:
        """The batch's tasks' adjoints summed: ``sum_t A_t^T B_t``, one GEMM over every task's rows."""
        T, _, out = self.A.shape
        A = np.ascontiguousarray(self.A[:, :self.r]).reshape(T * self.r, out)
        B = np.ascontiguousarray(self.B[:, :self.r]).reshape(T * self.r, self.B.shape[2])
        return _rows(A.T[None], B).reshape(out, self.B.shape[2])


class _Pass:
    """One forward/backward pass of a batch at the adapted weights ``Ws`` and biases ``bs``."""

    def __init__(self, engine: _Engine, Ws: list[Any], bs: list[Any], x: np.ndarray, y: np.ndarray, order: int):
        m, a, L = engine.model, engine.a, engine.L
        self.Ws, self.bs, self.a = Ws, bs, a
        h, self.hs, self.derivs = x, [x], []
        for l in range(L - 1):  # hidden layers
            ds = activation_derivatives(m.activation, self._pre(l, h), order)
            self.derivs.append(ds)
            h = ds[0]
            self.hs.append(h)
        z = self._pre(L - 1, h)
        self.loss = _BatchedLoss(m.loss_name, z, y)
        g = self.loss.grad()
        self.deltas: list[np.ndarray] = [None] * L  # type: ignore[list-item]
        self.back: list[np.ndarray | None] = [None] * L
        for l in reversed(range(L)):
            self.deltas[l] = g
            if l > 0:
                self.back[l] = Ws[l].times(g, a)
                g = self.back[l] * self.derivs[l - 1][1]

    def _pre(self, l: int, h: np.ndarray) -> np.ndarray:
        """Layer ``l``'s pre-activation ``h W_l^T + b_l``."""
        z = self.Ws[l].times_t(h, self.a)
        if self.bs[l] is not None:
            z += self.bs[l][:, None, :]
        return z


class _Engine:
    """The inner loop and reverse pass of a batch of equal-shaped tasks (see the module docstring)."""

    def __init__(self, model: MLP, a: float, steps: int, n_support: int, n_query: int):
        self.model, self.a, self.steps, self.L = model, a, steps, model.n_layers
        self.factored = factored_layers(model, n_support, n_query, steps)
        self.n, self.nq = n_support, n_query

    def run(self, params: Sequence[np.ndarray], xs: np.ndarray, ys: np.ndarray, xq: np.ndarray,
            yq: np.ndarray) -> tuple[list[Any], list[Any], list[np.ndarray | None]]:
        """``(query losses, weight adjoints, bias adjoints)`` of the batch: the adjoints are ``v_0``."""
        a, L, K, n = self.a, self.L, self.steps, self.n
        T = xs.shape[0]
        thetas, biases = self.model._split(params)
        Ws: list[Any] = []
        for l, W in enumerate(thetas):
            if self.factored[l]:
                Ws.append(_FactoredWeight(W, np.empty((T, n * K, W.shape[0])), np.empty((T, n * K, W.shape[1])), 0))
            else:
                Ws.append(_DenseWeight(W))
        bs = [None if b is None else np.broadcast_to(b, (T,) + b.shape) for b in biases]
        states = []
        for _ in range(K):
            state = _Pass(self, Ws, bs, xs, ys, 2)
            states.append(state)
            Ws = [W.step(state.deltas[l], state.hs[l], a) for l, W in enumerate(Ws)]
            bs = [None if b is None else b - a * np.sum(state.deltas[l], axis=1) for l, b in enumerate(bs)]
        query = _Pass(self, Ws, bs, xq, yq, 1)
        adj = [(_FactoredAdjoint if self.factored[l] else _DenseAdjoint)(
            query.deltas[l], query.hs[l], _adjoint_rows(l, n, self.nq, K)) for l in range(L)]
        vb = [None if b is None else np.sum(query.deltas[l], axis=1) for l, b in enumerate(bs)]
        for state in reversed(states):
            # v <- v - a H(p_k) v: R-forward (r_z = h DW^T + Db + R{h} W_k^T), then R-backward.
            hs, derivs = state.hs, state.derivs
            r_h = None
            r_hs: list[np.ndarray | None] = [None]
            r_zs = []
            for l in range(L):
                r_z = adj[l].dir_t(hs[l])
                if vb[l] is not None:
                    r_z += vb[l][:, None, :]
                if r_h is not None:
                    r_z += state.Ws[l].times_t(r_h, a)
                r_zs.append(r_z)
                if l < L - 1:
                    r_h = derivs[l][1] * r_z
                    r_hs.append(r_h)
            r_g = state.loss.hvp(r_zs[-1])
            for l in reversed(range(L)):
                g = state.deltas[l]
                below = None
                if l > 0:
                    # Uses this step's direction (v before the update below).
                    r_back = state.Ws[l].times(r_g, a)
                    r_back += adj[l].dir(g)
                    d = derivs[l - 1]
                    below = r_back * d[1]
                    below += state.back[l] * d[2] * r_zs[l - 1]
                # R{dL/dW_l} = R{g}^T h_l + g^T R{h_l}, scaled by -a into the adjoint.
                lefts, rights = [r_g], [hs[l]]
                if r_hs[l] is not None:
                    lefts.append(g)
                    rights.append(r_hs[l])
                adj[l].add(-a, lefts, rights)
                if vb[l] is not None:
                    vb[l] = vb[l] - a * np.sum(r_g, axis=1)
                r_g = below
        return query.loss.values(), adj, vb


def _batches(model: MLP, tasks: Sequence[Task], steps: int) -> list[list[int]]:
    """Consecutive tasks of equal shapes, at most :data:`BATCH_BYTES` of intermediates a batch, a run of equal
    shapes cut into a multiple of :data:`reference.features.BLOCK_MULTIPLE` batches where it has the tasks
    (equal work for a 2-worker pool), as equal as they can be. The cut depends on the sizes alone, never on
    the thread count, so neither do the numbers."""
    widths = sum(model.sizes[1:])
    out: list[list[int]] = []
    for run in equal_shape_runs(tasks):
        t = tasks[run[0]]
        per_task = 8 * 6 * widths * (steps * t.x_support.shape[0] + t.x_query.shape[0])
        count = -(-len(run) // max(1, BATCH_BYTES // per_task))
        out += split_evenly(run, min(len(run), -(-count // BLOCK_MULTIPLE) * BLOCK_MULTIPLE))
    return out


def batch_results(model: MLP, params: Sequence[np.ndarray], tasks: Sequence[Task], a: float,
                  steps: int) -> Iterator[tuple[Any, list[np.ndarray], None]]:
    """Per batch of :func:`_batches`, in order: ``(sum_t L_q^t(p_K^t), sum_t dL^t/dtheta, None)`` over its tasks
    (``lrs`` all ``a``), computed by the factored engine; the caller sums the batches and divides by the number
    of tasks. Batches run on the task pool (:func:`reference._threads.map_tasks`: one BLAS thread each, in
    parallel when worth it); a batch run alone shares its largest products between threads instead."""
    batches = _batches(model, tasks, steps)

    def per_batch(batch: list[int]) -> tuple[Any, list[np.ndarray], None]:
        ts = [tasks[i] for i in batch]
        engine = _Engine(model, a, steps, ts[0].x_support.shape[0], ts[0].x_query.shape[0])
        losses, adj, vb = engine.run(params, *(np.stack([getattr(t, f) for t in ts]) for f in Task._fields))
        loss: Any = 0.0
        for value in losses:  # task order
            loss = loss + value
        grad: list[np.ndarray] = []
        for l in range(engine.L):
            grad.append(adj[l].total())
            if model.bias:
                grad.append(np.sum(vb[l], axis=0))
        return loss, grad, None

    rows = max(len(b) * (tasks[b[0]].x_support.shape[0] + tasks[b[0]].x_query.shape[0]) for b in batches)
    yield from _threads.map_tasks(per_batch, batches, work=float(model.n_params) * rows)
