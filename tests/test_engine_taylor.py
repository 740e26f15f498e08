"""verify.taylor_test: rates 1/2/3, wrong derivatives fail, round-off floor, kinks.

Gradients and Hessian-vector products are closed forms of the test functions;
the expected rates are the theory (Farrell et al. 2013), not the code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from test_engine_cases import unit

from reference.errors import InvalidInputError
from verify import FAIL, INCONCLUSIVE, PASS, TaylorResult, taylor_test
from verify.tolerance import tolerance


def _problem(seed: int, n: int):
    """f = x^T A x / 2 + sum exp(sin(a x)) with closed-form gradient and HVP."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n))
    A = A + A.T
    a = rng.uniform(0.5, 1.5, n) * rng.choice([-1, 1], n)

    def f(x):
        return 0.5 * x @ A @ x + np.sum(np.exp(np.sin(a * x)))

    def grad(x):
        return A @ x + a * np.cos(a * x) * np.exp(np.sin(a * x))

    def hvp(x, v):
        s, c = np.sin(a * x), np.cos(a * x)
        return A @ v + a * a * (c * c - s) * np.exp(s) * v

    x = rng.standard_normal(n)
    v = rng.standard_normal(n)
    return f, grad, hvp, x, v


@pytest.mark.parametrize(("with_grad", "with_hvp", "rate"), [(False, False, 1), (True, False, 2), (True, True, 3)])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 10))
def test_rates(with_grad: bool, with_hvp: bool, rate: int, seed: int, n: int) -> None:
    f, grad, hvp, x, v = _problem(seed, n)
    kwargs = {}
    if with_grad:
        kwargs["grad"] = grad
    if with_hvp:
        kwargs["hvp"] = hvp
    result = taylor_test(f, x, v, **kwargs)
    assert result.expected_rate == rate
    assert result.status != FAIL, result.reason
    if result.status == PASS and np.isfinite(result.slope):
        assert result.slope >= rate - 0.25
    # all rates in the fit window are close to the theory unless the next term vanishes
    assert result.status == PASS, result.reason
    assert result.passed
    if abs(result.slope - rate) < 0.25:  # the theory's rate: no "next term vanishes" remark
        assert "higher than" not in result.reason, result.reason


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 10), rel=st.sampled_from([1e-2, 1e-4]))
def test_wrong_gradient_fails_with_rate_1(seed: int, n: int, rel: float) -> None:
    # The Taylor test resolves errors relative to f's own scale (O(1) here), not to ||g||,
    # which can be ~0: the error is rel * max(||g||, 1), and not nearly orthogonal to v.
    f, grad, hvp, x, v = _problem(seed, n)
    g = grad(x)
    size = rel * max(np.linalg.norm(g), 1.0)
    bad = g + size * unit(np.random.default_rng(seed), n)
    assume(abs((bad - g) @ v) > 0.1 * size * np.linalg.norm(v) / np.sqrt(n))
    result = taylor_test(f, x, v, grad=bad)
    assert result.status == FAIL, result.reason
    assert abs(result.slope - 1.0) < 0.25


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 10))
def test_wrong_hvp_fails_with_rate_2(seed: int, n: int) -> None:
    # A 1e-2 error (relative to max(||Hv||, ||v||): f's Hessian is O(1)) not nearly
    # orthogonal to v, so the rate-2 range h < |<error, v>| / |d^3 f| is resolvable.
    f, grad, hvp, x, v = _problem(seed, n)
    hv = hvp(x, v)
    size = 1e-2 * max(np.linalg.norm(hv), np.linalg.norm(v))
    bad = hv + size * unit(np.random.default_rng(seed), n)
    assume(abs((bad - hv) @ v) > 0.1 * size * np.linalg.norm(v) / np.sqrt(n))
    result = taylor_test(f, x, v, grad=grad(x), hvp=bad)
    assert result.status == FAIL, result.reason
    assert abs(result.slope - 2.0) < 0.25


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 10))
def test_quadratic_with_hvp_is_at_roundoff_and_passes(seed: int, n: int) -> None:
    # f quadratic, grad and HVP exact: the second-order remainder is pure round-off at every
    # step; that is a pass with that reason, not a fail.
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n))
    b = rng.standard_normal(n)
    x, v = rng.standard_normal(n), rng.standard_normal(n)

    def f(x):
        return x @ A @ x + b @ x + 3.0

    result = taylor_test(f, x, v, grad=lambda x: (A + A.T) @ x + b, hvp=lambda x, v: (A + A.T) @ v)
    assert result.status == PASS, result.reason
    assert "round-off" in result.reason
    assert not any(r > fl for r, fl in zip(result.remainders, result.floors))
    # the same with the gradient only is a clean rate 2 (remainder h^2/2 v^T (A + A^T) v)
    r2 = taylor_test(f, x, v, grad=(A + A.T) @ x + b)
    assume(abs(v @ (A + A.T) @ v) > 1e-3 * np.linalg.norm(A) * (v @ v))
    assert r2.status == PASS and abs(r2.slope - 2.0) < 0.05


