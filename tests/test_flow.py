"""reference.flow: gradient flow and its adjoint meta-gradient (CONVENTIONS, "Continuous time").

Independent expectations: SymPy's matrix-exponential solution (quadratics,
50 digits), complex-step differentiation of the flow's meta-loss (MLPs), and
MAML with K steps of size T/K, which must converge to the flow at a measured
O(1/K) rate with the leading coefficient SymPy derives.
"""

from __future__ import annotations


import numpy as np
import pytest
import sympy as sp

from reference import flow
from reference.errors import ConvergenceError, InvalidInputError
from reference.models import MLP, Quadratic
from reference.symbolic import derive
from reference.tasks import Task, sinusoid

# Not cached across tests (SymPy's own cache makes a rebuild cheap): the mutation runner selects tests
# by per-test coverage, and a derivation built once would be attributed to the first test only.
_derive = derive

# The adjoint is exact up to solve_ivp's tolerance (rtol 1e-12 by default), not to
# machine precision: the agreement measured here is ~1e-13; 1e-10 leaves room.
FLOW_RTOL = 1e-10

QUAD2 = dict(theta=[0.25, 1.125], T=0.875, A_s=[[1.5, -0.25], [-0.25, 0.5]], c_s=[0.5, -0.25],
             A_q=[[0.75, 0.125], [0.125, 1.0]], c_q=[-0.375, 0.25])
QUAD1 = dict(theta=[0.75], T=1.25, A_s=[[1.5]], c_s=[-0.5], A_q=[[0.5]], c_q=[0.25])


def _task(p):
    return Task(np.array(p["A_s"]), np.array(p["c_s"]), np.array(p["A_q"]), np.array(p["c_q"]))


def _sympy(d, p):
    loss, grad = d.evaluate(dict(theta=p["theta"], T=p["T"], A_s=p["A_s"], c_s=p["c_s"], A_q=p["A_q"],
                                 c_q=p["c_q"]), digits=50)
    return float(loss), np.array([float(g) for g in grad])


