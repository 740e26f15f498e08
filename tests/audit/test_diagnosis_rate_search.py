"""The effective-inner-rate fit (:func:`verify.auditing.diagnosis.gradient._fit_rate`) as a search, on
variant families with known answers.

The fit explains a claim ``g`` as ``c G(a)`` (``G(a)``: the asked algorithm's meta-gradient at inner rate ``a``)
by a grid over ``a`` and Gauss-Newton from the best three grid points. On a real network ``G`` is smooth in
``a`` except at a relu kink, so Gauss-Newton usually converges from any nearby start; what the search itself
promises is only visible where it is not forgiving. Here ``G`` is replaced (``monkeypatch`` of
``gradient._rate_function``, as a relu network's narrow activation pieces would do) by a synthetic family
whose direction **winds** in ``log |a|``, a full turn every ``2 pi / OMEGA`` = 0.02 in ``log |a|``, plus a slow
drift that makes the planted rate the only exact fit::

    G(a) = u + cos(OMEGA L) v + sin(OMEGA L) w + 0.1 L z + 0.02 (a / alpha) y,   L = log|a / alpha|

(``u, v, w, z, y`` orthonormal). A start more than about a quarter turn from the planted rate falls into
another local minimum (residual ~ the drift, 1e-3 and more) and never reaches it, so the fit recovers a rate
only when a start lies within half a percent of it. The planted rate is known exactly; the fit must return it
to 1e-9, with the planted scale.

The contract checked: a wrong rate at the common ratios to the asked ``alpha`` -- 1/16, 1/8, 1/4, 1/2, 3/4,
1, 3/2, 2, 3, 4, 8, 16, 32, 64 (a rate divided or multiplied by a power of two, a forgotten or doubled factor
up to 64: the catalogue's "a different inner_lr than the one passed"), the sign flip of each, and
``alpha x n`` for a support loss summed over its ``n`` elements (``reduction='sum'``) -- is found however
narrow its basin. Each claim is ``(1 + 1e-4)`` times the ratio (it is not a grid point itself: Gauss-Newton
must move). Every test here runs in milliseconds (the synthetic ``G`` is a few vector operations).

The last section checks what the search costs and where it looks, by recording the rates the fit evaluates the
variant at: its scored starts, the three it refines, its step budget (40 Gauss-Newton steps per start with the
complex-step derivative, 60 with central differences: stated in those tests' docstrings), a start given up at once
when its derivative fails, a run that is bit-identical for a claim scaled by a power of two (a unit-free stop rule),
and the rank of the fitted candidate in the diagnosis.
"""

from __future__ import annotations

import numpy as np
import pytest

from reference.models import MLP
from reference.tasks import Task
from verify.algorithms import Case
from verify.auditing.diagnosis import gradient

OMEGA = 2.0 * np.pi / 0.02  # a full turn of G's direction every 0.02 in log |a|
ALPHA = 0.03

#: the ratios (to the asked rate) the search promises to find, whatever the basin
RATIOS = (0.0625, 0.125, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0, 16.0, 32.0, 64.0)


def _case(activation: str = "tanh", shots: int | tuple[int, ...] = 5, outputs: int = 1, alpha: float = ALPHA) -> Case:
    """A MAML problem (only its asked rate, support sizes, loss and analyticity matter here: G is synthetic)."""
    rng = np.random.default_rng(3)
    model = MLP([2, 3, outputs], activation, "mse")
    sizes = (shots, shots) if isinstance(shots, int) else shots
    tasks = [Task(rng.normal(size=(n, 2)), rng.normal(size=(n, outputs)), rng.normal(size=(3, 2)),
                  rng.normal(size=(3, outputs))) for n in sizes]
    return Case("maml", model, model.init(3), tasks, {"inner_lr": alpha, "inner_steps": 1}, 3)


