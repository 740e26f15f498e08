"""Tests of the optimiser-driven inner loop: reference.optimizers, inner_optim, learned_optimizers, mamlpp.

Expected values come from outside the adjoint under test: the engine's
``verify.check_gradient`` (complex step, and Richardson for one table row)
on the forward meta-loss, the existing MAML / FOMAML / ANIL / Meta-SGD
references (independent algorithms on SGD), closed forms (the first Adam step
is ``g / (|g| + eps)``) and hand-built problems whose structure forces an
identity. The torch and JAX comparisons (autograd, higher, torchopt, optax)
are in ``tests/torch/test_torch_inner_optim.py`` and ``tests/jax/``.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reference import anil, inner_optim, maml, mamlpp, metasgd
from reference.errors import InvalidInputError
from reference.inner_optim import Approximation, constant_lrs
from reference.learned_optimizers import LSTMOptimizer, MetaLearnerLSTM
from reference.models import MLP, Quadratic, flatten, unflatten
from reference.optimizers import SGD, Adam, Momentum, NotDifferentiableError
from reference.tasks import Task, check_tasks
from verify import PASS, check_gradient
from verify.tolerance import tolerance

# Two float64 implementations of the same recursion (same operations, different grouping): their
# normwise difference is round-off, well inside the reference-match row (1.8e-12).
MATCH = tolerance(np.float64, "reference_match")

OPTIMIZERS: dict[str, Callable[[], Any]] = {
    "sgd": lambda: SGD(),
    "sgd[wd]": lambda: SGD(weight_decay=0.1),
    "momentum": lambda: Momentum(0.9),
    "momentum[dampening]": lambda: Momentum(0.9, dampening=0.3),
    "momentum[dampening,zeros]": lambda: Momentum(0.8, dampening=0.3, init="zeros"),
    "nesterov[wd]": lambda: Momentum(0.9, nesterov=True, weight_decay=0.05),
    "adam": lambda: Adam(),
    "adam[eps_root]": lambda: Adam(eps_root=1e-8),
    "adam[wd]": lambda: Adam(weight_decay=0.1),
    "adamw": lambda: Adam(weight_decay=0.1, decoupled=True),
}


def make_tasks(model: MLP, rng: np.random.Generator, n_tasks: int = 2, n_support: int = 5,
               n_query: int = 4) -> list[Task]:
    d0, d_out = model.sizes[0], model.sizes[-1]

    def targets(n: int) -> np.ndarray:
        return rng.integers(0, d_out, size=n) if model.loss_name == "ce" else rng.normal(size=(n, d_out))

    return check_tasks(model, [Task(rng.normal(size=(n_support, d0)), targets(n_support),
                                    rng.normal(size=(n_query, d0)), targets(n_query)) for _ in range(n_tasks)])


def problem(seed: int, loss: str = "mse") -> tuple[MLP, list[np.ndarray], list[Task]]:
    rng = np.random.default_rng(seed)
    model = MLP([3, 5, 3 if loss == "ce" else 2], "tanh", loss)
    return model, [0.7 * rng.normal(size=s) for s in model.shapes], make_tasks(model, rng)


def per_step_lrs(model: Any, steps: int, rng: np.random.Generator, lo: float = 0.05, hi: float = 0.2) -> list:
    return [[float(rng.uniform(lo, hi)) for _ in model.shapes] for _ in range(steps)]


def assert_engine_pass(f: Callable[[np.ndarray], Any], grad: np.ndarray, x: np.ndarray, what: str,
                       method: str | None = None) -> None:
    verdict = check_gradient(f, grad, x, method=method)
    assert verdict.status == PASS, f"{what}: {verdict.reason}"


def rel(a: Any, b: Any) -> float:
    a, b = flatten(a) if isinstance(a, list) else np.ravel(a), flatten(b) if isinstance(b, list) else np.ravel(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), 1e-300))


# ---------------------------------------------------------------------------
# Exact meta-gradients against the engine (complex step on the forward meta-loss)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("steps", [1, 3])
def test_theta_and_lr_gradients_match_complex_step(name: str, steps: int) -> None:
    model, params, tasks = problem(steps)
    rng = np.random.default_rng(100 + steps)
    lrs = per_step_lrs(model, steps, rng)
    weights = rng.uniform(0.2, 1.0, size=steps)
    opt = OPTIMIZERS[name]()
    r = inner_optim.meta_loss_and_grad(model, params, tasks, lrs, steps, optimizer=opt, weights=weights)
    assert r.loss == pytest.approx(inner_optim.meta_loss(model, params, tasks, lrs, steps, optimizer=opt,
                                                         weights=weights), rel=1e-14)
    assert_engine_pass(lambda x: inner_optim.meta_loss(model, unflatten(x, model.shapes), tasks, lrs, steps,
                                                       optimizer=opt, weights=weights),
                       flatten(r.params), flatten(params), f"{name} theta")
    shape = (steps, len(model.shapes))
    assert_engine_pass(lambda a: inner_optim.meta_loss(model, params, tasks, a.reshape(shape).tolist(), steps,
                                                       optimizer=opt, weights=weights),
                       np.array(r.lrs, dtype=float).ravel(), np.array(lrs).ravel(), f"{name} lrs")


HYPER = {
    "adam": (lambda **kw: Adam(**{"b1": 0.9, "b2": 0.99, "eps": 1e-2, **kw}), ("b1", "b2", "eps")),
    "adam[eps_root,wd]": (lambda **kw: Adam(**{"b1": 0.8, "b2": 0.99, "eps": 5e-2, "eps_root": 5e-2,
                                                "weight_decay": 0.1, **kw}), ("b1", "b2", "eps", "eps_root")),
    "adam[eps=v]": (lambda **kw: Adam(**{"b1": 0.9, "b2": 0.99, "eps": 1e-2, "eps_placement": "v", **kw}),
                    ("b1", "b2", "eps")),
    "momentum[dampening]": (lambda **kw: Momentum(**{"momentum": 0.8, "dampening": 0.3, **kw}),
                            ("momentum", "dampening")),
    "nesterov": (lambda **kw: Momentum(**{"momentum": 0.8, "nesterov": True, **kw}), ("momentum",)),
}


@pytest.mark.parametrize("name", sorted(HYPER))
def test_hyperparameter_gradients_match_richardson(name: str) -> None:
    # The optimisers validate their hyper-parameters as real numbers, so the engine differentiates by
    # Richardson extrapolation here (no complex step).
    model, params, tasks = problem(9)
    make, names = HYPER[name]
    steps, lrs = 4, constant_lrs(model, 0.1, 4)
    r = inner_optim.meta_loss_and_grad(model, params, tasks, lrs, steps, optimizer=make())
    x0 = np.array([getattr(make(), n) for n in names])
    claimed = np.array([r.hyper[n] for n in names])
    assert_engine_pass(lambda x: inner_optim.meta_loss(model, params, tasks, lrs, steps,
                                                       optimizer=make(**dict(zip(names, map(float, x))))),
                       claimed, x0, f"{name} hyper-parameters", method="richardson")


def test_richardson_agrees_for_adam_on_softplus() -> None:
    # Real differences (the engine's Richardson) on a non-analytic model: the adjoint does not rely on complex step.
    rng = np.random.default_rng(7)
    model = MLP([3, 6, 2], "softplus", "mse")
    params = [0.7 * rng.normal(size=s) for s in model.shapes]
    tasks = make_tasks(model, rng)
    lrs = per_step_lrs(model, 4, rng)
    r = inner_optim.meta_loss_and_grad(model, params, tasks, lrs, 4, optimizer=Adam())
    assert_engine_pass(lambda x: inner_optim.meta_loss(model, unflatten(x, model.shapes), tasks, lrs, 4,
                                                       optimizer=Adam()),
                       flatten(r.params), flatten(params), "adam theta (richardson)", method="richardson")


def test_array_rates_and_exclusion_match_complex_step() -> None:
    model, params, tasks = problem(3)
    rng = np.random.default_rng(3)
    steps = 3
    lrs = [[None, rng.uniform(0.05, 0.2, size=model.shapes[1]), rng.uniform(0.05, 0.2, size=model.shapes[2]), 0.1]
           for _ in range(steps)]
    r = inner_optim.meta_loss_and_grad(model, params, tasks, lrs, steps, optimizer=Adam())
    assert r.lrs[0][0] is None and np.shape(r.lrs[0][1]) == model.shapes[1] and np.ndim(r.lrs[0][3]) == 0
    assert np.linalg.norm(r.params[0]) > 0  # the excluded tensor still gets a meta-gradient through every p_k
    assert_engine_pass(lambda x: inner_optim.meta_loss(model, unflatten(x, model.shapes), tasks, lrs, steps,
                                                       optimizer=Adam()),
                       flatten(r.params), flatten(params), "adam theta with exclusion")


@st.composite
def loop_problems(draw):
    """A random small problem of the optimiser loop: model, optimiser, K, per-step rates, weights, exclusion."""
    loss = draw(st.sampled_from(("mse", "ce")))
    act = draw(st.sampled_from(("tanh", "sigmoid", "softplus")))
    hidden = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))
    model = MLP([2, *hidden, 3 if loss == "ce" else 1], act, loss, draw(st.booleans()))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    params = [0.8 * rng.normal(size=s) for s in model.shapes]
    tasks = make_tasks(model, rng, draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 3)))
    steps = draw(st.integers(1, 4))
    excluded = draw(st.sets(st.integers(0, len(model.shapes) - 1), max_size=len(model.shapes) - 1))
    lrs = [[None if i in excluded else float(rng.uniform(0.02, 0.3)) for i in range(len(model.shapes))]
           for _ in range(steps)]
    weights = rng.uniform(0.0, 1.0, size=steps) if draw(st.booleans()) else None
    return model, params, tasks, steps, lrs, weights, draw(st.sampled_from(sorted(OPTIMIZERS))), rng


@given(pb=loop_problems())
def test_property_loop_gradients_match_complex_step(pb: Any) -> None:
    model, params, tasks, steps, lrs, weights, name, rng = pb
    opt = OPTIMIZERS[name]()
    r = inner_optim.meta_loss_and_grad(model, params, tasks, lrs, steps, optimizer=opt, weights=weights)
    e = [rng.normal(size=s) for s in model.shapes]
    h = 1e-30
    cs = np.imag(inner_optim.meta_loss(model, [p + 1j * h * v for p, v in zip(params, e)], tasks, lrs, steps,
                                       optimizer=opt, weights=weights)) / h
    got = float(flatten(r.params) @ flatten(e))
    # Complex step has no cancellation: rounding of the K-step recursion only (as the gradient family's CS_RTOL).
    assert abs(got - cs) <= 1e-9 * (np.linalg.norm(flatten(r.params)) * np.linalg.norm(flatten(e)) + abs(cs)), name
    de = [[None if a is None else rng.normal() for a in row] for row in lrs]
    cs_lr = np.imag(inner_optim.meta_loss(model, params, tasks, [[None if a is None else a + 1j * h * b
                                                                  for a, b in zip(ra, rb)]
                                                                 for ra, rb in zip(lrs, de)], steps,
                                          optimizer=opt, weights=weights)) / h
    g_lr = np.array([a for row in r.lrs for a in row if a is not None], dtype=float)
    v_lr = np.array([b for row in de for b in row if b is not None])
    assert abs(g_lr @ v_lr - cs_lr) <= 1e-9 * (np.linalg.norm(g_lr) * np.linalg.norm(v_lr) + abs(cs_lr)), name


# ---------------------------------------------------------------------------
# SGD against the independent MAML-family references
# ---------------------------------------------------------------------------


def test_sgd_reproduces_maml_fomaml_anil_metasgd() -> None:
    model, params, tasks = problem(11)
    steps = 4
    loss, grad = maml.meta_loss_and_grad(model, params, tasks, 0.1, steps)
    r = inner_optim.meta_loss_and_grad(model, params, tasks, constant_lrs(model, 0.1, steps), steps)
    assert r.loss == pytest.approx(loss, rel=1e-14) and rel(r.params, grad) <= MATCH
    _, grad_fo = maml.meta_loss_and_grad(model, params, tasks, 0.1, steps, first_order=True)
    r = inner_optim.meta_loss_and_grad(model, params, tasks, constant_lrs(model, 0.1, steps), steps,
                                       approximation="first_order")
    assert rel(r.params, grad_fo) <= MATCH
    body = [i for i in range(len(model.shapes)) if i not in model.head_indices]
    _, grad_anil = anil.meta_loss_and_grad(model, params, tasks, 0.1, steps)
    r = inner_optim.meta_loss_and_grad(model, params, tasks, constant_lrs(model, 0.1, steps, exclude=body), steps)
    assert rel(r.params, grad_anil) <= MATCH
    rng = np.random.default_rng(0)
    a = [rng.uniform(0.05, 0.15, size=s) for s in model.shapes]
    _, g_theta, g_a = metasgd.meta_loss_and_grad(model, params, a, tasks, steps)
    r = inner_optim.meta_loss_and_grad(model, params, tasks, [a] * steps, steps)
    # Meta-SGD shares one rate across steps: its gradient is the sum of the per-step ones.
    assert rel(r.params, g_theta) <= MATCH
    assert rel([sum(r.lrs[k][i] for k in range(steps)) for i in range(len(a))], g_a) <= MATCH


def test_momentum_zero_is_sgd_and_torch_first_step_ignores_dampening() -> None:
    model, params, tasks = problem(12)
    lrs = constant_lrs(model, 0.1, 3)
    sgd = inner_optim.meta_loss_and_grad(model, params, tasks, lrs, 3, optimizer=SGD())
    mom0 = inner_optim.meta_loss_and_grad(model, params, tasks, lrs, 3, optimizer=Momentum(0.0))
    assert rel(sgd.params, mom0.params) <= MATCH
    # K = 1: torch's buffer is the raw gradient, dampening unused; the "zeros" rule scales it by 1 - tau.
    one = constant_lrs(model, 0.1, 1)
    a = inner_optim.meta_loss_and_grad(model, params, tasks, one, 1, optimizer=Momentum(0.9, dampening=0.5))
    b = inner_optim.meta_loss_and_grad(model, params, tasks, one, 1, optimizer=SGD())
    c = inner_optim.meta_loss_and_grad(model, params, tasks, constant_lrs(model, 0.2, 1), 1,
                                       optimizer=Momentum(0.9, dampening=0.5, init="zeros"))
    assert rel(a.params, b.params) <= MATCH and rel(c.params, b.params) <= MATCH


# ---------------------------------------------------------------------------
# Adam: the first step, v = 0, and eps placement
# ---------------------------------------------------------------------------


def test_first_adam_step_is_sign_like_closed_form() -> None:
    # K = 1 on a quadratic: p_1 = theta - a g / (|g| + eps) with g = A (theta - c) (bias corrections cancel).
    rng = np.random.default_rng(0)
    q = Quadratic(4)
    A = np.diag(rng.uniform(0.5, 2.0, size=4))
    c, theta, eps, a = rng.normal(size=4), rng.normal(size=4), 1e-3, 0.1
    task = Task(A, c, A, c)
    g = A @ (theta - c)
    p1 = theta - a * g / (np.abs(g) + eps)
    expected = A @ (p1 - c) * (1.0 - a * np.diag(A) * eps / (np.abs(g) + eps) ** 2)  # diagonal chain rule
    r = inner_optim.meta_loss_and_grad(q, [theta], [task], constant_lrs(q, a, 1), 1, optimizer=Adam(eps=eps))
    assert r.loss == pytest.approx(0.5 * (p1 - c) @ A @ (p1 - c), rel=1e-14)
    assert rel(r.params, [expected]) <= MATCH


def test_adam_at_v_zero_is_exact_not_nan() -> None:
    # theta_0 = c_0 with a diagonal A: g_0 = 0 exactly at every step (v = m = 0 in coordinate 0), yet the
    # map is C^1 there (d = g / (|g| + eps) at the first step). Autograd's chain rule gives 0 * inf = NaN;
    # the reference's limit must match the complex step and the limit of central differences.
    rng = np.random.default_rng(1)
    q = Quadratic(3)
    A = np.diag([1.0, 2.0, 0.5])
    c = rng.normal(size=3)
    theta = rng.normal(size=3)
    theta[0] = c[0]
    tasks = [Task(A, c, A, c + 0.3)]
    opt, steps, lrs = Adam(eps=1e-2), 3, constant_lrs(q, 0.1, 3)
    r = inner_optim.meta_loss_and_grad(q, [theta], tasks, lrs, steps, optimizer=opt)
    assert np.all(np.isfinite(r.params[0]))

    def f(x: Any) -> Any:
        return inner_optim.meta_loss(q, [x], tasks, lrs, steps, optimizer=opt)

    def cd(e: np.ndarray, t: float) -> float:
        return (f(theta + t * e) - f(theta - t * e)) / (2 * t)

    for i in range(3):
        e, ref = np.eye(3)[i], r.params[0][i]
        cs = float(np.imag(f(theta + 1e-30j * e)) / 1e-30)
        assert abs(ref - cs) <= 1e-12 * (1 + abs(cs)), (i, ref, cs)
        # Central differences carry an O(t) error here (the g|g| / eps^2 term of d is odd, not smooth):
        # they converge to the reference at first order, and one extrapolation step 2 D(t/2) - D(t)
        # removes that term (measured: 8.3e-3 at t = 1e-7, 1.3e-6 after extrapolation, coordinate 0).
        e1, e2 = abs(cd(e, 1e-6) - ref), abs(cd(e, 1e-7) - ref)
        assert e2 <= 0.2 * e1 + 1e-8 * (1 + abs(ref)), (i, e1, e2)
        assert abs(2 * cd(e, 5e-8) - cd(e, 1e-7) - ref) <= 1e-6 * (1 + abs(ref)), i


def test_adam_zero_feature_gives_finite_gradient() -> None:
    # A support input feature that is identically zero: the gradient of its weights is exactly 0 at every step.
    model, params, tasks = problem(5)
    tasks = [Task(np.where(np.arange(3) == 1, 0.0, t.x_support), t.y_support, t.x_query, t.y_query) for t in tasks]
    lrs = constant_lrs(model, 0.1, 3)
    r = inner_optim.meta_loss_and_grad(model, params, tasks, lrs, 3, optimizer=Adam())
    assert np.all(np.isfinite(flatten(r.params)))
    assert_engine_pass(lambda x: inner_optim.meta_loss(model, unflatten(x, model.shapes), tasks, lrs, 3,
                                                       optimizer=Adam()),
                       flatten(r.params), flatten(params), "adam theta, zero feature")


def test_adam_undefined_derivatives_raise() -> None:
    q = Quadratic(2)
    task = Task(np.eye(2), np.zeros(2), np.eye(2), np.ones(2))
    with pytest.raises(NotDifferentiableError, match="0/0"):
        inner_optim.meta_loss_and_grad(q, [np.array([0.0, 1.0])], [task], constant_lrs(q, 0.1, 2), 2,
                                       optimizer=Adam(eps=0.0))
    # g = 1e-170: g^2 underflows to v = 0 while m != 0; d sqrt(v)/dv is infinite in float64.
    tiny = Task(1e-170 * np.eye(2), np.zeros(2), np.eye(2), np.ones(2))
    with pytest.raises(NotDifferentiableError, match="underflow"):
        inner_optim.meta_loss_and_grad(q, [np.ones(2)], [tiny], constant_lrs(q, 0.1, 1), 1, optimizer=Adam())
    # eps_root > 0 keeps everything finite at v = 0 (optax's variant).
    r = inner_optim.meta_loss_and_grad(q, [np.array([0.0, 1.0])], [task], constant_lrs(q, 0.1, 2), 2,
                                       optimizer=Adam(eps=0.0, eps_root=1e-6))
    assert np.all(np.isfinite(r.params[0]))


def test_eps_placement_changes_the_gradient() -> None:
    # higher's Adam uses eps / sqrt(1 - b2^t) in the v_hat scale: a different, named optimiser. With eps of
    # the gradients' size the meta-gradients differ visibly, so the audit can tell them apart.
    model, params, tasks = problem(2)
    lrs = constant_lrs(model, 0.1, 2)
    a = inner_optim.meta_loss_and_grad(model, params, tasks, lrs, 2, optimizer=Adam(eps=1e-2))
    b = inner_optim.meta_loss_and_grad(model, params, tasks, lrs, 2, optimizer=Adam(eps=0.0, eps_root=1e-4))
    assert rel(a.params, b.params) > 1e-4


# ---------------------------------------------------------------------------
# Learned optimisers: exact BPTT through T = 20 steps
# ---------------------------------------------------------------------------


def _quadratic_problem(seed: int) -> tuple[Quadratic, list[np.ndarray], list[Task]]:
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(5, 5))
    A = W @ W.T / 5 + 0.1 * np.eye(5)
    c = rng.normal(size=5)
    return Quadratic(5), [rng.normal(size=5)], [Task(A, c, A, c)]


LEARNED = {
    "lstm[quadratic]": lambda: (_quadratic_problem(0), 20,
                                lambda phi: LSTMOptimizer(phi, hidden=6, layers=2), LSTMOptimizer.random_params(6, 2)),
    "lstm[mlp]": lambda: (problem(4), 20, lambda phi: LSTMOptimizer(phi, hidden=4), LSTMOptimizer.random_params(4)),
    "meta_lstm[mlp]": lambda: (problem(6), 5, lambda phi: MetaLearnerLSTM(phi), MetaLearnerLSTM.random_params()),
}
#: the learned optimiser adapts only these tensors (the others still enter L_s, which the meta-learner reads)
EXCLUDE = {"meta_lstm[mlp]": (0, 1)}


@pytest.mark.parametrize("name", sorted(LEARNED))
def test_learned_optimizer_bptt_matches_complex_step(name: str) -> None:
    (model, params, tasks), steps, make, phi = LEARNED[name]()
    lrs = constant_lrs(model, 1.0, steps, exclude=EXCLUDE.get(name, ()))
    weights = np.ones(steps) / steps  # Andrychowicz's meta-loss: the sum over the trajectory
    r = inner_optim.meta_loss_and_grad(model, params, tasks, lrs, steps, optimizer=make(phi), weights=weights)
    shapes = [np.shape(p) for p in phi]
    assert_engine_pass(lambda x: inner_optim.meta_loss(model, params, tasks, lrs, steps,
                                                       optimizer=make(unflatten(x, shapes)), weights=weights),
                       flatten(r.optimizer), flatten(phi), f"{name} phi")
    assert_engine_pass(lambda x: inner_optim.meta_loss(model, unflatten(x, model.shapes), tasks, lrs, steps,
                                                       optimizer=make(phi), weights=weights),
                       flatten(r.params), flatten(params), f"{name} theta")


def test_learned_optimizer_approximations_are_switches() -> None:
    (model, params, tasks), steps, make, phi = LEARNED["lstm[quadratic]"]()
    lrs, w, opt = constant_lrs(model, 1.0, steps), np.ones(steps) / steps, make(phi)

    def grad(approx: str) -> np.ndarray:
        return flatten(inner_optim.meta_loss_and_grad(model, params, tasks, lrs, steps, optimizer=opt, weights=w,
                                                      approximation=approx).optimizer)

    exact = grad("exact")
    assert np.array_equal(grad(f"truncated:{steps}"), exact)  # T >= K: nothing truncated
    # Each approximation is a real change (measured distances: reports/inner-optimizers.md).
    for approx in ("truncated:5", "first_order", "stop_gradient"):
        assert rel(grad(approx), exact) > 1e-6, approx


# ---------------------------------------------------------------------------
# MAML++
# ---------------------------------------------------------------------------


def test_mamlpp_lslr_msl_and_exclusion_match_complex_step() -> None:
    model, params, tasks = problem(8)
    steps = 4
    rng = np.random.default_rng(8)
    a = rng.uniform(0.05, 0.2, size=(steps, len(model.shapes)))
    w = mamlpp.msl_weights(steps, epoch=3, msl_epochs=10)
    exclude = (1,)  # a bias kept out of the inner loop (batch-norm's role in MAML++'s backbones)
    loss, g_theta, g_a = mamlpp.meta_loss_and_grad(model, params, a, tasks, steps, weights=w, exclude=exclude)
    assert np.all(g_a[:, 1] == 0) and np.all(g_a[:, [0, 2, 3]] != 0)
    assert_engine_pass(lambda x: mamlpp.meta_loss(model, unflatten(x, model.shapes), a, tasks, steps, weights=w,
                                                  exclude=exclude), flatten(g_theta), flatten(params), "maml++ theta")
    assert_engine_pass(lambda x: mamlpp.meta_loss(model, params, x.reshape(a.shape), tasks, steps, weights=w,
                                                  exclude=exclude), g_a.ravel(), a.ravel(), "maml++ lrs")
    # Constant rates and the final-step loss: plain MAML.
    _, g_maml = maml.meta_loss_and_grad(model, params, tasks, 0.1, steps)
    _, g_pp, _ = mamlpp.meta_loss_and_grad(model, params, np.full_like(a, 0.1), tasks, steps)
    assert rel(g_pp, g_maml) <= MATCH


def test_msl_weights_schedule() -> None:
    # Antoniou et al.'s get_per_step_loss_importance_vector: uniform at epoch 0, annealed onto the last step.
    assert np.allclose(mamlpp.msl_weights(5, 0, 10), 0.2)
    end = mamlpp.msl_weights(5, 10, 10)
    assert np.allclose(end[:-1], 0.03 / 5) and end[-1] == pytest.approx(1 - 4 * 0.03 / 5)
    assert np.all(np.diff(mamlpp.msl_weights(5, 4, 10)[:-1]) == 0)


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def test_bad_inputs_are_named() -> None:
    model, params, tasks = problem(0)
    with pytest.raises(InvalidInputError, match="lrs must be a list of 3 per-step lists"):
        inner_optim.meta_loss(model, params, tasks, [0.1] * 4, 3)
    rows = constant_lrs(model, 0.1, 2)
    rows[1][0] = None
    with pytest.raises(InvalidInputError, match="excluded .None. at every step"):
        inner_optim.meta_loss(model, params, tasks, rows, 2)
    with pytest.raises(InvalidInputError, match="weights has shape"):
        inner_optim.meta_loss(model, params, tasks, constant_lrs(model, 0.1, 2), 2, weights=[1.0])
    with pytest.raises(InvalidInputError, match="unknown part 'truncate:3'"):
        Approximation.parse("truncate:3")
    assert Approximation.parse("truncated:3+stop_gradient") == Approximation(truncate=3, detach_state=True)
    assert str(Approximation.parse("first_order")) == "first_order"
    with pytest.raises(InvalidInputError, match="nesterov=True needs"):
        Momentum(0.9, nesterov=True, dampening=0.1)
    with pytest.raises(InvalidInputError, match="b2=1.0 must be a real number in"):
        Adam(b2=1.0)
    with pytest.raises(InvalidInputError, match=r"lrs has shape \(2,\), expected \(3, 4\)"):
        mamlpp.meta_loss(model, params, [0.1, 0.1], tasks, 3)
    with pytest.raises(InvalidInputError, match="random_params"):
        LSTMOptimizer([np.zeros(3)], hidden=4)


# ---------------------------------------------------------------------------
# inner_optimizer= on the gradient-based algorithms
# ---------------------------------------------------------------------------


def _algorithms(model: MLP, tasks: list[Task], opt: Any) -> dict[str, tuple[Callable, Callable, Any]]:
    rng = np.random.default_rng(0)
    a = [rng.uniform(0.05, 0.15, size=s) for s in model.shapes]
    return {
        "maml": (lambda p: maml.meta_loss(model, p, tasks, 0.1, 3, inner_optimizer=opt),
                 lambda p: maml.meta_loss_and_grad(model, p, tasks, 0.1, 3, inner_optimizer=opt)[1], None),
        "anil": (lambda p: anil.meta_loss(model, p, tasks, 0.1, 3, inner_optimizer=opt),
                 lambda p: anil.meta_loss_and_grad(model, p, tasks, 0.1, 3, inner_optimizer=opt)[1], None),
        "metasgd": (lambda p: metasgd.meta_loss(model, p, a, tasks, 3, inner_optimizer=opt),
                    lambda p: metasgd.meta_loss_and_grad(model, p, a, tasks, 3, inner_optimizer=opt)[1], a),
    }


@pytest.mark.parametrize("algorithm", ["maml", "anil", "metasgd"])
@pytest.mark.parametrize("opt_name", ["nesterov[wd]", "adam"])
def test_algorithms_take_inner_optimizer(algorithm: str, opt_name: str) -> None:
    model, params, tasks = problem(13)
    opt = OPTIMIZERS[opt_name]()
    loss_fn, grad_fn, rates = _algorithms(model, tasks, opt)[algorithm]
    assert_engine_pass(lambda x: loss_fn(unflatten(x, model.shapes)), flatten(grad_fn(params)), flatten(params),
                       f"{algorithm} with {opt_name}")
    if rates is not None:  # Meta-SGD's rates, shared by the steps: d/da by complex step too
        _, _, g_a = metasgd.meta_loss_and_grad(model, params, rates, tasks, 3, inner_optimizer=opt)
        assert_engine_pass(lambda x: metasgd.meta_loss(model, params, unflatten(x, model.shapes), tasks, 3,
                                                       inner_optimizer=opt),
                           flatten(g_a), flatten(rates), f"metasgd rates with {opt_name}")
    # None keeps the algorithm's own SGD path; SGD() through the optimiser loop gives the same gradient.
    plain = _algorithms(model, tasks, None)[algorithm][1](params)
    via_loop = _algorithms(model, tasks, SGD())[algorithm][1](params)
    assert rel(plain, via_loop) <= MATCH


def test_reptile_with_adam_moves_by_the_adam_displacement() -> None:
    from reference import reptile

    q = Quadratic(3)
    A, c, theta = np.diag([1.0, 2.0, 4.0]), np.array([1.0, -1.0, 0.5]), np.zeros(3)
    # One Adam step from theta: displacement alpha * g / (|g| + eps) (closed form of the first step).
    g = A @ (theta - c)
    got = reptile.direction(q, [theta], [Task(A, c, A, c)], 0.1, 1, inner_optimizer=Adam(eps=1e-3))
    assert np.allclose(got[0], 0.1 * g / (np.abs(g) + 1e-3), rtol=1e-14, atol=0)
