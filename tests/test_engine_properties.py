"""Properties of the engine that a wrong formula or a wrong constant breaks (issue 19).

These tests measure what the engine *does* (a convergence order, where a
verdict flips, how close an estimate lands), not how it is written, so a
mutated formula or tolerance is caught even where the formula-level tests
restate the code:

* Richardson extrapolation removes the ``t^2`` and ``t^4`` terms of the
  central difference, so at fixed steps its error is ``O(t^6)``: halving the
  step divides the error by ``2^6 = 64`` (Richardson 1911; Romberg tables,
  e.g. Press et al., Numerical Recipes, 3rd ed., section 5.7). A second level
  written for ``t^2`` (``(8 r1_k - r1_{k+1}) / 7``; ``(4 r1_k - r1_{k+1}) / 3``
  removes ``t^2`` twice) leaves ``O(t^4)``: ratio 16.
* Each tolerance of :mod:`verify.tolerance` is observed through the verdict of
  the check that reads it: a claim wrong by half the tolerance passes, one
  wrong by twice the tolerance fails, with the estimator's own error far
  below both. A uniform change of a tolerance by any factor outside ``[1/2,
  2]`` (1000x looser or tighter, or a different eps power) flips one of them.
* The fast budget's estimate (its value, not the method that produced it)
  against the closed-form directional derivative.

Exact values: closed-form derivatives of elementary functions, evaluated in
float64 (their rounding, ~1e-16 relative, is far below every bound here).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from verify import check_gradient, directional_derivative, dot_product_test, taylor_test
from verify._verdict import FAIL, PASS
from verify.hessian_inverse import check_solve, check_spd
from verify.tolerance import KINDS, tolerance

EPS64 = float(np.finfo(np.float64).eps)


def spec(dtype, kind: str) -> float:
    """The documented tolerance (``verify.tolerance``'s docstring and comments), from eps alone.

    Deliberately not read from :func:`verify.tolerance.tolerance`: the tests below check that the
    verdicts flip where the *documented* tolerance says, so a changed table entry (1000x looser,
    another eps power) is caught instead of moving the test's claims along with it.
    """
    eps = float(np.finfo(dtype).eps)
    return {"gradient": eps ** (2 / 3), "dot_product": eps ** (2 / 3), "reference_match": eps ** 0.75,
            "solve_backward_error": 1024 * eps, "roundoff": 64 * eps}[kind]


# ---------------------------------------------------------------------------------------------
# Richardson: convergence order 6 at fixed steps, and a tight accuracy bound


X0 = 0.3


def _f(x):
    """``exp(sin x)``: analytic, every Taylor coefficient nonzero at ``X0`` (no accidental cancellation)."""
    return np.exp(np.sin(x[0]))


def _df(x0: float) -> float:
    return math.cos(x0) * math.exp(math.sin(x0))


def _richardson_at(t0: float):
    """The Richardson estimate with smallest step ``t0`` (14 steps ``t0 2^k``) along ``v = 1``."""
    return directional_derivative(_f, np.array([X0]), np.array([1.0]), method="richardson", step=t0)


def test_richardson_error_is_sixth_order_at_fixed_steps() -> None:
    # Steps 2^-3 .. 2^-6: the t^6 error (1e-6 .. 4e-10) stands far above round-off (~eps/t ~ 1e-14),
    # and the t^8 term shifts each ratio from 64 by < 10 % here.
    exact = _df(X0)
    steps = [2.0**-3, 2.0**-4, 2.0**-5, 2.0**-6]
    errors = []
    for t0 in steps:
        est = _richardson_at(t0)
        # the estimate is the Romberg value of the smallest window (t0, 2 t0, 4 t0): truncation
        # dominates, so the neighbouring-extrapolant difference is smallest there
        assert est.step == t0, (t0, est)
        errors.append(abs(est.value - exact))
    ratios = [errors[i] / errors[i + 1] for i in range(len(errors) - 1)]
    assert all(48.0 <= r <= 80.0 for r in ratios), (errors, ratios)  # 64 = 2^6 (a t^4 leftover gives 16)
    # the observed order by least squares over the four steps
    order = np.polyfit(np.log2(steps), np.log2(errors), 1)[0]
    assert 5.7 <= order <= 6.3, (order, errors)


def test_richardson_accuracy_at_step_1e_2() -> None:
    # At t0 = 2^-7 (~7.8e-3) the O(t^6) error is ~1e-11 times |D|; a second Romberg level that does
    # not cancel t^4 leaves ~3e-9 (measured: 2.6e-9 at step 1e-2 on the example).
    exact = _df(X0)
    est = _richardson_at(2.0**-7)
    assert abs(est.value - exact) <= 5e-11 * abs(exact), (est.value, exact)


def test_richardson_automatic_step_accuracy_and_error_estimate() -> None:
    # Automatic steps: the true error is within the reported error, and both are tiny. A Romberg
    # level that leaves a t^2 or t^4 term makes the true error ~1e-7 .. 1e-9 at these steps.
    for x0 in (X0, -1.1, 2.5):
        exact = _df(x0)
        est = directional_derivative(_f, np.array([x0]), np.array([1.0]), method="richardson")
        assert abs(est.value - exact) <= est.error, (x0, est, exact)
        assert abs(est.value - exact) <= 1e-12 * abs(exact), (x0, est.value, exact)
        assert est.error <= 1e-10 * abs(exact), (x0, est)


def test_error_estimates_are_the_safety_factor_times_the_truncation_error() -> None:
    # In the truncation-dominated range the error model is asymptotically exact, times numdifftools'
    # safety factor 12.706 (t_0.975 with 1 dof): central, |D(2t) - D(t)| / 3 = c t^2 = the true error;
    # Richardson, |R_0 - R_1| = (2^6 - 1) e_0 = 63 x the true error. So error / true error tends to
    # 12.706 and 12.706 x 63 = 800. (Measured: 12.71-12.75 and 768-798 at these steps.)
    exact = _df(X0)
    for t in (2.0**-5, 2.0**-6, 2.0**-7):
        central = directional_derivative(_f, np.array([X0]), np.array([1.0]), method="central", step=t)
        ratio = central.error / abs(central.value - exact)
        assert 12.0 <= ratio <= 13.4, (t, ratio)
        rich = _richardson_at(t)
        ratio = rich.error / abs(rich.value - exact)
        assert 740.0 <= ratio <= 840.0, (t, ratio)


def test_richardson_prefers_the_larger_steps_when_the_spreads_tie() -> None:
    # f is finite only within 8 t0 of x: the Romberg values R_0 (t0, 2t0, 4t0) and R_1 (2t0, 4t0, 8t0)
    # exist, each with the other as its only neighbour, so their spreads are equal; the round-off
    # term ~ nu / t is smaller for R_1, which must be chosen (step 2 t0).
    t0 = 2.0**-6

    def f(x):
        return np.exp(np.sin(x[0])) if abs(x[0] - X0) <= 8.5 * t0 else np.nan

    est = directional_derivative(f, np.array([X0]), np.array([1.0]), method="richardson", step=t0)
    assert est.step == 2 * t0, est
    assert abs(est.value - _df(X0)) <= est.error <= 1e-7


@pytest.mark.parametrize(("method", "order"), [("central", 2)])
def test_central_difference_is_second_order(method: str, order: int) -> None:
    # D(t) = D + c t^2 + O(t^4): halving t divides the error by 4.
    exact = _df(X0)
    errs = []
    for t in (2.0**-6, 2.0**-7, 2.0**-8):
        est = directional_derivative(_f, np.array([X0]), np.array([1.0]), method=method, step=t)
        assert est.step == t
        errs.append(abs(est.value - exact))
    for a, b in zip(errs, errs[1:]):
        assert 3.8 <= a / b <= 4.2, errs


def test_complex_step_is_exact_to_rounding() -> None:
    # Im f(x + i h v) / h = D + O(h^2) with h ~ 1e-30: a few ulps of |D|.
    for x0 in (X0, -1.1, 2.5):
        est = directional_derivative(_f, np.array([x0]), np.array([1.0]))
        assert abs(est.value - _df(x0)) <= 4 * EPS64 * abs(_df(x0)), (x0, est.value)


@pytest.mark.parametrize("method", ["complex", "central", "richardson"])
def test_error_bound_is_positive_when_every_other_term_vanishes(method: str) -> None:
    # f linear with a power-of-two slope, at x = 0: every difference quotient is exact, the
    # truncation and noise terms are 0 (one-ulp probes of 0 do not move x), so the reported error
    # is the relative floor alone, FLOOR_ULPS eps |D| (and, for the complex step, eps |D_{s v} f|):
    # positive, a few ulps. An error bound that can be 0 or negative is no bound.
    from verify._numdiff import FLOOR_ULPS

    est = directional_derivative(lambda x: 4.0 * x[0], np.array([0.0]), np.array([1.0]), method=method)
    assert est.value == 4.0
    if method != "complex":
        # the documented floor is 8 ulps of |D|
        assert est.error == 8 * EPS64 * 4.0, est
        return
    # complex step: 8 ulps of |D| + T, T = |D_{w v} f| = 4 |w| for the seeded Gaussian weight w of the
    # rounding-scale probe. Read T off that probe (the one call along a direction other than v = 1):
    # the bound is 8 eps (4 + T), positive, and more than the floor of |D| alone.
    seen = []

    def f(x):
        if np.iscomplexobj(x):
            seen.append(float(x.imag[0]))
        return 4.0 * x[0]

    est = directional_derivative(f, np.array([0.0]), np.array([1.0]), method="complex")
    h = est.steps[0]
    probes = [s / h for s in seen if not any(math.isclose(s / h, k) for k in (1.0, 3.0, 5.0))]
    assert len(probes) == 1, seen
    assert est.error == pytest.approx(8 * EPS64 * (4.0 + 4.0 * abs(probes[0])), rel=1e-12, abs=0.0), (est, probes)
    assert est.error > 8 * EPS64 * 4.0


@pytest.mark.parametrize("finite", [True, False])
@pytest.mark.parametrize("method", ["complex", "central", "richardson"])
def test_evaluation_count_is_the_number_of_calls(method: str, finite: bool) -> None:
    # Estimate.evaluations counts the calls of f the estimate made (all but f(x), which the
    # problem makes once up front), also when f is not finite near x and the estimate is missing.
    x0 = np.array([0.5, -0.25])
    calls = []

    def f(z):
        calls.append(1)
        value = np.sum(np.sin(z))
        if finite or np.array_equal(z, x0):
            return value
        return value * np.nan  # NaN (or NaN + NaN i) away from x: no quotient can be formed

    est = directional_derivative(f, x0, np.array([1.0, 2.0]), method=method)
    assert math.isfinite(est.value) == finite
    assert est.evaluations == len(calls) - 1, (est, len(calls))


@pytest.mark.parametrize("method", ["complex", "central", "richardson"])
def test_directional_derivative_is_homogeneous_in_the_direction(method: str) -> None:
    # D_{c v} f = c D_v f. Every step is chosen per unit of displacement (s = log(e + ||x||) /
    # ||v||_inf), so t (c v) does not depend on c, and with c a power of two nothing else rounds:
    # the estimate scales exactly, for c from 2^-600 to 2^600 (a step scaled the wrong way
    # overflows or underflows there).
    x0 = np.array([0.5, -0.25, 1.5])
    v = np.array([1.0, -2.0, 0.5])

    def f(z):
        return np.sum(np.sin(z)) + z[0] * z[1]

    base = directional_derivative(f, x0, v, method=method).value
    for k in (-600, -30, 30, 600):
        c = 2.0**k
        est = directional_derivative(f, x0, c * v, method=method)
        assert est.value == pytest.approx(c * base, rel=1e-13), (k, est)


def test_fast_complex_step_is_homogeneous_in_the_direction() -> None:
    from verify._numdiff import Problem, estimate

    x0 = np.array([0.5, -0.25, 1.5])
    v = np.array([1.0, -2.0, 0.5])

    def f(z):
        return np.sum(np.sin(z)) + z[0] * z[1]

    base = estimate(Problem(f, x0), v, "complex", None, fast=True, terms=1.0).value
    for k in (-600, 600):
        c = 2.0**k
        est = estimate(Problem(f, x0), c * v, "complex", None, fast=True, terms=c)
        assert est.value == pytest.approx(c * base, rel=1e-13), (k, est)


@pytest.mark.parametrize("finite", [True, False])
def test_fast_complex_step_counts_its_calls(finite: bool) -> None:
    # Two calls, counted from the problem's own counter (f(x) made up front, and any earlier estimate
    # on the same problem, are not this estimate's).
    from verify._numdiff import Problem, estimate

    calls = []
    x0 = np.array([0.5, -0.25])

    def f(z):
        calls.append(1)
        return np.sum(np.sin(z)) * (1.0 if finite or np.array_equal(z, x0) else np.nan)

    p = Problem(f, x0)
    est = estimate(p, np.array([1.0, 2.0]), "complex", None, fast=True, terms=1.0)
    assert math.isfinite(est.value) == finite and (est.error == math.inf) != finite
    assert est.evaluations == len(calls) - 1 == 2
    again = estimate(p, np.array([2.0, 1.0]), "complex", None, fast=True, terms=1.0)
    assert again.evaluations == 2 and len(calls) == 5


@pytest.mark.parametrize("finite", [True, False])
@pytest.mark.parametrize("method", ["complex", "central", "richardson"])
def test_reported_steps_are_the_steps_evaluated(method: str, finite: bool) -> None:
    # Estimate.steps: "every step evaluated, in increasing order". Read the steps off the points
    # f was called at (real methods: |z - x| / |v| above the one-ulp noise probes; complex step:
    # Im z / v along v) and compare; also when f is not finite there and the estimate is missing.
    x0 = np.array([0.5, -0.25])
    v = np.array([1.0, 2.0])
    seen = set()

    def f(z):
        if np.iscomplexobj(z):
            ratio = z.imag / v
            if np.allclose(ratio, ratio[0], rtol=1e-12, atol=0.0):  # along v (not the rounding-scale probe along w * v)
                seen.add(float(ratio[0]))
        else:
            t = float(np.max(np.abs(z - x0)) / np.max(np.abs(v)))
            if t > 1e-12:  # not f(x) itself, not a one-ulp noise probe
                seen.add(t)
        value = np.sum(np.sin(z)) + z[0] * z[1]
        return value if finite or np.array_equal(z, x0) else value * np.nan

    est = directional_derivative(f, x0, v, method=method)
    assert list(est.steps) == sorted(est.steps)
    assert {float(t) for t in est.steps} == seen, (est.steps, sorted(seen))


def test_noise_is_probed_at_distinct_points() -> None:
    # nu is "the largest change of f under a few random perturbations of x by one ulp per
    # component": the probes must be different points (a sign pattern that never varies probes
    # one point 8 times).
    x0 = np.array([0.5, -0.25, 1.5, 2.0, -3.0, 0.75])
    probes = set()

    def f(z):
        dz = z - x0
        if np.any(dz) and np.max(np.abs(dz)) < 1e-12:
            probes.add(tuple(np.sign(dz)))
        return float(np.sum(np.sin(z)))

    directional_derivative(f, x0, np.ones(6), method="central")
    assert len(probes) >= 4, probes


def test_evaluation_budget_of_the_thorough_estimators() -> None:
    # The documented costs: central 2 steps x 2 points + 8 noise probes; Richardson 14 steps x 2
    # points + 8 probes; the complex step 6 complex evaluations (h, 3h, 5h, two shifted points, one
    # random-sign direction) and no probes.
    x0 = np.array([0.3, 0.1])
    v = np.array([1.0, 0.5])

    def f(x):
        return np.sum(np.sin(x))

    assert directional_derivative(f, x0, v, method="central").evaluations == 4 + 8
    assert directional_derivative(f, x0, v, method="richardson", step=1e-3).evaluations == 28 + 8
    assert directional_derivative(f, x0, v, method="complex").evaluations == 6


def _romberg(values: dict[float, float], t: float) -> float:
    """Two Richardson levels on central differences at t, 2t, 4t (Press et al., sec. 5.7), written out."""
    d = [(values[(k * t)] - values[-(k * t)]) / (2 * k * t) for k in (1, 2, 4)]
    r1 = [(4 * d[0] - d[1]) / 3, (4 * d[1] - d[2]) / 3]
    return (16 * r1[0] - r1[1]) / 15


@pytest.mark.parametrize("method", ["central", "richardson"])
def test_round_off_part_of_the_bound_is_noise_factor_times_the_worst_case(method: str) -> None:
    # f = 2 x exactly at every difference point (no truncation, no rounding: x = 0.5, t powers of 2),
    # but the one-ulp noise probes see f move by eta. The bound is then its round-off part alone
    # (plus 8 eps |D|): NOISE_FACTOR = 4 times the worst case of a noise of size nu (the measured
    # noise, Estimate.noise) at each evaluation point, amplified by the difference quotient (central)
    # or the Romberg combination (Richardson). The worst case is computed here by trying every sign
    # pattern of +-nu at the points the estimate used.
    import itertools

    x0, eta = 0.5, 1e-10

    def f(z):
        dz = float(z[0]) - x0
        return 2.0 * float(z[0]) + (eta if 0 < abs(dz) < 1e-12 else 0.0)

    est = directional_derivative(f, np.array([x0]), np.array([1.0]), method=method, step=2.0**-6)
    assert est.value == 2.0
    nu, t = est.noise, est.step
    assert eta <= nu <= eta + 4 * EPS64
    if method == "central":
        worst = 2 * nu / (2 * t)
    else:
        points = [s * k * t for k in (1, 2, 4) for s in (1, -1)]
        worst = max(abs(_romberg(dict(zip(points, signs)), t)) * nu
                    for signs in itertools.product((1.0, -1.0), repeat=6))
    ratio = (est.error - 8 * EPS64 * 2.0) / worst
    assert 3.999 <= ratio <= 4.001, (ratio, est)  # exact up to rounding (a weight off by 1 in 45 moves it 0.1 %)


@pytest.mark.parametrize("fast", [False, True])
def test_complex_step_bound_is_its_factor_times_the_spread_of_its_noise_samples(fast: bool) -> None:
    # The complex-step bound is "3 times the largest deviation of the noise samples from D(h)"
    # (thorough: steps 3h, 5h and two shifted points) or "10 |D' - D|" (fast: one shifted point),
    # plus a floor of a few ulps. Plant a deviation c at the shifted points only (f = 2 x exactly
    # elsewhere): the bound must be 3 c (10 c).
    from verify._numdiff import Problem, estimate

    x0, c = np.array([0.5]), 1e-6

    def f(z):
        out = 2.0 * np.sum(z)
        if np.iscomplexobj(z) and np.any(z.real != x0):  # a shifted point: Im f / h moves by c
            out = out + 1j * c * float(np.max(np.abs(z.imag)))
        return out

    est = estimate(Problem(f, x0), np.array([1.0]), "complex", None, fast=fast, terms=2.0)
    assert est.value == 2.0
    factor = 10.0 if fast else 3.0
    assert factor * c * 0.999 <= est.error <= factor * c * 1.001, est


def test_richardson_step_count_and_cap() -> None:
    # 14 steps t0 2^k when t0 is given; automatic: at most 14 and the largest <= 2^-4 s, which binds
    # in float32 (t0 = eps32^(1/2.5) s ~ 1.7e-3 s: only 6 steps fit below s / 16).
    x0 = np.array([0.3])
    assert len(directional_derivative(_f, x0, np.array([1.0]), method="richardson", step=1e-3).steps) == 14
    s = math.log(math.e + 0.3)

    def f32(x):
        return np.float32(np.exp(np.sin(np.float32(x[0]))))

    est = directional_derivative(f32, x0.astype(np.float32), np.array([1.0]), method="richardson")
    assert est.steps[-1] <= 2.0**-4 * s < 2 * est.steps[-1], est.steps
    assert len(est.steps) == 6, est.steps


def test_complex_step_size_policy() -> None:
    # h = 2^-100 s rounded to a power of two (the module docstring's policy).
    x0 = np.array([3.0, -1.0])
    v = np.array([0.5, 0.25])
    s = math.log(math.e + 3.0) / 0.5
    est = directional_derivative(lambda x: np.sum(np.sin(x)), x0, v)
    assert abs(math.log2(est.step) - math.log2(2.0**-100 * s)) <= 0.5, est.step


def test_richardson_with_a_single_romberg_value_is_missing() -> None:
    # f finite only within 4 t0: one Romberg value, no spread to estimate its error: NaN + a note.
    t0 = 2.0**-6

    def f(x):
        return np.exp(np.sin(x[0])) if abs(x[0] - X0) <= 4.5 * t0 else np.nan

    est = directional_derivative(f, np.array([X0]), np.array([1.0]), method="richardson", step=t0)
    assert math.isnan(est.value) and est.error == math.inf and "Romberg" in est.note, est


def test_relative_error_property() -> None:
    est = directional_derivative(_f, np.array([X0]), np.array([1.0]))
    assert est.relative_error == est.error / abs(est.value)
    zero = directional_derivative(lambda x: 1.0 + 0.0 * x[0], np.array([X0]), np.array([1.0]), method="central")
    assert zero.value == 0.0 and zero.relative_error == math.inf


def test_non_numeric_outputs_are_rejected() -> None:
    from reference.errors import InvalidInputError

    for bad in (np.array("1.0"), np.array(True), np.array([1.0, 2.0])):
        with pytest.raises(InvalidInputError, match="must return a real scalar"):
            directional_derivative(lambda x, b=bad: b, np.array([X0]), np.array([1.0]), method="central")


def test_noise_of_a_function_flat_or_undefined_at_the_probes() -> None:
    # nu = (largest finite change under the one-ulp probes) + 2 eps |f(x)|: exactly 2 eps |f(x)| when
    # the probes see no change (x = 0: a one-ulp move of 0 is 0) or are all non-finite.
    from verify._numdiff import Problem

    flat = Problem(lambda z: 3.0 + 2.0 * z[0], np.array([0.0]))
    assert flat.noise == 2 * EPS64 * 3.0
    x0 = np.array([0.75, -1.5])
    undefined = Problem(lambda z: 3.0 + np.sum(z) if np.array_equal(z, x0) else np.nan, x0)
    assert undefined.noise == 2 * EPS64 * abs(3.0 - 0.75)


def test_noise_probes_move_each_component_by_one_ulp() -> None:
    # x + s eps |x| rounds to within one ulp of the exact one-eps move: never more than eps |x| + ulp.
    x0 = np.array([0.75, -1.5, 3.3, 0.1])
    moves = []

    def f(z):
        dz = np.abs(z - x0)
        if np.any(dz) and np.max(dz) < 1e-12:
            moves.append(dz)
        return float(np.sum(np.sin(z)))

    directional_derivative(f, x0, np.ones(4), method="central")
    assert moves
    for dz in moves:
        assert np.all(dz <= EPS64 * np.abs(x0) + np.spacing(np.abs(x0))), dz


@pytest.mark.parametrize("fast", [False, True])
def test_complex_step_noise_samples_move_x_by_one_ulp(fast: bool) -> None:
    # "the same h at points moved by one ulp": the real parts of the shifted complex evaluation
    # points are within eps |x| + ulp of x, and the moves are not all zero.
    from verify._numdiff import Problem, estimate

    x0 = np.array([0.75, -1.5, 3.3, 0.1])
    moves = []

    def f(z):
        if np.iscomplexobj(z):
            moves.append(np.abs(z.real - x0))
        return np.sum(np.sin(z))

    estimate(Problem(f, x0), np.ones(4), "complex", None, fast=fast, terms=1.0)
    shifted = [dz for dz in moves if np.any(dz)]
    assert len(shifted) == (1 if fast else 2)
    for dz in shifted:
        assert np.all(dz <= EPS64 * np.abs(x0) + np.spacing(np.abs(x0))), dz
        assert np.all(dz > 0), dz  # "moved by one ulp per component": every component moves


def test_messages_name_the_first_bad_index_and_shorten_only_long_values() -> None:
    from reference.errors import InvalidInputError
    from verify._numdiff import _short

    with pytest.raises(InvalidInputError, match=r"non-finite entry at index \(1,\)"):
        directional_derivative(lambda x: float(np.sum(x)), np.array([1.0, np.nan, 2.0, np.inf]), np.ones(4))
    exactly_80 = "x" * 78  # repr adds two quotes
    assert _short(exactly_80) == repr(exactly_80) and len(repr(exactly_80)) == 80
    assert _short("x" * 79) == repr("x" * 79)[:77] + "..."


def test_bad_steps_and_a_non_finite_fast_noise_sample() -> None:
    from reference.errors import InvalidInputError
    from verify._numdiff import Problem, estimate

    for bad in (0.0, "1e-3", -1e-3, True):
        with pytest.raises(InvalidInputError, match="step="):
            directional_derivative(_f, np.array([X0]), np.array([1.0]), method="central", step=bad)
    # the fast complex step's shifted sample is not finite: no estimate (not a NaN error bound)
    x0 = np.array([X0])

    def f(z):
        if np.iscomplexobj(z) and np.any(z.real != x0):
            return np.sin(z[0]) * np.nan
        return np.sin(z[0])

    est = estimate(Problem(f, x0), np.array([1.0]), "complex", None, fast=True, terms=1.0)
    assert math.isnan(est.value) and est.error == math.inf, est


def test_long_inputs_are_shortened_in_error_messages() -> None:
    # A bad input whose repr exceeds 80 characters is cut to 77 + "..." (not a TypeError).
    from reference.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match=r"(?s)^x=array\(\[nan, .{50,}\.\.\. has a non-finite entry"):
        directional_derivative(lambda x: float(np.sum(x)), np.full(40, np.nan), np.ones(40))


# ---------------------------------------------------------------------------------------------
# Tolerances: a claim wrong by tol/2 passes, by 2 tol fails (for every kind, through its consumer)


def _sin_problem(dtype):
    """``f(x) = sum sin(a x)`` returning ``dtype`` (float32: the float32 row is selected)."""
    a = np.array([0.7])
    x = np.array([0.4])

    def f(z):
        return np.sum(np.sin(a * z)).astype(np.result_type(dtype, z.dtype) if np.iscomplexobj(z) else dtype)

    return f, a * np.cos(a * x), x


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gradient_tolerance_edge(dtype) -> None:
    # n = 1, v = +-1: relative error = |delta| / (1 + delta). The estimator's error (complex step:
    # ~8 eps of the working precision, i.e. < 4 % of tol in float32, 1e-5 of it in float64) is
    # negligible at the edge, so the verdict flips between delta = tol/2 and delta = 2 tol.
    f, g, x = _sin_problem(dtype)
    tol = spec(dtype, "gradient")
    for sign in (1.0, -1.0):
        ok = check_gradient(f, g * (1.0 + sign * 0.5 * tol), x, directions=2)
        bad = check_gradient(f, g * (1.0 + sign * 2.0 * tol), x, directions=2)
        assert ok.status == PASS, ok.reason
        assert bad.status == FAIL, bad.reason
        # the verdict's tolerance is tol plus the estimate's own error (relative): at most ~10 % more
        assert tol <= ok.tolerance <= 1.15 * tol and tol <= bad.tolerance <= 1.15 * tol, (ok, bad)


@pytest.mark.parametrize("budget", ["thorough", "fast"])
def test_gradient_tolerance_edge_many_parameters(budget: str) -> None:
    # A claim g + e with e parallel to v in every direction is impossible for n > 1, so take the
    # claimed gradient exact and a loss whose directional derivative is off: f(x) + delta <c, x>
    # with ||c|| = ||g||. In direction v the error is delta <c, v> relative to ||g||: with c = g
    # (parallel) the fast budget's first direction sees ~delta / sqrt(2) .. delta.
    n = 20
    rng = np.random.default_rng(5)
    a = rng.uniform(0.5, 1.5, n)
    x = rng.uniform(-1, 1, n)
    g = a * np.cos(a * x)
    tol = spec(np.float64, "gradient")

    def make(delta):
        return lambda z: np.sum(np.sin(a * z)) + delta * np.dot(g, z)

    assert check_gradient(make(0.3 * tol), g, x, budget=budget).status == PASS
    verdict = check_gradient(make(3.0 * tol), g, x, budget=budget, directions=8)
    assert verdict.status == FAIL, verdict.reason


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_dot_product_tolerance_edge(dtype) -> None:
    # J = [2]: <J u, w> = 2 u w, <u, J^T w> = 2 (1 + delta) u w; relative error delta / (1 + delta).
    tol = spec(dtype, "dot_product")

    def run(delta):
        return dot_product_test(lambda u: (2.0 * u).astype(dtype), lambda w: (2.0 * (1.0 + delta) * w).astype(dtype),
                                in_shape=(1,), out_shape=(1,), dtype=dtype, trials=2)

    if dtype == np.float64:
        assert run(0.5 * tol).status == PASS
        assert run(2.0 * tol).status == FAIL
    else:  # float32 storage rounds 2 (1 + delta) w to 1 ulp (1.2e-7), ~0.5 % of tol
        assert run(0.5 * tol).status == PASS
        assert run(2.0 * tol).status == FAIL
    assert run(0.5 * tol).tolerance == pytest.approx(tol)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_solve_backward_error_tolerance_edge(dtype) -> None:
    # A = [1], b = 1, x = 1 + d: eta = |d| / (|1 + d| + 1) ~ d / 2.
    tol = spec(dtype, "solve_backward_error")
    A = np.eye(1, dtype=dtype)
    b = np.ones(1, dtype=dtype)
    for eta, want in ((0.5 * tol, PASS), (2.0 * tol, FAIL)):
        d = 2.0 * eta / (1.0 - eta)  # eta = d / (2 + d)
        x = np.array([1.0 + d], dtype=dtype)
        verdict = check_solve(A, x, b)
        assert verdict.status == want, (dtype, eta, verdict.reason)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_reference_match_tolerance_edge_through_check_spd(dtype) -> None:
    # A = [[4, 1 + d], [1, 4]]: ||A - A^T||_F / ||A||_F = sqrt(2) d / ||A||_F.
    tol = spec(dtype, "reference_match")
    for target, want in ((0.5 * tol, PASS), (2.0 * tol, FAIL)):
        base = np.array([[4.0, 1.0], [1.0, 4.0]])
        d = target * np.linalg.norm(base) / math.sqrt(2.0)
        A = base.copy()
        A[0, 1] += d
        A = A.astype(dtype)
        asym = float(np.linalg.norm(A.astype(np.float64) - A.astype(np.float64).T) / np.linalg.norm(A.astype(np.float64)))
        assert 0.4 * tol < asym < 2.5 * tol  # float32 storage of 1 + d keeps d to within 10 %
        verdict = check_spd(A)
        assert verdict.status == want, (dtype, target, verdict.reason)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_spd_band_edge(dtype) -> None:
    # diag(1, -m): indefinite when m > band = tol_solve * ||A||_2 = tol_solve, "singular to working
    # precision" (inconclusive) when m is inside the band.
    tol = spec(dtype, "solve_backward_error")
    inside = check_spd(np.diag([1.0, -0.5 * tol]).astype(dtype))
    outside = check_spd(np.diag([1.0, -2.0 * tol]).astype(dtype))
    assert inside.status == "inconclusive", inside.reason
    assert outside.status == FAIL, outside.reason


def test_roundoff_tolerance_sets_the_taylor_resolution() -> None:
    # The Taylor test sees a relative gradient error delta only where the h delta term stands above
    # the round-off floor tolerance("roundoff") * magnitudes (64 eps ~ 1.4e-14 here) before the h^2
    # term takes over: about delta >~ sqrt(64 eps) ~ 1.2e-7 (verify._taylor's docstring). Measured on
    # this problem: 1e-6 fails, 1e-7 is inconclusive. A floor 1000x higher hides 1e-6 (pass); one
    # 1000x lower resolves 1e-7 (fail). The correct gradient passes, also with f offset by 1e3.
    rng = np.random.default_rng(3)
    n = 6
    a = rng.uniform(0.5, 1.5, n)
    x = rng.uniform(-1, 1, n)
    v = rng.standard_normal(n)
    g = a * np.cos(a * x)
    e = v / np.linalg.norm(v) * np.linalg.norm(g)  # an error along v, of size delta ||g||

    def f(z):
        return np.sum(np.sin(a * z))

    def f_offset(z):
        return 1e3 + np.sum(np.sin(a * z))

    assert taylor_test(f, x, v, grad=g).status == PASS
    assert taylor_test(f_offset, x, v, grad=g).status == PASS
    for delta in (1e-4, 1e-5, 1e-6):
        bad = taylor_test(f, x, v, grad=g + delta * e)
        assert bad.status == FAIL, (delta, bad.reason)
    below = taylor_test(f, x, v, grad=g + 1e-7 * e)
    assert below.status != FAIL, below.reason  # at the documented resolution, not resolved
    assert taylor_test(f, x, v, grad=g + 1e-9 * e).status == PASS


def test_precision_row_ignores_non_float_entries_in_any_position() -> None:
    # "ints and bools ignored" (precision_dtype's docstring) must not stop the scan: a float32
    # quantity after an int or a None still selects the float32 row (mutation survivors: `continue`
    # -> `break` in the scan).
    from verify.tolerance import precision_dtype

    assert precision_dtype(None, np.float32) == np.float32
    assert precision_dtype(np.int64, np.float32) == np.float32
    assert precision_dtype(np.bool_, None, np.complex64, np.float64) == np.float32


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_the_edge_tests_cover_every_kind(dtype) -> None:
    # every kind has an edge test above; the table agrees with the documented values it pins
    assert set(KINDS) == {"gradient", "dot_product", "reference_match", "solve_backward_error", "roundoff"}
    for kind in KINDS:
        assert tolerance(dtype, kind) == pytest.approx(spec(dtype, kind), rel=1e-12), kind


# ---------------------------------------------------------------------------------------------
# The fast budget: the estimate's value against the exact directional derivative


def _fast_direction(seed: int, g: np.ndarray) -> np.ndarray:
    """``check_gradient``'s first fast direction, rebuilt from its documented definition."""
    rng = np.random.default_rng(seed)
    r = rng.standard_normal(g.size)
    r /= np.linalg.norm(r)
    ghat = g / np.linalg.norm(g)
    r = r if r @ ghat >= 0 else -r
    v = ghat + r
    return v / np.linalg.norm(v)


def _problem(n: int = 7, seed: int = 11):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.5, 1.5, n)
    B = rng.standard_normal((n, n)) / n
    x = rng.uniform(-1, 1, n)

    def f(z):
        return np.sum(np.sin(a * z)) + 0.5 * z @ B @ z + np.exp(0.3 * np.sum(z))

    def grad(z):
        return a * np.cos(a * z) + 0.5 * (B + B.T) @ z + 0.3 * np.exp(0.3 * np.sum(z))

    return f, grad, x


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_complex_estimate_value(seed: int) -> None:
    f, grad, x = _problem()
    g = grad(x)
    verdict = check_gradient(f, g, x, seed=seed, budget="fast")
    d = verdict.details[0]
    v = _fast_direction(seed, g)
    exact = float(g @ v)  # the closed-form gradient along the rebuilt direction
    assert d["claimed"] == pytest.approx(exact, rel=1e-14)
    assert abs(d["estimate"] - exact) <= 1e-14 * np.linalg.norm(g), (d, exact)
    assert abs(d["estimate"] - exact) <= d["estimate_error"] <= 1e-13 * np.linalg.norm(g), d


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_central_estimate_value(seed: int) -> None:
    # f rejects complex input: the fast budget uses one central difference at t ~ eps^(1/3) s; its
    # error is t^2 |f_vvv| / 6 + eps |f| / t ~ 1e-11, and the reported error bounds it.
    f0, grad, x = _problem()

    def f(z):
        return float(f0(np.asarray(z, dtype=float)))

    g = grad(x)
    verdict = check_gradient(f, g, x, seed=seed, budget="fast")
    assert verdict.status == PASS and verdict.method == "central", verdict.reason
    d = verdict.details[0]
    exact = float(g @ _fast_direction(seed, g))
    assert abs(d["estimate"] - exact) <= 1e-9 * np.linalg.norm(g), (d, exact)
    assert abs(d["estimate"] - exact) <= d["estimate_error"], (d, exact)
    assert d["estimate_error"] <= 1e-7 * np.linalg.norm(g), d


