"""Fast targeted iMAML tests (issue 19): limits, diagnostics and the relu-kink locator.

Expected values are independent of ``reference.imaml``: closed forms on
``Quadratic`` (``phi* = (A_s + lam I)^{-1} (A_s c_s + lam theta)``, meta-gradient
``(I + A_s/lam)^{-1} A_q (phi* - c_q)``), the support gradient from the model's
public ``grad`` (foundation code), and relu networks built by hand so that the
pre-activation sitting on the kink is known exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

from reference import imaml
from reference.errors import InvalidInputError
from reference.models import MAX_DENSE_HESSIAN, MLP, Quadratic, flatten
from reference.tasks import Task


def _quadratic_task(dim: int, seed: int, query_scale: float = 1.0) -> tuple[Task, np.ndarray]:
    rng = np.random.default_rng(seed)
    B, C = rng.normal(size=(2, dim, dim))
    A_s = B @ B.T + 0.5 * np.eye(dim)
    A_q = query_scale * (C @ C.T + 0.5 * np.eye(dim))
    return Task(A_s, rng.normal(size=dim), A_q, query_scale * rng.normal(size=dim)), rng.normal(size=dim)


def _closed_form(task: Task, theta: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    dim = len(theta)
    phi = np.linalg.solve(task.x_support + lam * np.eye(dim), task.x_support @ task.y_support + lam * theta)
    b = task.x_query @ (phi - task.y_query)
    return phi, np.linalg.solve(np.eye(dim) + task.x_support / lam, b)


@pytest.mark.parametrize("solver", imaml.SOLVERS)
@pytest.mark.parametrize("query_scale", [1.0, 1e6])
def test_quadratic_gradient_and_diagnostics_match_the_closed_form(solver, query_scale):
    """lam != 1 (a lam/1/lam slip shows), a large query gradient (absolute vs relative residuals show)."""
    task, theta = _quadratic_task(4, seed=3, query_scale=query_scale)
    lam = 2.5
    phi, expected = _closed_form(task, theta, lam)
    model = Quadratic(4)
    result = imaml.meta_loss_and_grad_info(model, [theta], [task], lam, solver=solver)
    np.testing.assert_allclose(result.grad[0], expected, rtol=1e-10, atol=1e-12 * np.max(np.abs(expected)))
    (info,) = result.tasks
    np.testing.assert_allclose(flatten(info.phi), phi, rtol=1e-10, atol=1e-12)
    b = task.x_query @ (flatten(info.phi) - task.y_query)
    # the reported linear residual is the true relative residual of the returned solve (round-off here)
    true_res = np.linalg.norm(info.grad[0] + task.x_support @ info.grad[0] / lam - b) / np.linalg.norm(b)
    assert info.linear_residual <= 1e-12 and true_res <= 1e-12
    # the stationarity tolerance is inner_tol * max(1, ||grad L_s(theta)||), grad from the model itself
    g0 = np.linalg.norm(model.grad([theta], task.x_support, task.y_support)[0])
    assert g0 > 1.0
    assert info.stationarity_tolerance == pytest.approx(1e-12 * g0, rel=1e-12)
    residual = np.linalg.norm(task.x_support @ (flatten(info.phi) - task.y_support) + lam * (flatten(info.phi) - theta))
    assert residual <= info.stationarity_tolerance
    assert info.inner_iterations >= 1


def test_zero_query_gradient_gives_zero_gradient_and_residual():
    """``A_q = 0``: the query loss is flat, the meta-gradient is 0 and its relative residual is defined as 0."""
    task, theta = _quadratic_task(3, seed=1)
    task = Task(task.x_support, task.y_support, np.zeros((3, 3)), task.y_query)
    result = imaml.meta_loss_and_grad_info(Quadratic(3), [theta], [task], 1.5, solver="direct")
    assert np.all(result.grad[0] == 0.0)
    assert result.tasks[0].linear_residual == 0.0


def test_argument_limits_are_the_documented_ones():
    model = MLP([1, 4, 1])
    params, task = model.init(0), Task(np.ones((3, 1)), np.ones((3, 1)), np.ones((2, 1)), np.ones((2, 1)))
    args = dict(lam=1.0, solver="cg", inner_tol=1e-12, cg_tol=1e-12, inner_maxiter=10, cg_maxiter=None)
    for name in ("inner_tol", "cg_tol"):  # tolerances in (0, 1): 1 itself is refused
        with pytest.raises(InvalidInputError, match=name):
            imaml.check_arguments(model, params, [task], **dict(args, **{name: 1.0}))
        imaml.check_arguments(model, params, [task], **dict(args, **{name: 0.999}))
    width = (MAX_DENSE_HESSIAN - 1) // 3  # [1, w, 1] with biases: 3 w + 1 parameters, exactly the limit
    big = MLP([1, width, 1])
    assert big.n_params == MAX_DENSE_HESSIAN
    imaml.check_arguments(big, big.init(0), [task], **dict(args, solver="direct"))
    bigger = MLP([1, width + 1, 1])
    with pytest.raises(InvalidInputError, match="solver='direct' builds the dense Hessian"):
        imaml.check_arguments(bigger, bigger.init(0), [task], **dict(args, solver="direct"))


# ---------------------------------------------------------------------------
# _relu_kink: hand-built relu networks with a known pre-activation on the kink
# ---------------------------------------------------------------------------

X = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
# Hidden layer 1: z = X W1^T + b1 has columns [1.5, 2.5, 3.5], [3, 2, 4], [1 + e, -1 + e, e].
W1 = np.array([[1.0, 2.0], [2.0, 1.0], [1.0, -1.0]])
EPS = 2.0**-40  # exact in float64, and 1 + EPS, -1 + EPS too


def _net(activation: str, b1_last: float, layer2_kink: bool = False, b2_kink: float = 0.0, scale: float = 1.0,
         output: float = 1.0):
    model = MLP([2, 3, 3, 1], activation=activation)
    b1 = np.array([0.5, 1.0, b1_last])
    # Hidden layer 2 from h = relu(z1): all pre-activations >= 1 unless layer2_kink, which makes
    # unit 1's pre-activation b2_kink at example 0 (h = [1.5, 3, 1 + b1_last] there).
    W2 = np.eye(3) + 1.0
    b2 = np.array([1.0, 1.0, 1.0])
    if layer2_kink:
        W2[1] = [2.0, -1.0, 0.0]  # 2 * 1.5 - 3 = 0 at example 0
        b2[1] = b2_kink
    return model, [scale * W1, scale * b1, W2, b2, output * np.ones((1, 3)), np.zeros(1)]


def test_relu_kink_locates_the_pre_activation_on_the_kink():
    model, params = _net("relu", EPS)
    top = 4.0  # the largest |pre-activation| of hidden layer 1 (unit 1, example 2)
    assert imaml._relu_kink(model, params, X) == (1, 2, 2, EPS, EPS / top)


def test_relu_kink_in_the_second_hidden_layer():
    model, params = _net("relu", 0.5, layer2_kink=True)
    found = imaml._relu_kink(model, params, X)
    assert found is not None and found[:4] == (2, 1, 0, 0.0) and found[4] == 0.0


@pytest.mark.parametrize("activation, b1_last", [("tanh", EPS), ("softplus", 0.0), ("relu", 0.5)])
def test_no_kink_for_smooth_networks_or_away_from_zero(activation, b1_last):
    model, params = _net(activation, b1_last)
    assert imaml._relu_kink(model, params, X) is None


def test_relu_kink_keeps_the_smaller_ratio_of_two_layers():
    """Layer 1 at EPS / 4 of its largest, layer 2 at 8 EPS / (12 + EPS) (between EPS / 4 and EPS): layer 1."""
    model, params = _net("relu", EPS, layer2_kink=True, b2_kink=8 * EPS)
    assert imaml._relu_kink(model, params, X) == (1, 2, 2, EPS, EPS / 4.0)


def test_relu_kink_ratio_is_scale_invariant():
    """Layer 1's weights and biases times 1/8 (exact): the pre-activations shrink, their ratio does not."""
    model, params = _net("relu", EPS, scale=0.125)
    assert imaml._relu_kink(model, params, X) == (1, 2, 2, EPS / 8.0, EPS / 4.0)


