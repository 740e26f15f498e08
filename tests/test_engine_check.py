"""verify.check_gradient: correct gradients pass, wrong ones fail, kinks are inconclusive.

Claimed gradients are closed forms (checked against mpmath in
tests/test_engine_cases.py); wrong gradients are built from them by known
perturbations, so each expected verdict is known independently of the engine.
"""

from __future__ import annotations

import json
import math
import re
import os
import warnings

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_engine_cases import FAMILIES, Case, cases, make_case, unit

from reference.errors import InvalidInputError, NotAnalyticError
from verify import FAIL, INCONCLUSIVE, PASS, STATUSES, Verdict, check_gradient
from verify.tolerance import tolerance

# >= 1000 cases under the thorough profile (its max_examples), 20 in ci.
_FALSE_ALARM_EXAMPLES = 1000 if os.environ.get("HYPOTHESIS_PROFILE") == "thorough" else None


def _settings_false_alarm(f):
    return settings(max_examples=_FALSE_ALARM_EXAMPLES)(f) if _FALSE_ALARM_EXAMPLES else f


# ---------------------------------------------------------------------------------------------
# (1) a correct gradient at a smooth point is never "fail"


@_settings_false_alarm
@given(case=cases(max_n=40), seed=st.integers(0, 2**32 - 1), offset=st.sampled_from([0.0, 1.0, -1e4]))
def test_no_false_alarms(case: Case, seed: int, offset: float) -> None:
    def f(x):
        return case.f(x) + offset

    verdict = check_gradient(f, case.grad, case.x, seed=seed)
    assert verdict.status != FAIL, verdict.reason
    assert verdict.status == PASS, verdict.reason  # smooth, analytic: nothing to be unsure about
    assert verdict.method == "complex"


@pytest.mark.parametrize("method", ["richardson", "central"])
@given(case=cases(max_n=20), seed=st.integers(0, 2**32 - 1))
def test_no_false_alarms_with_real_differences(method: str, case: Case, seed: int) -> None:
    verdict = check_gradient(case.f, case.grad(case.x), case.x, seed=seed, method=method)
    assert verdict.status != FAIL, verdict.reason
    assert verdict.method == method


def test_callable_and_array_gradients_agree() -> None:
    case = make_case("expsin", 7, 5)
    a = check_gradient(case.f, case.grad, case.x)
    b = check_gradient(case.f, case.grad(case.x), case.x)
    assert a.status == b.status == PASS and a.error == b.error


def test_stationary_point_passes() -> None:
    # g = 0 at the minimum of 1 + ||x - 1||^2: no scale from g; f's size gives one (Richardson).
    def f(x):
        return 1.0 + np.sum((x - 1.0) ** 2)

    assert check_gradient(f, np.zeros(5), np.ones(5)).status == PASS
    assert check_gradient(f, np.zeros(5), np.ones(5), method="richardson").status == PASS
    assert check_gradient(f, np.full(5, 1e-3), np.ones(5)).status == FAIL


# ---------------------------------------------------------------------------------------------
# (2) wrong gradients fail


def _wrong(kind: str, g: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gnorm = np.linalg.norm(g)
    if kind == "relative_1e-8":  # ||error|| = 1e-8 ||g|| in a random direction
        return g + 1e-8 * gnorm * unit(rng, g.size)
    if kind == "scaled_1+1e-8":
        return g * (1 + 1e-8)
    if kind == "sign_flip":
        return -g
    if kind == "one_component":  # one entry off by 1e-8 ||g||
        bad = g.copy()
        bad[rng.integers(g.size)] += 1e-8 * gnorm
        return bad
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["relative_1e-8", "scaled_1+1e-8", "sign_flip", "one_component"])
@given(case=cases(max_n=30), seed=st.integers(0, 2**32 - 1))
def test_wrong_gradients_fail(kind: str, case: Case, seed: int) -> None:
    g = case.grad(case.x)
    assume(np.linalg.norm(g) > 0)
    bad = _wrong(kind, g, np.random.default_rng(seed))
    verdict = check_gradient(case.f, bad, case.x, seed=seed)
    assert verdict.status == FAIL, verdict.reason
    assert verdict.error > verdict.tolerance
    assert "mismatch" in verdict.reason


@given(case=cases(max_n=10), seed=st.integers(0, 2**32 - 1))
def test_richardson_catches_1e7_errors(case: Case, seed: int) -> None:
    # Without complex step (Richardson, error ~1e-11 relative) 1e-7 is still caught.
    g = case.grad(case.x)
    assume(np.linalg.norm(g) > 0)
    bad = g + 1e-7 * np.linalg.norm(g) * unit(np.random.default_rng(seed), g.size)
    verdict = check_gradient(case.f, bad, case.x, method="richardson", seed=seed)
    assert verdict.status == FAIL, verdict.reason


def test_tolerance_is_tight_enough_for_1e8_in_float64() -> None:
    # The float64 row must be ~1e-10 or tighter for a 1e-8 error to be visible in a random
    # direction of R^n (it shows up as ~1e-8 / sqrt(n)).
    assert tolerance(np.float64, "gradient") <= 1e-10


# ---------------------------------------------------------------------------------------------
# (3) kinks are inconclusive


def _relu_net(seed: int, impl: str):
    rng = np.random.default_rng(seed)
    n, m = int(rng.integers(1, 12)), int(rng.integers(1, 6))
    W, c, b, x = rng.standard_normal((m, n)), rng.standard_normal(m), rng.standard_normal(m), rng.standard_normal(n)
    j = int(rng.integers(m))
    b[j] = -(W[j] @ x)  # unit j sits on its kink at x (to rounding)
    if impl == "maximum":  # accepts complex input: complex step would give a one-sided slope
        def act(z):
            return np.maximum(z, 0)

        def dact(z):
            return (np.real(z) > 0).astype(float)  # relu'(0) = 0, the convention
    elif impl == "abs":  # returns a real value for complex input: Richardson is used
        act, dact = np.abs, np.sign
    else:  # smooth part plus a kink
        def act(z):
            return np.maximum(z, 0) + np.tanh(z)

        def dact(z):
            return (np.real(z) > 0) + 1 - np.tanh(z) ** 2

    def f(x):
        return c @ act(W @ x + b) + 0.1 * np.sum(np.sin(x))

    def g(x):
        return W.T @ (c * dact(W @ x + b)) + 0.1 * np.cos(x)

    return f, g, x


