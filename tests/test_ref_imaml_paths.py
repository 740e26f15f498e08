"""Fast tests of iMAML's solver paths that ordinary problems never take (issue 19).

A degenerate inner minimum makes Newton's method converge *linearly*: on the
model below with ``theta = e`` the stationarity residual is ``F(z) = (z - c)^3``
(a triple root), so a full Newton step maps ``z - c`` to ``2/3 (z - c)`` and the
residual to exactly ``8/27`` of itself. That is slow enough for the trust region
and the Newton polish to run out of steps, so the second trust-region pass, the
polish's step budget and the iteration limit all show. Expected values come from
that closed form, from ``numpy.linalg.solve`` on ``Quadratic`` inner problems,
and from counts taken outside the code (wrappers of ``scipy.optimize.minimize``
and of the Newton solve).
"""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest

from reference import imaml
from reference.errors import ConvergenceError
from reference.models import MLP, Quadratic, flatten
from reference.tasks import Task


class _Quartic(Quadratic):
    """``L(z) = 1/2 (z - e)^T A (z - e) + 1/4 sum (z - c)^4`` on one vector; ``x = A``, ``y = [c, e]``.

    With ``A = -lam I`` and ``theta = e`` the inner objective is ``1/4 sum (z - c)^4`` plus a constant:
    its stationarity residual is ``(z - c)^3`` (elementwise), a degenerate minimum at ``c``.
    """

    def check_y(self, y, n, name="y"):
        arr = np.asarray(y, dtype=np.result_type(y, float))
        assert arr.shape == (2, self.dim), name
        return arr

    def _loss_and_grad(self, params, A, y):
        c, e = y
        r, s = params[0] - c, params[0] - e
        As = A @ s
        return 0.5 * (s @ As) + 0.25 * np.sum(r**4), [As + r**3]

    def _hvp(self, params, A, y, v):
        r = params[0] - y[0]
        return [A @ v[0] + 3 * r**2 * v[0]]

    def hessian(self, params, A, y):
        r = params[0] - y[0]
        return A + np.diag(3 * r**2)


def _triple_root_task() -> tuple[Task, np.ndarray, np.ndarray]:
    """1-D problem: ``F(z) = (z - c)^3`` from ``theta = e = c + 2e-3``; returns ``(task, theta, c)``.

    ``F(theta) = 8e-9`` is already below the first trust-region pass's gradient tolerance
    (``1e-8 max(1, ||grad L_s(theta)||)``, here 1e-8), so that pass takes no iteration and the Newton
    polish starts at ``theta``: its k-th step leaves ``8e-9 (8/27)^k`` (``4.75e-13`` after 8 steps).
    (scipy's trust-krylov is not reproducible from one process to the next on this degenerate problem
    when it runs many iterations, so the tests below let it run none, or exactly one.)
    """
    c = np.array([0.3])
    e = c + 2e-3
    task = Task(-np.eye(1), np.stack([c, e]), np.eye(1), np.stack([c, e]))
    return task, e.copy(), c


class _Recorder:
    """Wraps ``minimize`` and ``_newton_solve`` in ``imaml``: the events in order, counted from outside."""

    def __init__(self, monkeypatch):
        self.events: list[tuple] = []
        minimize, newton_solve = imaml.scipy.optimize.minimize, imaml._newton_solve

        def counting_minimize(*args, **kwargs):
            result = minimize(*args, **kwargs)
            self.events.append(("tr", int(result.nit), kwargs["options"]["maxiter"]))
            return result

        def counting_newton_solve(prob, z, *args, **kwargs):
            residual = float(np.linalg.norm(prob.grad(z)))
            self.events.append(("newton", residual, np.iscomplexobj(z)))
            return newton_solve(prob, z, *args, **kwargs)

        monkeypatch.setattr(imaml.scipy.optimize, "minimize", counting_minimize)
        monkeypatch.setattr(imaml, "_newton_solve", counting_newton_solve)

    def passes(self) -> list[tuple[int, list[float]]]:
        """``(trust-region iterations, [residual at each Newton step])`` per trust-region pass."""
        out: list[tuple[int, list[float]]] = []
        for event in self.events:
            if event[0] == "tr":
                out.append((event[1], []))
            elif not event[2]:
                out[-1][1].append(event[1])
        return out

    def check_budget(self, inner_maxiter: int) -> None:
        """Each trust-region pass gets the iterations left (at least one): ``inner_maxiter`` minus the
        trust-region iterations and Newton steps before it."""
        spent = 0
        for nit, newton in self.passes():
            assert nit <= max(1, inner_maxiter - spent)
            spent += nit + len(newton)


