"""verify.directional_derivative: accuracy, honest error estimates, step policy, input validation.

Exact values come from mpmath (40 digits) on the mpmath version of each test
function (tests/test_engine_cases.py) and, for Richardson, from numdifftools.
"""

from __future__ import annotations

import json
import math
import warnings

import numdifftools as nd
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_engine_cases import FAMILIES, Case, cases, exact_directional, make_case, unit

from reference.errors import InvalidInputError, NotAnalyticError
from verify import Estimate, directional_derivative
from verify._numdiff import CENTRAL_SCALE, RICHARDSON_SCALE

EPS = np.finfo(np.float64).eps
METHODS = ("complex", "central", "richardson")


def _scale(case: Case, v: np.ndarray, exact: float) -> float:
    """The size a directional derivative's rounding is relative to.

    max(|D|, ||g|| ||v||, sum_i |v_i| sum|terms of g_i|): a direction nearly orthogonal
    to g has D ~ 0, and a gradient that is itself a cancelling sum (log-sum-exp: a
    p-weighted mean of rows of B) is only known relative to its terms.
    """
    gnorm = float(np.linalg.norm(case.grad(case.x)) * np.linalg.norm(v))
    return max(abs(exact), gnorm, case.term_scale(v))


@pytest.mark.parametrize("method", METHODS)
@given(case=cases(), seed=st.integers(0, 2**32 - 1), offset=st.sampled_from([0.0, 1e3, -1e6]))
def test_error_estimate_is_honest(method: str, case: Case, seed: int, offset: float) -> None:
    # The true error (against 40-digit mpmath) never exceeds the reported error,
    # including with a large constant offset (round-off of f dominates).
    v = np.random.default_rng(seed).standard_normal(case.n)

    def f(x):
        return case.f(x) + offset

    est = directional_derivative(f, case.x, v, method=method)
    exact = exact_directional(case, case.x, v)
    assert est.method == method
    assert abs(est.value - exact) <= est.error, (est, exact)


@given(case=cases(), seed=st.integers(0, 2**32 - 1))
def test_complex_step_is_accurate_to_1e13(case: Case, seed: int) -> None:
    v = unit(np.random.default_rng(seed), case.n)
    est = directional_derivative(case.f, case.x, v)
    exact = exact_directional(case, case.x, v)
    assert abs(est.value - exact) <= 1e-13 * _scale(case, v, exact)
    assert est.error <= 1e-13 * _scale(case, v, exact) + 1e-300  # and it knows it


@pytest.mark.parametrize(("method", "accuracy"), [("central", 1e-6), ("richardson", 1e-9)])
@given(case=cases(), seed=st.integers(0, 2**32 - 1))
def test_real_methods_accuracy(method: str, accuracy: float, case: Case, seed: int) -> None:
    # Measured: central ~1e-9, Richardson ~1e-11 relative (typical); these bounds leave room.
    # A difference quotient resolves derivatives relative to f's own size too (round-off
    # eps |f| / t), so the scale includes |f(x)| ||v|| / max(1, ||x||).
    v = unit(np.random.default_rng(seed), case.n)
    est = directional_derivative(case.f, case.x, v, method=method)
    exact = exact_directional(case, case.x, v)
    scale = max(_scale(case, v, exact), abs(case.f(case.x)) / max(1.0, np.max(np.abs(case.x))))
    assert abs(est.value - exact) <= accuracy * scale
    assert est.error <= accuracy * scale


@given(case=cases(max_n=6), seed=st.integers(0, 2**32 - 1))
def test_richardson_agrees_with_numdifftools(case: Case, seed: int) -> None:
    v = unit(np.random.default_rng(seed), case.n)
    ours = directional_derivative(case.f, case.x, v, method="richardson")
    theirs = nd.Derivative(lambda t: case.f(case.x + t * v), method="central", full_output=True)(0.0)
    exact = exact_directional(case, case.x, v)
    nd_value, nd_error = float(theirs.estimate), float(theirs.error_estimate)
    # Two independent extrapolations agree within the sum of their error estimates ...
    assert abs(ours.value - nd_value) <= ours.error + nd_error + 4 * EPS * _scale(case, v, exact)
    # ... and ours is not much less accurate than numdifftools' (measured: same order).
    assert abs(ours.value - exact) <= max(100 * abs(nd_value - exact), 1e-11 * _scale(case, v, exact))