@pytest.mark.parametrize("impl", ["maximum", "abs", "relu_tanh"])
@given(seed=st.integers(0, 2**32 - 1))
def test_kink_is_inconclusive(impl: str, seed: int) -> None:
    f, g, x = _relu_net(seed, impl)
    verdict = check_gradient(f, g, x)
    assert verdict.status == INCONCLUSIVE, verdict.reason
    assert "kink" in verdict.reason
    assert any(d["kink"] for d in verdict.details)


@given(seed=st.integers(0, 2**32 - 1))
def test_sign_flipped_gradient_at_a_kink_never_passes(seed: int) -> None:
    # -<g,v> may by chance lie between the one-sided slopes (then inconclusive is right).
    f, g, x = _relu_net(seed, "relu_tanh")
    assume(np.linalg.norm(g(x)) > 1e-3)
    verdict = check_gradient(f, -g(x), x)
    assert verdict.status in (FAIL, INCONCLUSIVE), verdict.reason


def test_gradient_outside_the_one_sided_slopes_fails() -> None:
    # f = relu(x0) + 5 x1 at x0 = 0: one-sided slopes along v are 5 v1 + {max, min}(v0, 0),
    # so a claimed (0, -5) (<g,v> = -5 v1) is outside them unless |10 v1| <= |v0|.
    def f(x):
        return np.maximum(x[0], 0) + 5 * x[1]

    x = np.array([0.0, 0.3])
    assert check_gradient(f, np.array([0.0, 5.0]), x).status == INCONCLUSIVE
    verdict = check_gradient(f, np.array([0.0, -5.0]), x)
    assert verdict.status == FAIL and "outside" in verdict.reason, verdict.reason


@pytest.mark.parametrize("impl", ["maximum", "abs"])
@given(seed=st.integers(0, 2**32 - 1))
def test_relu_net_away_from_kinks_passes(impl: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, m = int(rng.integers(1, 12)), int(rng.integers(1, 12))
    W, c, b, x = rng.standard_normal((m, n)), rng.standard_normal(m), rng.standard_normal(m), rng.standard_normal(n)
    assume(np.min(np.abs(W @ x + b)) > 1e-3)  # no kink within 1e-3 of x (the probe steps are ~1e-6)
    act, dact = (lambda z: np.maximum(z, 0), lambda z: (z > 0).astype(float)) if impl == "maximum" else (np.abs, np.sign)
    verdict = check_gradient(lambda x: c @ act(W @ x + b), W.T @ (c * dact(W @ x + b)), x)
    assert verdict.status == PASS, verdict.reason


# ---------------------------------------------------------------------------------------------
# float32


def test_float32_uses_float32_row() -> None:
    case = make_case("expsin", 9, 2)
    x32 = case.x.astype(np.float32)
    g32 = case.grad(x32.astype(np.float64)).astype(np.float32)  # correct, rounded to float32
    verdict = check_gradient(case.f, g32, x32)
    assert verdict.dtype == "float32" and verdict.status == PASS, verdict.reason
    assert verdict.tolerance >= tolerance(np.float32, "gradient")
    # The same float32-rounded gradient judged with float64's row would (wrongly) fail:
    assert check_gradient(case.f, g32, x32, rtol=tolerance(np.float64, "gradient")).status == FAIL
    # a float32 gradient alone (float64 x) also selects the float32 row
    assert check_gradient(case.f, g32, x32.astype(np.float64)).dtype == "float32"
    # and so does a float32 x alone: the float32-rounded gradient handed over in float64 still passes
    alone = check_gradient(case.f, g32.astype(np.float64), x32)
    assert alone.dtype == "float32" and alone.status == PASS, alone.reason
    # and float32 still catches a 1e-3 error
    assert check_gradient(case.f, g32 * np.float32(1 + 1e-3), x32).status == FAIL


def test_float32_function_without_complex_support() -> None:
    # f casts to float32 itself (a float32 backend): Richardson in float32 precision.
    a = np.linspace(-1, 1, 6).astype(np.float32)

    def f(x):
        x32 = np.asarray(x).astype(np.float32)
        return np.sum(np.exp(np.sin(a * x32)))

    x = np.linspace(0.1, 0.6, 6).astype(np.float32)
    g = (a * np.cos(a * x) * np.exp(np.sin(a * x))).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        verdict = check_gradient(f, g, x)
    assert verdict.status == PASS and verdict.method == "richardson" and verdict.dtype == "float32"
    assert check_gradient(f, -g, x).status == FAIL


# ---------------------------------------------------------------------------------------------
# complex-step fallbacks


def test_non_analytic_function_falls_back_to_richardson() -> None:
    def f(x):
        return float(np.sum(np.asarray(x, dtype=float) ** 2))  # rejects complex (ComplexWarning)

    x = np.array([0.3, -1.2, 2.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        verdict = check_gradient(f, 2 * x, x)
    assert verdict.status == PASS and verdict.method == "richardson"
    assert "complex step unavailable" in verdict.reason


def test_complex_accepting_but_non_analytic_function_is_caught() -> None:
    # f(z) = z * conj(z) accepts complex input but is not analytic: complex step says the
    # derivative is 0. The cross-examination with Richardson exposes it.
    def f(x):
        return np.sum(x * np.conj(x))  # real for real x; Im = 0 exactly for complex x

    x = np.array([0.3, -1.2, 2.0])
    verdict = check_gradient(f, 2 * x, x)
    assert verdict.status == PASS and verdict.method == "richardson", verdict.reason
    assert "not complex-analytic" in verdict.reason


def test_forcing_complex_on_non_analytic_raises() -> None:
    with pytest.raises(NotAnalyticError):
        check_gradient(lambda x: float(np.sum(np.abs(x))), np.ones(2), np.ones(2), method="complex")


# ---------------------------------------------------------------------------------------------
# verdict object, determinism, validation


def test_verdict_shape_and_json() -> None:
    case = make_case("quad", 4, 1)
    verdict = check_gradient(case.f, case.grad, case.x, directions=5)
    assert isinstance(verdict, Verdict) and verdict.status in STATUSES and verdict.check == "gradient"
    assert len(verdict.details) == 5
    with pytest.raises(AttributeError):
        verdict.status = FAIL  # type: ignore[misc]
    d = json.loads(json.dumps(verdict.to_dict()))
    assert d["status"] == "pass" and d["dtype"] == "float64" and len(d["details"]) == 5
    assert (PASS, FAIL, INCONCLUSIVE) == ("pass", "fail", "inconclusive")


def test_deterministic_for_a_seed() -> None:
    case = make_case("rosen", 6, 4)
    a = check_gradient(case.f, case.grad, case.x, seed=3)
    b = check_gradient(case.f, case.grad, case.x, seed=3)
    assert a == b


def test_non_finite_gradient_fails() -> None:
    verdict = check_gradient(lambda x: float(np.sum(x**2)), np.array([1.0, np.nan]), np.ones(2))
    assert verdict.status == FAIL and "non-finite" in verdict.reason


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"directions": 0}, r"directions=0"),
        ({"directions": 2.5}, r"directions=2.5"),
        ({"rtol": -1.0}, r"rtol=-1.0"),
        ({"rtol": 2.0}, r"rtol=2.0"),
        ({"method": "secant"}, r"method='secant'"),
        ({"seed": "a"}, r"seed='a'"),
        ({"scale_floor": -1.0}, r"scale_floor=-1.0"),
        ({"scale_floor": float("inf")}, r"scale_floor=inf"),
    ],
)
def test_invalid_arguments(kwargs, match) -> None:
    with pytest.raises(InvalidInputError, match=match):
        check_gradient(lambda x: float(np.sum(x**2)), np.ones(2), np.ones(2), **kwargs)