def rel(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("p", [QUAD1, QUAD2], ids=["dim1", "dim2"])
@pytest.mark.parametrize("method", ["DOP853", "RK45", "Radau", "BDF"])
def test_adjoint_gradient_equals_the_matrix_exponential_solution(p, method):
    dim = len(p["theta"])
    d = _derive("gradient-flow-quadratic", dim=dim)
    exact_loss, exact_grad = _sympy(d, p)
    tol = {} if method == "DOP853" else dict(rtol=1e-11, atol=1e-13)
    loss, grad = flow.meta_loss_and_grad(Quadratic(dim), [np.array(p["theta"])], [_task(p)], p["T"], method=method, **tol)
    # Tolerance of the solver, not of float64: DOP853 at rtol 1e-12 gets ~1e-13; the
    # other methods at rtol 1e-11 (BDF is low order) are held to 1e-8.
    limit = FLOW_RTOL if method == "DOP853" else 1e-8
    assert rel(grad[0], exact_grad) <= limit
    assert abs(loss - exact_loss) <= limit * abs(exact_loss)


def test_flow_endpoint_equals_the_closed_form():
    d = _derive("gradient-flow-quadratic", dim=2)
    p = QUAD2
    p_T = flow.flow(Quadratic(2), [np.array(p["theta"])], np.array(p["A_s"]), np.array(p["c_s"]), p["T"])
    exact = d.evaluate_extra("flow_solution", {k: v for k, v in p.items()}, digits=50)
    assert rel(p_T[0], np.array(exact, dtype=float)) <= FLOW_RTOL


def _mlp_problem():
    model = MLP([1, 6, 1], activation="tanh")
    return model, model.init(seed=1), sinusoid(2, 5, 5, seed=3)


def test_adjoint_gradient_against_complex_step_on_an_mlp():
    """d/dh L(theta + i h v) / h = <grad, v> to the ODE tolerance (DOP853 handles complex states)."""
    model, params, tasks = _mlp_problem()
    T = 0.5
    loss, grad = flow.meta_loss_and_grad(model, params, tasks, T)
    rng = np.random.default_rng(0)
    for _ in range(2):
        v = [rng.normal(size=p.shape) for p in params]
        h = 1e-20
        lc = flow.meta_loss(model, [p + 1j * h * vi for p, vi in zip(params, v)], tasks, T)
        directional = sum(float(np.sum(g * vi)) for g, vi in zip(grad, v))
        assert lc.imag / h == pytest.approx(directional, rel=1e-9)
        assert lc.real == pytest.approx(loss, rel=1e-12)


def test_meta_batch_is_the_mean_of_the_tasks():
    model, params, tasks = _mlp_problem()
    loss, grad = flow.meta_loss_and_grad(model, params, tasks, 0.25)
    parts = [flow.solve_task(model, params, t, 0.25) for t in tasks]
    assert loss == pytest.approx(np.mean([s.loss for s in parts]), rel=1e-14)
    for i in range(len(params)):
        np.testing.assert_allclose(grad[i], np.mean([s.grad[i] for s in parts], axis=0), rtol=1e-13, atol=1e-16)
    assert all(s.nfev_forward > 0 and s.nfev_adjoint > 0 for s in parts)


def test_zero_time_is_no_adaptation():
    model, params, tasks = _mlp_problem()
    t = tasks[0]
    sol = flow.solve_task(model, params, t, 0.0)
    loss_q, grad_q = model.loss_and_grad(params, t.x_query, t.y_query)
    assert sol.loss == loss_q
    for a, b in zip(sol.grad, grad_q):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# MAML with K steps of size T/K -> gradient flow, at the rate O(1/K)
# ---------------------------------------------------------------------------

KS = (16, 32, 64, 128, 256)


def observed_rate(ks, errors) -> float:
    """Least-squares slope of log(error) against log(K)."""
    return float(np.polyfit(np.log(ks), np.log(errors), 1)[0])


def test_maml_converges_to_the_flow_at_rate_one_quadratic():
    maml = pytest.importorskip("reference.maml")
    d = _derive("gradient-flow-quadratic", dim=1)
    p = QUAD1
    _, g_flow = _sympy(d, p)
    coefficient = float(sp.N(d.extras["maml_error_coefficient"].xreplace(d.bind(
        dict(theta=p["theta"], T=p["T"], A_s=p["A_s"], c_s=p["c_s"], A_q=p["A_q"], c_q=p["c_q"]))), 30))
    errors = []
    for K in KS:
        _, g = maml.meta_loss_and_grad(Quadratic(1), [np.array(p["theta"])], [_task(p)], p["T"] / K, K)
        errors.append(g[0][0] - g_flow[0])
    rate = observed_rate(KS, np.abs(errors))
    assert -1.05 < rate < -0.95, f"observed rate {rate:.3f}, expected -1"
    # K (g_K - g_flow) -> C, the leading coefficient SymPy derived; O(1/K) correction.
    assert KS[-1] * errors[-1] == pytest.approx(coefficient, rel=2e-2)
    assert abs(KS[-1] * errors[-1] - coefficient) < abs(KS[0] * errors[0] - coefficient)


def test_maml_converges_to_the_flow_at_rate_one_mlp():
    maml = pytest.importorskip("reference.maml")
    model, params, tasks = _mlp_problem()
    T = 0.5
    _, g_flow = flow.meta_loss_and_grad(model, params, tasks, T)
    errors = []
    for K in KS:
        _, g = maml.meta_loss_and_grad(model, params, tasks, T / K, K)
        errors.append(np.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in zip(g, g_flow))))
    rate = observed_rate(KS, errors)
    assert -1.1 < rate < -0.9, f"observed rate {rate:.3f} (errors {errors}), expected -1"


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(T=-1.0), "T=-1.0 must be >= 0"),
    (dict(T=float("nan")), "T=nan must be finite"),
    (dict(T=1.0, rtol=1e-16), "rtol=1e-16 must lie in"),
    (dict(T=1.0, atol=0.0), "atol=0.0 must be > 0"),
    (dict(T=1.0, method="Euler"), "method='Euler' is unknown"),
])
def test_bad_options_are_refused(kwargs, match):
    model, params, tasks = _mlp_problem()
    with pytest.raises(InvalidInputError, match=match):
        flow.meta_loss_and_grad(model, params, tasks, **kwargs)


