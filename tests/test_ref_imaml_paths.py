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
import re

import numpy as np
import pytest

from reference import imaml
from reference.errors import ConvergenceError
from reference.models import MLP, Quadratic, flatten, unflatten
from reference.tasks import Task


class _Separable(Quadratic):
    """``L(z) = 1/2 (z - e)^T A (z - e) + sum_i G(z_i - c_i)`` on one vector; ``x = A``, ``y = [c, e]``.

    With ``A = (mu - lam) I`` and ``theta = e`` the inner stationarity residual is
    ``F(z) = G'(z - c) + mu (z - e)``: ``G`` alone decides how Newton's method converges.
    """

    def check_y(self, y, n, name="y"):
        arr = np.asarray(y, dtype=np.result_type(y, float))
        assert arr.shape == (2, self.dim), name
        return arr

    def G(self, r):  # (G(r), G'(r), G''(r)) elementwise
        raise NotImplementedError

    def _loss_and_grad(self, params, A, y):
        c, e = y
        s = params[0] - e
        As = A @ s
        g0, g1, _ = self.G(params[0] - c)
        return 0.5 * (s @ As) + np.sum(g0), [As + g1]

    def _hvp(self, params, A, y, v):
        return [A @ v[0] + self.G(params[0] - y[0])[2] * v[0]]

    def hessian(self, params, A, y):
        return A + np.diag(self.G(params[0] - y[0])[2])


class _Quartic(_Separable):
    """``G(r) = r^4 / 4``: ``F = (z - c)^3`` (mu = 0), a triple root."""

    def G(self, r):
        r2 = r * r  # products, not powers: exact zeros stay zeros in complex arithmetic
        return 0.25 * r2 * r2, r2 * r, 3.0 * r2


class _NegQuartic(_Separable):
    """``G(r) = -r^4 / 4``: on the imaginary line ``z = c + i y`` the residual ``i (y^3 + mu y) + ...`` has
    the Jacobian ``mu + 3 y^2 > 0``."""

    def G(self, r):
        r2 = r * r
        return -0.25 * r2 * r2, -(r2 * r), -3.0 * r2


class _TwoThirds(_Separable):
    """``G(r) = 3/5 |r|^(5/3)``: ``F = sign(r) |r|^(2/3)``; a Newton step maps r to -r/2, so the residual
    shrinks by ``2^(-2/3) = 0.63`` per step: more than half is left (real arguments only)."""

    def G(self, r):
        a = np.abs(r)
        return 0.6 * a ** (5 / 3), np.sign(r) * a ** (2 / 3), (2 / 3) * a ** (-1 / 3)


def _triple_root_task() -> tuple[Task, np.ndarray, np.ndarray]:
    """1-D problem: ``F(z) = (z - c)^3`` from ``theta = e = c + 2e-3``; returns ``(task, theta, c)``.

    ``F(theta) = 8e-9`` is already below the first trust-region pass's gradient tolerance
    (``1e-8 max(1, ||grad L_s(theta)||)``, here 1e-8), so that pass takes no iteration and the Newton
    polish starts at ``theta``: its k-th step leaves ``8e-9 (8/27)^k`` (``4.75e-13`` after 8 steps).
    (scipy's trust-krylov is not reproducible from one process to the next on this degenerate problem:
    trlib reads workspace that scipy allocates with ``np.empty`` and never fills, see
    ``test_second_trust_region_pass_finishes_what_the_polish_could_not``; so the tests below let it run
    none, or at most one iteration, and say what each outcome implies.)
    """
    c = np.array([0.3])
    e = c + 2e-3
    task = Task(-np.eye(1), np.stack([c, e]), np.eye(1), np.stack([c, e]))  # mu = 0
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
    # The closed form of Newton's residuals from theta. (The computed residual -(z - e) + (z - c)^3 + (z - e)
    # carries the rounding of z - e ~ 2e-3, ~2e-19 absolute: 1e-6 relative at the last step.)
    expected = 8e-9 * (8 / 27) ** np.arange(9)
    np.testing.assert_allclose(newton, expected[:8], rtol=1e-4)
    assert res == pytest.approx(expected[8], rel=1e-4) and res <= tol == 1e-12 < expected[7]
    assert abs(float((z - c)[0])) ** 3 == pytest.approx(res, rel=1e-4)
    assert iterations == 8


