"""Every JAX-backend algorithm against the NumPy reference: float64 and float32, with and without ``jax.jit``.

Expected values come from ``reference.*`` (analytic, hand-written derivatives,
tested against complex step by its own suite), and for a few cases from
Richardson finite differences of the JAX meta-loss itself (autodiff
consistency, independent of the reference). Tolerances: the
``"reference_match"`` entry of ``verify.tolerance`` for the dtype, times the
condition number measured on the reference by perturbation (``jax_helpers``).

Compile-time budget: every problem is tiny, the jitted functions are cached per
model spec and shapes inside the backend, and the hypothesis tests draw from a
few fixed shapes so the compile cache is reused across examples.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("jax")

import jax_helpers as H  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from reference import anil as r_anil  # noqa: E402
from reference import imaml as r_imaml  # noqa: E402
from reference import lrd2 as r_lrd2  # noqa: E402
from reference import maml as r_maml  # noqa: E402
from reference import matchingnet as r_match  # noqa: E402
from reference import metasgd as r_metasgd  # noqa: E402
from reference import newton as r_newton  # noqa: E402
from reference import protonet as r_proto  # noqa: E402
from reference import r2d2 as r_r2d2  # noqa: E402
from reference import reptile as r_reptile  # noqa: E402
from reference.models import MLP, flatten, unflatten  # noqa: E402
from reference.tasks import Task, gaussian_classification, linear_regression, sinusoid  # noqa: E402
from verify import directional_derivative  # noqa: E402
from verify.backends.jax import (  # noqa: E402
    anil,
    imaml,
    lrd2,
    maml,
    matchingnet,
    metasgd,
    newton,
    protonet,
    r2d2,
    reptile,
)
from verify.tolerance import tolerance  # noqa: E402

# ---------------------------------------------------------------------------
# Problems (small: JAX compile time grows with the graph)
# ---------------------------------------------------------------------------


def _reg(act="tanh", sizes=(1, 5, 1), n_tasks=2, seed=0):
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
    """Tasks of different shot counts: the meta-batch cannot be stacked for vmap (Python loop path)."""
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


def _maml_row(fo, steps=2):
    def ref(p, ts, m=None):
        return r_maml.meta_loss_and_grad(m, p, ts, 0.1, steps, first_order=fo)

    def got(p, ts, m=None, **kw):
        return maml.meta_loss_and_grad(m, p, ts, 0.1, steps, first_order=fo, **kw)

    return ref, got


def _rows():
    """``(id, (model, params, tasks), reference call, JAX call)``.

    Both calls are ``f(params, tasks, m=..., **kw) -> (loss, grads)``.
    """
    rows = [(name, _reg("tanh"), *_maml_row(fo)) for name, fo in (("maml", False), ("fomaml", True))]
    rows.append(("maml-deep-k3", _reg("tanh", sizes=(1, 5, 5, 1)), *_maml_row(False, steps=3)))
    rows.append(("maml-ce-relu", _cls("relu"), *_maml_row(False)))
    rows.append(("maml-bce-sigmoid", _bce("sigmoid"), *_maml_row(False)))
    rows.append(("maml-ragged-tasks", _ragged(), *_maml_row(False)))
    rows.append(("anil", _cls("softplus"),
                 lambda p, ts, m=None: r_anil.meta_loss_and_grad(m, p, ts, 0.2, 2),
                 lambda p, ts, m=None, **kw: anil.meta_loss_and_grad(m, p, ts, 0.2, 2, **kw)))
    rows.append(("metasgd", _reg("softplus"),
                 lambda p, ts, m=None: _three(r_metasgd.meta_loss_and_grad)(m, p, _lrs(p), ts, 2),
                 lambda p, ts, m=None, **kw: _three(metasgd.meta_loss_and_grad)(m, p, _lrs(p), ts, 2, **kw)))
    rows.append(("reptile", _reg("sigmoid"),
                 lambda p, ts, m=None: (None, r_reptile.direction(m, p, ts, 0.1, 2)),
                 lambda p, ts, m=None, **kw: (None, reptile.direction(m, p, ts, 0.1, 2, **kw))))
    rows.append(("newton", _reg("tanh", sizes=(1, 4, 1)),
                 lambda p, ts, m=None: r_newton.meta_loss_and_grad(m, p, ts, 0.5, 2, damping=0.5),
                 lambda p, ts, m=None, **kw: newton.meta_loss_and_grad(m, p, ts, 0.5, 2, damping=0.5, **kw)))
    for solver in ("cg", "direct"):
        rows.append((f"imaml-{solver}", _reg("softplus", sizes=(1, 5, 1)),
                     lambda p, ts, m=None, s=solver: r_imaml.meta_loss_and_grad(m, p, ts, 1.0, solver=s),
                     lambda p, ts, m=None, s=solver, **kw: imaml.meta_loss_and_grad(m, p, ts, 1.0, solver=s, **kw)))
    for form, bias_column, normalize in (("primal", True, True), ("dual", True, True), ("primal", False, False),
                                         ("dual", False, False)):
        opts = dict(form=form, bias_column=bias_column, normalize=normalize)
        rows.append((f"r2d2-{form}-bias{int(bias_column)}-norm{int(normalize)}", _backbone(),
                     lambda p, ts, m=None, o=opts: _three(r_r2d2.meta_loss_and_grad)(m, p, ts, 3, 0.8, 1.5, 0.3, **o),
                     lambda p, ts, m=None, o=opts, **kw: _three(r2d2.meta_loss_and_grad)(m, p, ts, 3, 0.8, 1.5, 0.3,
                                                                                        **o, **kw)))
    rows.append(("r2d2-regression", _regression_targets(),
                 lambda p, ts, m=None: _three(r_r2d2.meta_loss_and_grad)(m, p, ts, 2, 0.8, 1.5, 0.3, regression=True),
                 lambda p, ts, m=None, **kw: _three(r2d2.meta_loss_and_grad)(m, p, ts, 2, 0.8, 1.5, 0.3,
                                                                             regression=True, **kw)))
    rows.append(("lrd2", _binary(),
                 lambda p, ts, m=None: _three(r_lrd2.meta_loss_and_grad)(m, p, ts, 0.7, 1.2, -0.1, 2),
                 lambda p, ts, m=None, **kw: _three(lrd2.meta_loss_and_grad)(m, p, ts, 0.7, 1.2, -0.1, 2, **kw)))
    rows.append(("protonet", _backbone(),
                 lambda p, ts, m=None: r_proto.loss_and_grad(m, p, ts, 3),
                 lambda p, ts, m=None, **kw: protonet.loss_and_grad(m, p, ts, 3, **kw)))
    rows.append(("matchingnet", _backbone(),
                 lambda p, ts, m=None: r_match.loss_and_grad(m, p, ts, 3),
                 lambda p, ts, m=None, **kw: matchingnet.loss_and_grad(m, p, ts, 3, **kw)))
    return rows


# R2-D2 option combinations beyond the two CI rows (the slow hypothesis test draws them all): slow-only,
# to bound compile time in CI.
_SLOW_ROWS = {"r2d2-primal-bias0-norm0", "r2d2-dual-bias1-norm1"}
ROWS = _rows()
_FLOAT32_SLOW = {"maml-deep-k3", "maml-ce-relu", "maml-bce-sigmoid", "maml-ragged-tasks"}  # float32 of these: slow-only


def _row_params(dtype):
    slow = _SLOW_ROWS | (_FLOAT32_SLOW if dtype == "float32" else set())
    return [pytest.param(r, dtype, id=f"{r[0]}-{dtype}", marks=[pytest.mark.slow] if r[0] in slow else [])
            for r in ROWS]
_CONDITIONS: dict[str, tuple[float, float]] = {}


def _condition(name, m, params, tasks, ref):
    if name not in _CONDITIONS:
        _CONDITIONS[name] = H.measured_condition(lambda p, ts: ref(p, ts, m=m), (params, tasks))
    return _CONDITIONS[name]


@pytest.mark.parametrize("row,dtype", _row_params("float64") + _row_params("float32"))
def test_matches_reference_jit(row, dtype):
    """``jit=True``: the JAX result equals the reference within the dtype's tolerance times the condition."""
    name, (m, params, tasks), ref, got = row
    k_loss, k_grad = _condition(name, m, params, tasks, ref)
    want_loss, want = ref(params, tasks, m=m)
    loss, grads = got(params, tasks, m=m, dtype=dtype, jit=True)
    assert all(np.asarray(g).dtype == np.float64 for g in grads)
    if want_loss is not None:
        H.assert_close(f"{name} meta-loss ({dtype}, jit)", [loss], [want_loss], dtype, k_loss)
    H.assert_close(f"{name} meta-gradient ({dtype}, jit)", grads, want, dtype, k_grad)


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
        ("maml", reg, lambda p, ts, m=None: r_maml.meta_loss_and_grad(m, p, ts, 0.1, 2),
         lambda p, ts, m=None, **kw: maml.meta_loss_and_grad(m, p, ts, 0.1, 2, **kw)),
        ("fomaml", reg, lambda p, ts, m=None: r_maml.meta_loss_and_grad(m, p, ts, 0.1, 2, first_order=True),
         lambda p, ts, m=None, **kw: maml.meta_loss_and_grad(m, p, ts, 0.1, 2, first_order=True, **kw)),
        ("anil", reg, lambda p, ts, m=None: r_anil.meta_loss_and_grad(m, p, ts, 0.1, 2),
         lambda p, ts, m=None, **kw: anil.meta_loss_and_grad(m, p, ts, 0.1, 2, **kw)),
        ("metasgd", reg, lambda p, ts, m=None: _three(r_metasgd.meta_loss_and_grad)(m, p, _lrs(p), ts, 2),
         lambda p, ts, m=None, **kw: _three(metasgd.meta_loss_and_grad)(m, p, _lrs(p), ts, 2, **kw)),
        ("reptile", reg, lambda p, ts, m=None: (None, r_reptile.direction(m, p, ts, 0.1, 2)),
         lambda p, ts, m=None, **kw: (None, reptile.direction(m, p, ts, 0.1, 2, **kw))),
        ("newton", reg, lambda p, ts, m=None: r_newton.meta_loss_and_grad(m, p, ts, 0.5, 1, damping=0.5),
         lambda p, ts, m=None, **kw: newton.meta_loss_and_grad(m, p, ts, 0.5, 1, damping=0.5, **kw)),
        ("imaml-cg", reg, lambda p, ts, m=None: r_imaml.meta_loss_and_grad(m, p, ts, 1.0),
         lambda p, ts, m=None, **kw: imaml.meta_loss_and_grad(m, p, ts, 1.0, **kw)),
        ("imaml-direct", reg, lambda p, ts, m=None: r_imaml.meta_loss_and_grad(m, p, ts, 1.0, solver="direct"),
         lambda p, ts, m=None, **kw: imaml.meta_loss_and_grad(m, p, ts, 1.0, solver="direct", **kw)),
        ("r2d2", back, lambda p, ts, m=None: _three(r_r2d2.meta_loss_and_grad)(m, p, ts, 3, 0.8, 1.5, 0.3),
         lambda p, ts, m=None, **kw: _three(r2d2.meta_loss_and_grad)(m, p, ts, 3, 0.8, 1.5, 0.3, **kw)),
        ("lrd2", binary, lambda p, ts, m=None: _three(r_lrd2.meta_loss_and_grad)(m, p, ts, 0.7, 1.2, -0.1, 2),
         lambda p, ts, m=None, **kw: _three(lrd2.meta_loss_and_grad)(m, p, ts, 0.7, 1.2, -0.1, 2, **kw)),
        ("protonet", back, lambda p, ts, m=None: r_proto.loss_and_grad(m, p, ts, 3),
         lambda p, ts, m=None, **kw: protonet.loss_and_grad(m, p, ts, 3, **kw)),
        ("matchingnet", back, lambda p, ts, m=None: r_match.loss_and_grad(m, p, ts, 3),
         lambda p, ts, m=None, **kw: matchingnet.loss_and_grad(m, p, ts, 3, **kw)),
    ]