def _winding(case: Case, *, undefined=lambda a: False):
    """``a -> (None, G(a))``, the winding family (module docstring), real-analytic in ``a`` for ``a != 0`` (so
    complex steps in ``a`` are exact); ``undefined(a)`` (real part) raises as an undefined variant would."""
    n, alpha = sum(int(np.size(p)) for p in case.params), case.hyper["inner_lr"]
    basis = np.linalg.qr(np.random.default_rng(11).normal(size=(n, 5)))[0].T  # u, v, w, z, y orthonormal
    u, v, w, z, y = basis

    def fn(a):
        if undefined(float(np.real(a))):
            raise FloatingPointError("undefined here")
        t = a / alpha
        L = 0.5 * np.log(t * t)  # log|t|, analytic near the real axis on both sides of 0
        return None, u + np.cos(OMEGA * L) * v + np.sin(OMEGA * L) * w + 0.1 * L * z + 0.02 * t * y

    return fn


def _fitted(case: Case, g: np.ndarray):
    """The fitted candidate for the claim ``g`` (None if none), through the family's entry point (which runs
    the fit with NumPy's floating-point warnings off, as the diagnosis does)."""
    fixed, fits = gradient.fitted(case, g, None, lambda cand: False)
    assert fixed == [] and len(fits) <= 1
    return fits[0] if fits else None


def _fit(case: Case, monkeypatch, rate: float, scale: float, **kw):
    fn = _winding(case, **kw)
    monkeypatch.setattr(gradient, "_rate_function", lambda c: fn)
    return _fitted(case, scale * fn(rate)[1])


def test_the_family_has_narrow_basins(monkeypatch):
    """The premise, checked: from the planted rate's neighbours on the ratio list (4/3 and more away) alone the fit
    does not reach it -- a search over the ratios without the planted one's start fails."""
    case = _case()
    fn = _winding(case)
    rate = 3.0 * ALPHA * (1 + 1e-4)
    g = fn(rate)[1]
    monkeypatch.setattr(gradient, "_RATE_GRID", tuple(r for r in RATIOS if r != 3.0))
    monkeypatch.setattr(gradient, "_rate_function", lambda c: fn)
    cand = _fitted(case, g)
    assert cand is None or abs(cand.fitted["inner_lr"] - rate) > 1e-3 * rate


@pytest.mark.parametrize("alpha", [ALPHA, 1e-30, 1e30])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_every_promised_ratio_is_found(monkeypatch, activation, alpha):
    """Each ratio (both signs for 1/16, 1, 64), and ``alpha x 5`` for reduction='sum' over 5 support rows, with a
    scale: rate and scale to 1e-9. ``relu`` (not analytic): the fit's derivative is a central difference. The
    family depends on ``a / alpha`` only, so the search must not depend on the units: the same at alpha = 1e-30
    and 1e30 (the complex step and the difference increments relative to the rate)."""
    case = _case(activation, alpha=alpha)
    assert case.model.is_analytic == (activation == "tanh")
    for ratio, scale in ((r, -1.7) for r in (*RATIOS, -0.0625, -1.0, -64.0, 5.0)):
        rate = ratio * alpha * (1 + 1e-4)
        cand = _fit(case, monkeypatch, rate, scale)
        assert cand is not None and cand.key == "wrong_inner_lr", ratio
        assert cand.fitted["inner_lr"] == pytest.approx(rate, rel=1e-9, abs=0.0), ratio
        assert cand.fitted["scale"] == pytest.approx(scale, rel=1e-9, abs=0.0), ratio
    for scale in (1.7, 0.4, 1.0):  # the label names a scale that is not 1
        cand = _fit(case, monkeypatch, 2.0 * alpha * (1 + 1e-4), scale)
        assert cand is not None and cand.fitted["scale"] == pytest.approx(scale, rel=1e-9, abs=0.0)
        assert (f", scaled by {scale:.6g}" in cand.label) == (scale != 1.0), cand.label


