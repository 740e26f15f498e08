"""``check_gradient``: a claimed gradient against directional derivatives in random directions.

For ``directions`` seeded random unit vectors ``v`` the claimed ``<g, v>`` is
compared with an estimate ``D`` of ``D_v f(x)`` (complex step when ``f``
accepts complex input, else Richardson extrapolation; :mod:`verify._numdiff`).
Per direction, with ``S = max(||g|| ||v||, |D|)``:

* **pass** when ``|<g, v> - D| <= rtol * S + err(D)``, ``rtol`` from the
  tolerance table (kind ``"gradient"``, the row of the least precise dtype
  among ``x``, ``g`` and ``f(x)``) and ``err(D)`` the estimate's own error;
* **fail** when the difference exceeds that;
* **inconclusive** when ``f`` has a kink at ``x`` along ``v`` (the one-sided
  slopes ``(f(x + t v) - f(x)) / t`` and ``(f(x) - f(x - t v)) / t`` differ by
  a jump that does not shrink with ``t``; a claimed ``<g, v>`` outside the
  one-sided slopes is still a fail), or when the estimate is too uncertain to
  confirm anything (``err(D) > sqrt(rtol) * scale``).

Relative means relative to ``||g|| ||v||``: a random direction nearly
orthogonal to ``g`` has ``<g, v> ~ 0``, and dividing by it would turn
round-off into a false alarm. With ``n`` parameters a relative gradient error
``delta`` (``||g_claimed - g|| = delta ||g||``) shows up in a random unit
direction as about ``delta / sqrt(n)``; 8 directions make missing it unlikely.

In automatic mode a complex-step failure is cross-examined by Richardson
extrapolation; if the two estimates disagree beyond their error bounds, ``f``
is not complex-analytic (it uses ``conj``, ``abs``, comparisons) and the whole
check is redone with Richardson (central differences in the fast budget).

Budgets (``budget=``): ``"thorough"`` (the default, above) and ``"fast"``,
whose first direction is ``(g/||g|| + r) / ||g/||g|| + r||`` (``r`` seeded
random, signed so that ``<r, g> >= 0``): an error ``e`` of the claimed
gradient shows up there as ``(<e, g>/||g|| + <e, r>) / ||g/||g|| + r||``, so
the part of ``e`` along ``g`` (a scaled tensor, a dropped second-order term)
is seen at full size and the rest as ``~||e|| / sqrt(2 n)``. Its estimators
are cheaper (complex step with one noise sample; central differences), with
2 noise probes instead of 8; the verdict rules are the same. Cost: ``f(x)``,
2 complex and 6 real evaluations (kink probe and noise), whatever ``n`` is.
What that costs and catches in practice is measured in ``docs/benchmarks.md``
(benchmark figures live there, not in docstrings, so they can be rerun and
updated in one place).

Length: a little over 500 lines: ``check_gradient`` and its fast budget share
the directions, the estimates, the kink probe and the verdict code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from reference.errors import InvalidInputError, NotAnalyticError
from reference.formatting import number
from verify._numdiff import (
    NOISE_FACTOR,
    NOISE_PROBES,
    RICHARDSON_SCALE,
    Estimate,
    Problem,
    _pow2,
    as_real_array,
    check_method,
    estimate,
)
from verify._verdict import FAIL, INCONCLUSIVE, PASS, Verdict, combine_statuses
from verify.tolerance import precision_dtype, tolerance

__all__ = ["check_gradient", "BUDGETS"]

#: Ratio between the two kink-probe steps.
_KINK_RATIO = 8.0
#: Growth of the apparent jump from (t_b, 8 t_b) to (8 t_b, 64 t_b) above which it is smooth f's
#: t^3 remainder (grows 8^3 = 512x), not a kink (stays constant): the geometric middle is ~22.
_KINK_GROWTH = 8.0
#: The ``budget`` values of :func:`check_gradient`.
BUDGETS: tuple[str, ...] = ("thorough", "fast")
#: One-ulp noise probes of ``f`` in the fast budget (8 in the thorough one). The noise level only
#: sets the kink probe's threshold and the real-difference error bounds; a low draw can make a
#: smooth f look kinked, which gives "inconclusive" (the slack around the one-sided slopes, noise
#: and curvature included, contains the smooth derivative), not "fail".
FAST_NOISE_PROBES = 2


@dataclass(frozen=True)
class _Kink:
    detected: bool
    forward: float
    backward: float
    jump: float
    margin: float


def _kink_probe(p: Problem, v: np.ndarray, threshold: float) -> _Kink:
    """One-sided slopes at ``t_b`` and ``8 t_b`` (``t_b`` = the smallest Richardson step).

    ``J(t) = (f(x+tv) - 2 f(x) + f(x-tv)) / t`` is forward minus backward
    slope. Smooth ``f``: ``J(t) = t f_vv + O(t^3)``. A kink at ``x`` adds a
    constant jump ``c``; ``c = (J(t_b) - J(8 t_b) / 8) / (1 - 1/8)`` removes the
    ``t f_vv`` part. A kink is reported when both ``|J(t_b)|`` and ``|c|`` stand
    above the noise and the gradient threshold, and ``|J(8 t_b)| >= |J(t_b)| / 2``
    (a jump persists; round-off, ``~ nu / t``, does not), and the same estimate
    one scale up, from ``8 t_b`` and ``64 t_b``, is not more than 8 times larger
    (a jump is constant; the ``O(t^3)`` remainder of smooth ``f`` grows 512x).
    """
    tb = _pow2(p.eps ** (1.0 / RICHARDSON_SCALE) * p.nominal(v))
    ta = _KINK_RATIO * tb
    fpb, fmb = p.real(p.x + tb * v), p.real(p.x - tb * v)
    fpa, fma = p.real(p.x + ta * v), p.real(p.x - ta * v)
    if not all(math.isfinite(y) for y in (fpb, fmb, fpa, fma)):
        return _Kink(False, math.nan, math.nan, math.nan, math.inf)
    forward, backward = (fpb - p.f0) / tb, (p.f0 - fmb) / tb
    jb = forward - backward
    ja = (fpa - p.f0) / ta - (p.f0 - fma) / ta
    jump = (jb - ja / _KINK_RATIO) / (1.0 - 1.0 / _KINK_RATIO)
    noise = NOISE_FACTOR * 4.0 * p.noise / tb
    curvature = abs(ja) / _KINK_RATIO  # ~ t_b |f_vv|: how far a smooth one-sided slope is from D
    level = noise + threshold
    # A kink's jump persists at the larger step (|J(8 t_b)| ~ |J(t_b)|, more with curvature);
    # round-off in J shrinks like 1/t, so noise that slipped past `level` rarely also passes this.
    persists = abs(ja) >= 0.5 * abs(jb)
    detected = abs(jb) > level and abs(jump) > level and persists
    if detected:
        # Confirmation at the next scale, (8 t_b, 64 t_b): a kink's jump is the same constant there,
        # while what smooth f leaves in `jump` is its t^3 term (-6 t_b^3 f_vvvv), 512x larger. Along
        # steep directions (the fast budget's first direction follows g) that term can stand above
        # the noise at t_b; two more evaluations, only when a kink is suspected, tell them apart.
        tc = _KINK_RATIO * ta
        fpc, fmc = p.real(p.x + tc * v), p.real(p.x - tc * v)
        if math.isfinite(fpc) and math.isfinite(fmc):
            jc = (fpc - p.f0) / tc - (p.f0 - fmc) / tc
            jump_next = (ja - jc / _KINK_RATIO) / (1.0 - 1.0 / _KINK_RATIO)
            if abs(jump_next) > _KINK_GROWTH * abs(jump):
                detected = False
    return _Kink(detected, forward, backward, jump, noise + curvature)


def _fmt(x: float) -> str:
    return number(x)


def _judge(
    p: Problem,
    v: np.ndarray,
    k: int,
    claimed: float,
    gnorm: float,
    est: Estimate,
    rtol: float,
    fscale: float,
    probe_kinks: bool = True,
) -> dict[str, Any]:
    """The verdict of one direction, as a details record (``probe_kinks=False``: no kink probe)."""
    rec: dict[str, Any] = {
        "direction": k,
        "claimed": claimed,
        "estimate": est.value,
        "estimate_error": est.error,
        "method": est.method,
        "step": est.step,
    }
    if not math.isfinite(est.value):
        rec.update(status=INCONCLUSIVE, error=math.nan, tolerance=math.nan, kink=False,
                   why=f"the {est.method} estimate could not be formed ({est.note})")
        return rec
    scale = max(gnorm, abs(est.value))
    if not (math.isfinite(scale) and math.isfinite(claimed) and math.isfinite(est.error)):
        # Near float64's overflow threshold (~1.8e308) the sums in <g,v>, ||g|| or the estimate's error
        # bound overflow: there is no finite tolerance to judge with, so no verdict but "inconclusive".
        rec.update(status=INCONCLUSIVE, error=math.nan, tolerance=math.nan, kink=False,
                   why=(f"direction {k}: <g,v>={_fmt(claimed)}, ||g||={gnorm:.3g}, estimate {_fmt(est.value)} +- "
                        f"{est.error:.1e} reach float64's overflow threshold; scale f (and its gradient) down, "
                        "e.g. divide it by a constant, and check again"))
        return rec
    diff = abs(claimed - est.value)
    tol_abs = rtol * scale + est.error
    # Relative quantities formed by dividing first, so that they stay finite whenever the inputs are.
    rel = (abs(claimed / scale - est.value / scale) if scale > 0 else (0.0 if diff == 0 else math.inf))
    # scale 0 means g = 0 and D = 0, so diff = 0: the table tolerance stands as the (finite) relative one
    tol_rel = (rtol + est.error / scale) if scale > 0 else rtol
    rec.update(error=rel, tolerance=tol_rel, difference=diff)
    kink = (_kink_probe(p, v, rtol * scale) if probe_kinks
            else _Kink(False, math.nan, math.nan, math.nan, math.inf))
    rec.update(kink=kink.detected, forward=kink.forward, backward=kink.backward)
    if kink.detected:
        lo, hi = min(kink.forward, kink.backward), max(kink.forward, kink.backward)
        slack = tol_abs + kink.margin
        if claimed < lo - slack or claimed > hi + slack:
            rec.update(status=FAIL, why=(
                f"f has a kink at x along direction {k} (one-sided slopes: forward {_fmt(kink.forward)}, "
                f"backward {_fmt(kink.backward)}) and <g,v>={_fmt(claimed)} lies outside them, so no "
                "choice of (sub)gradient explains it"))
        else:
            rec.update(status=INCONCLUSIVE, why=(
                f"f has a kink at x along direction {k}: the one-sided slopes differ (forward "
                f"{_fmt(kink.forward)}, backward {_fmt(kink.backward)}, jump {_fmt(kink.jump)}), so f is not "
                f"differentiable there; <g,v>={_fmt(claimed)} lies between them. Check at a point away "
                "from the kink"))
        return rec
    if diff > tol_abs:
        rec.update(status=FAIL, why=(
            f"gradient mismatch in direction {k}: <g,v>={_fmt(claimed)} but the {est.method} estimate is "
            f"{_fmt(est.value)} +- {est.error:.1e}; |difference|/(||g|| ||v||)={rel:.2e} > tol {tol_rel:.2e}"))
        return rec
    resolution = math.sqrt(rtol) * max(scale, fscale)
    if est.error > resolution:
        rec.update(status=INCONCLUSIVE, why=(
            f"the {est.method} estimate in direction {k} is too uncertain to confirm the gradient "
            f"(error {est.error:.1e}, more than sqrt(tol) of the gradient scale {max(scale, fscale):.2e}); "
            "f may not be smooth at the finite-difference scale"))
        return rec
    rec.update(status=PASS, why="")
    return rec


#: Above this many parameters ``<g, v>`` is summed pairwise instead of exactly (``math.fsum`` costs
#: ~90 ns per entry: more than a NumPy meta-gradient at 1M parameters).
_EXACT_DOT_MAX = 1 << 16


def _magnitude(out: Any) -> float:
    """``|f(x)|`` of a scalar output, 0 for anything else (its error is reported by the engine)."""
    try:
        arr = np.asarray(out)
        if arr.size != 1 or not np.issubdtype(arr.dtype, np.number):
            return 0.0
        return float(abs(arr.reshape(()).item()))
    except Exception:
        return 0.0


def _norm(a: np.ndarray) -> float:
    """``||a||_2`` scaled by ``max |a_i|`` first, so that it is finite whenever it is representable
    (``np.linalg.norm`` squares the entries and overflows from ``|a_i| ~ 1e154``)."""
    m = float(np.max(np.abs(a), initial=0.0))
    if m == 0.0 or not math.isfinite(m):
        return m
    with np.errstate(over="ignore"):
        return float(m * np.linalg.norm(a / m))


def _dot(g: np.ndarray, v: np.ndarray) -> float:
    """``<g, v>``: exact (``math.fsum``) for small ``n``; else NumPy's pairwise sum, whose error
    ``<= ~(log2(n) + 1) eps sum |g_i v_i| <= ~21 eps ||g|| ||v||`` at 1M entries is ~1e4 times below
    the float64 tolerance ``eps^(2/3) ||g|| ||v||``."""
    with np.errstate(over="ignore"):
        prod = g * v
        try:
            return math.fsum(prod) if prod.size <= _EXACT_DOT_MAX else float(np.sum(prod))
        except OverflowError:  # fsum's intermediate sum left float64's range
            return math.inf


def _fast_directions(rng: np.random.Generator, count: int, g: np.ndarray, gnorm: float) -> np.ndarray:
    """Unit directions for ``budget="fast"``: the first is ``(g/||g|| + r) / ||g/||g|| + r||``.

    ``r`` is a seeded random unit vector with its sign chosen so that
    ``<r, g> >= 0`` (then ``||g/||g|| + r|| >= sqrt(2)``, never a cancellation).
    Along ``g/||g||`` an error ``e`` of the claimed gradient shows up as
    ``<e, g> / ||g||``, which keeps every part of ``e`` correlated with ``g``
    (a scaled tensor, a dropped term of the same sign) at full size instead of
    the ``~||e|| / sqrt(n)`` a random direction sees; the random half keeps
    errors orthogonal to ``g`` visible (as ``~||e|| / sqrt(2 n)``). The other
    directions are random unit vectors, as in the thorough check.
    """
    dirs = rng.standard_normal((count, g.size))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    if gnorm > 0 and math.isfinite(gnorm):
        ghat = g / gnorm
        r = dirs[0] if float(np.dot(dirs[0], ghat)) >= 0 else -dirs[0]
        v = ghat + r
        dirs[0] = v / np.linalg.norm(v)
    return dirs


def check_gradient(
    f: Callable[[np.ndarray], Any],
    grad: ArrayLike | Callable[[np.ndarray], ArrayLike],
    x: ArrayLike,
    *,
    directions: int | None = None,
    seed: int = 0,
    rtol: float | None = None,
    method: str | None = None,
    budget: str = "thorough",
    scale_floor: float = 0.0,
) -> Verdict:
    """Check a claimed gradient of ``f`` at ``x`` against directional derivatives.

    In each of ``directions`` seeded unit directions ``v`` the claimed
    ``<g, v>`` must match an estimate ``D`` of ``D_v f(x)`` (complex step,
    Squire & Trapp 1998, when ``f`` takes complex input; Richardson
    extrapolation otherwise) within ``rtol * max(||g|| ||v||, |D|) + err(D)``.
    See :mod:`verify._check` for the kink and uncertainty rules that give
    ``"inconclusive"``.

    Two budgets (the verdict rules are the same; only the evidence differs):

    * ``"thorough"`` (default): 8 random directions; per direction the complex
      step with four noise samples (6 complex evaluations) or Richardson
      extrapolation (up to 28 real evaluations), plus the kink probe (4 real
      evaluations); 8 noise probes (its cost in meta-gradients: ``docs/benchmarks.md``).
    * ``"fast"``: one direction, ``v = (g/||g|| + r) / ||g/||g|| + r||`` with
      ``r`` seeded random (see :func:`_fast_directions`); the complex step with
      one noise sample (2 complex evaluations) or, when ``f`` rejects complex
      input, a central difference at steps ``t, 2t`` (4 real evaluations); the
      kink probe (4 real) and 2 noise probes. With ``f(x)``: 7 real + 2
      complex evaluations, flat in the parameter count (measured:
      ``docs/benchmarks.md``). Along ``g/||g||`` an
      error correlated with ``g`` is seen at full size: a 1e-8 error of one
      tensor is caught in float64; an error orthogonal to ``g`` is seen only
      through the random half, as ``~||e|| / sqrt(2 n)``.

    Args:
        f: real scalar function of an array shaped like ``x``.
        grad: the claimed gradient at ``x`` (array shaped like ``x``), or a
            callable ``grad(x)`` returning it.
        x: the point (finite, real). A float32 ``x`` or ``g`` (or an ``f``
            returning float32) selects float32's tolerance row.
        directions: number of directions (>= 1); default 8 (``"thorough"``)
            or 1 (``"fast"``; further directions are random).
        seed: seed of the directions (the check is deterministic).
        rtol: override of the table tolerance ``tolerance(dtype, "gradient")``.
        method: ``None`` (automatic: complex step if ``f`` accepts complex,
            else Richardson (``"thorough"``) or central differences
            (``"fast"``)), or force ``"complex"``, ``"richardson"``,
            ``"central"``.
        budget: ``"thorough"`` or ``"fast"`` (above).
        scale_floor: a floor under ``||g||`` in the scale ``S`` (default 0):
            the absolute gradient size below which a claimed gradient cannot be
            resolved in its dtype, e.g. float32's rounding of an O(1) loss
            (:func:`verify.matrix.rounding_floor`). Errors are then measured
            against ``max(||g||, scale_floor) ||v||``, as a tiny gradient of a
            loss near a stationary value carries rounding of the loss's size.

    Returns:
        A :class:`Verdict` (``check="gradient"``) whose ``error`` and
        ``tolerance`` are those of the deciding direction (worst ratio) and whose
        ``details`` hold one record per direction.

    Raises:
        InvalidInputError: bad ``x``, ``grad`` shape, ``directions``, ``rtol``,
            ``method``, ``budget``, ``scale_floor``; ``f(x)`` not a finite real
            scalar.
        NotAnalyticError: ``method="complex"`` forced on an ``f`` that rejects
            complex input.
    """
    return _check_gradient(f, grad, x, directions=directions, seed=seed, rtol=rtol, method=method, budget=budget,
                           scale_floor=scale_floor)


def _check_gradient(
    f: Callable[[np.ndarray], Any],
    grad: ArrayLike | Callable[[np.ndarray], ArrayLike],
    x: ArrayLike,
    *,
    directions: int | None = None,
    seed: int = 0,
    rtol: float | None = None,
    method: str | None = None,
    budget: str = "thorough",
    scale_floor: float = 0.0,
    probe_kinks: bool = True,
    noise_probes: int | None = None,
) -> Verdict:
    """:func:`check_gradient`, plus two economies for callers that only act on "pass".

    ``probe_kinks=False`` (4 real evaluations fewer per direction): a kink of ``f`` along ``v``
    goes unreported and the estimate is judged as if ``f`` were smooth there. ``noise_probes=0``
    (2 fewer in the fast budget): the real-difference error bounds lose their measured round-off
    term (``2 eps |f(x)|`` stays), so they shrink and "pass" becomes stricter, never looser.
    For callers that already hold independent evidence for the gradient and run the full check
    on anything but "pass": the audit, confirming that the returned loss of a gradient that
    matched the reference is the function that was differentiated.
    """
    if budget not in BUDGETS:
        raise InvalidInputError(
            f"budget={budget!r} must be one of {', '.join(map(repr, BUDGETS))}: 'thorough' (8 random directions, "
            "the default) or 'fast' (one direction along the claimed gradient plus a random one)")
    fast = budget == "fast"
    if directions is None:
        directions = 1 if fast else 8
    if isinstance(directions, bool) or not isinstance(directions, (int, np.integer)) or directions < 1:
        raise InvalidInputError(f"directions={directions!r} must be an integer >= 1 (8 is a good default)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InvalidInputError(f"seed={seed!r} must be an integer")
    if method is not None:
        check_method(method)
    if rtol is not None:
        if isinstance(rtol, bool) or not isinstance(rtol, (int, float, np.floating)) or not (
            math.isfinite(float(rtol)) and 0 < float(rtol) < 1
        ):
            raise InvalidInputError(f"rtol={rtol!r} must be a float in (0, 1), or None for the table value")
    if isinstance(scale_floor, bool) or not isinstance(scale_floor, (int, float, np.floating)) or not (
        math.isfinite(float(scale_floor)) and float(scale_floor) >= 0
    ):
        raise InvalidInputError(f"scale_floor={scale_floor!r} must be a finite float >= 0 (0: no floor)")
    x_arr = as_real_array("x", x)
    g_in = grad(x_arr.copy()) if callable(grad) else grad
    try:
        g_arr = np.asarray(g_in)
    except Exception as exc:  # pragma: no cover - exotic objects
        raise InvalidInputError(f"grad could not be converted to an array: {exc}") from exc
    if g_arr.dtype == bool or not (np.issubdtype(g_arr.dtype, np.integer) or np.issubdtype(g_arr.dtype, np.floating)):
        raise InvalidInputError(f"grad must be a real numeric array, got dtype {g_arr.dtype}")
    if g_arr.shape != x_arr.shape:
        raise InvalidInputError(
            f"grad has shape {g_arr.shape} but x has shape {x_arr.shape}; the gradient must be shaped like x"
        )
    if noise_probes is None:
        noise_probes = FAST_NOISE_PROBES if fast else NOISE_PROBES
    # Scale before any norm or difference: values near float64's overflow threshold (|f| or |g_i| above
    # 2^64, e.g. 1e155 * sin) are divided by a power of two, exact in binary floating point, so that
    # ||g||, <g,v>, the difference quotients and Richardson's combinations stay finite; every error and
    # tolerance is relative, so the verdict is that of the unscaled problem.
    g_max = float(np.max(np.abs(g_arr), initial=0.0)) if np.all(np.isfinite(g_arr)) else 0.0
    scaling: dict[str, float] = {}

    def f_scaled(y: np.ndarray) -> Any:
        out = f(y)
        if "inv" not in scaling:
            big = max(g_max, _magnitude(out))
            scaling["inv"] = math.ldexp(1.0, -(math.frexp(big)[1] - 64)) if math.isfinite(big) and big > 2.0**64 \
                else 1.0
        return out if scaling["inv"] == 1.0 else out * scaling["inv"]

    p = Problem(f_scaled, x_arr, noise_probes=noise_probes)
    inv = scaling.get("inv", 1.0)
    dtype = precision_dtype(x_arr.dtype, g_arr.dtype, p.output_dtype)
    tol = float(rtol) if rtol is not None else tolerance(dtype, "gradient")
    if not np.all(np.isfinite(g_arr)):
        bad = [tuple(int(i) for i in idx) for idx in np.argwhere(~np.isfinite(g_arr))[:5]]
        return Verdict(FAIL, "gradient", math.inf, tol,
                       f"the claimed gradient has non-finite entries at {bad}", dtype.name, "", ())

    g = g_arr.astype(np.float64).reshape(-1) * inv
    gnorm = _norm(g)
    n = g.size
    rng = np.random.default_rng(seed)
    if fast:
        dirs = _fast_directions(rng, directions, g, gnorm)
    else:
        dirs = rng.standard_normal((directions, n))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    # A derivative scale for deciding "too uncertain" at a stationary point (g = 0):
    # f varies by about |f| over a distance ~ max(1, ||x||).
    fscale = abs(p.f0) / max(1.0, float(np.max(np.abs(p.x))))
    real_method = "central" if fast else "richardson"

    def est_at(k: int, mth: str) -> Estimate:
        # fast: ||g * v|| of the claimed gradient stands in for the rounding scale T of the complex
        # step (it only enters the 8 eps floor, far below rtol * ||g|| ||v||).
        terms = _norm(g * dirs[k]) if fast else 0.0
        return estimate(p, dirs[k].reshape(p.shape), mth, None, fast=fast, terms=terms)

    note = ""
    chosen = method
    first: Estimate | None = None
    if chosen is None:
        try:
            first = est_at(0, "complex")  # also the estimate of direction 0 (deterministic, reused)
            chosen = "complex"
        except NotAnalyticError as exc:
            chosen = real_method
            note = f" (complex step unavailable: {str(exc).split(';')[0]})"

    def run(mth: str) -> list[dict[str, Any]] | None:
        records = []
        for k in range(directions):
            v = dirs[k].reshape(p.shape)
            claimed = _dot(g, dirs[k])
            est = first if (k == 0 and first is not None and mth == "complex") else est_at(k, mth)
            # the floor enters the scale S = max(||g||, floor, |D|) (||v|| = 1)
            rec = _judge(p, v, k, claimed, max(gnorm, float(scale_floor)), est, tol, fscale, probe_kinks)
            if rec["status"] == FAIL and mth == "complex" and method is None and not rec["kink"]:
                cross = estimate(p, v, "richardson", None)
                if abs(cross.value - est.value) > cross.error + est.error:
                    return None  # complex step untrustworthy: f is not complex-analytic
            records.append(rec)
        return records

    records = run(chosen)
    if records is None:
        note = (" (complex step disagreed with Richardson extrapolation beyond both error bounds, so f is "
                f"not complex-analytic; checked with {real_method})")
        chosen = real_method
        records = run(chosen)
    assert records is not None

    status = combine_statuses([r["status"] for r in records])
    deciding = [r for r in records if r["status"] == status]

    def badness(r: dict[str, Any]) -> float:
        e, t = r.get("error", math.nan), r.get("tolerance", math.nan)
        return e / t if (math.isfinite(e) and t > 0) else math.inf

    worst = max(deciding, key=badness)
    n_status = len(deciding)
    where = (f"{directions} direction{'s' if directions > 1 else ''} (budget='fast': the first along the claimed "
             "gradient plus a random one)" if fast else
             f"{directions} random direction{'s' if directions > 1 else ''}")
    if status == PASS:
        worst_all = max(records, key=badness)
        reason = (
            f"gradient matches {chosen} directional derivatives in {where}: worst "
            f"|<g,v> - D_v f|/(||g|| ||v||) = {worst_all['error']:.2e} <= tol {worst_all['tolerance']:.2e} "
            f"({dtype.name}){note}"
        )
        worst = worst_all
    else:
        reason = f"{worst['why']} [{n_status} of {directions} directions {status}; {dtype.name}]{note}"
    if scale_floor > gnorm:
        reason += (f"; errors measured against the rounding floor scale_floor={float(scale_floor):.3g} "
                   f"(> ||g|| = {gnorm:.3g}) instead of ||g||")
    if inv != 1.0:
        reason += (f"; f and g were divided by 2^{-math.frexp(inv)[1] + 1} (exact) to keep norms and "
                   "differences far from overflow; errors are relative, so the verdict is unchanged")
    error = worst.get("error", math.nan)
    if status == PASS and not (math.isfinite(float(error)) and math.isfinite(float(worst.get("tolerance", tol)))):
        status = INCONCLUSIVE  # never a pass on a non-finite error or tolerance
        reason = f"no finite error or tolerance could be formed ({reason})"
    return Verdict(status, "gradient", float(error), float(worst.get("tolerance", tol)), reason, dtype.name,
                   chosen, tuple(records))