def test_fast_estimate_value_on_a_scaled_direction_of_x() -> None:
    # Large |x| changes the nominal step s = log(e + ||x||) / ||v||: the value must still be right.
    f, grad, x = _problem()
    x = 30.0 * x
    g = grad(x)
    verdict = check_gradient(f, g, x, seed=4, budget="fast")
    d = verdict.details[0]
    exact = float(g @ _fast_direction(4, g))
    assert abs(d["estimate"] - exact) <= 1e-13 * np.linalg.norm(g), (d, exact)


# ---------------------------------------------------------------------------------------------
# dot_product_test: inputs and records (mutation survivors of verify/_dottest.py)


def test_dot_test_dtype_follows_the_example_arrays() -> None:
    # The dtype of u and w comes from the example arrays: a float32 output example alone selects
    # float32; two real examples keep u real (complex only when an example is complex).
    seen = []

    def jvp(u):
        seen.append(u.dtype)
        return np.array([2.0, 1.0], dtype=u.dtype) * u[0]

    def vjp(w):
        return np.array([2.0 * w[0] + w[1], 0.0, 0.0], dtype=w.dtype)

    v32 = dot_product_test(jvp, vjp, in_shape=3, out_shape=np.zeros(2, dtype=np.float32), trials=1)
    assert v32.dtype == "float32" and seen[-1] == np.float32
    v64 = dot_product_test(jvp, vjp, in_shape=np.zeros(3), out_shape=np.zeros(2), trials=1)
    assert v64.status == PASS and v64.dtype == "float64" and seen[-1] == np.float64
    assert isinstance(v64.details[0]["forward"], float) and isinstance(v64.details[0]["reverse"], float)
    vc = dot_product_test(lambda u: 2j * u, lambda w: -2j * w, in_shape=np.zeros(2, dtype=complex),
                          out_shape=(2,), trials=1)
    assert vc.status == PASS and isinstance(vc.details[0]["forward"], complex)


