"""iMAML's inexact Newton polish (issue 18): fewer Hessian-vector products, the same answer to round-off.

The polish's CG solves stop at a forcing tolerance tied to the round-off floor of the stationarity
residual (``reference.imaml._polish_rtol``) instead of a fixed 1e-12. Two checks that it gives the
answer away nowhere:

* against the longer computation (the same reference with the forcing switched off, i.e. every
  polishing CG to ``min(cg_tol, 1e-12)``): the inner solutions agree to ``10 cond(H_s + lam I) eps``
  (round-off), the meta-gradients to ``10 cond (cg_tol + eps)``, the forward error the meta-gradient's
  own CG (stopped at relative residual ``cg_tol``) claims: a change of ``phi*`` by an ulp moves that
  CG's stopping iteration, and so the meta-gradient by up to ~``cond cg_tol`` (measured: a 1-ulp
  perturbation of theta moves the tight computation by 3e-13 at cond 17, 2.5e-12 at cond 3.7e3);
* against an independent source: on a quadratic inner problem ``phi*`` is a dense solve, met to
  ``10 cond(A_s + lam I) eps``, which a polish stopped anywhere short of the round-off floor fails.
"""

from __future__ import annotations

import numpy as np
import pytest

from reference import imaml, imaml_subspace
from reference.linalg import EPS
from reference.models import MLP, Quadratic, flatten
from reference.tasks import Task, sinusoid


def _count_products(model, monkeypatch):
    """Wrap the model's Hessian-vector products (instance attributes) and the CG solves' products in
    coordinates (``imaml_subspace.Subspace.hvp``) with one counter."""
    count = [0]
    on_coordinates = imaml_subspace.Subspace.hvp

    def counted_coordinates(self, y):
        count[0] += 1
        return on_coordinates(self, y)

    monkeypatch.setattr(imaml_subspace.Subspace, "hvp", counted_coordinates)
    for name in ("_hvp_flat", "_hvp_at", "_hvp"):
        if hasattr(model, name):
            inner = getattr(model, name)

            def counted(*args, _inner=inner):
                count[0] += 1
                return _inner(*args)

            setattr(model, name, counted)
    return count


def _rel(a, b):
    return float(np.linalg.norm(flatten(a) - flatten(b)) / np.linalg.norm(flatten(b)))


@pytest.mark.parametrize("sizes, lam, seed", [
    ([1, 40, 40, 1], 1.0, 0),
    ([1, 40, 40, 1], 0.5, 3),
    ([1, 24, 24, 1], 4.0, 7),
    ([1, 128, 128, 1], 1.0, 1),  # a 2^14-entry weight block: the flat product (MLP._hvp_flat)
])
def test_inexact_polish_agrees_with_the_tight_polish_to_round_off(monkeypatch, sizes, lam, seed):
    model = MLP(sizes, "tanh", "mse")
    params, tasks = model.init(seed), sinusoid(2, 10, 10, seed=seed)
    count = _count_products(model, monkeypatch)
    fast = imaml.meta_loss_and_grad_info(model, params, tasks, lam)
    fast_products, count[0] = count[0], 0
    monkeypatch.setattr(imaml, "POLISH_FORCING", 0.0)  # every polishing CG to min(cg_tol, 1e-12), as before
    tight = imaml.meta_loss_and_grad_info(model, params, tasks, lam)
    tight_products = count[0]

    cond = max(t.cond_estimate for t in tight.tasks)  # of I + H_s/lam, i.e. of H_s + lam I
    bound = 10 * cond * EPS
    for f, t in zip(fast.tasks, tight.tasks):
        assert _rel(f.phi, t.phi) <= bound, (_rel(f.phi, t.phi), bound)
        # both at the round-off floor of the residual, far below the tolerance
        floor = EPS * lam * np.linalg.norm(flatten(t.phi))
        assert f.stationarity_residual <= 4 * max(t.stationarity_residual, floor)
        assert f.stationarity_residual <= 1e-2 * f.stationarity_tolerance
    assert fast.loss == pytest.approx(tight.loss, rel=bound)
    grad_bound = 10 * cond * (1e-12 + EPS)  # cg_tol = 1e-12 (the default)
    assert _rel(fast.grad, tight.grad) <= grad_bound, (_rel(fast.grad, tight.grad), grad_bound)
    # and it is what makes the reference faster: a quarter or more of the products gone
    assert fast_products <= 0.75 * tight_products, (fast_products, tight_products)