def test_roundoff_floor_is_dropped() -> None:
    # exp along v with the gradient: the remainder hits the floor near h ~ 1e-6; the floor
    # steps are excluded from the fit and the slope is 2.
    f, grad, _, x, v = _problem(3, 4)
    result = taylor_test(f, x, v, grad=grad)
    used = np.array(result.used)
    above = np.array(result.remainders) > np.array(result.floors)
    assert result.status == PASS
    assert not np.all(above)  # some steps are at the floor
    assert np.all(above[used])  # none of them is used
    assert abs(result.slope - 2.0) < 0.1
    assert len(result.rates) == len(result.steps) - 1


def test_kink_at_x() -> None:
    # |x| at a kink: the "gradient" sign(0) = 0 leaves a rate-1 remainder -> fail
    x = np.array([0.0, 0.7])
    v = np.array([1.0, 0.3])

    def f(x):
        return np.sum(np.abs(x))

    assert taylor_test(f, x, v, grad=np.sign(x)).status == FAIL
    # away from the kink |x| is locally linear: the remainder falls straight to round-off
    x2 = np.array([0.4, 0.7])
    r = taylor_test(f, x2, v, grad=np.sign(x2))
    assert r.status == PASS, r.reason


def test_non_integer_rate_is_inconclusive() -> None:
    # f = |x|^1.5 at 0 with the (correct) gradient 0: remainder h^1.5 -> neither pass nor fail
    def f(x):
        return float(np.sum(np.abs(x) ** 1.5))

    r = taylor_test(f, np.zeros(1), np.ones(1), grad=np.zeros(1))
    assert r.status == INCONCLUSIVE and abs(r.slope - 1.5) < 0.1, r.reason


def test_array_and_callable_derivatives_agree() -> None:
    f, grad, hvp, x, v = _problem(5, 6)
    a = taylor_test(f, x, v, grad=grad, hvp=hvp)
    b = taylor_test(f, x, v, grad=grad(x), hvp=hvp(x, v))
    assert a == b


def test_custom_steps_and_json() -> None:
    f, grad, _, x, v = _problem(1, 3)
    result = taylor_test(f, x, v, grad=grad, steps=[1e-1, 5e-2, 2.5e-2, 1.25e-2])
    assert isinstance(result, TaylorResult)
    assert result.steps == (1e-1, 5e-2, 2.5e-2, 1.25e-2)
    d = json.loads(json.dumps(result.to_dict()))
    assert d["status"] == result.status and d["expected_rate"] == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hvp": np.ones(2)}, r"hvp was given without grad"),
        ({"grad": np.ones(3)}, r"grad has shape \(3,\)"),
        ({"grad": np.array([1.0, np.nan])}, r"grad=.*non-finite"),
        ({"steps": [1e-2, -1.0, 1e-3]}, r"steps="),
        ({"steps": [1e-2]}, r"at least 3"),
    ],
)
def test_invalid_inputs(kwargs, match) -> None:
    with pytest.raises(InvalidInputError, match=match):
        taylor_test(lambda x: float(np.sum(x**2)), np.ones(2), np.ones(2), **kwargs)


def test_zero_direction_rejected() -> None:
    with pytest.raises(InvalidInputError, match=r"v=.*zero vector"):
        taylor_test(lambda x: float(np.sum(x**2)), np.ones(2), np.zeros(2))


