"""reference/imaml_solver.py (the authors' approximate iMAML) against closed forms on quadratic tasks.

On ``L(phi) = 1/2 (phi - c)^T A (phi - c)`` every step of Rajeswaran et al.'s
released solver has a closed form: ``N`` proximal gradient steps from ``theta``
are ``phi_N = phi* + (I - lr (A_s + lam I))^N (theta - phi*)`` with
``phi* = (A_s + lam I)^{-1} (A_s c_s + lam theta)``, and ``M = dim`` CG
iterations solve ``((1 + regu) I + A_s / (lam + damping)) x = A_q (phi_N - c_q)``
exactly. Their ``cg_solve`` stops at the first ``r^T r < 1e-10``: checked by
counting products (issue 19, mutation testing).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from reference.errors import InvalidInputError
from reference.imaml_solver import RESIDUAL_TOL, Declared, cg_solve, meta_loss_and_grad
from reference.models import Quadratic
from reference.tasks import Task


def _spd(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = Q @ np.diag(rng.uniform(lo, hi, n)) @ Q.T
    return (A + A.T) / 2


def _closed_form(theta, tasks, lam, lr, *, cg, inner, damping, regu):
    n = theta.size
    losses, grads = [], []
    for t in tasks:
        As, cs, Aq, cq = t
        star = np.linalg.solve(As + lam * np.eye(n), As @ cs + lam * theta)
        phi = star + np.linalg.matrix_power(np.eye(n) - lr * (As + lam * np.eye(n)), inner) @ (theta - star)
        gq = Aq @ (phi - cq)
        losses.append(0.5 * (phi - cq) @ Aq @ (phi - cq))
        assert cg >= n  # CG is exact after n iterations: the closed form is the solve
        grads.append(np.linalg.solve((1.0 + regu) * np.eye(n) + As / (lam + damping), gq))
    return float(np.mean(losses)), np.mean(grads, axis=0)


@pytest.mark.parametrize("inner,damping,regu", [(0, 0.0, 0.0), (7, 0.5, 0.3), (3, 0.0, 2.0)])
def test_meta_loss_and_grad_matches_the_closed_form_on_quadratics(inner, damping, regu):
    rng = np.random.default_rng(inner)
    n = 3
    model = Quadratic(n)
    theta = rng.standard_normal(n)
    tasks = [Task(_spd(rng, n, 0.5, 3.0), rng.standard_normal(n), _spd(rng, n, 0.5, 3.0), rng.standard_normal(n))
             for _ in range(2)]
    lam, lr = 1.5, 0.1
    spec = f"cg:{n}+inner_steps:{inner}+damping:{damping}+regu:{regu}"
    loss, grad = meta_loss_and_grad(model, [theta], tasks, lam, inner_lr=lr, declared=spec)
    want_loss, want_grad = _closed_form(theta, tasks, lam, lr, cg=n, inner=inner, damping=damping, regu=regu)
    assert loss == pytest.approx(want_loss, rel=1e-12)
    np.testing.assert_allclose(grad[0], want_grad, rtol=1e-9, atol=1e-12)
    # The same through a Declared object.
    d = Declared(cg_steps=n, inner_steps=inner, damping=damping, regu=regu)
    np.testing.assert_allclose(meta_loss_and_grad(model, [theta], tasks, lam, inner_lr=lr, declared=d)[1][0],
                               grad[0], rtol=0, atol=0)


def test_cg_solve_stops_at_the_first_small_residual():
    # diag(1, 3): exact in 2 iterations, r^T r ~ 1e-32 < 1e-10 -> stop; 10 allowed, 1 + 2 products spent.
    A = np.diag([1.0, 3.0])
    calls = []

    def mv(v):
        calls.append(1)
        return A @ v

    b = np.array([1.0, 1.0])
    x = cg_solve(mv, b, 10)
    np.testing.assert_allclose(x, [1.0, 1.0 / 3.0], rtol=1e-14)
    assert len(calls) == 3
    # Their threshold is r^T r < 1e-10, i.e. ||r|| < 1e-5: a loose right-hand side stops after one
    # Cauchy step when its residual is already below it.
    assert RESIDUAL_TOL == 1e-10
    calls.clear()
    b = np.array([1e-6, 0.0])  # an eigenvector: one step is exact
    np.testing.assert_allclose(cg_solve(mv, b, 10), [1e-6, 0.0], rtol=1e-14)
    assert len(calls) == 2


def test_cg_solve_threshold_is_strict():
    # diag(1, 3), b = (1, 1): the first step is exact in binary (alpha = 2/4, x1 = (1/2, 1/2),
    # r1 = (1/2, -1/2), r1^T r1 = 1/2). Their test is r^T r < tol: at tol = 1/2 CG goes on to the
    # solution (1, 1/3); just above it stops at x1.
    A = np.diag([1.0, 3.0])
    b = np.array([1.0, 1.0])
    np.testing.assert_allclose(cg_solve(lambda v: A @ v, b, 10, residual_tol=0.5), [1.0, 1.0 / 3.0], rtol=1e-14)
    np.testing.assert_array_equal(cg_solve(lambda v: A @ v, b, 10, residual_tol=np.nextafter(0.5, 1.0)), [0.5, 0.5])


def test_declared_parse_defaults_and_errors():
    # The released configuration: 5 CG steps, 16 inner steps, no damping (Rajeswaran et al. 2019).
    assert Declared() == Declared(cg_steps=5, inner_steps=16, damping=0.0, regu=0.0)
    assert str(Declared()) == "cg:5+inner_steps:16+damping:0"
    assert Declared.parse("exact") == Declared()
    assert Declared.parse("exact+cg:3") == Declared(cg_steps=3)
    assert Declared.parse(" + cg:3 + damping:1.5") == Declared(cg_steps=3, damping=1.5)
    assert Declared.parse("inner_steps:2", cg_steps=7) == Declared(cg_steps=7, inner_steps=2)
    assert str(Declared.parse("cg:2+regu:0.5")) == "cg:2+inner_steps:16+damping:0+regu:0.5"
    with pytest.raises(InvalidInputError, match="unknown part 'cg'"):
        Declared.parse("cg")
    with pytest.raises(InvalidInputError, match="unknown part 'foo:1'"):
        Declared.parse("cg:2+foo:1")
    with pytest.raises(InvalidInputError, match="'cg:x' needs a number"):
        Declared.parse("cg:x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        Declared().cg_steps = 3  # type: ignore[misc]


def test_meta_loss_and_grad_validates_its_arguments():
    model = Quadratic(2)
    task = Task(np.eye(2), np.zeros(2), np.eye(2), np.ones(2))
    ok = dict(inner_lr=0.1, declared="cg:2+inner_steps:0")
    meta_loss_and_grad(model, [np.zeros(2)], [task], 1.0, **ok)
    for lam in (0.0, -1.0):
        with pytest.raises(InvalidInputError, match="lam"):
            meta_loss_and_grad(model, [np.zeros(2)], [task], lam, **ok)
    for lr in (0.0, -0.1):
        with pytest.raises(InvalidInputError, match="inner_lr"):
            meta_loss_and_grad(model, [np.zeros(2)], [task], 1.0, inner_lr=lr, declared="cg:2")
    with pytest.raises(InvalidInputError, match="inner_steps"):
        meta_loss_and_grad(model, [np.zeros(2)], [task], 1.0, inner_lr=0.1, declared=Declared(inner_steps=-1))
    with pytest.raises(InvalidInputError, match="cg_steps"):
        meta_loss_and_grad(model, [np.zeros(2)], [task], 1.0, inner_lr=0.1, declared="cg:0")