TINY = _tiny_rows()
# iMAML's jit flag only wraps the JAX pieces its host-driven solvers call, so its eager run exercises the same
# code paths op by op (and compiles ~2 x 100 primitives): slow-only.
_TINY_PARAMS = [pytest.param(r, id=r[0], marks=[pytest.mark.slow] if r[0].startswith("imaml") else []) for r in TINY]


@pytest.mark.parametrize("row", _TINY_PARAMS)
def test_eager_matches_reference(row):
    """``jit=False`` (eager, op-by-op dispatch) in float64 equals the reference."""
    name, (m, params, tasks), ref, got = row
    k_loss, k_grad = _condition("tiny-" + name, m, params, tasks, ref)
    want_loss, want = ref(params, tasks, m=m)
    loss, grads = got(params, tasks, m=m, jit=False)
    if want_loss is not None:
        H.assert_close(f"{name} meta-loss (eager)", [loss], [want_loss], "float64", k_loss)
    H.assert_close(f"{name} meta-gradient (eager)", grads, want, "float64", k_grad)


@pytest.mark.slow
@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_eager_equals_jit(row):
    """Eager and jitted runs of the same problem agree to float64 round-off (XLA may fuse or reorder)."""
    name, (m, params, tasks), _, got = row
    loss_e, grads_e = got(params, tasks, m=m, jit=False)
    loss_j, grads_j = got(params, tasks, m=m, jit=True)
    if loss_e is not None:
        H.assert_close(f"{name} meta-loss eager vs jit", [loss_e], [loss_j], "float64")
    H.assert_close(f"{name} meta-gradient eager vs jit", grads_e, grads_j, "float64")