def test_scale_floor_measures_a_tiny_gradient_against_the_floor() -> None:
    # f = c + a.x with |a| ~ 1e-9: the exact gradient is a; an absolute error of 1e-12 is 1e-3 of |a|, far above
    # float64's relative tolerance (3.7e-11), but only 1e-12 of a floor of 1
    a = 1e-9 * np.array([1.0, -2.0, 0.5])
    x = np.array([0.3, -0.1, 0.7])

    def f(z):
        return 0.69 + np.sum(a * z)

    wrong = a + 1e-12
    assert check_gradient(f, wrong, x).status == FAIL
    floored = check_gradient(f, wrong, x, scale_floor=1.0)
    assert floored.status == PASS and "rounding floor" in floored.reason
    # a floor below ||g|| changes nothing, and errors above tol * floor still fail
    assert check_gradient(f, wrong, x, scale_floor=1e-12).status == FAIL
    assert check_gradient(f, a + 1e-8, x, scale_floor=1.0).status == FAIL
    assert check_gradient(f, a, x, scale_floor=1.0).status == PASS


def test_gradient_shape_mismatch() -> None:
    with pytest.raises(InvalidInputError, match=r"grad has shape \(3,\) but x has shape \(2,\)"):
        check_gradient(lambda x: float(np.sum(x**2)), np.ones(3), np.ones(2))


def test_matrix_shaped_parameters() -> None:
    # x may have any shape; f receives it in that shape.
    A = np.arange(6.0).reshape(2, 3) / 7

    def f(X):
        return np.sum(np.sin(X * A))

    X = np.ones((2, 3)) * 0.4
    assert check_gradient(f, A * np.cos(X * A), X).status == PASS
    assert check_gradient(f, (A * np.cos(X * A)).T.reshape(2, 3), X).status == FAIL


def test_all_families_listed() -> None:
    assert len(FAMILIES) == 6


# ---------------------------------------------------------------------------------------------
# budget="fast": one direction along the claimed gradient plus a random one


def _maml_problem(seed: int, sizes=(1, 8, 8, 1), activation: str = "tanh", inner_lr: float = 0.1,
                  inner_steps: int = 2, n_tasks: int = 2):
    """A MAML meta-loss of flat parameters (complex-step safe) and its analytic reference gradient."""
    from reference import maml
    from reference.models import MLP, flatten, unflatten
    from reference.tasks import sinusoid

    model = MLP(list(sizes), activation, "mse")
    params = model.init(seed)
    tasks = sinusoid(n_tasks, 5, 5, seed=seed)

    def f(x):
        return maml.meta_loss(model, unflatten(np.asarray(x), model.shapes), tasks, inner_lr, inner_steps)

    _, g = maml.meta_loss_and_grad(model, params, tasks, inner_lr, inner_steps)
    blocks = np.cumsum([0] + [int(np.prod(s)) for s in model.shapes])
    return f, flatten(g), flatten(params), blocks


@_settings_false_alarm
@given(seed=st.integers(0, 2**32 - 1), width=st.integers(1, 12), steps=st.integers(1, 3),
       lr=st.sampled_from([0.01, 0.1, 0.3]), activation=st.sampled_from(["tanh", "sigmoid", "softplus"]),
       check_seed=st.integers(0, 2**32 - 1))
def test_fast_never_fails_a_correct_maml_gradient(seed, width, steps, lr, activation, check_seed) -> None:
    f, g, x, _ = _maml_problem(seed, (1, width, width, 1), activation, lr, steps)
    verdict = check_gradient(f, g, x, seed=check_seed, budget="fast")
    assert verdict.status == PASS, verdict.reason
    assert verdict.method == "complex" and len(verdict.details) == 1


@_settings_false_alarm
@given(case=cases(max_n=40), seed=st.integers(0, 2**32 - 1), offset=st.sampled_from([0.0, 1.0, -1e4]))
def test_fast_no_false_alarms(case: Case, seed: int, offset: float) -> None:
    verdict = check_gradient(lambda x: case.f(x) + offset, case.grad, case.x, seed=seed, budget="fast")
    assert verdict.status == PASS, verdict.reason


@given(case=cases(max_n=20), seed=st.integers(0, 2**32 - 1))
def test_fast_central_no_false_alarms(case: Case, seed: int) -> None:
    verdict = check_gradient(case.f, case.grad(case.x), case.x, seed=seed, method="central", budget="fast")
    assert verdict.status != FAIL, verdict.reason


@given(case=cases(max_n=12), seed=st.integers(0, 2**32 - 1))
def test_fast_complex_error_bound_holds(case: Case, seed: int) -> None:
    # The two-evaluation complex step's error estimate bounds its distance to the mpmath derivative.
    from test_engine_cases import exact_directional

    g = case.grad(case.x)
    verdict = check_gradient(case.f, g, case.x, seed=seed, budget="fast")
    d = verdict.details[0]
    # The fast direction, rebuilt from its definition (check_gradient's docstring).
    rng = np.random.default_rng(seed)
    r = rng.standard_normal(case.x.size)
    r /= np.linalg.norm(r)
    if np.linalg.norm(g) > 0:
        ghat = g / np.linalg.norm(g)
        r = r if r @ ghat >= 0 else -r
        v = (ghat + r) / np.linalg.norm(ghat + r)
    else:
        v = r
    assert d["claimed"] == pytest.approx(math.fsum(g * v), rel=1e-12, abs=1e-300)
    exact = exact_directional(case, case.x, v)
    assert abs(d["estimate"] - exact) <= d["estimate_error"], (d, exact)


