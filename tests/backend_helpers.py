"""Comparison helpers shared by the torch- and JAX-backend tests (``torch_helpers`` / ``jax_helpers`` re-export them).

Tolerances come from ``verify.tolerance`` (kind ``"reference_match"``: normwise
``||a - b|| / max(||a||, ||b||)``), multiplied by a condition number that is
*measured on the NumPy reference*, never on the code under test: the relative
change of the reference's output when its inputs (parameters,
hyper-parameters, task inputs) are perturbed by a random relative
``PERTURBATION``, divided by that perturbation. Rounding the inputs to float32
is such a perturbation, so a float32 backend cannot be more accurate than
``kappa * eps32``; the table's ``eps32^(3/4) * kappa`` (about
``53 eps32 * kappa``) leaves room for the roundings inside the computation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from reference.tasks import Task
from verify.tolerance import tolerance

#: Relative size of the input perturbations that measure the condition number: large enough that
#: float64 round-off in the reference (~1e-16) is negligible against the change (~kappa * 1e-7).
PERTURBATION = 1e-7


def flat(parts: Sequence[Any]) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(p, dtype=np.float64)) for p in parts]) if len(parts) else np.zeros(0)


def rel_err(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Normwise relative difference ``||a - b|| / max(||a||, ||b||)`` (0 when both vanish)."""
    a, b = flat(a), flat(b)
    scale = max(np.linalg.norm(a), np.linalg.norm(b))
    return 0.0 if scale == 0.0 else float(np.linalg.norm(a - b) / scale)


def _perturb(rng: np.random.Generator, value: Any) -> Any:
    if isinstance(value, float):
        return value * (1.0 + PERTURBATION * rng.uniform(-1, 1))
    if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
        return value * (1.0 + PERTURBATION * rng.uniform(-1, 1, size=value.shape))
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], Task):
        return [Task(_perturb(rng, t.x_support), t.y_support, _perturb(rng, t.x_query), t.y_query) for t in value]
    if isinstance(value, list):
        return [_perturb(rng, v) for v in value]
    return value


def measured_condition(ref: Callable[..., tuple[Any, list[np.ndarray]]], args: tuple, *, trials: int = 2,
                       seed: int = 0) -> tuple[float, float]:
    """``(kappa_loss, kappa_grad)`` of the reference ``ref(*args) -> (loss, grads)`` by random perturbation.

    Floats, float arrays, parameter lists and task inputs are perturbed; integers
    (steps, class counts) and labels are not. Both are at least 1.
    """
    rng = np.random.default_rng(seed)
    loss0, grad0 = ref(*args)
    k_loss, k_grad = 1.0, 1.0
    for _ in range(trials):
        loss1, grad1 = ref(*[_perturb(rng, a) for a in args])
        if loss0 is not None:
            k_loss = max(k_loss, abs(loss1 - loss0) / max(abs(loss0), 1e-300) / PERTURBATION)
        k_grad = max(k_grad, rel_err(grad1, grad0) / PERTURBATION)
    return k_loss, k_grad


def assert_close(what: str, got: Sequence[Any], want: Sequence[Any], dtype: str, condition: float = 1.0) -> float:
    """``rel_err(got, want) <= tolerance(dtype, "reference_match", condition=condition)``; returns the error."""
    tol = tolerance(np.dtype(dtype), "reference_match", condition=max(1.0, condition))
    err = rel_err(got, want)
    if not err <= tol:
        g, w = flat(got), flat(want)
        i = int(np.argmax(np.abs(g - w)))
        raise AssertionError(
            f"{what} mismatch: rel={err:.3e} > tol {tol:.3e} ({dtype}, condition {condition:.3g}); "
            f"worst entry [{i}] reference={w[i]!r} got={g[i]!r}"
        )
    return err
