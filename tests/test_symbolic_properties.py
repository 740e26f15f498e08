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