def test_the_output_layer_is_not_a_kink():
    """Zero output weights put every output pre-activation at 0, but the output layer has no relu."""
    model, params = _net("relu", 0.5, output=0.0)
    assert imaml._relu_kink(model, params, X) is None


def test_a_hidden_layer_all_at_zero_is_on_the_kink():
    """Zero weights and biases: every pre-activation is exactly 0 (the whole layer on the kink)."""
    model = MLP([2, 3, 1], activation="relu")
    params = [np.zeros((3, 2)), np.zeros(3), np.ones((1, 3)), np.zeros(1)]
    assert imaml._relu_kink(model, params, X) == (1, 0, 0, 0.0, 0.0)


def test_cg_runs_beyond_the_dense_hessian_limit():
    """solver='cg' is matrix-free: 4201 parameters (over MAX_DENSE_HESSIAN), the inner Newton polishing
    included. The answer satisfies the implicit system, checked with the model's public products."""
    model = MLP([1, 1400, 1], activation="tanh")
    assert model.n_params > MAX_DENSE_HESSIAN
    params = model.init(0)
    rng = np.random.default_rng(0)
    task = Task(rng.uniform(-3, 3, size=(5, 1)), rng.normal(size=(5, 1)), rng.uniform(-3, 3, size=(4, 1)),
                rng.normal(size=(4, 1)))
    lam = 1.0
    result = imaml.meta_loss_and_grad_info(model, params, [task], lam, solver="cg")
    (info,) = result.tasks
    theta, phi = flatten(params), flatten(info.phi)
    stationarity = flatten(model.grad(info.phi, task.x_support, task.y_support)) + lam * (phi - theta)
    assert np.linalg.norm(stationarity) <= info.stationarity_tolerance
    b = flatten(model.grad(info.phi, task.x_query, task.y_query))
    g = flatten(result.grad)
    hg = flatten(model.hvp(info.phi, task.x_support, task.y_support, result.grad))
    assert np.linalg.norm(g + hg / lam - b) <= 1e-10 * np.linalg.norm(b)


