"""Tests of the gradient-based reference family: MAML, FOMAML, ANIL, Meta-SGD, Reptile, Newton-MAML.

Expected values come from outside the code under test: complex-step and
Richardson directional derivatives of the meta-losses (local helpers below),
dense Hessians built by ``reference.models`` (foundation code), closed forms on
``Quadratic``, and hand-built problems whose structure forces an identity.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from reference import anil, inner_loop, maml, metasgd, newton, reptile
from reference.errors import InvalidInputError, NotAnalyticError, SingularMatrixError
from reference.models import MLP, Quadratic, flatten, tree_vdot, unflatten
from reference.tasks import Task, check_tasks

EPS = np.finfo(np.float64).eps
# Complex step has no cancellation: only the rounding of the K-step recursion is left, a few
# hundred ulps of the terms (||g|| ||e||) at the depths used here.
CS_RTOL = 1e-9
# Richardson (two central differences, t^2 term removed): truncation O(t^4) and rounding
# eps |f| / t with t = 1e-3 leave ~1e-10 relative; 1e-6 leaves room for steep losses.
RICHARDSON_RTOL = 1e-6
ANALYTIC = ("tanh", "sigmoid", "softplus", "identity")


# ---------------------------------------------------------------------------
# Independent differentiation helpers (no code under test)
# ---------------------------------------------------------------------------


def _along(params: list[np.ndarray], direction: list[np.ndarray], t: Any) -> list[np.ndarray]:
    return [p + t * e for p, e in zip(params, direction)]


def complex_step(f: Callable[[Any], Any], params: list[np.ndarray], direction: list[np.ndarray],
                 h: float = 1e-30) -> float:
    """``d/dt f(params + t e)`` at 0 as ``Im f(params + i h e) / h`` (Squire & Trapp 1998)."""
    return float(np.imag(f(_along(params, direction, 1j * h))) / h)


def richardson(f: Callable[[Any], Any], params: list[np.ndarray], direction: list[np.ndarray],
               t: float = 1e-3) -> tuple[float, float]:
    """Central differences at ``t`` and ``t/2`` with the ``t^2`` term removed; returns (value, error estimate)."""
    def central(s: float) -> float:
        return (f(_along(params, direction, s)) - f(_along(params, direction, -s))) / (2 * s)

    d1, d2, d4 = central(t), central(t / 2), central(t / 4)
    r1, r2 = (4 * d2 - d1) / 3, (4 * d4 - d2) / 3
    return r2, abs(r2 - r1)


def assert_directional(name: str, got: float, expected: float, scale: float, rtol: float) -> None:
    err = abs(got - expected)
    assert err <= rtol * scale, (
        f"{name} meta-gradient mismatch: directional derivative reference={expected!r} got={got!r} "
        f"err={err:.3e} (tol {rtol:.0e} x scale {scale:.3e}, float64)"
    )


def norm(tree: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum(np.abs(a) ** 2) for a in tree)))


def random_like(rng: np.random.Generator, shapes: Any) -> list[np.ndarray]:
    return [rng.normal(size=s) for s in shapes]


# ---------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------


def make_tasks(model: MLP, rng: np.random.Generator, n_tasks: int, n_support: int, n_query: int) -> list[Task]:
    d0, d_out = model.sizes[0], model.sizes[-1]

    def targets(n: int) -> np.ndarray:
        if model.loss_name == "ce":
            return rng.integers(0, d_out, size=n)
        if model.loss_name == "bce":
            return rng.uniform(0.0, 1.0, size=(n, d_out))
        return rng.normal(size=(n, d_out))

    tasks = [Task(rng.normal(size=(n_support, d0)), targets(n_support), rng.normal(size=(n_query, d0)),
                  targets(n_query)) for _ in range(n_tasks)]
    return check_tasks(model, tasks)


class Problem:
    def __init__(self, model, params, tasks, inner_lr, steps, rng):
        self.model, self.params, self.tasks, self.inner_lr, self.steps = model, params, tasks, inner_lr, steps
        self.rng = rng

    def __repr__(self) -> str:
        return f"Problem({self.model!r}, K={self.steps}, inner_lr={self.inner_lr}, tasks={len(self.tasks)})"


@st.composite
def problems(draw, activations=ANALYTIC, max_hidden: int = 2, max_width: int = 5, max_steps: int = 5):
    loss = draw(st.sampled_from(("mse", "ce", "bce")))
    d0 = draw(st.integers(1, 3))
    hidden = draw(st.lists(st.integers(1, max_width), min_size=0, max_size=max_hidden))
    d_out = draw(st.integers(2, 3)) if loss == "ce" else draw(st.integers(1, 2))
    model = MLP([d0, *hidden, d_out], draw(st.sampled_from(activations)), loss, draw(st.booleans()))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    params = [0.8 * rng.normal(size=s) for s in model.shapes]
    tasks = make_tasks(model, rng, draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    return Problem(model, params, tasks, draw(st.floats(0.01, 0.3)), draw(st.integers(1, max_steps)), rng)


def metasgd_lrs(problem: Problem) -> list[np.ndarray]:
    return [problem.rng.uniform(0.5, 1.5, size=s) * problem.inner_lr for s in problem.model.shapes]


# Table of (name, meta-loss(params), gradient(params)) builders; one table feeds the property tests.
def _maml(pb):
    return (lambda p: maml.meta_loss(pb.model, p, pb.tasks, pb.inner_lr, pb.steps),
            lambda p: maml.meta_loss_and_grad(pb.model, p, pb.tasks, pb.inner_lr, pb.steps))


def _maml_generic(pb):
    lrs = [pb.inner_lr] * len(pb.params)
    return (lambda p: maml.meta_loss(pb.model, p, pb.tasks, pb.inner_lr, pb.steps),
            lambda p: inner_loop.meta_loss_and_grad(pb.model, p, pb.tasks, lrs, pb.steps, fused=False)[:2])


def _anil(pb):
    return (lambda p: anil.meta_loss(pb.model, p, pb.tasks, pb.inner_lr, pb.steps),
            lambda p: anil.meta_loss_and_grad(pb.model, p, pb.tasks, pb.inner_lr, pb.steps))


def _metasgd_params(pb):
    lrs = metasgd_lrs(pb)
    return (lambda p: metasgd.meta_loss(pb.model, p, lrs, pb.tasks, pb.steps),
            lambda p: metasgd.meta_loss_and_grad(pb.model, p, lrs, pb.tasks, pb.steps)[:2])


def _metasgd_lrs(pb):
    # Differentiate with respect to the learning rates: the "parameters" of this entry are lrs.
    lrs = metasgd_lrs(pb)
    pb.params = lrs
    theta = [0.8 * pb.rng.normal(size=s) for s in pb.model.shapes]
    return (lambda a: metasgd.meta_loss(pb.model, theta, a, pb.tasks, pb.steps),
            lambda a: (lambda r: (r[0], r[2]))(metasgd.meta_loss_and_grad(pb.model, theta, a, pb.tasks, pb.steps)))


GRADIENTS = {
    "maml": _maml,
    "maml[generic loop]": _maml_generic,
    "anil": _anil,
    "metasgd[params]": _metasgd_params,
    "metasgd[lrs]": _metasgd_lrs,
}


# ---------------------------------------------------------------------------
# Meta-gradients against complex step and Richardson
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", sorted(GRADIENTS))
@given(pb=problems())
def test_meta_gradient_matches_complex_step(algorithm: str, pb: Problem) -> None:
    loss_fn, grad_fn = GRADIENTS[algorithm](pb)
    loss, grad = grad_fn(pb.params)
    e = random_like(pb.rng, pb.model.shapes)
    expected = complex_step(loss_fn, pb.params, e)
    assert abs(loss - loss_fn(pb.params)) <= 1e-12 * (1 + abs(loss))
    assert_directional(algorithm, tree_vdot(grad, e), expected, norm(grad) * norm(e) + abs(expected), CS_RTOL)


@pytest.mark.parametrize("algorithm", sorted(GRADIENTS))
@given(pb=problems(activations=("relu", "tanh", "softplus"), max_steps=3))
def test_meta_gradient_matches_richardson(algorithm: str, pb: Problem) -> None:
    loss_fn, grad_fn = GRADIENTS[algorithm](pb)
    _, grad = grad_fn(pb.params)
    e = random_like(pb.rng, pb.model.shapes)
    t = 1e-3 if pb.model.is_analytic else 1e-5
    expected, spread = richardson(loss_fn, pb.params, e, t)
    scale = norm(grad) * norm(e) + abs(expected)
    # relu is piecewise smooth: a difference quotient straddling a kink (a pre-activation
    # crossing 0 within +-t along e at some inner step) disagrees with its neighbours. Such points
    # are outside the claim ("away from kinks") and are skipped; the filter looks only at the
    # meta-loss, never at the gradient under test.
    if not pb.model.is_analytic:
        assume(spread <= 1e-8 * scale)
    assert_directional(algorithm, tree_vdot(grad, e), expected, scale, RICHARDSON_RTOL)


def _newton_problem(pb: Problem) -> float:
    """A damping that keeps every damped support Hessian well conditioned along the path."""
    radius = max(float(np.max(np.abs(np.linalg.eigvalsh(pb.model.hessian(pb.params, t.x_support, t.y_support)))))
                 for t in pb.tasks)
    return 0.5 + 2.0 * radius


@given(pb=problems(max_hidden=1, max_width=4, max_steps=3))
def test_newton_meta_gradient_matches_complex_step_and_richardson(pb: Problem) -> None:
    delta = _newton_problem(pb)
    alpha = 3.0 * pb.inner_lr

    def loss_fn(p):
        return newton.meta_loss(pb.model, p, pb.tasks, alpha, pb.steps, damping=delta)

    loss, grad = newton.meta_loss_and_grad(pb.model, pb.params, pb.tasks, alpha, pb.steps, damping=delta)
    assert abs(loss - loss_fn(pb.params)) <= 1e-12 * (1 + abs(loss))
    e = random_like(pb.rng, pb.model.shapes)
    expected = complex_step(loss_fn, pb.params, e)
    scale = norm(grad) * norm(e) + abs(expected)
    assert_directional("newton", tree_vdot(grad, e), expected, scale, CS_RTOL)
    expected_r, _ = richardson(loss_fn, pb.params, e)
    assert_directional("newton (richardson)", tree_vdot(grad, e), expected_r, scale, RICHARDSON_RTOL)


def test_newton_third_derivative_term_is_needed() -> None:
    """K = 1 against complex step, and the same formula without the third-derivative term fails.

    Without ``T`` the meta-gradient would be ``(I - alpha H A^{-1}) grad L_q(p_1)`` (built
    here from dense Hessians); it must differ from complex step by far more than the tolerance,
    so the comparison above can detect a missing term.
    """
    rng = np.random.default_rng(3)
    model = MLP([2, 4, 1], "tanh", "mse")
    params = [0.8 * rng.normal(size=s) for s in model.shapes]
    tasks = make_tasks(model, rng, 1, 6, 5)
    alpha, delta = 0.7, 1.0
    _, grad = newton.meta_loss_and_grad(model, params, tasks, alpha, 1, damping=delta)
    e = random_like(rng, model.shapes)
    expected = complex_step(lambda p: newton.meta_loss(model, p, tasks, alpha, 1, damping=delta), params, e)
    scale = norm(grad) * norm(e)
    assert_directional("newton", tree_vdot(grad, e), expected, scale, CS_RTOL)
    t = tasks[0]
    H = model.hessian(params, t.x_support, t.y_support)
    A = H + delta * np.eye(model.n_params)
    p1 = flatten(params) - alpha * np.linalg.solve(A, flatten(model.grad(params, t.x_support, t.y_support)))
    g_q = flatten(model.grad(unflatten(p1, model.shapes), t.x_query, t.y_query))
    without_t = g_q - alpha * H @ np.linalg.solve(A, g_q)
    assert abs(without_t @ flatten(e) - expected) > 1e3 * CS_RTOL * scale


def test_taylor_remainder_is_second_order() -> None:
    """``|f(p + h e) - f(p) - h <g, e>|`` falls at least like ``h^2`` with the meta-gradient, like ``h`` without."""
    rng = np.random.default_rng(7)
    model = MLP([2, 5, 3], "tanh", "ce")
    params = [0.8 * rng.normal(size=s) for s in model.shapes]
    tasks = make_tasks(model, rng, 3, 4, 4)
    lrs = [rng.uniform(0.05, 0.2, size=s) for s in model.shapes]
    cases = {
        "maml": (lambda p: maml.meta_loss(model, p, tasks, 0.2, 4),
                 maml.meta_loss_and_grad(model, params, tasks, 0.2, 4)[1]),
        "anil": (lambda p: anil.meta_loss(model, p, tasks, 0.2, 4),
                 anil.meta_loss_and_grad(model, params, tasks, 0.2, 4)[1]),
        "metasgd": (lambda p: metasgd.meta_loss(model, p, lrs, tasks, 4),
                    metasgd.meta_loss_and_grad(model, params, lrs, tasks, 4)[1]),
        "newton": (lambda p: newton.meta_loss(model, p, tasks, 0.5, 2, damping=2.0),
                   newton.meta_loss_and_grad(model, params, tasks, 0.5, 2, damping=2.0)[1]),
    }
    e = random_like(rng, model.shapes)
    hs = np.array([4e-2, 2e-2, 1e-2, 5e-3])
    for name, (f, grad) in cases.items():
        f0, slope = f(params), tree_vdot(grad, e)
        rem = np.array([abs(f(_along(params, e, h)) - f0 - h * slope) for h in hs])
        assert np.all(rem > 1e4 * EPS * (1 + abs(f0))), f"{name}: Taylor remainder at rounding level {rem}"
        rates = np.log2(rem[:-1] / rem[1:])
        # At least 2 (3 where the direction happens to make the quadratic term vanish).
        assert np.all(rates > 1.75), f"{name}: Taylor rates {rates}, expected >= 2"
        # The test can fail: a slope 10 % off leaves a first-order remainder (rate -> 1).
        wrong = np.array([abs(f(_along(params, e, h)) - f0 - h * 1.1 * slope) for h in hs])
        assert np.log2(wrong[-2] / wrong[-1]) < 1.5, f"{name}: a wrong slope passed the Taylor test"


# ---------------------------------------------------------------------------
# Structural identities
# ---------------------------------------------------------------------------


def test_fomaml_equals_maml_when_inner_hessians_vanish() -> None:
    """Saturated softmax: the support Hessian is exactly zero along the whole inner path.

    A linear model ``[d, c]`` (output linear in the parameters, no curvature of
    its own) with cross-entropy whose support logits differ by more than ~745:
    ``softmax`` is exactly one-hot in float64, so ``Phi'' = diag(s) - s s^T = 0``
    and ``H_s = J^T Phi'' J = 0``, while the gradient ``J^T (s - onehot)`` is
    not zero (the support examples are misclassified), so the inner loop
    moves. The query logits are moderate, so ``grad L_q(p_K)`` is nontrivial.
    Then every factor ``I - alpha H_s`` is ``I`` and MAML = FOMAML exactly.
    """
    rng = np.random.default_rng(0)
    model = MLP([3, 4], "identity", "ce")
    params = model.init(1)
    xs = 1e4 * rng.normal(size=(200, 3))
    logits = xs @ params[0].T + params[1]
    top2 = np.sort(logits, axis=1)[:, -2:]
    keep = np.flatnonzero(top2[:, 1] - top2[:, 0] > 3000)[:6]  # clearly separated logits only
    xs, logits = xs[keep], logits[keep]
    ys = (np.argmax(logits, axis=1) + 1) % 4  # every support example misclassified
    gaps = np.sort(logits, axis=1)
    assert np.all(gaps[:, -1] - gaps[:, -2] > 800)  # saturation holds at theta ...
    tasks = [Task(xs, ys, rng.normal(size=(5, 3)), rng.integers(0, 4, size=5))]
    alpha, steps = 1e-9, 3
    for k in range(1, steps + 1):  # saturation holds at every iterate, and the inner loop moves
        p_k = maml.adapt(model, params, tasks[0], alpha, k)
        gaps_k = np.sort(xs @ p_k[0].T + p_k[1], axis=1)
        assert np.all(gaps_k[:, -1] - gaps_k[:, -2] > 800)
        assert norm([a - b for a, b in zip(p_k, params)]) > 1e-7 * k
    _, g2 = maml.meta_loss_and_grad(model, params, tasks, alpha, steps)
    _, g1 = maml.meta_loss_and_grad(model, params, tasks, alpha, steps, first_order=True)
    assert norm(g1) > 1e-2
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(b, a, rtol=1e-13, atol=1e-15 * norm(g1))


def test_fomaml_equals_maml_when_support_and_query_use_disjoint_units() -> None:
    """relu units active only on the support set and others only on the query set.

    The support loss depends only on units {0, 1}, the query loss only on units
    {2, 3}, so ``H_s grad L_q = 0`` blockwise at every iterate while the inner
    loop moves the support units: MAML = FOMAML = grad L_q(theta), nonzero.
    """
    model = MLP([1, 4, 1], "relu", "mse", bias=False)
    w1 = np.array([[1.0], [0.7], [-1.0], [-0.6]])
    params = [w1, np.array([[0.5, -0.3, 0.8, 0.2]])]
    rng = np.random.default_rng(1)
    xs, xq = rng.uniform(3.0, 5.0, size=(5, 1)), rng.uniform(-5.0, -3.0, size=(5, 1))
    tasks = [Task(xs, np.sin(xs), xq, np.cos(xq))]
    alpha, steps = 1e-3, 4
    p_k = maml.adapt(model, params, tasks[0], alpha, steps)
    assert norm([a - b for a, b in zip(p_k, params)]) > 1e-3
    for p in (params, p_k):  # the activation pattern is unchanged along the path
        assert np.all((xs @ p[0].T)[:, :2] > 1.0) and np.all((xs @ p[0].T)[:, 2:] < -1.0)
        assert np.all((xq @ p[0].T)[:, :2] < -1.0) and np.all((xq @ p[0].T)[:, 2:] > 1.0)
    _, g2 = maml.meta_loss_and_grad(model, params, tasks, alpha, steps)
    _, g1 = maml.meta_loss_and_grad(model, params, tasks, alpha, steps, first_order=True)
    g_theta = model.grad(params, xq, tasks[0].y_query)
    assert norm(g1) > 1e-2
    for a, b, c in zip(g1, g2, g_theta):
        np.testing.assert_allclose(b, a, rtol=1e-14, atol=0)
        np.testing.assert_allclose(b, c, rtol=1e-14, atol=0)


@given(pb=problems(activations=("tanh", "relu", "softplus")))
def test_fomaml_is_mean_query_gradient_at_adapted_params(pb: Problem) -> None:
    """FOMAML (CONVENTIONS): ``mean_t grad L_q(p_K^t)``, ``p_K`` from plain SGD on the model's own gradient."""
    expected = [np.zeros(s) for s in pb.model.shapes]
    for t in pb.tasks:
        p = pb.params
        for _ in range(pb.steps):
            p = [a - pb.inner_lr * g for a, g in zip(p, pb.model.grad(p, t.x_support, t.y_support))]
        expected = [acc + g / len(pb.tasks) for acc, g in zip(expected, pb.model.grad(p, t.x_query, t.y_query))]
    loss, got = maml.meta_loss_and_grad(pb.model, pb.params, pb.tasks, pb.inner_lr, pb.steps, first_order=True)
    assert loss == pytest.approx(maml.meta_loss(pb.model, pb.params, pb.tasks, pb.inner_lr, pb.steps), rel=1e-12)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13 * (1 + norm(expected)))