def test_complex_parameters_need_an_explicit_method():
    model, params, tasks = _mlp_problem()
    with pytest.raises(InvalidInputError, match="complex"):
        flow.meta_loss(model, [p + 0j for p in params], tasks, 0.5, method="Radau")


def test_a_diverging_flow_is_an_error_not_a_nan():
    # A concave support loss makes the flow blow up exponentially.
    task = Task(np.array([[-1000.0]]), np.array([0.0]), np.eye(1), np.zeros(1))
    with pytest.raises(ConvergenceError, match="gradient flow"):
        flow.meta_loss_and_grad(Quadratic(1), [np.array([1.0])], [task], 2.0, rtol=1e-6, atol=1e-8)


def test_task_shapes_are_validated():
    model, params, _ = _mlp_problem()
    with pytest.raises(InvalidInputError):
        flow.meta_loss(model, params, [Task(np.zeros((3, 2)), np.zeros((3, 1)), np.zeros((3, 1)), np.zeros((3, 1)))], 1.0)


# ---------------------------------------------------------------------------
# Fast checks of the contract (issue 19): closed forms by scipy.linalg.expm, an
# independent solve_ivp, counted model evaluations, the error paths
# ---------------------------------------------------------------------------

import dataclasses  # noqa: E402
import types  # noqa: E402

from scipy.integrate import solve_ivp  # noqa: E402
from scipy.linalg import expm  # noqa: E402

from reference.models import flatten, unflatten  # noqa: E402


def _expm_solution(p, T):
    """p(T), L_q(p(T)) and a(0) for the quadratic flow: p(T) = c + e^{-A T} (theta - c) (A symmetric)."""
    A, c, Aq, cq, theta = (np.array(p[k], dtype=float) for k in ("A_s", "c_s", "A_q", "c_q", "theta"))
    E = expm(-A * T)
    p_T = c + E @ (theta - c)
    r = p_T - cq
    return p_T, 0.5 * r @ Aq @ r, E.T @ (Aq @ r)


class CountingQuadratic(Quadratic):
    """A Quadratic that counts its gradient (forward right-hand side, query loss) and HVP (adjoint) calls."""

    def __init__(self, dim):
        super().__init__(dim)
        self.grads = self.hvps = 0

    def _loss_and_grad(self, params, A, c):
        self.grads += 1
        return super()._loss_and_grad(params, A, c)

    def _hvp(self, params, A, c, v):
        self.hvps += 1
        return super()._hvp(params, A, c, v)


@pytest.mark.parametrize("T", [1.0, 0.5])
def test_quadratic_flow_matches_the_matrix_exponential_fast(T):
    p_T, loss_T, grad_T = _expm_solution(QUAD2, T)
    sol = flow.solve_task(Quadratic(2), [np.array(QUAD2["theta"])], _task(QUAD2), T)
    assert rel(sol.params_T[0], p_T) <= FLOW_RTOL
    assert rel(sol.grad[0], grad_T) <= FLOW_RTOL
    assert abs(sol.loss - loss_T) <= FLOW_RTOL * abs(loss_T)
    # A run at the tightest accepted tolerance (rtol = MIN_RTOL) is accepted and as accurate.
    sol = flow.solve_task(Quadratic(2), [np.array(QUAD2["theta"])], _task(QUAD2), T, rtol=flow.MIN_RTOL)
    assert rel(sol.grad[0], grad_T) <= FLOW_RTOL
    with pytest.raises(dataclasses.FrozenInstanceError):  # a result, not a work space
        sol.loss = 0.0


