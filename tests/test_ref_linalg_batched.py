"""reference/linalg.py's ``SPDFactors`` (a stack of SPD systems) against independent linear algebra.

The contract (issue 18): each system of the stack is solved as SciPy's Cholesky solve
``cho_solve`` would solve it alone (real matrix, complex right-hand side, complex-step matrix whose
derivative is the closed form ``-A^{-1} dA A^{-1} b``); the condition estimates are LAPACK's
1-norm estimates, within NumPy's exact ``cond(A, 1)``; and the decisions are ``SPDFactor``'s, matrix
by matrix: the same ``MAX_COND`` threshold to the last float, the same error message, for the
first refused matrix of the stack. Sizes: R2-D2's dual systems (a few shots) and a larger one.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.linalg

from reference.errors import SingularMatrixError
from reference.linalg import MAX_COND, SPDFactor, SPDFactors

SIZES = (5, 67)


def _spd(n: int, eigs, seed: int) -> np.ndarray:
    """``Q diag(eigs) Q^T`` with a random orthogonal ``Q``: an SPD matrix with known spectrum."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = Q @ np.diag(np.asarray(eigs, dtype=float)) @ Q.T
    return (A + A.T) / 2


def _stack(m: int, seed: int = 0) -> np.ndarray:
    return np.stack([_spd(m, np.geomspace(1.0, 10.0 ** (t + 1), m), seed + t) for t in range(3)])


def _cho(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    return scipy.linalg.cho_solve(scipy.linalg.cho_factor(A), B)


@pytest.mark.parametrize("m", SIZES)
def test_solves_each_system_like_cholesky_and_estimates_cond(m: int) -> None:
    A = _stack(m)
    rng = np.random.default_rng(1)
    B = rng.standard_normal((3, m, 2))
    f = SPDFactors(A, what=[f"A{t}" for t in range(3)])
    X = f.solve(B)
    assert X.shape == (3, m, 2) and X.dtype == np.float64
    for t in range(3):
        np.testing.assert_allclose(X[t], _cho(A[t], B[t]), rtol=1e-12, atol=1e-13)
        kappa1 = np.linalg.cond(A[t], 1)
        assert kappa1 / 3 <= f.cond[t] <= kappa1 * (1 + 1e-10), (t, f.cond[t], kappa1)
    # Complex right-hand sides with real matrices (complex step through B only): real and imaginary parts.
    Bc = B + 1j * rng.standard_normal(B.shape)
    Xc = f.solve(Bc)
    assert np.iscomplexobj(Xc)
    for t in range(3):
        np.testing.assert_allclose(Xc[t].real, _cho(A[t], Bc[t].real), rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(Xc[t].imag, _cho(A[t], Bc[t].imag), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("m", SIZES)
def test_complex_step_matrix_solve_has_the_closed_form_derivative(m: int) -> None:
    # Im solve(A + i h dA, b) / h = -A^{-1} dA A^{-1} b, system by system; the estimates are the real parts'.
    A = _stack(m, seed=10)
    rng = np.random.default_rng(11)
    dA = rng.standard_normal(A.shape)
    dA = dA + dA.transpose(0, 2, 1)
    b = rng.standard_normal((3, m, 1))
    h = 1e-20
    f = SPDFactors(A + 1j * h * dA, what=["A"] * 3)
    x = f.solve(b.astype(complex))
    for t in range(3):
        expect = -_cho(A[t], dA[t] @ _cho(A[t], b[t]))
        np.testing.assert_allclose(x[t].imag / h, expect, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(x[t].real, _cho(A[t], b[t]), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(f.cond, SPDFactors(A, what=["A"] * 3).cond, rtol=1e-12)


@pytest.mark.parametrize("m", SIZES)
def test_refuses_at_max_cond_to_the_last_float_as_spdfactor(m: int) -> None:
    # diag(1, ..., 1, 1/MAX_COND) has 1-norm condition exactly MAX_COND: accepted, solved exactly; one
    # float smaller is refused with SPDFactor's message, naming that matrix of the stack.
    x = 1.0 / MAX_COND
    edge = np.diag(np.r_[np.ones(m - 1), x])
    good = _spd(m, np.linspace(1.0, 2.0, m), seed=3)
    f = SPDFactors(np.stack([good, edge]), what=["good", "edge"])
    assert f.cond[1] == MAX_COND
    B = np.ones((2, m, 1))
    np.testing.assert_allclose(f.solve(B)[1, :, 0], np.r_[np.ones(m - 1), 1.0 / x], rtol=1e-15)
    past = np.diag(np.r_[np.ones(m - 1), np.nextafter(x, 0.0)])
    with pytest.raises(SingularMatrixError, match=r"^past is singular in floating point: cond ~ 4\.5e\+11 > 4\.5e\+11"):
        SPDFactors(np.stack([good, past]), what=["good", "past"])


@pytest.mark.parametrize("m", SIZES)
def test_names_the_first_refused_matrix_with_spdfactors_message(m: int) -> None:
    good = _spd(m, np.linspace(1.0, 2.0, m), seed=4)
    indefinite = _spd(m, np.r_[-1.0, np.ones(m - 1)], seed=5)
    singular = np.diag(np.r_[np.ones(m - 1), 1e-13])
    what = ["A of tasks[0]", "A of tasks[1]", "A of tasks[2]"]
    for stack, first in (([good, indefinite, singular], 1), ([good, singular, indefinite], 1),
                         ([singular, good, indefinite], 0)):
        with pytest.raises(SingularMatrixError) as info:
            SPDFactors(np.stack(stack), what=what, hint="increase lam")
        with pytest.raises(SingularMatrixError) as alone:
            SPDFactor(stack[first], what=what[first], hint="increase lam")
        assert str(info.value) == str(alone.value)
        message = str(info.value)
        assert message.startswith(f"A of tasks[{first}] is singular") and message.endswith("; increase lam")


def test_shapes_are_checked() -> None:
    A = _stack(4)
    with pytest.raises(ValueError, match=re.escape("A.shape=(4, 4) with 1 names")):
        SPDFactors(A[0], what=["A"])
    with pytest.raises(ValueError, match=re.escape("A.shape=(3, 4, 4) with 2 names")):
        SPDFactors(A, what=["A", "B"])
    for not_square in (np.ones((2, 3, 4)), np.ones((2, 4, 3))):  # refused by the stack's own check
        with pytest.raises(ValueError, match=re.escape(f"A.shape={not_square.shape!r} with 2 names: pass T square")):
            SPDFactors(not_square, what=["A", "B"])
    f = SPDFactors(A, what=["A"] * 3)
    for bad in (np.ones((3, 4)), np.ones((2, 4, 1)), np.ones((3, 5, 1))):
        with pytest.raises(ValueError, match=re.escape(f"B.shape={bad.shape!r} does not fit 3 systems of size 4 x 4")):
            f.solve(bad)