@given(pb=problems(max_hidden=1, max_width=4))
def test_maml_one_step_equals_dense_formula(pb: Problem) -> None:
    """K = 1: ``mean_t (I - alpha H_s(theta)) grad L_q(theta - alpha grad L_s(theta))`` with dense Hessians."""
    m, a = pb.model, pb.inner_lr
    expected = 0.0
    for t in pb.tasks:
        H = m.hessian(pb.params, t.x_support, t.y_support)
        p1 = [p - a * g for p, g in zip(pb.params, m.grad(pb.params, t.x_support, t.y_support))]
        g_q = flatten(m.grad(p1, t.x_query, t.y_query))
        expected = expected + (g_q - a * H @ g_q)
    expected = expected / len(pb.tasks)
    got = flatten(maml.meta_loss_and_grad(m, pb.params, pb.tasks, a, 1)[1])
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12 * np.max(np.abs(expected)))


@given(pb=problems(activations=("tanh", "relu", "identity")))
def test_reptile_one_step_is_scaled_support_gradient(pb: Problem) -> None:
    expected = [pb.inner_lr * sum(pb.model.grad(pb.params, t.x_support, t.y_support)[i] for t in pb.tasks)
                / len(pb.tasks) for i in range(len(pb.params))]
    got = reptile.direction(pb.model, pb.params, pb.tasks, pb.inner_lr, 1)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