def test_evaluation_counts_are_the_solves_right_hand_sides():
    """nfev_forward / nfev_adjoint count the two solves' right-hand sides: the model's gradients (less the one
    query gradient) and HVPs, and equal what solve_ivp needs for the same systems (forward with dense output,
    adjoint without); no solve at T = 0, no adjoint without need_grad or in meta_loss / flow."""
    theta, task = [np.array(QUAD2["theta"])], _task(QUAD2)
    m = CountingQuadratic(2)
    sol = flow.solve_task(m, theta, task, 0.0)
    assert (sol.nfev_forward, sol.nfev_adjoint, m.grads, m.hvps) == (0, 0, 1, 0)
    sol = flow.solve_task(m, theta, task, 0.0, need_grad=False)
    assert (sol.nfev_forward, sol.nfev_adjoint, sol.grad) == (0, 0, None)
    m = CountingQuadratic(2)
    sol = flow.solve_task(m, theta, task, 1.0, need_grad=False)
    assert sol.grad is None and sol.nfev_adjoint == 0 and m.hvps == 0
    assert sol.nfev_forward == m.grads - 1 > 0
    m = CountingQuadratic(2)
    sol = flow.solve_task(m, theta, task, 1.0)
    assert sol.nfev_forward == m.grads - 1 and sol.nfev_adjoint == m.hvps > 0
    A, c, Aq, cq = (np.array(QUAD2[k]) for k in ("A_s", "c_s", "A_q", "c_q"))
    fwd = solve_ivp(lambda t, p: -A @ (p - c), (0.0, 1.0), theta[0], method="DOP853", rtol=flow.DEFAULT_RTOL,
                    atol=flow.DEFAULT_ATOL, dense_output=True)
    back = solve_ivp(lambda t, a: A @ a, (1.0, 0.0), Aq @ (fwd.y[:, -1] - cq), method="DOP853",
                     rtol=flow.DEFAULT_RTOL, atol=flow.DEFAULT_ATOL)
    # Same systems, same solver: the same steps up to round-off in the right-hand sides (one DOP853 step is
    # 12 evaluations; a dense output would add 3 per step).
    assert abs(sol.nfev_forward - fwd.nfev) <= 12 and abs(sol.nfev_adjoint - back.nfev) <= 12
    m = CountingQuadratic(2)
    flow.meta_loss(m, theta, [task, task], 1.0)  # "forward solves only"
    assert m.hvps == 0 and m.grads > 0
    m = CountingQuadratic(2)
    flow.flow(m, theta, task.x_support, task.y_support, 1.0)  # p(T) only
    assert m.hvps == 0 and m.grads > 0


def test_implicit_methods_get_the_flows_jacobian():
    # A stiff flow (Hessian eigenvalues 1e3 and 1): with the exact Jacobian -H of dp/dt = -grad L, Radau and
    # BDF take about as many evaluations as solve_ivp given that Jacobian; a wrong one costs tens of times more.
    p = dict(QUAD2, A_s=[[1000.0, 0.0], [0.0, 1.0]])
    A, c = np.array(p["A_s"]), np.array(p["c_s"])
    p_T, _, _ = _expm_solution(p, 1.0)
    for method in ("Radau", "BDF"):
        sol = flow.solve_task(Quadratic(2), [np.array(p["theta"])], _task(p), 1.0, method=method, rtol=1e-6,
                              atol=1e-8, need_grad=False)
        ref = solve_ivp(lambda t, y: -A @ (y - c), (0.0, 1.0), np.array(p["theta"]), method=method, rtol=1e-6,
                        atol=1e-8, jac=-A)
        assert rel(sol.params_T[0], p_T) <= 1e-4
        assert sol.nfev_forward <= 1.5 * ref.nfev + 20, (method, sol.nfev_forward, ref.nfev)


