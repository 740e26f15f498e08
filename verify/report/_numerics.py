"""The report's own numerical experiments: Taylor remainders and finite-difference error curves.

Both run on the NumPy reference of one seeded problem per algorithm (the
first problem of the check matrix, :func:`verify.algorithms.build_case` with
the matrix's seed) along one seeded random unit direction ``v``.

* :func:`taylor_data`: the Taylor test (Farrell et al. 2013,
  :func:`verify.taylor_test`) of the meta-loss with no derivative (rate 1),
  the reference meta-gradient (rate 2), and the gradient plus the
  Hessian-vector product (rate 3). ``H v`` is the complex-step derivative of
  the reference gradient, ``Im g(x + i h v) / h`` (exact to rounding for an
  analytic reference), or a central difference of the gradient where the
  reference does not take complex input.
* :func:`fd_curves`: the relative error of central differences, Richardson
  extrapolation and the complex step against step size, measured against the
  exact ``<g, v>`` of the analytic reference gradient (independent of every
  finite difference): the V of truncation (right) against round-off (left)
  for differences, the flat line of the complex step. The steps the engine
  picks by default (:func:`verify.directional_derivative`) are marked.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from reference.errors import MetaverifyError
from reference.models import flatten, unflatten
from verify._numdiff import directional_derivative
from verify._taylor import TaylorResult, taylor_test
from verify._verdict import record
from verify.algorithms import Case, evaluate

__all__ = ["FDCurves", "TaylorData", "direction", "fd_curves", "hessian_vector_product", "taylor_data"]

#: Steps of the difference curves: ``s 2^-k``, k = 0..FD_HALVINGS (down to ~1.4e-17 s); the complex
#: step goes on to ``s 2^-COMPLEX_HALVINGS`` (~4e-34 s: it has no round-off floor to hit).
FD_HALVINGS = 56
COMPLEX_HALVINGS = 110
#: Complex step of the HVP (v is a unit vector; any h below ~1e-8 gives the same digits).
HVP_COMPLEX_STEP = 2.0**-100
#: Floor of plotted relative errors (an error of exactly 0 has no logarithm).
ERROR_FLOOR = 1e-17


def direction(case: Case, seed: int) -> np.ndarray:
    """A seeded random unit direction in the case's flat variable space (a ridge ``lam`` kept positive)."""
    from verify.matrix import taylor_direction

    x0 = flatten(case.variables)
    v = taylor_direction(case, x0, np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x7A9]).standard_normal(x0.size))
    return v / np.linalg.norm(v)


def _loss(case: Case):
    shapes = case.shapes

    def f(x: np.ndarray) -> Any:
        return evaluate(case, variables=[np.asarray(a) for a in unflatten(x, shapes)])[0]

    return f


def _memoized(f):
    """``f`` with a cache keyed on the exact point: the three Taylor tests evaluate the same ``x + h v``."""
    cache: dict[tuple[str, bytes], Any] = {}

    def g(x: np.ndarray) -> Any:
        key = (x.dtype.str, np.ascontiguousarray(x).tobytes())
        if key not in cache:
            cache[key] = f(x)
        return cache[key]

    return g


def _grad(case: Case, x: np.ndarray) -> np.ndarray:
    return flatten([np.asarray(g) for g in evaluate(case, variables=list(unflatten(x, case.shapes)))[1]])


def hessian_vector_product(case: Case, x: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, str]:
    """``H(x) v`` of the reference meta-loss and how it was obtained (``"complex step"`` or ``"central"``)."""
    h = HVP_COMPLEX_STEP
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", np.exceptions.ComplexWarning)
            g = _grad(case, x.astype(np.complex128) + 1j * h * v)
        if np.iscomplexobj(g) and np.all(np.isfinite(g)):
            return np.imag(g) / h, "complex step of the reference gradient"
    except (TypeError, ValueError, ArithmeticError, np.exceptions.ComplexWarning):
        pass  # the reference path is not complex-safe here: fall back to differences of the gradient
    t = np.finfo(np.float64).eps ** (1 / 3) * math.log(math.e + float(np.max(np.abs(x))))
    return (_grad(case, x + t * v) - _grad(case, x - t * v)) / (2 * t), "central difference of the reference gradient"


@dataclass(frozen=True)
class TaylorData:
    """Taylor remainders of one algorithm's meta-loss (orders 0, 1, 2 -> expected rates 1, 2, 3)."""

    algorithm: str
    problem: str
    hvp_method: str
    results: tuple[TaylorResult, TaylorResult, TaylorResult]

    @property
    def status(self) -> str:
        from verify._verdict import combine_statuses

        return combine_statuses([r.status for r in self.results])

    def to_dict(self) -> dict[str, Any]:
        return record(self, ("algorithm", "problem", "hvp", "status", "remainders"), hvp=self.hvp_method,
                      remainders=[{"order": k, **r.to_dict()} for k, r in enumerate(self.results)])


