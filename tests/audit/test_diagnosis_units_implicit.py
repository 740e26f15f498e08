"""Fast, direct tests of the diagnosis' choice among candidates (core) and of iMAML's fitted systems (implicit).

Companion of ``test_diagnosis_units.py`` (same conventions: closed forms, pure NumPy, well under a second each, so
that the mutation runner's per-mutant budget reaches them, ``scripts/mutation.py``).

* **The choice** (:func:`verify.auditing.diagnosis.diagnose`): when several explanations match a claim within the
  tolerance, the simplest is named -- a fixed variant (rank 1) before a layer on the correct gradient (a factor, a
  zeroed tensor: rank 2) before a fitted variant (rank 3) before a layer on another variant (rank 4) -- and within
  a rank the closest (smallest match error); at most five others are listed. These tests give the family a stub
  of chosen variant vectors, so that which candidates match, and with what error, is computed here from the
  definitions (a factor is the least-squares projection ``<B, g> / <B, B>``; a disconnected tensor is the base with
  that tensor's block zeroed; the error is the normwise relative difference), independently of the code.
* **iMAML's fitted system** (:mod:`verify.auditing.diagnosis.implicit`): per-task pieces with a designed spectrum
  ``H = Q diag(w) Q^T`` (indefinite where a test needs poles of ``(c I + beta H)^{-1}``), the claim a dense
  ``np.linalg.solve`` of the wrong system; and conjugate gradient truncated on an ill-conditioned problem, where
  every iteration count up to the search's bound is its own variant.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest

from reference.models import MLP, unflatten
from reference.tasks import Task
from verify.algorithms import Case
from verify.auditing.diagnosis import core, diagnose, implicit, match_error
from verify.auditing.diagnosis.catalogue import Candidate


# ---------------------------------------------------------------------------
# the choice among matching candidates (core.diagnose), with a stub family
# ---------------------------------------------------------------------------


def _three_param_case() -> Case:
    """A linear model ``f(x) = W x + b`` (W: 1x2, b: 1): flat order ``[W00, W01, b0]``; 2 tasks of 3 queries."""
    rng = np.random.default_rng(0)
    model = MLP([2, 1], "identity", "mse")
    tasks = [Task(rng.normal(size=(4, 2)), rng.normal(size=(4, 1)), rng.normal(size=(3, 2)), rng.normal(size=(3, 1)))
             for _ in range(2)]
    return Case("maml", model, model.init(0), tasks, {"inner_lr": 0.1, "inner_steps": 1}, 0)


def _stub_family(monkeypatch, fixed=(), fits=()) -> None:
    """Make the case's family module a stub whose fixed variants are ``(key, label, flat grads)`` and whose fitted
    candidates are ``fits``."""
    stub = types.SimpleNamespace(
        variants=lambda case: [(key, label, (lambda g=g: (None, np.asarray(g, dtype=float)))) for key, label, g in fixed],
        fitted=lambda case, g, reference_loss, same_as_correct: ([], list(fits)))
    monkeypatch.setattr(core, "family_module", lambda case: stub)


def _claim(case: Case, g, ref, tol: float, *, missing=None):
    g, ref = np.asarray(g, dtype=float), np.asarray(ref, dtype=float)
    return diagnose(case, None, unflatten(g, case.shapes), missing=missing or [False] * len(case.shapes),
                    reference_loss=None, reference_grads=unflatten(ref, case.shapes), tol=tol)


def _projection(base: np.ndarray, g: np.ndarray) -> np.ndarray:
    """The factor layer by its definition: the least-squares multiple of ``base`` closest to ``g``."""
    return (base @ g) / (base @ base) * base


def _zeroed(base: np.ndarray, index: slice) -> np.ndarray:
    out = base.copy()
    out[index] = 0.0
    return out


R = np.array([1.0, -0.6, 0.1])  # the correct gradient: its bias block (index 2) is small
V = np.array([0.3, 0.3, 1.0])  # a fixed variant ("first-order"): its weight block (indices 0, 1) is the smaller one
W_BLOCK, B_BLOCK = slice(0, 2), slice(2, 3)
FO = "first-order MAML (the reference FOMAML direction)"


@pytest.mark.parametrize("factor, tol, winner", [
    (1.0, 0.2, "disconnected"),  # the zeroed tensor is exact (error 0), the factor ~0.1 away
    (1.3, 0.25, "scale"),  # 1.3 x: the factor ~0.1 away, the zeroed tensor 0.3/1.3 away
])
def test_layers_on_the_correct_gradient_tie_broken_by_error(monkeypatch, factor, tol, winner):
    """Both layers on the correct gradient (a factor, a tensor zeroed) match: equal rank, the closer one is named."""
    case = _three_param_case()
    _stub_family(monkeypatch, [("first_order", FO, V)])
    g = factor * _zeroed(R, B_BLOCK)
    e_scale, e_zero = match_error(g, _projection(R, g)), match_error(g, _zeroed(R, B_BLOCK))
    assert max(e_scale, e_zero) <= tol < match_error(g, V)  # both layers match; the fixed variant does not
    d = _claim(case, g, R, tol)
    assert d is not None and d.key == winner, d
    assert d.error == pytest.approx(min(e_scale, e_zero), rel=1e-12, abs=1e-15)
    if winner == "scale":
        assert d.fitted == {"scale": pytest.approx((R @ g) / (R @ R), rel=1e-12)}
        assert d.also == ("no gradient reached b1 (None or exactly zero)",)
    else:
        assert "(no gradient reached b1 (None or exactly zero)) to rel" in d.detail and d.fitted == {}
        assert d.also == (f"scaled by a constant factor {(R @ g) / (R @ R):.6g}",)


@pytest.mark.parametrize("factor, tol, winner", [
    (1.0, 0.28, "disconnected"),  # V with W zeroed: exact; the factor on V ~0.25 away
    (0.73, 0.28, "first_order"),  # 0.73 x: the factor on V ~0.254 away, the zeroed tensor 0.27 away
])
def test_layers_on_a_variant_tie_broken_by_error(monkeypatch, factor, tol, winner):
    """Both layers on a variant match (and neither the variant itself nor any layer on the correct gradient):
    equal rank, the closer one is named; the variant's own key with its factor, or 'disconnected'."""
    case = _three_param_case()
    _stub_family(monkeypatch, [("first_order", FO, V)])
    g = factor * _zeroed(V, W_BLOCK)
    e_scale, e_zero = match_error(g, _projection(V, g)), match_error(g, _zeroed(V, W_BLOCK))
    assert max(e_scale, e_zero) <= tol < match_error(g, V)
    assert min(match_error(g, _projection(R, g)), match_error(g, _zeroed(R, W_BLOCK))) > tol
    d = _claim(case, g, R, tol)
    assert d is not None and d.key == winner, d
    assert d.error == pytest.approx(min(e_scale, e_zero), rel=1e-12, abs=1e-15)
    if winner == "first_order":
        c = (V @ g) / (V @ V)
        assert d.fitted == {"scale": pytest.approx(c, rel=1e-12)}
        assert f"({FO}, scaled by a constant factor {c:.6g}) to rel" in d.detail
    else:
        assert f"({FO}, and no gradient reached W1 (None or exactly zero)) to rel" in d.detail


