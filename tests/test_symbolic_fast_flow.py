"""Fast checks of the gradient-flow derivation (``gradient-flow-quadratic``) against independent sources.

Each test builds its derivation once (about 0.2 s) and checks many properties, so the mutation
runner's per-mutant budget reaches it (issue 19). Independent sources:

* the scalar flow solved by hand: ``p(T) = c_s + e^{-a_s T} (theta - c_s)``, ``L = a_q/2 (p(T) - c_q)^2``,
  ``dL/dtheta = e^{-a_s T} a_q (p(T) - c_q)``, the adjoint ``a(t) = e^{a_s (t - T)} a(T)`` (mpmath, 30 digits);
* ``scipy.linalg.expm`` for ``dim = 2``;
* MAML's ``K`` explicit-Euler steps of size ``T/K`` iterated by hand (mpmath), whose scaled error
  ``K (g_K - g)`` is Richardson-extrapolated in ``K`` to the O(1/K) coefficient;
* CONVENTIONS ("Continuous time") and the module docstring for what each displayed step states:
  the plain-text formulas are parsed back with SymPy and evaluated against the hand solutions
  (for ``dim = 2`` with the matrices replaced by scalars, where the formulas must reduce to ``dim = 1``).
"""

from __future__ import annotations

import re

import mpmath
import numpy as np
import pytest
import scipy.linalg
import sympy as sp
from sympy.parsing.sympy_parser import implicit_application, implicit_multiplication, parse_expr, standard_transformations

from reference.symbolic import gradient_flow_quadratic

# Not cached across tests: the mutation runner selects tests by the coverage of each test, and a
# derivation built once (lru_cache, module fixture) would be attributed to the first test only.
_flow = gradient_flow_quadratic

NAMES1 = ["theta", "T", "a_s", "c_s", "a_q", "c_q"]
# Dyadic values (exact in binary, so the derivation sees the same numbers as mpmath); the second
# has a concave support loss (a_s < 0: the flow diverges, the formulas still hold).
POINTS1 = [dict(theta=0.75, T=1.25, a_s=1.5, c_s=-0.5, a_q=0.5, c_q=0.25),
           dict(theta=-1.375, T=0.5, a_s=-0.75, c_s=0.625, a_q=2.25, c_q=-0.125)]
POINTS2 = [dict(theta=[0.25, 1.125], T=0.875, A_s=[[1.5, -0.25], [-0.25, 0.5]], c_s=[0.5, -0.25],
                A_q=[[0.75, 0.125], [0.125, 1.0]], c_q=[-0.375, 0.25])]
DIGITS = 30


@pytest.fixture(autouse=True)
def _precision():
    """mpmath at 40 digits for the hand solutions (restored after each test)."""
    with mpmath.workdps(40):
        yield


def _mp(p):
    return [mpmath.mpf(p[k]) for k in NAMES1]


def hand_scalar(p, t=None):
    """``(p(T), L, dL/dtheta, a(t))`` of the scalar flow, solved by hand (mpmath)."""
    th, T, a, c, aq, cq = _mp(p)
    e = mpmath.exp(-a * T)
    pT = c + e * (th - c)
    a_T = aq * (pT - cq)
    adj = None if t is None else mpmath.exp(a * (mpmath.mpf(t) - T)) * a_T
    return pT, aq * (pT - cq) ** 2 / 2, e * a_T, adj


def hand_maml_grad(p, K: int):
    """MAML's meta-gradient after ``K`` steps of size ``T/K``, iterated: ``p <- p - alpha a_s (p - c_s)``."""
    th, T, a, c, aq, cq = _mp(p)
    alpha = T / K
    x, dx = th, mpmath.mpf(1)
    for _ in range(K):
        x, dx = x - alpha * a * (x - c), dx * (1 - alpha * a)
    return dx * aq * (x - cq)


def close(a, b, rel):
    return abs(a - b) <= rel * max(abs(b), mpmath.mpf(10) ** -20)


def N(e):
    return mpmath.mpf(str(sp.N(e, DIGITS)))


def _steps(text: str) -> dict[str, str]:
    """``label -> "lhs = rhs"`` from :meth:`Derivation.text` (a ``# label`` line, then the formula)."""
    lines = text.splitlines()
    return {lines[i].strip()[2:]: lines[i + 1].strip() for i in range(len(lines) - 1) if lines[i].startswith("  # ")}


def at(d, expr, p, more=None):
    """``expr`` at the values ``p`` (and ``more``: {symbol: value}), substituted as 30-digit Floats.

    (Floats evaluate as they are substituted; exact rationals would leave exp() symbolic for evalf.)
    """
    subs = {s: sp.Float(v, DIGITS) for s, v in d.bind(p).items()}
    subs.update({s: sp.Float(v, DIGITS) for s, v in (more or {}).items()})
    out = sp.sympify(expr).xreplace(subs)
    return out.applyfunc(N) if isinstance(out, sp.MatrixBase) else N(out)


