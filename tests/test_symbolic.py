"""reference.symbolic: the Derivation API and the internal identities of each derivation.

Every identity below compares two independently built SymPy objects (the
meta-gradient by direct differentiation against the chain-rule / implicit /
closed form written from CONVENTIONS), so a wrong construction fails.
Cross-checks against the NumPy reference live in test_symbolic_reference.py.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest
import sympy as sp

from reference.errors import InvalidInputError
from reference.symbolic import (
    LIMITS,
    PROBLEMS,
    Derivation,
    anil_linear,
    chain_gradient,
    derive,
    get_problem,
    gradient_flow_quadratic,
    linear_regression_maml,
    quadratic_maml,
    quadratic_metasgd,
    quadratic_reptile,
    r2d2_ridge,
    ridge_weights,
)

# Derivations are deterministic; build each (name, sizes) once per session.
# Not cached across tests (SymPy's own cache makes a rebuild cheap): the mutation runner selects tests
# by per-test coverage, and a derivation built once would be attributed to the first test only.
_cached = derive


def is_zero(m) -> bool:
    """Exact zero test: every entry expands (after cancelling denominators) to 0."""
    entries = m if isinstance(m, sp.MatrixBase) else [m]
    return all(sp.expand(sp.cancel(sp.together(e))) == 0 for e in entries)


def vanishes(obj, d: Derivation, *, points: int = 3, seed: int = 0) -> bool:
    """Probabilistic exact zero test (Schwartz-Zippel) for expressions too large to expand.

    ``obj`` (in ``d``'s symbols and its intermediates) is evaluated exactly
    at ``points`` random rationals k/64, |k| <= 200: a nonzero rational
    function of degree D vanishes at one such point with probability at
    most D/401, so three points make a false "zero" very unlikely.
    Transcendental values are compared at 50 digits.
    """
    rng = np.random.default_rng(seed)
    entries = list(obj) if isinstance(obj, sp.MatrixBase) else [obj]
    for _ in range(points):
        values = {}
        for name, sym in d.symbols.items():
            k = int(rng.integers(-200, 201))
            values[name] = sp.Rational(abs(k) + 8 if (sym.is_positive or sym.is_nonnegative) else k, 64)
        subs = d._bind_with_definitions(values)
        for e in entries:
            v = sp.sympify(e).xreplace(subs)
            if v.is_Rational:
                if v != 0:
                    return False
            elif abs(sp.N(v, 50)) > sp.Float(10) ** -40:
                return False
    return True


def dyadic_point(d: Derivation, seed: int) -> dict[str, sp.Rational]:
    """Exact values k/16 for every symbol; positive symbols get positive values."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, sym in d.symbols.items():
        k = int(rng.integers(-24, 25))
        if sym.is_positive or sym.is_nonnegative:
            k = abs(k) + 4
        out[name] = sp.Rational(k, 16)
    return out


# ---------------------------------------------------------------------------
# Public API shape
# ---------------------------------------------------------------------------


def test_quadratic_maml_dim1_symbol_names_are_the_issue_names():
    d = quadratic_maml(dim=1, steps=1)
    assert list(d.symbols) == ["theta", "alpha", "a_s", "c_s", "a_q", "c_q"]
    assert all(isinstance(s, sp.Symbol) and s.name == n for n, s in d.symbols.items())
    assert isinstance(d.meta_loss, sp.Expr)
    assert isinstance(d.meta_gradient, sp.MatrixBase) and d.meta_gradient.shape == (1, 1)


def test_quadratic_maml_dim1_closed_form_by_hand():
    # One step by hand: p1 = theta - alpha a_s (theta - c_s); L = a_q/2 (p1 - c_q)^2;
    # dL/dtheta = (1 - alpha a_s) a_q (p1 - c_q).
    d = quadratic_maml(1, 1)
    th, al, a_s, c_s, a_q, c_q = (d.symbols[n] for n in ["theta", "alpha", "a_s", "c_s", "a_q", "c_q"])
    p1 = th - al * a_s * (th - c_s)
    assert is_zero(d.meta_loss - a_q * (p1 - c_q) ** 2 / 2)
    assert is_zero(d.meta_gradient[0] - (1 - al * a_s) * a_q * (p1 - c_q))


def test_dim2_uses_indexed_symbols_and_symmetric_matrices():
    d = quadratic_maml(dim=2, steps=1)
    assert {"theta_0", "theta_1", "a_s_0_0", "a_s_0_1", "a_s_1_1", "c_s_0", "c_q_1"} <= set(d.symbols)
    assert "a_s_1_0" not in d.symbols
    A = d.arrays["A_s"]
    assert A.shape == (2, 2) and A == A.T and A[1, 0] is d.symbols["a_s_0_1"]
    assert d.wrt == [("theta", (2,))] and d.wrt_symbols == [d.symbols["theta_0"], d.symbols["theta_1"]]


def test_latex_is_a_multiline_aligned_derivation():
    tex = quadratic_maml(1, 2).latex()
    assert tex.startswith("\\begin{aligned}") and tex.rstrip().endswith("\\end{aligned}")
    lines = tex.splitlines()[1:-1]
    assert len(lines) >= 6, "a derivation, not just the final expression"
    assert all("&=" in line for line in lines)
    assert tex.count("\\left") == tex.count("\\right")
    assert tex.count("{") == tex.count("}")
    # Only commands KaTeX/MathJax know.
    known = {"begin", "end", "left", "right", "tfrac", "frac", "text", "alpha", "theta", "nabla", "mathcal", "top"}
    assert set(re.findall(r"\\([a-zA-Z]+)", tex)) <= known


def test_text_and_sympy_formats():
    d = quadratic_maml(1, 2)
    text = d.text()
    assert "quadratic-maml" in text and "grad L" in text and "\\" not in text
    namespace: dict = {}
    exec(d.sympy_code(), namespace)  # noqa: S102 - our own generated code
    sub = {namespace[n]: s for n, s in d.symbols.items()}
    assert is_zero(namespace["meta_loss"].xreplace(sub) - d.meta_loss)
    assert is_zero(namespace["meta_gradient"].xreplace(sub) - d.meta_gradient)


def test_sympy_code_of_a_problem_with_intermediates_rebuilds_the_full_expressions():
    d = r2d2_ridge(dim=2, regression=True)
    namespace: dict = {}
    exec(d.sympy_code(), namespace)  # noqa: S102
    vals = {d.symbols[n]: v for n, v in dyadic_point(d, 3).items()}
    by_name = {namespace[n]: vals[s] for n, s in d.symbols.items()}
    loss_code = namespace["meta_loss"].xreplace(by_name)
    loss, _ = d.evaluate({n: v for n, v in dyadic_point(d, 3).items()})
    assert sp.simplify(loss_code - loss) == 0


def test_numeric_matches_exact_evaluation():
    d = _cached("quadratic-maml", dim=2, steps=2)
    point = dyadic_point(d, 1)
    loss, grad = d.evaluate(point)
    f_loss, f_grad = d.numeric()(**{k: float(v) for k, v in point.items()})
    assert f_loss == pytest.approx(float(loss), rel=1e-13)
    np.testing.assert_allclose(f_grad, np.array(grad, dtype=float).ravel(), rtol=1e-12, atol=1e-14)


def test_bind_accepts_arrays_and_rejects_asymmetric_or_missing_values():
    d = quadratic_maml(2, 1)
    vals = dict(theta=[0.5, 0.25], alpha=0.125, A_s=[[1, 0.5], [0.5, 2]], c_s=[0, 1], A_q=np.eye(2), c_q=[1, 0])
    bound = d.bind(vals)
    assert bound[d.symbols["a_s_0_1"]] == sp.Rational(1, 2)
    assert bound[d.symbols["alpha"]] == sp.Rational(1, 8)  # float 0.125 is exactly 1/8
    with pytest.raises(InvalidInputError, match="symmetric"):
        d.bind(dict(vals, A_s=[[1, 0.5], [0.25, 2]]))
    with pytest.raises(InvalidInputError, match="no value given"):
        d.bind({k: v for k, v in vals.items() if k != "alpha"})
    with pytest.raises(InvalidInputError, match="not a symbol or array"):
        d.bind(dict(vals, beta=1))
    with pytest.raises(InvalidInputError, match="shape"):
        d.bind(dict(vals, theta=[1, 2, 3]))


def test_evaluate_with_digits_uses_mpmath_precision():
    d = gradient_flow_quadratic(1)
    loss, grad = d.evaluate(theta=1, T=sp.Rational(1, 2), a_s=2, c_s=0, a_q=1, c_q=0, digits=50)
    # p(T) = e^{-1}, L = e^{-2}/2, grad = e^{-2}: compare with mpmath at 50 digits.
    assert abs(loss - sp.exp(-2) / 2) < sp.Float(10) ** -48
    assert abs(grad[0] - sp.exp(-2)) < sp.Float(10) ** -48


# ---------------------------------------------------------------------------
# Internal identities (direct differentiation vs the CONVENTIONS formulas)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dim, steps", [(1, 1), (1, 3), (2, 1), (2, 2), (3, 1)])
def test_maml_chain_rule_equals_direct_derivative(dim, steps):
    d = _cached("quadratic-maml", dim=dim, steps=steps)
    check = is_zero if dim == 1 else functools.partial(vanishes, d=d)
    assert check(d.meta_gradient - d.extras["chain_rule_gradient"])
    assert check(d.extras["iterates"][-1] - d.extras["closed_form_iterate"])
    assert not vanishes(d.meta_gradient - d.extras["fomaml_direction"], d)  # the test can fail


def test_fomaml_is_the_query_gradient_at_the_adapted_point_not_the_meta_gradient():
    fo = quadratic_maml(1, 2, first_order=True)
    exact = quadratic_maml(1, 2)
    assert not fo.is_gradient
    th, al, a_s = (fo.symbols[n] for n in ["theta", "alpha", "a_s"])
    # They differ by the factor (1 - alpha a_s)^2, which is not 1.
    assert is_zero(exact.meta_gradient[0] - (1 - al * a_s) ** 2 * fo.meta_gradient[0])
    assert not is_zero(exact.meta_gradient[0] - fo.meta_gradient[0])
    assert th in fo.meta_gradient.free_symbols


@pytest.mark.parametrize("dim, steps", [(1, 2), (2, 2)])
def test_metasgd_chain_rule_with_learning_rate_adjoint(dim, steps):
    d = _cached("quadratic-metasgd", dim=dim, steps=steps)
    assert vanishes(d.meta_gradient - d.extras["chain_rule_gradient"], d)
    assert d.wrt == [("theta", (dim,)), ("alpha", (dim,))]


def test_metasgd_with_equal_rates_reproduces_maml():
    sgd = quadratic_metasgd(2, 2)
    maml = quadratic_maml(2, 2)
    same = {sgd.symbols["alpha_0"]: maml.symbols["alpha"], sgd.symbols["alpha_1"]: maml.symbols["alpha"]}
    assert vanishes(sgd.meta_gradient[:2, :].xreplace(same) - maml.meta_gradient, maml)


def test_reptile_closed_form_and_first_step():
    d = quadratic_reptile(2, 3)
    assert vanishes(d.meta_gradient - d.extras["closed_form_direction"], d)
    one = quadratic_reptile(1, 1)
    th, al, a_s, c_s = (one.symbols[n] for n in ["theta", "alpha", "a_s", "c_s"])
    assert is_zero(one.meta_gradient[0] - al * a_s * (th - c_s))  # alpha * grad L_s(theta)


@pytest.mark.parametrize("dim", [1, 2])
def test_newton_maml_alpha1_delta0_lands_on_the_minimiser(dim):
    d = _cached("quadratic-newton-maml", dim=dim, steps=1)
    p1 = d.extras["iterates"][1].xreplace({d.symbols["alpha"]: 1, d.symbols["delta"]: 0})
    c_s = d.arrays["c_s"]
    assert is_zero(p1 - c_s)
    assert vanishes(d.meta_gradient - d.extras["chain_rule_gradient"], d)
    # ... and then the meta-gradient vanishes: p_1 no longer depends on theta.
    g = d.meta_gradient.xreplace({d.symbols["alpha"]: 1, d.symbols["delta"]: 0})
    assert is_zero(g)


@pytest.mark.parametrize("dim", [1, 2])
def test_imaml_direct_derivative_equals_implicit_formula(dim):
    d = _cached("quadratic-imaml", dim=dim)
    check = is_zero if dim == 1 else functools.partial(vanishes, d=d)
    assert check(d.extras["stationarity_residual"])
    assert check(d.meta_gradient - d.extras["implicit_gradient"])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_linear_regression_chain_rule(steps, bias):
    d = _cached("linear-regression-maml", dim=1, steps=steps, shots=2, bias=bias)
    assert vanishes(d.meta_gradient - d.extras["chain_rule_gradient"], d)
    assert d.wrt == ([("W", (1, 1)), ("b", (1,))] if bias else [("W", (1, 1))])


def test_anil_body_gradient_carries_the_cross_term():
    d = anil_linear(dim=2, steps=1, shots=2)
    body = d.extras["body_gradient"]
    assert not vanishes(body, d)
    # Without the inner loop (alpha = 0) the body gradient is the plain query gradient;
    # the difference at alpha != 0 comes through the adapted head (the cross term).
    al = d.symbols["alpha"]
    dbody = sp.diff(body, al).xreplace({al: 0})
    assert not vanishes(dbody, d)
    assert not vanishes(d.extras["cross_hessian_support"], d)


def test_r2d2_push_through_identity_and_primal_equals_dual():
    d = r2d2_ridge(dim=2, shots=2, bias_column=True)
    assert is_zero(d.extras["push_through_residual"])
    # Generic Z (not built from W x): primal and dual agree identically (2 x 2 features, exact).
    lam = d.symbols["lam"]
    Z = sp.Matrix(2, 2, lambda i, j: sp.Symbol(f"g_{i}{j}", real=True))
    Y = sp.Matrix([[1, 0], [0, 1]])
    assert is_zero(ridge_weights(Z, Y, lam, "primal") - ridge_weights(Z, Y, lam, "dual"))
    # And at a point of the full problem (3 columns with the ones column), exactly.
    point = dyadic_point(d, 2)
    Zs = d.evaluate_extra("support_features", point)
    Ys = d.evaluate_extra("support_targets", point)
    lam_v = point["lam"]
    primal, dual = ridge_weights(Zs, Ys, lam_v, "primal"), ridge_weights(Zs, Ys, lam_v, "dual")
    assert (primal - dual).applyfunc(sp.nsimplify) == sp.zeros(3, 2)
    assert (d.evaluate_extra("ridge_weights", point) - dual).applyfunc(sp.nsimplify) == sp.zeros(3, 2)


@pytest.mark.parametrize("kw", [dict(dim=2), dict(dim=2, regression=True, bias_column=True, normalize=True)])
def test_r2d2_chain_gradient_equals_direct_differentiation(kw):
    """The symbolic reverse mode through the intermediates equals SymPy's diff of the full expression.

    Checked exactly at a rational point, one parameter at a time: all other
    symbols are substituted first so the full expression is univariate.
    """
    d = r2d2_ridge(**kw)
    point = {d.symbols[n]: v for n, v in dyadic_point(d, 7).items()}
    _, grad = d.evaluate({s.name: v for s, v in point.items()}, digits=40)
    for i, w in enumerate(d.wrt_symbols):
        # Substitute every other symbol first: the fully substituted meta-loss
        # becomes a univariate expression in w, which SymPy differentiates directly.
        # (w is swapped for an assumption-free symbol: SymPy's assumption queries on
        # exp/log of real symbols dominate the cost otherwise.)
        u = sp.Symbol("u")
        subs = {s: v for s, v in point.items() if s != w}
        subs[w] = u
        for sym, expr in d.definitions:
            if not sym.name.startswith("bar_"):  # primal intermediates only
                subs[sym] = expr.xreplace(subs)
        univariate = d.compact_meta_loss.xreplace(subs)
        assert univariate.free_symbols == {u}
        direct = sp.diff(univariate, u).xreplace({u: point[w]})
        assert abs(sp.N(direct, 40) - grad[i]) <= sp.Float(10) ** -30 * (1 + abs(grad[i]))


def test_chain_gradient_on_a_small_chain():
    x, y, u, v = sp.symbols("x y u v", real=True)
    defs = [(u, x * y), (v, sp.sin(u) + x)]
    grad, adjoints = chain_gradient(v**2, defs, [x, y])
    full = (sp.sin(x * y) + x) ** 2
    subs = {}
    for s, e in defs + adjoints:
        subs[s] = e.xreplace(subs)
    assert is_zero(grad.xreplace(subs) - sp.Matrix([sp.diff(full, x), sp.diff(full, y)]))


def test_gradient_flow_adjoint_solves_the_adjoint_equation():
    d = gradient_flow_quadratic(1)
    t = d.extras["time"]
    a = d.extras["adjoint_solution"][0]
    a_s = d.symbols["a_s"]
    assert sp.simplify(sp.diff(a, t) - a_s * a) == 0
    assert sp.simplify(a.xreplace({t: d.symbols["T"]}) - d.symbols["a_q"] * (d.extras["flow_solution"][0] - d.symbols["c_q"])) == 0
    assert sp.simplify(d.extras["adjoint_gradient"][0] - d.meta_gradient[0]) == 0


def test_gradient_flow_dim2_adjoint_equation_at_a_point():
    d = gradient_flow_quadratic(2)
    t = d.extras["time"]
    point = d.bind(theta=[0.5, -0.25], T=0.75, A_s=[[1.25, -0.5], [-0.5, 0.75]], c_s=[0.25, 0.5],
                   A_q=[[1, 0.25], [0.25, 0.5]], c_q=[-0.5, 0.125])
    a = d.extras["adjoint_solution"].xreplace(point)  # a function of t only
    residual = (sp.diff(a, t) - d.arrays["A_s"].xreplace(point) * a).xreplace({t: sp.Rational(1, 3)})
    assert max(abs(sp.N(e, 50)) for e in residual) < sp.Float(10) ** -45
    diff = (d.extras["adjoint_gradient"] - d.meta_gradient).xreplace(point)
    assert max(abs(sp.N(e, 50)) for e in diff) < sp.Float(10) ** -45


def test_gradient_flow_is_the_limit_of_maml():
    d = gradient_flow_quadratic(1)
    K = d.extras["steps_symbol"]
    g_K = d.extras["maml_meta_gradient"][0]
    assert sp.simplify(sp.limit(g_K, K, sp.oo) - d.meta_gradient[0]) == 0


# ---------------------------------------------------------------------------
# Registry, sizes and errors
# ---------------------------------------------------------------------------


def test_every_problem_is_registered_with_limits():
    assert set(PROBLEMS) == set(LIMITS)
    for name, prob in PROBLEMS.items():
        assert prob.constructor.__name__.replace("_", "-") == name
        assert set(prob.sizes) == set(prob.limits)


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_sizes_above_the_limit_are_refused_with_the_limit_stated(name):
    prob = get_problem(name)
    size, limit = next(iter(prob.limits.items()))
    with pytest.raises(InvalidInputError, match=rf"{size}={limit + 1} is too large.*limit is {size} <= {limit}"):
        prob.build(**{size: limit + 1})


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_sizes_are_refused(bad):
    with pytest.raises(InvalidInputError, match="dim="):
        quadratic_maml(dim=bad)


def test_unknown_problem_suggests_close_names():
    with pytest.raises(InvalidInputError, match="did you mean 'quadratic-maml'"):
        get_problem("quadratic-mam")
    assert get_problem("quadratic_maml").name == "quadratic-maml"


def test_bool_options_are_validated():
    with pytest.raises(InvalidInputError, match="first_order"):
        quadratic_maml(1, 1, first_order=1)
    with pytest.raises(InvalidInputError, match="bias"):
        linear_regression_maml(bias="yes")


def test_every_problem_builds_at_default_size_and_renders():
    for name in PROBLEMS:
        d = _cached(name)
        assert d.name == name
        tex = d.latex()
        assert tex.startswith("\\begin{aligned}") and tex.count("{") == tex.count("}")
        assert tex.count("\\left") == tex.count("\\right") and len(tex.splitlines()) >= 6
        assert d.text().startswith(name)
        loss, grad = d.numeric()(**{k: float(v) for k, v in dyadic_point(d, 5).items()})
        assert np.isfinite(loss) and np.all(np.isfinite(grad)) and grad.shape == (len(d.wrt_symbols),)


_KATEX_JS = """
const katex = require(process.argv[1]);
const fs = require('fs');
let bad = 0;
for (const f of process.argv.slice(2)) {
  try { katex.renderToString(fs.readFileSync(f, 'utf8'), {displayMode: true, throwOnError: true, strict: 'error'}); }
  catch (e) { bad += 1; console.log(f + ': ' + e.message); }
}
process.exit(bad ? 1 : 0);
"""


def test_every_derivation_renders_in_katex(tmp_path):
    """The LaTeX is standard enough for KaTeX in strict mode (the bundled copy of the HTML report)."""
    import shutil
    import subprocess
    from pathlib import Path

    node = shutil.which("node")
    katex = Path(__file__).resolve().parents[1] / "verify" / "report" / "katex" / "katex.min.js"
    if node is None or not katex.exists():
        pytest.skip("needs node and the bundled KaTeX (verify/report/katex)")
    cases = [(name, {}) for name in PROBLEMS] + [
        ("quadratic-maml", dict(dim=2, steps=2)), ("quadratic-metasgd", dict(dim=2)), ("quadratic-imaml", dict(dim=2)),
        ("gradient-flow-quadratic", dict(dim=2)), ("nichol-reptile", dict(dim=2)), ("quadratic-maml", dict(first_order=True)),
    ]
    files = []
    for i, (name, kw) in enumerate(cases):
        f = tmp_path / f"{i}-{name}.tex"
        f.write_text(_cached(name, **kw).latex())
        files.append(str(f))
    proc = subprocess.run([node, "-e", _KATEX_JS, str(katex), *files], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
