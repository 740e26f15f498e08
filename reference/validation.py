"""Small ``check_*`` helpers that validate arguments at the API boundary.

Each raises :class:`~reference.errors.InvalidInputError` with a message that
repeats ``name=value!r``, says what was wrong and how to fix it (the
hypothesis ``internal/validation.py`` habit).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from reference.errors import InvalidInputError
from reference.formatting import short


def _short(value: Any) -> str:
    return short(value, 60)


def check_positive_int(name: str, value: Any, *, minimum: int = 1, hint: str = "") -> int:
    """``value`` must be an integer ``>= minimum`` (bools are rejected)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidInputError(f"{name}={_short(value)} must be an integer >= {minimum}{hint}")
    if value < minimum:
        raise InvalidInputError(f"{name}={_short(value)} must be >= {minimum}{hint}")
    return int(value)


def check_finite_scalar(
    name: str, value: Any, *, positive: bool = False, nonnegative: bool = False, hint: str = ""
) -> float:
    """``value`` must be a finite real number (optionally > 0 or >= 0).

    Complex values are accepted (complex-step differentiation through
    hyper-parameters); the sign conditions then apply to the real part.
    """
    if isinstance(value, bool):
        raise InvalidInputError(f"{name}={_short(value)} must be a finite number, not a bool{hint}")
    try:
        arr = np.asarray(value)
    except Exception as exc:  # pragma: no cover - exotic objects
        raise InvalidInputError(f"{name}={_short(value)} must be a finite number{hint}") from exc
    if arr.ndim != 0 or not np.issubdtype(arr.dtype, np.number):
        raise InvalidInputError(f"{name}={_short(value)} must be a finite scalar number{hint}")
    if not np.isfinite(arr):
        raise InvalidInputError(f"{name}={_short(value)} must be finite{hint}")
    real = float(np.real(arr))
    if positive and not real > 0:
        raise InvalidInputError(f"{name}={_short(value)} must be > 0{hint}")
    if nonnegative and not real >= 0:
        raise InvalidInputError(f"{name}={_short(value)} must be >= 0{hint}")
    return value if np.iscomplexobj(arr) else float(arr)


def as_float_array(name: str, value: Any, *, ndim: int | None = None, shape: tuple[int, ...] | None = None,
                   allow_complex: bool = True, hint: str = "") -> np.ndarray:
    """Convert to a float64 (or complex128) array and check finiteness, rank and (optionally) shape.

    ``hint`` is appended to every message (e.g. what the array is for).
    """
    try:
        arr = np.asarray(value)
    except Exception as exc:  # pragma: no cover
        raise InvalidInputError(f"{name} could not be converted to an array: {exc}{hint}") from exc
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise InvalidInputError(f"{name} must be a numeric array, got dtype {arr.dtype}{hint}")
    if np.iscomplexobj(arr):
        if not allow_complex:
            raise InvalidInputError(f"{name} must be real, got a complex array{hint}")
        arr = arr.astype(np.complex128, copy=False)
    else:
        arr = arr.astype(np.float64, copy=False)
    if ndim is not None and arr.ndim != ndim:
        raise InvalidInputError(f"{name} must be {ndim}-D, got shape {arr.shape}{hint}")
    if shape is not None and arr.shape != tuple(shape):
        raise InvalidInputError(f"{name} has shape {arr.shape}, expected {tuple(shape)}{hint}")
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))
        raise InvalidInputError(
            f"{name} contains non-finite values (first at index {tuple(int(i) for i in bad[0])}); "
            f"clean the data (NaN/inf) before checking gradients{hint}"
        )
    return arr


def check_nonempty(name: str, seq: Sequence[Any]) -> None:
    if len(seq) == 0:
        raise InvalidInputError(f"{name} is empty; pass at least one task")


def isclose_int(value: float) -> bool:
    return math.isfinite(value) and float(value).is_integer()
