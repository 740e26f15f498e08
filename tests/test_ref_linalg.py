"""reference/linalg.py against independent linear algebra: numpy solve/eigh/cond, closed forms.

``SPDFactor`` and ``conjugate_gradient`` carry every iMAML, R2-D2 and LR-D2 reference
solve; these tests pin their contract, not their code: the solve equals
``np.linalg.solve`` (real, complex matrix, complex right-hand side), the refusal
threshold is ``MAX_COND = 1e-4 / eps`` to the last float, CG's bookkeeping
(products, restarts) matches a counted ``matvec``, and its Lanczos condition
estimate equals ``lambda_max / lambda_min`` from ``eigh`` once CG has explored
the whole space (issue 19, mutation testing).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from reference.errors import ConvergenceError, SingularMatrixError
from reference.linalg import EPS, IN_PLACE_MIN_SIZE, MAX_COND, CGInfo, SPDFactor, conjugate_gradient


def _spd(n: int, eigs, seed: int = 0) -> np.ndarray:
    """``Q diag(eigs) Q^T`` with a random orthogonal ``Q``: an SPD matrix with known spectrum."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = Q @ np.diag(np.asarray(eigs, dtype=float)) @ Q.T
    return (A + A.T) / 2


class _Counted:
    """``v -> A v`` that counts its calls (CG's documented product bookkeeping is checked against it)."""

    def __init__(self, A: np.ndarray):
        self.A, self.calls = A, 0

    def __call__(self, v: np.ndarray) -> np.ndarray:
        self.calls += 1
        return self.A @ v


# ----------------------------------------------------------------------------- SPDFactor

