"""The iMAML reference against independent sources.

Which derivative checks are honest here. The implicit meta-gradient
``(I + H_s/lam)^{-1} grad L_q(phi*)`` is derived from the implicit function
theorem, so the check that assumes nothing about it is a finite difference of
the *real* meta-loss, each evaluation re-solving the inner problem to near
machine precision (stationarity residual ~1e-15, so the inner error is far
below the difference quotient's own round-off): Richardson extrapolation
(``verify.directional_derivative(method="richardson")``). A complex step
needs the inner problem solved in complex arithmetic (the reference runs
Newton on the complex stationarity equation); that continuation is the
implicit function theorem's forward tangent, so the complex step checks the
adjoint solve (CG or direct) against a tangent solve, not the theorem. Both
are run; only Richardson is independent of implicit differentiation.
Closed forms on :class:`reference.models.Quadratic` give a third check.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import imaml
from reference.errors import ConvergenceError, InvalidInputError, SingularMatrixError
from reference.models import MLP, Quadratic, flatten, unflatten
from reference.tasks import Task, sinusoid
from verify import directional_derivative
from verify.hessian_inverse import check_cg_vs_direct, check_imaml, check_spd

# Each Richardson estimate re-solves every inner problem ~35 times; a quarter of the
# profile's examples (5 in ci, 250 in thorough) keeps this file inside its CI budget.
FEW = settings(max_examples=max(3, settings.default.max_examples // 4))


@st.composite
def imaml_problems(draw):
    loss = draw(st.sampled_from(["mse", "ce"]))
    d0 = draw(st.integers(1, 2))
    d_out = 1 if loss == "mse" else draw(st.integers(2, 3))
    model = MLP([d0, draw(st.integers(2, 5)), d_out], activation=draw(st.sampled_from(["tanh", "sigmoid",
                                                                                         "softplus"])), loss=loss)
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    tasks = []
    for _ in range(draw(st.integers(1, 2))):
        ns, nq = draw(st.integers(3, 6)), draw(st.integers(2, 5))
        xs, xq = rng.normal(size=(ns, d0)), rng.normal(size=(nq, d0))
        if loss == "mse":
            ys, yq = rng.normal(size=(ns, 1)), rng.normal(size=(nq, 1))
        else:
            ys, yq = rng.integers(0, d_out, ns), rng.integers(0, d_out, nq)
        tasks.append(Task(xs, ys, xq, yq))
    return model, model.init(seed), tasks, draw(st.floats(1.0, 8.0)), seed


def _direction(model, seed):
    v = np.random.default_rng(seed).normal(size=model.n_params)
    return v / np.linalg.norm(v)


@FEW
@given(imaml_problems(), st.sampled_from(imaml.SOLVERS))
def test_meta_gradient_matches_richardson_of_the_real_meta_loss(problem, solver):
    model, params, tasks, lam, seed = problem
    result = imaml.meta_loss_and_grad_info(model, params, tasks, lam, solver=solver)
    g = flatten(result.grad)
    v = _direction(model, seed)

    def f(x):
        return imaml.meta_loss(model, unflatten(x, model.shapes), tasks, lam)

    est = directional_derivative(f, flatten(params), v, method="richardson")
    # Claimed error: CG stops at relative residual 1e-12, so the forward error is
    # <= cond * 1e-12; the Richardson estimate carries its own error bound.
    cond = max(t.cond_estimate for t in result.tasks)
    assert abs(g @ v - est.value) <= est.error + 10 * cond * 1e-12 * np.linalg.norm(g), (g @ v, est)


@FEW
@given(imaml_problems(), st.sampled_from(imaml.SOLVERS))
def test_meta_gradient_matches_complex_step_through_the_complex_inner_solve(problem, solver):
    model, params, tasks, lam, seed = problem
    result = imaml.meta_loss_and_grad_info(model, params, tasks, lam, solver=solver)
    g = flatten(result.grad)
    v = _direction(model, seed)

    def f(x):
        return imaml.meta_loss(model, unflatten(x, model.shapes), tasks, lam, solver=solver)

    est = directional_derivative(f, flatten(params), v, method="complex")
    cond = max(t.cond_estimate for t in result.tasks)
    # both sides solve with I + H/lam (adjoint vs tangent): agreement to cond x the solve tolerance
    assert abs(g @ v - est.value) <= est.error + 10 * cond * 1e-12 * max(np.linalg.norm(g), abs(est.value))


@FEW
@given(imaml_problems())
def test_direct_and_cg_agree_and_pass_the_hessian_inverse_checks(problem):
    model, params, tasks, lam, _ = problem
    rc = imaml.meta_loss_and_grad_info(model, params, tasks, lam, solver="cg", cg_tol=1e-12)
    rd = imaml.meta_loss_and_grad_info(model, params, tasks, lam, solver="direct")
    assert rc.loss == pytest.approx(rd.loss, rel=1e-13, abs=1e-15)
    for task, tc, td in zip(tasks, rc.tasks, rd.tasks):
        H = model.hessian(td.phi, task.x_support, task.y_support)
        M = np.eye(model.n_params) + H / lam
        q = flatten(model.grad(td.phi, task.x_query, task.y_query))
        assert check_spd(M, name="I + H/lam").status == "pass"
        verdict = check_cg_vs_direct(M, q, flatten(tc.grad), x_direct=flatten(td.grad), rtol=1e-12)
        assert verdict.status == "pass", verdict.reason
        assert check_imaml(model, params, task, lam, tc.phi, tc.grad, rtol=1e-12).status == "pass"
        assert check_imaml(model, params, task, lam, td.phi, td.grad).status == "pass"
        # diagnostics: residuals below their tolerances, condition estimates near the truth
        eig = np.linalg.eigvalsh(0.5 * (M + M.T))
        cond = eig[-1] / eig[0]
        assert tc.stationarity_residual <= tc.stationarity_tolerance
        assert tc.linear_residual <= 1e-12 and td.linear_residual <= 1e-13
        assert cond / 2 <= tc.cond_estimate <= cond * (1 + 1e-6)  # Lanczos: a lower bound, sharp at convergence
        n = model.n_params
        assert cond / n <= td.cond_estimate <= cond * n  # LAPACK 1-norm estimate vs the 2-norm condition


@given(st.integers(1, 5), st.floats(0.5, 5.0), st.integers(0, 2**16), st.sampled_from(imaml.SOLVERS))
def test_quadratic_matches_the_closed_form(dim, lam, seed, solver):
    """phi* = (A_s + lam I)^{-1} (A_s c_s + lam theta); grad = (I + A_s/lam)^{-1} A_q (phi* - c_q)."""
    rng = np.random.default_rng(seed)
    B = rng.normal(size=(dim, dim))
    A_s = B @ B.T - 0.4 * lam * np.eye(dim)  # may be indefinite; A_s + lam I stays positive definite
    C = rng.normal(size=(dim, dim))
    A_q = C + C.T
    c_s, c_q, theta = rng.normal(size=dim), rng.normal(size=dim), rng.normal(size=dim)
    model = Quadratic(dim)
    phi = np.linalg.solve(A_s + lam * np.eye(dim), A_s @ c_s + lam * theta)
    expected_loss = 0.5 * (phi - c_q) @ A_q @ (phi - c_q)
    expected_grad = np.linalg.solve(np.eye(dim) + A_s / lam, A_q @ (phi - c_q))
    loss, grad = imaml.meta_loss_and_grad(model, [theta], [Task(A_s, c_s, A_q, c_q)], lam, solver=solver)
    scale = max(1.0, np.max(np.abs(expected_grad)))
    assert loss == pytest.approx(expected_loss, rel=1e-10, abs=1e-12)
    assert np.max(np.abs(grad[0] - expected_grad)) <= 1e-9 * scale


def test_non_convergence_of_the_inner_problem_is_raised_not_answered():
    """A tanh MLP with a small lam: the trust region stalls far above the tolerance."""
    model = MLP([1, 40, 40, 1], activation="tanh")
    params = model.init(0)
    tasks = sinusoid(1, 10, 10, seed=1)
    lam = 1e-3
    with pytest.raises(ConvergenceError, match="stationarity residual") as info:
        imaml.meta_loss_and_grad(model, params, tasks, lam)
    err = info.value
    # the refusal is justified: recompute the residual at the point reached, independently
    t = tasks[0]
    F = flatten(model.grad(err.phi, t.x_support, t.y_support)) + lam * (flatten(err.phi) - flatten(params))
    assert np.linalg.norm(F) == pytest.approx(err.residual, rel=1e-6)
    assert np.linalg.norm(F) > 100 * err.tolerance


def test_iteration_limit_and_unbounded_inner_problems_are_raised():
    model = MLP([1, 5, 1], activation="tanh")
    with pytest.raises(ConvergenceError, match="did not converge"):
        imaml.meta_loss_and_grad(model, model.init(0), sinusoid(1, 5, 5, seed=0), 1.0, inner_maxiter=1)
    # A_s has an eigenvalue -3 < -lam: the inner objective is unbounded below, no minimiser exists
    q = Quadratic(3)
    task = Task(np.diag([1.0, -3.0, 2.0]), np.ones(3), np.eye(3), np.zeros(3))
    with pytest.raises(ConvergenceError, match="did not converge"):
        imaml.meta_loss_and_grad(q, [np.zeros(3)], [task], 1.0, inner_maxiter=50)


@pytest.mark.parametrize("solver", imaml.SOLVERS)
def test_a_stationary_saddle_is_refused(solver):
    """theta at the saddle of an indefinite inner objective: stationary, but not a minimum."""
    q = Quadratic(3)
    c = np.array([0.5, -1.0, 2.0])
    task = Task(np.diag([1.0, -3.0, 2.0]), c, np.eye(3), np.zeros(3))
    with pytest.raises(SingularMatrixError, match="not positive definite|singular or indefinite"):
        imaml.meta_loss_and_grad(q, [c.copy()], [task], 1.0, solver=solver)


def test_cg_iteration_limit_is_raised():
    model = MLP([1, 6, 1], activation="tanh")
    with pytest.raises(ConvergenceError, match="conjugate gradient"):
        imaml.meta_loss_and_grad(model, model.init(0), sinusoid(1, 5, 5, seed=0), 0.5, cg_maxiter=2)


def test_bad_input():
    model = MLP([1, 4, 1])
    params, tasks = model.init(0), sinusoid(1, 4, 4, seed=0)
    for lam in (0.0, -1.0, float("nan")):
        with pytest.raises(InvalidInputError, match="lam="):
            imaml.meta_loss_and_grad(model, params, tasks, lam)
    with pytest.raises(InvalidInputError, match="solver="):
        imaml.meta_loss_and_grad(model, params, tasks, 1.0, solver="lu")
    with pytest.raises(InvalidInputError, match="inner_tol="):
        imaml.meta_loss_and_grad(model, params, tasks, 1.0, inner_tol=2.0)
    with pytest.raises(InvalidInputError, match="cg_tol="):
        imaml.meta_loss_and_grad(model, params, tasks, 1.0, cg_tol=0.0)
    with pytest.raises(InvalidInputError, match=r"tasks\[0\]\.x_support has shape"):
        imaml.meta_loss_and_grad(model, params, [Task(np.ones((3, 2)), np.ones((3, 1)), np.ones((2, 1)),
                                                      np.ones((2, 1)))], 1.0)
    with pytest.raises(InvalidInputError, match="use solver='cg'"):
        imaml.meta_loss_and_grad(MLP([1, 70, 70, 1]), MLP([1, 70, 70, 1]).init(0), tasks, 1.0, solver="direct")
    with pytest.raises(InvalidInputError, match="tasks is empty"):
        imaml.meta_loss_and_grad(model, params, [], 1.0)
