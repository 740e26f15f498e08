"""bandit-maml-rl: the SymPy closed form against the NumPy reference (reference.rl) at rational points."""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp

from reference.rl import exact_bias, meta_objective_and_gradient, two_armed_bandit
from reference.symbolic import bandit_maml_rl, derive

# Dyadic rationals: exactly representable, so SymPy and NumPy see the same numbers.
POINTS = [
    dict(theta=[0.25, -0.5], r=[1.0, 0.375], alpha=0.75),
    dict(theta=[-1.125, 0.5], r=[-0.5, 2.0], alpha=1.5),
    # dict(theta=[0.0, 0.0], r=[3.0, -1.25], alpha=0.125) is covered by test_symmetric_point below
]
MATCH = 1e-13  # float64 evaluation of a few exp/softmax layers against 40-digit values


def _num(expr_or_mat, subs):
    return np.array(sp.Matrix(expr_or_mat).xreplace(subs).evalf(40), dtype=float).ravel()


@pytest.fixture(scope="module", params=[1, 2])
def derivation(request):
    return bandit_maml_rl(request.param)


@pytest.mark.parametrize("point", POINTS)
def test_numpy_reference_matches_the_closed_form(derivation, point):
    n = derivation.params["batch"]
    subs = derivation.bind(point)
    mdp = two_armed_bandit(point["r"])
    J, g = meta_objective_and_gradient(mdp, np.array(point["theta"]), point["alpha"], n)
    J_exact = float(derivation.meta_loss.xreplace(subs).evalf(40))
    g_exact = _num(derivation.meta_gradient, subs)
    assert abs(J - J_exact) <= MATCH * max(1.0, abs(J_exact))
    assert np.linalg.norm(g - g_exact) <= MATCH * max(1.0, np.linalg.norm(g_exact))


@pytest.mark.parametrize("point", POINTS)
def test_original_bias_matches_the_closed_form(derivation, point):
    n = derivation.params["batch"]
    subs = derivation.bind(point)
    bias_sym = _num(derivation.extras["bias_original"], subs)  # E[est] - grad J, both by SymPy
    bias_formula = _num(derivation.extras["bias_formula"], subs)  # -E[V(theta') grad log p(D)]
    assert np.linalg.norm(bias_sym - bias_formula) <= 1e-30 + 1e-25 * np.linalg.norm(bias_formula)
    mdp = two_armed_bandit(point["r"])
    _, _, bias = exact_bias(mdp, np.array(point["theta"]), point["alpha"], n, "maml-original")
    assert np.linalg.norm(bias - bias_formula) <= MATCH * max(1.0, np.linalg.norm(bias_formula))
    assert np.linalg.norm(bias_formula) > 1e-3  # the bias is really there


def test_bias_formula_vanishes_at_alpha_zero_symbolically():
    d = bandit_maml_rl(1)
    at_zero = d.extras["bias_formula"].xreplace({d.symbols["alpha"]: 0}).applyfunc(sp.simplify)
    assert at_zero == sp.zeros(2, 1)


def test_registered_for_the_cli():
    d = derive("bandit-maml-rl", batch=2)
    assert d.params == {"batch": 2} and "MAML-RL" in d.title


def test_symmetric_point():
    """theta_0 = theta_1 (pi = 1/2), a third point at a different scale of rewards and alpha."""
    d = bandit_maml_rl(1)
    point = dict(theta=[0.0, 0.0], r=[3.0, -1.25], alpha=0.125)
    subs = d.bind(point)
    _, g = meta_objective_and_gradient(two_armed_bandit(point["r"]), np.zeros(2), point["alpha"], 1)
    g_exact = _num(d.meta_gradient, subs)
    assert np.linalg.norm(g - g_exact) <= MATCH * max(1.0, np.linalg.norm(g_exact))
