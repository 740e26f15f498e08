"""The reference MLP's hand-written derivatives against independent sources.

Expected values come from complex-step differentiation (exact to round-off
for analytic functions), numdifftools' Richardson extrapolation, and closed
forms (linear regression), never from the code under test.
"""

from __future__ import annotations

import numdifftools as nd
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from reference.errors import InvalidInputError, NotAnalyticError
from reference.models import MLP, Quadratic, flatten, unflatten
from reference.tasks import Task, check_tasks, gaussian_classification, linear_regression, sinusoid
from verify.strategies import mlp_problems, mlps, unit_directions

H_CS = 1e-30  # complex step: no subtractive cancellation, so the step can be tiny


def cs_directional(fun, params, v):
    """Im f(p + i h v) / h: the directional derivative to round-off."""
    return np.imag(fun([p + 1j * H_CS * d for p, d in zip(params, v)])) / H_CS


def relerr(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def min_abs_preactivation(model, params, x):
    _, hs, derivs = model._forward(params, x, order=0)
    zs = [h @ params[(2 if model.bias else 1) * l].T for l, h in enumerate(hs)]
    return min(float(np.min(np.abs(z))) for z in zs) if zs else np.inf


analytic_problems = mlp_problems(models=mlps(analytic_only=True))


@given(analytic_problems, st.integers(0, 2**16))
def test_grad_matches_complex_step(problem, seed):
    m, p = problem.model, problem.params
    v = unit_directions(np.random.default_rng(seed), list(m.shapes))
    g = m.grad(p, problem.x, problem.y)
    expected = cs_directional(lambda q: m.loss(q, problem.x, problem.y), p, v)
    got = sum(float(np.sum(a * b)) for a, b in zip(g, v))
    # both sides are exact to round-off: relative 1e-12 of the gradient's scale
    scale = np.linalg.norm(flatten(g)) + abs(expected)
    assert abs(got - expected) <= 1e-12 * max(scale, 1e-300)


@given(analytic_problems, st.integers(0, 2**16))
def test_hvp_matches_complex_step_of_grad(problem, seed):
    m, p = problem.model, problem.params
    v = unit_directions(np.random.default_rng(seed), list(m.shapes))
    hv = flatten(m.hvp(p, problem.x, problem.y, v))
    expected = flatten(cs_directional(lambda q: np.asarray(flatten(m.grad(q, problem.x, problem.y))), p, v))
    assert np.max(np.abs(hv - expected)) <= 1e-12 * max(np.max(np.abs(expected)), 1e-14)


@given(analytic_problems, st.integers(0, 2**16))
def test_flat_hvp_matches_complex_step_of_grad_and_the_list_hvp(problem, seed):
    # MLP._hvp_flat (iMAML's product on flat vectors: one stacked GEMM per weight block written in
    # place, transposed weights stored at the point) against complex step of the gradient, and against
    # the list-form _hvp_at to round-off; a complex v (iMAML under complex step) too.
    m, p = problem.model, problem.params
    rng = np.random.default_rng(seed)
    v = unit_directions(rng, list(m.shapes))
    point = m._hvp_flat_point(p, problem.x, problem.y)
    hv = m._hvp_flat(point, flatten(v))
    expected = flatten(cs_directional(lambda q: np.asarray(flatten(m.grad(q, problem.x, problem.y))), p, v))
    assert hv.shape == (m.n_params,) and hv.dtype == np.float64
    assert np.max(np.abs(hv - expected)) <= 1e-12 * max(np.max(np.abs(expected)), 1e-14)
    listed = flatten(m._hvp_at(m._hvp_point(p, problem.x, problem.y), v))
    assert np.max(np.abs(hv - listed)) <= 1e-14 * max(np.max(np.abs(listed)), 1e-14)
    w = unit_directions(rng, list(m.shapes))
    hz = m._hvp_flat(point, flatten(v) + 1j * flatten(w))
    assert hz.dtype == np.complex128
    assert np.max(np.abs(hz.real - hv)) <= 1e-14 * max(np.max(np.abs(hv)), 1e-14)
    hw = m._hvp_flat(point, flatten(w))
    assert np.max(np.abs(hz.imag - hw)) <= 1e-14 * max(np.max(np.abs(hw)), 1e-14)


@given(analytic_problems)
def test_hessian_symmetric_and_matches_stacked_hvps_and_complex_step(problem):
    m, p, x, y = problem.model, problem.params, problem.x, problem.y
    H = m.hessian(p, x, y)
    scale = max(np.max(np.abs(H)), 1e-14)
    assert np.max(np.abs(H - H.T)) <= 1e-13 * scale
    eye = np.eye(m.n_params)
    stacked = np.stack([flatten(m.hvp(p, x, y, unflatten(e, m.shapes))) for e in eye], axis=1)
    assert np.max(np.abs(H - stacked)) <= 1e-13 * scale
    # independent: the Jacobian of the gradient by complex step, column by column
    cs = np.stack(
        [flatten(cs_directional(lambda q: np.asarray(flatten(m.grad(q, x, y))), p, unflatten(e, m.shapes)))
         for e in eye],
        axis=1,
    )
    assert np.max(np.abs(H - cs)) <= 1e-12 * scale


@given(mlp_problems(models=mlps(activations=("relu",), max_width=4)), st.integers(0, 2**16))
def test_relu_grad_and_hvp_against_richardson_away_from_kinks(problem, seed):
    m, p, x, y = problem.model, problem.params, problem.x, problem.y
    # Richardson needs a smooth neighbourhood: stay well away from relu's kink
    assume(min_abs_preactivation(m, p, x) > 1e-2)
    v = unit_directions(np.random.default_rng(seed), list(m.shapes))
    pf, vf = flatten(p), flatten(v)

    def f(t):
        return m.loss(unflatten(pf + t * vf, m.shapes), x, y)

    d1 = nd.Derivative(f, step=nd.MaxStepGenerator(base_step=1e-3), order=4)(0.0)
    g = m.grad(p, x, y)
    got = float(flatten(g) @ vf)
    assert abs(got - d1) <= 1e-7 * max(np.linalg.norm(flatten(g)), 1e-8)

    def gv(t):
        return flatten(m.grad(unflatten(pf + t * vf, m.shapes), x, y))

    jac = nd.Derivative(gv, step=nd.MaxStepGenerator(base_step=1e-3), order=4)(0.0)
    hv = flatten(m.hvp(p, x, y, v))
    assert np.max(np.abs(hv - jac)) <= 1e-7 * max(np.max(np.abs(hv)), 1e-8)


def test_relu_refuses_complex_parameters():
    m = MLP([2, 3, 1], "relu")
    p = m.init(0)
    assert not m.is_analytic
    with pytest.raises(NotAnalyticError, match="not analytic"):
        m.loss([q + 0j for q in p], np.ones((2, 2)), np.ones((2, 1)))


@given(analytic_problems, st.integers(0, 2**16))
def test_jvp_matches_complex_step_and_vjp_is_its_transpose(problem, seed):
    m, p, x = problem.model, problem.params, problem.x
    rng = np.random.default_rng(seed)
    v = unit_directions(rng, list(m.shapes))
    jv = m.jvp(p, x, v)
    expected = cs_directional(lambda q: m.forward(q, x), p, v)
    assert np.max(np.abs(jv - expected)) <= 1e-12 * max(np.max(np.abs(expected)), 1e-14)
    cot = rng.normal(size=jv.shape)
    vjp_p, vjp_x = m.vjp(p, x, cot, wrt_input=True)
    lhs = float(np.sum(cot * jv))
    rhs = float(flatten(vjp_p) @ flatten(v))
    assert abs(lhs - rhs) <= 1e-12 * (np.linalg.norm(cot) * np.linalg.norm(jv) + abs(lhs) + 1e-300)
    # input gradient against complex step in x
    dx = rng.normal(size=x.shape)
    expected_x = np.imag(np.sum(cot * m.forward(p, x + 1j * H_CS * dx))) / H_CS
    assert abs(float(np.sum(vjp_x * dx)) - expected_x) <= 1e-12 * (np.abs(vjp_x).sum() * np.abs(dx).max() + 1e-300)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_regression_closed_form(bias):
    """Linear model with mse: grad = 2/n X1^T (X1 w - y), Hessian = 2/n X1^T X1."""
    rng = np.random.default_rng(3)
    n, d = 7, 4
    X, y = rng.normal(size=(n, d)), rng.normal(size=(n, 1))
    m = MLP([d, 1], "identity", "mse", bias=bias)
    p = m.init(5)
    X1 = np.hstack([X, np.ones((n, 1))]) if bias else X
    w = np.concatenate([p[0].ravel(), p[1]]) if bias else p[0].ravel()
    r = X1 @ w - y[:, 0]
    assert np.isclose(m.loss(p, X, y), np.mean(r**2), rtol=1e-14)
    np.testing.assert_allclose(flatten(m.grad(p, X, y)), 2 / n * X1.T @ r, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(m.hessian(p, X, y), 2 / n * X1.T @ X1, rtol=1e-13, atol=1e-15)


def test_cross_entropy_value_matches_definition():
    rng = np.random.default_rng(0)
    m = MLP([3, 4], "identity", "ce")
    p, x, y = m.init(1), rng.normal(size=(5, 3)), np.array([0, 1, 2, 3, 1])
    logits = x @ p[0].T + p[1]
    expected = np.mean(np.log(np.exp(logits).sum(1)) - logits[np.arange(5), y])
    assert np.isclose(m.loss(p, x, y), expected, rtol=1e-14)
    # bce: mean of softplus(o) - y o, extreme logits stay finite
    mb = MLP([1, 1], "identity", "bce")
    big = [np.array([[800.0]]), np.array([0.0])]
    val = mb.loss(big, np.array([[1.0], [-1.0]]), np.array([1.0, 0.0]))
    assert np.isfinite(val) and val < 1e-300 + 1e-12


def test_layout_follows_conventions():
    m = MLP([3, 5, 2], bias=True)
    assert m.shapes == ((5, 3), (5,), (2, 5), (2,))
    assert m.head_indices == (2, 3)
    m2 = MLP([3, 5, 2], bias=False)
    assert m2.shapes == ((5, 3), (2, 5)) and m2.head_indices == (1,)
    p = m.init(0)
    assert all(a.dtype == np.float64 for a in p)
    assert np.all(np.abs(p[0]) <= 1 / np.sqrt(3)) and np.all(np.abs(p[2]) <= 1 / np.sqrt(5))
    np.testing.assert_array_equal(flatten(unflatten(np.arange(m.n_params, dtype=float), m.shapes)),
                                  np.arange(m.n_params))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sizes=[3]), "at least an input and an output"),
        (dict(sizes=[3, 0]), r"sizes\[1\]=0 must be >= 1"),
        (dict(sizes=[3, 1], activation="gelu"), "activation='gelu' is unknown"),
        (dict(sizes=[3, 1], loss="hinge"), "loss='hinge' is unknown"),
        (dict(sizes=[3, 1], loss="ce"), "use loss='bce'"),
    ],
)
def test_bad_model_spec(kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        MLP(**kwargs)


def test_bad_inputs_name_the_argument():
    m = MLP([2, 3, 1])
    p = m.init(0)
    x, y = np.ones((4, 2)), np.ones((4, 1))
    with pytest.raises(InvalidInputError, match=r"params\[0\] has shape \(2, 3\), expected \(3, 2\)"):
        m.loss([p[0].T] + p[1:], x, y)
    with pytest.raises(InvalidInputError, match="params has 3 arrays"):
        m.loss(p[:3], x, y)
    with pytest.raises(InvalidInputError, match=r"x has shape \(4, 3\), expected \(n, 2\)"):
        m.loss(p, np.ones((4, 3)), y)
    with pytest.raises(InvalidInputError, match="x contains non-finite"):
        m.loss(p, np.array([[1.0, np.nan]] * 4), y)
    with pytest.raises(InvalidInputError, match=r"y has shape \(3, 1\), expected \(4, 1\)"):
        m.loss(p, x, np.ones((3, 1)))
    mc = MLP([2, 3], loss="ce")
    with pytest.raises(InvalidInputError, match=r"labels must lie in \[0, 2\]"):
        mc.loss(mc.init(0), x, np.array([0, 1, 3, 1]))
    with pytest.raises(InvalidInputError, match="integer class labels"):
        mc.loss(mc.init(0), x, np.array([0.5, 1, 2, 1]))
    mb = MLP([2, 1], loss="bce")
    with pytest.raises(InvalidInputError, match=r"must lie in \[0, 1\]"):
        mb.loss(mb.init(0), x, np.array([0.0, 1.0, 2.0, 1.0]))
    with pytest.raises(InvalidInputError, match="dense Hessian is limited"):
        big = MLP([1, 100, 100, 1])
        big.hessian(big.init(0), np.ones((2, 1)), np.ones((2, 1)))


def test_task_generators_are_seeded_and_shaped():
    a, b = sinusoid(4, 5, 7, seed=1), sinusoid(4, 5, 7, seed=1)
    assert all(np.array_equal(u, v) for ta, tb in zip(a, b) for u, v in zip(ta, tb))
    t = a[0]
    assert t.x_support.shape == (5, 1) and t.y_query.shape == (7, 1)
    assert np.all(np.abs(t.x_support) <= 5) and np.max(np.abs(t.y_support)) <= 5
    lr = linear_regression(2, 3, 4, dim=5, noise=0.0, seed=0)
    # noiseless: the targets are exactly affine in x, recoverable by least squares
    X = np.vstack([lr[0].x_support, lr[0].x_query])
    Y = np.vstack([lr[0].y_support, lr[0].y_query])
    coef, res, *_ = np.linalg.lstsq(np.hstack([X, np.ones((7, 1))]), Y, rcond=None)
    assert np.allclose(np.hstack([X, np.ones((7, 1))]) @ coef, Y, atol=1e-12)
    gc = gaussian_classification(3, 2, 4, 6, n_tasks=2, seed=0)
    assert len(gc) == 2 and gc[0].x_support.shape == (6, 6) and gc[0].y_query.shape == (12,)
    assert np.array_equal(np.bincount(gc[0].y_support), [2, 2, 2])
    assert check_tasks(MLP([6, 3], loss="ce"), gc)[0].y_support.dtype == np.int64


def test_task_validation_messages():
    m = MLP([1, 4, 1])
    with pytest.raises(InvalidInputError, match="tasks is empty"):
        check_tasks(m, [])
    with pytest.raises(InvalidInputError, match="wrap one task in a list"):
        check_tasks(m, sinusoid(1)[0])
    bad = Task(np.ones((3, 2)), np.ones((3, 1)), np.ones((3, 1)), np.ones((3, 1)))
    with pytest.raises(InvalidInputError, match=r"tasks\[0\].x_support has shape \(3, 2\)"):
        check_tasks(m, [bad])
    with pytest.raises(InvalidInputError, match="n_way=1 must be >= 2"):
        gaussian_classification(1, 2, 2, 2)


def test_quadratic_model_closed_form():
    q = Quadratic(3)
    rng = np.random.default_rng(0)
    B = rng.normal(size=(3, 3))
    A, c, theta = B @ B.T, rng.normal(size=3), rng.normal(size=3)
    loss, (g,) = q.loss_and_grad([theta], A, c)
    assert np.isclose(loss, 0.5 * (theta - c) @ A @ (theta - c), rtol=1e-14)
    np.testing.assert_allclose(g, A @ (theta - c), rtol=1e-14)
    with pytest.raises(InvalidInputError, match="must be symmetric"):
        q.loss([theta], B, c)