def test_polish_runs_its_eight_newton_steps_on_a_triple_root(monkeypatch):
    """Newton on ``(z - c)^3`` divides the residual by 27/8 per step, never by 2: the polish keeps every
    step up to its budget of 8 (``_NEWTON_STEPS``), which here just reaches ``inner_tol = 1e-12`` (seven
    steps would leave 1.6e-12), so there is no second trust-region pass."""
    rec = _Recorder(monkeypatch)
    task, theta, c = _triple_root_task()
    z, res, tol, iterations = imaml.inner_solve(_Quartic(1), [theta], task, 1.0, inner_tol=1e-12)
    ((nit, newton),) = rec.passes()
    assert nit == 0 and len(newton) == 8
    expected = 8e-9 * (8 / 27) ** np.arange(9)  # the closed form of Newton's residuals from theta
    np.testing.assert_allclose(newton, expected[:8], rtol=1e-6)
    assert res == pytest.approx(expected[8], rel=1e-6) and res <= tol == 1e-12 < expected[7]
    assert abs(float((z - c)[0])) ** 3 == pytest.approx(res, rel=1e-6)
    assert iterations == 8


def test_second_trust_region_pass_finishes_what_the_polish_could_not(monkeypatch):
    """``inner_tol = 1e-13``: 8 polishing steps leave 4.75e-13; the second pass, run to the full tolerance
    with the one iteration left (``inner_maxiter = 9``), and its polish reach it."""
    rec = _Recorder(monkeypatch)
    task, theta, c = _triple_root_task()
    z, res, tol, iterations = imaml.inner_solve(_Quartic(1), [theta], task, 1.0, inner_tol=1e-13, inner_maxiter=9)
    passes = rec.passes()
    assert [(nit, len(newton)) for nit, newton in passes] == [(0, 8), (1, 8)]
    assert passes[0][1][-1] * 8 / 27 > tol == 1e-13  # the first polish stopped above tol
    rec.check_budget(9)
    assert abs(float((z - c)[0])) ** 3 == pytest.approx(res, rel=1e-6) and res <= tol
    assert iterations == 17


def test_iteration_limit_counts_the_newton_steps(monkeypatch):
    """``inner_maxiter = 8``: the first pass's 8 Newton steps spend the budget, so there is no second pass
    and the inner problem is refused with its residual."""
    rec = _Recorder(monkeypatch)
    task, theta, c = _triple_root_task()
    with pytest.raises(ConvergenceError, match="after 8 iterations") as info:
        imaml.inner_solve(_Quartic(1), [theta], task, 1.0, inner_tol=1e-13, inner_maxiter=8)
    assert [(nit, len(newton)) for nit, newton in rec.passes()] == [(0, 8)]
    assert info.value.residual == pytest.approx(8e-9 * (8 / 27) ** 8, rel=1e-6)


def test_a_converged_first_pass_is_not_followed_by_a_second(monkeypatch):
    """A tanh MLP inner problem: trust region and polish reach the tolerance at once; the second pass is
    only for when they do not (and the returned residual is the point's, recomputed from the model)."""
    rec = _Recorder(monkeypatch)
    model = MLP([1, 5, 1], activation="tanh")
    rng = np.random.default_rng(2)
    task = Task(rng.uniform(-2, 2, size=(6, 1)), rng.normal(size=(6, 1)), rng.uniform(-2, 2, size=(3, 1)),
                rng.normal(size=(3, 1)))
    params, lam = model.init(2), 2.0
    z, res, tol, iterations = imaml.inner_solve(model, params, task, lam)
    assert len(rec.passes()) == 1
    phi = [p for p in _unflat(model, z)]
    F = flatten(model.grad(phi, task.x_support, task.y_support)) + lam * (z - flatten(params))
    g0 = np.linalg.norm(flatten(model.grad(params, task.x_support, task.y_support)))
    assert tol == pytest.approx(1e-12 * max(1.0, g0), rel=1e-12)  # the documented default inner_tol
    assert np.linalg.norm(F) == pytest.approx(res, rel=1e-3, abs=1e-16) and res <= tol


