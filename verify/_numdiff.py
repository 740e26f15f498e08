"""Directional derivatives ``D_v f(x) = d/dt f(x + t v) |_{t=0}`` with honest error estimates.

Three estimators, one step policy (all steps are in units of ``t``, so the
displacement in ``x`` is ``t * v``):

* ``"complex"`` (Squire & Trapp 1998, Martins et al. 2003):
  ``D = Im f(x + i h v) / h``. No subtraction, so no cancellation: accurate to
  a few ulps with ``h = 2**-100 * s`` (about ``7.9e-31 * s``). Needs ``f``
  analytic and written so complex inputs flow through it.
* ``"central"``: ``D(t) = (f(x + t v) - f(x - t v)) / (2 t)``, truncation
  ``O(t^2)``, ``t = eps**(1/3) * s`` (the step that balances ``t^2`` against
  ``eps / t``).
* ``"richardson"`` (numdifftools' ``Derivative`` with ``method="central"``,
  ``richardson_terms=2``): central differences on steps ``t_k = t_0 2^k``,
  ``t_0 = eps**(1/2.5) * s`` (numdifftools' ``base_step = EPS**(1/scale)``
  with its default ``scale=2.5`` for a first central derivative), at most 14
  steps and never above ``2**-4 * s``; a two-level Romberg table removes the
  ``t^2`` and ``t^4`` terms, ``R_k = (64 D_k - 20 D_{k+1} + D_{k+2}) / 45``;
  the estimate is the ``R_k`` with the smallest error estimate.

Here ``s = log(e + ||x||_inf) / ||v||_inf`` (numdifftools' nominal step
``log(e + |x|)``, per unit of displacement) and every step is rounded to a
power of two, so ``t * v`` is exact and step ratios are exactly 2 (the
directional analogue of numdifftools' ``(x + h) - x``; the rounding left in
``x + t v`` itself is covered by the noise term below).

Error estimates (``Estimate.error``) add three parts:

* truncation: from two or more step sizes. Central: ``|D(2t) - D(t)| / 3``
  (the ``c t^2`` term of ``D(t)``); Richardson: the difference of neighbouring
  extrapolants ``|R_k - R_{k+1}|`` (what numdifftools uses); both are multiplied
  by numdifftools' safety factor 12.706 (the 97.5 % point of Student's t with
  one degree of freedom).
* round-off of ``f``: ``nu`` = the largest change of ``f`` under a few random
  perturbations of ``x`` by one ulp per component (in the working precision),
  plus ``2 eps |f(x)|``. This measures both ``f``'s own rounding noise and the
  effect of the rounding of ``x + t v``; a difference quotient at step ``t``
  carries ``nu / t``, amplified by the Romberg weights.
* a floor of ``8 eps |D|``.

For the complex step, the truncation term ``h^2 |f'''| / 6`` and the round-off
are estimated together from four more quotients: steps ``3h`` and ``5h``, and
step ``h`` at two points moved by one ulp (every rounding inside ``f`` then
changes); the error is 3 times their largest deviation from ``D(h)``, plus a
floor ``8 eps (|D| + T)`` with ``T = |D_{w*v} f(x)|`` for seeded Gaussian
weights ``w`` (``N(0, ||grad f * v||^2)``, so about ``||grad f * v||``): the
size of the terms whose rounding ``D`` carries even when they cancel in
``D = sum_i g_i v_i`` (random signs instead of Gaussian weights cancel two
dominant opposite terms with probability 1/2).

``verify.check_gradient(..., budget="fast")`` uses a two-evaluation complex
step (``_complex_step_fast``: ``D(h)`` and one shifted-point sample, error
``10 |D' - D| + 8 eps (|D| + T)`` with ``T`` from the claimed gradient) and
measures ``nu`` with 2 probes instead of 8 (``Problem(noise_probes=...)``).

The working precision ``eps`` is float64's unless ``f`` returns float32 (or
complex64), in which case it is float32's: steps and noise then follow
float32's epsilon.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from numpy.typing import ArrayLike

from reference.errors import InvalidInputError, NotAnalyticError
from reference.formatting import short
from verify._verdict import record

__all__ = [
    "Estimate",
    "directional_derivative",
    "METHODS",
    "COMPLEX_STEP",
    "CENTRAL_SCALE",
    "RICHARDSON_SCALE",
    "RICHARDSON_NUM_STEPS",
    "SAFETY_FACTOR",
]

#: The estimators ``directional_derivative`` offers.
METHODS: tuple[str, ...] = ("complex", "central", "richardson")
#: Complex step per unit of the nominal step: ``h = 2**-100 * s`` (~7.9e-31 s).
COMPLEX_STEP = 2.0**-100
#: Central difference step ``eps**(1/CENTRAL_SCALE) * s``.
CENTRAL_SCALE = 3.0
#: Smallest Richardson step ``eps**(1/RICHARDSON_SCALE) * s`` (numdifftools' default_scale).
RICHARDSON_SCALE = 2.5
#: Number of Richardson steps (ratio 2), capped so the largest is <= RICHARDSON_MAX_STEP * s.
RICHARDSON_NUM_STEPS = 14
RICHARDSON_MAX_STEP = 2.0**-4
#: numdifftools' factor on difference-based error estimates: t_{0.975} with 1 dof.
SAFETY_FACTOR = 12.7062047361747
#: Random one-ulp perturbations of x used to measure the noise of f.
NOISE_PROBES = 8
#: Multiplier of the measured noise in the round-off part of an error estimate.
NOISE_FACTOR = 4.0
#: Multiplier of the spread of the complex-step noise samples (measured: the true error stayed
#: below 0.5x the spread in 24000 random cases; 3 leaves a margin of 6).
COMPLEX_NOISE_FACTOR = 3.0
#: Multiplier of the single noise sample of the fast complex step (one deviation instead of the
#: largest of four, so a larger margin than COMPLEX_NOISE_FACTOR).
FAST_COMPLEX_NOISE_FACTOR = 10.0
#: Relative floor of every error estimate, in units of eps.
FLOOR_ULPS = 8.0
# Romberg weights of R_k on (D_k, D_{k+1}, D_{k+2}) with t_{k+1} = 2 t_k.
_ROMBERG_W = np.array([64.0, -20.0, 1.0]) / 45.0


@dataclass(frozen=True)
class Estimate:
    """A directional derivative estimate.

    Attributes:
        value: the estimate of ``D_v f(x)`` (NaN when it could not be formed).
        error: an estimate of ``|value - D_v f(x)|`` meant to be an upper bound
            (inf when the estimate could not be formed).
        method: ``"complex"``, ``"central"`` or ``"richardson"``.
        step: the step ``t`` (displacement ``t v``) that produced ``value``;
            for Richardson the smallest step of the chosen Romberg window.
        steps: every step evaluated, in increasing order.
        noise: the measured round-off level ``nu`` of ``f`` near ``x``.
        evaluations: number of calls of ``f``.
        note: why the estimate is missing or degraded, else ``""``.
    """

    value: float
    error: float
    method: str
    step: float
    steps: tuple[float, ...]
    noise: float
    evaluations: int
    note: str = ""

    @property
    def relative_error(self) -> float:
        """``error / |value|`` (inf when value is 0 or NaN)."""
        return self.error / abs(self.value) if self.value and math.isfinite(self.value) else math.inf

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return record(self)


# --------------------------------------------------------------------------------------------
# validation


def _short(value: Any) -> str:
    return short(value, 80)


def as_real_array(name: str, value: Any) -> np.ndarray:
    """A finite real array (any float dtype kept), else InvalidInputError."""
    try:
        arr = np.asarray(value)
    except Exception as exc:  # pragma: no cover - exotic objects
        raise InvalidInputError(f"{name}={_short(value)} could not be converted to an array: {exc}") from exc
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InvalidInputError(
            f"{name}={_short(value)} must be a real numeric array, got dtype {arr.dtype}; "
            "pass float64 values (complex perturbations are made internally)"
        )
    if arr.size == 0:
        raise InvalidInputError(f"{name}={_short(value)} is empty; pass at least one coordinate")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
        raise InvalidInputError(
            f"{name}={_short(value)} has a non-finite entry at index {bad}; derivatives are only "
            "checked at finite points along finite directions"
        )
    return arr


def check_direction(x: np.ndarray, v_in: Any, name: str = "v") -> np.ndarray:
    """``v`` must be finite, nonzero and shaped like ``x``; returns it as float64."""
    v = as_real_array(name, v_in).astype(np.float64)
    if v.shape != x.shape:
        raise InvalidInputError(
            f"{name} has shape {v.shape} but x has shape {x.shape}; pass a direction shaped like x"
        )
    if not np.any(v):
        raise InvalidInputError(f"{name}={_short(v_in)} is the zero vector; a direction must be nonzero")
    return v


def check_step(step: Any) -> float | None:
    """``step`` is None or a positive finite float."""
    if step is None:
        return None
    if isinstance(step, bool) or not isinstance(step, (int, float, np.integer, np.floating)):
        raise InvalidInputError(f"step={_short(step)} must be a positive float or None (automatic)")
    s = float(step)
    if not (math.isfinite(s) and s > 0):
        raise InvalidInputError(f"step={step!r} must be a positive finite float or None (automatic)")
    return s


# --------------------------------------------------------------------------------------------
# evaluation


def _scalar(out: Any, where: str) -> tuple[complex | float, np.dtype]:
    """Convert f's output to a Python scalar; remember its dtype (the working precision)."""
    arr = np.asarray(out)
    if arr.size != 1 or not (np.issubdtype(arr.dtype, np.number) and arr.dtype != bool):
        raise InvalidInputError(
            f"f must return a real scalar, but f({where}) returned {_short(out)} "
            f"(shape {arr.shape}, dtype {arr.dtype}); reduce it to a scalar loss"
        )
    value = arr.reshape(()).item()
    return value, arr.dtype


