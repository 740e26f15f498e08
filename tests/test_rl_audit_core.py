"""The backend-neutral MAML-RL audit (verify.rl_audit), driven by NumPy "user" estimators.

The user's gradient callables here are reference.rl.estimators.estimate with
planted specs, so the test is of the audit's enumeration, matching and
verdicts; the framework harnesses are tested in tests/audit/test_rl_audit_backends.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from reference.errors import InvalidInputError
from reference.rl import ESTIMATORS, Trajectories, estimate
from verify.rl_audit import MATCH_RTOL, audit_maml_rl, catalogue, default_problem


def numpy_user(spec, problem):
    """A gradient callable computing ``spec``'s estimate from the dicts the audit passes (env log-probs unused)."""

    def grad_fn(theta, inner, outer, alpha, gamma):
        assert gamma == problem.mdp.gamma
        def traj(d):
            return Trajectories(d["states"], d["actions"], d["rewards"], np.zeros(d["states"].shape[:-1]))
        return estimate(problem.mdp, theta, alpha, traj(inner), traj(outer), spec)

    return grad_fn


PLANTED = [
    (ESTIMATORS["dice"], None),
    (ESTIMATORS["maml-original"], "maml-original"),
    (ESTIMATORS["e-maml"], "e-maml"),
    (ESTIMATORS["lvc"], "lvc"),
    (ESTIMATORS["dice-inner"], "dice-inner"),
    (ESTIMATORS["fo-maml"], "fo-maml"),
    (ESTIMATORS["dice"].variant("dice", alpha_scale=0.5), "dice+lr*0.5"),
    (ESTIMATORS["maml-original"].variant("maml-original", alpha_scale=2.0), "maml-original+lr*2"),
    (ESTIMATORS["dice"].variant("dice", inner_kind="undiscounted"), "dice+inner:undiscounted"),
    (ESTIMATORS["dice"].variant("dice", outer_kind="past"), "dice+outer:past"),
    (ESTIMATORS["dice"].variant("dice", inner_baseline="batch-mean"), "dice+batch-mean-baseline"),
    (ESTIMATORS["maml-original"].variant("maml-original", sign=-1.0), "maml-original+sign"),
    # variance-only change: same expectation as DiCE, so it must pass
    (ESTIMATORS["dice"].variant("dice", outer_kind="total"), None),
]


@pytest.mark.parametrize("spec,expected", PLANTED, ids=[e or "pass" for _, e in PLANTED])
def test_exact_audit_names_each_planted_estimator(spec, expected):
    problem = default_problem(0)
    res = audit_maml_rl(numpy_user(spec, problem), problem=problem)
    assert res.mode == "exact" and res.calls == 512
    if expected is None:
        assert res.passed and res.relative_error < 1e-13, res.report()
    else:
        assert not res.passed and res.matches[0] == expected, res.report()
        assert res.distances[expected] < 1e-12


def test_unexplained_estimator():
    problem = default_problem(0)
    base = numpy_user(ESTIMATORS["dice"], problem)

    def weird(theta, inner, outer, alpha, gamma):
        return base(theta, inner, outer, alpha, gamma) + 0.1 * np.sin(np.arange(theta.size))

    res = audit_maml_rl(weird, problem=problem)
    assert not res.passed and res.matches == [] and res.diagnosis.startswith("unexplained"), res.report()


def test_catalogue_entries_are_separated_on_the_default_problem():
    """Naming is only meaningful if no two entries coincide within MATCH_RTOL (duplicates by construction excepted)."""
    cands = catalogue(default_problem(0))
    E = np.array([c.expectation for c in cands])
    norms = np.linalg.norm(E, axis=1)
    D = np.linalg.norm(E[:, None] - E[None], axis=-1) / np.maximum(norms[None], 1e-300)
    off = D[np.triu_indices(len(cands), 1)]
    assert off.min() > 1e3 * MATCH_RTOL, off.min()


@pytest.mark.parametrize("spec,expected", [(ESTIMATORS["dice"], None),
                                           (ESTIMATORS["maml-original"], "maml-original")])
def test_monte_carlo_fallback(spec, expected):
    problem = default_problem(0)
    res = audit_maml_rl(numpy_user(spec, problem), problem=problem, max_pairs=100, samples=4000, seed=3)
    assert res.mode == "monte-carlo" and "enumeration too large" in res.report()
    if expected is None:
        assert res.passed, res.report()
    else:
        assert not res.passed and expected in res.matches, res.report()


def test_non_finite_user_gradient_is_refused():
    def bad(theta, inner, outer, alpha, gamma):
        return np.full((inner["states"].shape[0], theta.size), np.nan)

    with pytest.raises(InvalidInputError, match="NaN or inf"):
        audit_maml_rl(bad)


def test_report_and_dict():
    problem = default_problem(0)
    res = audit_maml_rl(numpy_user(ESTIMATORS["maml-original"], problem), problem=problem, title="demo")
    text = res.report()
    assert "FAIL" in text and "missing inner score term" in text and "fix:" in text and "demo" in text
    d = res.to_dict()
    assert d["status"] == "fail" and d["matches"][0] == "maml-original" and len(d["grad_J"]) == 4
