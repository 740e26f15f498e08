"""Expectation over the task distribution: exact expected meta-loss and meta-gradient.

Tasks are indexed by a Gaussian centre ``c ~ N(mu, sigma^2 I)``: quadratic
tasks ``L_s = 1/2 (p - c)^T A_s (p - c)``, ``L_q = 1/2 (p - c)^T A_q (p - c)``
(support and query of one task share its centre), or 1-D linear-regression
tasks ``y = c x`` (the task's slope is Gaussian). The expected MAML meta-loss
``E_c[L_q(p_K(theta; c); c)] = int L(theta; c) N(c; mu, sigma^2) dc`` is
computed as an integral: with ``c = mu + sigma z`` the integrand is a
polynomial in ``z`` and each power is integrated against the standard normal
density by SymPy. The meta-gradient is the gradient of the expectation;
``extras`` hold the per-task quantities, the expectation of the per-task
gradient (equal to the former: differentiation under the integral sign) and
its exact covariance (for a z-test of Monte-Carlo estimates).
"""

from __future__ import annotations

import functools

import sympy as sp

from reference.symbolic._common import check_size, quadratic_loss
from reference.symbolic._derivation import Derivation, Step, SymbolTable, gradient

_Z = sp.Symbol("z", real=True)
# Integrands here are polynomials of degree <= 4 in the task centre (losses are
# quadratic, covariance products of two affine gradients).
_MAX_DEGREE = 8


@functools.lru_cache(maxsize=None)
def gaussian_moment(n: int) -> sp.Expr:
    """``int_R z^n exp(-z^2/2) / sqrt(2 pi) dz`` by SymPy (``(n-1)!!`` for even ``n``, 0 for odd)."""
    return sp.integrate(_Z**n * sp.exp(-_Z**2 / 2) / sp.sqrt(2 * sp.pi), (_Z, -sp.oo, sp.oo))


def gaussian_expectation(expr: sp.Expr, centre: list[sp.Symbol], mu: list[sp.Expr], sigma: sp.Expr) -> sp.Expr:
    """``E[expr]`` for independent ``centre_i ~ N(mu_i, sigma^2)``, ``expr`` polynomial in the centre.

    ``expr`` may have degree up to 8 in each coordinate of the centre; a
    higher degree raises ``AssertionError`` (never a truncated expectation).

    Substitutes ``c_i = mu_i + sigma z_i`` and integrates one variable at a
    time against the standard normal density: the integrand's Taylor
    coefficients in ``z_i`` (SymPy derivatives at 0, exact for a polynomial)
    times the moments of :func:`gaussian_moment`. Avoids expanding the
    integrand in all the other symbols (which is what makes this slow).
    """
    zs = [sp.Symbol(f"z_{i}", real=True) for i in range(len(centre))]
    out = expr.xreplace({c: m + sigma * z for c, m, z in zip(centre, mu, zs)})
    for z in zs:
        total = sp.Integer(0)
        deriv = out
        # m runs to _MAX_DEGREE + 1 so that a degree-_MAX_DEGREE integrand reaches its zero derivative and
        # passes; a higher degree never does and is refused after the loop (its term at m = 9 is irrelevant)
        for m in range(_MAX_DEGREE + 2):
            if m > 0:
                deriv = sp.diff(deriv, z)
            if deriv == 0:
                break
            moment = gaussian_moment(m)
            if moment != 0:
                total += deriv.xreplace({z: 0}) * moment / sp.factorial(m)
        else:
            raise AssertionError(f"integrand is not a polynomial of degree <= {_MAX_DEGREE} in the task centre")
        out = total
    return out


