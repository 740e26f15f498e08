"""reference/maml.py's adapt and inner_optimizer dispatch against closed forms on a quadratic (issue 19).

On ``L_s(p) = 1/2 (p - c)^T A (p - c)`` K steps of gradient descent from ``theta``
are ``p_K = c + (I - alpha A)^K (theta - c)``; the query loss at ``p_K`` is the
one-task meta-loss, whichever inner-loop code path computes it.
"""

from __future__ import annotations

import numpy as np
import pytest

from reference import maml
from reference.models import Quadratic
from reference.optimizers import SGD, Momentum
from reference.tasks import Task


def _problem():
    rng = np.random.default_rng(0)
    n = 3
    Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    A = Q @ np.diag([0.5, 1.0, 2.0]) @ Q.T
    B = Q @ np.diag([1.0, 3.0, 0.5]) @ Q.T
    task = Task((A + A.T) / 2, rng.normal(size=n), (B + B.T) / 2, rng.normal(size=n))
    return Quadratic(n), rng.normal(size=n), task


def test_adapt_is_k_steps_of_gradient_descent():
    model, theta, t = _problem()
    alpha, K = 0.3, 4
    want = t.y_support + np.linalg.matrix_power(np.eye(3) - alpha * t.x_support, K) @ (theta - t.y_support)
    for opt in (None, SGD()):
        p = maml.adapt(model, [theta], t, alpha, K, inner_optimizer=opt)
        np.testing.assert_allclose(p[0], want, rtol=1e-13)
        # the one-task meta-loss is the query loss at p_K, by either code path
        r = p[0] - t.y_query
        assert maml.meta_loss(model, [theta], [t], alpha, K, inner_optimizer=opt) == pytest.approx(
            0.5 * r @ t.x_query @ r, rel=1e-13)


def test_momentum_adapt_and_meta_loss_agree_and_differ_from_sgd():
    model, theta, t = _problem()
    p_m = maml.adapt(model, [theta], t, 0.3, 4, inner_optimizer=Momentum(0.9))[0]
    p_s = maml.adapt(model, [theta], t, 0.3, 4)[0]
    assert np.linalg.norm(p_m - p_s) > 1e-2
    r = p_m - t.y_query
    assert maml.meta_loss(model, [theta], [t], 0.3, 4, inner_optimizer=Momentum(0.9)) == pytest.approx(
        0.5 * r @ t.x_query @ r, rel=1e-13)
    # the gradient's loss is the same meta-loss
    loss, _ = maml.meta_loss_and_grad(model, [theta], [t], 0.3, 4, inner_optimizer=Momentum(0.9))
    assert loss == pytest.approx(0.5 * r @ t.x_query @ r, rel=1e-13)
