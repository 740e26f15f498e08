"""Expected meta-losses over Gaussian task distributions and MAML-RL on the bandit, fast (issue 19).

Each test builds its derivation once (0.05-0.5 s) and checks many properties, so the mutation runner's
per-mutant budget reaches them. Independent sources: the closed forms the docstrings state (quadratic tasks:
``E[L] = 1/2 (theta - mu)^T M A_q M (theta - mu) + sigma^2/2 tr(M A_q M)``, ``M = (I - alpha A_s)^K``),
the NumPy reference (``reference.maml`` on linear regression, ``reference.rl`` on the bandit) combined with
Gauss-Hermite quadrature over the task (exact for the polynomial integrands here), and the display contract of
``latex()`` / ``text()`` (hand-written formulas parsed back and compared with the computed expressions).
The slower statistical and quadrature tests are in ``test_symbolic_expectation.py`` and ``test_rl_symbolic.py``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import sympy as sp
from sympy.parsing.sympy_parser import implicit_multiplication, parse_expr, standard_transformations

from reference import maml
from reference.models import MLP
from reference.rl import exact_bias, meta_objective_and_gradient, two_armed_bandit
from reference.symbolic import (
    PROBLEMS,
    bandit_maml_rl,
    expected_linear_regression_maml,
    expected_quadratic_maml,
    gaussian_expectation,
)
from reference.tasks import Task


def _gauss_hermite(mu: float, sigma: float, n: int):
    """Nodes and weights of E[f(c)], c ~ N(mu, sigma^2): exact for polynomials of degree <= 2n - 1."""
    x, w = np.polynomial.hermite_e.hermegauss(n)
    return mu + sigma * x, w / np.sqrt(2 * np.pi)


def _f(expr) -> np.ndarray:
    return np.array(list(expr) if isinstance(expr, sp.MatrixBase) else [expr], dtype=float)


def test_default_sizes_are_the_smallest_problems():
    """``derive --list`` shows these defaults; two shots and two queries: a line has two parameters (w, b).

    The constructors' own defaults (what a Python caller gets) are checked where they are built without
    arguments: ``test_expected_quadratic_maml[1-1]``, ``..._linear_regression_...[1-2-2]`` and the bandit test.
    """
    assert PROBLEMS["expected-quadratic-maml"].sizes == {"dim": 1, "steps": 1}
    assert PROBLEMS["expected-linear-regression-maml"].sizes == {"steps": 1, "shots": 2, "queries": 2}
    assert PROBLEMS["bandit-maml-rl"].sizes == {"batch": 1}


# -- the Gaussian expectation ---------------------------------------------------------------------------------


def test_gaussian_expectation_is_exact_up_to_degree_8_and_refuses_degree_9():
    """E[p(c)], c ~ N(3/8, (5/8)^2), for a degree-8 polynomial against Gauss-Hermite with 6 nodes (exact to 11)."""
    c = sp.Symbol("c", real=True)
    mu, sigma = sp.Rational(3, 8), sp.Rational(5, 8)
    poly = (c - sp.Rational(1, 3)) ** 8 - 2 * c**5 + c**3 / 7 + 5
    exact = gaussian_expectation(poly, [c], [mu], sigma)
    assert exact.is_Rational
    nodes, weights = _gauss_hermite(3 / 8, 5 / 8, 6)
    f = sp.lambdify(c, poly, "numpy")
    assert float(exact) == pytest.approx(float(weights @ f(nodes)), rel=1e-13)
    # the documented limit: a polynomial of degree 9 is refused, never truncated
    with pytest.raises(AssertionError, match="not a polynomial of degree <= 8"):
        gaussian_expectation(c**9 + c, [c], [mu], sigma)


# -- quadratic tasks ------------------------------------------------------------------------------------------

QUAD = {1: dict(theta=0.75, alpha=0.125, a_s=1.5, a_q=0.5, mu=-0.25, sigma=0.625),
        2: dict(theta=[0.5, -0.75], alpha=0.25, A_s=[[1.25, 0.25], [0.25, 0.75]], A_q=[[0.5, -0.125], [-0.125, 1.0]],
                mu=[0.375, 0.125], sigma=0.5)}


def _hand_quadratic(point: dict, dim: int, steps: int):
    """The docstring's closed forms in NumPy: E[L], its gradient, the per-task gradient's covariance."""
    th, mu = np.atleast_1d(point["theta"]), np.atleast_1d(point["mu"])
    A_s = np.atleast_2d(point["A_s" if dim > 1 else "a_s"])
    A_q = np.atleast_2d(point["A_q" if dim > 1 else "a_q"])
    M = np.linalg.matrix_power(np.eye(dim) - point["alpha"] * A_s, steps)
    B = M @ A_q @ M
    d, s2 = th - mu, point["sigma"] ** 2
    return 0.5 * d @ B @ d + 0.5 * s2 * np.trace(B), B @ d, s2 * B @ B, B, M


@pytest.mark.parametrize("dim, steps", [(1, 1), (1, 2), (1, 3), (2, 1)])
def test_expected_quadratic_maml(dim, steps):
    d = expected_quadratic_maml() if (dim, steps) == (1, 1) else expected_quadratic_maml(dim=dim, steps=steps)
    assert d.params == {"dim": dim, "steps": steps}  # (1, 1): the defaults
    point = QUAD[dim]
    # -- values against the hand closed form
    loss, grad = d.evaluate(point)
    h_loss, h_grad, h_cov, B, M = _hand_quadratic(point, dim, steps)
    assert float(loss) == pytest.approx(h_loss, rel=1e-13)
    np.testing.assert_allclose(_f(grad), h_grad, rtol=1e-13)
    np.testing.assert_allclose(_f(d.evaluate_extra("expected_task_gradient", point)), h_grad, rtol=1e-13)
    np.testing.assert_allclose(np.array(d.evaluate_extra("task_gradient_covariance", point), dtype=float), h_cov,
                               rtol=1e-13, atol=1e-16)
    # per-task quantities at one task centre c: L_c = 1/2 (M (theta - c))^T A_q M (theta - c)
    centre = d.extras["task_symbols"]
    c_val = [sp.Rational(-5, 4), sp.Rational(3, 8)][:dim]
    at_c = dict(zip(centre, c_val))
    r = M @ (np.atleast_1d(point["theta"]) - np.array(c_val, dtype=float))
    A_q = np.atleast_2d(point["A_q" if dim > 1 else "a_q"])
    task_loss = d.evaluate_extra("task_meta_loss", point).xreplace(at_c)
    assert float(task_loss) == pytest.approx(0.5 * r @ A_q @ r, rel=1e-13)
    task_grad = d.evaluate_extra("task_meta_gradient", point).xreplace(at_c)
    np.testing.assert_allclose(_f(task_grad), B @ (np.atleast_1d(point["theta"]) - np.array(c_val, float)), rtol=1e-13)

    # -- symbols: the documented names, symmetric matrices, a positive sigma, a real centre
    names = ["c"] if dim == 1 else ["c_0", "c_1"]
    assert [s.name for s in centre] == names
    if dim == 2:
        assert set(d.symbols) == {"theta_0", "theta_1", "alpha", "a_s_0_0", "a_s_0_1", "a_s_1_1", "a_q_0_0", "a_q_0_1",
                                  "a_q_1_1", "mu_0", "mu_1", "sigma"}
        assert d.arrays["A_s"] == d.arrays["A_s"].T and d.arrays["A_q"] == d.arrays["A_q"].T
    else:
        assert set(d.symbols) == {"theta", "alpha", "a_s", "a_q", "mu", "sigma"}
    _check_assumptions(d)

    # -- display: hand-written formulas say what was computed
    lines = d.latex().splitlines()
    text = d.text().splitlines()
    a_s, a_q = ("a_{s}", "a_{q}") if dim == 1 else ("A_{s}", "A_{q}")
    losses = next(line for line in lines if line.startswith(r"L_{s}(p),\ L_{q}(p) &= "))
    assert losses.count(a_s) == 1 and losses.count(a_q) == 1
    k_line = next(line for line in lines if r"\text{MAML, K = " in line)
    power = re.search(rf"p_\{{{steps}\}} - c = \(I - \\alpha {re.escape(a_s)}\)(?:\^\{{(\d+)\}})? "
                      r"\(\\theta - c\)", k_line)
    assert power is not None, k_line
    assert power.group(1) == (None if steps == 1 else str(steps))
    latex = d.latex()
    if dim == 1:  # scalars get the short LaTeX names, matrices' entries the superscripted ones
        assert r"a^{(s)}" not in latex and r"a^{(q)}" not in latex and "a_{s}" in latex
    else:
        assert r"a^{(s)}_{01}" in latex and r"a^{(q)}_{11}" in latex
    text_maml = next(line for line in text if line.startswith("  L_c(theta) = "))
    rhs = text_maml.split(f"p_{steps} - c = ")[1]
    if dim == 1:  # parse the text formula back: p_K - c = (1 - alpha a_s)^K (theta - c), L_c = a_q (p_K - c)^2 / 2
        parsed = parse_expr(rhs.replace("I", "1").replace("A_s", "a_s"), local_dict={**d.symbols, "c": centre[0]},
                            transformations=standard_transformations + (implicit_multiplication,))
        assert sp.expand(d.symbols["a_q"] * parsed**2 / 2 - d.extras["task_meta_loss"]) == 0
    else:
        assert rhs == "(I - alpha A_s)" + ("" if steps == 1 else f"**{steps}") + " (theta - c)"
    _check_display_form(d, factored=(dim == 1 and steps <= 2))


def _check_assumptions(d):
    """sigma is a standard deviation and the task centre a real random variable; SymPy relies on both."""
    sigma = d.symbols["sigma"]
    assert sigma.is_positive and sp.sqrt(sigma**2) == sigma
    assert all(c.is_real for c in d.extras["task_symbols"])
    task_loss = d.extras["task_meta_loss"]
    assert sp.conjugate(task_loss) == task_loss  # a real expression: every symbol, the centre included, is real


def _check_display_form(d, factored: bool):
    """The last four steps show E[L], grad, E[grad L_c], Cov: factored for small problems, else as computed."""
    attrs = [d.meta_loss, d.meta_gradient, d.extras["expected_task_gradient"], d.extras["task_gradient_covariance"]]
    for step, attr in zip(d.steps[-4:], attrs):
        shown = step.rhs
        if factored:  # e.g. a_q (a_s alpha - 1)^2 ((theta - mu)^2 + sigma^2) / 2
            entries = list(shown) if isinstance(shown, sp.MatrixBase) else [shown]
            assert all(e.is_Mul and sp.factor(e) == e for e in entries), step.label
            assert sp.expand(sp.Matrix([shown]) - sp.Matrix([attr])) == sp.zeros(*sp.Matrix([attr]).shape)
        else:  # larger problems: left as computed (factoring would cost more than it shows)
            assert shown == attr, step.label


# -- linear-regression tasks ----------------------------------------------------------------------------------

LINREG = dict(w=0.5, b=-0.25, alpha=0.125, x_s=[0.75, -1.25, 0.5], x_q=[1.5, 0.25, -0.625], mu=0.625, sigma=0.75)


def _reference_linreg(point: dict, steps: int):
    """E[L], E[g] and Cov[g] over the slope from the NumPy reference's per-task MAML (3-node Gauss-Hermite: the
    per-task loss and g g^T are quadratic in the slope, so the rule is exact)."""

    xs, xq = np.array(point["x_s"]).reshape(-1, 1), np.array(point["x_q"]).reshape(-1, 1)
    model = MLP([1, 1], activation="identity", loss="mse")
    params = [np.array([[point["w"]]]), np.array([point["b"]])]
    nodes, weights = _gauss_hermite(point["mu"], point["sigma"], 3)
    losses, grads = [], []
    for c in nodes:
        loss, g = maml.meta_loss_and_grad(model, params, [Task(xs, c * xs, xq, c * xq)], point["alpha"], steps)
        losses.append(float(loss))
        grads.append(np.concatenate([gi.ravel() for gi in g]))
    grads = np.array(grads)
    mean = weights @ grads
    return weights @ np.array(losses), mean, (grads.T * weights) @ grads - np.outer(mean, mean)


@pytest.mark.parametrize("steps, shots, queries", [(1, 2, 2), (2, 3, 1)])
def test_expected_linear_regression_maml_against_the_numpy_reference(steps, shots, queries):
    sizes = dict(steps=steps, shots=shots, queries=queries)
    d = expected_linear_regression_maml() if sizes == dict(steps=1, shots=2, queries=2) else \
        expected_linear_regression_maml(**sizes)
    assert d.params == sizes  # (1, 2, 2): the defaults
    point = dict(LINREG, x_s=LINREG["x_s"][:shots], x_q=LINREG["x_q"][:queries])
    ref_loss, ref_grad, ref_cov = _reference_linreg(point, steps)
    loss, grad = d.evaluate(point)
    assert float(loss) == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_allclose(_f(grad), ref_grad, rtol=1e-12)
    np.testing.assert_allclose(_f(d.evaluate_extra("expected_task_gradient", point)), ref_grad, rtol=1e-12)
    np.testing.assert_allclose(np.array(d.evaluate_extra("task_gradient_covariance", point), dtype=float), ref_cov,
                               rtol=1e-11, atol=1e-14)
    assert d.wrt == [("W", (1, 1)), ("b", (1,))] and [s.name for s in d.extras["task_symbols"]] == ["c"]
    _check_assumptions(d)
    _check_display_form(d, factored=False)


# -- MAML-RL on the bandit ------------------------------------------------------------------------------------


def test_bandit_maml_rl_against_the_numpy_reference():
    """J, grad J, the original estimator's bias (by SymPy) and its closed form against reference.rl at n = 2."""
    d = bandit_maml_rl(2)
    assert d.params == {"batch": 2}
    assert list(d.symbols) == ["theta_0", "theta_1", "r_0", "r_1", "alpha"]  # the docstring's symbols
    assert bandit_maml_rl().params == {"batch": 1}  # the default: one inner pull
    point = dict(theta=[0.25, -0.5], r=[1.5, 0.375], alpha=0.75)  # no reward of +-1: r and 1/r differ
    subs = {s: sp.Float(v, 30) for s, v in d.bind(point).items()}
    mdp = two_armed_bandit(point["r"])
    J, g = meta_objective_and_gradient(mdp, np.array(point["theta"]), point["alpha"], 2)
    _, _, bias = exact_bias(mdp, np.array(point["theta"]), point["alpha"], 2, "maml-original")
    assert float(d.meta_loss.xreplace(subs)) == pytest.approx(J, rel=1e-13)
    np.testing.assert_allclose(_f(d.meta_gradient.xreplace(subs)), g, rtol=1e-12)
    np.testing.assert_allclose(_f(d.extras["bias_original"].xreplace(subs)), bias, rtol=1e-12)
    np.testing.assert_allclose(_f(d.extras["bias_formula"].xreplace(subs)), bias, rtol=1e-12)
    assert np.linalg.norm(bias) > 1e-3  # the bias is really there
    pi = _f(d.extras["policy"].xreplace(subs))
    np.testing.assert_allclose(pi, np.exp([0.25, -0.5]) / np.exp([0.25, -0.5]).sum(), rtol=1e-14)