class Problem:
    """``f`` at a point ``x``: counts evaluations, caches ``f(x)``, measures noise.

    Internal: :func:`verify.check_gradient` shares one Problem across
    directions so ``f(x)`` and the noise probes are paid once.
    """

    def __init__(self, f: Callable[[np.ndarray], Any], x_in: ArrayLike, *, name: str = "x",
                 noise_probes: int = NOISE_PROBES) -> None:
        if not callable(f):
            raise InvalidInputError(f"f={_short(f)} must be callable as f(x) -> scalar")
        x = as_real_array(name, x_in)
        self.f = f
        self.input_dtype = x.dtype
        self.shape = x.shape
        self.x = x.astype(np.float64)
        self.evaluations = 0
        f0, dt = _scalar(self._call(self.x), "x")
        if isinstance(f0, complex) or np.issubdtype(dt, np.complexfloating):
            raise InvalidInputError(
                f"f(x)={f0!r} is complex for real x; f must be a real-valued function (a loss)"
            )
        if not math.isfinite(f0):
            raise InvalidInputError(
                f"f(x)={f0!r} is not finite at the given x; check the point (domain of log/sqrt, overflow)"
            )
        self.f0 = float(f0)
        self.output_dtype = dt if np.issubdtype(dt, np.floating) else np.dtype(np.float64)
        # The working precision: float32 when f computes (returns) in float32.
        self.eps = max(float(np.finfo(self.output_dtype).eps), float(np.finfo(np.float64).eps))
        self._noise: float | None = None
        self.noise_probes = int(noise_probes)

    def _call(self, point: np.ndarray) -> Any:
        self.evaluations += 1
        return self.f(point.reshape(self.shape))

    def real(self, point: np.ndarray) -> float:
        """``f(point)`` as a float (NaN when not finite)."""
        value, _ = _scalar(self._call(point), "x + t v")
        if isinstance(value, complex):
            raise InvalidInputError(f"f returned a complex value {value!r} for a real input; f must be real-valued")
        return float(value)

    def complex(self, point: np.ndarray) -> complex:
        """``f(point)`` for a complex point; NotAnalyticError if f cannot take it."""
        advice = (
            "complex-step differentiation needs f analytic and written so complex inputs flow "
            "through it (no abs, real, comparisons, float(); relu is not analytic); use "
            "method='richardson' instead"
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", np.exceptions.ComplexWarning)
                out = self._call(point)
        except NotAnalyticError:
            raise
        except Exception as exc:  # f works at the real x (checked first): complex input is the problem
            raise NotAnalyticError(f"f does not accept a complex input ({type(exc).__name__}: {exc}); {advice}") from exc
        value, dt = _scalar(out, "x + i h v")
        if not np.issubdtype(dt, np.complexfloating):
            raise NotAnalyticError(
                f"f returned a real {dt} value for the complex input x + i h v, so the imaginary part "
                f"that carries the derivative was dropped; {advice}"
            )
        return complex(value)

    def nominal(self, v: np.ndarray) -> float:
        """``s = log(e + ||x||_inf) / ||v||_inf``: the step per unit of displacement."""
        xmax = float(np.max(np.abs(self.x)))
        return math.log(math.e + xmax) / float(np.max(np.abs(v)))

    @property
    def noise(self) -> float:
        """``nu``: largest |f(x + p) - f(x)| over one-ulp random perturbations p, plus 2 eps |f(x)|.

        ``x + t v`` is rounded to within an ulp of each component, and ``f``
        itself is rounded; both make a difference quotient at step ``t`` wrong
        by about ``nu / t``, which is what this measures (deterministic
        signs, so results are reproducible).
        """
        if self._noise is None:
            rng = np.random.default_rng(0x5EED)
            ulp = self.eps * np.abs(self.x)
            nu = 0.0
            for _ in range(self.noise_probes):
                signs = rng.choice([-1.0, 1.0], size=self.x.shape)
                value = self.real(self.x + signs * ulp)
                if math.isfinite(value):
                    nu = max(nu, abs(value - self.f0))
            self._noise = nu + 2.0 * self.eps * abs(self.f0)
        return self._noise


def _pow2(t: float) -> float:
    """Round a positive step to the nearest power of two (exact ratios, exact t*v)."""
    return float(2.0 ** round(math.log2(t)))


# --------------------------------------------------------------------------------------------
# estimators


def _complex_step(p: Problem, v: np.ndarray, step: float | None) -> Estimate:
    n0 = p.evaluations
    h = step if step is not None else _pow2(COMPLEX_STEP * p.nominal(v))
    base = p.x.astype(np.complex128)

    def quotient(point: np.ndarray, hh: float, direction: np.ndarray = v) -> float:
        return p.complex(point + 1j * hh * direction).imag / hh

    d1 = quotient(base, h)
    # Noise samples: steps 3h and 5h (t*v rounds differently, and D(3h) - D(h) = 8 c h^2
    # bounds the truncation), and the same h at two points moved by one ulp (every
    # operation inside f rounds differently).
    rng = np.random.default_rng(0xC0DE)
    samples = [quotient(base, 3.0 * h), quotient(base, 5.0 * h)]
    for _ in range(2):
        shifted = p.x + rng.choice([-1.0, 1.0], size=p.x.shape) * p.eps * np.abs(p.x)
        samples.append(quotient(shifted.astype(np.complex128), h))
    # Along v with Gaussian weights w: sum_i w_i g_i v_i ~ N(0, ||g * v||^2), the size of the terms
    # whose rounding D carries even when they cancel in D = sum_i g_i v_i. Not random signs: a +-1
    # combination of two dominant terms g_i v_i ~ -g_j v_j cancels whenever s_i = s_j (probability
    # 1/2, and for every direction when the seeded pattern has s_i = s_j), which let the true error
    # exceed the estimate 600-fold; a Gaussian combination is small only with probability
    # P(|N(0, 1)| < delta) ~ 0.8 delta, whatever the terms.
    terms = abs(quotient(base, h, rng.standard_normal(p.x.shape) * v))
    steps = (h, 3.0 * h, 5.0 * h)
    if not all(math.isfinite(d) for d in (d1, terms, *samples)):
        return Estimate(math.nan, math.inf, "complex", h, steps, math.nan, p.evaluations - n0,
                        "f returned a non-finite imaginary part at x + i h v")
    spread = max(abs(d - d1) for d in samples)
    error = COMPLEX_NOISE_FACTOR * spread + FLOOR_ULPS * p.eps * (abs(d1) + terms)
    return Estimate(float(d1), float(error), "complex", h, steps, 0.0, p.evaluations - n0)


def _complex_step_fast(p: Problem, v: np.ndarray, step: float | None, terms: float) -> Estimate:
    """The complex step with two evaluations (``check_gradient(..., budget="fast")``).

    ``D = Im f(x + i h v) / h`` as in :func:`_complex_step`, with one noise
    sample instead of four: the same ``h`` at a point moved by one ulp per
    component (every rounding inside ``f`` changes; the true derivative moves
    by ``O(eps |x| |f_vx|)``, which only enlarges the spread). Error:
    ``FAST_COMPLEX_NOISE_FACTOR * |D' - D| + 8 eps (|D| + T)`` with ``T``
    supplied by the caller (``||g * v||`` of the claimed gradient, in place of
    the extra random-sign evaluation). The ``3h``/``5h`` truncation samples are
    dropped: with ``h = 2**-100 s`` the truncation ``h^2 |f_vvv| / 6`` is below
    the floor unless ``|f_vvv| / |D|`` exceeds ~1e44.
    """
    n0 = p.evaluations
    h = step if step is not None else _pow2(COMPLEX_STEP * p.nominal(v))
    d1 = p.complex(p.x.astype(np.complex128) + 1j * h * v).imag / h
    rng = np.random.default_rng(0xC0DE)
    shifted = p.x + rng.choice([-1.0, 1.0], size=p.x.shape) * p.eps * np.abs(p.x)
    d2 = p.complex(shifted.astype(np.complex128) + 1j * h * v).imag / h
    if not (math.isfinite(d1) and math.isfinite(d2)):
        return Estimate(math.nan, math.inf, "complex", h, (h,), math.nan, p.evaluations - n0,
                        "f returned a non-finite imaginary part at x + i h v")
    error = FAST_COMPLEX_NOISE_FACTOR * abs(d2 - d1) + FLOOR_ULPS * p.eps * (abs(d1) + abs(terms))
    return Estimate(float(d1), float(error), "complex", h, (h,), 0.0, p.evaluations - n0)


def _central_quotients(p: Problem, v: np.ndarray, ts: np.ndarray) -> np.ndarray:
    return np.array([(p.real(p.x + t * v) - p.real(p.x - t * v)) / (2.0 * t) for t in ts])


def _central(p: Problem, v: np.ndarray, step: float | None) -> Estimate:
    n0 = p.evaluations
    t = step if step is not None else _pow2(p.eps ** (1.0 / CENTRAL_SCALE) * p.nominal(v))
    nu = p.noise
    d1, d2 = _central_quotients(p, v, np.array([t, 2.0 * t]))
    if not (math.isfinite(d1) and math.isfinite(d2)):
        return Estimate(math.nan, math.inf, "central", t, (t, 2 * t), nu, p.evaluations - n0,
                        "f is not finite at x +- t v; pass a smaller step")
    trunc = abs(d2 - d1) / 3.0  # D(t) = D + c t^2: D(2t) - D(t) = 3 c t^2
    error = SAFETY_FACTOR * trunc + NOISE_FACTOR * nu / t + FLOOR_ULPS * p.eps * abs(d1)
    return Estimate(float(d1), float(error), "central", t, (t, 2 * t), nu, p.evaluations - n0)


def _richardson(p: Problem, v: np.ndarray, step: float | None) -> Estimate:
    n0 = p.evaluations
    s = p.nominal(v)
    t0 = step if step is not None else _pow2(p.eps ** (1.0 / RICHARDSON_SCALE) * s)
    cap = RICHARDSON_MAX_STEP * s
    num = RICHARDSON_NUM_STEPS if step is not None else min(RICHARDSON_NUM_STEPS, int(math.floor(math.log2(cap / t0))) + 1)
    num = max(num, 4)  # two Romberg values are needed for an error estimate
    ts = t0 * 2.0 ** np.arange(num)
    nu = p.noise
    d = _central_quotients(p, v, ts)
    r1 = (4.0 * d[:-1] - d[1:]) / 3.0  # removes c1 t^2
    r2 = (16.0 * r1[:-1] - r1[1:]) / 15.0  # removes c2 t^4; R_k uses t_k, 2 t_k, 4 t_k
    finite = np.isfinite(r2)
    best_err, best_k = math.inf, -1
    noise_gain = float(np.sum(np.abs(_ROMBERG_W) / (2.0 * np.array([1.0, 2.0, 4.0]))))
    for k in range(len(r2)):
        if not finite[k]:
            continue
        diffs = [abs(r2[k] - r2[j]) for j in (k - 1, k + 1) if 0 <= j < len(r2) and finite[j]]
        if not diffs:
            continue
        err = (SAFETY_FACTOR * max(diffs) + NOISE_FACTOR * 2.0 * noise_gain * nu / ts[k]
               + FLOOR_ULPS * p.eps * abs(r2[k]))
        if err < best_err:
            best_err, best_k = err, k
    steps = tuple(float(t) for t in ts)
    if best_k < 0:
        return Estimate(math.nan, math.inf, "richardson", float(t0), steps, nu, p.evaluations - n0,
                        "f is not finite at enough points x +- t v for a Romberg table; pass a smaller step")
    return Estimate(float(r2[best_k]), float(best_err), "richardson", float(ts[best_k]), steps, nu,
                    p.evaluations - n0)


_ESTIMATORS = {"complex": _complex_step, "central": _central, "richardson": _richardson}


def estimate(p: Problem, v: np.ndarray, method: str, step: float | None, *, fast: bool = False,
             terms: float = 0.0) -> Estimate:
    """Dispatch on ``method`` for an already validated problem and direction.

    ``fast=True`` selects the two-evaluation complex step (:func:`_complex_step_fast`,
    ``terms`` its rounding scale); the real-difference methods have no fast variant.
    """
    if fast and method == "complex":
        return _complex_step_fast(p, v, step, terms)
    return _ESTIMATORS[method](p, v, step)


def check_method(method: Any) -> str:
    if method not in METHODS:
        raise InvalidInputError(
            f"method={method!r} is not a differentiation method; use one of {', '.join(map(repr, METHODS))}"
        )
    return method


def directional_derivative(
    f: Callable[[np.ndarray], Any],
    x: ArrayLike,
    v: ArrayLike,
    *,
    method: str = "complex",
    step: float | None = None,
) -> Estimate:
    """Estimate the directional derivative ``D_v f(x) = <grad f(x), v>`` with an error estimate.

    ``D_v f(x) = d/dt f(x + t v) |_{t=0}``, estimated by the complex step
    ``Im f(x + i h v) / h`` (Squire & Trapp 1998), a central difference, or
    Richardson extrapolation of central differences (numdifftools'
    ``Derivative``). The step policy and error model are in this module's
    docstring (``verify._numdiff``).

    Args:
        f: a real scalar function of an array shaped like ``x``; for
            ``method="complex"`` it must accept complex arrays and be analytic.
        x: the point (finite, real; used in float64).
        v: the direction (finite, nonzero, shaped like ``x``; not normalised).
        method: ``"complex"`` (default), ``"central"`` or ``"richardson"``.
        step: override the automatic step, in units of ``t`` (displacement
            ``t v``): the complex step ``h``, the central step ``t``, or the
            smallest Richardson step ``t_0`` (14 steps ``t_0 2^k`` follow).

    Returns:
        An :class:`Estimate` with ``value``, ``error``, ``method``, ``step``.

    Raises:
        InvalidInputError: non-finite ``x``/``v``, zero ``v``, shape mismatch,
            bad ``method``/``step``, non-scalar or non-finite ``f(x)``.
        NotAnalyticError: ``method="complex"`` and ``f`` rejects complex input
            or returns a real value for it.
    """
    check_method(method)
    step_value = check_step(step)
    vv = check_direction(as_real_array("x", x), v)
    p = Problem(f, x)
    return estimate(p, vv, method, step_value)
