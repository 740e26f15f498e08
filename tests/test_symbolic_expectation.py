"""Expectation over the task distribution: exact integrals, quadrature, and a z-test of the reference's Monte Carlo.

The exact expected meta-loss / meta-gradient (SymPy integrals over the task
centre ``c ~ N(mu, sigma^2)``) are checked against numerical quadrature of the
per-task expressions (scipy.integrate.quad in 1-D, tensor Gauss-Hermite in
2-D) and against a closed form written by hand. Then the NumPy reference's
Monte-Carlo meta-gradient over sampled tasks (``reference.maml`` on a
meta-batch) is tested for unbiasedness with a z-test at a stated false-alarm
level, and the same test is shown to reject a biased estimator (FOMAML).
"""

from __future__ import annotations


import numpy as np
import pytest
import sympy as sp
from scipy import integrate, stats

from reference.models import MLP, Quadratic
from reference.symbolic import derive, expected_quadratic_maml
from reference.tasks import Task

# Not cached across tests (SymPy's own cache makes a rebuild cheap): the mutation runner selects tests
# by per-test coverage, and a derivation built once would be attributed to the first test only.
_derive = derive

#: Family-wise false-alarm probability of each z-test (two-sided, Bonferroni over
#: the gradient's components). A correct reference fails it with probability
#: 1e-3 for a random seed; the seed is fixed, so the outcome is deterministic.
FALSE_ALARM = 1e-3
N_TASKS = 2000


def _lambdify_task(d, point: dict):
    """Per-task meta-loss and gradient as float functions of the centre, at ``point``."""
    centre = d.extras["task_symbols"]
    subs = d.bind(point)
    loss = sp.lambdify(centre, d.extras["task_meta_loss"].xreplace(subs), "numpy")
    grad = sp.lambdify(centre, list(d.extras["task_meta_gradient"].xreplace(subs)), "numpy")
    return loss, grad


def _exact(d, point, key=None):
    if key is None:
        loss, grad = d.evaluate(point)
        return float(loss), np.array([float(g) for g in grad])
    return np.array(d.evaluate_extra(key, point), dtype=float)


QUAD_1D = dict(theta=0.75, alpha=0.125, a_s=1.5, a_q=0.5, mu=-0.25, sigma=0.625)


def test_expected_quadratic_matches_the_hand_formula():
    # E[L] = a_q/2 (1 - alpha a_s)^{2K} ((theta - mu)^2 + sigma^2), grad = a_q (1 - alpha a_s)^{2K} (theta - mu).
    for K in (1, 3):
        d = _derive("expected-quadratic-maml", dim=1, steps=K)
        th, al, a_s, a_q, mu, sg = (d.symbols[n] for n in ["theta", "alpha", "a_s", "a_q", "mu", "sigma"])
        m2 = (1 - al * a_s) ** (2 * K)
        assert sp.expand(d.meta_loss - a_q / 2 * m2 * ((th - mu) ** 2 + sg**2)) == 0
        assert sp.expand(d.meta_gradient[0] - a_q * m2 * (th - mu)) == 0


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_expected_quadratic_1d_against_quadrature(steps):
    d = _derive("expected-quadratic-maml", dim=1, steps=steps)
    loss_c, grad_c = _lambdify_task(d, QUAD_1D)
    pdf = stats.norm(QUAD_1D["mu"], QUAD_1D["sigma"]).pdf
    q_loss = integrate.quad(lambda c: loss_c(c) * pdf(c), -np.inf, np.inf, epsabs=0, epsrel=1e-12)[0]
    q_grad = integrate.quad(lambda c: grad_c(c)[0] * pdf(c), -np.inf, np.inf, epsabs=0, epsrel=1e-12)[0]
    loss, grad = _exact(d, QUAD_1D)
    assert q_loss == pytest.approx(loss, rel=1e-10)
    assert q_grad == pytest.approx(grad[0], rel=1e-10)