def test_fast_catches_1e8_errors_on_maml() -> None:
    # Planted errors of relative size 1e-8 (the float64 goal) on a 1-8-8-1 MAML meta-gradient
    # (97 parameters). One tensor scaled by 1 + 1e-8 projects onto g/||g|| at full size: caught on
    # every seed. A random-direction error is seen only through the random half, as ~1e-8 / sqrt(2 n)
    # ~ 7e-10 (20x the tolerance) times a random factor that is sometimes small: one direction misses
    # it now and then (measured: 39 of 40 seeds caught), hence a count, not every seed.
    caught_random = 0
    seeds = range(16)
    for seed in seeds:
        f, g, x, blocks = _maml_problem(seed)
        assert check_gradient(f, g, x, seed=seed, budget="fast").status == PASS
        scaled = g.copy()
        scaled[blocks[2]:blocks[3]] *= 1 + 1e-8  # W2
        verdict = check_gradient(f, scaled, x, seed=seed, budget="fast")
        assert verdict.status == FAIL and "mismatch" in verdict.reason, (seed, verdict.reason)
        rng = np.random.default_rng(1000 + seed)
        bad = g + 1e-8 * np.linalg.norm(g) * unit(rng, g.size)
        verdict = check_gradient(f, bad, x, seed=seed, budget="fast")
        assert verdict.status in (FAIL, PASS), verdict.reason
        caught_random += verdict.status == FAIL
    assert caught_random >= len(seeds) - 2, caught_random


@pytest.mark.parametrize("kind", ["scaled_1+1e-8", "sign_flip"])
@given(case=cases(max_n=30), seed=st.integers(0, 2**32 - 1))
def test_fast_catches_errors_along_the_gradient(kind: str, case: Case, seed: int) -> None:
    # Errors parallel to g are always visible along the first direction (<e, v> >= ||e|| / sqrt(2)).
    g = case.grad(case.x)
    assume(np.linalg.norm(g) > 0)
    bad = _wrong(kind, g, np.random.default_rng(seed))
    verdict = check_gradient(case.f, bad, case.x, seed=seed, budget="fast")
    assert verdict.status == FAIL, verdict.reason


@pytest.mark.parametrize("impl", ["maximum", "abs", "relu_tanh"])
@given(seed=st.integers(0, 2**32 - 1))
def test_fast_kink_is_inconclusive(impl: str, seed: int) -> None:
    f, g, x = _relu_net(seed, impl)
    verdict = check_gradient(f, g, x, budget="fast")
    assert verdict.status == INCONCLUSIVE, verdict.reason
    assert "kink" in verdict.reason and verdict.details[0]["kink"]


def test_fast_evaluation_count_is_flat_in_the_parameter_count() -> None:
    # f(x), 2 complex-step evaluations, 4 kink-probe and 2 noise evaluations, whatever n is.
    for n in (3, 300, 30000):
        calls = {"real": 0, "complex": 0}
        a = np.linspace(-1, 1, n)

        def f(x):
            calls["complex" if np.iscomplexobj(x) else "real"] += 1
            return np.sum(np.sin(a * x)) / n

        x = np.linspace(0.2, 0.9, n)
        assert check_gradient(f, a * np.cos(a * x) / n, x, budget="fast").status == PASS
        assert calls == {"real": 7, "complex": 2}, (n, calls)


def test_fast_budget_options() -> None:
    case = make_case("expsin", 6, 2)
    assert len(check_gradient(case.f, case.grad, case.x, budget="fast").details) == 1
    three = check_gradient(case.f, case.grad, case.x, budget="fast", directions=3)
    assert three.status == PASS and len(three.details) == 3 and "budget='fast'" in three.reason
    assert len(check_gradient(case.f, case.grad, case.x).details) == 8  # the default is unchanged
    with pytest.raises(InvalidInputError, match=r"budget='quick'"):
        check_gradient(case.f, case.grad, case.x, budget="quick")


def test_fast_without_complex_step_uses_central_differences() -> None:
    def f(x):
        return float(np.sum(np.asarray(x, dtype=float) ** 3))  # rejects complex (ComplexWarning)

    x = np.array([0.3, -1.2, 2.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        verdict = check_gradient(f, 3 * x**2, x, budget="fast")
        assert verdict.status == PASS and verdict.method == "central", verdict.reason
        assert check_gradient(f, 3 * x**2 * (1 + 1e-6), x, budget="fast").status == FAIL


def test_fast_non_analytic_complex_function_falls_back() -> None:
    def f(x):
        return np.sum(x * np.conj(x))  # accepts complex, not analytic: complex step says 0

    x = np.array([0.3, -1.2, 2.0])
    verdict = check_gradient(f, 2 * x, x, budget="fast")
    assert verdict.status == PASS and verdict.method == "central", verdict.reason
    assert "not complex-analytic" in verdict.reason


def test_fast_zero_gradient_uses_a_random_direction() -> None:
    def f(x):
        return 1.0 + np.sum((x - 1.0) ** 2)

    assert check_gradient(f, np.zeros(5), np.ones(5), budget="fast").status == PASS
    assert check_gradient(f, np.full(5, 1e-3), np.ones(5), budget="fast").status == FAIL


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_steep_direction_is_not_a_kink(seed: int) -> None:
    # MAML 1-256-256-1 (66,561 parameters, one task): along g/||g|| the meta-loss is steep (|g| up
    # to 1e5) and its t^3 term left the kink probe's jump estimate above the noise at t_b; the
    # confirmation one scale up (8 t_b, 64 t_b), where that term grows 512x and a jump would not,
    # rules the kink out (these seeds were "inconclusive" without it).
    f, g, x, _ = _maml_problem(seed, (1, 256, 256, 1), n_tasks=1)
    verdict = check_gradient(f, g, x, seed=seed, budget="fast")
    assert verdict.status == PASS, verdict.reason
    assert not verdict.details[0]["kink"]


@pytest.mark.parametrize("budget", ["thorough", "fast"])
@pytest.mark.parametrize("c", [1e155, 1e250, 1e307])
def test_values_near_overflow_are_scaled_before_norms(c, budget):
    # ||g|| of 1e155 * cos(x) overflows when squared: the check scales by a power of two first
    # and never passes on a non-finite tolerance.
    x = np.linspace(0.0, 1.0, 5)
    right = check_gradient(lambda y: c * np.sum(np.sin(y)), c * np.cos(x), x, budget=budget)
    assert right.status == "pass" and math.isfinite(right.tolerance) and right.tolerance < 1e-9, right
    assert "divided by 2^" in right.reason
    wrong = check_gradient(lambda y: c * np.sum(np.sin(y)), -c * np.cos(x), x, budget=budget)
    assert wrong.status == "fail" and math.isfinite(wrong.tolerance), wrong


def test_verdict_passed_and_json_of_infinities():
    # Killed survivors of the mutation run on verify/_verdict.py (reports/mutation/): ``passed`` must be
    # the status, and +inf / -inf must serialise to distinct strings (a tolerance or error can be infinite).
    from verify._verdict import FAIL, PASS, Verdict, jsonable

    ok = Verdict(PASS, "gradient", 0.0, 1e-10, "matches")
    bad = Verdict(FAIL, "gradient", 1.0, 1e-10, "differs")
    assert ok.passed is True and bad.passed is False
    assert jsonable(float("inf")) == "inf" and jsonable(-float("inf")) == "-inf"
    assert jsonable(np.float64(-np.inf)) == "-inf" and jsonable(float("nan")) == "nan"
    assert bad.to_dict()["error"] == 1.0


# ---------------------------------------------------------------------------------------------
# verify/_check.py mutation survivors (issue 19): argument checks, the kink probe's slopes and jump,
# overflow scaling, the wording of the reason


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rtol": 0.0}, r"rtol=0\.0 must be a float in \(0, 1\)"),
        ({"rtol": 1.0}, r"rtol=1\.0 must be a float in \(0, 1\)"),
        ({"rtol": "1e-3"}, r"rtol='1e-3' must be a float"),
        ({"scale_floor": "1.0"}, r"scale_floor='1\.0' must be a finite float"),
    ],
)
def test_rtol_and_scale_floor_bounds(kwargs, match) -> None:
    # rtol is a relative tolerance strictly between 0 (nothing passes) and 1 (everything does); numbers
    # given as strings are not numbers.
    with pytest.raises(InvalidInputError, match=match):
        check_gradient(lambda x: float(np.sum(x**2)), np.array([2.0, 4.0]), np.array([1.0, 2.0]), **kwargs)