@pytest.mark.parametrize("dim, cond_s, lam, seed", [(40, 1e2, 1.0, 0), (60, 1e3, 1.0, 1), (30, 1e4, 0.3, 2),
                                                     (50, 10.0, 5.0, 3)])
def test_quadratic_inner_solution_is_the_dense_solve_to_round_off(dim, cond_s, lam, seed):
    """phi* = (A_s + lam I)^{-1} (A_s c_s + lam theta), by numpy.linalg.solve, to 10 cond eps."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    # eigenvalues of A_s + lam I spread over [lam_min, cond_s * lam_min]; some of A_s's are negative
    eig = np.geomspace(0.5 * lam, 0.5 * lam * cond_s, dim) - lam
    A_s = (Q * eig) @ Q.T
    A_s = 0.5 * (A_s + A_s.T)
    C = rng.normal(size=(dim, dim))
    A_q = C @ C.T / dim
    c_s, c_q, theta = rng.normal(size=dim), rng.normal(size=dim), 3 * rng.normal(size=dim)
    M = A_s + lam * np.eye(dim)
    phi = np.linalg.solve(M, A_s @ c_s + lam * theta)
    grad = np.linalg.solve(np.eye(dim) + A_s / lam, A_q @ (phi - c_q))
    cond = np.linalg.cond(M)

    result = imaml.meta_loss_and_grad_info(Quadratic(dim), [theta], [Task(A_s, c_s, A_q, c_q)], lam)
    info = result.tasks[0]
    err = np.linalg.norm(info.phi[0] - phi) / np.linalg.norm(phi)
    assert err <= 10 * cond * EPS, (err, 10 * cond * EPS)
    # the meta-gradient's CG stops at relative residual 1e-12: forward error <= cond x 1e-12
    assert np.linalg.norm(result.grad[0] - grad) <= 10 * cond * 1e-12 * np.linalg.norm(grad)


def test_polish_tolerance_is_the_floor_forcing_term_clipped():
    z = np.full(4, 2.0)  # ||z|| = 4
    floor = imaml.POLISH_FORCING * EPS * 1.0 * 4.0
    assert imaml._polish_rtol(z, floor / 1e-6, 1.0, 1e-12) == pytest.approx(1e-6)
    assert imaml._polish_rtol(z, 1.0, 1.0, 1e-12) == 1e-12  # far from the floor: the former fixed tolerance
    assert imaml._polish_rtol(z, 1.0, 1.0, 1e-14) == 1e-14  # a tighter cg_tol is kept
    assert imaml._polish_rtol(z, floor / 2, 1.0, 1e-12) == 0.5  # at the floor: at most halve the residual
    assert imaml._polish_rtol(z, 0.0, 1.0, 1e-12) == 1e-12  # zero residual: no division
    # scales with lam * ||z||
    assert imaml._polish_rtol(2 * z, floor / 1e-6, 0.5, 1e-12) == pytest.approx(1e-6)


@pytest.mark.parametrize("lam", [0.3, 1.0, 7.0])
def test_polish_asks_cg_for_a_quarter_of_the_proximal_rounding(lam):
    """Pins the documented forcing term (module comment above POLISH_FORCING): between its clips a polishing
    CG must leave a linearised residual ``rtol * res`` of a quarter of ``eps * lam * ||z||`` -- below the
    rounding of ``lam * z`` itself, so the step is exact to the floor -- with eps = 2^-52 from NumPy, not
    from the module. A looser factor (the step's CG stopping above that floor) fails here."""
    eps = float(np.finfo(np.float64).eps)
    rng = np.random.default_rng(int(10 * lam))
    for _ in range(5):
        z = rng.standard_normal(int(rng.integers(3, 50)))
        target = eps * lam * float(np.linalg.norm(z)) / 4
        for ratio in (1e-8, 1e-4, 0.1, 0.4):  # target / res: from far above the floor up to nearly at it
            res = target / ratio
            assert imaml._polish_rtol(z, res, lam, 1e-12) * res / target == pytest.approx(1.0, rel=1e-14, abs=0)
        assert imaml._polish_rtol(z, target / 0.6, lam, 1e-12) == 0.5  # the cap: at most halve the residual
        assert imaml._polish_rtol(z, target / 1e-13, lam, 1e-12) == 1e-12  # the floor min(cg_tol, 1e-12)