def test_dot_test_empty_shapes_are_trivially_transposed() -> None:
    # A zero-size map (shape (3, 0)) is allowed: <J u, w> = <u, J^T w> = 0, relative error 0.
    verdict = dot_product_test(lambda u: np.zeros((2, 0)), lambda w: np.zeros((3, 0)), in_shape=(3, 0),
                               out_shape=(2, 0), trials=1)
    assert verdict.status == PASS and verdict.error == 0.0


def test_dot_test_rejects_bad_trials_and_rtol() -> None:
    from reference.errors import InvalidInputError

    ok = dict(in_shape=2, out_shape=2)
    for bad in (2.5, "3", True, 0):
        with pytest.raises(InvalidInputError, match="trials="):
            dot_product_test(lambda u: u, lambda w: w, trials=bad, **ok)
    for bad in (1.0, 0.0, -1e-3):
        with pytest.raises(InvalidInputError, match="rtol="):
            dot_product_test(lambda u: u, lambda w: w, rtol=bad, **ok)


def test_dot_test_complex_jvp_with_a_real_vjp_fails() -> None:
    # J = A + iB on real inputs; a vjp that drops the imaginary part is not J^H.
    rng = np.random.default_rng(2)
    A, B = rng.standard_normal((3, 2)), rng.standard_normal((3, 2))
    verdict = dot_product_test(lambda u: (A + 1j * B) @ u, lambda w: A.T @ np.real(w), in_shape=(2,),
                               out_shape=(3,), dtype=np.float64, trials=2)
    assert verdict.status == FAIL, verdict.reason


