"""PyTorch harness of the MAML-RL audit: a user's surrogate-loss function -> a gradient callable.

The user's function (contract in :mod:`verify.rl_audit`) is called once per
``(D, D')`` pair with ``params`` a float64 leaf tensor ``(S, A)`` that requires
grad and the batches as tensors; the gradient of the returned loss (or the
returned grads) is negated into an estimate of ``grad J``.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from reference.errors import AuditInputError, InvalidInputError

__all__ = ["gradient_callable"]


def _raised(exc: BaseException) -> AuditInputError:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return AuditInputError(f"the audited function raised {type(exc).__name__}: {exc}\n{tb.rstrip()}")


def _grad_of(out: Any, params: torch.Tensor) -> torch.Tensor:
    if isinstance(out, (tuple, list)) and len(out) == 2:
        loss, grads = out
        if isinstance(grads, (tuple, list)):
            if len(grads) != 1:
                raise AuditInputError(f"the function returned {len(grads)} gradients; expected one, for "
                                        "params (S, A)")
            grads = grads[0]
        if not isinstance(grads, torch.Tensor) or tuple(grads.shape) != tuple(params.shape):
            raise AuditInputError(f"the returned gradient must be a tensor of shape {tuple(params.shape)}, got "
                                    f"{type(grads).__name__} {tuple(getattr(grads, 'shape', ()))}")
        return grads
    loss = out
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise AuditInputError(f"the function must return a scalar loss tensor (or (loss, grads)); got "
                                f"{type(loss).__name__} of shape {tuple(getattr(loss, 'shape', ()))}")
    if not loss.requires_grad:
        raise AuditInputError("the returned loss does not depend on params (requires_grad is False); build it "
                                "from log_softmax(params) evaluated at the batch's states and actions")
    (g,) = torch.autograd.grad(loss.reshape(()), params, allow_unused=True)
    return torch.zeros_like(params) if g is None else g


def gradient_callable(fn: Callable[..., Any]) -> Callable[..., np.ndarray]:
    """``grad_fn(theta, inner, outer, alpha, gamma) -> (K, S*A)`` for chunks of ``K`` pairs (one call per pair)."""

    def grad_fn(theta: np.ndarray, inner: Mapping[str, np.ndarray], outer: Mapping[str, np.ndarray], alpha: float,
                gamma: float) -> np.ndarray:
        K = inner["states"].shape[0]
        ti = {k: torch.as_tensor(np.ascontiguousarray(v)) for k, v in inner.items()}
        to = {k: torch.as_tensor(np.ascontiguousarray(v)) for k, v in outer.items()}
        out = np.empty((K, theta.size))
        # One intra-op thread: the tensors are tiny, and on a busy machine the thread pool's
        # synchronisation costs 20x the work (measured: 62 ms vs 3 ms per call at load 11 on 2 cores).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _fill(out, K, theta, ti, to, alpha, gamma)
        finally:
            torch.set_num_threads(threads)
        return out

    def _fill(out, K, theta, ti, to, alpha, gamma) -> None:
        for k in range(K):
            params = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
            try:
                res = fn(params, {n: v[k] for n, v in ti.items()}, {n: v[k] for n, v in to.items()}, float(alpha),
                         float(gamma))
                g = _grad_of(res, params)
            except InvalidInputError:  # ours (AuditInputError), already explained
                raise
            except Exception as exc:  # the user's code: show its traceback
                raise _raised(exc) from exc
            out[k] = -g.detach().to(torch.float64).reshape(-1).numpy()

    return grad_fn
