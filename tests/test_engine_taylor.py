"""verify.taylor_test: rates 1/2/3, wrong derivatives fail, round-off floor, kinks.

Gradients and Hessian-vector products are closed forms of the test functions;
the expected rates are the theory (Farrell et al. 2013), not the code.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from test_engine_cases import unit

from reference.errors import InvalidInputError
from verify import FAIL, INCONCLUSIVE, PASS, TaylorResult, taylor_test


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