# ---------------------------------------------------------------------------------------------
# taylor_test: the window rules (mutation survivors of verify/_taylor.py)


def test_taylor_three_steps_are_enough_for_a_rate() -> None:
    # "inconclusive ... with fewer than 3 steps in the window": 3 steps above the floor give a rate.
    a = np.array([0.7, 1.3])
    x = np.array([0.2, -0.4])
    v = np.array([1.0, 0.5])

    def f(z):
        return np.sum(np.sin(a * z))

    g = a * np.cos(a * x)
    ok = taylor_test(f, x, v, grad=g, steps=[0.1, 0.05, 0.025])
    assert ok.status == PASS and 1.75 <= ok.slope <= 2.25 and sum(ok.used) == 3, ok.reason
    bad = taylor_test(f, x, v, grad=g * 1.5, steps=[0.1, 0.05, 0.025])
    assert bad.status == FAIL, bad.reason


def test_taylor_exact_quadratic_model_at_the_origin_is_at_the_floor() -> None:
    # f = x^T A x / 2 at x = 0 with its exact gradient (0) and Hessian-vector product: the remainder
    # is rounding only, and the floor (64 eps x magnitudes, here |f(hv)| + h^2/2 |<v, Hv>|) covers it.
    rng = np.random.default_rng(4)
    M = rng.standard_normal((4, 4))
    A = M @ M.T + np.eye(4)
    v = rng.standard_normal(4)
    x = np.zeros(4)

    def f(z):
        return 0.5 * z @ A @ z

    result = taylor_test(f, x, v, grad=np.zeros(4), hvp=A @ v)
    assert result.status == PASS, result.reason
    assert "order-2 Taylor model is exact" in result.reason, result.reason  # grad + hvp: order 2
    assert f"from h={result.steps[0]:.2e} to {result.steps[-1]:.2e}" in result.reason, result.reason


