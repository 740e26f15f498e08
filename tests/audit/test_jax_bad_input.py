"""JAX audits: a function returning None is a clear error (issue 15, item 7)."""

from __future__ import annotations

import pytest

pytest.importorskip("jax")

from verify.auditing import audit  # noqa: E402
from verify.auditing.problem import AuditInputError  # noqa: E402


def test_jax_function_returning_none_says_so():
    def maml(params, apply_fn, tasks, inner_lr, inner_steps):
        apply_fn(params, tasks[0].x_query)

    with pytest.raises(AuditInputError, match="returned None"):
        audit(maml, "maml", "jax", seed=0, model="mlp:2-3-1:tanh", n_tasks=1, shots=2, queries=2, inner_steps=1,
              inner_lr=0.1)