def test_scalar_flow_meta_loss_gradient_and_adjoint_equal_the_hand_solution():
    d = _flow(1)
    assert list(d.symbols) == NAMES1 and d.params == {"dim": 1}  # the docstring's names
    time = d.extras["time"]
    for p in POINTS1:
        pT, loss_h, grad_h, _ = hand_scalar(p)
        loss, grad = d.evaluate(p, digits=DIGITS)
        assert close(N(loss), loss_h, 1e-25) and close(N(grad[0]), grad_h, 1e-25)
        assert close(at(d, d.extras["flow_solution"][0], p), pT, 1e-25)
        assert close(at(d, d.extras["adjoint_gradient"][0], p), grad_h, 1e-25)
        for t in (0.0, 0.3, p["T"]):
            assert close(at(d, d.extras["adjoint_solution"][0], p, {time: t}), hand_scalar(p, t)[3], 1e-25)
    # SymPy must know the domains: T > 0 (a time horizon), K a positive integer (a step count),
    # t real; then the MAML gradient (real)^K and the adjoint are real for real inputs.
    assert (d.symbols["T"] > 0) is sp.true
    K = d.extras["steps_symbol"]
    assert (K >= 1) is sp.true and K.is_integer
    assert d.extras["maml_meta_gradient"][0].is_real is True
    assert d.extras["adjoint_solution"][0].is_real is True


def test_the_default_problem_is_the_scalar_one():
    """``derive gradient-flow-quadratic`` (no sizes; ``--list`` shows dim=1) is the scalar problem with the O(1/K) term."""
    d = gradient_flow_quadratic()
    assert d.params == {"dim": 1} and list(d.symbols) == NAMES1
    assert "maml_error_coefficient" in d.extras


def test_dim2_flow_against_scipy_expm():
    d = _flow(2)
    time = d.extras["time"]
    for p in POINTS2:
        A_s, A_q = np.array(p["A_s"]), np.array(p["A_q"])
        theta, c_s, c_q, T = np.array(p["theta"]), np.array(p["c_s"]), np.array(p["c_q"]), p["T"]
        E = scipy.linalg.expm(-A_s * T)
        pT = c_s + E @ (theta - c_s)
        r = pT - c_q
        a_T = A_q @ r

        def f(expr, more=None):
            return np.array(at(d, expr, p, more).tolist(), dtype=float).ravel()

        assert float(at(d, d.meta_loss, p)) == pytest.approx(r @ A_q @ r / 2, rel=1e-13)
        np.testing.assert_allclose(f(d.meta_gradient), E.T @ a_T, rtol=1e-13)
        np.testing.assert_allclose(f(d.extras["flow_solution"]), pT, rtol=1e-13)
        np.testing.assert_allclose(f(d.extras["adjoint_gradient"]), E.T @ a_T, rtol=1e-13)
        for t in (0.0, 0.25, T):
            np.testing.assert_allclose(f(d.extras["adjoint_solution"], {time: t}),
                                       scipy.linalg.expm(A_s * (t - T)) @ a_T, rtol=1e-13)


def _richardson_coefficient(p):
    """``lim K (g_K - g)`` from hand MAML at K = 256, 512, 1024: two Richardson levels (error O(K^-3))."""
    g = hand_scalar(p)[2]
    c = {K: K * (hand_maml_grad(p, K) - g) for K in (256, 512, 1024)}
    r1 = {K: 2 * c[2 * K] - c[K] for K in (256, 512)}
    return (4 * r1[512] - r1[256]) / 3


def test_maml_error_coefficient_is_the_limit_of_K_times_the_error_of_hand_maml():
    d = _flow(1)
    K = d.extras["steps_symbol"]
    shown = _steps(d.text())
    error_line = shown.pop("first-order error of MAML's meta-gradient")
    m = re.fullmatch(r"g_K - grad L = \(1/K\) \((.*)\) \+ O\(1/K\*\*2\)", error_line)
    assert m, error_line
    displayed = parse_expr(m.group(1), local_dict=dict(d.symbols))
    for p in POINTS1:
        estimate = _richardson_coefficient(p)
        assert close(at(d, d.extras["maml_error_coefficient"], p), estimate, 1e-6)
        assert close(at(d, displayed, p), estimate, 1e-6)
        # the K-step MAML gradient as a function of K, at K = 3
        assert close(at(d, d.extras["maml_meta_gradient"][0], p, {K: 3}), hand_maml_grad(p, 3), 1e-25)


_TRANSFORMS = standard_transformations + (implicit_multiplication, implicit_application)