def test_reduction_sum_start_is_rows_times_outputs(monkeypatch):
    """mse with 2 outputs and 3 support rows: the summed support loss is alpha x 6 (rows x outputs), found in its
    narrow basin and named. With support sets of 3 and 4 rows no single rate is a summed loss: claims at 2 alpha
    (the outputs alone) and 4 alpha (one task's rows) are fitted but not named reduction='sum'."""
    case = _case(shots=3, outputs=2)
    rate = 6.0 * ALPHA * (1 + 1e-12)
    cand = _fit(case, monkeypatch, rate, 1.0)
    assert cand is not None and cand.fitted["inner_lr"] == pytest.approx(rate, rel=1e-9, abs=0.0)
    assert "(= alpha x 6: the support loss is summed over its 6 elements, reduction='sum')" in cand.label
    uneven = _case(shots=(3, 4), outputs=2)
    for ratio in (2.0, 4.0):
        cand = _fit(uneven, monkeypatch, ratio * ALPHA, 1.0)
        assert cand is not None and cand.fitted["inner_lr"] == pytest.approx(ratio * ALPHA, rel=1e-9, abs=0.0)
        assert "reduction='sum'" not in cand.label, cand.label


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_a_start_next_to_an_undefined_rate_is_dropped(monkeypatch, activation):
    """The variant raises just above or just below a start (inside the fit's derivative increment, or at the start
    itself): that start is dropped, the fit goes on (no exception) and the planted rate is still found from its
    own start."""
    case = _case(activation)
    rate = 2.0 * ALPHA * (1 + 1e-4)
    for q in (1.5, 3.0, 4.0, 1.0, 0.75):  # other starts (q alpha)
        for lo, hi in ((1.0 + 1e-9, 1.0 + 1e-5), (1.0 - 1e-5, 1.0 - 1e-9), (1.0 - 1e-12, 1.0 + 1e-12)):
            undefined = lambda a, q=q, lo=lo, hi=hi: lo <= a / (q * ALPHA) <= hi  # noqa: E731
            cand = _fit(case, monkeypatch, rate, 1.0, undefined=undefined)
            assert cand is not None and cand.fitted["inner_lr"] == pytest.approx(rate, rel=1e-9, abs=0.0), (q, lo, hi)


# ---------------------------------------------------------------------------
# a slow way to the rate: Gauss-Newton must keep going until the rate has converged
# ---------------------------------------------------------------------------


def _flat(case: Case, planted: float):
    """``a -> (None, u + (a / alpha - t*)^3 w)`` with ``t* = planted / alpha`` (``u``, ``w`` the first two unit
    vectors: no round-off mixes the tiny ``w`` part of a residual into the ``u`` part): a variant whose gradient
    leaves the planted one only to third order in the rate. In the fit's residual ``g - c G(a)`` the scale is
    settled in the first Gauss-Newton step (``u`` pins it) and from then on its steps are zero, while the rate
    follows Newton's iteration on a triple root, which converges only linearly: each step leaves 2/3 of the
    error (``t - (t - t*) / 3``)."""
    n, alpha = sum(int(np.size(p)) for p in case.params), case.hyper["inner_lr"]
    u, w = np.eye(n)[:2]
    return lambda a: (None, u + (a / alpha - planted / alpha) ** 3 * w)


@pytest.mark.parametrize("alpha", [ALPHA, 1e-30])
@pytest.mark.parametrize("activation, ratio, rtol", [("tanh", 3.0 * (1 + 1e-4), 1e-9), ("relu", 1.5, 2e-6),
                                                          ("relu", 0.05, 2e-6)])
def test_the_fit_runs_until_the_rate_has_converged(monkeypatch, activation, ratio, rtol, alpha):
    """The planted rate ``ratio x alpha`` and one start (the grid replaced by ``3 alpha``): the error shrinks by 2/3
    a step, so the fit needs tens of steps -- from 1e-4 away the analytic fit's 40 leave 1e-4 (2/3)^40 ~ 1e-11.
    A relu fit's derivative is a central difference with increment 1e-6 |a|, which near a triple root is
    ``3 (t - t*)^2 + h^2``: its Newton steps stall within ~2e-7 of the root; from 1.5 alpha (relative error 1 at
    the start) it gets there within its 60 steps (a derivative twice too large, steps leaving 5/6 of the error,
    would still be 2e-5 away), and from 0.05 alpha (relative error 59) too, where the analytic fit's 40 steps would
    leave 59 (2/3)^40 ~ 5e-6. Rate and scale to ``rtol``: the fit did not stop while the rate was still moving,
    though the scale's steps were zero from the second on, in any units."""
    case = _case(activation, alpha=alpha)
    rate, scale = ratio * alpha, 2.5
    fn = _flat(case, rate)
    monkeypatch.setattr(gradient, "_RATE_GRID", (3.0,))
    monkeypatch.setattr(gradient, "_rate_function", lambda c: fn)
    cand = _fitted(case, scale * fn(rate)[1])
    assert cand is not None and cand.fitted["inner_lr"] == pytest.approx(rate, rel=rtol, abs=0.0), cand
    assert cand.fitted["scale"] == pytest.approx(scale, rel=1e-9, abs=0.0)


