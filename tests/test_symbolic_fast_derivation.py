"""reference.symbolic's Derivation object on small hand-built derivations (issue 19: fast, each well under a
second, so the mutation runner's per-mutant budget reaches them).

Expected values come from the definitions the docstrings state: the display rule of ``MAX_DISPLAY_NODES``
(docs/derive.md: a right-hand side of more than 800 expression-tree nodes is omitted), LaTeX's special
characters, C order, the chain rule checked against SymPy's direct differentiation of the substituted
expression, and the error messages' ``name=value`` contract.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

from reference.errors import InvalidInputError
from reference.symbolic import Derivation, Step, chain_gradient
from reference.symbolic._derivation import SymbolTable, flat_symbols

#: docs/derive.md, "Display": right-hand sides of at most this many nodes are shown in latex()/text().
DOCUMENTED_DISPLAY_NODES = int(re.search(r"more than (\d+) SymPy expression-tree nodes", re.sub(r"\s+", " ", (
    Path(__file__).resolve().parents[1] / "docs" / "derive.md").read_text(encoding="utf-8"))).group(1))
OMITTED = "omitted here"


def _toy(**overrides) -> Derivation:
    """``theta`` (a 1x1 column whose symbol is also called theta), ``alpha``, a symmetric 2x2 ``A``, a column ``v``."""
    t = SymbolTable()
    theta = t.vector("theta", 1, r"\theta")[0]
    alpha = t.scalar("alpha", r"\alpha")
    A = t.matrix("a", 2, 2, "a", array="A", symmetric=True)
    v = t.vector("v", 2, "v")
    loss = alpha * theta**2 + (v.T * A * v)[0, 0] * theta
    wrt = [theta, v[0], v[1]]
    kwargs = dict(name="toy", params={"n": 1}, title="A toy", summary="A toy problem.", symbols=t.symbols,
                  arrays=t.arrays, wrt=[("theta", (1,)), ("v", (2,))], wrt_symbols=wrt, meta_loss=loss,
                  meta_gradient=sp.Matrix([sp.diff(loss, s) for s in wrt]), steps=[], latex_names=t.latex_names)
    kwargs.update(overrides)
    return Derivation(**kwargs)


VALUES = dict(theta=0.5, alpha=-0.75, A=[[1.5, 0.25], [0.25, -2.0]], v=[0.125, 3.0])


def _loss_by_hand(theta, alpha, A, v):
    A, v = np.asarray(A), np.asarray(v)
    return alpha * theta**2 + v @ A @ v * theta


# -- display -------------------------------------------------------------------------------------------------


def _sum_of_symbols(n: int, prefix: str = "x") -> sp.Expr:
    """An Add of ``n`` distinct symbols: exactly ``n + 1`` expression-tree nodes (the Add and its leaves)."""
    return sp.Add(*sp.symbols(f"{prefix}_0:{n}"))


def test_a_right_hand_side_of_exactly_800_nodes_is_shown_and_801_omitted():
    n = DOCUMENTED_DISPLAY_NODES
    shown, omitted = _sum_of_symbols(n - 1), _sum_of_symbols(n)
    # the same limits for a matrix: nodes are counted over all its entries
    m_shown = sp.Matrix([_sum_of_symbols(n // 2 - 1, "y"), _sum_of_symbols(n // 2 - 1, "z")])
    m_omitted = sp.Matrix([_sum_of_symbols(n // 2 - 1, "y"), _sum_of_symbols(n // 2, "z")])
    d = _toy(steps=[Step("big", ("B", "B"), shown), Step("bigger", ("C", "C"), omitted),
                    Step("matrix", ("M", "M"), m_shown), Step("matrix, bigger", ("N", "N"), m_omitted),
                    Step("small", ("s", "s"), sp.Symbol("x_0") + 1)])
    latex_lines = d.latex().splitlines()[1:-1]
    text = d.text()
    # text(): each step is "  # label" then "  LHS = rhs" (a matrix's rhs spans several lines)
    text_lines = re.split(r"\n  # [a-z, ]+\n", text.split("\n\ngradient layout")[0])[1:]
    assert len(latex_lines) == len(text_lines) == 5
    assert [line.split(" = ")[0] for line in text_lines] == ["  B", "  C", "  M", "  N", "  s"]
    for lines, sub in ((latex_lines, "x_{{{}}}"), (text_lines, "x_{}")):
        assert OMITTED not in lines[0] and sub.format(n - 2) in lines[0]
        assert OMITTED in lines[1] and sub.format(0) not in lines[1]
        assert OMITTED not in lines[2] and sub.replace("x", "z").format(n // 2 - 2) in lines[2]
        assert OMITTED in lines[3] and sub.replace("x", "y").format(0) not in lines[3]
        assert OMITTED not in lines[4] and sub.format(0) in lines[4]


def test_latex_and_text_show_their_own_half_of_hand_written_steps_and_escape_labels():
    label = r"a_b 50% {x} & #1 $ ^ \ end"
    d = _toy(steps=[Step(label, ("L", "L_txt"), (r"\frac{1}{2}", "1/2 in text")),
                    Step("", ("R", "R_txt"), sp.Symbol("alpha", real=True) + 1)])
    latex = d.latex()
    assert latex.startswith("\\begin{aligned}\n") and latex.endswith("\n\\end{aligned}")
    first, second = latex.splitlines()[1:3]
    # LaTeX's special characters inside \text{...}: \ _ % & # $ { } ^
    escaped = r"a\_b 50\% \{x\} \& \#1 \$ \^{} \textbackslash  end"
    assert first == rf"L &= \frac{{1}}{{2}} && \text{{{escaped}}} \\"
    assert second == r"R &= 1 + \alpha"  # no label: no "&&" column; SymPy rhs with the LaTeX name of alpha
    text = d.text().splitlines()
    i = text.index(f"  # {label}")
    assert text[i + 1] == "  L_txt = 1/2 in text"
    assert text[i + 2] == "  R_txt = 1 + alpha"  # unlabelled step: no comment line before it
    assert sum(line.startswith("  #") for line in text) == 1


def test_text_notes_a_direction_that_is_not_a_gradient():
    default = _toy()
    assert default.is_gradient is True and "note:" not in default.text()
    assert default.text().splitlines()[-1] == "gradient layout (flat, C order): theta[1], v[2]"
    direction = _toy(is_gradient=False)
    assert direction.text().splitlines()[-1] == (
        "note: meta_gradient is the algorithm's defined direction, not the gradient of meta_loss")


def test_latex_uses_the_latex_names_given():
    alpha = sp.Symbol("alpha", real=True)
    d = _toy(steps=[Step("", ("a", "a"), alpha)], latex_names={alpha: r"\hat{a}"})
    assert d.latex().splitlines()[1] == r"a &= \hat{a}"
    assert _toy(steps=[Step("", ("a", "a"), alpha)], latex_names=None).latex().splitlines()[1] == r"a &= \alpha"


def test_steps_are_immutable():
    step = Step("label", ("a", "a"), ("b", "b"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        step.label = "changed"  # type: ignore[misc]
    assert hash(step) == hash(Step("label", ("a", "a"), ("b", "b")))  # frozen dataclass: hashable by value


# -- construction checks --------------------------------------------------------------------------------------


def test_a_gradient_that_does_not_match_the_layout_is_a_constructor_bug():
    x, y = sp.symbols("x y", real=True)
    common = dict(name="bad", params={}, title="t", summary="s", symbols={"x": x, "y": y}, arrays={},
                  meta_loss=x * y, steps=[])
    with pytest.raises(AssertionError, match="does not match the layout"):  # gradient too short
        Derivation(**common, wrt=[("p", (2,))], wrt_symbols=[x, y], meta_gradient=sp.Matrix([y]))
    with pytest.raises(AssertionError, match="does not match the layout"):  # too few wrt symbols
        Derivation(**common, wrt=[("p", (2,))], wrt_symbols=[x], meta_gradient=sp.Matrix([y, x]))
    Derivation(**common, wrt=[("p", (2,))], wrt_symbols=[x, y], meta_gradient=sp.Matrix([y, x]))


def test_definitions_may_use_every_known_symbol_and_are_substituted_everywhere():
    x = sp.Symbol("x", real=True)
    u, w = sp.symbols("u w", real=True)
    # u uses all the known symbols ({x}); w uses x and u
    d = Derivation(name="defs", params={}, title="t", summary="s", symbols={"x": x}, arrays={}, wrt=[("x", (1,))],
                   wrt_symbols=[x], meta_loss=w + u, meta_gradient=sp.Matrix([3 * u / x + 1]),
                   steps=[], definitions=[(u, x**3), (w, u + x)])
    assert sp.expand(d.meta_loss - (2 * x**3 + x)) == 0
    assert sp.expand(d.meta_gradient[0] - (3 * x**2 + 1)) == 0
    loss, grad = d.numeric()(x=2.0)  # staged float evaluation through u and w
    assert loss == 18.0 and grad.tolist() == [13.0]
    exact_loss, exact_grad = d.evaluate(x="1/2")
    assert exact_loss == sp.Rational(3, 4) and exact_grad[0] == sp.Rational(7, 4)
    with pytest.raises(AssertionError, match="definition of u uses undefined"):
        Derivation(name="defs", params={}, title="t", summary="s", symbols={"x": x}, arrays={}, wrt=[("x", (1,))],
                   wrt_symbols=[x], meta_loss=u, meta_gradient=sp.Matrix([1]), steps=[], definitions=[(u, w * x)])


# -- binding and numeric evaluation ---------------------------------------------------------------------------


def test_bind_and_numeric_accept_arrays_and_scalars_alike():
    d = _toy()
    expected = _loss_by_hand(**VALUES)
    f = d.numeric()
    for theta in (0.5, [0.5], [[0.5]], np.float64(0.5)):  # a 1x1 column as a scalar, 1-D or 2-D
        subs = d.bind(VALUES, theta=theta)
        assert subs[d.symbols["theta"]] == sp.Rational(1, 2)
        assert float(d.meta_loss.xreplace(subs)) == pytest.approx(expected, rel=1e-15)
        loss, grad = f(VALUES, theta=theta)
        assert loss == pytest.approx(expected, rel=1e-15)
    # v as a 2-D column is the same as 1-D
    assert d.bind(VALUES, v=[[0.125], [3.0]]) == d.bind(VALUES)


def test_bind_names_the_key_the_user_gave():
    d = _toy()
    with pytest.raises(InvalidInputError, match=r"^theta=nan must be finite"):
        d.bind(VALUES, theta=float("nan"))
    with pytest.raises(InvalidInputError, match=r"^theta=None must be a number"):
        d.bind(VALUES, theta=None)
    with pytest.raises(InvalidInputError, match=r"^alpha=\[0\.5\] must be a number"):
        d.bind(VALUES, alpha=[0.5])
    with pytest.raises(InvalidInputError, match=r"^A\[1, 0\]=0\.5 conflicts with 1/4"):
        d.bind(VALUES, A=[[1.5, 0.25], [0.5, -2.0]])


@pytest.mark.parametrize("key, value, shape, expected", [
    ("v", [[0.125, 3.0]], (1, 2), (2, 1)),  # a row for a column: refused, not transposed
    ("theta", [0.5, 0.25], (2, 1), (1, 1)),  # two values for a 1x1 array
    ("A", [1.5, 0.25, 0.25, -2.0], (4,), (2, 2)),  # a flat matrix
    ("A", 0.5, (), (2, 2)),
])
def test_bind_and_numeric_refuse_a_misshapen_array_with_both_shapes(key, value, shape, expected):
    message = rf"^{key} has shape {re.escape(str(shape))}, expected {re.escape(str(expected))}$"
    with pytest.raises(InvalidInputError, match=message):
        _toy().bind(VALUES, **{key: value})
    with pytest.raises(InvalidInputError, match=message):
        _toy().numeric()(VALUES, **{key: value})


def test_numeric_never_evaluates_a_missing_value_as_nan():
    f = _toy().numeric()
    with pytest.raises(InvalidInputError, match=r"^theta=None must be a real number"):
        f(VALUES, theta=None)
    with pytest.raises(InvalidInputError, match=r"^alpha='fast' must be a real number"):
        f(VALUES, alpha="fast")
    with pytest.raises(InvalidInputError, match=r"^A=\[\['a', 'b'\], \['c', 'd'\]\] must be an array of real numbers of "
                                                r"shape \(2, 2\)"):
        f(VALUES, A=[["a", "b"], ["c", "d"]])
    with pytest.raises(InvalidInputError, match=r"no value given for \['alpha'\]"):
        f({k: v for k, v in VALUES.items() if k != "alpha"})


# -- helpers: symbol tables, C order, reverse mode ------------------------------------------------------------


def test_symbol_table_matrices_scalars_and_symmetry():
    t = SymbolTable()
    one = t.matrix("a", 1, 1, "a")
    assert one.shape == (1, 1) and one[0, 0].name == "a" and t.latex_names[one[0, 0]] == "a"
    kept = t.matrix("k", 1, 1, "k", scalar_if_1x1=False)
    assert kept[0, 0].name == "k_0_0" and t.latex_names[kept[0, 0]] == "k_{00}"
    sym = t.matrix("s", 2, 2, "s", symmetric=True)
    assert [[e.name for e in sym.row(i)] for i in range(2)] == [["s_0_0", "s_0_1"], ["s_0_1", "s_1_1"]]
    assert sym == sym.T
    rect = t.matrix("r", 2, 3, "r", array="R")
    assert [e.name for e in rect] == [f"r_{i}_{j}" for i in range(2) for j in range(3)]
    assert t.arrays["R"] is rect and list(t.symbols).count("s_1_0") == 0
    with pytest.raises(AssertionError, match="defined twice"):
        t.scalar("a")


def test_flat_symbols_are_in_c_order():
    rect = sp.Matrix(2, 3, lambda i, j: sp.Symbol(f"r{i}{j}"))
    col = sp.Matrix(sp.symbols("c0 c1 c2"))
    row = sp.Matrix([sp.symbols("w0 w1")])
    assert [s.name for s in flat_symbols(rect, col, row)] == ["r00", "r01", "r02", "r10", "r11", "r12", "c0", "c1",
                                                              "c2", "w0", "w1"]


@pytest.mark.parametrize("sign", [1, -1])
def test_chain_gradient_through_a_chain_equals_direct_differentiation(sign):
    """Adjoints of exactly +1 and -1 (the output is +-u) and a definition used by a later one."""
    x, y = sp.symbols("x y", real=True)
    p, q, u = sp.symbols("p q u", real=True)
    defs = [(p, x**2 * y), (q, p + sp.sin(x)), (u, q * p + y)]
    names: dict = {p: "p"}
    grad, adjoints = chain_gradient(sign * u, defs, [x, y], names)
    substitute = {}
    for sym, expr in defs:
        substitute[sym] = expr.xreplace(substitute)
    full = {}  # the adjoint definitions come in evaluation order: later ones use earlier ones
    for sym, expr in defs + adjoints:
        full[sym] = expr.xreplace(full)
    direct = [sp.diff(sign * substitute[u], w) for w in (x, y)]
    assert all(sp.expand(g.xreplace(full) - dg) == 0 for g, dg in zip(grad, direct))
    assert names[sp.Symbol("bar_p")] == r"\bar{p}" and names[sp.Symbol("bar_q")] == r"\bar{q}"