def test_second_trust_region_pass_finishes_what_the_polish_could_not(monkeypatch):
    """``inner_tol = 1e-13``: 8 polishing steps leave 4.75e-13; the second pass, run to the full tolerance
    with the one iteration left (``inner_maxiter = 9``), and its polish reach it.

    Whether scipy's trust-krylov takes that one step (``nit = 1``) or stops before it (``nit = 0``, status 2,
    "A bad approximation caused failure to predict improvement") is not ours to decide: trlib reads
    ``fwork`` entries that ``trlib_krylov_prepare_memory`` leaves uninitialised (scipy allocates the
    workspace with ``np.empty``), so the outcome follows whatever NumPy's allocator hands back. Filling
    freed small blocks with -1.0 (``for n in range(1, 400): np.full(n, -1.0)``) before the call gives
    ``nit = 0`` in a fresh process; so does running ``tests/test_ref_gemm_nogil.py`` first. Either way
    the bookkeeping is exact: the iterations are 8 + nit + 8, within the budget, and the polish ends
    below tol.
    """
    rec = _Recorder(monkeypatch)
    task, theta, c = _triple_root_task()
    z, res, tol, iterations = imaml.inner_solve(_Quartic(1), [theta], task, 1.0, inner_tol=1e-13, inner_maxiter=9)
    passes = rec.passes()
    assert [len(newton) for nit, newton in passes] == [8, 8]
    assert passes[0][0] == 0 and passes[1][0] in (0, 1)
    assert [event[2] for event in rec.events if event[0] == "tr"] == [9, 1]  # the second pass gets what is left
    assert passes[0][1][-1] * 8 / 27 > tol == 1e-13  # the first polish stopped above tol
    rec.check_budget(9)
    # |z - c|^3 ~ 1e-17 is the residual itself; the computed one carries ~2e-19 of rounding (see above)
    assert abs(float((z - c)[0])) ** 3 <= tol and res <= tol
    assert iterations == 16 + passes[1][0]


def test_iteration_limit_counts_the_newton_steps(monkeypatch):
    """``inner_maxiter = 8``: the first pass's 8 Newton steps spend the budget, so there is no second pass
    and the inner problem is refused with its residual."""
    rec = _Recorder(monkeypatch)
    task, theta, c = _triple_root_task()
    with pytest.raises(ConvergenceError, match="after 8 iterations") as info:
        imaml.inner_solve(_Quartic(1), [theta], task, 1.0, inner_tol=1e-13, inner_maxiter=8)
    assert [(nit, len(newton)) for nit, newton in rec.passes()] == [(0, 8)]
    assert info.value.residual == pytest.approx(8e-9 * (8 / 27) ** 8, rel=1e-4)


def test_polish_stops_at_the_first_step_below_tol_that_does_not_halve_the_residual(monkeypatch):
    """``F = sign(r) |r|^(2/3)`` from ``F(theta) = 5e-9`` (below the first pass's 1e-8: no trust-region
    iteration): Newton leaves ``5e-9 * 2^(-2k/3)`` after k steps. Progress 0.63 > 1/2 stops the polish at
    the first step at or below ``inner_tol = 1e-9``: step 4 (7.9e-10); steps 5-8 would only creep on."""
    rec = _Recorder(monkeypatch)
    r0 = 5e-9**1.5  # |r|^(2/3) = 5e-9
    c, e = np.zeros(1), np.array([r0])
    task = Task(-np.eye(1), np.stack([c, e]), np.eye(1), np.stack([c, e]))  # mu = 0, theta = e
    z, res, tol, iterations = imaml.inner_solve(_TwoThirds(1), [e.copy()], task, 1.0, inner_tol=1e-9)
    expected = 5e-9 * 2.0 ** (-2 * np.arange(6) / 3)
    ((nit, newton),) = rec.passes()
    assert nit == 0 and len(newton) == 4 and iterations == 4
    np.testing.assert_allclose(newton, expected[:4], rtol=1e-9)
    assert res == pytest.approx(expected[4], rel=1e-9) and expected[3] > tol >= res
    np.testing.assert_allclose(z, r0 / 16 * np.ones(1), rtol=1e-9)  # four steps of r -> -r/2