def test_the_third_best_start_is_tried(monkeypatch):
    """Gauss-Newton runs from the three best-projecting starts, not the best two: here two starts exactly one winding
    turn above and below the planted rate project better (their directions match it; only the slow drift differs)
    than the start 0.3 % below it, 54 degrees of winding away -- yet only that one lies in the planted rate's basin.
    (A family with a strong linear drift in ``a``, so that the negative starts project worst.) The same when the
    variant is undefined wherever the two better starts' iterations go: those starts are dropped, not the search."""
    case = _case(shots=(3, 4))  # support sets of different sizes: no reduction='sum' start
    n, alpha = sum(int(np.size(p)) for p in case.params), case.hyper["inner_lr"]
    u, v, w, z, y = np.linalg.qr(np.random.default_rng(11).normal(size=(n, 5)))[0].T

    d, turn = 0.003, 2.0 * np.pi / OMEGA
    rate = 4.0 * alpha * np.exp(d)
    grid = (4.0, 4.0 * np.exp(d + turn), 4.0 * np.exp(d - turn))
    defined = [lambda a: True,  # and then: undefined except at the starts and within 1% of the planted rate
               lambda a: any(a == s * f * alpha for f in grid for s in (1.0, -1.0)) or abs(a / rate - 1.0) < 0.01]

    def fn(a):
        if not defined[0](float(np.real(a))):
            raise FloatingPointError("undefined here")
        t = a / alpha
        L = 0.5 * np.log(t * t)
        return None, u + np.cos(OMEGA * L) * v + np.sin(OMEGA * L) * w + 0.1 * L * z + t * y

    g = fn(rate)[1]

    def projection_error(r):
        G = fn(r)[1]
        return float(np.linalg.norm(g - (G @ g) / (G @ G) * G) / np.linalg.norm(g))

    errors = sorted((projection_error(s * f * alpha), s * f) for f in grid for s in (1.0, -1.0))
    assert [r for _, r in errors[:3]][2] == 4.0  # the premise: the planted rate's start is third
    monkeypatch.setattr(gradient, "_RATE_GRID", grid)
    monkeypatch.setattr(gradient, "_rate_function", lambda c: fn)
    for _ in range(2):
        cand = _fitted(case, 3.0 * g)
        assert cand is not None and cand.fitted["inner_lr"] == pytest.approx(rate, rel=1e-9, abs=0.0), cand
        assert cand.fitted["scale"] == pytest.approx(3.0, rel=1e-9, abs=0.0)
        defined.reverse()  # the two better starts now end where the variant is undefined: the third is still tried


def test_a_factor_is_named_before_a_fitted_rate():
    """With a single meta-parameter every claim is a multiple of the correct meta-gradient, and also ``c G(a)`` for
    any rate ``a`` (a 1-D gradient cannot tell rates apart). Without a claimed meta-loss to tell them apart either,
    both explain it exactly: the diagnosis names the simpler one, the constant factor on the correct gradient
    (rank 2), before the fitted rate (rank 3)."""
    from test_diagnosis_units import _diagnose, _reference

    rng = np.random.default_rng(7)
    model = MLP([1, 1], "identity", "mse", bias=False)
    tasks = [Task(rng.normal(size=(4, 1)), rng.normal(size=(4, 1)), rng.normal(size=(3, 1)), rng.normal(size=(3, 1)))
             for _ in range(2)]
    case = Case("maml", model, model.init(7), tasks, {"inner_lr": 0.1, "inner_steps": 1}, 7)
    ref = _reference(case)
    assert ref.shape == (1,) and ref[0] != 0.0
    c = -2.0
    assert _fitted(case, c * ref) is not None  # the fit explains it too
    d = _diagnose(case, c * ref, no_loss=True)
    assert d is not None and d.key == "scale" and d.fitted["scale"] == pytest.approx(c, rel=1e-12), d