def test_step_policy() -> None:
    case = make_case("expsin", 4, 3)
    v = np.array([0.5, -1.0, 0.25, 0.0])
    s = math.log(math.e + np.max(np.abs(case.x))) / 1.0  # ||v||_inf = 1
    c = directional_derivative(case.f, case.x, v, method="central")
    r = directional_derivative(case.f, case.x, v, method="richardson")
    cs = directional_derivative(case.f, case.x, v, method="complex")
    for t in (*c.steps, *r.steps, *cs.steps[:1]):
        assert math.log2(t) == round(math.log2(t))  # powers of two: t*v exact, ratios exact
    # central: eps^(1/3) s; richardson: smallest eps^(1/2.5) s (numdifftools' base step), ratio 2.
    assert abs(math.log2(c.step) - math.log2(EPS ** (1 / CENTRAL_SCALE) * s)) <= 0.5
    assert abs(math.log2(r.steps[0]) - math.log2(EPS ** (1 / RICHARDSON_SCALE) * s)) <= 0.5
    assert np.all(np.diff(np.log2(r.steps)) == 1.0)
    assert r.steps[-1] <= 2**-4 * s
    assert cs.step < 1e-29
    # A step override is used as given.
    assert directional_derivative(case.f, case.x, v, method="central", step=1e-4).step == 1e-4
    assert directional_derivative(case.f, case.x, v, method="richardson", step=1e-4).steps[0] == 1e-4
    assert directional_derivative(case.f, case.x, v, method="complex", step=1e-20).step == 1e-20


def test_estimate_is_frozen_and_serialisable() -> None:
    est = directional_derivative(make_case("quad", 3, 0).f, np.ones(3), np.ones(3))
    assert isinstance(est, Estimate)
    with pytest.raises(AttributeError):
        est.value = 0.0  # type: ignore[misc]
    d = json.loads(json.dumps(est.to_dict()))
    assert d["method"] == "complex" and d["value"] == est.value and d["evaluations"] == est.evaluations


def test_float32_function_uses_float32_precision() -> None:
    # f computes in float32: steps follow float32's eps and the error bound is float32-sized,
    # yet still honest against the exact derivative of the underlying function.
    case = make_case("expsin", 5, 11)

    def f32(x):
        return np.float32(case.f(np.asarray(x, dtype=np.float32).astype(np.float64)))

    v = unit(np.random.default_rng(1), 5)
    exact = exact_directional(case, case.x.astype(np.float32), v)
    eps32 = float(np.finfo(np.float32).eps)
    for method in ("central", "richardson"):
        est = directional_derivative(f32, case.x.astype(np.float32), v, method=method)
        assert abs(est.value - exact) <= est.error
        assert est.error > 100 * EPS * abs(exact)  # float64-sized bounds would be lies
    c = directional_derivative(f32, case.x, v, method="central")
    assert c.step > 0.25 * eps32 ** (1 / 3)


# ---------------------------------------------------------------------------------------------
# non-analytic functions


def _real_only(x):
    if np.iscomplexobj(x):
        raise ValueError("this function only takes real input")
    return float(np.sum(x**2))


@pytest.mark.parametrize(
    "f",
    [
        lambda x: float(np.sum(np.abs(x))),  # float() of a complex: TypeError
        lambda x: np.sum(np.abs(x)),  # |z| is real: the imaginary part is dropped
        lambda x: np.sum(np.asarray(x, dtype=np.float64) ** 2),  # ComplexWarning on the cast
        lambda x: math.exp(x[0]),  # math rejects complex
        _real_only,  # any exception raised only for complex input
    ],
    ids=["float", "abs", "cast", "math", "raises"],
)
def test_complex_step_refuses_non_analytic(f) -> None:
    x = np.array([0.5, -1.5])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(NotAnalyticError, match="richardson"):
            directional_derivative(f, x, np.ones(2), method="complex")
    est = directional_derivative(f, x, np.array([1.0, 0.5]), method="richardson")
    assert math.isfinite(est.value) and est.error < 1e-6


