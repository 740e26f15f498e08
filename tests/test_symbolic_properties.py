"""reference.symbolic, fast tests of the registry, the size checks and the display helpers (issue 19:
each well under a second and free of SymPy simplification, so the mutation runner's per-mutant budget
reaches them; the derivations themselves are checked in test_symbolic*.py against independent sources)."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest
import sympy as sp

from reference.errors import InvalidInputError
from reference.symbolic import LIMITS, PROBLEMS, get_problem
from reference.symbolic._common import check_size, quadratic_symbols, scalar_or_matrix
from reference.symbolic._derivation import SymbolTable


def test_problems_are_immutable_and_summarised_by_their_docstring_opening():
    prob = PROBLEMS["quadratic-maml"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        prob.name = "x"  # type: ignore[misc]
    multi = 0
    for name, p in PROBLEMS.items():
        doc = inspect.getdoc(p.constructor)
        assert p.summary and "\n" not in p.summary and doc.startswith(p.summary), name
        multi += len(doc.splitlines()) > 1
    assert multi >= 10  # most docstrings go on: the summary is their first line only


def test_unknown_names_list_the_three_closest():
    with pytest.raises(InvalidInputError) as err:
        get_problem("quadratic")  # at least four registered names are close to this one
    hint = re.search(r"did you mean (.*)\?\)", str(err.value)).group(1)
    names = re.findall(r"'([a-z-]+)'", hint)
    assert len(names) == 3 and all(n in PROBLEMS and n.startswith("quadratic-") for n in names), hint


@pytest.mark.parametrize("problem", sorted(LIMITS))
def test_every_size_is_accepted_at_its_limit_and_refused_above(problem):
    for size, limit in LIMITS[problem].items():
        assert check_size(problem, size, limit) == limit
        assert check_size(problem, size, 1) == 1
        with pytest.raises(InvalidInputError, match=rf"{size}={limit + 1} is too large for {problem}"):
            check_size(problem, size, limit + 1)


def test_quadratic_symbols_are_scalars_in_one_dimension_and_arrays_above():
    one = SymbolTable()
    q1 = quadratic_symbols(one, 1)
    assert [one.latex_names[m[0, 0]] for m in (q1.A_s, q1.c_s, q1.A_q, q1.c_q)] == ["a_{s}", "c_{s}", "a_{q}",
                                                                                    "c_{q}"]
    two = SymbolTable()
    q2 = quadratic_symbols(two, 2, query=False)
    assert two.latex_names[q2.A_s[0, 1]] == "a^{(s)}_{01}" and two.latex_names[q2.c_s[1]] == "c^{(s)}_{1}"
    assert q2.A_s[1, 0] == q2.A_s[0, 1] and q2.A_q is None  # symmetric; no query task when query=False


def test_scalar_or_matrix_unwraps_only_1x1():
    x, y = sp.symbols("x y")
    assert scalar_or_matrix(sp.Matrix([[x]])) == x
    col = sp.Matrix([x, y])
    assert scalar_or_matrix(col) is col



def test_tidy_factors_only_one_dimensional_entries():
    from reference.symbolic._common import tidy

    x = sp.Symbol("x")
    m = sp.Matrix([x**2 + 2 * x + 1])
    assert tidy(m, 1)[0, 0] == (x + 1) ** 2  # factored for display
    assert tidy(m, 2) is m  # larger problems: left as computed (factoring would cost more than it shows)


def test_size_limits_are_the_documented_ones():
    """docs/derive.md states every problem's largest sizes (a user contract: the CLI refuses beyond them)."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "derive.md").read_text(encoding="utf-8")
    table = {}
    for row in re.findall(r"^\| `([a-z0-9-]+)` \|.*\| (`.*`) \|$", doc, flags=re.M):
        table[row[0]] = {k: int(v) for k, v in re.findall(r"`([a-z]+) <= (\d+)`", row[1])}
    assert table == LIMITS


# --------------------------------------------------------------------------------------------
# the Derivation object's conversions and evaluators, on a small hand-built derivation


def test_to_exact_parses_strings_and_complex_numbers_exactly():
    from reference.symbolic import to_exact

    assert to_exact("3/8") == sp.Rational(3, 8)
    assert to_exact("0.1") == sp.Rational(1, 10)  # parsed as the decimal, not the nearest double
    assert to_exact(1.5 - 0.25j) == sp.Rational(3, 2) - sp.I / 4
    with pytest.raises(InvalidInputError, match="is not a number SymPy can parse"):
        to_exact("3/")