def test_taylor_default_steps_and_the_exact_for_small_steps_path() -> None:
    # 24 default steps h0 2^-k (48 evaluations). |x| at x = 0.3 with its gradient: the first-order
    # remainder is exactly 0 for h < 0.3 / |v| (f linear there) and not above: it "falls to the floor
    # within one halving", a pass, and `used` marks exactly the steps after the last one above the floor.
    x, v = np.array([0.3]), np.array([1.0])
    result = taylor_test(lambda z: np.abs(z[0]), x, v, grad=np.array([1.0]))
    assert len(result.steps) == 24
    assert result.status == PASS and "falls" in result.reason and "order-1 Taylor model" in result.reason, result.reason
    rem, floors = np.array(result.remainders), np.array(result.floors)
    last = int(np.flatnonzero(rem > floors)[-1])
    assert list(result.used) == [False] * (last + 1) + [True] * (len(rem) - last - 1)


def test_taylor_discontinuous_function_is_named() -> None:
    # No derivative given: R0(h) = f(x + h v) - f(x) must shrink like h; a jump at x leaves a constant.
    # x = 0, so the one-ulp noise probes do not move x (a jump the probes straddle is taken for
    # noise: see the report of issue 19, a known limitation).
    result = taylor_test(lambda z: float(z[0] > 0.0) + z[0], np.array([0.0]), np.array([1.0]))
    assert result.status == FAIL and "not continuous" in result.reason, result.reason


