"""Meta-policy-gradient estimators: exact expectations, biases, and the Monte-Carlo z-test.

grad J (reference.rl.maml_rl) is itself checked by complex step in
test_rl_reference.py; here each estimator's expectation is an enumeration of
its per-sample formula, compared with grad J.
"""

from __future__ import annotations

import numpy as np
import pytest

from reference.errors import InvalidInputError
from reference.rl import (
    ESTIMATORS,
    EstimatorSpec,
    enumerate_trajectories,
    estimate,
    exact_bias,
    exact_expectation,
    expectation_by_pairs,
    log_prob,
    meta_objective_and_gradient,
    monte_carlo,
    random_mdp,
    reinforce,
    two_armed_bandit,
    value,
    z_test,
)
from reference.rl.trajectories import batch_indices

# The bar for DiCE: exact expectation == grad J to <= 1e-12 relative (measured ~1e-15).
DICE_BAR = 1e-12


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b)))


def _problem(S: int, H: int, seed: int):
    mdp = random_mdp(S, 2, H, seed=100 * S + 10 * H + seed)
    th = np.random.default_rng(seed).standard_normal((S, 2))
    return mdp, th


BAR_CASES = [(S, H, n) for S in (2, 3) for H in (2, 3) for n in (1, 2)]


@pytest.mark.parametrize("S,H,n", [pytest.param(*c, marks=pytest.mark.slow) if c == (3, 3, 2) else c
                                   for c in BAR_CASES])
def test_dice_is_unbiased_to_round_off(S, H, n):
    for seed, alpha in ((0, 0.5), (1, 1.3)):
        mdp, th = _problem(S, H, seed)
        mean, grad, _ = exact_bias(mdp, th, alpha, n, "dice")
        assert _rel(mean, grad) <= DICE_BAR, (S, H, n, seed, _rel(mean, grad))


@pytest.mark.parametrize("name", ["maml-original", "lvc", "dice-inner", "fo-maml"])
def test_biased_estimators_have_a_clear_bias(name):
    mdp, th = _problem(2, 2, 3)
    mean, grad, bias = exact_bias(mdp, th, 1.0, 2, name)
    assert _rel(mean, grad) > 1e-3, name


def test_original_bias_is_minus_the_dropped_score_term():
    """bias(maml-original) = -E_D[V(theta') grad log p(D)], computed here from V and the enumeration directly."""
    mdp, th = _problem(3, 2, 4)
    alpha, n = 0.8, 2
    traj = enumerate_trajectories(mdp)
    idx = batch_indices(traj.count, n)
    batch = traj.take(idx)
    p = np.exp(log_prob(mdp, th, traj)[idx].sum(-1))
    adapted = th + alpha * reinforce(mdp, th, batch).reshape((-1,) + th.shape)
    from reference.rl import scores

    score = scores(mdp, th, batch).sum((-2, -3))
    expected = -(p * value(mdp, adapted)) @ score
    _, _, bias = exact_bias(mdp, th, alpha, n, "maml-original")
    assert _rel(bias, expected) < 1e-12


def test_e_maml_bias_is_the_original_bias_times_one_minus_one_over_n():
    mdp, th = _problem(2, 2, 5)
    for n in (1, 2, 3):
        b_orig = exact_bias(mdp, th, 0.9, n, "maml-original")[2]
        b_e = exact_bias(mdp, th, 0.9, n, "e-maml")[2]
        assert np.linalg.norm(b_e - (1 - 1 / n) * b_orig) <= 1e-12 * np.linalg.norm(b_orig)


def test_bias_orders_in_alpha():
    """maml-original's bias is O(alpha) (halving alpha halves it); dice-inner's is O(alpha^2) (quarters it)."""
    mdp, th = _problem(2, 2, 6)
    ratios = {}
    for name in ("maml-original", "dice-inner"):
        b1 = np.linalg.norm(exact_bias(mdp, th, 2e-3, 2, name)[2])
        b2 = np.linalg.norm(exact_bias(mdp, th, 1e-3, 2, name)[2])
        ratios[name] = b2 / b1
    assert abs(ratios["maml-original"] - 0.5) < 0.01
    assert abs(ratios["dice-inner"] - 0.25) < 0.01


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@pytest.mark.parametrize("n,m", [(1, 1), (2, 1), (1, 2)])
def test_structured_expectation_equals_enumerating_all_pairs(name, n, m):
    """exact_expectation uses linearity in the outer batch; enumerating every (D, D') must agree."""
    mdp, th = _problem(2, 2, 7)
    a = exact_expectation(mdp, th, 0.6, n, name)
    b = expectation_by_pairs(lambda D, Dp: estimate(mdp, th, 0.6, D, Dp, name), mdp, th, 0.6, n, m)
    assert _rel(a, b) < 1e-13


