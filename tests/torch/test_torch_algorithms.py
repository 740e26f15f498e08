"""Every torch-backend algorithm against the NumPy reference, float64 and float32.

Expected values come from ``reference.*`` (analytic, hand-written derivatives,
tested against complex step by its own suite), and for a few cases from
Richardson finite differences of the torch meta-loss itself (autodiff
consistency, independent of the reference). Tolerances: the
``"reference_match"`` entry of ``verify.tolerance`` for the dtype, times the
condition number measured on the reference by perturbation (``torch_helpers``).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

import torch_helpers as H  # noqa: E402
from hypothesis import given, strategies as st  # noqa: E402

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
from reference.models import MLP  # noqa: E402
from reference.tasks import Task, gaussian_classification, linear_regression, sinusoid  # noqa: E402
from verify import directional_derivative  # noqa: E402
from verify.backends.torch import anil, imaml, lrd2, maml, matchingnet, metasgd, newton, protonet, r2d2, reptile  # noqa: E402
from verify.strategies import mlp_problems, mlps  # noqa: E402

DTYPES = ("float64", "float32")


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


# Each row: id, problem, reference call, torch call, both ``f(params, tasks, **kw) -> (loss, flat grad list)``.
def _maml_row(fo):
    def ref(p, ts, m=None):
        return r_maml.meta_loss_and_grad(m, p, ts, 0.1, 3, first_order=fo)

    def got(p, ts, m=None, **kw):
        return maml.meta_loss_and_grad(m, p, ts, 0.1, 3, first_order=fo, **kw)

    return ref, got


def _two(f):
    """Adapt ``(loss, grads, extra)`` results to ``(loss, grads + extra)``."""

    def call(*a, **k):
        out = f(*a, **k)
        extra = out[2]
        extra = [extra[k] for k in ("lam", "scale", "offset")] if isinstance(extra, dict) else list(extra)
        return out[0], list(out[1]) + [np.asarray(e) for e in extra]

    return call


def _rows():
    rows = []
    for fo in (False, True):
        ref, got = _maml_row(fo)
        rows.append(("fomaml" if fo else "maml", _reg("tanh"), ref, got))
    rows.append(("maml-ce-relu", _cls("relu"), *_maml_row(False)))
    rows.append(("maml-bce-sigmoid", _bce("sigmoid"), *_maml_row(False)))
    rows.append(("anil", _cls("softplus"),
                 lambda p, ts, m=None: r_anil.meta_loss_and_grad(m, p, ts, 0.2, 2),
                 lambda p, ts, m=None, **kw: anil.meta_loss_and_grad(m, p, ts, 0.2, 2, **kw)))
    rows.append(("metasgd", _reg("softplus"),
                 lambda p, ts, m=None: _two(r_metasgd.meta_loss_and_grad)(m, p, _lrs(p), ts, 2),
                 lambda p, ts, m=None, **kw: _two(metasgd.meta_loss_and_grad)(m, p, _lrs(p), ts, 2, **kw)))
    rows.append(("reptile", _reg("sigmoid"),
                 lambda p, ts, m=None: (None, r_reptile.direction(m, p, ts, 0.1, 3)),
                 lambda p, ts, m=None, **kw: (None, reptile.direction(m, p, ts, 0.1, 3, **kw))))
    rows.append(("newton", _reg("tanh", sizes=(1, 4, 1)),
                 lambda p, ts, m=None: r_newton.meta_loss_and_grad(m, p, ts, 0.5, 2, damping=0.5),
                 lambda p, ts, m=None, **kw: newton.meta_loss_and_grad(m, p, ts, 0.5, 2, damping=0.5, **kw)))
    for solver in ("cg", "direct"):
        rows.append((f"imaml-{solver}", _reg("softplus", sizes=(1, 5, 1)),
                     lambda p, ts, m=None, s=solver: r_imaml.meta_loss_and_grad(m, p, ts, 1.0, solver=s),
                     lambda p, ts, m=None, s=solver, **kw: imaml.meta_loss_and_grad(m, p, ts, 1.0, solver=s, **kw),
                     lambda m, p, ts: _imaml_inner_condition(m, p, ts, 1.0)))
    for form in ("primal", "dual"):
        for bias_column, normalize in ((True, True), (False, False)):
            opts = dict(form=form, bias_column=bias_column, normalize=normalize)
            rows.append((f"r2d2-{form}-bias{int(bias_column)}-norm{int(normalize)}", _backbone(),
                         lambda p, ts, m=None, o=opts: _two(r_r2d2.meta_loss_and_grad)(m, p, ts, 3, 0.8, 1.5, 0.3, **o),
                         lambda p, ts, m=None, o=opts, **kw: _two(r2d2.meta_loss_and_grad)(m, p, ts, 3, 0.8, 1.5, 0.3,
                                                                                          **o, **kw)))
    rows.append(("r2d2-regression", _regression_targets(),
                 lambda p, ts, m=None: _two(r_r2d2.meta_loss_and_grad)(m, p, ts, 2, 0.8, 1.5, 0.3, regression=True),
                 lambda p, ts, m=None, **kw: _two(r2d2.meta_loss_and_grad)(m, p, ts, 2, 0.8, 1.5, 0.3, regression=True,
                                                                           **kw)))
    rows.append(("lrd2", _binary(),
                 lambda p, ts, m=None: _two(r_lrd2.meta_loss_and_grad)(m, p, ts, 0.7, 1.2, -0.1, 3),
                 lambda p, ts, m=None, **kw: _two(lrd2.meta_loss_and_grad)(m, p, ts, 0.7, 1.2, -0.1, 3, **kw)))
    rows.append(("protonet", _backbone(),
                 lambda p, ts, m=None: r_proto.loss_and_grad(m, p, ts, 3),
                 lambda p, ts, m=None, **kw: protonet.loss_and_grad(m, p, ts, 3, **kw)))
    rows.append(("matchingnet", _backbone(),
                 lambda p, ts, m=None: r_match.loss_and_grad(m, p, ts, 3),
                 lambda p, ts, m=None, **kw: matchingnet.loss_and_grad(m, p, ts, 3, **kw)))
    return rows


def _imaml_inner_condition(m, params, tasks, lam):
    """Extra float32 condition factor of iMAML: its inner solve stops at a stationarity residual
    ``r <= TOL_FLOOR * max(1, ||grad L_s(theta)||)`` (the backend's documented float32 floor, far above
    float32 rounding of theta), which acts as a perturbation ``r / lam`` of ``theta``: relative to
    ``||theta||`` that is ``r / (lam ||theta||)``, i.e. this many float32 epsilons."""
    import torch

    from reference.models import flatten

    eps32 = float(np.finfo(np.float32).eps)
    scale = max(max(1.0, float(np.linalg.norm(flatten(m.grad(params, t.x_support, t.y_support))))) for t in tasks)
    r = imaml.TOL_FLOOR[torch.float32] * scale
    return {"float64": 1.0, "float32": max(1.0, r / (lam * float(np.linalg.norm(flatten(params)))) / eps32)}


ROWS = _rows()


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_matches_reference(row):
    name, (m, params, tasks), ref, got = row[:4]
    extra = row[4](m, params, tasks) if len(row) > 4 else {}
    k_loss, k_grad = H.measured_condition(lambda p, ts: ref(p, ts, m=m), (params, tasks))
    want_loss, want = ref(params, tasks, m=m)
    for dtype in DTYPES:
        loss, grads = got(params, tasks, m=m, dtype=dtype)
        assert all(g.dtype == np.float64 for g in grads)
        factor = extra.get(dtype, 1.0)
        if want_loss is not None:
            H.assert_close(f"{name} meta-loss", [loss], [want_loss], dtype, k_loss * factor)
        H.assert_close(f"{name} meta-gradient", grads, want, dtype, k_grad * factor)


def test_float32_really_computes_in_float32():
    """A float32 run differs from float64 at float32's round-off level, not float64's."""
    m, p, ts = _reg("tanh")
    _, g64 = maml.meta_loss_and_grad(m, p, ts, 0.1, 3)
    _, g32 = maml.meta_loss_and_grad(m, p, ts, 0.1, 3, dtype="float32")
    assert 1e-9 < H.rel_err(g32, g64) < 1e-4


# ---------------------------------------------------------------------------
# Property tests over random problems (float64, against the reference)
# ---------------------------------------------------------------------------


@given(mlp_problems(models=mlps(max_layers=2, max_width=4)), st.sampled_from(["maml", "fomaml", "anil", "reptile"]),
       st.integers(1, 3), st.sampled_from([0.01, 0.1, 0.3]))
def test_gradient_family_random_problems(problem, algorithm, steps, lr):
    m, p, ts = problem.model, problem.params, problem.tasks
    if algorithm == "reptile":
        want, got = r_reptile.direction(m, p, ts, lr, steps), reptile.direction(m, p, ts, lr, steps)
        H.assert_close("reptile direction", got, want, "float64")
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


@given(st.integers(0, 2**31 - 1), st.sampled_from(["primal", "dual"]), st.booleans(), st.booleans(),
       st.sampled_from([0.1, 1.0, 10.0]))
def test_r2d2_random_options(seed, form, bias_column, normalize, lam):
    m, p, ts = _backbone(seed=seed % 1000)
    opts = dict(form=form, bias_column=bias_column, normalize=normalize)
    ref = _two(lambda p_, ts_, lam_: r_r2d2.meta_loss_and_grad(m, p_, ts_, 3, lam_, 2.0, 0.1, **opts))
    k_loss, k_grad = H.measured_condition(ref, (p, ts, lam), trials=1)
    want_loss, want = ref(p, ts, lam)
    loss, grads = _two(r2d2.meta_loss_and_grad)(m, p, ts, 3, lam, 2.0, 0.1, **opts)
    H.assert_close("r2d2 meta-loss", [loss], [want_loss], "float64", k_loss)
    H.assert_close("r2d2 meta-gradient", grads, want, "float64", k_grad)


# ---------------------------------------------------------------------------
# Autodiff consistency, independent of the reference: <grad, v> vs Richardson of the torch meta-loss
# ---------------------------------------------------------------------------

CONSISTENCY = {
    "maml": (_reg("tanh"), lambda m, p, ts: maml.meta_loss(m, p, ts, 0.1, 3),
             lambda m, p, ts: maml.meta_loss_and_grad(m, p, ts, 0.1, 3)[1]),
    "newton": (_reg("softplus", sizes=(1, 3, 1)), lambda m, p, ts: newton.meta_loss(m, p, ts, 0.5, 2, damping=0.5),
               lambda m, p, ts: newton.meta_loss_and_grad(m, p, ts, 0.5, 2, damping=0.5)[1]),
    "imaml": (_reg("tanh", sizes=(1, 3, 1), n_tasks=1), lambda m, p, ts: imaml.meta_loss(m, p, ts, 2.0),
              lambda m, p, ts: imaml.meta_loss_and_grad(m, p, ts, 2.0)[1]),
    "lrd2": (_binary(), lambda m, p, ts: lrd2.meta_loss(m, p, ts, 0.7, 1.2, -0.1, 3),
             lambda m, p, ts: lrd2.meta_loss_and_grad(m, p, ts, 0.7, 1.2, -0.1, 3)[1]),
}


@pytest.mark.parametrize("name", list(CONSISTENCY))
def test_gradient_matches_richardson_of_own_meta_loss(name):
    (m, p, ts), loss, grad = CONSISTENCY[name]
    from reference.models import flatten, unflatten
    from verify.tolerance import tolerance

    rng = np.random.default_rng(7)
    v = rng.normal(size=m.n_params)
    x0 = flatten(p)
    est = directional_derivative(lambda x: loss(m, unflatten(x, m.shapes), ts), x0, v, method="richardson")
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
    Xs, Xq = t.x_support, t.x_query
    Hs = 2.0 / len(Xs) * Xs.T @ Xs
    w1 = w.ravel() - alpha * (Hs @ w.ravel() - 2.0 / len(Xs) * Xs.T @ t.y_support.ravel())
    gq = 2.0 / len(Xq) * Xq.T @ (Xq @ w1 - t.y_query.ravel())
    want = (np.eye(2) - alpha * Hs) @ gq
    _, (got,) = maml.meta_loss_and_grad(m, [w], [t], alpha, 1)
    H.assert_close("closed-form K=1 MAML", [got], [want], "float64")
