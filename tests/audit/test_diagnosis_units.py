"""Fast, direct tests of the diagnosis (:mod:`verify.auditing.diagnosis`): which bug is named, with its figures.

The audit corpus (``test_audit_corpus.py``) plants each bug in a real PyTorch/JAX implementation and runs the
whole audit: the end-to-end evidence, but seconds per row. Here the diagnosis is called directly on claimed
gradients built from **closed forms**, independently of the diagnosis code:

* a linear model ``f(x) = W x + b`` with the ``mse`` loss makes every inner problem quadratic,
  ``L(p) = ||Z p - y||^2 / n`` with ``Z = [X, 1]``, so the gradient ``(2/n) Z^T (Z p - y)`` and the constant
  Hessian ``H = (2/n) Z^T Z`` are explicit. iMAML's adapted parameters are then
  ``phi* = (H + lam I)^{-1} (c + lam theta)`` (``c = (2/n) Z^T y``) and every wrong linear system
  ``(c I + H / lam') x = grad L_q(phi*)`` is a dense ``np.linalg.solve``; conjugate gradient's ``m``-th iterate
  is the Galerkin solution on the Krylov space ``span{b, A b, ..., A^{m-1} b}`` (Hestenes & Stiefel 1952);
  MAML's meta-gradient is ``(I - alpha H)^K grad L_q(p_K)`` (Finn et al. 2017), and its known-wrong variants
  (first-order, a wrong step count or rate, support and query swapped) are the same formula with other
  arguments;
* a constant factor, a sign, a zeroed tensor are applied to the reference's correct gradient.

Each test asserts the catalogue key, the fitted figures (against the values planted) and the label, and that a
correct gradient is not diagnosed. Each runs in well under a second (the mutation runner's budget,
``scripts/mutation.py``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from reference.models import MLP, flatten, unflatten
from reference.tasks import Task
from verify.algorithms import Case, evaluate
from verify.auditing.diagnosis import CATALOGUE, Diagnosis, diagnose, match_error
from verify.auditing.diagnosis import implicit
from verify.auditing.diagnosis.catalogue import Candidate, close, loss_ok

TOL = 1e-9


# ---------------------------------------------------------------------------
# quadratic problems (linear model, mse) and their closed forms
# ---------------------------------------------------------------------------


def _tasks(seed: int, d: int = 2, n_tasks: int = 2, shots: int = 4, queries: int = 3) -> list[Task]:
    rng = np.random.default_rng(seed)
    return [Task(rng.normal(size=(shots, d)), rng.normal(size=(shots, 1)), rng.normal(size=(queries, d)),
                 rng.normal(size=(queries, 1))) for _ in range(n_tasks)]


def _linear_case(algorithm: str, seed: int = 0, **hyper) -> Case:
    model = MLP([2, 1], "identity", "mse")
    return Case(algorithm, model, model.init(seed + 100), _tasks(seed), hyper, seed)


def _design(x: np.ndarray) -> np.ndarray:
    return np.hstack([x, np.ones((x.shape[0], 1))])


def _quad(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(H, c)`` of ``L(p) = ||Z p - y||^2 / n``: ``grad L(p) = H p - c``."""
    Z = _design(x)
    n = x.shape[0]
    return 2.0 / n * Z.T @ Z, 2.0 / n * Z.T @ y[:, 0]