def _gauss_hermite_2d(f, mu, sigma, n=6):
    """E[f(c)] for c ~ N(mu, sigma^2 I_2) by tensor Gauss-Hermite (exact for polynomials of degree <= 2n-1)."""
    x, w = np.polynomial.hermite_e.hermegauss(n)
    w = w / np.sqrt(2 * np.pi)
    total = 0.0
    for xi, wi in zip(x, w):
        for xj, wj in zip(x, w):
            total = total + wi * wj * np.asarray(f(mu[0] + sigma * xi, mu[1] + sigma * xj), dtype=float)
    return total


def test_expected_quadratic_2d_against_gauss_hermite():
    d = _derive("expected-quadratic-maml", dim=2, steps=2)
    point = dict(theta=[0.5, -0.75], alpha=0.25, A_s=[[1.25, 0.25], [0.25, 0.75]], A_q=[[0.5, -0.125], [-0.125, 1.0]],
                 mu=[0.375, 0.125], sigma=0.5)
    loss_c, grad_c = _lambdify_task(d, point)
    loss, grad = _exact(d, point)
    assert _gauss_hermite_2d(loss_c, point["mu"], point["sigma"]) == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(_gauss_hermite_2d(grad_c, point["mu"], point["sigma"]), grad, rtol=1e-12)
    cov = _exact(d, point, "task_gradient_covariance")
    second = _gauss_hermite_2d(lambda a, b: np.outer(grad_c(a, b), grad_c(a, b)), point["mu"], point["sigma"])
    np.testing.assert_allclose(second - np.outer(grad, grad), cov, rtol=1e-10, atol=1e-14)


LINREG = dict(w=0.5, b=-0.25, alpha=0.125, x_s=[0.75, -1.25], x_q=[1.5, 0.25], mu=0.625, sigma=0.75)


def test_expected_linear_regression_against_quadrature():
    d = _derive("expected-linear-regression-maml", steps=2, shots=2, queries=2)
    loss_c, grad_c = _lambdify_task(d, LINREG)
    pdf = stats.norm(LINREG["mu"], LINREG["sigma"]).pdf
    loss, grad = _exact(d, LINREG)
    q = [integrate.quad(lambda c, i=i: grad_c(c)[i] * pdf(c), -np.inf, np.inf, epsabs=0, epsrel=1e-12)[0]
         for i in range(2)]
    assert integrate.quad(lambda c: loss_c(c) * pdf(c), -np.inf, np.inf, epsabs=0, epsrel=1e-12)[0] == \
        pytest.approx(loss, rel=1e-10)
    np.testing.assert_allclose(q, grad, rtol=1e-10)


@pytest.mark.parametrize("name, sizes", [("expected-quadratic-maml", dict(dim=2, steps=1)),
                                         ("expected-linear-regression-maml", dict(steps=2))])
def test_differentiation_under_the_integral_sign(name, sizes):
    d = _derive(name, **sizes)
    assert all(sp.expand(e) == 0 for e in d.meta_gradient - d.extras["expected_task_gradient"])


def test_gaussian_moments_are_the_double_factorials():
    from reference.symbolic import gaussian_expectation

    z = sp.Symbol("z", real=True)
    mu, sigma = sp.Symbol("mu", real=True), sp.Symbol("sigma", positive=True)
    # E[c^4] for c ~ N(mu, sigma^2) = mu^4 + 6 mu^2 sigma^2 + 3 sigma^4.
    assert sp.expand(gaussian_expectation(z**4, [z], [mu], sigma) - (mu**4 + 6 * mu**2 * sigma**2 + 3 * sigma**4)) == 0


# ---------------------------------------------------------------------------
# Statistical test of the reference's Monte-Carlo meta-gradient
# ---------------------------------------------------------------------------


