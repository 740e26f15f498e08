"""Shared pieces of the layers: the Layer base class, argument checks, the convolution memory bounds.

The four passes and their conventions are described in :mod:`reference.nets.layers`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from reference.errors import InvalidInputError


# Columns of a convolution kept between passes when they fit (bytes); larger ones are recomputed.
COLS_CACHE_BYTES = 64 * 2**20
# Largest block of columns formed at once (bytes); bounds the temporary of a big convolution.
COLS_CHUNK_BYTES = 32 * 2**20

Arr = np.ndarray


def _add(a: Arr | None, b: Arr | None) -> Arr | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InvalidInputError(f"{name}={value!r} must be an integer >= {minimum}")
    return int(value)


def _pair(name: str, value: Any, minimum: int) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise InvalidInputError(f"{name}={value!r} must be an int or a pair (h, w)")
        return _check_int(f"{name}[0]", value[0], minimum), _check_int(f"{name}[1]", value[1], minimum)
    v = _check_int(name, value, minimum)
    return v, v


def _real_positive(x: Arr) -> Arr:
    """``Re x > 0``: the branch PyTorch takes (strict, so the kink goes to the left piece)."""
    return np.real(x) > 0


class Layer:
    """Base class: a layer with no parameters that maps shapes one to one.

    ``param_names``/``param_shapes`` are in PyTorch registration order.
    ``in_shape``/``out_shape`` are per-example shapes in PyTorch's convention
    (``(C, H, W)`` or ``(D,)``); arrays are NHWC internally.
    """

    kind = "layer"
    param_names: tuple[str, ...] = ()
    analytic = True  # False when a complex step meets a kink (relu, max-pool, ...)

    def __init__(self) -> None:
        self.param_shapes: tuple[tuple[int, ...], ...] = ()

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        return in_shape

    def init(self, rng: np.random.Generator) -> list[Arr]:
        return []

    def sublayers(self) -> list[tuple[str, Layer]]:
        return []

    # The four passes; parameterless elementwise layers override these.
    def fwd(self, P: Sequence[Arr], x: Arr) -> tuple[Arr, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def bwd(self, P: Sequence[Arr], cache: Any, gy: Arr, need_gx: bool = True) -> tuple[list[Arr], Arr | None]:
        raise NotImplementedError  # pragma: no cover - abstract

    def jvp(self, P: Sequence[Arr], cache: Any, dP: Sequence[Arr], dx: Arr | None) -> tuple[Arr | None, Any]:
        raise NotImplementedError  # pragma: no cover - abstract

    def rbwd(self, P, cache, rcache, gy, rgy, dP, dx, need_gx=True):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
