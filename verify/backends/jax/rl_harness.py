"""JAX harness of the MAML-RL audit: a user's surrogate-loss function -> a gradient callable.

The user's function (contract in :mod:`verify.rl_audit`) gets ``params`` a
float64 array ``(S, A)`` and the batches as ``jnp`` arrays; ``jax.grad`` of
the returned loss (or the returned grads) is negated into an estimate of
``grad J``. The pairs of a chunk are evaluated with ``jax.jit(jax.vmap(...))``
when the function is traceable (a few compilations in all); otherwise one
eager call per pair, and :attr:`mode` says which.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

import verify.backends.jax  # noqa: F401  (enables float64 in JAX)
from reference.errors import AuditInputError

__all__ = ["gradient_callable"]


def _raised(exc: BaseException) -> AuditInputError:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return AuditInputError(f"the audited function raised {type(exc).__name__}: {exc}\n{tb.rstrip()}")


def gradient_callable(fn: Callable[..., Any]) -> Callable[..., np.ndarray]:
    """``grad_fn(theta, inner, outer, alpha, gamma) -> (K, S*A)``; ``grad_fn.mode`` is ``"vmap"`` or ``"eager"``."""
    import jax
    import jax.numpy as jnp

    cache: dict[str, Any] = {}

    def single_grad(returns_grads: bool, alpha: float, gamma: float) -> Callable[..., Any]:
        if returns_grads:
            def g(p, i, o):
                return fn(p, i, o, alpha, gamma)[1]
        else:
            def g(p, i, o):
                return jax.grad(lambda q: jnp.reshape(fn(q, i, o, alpha, gamma), ()))(p)
        return g

    def inspect_output(params, i, o, alpha, gamma) -> bool:
        try:
            out = fn(params, i, o, alpha, gamma)
        except Exception as exc:
            raise _raised(exc) from exc
        if isinstance(out, (tuple, list)) and len(out) == 2:
            grads = out[1]
            if isinstance(grads, (tuple, list)):
                raise AuditInputError("return (loss, grads) with grads one array of shape (S, A), not a sequence")
            if tuple(np.shape(grads)) != tuple(params.shape):
                raise AuditInputError(f"the returned gradient has shape {tuple(np.shape(grads))}, expected "
                                        f"{tuple(params.shape)}")
            return True
        if np.size(out) != 1:
            raise AuditInputError(f"the function must return a scalar loss (or (loss, grads)); got shape "
                                    f"{tuple(np.shape(out))}")
        return False

    def grad_fn(theta: np.ndarray, inner: Mapping[str, np.ndarray], outer: Mapping[str, np.ndarray], alpha: float,
                gamma: float) -> np.ndarray:
        params = jnp.asarray(theta, dtype=jnp.float64)
        ji = {k: jnp.asarray(v) for k, v in inner.items()}
        jo = {k: jnp.asarray(v) for k, v in outer.items()}
        K = int(inner["states"].shape[0])
        key = (float(alpha), float(gamma))
        if cache.get("key") != key:
            first_i = {k: v[0] for k, v in ji.items()}
            first_o = {k: v[0] for k, v in jo.items()}
            returns_grads = inspect_output(params, first_i, first_o, float(alpha), float(gamma))
            one = single_grad(returns_grads, float(alpha), float(gamma))
            cache.update(key=key, one=one, batched=jax.jit(jax.vmap(one, in_axes=(None, 0, 0))), mode="vmap")
        if cache["mode"] == "vmap":
            try:
                return -np.asarray(cache["batched"](params, ji, jo), dtype=np.float64).reshape(K, -1)
            except Exception:  # not traceable under vmap/jit (Python control flow on values ...): go eager
                cache["mode"] = "eager"
                grad_fn.mode = "eager"
        out = np.empty((K, theta.size))
        for k in range(K):
            try:
                g = cache["one"](params, {n: v[k] for n, v in ji.items()}, {n: v[k] for n, v in jo.items()})
            except Exception as exc:
                raise _raised(exc) from exc
            out[k] = -np.asarray(g, dtype=np.float64).reshape(-1)
        return out

    grad_fn.mode = "vmap"  # type: ignore[attr-defined]
    return grad_fn