def test_simpler_explanations_first(monkeypatch):
    """Across ranks the simpler explanation wins even when it is farther: a fixed variant over a factor on the
    correct gradient, that over a fitted variant, that over a layer on a variant."""
    case = _three_param_case()
    g = np.array([1.0, -0.6, 0.0])  # R with its bias zeroed
    near = g + np.array([0.0, 0.0, -0.15])  # a fixed variant 0.15 away (0.25 from R); a zeroed tensor is exact
    _stub_family(monkeypatch, [("first_order", FO, near)])
    d = _claim(case, g, R, 0.2)
    assert d is not None and d.key == "first_order" and d.error == pytest.approx(0.15, rel=1e-12), d
    # a fitted candidate (exact) against the layers on the correct gradient (one exact): the layer wins
    fit = Candidate("imaml_system", "a fitted system", g.copy(), rank=3)
    _stub_family(monkeypatch, [("first_order", FO, -V)], [fit])
    d = _claim(case, g, R, 0.2)
    assert d is not None and d.key == "disconnected" and "a fitted system" in d.also, d
    # a fitted candidate 0.2 away against a layer on a variant that is exact: the fitted one wins
    fit = Candidate("imaml_system", "a fitted system", _zeroed(V, W_BLOCK) + np.array([0.2, 0.0, 0.0]), rank=3)
    _stub_family(monkeypatch, [("first_order", FO, V)], [fit])
    g = _zeroed(V, W_BLOCK)
    d = _claim(case, g, R, 0.28)
    assert d is not None and d.key == "imaml_system" and d.error == pytest.approx(0.2, rel=1e-12), d