@given(pb=problems(activations=("tanh", "relu")))
def test_reptile_direction_is_theta_minus_adapted(pb: Problem) -> None:
    """K steps: ``mean_t (theta - p_K^t)`` with ``p_K`` from plain SGD on the model's gradient."""
    expected = [np.zeros(s) for s in pb.model.shapes]
    for t in pb.tasks:
        p = pb.params
        for _ in range(pb.steps):
            p = [a - pb.inner_lr * g for a, g in zip(p, pb.model.grad(p, t.x_support, t.y_support))]
        expected = [acc + (a - b) / len(pb.tasks) for acc, a, b in zip(expected, pb.params, p)]
    got = reptile.direction(pb.model, pb.params, pb.tasks, pb.inner_lr, pb.steps)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


@given(pb=problems())
def test_metasgd_with_equal_rates_is_maml(pb: Problem) -> None:
    """Equal rates reproduce MAML's theta-gradient, and ``sum(dL/da)`` is ``dL/d alpha`` (complex step in alpha)."""
    lrs = [np.full(s, pb.inner_lr) for s in pb.model.shapes]
    loss_s, g_s, g_lr = metasgd.meta_loss_and_grad(pb.model, pb.params, lrs, pb.tasks, pb.steps)
    loss_m, g_m = maml.meta_loss_and_grad(pb.model, pb.params, pb.tasks, pb.inner_lr, pb.steps)
    assert abs(loss_s - loss_m) <= 1e-14 * (1 + abs(loss_m))
    for a, b in zip(g_s, g_m):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-14 * (1 + norm(g_m)))
    h = 1e-30
    d_alpha = np.imag(maml.meta_loss(pb.model, pb.params, pb.tasks, pb.inner_lr + 1j * h, pb.steps)) / h
    total = sum(float(np.sum(g)) for g in g_lr)
    scale = sum(float(np.sum(np.abs(g))) for g in g_lr) + abs(d_alpha)
    assert_directional("metasgd learning-rate", total, d_alpha, scale, CS_RTOL)