# ---------------------------------------------------------------------------
# where the search looks and what it costs: its starts, its step budget, its units, its rank
# ---------------------------------------------------------------------------


def _recording(fn):
    """``fn`` and the list of rates it is evaluated at, in order (complex ones: the fit's complex-step derivative;
    an evaluation that raises is recorded too)."""
    calls: list = []

    def rec(a):
        calls.append(a)
        return fn(a)

    return rec, calls


def _projection_error(g: np.ndarray, G: np.ndarray) -> float:
    """``min_c |g - c G| / |g|`` (the least-squares factor ``c = <G, g> / <G, G>``)."""
    return float(np.linalg.norm(g - (G @ g) / (G @ G) * G) / np.linalg.norm(g))


@pytest.mark.parametrize("shots, outputs, summed", [((3, 4), 5, None), (3, 5, 15.0)])
def test_the_scored_starts_are_the_promised_rates(monkeypatch, shots, outputs, summed):
    """The rates the fit scores (its real evaluations before the first complex-step derivative) are exactly the
    promised starts: +- each ratio x alpha, and alpha x rows x outputs (``reduction='sum'``; mse with 5 outputs and
    3 rows: 15 alpha) only when every task's support set has the same number of rows. With 3 and 4 rows no single
    rate is a summed loss: no extra start at all (with 5 outputs a spurious one, such as -5 alpha for a row count
    taken as -1, is not on the ratio list and would show)."""
    case = _case(shots=shots, outputs=outputs)
    fn0 = _winding(case)
    g = fn0(2.0 * ALPHA * (1 + 1e-4))[1]
    fn, calls = _recording(fn0)
    monkeypatch.setattr(gradient, "_rate_function", lambda c: fn)
    _fitted(case, g)
    first_complex = next(i for i, a in enumerate(calls) if isinstance(a, complex))
    expected = sorted({s * f * ALPHA for f in RATIOS for s in (1.0, -1.0)} | ({summed * ALPHA} if summed else set()))
    assert len(calls[:first_complex]) == len(expected) == 28 + (summed is not None)
    assert sorted(calls[:first_complex]) == pytest.approx(expected, rel=1e-15, abs=0.0)


@pytest.mark.parametrize("side", [1.0, -1.0])
def test_a_start_with_the_variant_undefined_on_one_side_is_dropped(monkeypatch, side):
    """relu: the fit's derivative is a central difference of ``G(a +- h)``, ``h = 1e-6 |a|``. The variant is undefined
    just above (side +1) or just below (side -1) the start 2 alpha -- within the difference's reach, not at the start
    itself, so the start is scored and refined. Its derivative is then undefined: the start is given up (no
    exception escapes the fit), and the planted rate -2 alpha (1 + 1e-4) is found from the other start, -2 alpha.
    The grid is ``(2,)``, so both starts are among the three refined."""
    case = _case("relu", shots=(3, 4))
    start = 2.0 * ALPHA
    undefined = lambda a: 1e-9 <= side * (a / start - 1.0) <= 1e-5  # noqa: E731
    fn0 = _winding(case, undefined=undefined)
    rate, scale = -2.0 * ALPHA * (1 + 1e-4), 1.3
    g = scale * fn0(rate)[1]
    fn, calls = _recording(fn0)
    monkeypatch.setattr(gradient, "_RATE_GRID", (2.0,))
    monkeypatch.setattr(gradient, "_rate_function", lambda c: fn)
    cand = _fitted(case, g)
    assert any(undefined(a) for a in calls)  # the premise: the fit did reach into the undefined interval
    assert start in calls[2:]  # ... from the start 2 alpha, which it went on to refine (after scoring both)
    assert cand is not None and cand.fitted["inner_lr"] == pytest.approx(rate, rel=1e-9, abs=0.0), cand
    assert cand.fitted["scale"] == pytest.approx(scale, rel=1e-9, abs=0.0)