def test_at_most_five_alternatives_closest_first(monkeypatch):
    """Seven fixed variants within the tolerance: the closest is named, the next five listed in order of error."""
    case = _three_param_case()
    u = np.array([0.5, -1.0, 0.25])
    fixed = [("wrong_inner_steps", f"inner_steps={k} instead of 1", (1.0 + 0.01 * k) * u) for k in (7, 3, 1, 6, 2, 5, 4)]
    _stub_family(monkeypatch, fixed)
    d = _claim(case, u, R, 0.1)
    assert d is not None and d.key == "wrong_inner_steps" and "(inner_steps=1 instead of 1) to rel" in d.detail, d
    assert d.error == pytest.approx(0.01 / 1.01, rel=1e-12)
    assert d.also == tuple(f"inner_steps={k} instead of 1" for k in (2, 3, 4, 5, 6))


@pytest.mark.parametrize("bad", [np.full(3, np.nan), np.array([np.inf, 0.0, 1.0]), np.ones(2)])
def test_a_non_finite_or_misshapen_candidate_is_skipped(monkeypatch, bad):
    """A family candidate that is not finite, or not shaped like the claim, is passed over; the candidates after it
    (here the factor on a fixed variant) are still tried."""
    case = _three_param_case()
    _stub_family(monkeypatch, [("first_order", FO, V)], [Candidate("imaml_system", "broken", bad, rank=3)])
    d = _claim(case, 2.0 * V, R, 1e-9)
    assert d is not None and d.key == "first_order" and d.fitted == {"scale": pytest.approx(2.0, rel=1e-12)}, d
    assert f"({FO}, summed over the 2 tasks instead of averaged (factor 2)) to rel" in d.detail


def test_a_fitted_variant_before_a_layer_on_a_variant(monkeypatch):
    """iMAML's fitted system (the real fit, :func:`implicit._fit_imaml`) against an exact zeroed tensor on a fixed
    variant: the fit is named although the layer is closer (a fitted system is the simpler explanation)."""
    case = _three_param_case()
    pieces = _designed_pieces([0.5, 1.0, 2.0], seed=2)
    g = _zeroed(_system(pieces, 1.0, 0.3), B_BLOCK)  # a system with its bias zeroed: no (c, lam') gives it exactly
    fit = implicit._fit_imaml(types.SimpleNamespace(hyper={"lam": LAM}), g, [p for p, _, _ in pieces], 1.0)
    e_fit = match_error(g, fit.grads)
    assert 1e-3 < e_fit < 0.5, e_fit
    V_b = g + np.array([0.0, 0.0, 3.0])  # a fixed variant whose bias gradient is the only difference
    _stub_family(monkeypatch, [("first_order", FO, V_b)], [fit])
    tol = 1.5 * e_fit
    assert match_error(g, V_b) > tol and match_error(g, _projection(V_b, g)) > tol
    ref = np.array([0.1, 0.5, 1.0])  # far from g, and so are its layers
    d = _claim(case, g, ref, tol)
    assert d is not None and d.key == "imaml_system" and d.error == pytest.approx(e_fit, rel=1e-12), d
    assert f"{FO}, and no gradient reached b1 (None or exactly zero)" in d.also


# ---------------------------------------------------------------------------
# iMAML's fitted linear system (implicit._fit_imaml) on designed spectra
# ---------------------------------------------------------------------------

LAM = 2.5


def _designed_pieces(eigenvalues, seed: int, n_tasks: int = 1):
    """Per task ``(piece, H, b)``: ``H = Q diag(w) Q^T`` for a random orthogonal ``Q``, a random ``b``; the piece
    holds ``eigh(H)`` as :func:`implicit._imaml_pieces` does."""
    rng = np.random.default_rng(seed)
    w = np.asarray(eigenvalues, dtype=float)
    out = []
    for _ in range(n_tasks):
        Q = np.linalg.qr(rng.normal(size=(w.size, w.size)))[0]
        H = Q @ np.diag(w) @ Q.T
        H = 0.5 * (H + H.T)
        b = rng.normal(size=w.size)
        we, Qe = np.linalg.eigh(H)
        out.append((implicit._ImamlTask(b, we, Qe, H), H, b))
    return out