def test_notanalytic_raised_by_f_propagates() -> None:
    def f(x):
        if np.iscomplexobj(x):
            raise NotAnalyticError("relu is not analytic")
        return float(np.sum(np.maximum(x, 0)))

    with pytest.raises(NotAnalyticError, match="relu"):
        directional_derivative(f, np.ones(2), np.ones(2))


# ---------------------------------------------------------------------------------------------
# input validation


def _f(x):
    return float(np.sum(x**2))


@pytest.mark.parametrize(
    ("x", "v", "kwargs", "match"),
    [
        (np.array([1.0, np.nan]), np.ones(2), {}, r"x=.*non-finite"),
        (np.ones(2), np.array([np.inf, 1.0]), {}, r"v=.*non-finite"),
        (np.ones(2), np.zeros(2), {}, r"v=.*zero vector"),
        (np.ones(2), np.ones(3), {}, r"shape \(3,\).*shape \(2,\)"),
        (np.ones(2), np.ones(2), {"method": "forward"}, r"method='forward'"),
        (np.ones(2), np.ones(2), {"step": -1.0}, r"step=-1.0"),
        (np.ones(2), np.ones(2), {"step": math.nan}, r"step=nan"),
        (np.array([], dtype=float), np.array([], dtype=float), {}, r"x=.*empty"),
        (np.array(["a"]), np.ones(1), {}, r"x=.*real numeric"),
    ],
)
def test_invalid_inputs(x, v, kwargs, match) -> None:
    with pytest.raises(InvalidInputError, match=match):
        directional_derivative(_f, x, v, **kwargs)


@pytest.mark.parametrize(
    ("f", "match"),
    [
        (lambda x: x, r"must return a real scalar"),
        (lambda x: math.nan, r"f\(x\)=nan is not finite"),
        (lambda x: 1j + x[0], r"complex for real x"),
        (3.0, r"f=3.0 must be callable"),
    ],
)
def test_invalid_functions(f, match) -> None:
    with pytest.raises(InvalidInputError, match=match):
        directional_derivative(f, np.ones(2), np.ones(2))


def test_families_cover_the_list() -> None:
    assert set(FAMILIES) == {"poly", "expsin", "quad", "rosen", "logsumexp", "lin"}


def test_complex_step_error_bounds_cancelling_dominant_terms() -> None:
    # D = sum_i a_i v_i where two terms of size 1e3 cancel to ~1 (the others 1e-6..1): the rounding of
    # the big products is all the error, and the estimate must cover it in every direction. The true
    # error comes from exact rational arithmetic (fractions) on the float64 a and v. A +-1 random-sign
    # rounding scale T cancels the pair with probability 1/2 (and deterministically for a seeded sign
    # pattern): with it, 17 of 2000 such directions had their error underestimated up to 600x.
    from fractions import Fraction

    rng = np.random.default_rng(2024)
    worst = 0.0
    for _ in range(200):
        n = int(rng.integers(2, 13))
        a = rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-3, 3, n)
        v = rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3, n) * 1e-3
        i, j = rng.choice(n, 2, replace=False)
        v[i] = 1e3 / a[i] * rng.choice([-1.0, 1.0])
        v[j] = -a[i] * v[i] / a[j] * (1.0 + rng.uniform(-1e-3, 1e-3))
        est = directional_derivative(lambda y, a=a: np.sum(a * y), rng.standard_normal(n), v)
        exact = float(sum(Fraction(float(ai)) * Fraction(float(vi)) for ai, vi in zip(a, v)))
        worst = max(worst, abs(est.value - exact) / est.error)
    assert worst <= 1.0, worst