def test_the_three_best_scored_starts_are_refined(monkeypatch):
    """The search's breadth (``_fit_rate``'s docstring: Gauss-Newton from the three best grid points): the starts the
    fit refines (its first complex-step derivative of each is at the start itself) are exactly the three rates of
    the grid whose projection errors ``min_c |g - c G(a)| / |g|``, computed here, are smallest -- no fourth."""
    case = _case(shots=(3, 4))
    fn0 = _winding(case)
    g = 1.7 * fn0(3.0 * ALPHA * (1 + 1e-4))[1]
    fn, calls = _recording(fn0)
    monkeypatch.setattr(gradient, "_rate_function", lambda c: fn)
    cand = _fitted(case, g)
    grid = {s * f * ALPHA for f in RATIOS for s in (1.0, -1.0)}
    errors = sorted((_projection_error(g, fn0(r)[1]), r) for r in grid)
    assert errors[2][0] < errors[3][0]  # the premise: the three best are well defined
    refined = {a.real for a in calls if isinstance(a, complex)} & grid
    assert refined == {r for _, r in errors[:3]}
    assert cand is not None and cand.fitted["inner_lr"] == pytest.approx(3.0 * ALPHA * (1 + 1e-4), rel=1e-9)


@pytest.mark.parametrize("activation, cap, per_step", [("tanh", 40, 1), ("relu", 60, 3)])
def test_a_start_that_does_not_converge_stops_at_the_step_budget(monkeypatch, activation, cap, per_step):
    """The fit's budget (stated here; ``_fit_rate``'s docstring gives no numbers): at most 40 Gauss-Newton steps per
    start with the complex-step derivative (one evaluation at a complex rate per step), 60 with central
    differences (relu: three real evaluations per step, ``G(a)``, ``G(a + h)``, ``G(a - h)``), whose convergence is
    only linear. On the triple-root family (``_flat``: each step leaves 2/3 of the rate's error, and a relu fit's
    difference derivative stalls it within ~2e-7 of the root) neither start, 3 alpha (1e-4 from the planted rate)
    nor -3 alpha, reaches the 1e-15 (or relu's 1e-14) stop within its budget: each costs exactly the budget. Other
    evaluations: the 2 scored starts, each start's end, and the winner's gradient once more."""
    case = _case(activation, shots=(3, 4))
    rate, scale = 3.0 * ALPHA * (1 + 1e-4), 2.5
    fn0 = _flat(case, rate)
    g = scale * fn0(rate)[1]
    fn, calls = _recording(fn0)
    monkeypatch.setattr(gradient, "_RATE_GRID", (3.0,))
    monkeypatch.setattr(gradient, "_rate_function", lambda c: fn)
    cand = _fitted(case, g)
    assert cand is not None and cand.fitted["inner_lr"] == pytest.approx(rate, rel=1e-6, abs=0.0)
    steps = sum(isinstance(a, complex) for a in calls) if per_step == 1 else (len(calls) - 5) / 3
    assert steps == 2 * cap
    assert len(calls) == 2 * cap * per_step + 5


@pytest.mark.parametrize("how", ["non-finite", "raises"])
def test_a_start_whose_derivative_fails_costs_one_evaluation(monkeypatch, how):
    """A start where the complex-step derivative is not finite (as after an overflow) or undefined (raises) is given
    up at once: one evaluation at a complex rate there, not the 40-step budget (re-trying the same rate would give
    the same answer: the fit's state has not moved). The planted rate is found from the other start."""
    case = _case(shots=(3, 4))
    fn0 = _winding(case)
    bad = -2.0 * ALPHA
    calls: list = []

    def fn(a):
        calls.append(a)
        loss, G = fn0(a)
        if isinstance(a, complex) and a.real == bad:
            if how == "raises":
                raise FloatingPointError("undefined derivative")
            G = np.array(G, dtype=complex)
            G[0] = complex(G[0].real, np.inf)
        return loss, G

    rate = 2.0 * ALPHA * (1 + 1e-4)
    g = 1.3 * fn0(rate)[1]
    monkeypatch.setattr(gradient, "_RATE_GRID", (2.0,))
    monkeypatch.setattr(gradient, "_rate_function", lambda c: fn)
    cand = _fitted(case, g)
    assert sum(isinstance(a, complex) and a.real == bad for a in calls) == 1
    assert cand is not None and cand.fitted["inner_lr"] == pytest.approx(rate, rel=1e-9, abs=0.0)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("ratio", [1.5, 5.0])
