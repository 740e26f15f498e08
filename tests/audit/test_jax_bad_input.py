"""JAX audits: a function returning None is a clear error (issue 15, item 7); a float32 step size is
named as precision (item 2)."""

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


def _loss(out, y):
    import jax.numpy as jnp

    return jnp.mean((out - y) ** 2)


def test_jax_float32_step_size_is_named_as_precision():
    import jax
    import jax.numpy as jnp

    def maml(params, apply_fn, tasks, inner_lr, inner_steps):
        lr = jnp.float32(inner_lr)  # a hard-coded float32 step size

        def task_loss(t):
            p = params
            for _ in range(inner_steps):
                g = jax.grad(lambda q: _loss(apply_fn(q, t.x_support), t.y_support))(p)
                p = [a - lr * b for a, b in zip(p, g)]
            return _loss(apply_fn(p, t.x_query), t.y_query)

        return sum(task_loss(t) for t in tasks) / len(tasks)

    r = audit(maml, "maml", "jax", seed=0, model="mlp:2-3-1:tanh", loss="mse", n_tasks=2, shots=3, queries=2,
              inner_steps=2, inner_lr=0.3, directions=1)
    # exactly MAML at the step size float32(0.3): verified, with the precision named
    assert r.passed and r.precision.startswith("float32 constants: the function uses the inner learning rate as "
                                               "float32(0.3)"), r.report()
    assert "unexplained" not in r.report()