def _unflat(model, z):
    out, i = [], 0
    for shape in model.shapes:
        size = int(np.prod(shape))
        out.append(z[i:i + size].reshape(shape))
        i += size
    return out


def test_refusal_reports_the_iterations_counted_from_outside(monkeypatch):
    """An unbounded inner problem (``A_s`` has the eigenvalue -3 < -lam): the trust region spends its
    budget and the polish's first Newton solve meets negative curvature; both are counted."""
    rec = _Recorder(monkeypatch)
    task = Task(np.diag([1.0, -3.0]), np.ones(2), np.eye(2), np.zeros(2))
    with pytest.raises(ConvergenceError, match="did not converge") as info:
        imaml.inner_solve(Quadratic(2), [np.zeros(2)], task, 1.0, inner_maxiter=30)
    ((nit, newton),) = rec.passes()
    assert nit == 30 and len(newton) == 1
    assert f"after {nit + len(newton)} iterations" in str(info.value)


def test_complex_step_of_the_inner_solution_is_one_newton_step_on_a_quadratic(monkeypatch):
    """Complex ``theta``: the continuation solves ``(A + lam I) phi = A c + lam theta`` in complex
    arithmetic, a linear equation, so one Newton step lands on it and the next check stops the loop;
    ``Im phi / h`` is ``d phi*/d theta . v = lam (A + lam I)^{-1} v`` (numpy.linalg.solve). Defaults
    (inner_tol, cg_tol) throughout."""
    rec = _Recorder(monkeypatch)
    rng = np.random.default_rng(5)
    B = rng.normal(size=(4, 4))
    A = B @ B.T + 0.3 * np.eye(4)
    task = Task(A, rng.normal(size=4), np.eye(4), np.zeros(4))
    theta, v, lam, h = rng.normal(size=4), rng.normal(size=4), 0.7, 1e-20
    z, res, tol, iterations = imaml.inner_solve(Quadratic(4), [theta + 1j * h * v], task, lam)
    expected = lam * np.linalg.solve(A + lam * np.eye(4), v)
    np.testing.assert_allclose(z.imag / h, expected, rtol=1e-10)
    np.testing.assert_allclose(z.real, np.linalg.solve(A + lam * np.eye(4), A @ task.y_support + lam * theta),
                               rtol=1e-12)
    complex_steps = [e for e in rec.events if e[0] == "newton" and e[2]]
    assert 1 <= len(complex_steps) <= 2


def _quadratic(dim: int, seed: int, query_scale: float = 1.0, near: float | None = None):
    rng = np.random.default_rng(seed)
    B, C = rng.normal(size=(2, dim, dim))
    A_s, A_q = B @ B.T + 0.5 * np.eye(dim), query_scale * (C @ C.T + 0.5 * np.eye(dim))
    c_s, c_q = rng.normal(size=dim), rng.normal(size=dim)
    theta = rng.normal(size=dim) if near is None else c_s + near * rng.normal(size=dim)
    return Task(A_s, c_s, A_q, c_q), theta


def _closed_form(task, theta, lam):
    dim = len(theta)
    phi = np.linalg.solve(task.x_support + lam * np.eye(dim), task.x_support @ task.y_support + lam * theta)
    d = phi - task.y_query
    b = task.x_query @ d
    return phi, 0.5 * d @ b, b, np.linalg.solve(np.eye(dim) + task.x_support / lam, b)


def test_small_gradients_direct_solve_diagnostics_and_frozen_results():
    """``||grad L_s(theta)|| < 1`` and ``||grad L_q(phi*)|| < 1`` (theta near the support centre, a small
    query loss): the stationarity tolerance is ``inner_tol`` itself, the direct solve reports 0 iterations
    and the true relative residual of its answer (round-off, not an assumed 0); the results are immutable."""
    task, theta = _quadratic(3, seed=7, query_scale=1e-3, near=1e-3)
    lam = 1.5
    g0 = np.linalg.norm(task.x_support @ (theta - task.y_support))
    phi, _, b, grad = _closed_form(task, theta, lam)
    assert g0 < 1 and np.linalg.norm(b) < 1
    result = imaml.meta_loss_and_grad_info(Quadratic(3), [theta], [task], lam, solver="direct", inner_tol=1e-11)
    (info,) = result.tasks
    np.testing.assert_allclose(result.grad[0], grad, rtol=1e-10)
    assert info.stationarity_tolerance == 1e-11
    assert info.linear_iterations == 0
    x = info.grad[0]
    true_res = np.linalg.norm(x + task.x_support @ x / lam - b) / np.linalg.norm(b)
    assert 0 < info.linear_residual <= 1e-14
    assert info.linear_residual == pytest.approx(true_res, rel=0.5, abs=4e-16)
    for obj, field in ((info, "grad"), (result, "loss")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, field, None)


