"""Newton-MAML's meta-loss values, its step-size derivative and its limits, against closed forms.

Fast targeted tests (issue 19). On ``Quadratic`` (``L = 1/2 (p-c)^T A (p-c)``,
constant Hessian ``A``, no third derivatives) the damped Newton inner loop is
linear: ``p_K - c_s = M^K (theta - c_s)`` with ``M = I - alpha (A_s + delta I)^{-1} A_s``,
so the meta-loss of several tasks and its derivative in ``alpha`` (complex
step of this closed form, Squire & Trapp 1998) are independent of
``reference.newton``. A complex ``alpha`` also makes the real Hessian meet a
complex gradient (the real-factor / complex right-hand-side solve).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from reference import maml, newton
from reference.errors import InvalidInputError, SingularMatrixError
from reference.models import MLP, Quadratic
from reference.tasks import Task

H = 1e-30


def _tasks(dim: int, n_tasks: int, seed: int) -> list[Task]:
    rng = np.random.default_rng(seed)
    tasks = []
    for _ in range(n_tasks):
        a_s, a_q = (q @ q.T + 0.5 * np.eye(dim) for q in rng.normal(size=(2, dim, dim)))
        tasks.append(Task(a_s, rng.normal(size=dim), a_q, rng.normal(size=dim)))
    return tasks


def _closed_form(theta: np.ndarray, tasks: list[Task], alpha: Any, steps: int, delta: float) -> tuple[Any, Any]:
    """Mean query loss ``1/2 (p_K - c_q)^T A_q (p_K - c_q)`` and its gradient ``(M^K)^T A_q (p_K - c_q)``."""
    losses, grads = [], []
    for t in tasks:
        dim = len(theta)
        M = np.eye(dim) - alpha * np.linalg.solve(t.x_support + delta * np.eye(dim), t.x_support)
        MK = np.linalg.matrix_power(M, steps)
        r = t.y_support + MK @ (theta - t.y_support) - t.y_query
        losses.append(0.5 * r @ t.x_query @ r)
        grads.append(MK.T @ t.x_query @ r)
    return sum(losses) / len(tasks), sum(grads) / len(tasks)


@pytest.mark.parametrize("delta", [0.0, 0.7])
def test_newton_meta_loss_of_several_tasks_matches_the_closed_form(delta):
    dim, alpha, steps = 3, 0.6, 3
    tasks = _tasks(dim, 3, seed=2)
    theta = np.random.default_rng(5).normal(size=dim)
    expected, expected_grad = _closed_form(theta, tasks, alpha, steps, delta)
    model = Quadratic(dim)
    loss = newton.meta_loss(model, [theta], tasks, alpha, steps, damping=delta)
    value, grad = newton.meta_loss_and_grad(model, [theta], tasks, alpha, steps, damping=delta)
    assert abs(loss - expected) <= 1e-12 * abs(expected)
    assert abs(value - expected) <= 1e-12 * abs(expected)
    np.testing.assert_allclose(grad[0], expected_grad, rtol=1e-10, atol=1e-12 * np.max(np.abs(expected_grad)))


def test_newton_inner_lr_derivative_by_complex_step_matches_the_closed_form():
    """``d/d alpha`` of the meta-loss and of the meta-gradient: a complex ``alpha`` keeps the Hessian of
    ``Quadratic`` real while the gradients turn complex after the first step."""
    dim, alpha, steps, delta = 3, 0.4, 3, 0.5
    tasks = _tasks(dim, 2, seed=9)
    theta = np.random.default_rng(1).normal(size=dim)
    model = Quadratic(dim)
    d_loss, d_grad = (np.imag(v) / H for v in _closed_form(theta, tasks, alpha + 1j * H, steps, delta))
    got = newton.meta_loss(model, [theta], tasks, alpha + 1j * H, steps, damping=delta)
    assert abs(np.imag(got) / H - d_loss) <= 1e-10 * abs(d_loss)
    value, grad = newton.meta_loss_and_grad(model, [theta], tasks, alpha + 1j * H, steps, damping=delta)
    assert abs(np.imag(value) / H - d_loss) <= 1e-10 * abs(d_loss)
    np.testing.assert_allclose(np.imag(grad[0]) / H, d_grad, rtol=1e-9, atol=1e-11 * np.max(np.abs(d_grad)))


def test_newton_real_factor_solves_a_complex_right_hand_side():
    rng = np.random.default_rng(3)
    q = rng.normal(size=(4, 4))
    A = q @ q.T + np.eye(4)
    b = rng.normal(size=4) + 1j * rng.normal(size=4)
    np.testing.assert_allclose(newton._Factor(A, 0.0, "test").solve(b), np.linalg.solve(A, b), rtol=1e-12)


def test_newton_condition_limit_is_the_documented_1e12_inclusive():
    """The documented limit (12 of float64's ~16 digits lost) is the largest condition number accepted;
    diagonal matrices have exact eigenvalues, and ``1e12 + 1`` is exact in float64."""
    assert newton.MAX_CONDITION == 1e12
    newton._Factor(np.diag([1.0, 1e12]), 0.0, "test")
    newton._Factor(np.diag([2.0, 2e12]), 0.0, "test")
    for big in (1e12 + 1.0, 1e12 + 2.0):
        with pytest.raises(SingularMatrixError, match="ill-conditioned"):
            newton._Factor(np.diag([1.0, big]), 0.0, "test")


def test_newton_parameter_limit_is_inclusive():
    """A model with exactly ``MAX_PARAMS`` parameters is accepted, one more is refused."""
    rng = np.random.default_rng(0)
    task = Task(rng.normal(size=(3, 1)), rng.normal(size=(3, 1)), rng.normal(size=(2, 1)), rng.normal(size=(2, 1)))
    width = (newton.MAX_PARAMS - 1) // 3  # [1, w, 1] with biases: 3 w + 1 parameters
    assert 3 * width + 1 == newton.MAX_PARAMS
    model = MLP([1, width, 1])
    newton.check_arguments(model, model.init(0), [task], 0.1, 1, 0.0)
    with pytest.raises(InvalidInputError, match="MAX_PARAMS"):
        big = MLP([1, width, 2])
        newton.check_arguments(big, big.init(0), [Task(task.x_support, np.zeros((3, 2)), task.x_query,
                                                       np.zeros((2, 2)))], 0.1, 1, 0.0)


@pytest.mark.parametrize("where", ["diagonal", "everywhere"])
def test_newton_non_finite_hessian_is_a_clear_error(where):
    """A NaN/inf Hessian must not reach the solve: LAPACK's eigvalsh may return finite eigenvalues for a
    NaN on the diagonal (the step would silently be NaN) or fail with an unrelated LinAlgError."""
    if where == "diagonal":
        hessian = np.array([[1.0, 0.5], [0.5, np.nan]])
        with pytest.raises(SingularMatrixError, match="not finite"):
            newton._Factor(hessian, 0.0, "test")
        return
    # identity MLP, huge support inputs: the support Hessian overflows (inf and inf - inf)
    rng = np.random.default_rng(0)
    model = MLP([1, 2, 1], activation="identity")
    task = Task(np.full((3, 1), 1e200), rng.normal(size=(3, 1)), rng.normal(size=(3, 1)), rng.normal(size=(3, 1)))
    with np.errstate(all="ignore"), pytest.raises(SingularMatrixError, match=r"task 0, inner step k=0 is not finite"):
        newton.meta_loss_and_grad(model, model.init(0), [task], 0.1, 1, damping=1.0)


def test_newton_query_overflow_gives_non_finite_results_like_maml():
    """A finite, well-conditioned support problem and an overflowing query loss: the meta-loss is inf and
    the meta-gradient non-finite, as MAML's (the engine reports non-finite values), not a SciPy error."""
    rng = np.random.default_rng(0)
    model = MLP([1, 3, 1], activation="identity")
    params = model.init(0)
    task = Task(rng.normal(size=(4, 1)), rng.normal(size=(4, 1)), np.full((3, 1), 1e200), rng.normal(size=(3, 1)))
    with np.errstate(all="ignore"):
        ref_loss, ref_grad = maml.meta_loss_and_grad(model, params, [task], 0.1, 1)
        loss, grad = newton.meta_loss_and_grad(model, params, [task], 0.1, 1, damping=1.0)
    assert np.isinf(ref_loss) and not np.all(np.isfinite(np.concatenate([g.ravel() for g in ref_grad])))
    assert np.isinf(loss) and not np.all(np.isfinite(np.concatenate([g.ravel() for g in grad])))