def _system(pieces, c: float, beta: float) -> np.ndarray:
    """``mean_t (c I + beta H_t)^{-1} b_t`` by dense solves."""
    n = pieces[0][1].shape[0]
    return sum(np.linalg.solve(c * np.eye(n) + beta * H, b) for _, H, b in pieces) / len(pieces)


def _fit(pieces, g: np.ndarray, lam: float = LAM) -> Candidate | None:
    return implicit._fit_imaml(types.SimpleNamespace(hyper={"lam": lam}), g, [p for p, _, _ in pieces], 1.0)


def test_fit_reaches_a_system_walled_off_by_poles():
    """Indefinite Hessians (eigenvalues -1 and -1.6): ``(c I + beta H)^{-1}`` has poles on the rays
    ``c / beta = 1`` and ``1.6``, and the claim ``(I + 2 H / lam) x = grad L_q`` (lam halved: ``c / beta = 1.25``)
    lies between them. The fit still recovers ``c = 1, lam' = lam / 2`` to round-off (its start ``(1, 2 / lam)`` is
    the one inside that wedge)."""
    pieces = _designed_pieces([-1.0, -1.6, 0.5, 2.0, 3.0], seed=0, n_tasks=2)
    g = _system(pieces, 1.0, 2.0 / LAM)
    fit = _fit(pieces, g)
    assert fit is not None and fit.key == "imaml_system" and fit.rank == 3
    assert fit.fitted["c"] == pytest.approx(1.0, rel=1e-9)
    assert fit.fitted["lam_prime"] == pytest.approx(LAM / 2, rel=1e-9)
    assert match_error(g, fit.grads) < 1e-12
    assert f"with c=1, lam'={LAM / 2:.6g} (asked: c=1, lam'={LAM:.6g})" in fit.label


def test_fit_skips_a_start_on_a_pole():
    """lam = 2 and an eigenvalue -2 (a diagonal Hessian): the starts ``(1, 1/lam)`` and ``(lam, 1)`` put
    ``c + beta w`` at exactly 0 (the residual is infinite there, least squares refuses to start); the other starts
    still fit the claim ``x_i = b_i / (1 + 0.3 w_i)``."""
    lam = 2.0
    w = np.array([-2.0, 0.5, 1.5, 3.0])
    b = np.array([0.5, -1.0, 2.0, 1.0])
    piece = implicit._ImamlTask(b, w, np.eye(4), np.diag(w))  # diagonal: the eigenvalue is exactly -2
    assert 1.0 + (1.0 / lam) * -2.0 == 0.0 and lam + 1.0 * -2.0 == 0.0
    g = b / (1.0 + 0.3 * w)
    fit = implicit._fit_imaml(types.SimpleNamespace(hyper={"lam": lam}), g, [piece], 1.0)
    assert fit is not None, "no start fitted"
    assert fit.fitted["c"] == pytest.approx(1.0, rel=1e-9) and fit.fitted["lam_prime"] == pytest.approx(1 / 0.3, rel=1e-9)


@pytest.mark.parametrize("beta_rel, first_order", [(0.25e-9, True), (4e-9, False), (1e-6, False)])
def test_first_order_label_threshold(beta_rel, first_order):
    """A fitted ``beta = 1/lam'`` is called first-order iMAML only when it is below 1e-9 of the asked ``1/lam``:
    ``beta = 4e-9 / lam`` is a (huge) lam' = lam / 4e-9, fitted and reported as such."""
    pieces = _designed_pieces([0.5, 1.0, 2.0, 4.0], seed=3)
    beta = beta_rel / LAM
    g = _system(pieces, 1.0, beta)
    fit = _fit(pieces, g)
    assert fit is not None and fit.fitted["c"] == pytest.approx(1.0, rel=1e-9)
    assert 1.0 / fit.fitted["lam_prime"] == pytest.approx(beta, rel=1e-5)
    if first_order:
        assert fit.label == "first-order iMAML: x = grad L_q(phi*) (the implicit solve skipped)"
    else:
        assert fit.label.startswith("iMAML solving (c I + H/lam') x = grad L_q with c=1, lam'=")
        assert f"lam'={1.0 / beta:.6g}" in fit.label