# ---------------------------------------------------------------------------------------------
# verify/_numdiff.py: noise probes, reported noise, central step, Romberg holes, float16
# (mutation survivors, issue 19)


def test_noise_probes_move_every_component_by_one_ulp_both_ways() -> None:
    # nu is "the largest change of f under random perturbations of x by one ulp per component": each
    # probe moves every component by one ulp, up or down, and across the 8 probes both ways occur.
    from verify._numdiff import Problem

    x0 = np.array([0.75, -1.5, 3.3, 0.1, 7.0])
    points = []

    def f(z):
        points.append(np.array(z, dtype=np.float64))
        return float(np.sum(np.sin(z)))

    p = Problem(f, x0)
    p.noise  # noqa: B018 - the property runs the probes
    moves = [z - x0 for z in points[1:]]
    assert len(moves) == 8
    for dz in moves:
        assert np.all(np.abs(dz) > 0) and np.all(np.abs(dz) <= EPS64 * np.abs(x0) + np.spacing(np.abs(x0))), dz
    signs = np.sign(np.array(moves))
    assert np.all(np.any(signs > 0, axis=0)) and np.all(np.any(signs < 0, axis=0))


def test_noise_sees_a_jump_on_either_side_of_x() -> None:
    # f jumps by 1 just below x or just above it: one-ulp probes in both directions see it either way.
    from verify._numdiff import Problem

    x0 = np.array([0.3, 0.6])
    below = Problem(lambda z: float(z[0] < 0.3) + float(np.sum(z)), x0).noise
    above = Problem(lambda z: float(z[0] > 0.3) + float(np.sum(z)), x0).noise
    assert below >= 1.0 and above >= 1.0