@pytest.mark.parametrize("with_grad", [False, True])
def test_jump_straddled_by_the_noise_probes_is_not_a_pass(with_grad):
    # f jumps by 1 at x = 0.3: one-ulp changes of x straddle it, so the measured "noise" is the jump.
    # A floor built from it would hide every remainder and call the Taylor model exact (found by the
    # mutation campaign, reports/mutation/CAMPAIGN.md). Independent fact: f is discontinuous at x.
    kwargs = {"grad": np.array([1.0])} if with_grad else {}
    result = taylor_test(lambda z: float(z[0] > 0.3) + z[0], np.array([0.3]), np.array([1.0]), **kwargs)
    assert result.status == "inconclusive", result.reason
    assert "discontinuity" in result.reason


def test_exact_model_with_cancelling_values_still_passes():
    # f(x) = a.x with a.x = 0 at x: the values cancel exactly, the remainder is pure rounding of O(1)
    # magnitudes; the jump rule must not mistake that rounding for a discontinuity.
    a, x = np.array([1.0, -1.0]), np.array([1.0, 1.0])
    result = taylor_test(lambda z: float(a @ z), x, np.array([0.3, 0.7]), grad=a)
    assert result.status == "pass", result.reason


# ---------------------------------------------------------------------------------------------
# The verdict rules at their edges (mutation survivors of verify/_taylor.py, issue 19).
#
# Exact remainders: f(z) = 1 + R(|z|) at x = 0 along v = 1 with R(h) a power of two (or 0) at
# power-of-two steps h, so that f(x +- h) = 1 + R is exact, the remainder f(x + h v) - f(x) is R
# exactly, log2 of it is an integer and every local rate is an exact binary fraction. At x = 0 the
# one-ulp noise probes do not move x, so nu = 2 eps |f(x)| = 2 eps and a step whose remainder is 0
# has the floor 64 eps (|f(x)| + |f(x + hv)| + nu / eps) = 64 eps * 4 = 2^-44 (module docstring).

FLOOR_AT_ZERO = 2.0**-44


def _exact(table: dict[float, float]):
    """f(z) = 1 + table[|z_0|] (0 for steps not in the table, NaN where the value is NaN)."""

    def f(z):
        return 1.0 + table.get(abs(float(z[0])), 0.0)

    return f


def _run(table: dict[float, float], steps, **kwargs):
    return taylor_test(_exact(table), np.zeros(1), np.ones(1), steps=steps, **kwargs)


def test_result_is_immutable_and_passed_follows_the_status() -> None:
    f, grad, _, x, v = _problem(2, 3)
    good = taylor_test(f, x, v, grad=grad)
    bad = taylor_test(f, x, v, grad=grad(x) + 0.1 * v)
    assert good.status == PASS and good.passed, good.reason
    assert bad.status == FAIL and not bad.passed, bad.reason
    with pytest.raises(dataclasses.FrozenInstanceError):
        good.status = FAIL  # type: ignore[misc]
    assert hash(good) == hash(dataclasses.replace(good))  # frozen dataclass: hashable by value


@pytest.mark.parametrize("steps", [[1e-2, 0.0, 1e-3], [1e-2, -0.5, 1e-3], [1e-2, 1e-3]])
def test_steps_must_be_three_positive_values(steps) -> None:
    # 0 and negative steps are no steps (log h undefined / a sign flip of v); two steps give one rate.
    with pytest.raises(InvalidInputError, match=r"steps=.*at least 3 positive finite"):
        taylor_test(lambda x: float(np.sum(x**2)), np.ones(2), np.ones(2), steps=steps)


def test_too_few_steps_above_the_floor_names_them() -> None:
    # Only the 4th and 5th steps have a remainder above the floor (2^-41, 2^-42: 8x and 4x the floor,
    # far below a fall faster than rate 5, which would need 32x): two steps give no rate. The reason
    # counts them and `used` marks them (counted here from remainders > floors, the documented floor).
    steps = [2.0**-k for k in range(1, 11)]
    result = _run({steps[3]: 2.0**-41, steps[4]: 2.0**-42}, steps)
    above = np.array(result.remainders) > np.array(result.floors)
    assert list(np.flatnonzero(above)) == [3, 4]
    assert result.status == INCONCLUSIVE, result.reason
    assert "only 2 step(s)" in result.reason, result.reason
    assert list(result.used) == list(above)