def _small_derivation():
    from reference.symbolic._derivation import Derivation

    t = SymbolTable()
    th = t.vector("theta", 2, r"\theta")
    a, b = t.scalar("a", "a"), t.scalar("b", "b")
    s = t.scalar("s", "s")
    arrays = dict(t.arrays, N=sp.Matrix([[a, 5, b]]), S=sp.Matrix([[s]]))  # N has a constant entry, then b
    loss = a * th[0] ** 2 + b * th[1] + s * th[0] * th[1]
    grad = sp.Matrix([sp.diff(loss, v) for v in (th[0], th[1], a, b)])
    return Derivation(name="small", params={}, title="t", summary="s", symbols=t.symbols, arrays=arrays,
                      wrt=[("theta", (2,)), ("ab", (1, 2))], wrt_symbols=[th[0], th[1], a, b], meta_loss=loss,
                      meta_gradient=grad, steps=[])


def test_binding_and_float_evaluation_by_array_name():
    d = _small_derivation()
    values = dict(theta=[0.5, -2.0], N=[[3.0, 5.0, 0.25]], S=0.75)  # S is a 1x1 array given as a scalar
    subs = d.bind(values)
    assert subs == {d.symbols["theta_0"]: sp.Rational(1, 2), d.symbols["theta_1"]: -2, d.symbols["a"]: 3,
                    d.symbols["b"]: sp.Rational(1, 4), d.symbols["s"]: sp.Rational(3, 4)}
    loss, grad = d.numeric()(**values)
    th0, th1, a, b, s = 0.5, -2.0, 3.0, 0.25, 0.75
    assert loss == pytest.approx(a * th0**2 + b * th1 + s * th0 * th1, rel=1e-15)
    assert grad == pytest.approx([2 * a * th0 + s * th1, b + s * th0, th0**2, th1], rel=1e-15)
    parts = d.split_gradient(grad)
    assert [p.shape for p in parts] == [(2,), (1, 2)] and parts[0].dtype == float
    assert parts[0].tolist() == list(grad[:2]) and parts[1].tolist() == [list(grad[2:])]


def test_sympy_code_rebuilds_the_expressions_even_with_one_symbol():
    from reference.symbolic._derivation import Derivation

    for names in (["x"], ["x", "y"]):
        syms = [sp.Symbol(n, real=True) for n in names]
        loss = sum(v**2 for v in syms) + 3 * syms[0]
        d = Derivation(name="tiny", params={}, title="t", summary="s", symbols=dict(zip(names, syms)), arrays={},
                       wrt=[("x", (len(names),))], wrt_symbols=syms, meta_loss=loss,
                       meta_gradient=sp.Matrix([sp.diff(loss, v) for v in syms]), steps=[])
        scope: dict = {}
        exec(d.sympy_code(), scope)
        assert sp.simplify(scope["meta_loss"] - loss) == 0 and scope["meta_gradient"] == d.meta_gradient


def test_chain_gradient_skips_unused_definitions():
    """Reverse mode through definitions, one of them unused: equals differentiating the substituted expression."""
    from reference.symbolic import chain_gradient

    x, y, u, v = sp.symbols("x y u v", real=True)
    defs = [(v, x * y), (u, x**2)]  # u is defined last and never used
    grad, _ = chain_gradient(v**2 + y, defs, [x, y])
    direct = [sp.diff((x * y) ** 2 + y, w) for w in (x, y)]
    assert all(sp.expand(g - dg) == 0 for g, dg in zip(_substituted(grad, _), direct))


def _substituted(grad, adjoint_defs):
    out = list(grad)
    for sym, expr in reversed(adjoint_defs):
        out = [e.subs(sym, expr) for e in out]
    return [sp.expand(e.subs({sp.Symbol("v", real=True): sp.Symbol("x", real=True) * sp.Symbol("y", real=True)}))
            for e in out]


def test_derivation_checks_its_definitions_and_evaluates_extras():
    from reference.symbolic._derivation import Derivation

    x, z, u = sp.symbols("x z u", real=True)
    common = dict(name="tiny", params={}, title="t", summary="s", symbols={"x": x}, arrays={}, wrt=[("x", (1,))],
                  wrt_symbols=[x], steps=[])
    with pytest.raises(AssertionError, match=r"definition of u uses undefined \{z\}"):
        Derivation(**common, meta_loss=u, meta_gradient=sp.Matrix([0]), definitions=[(u, x * z)])
    d = Derivation(**common, meta_loss=x**2, meta_gradient=sp.Matrix([2 * x]),
                   extras={"scalar": sp.pi * x, "matrix": sp.Matrix([[sp.pi * x, x]])})
    s = d.evaluate_extra("scalar", x=0.5, digits=30)
    half_pi = sp.N(sp.pi / 2, 40)
    assert isinstance(s, sp.Float) and abs(s - half_pi) < 1e-28
    m = d.evaluate_extra("matrix", x=0.5, digits=30)
    assert m.shape == (1, 2) and isinstance(m[0, 0], sp.Float) and abs(m[0, 0] - half_pi) < 1e-28
    assert abs(m[0, 1] - sp.Rational(1, 2)) < 1e-28