@pytest.mark.parametrize("dim", [1, 2])
def test_displayed_steps_state_the_flow_and_its_adjoint(dim):
    """The text formulas, parsed back, are CONVENTIONS' equations; for dim = 2 they reduce to the scalar ones."""
    d = _flow(dim)
    text, tex = d.text(), d.latex()
    # plain text has no LaTeX in it; LaTeX braces every subscript (as SymPy's renderer does)
    assert not set(text) & set("\\{}"), text
    assert re.search(r"(?<!\\)_(?!\{)", tex) is None, tex
    # symbols by the names the problem has: scalars a_s, a_q for dim 1, the matrices A_s, A_q otherwise
    scalar, matrix = ("a_{s}", "a_{q}"), ("A_{s}", "A_{q}")
    if dim == 1:
        assert d.latex_names[d.symbols["a_s"]] == "a_{s}" and d.latex_names[d.symbols["a_q"]] == "a_{q}"
    shown_names, other_names = (scalar, matrix) if dim == 1 else (matrix, scalar)
    assert all(n in tex for n in shown_names) and not any(n in tex for n in other_names), tex

    th, T, a, c, aq, cq = sp.symbols("theta T a_s c_s a_q c_q", real=True)
    t, K, P, A = sp.symbols("t K p a", real=True)
    x = sp.Dummy("x")
    flow_at = sp.Lambda(x, c + sp.exp(-a * x) * (th - c))  # hand solution p(x)
    names = dict(theta=th, T=T, c_s=c, c_q=cq, t=t, K=K, I=sp.Integer(1), exp=sp.exp)
    names.update({"a_s": a, "a_q": aq} if dim == 1 else {"A_s": a, "A_q": aq})

    def parse(s: str, **extra) -> sp.Expr:
        return parse_expr(s, local_dict={**names, **extra}, transformations=_TRANSFORMS)

    p = POINTS1[0]
    point = {th: p["theta"], T: p["T"], a: p["a_s"], c: p["c_s"], aq: p["a_q"], cq: p["c_q"], t: 0.3, P: 0.625, A: 1.75}
    point = {k: sp.Rational(v) for k, v in point.items()}

    def value(e: sp.Expr):
        assert e.free_symbols <= set(point), f"{e} has unknown names {e.free_symbols - set(point)}"
        return N(e.xreplace(point))

    pT, _, grad_h, adj_h = hand_scalar(p, 0.3)
    a_T = N((aq * (flow_at(T) - cq)).xreplace(point))
    steps = _steps(text)

    def last(line: str, clause: int = 0) -> str:
        return line.split(", ")[clause].split(" = ")[-1]

    flow_line = steps.pop("gradient flow on the support loss")
    assert flow_line.startswith("dp/dt = ")
    grad_s = sp.diff(a * (P - c) ** 2 / 2, P)  # L_s(p) = a_s/2 (p - c_s)^2
    assert close(value(parse(last(flow_line), p=P)), value(-grad_s), 1e-25)  # -grad L_s(p)
    assert parse(last(flow_line, 1)) == th  # p(0) = theta
    solution = steps.pop("solution (matrix exponential)")
    assert solution.startswith("p(T) = ") and close(value(parse(last(solution))), pT, 1e-25)
    assert steps.pop("meta-loss") == "L(theta) = L_q(p(T))"
    adjoint_eq = steps.pop("adjoint system, integrated from T back to 0")
    assert adjoint_eq.startswith("da/dt = ")
    assert close(value(parse(last(adjoint_eq), a=A)), value(sp.diff(grad_s, P) * A), 1e-25)  # H_s a
    assert close(value(parse(last(adjoint_eq, 1), p=flow_at)), a_T, 1e-25)  # a(T) = grad L_q(p(T))
    # dim 1: sympy.dsolve's solution, explicit in the problem's symbols; dim 2: exp(A_s (t - T)) a(T)
    label = "adjoint solution (sympy.dsolve)" if dim == 1 else "adjoint solution"
    assert label in steps, list(steps)
    adjoint = steps.pop(label)
    assert adjoint.startswith("a(t) = ")
    rhs = adjoint.removeprefix("a(t) = ")
    if dim == 2:
        rhs = rhs.replace("a(T)", "(a_T)")
    assert close(value(parse(rhs, a_T=aq * (flow_at(T) - cq))), adj_h, 1e-25)
    meta_gradient = steps.pop("meta-gradient")
    assert meta_gradient.startswith("grad L = a(0) = ")
    assert close(value(parse(last(meta_gradient), p=flow_at)), grad_h, 1e-25)
    explicit = steps.pop("explicitly")
    if dim == 1:
        assert close(value(parse(last(explicit))), grad_h, 1e-25)
    maml = steps.pop("MAML with K steps of size alpha = T/K (explicit Euler)")
    assert maml.startswith("p_K = ") and maml.endswith(" -> p(T) as K -> oo")
    p_K = parse(maml.removeprefix("p_K = ").split(" -> ")[0])
    # three explicit-Euler steps by hand
    x3, alpha = p["theta"], sp.Rational(p["T"]) / 3
    for _ in range(3):
        x3 = x3 - alpha * sp.Rational(p["a_s"]) * (x3 - sp.Rational(p["c_s"]))
    assert close(value(p_K.xreplace({K: 3})), N(x3), 1e-25)
    # the O(1/K) coefficient is derived for dim 1 only (checked above); nothing else is shown
    assert list(steps) == (["first-order error of MAML's meta-gradient"] if dim == 1 else [])