def taylor_data(case: Case, *, seed: int) -> TaylorData:
    """The three Taylor tests of ``case``'s reference meta-loss along :func:`direction`."""
    x = flatten(case.variables).astype(np.float64)
    v = direction(case, seed)
    f = _memoized(_loss(case))
    g = _grad(case, x)
    hv, how = hessian_vector_product(case, x, v)
    r0 = taylor_test(f, x, v)
    r1 = taylor_test(f, x, v, grad=g)
    r2 = taylor_test(f, x, v, grad=g, hvp=hv)
    return TaylorData(case.algorithm, case.describe(), how, (r0, r1, r2))


@dataclass(frozen=True)
class FDCurves:
    """Relative errors of three estimators of ``D_v f(x)`` against the step ``t`` (displacement ``t v``)."""

    algorithm: str
    problem: str
    exact: float
    steps: tuple[float, ...]
    central: tuple[float, ...]
    richardson: tuple[float, ...]  # R(t) uses D(t), D(2t), D(4t); NaN where 4t is off the grid
    complex_steps: tuple[float, ...]
    complex: tuple[float, ...]  # NaN where the reference does not take complex input
    defaults: dict[str, dict[str, float]]  # method -> {"step", "error", "estimated_error"}

    def best(self, method: str) -> tuple[float, float]:
        """``(step, relative error)`` of the most accurate point of a curve."""
        errs = np.asarray(getattr(self, method))
        if not np.isfinite(errs).any():
            return math.nan, math.nan
        k = int(np.nanargmin(errs))
        return (self.complex_steps if method == "complex" else self.steps)[k], float(errs[k])

    def to_dict(self) -> dict[str, Any]:
        return record(self, ("algorithm", "problem", "exact", "best", "defaults"),
                      best={m: dict(zip(("step", "error"), self.best(m))) for m in ("central", "richardson", "complex")})


def fd_curves(case: Case, *, seed: int) -> FDCurves:
    """Finite-difference error against step size for ``case``'s reference meta-loss along :func:`direction`."""
    x = flatten(case.variables).astype(np.float64)
    v = direction(case, seed)
    f = _loss(case)
    exact = float(np.dot(_grad(case, x), v))
    scale = abs(exact) if exact != 0 else max(float(np.linalg.norm(_grad(case, x))), 1e-300)
    s = math.log(math.e + float(np.max(np.abs(x)))) / float(np.max(np.abs(v)))  # the engine's nominal step
    s = float(2.0 ** round(math.log2(s)))  # powers of two: t v exact, ratios exactly 2
    ts = s * 2.0 ** -np.arange(FD_HALVINGS + 1)

    def rel(d: float) -> float:
        return max(abs(d - exact) / scale, ERROR_FLOOR) if math.isfinite(d) else math.nan

    def real(point: np.ndarray) -> float:
        try:
            return float(np.real(f(point)))
        except MetaverifyError:  # e.g. an inner problem without a minimiser that far from x: no point
            return math.nan

    def imag(t: float) -> float:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", np.exceptions.ComplexWarning)
                return float(np.imag(f(x.astype(np.complex128) + 1j * t * v))) / t
        except (TypeError, ValueError, ArithmeticError, MetaverifyError, np.exceptions.ComplexWarning):
            return math.nan  # not complex-safe at this step

    central_d = np.array([(real(x + t * v) - real(x - t * v)) / (2 * t) for t in ts])
    # ts decreases: D(2t) of ts[k] is central_d[k-1], D(4t) is central_d[k-2] (same Romberg weights as the engine)
    rich_d = np.full(ts.size, math.nan)
    rich_d[2:] = (64.0 * central_d[2:] - 20.0 * central_d[1:-1] + central_d[:-2]) / 45.0
    cts = s * 2.0 ** -np.arange(0, COMPLEX_HALVINGS + 1, 2)
    cplx = [imag(t) for t in cts]
    defaults = {}
    for method in ("central", "richardson", "complex"):
        try:
            est = directional_derivative(f, x, v, method=method)
        except MetaverifyError:  # NotAnalyticError for the complex step: no default to mark
            continue
        defaults[method] = {"step": est.step, "error": rel(est.value),
                            "estimated_error": est.error / scale if math.isfinite(est.error) else math.inf}
    return FDCurves(case.algorithm, case.describe(), exact, tuple(map(float, ts)),
                    tuple(rel(d) for d in central_d), tuple(rel(d) for d in rich_d), tuple(map(float, cts)),
                    tuple(rel(d) for d in cplx), defaults)