def _finish(name, params, title, summary, t, wrt, wrt_symbols, task_loss, centre, mu, sigma, steps_intro,
            extras_extra, latex_integral, small_display, lhs):
    """Integrate the per-task meta-loss, differentiate, and assemble the Derivation (shared by both problems)."""
    expected_loss = gaussian_expectation(task_loss, centre, mu, sigma)
    grad = gradient(expected_loss, wrt_symbols)
    task_grad = gradient(task_loss, wrt_symbols)
    expected_task_grad = task_grad.applyfunc(lambda e: gaussian_expectation(e, centre, mu, sigma))
    n = len(wrt_symbols)
    cov = sp.Matrix(n, n, lambda i, j: gaussian_expectation(task_grad[i] * task_grad[j], centre, mu, sigma)
                    - expected_task_grad[i] * expected_task_grad[j])
    show = sp.factor if small_display else (lambda e: e)
    steps = steps_intro + [
        Step("expected meta-loss as an integral over the task centre", lhs, latex_integral),
        Step("substitute c = mu + sigma z, integrate each power of z against N(0, 1)", lhs,
             show(expected_loss)),
        Step("meta-gradient (gradient of the expectation)", (r"\nabla \mathcal{L}", "grad L"),
             grad.applyfunc(show)),
        Step("= expectation of the per-task meta-gradient (differentiation under the integral)",
             (r"\mathbb{E}_{c}\big[\nabla \mathcal{L}_{c}\big]", "E_c[grad L_c]"), expected_task_grad.applyfunc(show)),
        Step("covariance of the per-task meta-gradient (for Monte-Carlo error bars)",
             (r"\operatorname{Cov}_{c}\big[\nabla \mathcal{L}_{c}\big]", "Cov_c[grad L_c]"), cov.applyfunc(show)),
    ]
    extras = {
        "task_meta_loss": task_loss,
        "task_meta_gradient": task_grad,
        "task_symbols": centre,
        "expected_task_gradient": expected_task_grad,
        "task_gradient_covariance": cov,
    }
    extras.update(extras_extra)
    return Derivation(
        name=name, params=params, title=title, summary=summary, symbols=t.symbols, arrays=t.arrays, wrt=wrt,
        wrt_symbols=wrt_symbols, meta_loss=expected_loss, meta_gradient=grad, steps=steps, extras=extras,
        latex_names=t.latex_names,
    )


def expected_quadratic_maml(dim: int = 1, steps: int = 1) -> Derivation:
    """Expected MAML meta-loss and meta-gradient over quadratic tasks with Gaussian centres.

    Task ``c ~ N(mu, sigma^2 I)``; ``L_s = 1/2 (p - c)^T A_s (p - c)``,
    ``L_q = 1/2 (p - c)^T A_q (p - c)``; ``K = steps`` MAML steps. With
    ``M = (I - alpha A_s)^K``: ``E[L] = 1/2 (theta - mu)^T M A_q M (theta - mu)
    + sigma^2/2 tr(M A_q M)`` and ``grad E[L] = M A_q M (theta - mu)``.
    Symbols: ``theta``, ``alpha``, ``a_s``, ``a_q`` (or ``a_s_i_j``...), ``mu``
    (``mu_i``), ``sigma``; the centre ``c`` (``c_i``) is the integration
    variable, listed in ``extras["task_symbols"]``.
    """
    name = "expected-quadratic-maml"
    dim = check_size(name, "dim", dim)
    steps = check_size(name, "steps", steps)
    t = SymbolTable()
    theta = t.vector("theta", dim, r"\theta")
    alpha = t.scalar("alpha", r"\alpha")
    one = dim == 1
    A_s = t.matrix("a_s", dim, dim, "a_{s}" if one else "a^{(s)}", array="A_s", symmetric=True)
    A_q = t.matrix("a_q", dim, dim, "a_{q}" if one else "a^{(q)}", array="A_q", symmetric=True)
    mu = t.vector("mu", dim, r"\mu")
    sigma = t.scalar("sigma", r"\sigma", positive=True)
    centre = [sp.Symbol("c" if one else f"c_{i}", real=True) for i in range(dim)]
    c = sp.Matrix(centre)
    p = theta
    for _ in range(steps):
        p = p - alpha * A_s * (p - c)
    task_loss = quadratic_loss(p, A_q, c)
    a_s = "a_{s}" if one else "A_{s}"
    power = ("", "") if steps == 1 else (f"^{{{steps}}}", f"**{steps}")
    a_q = "a_{q}" if one else "A_{q}"
    intro = [
        Step("task distribution", ("c", "c"), (r"\mathcal{N}(\mu, \sigma^{2} I)", "N(mu, sigma^2 I)")),
        Step("per-task losses (support and query share the centre)", (r"L_{s}(p),\ L_{q}(p)", "L_s(p), L_q(p)"),
             (rf"\tfrac{{1}}{{2}} (p - c)^{{\top}} {a_s} (p - c),\ \tfrac{{1}}{{2}} (p - c)^{{\top}} {a_q} (p - c)",
              "1/2 (p - c)^T A_s (p - c), 1/2 (p - c)^T A_q (p - c)")),
        Step(f"MAML, K = {steps}", (r"\mathcal{L}_{c}(\theta)", "L_c(theta)"),
             (rf"L_{{q}}(p_{{{steps}}}),\quad p_{{{steps}}} - c = (I - \alpha {a_s}){power[0]} (\theta - c)",
              f"L_q(p_{steps}), p_{steps} - c = (I - alpha A_s){power[1]} (theta - c)")),
    ]
    integral = (r"\int_{\mathbb{R}^{%d}} \mathcal{L}_{c}(\theta)\, \mathcal{N}(c; \mu, \sigma^{2} I)\, dc" % dim,
                "int L_c(theta) N(c; mu, sigma^2 I) dc")
    return _finish(name, {"dim": dim, "steps": steps}, "Expected MAML meta-gradient over Gaussian quadratic tasks",
                   f"MAML (K = {steps}) on quadratic tasks in {dim} dimension(s) whose centre is Gaussian, "
                   "c ~ N(mu, sigma^2 I); the meta-loss is the expectation over tasks, computed as an integral.",
                   t, [("theta", (dim,))], list(theta), task_loss, centre, list(mu), sigma, intro, {}, integral,
                   dim == 1 and steps <= 2, (r"\mathcal{L}(\theta)", "L(theta)"))


