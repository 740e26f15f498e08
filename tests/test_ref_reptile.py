"""reference/reptile.py's direction against the closed form on quadratic tasks (issue 19).

``direction = (1/T) sum_t (theta - p_K^t)`` with ``p_K = c + (I - alpha A)^K (theta - c)``
for ``K`` gradient steps on ``1/2 (p - c)^T A (p - c)`` (Nichol et al. 2018).
"""

from __future__ import annotations

import numpy as np

from reference import maml, reptile
from reference.models import Quadratic
from reference.optimizers import SGD, Momentum
from reference.tasks import Task


def _tasks(rng, n, T):
    out = []
    for _ in range(T):
        Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
        A = Q @ np.diag(rng.uniform(0.5, 2.0, n)) @ Q.T
        out.append(Task((A + A.T) / 2, rng.normal(size=n), np.eye(n), rng.normal(size=n)))
    return out


def test_reptile_direction_closed_form_and_optimizer_paths():
    rng = np.random.default_rng(0)
    n, T, alpha, K = 3, 3, 0.2, 5
    model, theta, tasks = Quadratic(n), rng.normal(size=n), _tasks(rng, n, T)
    want = np.mean([theta - (t.y_support + np.linalg.matrix_power(np.eye(n) - alpha * t.x_support, K)
                             @ (theta - t.y_support)) for t in tasks], axis=0)
    for opt in (None, SGD()):
        d = reptile.direction(model, [theta], tasks, alpha, K, inner_optimizer=opt)
        np.testing.assert_allclose(d[0], want, rtol=1e-13)
    # K = 1: alpha * mean gradient of the support losses.
    d1 = reptile.direction(model, [theta], tasks, alpha, 1)[0]
    np.testing.assert_allclose(d1, alpha * np.mean([t.x_support @ (theta - t.y_support) for t in tasks], axis=0),
                               rtol=1e-13)
    # Momentum: theta minus the mean of MAML's adapted parameters (another code path), not the SGD direction.
    dm = reptile.direction(model, [theta], tasks, alpha, K, inner_optimizer=Momentum(0.9))[0]
    pm = np.mean([maml.adapt(model, [theta], t, alpha, K, inner_optimizer=Momentum(0.9))[0] for t in tasks], axis=0)
    np.testing.assert_allclose(dm, theta - pm, rtol=1e-12)
    assert np.linalg.norm(dm - want) > 1e-2
    # Its meta-loss is MAML's.
    assert reptile.meta_loss(model, [theta], tasks, alpha, K) == maml.meta_loss(model, [theta], tasks, alpha, K)
