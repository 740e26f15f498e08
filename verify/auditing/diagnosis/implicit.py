"""Diagnosis variants of iMAML: the implicit system solved wrongly or truncated.

From per-task pieces (``phi*``, ``grad L_q(phi*)``, the eigendecomposition of
``H_s(phi*)``): fitted ``(c I + H/lam') x = grad L_q`` by least squares over
``(c, 1/lam')``, its named special cases (first-order iMAML, no identity term,
``lam`` where ``1/lam`` belongs), and conjugate gradient stopped after ``m``
iterations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from reference.models import MAX_DENSE_HESSIAN, flatten
from verify.algorithms import Case
from verify.auditing.diagnosis.catalogue import Candidate, close, match_error, rerun, safe, swapped

__all__ = ["fitted", "variants"]

Variant = tuple[str, str, Callable[[], tuple[Any, np.ndarray]]]


@dataclass
class _ImamlTask:
    b: np.ndarray
    w: np.ndarray
    Q: np.ndarray
    H: np.ndarray

    @property
    def y(self) -> np.ndarray:
        return self.Q.T @ self.b


def _imaml_pieces(case: Case) -> list[_ImamlTask] | None:
    from reference import imaml

    if case.model.n_params > MAX_DENSE_HESSIAN:
        return None
    result = imaml.meta_loss_and_grad_info(case.model, case.params, case.tasks, case.hyper["lam"])
    out = []
    for t, info in zip(case.tasks, result.tasks):
        _, gq = case.model.loss_and_grad_unchecked(info.phi, t.x_query, t.y_query)
        H = case.model.hessian(info.phi, t.x_support, t.y_support)
        H = 0.5 * (H + H.T)
        w, Q = np.linalg.eigh(H)
        out.append(_ImamlTask(flatten(gq), w, Q, H))
    return out


def _imaml_solution(pieces: list[_ImamlTask], c: float, beta: float) -> np.ndarray:
    """``mean_t (c I + beta H_t)^{-1} b_t`` through the eigendecompositions."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return sum(p.Q @ (p.y / (c + beta * p.w)) for p in pieces) / len(pieces)


def _imaml_jacobian(pieces: list[_ImamlTask], c: float, beta: float) -> np.ndarray:
    """``d/d(c, beta)`` of :func:`_imaml_solution`: columns ``-mean_t (c I + beta H_t)^{-2} (I, H_t) b_t``."""
    cols = []
    for weight in (lambda p: 1.0, lambda p: p.w):
        col = sum(p.Q @ (-weight(p) * p.y / (c + beta * p.w) ** 2) for p in pieces) / len(pieces)
        cols.append(col)
    return np.stack(cols, axis=1)


def _cg_iterates(A: np.ndarray, b: np.ndarray, m_max: int) -> list[tuple[np.ndarray, float]]:
    """Conjugate-gradient iterates ``x_1 .. x_m`` from ``x_0 = 0`` with their relative residuals."""
    x = np.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rr = float(r @ r)
    bnorm = math.sqrt(rr)
    out = []
    for _ in range(m_max):
        if rr == 0.0:
            break
        Ap = A @ p
        alpha = rr / float(p @ Ap)
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = float(r @ r)
        out.append((x.copy(), float(np.linalg.norm(b - A @ x)) / bnorm))
        p = r + (rr_new / rr) * p
        rr = rr_new
    return out