def test_exact_model_after_a_fall_names_the_steps() -> None:
    # R = 2^-20, 2^-22, 2^-24 then exactly 0: the model is exact for h <= steps[3]. The reason names the
    # last remainder above the floor, its step, and the first step at the floor.
    steps = [2.0**-k for k in range(1, 9)]
    result = _run({steps[0]: 2.0**-20, steps[1]: 2.0**-22, steps[2]: 2.0**-24}, steps)
    assert result.status == PASS, result.reason
    assert (f"falls from {2.0**-24:.1e} at h={steps[2]:.2e} to the round-off floor at h={steps[3]:.2e}"
            in result.reason), result.reason
    assert list(result.used) == [False] * 3 + [True] * 5


@pytest.mark.parametrize("expected", [1, 2, 3])
def test_fall_faster_than_rate_expected_plus_4_is_an_exact_model(expected: int) -> None:
    # The documented rule: a remainder that falls from above the floor to it within one halving, faster
    # than any rate <= expected + 4, means the model is exact for small steps. Here it falls by
    # 2^(expected + 4.5) (to exactly 0) from the last step above, whose neighbour at larger h has a
    # remainder 8 and so a floor twice as high: the rule compares with the floor where the
    # remainder lands, not with one at a larger step.
    steps = [2.0**-k for k in range(1, 7)]
    derivs = {"grad": np.zeros(1)} if expected >= 2 else {}
    if expected == 3:
        derivs["hvp"] = np.zeros(1)
    result = _run({steps[0]: 8.0, steps[1]: 2.0 ** (expected + 4.5) * FLOOR_AT_ZERO}, steps, **derivs)
    assert result.floors[2] == FLOOR_AT_ZERO and result.floors[0] >= 2 * FLOOR_AT_ZERO
    assert result.status == PASS and "falls from" in result.reason, result.reason


def test_exact_model_when_f_is_not_finite_at_the_largest_step() -> None:
    # f is NaN at x +- 0.5 (outside its domain), piecewise exact below: the remainder at 0.25 is 2^-30 and
    # 0 at 0.125. Three steps only, so the step after the floor is the last one.
    steps = [0.5, 0.25, 0.125]
    result = _run({0.5: math.nan, 0.25: 2.0**-30}, steps)
    assert math.isnan(result.remainders[0])
    assert result.status == PASS and "falls from" in result.reason, result.reason


def test_fall_at_exactly_rate_expected_plus_4_is_not_an_exact_model() -> None:
    # R = 2^(e+4) x floor at the only step above the floor, 0 after: a remainder falling at rate e + 4 from
    # there lands exactly on the floor, which counts as "at the floor" -- the fall is no faster than rate
    # e + 4, so it proves nothing; one step above the floor gives no rate either: inconclusive.
    steps = [2.0**-k for k in range(1, 7)]
    result = _run({steps[0]: 2.0**5 * FLOOR_AT_ZERO}, steps)
    assert result.floors[1] == FLOOR_AT_ZERO
    assert result.status == INCONCLUSIVE and "only 1 step(s)" in result.reason, result.reason


@pytest.mark.parametrize("expected", [1, 2, 3])
@pytest.mark.parametrize("extra", [1, 2, 3, 4])
@pytest.mark.parametrize("offset", [0, 1, 2, 3])
def test_genuine_higher_rates_are_measured_not_called_exact(expected: int, extra: int, offset: int) -> None:
    # f = 1 + 2^-(2 + offset) |z|^p at x = 0, p = expected + extra: every Taylor term below h^p vanishes
    # (grad 0, hvp 0 are exact), the remainder is 2^-(2 + offset) h^p exactly at power-of-two steps. It is
    # not an exact model: it falls at rate p <= expected + 4 and must be fitted at that rate, whatever
    # the offset (where the last step above the floor lands relative to it).
    p = expected + extra
    c = 2.0 ** -(2 + offset)
    derivs = {"grad": np.zeros(1)} if expected >= 2 else {}
    if expected == 3:
        derivs["hvp"] = np.zeros(1)
    result = taylor_test(lambda z: 1.0 + c * abs(float(z[0])) ** p, np.zeros(1), np.ones(1), **derivs)
    assert result.status == PASS, result.reason
    assert result.slope == pytest.approx(p, abs=1e-9), result.reason
    assert f"(higher than {expected}" in result.reason, result.reason