@pytest.mark.parametrize("grad", [np.array([1 + 0j, 2 + 0j]), np.array(["1", "2"])])
def test_complex_or_text_gradient_is_rejected(grad) -> None:
    with pytest.raises(InvalidInputError, match=r"grad must be a real numeric array"):
        check_gradient(lambda x: float(np.sum(x**2)), grad, np.array([0.5, 1.0]))


def _abs_plus_smooth(z):
    # |z_0| (a kink at z_0 = 0) plus a smooth part with curvature; complex input gives a real |.|, so the
    # engine uses Richardson; one-sided slopes along v at x = (0, 0.3): +-|v_0| + cos(0.3) v_1 (+ O(t)).
    return np.abs(z[0]) + np.sin(z[1]) + 0.5 * z[1] ** 2


def test_kink_probe_reports_the_one_sided_slopes_and_the_jump() -> None:
    # At a kink the probe reports the forward and backward slopes and their jump 2 |v_0| (closed form:
    # d/dt |t v_0| = +-|v_0|); the smooth part's O(t_b) curvature is removed from the jump.
    x = np.array([0.0, 0.3])
    g = np.array([0.0, math.cos(0.3) + 0.3])
    verdict = check_gradient(_abs_plus_smooth, g, x, directions=1, seed=3)
    d = verdict.details[0]
    assert verdict.status == INCONCLUSIVE and d["kink"], verdict.reason
    v = np.random.default_rng(3).standard_normal(2)
    v /= np.linalg.norm(v)
    smooth = float((math.cos(0.3) + 0.3) * v[1])
    assert d["forward"] == pytest.approx(smooth + abs(v[0]), abs=1e-4)
    assert d["backward"] == pytest.approx(smooth - abs(v[0]), abs=1e-4)
    jump = float(re.search(r"jump (\S+?)\)", verdict.reason).group(1))
    assert jump == pytest.approx(2 * abs(v[0]), rel=1e-5), verdict.reason  # printed to 6 digits


def test_gradient_outside_the_one_sided_slopes_at_a_kink_fails() -> None:
    # <g,v> one |v_0| beyond the forward slope: no subgradient explains it -- a fail, not "inconclusive".
    x = np.array([0.0, 0.3])
    v = np.random.default_rng(3).standard_normal(2)
    v /= np.linalg.norm(v)
    g = np.array([0.0, math.cos(0.3) + 0.3]) + 2.0 * abs(v[0]) * v  # <g,v> = smooth + 2 |v_0|
    verdict = check_gradient(_abs_plus_smooth, g, x, directions=1, seed=3)
    assert verdict.details[0]["kink"]
    assert verdict.status == FAIL and "no choice of (sub)gradient" in verdict.reason, verdict.reason


def test_no_kink_probe_when_asked_and_none_invented_near_a_domain_boundary() -> None:
    # probe_kinks=False (the audit's economy, verify._check._check_gradient): a kink goes unreported
    # (documented), a smooth f passes; and with the probe on, f = log z at x = 4 t_b (f is NaN beyond
    # x - 4 t_b, where the probe's larger steps land) has no kink.
    from verify._check import _check_gradient

    x = np.array([0.0, 0.3])
    off = _check_gradient(_abs_plus_smooth, np.array([0.0, math.cos(0.3) + 0.3]), x, probe_kinks=False)
    assert not any(d["kink"] for d in off.details), off.reason
    smooth = _check_gradient(lambda z: np.sum(np.sin(z)), np.cos(x), x, probe_kinks=False)
    assert smooth.status == PASS, smooth.reason
    tb = 2.0 ** round(math.log2(float(np.finfo(np.float64).eps) ** 0.4))  # t_b = eps^(1/2.5) s, s = 1 here

    def f(z):
        return np.log(z[0]) if np.real(z[0]) > 0 else math.nan

    verdict = check_gradient(f, np.array([1 / (4 * tb)]), np.array([4 * tb]), directions=1)
    assert not verdict.details[0]["kink"], verdict.reason
    assert verdict.status == PASS, verdict.reason