def test_flow_endpoint_on_an_mlp_against_solve_ivp():
    # x with 5 rows of 1 feature: y must have x's rows (not its features).
    model, params, tasks = _mlp_problem()
    x, y = tasks[0].x_support, tasks[0].y_support
    assert x.shape[0] != x.shape[1]
    shapes = [q.shape for q in params]
    ref = solve_ivp(lambda t, w: -flatten(model.loss_and_grad(unflatten(w, shapes), x, y)[1]), (0.0, 0.5),
                    flatten(params), method="DOP853", rtol=1e-12, atol=1e-14)
    got = flow.flow(model, params, x, y, 0.5)
    assert rel(flatten(got), ref.y[:, -1]) <= 1e-9


def test_loss_type_and_complex_step_on_the_quadratic():
    theta, task = np.array(QUAD1["theta"]), _task(QUAD1)
    loss, grad = flow.meta_loss_and_grad(Quadratic(1), [theta], [task], 0.75)
    assert type(loss) is float
    h = 1e-20
    loss_c, _ = flow.meta_loss_and_grad(Quadratic(1), [theta + 1j * h], [task], 0.75)
    assert type(loss_c) is complex
    assert loss_c.imag / h == pytest.approx(grad[0][0], rel=1e-9)
    assert loss_c.real == pytest.approx(loss, rel=1e-13)
    assert type(flow.meta_loss(Quadratic(1), [theta], [task], 0.75)) is float


@pytest.mark.parametrize("rtol, match", [(0.0, "rtol=0.0 must be > 0"), (-1e-3, "rtol=-0.001 must be > 0"),
                                         (1.0, r"rtol=1.0 must lie in \[1e-13, 1\): a relative tolerance of 1 or more accepts any"),
                                         (1.5, "rtol=1.5 must lie in .* accepts any answer; the default is 1e-12"),
                                         (1e-14, r"rtol=1e-14 must lie in .*: SciPy cannot honour a tighter")])
def test_rtol_outside_its_range_is_refused(rtol, match):
    with pytest.raises(InvalidInputError, match=match):
        flow.solve_task(Quadratic(1), [np.array(QUAD1["theta"])], _task(QUAD1), 1.0, rtol=rtol)


def test_failed_solves_are_errors_that_name_the_end_time():
    # Overflow (p = 1e300 e^{10 t} passes the largest float at t ~ 0.8) and a finite-time blow-up (y' = y^2
    # from y(0) = 1 at t = 1, where the step size falls below the spacing of the numbers: status -1 with a
    # finite state).
    with pytest.raises(ConvergenceError, match=r"the gradient flow overflowed before t=2\.0"):
        flow.meta_loss(Quadratic(1), [np.array([1e300])], [Task(np.array([[-10.0]]), np.zeros(1), np.eye(1),
                                                               np.zeros(1))], 2.0, rtol=1e-6, atol=1e-8)
    with pytest.raises(ConvergenceError, match=r"the blow-up did not reach t=2\.0 \(DOP853"):
        flow._solve(lambda t, y: y * y, (0.0, 2.0), np.ones(1), "DOP853", 1e-6, 1e-8, None, False, "blow-up")


def test_a_solve_ending_on_a_non_finite_state_is_an_error(monkeypatch):
    # solve_ivp reporting success (status 0) with a non-finite end state (its last column) is refused too;
    # the earlier columns are finite here, so only the end state can decide.
    def fake(fun, t_span, y0, **kwargs):
        return types.SimpleNamespace(status=0, y=np.array([[1.0, 2.0, 3.0, np.nan]]), message="done", t=None)

    monkeypatch.setattr(flow, "solve_ivp", fake)
    with pytest.raises(ConvergenceError, match=r"the system did not reach t=1\.0"):
        flow._solve(None, (0.0, 1.0), np.ones(1), "DOP853", 1e-10, 1e-12, None, False, "system")
