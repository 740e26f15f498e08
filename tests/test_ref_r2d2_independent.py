"""R2-D2 (reference/r2d2.py) against an independent ridge head, for every variant (issue 19).

Bertinetto, Henriques, Torr & Vedaldi (2019), "Meta-learning with differentiable
closed-form solvers", ICLR; the contract is ``shared/CONVENTIONS.md`` (R2-D2).

The independent computation, written here from the contract and sharing no code
with the reference (not its backbone, loss, features or solver):

* features by an explicit ``tanh`` MLP forward pass (PyTorch layout ``W`` of shape
  ``(out, in)``, ``z = h W^T + b``);
* the ridge head as the least-squares problem ``min ||Z W - Y||^2 + lam ||W||^2``,
  i.e. ``np.linalg.lstsq`` on the stacked system ``[Z; sqrt(lam) I] W = [Y; 0]``
  (no normal equations, no Woodbury identity);
* the meta-gradient along a random direction of (backbone parameters, lam, scale,
  offset) by the complex step (Squire & Trapp 1998) of a second independent
  head, ``scipy.linalg.solve`` of the normal equations (analytic, so complex steps
  flow through it), compared with the reference gradient's inner product.

Every combination of ones column x normalisation x classification/regression x
primal/dual form is checked, on shapes where n (shots) > and < p (features),
so an error in either form, in the query features, or in how the ones column
and the 1/sqrt(n) scaling enter cannot hide behind one parametrisation.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.linalg

from reference import features, r2d2
from reference.errors import InvalidInputError
from reference.models import MLP
from reference.tasks import Task
from test_ref_lowrank import backward_cotangent_types

SIZES = (3, 5, 4)  # input 3, hidden 5, 4 features
LAM, SCALE, OFFSET = 0.7, 1.3, 0.2
COMBOS = list(itertools.product([True, False], [True, False], [False, True], ["primal", "dual"]))


def _ids(combo) -> str:
    bias, norm, regression, form = combo
    return f"{'ones' if bias else 'noones'}-{'norm' if norm else 'raw'}-{'reg' if regression else 'cls'}-{form}"


def _features(params, x):
    """The backbone, written out: tanh hidden layer, linear output (features)."""
    W0, b0, W1, b1 = params
    return np.tanh(x @ W0.T + b0) @ W1.T + b1


def _design(Z, bias_column):
    return np.concatenate([Z, np.ones((Z.shape[0], 1), dtype=Z.dtype)], axis=1) if bias_column else Z


def _targets(task: Task, n_classes: int, regression: bool, dtype=float):
    if regression:
        return np.asarray(task.y_support, dtype=dtype)
    Y = np.zeros((len(task.y_support), n_classes), dtype=dtype)
    Y[np.arange(len(task.y_support)), task.y_support] = 1.0
    return Y


def _query_loss(O, y, regression):
    if regression:
        return np.mean((O - y) ** 2)  # F.mse_loss: mean over all elements
    # cross-entropy, mean over queries; no max-shift (logits are O(1) here, and the shift's real
    # part would break complex-step analyticity)
    return np.mean(np.log(np.sum(np.exp(O), axis=1)) - O[np.arange(O.shape[0]), y])


def loss_lstsq(params, tasks, n_classes, lam, scale, offset, bias_column, normalize, regression):
    """The meta-loss with ridge weights from lstsq on the stacked system (real arithmetic)."""
    total = 0.0
    for t in tasks:
        Zs = _design(_features(params, t.x_support), bias_column)
        Zq = _design(_features(params, t.x_query), bias_column)
        Y = _targets(t, n_classes, regression)
        n, p = Zs.shape
        if normalize:
            Zs, Y = Zs / np.sqrt(n), Y / np.sqrt(n)
        A = np.vstack([Zs, np.sqrt(lam) * np.eye(p)])
        B = np.vstack([Y, np.zeros((p, Y.shape[1]))])
        W = np.linalg.lstsq(A, B, rcond=None)[0]
        total += _query_loss(scale * (Zq @ W) + offset, t.y_query, regression)
    return total / len(tasks)


def loss_solve(params, tasks, n_classes, lam, scale, offset, bias_column, normalize, regression):
    """The meta-loss with ridge weights from scipy's solve of the normal equations (complex-step safe)."""
    total = 0.0
    for t in tasks:
        Zs = _design(_features(params, t.x_support), bias_column)
        Zq = _design(_features(params, t.x_query), bias_column)
        Y = _targets(t, n_classes, regression, dtype=Zs.dtype)
        n, p = Zs.shape
        if normalize:
            Zs, Y = Zs / np.sqrt(n), Y / np.sqrt(n)
        W = scipy.linalg.solve(Zs.T @ Zs + lam * np.eye(p), Zs.T @ Y, assume_a="gen")
        total = total + _query_loss(scale * (Zq @ W) + offset, t.y_query, regression)
    return total / len(tasks)


