"""Numerical failures and torch-specific bad input in the torch backend: clear errors, never NaN or silent answers.

The argument checks both backends share are one table in ``tests/backends/test_backend_errors.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from reference.errors import ConvergenceError, InvalidInputError, SingularMatrixError  # noqa: E402
from reference.models import MLP  # noqa: E402
from reference.tasks import Task, gaussian_classification, sinusoid  # noqa: E402
from verify.backends.torch import imaml, lrd2, matchingnet, newton, protonet, r2d2, reptile  # noqa: E402

M = MLP([1, 3, 1], "tanh")
P = M.init(0)
TASKS = sinusoid(2, 3, 3, seed=0)


def test_reptile_negative_inner_lr_follows_the_formula():
    """A negative inner_lr is allowed by the reference (the formula just ascends); so here too."""
    from reference import reptile as r_reptile

    got = reptile.direction(M, P, TASKS, -0.1, 2)
    want = r_reptile.direction(M, P, TASKS, -0.1, 2)
    np.testing.assert_allclose(np.concatenate([g.ravel() for g in got]),
                               np.concatenate([w.ravel() for w in want]), rtol=1e-12, atol=1e-15)


def test_newton_singular_hessian_is_an_error():
    # identity model, mse: H_s = 2/n X^T X on [W, b]; one support point makes it rank one (singular).
    m = MLP([2, 1], "identity")
    tasks = [Task(np.array([[1.0, 2.0]]), np.array([[0.5]]), np.array([[0.0, 1.0]]), np.array([[1.0]]))]
    with pytest.raises(SingularMatrixError, match="condition number"):
        newton.meta_loss_and_grad(m, m.init(0), tasks, 1.0, 1, damping=0.0)
    loss, grads = newton.meta_loss_and_grad(m, m.init(0), tasks, 1.0, 1, damping=1.0)  # damping fixes it
    assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads)


def test_newton_refuses_large_models():
    big = MLP([1, 100, 100, 1])
    with pytest.raises(InvalidInputError, match="MAX_PARAMS"):
        newton.meta_loss_and_grad(big, big.init(0), TASKS, 0.1, 1, damping=1.0)


def test_imaml_non_convergence_is_raised_not_answered():
    with pytest.raises(ConvergenceError, match="stationarity residual"):
        imaml.meta_loss_and_grad(M, P, TASKS, 1.0, inner_maxiter=1)
    with pytest.raises(ConvergenceError, match="conjugate gradient"):
        imaml.meta_loss_and_grad(M, P, TASKS, 1.0, cg_maxiter=1)


BACKBONE = MLP([3, 4, 2], "tanh")
CLS = gaussian_classification(3, 2, 2, 3, n_tasks=1, seed=0)


def test_r2d2_errors():
    with pytest.raises(InvalidInputError, match="lam=-1"):
        r2d2.meta_loss_and_grad(BACKBONE, BACKBONE.init(0), CLS, 3, -1.0, 1.0, 0.0)
    with pytest.raises(InvalidInputError, match="form='svd'"):
        r2d2.meta_loss_and_grad(BACKBONE, BACKBONE.init(0), CLS, 3, 1.0, 1.0, 0.0, form="svd")
    with pytest.raises(InvalidInputError, match="n_classes=2"):
        r2d2.meta_loss_and_grad(BACKBONE, BACKBONE.init(0), CLS, 2, 1.0, 1.0, 0.0)
    # all-zero backbone: Z = 0, so Z^T Z + lam I = lam I; lam tiny against 1 (the ones column) is singular.
    zero = [np.zeros_like(p) for p in BACKBONE.init(0)]
    with pytest.raises(SingularMatrixError, match="singular"):
        r2d2.meta_loss_and_grad(BACKBONE, zero, CLS, 3, 1e-14, 1.0, 0.0, form="primal", normalize=False)


def test_lrd2_needs_binary_labels():
    with pytest.raises(InvalidInputError, match="not binary"):
        lrd2.meta_loss_and_grad(BACKBONE, BACKBONE.init(0), CLS, 1.0, 1.0, 0.0, 2)


def test_protonet_class_without_support_example():
    t = CLS[0]
    ys = np.where(t.y_support == 2, 0, t.y_support)
    with pytest.raises(InvalidInputError, match="no example of class 2"):
        protonet.loss_and_grad(BACKBONE, BACKBONE.init(0), [Task(t.x_support, ys, t.x_query, t.y_query)], 3)


def test_matchingnet_zero_feature_and_missing_class():
    zero = [np.zeros_like(p) for p in BACKBONE.init(0)]
    with pytest.raises(InvalidInputError, match="zero vector"):
        matchingnet.loss_and_grad(BACKBONE, zero, CLS, 3)
    t = CLS[0]
    ys = np.where(t.y_support == 2, 0, t.y_support)
    with pytest.raises(InvalidInputError, match="no example in"):
        matchingnet.loss_and_grad(BACKBONE, BACKBONE.init(0), [Task(t.x_support, ys, t.x_query, t.y_query)], 3)


def test_non_finite_features_are_an_error():
    linear = MLP([3, 4, 2], "identity")
    huge = [p * 1e200 for p in linear.init(0)]  # two layers: 1e400 overflows to inf
    with pytest.raises(InvalidInputError, match="not finite"):
        protonet.loss_and_grad(linear, huge, CLS, 3)