def _imaml_pieces(case: Case) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per task ``(H_s, grad L_q(phi*))`` in closed form."""
    lam = case.hyper["lam"]
    theta = flatten(case.params)
    out = []
    for t in case.tasks:
        Hs, cs = _quad(t.x_support, t.y_support)
        phi = np.linalg.solve(Hs + lam * np.eye(theta.size), cs + lam * theta)
        Hq, cq = _quad(t.x_query, t.y_query)
        out.append((Hs, Hq @ phi - cq))
    return out


def _imaml_system(case: Case, c: float, beta: float) -> np.ndarray:
    """``mean_t (c I + beta H_t)^{-1} grad L_q(phi*_t)`` by dense solves."""
    pieces = _imaml_pieces(case)
    n = pieces[0][1].size
    return sum(np.linalg.solve(c * np.eye(n) + beta * H, b) for H, b in pieces) / len(pieces)


def _krylov_solution(A: np.ndarray, b: np.ndarray, m: int) -> np.ndarray:
    """The ``m``-th conjugate-gradient iterate from 0: the Galerkin solution on ``K_m(A, b)`` (A SPD)."""
    V = np.linalg.qr(np.stack([np.linalg.matrix_power(A, j) @ b for j in range(m)], axis=1))[0]
    return V @ np.linalg.solve(V.T @ A @ V, V.T @ b)


def _maml_grad(case: Case, rate: float, steps: int, *, order: str = "exact", swap: bool = False) -> np.ndarray:
    """MAML on the quadratic: ``mean_t J^T grad L_q(p_K)`` with ``J = (I - rate H_s)^K`` (``order="exact"``)
    or ``J = I`` (``"first"``), ``p_{k+1} = p_k - rate (H_s p_k - c_s)``."""
    theta = flatten(case.params)
    total = np.zeros_like(theta)
    for t in case.tasks:
        xs, ys, xq, yq = (t.x_query, t.y_query, t.x_support, t.y_support) if swap else \
            (t.x_support, t.y_support, t.x_query, t.y_query)
        Hs, cs = _quad(xs, ys)
        Hq, cq = _quad(xq, yq)
        p = theta.copy()
        for _ in range(steps):
            p = p - rate * (Hs @ p - cs)
        v = Hq @ p - cq
        if order == "exact":
            v = np.linalg.matrix_power(np.eye(theta.size) - rate * Hs, steps) @ v
        total += v
    return total / len(case.tasks)


def _diagnose(case: Case, g: np.ndarray, loss: float | None = None, *, missing=None, zero=(),
              tol: float = TOL) -> Diagnosis | None:
    ref_loss, ref_grads = evaluate(case)
    shapes = case.shapes
    claimed = unflatten(np.asarray(g, dtype=float), shapes)
    claimed = [np.zeros(s) if i in zero else c for i, (c, s) in enumerate(zip(claimed, shapes))]
    return diagnose(case, ref_loss if loss is None else loss, claimed,
                    missing=[False] * len(shapes) if missing is None else missing,
                    reference_loss=ref_loss, reference_grads=ref_grads, tol=tol)


def _reference(case: Case) -> np.ndarray:
    return flatten([np.asarray(g) for g in evaluate(case)[1]])


# ---------------------------------------------------------------------------
# iMAML (verify.auditing.diagnosis.implicit)
# ---------------------------------------------------------------------------

LAM = 2.5


@pytest.fixture(scope="module")
def imaml_case() -> Case:
    case = _linear_case("imaml", seed=1, lam=LAM)
    # the closed form is the reference's meta-gradient (so the claims below are the planted bugs, exactly)
    assert match_error(_imaml_system(case, 1.0, 1.0 / LAM), _reference(case)) < 1e-12
    return case


def test_imaml_correct_gradient_is_not_diagnosed(imaml_case):
    assert _diagnose(imaml_case, _imaml_system(imaml_case, 1.0, 1.0 / LAM)) is None


@pytest.mark.parametrize("c, beta, key, fitted_c, fitted_lam, label", [
    (1.0, 0.0, "first_order", 1.0, math.inf, "first-order iMAML: x = grad L_q(phi*) (the implicit solve skipped)"),
    (0.0, 1.0 / LAM, "imaml_system", 0.0, LAM, "iMAML without the identity term: H x = lam grad L_q"),
    (1.0, LAM, "imaml_system", 1.0, 1.0 / LAM, "iMAML with lam where 1/lam belongs: (I + lam H) x = grad L_q"),
])
def test_imaml_named_systems(imaml_case, c, beta, key, fitted_c, fitted_lam, label):
    d = _diagnose(imaml_case, _imaml_system(imaml_case, c, beta))
    assert d is not None and d.key == key, d
    assert d.fitted["c"] == pytest.approx(fitted_c, abs=1e-9)
    assert d.fitted["lam_prime"] == pytest.approx(fitted_lam, rel=1e-9)
    assert f"({label})" in d.detail
    assert d.error <= TOL and d.tolerance == TOL
    assert d.title == CATALOGUE[key].title and d.cause == CATALOGUE[key].cause
    # and the distance to the correct gradient is reported
    gap = match_error(_imaml_system(imaml_case, c, beta), _reference(imaml_case))
    assert f"differs from the correct meta-gradient by rel {gap:.1e}" in d.detail


@pytest.mark.parametrize("c, lam_prime", [(0.7, 2.5 * LAM), (1.3, 0.4 * LAM), (1.0, 2.0 * LAM), (0.5, LAM)])
def test_imaml_fitted_system(imaml_case, c, lam_prime):
    """A linear system ``(c I + H/lam') x = grad L_q`` with other ``(c, lam')``: both fitted to round-off."""
    d = _diagnose(imaml_case, _imaml_system(imaml_case, c, 1.0 / lam_prime))
    assert d is not None and d.key == "imaml_system", d
    assert d.fitted["c"] == pytest.approx(c, rel=1e-8)
    assert d.fitted["lam_prime"] == pytest.approx(lam_prime, rel=1e-8)
    assert f"with c={c:.6g}, lam'={lam_prime:.6g} (asked: c=1, lam'={LAM:.6g})" in d.detail


def test_imaml_missing_inverse_lam_is_a_scale(imaml_case):
    """``(lam I + H) x = g`` is ``1/lam`` times the correct solution: named as that factor, the system also listed."""
    d = _diagnose(imaml_case, _imaml_system(imaml_case, LAM, 1.0))
    assert d is not None and d.key == "scale", d
    assert d.fitted["scale"] == pytest.approx(1.0 / LAM, rel=1e-10)
    assert "iMAML solving (lam I + H) x = grad L_q: a factor 1/lam missing (factor 0.4)" in d.detail
    assert any("lam I + H" in a for a in d.also)
    # lam times the correct gradient
    d = _diagnose(imaml_case, LAM * _reference(imaml_case))
    assert d is not None and d.key == "scale" and "scaled by lam (factor 2.5)" in d.detail, d


def test_imaml_truncated_conjugate_gradient(imaml_case):
    """CG stopped after ``m`` iterations: the Krylov-space solution, named with ``m`` and its residual."""
    pieces = _imaml_pieces(imaml_case)
    n = pieces[0][1].size
    for m in range(1, n):
        xs, res = [], []
        for H, b in pieces:
            A = np.eye(n) + H / LAM
            x = _krylov_solution(A, b, m)
            xs.append(x)
            res.append(np.linalg.norm(A @ x - b) / np.linalg.norm(b))
        d = _diagnose(imaml_case, sum(xs) / len(xs))
        assert d is not None and d.key == "imaml_truncated_cg", (m, d)
        assert d.fitted["cg_iterations"] == m
        assert d.fitted["residual"] == pytest.approx(max(res), rel=1e-6)
        assert f"truncated after {m} conjugate-gradient iteration(s)" in d.detail
        assert f"up to {max(res):.1e}" in d.detail


def test_imaml_swapped_support_query(imaml_case):
    sw = Case("imaml", imaml_case.model, imaml_case.params,
              [Task(t.x_query, t.y_query, t.x_support, t.y_support) for t in imaml_case.tasks], imaml_case.hyper, 0)
    g = _imaml_system(sw, 1.0, 1.0 / LAM)
    d = _diagnose(imaml_case, g, loss=float(evaluate(sw)[0]))
    assert d is not None and d.key == "swapped_support_query", d


def test_imaml_claimed_loss_must_match(imaml_case):
    """A matching gradient with a meta-loss that matches no variant's is not named."""
    g = _imaml_system(imaml_case, 1.0, 0.0)
    ref_loss = float(evaluate(imaml_case)[0])
    assert _diagnose(imaml_case, g, loss=ref_loss * (1 + 1e-3)) is None
    assert _diagnose(imaml_case, g, loss=ref_loss * (1 + 1e-11)).key == "first_order"