def _fit_imaml(case: Case, g: np.ndarray, pieces: list[_ImamlTask], loss: float) -> Candidate | None:
    """Fit ``g ~ mean_t (c I + beta H_t)^{-1} b_t`` over ``(c, beta)`` (``beta = 1/lam'``)."""
    import scipy.optimize

    lam = float(case.hyper["lam"])

    def resid(z: np.ndarray) -> np.ndarray:
        return _imaml_solution(pieces, z[0], z[1]) - g

    def jac(z: np.ndarray) -> np.ndarray:
        return _imaml_jacobian(pieces, z[0], z[1])

    best = None
    for start in ((1.0, 1.0 / lam), (0.0, 1.0 / lam), (1.0, lam), (lam, 1.0), (1.0, 0.0), (1.0, 2.0 / lam),
                  (1.0, 0.5 / lam)):
        with np.errstate(all="ignore"):
            try:
                sol = scipy.optimize.least_squares(resid, np.array(start), jac=jac, method="lm", xtol=1e-15,
                                                   ftol=1e-15, gtol=1e-15, max_nfev=200)
            except (ValueError, np.linalg.LinAlgError):
                continue
        if not np.all(np.isfinite(sol.fun)):
            continue
        err = match_error(g, g + sol.fun)
        if best is None or err < best[0]:
            best = (err, float(sol.x[0]), float(sol.x[1]))
    if best is None:
        return None
    _, c, beta = best
    x = _imaml_solution(pieces, c, beta)
    if not np.all(np.isfinite(x)):
        return None
    lam_eff = 1.0 / beta if beta != 0 else math.inf
    label = f"iMAML solving (c I + H/lam') x = grad L_q with c={c:.6g}, lam'={lam_eff:.6g} (asked: c=1, lam'={lam:.6g})"
    if close(c, 1.0, 1e-6) and abs(beta) <= 1e-9 / lam:
        label = "first-order iMAML: x = grad L_q(phi*) (the implicit solve skipped)"
    elif abs(c) <= 1e-9 and close(beta, 1.0 / lam, 1e-6):
        label = "iMAML without the identity term: H x = lam grad L_q"
    elif close(c, 1.0, 1e-6) and close(beta, lam, 1e-6):
        label = "iMAML with lam where 1/lam belongs: (I + lam H) x = grad L_q"
    elif close(c, lam, 1e-6) and close(beta, 1.0, 1e-6):
        label = "iMAML solving (lam I + H) x = grad L_q: a factor 1/lam missing"
    return Candidate("imaml_system", label, x, (loss,), {"c": c, "lam_prime": lam_eff}, rank=3)


def _imaml_cg(case: Case, pieces: list[_ImamlTask], loss: float, m_max: int = 50) -> list[Candidate]:
    lam = float(case.hyper["lam"])
    runs = []
    for p in pieces:
        A = np.eye(p.H.shape[0]) + p.H / lam
        runs.append(_cg_iterates(A, p.b, min(m_max, p.H.shape[0])))
    out = []
    for m in range(1, min(len(r) for r in runs) + 1):
        x = sum(r[m - 1][0] for r in runs) / len(runs)
        worst = max(r[m - 1][1] for r in runs)
        out.append(Candidate("imaml_truncated_cg",
                             f"iMAML linear solve truncated after {m} conjugate-gradient iteration(s) from x0 = 0 "
                             f"(relative residual ||(I + H/lam) x - grad L_q|| / ||grad L_q|| up to {worst:.1e})",
                             x, (loss,), {"cg_iterations": m, "residual": worst}))
    return out


def variants(case: Case) -> list[Variant]:
    """The fixed variants that need no claim: support and query swapped."""
    return [("swapped_support_query", "support and query sets swapped", lambda: rerun(case, tasks=swapped(case.tasks)))]


def fitted(case: Case, g: np.ndarray, reference_loss: Any,
           same_as_correct: Callable[[Candidate], bool]) -> tuple[list[Candidate], list[Candidate]]:
    """``(more fixed candidates, fitted candidates)``: truncated CG, the named systems, the fitted system."""
    fixed: list[Candidate] = []
    fits: list[Candidate] = []
    pieces = safe(lambda: _imaml_pieces(case))
    if pieces:
        loss = float(reference_loss) if reference_loss is not None else math.nan
        fixed += [c for c in _imaml_cg(case, pieces, loss) if not same_as_correct(c)]
        fit = safe(lambda: _fit_imaml(case, g, pieces, loss))
        if fit is not None and not same_as_correct(fit):  # (c, lam') fitted to (1, lam): the correct system
            fits.append(fit)
        # The named special cases of the linear system as fixed candidates too.
        lam = float(case.hyper["lam"])
        for key_c, key_b, label in ((1.0, 0.0, "first-order iMAML: x = grad L_q(phi*) (the implicit solve skipped)"),
                                    (0.0, 1.0 / lam, "iMAML without the identity term: H x = lam grad L_q"),
                                    (1.0, lam, "iMAML with lam where 1/lam belongs: (I + lam H) x = grad L_q")):
            x = _imaml_solution(pieces, key_c, key_b)
            if np.all(np.isfinite(x)):
                key = "first_order" if key_b == 0.0 else "imaml_system"
                fixed.append(Candidate(key, label, x, (loss,), {"c": key_c, "lam_prime": 1 / key_b if key_b else math.inf}))
    return fixed, fits