@pytest.mark.parametrize("fast", [False, True])
def test_complex_step_reports_no_more_noise_than_f_has(fast: bool) -> None:
    # Estimate.noise is a round-off level of f near x: >= 0 and not above the level nu the real probes
    # measure (the complex step does not use nu: it reports 0).
    from verify._numdiff import Problem, estimate

    x0 = np.array([0.5, -0.25, 1.5])
    nu = Problem(_sum_sin, x0).noise
    est = estimate(Problem(_sum_sin, x0), np.array([1.0, 2.0, -1.0]), "complex", None, fast=fast, terms=1.0)
    assert 0.0 <= est.noise <= nu, (est.noise, nu)


def _sum_sin(z):
    return np.sum(np.sin(z))


def test_central_difference_at_its_step_reaches_eps_to_the_two_thirds() -> None:
    # t = eps^(1/3) s balances the truncation c t^2 against the round-off eps / t: the error is
    # O(eps^(2/3)) ~ 4e-11 for O(1) values and derivatives (another exponent, e.g. eps^(1/4), leaves
    # O(eps^(1/2))). Exact values: the closed-form derivative of sum(sin) + exp(x0 x1).
    x0 = np.array([0.4, -0.7, 1.1])
    v = np.array([1.0, -0.5, 0.25])

    def f(z):
        return np.sum(np.sin(z)) + np.exp(z[0] * z[1])

    exact = float(np.cos(x0) @ v + np.exp(x0[0] * x0[1]) * (x0[1] * v[0] + x0[0] * v[1]))
    est = directional_derivative(f, x0, v, method="central")
    assert abs(est.value - exact) <= 10 * EPS64 ** (2 / 3), (est, exact)
    assert abs(est.value - exact) <= est.error