def test_the_fit_is_the_same_in_any_units_of_the_claim(monkeypatch, activation, ratio):
    """The claim scaled by 2^-40 or 2^40: every quantity of the fit that carries the claim's units (the scale ``c``,
    the residual ``g - c G``, the Jacobian's rate column ``c dG/da`` and its Jacobi norm, each step's scale
    component) scales by exactly that power of two, and the rest (the rate, the Jacobi-scaled Jacobian, each
    step's rate component) is bit for bit the same -- multiplication by 2^k is exact in IEEE arithmetic, and
    nothing here overflows or underflows. So the fitted rate must be bit-identical, the fitted scale exactly 2^k
    times, and the fit must evaluate the variant at the same rates, as often: a stop rule that compares each step
    with the quantity it changes is unit-free. The claim lies 1e-6 off the family, so the fit ends on round-off
    steps, not on exact zeros."""
    case = _case(activation)
    fn0 = _winding(case)
    e = np.random.default_rng(5).normal(size=fn0(ALPHA)[1].size)
    g = fn0(ratio * ALPHA * (1 + 1e-4))[1] + 1e-6 * e / np.linalg.norm(e)
    runs = []
    for k in (0, -40, 40):
        fn, calls = _recording(fn0)
        monkeypatch.setattr(gradient, "_rate_function", lambda c, fn=fn: fn)
        cand = _fitted(case, 2.0 ** k * g)
        assert cand is not None
        runs.append((k, cand.fitted["inner_lr"], cand.fitted["scale"], calls))
    _, rate, scale, calls = runs[0]
    assert rate == pytest.approx(ratio * ALPHA * (1 + 1e-4), rel=1e-5)
    for k, r, c, cl in runs[1:]:
        assert (r, c) == (rate, 2.0 ** k * scale), k
        assert cl == calls, (k, len(cl), len(calls))


def test_a_fitted_rate_is_named_before_a_layer_on_a_variant(monkeypatch):
    """The diagnosis' preference (:class:`verify.auditing.diagnosis.catalogue.Candidate`'s rank: a fitted variant,
    rank 3, before a layer on another variant, rank 4, even a closer one), with the real rate fit: the claim is the
    winding family at a planted rate with its last tensor (``b2``) zeroed, so no ``(a, c)`` gives it exactly; a
    fixed variant (a stub) that differs from the claim only in ``b2`` explains it exactly once ``b2`` is
    disconnected (error 0). The tolerance, 1.5 x the fit's error, admits both and nothing else: the fitted rate is
    named and the exact layer is listed among the other matches."""
    from reference.models import unflatten
    from verify.auditing.diagnosis import diagnose, match_error

    case = _case(shots=(3, 4))
    fn = _winding(case)
    monkeypatch.setattr(gradient, "_rate_function", lambda c: fn)
    g = 1.3 * fn(2.0 * ALPHA * (1 + 1e-4))[1]
    g[-1] = 0.0  # b2 (one entry) zeroed
    fit = _fitted(case, g)
    e_fit = match_error(g, fit.grads)
    assert 1e-3 < e_fit < 0.5, e_fit
    tol = 1.5 * e_fit
    V = g.copy()
    V[-1] = 3.0
    monkeypatch.setattr(gradient, "variants", lambda c: [("first_order", "a stub variant", lambda: (None, V))])
    r = np.random.default_rng(2).normal(size=g.size)
    ref = r - (r @ g) / (g @ g) * g  # the correct gradient, orthogonal to the claim: it and its layers are far
    assert match_error(g, V) > tol and _projection_error(g, V) > tol and _projection_error(g, ref) > tol
    zeroed = V.copy()
    zeroed[-1] = 0.0
    assert match_error(g, zeroed) == 0.0  # the layer on the variant: exact
    d = diagnose(case, None, unflatten(g, case.shapes), missing=[False] * 4, reference_loss=None,
                 reference_grads=unflatten(ref, case.shapes), tol=tol)
    assert d is not None and d.key == "wrong_inner_lr" and d.error == pytest.approx(e_fit, rel=1e-12), d
    assert "a stub variant, and no gradient reached b2 (None or exactly zero)" in d.also, d.also
