"""Fast checks of ``linear-regression-maml`` and ``anil-linear`` (reference/symbolic/_linear.py).

Each derivation is built once per parameter set (0.05-0.2 s) and checked against
sources that do not share its code:

* values: the exact meta-loss and meta-gradient at dyadic points (exact in
  float64) against the NumPy reference (``reference.maml`` / ``reference.anil`` on
  ``MLP(..., activation="identity", loss="mse")``), and the inner iterates
  against ``reference.maml.adapt``;
* the hand-written lines of the derivation, *executed*: the coefficients, the
  power of ``(I - alpha H_s)`` and the iterate index they display are parsed
  (LaTeX and text, each in its own syntax, coefficient 1 not written, integers
  not written as fractions) and the formulas they state are evaluated with
  NumPy; the results must reproduce the reference's meta-loss and meta-gradient
  (a wrong ``1/n``, a power ``K`` shown as 1, ``X`` for ``[X, 1]`` all fail);
* the symbol names the constructors' docstrings document;
* the default sizes (``metaverify derive PROBLEM`` without sizes).
"""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest
import sympy as sp

from reference import anil, maml
from reference.models import MLP
from reference.symbolic import PROBLEMS, anil_linear, derive, linear_regression_maml
from reference.tasks import Task

# Not cached across tests: the mutation runner selects tests by per-test coverage, and a derivation built
# once would be attributed to the first test only.
_derive = derive
RTOL = 1e-12  # dyadic inputs: float64 round-off of small sums only


def dyadic(rng: np.random.Generator, shape, den: int = 16) -> np.ndarray:
    return rng.integers(-24, 25, size=shape) / den


# -- parsing the displayed coefficients -------------------------------------------------------------


def text_coef(s: str) -> tuple[sp.Rational, str]:
    """Split ``"2/3 rest"`` / ``"2 rest"`` / ``"rest"`` into (coefficient, rest); 1 is never written."""
    m = re.match(r"(\d+)(?:/(\d+))? (.*)$", s)
    if m is None:
        return sp.Integer(1), s
    num, den = int(m.group(1)), int(m.group(2) or 1)
    assert sp.Rational(num, den) != 1, f"a unit coefficient is written out: {s!r}"
    assert den != 1 or m.group(2) is None, f"an integer written as a fraction: {s!r}"
    assert sp.gcd(num, den) == 1, s
    return sp.Rational(num, den), m.group(3)


def tex_coef(s: str) -> tuple[sp.Rational, str]:
    r"""Split ``"\tfrac{2}{3} rest"`` / ``"2 rest"`` / ``"rest"`` into (coefficient, rest)."""
    assert "/" not in s.split("\\")[0], f"plain-text fraction in LaTeX: {s!r}"
    m = re.match(r"\\tfrac\{(\d+)\}\{(\d+)\} (.*)$", s)
    if m:
        num, den = int(m.group(1)), int(m.group(2))
        assert den > 1 and sp.gcd(num, den) == 1, f"\\tfrac of an integer or unreduced: {s!r}"
        return sp.Rational(num, den), m.group(3)
    m = re.match(r"(\d+) (.*)$", s)
    if m:
        assert int(m.group(1)) != 1, f"a unit coefficient is written out: {s!r}"
        return sp.Integer(int(m.group(1))), m.group(2)
    return sp.Integer(1), s


def step(d, lhs_text: str, label_part: str | None = None):
    found = [s for s in d.steps if s.lhs[1] == lhs_text and (label_part is None or label_part in s.label)]
    assert len(found) == 1, [s.lhs for s in d.steps]
    return found[0]


# -- linear-regression MAML ------------------------------------------------------------------------

LINREG = [
    dict(dim=1, steps=1, shots=1, queries=2, bias=True),
    dict(dim=1, steps=2, shots=2, queries=1, bias=True),
    dict(dim=1, steps=3, shots=3, queries=3, bias=False),
    dict(dim=2, steps=2, shots=3, queries=2, bias=False),
    dict(dim=2, steps=1, shots=2, queries=3, bias=True),
]


def linreg_point(d, seed: int):
    p = d.params
    rng = np.random.default_rng(seed)
    dim, n, q = p["dim"], p["shots"], p["queries"]
    xs, xq, ys, yq = dyadic(rng, (n, dim)), dyadic(rng, (q, dim)), dyadic(rng, n), dyadic(rng, q)
    W, b, alpha = dyadic(rng, (1, dim)), dyadic(rng, 1), rng.integers(1, 5) / 16
    values = dict(W=W, alpha=alpha, x_s=xs if dim > 1 else xs[:, 0], y_s=ys, x_q=xq if dim > 1 else xq[:, 0], y_q=yq)
    params = [W, b] if p["bias"] else [W]
    if p["bias"]:
        values["b"] = b[0]
    return values, params, Task(xs, ys.reshape(-1, 1), xq, yq.reshape(-1, 1)), alpha