def test_slope_window_includes_a_rate_exactly_025_away() -> None:
    # Steps 2^-4k and remainders with local rates 3, 2.25, 2, 2 (exact): the small-step slope is 2 and the
    # window grows while the local rates are within 0.25 of it -- 2.25 is, 3 is not.
    steps = [2.0 ** (-4 * k) for k in range(5)]
    exps = [-2, -14, -23, -31, -39]
    result = _run({h: 2.0**e for h, e in zip(steps, exps)}, steps)
    assert result.rates == (3.0, 2.25, 2.0, 2.0)
    assert result.status == PASS, result.reason
    assert result.used == (False, True, True, True, True)


@pytest.mark.parametrize(("rate", "status"), [(1.75, PASS), (1.25, INCONCLUSIVE)])
def test_verdict_margins_at_their_edges(rate: float, status: str) -> None:
    # With the gradient (expected rate 2): pass when the slope is at least 2 - 0.25, fail only below
    # 2 - 0.75 (module docstring). Three exact remainders at steps 1, 2^-4, 2^-8 whose fitted slope is
    # exactly 1.75, resp. 1.25 (checked): the edges themselves.
    steps = [1.0, 2.0**-4, 2.0**-8]
    exps = [-2 - 4 * rate * k for k in range(3)]
    result = _run({h: 2.0**e for h, e in zip(steps, exps)}, steps, grad=np.zeros(1))
    assert result.slope == rate and all(result.used)
    assert result.status == status, result.reason
    if status == INCONCLUSIVE:
        assert "between pass (>= 1.75) and fail (< 1.25)" in result.reason, result.reason


def test_rates_that_do_not_settle_are_inconclusive_and_listed() -> None:
    # Local rates alternating 1, 3, 1, 3, ... down to a remainder of 2^-40 (not a fall to the floor: 16x
    # it): the small-step slope (median of the last three, 3) is not shared by the rate before it, so
    # the window has two steps and no rate. The reason lists the last local rates (rounded to 0.01).
    steps = [2.0**-k for k in range(1, 11)]
    exps = [-28, -29, -32, -33, -36, -37, -40]
    result = _run({h: 2.0**e for h, e in zip(steps, exps)}, steps)
    assert result.status == INCONCLUSIVE and "do not settle" in result.reason, result.reason
    listed = re.search(r"last rates \[([^\]]*)\]", result.reason)
    assert listed is not None, result.reason
    assert [float(t) for t in listed.group(1).split()] == [1.0, 3.0, 1.0, 3.0]


def test_unsettled_rates_are_shown_to_two_decimals() -> None:
    # Same, with remainders falling by 5 and 11 in turn (local rates log2 5 = 2.32, log2 11 = 3.46, far
    # from a rounding edge) down to 1.5e-12 (26x the floor, not a fall to it): the listed rates are the
    # local slopes log2(r_k / r_k+1), computed here from the reported remainders, rounded to 0.01.
    steps = [2.0**-k for k in range(1, 11)]
    vals = [1.5e-12]
    for k in range(6):
        vals.insert(0, vals[0] * (11.0 if k % 2 == 0 else 5.0))
    result = _run(dict(zip(steps, vals)), steps)
    assert result.status == INCONCLUSIVE and "do not settle" in result.reason, result.reason
    found = re.search(r"last rates \[([^\]]*)\]", result.reason)
    assert found is not None, result.reason
    rem = result.remainders
    local = [math.log2(rem[k] / rem[k + 1]) for k in range(2, 6)]
    assert [float(t) for t in found.group(1).split()] == [round(r, 2) for r in local], result.reason


def test_roundoff_floor_bounds_the_rounding_error_and_no_more() -> None:
    # f = c z^2 / 2 + d z^3 at x = 0 with grad 0 and hvp c (exact): the second-order remainder is d h^3
    # exactly (rational arithmetic on the float constants), while the computed one carries the
    # rounding of the O(c h^2) terms it cancels. The floor must cover that rounding error at every
    # step (sound) and stay within 1000 eps of the magnitudes summed (Higham, Accuracy and Stability,
    # ch. 4: the error of a short sum is a few eps times the sum of |terms|), or it would hide signal.
    c, d = 1e6 / 3.0, 1.0 / 7.0

    def f(z):
        return 0.5 * c * z[0] * z[0] + d * z[0] ** 3

    result = taylor_test(f, np.zeros(1), np.ones(1), grad=np.zeros(1), hvp=np.array([c]))
    eps = float(np.finfo(np.float64).eps)
    cq, dq = Fraction(c), Fraction(d)
    errors, slack = [], []
    for h, r, floor in zip(result.steps, result.remainders, result.floors):
        hq = Fraction(h)
        exact = dq * hq**3
        errors.append(abs(Fraction(r) - exact) / Fraction(floor))
        fp, fm = cq * hq**2 / 2 + dq * hq**3, cq * hq**2 / 2 - dq * hq**3
        terms = abs(fp) + abs(fm) + abs(cq) * hq**2 / 2
        slack.append(Fraction(floor) / (1000 * Fraction(eps) * terms))
    assert max(errors) <= 1, max(errors)
    # the rounding is real (~eps c h^2 / 4, a few thousandths of the floor): the test is not vacuous
    assert sum(e > Fraction(1, 10000) for e in errors) >= 10
    assert max(slack) <= 1, max(slack)