@pytest.mark.parametrize("lam, c, beta", [(1.0, 1.0, 1.0), (2.0, 5.0, -1.0)])
def test_fitted_lam_prime_of_a_unit_beta(lam, c, beta):
    """A diagonal Hessian (``x_i = b_i / (c + beta w_i)`` exactly) and a claimed system with ``beta = +-1``: lam = 1
    with the asked system (the fit starts on it), and ``(5 I - H) x = g`` (the Hessian term's sign flipped), which
    the fit lands on exactly. lam' = 1/beta is reported as +-1 (only beta = 0 is an infinite lam')."""
    w = np.array([0.5, 1.0, 2.0, 4.0])
    b = np.array([1.0, -2.0, 0.5, 3.0])
    piece = implicit._ImamlTask(b, w, np.eye(4), np.diag(w))
    g = b / (c + beta * w)
    fit = implicit._fit_imaml(types.SimpleNamespace(hyper={"lam": lam}), g, [piece], 1.0)
    assert fit is not None and fit.fitted["c"] == pytest.approx(c, rel=1e-12), fit
    assert fit.fitted["lam_prime"] == pytest.approx(1.0 / beta, rel=1e-12)
    assert match_error(fit.grads, g) < 1e-15


def _patched_fitted(monkeypatch, pieces, g, correct):
    """:func:`implicit.fitted` on designed pieces; "same as correct" = within 1e-9 of ``correct``."""
    monkeypatch.setattr(implicit, "_imaml_pieces", lambda case: [p for p, _, _ in pieces])
    return implicit.fitted(types.SimpleNamespace(hyper={"lam": LAM}), g, 1.0,
                           lambda cand: match_error(cand.grads, correct) <= 1e-9)


def test_named_systems_are_their_closed_forms(monkeypatch):
    """The fixed named systems, whatever the claim: first-order ``x = b`` (key ``first_order``, lam' infinite),
    no identity term ``(H/lam) x = b``, and ``(I + lam H) x = b``, each the dense solve of its system."""
    pieces = _designed_pieces([0.3, 1.0, 2.0, 5.0], seed=5, n_tasks=2)
    correct = _system(pieces, 1.0, 1.0 / LAM)
    fixed, _ = _patched_fitted(monkeypatch, pieces, _system(pieces, 0.7, 0.9), correct)
    named = {c.label: c for c in fixed if c.key != "imaml_truncated_cg"}
    expected = {
        "first-order iMAML: x = grad L_q(phi*) (the implicit solve skipped)": ("first_order", 1.0, 0.0),
        "iMAML without the identity term: H x = lam grad L_q": ("imaml_system", 0.0, 1.0 / LAM),
        "iMAML with lam where 1/lam belongs: (I + lam H) x = grad L_q": ("imaml_system", 1.0, LAM),
    }
    assert sorted(named) == sorted(expected)
    for label, (key, c, beta) in expected.items():
        cand = named[label]
        assert cand.key == key and cand.rank == 1, label
        assert match_error(cand.grads, _system(pieces, c, beta)) < 1e-12, label
        assert cand.fitted == {"c": c, "lam_prime": pytest.approx(1.0 / beta if beta else np.inf, rel=1e-15)}


def test_fit_dropped_when_it_is_the_correct_system(monkeypatch):
    """The fitted system is offered only when it differs from the correct gradient: a claim of the correct system
    yields no fit; a claim of ``(0.7 I + 0.9 H) x = b`` yields that fit."""
    pieces = _designed_pieces([0.3, 1.0, 2.0, 5.0], seed=5, n_tasks=2)
    correct = _system(pieces, 1.0, 1.0 / LAM)
    assert _patched_fitted(monkeypatch, pieces, correct, correct)[1] == []
    _, fits = _patched_fitted(monkeypatch, pieces, _system(pieces, 0.7, 0.9), correct)
    assert len(fits) == 1 and fits[0].fitted["c"] == pytest.approx(0.7, rel=1e-9)
    assert fits[0].fitted["lam_prime"] == pytest.approx(1 / 0.9, rel=1e-9)


