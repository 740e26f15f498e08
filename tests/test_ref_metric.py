"""Prototypical and matching networks against independent sources.

Loss values are compared with a direct SciPy computation of the CONVENTIONS
formulas (``cdist`` distances and ``logsumexp``) on an identity backbone;
gradients with complex-step and Richardson directional derivatives
(``verify.directional_derivative``).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.spatial.distance
import scipy.special
from hypothesis import given
from hypothesis import strategies as st

from reference import matchingnet, protonet
from reference.errors import InvalidInputError, NotAnalyticError
from reference.models import MLP, flatten, unflatten
from reference.tasks import Task, gaussian_classification
from verify import directional_derivative

MODULES = {"protonet": protonet, "matchingnet": matchingnet}


@st.composite
def problems(draw):
    d0 = draw(st.integers(1, 4))
    sizes = [d0] + [draw(st.integers(2, 6)) for _ in range(draw(st.integers(1, 2)))] + [draw(st.integers(1, 5))]
    backbone = MLP(sizes, activation=draw(st.sampled_from(["tanh", "sigmoid", "softplus"])), bias=draw(st.booleans()))
    seed = draw(st.integers(0, 2**16))
    n_way = draw(st.integers(2, 5))
    tasks = gaussian_classification(n_way, draw(st.integers(1, 4)), draw(st.integers(1, 3)), d0,
                                    n_tasks=draw(st.integers(1, 2)), seed=seed)
    return backbone, backbone.init(seed), tasks, n_way, seed


@pytest.mark.parametrize("name", sorted(MODULES))
@given(problem=problems())
def test_gradient_matches_complex_step_and_richardson(name, problem):
    mod = MODULES[name]
    backbone, params, tasks, n_way, seed = problem
    _, grads = mod.loss_and_grad(backbone, params, tasks, n_way)
    g = flatten(grads)
    x0 = flatten(params)

    def f(x):
        return mod.loss(backbone, unflatten(x, backbone.shapes), tasks, n_way)

    rng = np.random.default_rng(seed)
    for _ in range(2):
        v = rng.normal(size=x0.size)
        v /= np.linalg.norm(v)
        est = directional_derivative(f, x0, v, method="complex")
        # exact formulas vs complex step (exact to round-off): 1e-11 of the gradient's scale
        assert abs(g @ v - est.value) <= 1e-11 * max(np.linalg.norm(g), abs(est.value)) + est.error
    est = directional_derivative(f, x0, v, method="richardson")
    assert abs(g @ v - est.value) <= est.error + 1e-9 * np.linalg.norm(g)


def _identity_problem(seed=0, n_way=3, k_shot=2, k_query=3, dim=4):
    backbone = MLP([dim, dim], activation="identity", bias=False)
    return backbone, [np.eye(dim)], gaussian_classification(n_way, k_shot, k_query, dim, n_tasks=2, seed=seed)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_protonet_loss_matches_a_direct_scipy_computation(seed):
    backbone, params, tasks = _identity_problem(seed)
    expected = []
    for t in tasks:
        protos = np.stack([t.x_support[t.y_support == k].mean(axis=0) for k in range(3)])
        logits = -scipy.spatial.distance.cdist(t.x_query, protos, "sqeuclidean")
        logp = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
        expected.append(-np.mean(logp[np.arange(len(t.y_query)), t.y_query]))
    assert protonet.loss(backbone, params, tasks, 3) == pytest.approx(np.mean(expected), rel=1e-13)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matchingnet_loss_matches_a_direct_scipy_computation(seed):
    backbone, params, tasks = _identity_problem(seed)
    expected = []
    for t in tasks:
        cos = 1.0 - scipy.spatial.distance.cdist(t.x_query, t.x_support, "cosine")
        attention = scipy.special.softmax(cos, axis=1)
        probs = attention @ np.eye(3)[t.y_support]
        expected.append(-np.mean(np.log(probs[np.arange(len(t.y_query)), t.y_query])))
    assert matchingnet.loss(backbone, params, tasks, 3) == pytest.approx(np.mean(expected), rel=1e-13)


def test_relu_backbone_refuses_complex_step_but_gives_real_gradients():
    backbone = MLP([3, 5, 4], activation="relu")
    params = backbone.init(0)
    tasks = gaussian_classification(3, 2, 2, 3, seed=0)
    for mod in MODULES.values():
        loss, grads = mod.loss_and_grad(backbone, params, tasks, 3)
        assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads)
        with pytest.raises(NotAnalyticError):
            mod.loss(backbone, [p + 0j for p in params], tasks, 3)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def test_protonet_class_without_support_examples_is_an_error():
    backbone, params, tasks = _identity_problem()
    t = tasks[0]
    ys = np.where(t.y_support == 2, 0, t.y_support)  # class 2 disappears from the support set
    with pytest.raises(InvalidInputError, match=r"tasks\[0\]\.y_support has no example of class 2"):
        protonet.loss_and_grad(backbone, params, [Task(t.x_support, ys, t.x_query, t.y_query)], 3)


def test_matchingnet_query_class_without_support_examples_is_an_error():
    backbone, params, tasks = _identity_problem()
    t = tasks[0]
    ys = np.where(t.y_support == 2, 0, t.y_support)
    with pytest.raises(InvalidInputError, match=r"class 2, which has no example"):
        matchingnet.loss_and_grad(backbone, params, [Task(t.x_support, ys, t.x_query, t.y_query)], 3)


@pytest.mark.parametrize("part", ["x_support", "x_query"])
def test_matchingnet_zero_feature_vector_is_an_error(part):
    backbone, params, tasks = _identity_problem()
    t = tasks[0]._asdict()
    t[part] = t[part].copy()
    t[part][1] = 0.0  # identity backbone without bias: a zero input is a zero feature
    with pytest.raises(InvalidInputError, match=rf"feature of tasks\[0\]\.{part}\[1\] is the zero vector"):
        matchingnet.loss_and_grad(backbone, params, [Task(**t)], 3)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_bad_labels_nan_inputs_and_arguments(name):
    mod = MODULES[name]
    backbone, params, tasks = _identity_problem()
    t = tasks[0]
    with pytest.raises(InvalidInputError, match=r"y_query has labels in \[0, 3\] but n_classes=3"):
        mod.loss_and_grad(backbone, params, [Task(t.x_support, t.y_support, t.x_query,
                                                  np.array([0, 1, 2, 3, 0, 1, 2, 0, 1]))], 3)
    with pytest.raises(InvalidInputError, match="integer class labels"):
        mod.loss_and_grad(backbone, params, [Task(t.x_support, t.y_support + 0.5, t.x_query, t.y_query)], 3)
    xq = t.x_query.copy()
    xq[0, 0] = np.nan
    with pytest.raises(InvalidInputError, match=r"x_query contains non-finite"):
        mod.loss_and_grad(backbone, params, [Task(t.x_support, t.y_support, xq, t.y_query)], 3)
    with pytest.raises(InvalidInputError, match="n_classes="):
        mod.loss_and_grad(backbone, params, tasks, 1)
    with pytest.raises(InvalidInputError, match="backbone="):
        mod.loss_and_grad(None, params, tasks, 3)
    with pytest.raises(InvalidInputError, match="tasks"):
        mod.loss_and_grad(backbone, params, [], 3)


def _scipy_matching_loss(tasks, W, n_way):
    # Direct computation (Vinyals et al. 2016, no FCE) on features x W^T with scipy's cosine distance.
    out = []
    for t in tasks:
        cos = 1.0 - scipy.spatial.distance.cdist(t.x_query @ W.T, t.x_support @ W.T, "cosine")
        probs = scipy.special.softmax(cos, axis=1) @ np.eye(n_way)[t.y_support]
        out.append(-np.mean(np.log(probs[np.arange(len(t.y_query)), t.y_query])))
    return np.mean(out)


@pytest.mark.parametrize("seed", [0, 1])
def test_matchingnet_task_by_task_paths_match_scipy_and_the_stacked_path(seed):
    # The task-by-task paths (a custom feature factory, a reference.nets.Network backbone) must give the
    # scipy loss (mean over 3 tasks) and the stacked MLP path's gradient (same weights: both use x W^T).
    from reference.features import TaskFeatures
    from reference.nets.layers.linear import Linear
    from reference.nets.network import Network

    rng = np.random.default_rng(seed)
    W = rng.normal(size=(4, 4)) + 2.0 * np.eye(4)
    tasks = gaussian_classification(3, 2, 3, 4, n_tasks=3, seed=seed)
    expected = _scipy_matching_loss(tasks, W, 3)
    mlp = MLP([4, 4], activation="identity", bias=False)
    net = Network([Linear(4, 4, bias=False)], (4,))
    value, grads = matchingnet.loss_and_grad(mlp, [W], tasks, 3)
    assert value == pytest.approx(expected, rel=1e-13)
    calls = []

    def factory(*args):  # a custom feature factory must be the one used, once per task
        calls.append(args[3])
        return TaskFeatures(*args)

    custom = matchingnet.loss_and_grad(mlp, [W], tasks, 3, features=factory)
    assert sorted(calls) == ["tasks[0]", "tasks[1]", "tasks[2]"]
    for got_value, got_grads in [custom, matchingnet.loss_and_grad(net, [W], tasks, 3)]:
        assert got_value == pytest.approx(expected, rel=1e-13)
        np.testing.assert_allclose(got_grads[0], grads[0], rtol=1e-12, atol=1e-15)
    assert matchingnet.loss(net, [W], tasks, 3) == pytest.approx(expected, rel=1e-13)
    assert matchingnet.loss(mlp, [W], tasks, 3) == pytest.approx(expected, rel=1e-13)


def test_matchingnet_tiny_feature_norm_threshold():
    # Features with norm^2 at or below sqrt(tiny) = 2^-511 (documented threshold) are refused:
    # 2 * (2^-256)^2 = 2^-511 exactly (the boundary), and 1e-200; 1e-120 is accepted.
    backbone, params, tasks = _identity_problem()
    for row, bad in [(np.array([2.0**-256, 2.0**-256, 0.0, 0.0]), True), (np.array([1e-100, 0, 0, 0]), True),
                     (np.array([1e-60, 0, 0, 0]), False)]:
        t = tasks[0]._asdict()
        t["x_query"] = t["x_query"].copy()
        t["x_query"][1] = row
        if bad:
            with pytest.raises(InvalidInputError, match=r"x_query\[1\] is the zero vector"):
                matchingnet.loss_and_grad(backbone, params, [Task(**t)], 3)
        else:
            assert np.isfinite(matchingnet.loss_and_grad(backbone, params, [Task(**t)], 3)[0])


def test_matchingnet_missing_class_message_names_the_first():
    backbone, params, tasks = _identity_problem()
    t = tasks[0]
    with pytest.raises(InvalidInputError, match=r"class 1, which has no example"):
        matchingnet.loss_and_grad(backbone, params, [Task(t.x_support, np.zeros_like(t.y_support), t.x_query,
                                                          t.y_query)], 3)