@given(pb=problems(activations=("tanh", "softplus"), max_steps=1))
def test_anil_body_gradient_contains_cross_term(pb: Problem) -> None:
    """K = 1: ``(I - alpha H P) grad L_q(p_1)``; the body part differs from the plain ``grad L_q``.

    ``P`` keeps the head; the body's share ``-alpha H_{body, head} g_head`` is
    the cross second derivative, built here from the dense Hessian.
    """
    m, a = pb.model, pb.inner_lr
    assume(m.n_layers >= 2)
    head = np.zeros(m.n_params, dtype=bool)
    offsets = np.cumsum([0] + [int(np.prod(s)) for s in m.shapes])
    for i in m.head_indices:
        head[offsets[i]:offsets[i + 1]] = True
    expected, plain = 0.0, 0.0
    for t in pb.tasks:
        H = m.hessian(pb.params, t.x_support, t.y_support)
        g_s = flatten(m.grad(pb.params, t.x_support, t.y_support))
        p1 = unflatten(flatten(pb.params) - a * np.where(head, g_s, 0.0), m.shapes)
        g_q = flatten(m.grad(p1, t.x_query, t.y_query))
        expected = expected + g_q - a * H @ np.where(head, g_q, 0.0)
        plain = plain + g_q
    expected, plain = expected / len(pb.tasks), plain / len(pb.tasks)
    got = flatten(anil.meta_loss_and_grad(m, pb.params, pb.tasks, a, 1)[1])
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12 * np.max(np.abs(expected)))
    cross = np.max(np.abs(got[~head] - plain[~head]))
    assume(np.max(np.abs(expected[head])) > 1e-6)  # a vanishing head gradient has no cross term
    assert cross > 1e-8 * np.max(np.abs(expected)), "ANIL body gradient lacks the body/head cross term"


