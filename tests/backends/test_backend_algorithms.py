"""Every backend algorithm (torch, JAX) against the NumPy reference: one table over backends, float64 and float32.

Expected values come from ``reference.*`` (analytic, hand-written derivatives,
tested against complex step by its own suite), and for a few cases from
Richardson finite differences of the backend's own meta-loss (autodiff
consistency, independent of the reference). Tolerances: the
``"reference_match"`` entry of ``verify.tolerance`` for the dtype, times the
condition number measured on the reference by perturbation
(``backend_helpers``).

Each table row is built per backend (``_rows(name)``) and runs through the
``backend`` fixture (``tests/conftest.py``), which skips a backend's rows with
the import error when the framework is not installed. JAX rows run jitted
(``Backend.options``) on smaller problems (``REG_SIZES``, ``STEPS``: its compile
time grows with the unrolled graph; the jitted functions are cached per model
spec and shapes inside the backend); the JAX-only tests at the end cover its
eager (``jit=False``) path and iMAML's diagnostics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import backend_helpers as H
import numpy as np
import pytest
from backend_helpers import BACKENDS, backend_param
from hypothesis import given, settings, strategies as st

from reference import anil as r_anil
from reference import imaml as r_imaml
from reference import lrd2 as r_lrd2
from reference import maml as r_maml
from reference import matchingnet as r_match
from reference import metasgd as r_metasgd
from reference import newton as r_newton
from reference import protonet as r_proto
from reference import r2d2 as r_r2d2
from reference import reptile as r_reptile
from reference.models import MLP, flatten, unflatten
from reference.tasks import Task, gaussian_classification, linear_regression, sinusoid
from verify import directional_derivative
from verify.strategies import mlp_problems, mlps
from verify.tolerance import tolerance

DTYPES = ("float64", "float32")

#: Default layer sizes of the regression problems and inner steps of the gradient-family rows, per backend
#: (JAX: smaller, its compile time grows with the graph).
REG_SIZES = {"torch": (1, 6, 6, 1), "jax": (1, 5, 1)}
STEPS = {"torch": 3, "jax": 2}

# ---------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------


def _reg(act="tanh", sizes=(1, 6, 6, 1), n_tasks=2, seed=0):
    m = MLP(list(sizes), act, "mse")
    return m, m.init(seed + 1), sinusoid(n_tasks, 4, 5, seed=seed)


def _cls(act="tanh", n_way=3, seed=0):
    m = MLP([3, 5, n_way], act, "ce")
    return m, m.init(seed + 1), gaussian_classification(n_way, 2, 2, 3, n_tasks=2, seed=seed)


def _bce(act="sigmoid", seed=0):
    m = MLP([3, 5, 1], act, "bce")
    tasks = [Task(t.x_support, t.y_support[:, None].astype(float), t.x_query, t.y_query[:, None].astype(float))
             for t in gaussian_classification(2, 3, 2, 3, n_tasks=2, seed=seed)]
    return m, m.init(seed + 1), tasks


def _ragged(seed=0):
    """Tasks of different shot counts: the meta-batch cannot be stacked for vmap (JAX's Python loop path)."""
    m = MLP([1, 4, 1], "tanh", "mse")
    return m, m.init(seed + 1), sinusoid(1, 3, 4, seed=seed) + sinusoid(1, 5, 2, seed=seed + 1)


def _backbone(n_way=3, seed=0, act="tanh"):
    m = MLP([3, 6, 4], act)
    return m, m.init(seed + 1), gaussian_classification(n_way, 3, 2, 3, n_tasks=2, seed=seed)


def _binary(seed=0):
    m = MLP([3, 5, 4], "tanh")
    tasks = [Task(t.x_support, t.y_support.astype(float), t.x_query, t.y_query.astype(float))
             for t in gaussian_classification(2, 4, 3, 3, n_tasks=2, seed=seed)]
    return m, m.init(seed + 1), tasks


def _lrs(params, seed=0):
    rng = np.random.default_rng(seed)
    return [0.05 + 0.05 * rng.random(p.shape) for p in params]


def _regression_targets(seed=0):
    m, p, tasks = _backbone(seed=seed)
    rng = np.random.default_rng(seed)
    tasks = [Task(t.x_support, rng.normal(size=(len(t.x_support), 2)), t.x_query, rng.normal(size=(len(t.x_query), 2)))
             for t in tasks]
    return m, p, tasks


def _three(f):
    """Adapt ``(loss, grads, extra)`` results to ``(loss, grads + extra)``."""

    def call(*a, **k):
        out = f(*a, **k)
        extra = out[2]
        extra = [extra[k] for k in ("lam", "scale", "offset")] if isinstance(extra, dict) else list(extra)
        return out[0], list(out[1]) + [np.asarray(e) for e in extra]

    return call


# ---------------------------------------------------------------------------
# The table: every algorithm against the reference
# ---------------------------------------------------------------------------


class Row(NamedTuple):
    """``ref(p, ts, m)`` and ``got(B, p, ts, m, **kw)`` both return ``(loss or None, flat grad list)``;
    ``condition(B, m, p, ts)``, if given, is an extra condition factor per dtype."""

    name: str
    problem: tuple[MLP, list[np.ndarray], list[Task]]
    ref: Callable[..., Any]
    got: Callable[..., Any]
    condition: Callable[..., dict[str, float]] | None = None


def _maml_row(name, problem, fo, steps):
    return Row(name, problem,
               lambda p, ts, m: r_maml.meta_loss_and_grad(m, p, ts, 0.1, steps, first_order=fo),
               lambda B, p, ts, m, **kw: B.maml.meta_loss_and_grad(m, p, ts, 0.1, steps, first_order=fo, **kw))


def _imaml_inner_condition(B, m, params, tasks, lam=1.0):
    """Extra float32 condition factor of torch's iMAML: its inner solve stops at a stationarity residual
    ``r <= TOL_FLOOR * max(1, ||grad L_s(theta)||)`` (the backend's documented float32 floor, far above
    float32 rounding of theta), which acts as a perturbation ``r / lam`` of ``theta``: relative to
    ``||theta||`` that is ``r / (lam ||theta||)``, i.e. this many float32 epsilons."""
    import torch

    eps32 = float(np.finfo(np.float32).eps)
    scale = max(max(1.0, float(np.linalg.norm(flatten(m.grad(params, t.x_support, t.y_support))))) for t in tasks)
    r = B.imaml.TOL_FLOOR[torch.float32] * scale
    return {"float64": 1.0, "float32": max(1.0, r / (lam * float(np.linalg.norm(flatten(params)))) / eps32)}


def _rows(backend: str) -> list[Row]:
    """The rows of one backend; the JAX table adds two problem shapes (a deeper K=3 net, ragged tasks)."""
    k, reg = STEPS[backend], REG_SIZES[backend]
    rows = [_maml_row("maml", _reg("tanh", reg), False, k), _maml_row("fomaml", _reg("tanh", reg), True, k)]
    if backend == "jax":
        rows.append(_maml_row("maml-deep-k3", _reg("tanh", sizes=(1, 5, 5, 1)), False, 3))
    rows.append(_maml_row("maml-ce-relu", _cls("relu"), False, k))
    rows.append(_maml_row("maml-bce-sigmoid", _bce("sigmoid"), False, k))
    if backend == "jax":
        rows.append(_maml_row("maml-ragged-tasks", _ragged(), False, k))
    rows.append(Row("anil", _cls("softplus"),
                    lambda p, ts, m: r_anil.meta_loss_and_grad(m, p, ts, 0.2, 2),
                    lambda B, p, ts, m, **kw: B.anil.meta_loss_and_grad(m, p, ts, 0.2, 2, **kw)))
    rows.append(Row("metasgd", _reg("softplus", reg),
                    lambda p, ts, m: _three(r_metasgd.meta_loss_and_grad)(m, p, _lrs(p), ts, 2),
                    lambda B, p, ts, m, **kw: _three(B.metasgd.meta_loss_and_grad)(m, p, _lrs(p), ts, 2, **kw)))
    rows.append(Row("reptile", _reg("sigmoid", reg),
                    lambda p, ts, m: (None, r_reptile.direction(m, p, ts, 0.1, k)),
                    lambda B, p, ts, m, **kw: (None, B.reptile.direction(m, p, ts, 0.1, k, **kw))))
    rows.append(Row("newton", _reg("tanh", sizes=(1, 4, 1)),
                    lambda p, ts, m: r_newton.meta_loss_and_grad(m, p, ts, 0.5, 2, damping=0.5),
                    lambda B, p, ts, m, **kw: B.newton.meta_loss_and_grad(m, p, ts, 0.5, 2, damping=0.5, **kw)))
    for solver in ("cg", "direct"):
        rows.append(Row(f"imaml-{solver}", _reg("softplus", sizes=(1, 5, 1)),
                        lambda p, ts, m, s=solver: r_imaml.meta_loss_and_grad(m, p, ts, 1.0, solver=s),
                        lambda B, p, ts, m, s=solver, **kw: B.imaml.meta_loss_and_grad(m, p, ts, 1.0, solver=s, **kw),
                        _imaml_inner_condition if backend == "torch" else None))
    for form, bias_column, normalize in (("primal", True, True), ("dual", True, True), ("primal", False, False),
                                         ("dual", False, False)):
        opts = dict(form=form, bias_column=bias_column, normalize=normalize)
        rows.append(Row(f"r2d2-{form}-bias{int(bias_column)}-norm{int(normalize)}", _backbone(),
                        lambda p, ts, m, o=opts: _three(r_r2d2.meta_loss_and_grad)(m, p, ts, 3, 0.8, 1.5, 0.3, **o),
                        lambda B, p, ts, m, o=opts, **kw: _three(B.r2d2.meta_loss_and_grad)(m, p, ts, 3, 0.8, 1.5, 0.3,
                                                                                           **o, **kw)))
    rows.append(Row("r2d2-regression", _regression_targets(),
                    lambda p, ts, m: _three(r_r2d2.meta_loss_and_grad)(m, p, ts, 2, 0.8, 1.5, 0.3, regression=True),
                    lambda B, p, ts, m, **kw: _three(B.r2d2.meta_loss_and_grad)(m, p, ts, 2, 0.8, 1.5, 0.3,
                                                                                regression=True, **kw)))
    rows.append(Row("lrd2", _binary(),
                    lambda p, ts, m: _three(r_lrd2.meta_loss_and_grad)(m, p, ts, 0.7, 1.2, -0.1, k),
                    lambda B, p, ts, m, **kw: _three(B.lrd2.meta_loss_and_grad)(m, p, ts, 0.7, 1.2, -0.1, k, **kw)))
    rows.append(Row("protonet", _backbone(),
                    lambda p, ts, m: r_proto.loss_and_grad(m, p, ts, 3),
                    lambda B, p, ts, m, **kw: B.protonet.loss_and_grad(m, p, ts, 3, **kw)))
    rows.append(Row("matchingnet", _backbone(),
                    lambda p, ts, m: r_match.loss_and_grad(m, p, ts, 3),
                    lambda B, p, ts, m, **kw: B.matchingnet.loss_and_grad(m, p, ts, 3, **kw)))
    return rows


ROWS = {name: _rows(name) for name in BACKENDS}

# JAX rows that run only in the slow suite, to bound compile time in CI: two R2-D2 option combinations (the slow
# hypothesis test draws them all) and the float32 runs of the extra MAML shapes.
_JAX_SLOW = {"r2d2-primal-bias0-norm0", "r2d2-dual-bias1-norm1"}
_JAX_FLOAT32_SLOW = {"maml-deep-k3", "maml-ce-relu", "maml-bce-sigmoid", "maml-ragged-tasks"}


def _table():
    return [backend_param(b, row, dtype, id=f"{b}-{row.name}-{dtype}",
                          slow=b == "jax" and (row.name in _JAX_SLOW or dtype == "float32" and row.name in _JAX_FLOAT32_SLOW))
            for b in BACKENDS for dtype in DTYPES for row in ROWS[b]]


_CONDITIONS: dict[tuple[str, str], tuple[float, float]] = {}


def _condition(key, m, params, tasks, ref):
    """``(kappa_loss, kappa_grad)`` measured on the reference, once per row (shared by the dtypes)."""
    if key not in _CONDITIONS:
        _CONDITIONS[key] = H.measured_condition(lambda p, ts: ref(p, ts, m), (params, tasks))
    return _CONDITIONS[key]


@pytest.mark.parametrize("backend,row,dtype", _table(), indirect=["backend"])
def test_matches_reference(backend, row, dtype):
    """The backend's result equals the reference within the dtype's tolerance times the condition."""
    m, params, tasks = row.problem
    k_loss, k_grad = _condition((backend.name, row.name), m, params, tasks, row.ref)
    want_loss, want = row.ref(params, tasks, m)
    loss, grads = row.got(backend, params, tasks, m, dtype=dtype, **backend.options)
    assert all(np.asarray(g).dtype == np.float64 for g in grads)
    factor = row.condition(backend, m, params, tasks)[dtype] if row.condition else 1.0
    if want_loss is not None:
        H.assert_close(f"{row.name} meta-loss ({dtype})", [loss], [want_loss], dtype, k_loss * factor)
    H.assert_close(f"{row.name} meta-gradient ({dtype})", grads, want, dtype, k_grad * factor)


def test_float32_really_computes_in_float32(backend):
    """A float32 run differs from float64 at float32's round-off level, not float64's."""
    m, p, ts = _reg("tanh", REG_SIZES[backend.name])
    k = STEPS[backend.name]
    _, g64 = backend.maml.meta_loss_and_grad(m, p, ts, 0.1, k, **backend.options)
    _, g32 = backend.maml.meta_loss_and_grad(m, p, ts, 0.1, k, dtype="float32", **backend.options)
    assert 1e-9 < H.rel_err(g32, g64) < 1e-4


def test_linear_regression_maml_k1_closed_form(backend):
    """K=1 MAML on a linear model: (I - alpha H_s) grad L_q with H_s = 2/n X^T X (mse), a closed form."""
    m = MLP([2, 1], "identity", bias=False)
    (t,) = linear_regression(1, 5, 4, dim=2, seed=3)
    w = np.array([[0.3, -0.2]])
    alpha = 0.05
    xs, xq = t.x_support, t.x_query
    hs = 2.0 / len(xs) * xs.T @ xs
    w1 = w.ravel() - alpha * (hs @ w.ravel() - 2.0 / len(xs) * xs.T @ t.y_support.ravel())
    gq = 2.0 / len(xq) * xq.T @ (xq @ w1 - t.y_query.ravel())
    want = (np.eye(2) - alpha * hs) @ gq
    _, (got,) = backend.maml.meta_loss_and_grad(m, [w], [t], alpha, 1, **backend.options)
    H.assert_close("closed-form K=1 MAML", [got], [want], "float64")


# ---------------------------------------------------------------------------
# Autodiff consistency, independent of the reference: <grad, v> vs Richardson of the backend's own meta-loss
# ---------------------------------------------------------------------------


def _consistency(backend: str) -> dict[str, tuple[Any, Callable[..., Any], Callable[..., Any]]]:
    """``name -> (problem, loss(B, m, p, ts, **kw), grad(B, m, p, ts, **kw))``; lrd2 is checked on torch only."""
    k = STEPS[backend]
    rows = {
        "maml": (_reg("tanh", REG_SIZES[backend]),
                 lambda B, m, p, ts, **kw: B.maml.meta_loss(m, p, ts, 0.1, k, **kw),
                 lambda B, m, p, ts, **kw: B.maml.meta_loss_and_grad(m, p, ts, 0.1, k, **kw)[1]),
        "newton": (_reg("softplus", sizes=(1, 3, 1)),
                   lambda B, m, p, ts, **kw: B.newton.meta_loss(m, p, ts, 0.5, 2, damping=0.5, **kw),
                   lambda B, m, p, ts, **kw: B.newton.meta_loss_and_grad(m, p, ts, 0.5, 2, damping=0.5, **kw)[1]),
        "imaml": (_reg("tanh", sizes=(1, 3, 1), n_tasks=1),
                  lambda B, m, p, ts, **kw: B.imaml.meta_loss(m, p, ts, 2.0, **kw),
                  lambda B, m, p, ts, **kw: B.imaml.meta_loss_and_grad(m, p, ts, 2.0, **kw)[1]),
    }
    if backend == "torch":
        rows["lrd2"] = (_binary(),
                        lambda B, m, p, ts, **kw: B.lrd2.meta_loss(m, p, ts, 0.7, 1.2, -0.1, 3, **kw),
                        lambda B, m, p, ts, **kw: B.lrd2.meta_loss_and_grad(m, p, ts, 0.7, 1.2, -0.1, 3, **kw)[1])
    return rows


CONSISTENCY = {name: _consistency(name) for name in BACKENDS}


@pytest.mark.parametrize("backend,name", [backend_param(b, n, id=f"{b}-{n}", slow=b == "jax" and n != "maml")
                                          for b in BACKENDS for n in CONSISTENCY[b]], indirect=["backend"])
def test_gradient_matches_richardson_of_own_meta_loss(backend, name):
    (m, p, ts), loss, grad = CONSISTENCY[backend.name][name]
    v = np.random.default_rng(7).normal(size=m.n_params)
    est = directional_derivative(lambda x: loss(backend, m, unflatten(x, m.shapes), ts, **backend.options),
                                 flatten(p), v, method="richardson")
    g = flatten(grad(backend, m, p, ts, **backend.options))
    claimed = float(g @ v)
    scale = float(np.linalg.norm(g) * np.linalg.norm(v))
    tol = tolerance(np.float64, "gradient") + est.error / scale
    assert abs(claimed - est.value) / scale <= tol, (name, claimed, est.value, est.error)


# ---------------------------------------------------------------------------
# Property tests over random problems (float64, against the reference). The checks are shared; the
# problems are drawn per backend: torch from ``verify.strategies``, JAX (eager, slow-only) from fixed
# shapes so eager dispatch reuses its per-primitive compilations across examples.
# ---------------------------------------------------------------------------


def _check_gradient_family(B, m, p, ts, algorithm, steps, lr):
    if algorithm == "reptile":
        H.assert_close("reptile direction", B.reptile.direction(m, p, ts, lr, steps),
                       r_reptile.direction(m, p, ts, lr, steps), "float64")
        return
    if algorithm == "anil":
        ref = lambda p_, ts_: r_anil.meta_loss_and_grad(m, p_, ts_, lr, steps)  # noqa: E731
        loss, grads = B.anil.meta_loss_and_grad(m, p, ts, lr, steps)
    else:
        fo = algorithm == "fomaml"
        ref = lambda p_, ts_: r_maml.meta_loss_and_grad(m, p_, ts_, lr, steps, first_order=fo)  # noqa: E731
        loss, grads = B.maml.meta_loss_and_grad(m, p, ts, lr, steps, first_order=fo)
    k_loss, k_grad = H.measured_condition(ref, (p, ts), trials=1)
    want_loss, want = ref(p, ts)
    H.assert_close(f"{algorithm} meta-loss", [loss], [want_loss], "float64", k_loss)
    H.assert_close(f"{algorithm} meta-gradient", grads, want, "float64", k_grad)


def _check_r2d2_options(B, seed, form, bias_column, normalize, lam):
    m, p, ts = _backbone(seed=seed)
    opts = dict(form=form, bias_column=bias_column, normalize=normalize)
    ref = _three(lambda p_, ts_, lam_: r_r2d2.meta_loss_and_grad(m, p_, ts_, 3, lam_, 2.0, 0.1, **opts))
    k_loss, k_grad = H.measured_condition(ref, (p, ts, lam), trials=1)
    want_loss, want = ref(p, ts, lam)
    loss, grads = _three(B.r2d2.meta_loss_and_grad)(m, p, ts, 3, lam, 2.0, 0.1, **opts)
    H.assert_close("r2d2 meta-loss", [loss], [want_loss], "float64", k_loss)
    H.assert_close("r2d2 meta-gradient", grads, want, "float64", k_grad)


_FAMILY = st.sampled_from(["maml", "fomaml", "anil", "reptile"])
_R2D2_OPTIONS = (st.sampled_from(["primal", "dual"]), st.booleans(), st.booleans(), st.sampled_from([0.1, 1.0, 10.0]))


@pytest.mark.parametrize("backend", [backend_param("torch")], indirect=True)
@given(mlp_problems(models=mlps(max_layers=2, max_width=4)), _FAMILY, st.integers(1, 3), st.sampled_from([0.01, 0.1, 0.3]))
def test_gradient_family_random_problems_torch(backend, problem, algorithm, steps, lr):
    _check_gradient_family(backend, problem.model, problem.params, problem.tasks, algorithm, steps, lr)


@pytest.mark.parametrize("backend", [backend_param("torch")], indirect=True)
@given(st.integers(0, 2**31 - 1), *_R2D2_OPTIONS)
def test_r2d2_random_options_torch(backend, seed, form, bias_column, normalize, lam):
    _check_r2d2_options(backend, seed % 1000, form, bias_column, normalize, lam)


_ACTS = ["tanh", "sigmoid", "softplus", "identity"]
# Slow-only (each example compiles eager autodiff for a new activation/loss/algorithm, ~5 s), with a quarter
# of the profile's examples (dev: 7, thorough: 250). CI covers these algorithms through the table above.
_EXAMPLES = max(4, settings.default.max_examples // 4)


@pytest.mark.parametrize("backend", [backend_param("jax", slow=True)], indirect=True)
@settings(max_examples=_EXAMPLES)
@given(st.integers(0, 2**31 - 1), st.sampled_from(_ACTS), st.sampled_from(["mse", "ce"]), _FAMILY,
       st.integers(1, 2), st.sampled_from([0.05, 0.3]))
def test_gradient_family_random_problems_jax(backend, seed, act, loss_name, algorithm, steps, lr):
    rng = np.random.default_rng(seed)
    m = MLP([2, 4, 3 if loss_name == "ce" else 1], act, loss_name)
    p = [a * rng.uniform(0.5, 2.0) for a in m.init(seed)]
    ts = []
    for _ in range(2):
        xs, xq = rng.normal(size=(4, 2)), rng.normal(size=(3, 2))
        if loss_name == "ce":
            ys, yq = rng.permutation(np.arange(4) % 3), rng.integers(0, 3, size=3)
        else:
            ys, yq = rng.normal(size=(4, 1)), rng.normal(size=(3, 1))
        ts.append(Task(xs, ys, xq, yq))
    _check_gradient_family(backend, m, p, ts, algorithm, steps, lr)


@pytest.mark.parametrize("backend", [backend_param("jax", slow=True)], indirect=True)
@settings(max_examples=_EXAMPLES)
@given(st.integers(0, 999), *_R2D2_OPTIONS)
def test_r2d2_random_options_jax(backend, seed, form, bias_column, normalize, lam):
    _check_r2d2_options(backend, seed, form, bias_column, normalize, lam)


# ---------------------------------------------------------------------------
# JAX only: the eager (jit=False) path, and iMAML's diagnostics
# ---------------------------------------------------------------------------


def _tiny_rows():
    """One row per algorithm on the smallest problems, sharing shapes: eager JAX compiles every primitive
    application once per shape, so shared shapes keep the ``jit=False`` runs affordable."""
    reg = (MLP([1, 3, 1], "tanh", "mse"),)
    reg = (reg[0], reg[0].init(1), sinusoid(1, 3, 3, seed=0))
    bb = MLP([3, 4, 3], "tanh")
    (t,) = gaussian_classification(3, 2, 2, 3, seed=0)
    back = (bb, bb.init(1), [t])
    binary = (bb, bb.init(1), [Task(t.x_support, (t.y_support > 0).astype(float), t.x_query,
                                     (t.y_query > 0).astype(float))])
    return [
        _maml_row("maml", reg, False, 2),
        _maml_row("fomaml", reg, True, 2),
        Row("anil", reg, lambda p, ts, m: r_anil.meta_loss_and_grad(m, p, ts, 0.1, 2),
            lambda B, p, ts, m, **kw: B.anil.meta_loss_and_grad(m, p, ts, 0.1, 2, **kw)),
        Row("metasgd", reg, lambda p, ts, m: _three(r_metasgd.meta_loss_and_grad)(m, p, _lrs(p), ts, 2),
            lambda B, p, ts, m, **kw: _three(B.metasgd.meta_loss_and_grad)(m, p, _lrs(p), ts, 2, **kw)),
        Row("reptile", reg, lambda p, ts, m: (None, r_reptile.direction(m, p, ts, 0.1, 2)),
            lambda B, p, ts, m, **kw: (None, B.reptile.direction(m, p, ts, 0.1, 2, **kw))),
        Row("newton", reg, lambda p, ts, m: r_newton.meta_loss_and_grad(m, p, ts, 0.5, 1, damping=0.5),
            lambda B, p, ts, m, **kw: B.newton.meta_loss_and_grad(m, p, ts, 0.5, 1, damping=0.5, **kw)),
        Row("imaml-cg", reg, lambda p, ts, m: r_imaml.meta_loss_and_grad(m, p, ts, 1.0),
            lambda B, p, ts, m, **kw: B.imaml.meta_loss_and_grad(m, p, ts, 1.0, **kw)),
        Row("imaml-direct", reg, lambda p, ts, m: r_imaml.meta_loss_and_grad(m, p, ts, 1.0, solver="direct"),
            lambda B, p, ts, m, **kw: B.imaml.meta_loss_and_grad(m, p, ts, 1.0, solver="direct", **kw)),
        Row("r2d2", back, lambda p, ts, m: _three(r_r2d2.meta_loss_and_grad)(m, p, ts, 3, 0.8, 1.5, 0.3),
            lambda B, p, ts, m, **kw: _three(B.r2d2.meta_loss_and_grad)(m, p, ts, 3, 0.8, 1.5, 0.3, **kw)),
        Row("lrd2", binary, lambda p, ts, m: _three(r_lrd2.meta_loss_and_grad)(m, p, ts, 0.7, 1.2, -0.1, 2),
            lambda B, p, ts, m, **kw: _three(B.lrd2.meta_loss_and_grad)(m, p, ts, 0.7, 1.2, -0.1, 2, **kw)),
        Row("protonet", back, lambda p, ts, m: r_proto.loss_and_grad(m, p, ts, 3),
            lambda B, p, ts, m, **kw: B.protonet.loss_and_grad(m, p, ts, 3, **kw)),
        Row("matchingnet", back, lambda p, ts, m: r_match.loss_and_grad(m, p, ts, 3),
            lambda B, p, ts, m, **kw: B.matchingnet.loss_and_grad(m, p, ts, 3, **kw)),
    ]


# iMAML's jit flag only wraps the JAX pieces its host-driven solvers call, so its eager run exercises the same
# code paths op by op (and compiles ~2 x 100 primitives): slow-only.
_TINY = [backend_param("jax", r, id=f"jax-{r.name}", slow=r.name.startswith("imaml")) for r in _tiny_rows()]


@pytest.mark.parametrize("backend,row", _TINY, indirect=["backend"])
def test_eager_matches_reference(backend, row):
    """``jit=False`` (eager, op-by-op dispatch) in float64 equals the reference."""
    m, params, tasks = row.problem
    k_loss, k_grad = _condition(("jax-tiny", row.name), m, params, tasks, row.ref)
    want_loss, want = row.ref(params, tasks, m)
    loss, grads = row.got(backend, params, tasks, m, jit=False)
    if want_loss is not None:
        H.assert_close(f"{row.name} meta-loss (eager)", [loss], [want_loss], "float64", k_loss)
    H.assert_close(f"{row.name} meta-gradient (eager)", grads, want, "float64", k_grad)


@pytest.mark.parametrize("backend,row", [backend_param("jax", r, id=f"jax-{r.name}", slow=True) for r in ROWS["jax"]],
                         indirect=["backend"])
def test_eager_equals_jit(backend, row):
    """Eager and jitted runs of the same problem agree to float64 round-off (XLA may fuse or reorder)."""
    m, params, tasks = row.problem
    loss_e, grads_e = row.got(backend, params, tasks, m, jit=False)
    loss_j, grads_j = row.got(backend, params, tasks, m, jit=True)
    if loss_e is not None:
        H.assert_close(f"{row.name} meta-loss eager vs jit", [loss_e], [loss_j], "float64")
    H.assert_close(f"{row.name} meta-gradient eager vs jit", grads_e, grads_j, "float64")


@pytest.mark.parametrize("backend", [backend_param("jax")], indirect=True)
def test_imaml_diagnostics(backend):
    """The info variant reports a stationary inner solution and a converged linear solve."""
    m, p, ts = _reg("softplus", sizes=(1, 5, 1))
    for solver in ("cg", "direct"):
        res = backend.imaml.meta_loss_and_grad_info(m, p, ts, 1.0, solver=solver, jit=True)
        ref = r_imaml.meta_loss_and_grad_info(m, p, ts, 1.0, solver=solver)
        for got, want in zip(res.tasks, ref.tasks):
            assert got.stationarity_residual <= got.stationarity_tolerance
            assert got.linear_residual <= 1e-12  # the default cg_tol; a direct solve is at round-off
            # Both inner solves are stationary to 1e-12 relative; phi* moves by residual / lambda_min(H_s + lam I),
            # a few 1e-12 at lam=1: condition 10 on the 1.8e-12 table entry covers it.
            H.assert_close("iMAML phi*", got.phi, want.phi, "float64", 10.0)
        if solver == "direct":
            # The exact 2-norm condition number is at least the reference's Lanczos/LAPACK estimate's order.
            assert all(np.isfinite(t.cond_estimate) and t.cond_estimate >= 1 for t in res.tasks)
