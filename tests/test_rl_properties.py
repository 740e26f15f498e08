"""reference.rl, fast property tests (issue 19: each one is well under a second, so the mutation
runner's per-mutant budget reaches them).

Independent sources:

* every estimator of :mod:`reference.rl.estimators` is the gradient of a scalar surrogate
  (DiCE, Foerster et al. 2018; ProMP's LVC, Rothfuss et al. 2019): for fixed batches ``D, D'``,
  ``est = sign * d/dtheta [L'(theta + alpha_u grad L_in(theta)) + c R' log p_theta(D)]`` with the
  inner surrogate ``L_in`` of the estimator's Hessian (log-likelihood, likelihood ratio, or
  DiCE's cumulative ratio) and the outer REINFORCE surrogate ``L'``; the derivative is taken here
  by complex step (exact to round-off) of surrogates written from ``log pi`` and its gradient;
* sums of probabilities over enumerated pairs (they must add up to one, each pair once), and
  ``E[sum_j R(tau'_j)] = m J(theta)`` against :func:`reference.rl.meta_objective`;
* the z-test against the textbook z statistic (``statistics.stdev``) and the Bonferroni
  threshold from the standard library's ``NormalDist``;
* boundary values of the argument checks (a limit is inclusive or not, as documented).
"""

from __future__ import annotations

import dataclasses
import math
import statistics

import numpy as np
import pytest

from reference.errors import InvalidInputError
from reference.rl import (
    ESTIMATORS,
    FiniteMDP,
    enumerate_trajectories,
    estimate,
    exact_expectation,
    expectation_by_pairs,
    iterate_pairs,
    meta_objective,
    monte_carlo,
    random_mdp,
    returns_to_go,
    sample_pairs,
    scores,
    step_log_probs,
    z_test,
)
from reference.rl import estimators as est_module
from reference.rl._checks import check_int, check_scalar

H_CS = 1e-20  # complex step: no subtraction, so the step can be far below sqrt(eps)


def _problem(seed: int = 0, S: int = 2, A: int = 2, H: int = 2):
    mdp = random_mdp(S, A, H, gamma=0.8, seed=40 + seed)
    th = np.random.default_rng(seed).standard_normal((S, A))
    return mdp, th


def _surrogate_gradient(mdp: FiniteMDP, th: np.ndarray, alpha: float, inner, outer, spec, baseline=None):
    """``sign * grad_theta Phi`` by complex step; ``inner (n, H)``, ``outer (m, H)`` (one sample)."""
    n, m, Hn = inner.states.shape[0], outer.states.shape[0], mdp.horizon
    disc = mdp.gamma ** np.arange(Hn)
    w = returns_to_go(inner.rewards, mdp.gamma, spec.inner_kind, baseline, inner.states)
    if spec.inner_baseline == "batch-mean":
        w = w - w.mean(axis=0)
    w_out = returns_to_go(outer.rewards, mdp.gamma, spec.outer_kind)
    R_out = np.mean(np.sum(outer.rewards * disc, -1))
    lp0 = step_log_probs(mdp, th, inner)  # (n, H) at the evaluation point (the "stop-gradient" values)
    cost = inner.rewards * disc  # DiCE's per-step costs gamma^t r_t

    def grad_inner(phi):  # grad L_in(phi) for the estimator's inner surrogate
        sc = scores(mdp, phi, inner)  # (n, H, d)
        if spec.hessian in ("exact", "none"):  # L_in = (1/n) sum w log pi (H = 0: only its value is used)
            return np.einsum("ihd,ih->d", sc, w) / n
        ratio = np.exp(step_log_probs(mdp, phi, inner) - lp0)
        if spec.hessian == "lvc":  # L_in = (1/n) sum w pi / bot(pi)
            return np.einsum("ihd,ih->d", sc, w * ratio) / n
        cum = np.exp(np.cumsum(step_log_probs(mdp, phi, inner) - lp0, -1))  # DiCE's magic box of the past
        return np.einsum("ihd,ih->d", np.cumsum(sc, 1), cost * cum) / n

    coef = {"sum": 1.0, "mean": 1.0 / n, "none": 0.0}[spec.inner_score]
    alpha_u = spec.alpha_scale * alpha
    g0 = grad_inner(th.astype(complex)).real

    def phi_of(theta):
        step = grad_inner(theta) if spec.hessian != "none" else g0  # first order: theta' moves, no curvature
        adapted = theta + alpha_u * step.reshape(theta.shape)
        outer_sur = np.sum(step_log_probs(mdp, adapted, outer) * w_out) / m
        return outer_sur + coef * R_out * np.sum(step_log_probs(mdp, theta, inner))

    d = th.size
    grad = np.empty(d)
    for k in range(d):
        e = np.zeros(d)
        e[k] = H_CS
        grad[k] = np.imag(phi_of(th + 1j * e.reshape(th.shape))) / H_CS
    return spec.sign * grad