def test_planted_variants_are_exact_too():
    mdp, th = _problem(2, 2, 8)
    base = ESTIMATORS["dice"]
    for spec in (base.variant("lr", alpha_scale=2.0), base.variant("undisc", inner_kind="undiscounted"),
                 base.variant("past", outer_kind="past"), base.variant("bm", inner_baseline="batch-mean"),
                 ESTIMATORS["lvc"].variant("sign", sign=-1.0)):
        a = exact_expectation(mdp, th, 0.6, 2, spec)
        b = expectation_by_pairs(lambda D, Dp, s=spec: estimate(mdp, th, 0.6, D, Dp, s), mdp, th, 0.6, 2, 1)
        assert _rel(a, b) < 1e-13
        assert _rel(a, meta_objective_and_gradient(mdp, th, 0.6, 2)[1]) > 1e-3, spec.name


def test_monte_carlo_agrees_with_the_exact_expectation():
    mdp, th = _problem(2, 3, 9)
    alpha, n, m = 0.7, 2, 3
    grad = meta_objective_and_gradient(mdp, th, alpha, n)[1]
    for name in ("dice", "maml-original", "lvc"):
        samples = monte_carlo(mdp, th, alpha, n, m, name, samples=20_000, seed=1)
        exact = exact_expectation(mdp, th, alpha, n, name)
        assert z_test(samples, exact).passed, name
    # and the test has power: 20,000 samples of the original estimator reject grad J
    samples = monte_carlo(mdp, th, alpha, n, m, "maml-original", samples=20_000, seed=2)
    res = z_test(samples, grad)
    assert not res.passed and res.max_abs_z > 2 * res.threshold


def test_z_test_checks_its_input():
    with pytest.raises(InvalidInputError, match="needs N >= 30"):
        z_test(np.zeros((5, 2)), np.zeros(2))
    with pytest.raises(InvalidInputError, match="expected"):
        z_test(np.zeros((50, 2)), np.zeros(3))
    res = z_test(np.ones((50, 2)), np.array([1.0, 2.0]))  # zero variance: exact match required
    assert not res.passed and np.isinf(res.z[1]) and res.z[0] == 0


def test_bandit_original_bias_is_nonzero_and_scales_with_the_rewards():
    m = two_armed_bandit([1.0, 0.25])
    th = np.array([0.3, -0.2])
    b = exact_bias(m, th, 1.0, 1, "maml-original")[2]
    assert np.linalg.norm(b) > 1e-2 and abs(b.sum()) < 1e-15  # softmax: the bias lies in the sum-zero subspace
    m2 = two_armed_bandit([2.0, 0.5])
    # V is linear in r but theta' = theta + alpha g_hat with g_hat ~ r: scaling r by 2 equals doubling alpha
    assert _rel(exact_bias(m2, th, 0.5, 1, "maml-original")[2], 2 * exact_bias(m, th, 1.0, 1, "maml-original")[2]) \
        < 1e-13


@pytest.mark.parametrize("kw,match", [
    (dict(hessian="exact2"), "hessian='exact2' must be one of"),
    (dict(inner_score="all"), "inner_score='all' must be one of"),
    (dict(outer_kind="forward"), "outer_kind='forward' must be one of"),
])
def test_bad_specs_are_refused(kw, match):
    with pytest.raises(InvalidInputError, match=match):
        EstimatorSpec("x", **kw)


def test_unknown_estimator_lists_the_catalogue():
    with pytest.raises(InvalidInputError, match="estimator='dices' is unknown; use one of"):
        exact_expectation(two_armed_bandit(), np.zeros(2), 0.1, 1, "dices")