def test_anil_body_cross_term_nonzero_fixed_problem() -> None:
    rng = np.random.default_rng(5)
    model = MLP([2, 5, 1], "tanh", "mse")
    params = model.init(0)
    tasks = make_tasks(model, rng, 2, 5, 5)
    _, g_anil = anil.meta_loss_and_grad(model, params, tasks, 0.3, 3)
    _, g_fo = maml.meta_loss_and_grad(model, params, tasks, 0.0, 1, first_order=True)  # grad L_q(theta)
    # The body (W1, b1) is not adapted, yet its meta-gradient is not grad L_q's body part at p_K:
    # compare with the body gradient at the adapted head computed by the model itself.
    plain_body = 0.0
    for t in tasks:
        p = params
        for _ in range(3):
            g = model.grad(p, t.x_support, t.y_support)
            p = [p[0], p[1], p[2] - 0.3 * g[2], p[3] - 0.3 * g[3]]
        plain_body = plain_body + flatten(model.grad(p, t.x_query, t.y_query)[:2]) / len(tasks)
    diff = np.max(np.abs(flatten(g_anil[:2]) - plain_body))
    assert diff > 1e-3 * np.max(np.abs(plain_body)), f"cross term too small: {diff}"
    assert np.max(np.abs(flatten(g_fo))) > 0


# ---------------------------------------------------------------------------
# Quadratic model: generic loop, closed forms, Newton-MAML's one-step landing
# ---------------------------------------------------------------------------