def test_default_cg_budget_solves_a_system_with_many_distinct_eigenvalues():
    """CG needs up to n iterations on n distinct eigenvalues (more with round-off): the default budget
    (2 n + 100) must cover a 130-dimensional system whose spectrum spreads over [1, 1e3]."""
    dim, lam = 130, 1.0
    rng = np.random.default_rng(4)
    Q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    A_s = (Q * np.geomspace(1.0, 1e3, dim)) @ Q.T
    A_s = (A_s + A_s.T) / 2
    task = Task(A_s, rng.normal(size=dim), np.eye(dim), rng.normal(size=dim))
    theta = rng.normal(size=dim)
    _, expected = _closed_form(task, theta, lam)
    result = imaml.meta_loss_and_grad_info(Quadratic(dim), [theta], [task], lam, solver="cg")
    assert result.tasks[0].linear_iterations > 100
    np.testing.assert_allclose(result.grad[0], expected, rtol=1e-7, atol=1e-9 * np.max(np.abs(expected)))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_inner_iterations_count_trust_region_iterations_and_newton_steps(seed, monkeypatch):
    """``inner_iterations`` is documented as the trust-region iterations plus the Newton polishing steps
    tried: count both from outside (scipy's ``nit`` and the calls of the Newton solve)."""
    nits, newton_calls = [], []
    minimize, newton_solve = imaml.scipy.optimize.minimize, imaml._newton_solve

    def counting_minimize(*args, **kwargs):
        result = minimize(*args, **kwargs)
        nits.append(int(result.nit))
        return result

    def counting_newton_solve(*args, **kwargs):
        newton_calls.append(1)
        return newton_solve(*args, **kwargs)

    monkeypatch.setattr(imaml.scipy.optimize, "minimize", counting_minimize)
    monkeypatch.setattr(imaml, "_newton_solve", counting_newton_solve)
    model = MLP([1, 6, 1], activation="tanh")
    rng = np.random.default_rng(seed)
    task = Task(rng.uniform(-2, 2, size=(5, 1)), rng.normal(size=(5, 1)), rng.uniform(-2, 2, size=(3, 1)),
                rng.normal(size=(3, 1)))
    info = imaml.meta_loss_and_grad_info(model, model.init(seed), [task], 0.5 + seed, inner_tol=1e-10).tasks[0]
    assert info.inner_iterations == sum(nits) + len(newton_calls)
    # a quadratic inner problem: the trust region lands on the round-off floor, where Newton steps stop helping
    nits.clear(), newton_calls.clear()
    task, theta = _quadratic_task(3, seed=seed)
    info = imaml.meta_loss_and_grad_info(Quadratic(3), [theta], [task], 1.0 + seed).tasks[0]
    assert info.inner_iterations == sum(nits) + len(newton_calls)


def test_relu_kink_in_layer_two_sees_layer_one_through_the_relu():
    """Layer 2's pre-activation is computed from relu(layer 1): unit 2 of layer 1 is [1.5, -0.5, 0.5]
    over the examples, so relu gives [1.5, 0, 0.5], and a layer-2 unit reading only it sits exactly on
    the kink at example 1 (relu's 0, not -0.5, and not a value clipped at another level)."""
    model, params = _net("relu", 0.5)
    W2, b2 = params[2].copy(), params[3].copy()
    W2[1], b2[1] = [0.0, 0.0, 1.0], 0.0
    params[2], params[3] = W2, b2
    assert imaml._relu_kink(model, params, X) == (2, 1, 1, 0.0, 0.0)
