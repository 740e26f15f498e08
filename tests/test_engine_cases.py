"""Smooth test functions with known derivatives, shared by the engine tests (``test_engine_*.py``).

Every case is a seeded random instance of a family (polynomial, exp/sin/tanh
composition, quadratic form ``x^T A x``, Rosenbrock, log-sum-exp, linear),
written once against a small namespace of elementary functions so that the
same code runs in float64 (NumPy, complex-step safe) and in 40-digit mpmath.
The exact directional derivative comes from mpmath's high-precision
differentiation of the mpmath version (``exact_directional``), independent of
the engine; the closed-form float64 gradients are checked against it here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import mpmath as mp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

FAMILIES = ("poly", "expsin", "quad", "rosen", "logsumexp", "lin")


class _NP:
    exp, sin, cos, tanh, log = np.exp, np.sin, np.cos, np.tanh, np.log

    @staticmethod
    def sum(a: Any) -> Any:
        return np.sum(a)


class _MP:
    exp = np.frompyfunc(mp.exp, 1, 1)
    sin = np.frompyfunc(mp.sin, 1, 1)
    cos = np.frompyfunc(mp.cos, 1, 1)
    tanh = np.frompyfunc(mp.tanh, 1, 1)
    log = np.frompyfunc(mp.log, 1, 1)

    @staticmethod
    def sum(a: Any) -> Any:
        return mp.fsum(np.ravel(a))


@dataclass(frozen=True)
class Case:
    """``f(x, xp)`` with ``xp`` either namespace, its float64 gradient, and a point."""

    family: str
    n: int
    seed: int
    x: np.ndarray
    fx: Callable[[np.ndarray, Any], Any]
    gx: Callable[[np.ndarray], np.ndarray]
    gabs: Callable[[np.ndarray], np.ndarray]

    def f(self, x: np.ndarray) -> Any:
        return self.fx(x, _NP)

    def grad(self, x: np.ndarray) -> np.ndarray:
        return self.gx(x)

    def term_scale(self, v: np.ndarray) -> float:
        """``sum_i |v_i| * (sum of |terms| of g_i)``: what rounding in D_v f is relative to."""
        return float(np.sum(np.abs(v) * self.gabs(self.x)))

    def __repr__(self) -> str:  # hypothesis prints this on failure: enough to rebuild it
        return f"make_case({self.family!r}, n={self.n}, seed={self.seed}, scale=...)"


def make_case(family: str, n: int, seed: int, scale: float = 1.0) -> Case:
    """A seeded random instance of ``family`` in ``n`` variables at a random point of size ``scale``."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(n)
    A = rng.standard_normal((n, n))
    B = rng.standard_normal((3, n))
    c = float(rng.standard_normal())
    x = rng.standard_normal(n) * scale

    if family == "poly":
        def fx(x, xp):
            return xp.sum(a * x**3) + c * xp.sum(x**2) + xp.sum(x)

        def gx(x):
            return 3 * a * x**2 + 2 * c * x + 1

        def gabs(x):
            return np.abs(3 * a * x**2) + np.abs(2 * c * x) + 1
    elif family == "expsin":
        def fx(x, xp):
            return xp.sum(xp.exp(xp.sin(a * x))) + xp.tanh(xp.sum(a * x))

        def gx(x):
            return a * np.cos(a * x) * np.exp(np.sin(a * x)) + a * (1 - np.tanh(np.sum(a * x)) ** 2)

        def gabs(x):
            return np.abs(a * np.cos(a * x) * np.exp(np.sin(a * x))) + np.abs(a)
    elif family == "quad":
        def fx(x, xp):
            return xp.sum(x * (A @ x))

        def gx(x):
            return (A + A.T) @ x

        def gabs(x):
            return (np.abs(A) + np.abs(A.T)) @ np.abs(x)
    elif family == "rosen":
        def fx(x, xp):
            return xp.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2) if n > 1 else 0 * x[0]

        def gx(x):
            r = np.zeros_like(x)
            r[:-1] += -400 * x[:-1] * (x[1:] - x[:-1] ** 2) - 2 * (1 - x[:-1])
            r[1:] += 200 * (x[1:] - x[:-1] ** 2)
            return r

        def gabs(x):
            r = np.zeros_like(x)
            r[:-1] += 400 * np.abs(x[:-1]) * (np.abs(x[1:]) + x[:-1] ** 2) + 2 * (1 + np.abs(x[:-1]))
            r[1:] += 200 * (np.abs(x[1:]) + x[:-1] ** 2)
            return r
    elif family == "logsumexp":
        # Shifted by the (real) max of the float64 values: analytic, overflow-safe.
        def fx(x, xp):
            z = B @ x
            m = max(float(np.real(complex(zi))) for zi in z)
            return m + xp.log(xp.sum(xp.exp(z - m)))

        def gx(x):
            z = B @ x
            p = np.exp(z - z.max())
            return B.T @ (p / p.sum())

        def gabs(x):
            z = B @ x
            p = np.exp(z - z.max())
            return np.abs(B.T) @ (p / p.sum())
    elif family == "lin":
        def fx(x, xp):
            return xp.sum(a * x)

        def gx(x):
            return a + 0 * x

        def gabs(x):
            return np.abs(a) + 0 * x
    else:  # pragma: no cover
        raise ValueError(family)
    return Case(family, n, seed, x, fx, gx, gabs)


def exact_directional(case: Case, x: np.ndarray, v: np.ndarray, dps: int = 40) -> float:
    """``d/dt f(x + t v)`` at 0 by mpmath (``dps`` digits) on the mpmath version of ``f``."""
    with mp.workdps(dps):
        xm = np.array([mp.mpf(float(t)) for t in np.ravel(x)], dtype=object)
        vm = np.array([mp.mpf(float(t)) for t in np.ravel(v)], dtype=object)
        d = mp.diff(lambda t: case.fx(xm + t * vm, _MP), 0)
        return float(d)


@st.composite
def cases(draw: Any, families: tuple[str, ...] = FAMILIES, max_n: int = 12) -> Case:
    family = draw(st.sampled_from(families))
    n = draw(st.integers(1, max_n))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([0.01, 0.3, 1.0, 3.0]))
    return make_case(family, n, seed, scale)


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal(n)
    return v / np.linalg.norm(v)


# ---------------------------------------------------------------------------------------------
# The cases themselves must be right: closed-form gradients against mpmath differentiation.


@given(cases(), st.integers(0, 2**32 - 1))
def test_closed_form_gradients_match_mpmath(case: Case, seed: int) -> None:
    v = unit(np.random.default_rng(seed), case.n)
    g = case.grad(case.x)
    exact = exact_directional(case, case.x, v)
    assert np.all(case.gabs(case.x) >= np.abs(g) * (1 - 1e-12))  # the term scale bounds |g_i|
    # the float64 closed form and fsum carry a few ulps of sum |g_i v_i|
    assert abs(math.fsum(g * v) - exact) <= 64 * np.finfo(float).eps * (np.sum(np.abs(g * v)) + abs(exact))


def test_float64_and_mpmath_versions_agree() -> None:
    for family in FAMILIES:
        case = make_case(family, 5, 7)
        with mp.workdps(30):
            xm = np.array([mp.mpf(float(t)) for t in case.x], dtype=object)
            assert float(case.fx(xm, _MP)) == _approx(case.f(case.x))


def _approx(value: float) -> Any:
    import pytest

    return pytest.approx(value, rel=1e-13, abs=1e-13)