def test_meta_loss_is_the_mean_query_loss_and_ignores_the_gradient_solve():
    """Two Quadratic tasks: ``meta_loss`` is the mean of the closed-form query losses; it does not solve
    for the meta-gradient, so the meta-gradient solve's CG budget (``cg_maxiter=1``, too few for a 4-D
    system) does not matter to it, while ``meta_loss_and_grad`` must refuse."""
    lam = 0.8
    problems = [_quadratic(4, seed) for seed in (11, 12)]
    theta = problems[0][1]
    tasks = [t for t, _ in problems]
    expected = np.mean([_closed_form(t, theta, lam)[1] for t in tasks])
    for solver in imaml.SOLVERS:
        assert imaml.meta_loss(Quadratic(4), [theta], tasks, lam, solver=solver, cg_maxiter=1) == pytest.approx(
            expected, rel=1e-12)
    with pytest.raises(ConvergenceError, match="conjugate gradient"):
        imaml.meta_loss_and_grad(Quadratic(4), [theta], tasks, lam, cg_maxiter=1)


def test_entry_points_share_their_solver_defaults():
    """``meta_loss`` exists for finite differences of ``meta_loss_and_grad``'s loss, and ``inner_solve`` is
    what both run: with their defaults they must solve the same inner problems, to the same tolerances."""
    functions = (imaml.inner_solve, imaml.meta_loss, imaml.meta_loss_and_grad_info, imaml.meta_loss_and_grad)
    for name in ("inner_tol", "inner_maxiter", "solver", "cg_tol"):
        defaults = {f.__name__: inspect.signature(f).parameters[name].default for f in functions}
        assert len(set(defaults.values())) == 1, (name, defaults)
    # and those defaults do what the docstring says: inner_tol 1e-12 relative, cg_tol 1e-12
    task, theta = _quadratic(3, seed=9)
    lam = 2.0
    phi, loss, _, grad = _closed_form(task, theta, lam)
    assert imaml.meta_loss(Quadratic(3), [theta], [task], lam) == pytest.approx(loss, rel=1e-12)
    result = imaml.meta_loss_and_grad_info(Quadratic(3), [theta], [task], lam)
    np.testing.assert_allclose(result.grad[0], grad, rtol=1e-10)
    assert result.tasks[0].linear_residual <= 1e-12
    loss2, grad2 = imaml.meta_loss_and_grad(Quadratic(3), [theta], [task], lam)
    assert loss2 == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(grad2[0], grad, rtol=1e-10)


def test_default_cg_budget_is_two_n_plus_100(monkeypatch):
    """The documented default ``cg_maxiter`` (``2 n + 100``), seen at the meta-gradient solve, and the
    Newton systems' own budget (the same formula, whatever the caller's ``cg_maxiter``)."""
    budgets = []
    cg = imaml.conjugate_gradient

    def spy(matvec, b, **kwargs):
        budgets.append((b.size, kwargs["maxiter"]))
        return cg(matvec, b, **kwargs)

    monkeypatch.setattr(imaml, "conjugate_gradient", spy)
    task, theta = _quadratic(5, seed=3)
    imaml.meta_loss_and_grad(Quadratic(5), [theta], [task], 1.0)
    with pytest.raises(ConvergenceError, match="after 2 iterations"):
        imaml.meta_loss_and_grad(Quadratic(5), [theta], [task], 1.0, cg_maxiter=2)
    assert budgets[-1] == (5, 2)
    assert len(budgets) >= 2 and all(maxiter == 2 * 5 + 100 for size, maxiter in budgets[:-1])
