"""verify.inner_audit: declared approximations pass with their distance from exact; undeclared ones are named.

The claimed gradients are built by construction (a known approximation or a
known bug of the family), so each expected verdict and diagnosis is known
independently of the judge; the third-party cases (higher's Adam) are in
tests/torch/test_torch_inner_optim.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from reference.inner_optim import Approximation
from reference.models import MLP
from reference.optimizers import Adam, Momentum
from reference.tasks import Task, check_tasks
from verify.inner_audit import InnerLoopProblem, audit_inner_loop


def problem(optimizer=None, weights=True, steps: int = 4) -> InnerLoopProblem:
    rng = np.random.default_rng(0)
    model = MLP([3, 5, 2], "tanh", "mse")
    params = [0.7 * rng.normal(size=s) for s in model.shapes]
    tasks = check_tasks(model, [Task(rng.normal(size=(5, 3)), rng.normal(size=(5, 2)), rng.normal(size=(4, 3)),
                                     rng.normal(size=(4, 2))) for _ in range(2)])
    lrs = [[float(rng.uniform(0.05, 0.2)) for _ in model.shapes] for _ in range(steps)]
    w = rng.uniform(0.2, 1.0, size=steps) if weights else None
    return InnerLoopProblem(model, params, tasks, lrs, steps, optimizer or Adam(eps=1e-3, weight_decay=0.01), w)


def test_exact_gradient_passes() -> None:
    pb = problem()
    r = audit_inner_loop(pb, pb.gradient().params, claimed_lrs=pb.gradient().lrs)
    assert r.passed and "matches the exact meta-gradient" in r.verdict


@pytest.mark.parametrize("declared", ["truncated:2", "first_order", "stop_gradient", "truncated:1+stop_gradient"])
def test_declared_approximation_passes_with_distance(declared: str) -> None:
    pb = problem()
    claimed = pb.gradient(Approximation.parse(declared))
    r = audit_inner_loop(pb, claimed.params, claimed_lrs=claimed.lrs, approximation=declared)
    assert r.passed, str(r)
    assert f"matches the declared approximation {declared}" in r.verdict and "distance from exact" in r.verdict
    assert r.distance_from_exact["relative"] > 1e-6 and -1 <= r.distance_from_exact["cosine"] <= 1


@pytest.mark.parametrize("claimed,expected", [
    ("truncated:2", "backpropagation truncated (undeclared): truncated:2"),
    ("first_order", "second derivatives dropped (first_order)"),
    ("stop_gradient", "optimiser state detached between steps (stop_gradient)"),
])
def test_undeclared_approximation_is_a_named_mismatch(claimed: str, expected: str) -> None:
    pb = problem()
    g = pb.gradient(Approximation.parse(claimed))
    r = audit_inner_loop(pb, g.params)
    assert not r.passed and r.diagnosis == expected, str(r)


def test_bptt_truncated_at_the_wrong_length() -> None:
    pb = problem()
    g = pb.gradient(Approximation(truncate=3))
    r = audit_inner_loop(pb, g.params, approximation="truncated:2")
    assert not r.passed and r.diagnosis == "BPTT truncated at the wrong length: truncated:3", str(r)


def test_declared_but_not_applied() -> None:
    pb = problem()
    r = audit_inner_loop(pb, pb.gradient().params, approximation="stop_gradient")
    assert not r.passed and r.diagnosis == "exact" and "was not applied" in r.verdict


def test_adam_eps_placement_and_weight_decay_coupling_named() -> None:
    pb = problem()
    eps_hat = pb.gradient(optimizer=Adam(eps=1e-3, weight_decay=0.01, eps_placement="v"))
    assert audit_inner_loop(pb, eps_hat.params).diagnosis == "Adam eps placement"
    adamw = pb.gradient(optimizer=Adam(eps=1e-3, weight_decay=0.01, decoupled=True))
    assert audit_inner_loop(pb, adamw.params).diagnosis == "Adam weight decay coupling"


def test_multi_step_weights_ignored_and_inner_steps() -> None:
    pb = problem()
    final_only = np.zeros(4)
    final_only[-1] = 1.0
    assert audit_inner_loop(pb, pb.gradient(weights=final_only).params).diagnosis == "multi-step loss weights ignored"
    three = pb.gradient(lrs=pb.lrs[:3], inner_steps=3, weights=pb.weights[:3])
    assert audit_inner_loop(pb, three.params).diagnosis == "inner_steps:3"
    assert audit_inner_loop(pb, three.params, approximation="inner_steps:3").passed


def test_per_step_rates_shared_and_momentum_first_step() -> None:
    pb = problem()
    g = pb.gradient()
    total = [sum(g.lrs[k][i] for k in range(4)) for i in range(len(g.lrs[0]))]
    r = audit_inner_loop(pb, g.params, claimed_lrs=[total] * 4)
    assert r.diagnosis == "per-step learning rates shared across steps", str(r)
    pm = problem(Momentum(0.9, dampening=0.3), weights=False)
    zeros = pm.gradient(optimizer=Momentum(0.9, dampening=0.3, init="zeros"))
    assert audit_inner_loop(pm, zeros.params).diagnosis == "momentum buffer's first step"


def test_unexplained_mismatch() -> None:
    pb = problem()
    g = pb.gradient()
    wrong = [x * (1 + 1e-6) for x in g.params]
    r = audit_inner_loop(pb, wrong)
    assert not r.passed and r.diagnosis is None and "no catalogued computation matches" in r.verdict
    assert str(r).startswith("FAIL: does not match the exact meta-gradient")


# ---------------------------------------------------------------------------
# iMAML: the authors' solver as declared approximations
# ---------------------------------------------------------------------------


def imaml_problem():
    rng = np.random.default_rng(0)
    model = MLP([2, 8, 1], "tanh", "mse")
    params = [0.5 * rng.normal(size=s) for s in model.shapes]
    tasks = check_tasks(model, [Task(rng.normal(size=(10, 2)), rng.normal(size=(10, 1)), rng.normal(size=(10, 2)),
                                     rng.normal(size=(10, 1))) for _ in range(2)])
    return model, params, tasks


def test_cg_solve_is_their_conjugate_gradient() -> None:
    from reference.imaml_solver import cg_solve

    rng = np.random.default_rng(1)
    W = rng.normal(size=(6, 6))
    A, b = W @ W.T + np.eye(6), rng.normal(size=6)
    # n iterations of CG solve an n x n SPD system (exact arithmetic); one iteration is the Cauchy step.
    assert np.allclose(cg_solve(lambda v: A @ v, b, 6), np.linalg.solve(A, b), rtol=1e-8, atol=0)
    alpha = (b @ b) / (b @ A @ b)
    assert np.allclose(cg_solve(lambda v: A @ v, b, 1), alpha * b, rtol=1e-14, atol=0)


def test_authors_solver_converges_to_the_exact_implicit_gradient() -> None:
    from reference import imaml, imaml_solver
    from verify.inner_audit import distance

    model, params, tasks = imaml_problem()
    _, exact = imaml.meta_loss_and_grad(model, params, tasks, 2.0)
    far = imaml_solver.meta_loss_and_grad(model, params, tasks, 2.0, inner_lr=0.05, declared="cg:5+inner_steps:16")[1]
    near = imaml_solver.meta_loss_and_grad(model, params, tasks, 2.0, inner_lr=0.1,
                                           declared="cg:40+inner_steps:400")[1]
    # Their CG exits at r^T r < 1e-10 (||r|| < 1e-5): the converged end sits at that level (measured 6.0e-6),
    # the paper's 5 CG iterations and 16 inner steps far above it (8.9e-2 here).
    assert distance(near, exact)["relative"] < 1e-4 < 1e-2 < distance(far, exact)["relative"]


def test_imaml_declared_approximation_and_named_mismatches() -> None:
    from reference import imaml_solver
    from verify.inner_audit import audit_imaml

    model, params, tasks = imaml_problem()
    declared = "cg:5+inner_steps:16+damping:1"
    g = imaml_solver.meta_loss_and_grad(model, params, tasks, 2.0, inner_lr=0.05, declared=declared)[1]
    r = audit_imaml(model, params, tasks, 2.0, g, inner_lr=0.05, approximation=declared)
    assert r.passed and "distance from exact" in r.verdict and r.distance_from_exact["relative"] > 1e-3
    assert audit_imaml(model, params, tasks, 2.0, g, inner_lr=0.05).diagnosis is None  # undeclared, other damping
    g3 = imaml_solver.meta_loss_and_grad(model, params, tasks, 2.0, inner_lr=0.05,
                                         declared="cg:3+inner_steps:16+damping:1")[1]
    assert audit_imaml(model, params, tasks, 2.0, g3, inner_lr=0.05, approximation=declared).diagnosis == "cg:3"
    g0 = imaml_solver.meta_loss_and_grad(model, params, tasks, 2.0, inner_lr=0.05,
                                         declared="cg:5+inner_steps:16+damping:0")[1]
    assert audit_imaml(model, params, tasks, 2.0, g0, inner_lr=0.05, approximation=declared).diagnosis == \
        "damping ignored"
    assert audit_imaml(model, params, tasks, 2.0, g0, inner_lr=0.05).diagnosis == \
        "undeclared approximation cg:5+inner_steps:16+damping:0"


@pytest.mark.parametrize("algorithm", ["metasgd", "mamlpp", "lstm-optimizer", "meta-lstm"])
def test_the_audits_loop_problem_of_a_row_is_the_rows_reference(algorithm):
    """The declared approximations of metasgd / mamlpp / the learned optimisers are switches on the loop problem
    the audit builds from the case: exact, it must be the row's own reference (Meta-SGD: reference.metasgd's
    separate adjoint; the others: the row's call), aligned with case.variables (rates, phi)."""
    from reference.models import flatten
    from verify.algorithms import build_case, evaluate
    from verify.inner_audit import _loop_problem, case_gradients

    for seed in range(2):
        case = build_case(algorithm, seed=seed)
        loss, grads = evaluate(case)
        r = _loop_problem(case).gradient()
        mine = case_gradients(case, r)
        assert [np.shape(g) for g in mine] == case.shapes
        assert abs(float(r.loss) - float(loss)) <= 1e-14 * abs(float(loss))
        assert np.max(np.abs(flatten(mine) - flatten(grads))) <= 1e-13 * np.max(np.abs(flatten(grads)))
