"""LR-D2's meta-loss values, Newton iterates and head gradients against an independent LR-D2.

Fast targeted tests (issue 19): the meta-loss *value* of several tasks (the
per-task sums and the ``1/m`` mean), every Newton iterate (not only the last),
and the head gradients ``(lam, scale, offset)`` on both the stacked-task path
and the task-by-task path (a custom feature factory), all against an LR-D2
written here from the paper's equations with ``np.linalg.solve`` and
differentiated by complex step (Squire & Trapp 1998). Only the backbone's
forward pass (foundation code) is shared with ``reference.lrd2``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from reference import lrd2
from reference.features import TaskFeatures
from reference.models import MLP
from reference.tasks import gaussian_classification

H = 1e-30  # complex step: no cancellation, so the derivative is exact to rounding


def _newton_iterates(Z: np.ndarray, y: np.ndarray, lam: Any, steps: int) -> list[np.ndarray]:
    """``w_0 = 0``, ``w_{k+1} = w_k - (Z^T S_k Z + lam I)^{-1} (Z^T (s_k - y) + lam w_k)`` (Bertinetto et al. 2019)."""
    w = np.zeros(Z.shape[1], dtype=np.result_type(Z, lam))
    out = [w]
    for _ in range(steps):
        s = 1.0 / (1.0 + np.exp(-(Z @ w)))
        hess = Z.T @ (Z * (s * (1.0 - s))[:, None]) + lam * np.eye(Z.shape[1])
        w = w - np.linalg.solve(hess, Z.T @ (s - y) + lam * w)
        out.append(w)
    return out


def _independent_meta_loss(backbone, params, tasks, lam, scale, offset, steps, bias_column) -> Any:
    """Mean over tasks of the query ``bce`` of ``scale * Z_q w_K + offset`` (complex-step safe)."""
    losses = []
    for t in tasks:
        Zs, Zq = backbone.forward(params, t.x_support), backbone.forward(params, t.x_query)
        if bias_column:
            Zs, Zq = np.hstack([Zs, np.ones((len(Zs), 1))]), np.hstack([Zq, np.ones((len(Zq), 1))])
        w = _newton_iterates(Zs, t.y_support.astype(float), lam, steps)[-1]
        o = scale * (Zq @ w) + offset
        losses.append(np.mean(np.log(1.0 + np.exp(o)) - t.y_query * o))  # bce with logits, |o| small here
    return sum(losses) / len(losses)


def _problem(n_tasks: int, seed: int):
    backbone = MLP([3, 5, 4], activation="tanh")
    return backbone, backbone.init(seed), gaussian_classification(2, 4, 3, 3, n_tasks=n_tasks, seed=seed)


def _custom_features(backbone, params, task, where):
    """A feature factory that is not ``TaskFeatures`` itself: sends LR-D2 down its task-by-task path."""
    return TaskFeatures(backbone, params, task, where)


@pytest.mark.parametrize("bias_column", [False, True])
@pytest.mark.parametrize("path", ["stacked", "task by task"])
def test_lrd2_value_and_head_gradients_of_several_tasks_match_an_independent_lrd2(path, bias_column):
    backbone, params, tasks = _problem(3, seed=4)
    lam, scale, offset, steps = 0.7, 1.3, -0.2, 3
    kwargs = {"bias_column": bias_column}
    if path == "task by task":
        kwargs["features"] = _custom_features
    value, _, head = lrd2.meta_loss_and_grad(backbone, params, tasks, lam, scale, offset, steps, **kwargs)
    expected = _independent_meta_loss(backbone, params, tasks, lam, scale, offset, steps, bias_column)
    assert abs(value - expected) <= 1e-13 * abs(expected)
    loss = lrd2.meta_loss(backbone, params, tasks, lam, scale, offset, steps, bias_column=bias_column)
    assert abs(loss - expected) <= 1e-13 * abs(expected)
    # the head gradients by complex step of the independent meta-loss
    h = {"lam": lam, "scale": scale, "offset": offset}
    for name in h:
        shifted = dict(h, **{name: h[name] + 1j * H})
        d = np.imag(_independent_meta_loss(backbone, params, tasks, shifted["lam"], shifted["scale"],
                                           shifted["offset"], steps, bias_column)) / H
        assert abs(head[name] - d) <= 1e-11 * (abs(d) + 1e-3), name


def test_lrd2_custom_feature_factory_is_used_for_every_task():
    """The diagnosis's ``features`` (e.g. a support-detached VJP) must be honoured on an MLP backbone too."""
    backbone, params, tasks = _problem(2, seed=1)
    calls = []

    def features(b, p, task, where):
        calls.append(where)
        return TaskFeatures(b, p, task, where)

    lrd2.meta_loss_and_grad(backbone, params, tasks, 1.0, 1.0, 0.0, 2, features=features)
    assert calls == ["tasks[0]", "tasks[1]"]


@pytest.mark.parametrize("lam", [0.3, 2.0])
def test_lrd2_newton_weights_are_every_newton_iterate(lam):
    rng = np.random.default_rng(7)
    Z = rng.normal(size=(8, 4))
    y = (rng.uniform(size=8) < 0.5).astype(float)
    got = lrd2.newton_weights(Z, y, lam, 4)
    expected = _newton_iterates(Z, y, lam, 4)
    assert len(got) == 5
    assert np.all(got[0] == 0.0)
    for k, (a, b) in enumerate(zip(got, expected)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14, err_msg=f"w_{k}")