def test_imaml_unexplained(imaml_case):
    rng = np.random.default_rng(5)
    g = _reference(imaml_case) + 0.1 * rng.normal(size=_reference(imaml_case).size)
    assert _diagnose(imaml_case, g) is None


def test_cg_iterates_are_krylov_solutions():
    rng = np.random.default_rng(3)
    M = rng.normal(size=(5, 5))
    A = M @ M.T + np.eye(5)
    b = rng.normal(size=5)
    it = implicit._cg_iterates(A, b, 5)
    assert len(it) == 5
    for m, (x, res) in enumerate(it, start=1):
        exact = _krylov_solution(A, b, m)
        assert np.max(np.abs(x - exact)) <= 1e-9 * np.max(np.abs(exact))
        assert res == pytest.approx(np.linalg.norm(b - A @ exact) / np.linalg.norm(b), rel=1e-6, abs=1e-13)
    assert np.max(np.abs(it[-1][0] - np.linalg.solve(A, b))) < 1e-10  # exact after n steps
    assert implicit._cg_iterates(A, b, 2)[1][0] == pytest.approx(it[1][0])  # m_max bounds the count


def test_cg_iterates_stop_at_the_solution():
    A = np.diag([1.0, 2.0, 4.0])
    # a unit right-hand side (||b||^2 == 1 exactly) and an eigenvector: one iteration is exact, then it stops
    it = implicit._cg_iterates(A, np.array([1.0, 0.0, 0.0]), 3)
    assert len(it) == 1
    assert np.array_equal(it[0][0], [1.0, 0.0, 0.0]) and it[0][1] == 0.0
    it = implicit._cg_iterates(A, np.array([0.0, 0.5, 0.0]), 3)
    assert len(it) == 1 and np.allclose(it[0][0], [0.0, 0.25, 0.0])
    assert implicit._cg_iterates(A, np.array([0.6, 0.0, 0.8]), 3)[0][1] > 0  # ||b|| = 1, not an eigenvector