def test_missing_estimate_is_no_kink() -> None:
    # f is NaN away from x: no estimate, no probe -- and no kink claimed.
    x0 = np.array([0.5, -0.25])

    def f(z):
        return float(np.sum(np.sin(np.real(z)))) * (1.0 if np.array_equal(z, x0) else math.nan)

    verdict = check_gradient(f, np.cos(x0), x0, directions=2, method="central")
    assert verdict.status == INCONCLUSIVE and not any(d["kink"] for d in verdict.details), verdict.reason
    # the reason is the direction's own (the "no finite error" rewording is for a would-be pass only)
    assert verdict.reason.startswith("the central estimate could not be formed"), verdict.reason


@pytest.mark.parametrize(("fscale", "gscale"), [(1e200, 1.0), (1.0, 1e308)])
def test_huge_values_are_scaled_by_the_power_of_two_the_reason_names(fscale: float, gscale: float) -> None:
    # |f(x)| or |g| above 2^64: f and g are divided by 2^k (exact) so that norms and differences stay
    # finite; the reason names 2^k, and max(|f(x)|, |g|) / 2^k lies in [2^63, 2^64). With |g_i| ~ 1e308,
    # ||g|| of four entries overflows unscaled; with |f| ~ 1e200 only the note tells.
    x = np.full(4, 1e-310 if gscale > 1 else 0.3)

    def f(z):
        return fscale + gscale * np.sum(np.sin(z))

    g = gscale * np.cos(x)
    verdict = check_gradient(f, g, x)
    assert verdict.status == PASS, verdict.reason
    k = int(re.search(r"divided by 2\^(-?\d+) \(exact\)", verdict.reason).group(1))
    big = max(abs(f(x)), float(np.max(np.abs(g))))
    assert 2.0**63 <= big / 2.0**k < 2.0**64, (k, verdict.reason)


def test_reason_wording_for_one_direction_and_a_floor_equal_to_the_gradient_norm() -> None:
    # "1 random direction" (singular); scale_floor equal to ||g|| = 5 (exact) is not "> ||g||".
    x = np.array([1.5, 2.0])

    def f(z):
        return 0.5 * (z @ z)

    g = x.copy()  # ||(1.5, 2.0)|| = 2.5 exactly
    verdict = check_gradient(f, g, x, directions=1, scale_floor=2.5)
    assert verdict.status == PASS, verdict.reason
    assert re.search(r"\b1 random direction\b", verdict.reason), verdict.reason
    assert "rounding floor" not in verdict.reason, verdict.reason
    fast = check_gradient(f, g, x, budget="fast", directions=1)
    assert re.search(r"\b1 direction\b", fast.reason), fast.reason


@pytest.mark.parametrize("offset", [1e3, 2.0**64])
def test_values_up_to_2_to_the_64_are_not_scaled(offset: float) -> None:
    # Documented: values *above* 2^64 are divided by a power of two; |f(x)| = 1e3 or exactly 2^64 is not.
    x = np.array([0.3, -0.2])
    verdict = check_gradient(lambda z: offset + np.sum(np.sin(z)), np.cos(x), x)
    assert "divided by" not in verdict.reason, verdict.reason


@pytest.mark.parametrize("n", [5, 1 << 16])
def test_claimed_directional_derivative_is_the_exact_sum(n: int) -> None:
    # <g, v> is summed exactly (correctly rounded: math.fsum) up to 2^16 entries, so the claim is not
    # blurred by the summation order. g is built on the seeded direction v so that the products g_i v_i
    # are ~(1e16, 1, -1e16, 0.5, 0, ...): a running or pairwise sum loses the 1; the reference is the
    # rational sum of the same float products, rounded once.
    from fractions import Fraction

    v = np.random.default_rng(4).standard_normal((1, n))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    g = np.zeros(n)
    g[:4] = np.array([1e16, 1.0, -1e16, 0.5]) / v[0, :4]
    verdict = check_gradient(lambda z: z @ g, g, np.zeros(n), directions=1, seed=4)
    exact = float(sum(Fraction(float(p)) for p in g * v[0]))
    assert abs(exact - 1.5) < 0.1  # the 1 survives in the exact sum
    assert verdict.details[0]["claimed"] == exact


def test_verdict_reports_the_worst_direction() -> None:
    # "worst |<g,v> - D_v f| / (||g|| ||v||)": the verdict's error and tolerance are those of the
    # direction with the largest error relative to its own tolerance.
    case = make_case("expsin", 6, 1)
    verdict = check_gradient(case.f, case.grad(case.x), case.x, method="richardson")
    assert verdict.status == PASS, verdict.reason
    ratios = [d["error"] / d["tolerance"] for d in verdict.details]
    assert len(set(ratios)) > 1
    assert verdict.error / verdict.tolerance == max(ratios)


def test_zero_gradient_at_a_stationary_point_passes_with_error_zero() -> None:
    # f = |z|^2 at 0: g = 0 and D_v f = 0 exactly, so S = max(||g||, |D|) = 0; the relative error is 0
    # (no difference at all), within any tolerance.
    verdict = check_gradient(lambda z: z @ z, np.zeros(3), np.zeros(3))
    assert verdict.status == PASS and verdict.error == 0.0 <= verdict.tolerance, verdict
    assert all(d["error"] == 0.0 for d in verdict.details)


# ---------------------------------------------------------------------------------------------
# verify/_check.py survivors (issue 19, session 3, k19a)


def test_kink_probe_step_is_the_smallest_richardson_step() -> None:
    # _kink_probe's t_b is "the smallest Richardson step". For f = x^2 / 2 (1-D, v = +-1) the one-sided
    # slopes are f'(x) +- t_b / 2 exactly, so forward - backward = t_b; Richardson's smallest step comes
    # from directional_derivative, an independent call. |x| = 100 makes the nominal step
    # log(e + |x|) ~ 4.6, far from 1.
    from verify import directional_derivative

    for x0 in (100.0, -3.0):
        v = check_gradient(lambda z: 0.5 * np.sum(z**2), np.array([x0]), np.array([x0]), method="richardson")
        rec = v.details[0]
        t0 = directional_derivative(lambda z: 0.5 * np.sum(z**2), np.array([x0]), np.array([1.0]),
                                    method="richardson").steps[0]
        assert rec["forward"] - rec["backward"] == pytest.approx(t0, rel=1e-6, abs=0.0), (rec, t0)