# ---------------------------------------------------------------------------
# truncated conjugate gradient: every iteration count up to the bound
# ---------------------------------------------------------------------------


def test_truncated_cg_searches_fifty_iterations():
    """``I + H/lam`` with 60 eigenvalues from 1 to 1e6: CG is far from converged after 50 iterations, so each count
    1..50 is its own candidate (the search's bound, ``m_max = 50``), with the mean of the tasks' iterates and the
    worst relative residual ``||(I + H/lam) x - b|| / ||b||`` recomputed here from the iterates."""
    lam = 1.0
    pieces = _designed_pieces(np.geomspace(1e-3, 1e6, 60), seed=4, n_tasks=2)
    out = implicit._imaml_cg(types.SimpleNamespace(hyper={"lam": lam}), [p for p, _, _ in pieces], 1.0)
    assert [c.fitted["cg_iterations"] for c in out] == list(range(1, 51))
    A = [np.eye(60) + H / lam for _, H, _ in pieces]
    for m in (1, 2, 3):  # few steps: the Krylov-space Galerkin solution is well conditioned
        xs = []
        for Am, (_, _, b) in zip(A, pieces):
            Vk = np.linalg.qr(np.stack([np.linalg.matrix_power(Am, j) @ b for j in range(m)], axis=1))[0]
            xs.append(Vk @ np.linalg.solve(Vk.T @ Am @ Vk, Vk.T @ b))
        assert match_error(out[m - 1].grads, sum(xs) / 2) < 1e-9, m
    last = out[-1]
    per_task = [implicit._cg_iterates(Am, b, 50)[-1][0] for Am, (_, _, b) in zip(A, pieces)]
    assert match_error(last.grads, sum(per_task) / 2) == 0.0
    res = max(np.linalg.norm(Am @ x - b) / np.linalg.norm(b) for Am, x, (_, _, b) in zip(A, per_task, pieces))
    assert last.fitted["residual"] == pytest.approx(res, rel=1e-6) and res > 1e-3
    assert "truncated after 50 conjugate-gradient iteration(s)" in last.label


def test_fit_keeps_the_closest_start_not_a_diverged_one():
    """A claim no ``(c, lam')`` system reproduces (random, 4 entries, indefinite Hessians): some starts run off to
    ``c, beta -> infinity``, where ``x -> 0`` (match error 1: no explanation at all), one stops ~0.8 away. The fit
    returned is the closest one's, judged by the claim's own match error ``|x - g| / max(|g|, |x|)``."""
    pieces = _designed_pieces([0.67, 0.63, -0.49, 0.57], seed=231, n_tasks=2)
    g = np.array([-0.9, -0.15, 1.47, 0.21])
    fit = _fit(pieces, g)
    assert fit is not None
    assert 0.3 < match_error(g, fit.grads) < 0.9
    assert np.max(np.abs(fit.grads)) > 0.1 * np.max(np.abs(g))  # not the vanishing solution of a diverged start


def test_a_start_ending_non_finite_is_skipped_not_the_end_of_the_search(monkeypatch):
    """If least squares from one start ends with a non-finite residual (here the first start's result is
    replaced by NaNs), the remaining starts are still tried: the halved-lam claim of
    ``test_fit_reaches_a_system_walled_off_by_poles`` is still fitted to round-off."""
    import scipy.optimize

    real = scipy.optimize.least_squares
    calls = []

    def first_ends_non_finite(*args, **kwargs):
        sol = real(*args, **kwargs)
        calls.append(tuple(args[1]))
        if len(calls) == 1:
            sol.fun = np.full_like(sol.fun, np.nan)
        return sol

    monkeypatch.setattr(scipy.optimize, "least_squares", first_ends_non_finite)
    pieces = _designed_pieces([-1.0, -1.6, 0.5, 2.0, 3.0], seed=0, n_tasks=2)
    g = _system(pieces, 1.0, 2.0 / LAM)
    fit = _fit(pieces, g)
    assert len(calls) == 7  # every start was tried
    assert fit is not None and fit.fitted["c"] == pytest.approx(1.0, rel=1e-9)
    assert fit.fitted["lam_prime"] == pytest.approx(LAM / 2, rel=1e-9)


