"""The JAX backend: every CONVENTIONS algorithm written with JAX's own autodiff.

One module per algorithm, mirroring ``reference`` name for name and argument
for argument (a ``reference.models.MLP`` as the model spec, NumPy parameter
lists, ``reference.tasks.Task`` lists), plus keyword-only ``dtype``
(``"float64"``/``"float32"``) and ``jit`` (``jax.jit`` on/off); results come
back as float64 NumPy values:

* :mod:`.maml` (``meta_loss``, ``meta_loss_and_grad(..., first_order=False)``),
  :mod:`.anil`, :mod:`.metasgd`, :mod:`.reptile` (``direction``),
  :mod:`.newton`: ``jax.value_and_grad`` through unrolled ``jax.grad`` inner
  loops (``jax.hessian`` + ``jnp.linalg.solve`` for Newton-MAML);
* :mod:`.imaml`: implicit gradient by ``jax.scipy.sparse.linalg.cg`` on
  forward-over-reverse HVPs (or ``jax.hessian`` + solve);
* :mod:`.r2d2`, :mod:`.lrd2`: autodiff through ``jnp.linalg.solve``;
* :mod:`.protonet`, :mod:`.matchingnet` (``loss_and_grad``);
* :mod:`.ops`: second-order checks of single JAX operations
  (``check_second_order_ops``).

For auditing third-party JAX code (calling contract
``fn(params, apply_fn, tasks, inner_lr, inner_steps)``):
:func:`build_apply` (``apply_fn(params, x)`` of an ``MLP`` spec) and
:func:`to_jax_tasks` (tasks as JAX arrays).

**Global side effect**: importing this package runs
``jax.config.update("jax_enable_x64", True)`` (float64 must be available to
compare with the float64 reference). It changes JAX's default dtypes for the
whole process; float32 computations of this backend stay float32 because
every input is cast explicitly.
"""

from __future__ import annotations

from verify.backends.jax._model import (
    build_apply,
    build_loss,
    loss_from_output,
    placement,
    quick_compile,
    to_jax_params,
    to_jax_tasks,
)
from verify.backends.jax import (  # noqa: E402  (after _model: it enables float64 first)
    anil,
    imaml,
    lrd2,
    maml,
    matchingnet,
    metasgd,
    newton,
    ops,
    protonet,
    r2d2,
    reptile,
)

__all__ = [
    "anil",
    "build_apply",
    "build_loss",
    "imaml",
    "loss_from_output",
    "lrd2",
    "maml",
    "matchingnet",
    "metasgd",
    "newton",
    "ops",
    "placement",
    "protonet",
    "quick_compile",
    "r2d2",
    "reptile",
    "to_jax_params",
    "to_jax_tasks",
]