@pytest.mark.parametrize("scale", [1e-6, 1e6])
def test_verdicts_do_not_depend_on_the_scale_of_f(scale: float) -> None:
    # Multiplying f (and its derivatives) by a constant changes no rate and no relative round-off: a jump
    # straddled by the noise probes is still a discontinuity, an exact quadratic model still a pass.
    jump = taylor_test(lambda z: scale * (float(z[0] > 0.3) + z[0]), np.array([0.3]), np.array([1.0]),
                       grad=np.array([scale]))
    assert jump.status == INCONCLUSIVE and "discontinuity" in jump.reason, jump.reason
    rng = np.random.default_rng(7)
    A = rng.standard_normal((3, 3))
    b, x, v = rng.standard_normal(3), rng.standard_normal(3), rng.standard_normal(3)
    quad = taylor_test(lambda z: scale * (z @ A @ z + b @ z + 3.0), x, v,
                       grad=scale * ((A + A.T) @ x + b), hvp=scale * (A + A.T) @ v)
    assert quad.status == PASS and "round-off" in quad.reason, quad.reason


def test_identically_zero_function_is_an_exact_model() -> None:
    # f = 0 (a loss that vanishes identically) with its exact gradient: remainders and floors are all 0.
    # A zero remainder is at the floor (not above it), and zero noise is no discontinuity: a pass.
    result = taylor_test(lambda z: 0.0 * float(np.sum(z)), np.ones(2), np.array([1.0, -2.0]), grad=np.zeros(2))
    assert result.status == PASS and "round-off" in result.reason, result.reason


def test_rescaling_v_rescales_the_steps_not_the_points() -> None:
    # The steps are per unit of v (h_0 = s / 2 with s = log(e + ||x||) / ||v||): 8 v takes steps 8 times
    # smaller, so f is evaluated at the same points and the remainders are the same.
    f, grad, _, x, v = _problem(11, 4)
    a = taylor_test(f, x, v, grad=grad)
    b = taylor_test(f, x, 8.0 * v, grad=grad)
    assert np.array_equal(np.array(a.steps), 8.0 * np.array(b.steps))
    np.testing.assert_allclose(b.remainders, a.remainders, rtol=1e-12, atol=0)


def test_default_steps_are_the_documented_powers_of_two() -> None:
    # Module docstring: h_k = h_0 2^-k, h_0 = s/2 rounded to a power of two, s = log(e + ||x||_inf) /
    # ||v||_inf, 24 steps.
    x, v = np.array([3.0, -1.0]), np.array([0.5, 0.25])
    result = taylor_test(lambda z: float(np.sum(np.sin(z))), x, v)
    hs = np.array(result.steps)
    s = math.log(math.e + 3.0) / 0.5
    assert len(hs) == 24 and np.all(hs[:-1] / hs[1:] == 2.0)
    assert s / 2 / math.sqrt(2) <= hs[0] <= s / 2 * math.sqrt(2)
    assert np.all(np.log2(hs) == np.round(np.log2(hs)))


def test_custom_steps_with_ratio_10_give_local_rates() -> None:
    # rates are the local slopes d log r / d log h, whatever the step ratio: 2 for a correct gradient.
    f, grad, _, x, v = _problem(1, 3)
    result = taylor_test(f, x, v, grad=grad, steps=[1e-1, 1e-2, 1e-3, 1e-4])
    assert result.status == PASS, result.reason
    assert np.allclose(result.rates, 2.0, atol=0.1), result.rates
    assert result.slope == pytest.approx(2.0, abs=0.1)