def test_spd_factor_solves_like_numpy_real_complex_matrix_and_complex_rhs():
    A = _spd(5, [1.0, 2.0, 3.0, 5.0, 8.0])
    rng = np.random.default_rng(1)
    b, B = rng.standard_normal(5), rng.standard_normal((5, 3))
    f = SPDFactor(A, what="A")
    np.testing.assert_allclose(f.solve(b), np.linalg.solve(A, b), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(f.solve(B), np.linalg.solve(A, B), rtol=1e-13, atol=1e-14)
    # A real factor and a complex right-hand side (complex step through B only).
    bc = rng.standard_normal(5) + 1j * rng.standard_normal(5)
    xc = f.solve(bc)
    assert np.iscomplexobj(xc)
    np.testing.assert_allclose(xc, np.linalg.solve(A.astype(complex), bc), rtol=1e-13, atol=1e-14)
    # A complex (complex-step) matrix: LU, the analytic continuation of the real solve.
    dA = rng.standard_normal((5, 5))
    Ac = A + 1e-3j * (dA + dA.T)
    fc = SPDFactor(Ac, what="A + i dA")
    np.testing.assert_allclose(fc.solve(bc), np.linalg.solve(Ac, bc), rtol=1e-13, atol=1e-14)
    # Its condition number is the real part's (same as the real factor's).
    assert fc.cond == f.cond


def test_spd_factor_solve_real_dtypes_in_float64_and_refuses_other_shapes():
    # Integer, boolean, float32 and list right-hand sides are solved as their (exact) float64 values; an
    # empty block of right-hand sides gives an empty solution; any shape but (m,) or (m, k) is a ValueError
    # naming the shape and the system (not a silent LAPACK solve along another axis).
    A = _spd(4, [1.0, 2.0, 3.0, 6.0], seed=20)
    f = SPDFactor(A, what="A of task 3")
    rng = np.random.default_rng(21)
    for B in (np.array([1, -2, 3, 4]), rng.integers(-5, 5, (4, 3)), np.array([[True, False], [False, True],
              [True, True], [False, False]]), rng.standard_normal((4, 2)).astype(np.float32), [0.5, 1.0, -1.0, 2.0],
              rng.standard_normal((4, 4)), rng.standard_normal((4, 1))):
        x = f.solve(B)
        assert x.dtype == np.float64 and x.shape == np.shape(B)
        np.testing.assert_allclose(x, np.linalg.solve(A, np.asarray(B, dtype=np.float64)), rtol=1e-13, atol=1e-14)
    assert f.solve(np.zeros((4, 0))).shape == (4, 0)
    for bad in (np.ones(5), np.ones(3), np.ones((3, 4)), np.ones((4, 2, 2)), np.ones((2, 4, 1)), np.array(1.0)):
        with pytest.raises(ValueError, match=rf"^B.shape={re.escape(repr(bad.shape))} does not fit the 4 x 4 "
                                              r"system A of task 3; pass B of shape \(4,\) or \(4, k\)$"):
            f.solve(bad)


def test_spd_factor_complex_step_derivative_of_the_solve():
    # Im solve(A + i h dA, b) / h = -A^{-1} dA A^{-1} b (closed form), to round-off.
    A = _spd(4, [1.0, 1.5, 4.0, 9.0], seed=2)
    rng = np.random.default_rng(3)
    dA, b = rng.standard_normal((4, 4)), rng.standard_normal(4)
    dA = dA + dA.T
    h = 1e-20
    x = SPDFactor(A + 1j * h * dA, what="A").solve(b.astype(complex))
    expect = -np.linalg.solve(A, dA @ np.linalg.solve(A, b))
    np.testing.assert_allclose(x.imag / h, expect, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(x.real, np.linalg.solve(A, b), rtol=1e-13)


def test_spd_factor_cond_is_the_one_norm_condition_number():
    # For small well-separated matrices LAPACK's estimate is exact; it is a lower bound in general.
    for seed, eigs in ((0, [1.0, 2.0, 3.0, 5.0, 8.0]), (4, [1e-3, 1.0, 10.0]), (5, [2.0, 2.0])):
        A = _spd(len(eigs), eigs, seed=seed)
        kappa1 = np.linalg.cond(A, 1)
        cond = SPDFactor(A, what="A").cond
        assert kappa1 / 3 <= cond <= kappa1 * (1 + 1e-12), (cond, kappa1)
    assert SPDFactor(np.eye(3), what="I").cond == 1.0
    assert SPDFactor(np.diag([4.0, 1.0]), what="D").cond == pytest.approx(4.0, rel=1e-14)


def test_spd_factor_refuses_at_max_cond_to_the_last_float():
    # MAX_COND = 1e-4 / eps: fewer than four correct digits would survive the solve.
    assert MAX_COND == pytest.approx(1e-4 / np.finfo(np.float64).eps, rel=1e-15)
    # diag(1, 1/MAX_COND) has cond exactly MAX_COND (1-norm, LAPACK's estimate is exact here):
    # "exceeds MAX_COND" is refused, equal is not.
    x = 1.0 / MAX_COND
    assert SPDFactor(np.diag([1.0, x]), what="D").cond == MAX_COND
    with pytest.raises(SingularMatrixError, match=r"cond ~ 4\.5e\+11 > 4\.5e\+11"):
        SPDFactor(np.diag([1.0, np.nextafter(x, 0.0)]), what="D")
    # Orders of magnitude: 1e11 keeps ~4.6 digits (accepted), 1e12 keeps ~3.6 (refused).
    SPDFactor(np.diag([1.0, 1e-11]), what="D")
    with pytest.raises(SingularMatrixError, match="singular in floating point"):
        SPDFactor(np.diag([1.0, 1e-12]), what="D")
    # A reciprocal condition that underflows to 0 (cond = inf) is refused, not a ZeroDivisionError.
    with pytest.raises(SingularMatrixError, match="cond ~ inf"):
        SPDFactor(np.diag([1e200, 1e-200]), what="D")


def test_spd_factor_refuses_indefinite_and_names_the_fix():
    A = np.diag([1.0, -1.0, 2.0])
    with pytest.raises(SingularMatrixError, match=r"^A is singular or indefinite .*pivot 2\); use more damping$"):
        SPDFactor(A, what="A", hint="use more damping")
    with pytest.raises(SingularMatrixError, match=r"pivot 2\)$"):
        SPDFactor(A, what="A")
    # A complex matrix whose real part is indefinite: tested on the real part.
    with pytest.raises(SingularMatrixError, match="not positive definite"):
        SPDFactor(A + 1e-20j * np.ones((3, 3)), what="A")


# ----------------------------------------------------------------------------- conjugate gradient

def test_cg_solution_iterations_and_cond_estimate_against_eigh():
    eigs = [0.5, 2.0, 3.0, 5.0, 8.0, 13.0]
    A = _spd(6, eigs, seed=6)
    b = np.random.default_rng(7).standard_normal(6)
    mv = _Counted(A)
    x, info = conjugate_gradient(mv, b, rtol=1e-13, maxiter=100, what="A")
    np.testing.assert_allclose(x, np.linalg.solve(A, b), rtol=1e-11)
    # Products: one per CG iteration plus one true residual per cycle (documented bookkeeping).
    assert mv.calls == info.iterations + info.restarts + 1
    # Exact arithmetic needs n = 6 iterations (6 distinct eigenvalues); round-off may add a few.
    assert 6 <= info.iterations <= 9
    # True relative residual, recomputed independently.
    assert info.residual == pytest.approx(np.linalg.norm(b - A @ x) / np.linalg.norm(b), rel=1e-6, abs=1e-17)
    assert info.residual <= 1e-13
    # After n iterations the Lanczos Ritz values are the eigenvalues: the estimate is lambda_max / lambda_min.
    lam = np.linalg.eigvalsh(A)
    assert info.cond_estimate == pytest.approx(lam[-1] / lam[0], rel=1e-8)


def test_cg_cond_estimate_two_and_three_iterations():
    for eigs in ([0.5, 4.0], [2.0, 3.0, 7.0]):
        A = _spd(len(eigs), eigs, seed=8)
        b = np.random.default_rng(9).standard_normal(len(eigs))
        x, info = conjugate_gradient(lambda v, A=A: A @ v, b, rtol=1e-14, maxiter=20, what="A")
        assert info.iterations == len(eigs)
        assert info.cond_estimate == pytest.approx(eigs[-1] / eigs[0], rel=1e-10)
        np.testing.assert_allclose(x, np.linalg.solve(A, b), rtol=1e-12)


def test_cg_identity_one_iteration_exact_even_with_rtol_zero():
    # On the identity the first step is exact (alpha = 1, r = 0 bit for bit): any rtol, even 0, is met.
    b = np.array([3.0, -1.0, 2.0])
    mv = _Counted(np.eye(3))
    x, info = conjugate_gradient(mv, b, rtol=0.0, maxiter=5, what="I")
    np.testing.assert_array_equal(x, b)
    assert info == CGInfo(iterations=1, residual=0.0, cond_estimate=1.0, restarts=0)
    assert mv.calls == 2
    # The same with a complex right-hand side (complex step): the imaginary test accepts r = 0 too.
    bc = b + 1j * np.array([1.0, 0.5, -2.0])
    x, info = conjugate_gradient(lambda v: v, bc, rtol=0.0, maxiter=5, what="I")
    np.testing.assert_array_equal(x, bc)
    assert info.iterations == 1 and info.cond_estimate == 1.0
    # A unit-norm right-hand side is solved, not returned as zero.
    x, info = conjugate_gradient(lambda v: 2.0 * v, np.array([1.0, 0.0, 0.0]), rtol=1e-12, maxiter=5, what="2I")
    np.testing.assert_allclose(x, [0.5, 0.0, 0.0], rtol=1e-15)
    assert info.iterations == 1


def test_cg_zero_rhs_costs_nothing():
    for b in (np.zeros(4), np.zeros(4, dtype=complex)):
        mv = _Counted(np.diag([1.0, 0.0, 2.0, 3.0]))  # even a singular A: x = 0 solves A x = 0
        x, info = conjugate_gradient(mv, b, rtol=1e-10, maxiter=10, what="A")
        np.testing.assert_array_equal(x, np.zeros(4))
        assert x.dtype == b.dtype
        assert mv.calls == 0
        assert info == CGInfo(iterations=0, residual=0.0, cond_estimate=1.0, restarts=0)


def test_cg_zero_iterations_when_x0_already_meets_a_loose_tolerance():
    # rtol >= 1 and maxiter = 0: x = 0 has relative residual exactly 1 <= rtol; no CG step, no Ritz value.
    mv = _Counted(np.diag([1.0, 2.0, 3.0]))
    x, info = conjugate_gradient(mv, np.ones(3), rtol=1.0, maxiter=0, what="A")
    np.testing.assert_array_equal(x, np.zeros(3))
    assert info == CGInfo(iterations=0, residual=1.0, cond_estimate=1.0, restarts=0)
    assert mv.calls == 1  # the true residual only
    with pytest.raises(ConvergenceError, match=r"relative residual 1 > rtol=0.5 after 0 iterations \(maxiter=0\)"):
        conjugate_gradient(mv, np.ones(3), rtol=0.5, maxiter=0, what="A")


def test_cg_complex_step_imaginary_part_converges_separately():
    # b = u + i h v with u an eigenvector: the real part converges in one step, the imaginary part
    # (the derivative, A^{-1} v) needs the whole Krylov space; CG must not stop on the real part alone.
    eigs = [1.0, 2.0, 3.0, 5.0, 8.0]
    A = _spd(5, eigs, seed=10)
    w, V = np.linalg.eigh(A)
    u = 3.0 * V[:, 2]
    v = np.random.default_rng(11).standard_normal(5)
    h = 1e-20
    x, info = conjugate_gradient(lambda p: A @ p, u + 1j * h * v, rtol=1e-10, maxiter=100, what="A")
    np.testing.assert_allclose(x.real, u / w[2], rtol=1e-12)
    np.testing.assert_allclose(x.imag / h, np.linalg.solve(A, v), rtol=1e-8)
    assert info.iterations >= 5


def test_cg_complex_step_of_a_zero_right_hand_side():
    # b = 0 + i h v (the real right-hand side vanishes, its derivative does not): x = i h A^{-1} v.
    # Unconjugated CG on b itself would see p^T A p = -h^2 v^T A v < 0; the solve must still succeed.
    A = _spd(4, [1.0, 2.0, 4.0, 7.0], seed=14)
    v = np.random.default_rng(15).standard_normal(4)
    for h in (1e-20, 1.0):
        mv = _Counted(A)
        x, info = conjugate_gradient(mv, 1j * h * v, rtol=1e-12, maxiter=50, what="A")
        np.testing.assert_array_equal(x.real, np.zeros(4))
        np.testing.assert_allclose(x.imag / h, np.linalg.solve(A, v), rtol=1e-10)
        assert mv.calls == info.iterations + info.restarts + 1
        assert info.cond_estimate == pytest.approx(7.0, rel=1e-8)


@pytest.mark.xfail(strict=True, raises=ConvergenceError, reason=(
    "known defect: with Im b = 0 and a complex (complex-step) matrix the imaginary convergence scale "
    "||Im b|| + ||Im A x|| tends to 0 with the residual itself, so ||Im r|| <= rtol * scale is never met"))
def test_cg_complex_step_through_the_matrix_only():
    # A + i h dA with a real b: Im x / h = -A^{-1} dA A^{-1} b (closed form).
    A = _spd(5, [1.0, 2.0, 3.0, 5.0, 8.0], seed=16)
    rng = np.random.default_rng(17)
    dA, b = rng.standard_normal((5, 5)), rng.standard_normal(5)
    dA = dA + dA.T
    h = 1e-20
    Ac = A + 1j * h * dA
    x, _ = conjugate_gradient(lambda v: Ac @ v, b.astype(complex), rtol=1e-10, maxiter=200, what="A")
    np.testing.assert_allclose(x.imag / h, -np.linalg.solve(A, dA @ np.linalg.solve(A, b)), rtol=1e-8)


def test_cg_refuses_non_positive_directions():
    # p^T A p = 0 exactly (b in the null space) and p^T A p in (-1, 0): both are "not positive definite".
    with pytest.raises(SingularMatrixError, match=r"p\^T A p = 0 <= 0 at iteration 0; try damping$"):
        conjugate_gradient(lambda v: np.diag([1.0, 0.0]) @ v, np.array([0.0, 1.0]), rtol=1e-10, maxiter=10,
                           what="A", hint="try damping")
    with pytest.raises(SingularMatrixError, match=r"p\^T A p = -0\.5 <= 0 at iteration 0$"):
        conjugate_gradient(lambda v: np.diag([1.0, -0.5]) @ v, np.array([0.0, 1.0]), rtol=1e-10, maxiter=10,
                           what="A")


def test_cg_maxiter_is_a_hard_budget_and_the_error_reports_the_true_residual():
    A = np.diag([1.0, 2.0, 3.0, 4.0])
    b = 1e6 * np.ones(4)
    # 4 distinct eigenvalues: 3 iterations are not enough for rtol = 1e-12 ...
    mv = _Counted(A)
    with pytest.raises(ConvergenceError, match=r"after 3 iterations \(maxiter=3\)") as err:
        conjugate_gradient(mv, b, rtol=1e-12, maxiter=3, what="A")
    assert mv.calls <= 3 + 1 + 1  # 3 iteration products, at most one restart's true residual, the last one
    # ... and 4 are: the budget is exactly maxiter products.
    x, info = conjugate_gradient(lambda v: A @ v, b, rtol=1e-12, maxiter=4, what="A")
    np.testing.assert_allclose(x, b / np.diag(A), rtol=1e-11)
    # One iteration (steepest descent, closed form x1 = (b.b / b.Ab) b): the message reports
    # ||b - A x1|| / ||b||, scale-free (b has norm 2e6).
    with pytest.raises(ConvergenceError) as err:
        conjugate_gradient(lambda v: A @ v, b, rtol=1e-12, maxiter=1, what="A")
    x1 = (b @ b) / (b @ A @ b) * b
    rel = np.linalg.norm(b - A @ x1) / np.linalg.norm(b)
    reported = float(re.search(r"relative residual (\S+) >", str(err.value)).group(1))
    assert reported == pytest.approx(rel, rel=5e-3)


def test_cg_restart_bookkeeping_on_ill_conditioned_systems():
    # cond 1e3..1e6 and rtol near round-off: the recursive residual drifts from the true one and CG
    # restarts from the true residual (which case restarts depends on the BLAS's round-off: several
    # cases, at least one must). Whatever happens, the counted products match the documented bookkeeping.
    # These tolerances are below cond(A) x eps, what floating point guarantees for a residual: a case may stall
    # just above it (seen on one machine: (6, 1e5, 1e-13) at 6.45e-13 after 120 iterations, converged on
    # another). Then CG must say so (ConvergenceError with the residual reached), not answer; most cases converge.
    restarted = converged = 0
    for n, cond, rtol, seed in ((6, 1e5, 1e-13, 1), (10, 1e6, 1e-12, 0), (6, 1e3, 1e-14, 0), (10, 1e4, 1e-13, 1),
                                (20, 1e3, 1e-14, 2)):
        A = _spd(n, 0.25 * np.logspace(0, np.log10(cond), n), seed=seed)
        b = np.random.default_rng(seed + 100).standard_normal(n)
        mv = _Counted(A)
        try:
            x, info = conjugate_gradient(mv, b, rtol=rtol, maxiter=20 * n, what="A")
        except ConvergenceError as e:
            assert rtol < cond * np.finfo(float).eps
            assert f"> rtol={rtol:g} after {20 * n} iterations" in str(e), str(e)
            continue
        converged += 1
        restarted += info.restarts > 0
        assert mv.calls == info.iterations + info.restarts + 1
        assert np.linalg.norm(b - A @ x) <= rtol * np.linalg.norm(b)
        # The Lanczos estimate (first cycle only) is a lower bound on cond(A), sharp after n iterations.
        assert info.cond_estimate == pytest.approx(cond, rel=1e-6)
    assert converged >= 4 and restarted >= 2


def test_cg_stops_only_where_the_documented_criterion_holds():
    # ||Re r|| <= rtol ||Re b|| and ||Im r|| <= rtol (||Im b|| + ||Im A x||), checked independently at the
    # returned x over random SPD systems, complex right-hand sides and loose tolerances (where a stop
    # one iteration early is visible).
    checked = 0
    for seed in range(300):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(2, 6))
        A = _spd(n, np.exp(rng.uniform(0, 3, n)), seed=seed)
        b = rng.standard_normal(n) + 1j * rng.uniform(0.01, 1) * rng.standard_normal(n)
        rtol = float(rng.uniform(0.05, 0.9))
        try:
            x, _ = conjugate_gradient(lambda v: A @ v, b, rtol=rtol, maxiter=50, what="A")
        except SingularMatrixError:  # Re(b^T A b) <= 0: an imaginary part too large for unconjugated CG
            continue
        checked += 1
        r = b - A @ x
        assert np.linalg.norm(r.real) <= rtol * np.linalg.norm(b.real), seed
        assert np.linalg.norm(r.imag) <= rtol * (np.linalg.norm(b.imag) + np.linalg.norm((A @ x).imag)), seed
    assert checked >= 200


def test_cg_cond_estimate_of_a_numerically_singular_matrix_is_infinite():
    # cond(diag(1, 1e-20)) = 1e20 > 1/eps: the smallest Ritz value rounds to 0 and the estimate is
    # +inf (no division by zero, no negative or finite "condition number").
    A = np.diag([1.0, 1e-20])
    x, info = conjugate_gradient(lambda v: A @ v, np.array([1.0, 1.0]), rtol=1e-14, maxiter=50, what="A")
    assert info.cond_estimate == np.inf
    np.testing.assert_allclose(A @ x, [1.0, 1.0], rtol=1e-14)


def test_cg_long_vectors_real_complex_and_integer_right_hand_sides():
    # Vectors of IN_PLACE_MIN_SIZE entries and more are updated in place: the solution is still A^{-1} b
    # (closed form for a diagonal A with 3 distinct eigenvalues: 3 iterations in exact arithmetic), for a
    # real, a complex (complex-step) and an integer right-hand side (solved in float64, as np.linalg.solve
    # does; its integer iterates must not be updated in place).
    n = IN_PLACE_MIN_SIZE + 5
    d = np.array([1.0, 2.0, 5.0])[np.arange(n) % 3]
    rng = np.random.default_rng(22)
    b = rng.standard_normal(n)
    for rhs in (b, b + 1e-20j * rng.standard_normal(n), rng.integers(-3, 4, n)):
        calls = []
        x, info = conjugate_gradient(lambda v: (calls.append(1), d * v)[1], rhs, rtol=1e-12, maxiter=30, what="D")
        exact = rhs.astype(np.complex128 if np.iscomplexobj(rhs) else np.float64) / d
        assert x.dtype == exact.dtype
        for got, want in ((x.real, exact.real), (x.imag, exact.imag)):  # CG's rtol is on norms (1e-12 here)
            assert np.linalg.norm(got - want) <= 1e-11 * np.linalg.norm(want)
        assert 3 <= info.iterations <= 5 and len(calls) == info.iterations + info.restarts + 1
        assert info.cond_estimate == pytest.approx(5.0, rel=1e-6)


def test_cg_one_step_cond_estimate_is_a_lower_bound_even_for_a_negative_step():
    # Unconjugated CG on b = e1 + 2i e2, A = diag(10, 1): b.b = -3, b.Ab = 6 > 0, so alpha = -1/2 (closed
    # form) and r = b - alpha A b = 6 e1 + 3i e2, which meets rtol = 10 (||Re r|| = 6 <= 10 ||Re b||,
    # ||Im r|| = 3 <= 10 (||Im b|| + ||Im A x||)): one step. A single Ritz value 1/alpha < 0 is no estimate;
    # cond_estimate must stay a lower bound on cond(A) = 10 (the trivial 1), not +inf.
    A = np.diag([10.0, 1.0])
    b = np.array([1.0, 2.0j])
    x, info = conjugate_gradient(lambda v: A @ v, b, rtol=10.0, maxiter=5, what="A")
    np.testing.assert_allclose(x, -0.5 * b, rtol=1e-15)
    assert info.iterations == 1
    assert 1.0 <= info.cond_estimate <= np.linalg.cond(A)


def test_cg_info_is_immutable():
    info = CGInfo(iterations=1, residual=0.0, cond_estimate=1.0, restarts=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.iterations = 2  # type: ignore[misc]
    assert EPS == np.finfo(np.float64).eps
