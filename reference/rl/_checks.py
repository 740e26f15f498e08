"""Boundary checks of ``reference.rl`` (``name=value``, what is expected, the fix)."""

from __future__ import annotations

from typing import Any

import numpy as np

from reference.errors import InvalidInputError


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
    """A finite float64 (or complex128) array, optionally of a given shape."""
    try:
        arr = np.asarray(value)
    except Exception as exc:  # pragma: no cover - exotic objects
        raise InvalidInputError(f"{name} could not be converted to an array: {exc}") from exc
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise InvalidInputError(f"{name} must be a numeric array, got dtype {arr.dtype}{hint}")
    if np.iscomplexobj(arr):
        if not allow_complex:
            raise InvalidInputError(f"{name} must be real, got a complex array{hint}")
        arr = arr.astype(np.complex128, copy=False)
    else:
        arr = arr.astype(np.float64, copy=False)
    if shape is not None and arr.shape != shape:
        raise InvalidInputError(f"{name} has shape {arr.shape}, expected {shape}{hint}")
    if not np.all(np.isfinite(arr)):
        raise InvalidInputError(f"{name} contains non-finite values; clean it (NaN/inf) first{hint}")
    return arr