SPECS = [*ESTIMATORS.values(),
         ESTIMATORS["dice"].variant("lr", alpha_scale=2.0),
         ESTIMATORS["maml-original"].variant("undisc", inner_kind="undiscounted"),
         ESTIMATORS["dice"].variant("total", inner_kind="total"),
         ESTIMATORS["e-maml"].variant("past-out", outer_kind="past"),
         ESTIMATORS["maml-original"].variant("bm", inner_baseline="batch-mean"),
         ESTIMATORS["lvc"].variant("bm-lvc", inner_baseline="batch-mean", outer_kind="undiscounted"),
         ESTIMATORS["lvc"].variant("sign", sign=-1.0)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_each_estimate_is_the_gradient_of_its_surrogate(spec):
    """Per sample, unbatched and batched ``(K, n, H)``: est == complex-step gradient of the surrogate."""
    mdp, th = _problem(1)
    traj = enumerate_trajectories(mdp)
    inner_idx = np.array([[3, 10], [7, 7], [0, 15]])
    outer_idx = np.array([[5, 12, 1], [9, 2, 2], [14, 6, 11]])
    alpha = 0.7
    batched = estimate(mdp, th, alpha, traj.take(inner_idx), traj.take(outer_idx), spec)
    assert batched.shape == (3, th.size)
    for k in range(3):
        D, Dp = traj.take(inner_idx[k]), traj.take(outer_idx[k])
        expected = _surrogate_gradient(mdp, th, alpha, D, Dp, spec)
        single = estimate(mdp, th, alpha, D, Dp, spec)
        assert single.shape == (th.size,)
        scale = np.linalg.norm(expected)
        assert np.linalg.norm(single - expected) <= 1e-12 * scale, (spec.name, k, single, expected)
        assert np.linalg.norm(batched[k] - expected) <= 1e-12 * scale, (spec.name, k)


def test_estimate_with_a_baseline_is_the_gradient_of_its_surrogate():
    mdp, th = _problem(2)
    traj = enumerate_trajectories(mdp)
    b = np.array([[0.4, -0.3], [0.2, 0.6]])
    D, Dp = traj.take(np.array([2, 13])), traj.take(np.array([4, 8]))
    for name in ("dice", "lvc"):
        spec = ESTIMATORS[name]
        expected = _surrogate_gradient(mdp, th, 0.9, D, Dp, spec, baseline=b)
        got = estimate(mdp, th, 0.9, D, Dp, spec, baseline=b)
        assert np.linalg.norm(got - expected) <= 1e-12 * np.linalg.norm(expected), name
        assert np.linalg.norm(got - estimate(mdp, th, 0.9, D, Dp, spec)) > 1e-3  # the baseline matters here


def test_pairs_are_each_enumerated_once_with_probabilities_summing_to_one():
    mdp, th = _problem(3)
    T = enumerate_trajectories(mdp).count
    # n = 1, m = 2: T^m = 256 outer batches; chunk 1 < 256 still takes one inner batch per chunk,
    # 768 takes three (a ragged last chunk of the 16), 4096 sixteen (one chunk)
    for chunk in (1, 768, 4096):
        seen, total = set(), 0.0
        for inner, outer, prob in iterate_pairs(mdp, th, 0.6, 1, 2, chunk=chunk):
            assert inner.states.shape[1:] == (1, mdp.horizon) and outer.states.shape[1:] == (2, mdp.horizon)
            assert prob.shape == inner.states.shape[:1] == outer.states.shape[:1]
            for s, a, so, ao in zip(inner.states, inner.actions, outer.states, outer.actions):
                seen.add((s.tobytes(), a.tobytes(), so.tobytes(), ao.tobytes()))
            total += prob.sum()
        assert len(seen) == T**3, chunk
        assert abs(total - 1.0) < 1e-13, chunk


def test_expected_outer_return_is_m_times_the_meta_objective():
    """E[sum_j R(tau'_j)] = m J(theta) (J from reference.rl.meta_objective), over several chunks of pairs."""
    mdp, th = _problem(4)  # T = 16 trajectories: n = 1, m = 3 gives 16^4 = 65536 pairs, 16 chunks of 4096
    disc = mdp.gamma ** np.arange(mdp.horizon)
    m = 3
    got = expectation_by_pairs(lambda D, Dp: np.sum(Dp.rewards * disc, (-1, -2))[:, None], mdp, th, 0.5, 1, m)
    assert got.shape == (1,)
    J = meta_objective(mdp, th, 0.5, 1)
    assert abs(got[0] - m * J) <= 1e-12 * abs(m * J)


def test_exact_expectation_does_not_depend_on_the_chunking(monkeypatch):
    mdp, th = _problem(5)
    ref = {name: exact_expectation(mdp, th, 0.6, 1, name) for name in ("dice", "lvc")}
    monkeypatch.setattr(est_module, "_MEMORY_FLOATS", 1)  # one inner batch per chunk
    for name, value in ref.items():
        assert np.linalg.norm(exact_expectation(mdp, th, 0.6, 1, name) - value) <= 1e-14 * np.linalg.norm(value)


def test_enumeration_limits_are_inclusive_and_the_messages_state_the_counts():
    mdp, th = _problem(6)  # T = 16
    exact_expectation(mdp, th, 0.3, 2, "dice", max_batches=256)  # T^n = 256 batches: at the limit, allowed
    with pytest.raises(InvalidInputError, match=r"T\^n = 16\^2 = 256 inner batches, more than max_batches=255"):
        exact_expectation(mdp, th, 0.3, 2, "dice", max_batches=255)
    assert sum(p.sum() for _, _, p in iterate_pairs(mdp, th, 0.3, 2, 1, max_pairs=4096)) == pytest.approx(1.0)
    with pytest.raises(InvalidInputError, match=r"T\^\(n\+m\) = 16\^3 = 4096 \(D, D'\) pairs, more than "
                                                r"max_pairs=4095"):
        next(iterate_pairs(mdp, th, 0.3, 2, 1, max_pairs=4095))
    with pytest.raises(InvalidInputError, match=r"T\^\(n\+m\) = 16\^3 = 4096"):
        next(iterate_pairs(mdp, th, 0.3, 1, 2, max_pairs=4095))  # n < m: the exponent is still n + m


def test_sampling_defaults_are_the_seed_zero_runs_and_complex_input_is_refused():
    mdp, th = _problem(7)
    a, b = sample_pairs(mdp, th, 0.5, 2, 1, 40), sample_pairs(mdp, th, 0.5, 2, 1, 40, seed=0)
    assert np.array_equal(a[0].states, b[0].states) and np.array_equal(a[1].actions, b[1].actions)
    c = sample_pairs(mdp, th, 0.5, 2, 1, 40, seed=1)
    assert not np.array_equal(a[0].actions, c[0].actions)
    mc = monte_carlo(mdp, th, 0.5, 1, 1, "fo-maml")
    assert mc.shape == (10_000, th.size)  # the documented default sample count
    assert np.array_equal(mc, monte_carlo(mdp, th, 0.5, 1, 1, "fo-maml", samples=10_000, seed=0))
    with pytest.raises(InvalidInputError, match="sampling needs a real theta and alpha"):
        sample_pairs(mdp, th + 1e-3j, 0.5, 2, 1, 40)
    with pytest.raises(InvalidInputError, match="sampling needs a real theta and alpha"):
        sample_pairs(mdp, th, 0.5 + 0j, 2, 1, 40)


def test_z_statistic_and_bonferroni_threshold_from_the_definition():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 3)) * [1.0, 2.0, 0.5] + [0.1, -0.2, 0.3]
    ref = np.array([0.0, 0.1, 0.2])
    res = z_test(x, ref, level=0.01)
    for j in range(3):
        col = [float(v) for v in x[:, j]]
        z = (statistics.fmean(col) - ref[j]) / (statistics.stdev(col) / math.sqrt(40))
        assert abs(res.z[j] - z) <= 1e-12 * abs(z)
    thr = statistics.NormalDist().inv_cdf(1 - 0.01 / (2 * 3))  # two-sided, Bonferroni over d = 3
    assert abs(res.threshold - thr) <= 1e-12 * thr
    assert res.passed == bool(np.all(np.abs(res.z) <= thr)) and res.samples == 40 and res.level == 0.01


