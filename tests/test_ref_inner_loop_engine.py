"""The fused MLP inner-loop engine (reference.inner_loop) against an independent inner loop.

Fast targeted tests (issue 19). The expected values come from an inner loop
written here, ``p_{k+1} = p_k - a * grad L_s(p_k)`` with the model's public
``loss_and_grad`` (foundation code), differentiated by complex step (Squire &
Trapp 1998) in ``theta`` and in the learning rates. Covered: several equal-shape
tasks (one stacked batch), every kind of learning rate (one shared scalar,
distinct per-tensor scalars, per-entry arrays, a single array on a one-tensor
model, ``None``), a complex learning rate entering the fused step on real
parameters, the product reordering of ``_times_t`` on batches, and the
documented defaults (nothing extra is returned unless asked).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from reference import inner_loop
from reference.models import MLP
from reference.tasks import Task

H = 1e-30


def _independent(model: MLP, params: list[Any], tasks: list[Task], lrs: list[Any], steps: int) -> Any:
    """Mean query loss after ``steps`` plain gradient steps (complex-step safe)."""
    total = 0.0
    for t in tasks:
        p = list(params)
        for _ in range(steps):
            _, g = model.loss_and_grad(p, t.x_support, t.y_support)
            p = [pi if a is None else pi - a * gi for pi, gi, a in zip(p, g, lrs)]
        total = total + model.loss(p, t.x_query, t.y_query)
    return total / len(tasks)


def _tasks(d_in: int, d_out: int, n_tasks: int, seed: int, n_support: int = 4, n_query: int = 3) -> list[Task]:
    rng = np.random.default_rng(seed)
    return [Task(rng.normal(size=(n_support, d_in)), rng.normal(size=(n_support, d_out)),
                 rng.normal(size=(n_query, d_in)), rng.normal(size=(n_query, d_out))) for _ in range(n_tasks)]


def _lrs(kind: str, model: MLP, rng: np.random.Generator) -> list[Any]:
    shapes = model.shapes
    if kind == "shared scalar":  # MAML: one object for every tensor
        a = 0.15
        return [a] * len(shapes)
    if kind == "per-tensor scalars":
        return [float(v) for v in rng.uniform(0.05, 0.3, size=len(shapes))]
    if kind == "arrays":  # Meta-SGD
        return [rng.uniform(0.05, 0.3, size=s) for s in shapes]
    if kind == "head only":  # ANIL-like: the body is not adapted
        return [None] * (len(shapes) - 2) + [0.2, 0.2]
    if kind == "one bias, per entry":  # a single adapted tensor with a vector of rates
        return [None, rng.uniform(0.05, 0.3, size=shapes[1])] + [None] * (len(shapes) - 2)
    raise AssertionError(kind)


def _vdot(a: list[Any], b: list[Any]) -> Any:
    return sum(np.sum(x * y) for x, y in zip(a, b) if x is not None)


@pytest.mark.parametrize("kind", ["shared scalar", "per-tensor scalars", "arrays", "head only", "one bias, per entry"])
def test_fused_engine_on_a_batch_of_tasks_matches_an_independent_inner_loop(kind):
    rng = np.random.default_rng(11)
    model = MLP([2, 5, 4, 2], activation="tanh")
    params = model.init(3)
    tasks = _tasks(2, 2, 3, seed=6)  # equal shapes: one stacked batch
    lrs = _lrs(kind, model, rng)
    steps = 2
    loss, grad, grad_lrs = inner_loop.meta_loss_and_grad(model, params, tasks, lrs, steps, lr_grad=True)
    expected = _independent(model, params, tasks, lrs, steps)
    assert abs(loss - expected) <= 1e-13 * abs(expected)
    # theta: complex step along a random direction
    e = [rng.normal(size=s) for s in model.shapes]
    d = np.imag(_independent(model, [p + 1j * H * ei for p, ei in zip(params, e)], tasks, lrs, steps)) / H
    assert abs(_vdot(grad, e) - d) <= 1e-11 * (abs(d) + np.sqrt(_vdot(grad, grad) * _vdot(e, e)))
    # learning rates: complex step along a random direction of the adapted entries
    f = [None if a is None else rng.normal(size=np.shape(a)) for a in lrs]
    shifted = [None if a is None else a + 1j * H * fi for a, fi in zip(lrs, f)]
    d = np.imag(_independent(model, params, tasks, shifted, steps)) / H
    assert all((g is None) == (a is None) for g, a in zip(grad_lrs, lrs))
    got = _vdot(grad_lrs, f)
    assert abs(got - d) <= 1e-11 * (abs(d) + np.sqrt(_vdot(grad_lrs, grad_lrs) * _vdot(f, f)))


def test_fused_engine_with_one_tensor_and_one_learning_rate_array():
    """A bias-free one-layer MLP has one tensor, so its Meta-SGD rates are one array (not a shared scalar)."""
    rng = np.random.default_rng(2)
    model = MLP([3, 2], activation="identity", bias=False)
    params = model.init(0)
    tasks = _tasks(3, 2, 2, seed=1)
    lrs = [rng.uniform(0.05, 0.3, size=(2, 3))]
    loss, grad, grad_lrs = inner_loop.meta_loss_and_grad(model, params, tasks, lrs, 2, lr_grad=True)
    e = [rng.normal(size=(2, 3))]
    d = np.imag(_independent(model, [params[0] + 1j * H * e[0]], tasks, lrs, 2)) / H
    assert abs(_vdot(grad, e) - d) <= 1e-11 * (abs(d) + 1.0)
    d = np.imag(_independent(model, params, tasks, [lrs[0] + 1j * H * e[0]], 2)) / H
    assert abs(_vdot(grad_lrs, e) - d) <= 1e-11 * (abs(d) + 1.0)


def test_fused_engine_takes_a_complex_learning_rate_on_real_parameters():
    """``d/d alpha`` of the meta-loss by complex step through the fused engine (the first step's GEMM
    adds a complex product to real parameters) against the same through the independent loop."""
    model = MLP([2, 5, 1], activation="tanh")
    params = model.init(1)
    tasks = _tasks(2, 1, 2, seed=3)
    alpha = 0.2 + 1j * H
    loss, grad, _ = inner_loop.meta_loss_and_grad(model, params, tasks, [alpha] * 4, 2)
    expected = _independent(model, params, tasks, [alpha] * 4, 2)
    assert abs(np.imag(loss) / H - np.imag(expected) / H) <= 1e-11 * abs(np.imag(expected) / H)
    assert abs(np.real(loss) - np.real(expected)) <= 1e-13 * abs(expected)
    assert all(np.iscomplexobj(g) for g in grad)


@pytest.mark.parametrize("shape_h, shape_w", [((5, 128), (128, 128)), ((3, 4, 64), (3, 256, 64)),
                                              ((2, 16, 512), (2, 512, 512)), ((2, 17, 128), (2, 128, 128)),
                                              ((2, 3, 40), (2, 30, 40)), ((4, 100), (2, 3, 200, 100))])
def test_times_t_is_h_times_w_transposed(shape_h, shape_w):
    """``_times_t(h, W) = h @ W^T`` over the last two axes, whichever order it forms the product in."""
    rng = np.random.default_rng(0)
    h, W = rng.normal(size=shape_h), rng.normal(size=shape_w)
    got = inner_loop._times_t(h, W)
    expected = np.einsum("...ni,...oi->...no", h, W)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12 * np.max(np.abs(expected)))


@pytest.mark.parametrize("n, out, d_in", [(5, 128, 64), (5, 200, 81), (16, 128, 128), (17, 128, 128), (3, 30, 40)])
def test_times_t_on_a_batch_is_bitwise_each_slice(n, out, d_in):
    """The reordering depends only on the last two axes, so a stacked batch's slices take one task's path
    (the engine's batch = one task, bit for bit)."""
    rng = np.random.default_rng(1)
    h, W = rng.normal(size=(3, n, d_in)), rng.normal(size=(3, out, d_in))
    got = inner_loop._times_t(h, W)
    for t in range(3):
        assert np.array_equal(got[t], inner_loop._times_t(h[t], W[t])), t


def test_defaults_return_nothing_unasked():
    """``adapt`` keeps no support gradients and the meta-gradients carry no learning-rate adjoint unless
    asked (memory: O(K x params) only when the learning-rate gradient needs them)."""
    model = MLP([2, 3, 1])
    params = model.init(0)
    (t,) = _tasks(2, 1, 1, seed=0)
    lrs = [0.1] * 4
    iterates, grads = inner_loop.adapt(model, params, t.x_support, t.y_support, lrs, 2)
    assert len(iterates) == 3 and grads == []
    assert inner_loop.task_loss_and_grad(model, params, t, lrs, 2)[2] is None
    assert inner_loop.meta_loss_and_grad(model, params, [t, t], lrs, 2)[2] is None
    assert inner_loop.meta_loss_and_grad(model, params, [t, t], lrs, 2, fused=False)[2] is None


def test_a_model_above_the_batch_cap_runs_one_task_per_batch():
    """Over BATCH_BYTES / 8 = 196,608 parameters a batch holds a single task (cap 1, never 0)."""
    model = MLP([1, 450, 450, 1], activation="tanh")
    assert model.n_params * 8 > inner_loop.BATCH_BYTES
    params = model.init(0)
    tasks = _tasks(1, 1, 2, seed=5, n_support=2, n_query=2)
    assert inner_loop.task_batches(model, tasks, 2) == [[0], [1]]
    lrs = [0.01] * len(params)
    loss, _, _ = inner_loop.meta_loss_and_grad(model, params, tasks, lrs, 1)
    expected = _independent(model, params, tasks, lrs, 1)
    assert abs(loss - expected) <= 1e-12 * abs(expected)


def test_complex_batches_are_the_largest_that_fit_complex128_parameter_copies():
    """Complex-step tasks carry complex128 parameter iterates (itemsize from NumPy, 16 bytes): every batch's
    ``len(batch) x n_params x 16`` bytes fit in BATCH_BYTES, and with one worker there are as few batches as
    that allows, ``ceil(n_tasks / cap)`` (the docstring's examples: a batch holds as many tasks as fit). 1-2184-1
    has 6,553 parameters, where a 15-, 16- or 17-byte item would cap a batch at 16, 15 or 14 tasks."""
    model = MLP([1, 2184, 1], "tanh")
    itemsize = np.dtype(np.complex128).itemsize
    per_task = model.n_params * itemsize
    cap = inner_loop.BATCH_BYTES // per_task
    assert [inner_loop.BATCH_BYTES // (model.n_params * s) for s in (itemsize - 1, itemsize + 1)] == [cap + 1, cap - 1]
    rng = np.random.default_rng(8)
    for n_tasks in (cap - 1, cap, cap + 1, 2 * cap, 2 * cap + 1):
        tasks = [Task(rng.standard_normal((3, 1)) + 1e-20j, rng.standard_normal((3, 1)), rng.standard_normal((2, 1)),
                      rng.standard_normal((2, 1))) for _ in range(n_tasks)]
        batches = inner_loop.task_batches(model, tasks, 1)
        assert [i for b in batches for i in b] == list(range(n_tasks))
        assert all(len(b) * per_task <= inner_loop.BATCH_BYTES for b in batches), [len(b) for b in batches]
        assert len(batches) == -(-n_tasks // cap), [len(b) for b in batches]