def test_float32_really_computes_in_float32():
    """A float32 run differs from float64 at float32's round-off level, not float64's."""
    m, p, ts = _reg("tanh")
    _, g64 = maml.meta_loss_and_grad(m, p, ts, 0.1, 2, jit=True)
    _, g32 = maml.meta_loss_and_grad(m, p, ts, 0.1, 2, dtype="float32", jit=True)
    assert 1e-9 < H.rel_err(g32, g64) < 1e-4


# ---------------------------------------------------------------------------
# Property tests over random problems (float64, eager, against the reference). Shapes are
# fixed so eager dispatch reuses its per-primitive compilations across examples; values,
# activations, losses, steps and learning rates vary.
# ---------------------------------------------------------------------------

_ACTS = ["tanh", "sigmoid", "softplus", "identity"]


# Slow-only (each example compiles eager autodiff for a new activation/loss/algorithm, ~5 s), with a quarter
# of the profile's examples (dev: 7, thorough: 250). CI covers these algorithms through the table above.
_EXAMPLES = max(4, settings.default.max_examples // 4)


@pytest.mark.slow
@settings(max_examples=_EXAMPLES)
@given(st.integers(0, 2**31 - 1), st.sampled_from(_ACTS), st.sampled_from(["mse", "ce"]),
       st.sampled_from(["maml", "fomaml", "anil", "reptile"]), st.integers(1, 2), st.sampled_from([0.05, 0.3]))
def test_gradient_family_random_problems(seed, act, loss_name, algorithm, steps, lr):
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
    if algorithm == "reptile":
        H.assert_close("reptile direction", reptile.direction(m, p, ts, lr, steps),
                       r_reptile.direction(m, p, ts, lr, steps), "float64")
        return
    if algorithm == "anil":
        ref = lambda p_, ts_: r_anil.meta_loss_and_grad(m, p_, ts_, lr, steps)  # noqa: E731
        loss, grads = anil.meta_loss_and_grad(m, p, ts, lr, steps)
    else:
        fo = algorithm == "fomaml"
        ref = lambda p_, ts_: r_maml.meta_loss_and_grad(m, p_, ts_, lr, steps, first_order=fo)  # noqa: E731
        loss, grads = maml.meta_loss_and_grad(m, p, ts, lr, steps, first_order=fo)
    k_loss, k_grad = H.measured_condition(ref, (p, ts), trials=1)
    want_loss, want = ref(p, ts)
    H.assert_close(f"{algorithm} meta-loss", [loss], [want_loss], "float64", k_loss)
    H.assert_close(f"{algorithm} meta-gradient", grads, want, "float64", k_grad)


@pytest.mark.slow
@settings(max_examples=_EXAMPLES)
@given(st.integers(0, 999), st.sampled_from(["primal", "dual"]), st.booleans(), st.booleans(),
       st.sampled_from([0.1, 1.0, 10.0]))
def test_r2d2_random_options(seed, form, bias_column, normalize, lam):
    m, p, ts = _backbone(seed=seed)
    opts = dict(form=form, bias_column=bias_column, normalize=normalize)
    ref = _three(lambda p_, ts_, lam_: r_r2d2.meta_loss_and_grad(m, p_, ts_, 3, lam_, 2.0, 0.1, **opts))
    k_loss, k_grad = H.measured_condition(ref, (p, ts, lam), trials=1)
    want_loss, want = ref(p, ts, lam)
    loss, grads = _three(r2d2.meta_loss_and_grad)(m, p, ts, 3, lam, 2.0, 0.1, **opts)
    H.assert_close("r2d2 meta-loss", [loss], [want_loss], "float64", k_loss)
    H.assert_close("r2d2 meta-gradient", grads, want, "float64", k_grad)


# ---------------------------------------------------------------------------
# Autodiff consistency, independent of the reference: <grad, v> vs Richardson of the JAX meta-loss
# ---------------------------------------------------------------------------

CONSISTENCY = {
    "maml": (_reg("tanh"), lambda m, p, ts: maml.meta_loss(m, p, ts, 0.1, 2, jit=True),
             lambda m, p, ts: maml.meta_loss_and_grad(m, p, ts, 0.1, 2, jit=True)[1]),
    "newton": (_reg("softplus", sizes=(1, 3, 1)),
               lambda m, p, ts: newton.meta_loss(m, p, ts, 0.5, 2, damping=0.5, jit=True),
               lambda m, p, ts: newton.meta_loss_and_grad(m, p, ts, 0.5, 2, damping=0.5, jit=True)[1]),
    "imaml": (_reg("tanh", sizes=(1, 3, 1), n_tasks=1), lambda m, p, ts: imaml.meta_loss(m, p, ts, 2.0, jit=True),
              lambda m, p, ts: imaml.meta_loss_and_grad(m, p, ts, 2.0, jit=True)[1]),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n != "maml" else [])
                                  for n in CONSISTENCY])
def test_gradient_matches_richardson_of_own_meta_loss(name):
    (m, p, ts), loss, grad = CONSISTENCY[name]
    v = np.random.default_rng(7).normal(size=m.n_params)
    est = directional_derivative(lambda x: loss(m, unflatten(x, m.shapes), ts), flatten(p), v, method="richardson")
    g = flatten(grad(m, p, ts))
    claimed = float(g @ v)
    scale = float(np.linalg.norm(g) * np.linalg.norm(v))
    tol = tolerance(np.float64, "gradient") + est.error / scale
    assert abs(claimed - est.value) / scale <= tol, (name, claimed, est.value, est.error)


def test_linear_regression_maml_k1_closed_form():
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
    _, (got,) = maml.meta_loss_and_grad(m, [w], [t], alpha, 1, jit=True)
    H.assert_close("closed-form K=1 MAML", [got], [want], "float64")


def test_imaml_diagnostics():
    """The info variant reports a stationary inner solution and a converged linear solve."""
    m, p, ts = _reg("softplus", sizes=(1, 5, 1))
    for solver in ("cg", "direct"):
        res = imaml.meta_loss_and_grad_info(m, p, ts, 1.0, solver=solver, jit=True)
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