def test_z_test_boundaries():
    z_test(np.zeros((30, 2)), np.zeros(2))  # N = 30 is enough
    with pytest.raises(InvalidInputError, match="N=29"):
        z_test(np.zeros((29, 2)), np.zeros(2))
    for bad in (0.0, 0.6):
        with pytest.raises(InvalidInputError, match="level="):
            z_test(np.zeros((30, 2)), np.zeros(2), level=bad)
    z_test(np.zeros((30, 2)), np.zeros(2), level=0.5)


def test_z_test_zero_variance_coordinates_match_to_1e_12_of_the_scale():
    def zero_var(value, ref):
        return z_test(np.full((32, 1), value), np.array([ref]))

    assert zero_var(0.5e-12, 0.0).passed  # scale 1 (the floor): |diff| = 5e-13 <= 1e-12
    assert not zero_var(1.5e-12, 0.0).passed  # 1.5e-12 > 1e-12
    assert zero_var(0.0, 1e-12).passed  # |diff| = 1e-12 exactly: still a match (<=)
    assert zero_var(1e3 + 5e-10, 1e3).passed  # scale 1e3: 5e-10 <= 1e-9
    assert not zero_var(1e3 + 5e-9, 1e3).passed  # 5e-9 > 1e-9


def test_catalogue_records_are_immutable_and_variants_inherit_the_summary():
    dice = ESTIMATORS["dice"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        dice.alpha_scale = 2.0  # type: ignore[misc]
    assert len({dice, ESTIMATORS["lvc"], dice.variant("dice")}) == 2  # hashable; a same-valued variant is equal
    res = z_test(np.zeros((30, 1)), np.zeros(1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.passed = False  # type: ignore[misc]
    assert dice.variant("x", alpha_scale=2.0).summary == dice.summary
    assert dice.variant("y", summary="planted").summary == "planted"


def test_rl_argument_checks_at_their_boundaries():
    assert check_int("n", 1) == 1 and check_int("n", np.int64(3)) == 3
    for bad in (2.5, True, "3", np.float64(2.0)):
        with pytest.raises(InvalidInputError, match="must be an integer"):
            check_int("n", bad)
    assert check_scalar("g", 0.0, low=0.0, high=1.0) == 0.0  # both bounds inclusive
    assert check_scalar("g", 1.0, low=0.0, high=1.0) == 1.0
    for bad in (np.nan, np.inf, [0.5, 0.5], "a", np.array([1.0])):
        with pytest.raises(InvalidInputError, match="must be a finite scalar"):
            check_scalar("g", bad)
    with pytest.raises(InvalidInputError, match="gamma=nan must be a finite scalar"):
        random_mdp(2, 2, 2, gamma=float("nan"))
    with pytest.raises(InvalidInputError, match="horizon=2.5 must be an integer"):
        random_mdp(2, 2, 2.5)  # type: ignore[arg-type]


def test_long_values_are_shortened_to_60_characters_in_messages():
    def shown(text: str) -> str:
        with pytest.raises(InvalidInputError) as err:
            check_int("n", text)
        return str(err.value).split("n=", 1)[1].split(" must be", 1)[0]

    exact = "x" * 58  # repr adds the quotes: 60 characters, shown whole
    assert shown(exact) == repr(exact)
    longer = "y" * 59  # 61 characters: the first 57 and "..."
    assert shown(longer) == repr(longer)[:57] + "..." and len(shown(longer)) == 60
    long = "z" * 200
    assert shown(long) == repr(long)[:57] + "..."


# --------------------------------------------------------------------------------------------
# mdp, maml_rl, trajectories


def _deterministic(mdp: FiniteMDP, actions) -> np.ndarray:
    """theta of the policy taking ``actions[s]`` in state ``s`` (pi = 1 to double precision: e^-80)."""
    th = np.full((mdp.n_states, mdp.n_actions), -40.0)
    th[np.arange(mdp.n_states), actions] = 40.0
    return th


def test_chain_values_by_hand():
    """Expected returns of always-left / always-right, derived from chain_mdp's docstring by hand."""
    from reference.rl import chain_mdp, value

    g = 0.9
    c = chain_mdp()  # S = 3, H = 3, slip 0.1, gamma 0.9
    assert (c.n_states, c.horizon, c.gamma) == (3, 3, 0.9)
    # right: reach state 2 at t = 2 with probability 0.9^2, where "right" pays 1
    assert value(c, _deterministic(c, [1, 1, 1])) == pytest.approx(0.81 * g**2, rel=1e-13)
    # left: 0.1 in state 0; P(s_1 = 0) = 0.9, P(s_2 = 0) = 0.9 * 0.9 + 0.1 * 0.9
    assert value(c, _deterministic(c, [0, 0, 0])) == pytest.approx(0.1 * (1 + 0.9 * g + 0.9 * g**2), rel=1e-13)
    c4 = chain_mdp(3, 4)  # one more step: P(s_3 = 2) = 0.81 * 0.9 + 0.09 * 0.9 (stay at the end, or arrive)
    assert value(c4, _deterministic(c4, [1, 1, 1])) == pytest.approx(0.81 * g**2 + 0.81 * g**3, rel=1e-13)
    c2 = chain_mdp(2, 2, slip=0.25, gamma=0.5)  # the smallest chain: its last state is 1
    assert value(c2, _deterministic(c2, [1, 1])) == pytest.approx(0.5 * 0.75, rel=1e-13)
    assert value(c2, _deterministic(c2, [0, 0])) == pytest.approx(0.1 + 0.5 * 0.75 * 0.1, rel=1e-13)
    c5 = chain_mdp(5, 5, slip=0.0)  # deterministic: right walks 0 1 2 3 4, left stays in 0
    assert value(c5, _deterministic(c5, [1] * 5)) == pytest.approx(0.9**4, rel=1e-13)
    assert value(c5, _deterministic(c5, [0] * 5)) == pytest.approx(0.1 * sum(0.9**t for t in range(5)), rel=1e-13)
    assert value(c5, _deterministic(c5, [1, 1, 0, 1, 1])) == pytest.approx(0.0, abs=1e-15)  # 0 1 2 1 2: no reward
    for bad, match in ((dict(n_states=1), "n_states=1 must be >= 2"), (dict(slip=-0.1), "slip=-0.1 must be >= 0"),
                       (dict(slip=1.5), "slip=1.5 must be <= 1")):
        with pytest.raises(InvalidInputError, match=match):
            chain_mdp(**bad)
    # the transitions of chain_mdp() written out from the docstring (S = 3, slip 0.1): rows s, a = left, right
    expected = [[[0.9, 0.1, 0.0], [0.1, 0.9, 0.0]],
                [[0.9, 0.0, 0.1], [0.1, 0.0, 0.9]],
                [[0.0, 0.9, 0.1], [0.0, 0.1, 0.9]]]
    assert np.allclose(c.P, expected, rtol=0, atol=1e-15)


def test_grid_is_the_2x2_grid_of_its_docstring():
    """P from coordinates (row, col): right moves the column, down the row, both clipped; goal 3 absorbs."""
    from reference.rl import grid_mdp, value

    for slip in (0.1, 0.3):
        grid = grid_mdp(slip=slip)
        assert (grid.horizon, grid.gamma) == (3, 0.9)
        P = np.zeros((4, 2, 4))
        for s in range(4):
            row, col = divmod(s, 2)
            right, down = 2 * row + min(col + 1, 1), 2 * min(row + 1, 1) + col
            if s == 3:
                right = down = 3
            P[s, 0, right] += 1 - slip
            P[s, 0, down] += slip
            P[s, 1, down] += 1 - slip
            P[s, 1, right] += slip
        assert np.array_equal(grid.P, P)
        assert np.array_equal(grid.r, [[0, 0], [0, 0], [0, 0], [1, 1]])
        assert np.array_equal(grid.rho0, [1, 0, 0, 0])
    grid = grid_mdp()
    # right, then down from 1 / right from 2: P(s_2 = 3) = 0.9 * 0.9 + 0.1 * 0.9
    assert value(grid, _deterministic(grid, [0, 1, 0, 0])) == pytest.approx(0.9 * 0.9**2, rel=1e-13)
    for bad in (-0.1, 1.5):
        with pytest.raises(InvalidInputError, match=f"slip={bad} must be"):
            grid_mdp(slip=bad)


def test_bandit_defaults_and_policy_extremes():
    from reference.rl import policy, two_armed_bandit, value

    b = two_armed_bandit()  # r = (1, 0), undiscounted
    assert b.gamma == 1.0 and b.horizon == 1
    assert value(b, np.zeros(2)) == pytest.approx(0.5, rel=1e-15)
    assert value(b, np.array([np.log(3.0), 0.0])) == pytest.approx(0.75, rel=1e-15)
    with pytest.raises(InvalidInputError, match="rewards must be real"):
        two_armed_bandit([1.0 + 1j, 0.0])
    # log-softmax shifted by the row maximum: no overflow or underflow at large |theta|
    pi = policy(np.array([[800.0, 0.0], [-800.0, -801.0]]))
    assert np.all(np.isfinite(pi))
    assert np.allclose(pi, [[1.0, 0.0], [1 / (1 + np.exp(-1.0)), 1 / (1 + np.e)]], rtol=1e-15, atol=0)


def test_random_mdp_defaults_and_sparse_rows():
    d = random_mdp(3, 2, 2)
    same = random_mdp(3, 2, 2, seed=0, sparse=False)
    assert np.array_equal(d.P, same.P) and np.array_equal(d.r, same.r) and d.gamma == 0.9
    assert np.all(d.P > 0)  # dense Dirichlet rows
    dense2, sparse2 = random_mdp(2, 2, 2, seed=3), random_mdp(2, 2, 2, seed=3, sparse=True)
    assert np.array_equal(dense2.P, sparse2.P) and np.array_equal(dense2.rho0, sparse2.rho0)  # S = 2: no-op
    succ = set()
    for S, A, seed in ((3, 2, 1), (5, 3, 2), (6, 2, 3)):
        sp = random_mdp(S, A, 2, seed=seed, sparse=True)
        assert np.all((sp.P > 0).sum(-1) == 2), (S, A)  # exactly two successors per (s, a)
        assert np.allclose(sp.P.sum(-1), 1.0, rtol=0, atol=1e-15)
        succ |= set(np.flatnonzero(sp.P.reshape(-1, S).any(0)).tolist()) if S == 6 else set()
    assert succ == set(range(6))  # every state can be a successor


def test_finite_mdp_refuses_malformed_input():
    P = np.full((2, 2, 2), 0.5)
    ok = dict(r=np.zeros((2, 2)), rho0=np.array([0.5, 0.5]), horizon=2, gamma=0.9)
    FiniteMDP(P, **ok)
    FiniteMDP(P, **{**ok, "gamma": 0.0})
    cases = [
        (dict(P=np.full((2, 2), 0.5)), "P has shape"),
        (dict(P=np.full((2, 2, 3), 1 / 3)), "P has shape"),
        (dict(P=np.tile([1.5, -0.5], (2, 2, 1))), "P must be non-negative"),
        (dict(P=P + 0j), "P must be real"),
        (dict(r=np.zeros((2, 2)) + 1j), "r must be real"),
        (dict(rho0=np.array([0.5, 0.5]) + 0j), "rho0 must be real"),
        (dict(rho0=np.array([1.5, -0.5])), "must be a probability vector"),
        (dict(rho0=np.array([0.5, 0.6])), "must be a probability vector"),
        (dict(gamma=-0.5), "gamma=-0.5 must be >= 0.0"),
    ]
    for change, match in cases:
        kw = {"P": P, **ok, **change}
        with pytest.raises(InvalidInputError, match=match):
            FiniteMDP(kw.pop("P"), **kw)
    mdp = FiniteMDP(P, **ok)
    with pytest.raises(dataclasses.FrozenInstanceError):
        mdp.gamma = 0.5  # type: ignore[misc]
    with pytest.raises(InvalidInputError, match=r"theta has shape \(2, 3\), expected \(2, 2\) or \(4,\)"):
        mdp.check_theta(np.zeros((2, 3)))


def test_infinite_horizon_value_needs_gamma_below_one():
    from reference.rl import value_infinite_horizon

    mdp = random_mdp(2, 2, 2, gamma=1.0)
    with pytest.raises(InvalidInputError, match="must be < 1"):
        value_infinite_horizon(mdp, np.zeros((2, 2)))


def test_meta_objective_by_itself_and_the_batch_counts():
    from reference.rl import batch_count, meta_objective_and_gradient, value

    mdp, th = _problem(8)
    T = enumerate_trajectories(mdp).count
    assert batch_count(mdp, 3) == T**3 == len(np.unique(np.arange(T**3)))
    assert meta_objective(mdp, th, 0.0, 2) == pytest.approx(value(mdp, th), rel=1e-14)  # alpha = 0: J = V
    J, _ = meta_objective_and_gradient(mdp, th, 0.4, 2)
    assert meta_objective(mdp, th, 0.4, 2) == pytest.approx(J, rel=1e-14)
    meta_objective(mdp, th, 0.4, 2, max_batches=T**2)  # at the limit: allowed
    with pytest.raises(InvalidInputError, match=rf"T\^n = {T}\^2 = {T**2} inner batches"):
        meta_objective(mdp, th, 0.4, 2, max_batches=T**2 - 1)


def test_records_are_immutable_and_count_all_trajectories():
    from reference.rl import Trajectories, trajectory_terms

    mdp, th = _problem(9)
    traj = enumerate_trajectories(mdp)
    batch = traj.take(np.array([[0, 1], [2, 3], [4, 5]]))
    assert batch.count == 6  # every trajectory of a (K, n) batch
    with pytest.raises(dataclasses.FrozenInstanceError):
        traj.states = traj.states  # type: ignore[misc]
    terms = trajectory_terms(mdp, th, traj)
    with pytest.raises(dataclasses.FrozenInstanceError):
        terms.g = terms.g  # type: ignore[misc]
    assert isinstance(traj, Trajectories)


def test_enumeration_limit_is_inclusive():
    mdp, _ = _problem(10)
    T = enumerate_trajectories(mdp).count
    assert enumerate_trajectories(mdp, max_count=T).count == T
    with pytest.raises(InvalidInputError, match=f"has {T} trajectories of positive probability, more than"):
        enumerate_trajectories(mdp, max_count=T - 1)


@pytest.mark.slow  # ~4 s: enumerates 2,000,000 trajectories
def test_default_limits_admit_exactly_two_million(monkeypatch):
    """A bandit with 2,000,000 arms has 2,000,000 trajectories and as many batches of one: both defaults
    admit it; 2,000,001 arms are refused (the exact sums themselves are cut short: they would take
    terabytes)."""
    from reference.rl import maml_rl

    def arms(k: int) -> FiniteMDP:
        return FiniteMDP(np.ones((1, k, 1)), np.zeros((1, k)), np.ones(1), 1, 1.0, name=f"{k}-armed")

    big = arms(2_000_000)
    assert enumerate_trajectories(big).count == 2_000_000
    with pytest.raises(InvalidInputError, match="2000001 trajectories"):
        enumerate_trajectories(arms(2_000_001))

    class Reached(Exception):
        pass

    def stop(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(maml_rl, "trajectory_terms", stop)  # past the limit check, before the sums
    with pytest.raises(Reached):
        meta_objective(big, np.zeros(2_000_000), 0.1, 1)


class _FixedUniform:
    """A stand-in for ``np.random.Generator`` whose uniform draws are all ``u``."""

    def __init__(self, u: float):
        self.u = u

    def random(self, shape):
        return np.full(shape, self.u)


def test_inverse_cdf_sampling_at_the_ends_of_the_unit_interval():
    from reference.rl import sample_trajectories

    # u = 0 (Generator.random can return it): an outcome of probability 0 must never be drawn
    P = np.zeros((2, 2, 2))
    P[:, :, 1] = 1.0
    mdp = FiniteMDP(P, np.zeros((2, 2)), np.array([0.0, 1.0]), 3, 0.9)
    th = np.zeros((2, 2))
    tr = sample_trajectories(mdp, th, 2, _FixedUniform(0.0))
    assert np.all(tr.states == 1) and np.all(tr.actions == 0) and np.all(np.isfinite(tr.env_log_prob))
    # u = 1 - 2^-53 above the last CDF value (rows summing to 1 - 1e-13): the last outcome
    P = np.full((2, 2, 2), 0.5)
    P[..., 1] -= 1e-13
    mdp = FiniteMDP(P, np.zeros((2, 2)), np.array([0.5, 0.5 - 1e-13]), 3, 0.9)
    for count in (1, 3):
        tr = sample_trajectories(mdp, th, count, _FixedUniform(1 - 2**-53))
        assert tr.states.shape == (count, 3)
        assert np.all(tr.states == 1) and np.all(tr.actions == 1)


def test_default_limits_at_two_million_with_the_counts_stubbed(monkeypatch):
    """The fast counterpart of ``test_default_limits_admit_exactly_two_million`` (slow: it enumerates
    2,000,000 trajectories): the same inclusive limits, with the trajectory count stubbed on a 2-armed
    bandit so that only the limit decides. 2,000,000 trajectories (and batches of one) are admitted,
    2,000,001 refused."""
    from reference.rl import maml_rl, trajectories

    two_arms = FiniteMDP(np.ones((1, 2, 1)), np.array([[0.0, 1.0]]), np.ones(1), 1, 1.0, name="2-armed")
    real = trajectories.enumerate_trajectories(two_arms)
    assert real.count == 2

    monkeypatch.setattr(trajectories, "count_trajectories", lambda mdp: 2_000_000)
    assert trajectories.enumerate_trajectories(two_arms).count == 2  # past the check: the real enumeration
    monkeypatch.setattr(trajectories, "count_trajectories", lambda mdp: 2_000_001)
    with pytest.raises(InvalidInputError, match="2000001 trajectories of positive probability, more than "
                                                "max_count=2000000"):
        trajectories.enumerate_trajectories(two_arms)

    class Reached(Exception):
        pass

    def stop(*args, **kwargs):
        raise Reached

    class Counted:  # all _inner_batches reads before the limit check
        def __init__(self, count: int):
            self.count = count

    monkeypatch.setattr(maml_rl, "trajectory_terms", stop)  # past the limit check, before the sums
    for count, admitted in ((2_000_000, True), (2_000_001, False)):
        monkeypatch.setattr(maml_rl, "enumerate_trajectories", lambda mdp, c=count: Counted(c))
        if admitted:
            with pytest.raises(Reached):
                maml_rl.meta_objective(two_arms, np.zeros((1, 2)), 0.1, 1)
        else:
            with pytest.raises(InvalidInputError, match="2000001 inner batches, more than max_batches=2000000"):
                maml_rl.meta_objective(two_arms, np.zeros((1, 2)), 0.1, 1)