@pytest.mark.parametrize("hole", [0, 3])
def test_richardson_works_around_a_point_where_f_is_not_finite(hole: int) -> None:
    # f is NaN at x +- t_hole v only (a point outside its domain, or a failed evaluation): the Romberg
    # values that use it are dropped, the others still give an honest estimate -- "the R_k with the
    # smallest error estimate" among those that exist, whether the hole is at the smallest step
    # (hole 0) or cuts R_0 off from its neighbours (hole 3: R_0 finite, R_1..R_3 not).
    x0, v = np.array([0.4, -0.7]), np.array([1.0, 0.5])
    steps = directional_derivative(_sum_sin, x0, v, method="richardson").steps
    bad = {float(x0[0] + steps[hole] * v[0]), float(x0[0] - steps[hole] * v[0])}

    def f(z):
        return math.nan if float(z[0]) in bad else float(np.sum(np.sin(z)))

    exact = float(np.cos(x0) @ v)
    est = directional_derivative(f, x0, v, method="richardson")
    assert est.steps == steps
    assert math.isfinite(est.value) and abs(est.value - exact) <= est.error <= 1e-6, (est, exact)


def test_richardson_in_float16_has_the_minimal_table() -> None:
    # f computes in float16 (eps ~ 1e-3): the first step eps^(1/2.5) s is already at the cap 2^-4 s, yet an
    # error estimate needs two Romberg values, R_k = (64 D_k - 20 D_k+1 + D_k+2) / 45: four central
    # quotients (t, 2t, 4t, 8t), no fewer and -- every step beyond the cap moving further from x -- no more.
    x0, v = np.array([0.3, 0.5]), np.ones(2)

    def f(z):
        return np.float16(np.sum(np.sin(z)))

    est = directional_derivative(f, x0, v, method="richardson")
    exact = float(np.cos(x0) @ v)
    assert len(est.steps) == 4 and math.isfinite(est.value), est
    assert abs(est.value - exact) <= est.error, (est, exact)


def test_central_difference_with_f_not_finite_at_the_second_step_has_no_estimate() -> None:
    # f = log z at x = 1.5 t: finite at x +- t, NaN at x - 2t < 0. The truncation estimate |D(2t) - D(t)|
    # cannot be formed, so there is no estimate (NaN, error inf) -- never a value with a NaN error bound.
    t = directional_derivative(lambda z: float(z[0]), np.array([1.0]), np.array([1.0]), method="central").step
    x0 = np.array([1.5 * t])

    def f(z):
        return math.log(z[0]) if z[0] > 0 else math.nan

    est = directional_derivative(f, x0, np.array([1.0]), method="central", step=t)
    assert math.isnan(est.value) and est.error == math.inf, est


def test_overflowing_scale_claim_or_error_bound_is_inconclusive_without_a_kink() -> None:
    """One direction's verdict when ``||g||``, ``<g,v>`` or the estimate's error bound is not finite (the
    sums overflow near 1.8e308): no finite tolerance exists, so "inconclusive", and no kink is claimed
    (none was probed); each input alone triggers it, and finite inputs give an ordinary verdict."""
    from verify._check import _judge
    from verify._numdiff import Estimate
    from verify._verdict import INCONCLUSIVE

    v = np.array([1.0])
    for claimed, gnorm, err in [(1.0, math.inf, 1e-12), (math.inf, 1.0, 1e-12), (1.0, 1.0, math.inf),
                                (1.0, 1.0, math.nan)]:
        est = Estimate(1.0, err, "central", 1e-3, (1e-3,), 0.0, 2)
        rec = _judge(None, v, 0, claimed, gnorm, est, 1e-6, 1.0, probe_kinks=False)
        assert rec["status"] == INCONCLUSIVE and rec["kink"] is False, (claimed, gnorm, err, rec)
        assert "overflow threshold" in rec["why"] and math.isnan(rec["tolerance"])
    est = Estimate(1.0, 1e-12, "central", 1e-3, (1e-3,), 0.0, 2)
    assert _judge(None, v, 0, 1.0 + 1e-9, 1.0, est, 1e-6, 1.0, probe_kinks=False)["status"] == PASS


def test_claimed_dot_product_is_exact_up_to_two_to_the_16_entries() -> None:
    """``<g, v>`` is correctly rounded (``math.fsum``) up to and including 2^16 entries: products
    (1e16, 1, -1e16, 0.5, 0, ...) sum to 1.5, which a pairwise sum loses (1e16 + 1 rounds to 1e16)."""
    from verify._check import _dot

    for n in (8, 1 << 16):
        g = np.zeros(n)
        g[:4] = [1e16, 1.0, -1e16, 0.5]
        assert float(np.sum(g)) != 1.5  # the pairwise sum loses the 1
        assert _dot(g, np.ones(n)) == 1.5


def test_tolerance_takes_kind_by_keyword_and_condition_only_by_keyword() -> None:
    """The documented call forms: ``tolerance(dtype, kind=...)`` and ``condition=`` by keyword only (a
    third positional argument is refused, so a condition number cannot be passed where none is meant)."""
    assert tolerance(np.float64, kind="dot_product") == tolerance(np.float64, "dot_product")
    assert tolerance(dtype=np.float32, kind="gradient") == tolerance(np.float32)
    assert tolerance(np.float64, "gradient", condition=100.0) > tolerance(np.float64, "gradient")
    with pytest.raises(TypeError):
        tolerance(np.float64, "gradient", 100.0)  # type: ignore[misc]


def test_complex_step_verdict_stands_when_richardson_agrees_within_both_error_bounds() -> None:
    """A gradient 1% off, of an f whose complex evaluation carries an extra imaginary ``K (Im z)^2``
    (not analytic; real evaluations are exactly sin): the complex step is off by ``K h ||v||^2``, far
    beyond Richardson's error bound, but its own bound (3 x the spread of its 3h and 5h samples, 12 K h)
    covers the difference. The complex step is distrusted only when the two disagree beyond *both*
    bounds, so here its verdict (fail) stands, with no fallback note."""
    K = 1e24
    x = np.array([0.3, -0.7, 1.1])

    def f(z):
        out = np.sum(np.sin(z))
        return out + 1j * K * np.sum(z.imag**2) if np.iscomplexobj(z) else out

    v = np.array([0.6, 0.0, 0.8])
    cs = directional_derivative(f, x, v, method="complex")
    rich = directional_derivative(f, x, v, method="richardson")
    exact = float(np.cos(x) @ v)
    assert abs(rich.value - exact) <= rich.error < abs(cs.value - exact)  # the premise: only cs is off
    assert abs(cs.value - rich.value) <= cs.error + rich.error
    verdict = check_gradient(f, 1.01 * np.cos(x), x)
    assert verdict.status == FAIL, verdict.reason
    assert all(d["method"] == "complex" for d in verdict.details)
    assert "disagreed" not in verdict.reason, verdict.reason