def quadratic_problem(rng: np.random.Generator, dim: int, n_tasks: int, spd: bool = True) -> list[Task]:
    tasks = []
    for _ in range(n_tasks):
        mats = []
        for _ in range(2):
            q = rng.normal(size=(dim, dim))
            mats.append(q @ q.T + 0.5 * np.eye(dim) if spd else (q + q.T) / 2)
        tasks.append(Task(mats[0], rng.normal(size=dim), mats[1], rng.normal(size=dim)))
    return tasks


@given(seed=st.integers(0, 2**32 - 1), dim=st.integers(1, 4), steps=st.integers(1, 4), n_tasks=st.integers(1, 3))
def test_quadratic_maml_closed_form(seed: int, dim: int, steps: int, n_tasks: int) -> None:
    """On ``1/2 (p-c)^T A (p-c)``: ``p_K = c + M^K (theta - c)``, ``M = I - alpha A_s``.

    Meta-gradient ``(M^K)^T A_q (p_K - c_q)`` per task (``A_s`` may be indefinite).
    """
    rng = np.random.default_rng(seed)
    model = Quadratic(dim)
    tasks = quadratic_problem(rng, dim, n_tasks, spd=False)
    theta = rng.normal(size=dim)
    alpha = 0.1
    expected = 0.0
    for t in tasks:
        Mk = np.linalg.matrix_power(np.eye(dim) - alpha * t.x_support, steps)
        pk = t.y_support + Mk @ (theta - t.y_support)
        expected = expected + Mk.T @ t.x_query @ (pk - t.y_query) / n_tasks
    _, grad = maml.meta_loss_and_grad(model, [theta], tasks, alpha, steps)
    np.testing.assert_allclose(grad[0], expected, rtol=1e-10, atol=1e-12 * np.max(np.abs(expected)))
    # ANIL on a one-tensor model adapts the whole vector: same as MAML.
    np.testing.assert_allclose(anil.meta_loss_and_grad(model, [theta], tasks, alpha, steps)[1][0], grad[0],
                               rtol=1e-12, atol=1e-14)


@given(seed=st.integers(0, 2**32 - 1), dim=st.integers(1, 4), steps=st.integers(1, 4))
def test_quadratic_metasgd_against_complex_step(seed: int, dim: int, steps: int) -> None:
    rng = np.random.default_rng(seed)
    model = Quadratic(dim)
    tasks = quadratic_problem(rng, dim, 2, spd=False)
    theta, lrs = [rng.normal(size=dim)], [rng.uniform(0.02, 0.2, size=dim)]
    _, g_p, g_a = metasgd.meta_loss_and_grad(model, theta, lrs, tasks, steps)
    e = [rng.normal(size=dim)]
    for grad, f, x in ((g_p, lambda p: metasgd.meta_loss(model, p, lrs, tasks, steps), theta),
                       (g_a, lambda a: metasgd.meta_loss(model, theta, a, tasks, steps), lrs)):
        expected = complex_step(f, x, e)
        assert_directional("metasgd on Quadratic", tree_vdot(grad, e), expected,
                           norm(grad) * norm(e) + abs(expected), CS_RTOL)


@given(seed=st.integers(0, 2**32 - 1), dim=st.integers(1, 5), steps=st.integers(1, 3))
def test_newton_lands_on_the_minimiser_in_one_step(seed: int, dim: int, steps: int) -> None:
    """alpha = 1, delta = 0 on a quadratic: ``p_1 = theta - A^{-1} A (theta - c) = c``; the loss no longer
    depends on theta, so the meta-loss is ``L_q(c_s)`` and the meta-gradient is 0."""
    rng = np.random.default_rng(seed)
    model = Quadratic(dim)
    tasks = quadratic_problem(rng, dim, 2)
    theta = [10 * rng.normal(size=dim)]
    for t in tasks:
        np.testing.assert_allclose(newton.adapt(model, theta, t, 1.0, steps)[0], t.y_support, rtol=1e-10, atol=1e-10)
    expected = np.mean([0.5 * (t.y_support - t.y_query) @ t.x_query @ (t.y_support - t.y_query) for t in tasks])
    loss, grad = newton.meta_loss_and_grad(model, theta, tasks, 1.0, steps)
    assert abs(loss - expected) <= 1e-9 * (1 + abs(expected))
    scale = np.max([np.linalg.norm(t.x_query) * np.linalg.norm(t.x_support) for t in tasks]) * (
        1 + np.max(np.abs(theta[0])))
    np.testing.assert_allclose(grad[0], 0.0, atol=1e-9 * scale)


@given(seed=st.integers(0, 2**32 - 1), dim=st.integers(1, 4), delta=st.floats(0.1, 3.0), alpha=st.floats(0.1, 1.0))
def test_newton_damped_quadratic_closed_form(seed: int, dim: int, delta: float, alpha: float) -> None:
    """One damped step: ``J = I - alpha (A_s + delta I)^{-1} A_s``, grad ``J^T A_q (p_1 - c_q)``."""
    rng = np.random.default_rng(seed)
    model = Quadratic(dim)
    tasks = quadratic_problem(rng, dim, 1)
    t = tasks[0]
    theta = rng.normal(size=dim)
    J = np.eye(dim) - alpha * np.linalg.solve(t.x_support + delta * np.eye(dim), t.x_support)
    p1 = theta - alpha * np.linalg.solve(t.x_support + delta * np.eye(dim), t.x_support @ (theta - t.y_support))
    expected = J.T @ t.x_query @ (p1 - t.y_query)
    _, grad = newton.meta_loss_and_grad(model, [theta], tasks, alpha, 1, damping=delta)
    np.testing.assert_allclose(grad[0], expected, rtol=1e-9, atol=1e-11 * np.max(np.abs(expected)))


