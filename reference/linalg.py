"""Linear solves shared by iMAML, R2-D2 and LR-D2: factored SPD solves and CG.

Two rules hold everywhere:

* No explicit inverse. A system is solved through a factorisation (or CG);
  a derivative through a solve uses ``d(A^{-1}) = -A^{-1} dA A^{-1}``, i.e.
  more solves with the same factor.
* Complex-step safe. Under complex-step differentiation a matrix is
  ``A + i h dA`` with ``h ~ 1e-20``; the solves must be the analytic
  continuation of the real ones. LU and unconjugated CG ("COCG") are;
  Cholesky and ordinary (Hermitian) CG are not (they conjugate). So the
  real part is Cholesky-factored to *test* positive definiteness and
  estimate the condition number, and a complex matrix is then solved by LU.

A matrix whose condition number exceeds :data:`MAX_COND` (fewer than about
four correct digits would survive the solve) is reported as singular in
floating point: a reference meta-gradient with no correct digits is worse
than an error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
from scipy.linalg import lapack

from reference.errors import ConvergenceError, SingularMatrixError

EPS = float(np.finfo(np.float64).eps)
# cond(A) * eps is the relative forward error a backward-stable solve can promise;
# above 1e-4 (cond > ~4.5e11) fewer than four digits are left, so we refuse.
MAX_COND = 1e-4 / EPS


def _with_hint(message: str, hint: str) -> str:
    return f"{message}; {hint}" if hint else message


class SPDFactor:
    """Factor a symmetric positive-definite matrix once, solve many right-hand sides.

    Args:
        A: ``(m, m)`` symmetric matrix, float64 or complex128 (complex step).
        what: how to name the matrix in error messages, e.g. ``"Z^T Z + lam I of tasks[0]"``.
        hint: the fix suggested when the matrix is singular or indefinite.

    Raises:
        SingularMatrixError: the real part is not positive definite, or its
            condition number exceeds :data:`MAX_COND`.

    Attributes:
        cond: LAPACK's 1-norm condition estimate of the real part (``xPOCON``).
    """

    def __init__(self, A: np.ndarray, *, what: str, hint: str = ""):
        self.complex = np.iscomplexobj(A)
        real = np.ascontiguousarray(A.real) if self.complex else A
        # Cholesky of the real part: succeeds iff it is numerically positive definite.
        chol, info = lapack.dpotrf(real, lower=False, clean=False)
        if info != 0:
            raise SingularMatrixError(_with_hint(
                f"{what} is singular or indefinite in floating point (not positive definite: Cholesky failed "
                f"at pivot {info})", hint))
        anorm = float(np.max(np.sum(np.abs(real), axis=0)))
        rcond, info = lapack.dpocon(chol, anorm, uplo="U")
        self.cond = float(np.inf) if rcond == 0 else 1.0 / float(rcond)
        if not self.cond <= MAX_COND:
            raise SingularMatrixError(_with_hint(
                f"{what} is singular in floating point: cond ~ {self.cond:.3g} > {MAX_COND:.3g} "
                "(fewer than 4 correct digits would survive the solve)", hint))
        self.what = what
        if self.complex:
            # LU is analytic in the entries (pivots are chosen on magnitudes, which
            # the O(h) imaginary part does not change): complex-step safe.
            self._lu = scipy.linalg.lu_factor(A, check_finite=False)
        else:
            self._chol = chol

    def solve(self, B: np.ndarray) -> np.ndarray:
        """``A^{-1} B`` for ``B`` of shape ``(m,)`` or ``(m, k)``.

        Raises:
            ValueError: ``B`` of another shape (real factor; a complex one leaves the check to ``lu_solve``).
        """
        if self.complex:
            return scipy.linalg.lu_solve(self._lu, B, check_finite=False)
        if np.iscomplexobj(B):
            return self.solve(B.real) + 1j * self.solve(B.imag)
        # Integer, boolean or float32 right-hand sides are solved in float64 (exact conversions).
        B = np.asarray(B, dtype=np.float64)
        m = self._chol.shape[0]
        if B.ndim not in (1, 2) or B.shape[0] != m:
            raise ValueError(f"B.shape={B.shape!r} does not fit the {m} x {m} system {self.what}; "
                             f"pass B of shape ({m},) or ({m}, k)")
        # LAPACK's potrs directly: what scipy's cho_solve calls, without its per-call wrapper (~0.1 ms, which
        # dominated R2-D2's per-task solves); the same numbers.
        x, info = lapack.dpotrs(self._chol, B, lower=0)
        if info != 0:  # pragma: no cover - only for an illegal argument
            raise ValueError(f"illegal value in {-info}th argument of LAPACK potrs")
        return x


class SPDFactors:
    """A stack of symmetric positive-definite systems ``A[t] X[t] = B[t]``: one :class:`SPDFactor` each.

    The interface R2-D2's batched ridge heads use (``reference/r2d2.py``: the heads of a block's tasks as
    ``(T, ., .)`` stacks). Each matrix is factored, checked and solved by :class:`SPDFactor` -- the same
    decisions, errors and numbers, bit for bit, as a task-by-task loop; the first matrix refused raises.
    Batched NumPy calls were measured instead (issue 18, 25 x 25 systems, 4 a stack): one
    ``numpy.linalg.cholesky`` (10 us) plus a stacked ``numpy.linalg.solve`` (29 us, an LU each time; NumPy
    has no batched triangular solve) cost more CPU than the per-matrix LAPACK calls they replace (potrf,
    pocon, potrs: ~3 us each), whose GIL holding is that short; so the stacking stays at this interface.

    Args:
        A: ``(T, m, m)`` symmetric matrices, float64 or complex128 (complex step).
        what: ``T`` names for error messages, e.g. ``"Z Z^T + lam I of tasks[3]"``.
        hint: the fix suggested when a matrix is singular or indefinite.

    Raises:
        SingularMatrixError: a real part is not positive definite, or its condition number exceeds
            :data:`MAX_COND` (the first such matrix of the stack).

    Attributes:
        cond: ``(T,)`` LAPACK 1-norm condition estimates of the real parts.
    """

    def __init__(self, A: np.ndarray, *, what: list[str], hint: str = ""):
        if A.ndim != 3 or A.shape[1] != A.shape[2] or len(what) != A.shape[0]:
            raise ValueError(f"A.shape={A.shape!r} with {len(what)} names: pass T square matrices (T, m, m) and "
                             "T names")
        self.shape = A.shape
        self._factors = [SPDFactor(A[t], what=what[t], hint=hint) for t in range(A.shape[0])]
        self.cond = np.array([f.cond for f in self._factors])

    def solve(self, B: np.ndarray) -> np.ndarray:
        """``A[t]^{-1} B[t]`` for ``B`` of shape ``(T, m, k)``, as a ``(T, m, k)`` array.

        Raises:
            ValueError: ``B`` of another shape.
        """
        T, m = self.shape[:2]
        if B.ndim != 3 or B.shape[:2] != (T, m):
            raise ValueError(f"B.shape={B.shape!r} does not fit {T} systems of size {m} x {m}; pass B of shape "
                             f"({T}, {m}, k)")
        return np.stack([f.solve(b) for f, b in zip(self._factors, B)])


@dataclass(frozen=True)
class CGInfo:
    """What a conjugate-gradient solve did.

    Attributes:
        iterations: matrix-vector products spent in CG iterations (restarts included).
        residual: true relative residual ``||b - A x|| / ||b||`` at the returned ``x``
            (recomputed with one extra product, not the recursively updated one).
        cond_estimate: ``lambda_max / lambda_min`` of the Lanczos tridiagonal
            matrix built from the CG coefficients: a lower bound on ``cond(A)``
            that is usually sharp once CG has converged.
        restarts: how many times CG restarted from the true residual.
    """

    iterations: int
    residual: float
    cond_estimate: float
    restarts: int


def _vdot(a: np.ndarray, b: np.ndarray):
    # Unconjugated inner product: CG on a complex symmetric matrix (COCG) stays analytic.
    return np.dot(a, b)


# Vectors at least this long are updated in place in CG (fewer passes over memory); shorter ones by the plain
# expressions, whose Python cost is lower (the same numbers either way).
IN_PLACE_MIN_SIZE = 2**14


def _update(y: np.ndarray, alpha: Any, d: np.ndarray, sign: float) -> np.ndarray:
    """``y + alpha d`` (``sign = 1``) or ``y - alpha d`` (``sign = -1``), in ``y``'s array for long vectors
    when the dtypes allow."""
    if y.size < IN_PLACE_MIN_SIZE or y.dtype != np.result_type(y, alpha, d):
        return y + alpha * d if sign > 0 else y - alpha * d
    ad = np.multiply(alpha, d)  # alpha * d, operands in the expression's order (complex products round by it)
    return np.add(y, ad, out=y) if sign > 0 else np.subtract(y, ad, out=y)


def conjugate_gradient(
    matvec: Callable[[np.ndarray], np.ndarray],
    b: np.ndarray,
    *,
    rtol: float,
    maxiter: int,
    what: str,
    hint: str = "",
) -> tuple[np.ndarray, CGInfo]:
    """Solve ``A x = b`` for a symmetric positive-definite ``A`` given as ``matvec``.

    Hestenes & Stiefel (1952) conjugate gradient; with complex (complex-step)
    data it runs unconjugated (COCG), which is the analytic continuation of
    real CG. Convergence is declared on the *true* residual: the real part
    must satisfy ``||Re r|| <= rtol ||Re b||`` and the imaginary part
    ``||Im r|| <= rtol (||Im b|| + ||Im A x||)`` (under complex step the
    imaginary parts carry the derivative and need their own relative
    test). If the recursively updated residual says "converged" but the true
    one does not (round-off drift), CG restarts from the true residual.

    Raises:
        SingularMatrixError: a search direction with ``Re p^T A p <= 0`` (``A``
            not positive definite).
        ConvergenceError: ``maxiter`` products spent without reaching ``rtol``.
    """
    x = np.zeros_like(b)
    bre, bim = np.linalg.norm(b.real), np.linalg.norm(b.imag)
    if bre == 0 and bim == 0:
        return x, CGInfo(0, 0.0, 1.0, 0)
    if bre == 0:
        # b = i c (the complex step of a zero right-hand side): COCG's p^T A p = -c^T A c < 0 would be
        # refused as "not positive definite". The operator is linear: solve A y = c, return x = i y.
        y, info = conjugate_gradient(matvec, -1j * b, rtol=rtol, maxiter=maxiter, what=what, hint=hint)
        return 1j * y, info

    def converged(r: np.ndarray) -> bool:
        if np.linalg.norm(r.real) > rtol * bre:
            return False
        if np.iscomplexobj(r):
            # Im(Ax) = Im b - Im r, so the imaginary scale needs no extra product.
            return np.linalg.norm(r.imag) <= rtol * (bim + np.linalg.norm(b.imag - r.imag))
        return True

    iterations, restarts = 0, 0
    diag: list[float] = []
    off: list[float] = []
    r = b.copy()
    while True:
        p = r.copy()
        rr = _vdot(r, r)
        alpha_prev = beta_prev = None
        first_cycle = restarts == 0
        while iterations < maxiter:
            Ap = matvec(p)
            pAp = _vdot(p, Ap)
            if not np.real(pAp) > 0:
                raise SingularMatrixError(_with_hint(
                    f"{what} is not positive definite: conjugate gradient found a direction with "
                    f"p^T A p = {np.real(pAp):.3g} <= 0 at iteration {iterations}", hint))
            alpha = rr / pAp
            # In place where the dtypes allow (the same numbers: x + alpha p, r - alpha Ap, r + beta p).
            x = _update(x, alpha, p, 1.0)
            r = _update(r, alpha, Ap, -1.0)
            iterations += 1
            if first_cycle:
                # Lanczos tridiagonal from the CG coefficients (Golub & Van Loan, sec. 11.3.5).
                a_re = float(np.real(alpha))
                d = 1.0 / a_re
                if alpha_prev is not None:
                    d += float(np.real(beta_prev)) / float(np.real(alpha_prev))
                    off.append(np.sqrt(max(float(np.real(beta_prev)), 0.0)) / float(np.real(alpha_prev)))
                diag.append(d)
            if np.iscomplexobj(r):
                if converged(r):
                    break
                rr_new = _vdot(r, r)
            else:
                # converged(r) for a real r, from r.r computed once: ||r|| is np.sqrt(r.dot(r)) in NumPy's
                # norm, the same dot product (the same decision, NaN included).
                rr_new = _vdot(r, r)
                if not np.sqrt(rr_new) > rtol * bre:
                    break
            beta = rr_new / rr
            if p.size >= IN_PLACE_MIN_SIZE and p.dtype == np.result_type(p, beta, r):
                np.multiply(beta, p, out=p)
                np.add(r, p, out=p)
            else:
                p = r + beta * p
            rr = rr_new
            alpha_prev, beta_prev = alpha, beta
        r = b - matvec(x)
        if converged(r):
            break
        if iterations >= maxiter:
            rel = np.linalg.norm(r) / np.linalg.norm(b)
            raise ConvergenceError(_with_hint(
                f"conjugate gradient on {what} did not converge: relative residual {rel:.3g} > rtol={rtol:g} "
                f"after {iterations} iterations (maxiter={maxiter})", hint))
        restarts += 1
    if len(diag) <= 1:
        # No Ritz pair to compare (x = 0 already met rtol >= 1 with maxiter = 0, or one iteration):
        # the trivial lower bound cond(A) >= 1.
        cond_est = 1.0
    else:
        ritz = scipy.linalg.eigvalsh_tridiagonal(np.array(diag), np.array(off[: len(diag) - 1]))
        cond_est = float(ritz[-1] / ritz[0]) if ritz[0] > 0 else float("inf")
    rel = float(np.linalg.norm(r) / np.linalg.norm(b))
    return x, CGInfo(iterations, rel, cond_est, restarts)


__all__ = ["CGInfo", "EPS", "MAX_COND", "SPDFactor", "SPDFactors", "conjugate_gradient"]