def test_one_sided_domain_leaves_that_step_out() -> None:
    # f = log z at x = 0.3: x - h v < 0 at the largest step h = 0.5, so r(h) (a max over both sides) is
    # not defined there: NaN (documented), not the one-sided remainder. The other steps give rate 2.
    def f(z):
        return math.log(z[0]) if z[0] > 0 else math.nan

    result = taylor_test(f, np.array([0.3]), np.array([1.0]), grad=np.array([1 / 0.3]))
    assert result.steps[0] == 0.5 and math.isnan(result.remainders[0])
    assert all(math.isfinite(r) for r in result.remainders[1:])
    assert result.status == PASS and abs(result.slope - 2.0) < 0.1, result.reason


@pytest.mark.parametrize(("ratio", "status"), [(1.25, FAIL), (0.75, PASS)])
def test_hvp_error_at_the_roundoff_floor_edge(ratio: float, status: str) -> None:
    # f = a z^2 at x = 0 with grad 0 and the claimed hvp 2 (i.e. a = 1): the second-order remainder is
    # (a - 1) h^2 exactly (powers of two), rate 2. The documented floor is 64 eps M(h) with M(h) =
    # |f(x)| + |f(x + hv)| + h^2/2 |<v, Hv>| = (a + 1) h^2 (nu = 0: the probes do not move x = 0). An
    # error 1.25x the floor is resolved -- a wrong hvp fails -- and one 0.75x the floor is not: a pass.
    ro = tolerance(np.float64, "roundoff")
    a = 1.0 + ratio * 2.0 * ro  # (a - 1) h^2 = ratio * ro * 2 h^2 ~ ratio * floor
    result = taylor_test(lambda z: a * z[0] ** 2, np.zeros(1), np.ones(1), grad=np.zeros(1), hvp=np.array([2.0]))
    assert result.status == status, result.reason
    for h, r in zip(result.steps, result.remainders):
        assert r == (a - 1.0) * h * h  # exact, so the edge is where it is meant to be


def test_exact_model_after_a_fall_compares_with_the_floor_where_it_lands() -> None:
    # f = 1 + 64 z + R(|z|) with its gradient 64: the floors grow with h (they include |f(x + hv)| and
    # h |<g, v>|), here 36 vs 20 x 2^-46 at the last step above and the first at the floor. R falls to 0
    # from 2^(2 + 4.5) times the floor where it lands (faster than rate 2 + 4): an exact model for small
    # steps, although R is below 2^(2 + 4) times its own, higher floor.
    steps = [2.0**-k for k in range(1, 7)]
    landing = 20 * 2.0**-46  # 64 eps (|f(x)| + |f(x + hv)| + h |g v| + nu / eps) at h = 1/8, R = 0
    fall = {steps[1]: 2.0 ** (2 + 4.5) * landing}

    def f(z):
        return 1.0 + 64.0 * z[0] + fall.get(abs(float(z[0])), 0.0)

    result = taylor_test(f, np.zeros(1), np.ones(1), grad=np.array([64.0]), steps=steps)
    assert result.floors[2] == landing and result.floors[1] > 1.5 * landing
    assert result.status == PASS and "falls from" in result.reason, result.reason


@pytest.mark.parametrize(
    ("exps", "used", "status"),
    [
        # small-end slope = median of the last three local rates (2, 2, 2.5) = 2: 2.5 at the large end
        # is outside the window (0.5 away); the median of two or four rates would be 2.25 and take it in
        ([-2, -7, -11, -15, -20], (False, True, True, True, True), PASS),
        # one outlier in the last local rate (3 among 2, 2, 3): the median ignores it and the window
        # keeps the smallest step: all steps used
        ([-2, -6, -10, -14, -20], (True, True, True, True, True), PASS),
        # an outlier in the middle of the last three (2, 3, 2): the rates before the last one do not
        # agree with the small-end slope, the window has two steps: no rate
        ([-2, -6, -10, -16, -20], (False, False, False, True, True), INCONCLUSIVE),
    ],
)
def test_slope_window_from_the_median_of_the_last_three_rates(exps, used, status) -> None:
    # Steps 4^-k and exact power-of-two remainders: local rates are exact (exponent differences / 2).
    steps = [4.0**-k for k in range(5)]
    result = _run({h: 2.0**e for h, e in zip(steps, exps)}, steps)
    assert result.status == status, result.reason
    assert result.used == used
