"""Checks of Hessian-inverse (linear-solve) computations, each returning a :class:`verify.Verdict`.

The Hessian-inverse family of meta-learning (iMAML, R2-D2, LR-D2, Newton-MAML)
trusts linear solves. These checks judge a *claimed* result, from the NumPy
reference or from a PyTorch/JAX backend (pass NumPy arrays; float32 inputs are
judged with float32 tolerances), by the backward/forward error analysis of
numerical linear algebra (Higham, *Accuracy and Stability of Numerical
Algorithms*, 2nd ed., ch. 7):

* :func:`check_spd` -- symmetric positive definiteness where a method
  assumes it (CG, Cholesky, the minimum of iMAML's inner problem).
* :func:`check_solve` -- the normwise backward error
  ``eta = ||b - A x|| / (||A|| ||x|| + ||b||)`` of a claimed solution
  (Rigal & Gaches 1967). A backward-stable solve has ``eta = O(eps)`` whatever
  ``cond(A)``; the forward error is then at most ``cond(A) * eta``.
* :func:`check_woodbury` -- R2-D2's primal ``(Z^T Z + lam I)^{-1} Z^T Y``
  and dual (Woodbury) ``Z^T (Z Z^T + lam I)^{-1} Y`` forms agree to within
  ``cond * tol``.
* :func:`check_cg_vs_direct` -- a conjugate-gradient solution agrees with a
  direct solve within the forward-error bound ``cond(A) (rtol + tol)``.
* :func:`check_imaml_stationarity`, :func:`check_imaml_implicit`,
  :func:`check_imaml` -- the implicit-function-theorem residuals of iMAML:
  the inner solution is stationary (``grad L_s(phi) + lam (phi - theta) = 0``)
  and the meta-gradient solves ``(I + H_s(phi)/lam) g = grad L_q(phi)``. The
  implicit formula is wrong at a non-stationary point, so a non-stationary
  ``phi`` fails even when the linear solve is perfect.

Residuals are evaluated in float64 from the claimed (possibly float32) values,
so the check's own rounding is far below the tolerance it applies. Tolerances
come from :func:`verify.tolerance.tolerance`: ``"solve_backward_error"`` for
backward errors, ``"reference_match"`` times the condition number for forward
comparisons. A comparison whose tolerance reaches 1 (the matrix is singular to
working precision, so no digit is expected) is ``"inconclusive"``.

Length: the module is a little over 500 lines because the six checks share
their backward/forward error helpers and verdict wording; splitting them would
spread one error analysis over several files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.sparse.linalg
from numpy.typing import ArrayLike

from reference.errors import InvalidInputError
from reference.formatting import number
from reference.models import flatten
from reference.tasks import Task, check_tasks
from verify._verdict import FAIL, INCONCLUSIVE, PASS, Verdict, combine_statuses
from verify.tolerance import precision_dtype, tolerance

__all__ = [
    "check_cg_vs_direct",
    "check_imaml",
    "check_imaml_implicit",
    "check_imaml_stationarity",
    "check_solve",
    "check_spd",
    "check_woodbury",
]

# Matrices up to this order get an exact 2-norm (dense SVD / eigenvalues); above it,
# Lanczos (ARPACK) estimates the extreme eigenvalue of a symmetric operator.
_DENSE_NORM_LIMIT = 400


def _array(name: str, value: Any, ndim: int | None = None) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except Exception as exc:  # pragma: no cover - exotic objects
        raise InvalidInputError(f"{name} could not be converted to an array: {exc}") from exc
    if not np.issubdtype(arr.dtype, np.floating):
        if np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool:
            arr = arr.astype(np.float64)
        else:
            raise InvalidInputError(f"{name} must be a real floating array, got dtype {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise InvalidInputError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise InvalidInputError(f"{name} contains NaN or inf; a claimed solve with non-finite entries is wrong")
    return arr


def _eps(dtype: np.dtype) -> float:
    return float(np.finfo(dtype).eps)


def _norm2(A: np.ndarray) -> float:
    return float(np.linalg.norm(A, 2)) if A.size else 0.0


def _sym_extreme_norm(matvec: Callable[[np.ndarray], np.ndarray], n: int) -> float:
    """``||A||_2`` of a symmetric operator: exact when small, Lanczos (ARPACK) otherwise."""
    if n <= _DENSE_NORM_LIMIT:
        A = np.column_stack([matvec(e) for e in np.eye(n)])
        return float(np.max(np.abs(np.linalg.eigvalsh(0.5 * (A + A.T)))))
    op = scipy.sparse.linalg.LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(0).normal(size=n)
    vals = scipy.sparse.linalg.eigsh(op, k=1, which="LM", tol=1e-4, v0=v0, return_eigenvectors=False)
    return float(np.max(np.abs(vals)))


def _fmt(x: float) -> str:
    return number(x)


def _worst_entry(a: np.ndarray, b: np.ndarray) -> str:
    idx = np.unravel_index(int(np.argmax(np.abs(a - b))), a.shape) if a.ndim else ()
    return f"[{', '.join(str(int(i)) for i in idx)}]" if idx else ""


# ---------------------------------------------------------------------------
# Dense-matrix checks
# ---------------------------------------------------------------------------


def check_spd(A: ArrayLike, *, name: str = "A") -> Verdict:
    """Is ``A`` symmetric positive definite to working precision?

    * symmetric: ``||A - A^T||_F / ||A||_F <= tolerance(dtype, "reference_match")``
      (``H_ij`` and ``H_ji`` are two roundings of the same number);
    * positive definite: the smallest eigenvalue of ``(A + A^T)/2`` exceeds the
      round-off band ``tolerance(dtype, "solve_backward_error") * ||A||_2``.

    Returns ``"fail"`` when ``A`` is asymmetric or has an eigenvalue below
    ``-band`` (indefinite), ``"inconclusive"`` when the smallest eigenvalue
    lies inside the band (singular to working precision: the sign is
    round-off), else ``"pass"``. ``details`` hold the extreme eigenvalues and
    ``cond``.
    """
    A_in = _array(name, A, ndim=2)
    if A_in.shape[0] != A_in.shape[1] or A_in.shape[0] == 0:
        raise InvalidInputError(f"{name} has shape {A_in.shape}; a square non-empty matrix is needed")
    dtype = precision_dtype(A_in.dtype)
    A64 = A_in.astype(np.float64)
    fro = float(np.linalg.norm(A64))
    band_rel = tolerance(dtype, "solve_backward_error")
    if fro == 0:
        # the limit c -> 0 of c B for a singular B: lambda_min = 0 lies in the band, as for any singular A
        return Verdict(INCONCLUSIVE, "spd", 0.0, band_rel, f"{name} is the zero matrix: singular, not positive "
                       "definite", dtype.name)
    asym = float(np.linalg.norm(A64 - A64.T)) / fro
    tol_sym = tolerance(dtype, "reference_match")
    eig = np.linalg.eigvalsh(0.5 * (A64 + A64.T))
    lo, hi = float(eig[0]), float(eig[-1])
    norm = max(abs(lo), abs(hi))
    cond = hi / lo if lo > 0 else math.inf
    details = ({"asymmetry": asym, "lambda_min": lo, "lambda_max": hi, "cond": cond, "band": band_rel * norm},)
    if asym > tol_sym:
        i, j = np.unravel_index(int(np.argmax(np.abs(A64 - A64.T))), A64.shape)
        return Verdict(FAIL, "spd", asym, tol_sym, (
            f"spd check failed: {name} is not symmetric: {name}[{i}, {j}]={_fmt(A64[i, j])} but "
            f"{name}[{j}, {i}]={_fmt(A64[j, i])}; ||A - A^T||/||A||={asym:.2e} (tol {tol_sym:.1e}, {dtype.name})"),
            dtype.name, details=details)
    rel_lo = -lo / norm
    if lo < -band_rel * norm:
        return Verdict(FAIL, "spd", rel_lo, band_rel, (
            f"spd check failed: {name} is indefinite: smallest eigenvalue {_fmt(lo)} (largest {_fmt(hi)}) is "
            f"below the round-off band -{band_rel * norm:.2e} ({dtype.name}); a method that assumes positive "
            "definiteness (CG, Cholesky, a minimum) is invalid here"), dtype.name, details=details)
    if lo <= band_rel * norm:
        return Verdict(INCONCLUSIVE, "spd", max(rel_lo, 0.0), band_rel, (
            f"{name} is singular to working precision: smallest eigenvalue {_fmt(lo)} lies within the round-off "
            f"band +-{band_rel * norm:.2e} of 0 ({dtype.name}); its definiteness cannot be decided"),
            dtype.name, details=details)
    return Verdict(PASS, "spd", max(asym, 0.0), tol_sym, (
        f"{name} is symmetric (asymmetry {asym:.1e}) and positive definite: eigenvalues in "
        f"[{_fmt(lo)}, {_fmt(hi)}], cond {cond:.3g}"), dtype.name, details=details)


def check_solve(
    A: ArrayLike | Callable[[np.ndarray], np.ndarray],
    x: ArrayLike,
    b: ArrayLike,
    *,
    rtol: float | None = None,
    cond: float | None = None,
    name: str = "A",
) -> Verdict:
    """Is ``x`` a solution of ``A x = b`` to the accuracy its dtype and ``cond(A)`` allow?

    The normwise backward error ``eta = ||b - A x||_2 / (||A||_2 ||x||_2 + ||b||_2)``
    (Rigal & Gaches 1967; Higham 2002, thm 7.1) is the smallest relative
    perturbation of ``A`` and ``b`` for which ``x`` is exact. A backward-stable
    solver (LU with pivoting, Cholesky) gives ``eta <= c(n) eps`` regardless of
    ``cond(A)``; an iterative solver stopped at relative residual ``rtol`` gives
    ``eta <= rtol``. So

    * ``"fail"`` when ``eta > max(tolerance(dtype, "solve_backward_error"), rtol)``:
      no rounding explains the residual (wrong matrix, transposed operand,
      unconverged iteration);
    * ``"inconclusive"`` when ``eta`` is fine but ``cond(A) * eps >= 1``: ``A``
      is singular to working precision, so the forward error bound
      ``cond(A) * eta`` promises no correct digit;
    * ``"pass"`` otherwise; ``details`` give ``cond`` and the forward error
      bound ``cond * eta``.

    Args:
        A: the matrix, or a function ``v -> A v`` of a *symmetric* operator
            (its norm is then estimated by Lanczos).
        x: the claimed solution, shape ``(n,)`` or ``(n, k)``.
        b: the right-hand side, same shape as ``x``.
        rtol: the relative residual the producing solver was asked for (CG).
        cond: ``cond_2(A)`` if known; computed for a dense ``A``, else skipped.
        name: the matrix's name in messages.
    """
    x_in, b_in = _array("x", x), _array("b", b)
    if x_in.shape != b_in.shape or x_in.ndim not in (1, 2):
        raise InvalidInputError(f"x has shape {x_in.shape} and b {b_in.shape}; they must match, (n,) or (n, k)")
    n = x_in.shape[0]
    if callable(A):
        dtype = precision_dtype(x_in.dtype, b_in.dtype)

        def matvec(v):
            return np.asarray(A(v), dtype=np.float64)

        a_norm = _sym_extreme_norm(matvec, n)
        x64 = x_in.astype(np.float64)
        Ax = matvec(x64) if x64.ndim == 1 else np.column_stack([matvec(c) for c in x64.T])
    else:
        A_in = _array(name, A, ndim=2)
        if A_in.shape != (n, n):
            raise InvalidInputError(f"{name} has shape {A_in.shape} but x has {n} rows; A must be ({n}, {n})")
        dtype = precision_dtype(A_in.dtype, x_in.dtype, b_in.dtype)
        A64 = A_in.astype(np.float64)
        a_norm = _norm2(A64)
        x64 = x_in.astype(np.float64)
        Ax = A64 @ x64
        if cond is None:
            cond = float(np.linalg.cond(A64))
    b64 = b_in.astype(np.float64)
    r = np.linalg.norm(b64 - Ax)
    denom = a_norm * np.linalg.norm(x64) + np.linalg.norm(b64)
    eta = float(r / denom) if denom > 0 else 0.0
    tol = tolerance(dtype, "solve_backward_error")
    allowed = max(tol, float(rtol) if rtol is not None else 0.0)
    bound = cond * eta if cond is not None else math.nan
    details = ({"backward_error": eta, "cond": cond, "forward_error_bound": bound, "norm_A": a_norm,
                "residual": float(r)},)
    if eta > allowed:
        why = f"rtol {rtol:g}" if rtol is not None and rtol > tol else f"tol {tol:.1e}, {dtype.name}"
        return Verdict(FAIL, "solve_backward_error", eta, allowed, (
            f"solve check failed: the claimed solution of {name} x = b has backward error "
            f"||b - A x||/(||A|| ||x|| + ||b||) = {eta:.2e} > {allowed:.1e} ({why}); a backward-stable solve "
            "would reach it whatever cond(A), so x is not the solution of this system"), dtype.name,
            details=details)
    if cond is not None and cond * _eps(dtype) >= 1.0:
        return Verdict(INCONCLUSIVE, "solve_backward_error", eta, allowed, (
            f"{name} is singular to working precision (cond {cond:.2e} >= 1/eps = {1 / _eps(dtype):.1e}, "
            f"{dtype.name}): the backward error {eta:.1e} is small but bounds no digit of x"), dtype.name,
            details=details)
    tail = f"; forward error <= cond * eta = {bound:.1e}" if cond is not None else ""
    return Verdict(PASS, "solve_backward_error", eta, allowed,
                   f"backward error {eta:.1e} <= {allowed:.1e} ({dtype.name}){tail}", dtype.name, details=details)


def _ridge64(Z: np.ndarray, Y: np.ndarray, lam: float, form: str) -> np.ndarray:
    n, p = Z.shape
    if form == "primal":
        return np.linalg.solve(Z.T @ Z + lam * np.eye(p), Z.T @ Y)
    return Z.T @ np.linalg.solve(Z @ Z.T + lam * np.eye(n), Y)


def check_woodbury(
    Z: ArrayLike,
    Y: ArrayLike,
    lam: float,
    *,
    primal: ArrayLike | None = None,
    dual: ArrayLike | None = None,
) -> Verdict:
    """Do the primal and Woodbury (dual) ridge solutions agree?

    ``W_primal = (Z^T Z + lam I_p)^{-1} Z^T Y`` and
    ``W_dual = Z^T (Z Z^T + lam I_n)^{-1} Y`` are equal in exact arithmetic
    (the push-through identity). Pass the claimed ``primal`` and/or ``dual``
    (e.g. from a backend); a missing one is computed here in float64. The
    normwise difference ``||W_p - W_d||_F / max(||W_p||_F, ||W_d||_F)`` must be
    within ``tolerance(dtype, "reference_match", condition=kappa)``, with
    ``kappa = (s_max^2 + lam) / (s_min^2 + lam)`` the larger condition number of
    the two systems (from the singular values of ``Z``; ``s_min = 0`` for the
    larger system when ``Z`` is not square). ``"inconclusive"`` when that
    tolerance reaches 1 (no digit expected).
    """
    Z_in, Y_in = _array("Z", Z, ndim=2), _array("Y", Y)
    if Y_in.ndim == 1:
        Y_in = Y_in[:, None]
    if Y_in.shape[0] != Z_in.shape[0]:
        raise InvalidInputError(f"Y has {Y_in.shape[0]} rows but Z has {Z_in.shape[0]}; they must match")
    lam_f = float(lam)
    if not lam_f > 0 or not math.isfinite(lam_f):
        raise InvalidInputError(f"lam={lam!r} must be a finite ridge > 0")
    arrays = {k: _array(k, v) for k, v in (("primal", primal), ("dual", dual)) if v is not None}
    dtype = precision_dtype(Z_in.dtype, Y_in.dtype, *(a.dtype for a in arrays.values()))
    Z64, Y64 = Z_in.astype(np.float64), Y_in.astype(np.float64)
    n, p = Z64.shape
    Wp = arrays["primal"].astype(np.float64).reshape(p, -1) if "primal" in arrays else _ridge64(Z64, Y64, lam_f,
                                                                                                 "primal")
    Wd = arrays["dual"].astype(np.float64).reshape(p, -1) if "dual" in arrays else _ridge64(Z64, Y64, lam_f, "dual")
    if Wp.shape != (p, Y64.shape[1]) or Wd.shape != Wp.shape:
        raise InvalidInputError(f"primal/dual weights must have shape ({p}, {Y64.shape[1]})")
    s = np.linalg.svd(Z64, compute_uv=False)
    smax2 = float(s[0] ** 2) if s.size else 0.0
    s_min_primal = float(s[-1] ** 2) if n >= p and s.size else 0.0
    s_min_dual = float(s[-1] ** 2) if p >= n and s.size else 0.0
    kappa = max((smax2 + lam_f) / (s_min_primal + lam_f), (smax2 + lam_f) / (s_min_dual + lam_f))
    scale = max(float(np.linalg.norm(Wp)), float(np.linalg.norm(Wd)))
    diff = float(np.linalg.norm(Wp - Wd)) / scale if scale > 0 else 0.0
    tol = tolerance(dtype, "reference_match", condition=kappa)
    where = _worst_entry(Wp, Wd)
    details = ({"kappa": kappa, "difference": diff, "claimed": [k for k in arrays], "n": n, "p": p},)
    if tol >= 1.0:
        return Verdict(INCONCLUSIVE, "woodbury", diff, tol, (
            f"the ridge systems are too ill-conditioned to compare primal and dual forms in {dtype.name} "
            f"(kappa {kappa:.2e}: tolerance {tol:.1e} >= 1); increase lam"), dtype.name, details=details)
    if diff > tol:
        idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(np.abs(Wp - Wd))), Wp.shape))
        return Verdict(FAIL, "woodbury", diff, tol, (
            f"woodbury mismatch: W{where} primal={_fmt(Wp[idx])} dual={_fmt(Wd[idx])} "
            f"rel={diff:.2e} (tol {tol:.1e} = table x kappa {kappa:.2e}, {dtype.name}); "
            f"claimed: {', '.join(arrays) or 'none'}"), dtype.name, details=details)
    return Verdict(PASS, "woodbury", diff, tol,
                   f"primal and dual ridge weights agree: rel {diff:.1e} <= {tol:.1e} (kappa {kappa:.2e}, "
                   f"{dtype.name})", dtype.name, details=details)


def check_cg_vs_direct(
    A: ArrayLike,
    b: ArrayLike,
    x_cg: ArrayLike,
    *,
    x_direct: ArrayLike | None = None,
    rtol: float | None = None,
) -> Verdict:
    """Does a conjugate-gradient solution agree with a direct solve of ``A x = b``?

    CG stopped at relative residual ``rtol`` has forward error at most
    ``cond(A) * rtol`` (``||x - x*|| / ||x*|| <= cond(A) ||r|| / ||b||``); the
    direct solve's own error is ``cond(A) * O(eps)``. So the normwise
    difference must be within ``cond(A) * (rtol + tolerance(dtype,
    "solve_backward_error"))``. ``x_direct`` defaults to a float64 LU solve
    here; ``rtol`` defaults to the table's backward-error tolerance.
    ``"inconclusive"`` when that bound reaches 1.
    """
    A_in, b_in, x_in = _array("A", A, ndim=2), _array("b", b), _array("x_cg", x_cg)
    n = A_in.shape[0]
    if A_in.shape != (n, n) or b_in.shape[:1] != (n,) or x_in.shape != b_in.shape:
        raise InvalidInputError(f"A {A_in.shape}, b {b_in.shape}, x_cg {x_in.shape}: need (n, n), (n,), (n,)")
    arrays = [A_in.dtype, b_in.dtype, x_in.dtype]
    if x_direct is not None:
        xd_in = _array("x_direct", x_direct)
        arrays.append(xd_in.dtype)
        xd = xd_in.astype(np.float64)
    dtype = precision_dtype(*arrays)
    A64 = A_in.astype(np.float64)
    if x_direct is None:
        xd = np.linalg.solve(A64, b_in.astype(np.float64))
    kappa = float(np.linalg.cond(A64))
    base = tolerance(dtype, "solve_backward_error")
    rt = base if rtol is None else float(rtol)
    tol = kappa * (rt + base) if math.isfinite(kappa) else math.inf
    scale = float(np.linalg.norm(xd))
    xc = x_in.astype(np.float64)
    diff = float(np.linalg.norm(xc - xd)) / scale if scale > 0 else float(np.linalg.norm(xc))
    details = ({"cond": kappa, "difference": diff, "rtol": rt},)
    if not tol < 1.0:
        return Verdict(INCONCLUSIVE, "cg_vs_direct", diff, tol, (
            f"A is too ill-conditioned to compare CG with a direct solve (cond {kappa:.2e}, rtol {rt:.1e}: "
            f"forward-error bound {tol:.1e} >= 1, {dtype.name})"), dtype.name, details=details)
    if diff > tol:
        k = int(np.argmax(np.abs(xc - xd)))
        return Verdict(FAIL, "cg_vs_direct", diff, tol, (
            f"cg_vs_direct mismatch: x[{k}] cg={_fmt(xc.ravel()[k])} direct={_fmt(xd.ravel()[k])} rel={diff:.2e} "
            f"(bound cond x (rtol + tol) = {kappa:.2e} x ({rt:.1e} + {base:.1e}) = {tol:.1e}, {dtype.name})"),
            dtype.name, details=details)
    return Verdict(PASS, "cg_vs_direct", diff, tol,
                   f"CG and direct solutions agree: rel {diff:.1e} <= {tol:.1e} (cond {kappa:.2e})", dtype.name,
                   details=details)


# ---------------------------------------------------------------------------
# iMAML implicit-function residuals
# ---------------------------------------------------------------------------


def _imaml_inputs(model, params, task, lam, phi, g_meta=None):
    # The claimed values decide the dtype row; everything is then evaluated in float64.
    claimed = [np.asarray(p) for p in phi] + ([np.asarray(g) for g in g_meta] if g_meta is not None else [])
    claimed += [np.asarray(p) for p in params]
    for i, c in enumerate(claimed):
        if not np.issubdtype(c.dtype, np.floating):
            raise InvalidInputError(
                f"phi/g_meta/params entry {i} has dtype {c.dtype}; real floating arrays are needed"
            )
    dtype = precision_dtype(*(c.dtype for c in claimed))
    theta = [np.asarray(p, dtype=np.float64) for p in model.check_params(params)]
    phi64 = model.check_params([np.asarray(p, dtype=np.float64) for p in phi], name="phi")
    g64 = None if g_meta is None else model.check_params([np.asarray(g, dtype=np.float64) for g in g_meta],
                                                         name="g_meta")
    (task,) = check_tasks(model, [task])
    lam_f = float(lam)
    if not lam_f > 0 or not math.isfinite(lam_f):
        raise InvalidInputError(f"lam={lam!r} must be a finite proximal weight > 0")
    return theta, phi64, g64, task, lam_f, dtype


def _hess_op(model, phi, x, y, shapes):
    from reference.models import unflatten

    def matvec(v):
        return flatten(model.hvp(phi, x, y, unflatten(np.asarray(v, dtype=np.float64).ravel(), shapes)))

    return matvec


def check_imaml_stationarity(
    model: Any, params: Sequence[ArrayLike], task: Task, lam: float, phi: Sequence[ArrayLike], *,
    tol: float | None = None,
) -> Verdict:
    """Is ``phi`` a stationary point of iMAML's inner objective ``L_s(phi) + lam/2 ||phi - theta||^2``?

    The implicit meta-gradient ``(I + H_s/lam)^{-1} grad L_q`` is exact only
    at ``F(phi) = grad L_s(phi) + lam (phi - theta) = 0``. The normwise backward
    error of that equation,
    ``eta = ||F(phi)|| / (||H_s(phi) + lam I||_2 ||phi|| + ||grad L_s(phi)|| + lam ||theta||)``,
    is what rounding ``phi`` to the working precision can leave (the first term)
    plus the rounding of the gradient terms; it must be within
    ``tolerance(dtype, "solve_backward_error")`` (or the given ``tol``, e.g. an
    inner solver's own tolerance, if larger).
    """
    theta, phi64, _, task, lam_f, dtype = _imaml_inputs(model, params, task, lam, phi)
    shapes = [p.shape for p in theta]
    g_s = flatten(model.grad(phi64, task.x_support, task.y_support))
    p_flat, t_flat = flatten(phi64), flatten(theta)
    F = g_s + lam_f * (p_flat - t_flat)
    hop = _hess_op(model, phi64, task.x_support, task.y_support, shapes)
    j_norm = _sym_extreme_norm(lambda v: hop(v) + lam_f * v, p_flat.size)
    scale = j_norm * np.linalg.norm(p_flat) + np.linalg.norm(g_s) + lam_f * np.linalg.norm(t_flat)
    res = float(np.linalg.norm(F))
    eta = float(res / scale) if scale > 0 else res
    base = tolerance(dtype, "solve_backward_error")
    allowed = max(base, float(tol) if tol is not None else 0.0)
    details = ({"residual": res, "backward_error": eta, "norm_J": j_norm, "scale": float(scale)},)
    if eta > allowed:
        k = int(np.argmax(np.abs(F)))
        return Verdict(FAIL, "imaml_stationarity", eta, allowed, (
            f"imaml stationarity failed: phi is not a stationary point of L_s + lam/2 ||phi - theta||^2: "
            f"||grad L_s(phi) + lam (phi - theta)|| = {res:.2e} (worst entry {k}: {_fmt(F[k])}), backward error "
            f"{eta:.2e} > {allowed:.1e} ({dtype.name}); the implicit meta-gradient is not exact there: solve the "
            "inner problem more accurately"), dtype.name, details=details)
    return Verdict(PASS, "imaml_stationarity", eta, allowed,
                   f"phi is stationary: ||grad L_s(phi) + lam (phi - theta)|| = {res:.1e}, backward error "
                   f"{eta:.1e} <= {allowed:.1e} ({dtype.name})", dtype.name, details=details)


def check_imaml_implicit(
    model: Any, params: Sequence[ArrayLike], task: Task, lam: float, phi: Sequence[ArrayLike],
    g_meta: Sequence[ArrayLike], *, rtol: float | None = None,
) -> Verdict:
    """Does ``g_meta`` solve ``(I + H_s(phi)/lam) g = grad L_q(phi)``?

    The backward error ``||M g - q|| / (||M||_2 ||g|| + ||q||)`` with
    ``M = I + H_s(phi)/lam`` (applied by Hessian-vector products) and
    ``q = grad L_q(phi)`` must be within ``tolerance(dtype,
    "solve_backward_error")``, or ``rtol`` for a CG solve stopped at that
    relative residual. ``g_meta`` is one task's meta-gradient (for a
    meta-batch, check the tasks one by one).
    """
    theta, phi64, g64, task, lam_f, dtype = _imaml_inputs(model, params, task, lam, phi, g_meta)
    shapes = [p.shape for p in theta]
    q = flatten(model.grad(phi64, task.x_query, task.y_query))
    hop = _hess_op(model, phi64, task.x_support, task.y_support, shapes)

    def mop(v):
        return v + hop(v) / lam_f

    g = flatten(g64)
    r = mop(g) - q
    m_norm = _sym_extreme_norm(mop, g.size)
    denom = m_norm * np.linalg.norm(g) + np.linalg.norm(q)
    res = float(np.linalg.norm(r))
    eta = float(res / denom) if denom > 0 else res
    base = tolerance(dtype, "solve_backward_error")
    allowed = max(base, float(rtol) if rtol is not None else 0.0)
    details = ({"residual": res, "backward_error": eta, "norm_M": m_norm},)
    if eta > allowed:
        k = int(np.argmax(np.abs(r)))
        return Verdict(FAIL, "imaml_implicit", eta, allowed, (
            f"imaml implicit residual failed: (I + H_s(phi)/lam) g != grad L_q(phi): residual {res:.2e} "
            f"(worst entry {k}: {_fmt(r[k])}), backward error {eta:.2e} > {allowed:.1e} ({dtype.name})"),
            dtype.name, details=details)
    return Verdict(PASS, "imaml_implicit", eta, allowed,
                   f"(I + H_s/lam) g = grad L_q holds: backward error {eta:.1e} <= {allowed:.1e} ({dtype.name})",
                   dtype.name, details=details)


def check_imaml(
    model: Any, params: Sequence[ArrayLike], task: Task, lam: float, phi: Sequence[ArrayLike],
    g_meta: Sequence[ArrayLike], *, inner_tol: float | None = None, rtol: float | None = None,
) -> Verdict:
    """Both iMAML residuals for one task: stationarity of ``phi`` and the implicit linear system.

    ``"fail"`` if either fails (a perfect linear solve at a non-stationary
    ``phi`` is still a wrong meta-gradient); the verdict's ``error`` and
    ``tolerance`` are those of the worse of the two (largest error/tolerance).
    """
    parts = [
        check_imaml_stationarity(model, params, task, lam, phi, tol=inner_tol),
        check_imaml_implicit(model, params, task, lam, phi, g_meta, rtol=rtol),
    ]
    status = combine_statuses([p.status for p in parts])
    worst = max(parts, key=lambda p: p.error / p.tolerance if p.tolerance > 0 else math.inf)
    reason = "; ".join(p.reason for p in parts if p.status == status) or worst.reason
    details = tuple({"check": p.check, "status": p.status, **p.details[0]} for p in parts)
    return Verdict(status, "imaml", worst.error, worst.tolerance, reason, worst.dtype, details=details)
