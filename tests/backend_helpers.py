"""Helpers shared by the torch- and JAX-backend tests: the backend handle of the tables and the comparisons.

Backend tables (``tests/backends/``, ``tests/audit/test_audit_corpus.py``) are
parametrized over :data:`BACKENDS` through the ``backend`` fixture of
``tests/conftest.py``: it calls ``pytest.importorskip`` per parameter, so the
rows of a backend that is not installed skip with the reason, the others run.

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

import importlib
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from reference.tasks import Task
from verify.tolerance import tolerance

#: The optional backends every shared table runs over.
BACKENDS = ("torch", "jax")


class Backend:
    """A backend under test: ``B.maml`` is ``verify.backends.<name>.maml`` (imported on first use).

    ``B.options`` are the keyword arguments the tables pass to every call: JAX's tables check the
    compiled path (``jit=True``; its eager path has tests of its own), torch has no such switch.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.options: dict[str, Any] = {"jit": True} if name == "jax" else {}

    def __getattr__(self, module: str) -> ModuleType:
        full = f"verify.backends.{self.name}.{module}"
        if module.startswith("_"):
            raise AttributeError(module)
        try:
            return importlib.import_module(full)
        except ModuleNotFoundError as exc:
            if exc.name != full:  # a module that exists but fails to import: that error, not ours
                raise
            # An AttributeError, as for any missing attribute (hypothesis, for one, probes names).
            raise AttributeError(f"verify.backends.{self.name} has no module {module!r}") from None

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"


def backend_param(name: str, *values: Any, id: str | None = None, slow: bool = False) -> Any:
    """``pytest.param(name, *values)`` for a table parametrized (indirectly) over the ``backend`` fixture.

    Carries the ``torch``/``jax`` marker (``-m "not jax"`` deselects a backend) and, if ``slow``, the
    ``slow`` marker; the id defaults to the backend's name.
    """
    marks = [getattr(pytest.mark, name)] + ([pytest.mark.slow] if slow else [])
    return pytest.param(name, *values, id=id or name, marks=marks)


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