def z_statistics(samples: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Componentwise z of the sample mean against ``mean`` with per-sample variance ``var``."""
    return (samples.mean(axis=0) - mean) / np.sqrt(var / samples.shape[0])


def z_threshold(components: int) -> float:
    return float(stats.norm.ppf(1 - FALSE_ALARM / (2 * components)))


def _quadratic_mc(first_order: bool):
    maml = pytest.importorskip("reference.maml")
    d = _derive("expected-quadratic-maml", dim=2, steps=2)
    point = dict(theta=[0.5, -0.75], alpha=0.25, A_s=[[1.25, 0.25], [0.25, 0.75]],
                 A_q=[[0.5, -0.125], [-0.125, 1.0]], mu=[0.375, 0.125], sigma=0.5)
    rng = np.random.default_rng(20240611)
    centres = rng.normal(point["mu"], point["sigma"], size=(N_TASKS, 2))
    A_s, A_q = np.array(point["A_s"]), np.array(point["A_q"])
    model, theta = Quadratic(2), [np.array(point["theta"])]
    tasks = [Task(A_s, c, A_q, c) for c in centres]
    per_task = np.array([maml.meta_loss_and_grad(model, theta, [t], point["alpha"], 2, first_order=first_order)[1][0]
                         for t in tasks])
    _, batch = maml.meta_loss_and_grad(model, theta, tasks, point["alpha"], 2, first_order=first_order)
    return d, point, per_task, batch[0]


def test_reference_monte_carlo_meta_gradient_is_unbiased_quadratic():
    """z-test: mean of the reference's per-task MAML gradients over sampled centres vs the exact expectation.

    The per-task gradient is affine in the Gaussian centre, so the sample mean
    is exactly Gaussian with the exact covariance / N: the false-alarm level
    ``FALSE_ALARM`` is exact (Bonferroni over the two components).
    """
    d, point, per_task, batch = _quadratic_mc(first_order=False)
    np.testing.assert_allclose(batch, per_task.mean(axis=0), rtol=1e-12, atol=1e-15)  # meta-batch = mean of tasks
    exact = _exact(d, point)[1]
    var = np.diag(_exact(d, point, "task_gradient_covariance"))
    z = z_statistics(per_task, exact, var)
    assert np.all(np.abs(z) < z_threshold(2)), f"z={z} threshold={z_threshold(2):.2f} (false alarm {FALSE_ALARM})"
    # The sample variance agrees with the exact one (2000 samples: ~3% relative spread).
    np.testing.assert_allclose(per_task.var(axis=0, ddof=1), var, rtol=0.1)


def test_the_z_test_rejects_a_biased_estimator():
    """Power: FOMAML's mean direction is not the expected MAML meta-gradient, and the same test says so."""
    d, point, per_task, _ = _quadratic_mc(first_order=True)
    exact = _exact(d, point)[1]
    z = (per_task.mean(axis=0) - exact) / (per_task.std(axis=0, ddof=1) / np.sqrt(len(per_task)))
    assert np.max(np.abs(z)) > z_threshold(2), f"z={z}: the test failed to detect FOMAML's bias"


def test_reference_monte_carlo_meta_gradient_is_unbiased_linear_regression():
    maml = pytest.importorskip("reference.maml")
    d = _derive("expected-linear-regression-maml", steps=2, shots=2, queries=2)
    rng = np.random.default_rng(7)
    slopes = rng.normal(LINREG["mu"], LINREG["sigma"], size=N_TASKS)
    xs, xq = np.array(LINREG["x_s"]).reshape(-1, 1), np.array(LINREG["x_q"]).reshape(-1, 1)
    model = MLP([1, 1], activation="identity", loss="mse")
    params = [np.array([[LINREG["w"]]]), np.array([LINREG["b"]])]
    tasks = [Task(xs, c * xs, xq, c * xq) for c in slopes]
    per_task = np.array([np.concatenate([g.ravel() for g in maml.meta_loss_and_grad(model, params, [t],
                                                                                   LINREG["alpha"], 2)[1]])
                         for t in tasks])
    exact = _exact(d, LINREG)[1]
    var = np.diag(_exact(d, LINREG, "task_gradient_covariance"))
    z = z_statistics(per_task, exact, var)
    assert np.all(np.abs(z) < z_threshold(2)), f"z={z} threshold={z_threshold(2):.2f} (false alarm {FALSE_ALARM})"


def test_expected_problem_sizes_are_validated():
    from reference.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="steps=5 is too large"):
        expected_quadratic_maml(dim=1, steps=5)