@pytest.mark.parametrize("n", [2, 3])
def test_fast_complex_floor_uses_the_claimed_gradient_times_the_direction(n: int) -> None:
    # budget="fast": err = 10 |D' - D| + 8 eps (|D| + ||g * v||) with g the claimed gradient. For
    # f = sum(x) (g = ones) the shifted-point sample equals D (Im f does not depend on x) and
    # ||g * v|| = ||v|| = 1 for the unit direction v, whatever v is: err = 8 eps (|D| + 1) exactly.
    eps = np.finfo(np.float64).eps
    v = check_gradient(lambda z: np.sum(z), np.ones(n), np.linspace(0.3, 0.9, n), budget="fast",
                       method="complex")
    rec = v.details[0]
    assert v.status == "pass" and rec["method"] == "complex"
    assert rec["estimate_error"] == pytest.approx(8 * eps * (abs(rec["estimate"]) + 1.0), rel=1e-9, abs=0.0), rec


@pytest.mark.parametrize("gscale", [1.0, 0.5, 1e-200])
def test_fast_first_direction_follows_the_claimed_gradient(gscale: float) -> None:
    # budget="fast": v_0 = (g/||g|| + r) / ||g/||g|| + r|| with <r, g> >= 0, so <g, v_0> / ||g|| =
    # sqrt((1 + <r, g/||g||>) / 2) >= 1/sqrt(2), for any seed, any number of directions and any size of
    # g (1e-200: its squares underflow, its norm must not). f is linear, so <g, v> is read off as the
    # claimed directional derivative of each direction record.
    rng = np.random.default_rng(31)
    g = gscale * rng.standard_normal(20) / np.sqrt(20)
    gnorm = math.fsum(np.abs(g / gscale) ** 2) ** 0.5 * gscale
    for seed in range(6):
        v = check_gradient(lambda z: np.sum(g * z), g, np.zeros(20), budget="fast", directions=3, seed=seed)
        assert v.details[0]["claimed"] / gnorm >= 1 / math.sqrt(2) - 1e-12, (seed, v.details[0])


def test_rtol_must_be_a_number_and_outputs_must_be_scalars() -> None:
    f = lambda z: float(np.sum(z**2))  # noqa: E731
    with pytest.raises(InvalidInputError, match="rtol="):
        check_gradient(f, np.ones(2), np.ones(2), rtol="0.1")
    for out in ([1.0, 2.0], "1.0"):
        with pytest.raises(InvalidInputError, match="f must return a real scalar"):
            check_gradient(lambda z, out=out: out, np.ones(2), np.ones(2))


def test_values_just_above_2_to_the_64_are_scaled() -> None:
    # |f| above 2^64 is divided by a power of two (exact) before any difference is formed; the
    # verdict is that of the unscaled problem and the reason says so.
    c = 1.5 * 2.0**64
    x = np.array([0.3, -0.7])
    v = check_gradient(lambda z: c + np.sum(np.sin(z)), np.cos(x), x)
    assert v.status == "pass" and "were divided by 2^" in v.reason, v.reason


@pytest.mark.parametrize("xmax", [1.0, 4.0])
def test_too_uncertain_rule_at_a_stationary_claim(xmax: float) -> None:
    # "inconclusive when err(D) > sqrt(rtol) max(S, fscale)" with S = max(||g||, |D|) and the derivative
    # scale fscale = |f(x)| / max(1, ||x||_inf) used at a stationary point (claimed g = 0). f = 1 plus a
    # sinusoid of amplitude A and period 6e-12, invisible to the central differences' steps except as
    # noise of size A / t: sweeping A puts err(D) on both sides of the threshold; each direction's
    # verdict (kink probe off, so only this rule can make it inconclusive) must follow the rule,
    # evaluated here from its own recorded estimate and error.
    from verify._check import _check_gradient

    rtol = tolerance(np.float64, "gradient")
    w = np.random.default_rng(5).standard_normal(3)
    x = np.array([xmax, -0.5, 0.25])
    ratios = []
    for A in np.logspace(-14, -9, 30):
        def f(z, A=A):
            return 1.0 + A * np.sin(1e12 * np.sum(z * w))

        v = _check_gradient(f, np.zeros(3), x, method="central", probe_kinks=False)
        for r in v.details:
            if r["status"] == FAIL:
                continue
            ratio = r["estimate_error"] / (math.sqrt(rtol) * max(abs(r["estimate"]), abs(f(x)) / max(1.0, xmax)))
            assert (r["status"] == INCONCLUSIVE) == (ratio > 1.0), (A, ratio, r)
            ratios.append(ratio)
    # the sweep probes the threshold closely on both sides (within 2x; 16x = xmax^2 at xmax = 4)
    ratios = np.array(ratios)
    band = 2.0 if xmax == 1.0 else xmax**2
    assert np.any((ratios > 1 / band) & (ratios < 1)) and np.any((ratios > 1) & (ratios < band))


def test_verdict_error_and_tolerance_are_those_of_the_worst_ratio() -> None:
    # "error and tolerance are those of the deciding direction (worst ratio)": the record with the
    # largest error / tolerance among those with the verdict's status. The per-direction tolerances
    # differ (rtol + err(D)/S), so the largest error, or error x tolerance, can be another direction.
    # (cases where the worst ratio is neither the first direction nor the largest product: measured)
    for family, seed, method, scale in (("quad", 0, "complex", 1.0), ("expsin", 3, "richardson", 1 + 1e-6)):
        case = make_case(family, 6, seed)
        v = check_gradient(case.f, case.grad(case.x) * scale, case.x, method=method)
        assert v.status == (PASS if scale == 1.0 else FAIL), v.reason
        deciding = [r for r in v.details if r["status"] == v.status]
        worst = max(deciding, key=lambda r: r["error"] / r["tolerance"])
        assert (v.error, v.tolerance) == (worst["error"], worst["tolerance"]), (family, v.details)
        by_product = max(deciding, key=lambda r: r["error"] * r["tolerance"])
        assert worst["direction"] not in (deciding[0]["direction"], by_product["direction"])


def test_private_check_has_the_public_defaults() -> None:
    # _check_gradient is check_gradient plus two economies; called without seed / scale_floor (as the
    # audit does for scale_floor) it must be check_gradient. A small gradient (||g|| ~ 1e-3) with a 1e-8
    # relative error fails against ||g||; a floor of 1 would hide it.
    from verify._check import _check_gradient

    rng = np.random.default_rng(41)
    a = 1e-3 * rng.standard_normal(5)
    x = rng.standard_normal(5)
    wrong = a * (1 + 1e-8)
    for budget in ("thorough", "fast"):
        public = check_gradient(lambda z: np.sum(a * z), wrong, x, budget=budget)
        private = _check_gradient(lambda z: np.sum(a * z), wrong, x, budget=budget)
        assert public.status == FAIL, public.reason
        assert private.to_dict() == public.to_dict()


