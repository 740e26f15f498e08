"""Boundary checks of ``reference.rl`` (``name=value``, what is expected, the fix)."""

from __future__ import annotations

from typing import Any

import numpy as np

from reference.errors import InvalidInputError
from reference.validation import as_float_array


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_int(name: str, value: Any, *, minimum: int = 1, hint: str = "") -> int:
    """An integer ``>= minimum`` (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidInputError(f"{name}={_short(value)} must be an integer >= {minimum}{hint}")
    if value < minimum:
        raise InvalidInputError(f"{name}={value!r} must be >= {minimum}{hint}")
    return int(value)


def check_scalar(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 hint: str = "") -> Any:
    """A finite real (or complex, for complex-step checks) scalar; bounds apply to the real part."""
    if isinstance(value, bool):
        raise InvalidInputError(f"{name}={value!r} must be a number, not a bool{hint}")
    arr = np.asarray(value)
    if arr.ndim != 0 or not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr):
        raise InvalidInputError(f"{name}={_short(value)} must be a finite scalar{hint}")
    real = float(np.real(arr))
    if low is not None and real < low:
        raise InvalidInputError(f"{name}={value!r} must be >= {low}{hint}")
    if high is not None and real > high:
        raise InvalidInputError(f"{name}={value!r} must be <= {high}{hint}")
    return complex(arr) if np.iscomplexobj(arr) else float(arr)


def check_array(name: str, value: Any, shape: tuple[int, ...] | None = None, *, allow_complex: bool = True,
                hint: str = "") -> np.ndarray:
    """A finite float64 (or complex128) array of an optional shape: :func:`reference.validation.as_float_array`."""
    return as_float_array(name, value, shape=shape, allow_complex=allow_complex, hint=hint)
