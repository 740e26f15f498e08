"""R2-D2 and LR-D2 references against independent sources.

Expected values: complex-step and Richardson directional derivatives of the
meta-loss (``verify.directional_derivative``), least squares
(``np.linalg.lstsq``) for R2-D2 as ``lam -> 0``, and the regularised logistic
optimum found by ``scipy.optimize`` for LR-D2 with many Newton steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
from hypothesis import given
from hypothesis import strategies as st

from reference import lrd2, r2d2
from reference.errors import InvalidInputError, SingularMatrixError
from reference.models import MLP, flatten, unflatten
from reference.tasks import Task, gaussian_classification
from verify import directional_derivative
from verify.hessian_inverse import check_woodbury

HYPER = ("lam", "scale", "offset")
# The references are exact formulas evaluated with a few well-conditioned solves
# (lam >= 0.1 on tanh/sigmoid/softplus features): 1e-10 of the gradient's scale
# leaves ~1e5 ulps for the solves' condition numbers and still catches any
# wrong term (a wrong term is O(1) relative).
RTOL_CS = 1e-10


@st.composite
def backbone_problems(draw, *, binary: bool = False, regression: bool = False):
    d0 = draw(st.integers(1, 4))
    sizes = [d0, draw(st.integers(2, 6)), draw(st.integers(1, 5))]
    act = draw(st.sampled_from(["tanh", "sigmoid", "softplus"]))
    backbone = MLP(sizes, activation=act, bias=draw(st.booleans()))
    seed = draw(st.integers(0, 2**16))
    n_way = 2 if binary else draw(st.integers(2, 4))
    tasks = gaussian_classification(n_way, draw(st.integers(1, 4)), draw(st.integers(1, 3)), d0,
                                    n_tasks=draw(st.integers(1, 2)), seed=seed)
    if regression:
        rng = np.random.default_rng(seed)
        n_out = draw(st.integers(1, 3))
        tasks = [Task(t.x_support, rng.normal(size=(len(t.y_support), n_out)), t.x_query,
                      rng.normal(size=(len(t.y_query), n_out))) for t in tasks]
        n_way = n_out
    hyper = {
        "lam": draw(st.floats(0.1, 5.0)),
        "scale": draw(st.floats(0.3, 2.0)),
        "offset": draw(st.floats(-1.0, 1.0)),
    }
    return backbone, backbone.init(seed), tasks, n_way, hyper, seed


def _variables(params, hyper):
    return np.concatenate([flatten(params), [hyper[k] for k in HYPER]])


def _split(x, params):
    n = sum(p.size for p in params)
    p = unflatten(x[:n], [q.shape for q in params])
    return p, dict(zip(HYPER, x[n:]))


def _directions(params, seed):
    """A random direction in the backbone parameters, then one unit direction per hyper-parameter."""
    n = sum(p.size for p in params)
    v = np.zeros(n + 3)
    v[:n] = np.random.default_rng(seed).normal(size=n)
    out = [("params", v / np.linalg.norm(v))]
    for i, k in enumerate(HYPER):
        e = np.zeros(n + 3)
        e[n + i] = 1.0
        out.append((k, e))
    return out


def _check_all_gradients(meta_loss, params, hyper, grads, head, seed):
    x0 = _variables(params, hyper)
    g = np.concatenate([flatten(grads), [head[k] for k in HYPER]])
    gnorm = float(np.linalg.norm(g))

    def f(x):
        p, h = _split(x, params)
        return meta_loss(p, h)

    for what, v in _directions(params, seed):
        est = directional_derivative(f, x0, v, method="complex")
        claimed = float(g @ v)
        assert abs(claimed - est.value) <= RTOL_CS * max(gnorm, abs(est.value)) + est.error, (what, claimed, est)
    # Richardson in the random parameter direction plus all hyper-parameters at once.
    v = sum(d for _, d in _directions(params, seed + 1))
    est = directional_derivative(f, x0, v, method="richardson")
    claimed = float(g @ v)
    # Richardson's own error estimate bounds its error; 1e-9 covers the rest of the round-off.
    assert abs(claimed - est.value) <= est.error + 1e-9 * gnorm * np.linalg.norm(v), (claimed, est)


@given(backbone_problems(), st.booleans(), st.booleans(), st.sampled_from(r2d2.FORMS))
def test_r2d2_gradients_match_complex_step_and_richardson(problem, bias_column, normalize, form):
    backbone, params, tasks, n_way, hyper, seed = problem
    kw = dict(bias_column=bias_column, normalize=normalize, form=form)
    _, grads, head = r2d2.meta_loss_and_grad(backbone, params, tasks, n_way, hyper["lam"], hyper["scale"],
                                             hyper["offset"], **kw)

    def meta_loss(p, h):
        return r2d2.meta_loss(backbone, p, tasks, n_way, h["lam"], h["scale"], h["offset"], **kw)

    _check_all_gradients(meta_loss, params, hyper, grads, head, seed)
    # With a softmax cross-entropy, shifting every logit changes nothing: d/d offset = 0.
    assert abs(head["offset"]) <= 1e-12 * np.linalg.norm(flatten(grads))


@given(backbone_problems(regression=True), st.booleans(), st.booleans(), st.sampled_from(r2d2.FORMS))
def test_r2d2_regression_gradients_match_complex_step(problem, bias_column, normalize, form):
    backbone, params, tasks, n_out, hyper, seed = problem
    kw = dict(bias_column=bias_column, normalize=normalize, form=form, regression=True)
    _, grads, head = r2d2.meta_loss_and_grad(backbone, params, tasks, n_out, hyper["lam"], hyper["scale"],
                                             hyper["offset"], **kw)

    def meta_loss(p, h):
        return r2d2.meta_loss(backbone, p, tasks, n_out, h["lam"], h["scale"], h["offset"], **kw)

    _check_all_gradients(meta_loss, params, hyper, grads, head, seed)


@given(backbone_problems(), st.booleans(), st.booleans())
def test_r2d2_primal_and_dual_agree(problem, bias_column, normalize):
    backbone, params, tasks, n_way, hyper, _ = problem
    args = (backbone, params, tasks, n_way, hyper["lam"], hyper["scale"], hyper["offset"])
    kw = dict(bias_column=bias_column, normalize=normalize)
    lp, gp, hp = r2d2.meta_loss_and_grad(*args, form="primal", **kw)
    ld, gd, hd = r2d2.meta_loss_and_grad(*args, form="dual", **kw)
    assert abs(lp - ld) <= 1e-12 * abs(lp)
    scale = np.linalg.norm(flatten(gp)) + abs(hp["lam"]) + abs(hp["scale"])
    assert np.linalg.norm(flatten(gp) - flatten(gd)) <= 1e-11 * scale
    for k in HYPER:
        assert abs(hp[k] - hd[k]) <= 1e-11 * scale
    # and the Woodbury check of verify agrees on the ridge weights themselves
    Z = backbone.forward(params, tasks[0].x_support)
    Y = np.eye(n_way)[tasks[0].y_support]
    Wp = r2d2.ridge_weights(Z, Y, hyper["lam"], form="primal")
    Wd = r2d2.ridge_weights(Z, Y, hyper["lam"], form="dual")
    assert check_woodbury(Z, Y, hyper["lam"], primal=Wp, dual=Wd).status == "pass"


@pytest.mark.parametrize("n_shots, dim", [(12, 3), (3, 7)])
@pytest.mark.parametrize("normalize", [False, True])
def test_r2d2_identity_backbone_approaches_least_squares(n_shots, dim, normalize):
    """lam -> 0: ridge -> least squares (overdetermined) / the minimum-norm interpolant (underdetermined)."""
    rng = np.random.default_rng(0)
    backbone = MLP([dim, dim], activation="identity", bias=False)
    params = [np.eye(dim)]  # features = inputs
    xs, xq = rng.normal(size=(n_shots, dim)), rng.normal(size=(5, dim))
    ys, yq = rng.normal(size=(n_shots, 2)), rng.normal(size=(5, 2))
    tasks = [Task(xs, ys, xq, yq)]
    Zs, Zq = np.hstack([xs, np.ones((n_shots, 1))]), np.hstack([xq, np.ones((5, 1))])
    W_ls = np.linalg.lstsq(Zs, ys, rcond=None)[0]  # minimum-norm solution when underdetermined
    expected = float(np.mean((Zq @ W_ls - yq) ** 2))
    form = "primal" if n_shots > dim + 1 else "dual"  # the well-conditioned form as lam -> 0
    gaps = []
    for lam in (1e-2, 1e-4, 1e-6):
        loss = r2d2.meta_loss(backbone, params, tasks, 2, lam, 1.0, 0.0, normalize=normalize, form=form,
                              regression=True)
        gaps.append(abs(loss - expected))
        W = r2d2.ridge_weights(Zs, ys, lam, form=form)
        assert np.max(np.abs(W - W_ls)) <= 50 * lam * max(1.0, np.max(np.abs(W_ls)))
    # the gap is O(lam): it shrinks ~100x per step (allow 30x)
    assert gaps[1] <= gaps[0] / 30 and gaps[2] <= max(gaps[1] / 30, 1e-12)
    assert gaps[2] <= 1e-4 * max(1.0, expected)


@given(backbone_problems(binary=True), st.booleans(), st.integers(1, 4))
def test_lrd2_gradients_match_complex_step_and_richardson(problem, bias_column, steps):
    backbone, params, tasks, _, hyper, seed = problem
    _, grads, head = lrd2.meta_loss_and_grad(backbone, params, tasks, hyper["lam"], hyper["scale"], hyper["offset"],
                                             steps, bias_column=bias_column)

    def meta_loss(p, h):
        return lrd2.meta_loss(backbone, p, tasks, h["lam"], h["scale"], h["offset"], steps, bias_column=bias_column)

    _check_all_gradients(meta_loss, params, hyper, grads, head, seed)


@pytest.mark.parametrize("bias_column", [False, True])
@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_lrd2_many_newton_steps_reach_the_regularised_logistic_optimum(bias_column, lam):
    backbone = MLP([3, 6, 4], activation="tanh")
    params = backbone.init(3)
    (task,) = gaussian_classification(2, 6, 4, 3, seed=5)
    Z = backbone.forward(params, task.x_support)
    Zq = backbone.forward(params, task.x_query)
    if bias_column:
        Z, Zq = np.hstack([Z, np.ones((len(Z), 1))]), np.hstack([Zq, np.ones((len(Zq), 1))])
    y = task.y_support.astype(float)

    def objective(w):  # sum of bce + lam/2 ||w||^2, written independently of reference.lrd2
        z = Z @ w
        s = 1.0 / (1.0 + np.exp(-z))
        return np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * lam * w @ w, Z.T @ (s - y) + lam * w

    opt = scipy.optimize.minimize(objective, np.zeros(Z.shape[1]), jac=True, method="BFGS",
                                  options={"gtol": 1e-11})
    w_newton = lrd2.newton_weights(Z, y, lam, 12)[-1]
    assert np.max(np.abs(w_newton - opt.x)) <= 1e-7 * max(1.0, np.max(np.abs(opt.x)))
    o = 1.3 * (Zq @ opt.x) + 0.2
    expected = float(np.mean(np.logaddexp(0.0, o) - task.y_query * o))
    loss = lrd2.meta_loss(backbone, params, [task], lam, 1.3, 0.2, 12, bias_column=bias_column)
    assert abs(loss - expected) <= 1e-8
    # Newton converges quadratically: after 1 step the query loss is visibly off, after 12 it is not
    assert abs(lrd2.meta_loss(backbone, params, [task], lam, 1.3, 0.2, 1, bias_column=bias_column) - expected) > 1e-6


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def _small():
    backbone = MLP([2, 4, 3], activation="tanh")
    return backbone, backbone.init(0), gaussian_classification(2, 3, 2, 2, seed=0)


@pytest.mark.parametrize("lam", [0.0, -1.0, float("nan"), float("inf"), "1", None])
def test_bad_lam_is_rejected(lam):
    backbone, params, tasks = _small()
    with pytest.raises(InvalidInputError, match="lam="):
        r2d2.meta_loss_and_grad(backbone, params, tasks, 2, lam, 1.0, 0.0)
    with pytest.raises(InvalidInputError, match="lam="):
        lrd2.meta_loss_and_grad(backbone, params, tasks, lam, 1.0, 0.0, 2)


@pytest.mark.parametrize("form", ["primal", "dual"])
def test_singular_ridge_system_is_an_error(form):
    backbone, params, tasks = _small()
    # Identical support points make Z rank one, so both Z^T Z and Z Z^T are singular;
    # lam = 1e-30 is far below eps * ||Z||^2, so adding it does not help in floating point.
    t = tasks[0]
    xs = np.repeat(t.x_support[:1], len(t.x_support), axis=0)
    bad = [Task(xs, t.y_support, t.x_query, t.y_query)]
    with pytest.raises(SingularMatrixError, match="singular"):
        r2d2.meta_loss_and_grad(backbone, params, bad, 2, 1e-30, 1.0, 0.0, form=form)


def test_lrd2_singular_newton_matrix_is_an_error():
    backbone, params, tasks = _small()
    t = tasks[0]
    xs = np.repeat(t.x_support[:1], len(t.x_support), axis=0)
    with pytest.raises(SingularMatrixError, match="Newton matrix"):
        lrd2.meta_loss_and_grad(backbone, params, [Task(xs, t.y_support, t.x_query, t.y_query)], 1e-30, 1.0, 0.0, 2)


@pytest.mark.parametrize("labels", [[0, 1, 2, 0, 1, 0], [0.0, 1.0, 0.5, 0.0, 1.0, 1.0], [0, 1, -1, 0, 1, 1]])
def test_lrd2_non_binary_labels_are_rejected(labels):
    backbone, params, tasks = _small()
    t = tasks[0]
    with pytest.raises(InvalidInputError, match="binary"):
        lrd2.meta_loss_and_grad(backbone, params, [Task(t.x_support, np.array(labels), t.x_query, t.y_query)],
                                1.0, 1.0, 0.0, 2)


def test_nan_inputs_and_non_finite_features_are_rejected():
    backbone, params, tasks = _small()
    t = tasks[0]
    xs = t.x_support.copy()
    xs[1, 0] = np.nan
    with pytest.raises(InvalidInputError, match=r"tasks\[0\]\.x_support contains non-finite"):
        r2d2.meta_loss_and_grad(backbone, params, [Task(xs, t.y_support, t.x_query, t.y_query)], 2, 1.0, 1.0, 0.0)
    # finite inputs, but an identity backbone with huge weights overflows: the features are inf
    big = MLP([2, 3], activation="identity")
    huge = [np.full((3, 2), 1e300), np.zeros(3)]
    xq = t.x_query.copy()
    xq[0] = [1e10, 1e10]
    with pytest.raises(InvalidInputError, match=r"features of tasks\[0\]\.x_query\[0\] are not finite"):
        lrd2.meta_loss_and_grad(big, huge, [Task(t.x_support * 0, t.y_support, xq, t.y_query)], 1.0, 1.0, 0.0, 1)


def test_r2d2_argument_errors():
    backbone, params, tasks = _small()
    with pytest.raises(InvalidInputError, match="form="):
        r2d2.meta_loss_and_grad(backbone, params, tasks, 2, 1.0, 1.0, 0.0, form="woodbury")
    with pytest.raises(InvalidInputError, match="n_classes="):
        r2d2.meta_loss_and_grad(backbone, params, tasks, 1, 1.0, 1.0, 0.0)
    with pytest.raises(InvalidInputError, match="scale="):
        r2d2.meta_loss_and_grad(backbone, params, tasks, 2, 1.0, float("nan"), 0.0)
    with pytest.raises(InvalidInputError, match="backbone="):
        r2d2.meta_loss_and_grad("mlp", params, tasks, 2, 1.0, 1.0, 0.0)
    t = tasks[0]
    with pytest.raises(InvalidInputError, match=r"y_query has labels in \[0, 3\] but n_classes=2"):
        r2d2.meta_loss_and_grad(backbone, params, [Task(t.x_support, t.y_support, t.x_query, np.array([0, 3, 1, 0]))],
                                2, 1.0, 1.0, 0.0)
    with pytest.raises(InvalidInputError, match="newton_steps="):
        lrd2.meta_loss_and_grad(backbone, params, tasks, 1.0, 1.0, 0.0, 0)