def test_trust_region_runs_from_a_start_above_the_loose_gradient(monkeypatch):
    """A quadratic inner problem started with ``||F(theta)|| = 1.5e-8``: above the first pass's gradient
    tolerance ``1e-8 max(1, ||grad L_s(theta)||) = 1e-8``, so the trust region takes at least one step;
    the answer is ``numpy.linalg.solve``'s."""
    rec = _Recorder(monkeypatch)
    rng = np.random.default_rng(8)
    B = rng.normal(size=(3, 3))
    A = B @ B.T + np.eye(3)
    c = rng.normal(size=3)
    d = rng.normal(size=3)
    theta = c + 1.5e-8 * np.linalg.solve(A, d / np.linalg.norm(d))  # A (theta - c) has norm 1.5e-8
    task = Task(A, c, np.eye(3), np.zeros(3))
    z, res, tol, iterations = imaml.inner_solve(Quadratic(3), [theta], task, 1.0)
    assert np.linalg.norm(A @ (theta - c)) == pytest.approx(1.5e-8, rel=1e-6)
    assert rec.passes()[0][0] >= 1
    np.testing.assert_allclose(z, np.linalg.solve(A + np.eye(3), A @ c + theta), rtol=1e-14, atol=1e-16)


def _imaginary_line_task(mu: float) -> Task:
    """``c = e = 0``, ``A = (mu - 1) I``, lam = 1 with ``_NegQuartic``: real ``theta = 0`` is its own inner
    solution (``F(0) = 0``), and complex ``theta = i h`` keeps Newton's iterates ``z = i y`` on the imaginary
    line, where ``Re F = 0`` exactly and ``Im F = y^3 + mu y - h``."""
    return Task((mu - 1.0) * np.eye(1), np.zeros((2, 1)), np.eye(1), np.zeros((2, 1)))


def _newton_on_the_line(mu: float, h: float, steps: int) -> np.ndarray:
    y, out = 0.0, []
    for _ in range(steps + 1):
        out.append(abs(y**3 + mu * y - h))
        y = y - (y**3 + mu * y - h) / (3 * y * y + mu)
    return np.array(out)


def test_complex_continuation_that_does_not_converge_is_refused():
    """``h = 1e6``: Newton from ``y = 0`` jumps to ``y = 1e6`` and then shrinks y by about 2/3 per step, far
    from the root ~100 after 8 steps: refused, with the imaginary tolerance ``inner_tol * |Im F(0)|``
    (``= 1e-12 * h``), although the real part of the residual is exactly 0."""
    h = 1e6
    with pytest.raises(ConvergenceError, match="complex-step continuation") as info:
        imaml.inner_solve(_NegQuartic(1), [np.array([1j * h])], _imaginary_line_task(1.0), 1.0)
    message = str(info.value)
    assert "residual real 0 " in message
    tol = float(re.search(r"imaginary \S+ \(tol (\S+)\)", message).group(1))
    assert tol == pytest.approx(1e-12 * h, rel=1e-2)
    assert _newton_on_the_line(1.0, h, 8)[-1] > 1e-12 * h