# ---------------------------------------------------------------------------
# third_order
# ---------------------------------------------------------------------------


@given(pb=problems(max_steps=1))
def test_third_order_matches_complex_step_of_hvp(pb: Problem) -> None:
    """``<third_order(p, u, w), e> = d/dt u^T H(p + t e) w``, the latter by complex step of ``hvp``."""
    m, t = pb.model, pb.tasks[0]
    u, w, e = (random_like(pb.rng, m.shapes) for _ in range(3))
    third = m.third_order(pb.params, t.x_support, t.y_support, u, w)
    expected = complex_step(lambda p: tree_vdot(u, m.hvp(p, t.x_support, t.y_support, w)), pb.params, e)
    assert_directional("third_order", tree_vdot(third, e), expected, norm(third) * norm(e) + abs(expected), CS_RTOL)
    swapped = m.third_order(pb.params, t.x_support, t.y_support, w, u)  # symmetric in u, w
    for a, b in zip(third, swapped):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12 * (1 + norm(third)))


def test_third_order_relu_against_richardson_of_hvp() -> None:
    rng = np.random.default_rng(11)
    m = MLP([2, 5, 3], "relu", "ce")
    params = [rng.normal(size=s) for s in m.shapes]
    t = make_tasks(m, rng, 1, 6, 1)[0]
    u, w, e = (random_like(rng, m.shapes) for _ in range(3))
    third = m.third_order(params, t.x_support, t.y_support, u, w)
    expected, spread = richardson(lambda p: tree_vdot(u, m.hvp(p, t.x_support, t.y_support, w)), params, e, 1e-5)
    assert spread < 1e-8  # no kink crossed
    assert_directional("third_order (relu)", tree_vdot(third, e), expected, norm(third) * norm(e), RICHARDSON_RTOL)


def test_third_order_quadratic_is_zero() -> None:
    model = Quadratic(3)
    rng = np.random.default_rng(0)
    A = rng.normal(size=(3, 3))
    out = model.third_order([rng.normal(size=3)], A + A.T, rng.normal(size=3), [np.ones(3)], [np.ones(3)])
    assert out[0].shape == (3,) and np.all(out[0] == 0.0)


# ---------------------------------------------------------------------------
# Complex-step safety of the gradient functions themselves
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["maml", "maml[generic loop]", "anil", "metasgd[params]"])
def test_meta_hessian_by_complex_step_of_gradient_is_symmetric(algorithm: str) -> None:
    """Complex step through the meta-gradient gives meta-Hessian-vector products ``M e``; ``<e2, M e1> = <e1, M e2>``.

    Also checked against central differences of the gradient. Passes only if
    the gradient code is analytic (no conjugation, no ``abs``) end to end.
    """
    rng = np.random.default_rng(2)
    model = MLP([2, 4, 3, 2], "softplus", "ce", bias=True)
    params = [0.8 * rng.normal(size=s) for s in model.shapes]
    pb = Problem(model, params, make_tasks(model, rng, 2, 4, 3), 0.2, 3, rng)
    _, grad_fn = GRADIENTS[algorithm](pb)
    e1, e2 = random_like(rng, model.shapes), random_like(rng, model.shapes)
    h = 1e-30
    m1 = [np.imag(g) / h for g in grad_fn(_along(params, e1, 1j * h))[1]]
    m2 = [np.imag(g) / h for g in grad_fn(_along(params, e2, 1j * h))[1]]
    a, b = tree_vdot(e2, m1), tree_vdot(e1, m2)
    assert abs(a - b) <= 1e-9 * (norm(m1) * norm(e2) + norm(m2) * norm(e1))
    t = 1e-5
    fd = [(x - y) / (2 * t) for x, y in zip(grad_fn(_along(params, e1, t))[1], grad_fn(_along(params, e1, -t))[1])]
    np.testing.assert_allclose(flatten(m1), flatten(fd), rtol=0, atol=1e-6 * norm(m1))


def test_every_meta_loss_returns_complex_under_complex_step() -> None:
    rng = np.random.default_rng(4)
    model = MLP([2, 3, 1], "tanh", "mse")
    params = model.init(0)
    tasks = make_tasks(model, rng, 2, 3, 3)
    cp = _along(params, random_like(rng, model.shapes), 1e-20j)
    lrs = [np.full(s, 0.1) for s in model.shapes]
    outs = {
        "maml": maml.meta_loss(model, cp, tasks, 0.1, 2),
        "anil": anil.meta_loss(model, cp, tasks, 0.1, 2),
        "metasgd": metasgd.meta_loss(model, cp, lrs, tasks, 2),
        "reptile": reptile.meta_loss(model, cp, tasks, 0.1, 2),
        "newton": newton.meta_loss(model, cp, tasks, 0.1, 2, damping=1.0),
    }
    for name, value in outs.items():
        assert isinstance(value, complex) and value.imag != 0.0, name
    d = reptile.direction(model, cp, tasks, 0.1, 2)
    assert all(np.iscomplexobj(a) for a in d)