def linreg_names(dim: int, shots: int, queries: int, bias: bool) -> list[str]:
    """The docstring's names: ``w`` or ``w_j``; ``b``; ``alpha``; ``x_s_i`` or ``x_s_i_j``; ``y_s_i``; same for q.

    A length-1 vector is the bare name (``SymbolTable.vector``), so one query point is ``y_q``.
    """
    def col(base, n):
        return [base] if n == 1 else [f"{base}_{i}" for i in range(n)]

    def xs(base, n):
        return col(base, n) if dim == 1 else [f"{base}_{i}_{j}" for i in range(n) for j in range(dim)]

    w = ["w"] if dim == 1 else [f"w_{j}" for j in range(dim)]
    return (w + (["b"] if bias else []) + ["alpha"] + xs("x_s", shots) + col("y_s", shots)
            + xs("x_q", queries) + col("y_q", queries))


@pytest.mark.parametrize("kw", LINREG, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_linear_regression_maml_values_names_and_displayed_derivation(kw):
    d = _derive("linear-regression-maml", **kw)
    dim, K, n, q, bias = kw["dim"], kw["steps"], kw["shots"], kw["queries"], kw["bias"]
    assert sorted(d.symbols) == sorted(linreg_names(dim, n, q, bias))
    assert [s.name for s in d.wrt_symbols] == linreg_names(dim, n, q, bias)[: dim + bias]
    assert d.wrt == [("W", (1, dim))] + ([("b", (1,))] if bias else [])
    assert d.params == kw

    # The displayed lines, parsed (LaTeX and text separately).
    X, Xt = ("X1", r"\tilde{X}") if bias else ("X", "X")
    model = step(d, "f(x)")
    assert model.rhs == ((r"x W^{\top} + b", "x W^T + b") if bias else (r"x W^{\top}", "x W^T"))
    assert model.label.endswith("; X1 = [X, 1]") == bias and ("X1" in model.label) == bias
    c_s, rest = text_coef(step(d, "L_s(p)").rhs[1])
    c_s_tex, rest_tex = tex_coef(step(d, "L_s(p)").rhs[0])
    assert (rest, rest_tex) == (f"||{X}_s p - y_s||^2", rf"\lVert {Xt}_{{s}} p - y_{{s}} \rVert^{{2}}")
    c_g, rest = text_coef(step(d, "grad L_s(p)").rhs[1])
    c_g_tex, rest_tex = tex_coef(step(d, "grad L_s(p)").rhs[0])
    assert (rest, rest_tex) == (f"{X}_s^T ({X}_s p - y_s)", rf"{Xt}_{{s}}^{{\top}} \left({Xt}_{{s}} p - y_{{s}}\right)")
    p0_tex, p0_txt = step(d, "p_{k+1}").rhs
    assert p0_tex.endswith(r"p_{0} = \left(W, b\right)" if bias else r"p_{0} = W")
    assert p0_txt.endswith("p_0 = (W, b)" if bias else "p_0 = W")  # no b without a bias (was always "(W, b)")
    c_q, rest = text_coef(step(d, "L").rhs[1])
    c_q_tex, rest_tex = tex_coef(step(d, "L").rhs[0])
    assert (rest, rest_tex) == (f"||{X}_q p_{K} - y_q||^2", rf"\lVert {Xt}_{{q}} p_{{{K}}} - y_{{q}} \rVert^{{2}}")
    chain_tex, chain_txt = step(d, "grad L", "chain rule").rhs
    m = re.fullmatch(r"\(I - alpha H_s\)(?:\*\*(\d+))? (.*)", chain_txt)
    m_tex = re.fullmatch(r"\\left\(I - \\alpha H_\{s\}\\right\)(?:\^\{(\d+)\})? (.*)", chain_tex)
    assert m and m_tex, (chain_txt, chain_tex)
    power, power_tex = (int(g.group(1) or 1) for g in (m, m_tex))
    assert m.group(1) != "1" and m_tex.group(1) != "1", "a power 1 is written out"
    c_gq, rest = text_coef(m.group(2))
    c_gq_tex, rest_tex = tex_coef(m_tex.group(2))
    assert rest == f"{X}_q^T ({X}_q p_{K} - y_q)"
    assert rest_tex == rf"{Xt}_{{q}}^{{\top}} \left({Xt}_{{q}} p_{{{K}}} - y_{{q}}\right)"
    assert (c_s, c_g, c_q, c_gq, power) == (c_s_tex, c_g_tex, c_q_tex, c_gq_tex, power_tex)
    assert ("+ b" in d.summary) == bias and f"K = {K} inner steps on a {n}-shot" in d.summary
    assert f"{q} query points" in d.summary

    # Executed: the displayed formulas give the NumPy reference's numbers (and the exact derivation does).
    mlp = MLP([dim, 1], activation="identity", loss="mse", bias=bias)
    for seed in (0, 1):
        values, params, task, alpha = linreg_point(d, seed)
        ref_loss, ref_grad = maml.meta_loss_and_grad(mlp, params, [task], alpha, K)
        ref_grad = np.concatenate([np.ravel(g) for g in ref_grad])
        loss, grad = d.evaluate(values)
        assert loss.is_Rational and abs(float(loss) - ref_loss) <= RTOL * abs(ref_loss)
        np.testing.assert_allclose(np.array(grad, dtype=float).ravel(), ref_grad, rtol=RTOL, atol=0)
        p_K = np.concatenate([np.ravel(a) for a in maml.adapt(mlp, params, task, alpha, K)])
        subs = d.bind(values)
        its = [it.xreplace(subs) for it in d.extras["iterates"]]
        np.testing.assert_allclose(np.array(its[-1], dtype=float).ravel(), p_K, rtol=RTOL, atol=1e-15)
        assert len(its) == K + 1

        def design(x):
            return np.c_[x, np.ones(len(x))] if bias else x

        Ds, Dq = design(task.x_support), design(task.x_query)
        ys_, yq_ = task.y_support[:, 0], task.y_query[:, 0]
        p = np.concatenate([np.ravel(a) for a in params])
        support_loss = mlp.loss(params, task.x_support, task.y_support)
        assert np.isclose(float(c_s) * np.sum((Ds @ p - ys_) ** 2), support_loss, rtol=RTOL, atol=0)
        for _ in range(K):
            p = p - alpha * float(c_g) * Ds.T @ (Ds @ p - ys_)
        np.testing.assert_allclose(p, p_K, rtol=RTOL, atol=1e-15)
        assert np.isclose(float(c_q) * np.sum((Dq @ p - yq_) ** 2), ref_loss, rtol=RTOL, atol=0)
        H_s = float(c_g) * Ds.T @ Ds  # the Hessian of the displayed support loss (its gradient's Jacobian)
        np.testing.assert_allclose(np.array(d.evaluate_extra("hessian_support", values), dtype=float), H_s, rtol=RTOL)
        shown = np.linalg.matrix_power(np.eye(len(p)) - alpha * H_s, power) @ (float(c_gq) * Dq.T @ (Dq @ p - yq_))
        np.testing.assert_allclose(shown, ref_grad, rtol=1e-11, atol=1e-14)


# -- ANIL on a two-layer linear network ------------------------------------------------------------

ANIL = [dict(dim=1, steps=2, shots=1, queries=2), dict(dim=2, steps=1, shots=2, queries=1)]


def anil_names(dim: int, shots: int, queries: int) -> list[str]:
    """The docstring's names ``W1_i_0, b1_i, W2_0_i, b2``, ``alpha``, ``x_s_i, y_s_i, x_q_i, y_q_i``."""
    def col(base, n):
        return [base] if n == 1 else [f"{base}_{i}" for i in range(n)]

    return ([f"W1_{i}_0" for i in range(dim)] + [f"b1_{i}" for i in range(dim)] + [f"W2_0_{i}" for i in range(dim)]
            + ["b2", "alpha"] + col("x_s", shots) + col("y_s", shots) + col("x_q", queries) + col("y_q", queries))


@pytest.mark.parametrize("kw", ANIL, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_anil_linear_values_names_and_displayed_derivation(kw):
    d = _derive("anil-linear", **kw)
    h, K, n, q = kw["dim"], kw["steps"], kw["shots"], kw["queries"]
    names = anil_names(h, n, q)
    assert sorted(d.symbols) == sorted(names)
    assert [s.name for s in d.wrt_symbols] == names[: 3 * h + 1]
    assert d.wrt == [("W1", (h, 1)), ("b1", (h,)), ("W2", (1, h)), ("b2", (1,))] and d.params == kw
    loss_tex, loss_txt = step(d, "L_s(body, h)").rhs
    c, rest = text_coef(loss_txt)
    c_tex, rest_tex = tex_coef(loss_tex)
    assert c == c_tex == sp.Rational(1, n)  # mse: the mean over the n support points
    assert rest == "sum_i (f(x_s_i) - y_s_i)^2" and rest_tex.startswith(r"\sum_{i} \left(f(x^{(s)}_{i})")
    assert step(d, "L").rhs == (rf"L_{{q}}(\text{{body}}, h_{{{K}}})", f"L_q(body, h_{K})")
    assert f"K = {K} inner steps" in d.summary and f"1-{h}-1 linear network" in d.summary

    model = MLP([1, h, 1], activation="identity", loss="mse")
    head = set(model.head_indices)
    assert head == {2, 3}, model.head_indices  # ANIL adapts (W2, b2)
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        W1, b1, W2, b2 = dyadic(rng, (h, 1)), dyadic(rng, h), dyadic(rng, (1, h)), dyadic(rng, 1)
        xs, ys, xq, yq = dyadic(rng, n), dyadic(rng, n), dyadic(rng, q), dyadic(rng, q)
        alpha = rng.integers(1, 5) / 16
        task = Task(xs.reshape(-1, 1), ys.reshape(-1, 1), xq.reshape(-1, 1), yq.reshape(-1, 1))
        ref_loss, ref_grad = anil.meta_loss_and_grad(model, [W1, b1, W2, b2], [task], alpha, K)
        ref_grad = np.concatenate([np.ravel(g) for g in ref_grad])
        loss, grad = d.evaluate(dict(W1=W1, b1=b1, W2=W2, b2=b2[0], alpha=alpha, x_s=xs, y_s=ys, x_q=xq, y_q=yq))
        assert loss.is_Rational and abs(float(loss) - ref_loss) <= RTOL * abs(ref_loss)
        np.testing.assert_allclose(np.array(grad, dtype=float).ravel(), ref_grad, rtol=RTOL, atol=1e-15)


def test_anil_cross_term_is_the_mixed_hessian_of_the_support_loss():
    """``cross_hessian_support`` = d/d body of grad_head L_s at h_0, by central differences of the reference's loss."""
    d = _derive("anil-linear", dim=2, steps=1, shots=2, queries=1)
    rng = np.random.default_rng(5)
    W1, b1, W2, b2 = dyadic(rng, (2, 1)), dyadic(rng, 2), dyadic(rng, (1, 2)), dyadic(rng, 1)
    xs, ys, xq, yq = dyadic(rng, 2), dyadic(rng, 2), dyadic(rng, 1), dyadic(rng, 1)
    vals = dict(W1=W1, b1=b1, W2=W2, b2=b2[0], alpha=0.25, x_s=xs, y_s=ys, x_q=xq, y_q=yq)
    cross = np.array(d.evaluate_extra("cross_hessian_support", vals), dtype=float)
    model = MLP([1, 2, 1], activation="identity", loss="mse")
    flat0 = np.r_[W1.ravel(), b1, W2.ravel(), b2]

    def head_grad(flat):
        ps = [flat[:2].reshape(2, 1), flat[2:4], flat[4:6].reshape(1, 2), flat[6:]]
        g = model.loss_and_grad(ps, xs.reshape(-1, 1), ys.reshape(-1, 1))[1]
        return np.r_[np.ravel(g[2]), np.ravel(g[3])]

    def central(j, t):
        e = np.zeros(7)
        e[j] = t
        return (head_grad(flat0 + e) - head_grad(flat0 - e)) / (2 * t)

    # grad_head L_s is a cubic polynomial along each body direction: one Richardson step
    # (4 D(t/2) - D(t)) / 3 removes the t^2 error term, the only one, so the result is exact up to round-off.
    fd = np.stack([(4 * central(j, 2.0**-6) - central(j, 2.0**-5)) / 3 for j in range(4)], axis=1)
    np.testing.assert_allclose(cross, fd, rtol=1e-9, atol=1e-12)


# -- defaults and bad input ------------------------------------------------------------------------


def test_default_sizes():
    """``metaverify derive PROBLEM`` without sizes builds these (the CLI's default output and ``--list``)."""
    assert PROBLEMS["linear-regression-maml"].sizes == dict(dim=1, steps=1, shots=2, queries=2)
    assert inspect.signature(linear_regression_maml).parameters["bias"].default is True
    assert PROBLEMS["anil-linear"].sizes == dict(dim=2, steps=1, shots=2, queries=1)
    assert PROBLEMS["anil-linear"].constructor is anil_linear
    # the constructors' own defaults (what a Python caller gets) are the same problems
    assert linear_regression_maml().text() == linear_regression_maml(dim=1, steps=1, shots=2, queries=2,
                                                                      bias=True).text()
    assert anil_linear().text() == anil_linear(dim=2, steps=1, shots=2, queries=1).text()
