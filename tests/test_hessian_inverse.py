"""The Hessian-inverse checks of ``verify.hessian_inverse`` on cases with known answers.

Correct solves (LAPACK's, in float64 and float32) must never fail; solves that
are wrong by more than round-off (perturbed, transposed, unconverged, the
wrong formula) must fail; singular-to-working-precision cases must be
inconclusive, not pass or fail.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from threadpoolctl import threadpool_limits
from hypothesis import strategies as st

from reference import imaml
from reference.linalg import conjugate_gradient
from reference.errors import InvalidInputError
from reference.models import MLP, flatten
from reference.tasks import sinusoid
from verify.tolerance import tolerance
from verify.hessian_inverse import (
    check_cg_vs_direct,
    check_imaml,
    check_imaml_implicit,
    check_imaml_stationarity,
    check_solve,
    check_spd,
    check_woodbury,
)


def spd_matrix(rng, n, cond):
    """A random SPD matrix with prescribed 2-norm condition number (eigenvalues log-spaced in [1/cond, 1])."""
    Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    A = (Q * np.logspace(-np.log10(cond), 0, n)) @ Q.T
    return 0.5 * (A + A.T)


# ---------------------------------------------------------------------------
# SPD
# ---------------------------------------------------------------------------


@given(st.integers(1, 30), st.floats(1.0, 1e10), st.integers(0, 2**16), st.sampled_from([np.float64, np.float32]))
def test_spd_matrices_pass(n, cond, seed, dtype):
    if dtype is np.float32:
        # the round-off band is 1024 eps32 ||A|| (~1.2e-4 ||A||): cond above ~8e3 puts the
        # smallest eigenvalue inside it, where "inconclusive" is the right answer
        cond = min(cond, 1e3)
    A = spd_matrix(np.random.default_rng(seed), n, cond).astype(dtype)
    assert check_spd(A).status == "pass"


def test_indefinite_asymmetric_and_singular_matrices():
    rng = np.random.default_rng(0)
    A = spd_matrix(rng, 6, 100.0)
    v = check_spd(A - 0.5 * np.eye(6), name="H")
    assert v.status == "fail" and "indefinite" in v.reason and v.reason.startswith("spd check failed: H")
    B = A.copy()
    B[0, 3] += 1e-6
    v = check_spd(B)
    assert v.status == "fail" and "not symmetric" in v.reason and "A[0, 3]" in v.reason
    Z = rng.normal(size=(3, 6))
    v = check_spd(Z.T @ Z)  # rank 3 of 6: zero eigenvalues up to round-off
    assert v.status == "inconclusive" and "singular to working precision" in v.reason
    with pytest.raises(InvalidInputError):
        check_spd(np.ones((2, 3)))
    with pytest.raises(InvalidInputError):
        check_spd(np.array([[1.0, np.nan], [np.nan, 1.0]]))


# ---------------------------------------------------------------------------
# Backward error of a solve
# ---------------------------------------------------------------------------


@given(st.integers(1, 40), st.floats(1.0, 1e12), st.integers(0, 2**16), st.integers(1, 3))
def test_lapack_solutions_pass_whatever_the_condition_number(n, cond, seed, k):
    """False-alarm test: backward-stable solves have small backward error even when ill-conditioned."""
    rng = np.random.default_rng(seed)
    A = spd_matrix(rng, n, cond) + 0.1 * rng.normal(size=(n, n)) / np.sqrt(n)  # general, not symmetric
    B = rng.normal(size=(n, k))
    X = scipy.linalg.solve(A, B)
    v = check_solve(A, X, B)
    assert v.status in ("pass", "inconclusive"), v.reason
    if np.linalg.cond(A) < 1e10:
        assert v.status == "pass"


@given(st.integers(2, 30), st.floats(1.0, 1e4), st.integers(0, 2**16))
def test_float32_solutions_are_judged_with_float32_tolerances(n, cond, seed):
    rng = np.random.default_rng(seed)
    A = spd_matrix(rng, n, cond).astype(np.float32)
    b = rng.normal(size=n).astype(np.float32)
    x = np.linalg.solve(A, b)  # float32 LAPACK
    v = check_solve(A, x, b)
    assert v.status == "pass" and v.dtype == "float32"
    # the same float32 answer judged as if it were float64 fails: its residual is float32 round-off
    # (unless A is so close to a multiple of I that the float32 solve is exact)
    v64 = check_solve(A.astype(np.float64), x.astype(np.float64), b.astype(np.float64))
    if cond >= 10:
        assert v64.status == "fail"


@given(st.integers(2, 30), st.floats(1.0, 1e8), st.integers(0, 2**16))
def test_wrong_solutions_fail(n, cond, seed):
    rng = np.random.default_rng(seed)
    A = spd_matrix(rng, n, cond) + rng.normal(size=(n, n)) / n
    b = rng.normal(size=n)
    x = np.linalg.solve(A, b)
    # 1e-8 relative perturbation: 1e5x the backward-error tolerance (2.3e-13)
    assert check_solve(A, x + 1e-8 * np.linalg.norm(x) * rng.normal(size=n) / np.sqrt(n), b).status == "fail"
    # transposed operand (a classic adjoint bug)
    if np.linalg.norm(A - A.T) > 1e-6 * np.linalg.norm(A):
        assert check_solve(A, np.linalg.solve(A.T, b), b).status == "fail"


def test_singular_to_working_precision_is_inconclusive():
    H = scipy.linalg.hilbert(14)  # cond ~ 1e17-1e18 > 1/eps
    b = H @ np.ones(14)
    v = check_solve(H, np.linalg.solve(H, b), b, name="hilbert(14)")
    assert v.status == "inconclusive" and "singular to working precision" in v.reason


def test_iterative_solves_are_judged_at_their_claimed_tolerance_and_matrix_free():
    rng = np.random.default_rng(1)
    A = spd_matrix(rng, 50, 1e3)
    b = rng.normal(size=50)
    x, info = conjugate_gradient(lambda v: A @ v, b, rtol=1e-8, maxiter=500, what="A")
    assert info.residual <= 1e-8
    assert check_solve(A, x, b).status == "fail"  # not a backward-stable direct solve...
    assert check_solve(A, x, b, rtol=1e-8).status == "pass"  # ...but exactly what CG promised
    assert check_solve(lambda v: A @ v, x, b, rtol=1e-8).status == "pass"  # matrix-free (Lanczos norm)
    M = rng.normal(size=(450, 450))
    big = M @ M.T / 450 + np.eye(450)  # above the dense-norm limit (400): ARPACK estimates ||A||
    bb = rng.normal(size=450)
    assert check_solve(lambda v: big @ v, np.linalg.solve(big, bb), bb).status == "pass"


# ---------------------------------------------------------------------------
# Primal vs Woodbury
# ---------------------------------------------------------------------------


@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 4), st.floats(1e-3, 10.0), st.integers(0, 2**16))
def test_primal_and_dual_ridge_agree(n, p, c, lam, seed):
    rng = np.random.default_rng(seed)
    Z, Y = rng.normal(size=(n, p)), rng.normal(size=(n, c))
    Wp = scipy.linalg.solve(Z.T @ Z + lam * np.eye(p), Z.T @ Y, assume_a="pos")
    Wd = Z.T @ scipy.linalg.solve(Z @ Z.T + lam * np.eye(n), Y, assume_a="pos")
    assert check_woodbury(Z, Y, lam, primal=Wp, dual=Wd).status == "pass"
    assert check_woodbury(Z, Y, lam, dual=Wd).status == "pass"
    # float32 claims (a float32 backend) are judged with float32 tolerances
    Z32, Y32 = Z.astype(np.float32), Y.astype(np.float32)
    Wd32 = Z32.T @ np.linalg.solve(Z32 @ Z32.T + np.float32(lam) * np.eye(n, dtype=np.float32), Y32)
    v = check_woodbury(Z32, Y32, lam, dual=Wd32)
    assert v.dtype == "float32" and v.status in ("pass", "inconclusive")


def test_wrong_woodbury_forms_fail_and_ill_conditioned_is_inconclusive():
    rng = np.random.default_rng(2)
    Z, Y = rng.normal(size=(5, 8)), rng.normal(size=(5, 3))
    lam = 0.5
    wrong = Z.T @ np.linalg.solve(Z @ Z.T + 2 * lam * np.eye(5), Y)  # lam doubled in the dual
    v = check_woodbury(Z, Y, lam, dual=wrong)
    assert v.status == "fail" and v.reason.startswith("woodbury mismatch: W[")
    forgot_transpose = np.linalg.solve(Z.T @ Z + lam * np.eye(8), Z.T @ Y)
    assert check_woodbury(Z, Y, lam, primal=forgot_transpose * 1.001).status == "fail"
    v = check_woodbury(1e4 * Z, Y, 1e-12)  # kappa ~ 1e21: nothing can be compared
    assert v.status == "inconclusive"
    with pytest.raises(InvalidInputError, match="lam="):
        check_woodbury(Z, Y, 0.0)


# ---------------------------------------------------------------------------
# CG vs direct
# ---------------------------------------------------------------------------


@given(st.integers(1, 40), st.floats(1.0, 1e6), st.integers(0, 2**16), st.sampled_from([1e-6, 1e-10, 1e-13]))
def test_reference_cg_agrees_with_the_direct_solve(n, cond, seed, rtol):
    rng = np.random.default_rng(seed)
    A = spd_matrix(rng, n, cond)
    b = rng.normal(size=n)
    # CG's true residual stalls near eps * cond(A): ask only for what is attainable
    rtol = max(rtol, 1e3 * np.finfo(float).eps * cond)
    x, info = conjugate_gradient(lambda v: A @ v, b, rtol=rtol, maxiter=20 * n + 100, what="A")
    v = check_cg_vs_direct(A, b, x, rtol=rtol)
    assert v.status in ("pass", "inconclusive"), v.reason
    if cond * rtol < 1e-3:
        assert v.status == "pass"
    # the Lanczos condition estimate is a lower bound on cond(A)
    assert info.cond_estimate <= np.linalg.cond(A) * (1 + 1e-6)


def test_cg_claiming_more_than_it_did_fails():
    rng = np.random.default_rng(3)
    A = spd_matrix(rng, 30, 1e2)
    b = rng.normal(size=30)
    x, _ = conjugate_gradient(lambda v: A @ v, b, rtol=1e-4, maxiter=500, what="A")
    assert check_cg_vs_direct(A, b, x, rtol=1e-4).status == "pass"
    v = check_cg_vs_direct(A, b, x, rtol=1e-12)
    assert v.status == "fail" and v.reason.startswith("cg_vs_direct mismatch: x[")


# ---------------------------------------------------------------------------
# iMAML implicit-function residuals
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imaml_case():
    model = MLP([1, 6, 1], activation="tanh")
    params = model.init(0)
    tasks = sinusoid(2, 6, 6, seed=3)
    lam = 2.0
    return model, params, tasks, lam, imaml.meta_loss_and_grad_info(model, params, tasks, lam, solver="direct")


def test_reference_imaml_passes_both_residual_checks(imaml_case):
    model, params, tasks, lam, result = imaml_case
    for task, info in zip(tasks, result.tasks):
        v = check_imaml(model, params, task, lam, info.phi, info.grad)
        assert v.status == "pass", v.reason
        assert {d["check"] for d in v.details} == {"imaml_stationarity", "imaml_implicit"}


def test_imaml_bugs_fail(imaml_case):
    model, params, tasks, lam, result = imaml_case
    task, info = tasks[0], result.tasks[0]
    # an inner loop stopped early: phi off by 1e-7
    phi = [p + 1e-7 for p in info.phi]
    v = check_imaml_stationarity(model, params, task, lam, phi)
    assert v.status == "fail" and "not a stationary point" in v.reason
    assert check_imaml(model, params, task, lam, phi, info.grad).status == "fail"
    # first-order shortcut: g = grad L_q(phi) instead of (I + H/lam)^{-1} grad L_q(phi)
    g_fo = model.grad(info.phi, task.x_query, task.y_query)
    v = check_imaml_implicit(model, params, task, lam, info.phi, g_fo)
    assert v.status == "fail" and "(I + H_s(phi)/lam) g != grad L_q(phi)" in v.reason
    # the wrong lam in the linear system (H/(2 lam))
    H = model.hessian(info.phi, task.x_support, task.y_support)
    q = flatten(g_fo)
    g_bad = np.linalg.solve(np.eye(model.n_params) + H / (2 * lam), q)
    shapes = [p.shape for p in params]
    from reference.models import unflatten

    assert check_imaml_implicit(model, params, task, lam, info.phi, unflatten(g_bad, shapes)).status == "fail"


def test_imaml_checks_accept_float32_claims_at_float32_tolerance(imaml_case):
    model, params, tasks, lam, result = imaml_case
    info = result.tasks[0]
    phi32 = [p.astype(np.float32) for p in info.phi]
    g32 = [g.astype(np.float32) for g in info.grad]
    params32 = [p.astype(np.float32) for p in params]
    v = check_imaml(model, params32, tasks[0], lam, phi32, g32)
    assert v.status == "pass" and v.dtype == "float32"
    # judged as float64, the rounding to float32 is far too large
    v64 = check_imaml(model, params, tasks[0], lam, [p.astype(np.float64) for p in phi32], info.grad)
    assert v64.status == "fail"


# ---------------------------------------------------------------------------
# verify/hessian_inverse.py mutation survivors (issue 19): norms, condition numbers and relative
# errors against independent computations and scaling invariances
# ---------------------------------------------------------------------------


def test_symmetric_operator_norm_is_the_spectral_norm():
    # ||A||_2 of a symmetric operator (dense branch, n <= 400) equals numpy's SVD-based 2-norm.
    from verify.hessian_inverse import _sym_extreme_norm

    rng = np.random.default_rng(5)
    M = rng.normal(size=(7, 7))
    A = M + M.T - 3.0 * np.eye(7)  # symmetric, indefinite: the largest |eigenvalue| may be negative
    assert _sym_extreme_norm(lambda v: A @ v, 7) == pytest.approx(np.linalg.norm(A, 2), rel=1e-12)


@pytest.mark.parametrize("c", [1e-6, 1.0, 1e6])
def test_spd_verdict_error_and_cond_do_not_depend_on_scale(c):
    # c A has the same definiteness, relative smallest eigenvalue and condition number as A (cond from
    # numpy's SVD), and a round-off band scaled by c.
    rng = np.random.default_rng(6)
    A = spd_matrix(rng, 5, 100.0)
    ok = check_spd(c * A)
    assert ok.status == "pass" and ok.details[0]["cond"] == pytest.approx(np.linalg.cond(A), rel=1e-8)
    lam_A = np.linalg.eigvalsh(c * A)
    assert ok.details[0]["lambda_min"] == pytest.approx(lam_A[0], rel=1e-8)
    assert ok.details[0]["lambda_max"] == pytest.approx(lam_A[-1], rel=1e-8)
    B = A - (np.linalg.eigvalsh(A)[0] + 1e-6) * np.eye(5)  # smallest eigenvalue -1e-6 (||B|| ~ 1)
    bad = check_spd(c * B)
    lam = np.linalg.eigvalsh(B)
    assert bad.status == "fail" and "indefinite" in bad.reason, bad.reason
    assert bad.details[0]["cond"] == math.inf  # no finite condition number for an indefinite matrix
    assert bad.error == pytest.approx(-lam[0] / max(abs(lam)), rel=1e-6)
    band = bad.details[0]["band"]
    assert band == pytest.approx(c * max(abs(lam)) * bad.tolerance, rel=1e-9)
    assert f"-{band:.2e}" in bad.reason
    Z = rng.normal(size=(2, 5))
    singular = check_spd(c * (Z.T @ Z))  # rank 2 of 5: zero eigenvalues up to round-off
    band = singular.details[0]["band"]
    assert singular.status == "inconclusive" and f"+-{band:.2e}" in singular.reason, singular.reason
    assert 0.0 <= singular.error <= singular.tolerance  # |lambda_min| / ||A|| lies inside the band
    assert band == pytest.approx(c * np.linalg.norm(Z.T @ Z, 2) * singular.tolerance, rel=1e-9)


@pytest.mark.parametrize("c", [2.0**-20, 2.0**20])
def test_backward_error_is_invariant_under_scaling_x_and_b(c):
    # eta = ||b - A x|| / (||A|| ||x|| + ||b||) is homogeneous of degree 0 in (x, b) (Rigal & Gaches).
    rng = np.random.default_rng(7)
    A = spd_matrix(rng, 6, 10.0)
    b = rng.normal(size=6)
    x = np.linalg.solve(A, b) + 1e-6 * rng.normal(size=6)
    assert check_solve(A, c * x, c * b).error == pytest.approx(check_solve(A, x, b).error, rel=1e-12)


def test_woodbury_with_a_claimed_primal_only_and_its_kappa():
    # The dual form is computed here when only the primal is claimed. The claimed primal comes from an
    # independent algorithm (least squares on [Z; sqrt(lam) I] W = [Y; 0]); kappa is the larger 2-norm
    # condition number of Z^T Z + lam I and Z Z^T + lam I (numpy's cond).
    rng = np.random.default_rng(8)
    for n, p, c in ((5, 3, 1.0), (3, 5, 1.0), (4, 4, 10.0)):  # square Z: (s_max^2 + lam) / (s_min^2 + lam), s_min > 2
        Z, Y, lam = c * rng.normal(size=(n, p)), rng.normal(size=(n, 2)), 0.3
        W = np.linalg.lstsq(np.vstack([Z, np.sqrt(lam) * np.eye(p)]), np.vstack([Y, np.zeros((p, 2))]),
                            rcond=None)[0]
        v = check_woodbury(Z, Y, lam, primal=W)
        assert v.status == "pass", v.reason
        kappa = max(np.linalg.cond(Z.T @ Z + lam * np.eye(p)), np.linalg.cond(Z @ Z.T + lam * np.eye(n)))
        assert v.details[0]["kappa"] == pytest.approx(kappa, rel=1e-8)
        wrong = W.copy()
        wrong[1, 1] += 1e-3
        bad = check_woodbury(Z, Y, lam, primal=wrong)
        assert bad.status == "fail" and "W[1, 1]" in bad.reason, bad.reason
        shown = re.search(r"primal=(\S+) dual=(\S+) ", bad.reason)
        assert float(shown.group(1)) == pytest.approx(wrong[1, 1], rel=1e-4), bad.reason
        # the relative difference does not depend on the scale of Y (both forms are linear in Y)
        assert check_woodbury(Z, 1e3 * Y, lam, primal=1e3 * wrong).error == pytest.approx(bad.error, rel=1e-9)


def test_zero_right_hand_sides_and_an_exactly_singular_matrix():
    # b = 0 with x = 0 is an exact solve (backward error 0, not 0/0); Y = 0 gives W = 0 in both ridge
    # forms (difference 0); diag(1, 0) has the eigenvalue 0 exactly: singular, cond infinite, inconclusive.
    rng = np.random.default_rng(10)
    A = spd_matrix(rng, 4, 10.0)
    v = check_solve(A, np.zeros(4), np.zeros(4))
    assert v.status == "pass" and v.error == 0.0, v.reason
    Z = rng.normal(size=(5, 3))
    w = check_woodbury(Z, np.zeros((5, 2)), 0.5)
    assert w.status == "pass" and w.error == 0.0, w.reason
    c = check_cg_vs_direct(A, np.zeros(4), np.zeros(4))
    assert c.status == "pass" and c.error == 0.0, c.reason
    s = check_spd(np.diag([1.0, 0.0]))
    assert s.status == "inconclusive" and s.details[0]["cond"] == math.inf, s.reason


def test_empty_and_zero_matrices():
    with pytest.raises(InvalidInputError, match="square non-empty"):
        check_spd(np.zeros((0, 0)))
    v = check_spd(np.zeros((3, 3)))
    assert v.status == "inconclusive" and "zero matrix" in v.reason, v.reason


# ---------------------------------------------------------------------------
# More verify/hessian_inverse.py survivors (issue 19, session 3): the backward error as the size of an
# explicit perturbation (Rigal & Gaches), the dense/Lanczos norm switch, the documented edges where
# a verdict turns inconclusive, input handling, and the iMAML residuals against dense Hessians.
# ---------------------------------------------------------------------------


def _rigal_gaches_residual(A, x, b, eta):
    """``||(A + dA) x - (b + db)|| / ||b - A x||`` for the perturbation of relative size ``eta`` built from r.

    ``dA = eta ||A||_2 r x^T / (||r|| ||x||)``, ``db = -eta ||b|| r / ||r||`` (Higham 2002, thm 7.1): x solves
    the perturbed system exactly iff ``eta (||A||_2 ||x|| + ||b||) = ||r||``, i.e. iff eta is the normwise
    backward error. ``||A||_2`` from numpy's SVD.
    """
    r = b - A @ x
    rn = np.linalg.norm(r)
    dA = eta * np.linalg.norm(A, 2) * np.outer(r, x) / (rn * np.linalg.norm(x))
    db = -eta * np.linalg.norm(b) * r / rn
    return np.linalg.norm((A + dA) @ x - (b + db)) / rn


def _shifted_laplacian(n, shift):
    """``T - shift I`` with ``T = tridiag(-1, 2, -1)`` as a cheap matrix-free operator, its dense matrix and
    its 2-norm from the closed-form eigenvalues ``2 - 2 cos(k pi / (n + 1))``."""

    def op(u):
        out = (2.0 - shift) * u
        out[1:] -= u[:-1]
        out[:-1] -= u[1:]
        return out

    dense = (2.0 - shift) * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)
    k = np.arange(1, n + 1)
    return op, dense, float(np.max(np.abs(2.0 - 2.0 * np.cos(k * np.pi / (n + 1)) - shift)))


def test_backward_error_is_the_size_of_the_smallest_perturbation_that_makes_x_exact():
    # Dense (general, non-symmetric: ||A||_1 != ||A||_2) and matrix-free (symmetric indefinite, below and
    # at the dense-norm limit): the reported eta builds a perturbation of A and b of exactly that relative
    # size under which x is exact, and no smaller one exists (||r|| <= eta' (||A|| ||x|| + ||b||) for any eta').
    rng = np.random.default_rng(20)
    A = spd_matrix(rng, 6, 50.0) + 0.3 * rng.normal(size=(6, 6))
    b = rng.normal(size=6)
    x = np.linalg.solve(A, b) + 1e-3 * rng.normal(size=6)  # a residual far above round-off
    v = check_solve(A, x, b)
    assert v.status == "fail"
    assert v.details[0]["norm_A"] == pytest.approx(np.linalg.norm(A, 2), rel=1e-12)
    assert _rigal_gaches_residual(A, x, b, v.error) < 1e-10
    # one BLAS thread: the 400 x 400 dense solves take milliseconds, but seconds on a loaded machine
    with threadpool_limits(1, user_api="blas"):
        for n in (3, 400):
            op, S, norm = _shifted_laplacian(n, 2.5)  # eigenvalues in (-2.5, 1.5): ||S|| is |lambda_min|
            bs = rng.normal(size=n)
            xs = np.linalg.solve(S, bs) + 1e-3 * rng.normal(size=n)
            vs = check_solve(op, xs, bs)
            # n <= 400: the exact 2-norm (dense eigenvalues of the assembled operator), not an estimate
            assert vs.details[0]["norm_A"] == pytest.approx(norm, rel=1e-12), n
            assert _rigal_gaches_residual(S, xs, bs, vs.error) < 1e-10


def test_large_matrix_free_norms_are_lanczos_estimates_within_their_tolerance():
    # Above 400 unknowns ||A||_2 of a matrix-free operator (e.g. Hessian-vector products, each a double
    # backward pass) is estimated by Lanczos (ARPACK, relative tolerance 1e-4): within that tolerance, and
    # with far fewer products than the n that assembling A takes (measured: 91 of 401 here). A spectrum
    # uniform in [-1, 1] has no gap at the top, the slow case for Lanczos.
    n = 401
    d = np.linspace(-1.0, 1.0, n)
    calls = []

    def op(u):
        calls.append(1)
        return d * u

    b = np.random.default_rng(21).normal(size=n)
    v = check_solve(op, b / np.where(d == 0, 1.0, d), b * (d != 0))
    assert v.details[0]["norm_A"] == pytest.approx(1.0, rel=1e-4)
    assert len(calls) < n // 2
    op2, _, norm2 = _shifted_laplacian(n, 2.5)  # clustered extreme eigenvalues: Lanczos still within 1e-4
    x2 = np.ones(n)
    assert check_solve(op2, x2, op2(x2)).details[0]["norm_A"] == pytest.approx(norm2, rel=1e-4)


def test_integer_and_boolean_inputs_are_read_as_float64_and_complex_is_rejected():
    A = np.array([[2, 1], [1, 3]])
    x = np.array([1, -2])
    v = check_solve(A, x, A @ x)  # integers: exact solution, backward error exactly 0
    assert v.status == "pass" and v.error == 0.0 and v.dtype == "float64", v.reason
    assert check_spd(np.eye(3, dtype=bool)).status == "pass"
    with pytest.raises(InvalidInputError, match="real floating"):
        check_spd(np.eye(2, dtype=complex))


def test_solve_shapes_must_match():
    A = np.eye(3)
    with pytest.raises(InvalidInputError, match="must match"):
        check_solve(A, np.ones(3), np.ones((3, 1)))
    with pytest.raises(InvalidInputError, match="must match"):
        check_solve(np.eye(2), np.ones((2, 2, 2)), np.ones((2, 2, 2)))


def test_singular_to_working_precision_starts_at_cond_one_over_eps():
    # cond_2(diag(1, d)) = 1/d (numpy's SVD): at cond = 1.5/eps no digit of x is promised (inconclusive),
    # at 0.5/eps the same exact diagonal solve passes.
    eps = np.finfo(np.float64).eps
    for d, status in ((eps / 1.5, "inconclusive"), (2.0 * eps, "pass")):
        A = np.diag([1.0, d])
        assert np.linalg.cond(A) * eps == pytest.approx(1.0 / (d / eps), rel=1e-12)
        b = np.array([1.0, 1.0])
        v = check_solve(A, b / np.diag(A), b)
        assert v.status == status, v.reason
        if status == "inconclusive":
            assert f"1/eps = {1 / eps:.1e}" in v.reason, v.reason


def test_the_forward_error_bound_bounds_the_forward_error():
    # cond(A) * eta bounds ||x - x*|| / ||x*|| (Higham 2002, (7.2)); x* is known exactly (b = A x* in
    # exact arithmetic up to one rounding of b, itself covered by eta). The pass message quotes the bound.
    rng = np.random.default_rng(22)
    A = spd_matrix(rng, 8, 1e4)
    x_true = rng.normal(size=8)
    b = A @ x_true
    x = np.linalg.solve(A, b)
    v = check_solve(A, x, b)
    bound = v.details[0]["forward_error_bound"]
    assert v.status == "pass" and f"forward error <= cond * eta = {bound:.1e}" in v.reason, v.reason
    assert np.linalg.norm(x - x_true) / np.linalg.norm(x_true) <= 2.0 * bound + 4 * np.finfo(float).eps
    mf = check_solve(lambda u: A @ u, x, b)  # matrix-free: cond unknown, no bound claimed
    assert mf.status == "pass" and "forward error" not in mf.reason and math.isnan(mf.details[0]["forward_error_bound"])


def test_spd_errors_are_nonnegative_and_zero_for_an_exactly_symmetric_pass():
    v = check_spd(np.diag([1.0, 1e-17]))  # lambda_min > 0 but inside the round-off band
    assert v.status == "inconclusive" and v.error == 0.0 <= v.tolerance, v.reason
    ok = check_spd(np.diag([2.0, 1.0]))
    assert ok.status == "pass" and ok.error == 0.0, ok.reason
    # the zero matrix is the limit c -> 0 of c diag(1, 0): the same verdict, error and tolerance
    zero, tiny = check_spd(np.zeros((2, 2))), check_spd(1e-150 * np.diag([1.0, 0.0]))
    assert zero.status == tiny.status == "inconclusive"
    assert (zero.error, zero.tolerance) == (tiny.error, tiny.tolerance)


def test_woodbury_inputs_one_dimensional_y_and_shape_messages():
    rng = np.random.default_rng(23)
    Z, y = rng.normal(size=(5, 3)), rng.normal(size=5)
    Wp = np.linalg.lstsq(np.vstack([Z, np.sqrt(0.5) * np.eye(3)]), np.concatenate([y, np.zeros(3)]), rcond=None)[0]
    v1 = check_woodbury(Z, y, 0.5, primal=Wp)  # a 1-D Y is one column
    v2 = check_woodbury(Z, y[:, None], 0.5, primal=Wp[:, None])
    assert v1.status == v2.status == "pass" and v1.error == pytest.approx(v2.error, rel=1e-12, abs=1e-18)
    with pytest.raises(InvalidInputError, match=r"Y has 4 rows but Z has 5"):
        check_woodbury(Z, rng.normal(size=(4, 2)), 0.5)
    Y = rng.normal(size=(5, 2))
    W = np.linalg.solve(Z.T @ Z + 0.5 * np.eye(3), Z.T @ Y)
    with pytest.raises(InvalidInputError, match=r"must have shape \(3, 2\)"):
        check_woodbury(Z, Y, 0.5, primal=W, dual=np.zeros((3, 4)))
    with pytest.raises(InvalidInputError, match=r"must have shape \(3, 2\)"):
        check_woodbury(Z, Y, 0.5, primal=np.zeros((3, 4)), dual=np.zeros((3, 4)))
    # a square Z with s_min < 1: kappa is the (common) condition number of both systems (numpy's cond)
    Q, _ = np.linalg.qr(rng.normal(size=(2, 2)))
    Zs = (Q * np.array([3.0, 0.5])) @ Q.T
    ks = check_woodbury(Zs, rng.normal(size=(2, 1)), 0.3).details[0]["kappa"]
    assert ks == pytest.approx(np.linalg.cond(Zs.T @ Zs + 0.3 * np.eye(2)), rel=1e-10)
    # an empty Z: both ridge matrices are lam I, condition number 1 (numpy's cond)
    e = check_woodbury(np.zeros((0, 3)), np.zeros((0, 2)), 0.5)
    assert e.status == "pass" and e.details[0]["kappa"] == pytest.approx(np.linalg.cond(0.5 * np.eye(3)), rel=1e-12)


def test_woodbury_small_weights_claimed_names_and_the_inconclusive_edge():
    rng = np.random.default_rng(24)
    Z, Y, lam = rng.normal(size=(4, 6)), rng.normal(size=(4, 2)), 0.7
    Wd = Z.T @ np.linalg.solve(Z @ Z.T + lam * np.eye(4), Y)
    wrong = Wd.copy()
    wrong[2, 0] *= 1.0 + 1e-4
    bad = check_woodbury(Z, Y, lam, dual=wrong)
    assert bad.status == "fail" and bad.reason.endswith("claimed: dual"), bad.reason
    # relative: the same mistake on weights 1e-6 times smaller (||W|| << 1) is the same error
    small = check_woodbury(Z, 1e-6 * Y, lam, dual=1e-6 * wrong)
    assert small.status == "fail" and small.error == pytest.approx(bad.error, rel=1e-6, abs=0.0)
    # tol = table x kappa with kappa = 1 + a^2 / lam for Z = diag(a, 0): inconclusive from tol = 1 on
    base = tolerance(np.float64, "reference_match")
    for t, status in ((1.5, "inconclusive"), (0.5, "pass")):
        a = math.sqrt((t / base - 1.0) * 1.0)
        v = check_woodbury(np.diag([a, 0.0]), np.array([[1.0], [1.0]]), 1.0)
        assert v.tolerance == pytest.approx(t, rel=1e-9) and v.status == status, v.reason


def test_cg_vs_direct_edges_shapes_and_the_reported_entry():
    rng = np.random.default_rng(25)
    A = spd_matrix(rng, 6, 1e3)
    b = rng.normal(size=6)
    xd = np.linalg.solve(A, b)
    kappa = np.linalg.cond(A)
    base = tolerance(np.float64, "solve_backward_error")
    w = rng.normal(size=6)
    w /= np.linalg.norm(w)
    # default rtol = the table's backward error: the bound is cond (tol + tol); half of it passes, twice fails
    bound = kappa * 2.0 * base
    assert check_cg_vs_direct(A, b, xd + 0.5 * bound * np.linalg.norm(xd) * w).status == "pass"
    assert check_cg_vs_direct(A, b, xd + 2.0 * bound * np.linalg.norm(xd) * w).status == "fail"
    # a Cholesky solve (another backward-stable algorithm) agrees with LU at the default rtol
    assert check_cg_vs_direct(A, b, scipy.linalg.solve(A, b, assume_a="pos")).status == "pass"
    # the bound reaching 1 (cond x rtol = 1.5): inconclusive, even for the exact answer
    v = check_cg_vs_direct(A, b, xd, rtol=1.5 / kappa)
    assert v.status == "inconclusive" and 1.0 <= v.tolerance < 2.0, v.reason
    # several right-hand sides at once
    B = rng.normal(size=(6, 2))
    assert check_cg_vs_direct(A, B, np.linalg.solve(A, B)).status == "pass"
    # the message names the entry that is off
    k = int(np.argmin(np.abs(xd)))
    x_bad = xd.copy()
    x_bad[k] += 1e-3 * np.linalg.norm(xd)
    v = check_cg_vs_direct(A, b, x_bad)
    assert v.status == "fail" and v.reason.startswith(f"cg_vs_direct mismatch: x[{k}]"), v.reason
    for args in ((np.ones((3, 4)), np.ones(3), np.ones(3)), (np.eye(3), np.ones(4), np.ones(4)),
                 (np.eye(3), np.ones(3), np.ones(4))):
        with pytest.raises(InvalidInputError, match="need"):
            check_cg_vs_direct(*args)


def _dense_stationarity_eta(model, theta, task, lam, phi):
    # The documented backward error with a dense Hessian (model.hessian) and numpy's 2-norm.
    g = flatten(model.grad(phi, task.x_support, task.y_support))
    p, t = flatten(phi), flatten(theta)
    J = model.hessian(phi, task.x_support, task.y_support) + lam * np.eye(p.size)
    F = g + lam * (p - t)
    return np.linalg.norm(F) / (np.linalg.norm(J, 2) * np.linalg.norm(p) + np.linalg.norm(g) + lam * np.linalg.norm(t))


def _dense_implicit_eta(model, task, lam, phi, g_meta):
    g = flatten(g_meta)
    q = flatten(model.grad(phi, task.x_query, task.y_query))
    M = np.eye(g.size) + model.hessian(phi, task.x_support, task.y_support) / lam
    return np.linalg.norm(M @ g - q) / (np.linalg.norm(M, 2) * np.linalg.norm(g) + np.linalg.norm(q))


def test_imaml_backward_errors_match_their_definitions_with_dense_hessians(imaml_case):
    model, params, tasks, lam, result = imaml_case
    task, info = tasks[0], result.tasks[0]
    rng = np.random.default_rng(26)
    small_task = tasks[1]._replace(y_support=1e-3 * tasks[1].y_support, y_query=1e-3 * tasks[1].y_query)
    # (at the reference's own phi and g both residuals are round-off, ~1e-17, and two evaluations of
    # them agree only to round-off: the definitions are compared where the residuals are real)
    cases = [(params, task, [p + 1e-6 * rng.normal(size=p.shape) for p in info.phi],
              [g * (1 + 1e-5) for g in info.grad]),
             # small scales (all norms << 1): relative errors must not turn into absolute ones
             ([1e-2 * p for p in params], small_task, [1e-2 * p + 1e-9 for p in params],
              [1e-4 * g for g in info.grad])]
    for theta, tk, phi, g in cases:
        s = check_imaml_stationarity(model, theta, tk, lam, phi)
        assert s.error == pytest.approx(_dense_stationarity_eta(model, theta, tk, lam, phi), rel=1e-8, abs=0.0)
        i = check_imaml_implicit(model, theta, tk, lam, phi, g)
        assert i.error == pytest.approx(_dense_implicit_eta(model, tk, lam, phi, g), rel=1e-8, abs=0.0)


def test_imaml_at_an_exactly_stationary_origin():
    # theta = phi = 0 with zero-mean targets: every gradient vanishes, both residuals are exactly 0
    # (backward error 0, not 0/0), whatever the Hessian.
    model = MLP([1, 3, 1], activation="tanh")
    zeros = [np.zeros_like(p) for p in model.init(0)]
    x, y = np.array([[0.5], [-2.0]]), np.array([[1.0], [-1.0]])
    from reference.tasks import Task

    task = Task(x, y, x, y)
    assert np.all(flatten(model.grad(zeros, x, y)) == 0.0)
    v = check_imaml(model, zeros, task, 1.5, zeros, zeros)
    assert v.status == "pass" and v.error == 0.0, v.reason


def test_imaml_input_checks():
    model = MLP([1, 3, 1], activation="tanh")
    params = model.init(0)
    task = sinusoid(1, 4, 4, seed=0)[0]
    for lam in (0.0, -0.5, -1.0, math.inf):
        with pytest.raises(InvalidInputError, match="lam="):
            check_imaml_stationarity(model, params, task, lam, params)
    with pytest.raises(InvalidInputError, match="real floating"):
        check_imaml_stationarity(model, params, task, 1.0, [np.ones(p.shape, dtype=int) for p in params])


def test_imaml_combined_verdict_is_the_worse_part_by_error_over_tolerance(imaml_case):
    model, params, tasks, lam, result = imaml_case
    task, info = tasks[0], result.tasks[0]
    rng = np.random.default_rng(27)

    def parts(phi, g, **kw):
        return (check_imaml_stationarity(model, params, task, lam, phi, tol=kw.get("inner_tol")),
                check_imaml_implicit(model, params, task, lam, phi, g, rtol=kw.get("rtol")))

    g_off = [g + 1e-4 * np.linalg.norm(flatten(info.grad)) * rng.normal(size=g.shape) for g in info.grad]
    phi_off = [p + 3e-13 * rng.normal(size=p.shape) for p in info.phi]
    g_tiny = [g * (1 + 3e-14) + 1e-14 * rng.normal(size=g.shape) for g in info.grad]
    # (a) stationarity worse by error/tolerance while implicit has the larger error x tolerance;
    # (b) implicit worse (the second part)
    for phi, g, kw in ((phi_off, g_off, {"rtol": 1e-2}), (info.phi, g_tiny, {})):
        s, i = parts(phi, g, **kw)
        assert s.status == i.status == "pass", (s.reason, i.reason)
        worse = max((s, i), key=lambda p: p.error / p.tolerance)
        v = check_imaml(model, params, task, lam, phi, g, rtol=kw.get("rtol"))
        assert (v.error, v.tolerance) == (worse.error, worse.tolerance)
        assert s.reason in v.reason and i.reason in v.reason  # both passes are reported
    s, i = parts(phi_off, g_off, rtol=1e-2)
    assert s.error / s.tolerance > i.error / i.tolerance and s.error * s.tolerance < i.error * i.tolerance
    s, i = parts(info.phi, g_tiny)
    assert i.error / i.tolerance > s.error / s.tolerance
    # a failing part: the verdict reports it, not the passing one
    s, i = parts(info.phi, g_off)
    v = check_imaml(model, params, task, lam, info.phi, g_off)
    assert v.status == "fail" and s.status == "pass" and i.status == "fail"
    assert v.reason == i.reason