def test_complex_continuation_converging_at_its_last_step_is_accepted():
    """``h = 10``: the imaginary residual after 8 Newton steps (closed form on the line) is accepted when
    ``inner_tol`` puts the tolerance ``inner_tol * h`` at twice that residual, and the iterate is the
    8-step Newton iterate ``i y_8``; with the tolerance at half of it, the continuation is refused."""
    h, mu = 10.0, 1.0
    residuals = _newton_on_the_line(mu, h, 8)
    assert residuals[7] > 2 * residuals[8] > 0  # not converged before the last step
    inner_tol = 2 * residuals[8] / h
    z = imaml.inner_solve(_NegQuartic(1), [np.array([1j * h])], _imaginary_line_task(mu), 1.0,
                          inner_tol=inner_tol)[0]
    assert z.real[0] == 0.0
    y = z.imag[0]
    assert abs(y**3 + mu * y - h) == pytest.approx(residuals[8], rel=1e-6, abs=1e-12 * h)
    with pytest.raises(ConvergenceError, match="complex-step continuation"):
        imaml.inner_solve(_NegQuartic(1), [np.array([1j * h])], _imaginary_line_task(mu), 1.0,
                          inner_tol=residuals[8] / (2 * h))


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
    phi = unflatten(z, model.shapes)
    F = flatten(model.grad(phi, task.x_support, task.y_support)) + lam * (z - flatten(params))
    g0 = np.linalg.norm(flatten(model.grad(params, task.x_support, task.y_support)))
    assert tol == pytest.approx(1e-12 * max(1.0, g0), rel=1e-12)  # the documented default inner_tol
    assert np.linalg.norm(F) == pytest.approx(res, rel=1e-3, abs=1e-16) and res <= tol


def test_inner_solution_does_not_depend_on_the_meta_gradient_cg_tolerance(monkeypatch):
    """The polish's CG is never looser than 1e-12 (whatever ``cg_tol``), so a loose meta-gradient solve
    (``cg_tol = 0.5``) gets the same inner solution, bit for bit, after the same steps; and with a large
    support gradient (``||grad L_s(theta)|| ~ 600``) the first trust-region pass stops at its loose
    gradient (1e-8 relative) within a few iterations and leaves the last digits, below the tolerance, to
    Newton (asked for the full tolerance, the trust region stalls above it, round-off in the loss hiding
    the predicted decrease, until its 1000 iterations are spent)."""
    rec = _Recorder(monkeypatch)
    model = MLP([1, 5, 1], activation="tanh")
    rng = np.random.default_rng(0)
    task = Task(rng.uniform(-2, 2, size=(6, 1)), rng.normal(size=(6, 1)), rng.uniform(-2, 2, size=(3, 1)),
                rng.normal(size=(3, 1)))
    params = model.init(0)
    tight, loose = (imaml.meta_loss_and_grad_info(model, params, [task], 2.0, cg_tol=t).tasks[0] for t in (1e-12, 0.5))
    assert np.array_equal(flatten(tight.phi), flatten(loose.phi))
    assert tight.inner_iterations == loose.inner_iterations
    assert loose.stationarity_residual == tight.stationarity_residual <= tight.stationarity_tolerance
    rec.events.clear()
    rng = np.random.default_rng(1)
    big = Task(rng.uniform(-2, 2, size=(6, 1)), 1e3 * rng.normal(size=(6, 1)), rng.uniform(-2, 2, size=(3, 1)),
               rng.normal(size=(3, 1)))
    info = imaml.meta_loss_and_grad_info(model, model.init(1), [big], 2.0).tasks[0]
    g0 = np.linalg.norm(flatten(model.grad(model.init(1), big.x_support, big.y_support)))
    assert g0 > 100 and info.stationarity_tolerance == pytest.approx(1e-12 * g0, rel=1e-12)
    (nit, newton), *_ = rec.passes()
    assert nit < 100 and 1e-8 * g0 >= newton[0] > info.stationarity_tolerance  # handed to Newton above tol
    assert info.stationarity_residual <= info.stationarity_tolerance


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
    assert len(complex_steps) == 1
    # inner iterations: trust-region iterations plus every Newton step, the continuation's included
    assert iterations == sum(e[1] for e in rec.events if e[0] == "tr") + sum(e[0] == "newton" for e in rec.events)


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
