"""Calling the audited function: what it claimed, and the part of a harness common to both frameworks.

A harness runs a user's function on a :class:`verify.algorithms.Case` under the calling contract of
its framework (:mod:`verify.backends.torch.audit_harness`, :mod:`verify.backends.jax.audit_harness`)
and returns a :class:`Claim`: the meta-loss and one gradient per differentiated tensor.
"""

from __future__ import annotations

import importlib
import inspect
import math
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from reference.formatting import short as format_short
from verify.algorithms import ALGORITHMS, Case
from verify.auditing.problem import AuditInputError

__all__ = ["Claim", "Harness", "extra_keys", "infer_backend", "make_harness", "leaves_keep_none", "optional_kwargs",
           "raised", "short"]

# ---------------------------------------------------------------------------
# calling the audited function
# ---------------------------------------------------------------------------


@dataclass
class Claim:
    """What the audited function claimed: loss, gradients aligned with the case's variables."""

    loss: float | None
    grads: list[np.ndarray]
    missing: list[bool]
    source: str
    notes: list[str] = field(default_factory=list)
    #: dtype of the returned meta-loss (``"float32"`` for ``torch.tensor(total)`` of a Python float)
    loss_dtype: str | None = None
    #: floating dtypes below float64 that the function's own operations produced (torch: seen during the call)
    low_precision: tuple[str, ...] = ()


def short(value: Any) -> str:
    """:func:`reference.formatting.short` at the audit's 120 characters."""
    return format_short(value, 120)


def raised(exc: BaseException, what: str) -> AuditInputError:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return AuditInputError(f"{what} raised {type(exc).__name__}: {exc}\n{tb.rstrip()}")


def leaves_keep_none(obj: Any, order: Sequence[str] = ()) -> list[Any]:
    """Flatten nested lists/tuples/dicts of gradients, keeping ``None`` entries.

    Dicts are read in key order, except a dict whose keys are exactly the names in
    ``order`` (an algorithm's scalar extra variables, e.g. R2-D2's ``lam, scale,
    offset``: the row's ``extra``), which is read in that order.
    """
    if isinstance(obj, dict):
        keys = list(obj)
        if order and set(keys) == set(order):
            keys = list(order)
        return [leaf for k in keys for leaf in leaves_keep_none(obj[k], order)]
    if isinstance(obj, (list, tuple)):
        return [leaf for item in obj for leaf in leaves_keep_none(item, order)]
    return [obj]


def extra_keys(case: Case, name: str) -> list[str]:
    """The keys of ``case.extra`` that make up the differentiated argument ``name`` of the row's signature.

    ``[name]`` for one array (R2-D2's ``lam``, MAML++'s ``(K, n_tensors)`` ``lrs``), passed as one tensor;
    ``name[0], name[1], ...`` for a list (Meta-SGD's ``lrs[i]``, a learned optimiser's ``phi[j]``), passed as a
    list of tensors.
    """
    if name in case.extra:
        return [name]
    return [k for k in case.extra if k.startswith(f"{name}[")]


def optional_kwargs(fn: Callable[..., Any], case: Case) -> dict[str, Any]:
    """The row's ``options`` that ``fn`` declares by name, with the case's values."""
    names = ALGORITHMS[case.algorithm].options
    if not names:
        return {}
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    return {n: case.hyper[n] for n in names if n in params and n in case.hyper}


def infer_backend(fn: Callable[..., Any]) -> str:
    """``"jax"`` when the function's second parameter is named like an apply function, else ``"torch"``."""
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return "torch"
    return "jax" if len(names) >= 2 and names[1] in ("apply_fn", "apply", "apply_fun", "forward") else "torch"


class Harness:
    """Runs the audited function on a case; backend subclasses build the arguments."""

    backend = ""

    def __init__(self, fn: Callable[..., Any], case: Case, *, dtype: str = "float64",
                 default_dtype: str | None = None):
        self.fn, self.case = fn, case
        self.row = ALGORITHMS[case.algorithm]
        self.kwargs = optional_kwargs(fn, case)
        self.n = len(case.variables)
        #: precision of the model, tasks and differentiated tensors passed to the function
        self.dtype = dtype
        #: the framework's default dtype during the calls (None: left as it is)
        self.default_dtype = default_dtype

    def _check_loss(self, loss: Any) -> float:
        if loss is None:
            raise AuditInputError(
                "the audited function returned None; return the meta-loss (a scalar), or (loss, grads). A function "
                "that calls backward() and optimizer.step() itself can be audited through "
                "verify.backends.torch.training_step (docs/audit.md), which takes the meta-loss from the tensor "
                "backward() was called on")
        arr = self._loss_array(loss)
        if arr.size != 1:
            raise AuditInputError(
                f"the audited function must return a scalar meta-loss, got shape {arr.shape} ({short(loss)}); "
                "return the mean over tasks of the query losses")
        value = arr.reshape(()).item()
        if isinstance(value, complex):
            return value  # complex-step evaluation (JAX)
        value = float(value)
        if not math.isfinite(value):
            raise AuditInputError(f"the audited function returned a non-finite meta-loss {value!r}")
        return value

    def _check_grads(self, leaves: list[Any], source: str) -> tuple[list[np.ndarray], list[bool]]:
        names, shapes = self.case.names, self.case.shapes
        if len(leaves) != self.n:
            raise AuditInputError(
                f"the audited function returned {len(leaves)} gradient(s) but {self.case.algorithm} has {self.n} "
                f"differentiated tensors ({', '.join(names)}); return one gradient per tensor, in that order")
        grads, missing = [], []
        for name, shape, leaf in zip(names, shapes, leaves):
            if leaf is None:
                grads.append(np.zeros(shape))
                missing.append(True)
                continue
            arr = self._to_numpy(leaf)
            if arr.shape != tuple(shape) and arr.size == int(np.prod(shape)) and len(shape) == 0:
                arr = arr.reshape(())
            if arr.shape != tuple(shape):
                raise AuditInputError(f"the gradient of {name} ({source}) has shape {arr.shape}, expected {tuple(shape)}")
            if not np.all(np.isfinite(arr)):
                raise AuditInputError(f"the gradient of {name} ({source}) has non-finite entries")
            grads.append(arr)
            missing.append(False)
        return grads, missing

    def leaves(self, obj: Any) -> list[Any]:
        """:func:`leaves_keep_none` with the row's scalar extra variables as the dict order."""
        return leaves_keep_none(obj, tuple(n for n in self.row.extra if n != "lrs"))

    # subclasses: _loss_array, _to_numpy, claim(), own_loss(flat)



def make_harness(backend: str, fn: Callable[..., Any], case: Case, **options: Any) -> Harness:
    """The harness of ``backend`` (``verify.backends.<backend>.audit_harness``), imported on demand;
    ``options``: ``dtype`` (``"float64"``/``"float32"``), ``default_dtype``."""
    module = importlib.import_module(f"verify.backends.{backend}.audit_harness")
    return module.HARNESS(fn, case, **options)
