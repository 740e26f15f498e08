"""reference/protonet.py: the task-by-task path (custom feature factory) against the stacked path (issue 19).

``loss_and_grad(features=...)`` is how the audit plants a feature bug; it must
be honoured (a factory whose VJP is doubled doubles the gradient, the loss
unchanged) and, with a plain ``TaskFeatures`` factory, give the stacked path's
loss and gradient (mean over tasks).
"""

from __future__ import annotations

import numpy as np
import pytest

from reference import protonet
from reference.features import TaskFeatures
from reference.models import MLP
from reference.tasks import gaussian_classification


class _Doubled(TaskFeatures):
    def vjp(self, g_support, g_query):
        return [2.0 * g for g in super().vjp(g_support, g_query)]


def test_custom_feature_factory_path_matches_and_is_honoured():
    net = MLP([4, 6, 3], "tanh")
    params = net.init(0)
    tasks = gaussian_classification(3, 2, 3, 4, n_tasks=3, seed=5)
    loss, grads = protonet.loss_and_grad(net, params, tasks, 3)
    assert protonet.loss(net, params, tasks, 3) == pytest.approx(loss, rel=1e-13)
    loss_p, grads_p = protonet.loss_and_grad(net, params, tasks, 3, features=lambda *a: TaskFeatures(*a))
    assert loss_p == pytest.approx(loss, rel=1e-13)
    for a, b in zip(grads_p, grads):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-14)
    # The per-task mean: one task's loss and gradient, averaged by hand.
    per = [protonet.loss_and_grad(net, params, [t], 3) for t in tasks]
    assert loss == pytest.approx(np.mean([p[0] for p in per]), rel=1e-13)
    for k, g in enumerate(grads):
        np.testing.assert_allclose(g, np.mean([p[1][k] for p in per], axis=0), rtol=1e-11, atol=1e-14)
    loss_d, grads_d = protonet.loss_and_grad(net, params, tasks, 3, features=_Doubled)
    assert loss_d == pytest.approx(loss, rel=1e-13)
    for a, b in zip(grads_d, grads):
        np.testing.assert_allclose(a, 2.0 * b, rtol=1e-11, atol=1e-14)