def expected_linear_regression_maml(steps: int = 1, shots: int = 2, queries: int = 2) -> Derivation:
    """Expected MAML meta-loss and meta-gradient over 1-D linear-regression tasks ``y = c x``, ``c ~ N(mu, sigma^2)``.

    Model ``f(x) = w x + b`` (the MLP ``[1, 1]``, parameters ``[W, b]``), loss
    ``mse``, support inputs ``x_s_i`` and query inputs ``x_q_i`` symbolic and
    fixed, targets ``c x``; ``K = steps`` MAML steps. Symbols: ``w, b, alpha,
    x_s_*, x_q_*, mu, sigma``; the slope ``c`` is the integration variable.
    """
    name = "expected-linear-regression-maml"
    steps = check_size(name, "steps", steps)
    shots = check_size(name, "shots", shots)
    queries = check_size(name, "queries", queries)
    t = SymbolTable()
    w = t.scalar("w", "w")
    b = t.scalar("b", "b")
    t.arrays["W"] = sp.Matrix([[w]])
    alpha = t.scalar("alpha", r"\alpha")
    xs = t.vector("x_s", shots, "x^{(s)}")
    xq = t.vector("x_q", queries, "x^{(q)}")
    mu = t.scalar("mu", r"\mu")
    sigma = t.scalar("sigma", r"\sigma", positive=True)
    c = sp.Symbol("c", real=True)

    def design(x: sp.Matrix) -> sp.Matrix:
        return x.row_join(sp.ones(x.shape[0], 1))

    Ds, Dq = design(xs), design(xq)
    p = sp.Matrix([w, b])
    for _ in range(steps):
        p = p - alpha * 2 * Ds.T * (Ds * p - c * xs) / shots
    r = Dq * p - c * xq
    task_loss = sum((e**2 for e in r), sp.Integer(0)) / queries
    intro = [
        Step("task distribution (the slope)", ("c", "c"), (r"\mathcal{N}(\mu, \sigma^{2})", "N(mu, sigma^2)")),
        Step("per-task data", (r"y^{(s)}_{i},\ y^{(q)}_{i}", "y_s_i, y_q_i"),
             (r"c\, x^{(s)}_{i},\ c\, x^{(q)}_{i}", "c x_s_i, c x_q_i")),
        Step(f"MAML on f(x) = w x + b with mse, K = {steps}", (r"\mathcal{L}_{c}(w, b)", "L_c(w, b)"),
             (rf"L_{{q}}(p_{{{steps}}}),\quad p_{{k+1}} = p_{{k}} - \alpha \nabla L_{{s}}(p_{{k}}),\ p_{{0}} = (w, b)",
              f"L_q(p_{steps}), p_(k+1) = p_k - alpha grad L_s(p_k), p_0 = (w, b)")),
    ]
    integral = (r"\int_{\mathbb{R}} \mathcal{L}_{c}(w, b)\, \mathcal{N}(c; \mu, \sigma^{2})\, dc",
                "int L_c(w, b) N(c; mu, sigma^2) dc")
    return _finish(name, {"steps": steps, "shots": shots, "queries": queries},
                   "Expected MAML meta-gradient over Gaussian 1-D linear-regression tasks",
                   f"MAML (K = {steps}) on 1-D linear-regression tasks y = c x with Gaussian slope c ~ N(mu, sigma^2), "
                   f"{shots} support and {queries} query inputs (symbolic, shared by all tasks); the meta-loss is the "
                   "expectation over tasks, computed as an integral.",
                   t, [("W", (1, 1)), ("b", (1,))], [w, b], task_loss, [c], [mu], sigma, intro, {}, integral,
                   False, (r"\mathcal{L}(w, b)", "L(w, b)"))

