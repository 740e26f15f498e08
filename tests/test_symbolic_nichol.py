"""Nichol et al. 2018, section 5: the MAML / FOMAML / Reptile updates as series in alpha, verified symbolically.

For general polynomial losses with symbolic coefficients, the exact update's
Taylor coefficients in alpha (SymPy) must equal the paper's formula in
``gbar_i, Hbar_i``, and the average over minibatch orderings must equal the
paper's expected form with AvgGrad and AvgGradInner. Both sides are built
independently (iterating the SGD steps vs. writing the paper's sums).
"""

from __future__ import annotations


import numpy as np
import pytest
import sympy as sp

from reference.symbolic import derive

# Not cached across tests (SymPy's own cache makes a rebuild cheap): the mutation runner selects tests
# by per-test coverage, and a derivation built once would be attributed to the first test only.
_derive = derive
ALGORITHMS = ("maml", "fomaml", "reptile")


def expands_to_zero(m: sp.Matrix) -> bool:
    return all(sp.expand(e) == 0 for e in m)


FAST = [(a, dim, k) for a in ALGORITHMS for dim, k in [(1, 2), (1, 3), (2, 2)]]
SLOW = [(a, 2, 3) for a in ALGORITHMS]


@pytest.mark.parametrize("algorithm, dim, k", FAST + [pytest.param(*c, marks=pytest.mark.slow) for c in SLOW])
def test_series_in_alpha_matches_the_paper(algorithm, dim, k):
    d = _derive(f"nichol-{algorithm}", dim=dim, steps=k)
    assert expands_to_zero(d.extras["series"] - d.extras["paper_series"])
    assert expands_to_zero(d.extras["expected_series"] - d.extras["expected_paper"])
    assert expands_to_zero(d.extras["avg_grad_inner"] - d.extras["avg_grad_inner_as_gradient"])


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_series_with_quartic_losses(algorithm):
    d = _derive(f"nichol-{algorithm}", dim=2, steps=3, degree=4)
    assert expands_to_zero(d.extras["series"] - d.extras["paper_series"])
    assert expands_to_zero(d.extras["expected_series"] - d.extras["expected_paper"])


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_sympy_series_agrees_with_the_taylor_coefficients(algorithm):
    """An independent route: sympy.series of the exact update, truncated at O(alpha^2)."""
    d = _derive(f"nichol-{algorithm}", dim=1, steps=2)
    alpha = d.symbols["alpha"]
    s = sp.series(d.meta_gradient[0], alpha, 0, 2).removeO()
    assert sp.expand(s - d.extras["series"][0]) == 0


def test_the_three_updates_differ_at_first_order():
    """The check has teeth: the paper's formulas are distinct, and a wrong factor fails."""
    maml, fomaml = (_derive(f"nichol-{a}", dim=1, steps=2) for a in ("maml", "fomaml"))
    assert not expands_to_zero(maml.extras["series"] - fomaml.extras["series"])
    # MAML's expected form has 2(k-1) = 2 times AvgGradInner; 1 times is wrong.
    alpha = maml.symbols["alpha"]
    wrong = maml.extras["avg_grad"] - alpha * maml.extras["avg_grad_inner"]
    assert not expands_to_zero(maml.extras["expected_series"] - wrong)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_remainder_is_second_order_numerically(algorithm):
    """|exact(alpha) - series(alpha)| shrinks 4x when alpha halves (O(alpha^2) remainder)."""
    d = _derive(f"nichol-{algorithm}", dim=2, steps=2)
    rng = np.random.default_rng(0)
    point = {s: sp.Rational(int(rng.integers(-16, 17)), 16) for n, s in d.symbols.items() if n != "alpha"}
    alpha = d.symbols["alpha"]
    exact = sp.lambdify(alpha, d.meta_gradient.xreplace(point))
    series = sp.lambdify(alpha, d.extras["series"].xreplace(point))
    errs = [np.linalg.norm(np.asarray(exact(a), float) - np.asarray(series(a), float)) for a in (1e-2, 5e-3, 2.5e-3)]
    ratios = [errs[0] / errs[1], errs[1] / errs[2]]
    assert all(3.5 < r < 4.5 for r in ratios), (errs, ratios)


def test_reptile_update_is_the_scaled_parameter_difference():
    d = _derive("nichol-reptile", dim=1, steps=3)
    alpha = d.symbols["alpha"]
    phi = d.extras["iterates"]
    assert sp.expand((phi[0] - phi[3]) / alpha - d.meta_gradient)[0] == 0
    assert not d.is_gradient and _derive("nichol-maml", dim=1, steps=3).is_gradient


def test_maml_update_is_the_gradient_of_the_meta_loss():
    d = _derive("nichol-maml", dim=2, steps=2)
    direct = sp.Matrix([sp.diff(d.meta_loss, s) for s in d.wrt_symbols])
    assert expands_to_zero(direct - d.meta_gradient)
