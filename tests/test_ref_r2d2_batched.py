"""R2-D2's batched ridge heads (reference/r2d2.py ``_heads``) on task lists of mixed sizes (issue 18).

The reference solves the heads of each run of consecutive equal-sized tasks of a stacked block
as one batch. Tasks of different support and query sizes, interleaved, make several runs per
block (and blocks of uneven rows); the meta-loss must still be the independent least-squares
head's of ``test_ref_r2d2_independent`` (lstsq on the stacked system), the meta-gradient its
complex step along random directions, and a singular ridge system is reported for the first
task that has one, by its index in the task list, as a task-by-task loop would.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.linalg

from reference import r2d2
from reference.errors import SingularMatrixError
from reference.models import MLP
from reference.tasks import Task
from test_ref_r2d2_independent import LAM, OFFSET, SCALE, SIZES, loss_lstsq, loss_solve

# (support, query) sizes: runs [0, 1], [2], [3], [4, 5] of equal shapes, with n < p = 4 (+1) and n > p.
SHAPES = [(3, 4), (3, 4), (6, 4), (6, 2), (3, 5), (3, 5)]


def _problem(regression: bool, seed: int, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    model = MLP(list(SIZES), "tanh", "mse")
    params = [p + 0.3 * rng.standard_normal(p.shape) for p in model.init(seed)]
    n_classes = 2 if regression else 3
    tasks = []
    for ns, nq in shapes:
        xs, xq = rng.standard_normal((ns, SIZES[0])), rng.standard_normal((nq, SIZES[0]))
        if regression:
            ys, yq = rng.standard_normal((ns, n_classes)), rng.standard_normal((nq, n_classes))
        else:
            ys, yq = rng.integers(0, n_classes, ns), rng.integers(0, n_classes, nq)
        tasks.append(Task(xs, ys, xq, yq))
    return model, params, tasks, n_classes


@pytest.mark.parametrize("form", ["dual", "primal"])
@pytest.mark.parametrize("regression", [False, True])
def test_mixed_task_sizes_match_the_independent_head(form: str, regression: bool) -> None:
    model, params, tasks, n_classes = _problem(regression, seed=21 + regression)
    kw = dict(bias_column=True, normalize=True, form=form, regression=regression)
    value, grads, hyper = r2d2.meta_loss_and_grad(model, params, tasks, n_classes, LAM, SCALE, OFFSET, **kw)
    theirs = loss_lstsq(params, tasks, n_classes, LAM, SCALE, OFFSET, True, True, regression)
    assert value == pytest.approx(theirs, rel=1e-12, abs=1e-14)
    assert r2d2.meta_loss(model, params, tasks, n_classes, LAM, SCALE, OFFSET, **kw) == pytest.approx(
        theirs, rel=1e-12, abs=1e-14)
    rng = np.random.default_rng(5)
    h = 1e-30
    for _ in range(2):
        dp = [rng.standard_normal(p.shape) for p in params]
        dl, ds, do = rng.standard_normal(3)
        exact = np.imag(loss_solve([p + 1j * h * d for p, d in zip(params, dp)], tasks, n_classes, LAM + 1j * h * dl,
                                   SCALE + 1j * h * ds, OFFSET + 1j * h * do, True, True, regression)) / h
        claimed = (sum(float(np.sum(g * d)) for g, d in zip(grads, dp)) + hyper["lam"] * dl + hyper["scale"] * ds
                   + hyper["offset"] * do)
        size = np.sqrt(sum(float(np.sum(g * g)) for g in grads) + sum(v * v for v in hyper.values()))
        size *= np.sqrt(sum(float(np.sum(d * d)) for d in dp) + dl * dl + ds * ds + do * do)
        assert abs(claimed - exact) <= 1e-11 * size, (claimed, exact, size)


@pytest.mark.parametrize("form", ["dual", "primal"])
def test_the_first_singular_task_is_named(form: str) -> None:
    # Identical support points make Z rank one; lam = 1e-30 does not help in floating point. Tasks 3 and 5
    # (runs [3] and [4, 5]) are singular: the error names tasks[3], as a task-by-task loop would. The other
    # tasks' systems are regular at lam = 1e-30: n <= p + 1 = 5 shots (dual), n >= 5 (primal).
    shapes = [(3, 4), (3, 4), (4, 4), (4, 2), (3, 5), (3, 5)]
    if form == "primal":
        shapes = [(ns + 3, nq) for ns, nq in shapes]
    model, params, tasks, n_classes = _problem(False, 30, shapes)
    bad = list(tasks)
    for i in (3, 5):
        t = tasks[i]
        bad[i] = Task(np.repeat(t.x_support[:1], len(t.x_support), axis=0), t.y_support, t.x_query, t.y_query)
    what = re.escape("Z Z^T + lam I" if form == "dual" else "Z^T Z + lam I")
    with pytest.raises(SingularMatrixError, match=rf"^{what} of tasks\[3\] is singular.*; increase lam$"):
        r2d2.meta_loss_and_grad(model, params, bad, n_classes, 1e-30, SCALE, OFFSET, form=form)


@pytest.mark.parametrize("form", ["dual", "primal"])
@pytest.mark.parametrize("regression", [False, True])
def test_a_stack_of_heads_is_each_head_bit_for_bit(form: str, regression: bool) -> None:
    # The heads of a run of equal-sized tasks as one (T, ., .) stack give each task's one-task results exactly
    # (the same GEMM per slice, each task's sums in its own order): stacking changes the speed, not a bit.
    rng = np.random.default_rng(40 + regression)
    n, q, d, n_classes = 6, 4, 5, 3
    tasks = []
    for _ in range(3):
        if regression:
            ys, yq = rng.standard_normal((n, n_classes)), rng.standard_normal((q, n_classes))
        else:
            ys, yq = rng.integers(0, n_classes, n), rng.integers(0, n_classes, q)
        tasks.append(Task(rng.standard_normal((n, 2)), ys, rng.standard_normal((q, 2)), yq))
    Zs, Zq = rng.standard_normal((3, n, d)), rng.standard_normal((3, q, d))
    args = (n_classes, LAM, SCALE, OFFSET, True, True, form, regression)
    values, (factors, *hyper) = r2d2._heads(Zs, Zq, tasks, *args, ["a", "b", "c"], True)
    for t in range(3):
        v, (one, *h) = r2d2._heads(Zs[t:t + 1], Zq[t:t + 1], tasks[t:t + 1], *args, ["a"], True)
        assert v[0] == values[t]
        # the feature cotangents' factors ((U_s, V_s), (U_q, V_q))
        assert all(np.array_equal(a[0], b[t]) for pa, pb in zip(one, factors) for a, b in zip(pa, pb))
        assert [x[0] for x in h] == [x[t] for x in hyper]


@pytest.mark.parametrize("form", ["primal", "dual"])
@pytest.mark.parametrize("n, p", [(6, 3), (3, 6)])
def test_ridge_weights_of_one_target_vector_and_of_a_matrix(form: str, n: int, p: int) -> None:
    # ridge_weights(Z, y) for a 1-D y is the (p,) vector (Z^T Z + lam I)^{-1} Z^T y (numpy.linalg.solve, the
    # primal normal equations, for either form), and each column of a 2-D Y is solved on its own.
    rng = np.random.default_rng(n * 10 + p)
    Z, Y, lam = rng.standard_normal((n, p)), rng.standard_normal((n, 2)), 0.3
    exact = np.linalg.solve(Z.T @ Z + lam * np.eye(p), Z.T @ Y)
    w = r2d2.ridge_weights(Z, Y[:, 1], lam, form=form)
    assert w.shape == (p,)
    np.testing.assert_allclose(w, exact[:, 1], rtol=1e-12, atol=1e-13)
    W = r2d2.ridge_weights(Z, Y, lam, form=form)
    assert W.shape == (p, 2)
    np.testing.assert_allclose(W, exact, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("regression", [False, True])
def test_equal_support_sizes_with_different_query_sizes_are_separate_runs(regression: bool) -> None:
    # Consecutive tasks with the same support size but different query sizes must not share a batched head
    # (their query blocks cannot be stacked): the value is still the independent lstsq head's.
    model, params, tasks, n_classes = _problem(regression, seed=31, shapes=[(3, 4), (3, 2)] * 3)
    kw = dict(bias_column=True, normalize=True, form="dual", regression=regression)
    theirs = loss_lstsq(params, tasks, n_classes, LAM, SCALE, OFFSET, True, True, regression)
    assert r2d2.meta_loss(model, params, tasks, n_classes, LAM, SCALE, OFFSET, **kw) == pytest.approx(
        theirs, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("n, k", [(6, 5), (9, 7), (13, 11)])
@pytest.mark.parametrize("complex_step", [False, True])
def test_task_sums_are_each_tasks_one_task_numpy_sum_bit_for_bit(n: int, k: int, complex_step: bool) -> None:
    # _task_sums(x, order)[t] is np.sum of task t's matrix as a one-task head holds it: "F" for products of
    # LAPACK solves (scipy's cho_solve returns Fortran-ordered arrays; np.stack makes the stack C-ordered),
    # "C" for products of matmuls. NumPy sums in memory order, pairwise, so the order decides the last bits;
    # the data (magnitudes over 6 decades) tells the two orders apart.
    rng = np.random.default_rng(n * k + complex_step)
    distinguished = {"F": False, "C": False}
    for _ in range(20):  # draws until each order's data tells the orders apart (how often depends on NumPy's SIMD)
        solves, products = [], []
        for _ in range(3):
            M = rng.standard_normal((n, n))
            factor = scipy.linalg.cho_factor(M @ M.T + n * np.eye(n))
            B, C = (rng.standard_normal((n, k)) * 10.0 ** rng.uniform(-3, 3, (n, k)) for _ in range(2))
            if complex_step:
                B = B + 1e-20j * rng.standard_normal((n, k))
            one_task = scipy.linalg.cho_solve(factor, B) * scipy.linalg.cho_solve(factor, C)
            assert one_task.flags.f_contiguous and not one_task.flags.c_contiguous
            solves.append(one_task)
            products.append(B @ (C.T @ B) * 10.0 ** rng.uniform(-3, 3, (n, k)))
        assert all(p.flags.c_contiguous for p in products)
        for order, parts in (("F", solves), ("C", products)):
            got = r2d2._task_sums(np.stack(parts), order)
            want = [np.sum(p) for p in parts]
            assert got.shape == (3,) and all(g == w for g, w in zip(got, want)), (order, got - np.array(want))
            other = [np.sum(np.asfortranarray(p) if order == "C" else np.ascontiguousarray(p)) for p in parts]
            distinguished[order] |= want != other  # the other memory order rounds differently on this data
        if all(distinguished.values()):
            break
    assert all(distinguished.values()), distinguished  # the test could tell a wrong order from the right one