def test_a_passing_direction_has_its_error_within_its_tolerance() -> None:
    # A record's tolerance is the relative one, rtol + err(D) / S: a direction that passes because the
    # estimate's own error covers the difference must report error <= tolerance, also when S < 1.
    # f has a large offset (round-off noise 1e4 eps in every Richardson quotient) and a small gradient
    # (||g|| ~ 0.03), and the claim is off by 1e-7 relative: far above rtol, inside err(D).
    case = make_case("expsin", 4, 1, scale=0.3)
    g = 0.01 * case.grad(case.x)
    v = check_gradient(lambda z: 0.01 * case.f(z) + 1e4, g * (1 + 1e-7), case.x, method="richardson")
    assert v.status == PASS, v.reason
    rtol = tolerance(np.float64, "gradient")
    assert max(r["error"] for r in v.details) > 100 * rtol
    for r in v.details:
        assert r["error"] <= r["tolerance"], r
    assert v.error <= v.tolerance


def test_messages_name_why_the_complex_step_is_unavailable_and_the_first_bad_entries() -> None:
    # The fallback note quotes the first clause of the NotAnalyticError (what f did with a complex
    # input), not its advice; a non-finite claimed gradient is reported with its first five bad entries.
    v = check_gradient(lambda x: float(np.sum(x**2)), 2 * np.ones(3), np.ones(3))
    assert "complex step unavailable: f does not accept a complex input (ComplexWarning" in v.reason, v.reason
    g = np.full(8, np.nan)
    v = check_gradient(lambda x: float(np.sum(x**2)), g, np.ones(8))
    assert v.status == FAIL and v.reason.endswith("at [(0,), (1,), (2,), (3,), (4,)]"), v.reason


def test_reason_counts_directions_in_the_plural_from_two_on() -> None:
    f, g, x = (lambda z: float(np.sum(z**2))), 2 * np.ones(3), np.ones(3)
    assert "in 2 directions (budget='fast'" in check_gradient(f, g, x, budget="fast", directions=2).reason
    assert "in 2 random directions" in check_gradient(f, g, x, directions=2).reason
    assert "in 1 random direction:" in check_gradient(f, g, x, directions=1).reason


def _kink_with_quartic(a: float):
    # |z_0| + a z_0^4: at z = 0 the probe's J(t) = (f(t) - 2 f(0) + f(-t)) / t = 2 + 2 a t^3 exactly, so its
    # jump estimates are jump = 2 - 144 a t_b^3 and, one scale up, jump_next = 2 - 73728 a t_b^3.
    return lambda z: np.abs(z[0]) + a * z[0] ** 4


@pytest.mark.parametrize("growth, kink", [(7.5, True), (8.5, False)])
def test_kink_confirmation_growth_edge(growth: float, kink: bool) -> None:
    # The confirmation one scale up calls a suspected kink smooth f's t^3 remainder when the jump estimate
    # grows more than 8x from (t_b, 8 t_b) to (8 t_b, 64 t_b). With a = -s / (72 t_b^3), jump = 2 (1 + s) and
    # jump_next = 2 (1 + 512 s): s is chosen for a growth of 7.5 (a kink, reported) or 8.5 (not reported).
    # t_b is Richardson's smallest step, read from an independent directional_derivative call.
    from verify import directional_derivative

    x = np.array([0.0])
    tb = directional_derivative(lambda z: np.abs(z[0]), x, np.array([1.0]), method="richardson").steps[0]
    s = (growth - 1.0) / (512.0 - growth)
    f = _kink_with_quartic(-s / (72.0 * tb**3))
    verdict = check_gradient(f, np.array([0.0]), x, directions=1, method="richardson")
    rec = verdict.details[0]
    assert rec["kink"] is kink, (growth, rec)
    if kink:
        assert verdict.status == INCONCLUSIVE and "kink" in verdict.reason, verdict.reason
        assert rec["forward"] - rec["backward"] == pytest.approx(2.0 * (1.0 - s / 72.0), rel=1e-9)


def test_a_glitch_at_the_smallest_step_alone_is_no_kink() -> None:
    # f = z^2 / 2 with one value off by 1e-3 at x + t_b only: the probe's J(t_b) stands far above the noise and
    # the gradient threshold, but J(8 t_b) (exact for the quadratic: 8 t_b) is not half of it -- a kink's jump
    # persists at the larger step, a one-point glitch does not.
    from verify import directional_derivative

    x = np.array([0.25])
    tb = directional_derivative(lambda z: 0.5 * z[0] ** 2, x, np.array([1.0]), method="richardson").steps[0]
    spots = {float(x[0] + tb), float(x[0] - tb)}

    def f(z):
        z0 = float(np.real(z[0]))
        return 0.5 * z[0] ** 2 + (1e-3 if z0 in spots else 0.0)

    verdict = check_gradient(f, np.array([0.25]), x, directions=1, method="richardson")
    rec = verdict.details[0]
    assert abs(rec["forward"] - rec["backward"]) > 1.0  # J(t_b) ~ 2e-3 / t_b: the glitch is seen ...
    assert rec["kink"] is False, rec  # ... and not called a kink


@pytest.mark.parametrize("ratio, kink", [(4.5, True), (3.5, False)])
def test_kink_detection_noise_edge(ratio: float, kink: bool) -> None:
    # The probe reports a kink only when |J(t_b)| and the jump stand above 4 NOISE_FACTOR nu / t_b (nu: the
    # measured noise of f, here 2 eps |f(x)| = 2 eps at x = 0, where one-ulp moves of x are 0). f = 1 + c |z_0|
    # has J(t) = 2c exactly up to f's rounding (<= eps / t_b, an eighth of NOISE_FACTOR nu / t_b), so a jump of
    # 4.5 units is reported and 3.5 units is not.
    from verify import directional_derivative
    from verify._numdiff import NOISE_FACTOR, Problem

    x = np.array([0.0])
    tb = directional_derivative(lambda z: np.abs(z[0]), x, np.array([1.0]), method="richardson").steps[0]
    nu = Problem(lambda z: 1.0 + np.abs(z[0]), x).noise
    assert nu == 2 * np.finfo(float).eps
    unit = NOISE_FACTOR * nu / tb
    c = ratio * unit / 2.0
    verdict = check_gradient(lambda z: 1.0 + c * np.abs(z[0]), np.array([0.0]), x, directions=1, method="richardson")
    rec = verdict.details[0]
    assert rec["forward"] - rec["backward"] == pytest.approx(2 * c, rel=0.2 / ratio)
    assert rec["kink"] is kink, (ratio, rec)
