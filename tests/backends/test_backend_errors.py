"""Bad arguments to the backends (torch, JAX): one table, each row raises ``InvalidInputError`` naming the culprit.

The argument checks are the reference's (``reference/_validation.py``) plus each framework's
own limits (dtype), so every row holds on every backend. Numerical refusals (singular systems,
non-convergence, label errors) are built per framework and stay in ``tests/torch/test_torch_errors.py``
and ``tests/jax/test_jax_errors.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from backend_helpers import BACKENDS, backend_param

from reference.errors import InvalidInputError
from reference.models import MLP
from reference.tasks import Task, sinusoid

M = MLP([1, 3, 1], "tanh", "mse")
P = M.init(0)
#: The meta-batch each backend's error tests have always used (JAX: one task, fewer compilations).
TASKS = {"torch": sinusoid(2, 3, 3, seed=0), "jax": sinusoid(1, 3, 3, seed=0)}
_WRONG_X = [Task(np.zeros((2, 2)), np.zeros((2, 1)), np.zeros((2, 1)), np.zeros((2, 1)))]

#: (id, call(B, tasks), the message it must contain)
ERRORS = [
    ("maml-dtype", lambda B, ts: B.maml.meta_loss_and_grad(M, P, ts, 0.1, 1, dtype="float16"), "dtype='float16'"),
    ("reptile-dtype", lambda B, ts: B.reptile.direction(M, P, ts, 0.1, 1, dtype="float16"), "dtype='float16'"),
    ("imaml-dtype", lambda B, ts: B.imaml.meta_loss_and_grad(M, P, ts, 1.0, dtype="float16"), "dtype='float16'"),
    ("inner_steps", lambda B, ts: B.maml.meta_loss_and_grad(M, P, ts, 0.1, 0), "inner_steps=0"),
    ("inner_lr", lambda B, ts: B.maml.meta_loss_and_grad(M, P, ts, float("nan"), 1), "inner_lr=nan"),
    ("empty-tasks", lambda B, ts: B.maml.meta_loss_and_grad(M, P, [], 0.1, 1), "tasks is empty"),
    ("complex-params", lambda B, ts: B.maml.meta_loss_and_grad(M, [a.astype(complex) for a in P], ts, 0.1, 1),
     "complex"),
    ("lrs-2-of-4", lambda B, ts: B.metasgd.meta_loss_and_grad(M, P, P[:2], ts, 1), "lrs"),
    ("lrs-1-of-4", lambda B, ts: B.metasgd.meta_loss_and_grad(M, P, P[:1], ts, 1), "lrs"),
    ("x_support-shape", lambda B, ts: B.maml.meta_loss_and_grad(M, P, _WRONG_X, 0.1, 1), "x_support has shape"),
    ("newton-damping", lambda B, ts: B.newton.meta_loss_and_grad(M, P, ts, 0.1, 1, damping=-1.0), "damping"),
    ("imaml-lam-0", lambda B, ts: B.imaml.meta_loss_and_grad(M, P, ts, 0), "lam=0"),
    ("imaml-lam-0.0", lambda B, ts: B.imaml.meta_loss_and_grad(M, P, ts, 0.0), "lam=0"),
    ("imaml-solver", lambda B, ts: B.imaml.meta_loss_and_grad(M, P, ts, 1.0, solver="lu"), "solver='lu'"),
    ("imaml-inner_tol", lambda B, ts: B.imaml.meta_loss_and_grad(M, P, ts, 1.0, inner_tol=2), "inner_tol=2"),
]


@pytest.mark.parametrize("backend,call,match", [backend_param(b, call, match, id=f"{b}-{name}")
                                                for b in BACKENDS for name, call, match in ERRORS],
                         indirect=["backend"])
def test_bad_argument_names_the_culprit(backend, call, match):
    with pytest.raises(InvalidInputError, match=match):
        call(backend, TASKS[backend.name])