def test_relu_refuses_complex_parameters() -> None:
    model = MLP([1, 3, 1], "relu")
    tasks = make_tasks(model, np.random.default_rng(0), 1, 2, 2)
    cp = [p + 0j for p in model.init(0)]
    with pytest.raises(NotAnalyticError, match="not analytic"):
        maml.meta_loss(model, cp, tasks, 0.1, 1)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def _error_cases() -> list[tuple[str, Callable[[], Any], type, str]]:
    rng = np.random.default_rng(0)
    model = MLP([2, 3, 1], "tanh", "mse")
    p = model.init(0)
    tasks = make_tasks(model, rng, 2, 3, 3)
    lrs = [np.full(s, 0.1) for s in model.shapes]
    bad_task = [Task(rng.normal(size=(3, 5)), rng.normal(size=(3, 1)), rng.normal(size=(3, 2)),
                     rng.normal(size=(3, 1)))]
    cases: list[tuple[str, Callable[[], Any], type, str]] = []
    gb = [("maml", maml.meta_loss_and_grad), ("maml.meta_loss", maml.meta_loss), ("anil", anil.meta_loss_and_grad),
          ("anil.meta_loss", anil.meta_loss), ("reptile", reptile.direction), ("newton", newton.meta_loss_and_grad),
          ("newton.meta_loss", newton.meta_loss)]
    for name, fn in gb:
        cases += [
            (f"{name} K=0", lambda fn=fn: fn(model, p, tasks, 0.1, 0), InvalidInputError, "inner_steps=0"),
            (f"{name} K=1.5", lambda fn=fn: fn(model, p, tasks, 0.1, 1.5), InvalidInputError, "inner_steps=1.5"),
            (f"{name} lr=nan", lambda fn=fn: fn(model, p, tasks, float("nan"), 1), InvalidInputError, "inner_lr=nan"),
            (f"{name} lr=inf", lambda fn=fn: fn(model, p, tasks, np.inf, 1), InvalidInputError, "inner_lr=inf"),
            (f"{name} no tasks", lambda fn=fn: fn(model, p, [], 0.1, 1), InvalidInputError, "tasks is empty"),
            (f"{name} bad task", lambda fn=fn: fn(model, p, bad_task, 0.1, 1), InvalidInputError,
             r"tasks\[0\].x_support"),
            (f"{name} bad params", lambda fn=fn: fn(model, p[:-1], tasks, 0.1, 1), InvalidInputError, "params"),
        ]
    for name, fn in (("metasgd", metasgd.meta_loss_and_grad), ("metasgd.meta_loss", metasgd.meta_loss)):
        cases += [
            (f"{name} lrs short", lambda fn=fn: fn(model, p, lrs[:-1], tasks, 1), InvalidInputError, "lrs has 3"),
            (f"{name} lrs shape", lambda fn=fn: fn(model, p, [lrs[0].T, *lrs[1:]], tasks, 1), InvalidInputError,
             r"lrs\[0\] has shape"),
            (f"{name} lrs nan", lambda fn=fn: fn(model, p, [lrs[0] * np.nan, *lrs[1:]], tasks, 1),
             InvalidInputError, r"lrs\[0\] contains non-finite"),
            (f"{name} K=0", lambda fn=fn: fn(model, p, lrs, tasks, 0), InvalidInputError, "inner_steps=0"),
            (f"{name} no tasks", lambda fn=fn: fn(model, p, lrs, [], 1), InvalidInputError, "tasks is empty"),
        ]
    cases += [
        ("newton damping<0", lambda: newton.meta_loss_and_grad(model, p, tasks, 0.1, 1, damping=-1.0),
         InvalidInputError, "damping=-1.0"),
        ("newton too big", lambda: newton.meta_loss_and_grad(MLP([1, 80, 50, 1]), MLP([1, 80, 50, 1]).init(0),
                                                             make_tasks(MLP([1, 80, 50, 1]), rng, 1, 2, 2), 0.1, 1),
         InvalidInputError, "MAX_PARAMS"),
        ("newton singular", lambda: newton.meta_loss_and_grad(
            Quadratic(2), [np.zeros(2)], [Task(np.diag([1.0, 0.0]), np.ones(2), np.eye(2), np.zeros(2))], 1.0, 1),
         SingularMatrixError, "condition number inf"),
        ("newton ill-conditioned", lambda: newton.meta_loss(
            Quadratic(2), [np.zeros(2)], [Task(np.diag([1.0, 1e-14]), np.ones(2), np.eye(2), np.zeros(2))], 1.0, 1),
         SingularMatrixError, "condition number 1.000e\\+14"),
    ]
    return cases


ERROR_CASES = _error_cases()


@pytest.mark.parametrize("name,call,exc,message", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_input_is_a_clear_error(name: str, call: Callable[[], Any], exc: type, message: str) -> None:
    with pytest.raises(exc, match=message):
        call()


def test_newton_singular_with_damping_is_fine() -> None:
    """The same singular Hessian with damping > 0 is solvable, and the closed form holds."""
    A = np.diag([1.0, 0.0])
    task = Task(A, np.ones(2), np.eye(2), np.zeros(2))
    p1 = newton.adapt(Quadratic(2), [np.zeros(2)], task, 1.0, 1, damping=1.0)[0]
    np.testing.assert_allclose(p1, [0.5, 0.0], rtol=1e-15)