def test_imaml_too_large_for_dense_hessians(monkeypatch, imaml_case):
    """Above MAX_DENSE_HESSIAN parameters the iMAML pieces are skipped (None); at the limit they are built."""
    n = imaml_case.model.n_params
    monkeypatch.setattr(implicit, "MAX_DENSE_HESSIAN", n)
    assert implicit._imaml_pieces(imaml_case) is not None
    monkeypatch.setattr(implicit, "MAX_DENSE_HESSIAN", n - 1)
    assert implicit._imaml_pieces(imaml_case) is None
    assert _diagnose(imaml_case, _imaml_system(imaml_case, 1.0, 0.0)) is None  # no pieces: nothing fitted


# ---------------------------------------------------------------------------
# catalogue: comparisons and the value types
# ---------------------------------------------------------------------------


def test_match_error_is_the_normwise_relative_difference():
    assert match_error(np.zeros(3), np.zeros(3)) == 0.0
    assert match_error(np.array([]), np.array([])) == 0.0
    assert match_error(np.array([1.0, 0.0]), np.zeros(2)) == 1.0
    assert match_error(np.array([2.0, -1.0]), np.array([1.0, -1.0])) == 0.5
    assert match_error(np.array([0.25]), np.array([0.5])) == 0.5
    assert match_error(np.array([-4.0, 1.0]), np.array([-4.0, 3.0])) == 0.5
    rng = np.random.default_rng(0)
    g, h = rng.normal(size=7), rng.normal(size=7)
    assert match_error(g, h) == match_error(h, g)
    assert match_error(1e-30 * g, 1e-30 * h) == pytest.approx(match_error(g, h), rel=1e-14)
    assert match_error(1e30 * g, 1e30 * h) == pytest.approx(match_error(g, h), rel=1e-14)


def test_loss_ok():
    assert loss_ok(None, (1.0,), 1e-9)  # no claimed loss: nothing to compare
    assert loss_ok(2.0, (), 1e-9)  # the variant says nothing about the loss
    assert loss_ok(1.0, (1.0 + 0.5e-9,), 1e-9) and loss_ok(1.0, (5.0, 1.0 - 0.5e-9), 1e-9)
    assert not loss_ok(1.0, (1.0 + 2e-9,), 1e-9) and not loss_ok(1.0, (5.0, 7.0), 1e-9)
    assert loss_ok(1.0, (1.0 + 2e-9,), 1e-8) and not loss_ok(1000.0, (1001.0,), 1e-4)
    assert loss_ok(1000.0, (1000.05,), 1e-4)  # relative to the values' size
    assert loss_ok(0.0, (0.0,), 1e-9) and not loss_ok(0.0, (1e-300,), 1e-9)
    assert loss_ok(1.0, (1.0 + 2 ** -52 * 4,), 4 * 2 ** -52 / (1.0 + 2 ** -50))  # the bound itself passes


def test_close():
    assert close(1.0, 1.0 + 1e-9) and not close(1.0, 1.0 + 1e-7)  # default rtol 1e-8
    assert close(100.0, 100.5, 1e-2) and not close(100.0, 102.0, 1e-2)
    assert close(-3.0, -3.0, 0.0) and close(2.0, 3.0, 1.0 / 3.0) and not close(0.0, 1e-300)


def test_value_types_are_immutable_and_print_their_parts():
    d = Diagnosis("scale", "t", "detail", "cause", {"scale": 2.0}, 1e-16, 1e-9, ("a", "b"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.key = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        CATALOGUE["scale"].title = "other"  # type: ignore[misc]
    assert str(d) == "detail\n  likely cause: cause\n  also consistent with: a; b"
    assert str(dataclasses.replace(d, also=())) == "detail\n  likely cause: cause"
    assert d.to_dict()["fitted"] == {"scale": 2.0} and d.to_dict()["also"] == ["a", "b"]
    assert Candidate("k", "l", np.zeros(1)).rank == 1 and Candidate("k", "l", np.zeros(1)).losses == ()


def test_every_entry_applies_to_some_algorithm():
    for key, entry in CATALOGUE.items():
        assert entry.key == key and entry.title and entry.cause
        assert entry.algorithms, key
    assert "imaml" in CATALOGUE["imaml_truncated_cg"].algorithms
    assert "maml" not in CATALOGUE["imaml_truncated_cg"].algorithms
