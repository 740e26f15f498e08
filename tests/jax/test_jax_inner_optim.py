"""Optimiser-driven inner loops: the reference against functional JAX and optax.

* ``verify.backends.jax.inner_optim``: the reference's optimiser specs written
  with ``jax.numpy``, differentiated by ``jax.value_and_grad``; approximations
  by ``jax.lax.stop_gradient``.
* optax's ``sgd(momentum=..., nesterov=...)`` and ``adam(eps_root=...)`` in the
  loop JAX users write (``tx.update`` / ``optax.apply_updates``).

Bar (issue #17): <= 1e-12 normwise relative in float64 for momentum and Adam,
K = 1..5 (K = 1: Adam's first step). The JAX programs run eagerly (no jit), so
the cases are few and small; the T = 20 learned-optimiser run is marked slow
(torch covers T = 20 in CI, tests/torch/test_torch_inner_optim.py). The
compiled loop (``jit=True``, what the check matrix runs) has its own tests at
the end: every optimiser, the approximations and the program cache's key.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytest.importorskip("jax")

import jax  # noqa: E402

from reference import inner_optim  # noqa: E402
from reference.inner_optim import constant_lrs  # noqa: E402
from reference.learned_optimizers import LSTMOptimizer, MetaLearnerLSTM  # noqa: E402
from reference.models import MLP, flatten  # noqa: E402
from reference.optimizers import Adam, Momentum  # noqa: E402
from reference.tasks import Task, check_tasks  # noqa: E402
from verify.backends.jax import inner_optim as jio  # noqa: E402
from verify.backends.jax._model import build_loss, to_jax_tasks  # noqa: E402

# Issue #17's bar; measured <= 1.2e-14 (reference vs optax Adam, K = 5).
BAR = 1e-12


def rel(a: Any, b: Any) -> float:
    a, b = flatten([np.asarray(x) for x in a]), flatten([np.asarray(x) for x in b])
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), 1e-300))


def problem(seed: int, n_tasks: int = 1) -> tuple[MLP, list[np.ndarray], list[Task]]:
    rng = np.random.default_rng(seed)
    model = MLP([3, 4, 2], "tanh", "mse")
    params = [0.7 * rng.normal(size=s) for s in model.shapes]
    tasks = [Task(rng.normal(size=(5, 3)), rng.normal(size=(5, 2)), rng.normal(size=(4, 3)), rng.normal(size=(4, 2)))
             for _ in range(n_tasks)]
    return model, params, check_tasks(model, tasks)


def optax_meta_grad(model: MLP, params: list[np.ndarray], tasks: list[Task], tx: Any, steps: int) -> list[Any]:
    """The meta-gradient as JAX users write it with optax (the code under audit)."""
    optax = pytest.importorskip("optax")
    loss = build_loss(model)
    jt = to_jax_tasks(tasks)

    def meta(theta: list[Any]) -> Any:
        total = 0.0
        for t in jt:
            p, state = theta, tx.init(theta)
            for _ in range(steps):
                updates, state = tx.update(jax.grad(loss)(p, t.x_support, t.y_support), state, p)
                p = optax.apply_updates(p, updates)
            total = total + loss(p, t.x_query, t.y_query)
        return total / len(jt)

    return jax.grad(meta)([jax.numpy.asarray(p) for p in params])


@pytest.mark.parametrize("name", ["momentum", "nesterov", "adam", "adam[eps_root]"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5])
def test_optax_matches_reference(name: str, steps: int) -> None:
    optax = pytest.importorskip("optax")
    tx, opt = {
        "momentum": (optax.sgd(0.1, momentum=0.9), Momentum(0.9)),
        "nesterov": (optax.sgd(0.1, momentum=0.9, nesterov=True), Momentum(0.9, nesterov=True)),
        "adam": (optax.adam(0.1, eps=1e-3), Adam(eps=1e-3)),
        "adam[eps_root]": (optax.adam(0.1, eps=1e-3, eps_root=1e-6), Adam(eps=1e-3, eps_root=1e-6)),
    }[name]
    model, params, tasks = problem(steps)
    got = optax_meta_grad(model, params, tasks, tx, steps)
    ref = inner_optim.meta_loss_and_grad(model, params, tasks, constant_lrs(model, 0.1, steps), steps,
                                         optimizer=opt).params
    assert rel(ref, got) <= BAR, f"optax {name} K={steps}: rel {rel(ref, got):.2e}"


def test_optax_adam_at_v_zero_gives_nan_reference_is_exact() -> None:
    # optax.adam with eps_root = 0 at a coordinate whose gradient is identically 0: jax.grad through sqrt(0)
    # is inf * 0 = NaN (optax's docstring recommends eps_root > 0 when differentiating through Adam).
    optax = pytest.importorskip("optax")
    model, params, tasks = problem(9)
    tasks = [Task(np.where(np.arange(3) == 1, 0.0, t.x_support), *t[1:]) for t in tasks]
    got = optax_meta_grad(model, params, tasks, optax.adam(0.1), 2)
    assert np.isnan(np.asarray(got[0])[:, 1]).all()
    ref = inner_optim.meta_loss_and_grad(model, params, tasks, constant_lrs(model, 0.1, 2), 2, optimizer=Adam())
    assert np.all(np.isfinite(flatten(ref.params)))


@pytest.mark.parametrize("approximation", ["exact", "first_order", "truncated:1", "stop_gradient"])
def test_functional_jax_adam_with_schedule_and_weights(approximation: str) -> None:
    model, params, tasks = problem(3)
    steps = 2
    rng = np.random.default_rng(3)
    lrs = [[None if i == 1 else float(rng.uniform(0.05, 0.2)) for i in range(len(model.shapes))] for _ in range(steps)]
    w = rng.uniform(0.2, 1.0, size=steps)
    opt = Adam(weight_decay=0.05)
    r = inner_optim.meta_loss_and_grad(model, params, tasks, lrs, steps, optimizer=opt, weights=w,
                                       approximation=approximation)
    j = jio.meta_loss_and_grad(model, params, tasks, lrs, steps, optimizer=opt, weights=w, approximation=approximation)
    assert rel(r.params, j.params) <= BAR
    assert rel([a for row in r.lrs for a in row if a is not None], [a for row in j.lrs for a in row if a is not None]) <= BAR


@pytest.mark.parametrize("name,steps", [("lstm", 3), ("meta_lstm", 3),
                                        pytest.param("lstm", 20, marks=pytest.mark.slow)])
def test_functional_jax_learned_optimizers(name: str, steps: int) -> None:
    model, params, tasks = problem(4)
    opt = (LSTMOptimizer(LSTMOptimizer.random_params(4), hidden=4) if name == "lstm"
           else MetaLearnerLSTM(MetaLearnerLSTM.random_params()))
    lrs, w = constant_lrs(model, 1.0, steps), np.ones(steps) / steps
    r = inner_optim.meta_loss_and_grad(model, params, tasks, lrs, steps, optimizer=opt, weights=w)
    j = jio.meta_loss_and_grad(model, params, tasks, lrs, steps, optimizer=opt, weights=w)
    assert rel(r.optimizer, j.optimizer) <= BAR and rel(r.params, j.params) <= BAR


@pytest.mark.parametrize("algorithm", ["maml", "anil", "metasgd"])
def test_backend_algorithms_take_inner_optimizer(algorithm: str) -> None:
    from reference import anil as r_anil
    from reference import maml as r_maml
    from reference import metasgd as r_metasgd
    from verify.backends.jax import anil as j_anil
    from verify.backends.jax import maml as j_maml
    from verify.backends.jax import metasgd as j_metasgd

    model, params, tasks = problem(14)
    opt = Adam(weight_decay=0.05)
    if algorithm == "maml":
        ref = r_maml.meta_loss_and_grad(model, params, tasks, 0.1, 2, inner_optimizer=opt)
        got = j_maml.meta_loss_and_grad(model, params, tasks, 0.1, 2, inner_optimizer=opt)
    elif algorithm == "anil":
        ref = r_anil.meta_loss_and_grad(model, params, tasks, 0.1, 2, inner_optimizer=opt)
        got = j_anil.meta_loss_and_grad(model, params, tasks, 0.1, 2, inner_optimizer=opt)
    else:
        a = [np.full(s, 0.1) for s in model.shapes]
        ref = r_metasgd.meta_loss_and_grad(model, params, a, tasks, 2, inner_optimizer=opt)
        got = j_metasgd.meta_loss_and_grad(model, params, a, tasks, 2, inner_optimizer=opt)
        assert rel(ref[2], got[2]) <= BAR
    assert abs(ref[0] - got[0]) <= BAR * abs(ref[0]) and rel(ref[1], got[1]) <= BAR


def test_mamlpp_jax_backend_matches_reference() -> None:
    from reference import mamlpp as r_pp
    from verify.backends.jax import mamlpp as j_pp

    model, params, tasks = problem(15)
    steps = 3
    a = np.random.default_rng(15).uniform(0.05, 0.2, size=(steps, len(model.shapes)))
    kw = dict(weights=r_pp.msl_weights(steps, 2, 10), exclude=(1,))
    ref = r_pp.meta_loss_and_grad(model, params, a, tasks, steps, **kw)
    got = j_pp.meta_loss_and_grad(model, params, a, tasks, steps, **kw)
    assert abs(ref[0] - got[0]) <= BAR * abs(ref[0]) and rel(ref[1], got[1]) <= BAR and rel([ref[2]], [got[2]]) <= BAR


# ---------------------------------------------------------------------------
# The compiled loop (jit=True, issue #18): one program per configuration, cached; the check matrix runs it
# under quick_compile (verify.backends.jax._model.QUICK_COMPILE_OPTIONS), so these tests do too.
# ---------------------------------------------------------------------------

_JIT_OPTIMIZERS = {
    "momentum": lambda: Momentum(0.9),
    "nesterov": lambda: Momentum(0.9, nesterov=True, weight_decay=0.05),
    "momentum[zeros,dampening]": lambda: Momentum(0.8, dampening=0.3, init="zeros"),
    "adam": lambda: Adam(),
    "adamw": lambda: Adam(weight_decay=0.05, decoupled=True),
    "adam[eps_root]": lambda: Adam(eps=1e-3, eps_root=1e-6),
    "adam[eps on v]": lambda: Adam(eps=1e-3, eps_placement="v"),
    "lstm": lambda: LSTMOptimizer(LSTMOptimizer.random_params(3, seed=1), hidden=3),
    "meta_lstm": lambda: MetaLearnerLSTM(MetaLearnerLSTM.random_params(seed=1)),
}


@pytest.mark.parametrize("name", list(_JIT_OPTIMIZERS))
def test_jitted_loop_matches_reference(name: str) -> None:
    from verify.backends.jax import quick_compile

    model, params, tasks = problem(21, n_tasks=2)
    steps = 3
    opt = _JIT_OPTIMIZERS[name]()
    lrs = constant_lrs(model, 1.0 if name.endswith("lstm") else 0.1, steps)
    w = np.array([0.2, 0.0, 0.8])  # a zero weight: that step's query loss is left out of the program
    r = inner_optim.meta_loss_and_grad(model, params, tasks, lrs, steps, optimizer=opt, weights=w)
    with quick_compile():
        j = jio.meta_loss_and_grad(model, params, tasks, lrs, steps, optimizer=opt, weights=w, jit=True)
        # the forward-only program of meta_loss (MAML++'s, Meta-SGD's meta_loss with an optimiser), twice
        loss = (jio.meta_loss(model, params, tasks, lrs, steps, optimizer=opt, weights=w, jit=True)
                if name in ("nesterov", "meta_lstm") else r.loss)
    assert abs(j.loss - r.loss) <= BAR * abs(r.loss) and abs(loss - r.loss) <= BAR * abs(r.loss)
    assert rel(r.params, j.params) <= BAR
    assert rel([a for row in r.lrs for a in row], [a for row in j.lrs for a in row]) <= BAR
    if r.optimizer:
        assert rel(r.optimizer, j.optimizer) <= BAR


@pytest.mark.parametrize("approximation", ["first_order", "truncated:1", "stop_gradient"])
def test_jitted_loop_approximations_match_reference(approximation: str) -> None:
    from verify.backends.jax import quick_compile

    model, params, tasks = problem(22)
    steps = 3
    opt = Adam(weight_decay=0.05)
    lrs = [[None if i == 0 else 0.1 for i in range(len(model.shapes))] for _ in range(steps)]
    r = inner_optim.meta_loss_and_grad(model, params, tasks, lrs, steps, optimizer=opt, approximation=approximation)
    with quick_compile():
        j = jio.meta_loss_and_grad(model, params, tasks, lrs, steps, optimizer=opt, approximation=approximation,
                                   jit=True)
    assert rel(r.params, j.params) <= BAR
    assert rel([a for row in r.lrs for a in row if a is not None], [a for row in j.lrs for a in row if a is not None]) <= BAR


def test_jitted_loop_cache_keys_every_hyper_parameter() -> None:
    """A program is reused only for an equal configuration: a stale one would give momentum 0.9's gradient for
    0.5's; a new ``phi`` of the same shapes reuses the LSTM optimiser's program (it is an argument)."""
    from verify.backends.jax import quick_compile

    model, params, tasks = problem(23)
    lrs = constant_lrs(model, 0.1, 2)
    with quick_compile():
        for opt in (Momentum(0.9), Momentum(0.5), Momentum(0.5, nesterov=True), Adam(), Adam(eps=1e-2)):
            r = inner_optim.meta_loss_and_grad(model, params, tasks, lrs, 2, optimizer=opt)
            j = jio.meta_loss_and_grad(model, params, tasks, lrs, 2, optimizer=opt, jit=True)
            assert rel(r.params, j.params) <= BAR, repr(opt)
        lrs1 = constant_lrs(model, 1.0, 2)
        before = None
        for seed in (1, 2):
            opt = LSTMOptimizer(LSTMOptimizer.random_params(2, seed=seed), hidden=2)
            r = inner_optim.meta_loss_and_grad(model, params, tasks, lrs1, 2, optimizer=opt)
            j = jio.meta_loss_and_grad(model, params, tasks, lrs1, 2, optimizer=opt, jit=True)
            assert rel(r.optimizer, j.optimizer) <= BAR and rel(r.params, j.params) <= BAR
            before = len(jio._PROGRAMS) if before is None else before
        assert len(jio._PROGRAMS) == before