def _problem(regression: bool, shots: int, seed: int, sizes=SIZES, queries: int = 4):
    rng = np.random.default_rng(seed)
    model = MLP(list(sizes), "tanh", "mse")
    params = [p + 0.3 * rng.standard_normal(p.shape) for p in model.init(seed)]
    n_classes = 2 if regression else 3
    tasks = []
    for _ in range(2):
        xs, xq = rng.standard_normal((shots, sizes[0])), rng.standard_normal((queries, sizes[0]))
        if regression:
            ys, yq = rng.standard_normal((shots, n_classes)), rng.standard_normal((queries, n_classes))
        else:
            ys = np.arange(shots) % n_classes
            rng.shuffle(ys)
            yq = rng.integers(0, n_classes, queries)
        tasks.append(Task(xs, ys, xq, yq))
    return model, params, tasks, n_classes


@pytest.mark.parametrize("shots", [3, 8])  # n < p = 4 (+1) and n > p
@pytest.mark.parametrize("combo", COMBOS, ids=_ids)
def test_meta_loss_equals_lstsq_ridge_head(combo, shots: int) -> None:
    bias, norm, regression, form = combo
    model, params, tasks, n_classes = _problem(regression, shots, seed=shots)
    ours = r2d2.meta_loss(model, params, tasks, n_classes, LAM, SCALE, OFFSET, bias_column=bias, normalize=norm,
                          form=form, regression=regression)
    theirs = loss_lstsq(params, tasks, n_classes, LAM, SCALE, OFFSET, bias, norm, regression)
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-14)
    # and the loss returned with the gradient is the same number
    value, _, _ = r2d2.meta_loss_and_grad(model, params, tasks, n_classes, LAM, SCALE, OFFSET, bias_column=bias,
                                          normalize=norm, form=form, regression=regression)
    assert value == pytest.approx(theirs, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("shots", [3, 8])
@pytest.mark.parametrize("combo", COMBOS, ids=_ids)
def test_meta_gradient_equals_complex_step_of_independent_head(combo, shots: int) -> None:
    bias, norm, regression, form = combo
    model, params, tasks, n_classes = _problem(regression, shots, seed=100 + shots)
    _check_gradient(model, params, tasks, n_classes, combo)


@pytest.mark.parametrize("combo", COMBOS, ids=_ids)
def test_factored_feature_cotangents_give_the_complex_step_gradient(combo, monkeypatch) -> None:
    # 24 features, 12 shots and 10 queries a task: the feature cotangents' factors (rank 2c on the support,
    # c on the query) are cheaper than the dense rows, so the output layer's products go through them
    # (reference/lowrank.py; the cases above, 4 features, take the dense path). Same complex-step check.
    model, params, tasks, n_classes = _problem(combo[2], 12, seed=300, sizes=(3, 6, 24), queries=10)
    seen = backward_cotangent_types(monkeypatch)
    _check_gradient(model, params, tasks, n_classes, combo)
    assert seen == ["LowRankRows"] * 2  # one backward pass per block of tasks (task_blocks: two here)


def _check_gradient(model, params, tasks, n_classes, combo) -> None:
    """The reference meta-gradient against the complex step of ``loss_solve``: along random directions of
    everything, and each hyper-parameter on its own."""
    bias, norm, regression, form = combo
    _, grads, hyper = r2d2.meta_loss_and_grad(model, params, tasks, n_classes, LAM, SCALE, OFFSET, bias_column=bias,
                                              normalize=norm, form=form, regression=regression)
    rng = np.random.default_rng(7)
    for _ in range(2):
        dp = [rng.standard_normal(p.shape) for p in params]
        dl, ds, do = rng.standard_normal(3)
        h = 1e-30

        def along(t):
            return loss_solve([p + t * d for p, d in zip(params, dp)], tasks, n_classes, LAM + t * dl,
                              SCALE + t * ds, OFFSET + t * do, bias, norm, regression)

        exact = np.imag(along(1j * h)) / h
        claimed = sum(float(np.sum(g * d)) for g, d in zip(grads, dp)) + hyper["lam"] * dl + hyper["scale"] * ds \
            + hyper["offset"] * do
        size = np.sqrt(sum(float(np.sum(g * g)) for g in grads) + sum(v * v for v in hyper.values()))
        size *= np.sqrt(sum(float(np.sum(d * d)) for d in dp) + dl * dl + ds * ds + do * do)
        assert abs(claimed - exact) <= 1e-11 * size, (claimed, exact, size)
    # each hyper-parameter on its own (a swapped or dropped hyper-gradient cannot cancel in a sum)
    for name, shift in (("lam", (1, 0, 0)), ("scale", (0, 1, 0)), ("offset", (0, 0, 1))):
        h = 1e-30
        a, b, c = (1j * h * s for s in shift)
        exact = np.imag(loss_solve(params, tasks, n_classes, LAM + a, SCALE + b, OFFSET + c, bias, norm,
                                   regression)) / h
        assert hyper[name] == pytest.approx(exact, rel=1e-10, abs=1e-13), name


def test_the_variants_differ() -> None:
    # The flags matter on this problem, so an implementation that ignored one would fail above.
    model, params, tasks, n_classes = _problem(False, 8, seed=8)
    values = {combo: r2d2.meta_loss(model, params, tasks, n_classes, LAM, SCALE, OFFSET, bias_column=combo[0],
                                    normalize=combo[1], form="dual") for combo in itertools.product([True, False],
                                                                                                   [True, False])}
    vs = sorted(values.values())
    assert min(b - a for a, b in zip(vs, vs[1:])) > 1e-3, values


def test_check_arguments_classes_and_targets() -> None:
    # Classification (the default) needs n_classes >= 2 classes and integer labels; regression takes
    # n_classes >= 1 target columns (one target is the common case, e.g. a sinusoid's y).
    model, params, tasks, _ = _problem(False, 4, seed=11)
    out = r2d2.check_arguments(model, params, tasks, 3, LAM, SCALE, OFFSET, "dual")
    assert out[3] == 3 and out[2][0].y_support.dtype == np.int64
    one_class = [Task(t.x_support, 0 * t.y_support, t.x_query, 0 * t.y_query) for t in tasks]
    with pytest.raises(InvalidInputError, match="n_classes"):
        r2d2.check_arguments(model, params, one_class, 1, LAM, SCALE, OFFSET, "dual")
    rng = np.random.default_rng(12)
    reg = [Task(t.x_support, rng.standard_normal((4, 1)), t.x_query, rng.standard_normal((4, 1))) for t in tasks]
    out = r2d2.check_arguments(model, params, reg, 1, LAM, SCALE, OFFSET, "primal", True)
    assert out[3] == 1 and out[2][0].y_support.shape == (4, 1)
    with pytest.raises(InvalidInputError, match="n_classes"):
        r2d2.check_arguments(model, params, reg, 0, LAM, SCALE, OFFSET, "primal", True)
    # One regression target, end to end: the loss of the independent lstsq head.
    for form in ("primal", "dual"):
        ours = r2d2.meta_loss(model, params, reg, 1, LAM, SCALE, OFFSET, form=form, regression=True)
        assert ours == pytest.approx(loss_lstsq(params, reg, 1, LAM, SCALE, OFFSET, True, True, True), rel=1e-12)


def test_meta_loss_runs_no_backward_pass(monkeypatch) -> None:
    # meta_loss is the value alone (finite differences call it many times): no VJP through the backbone. With
    # the backward passes made to fail it still returns meta_loss_and_grad's value, for an MLP backbone (tasks
    # stacked) and a reference.nets.Network one (task by task).
    from reference.nets import Activation, Linear, Network

    model, params, tasks, n_classes = _problem(False, 8, seed=13)
    net = Network([Linear(SIZES[0], 5), Activation("tanh"), Linear(5, SIZES[2])], (SIZES[0],))
    cases = [(model, params), (net, net.init(0))]
    want = [r2d2.meta_loss_and_grad(m, p, tasks, n_classes, LAM, SCALE, OFFSET)[0] for m, p in cases]

    def no_backward(*args, **kwargs):
        raise AssertionError("meta_loss ran a backward pass")

    monkeypatch.setattr(features.StackedFeatures, "vjp", no_backward)
    monkeypatch.setattr(features.StackedFeatures, "vjp_factored", no_backward)
    monkeypatch.setattr(features.TaskFeatures, "vjp", no_backward)
    monkeypatch.setattr(MLP, "_backward", no_backward)  # whatever the route to the backbone's reverse pass
    for (m, p), value in zip(cases, want):
        assert r2d2.meta_loss(m, p, tasks, n_classes, LAM, SCALE, OFFSET) == pytest.approx(value, rel=1e-14)