@pytest.mark.parametrize("c, beta, label", [
    (1.0, 0.0, "first-order iMAML: x = grad L_q(phi*) (the implicit solve skipped)"),
    (0.0, 1.0 / LAM, "iMAML without the identity term: H x = lam grad L_q"),
    (1.0, LAM, "iMAML with lam where 1/lam belongs: (I + lam H) x = grad L_q"),
    (LAM, 1.0, "iMAML solving (lam I + H) x = grad L_q: a factor 1/lam missing"),
])
def test_a_named_system_is_a_start_of_the_fit(monkeypatch, c, beta, label):
    """The named special cases of the system (module docstring), ``(c, beta)`` = ``(1, 0)``, ``(0, 1/lam)``,
    ``(1, lam)``, ``(lam, 1)``, are starts of the fit. A claim that is exactly a named system's solution (computed
    the way the fit computes solutions, so that its residual there is exactly zero; the dense solve agrees to
    round-off) has a zero residual at that start, where Levenberg-Marquardt stops at once (its gradient ``J^T f``
    is zero): one of the fit's runs (recorded by a spy on ``scipy.optimize.least_squares`` that forwards everything
    unchanged) ends on the named ``(c, beta)`` bit for bit, with a zero residual (a run converging from
    elsewhere generally ends on a round-off neighbour). The fit's answer (the first start to tie at zero error) is the named
    system to round-off, with its label."""
    import scipy.optimize

    real = scipy.optimize.least_squares
    ends = []

    def recording(*args, **kwargs):
        sol = real(*args, **kwargs)
        ends.append((tuple(float(v) for v in sol.x), not np.any(sol.fun)))
        return sol

    monkeypatch.setattr(scipy.optimize, "least_squares", recording)
    pieces = _designed_pieces([0.5, 1.0, 2.0, 4.0], seed=3, n_tasks=2)
    g = implicit._imaml_solution([p for p, _, _ in pieces], c, beta)
    assert match_error(g, _system(pieces, c, beta)) < 1e-13
    fit = _fit(pieces, g)
    assert ((c, beta), True) in ends, ends
    assert fit is not None and fit.label == label, fit
    assert fit.fitted["c"] == pytest.approx(c, rel=1e-9, abs=1e-12)
    assert 1.0 / fit.fitted["lam_prime"] == pytest.approx(beta, rel=1e-9, abs=1e-12)
    assert match_error(g, fit.grads) < 1e-14


def test_a_start_that_does_not_converge_stops_at_200_evaluations(monkeypatch):
    """The fit's budget per start (stated here; ``_fit_imaml``'s docstring gives no number): Levenberg-Marquardt gets
    at most 200 residual evaluations from each of its starts, and a start still moving then is taken where it
    stands. A claim off the family (a random vector) on an indefinite spectrum: from the start ``(1, 2/lam)`` the
    iteration drifts off to infinity along a ray (``(c, beta)`` growing geometrically, the solution shrinking
    towards 0: a minimum at infinity), so it never meets the 1e-15 tolerances and costs exactly the budget; every
    other start converges sooner. The evaluations are counted by a spy on ``scipy.optimize.least_squares`` that
    wraps the residual and forwards everything unchanged."""
    import scipy.optimize

    real = scipy.optimize.least_squares
    runs = []

    def counting(fun, x0, *args, **kwargs):
        n = [0]

        def counted(z):
            n[0] += 1
            return fun(z)

        sol = real(counted, x0, *args, **kwargs)
        runs.append((tuple(float(v) for v in x0), n[0], sol.x))
        return sol

    monkeypatch.setattr(scipy.optimize, "least_squares", counting)
    pieces = _designed_pieces([-1.6, -2.6, -0.5, 0.8, 2.3], seed=5)
    g = np.random.default_rng(105).normal(size=5)
    fit = _fit(pieces, g)
    assert fit is not None and len(runs) == 7
    counts = {x0: n for x0, n, _ in runs}
    drifting = (1.0, 2.0 / LAM)
    assert counts[drifting] == 200, counts
    assert all(n < 200 for x0, n in counts.items() if x0 != drifting), counts
    end = next(x for x0, _, x in runs if x0 == drifting)
    assert min(end) > 1e4 * max(drifting), end  # the premise: that start was drifting off, not converging
