"""The dot-product (adjoint) test of a forward/reverse pair: ``<J u, w> == <u, J^T w>``.

For a linear map ``J`` (the Jacobian of some function at some point) with a
forward product ``jvp(u) = J u`` and a reverse product ``vjp(w) = J^T w``
(``J^H w`` for complex dtypes), ``<J u, w> = <u, J^T w>`` holds for every ``u``
and ``w``; a VJP that is not the transpose of the JVP breaks it for almost every
random pair (the adjoint test of numerical optimisation; jax ``check_vjp``),
and no Jacobian is ever built.

The mismatch is measured relative to ``max(||u|| ||J^T w||, ||J u|| ||w||)``,
the size the two rounded inner products can be wrong by, so a pair of
directions where ``<J u, w> ~ 0`` is not a false alarm; the tolerance is
``tolerance(dtype, "dot_product")`` for the least precise dtype among the
inputs and outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from reference.errors import InvalidInputError
from verify._verdict import FAIL, PASS, Verdict
from verify.tolerance import precision_dtype, tolerance

__all__ = ["dot_product_test"]


def _shape_and_dtype(name: str, value: Any) -> tuple[tuple[int, ...], np.dtype | None]:
    if isinstance(value, np.ndarray):
        return value.shape, value.dtype
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (int(value),)
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError("a string is not a shape")
        shape = tuple(int(d) for d in value)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(
            f"{name}={value!r} must be a shape (an int or a tuple of ints) or an example array"
        ) from exc
    if any(d < 0 for d in shape) or any(isinstance(d, bool) for d in value):
        raise InvalidInputError(f"{name}={value!r} must be a shape of non-negative ints")
    return shape, None


def _random(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.complexfloating):
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def dot_product_test(
    jvp: Callable[[np.ndarray], Any],
    vjp: Callable[[np.ndarray], Any],
    *,
    in_shape: Any,
    out_shape: Any,
    dtype: DTypeLike | None = None,
    seed: int = 0,
    trials: int = 3,
    rtol: float | None = None,
) -> Verdict:
    """Check that ``vjp`` is the transpose of ``jvp``: ``<J u, w> = <u, J^T w>``.

    On ``trials`` seeded standard-normal pairs ``(u, w)`` it computes
    ``a = <J u, w>`` and ``b = <u, J^T w>`` (``vdot``, so ``J^H`` for complex
    dtypes) and the relative error
    ``|a - b| / max(||u|| ||J^T w||, ||J u|| ||w||)``.

    Args:
        jvp: ``u -> J u`` (``u`` shaped ``in_shape``, result shaped ``out_shape``).
        vjp: ``w -> J^T w`` (``w`` shaped ``out_shape``, result shaped ``in_shape``).
        in_shape: the input shape (int, tuple) or an example input array.
        out_shape: the output shape (int, tuple) or an example output array.
        dtype: dtype of ``u`` and ``w``; default: the example arrays', else float64.
        seed: seed of the random pairs.
        trials: number of pairs (>= 1).
        rtol: override of ``tolerance(dtype, "dot_product")``.

    Returns:
        A :class:`Verdict` with ``check="dot_product"`` (``"pass"`` or
        ``"fail"``; a wrongly shaped or non-finite product is a fail).

    Raises:
        InvalidInputError: bad shapes, dtype, trials or rtol.
    """
    if not callable(jvp) or not callable(vjp):
        raise InvalidInputError(f"jvp={jvp!r} and vjp={vjp!r} must be callables u -> J u and w -> J^T w")
    if isinstance(trials, bool) or not isinstance(trials, (int, np.integer)) or trials < 1:
        raise InvalidInputError(f"trials={trials!r} must be an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InvalidInputError(f"seed={seed!r} must be an integer")
    ishape, idt = _shape_and_dtype("in_shape", in_shape)
    oshape, odt = _shape_and_dtype("out_shape", out_shape)
    if dtype is None:
        dtype = precision_dtype(idt, odt) if (idt is not None or odt is not None) else np.float64
        if idt is not None and np.issubdtype(idt, np.complexfloating) or (
            odt is not None and np.issubdtype(odt, np.complexfloating)
        ):
            dtype = np.result_type(dtype, np.complex64)
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise InvalidInputError(f"dtype={dtype!r} is not a NumPy dtype") from exc
    if not np.issubdtype(dt, np.inexact):
        raise InvalidInputError(f"dtype={dtype!r} must be a float or complex dtype (float64, float32, complex128)")
    if rtol is not None and not (isinstance(rtol, (float, int)) and not isinstance(rtol, bool) and 0 < rtol < 1):
        raise InvalidInputError(f"rtol={rtol!r} must be a float in (0, 1), or None for the table value")

    rng = np.random.default_rng(seed)
    records: list[dict[str, Any]] = []
    row_dtypes: list[Any] = [dt]
    for k in range(trials):
        u = _random(rng, ishape, dt)
        w = _random(rng, oshape, dt)
        ju = np.asarray(jvp(u.copy()))
        jtw = np.asarray(vjp(w.copy()))
        row_dtypes += [ju.dtype, jtw.dtype]
        for label, got, want in (("jvp", ju, oshape), ("vjp", jtw, ishape)):
            if got.shape != want:
                tol = rtol if rtol is not None else tolerance(precision_dtype(*row_dtypes), "dot_product")
                return Verdict(FAIL, "dot_product", math.inf, float(tol),
                               f"{label} returned shape {got.shape}, expected {want} (trial {k})",
                               precision_dtype(*row_dtypes).name, "", tuple(records))
            if not np.all(np.isfinite(got)):
                tol = rtol if rtol is not None else tolerance(precision_dtype(*row_dtypes), "dot_product")
                return Verdict(FAIL, "dot_product", math.inf, float(tol),
                               f"{label} returned non-finite values (trial {k})",
                               precision_dtype(*row_dtypes).name, "", tuple(records))
        wide = np.complex128 if np.iscomplexobj(u) or np.iscomplexobj(ju) or np.iscomplexobj(jtw) else np.float64
        u64, w64, ju64, jtw64 = (a.astype(wide).ravel() for a in (u, w, ju, jtw))
        a = complex(np.vdot(ju64, w64))  # <J u, w>
        b = complex(np.vdot(u64, jtw64))  # <u, J^T w>
        scale = max(np.linalg.norm(u64) * np.linalg.norm(jtw64), np.linalg.norm(ju64) * np.linalg.norm(w64))
        diff = abs(a - b)
        rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
        records.append({"trial": k, "forward": a.real if wide is np.float64 else a,
                        "reverse": b.real if wide is np.float64 else b, "error": float(rel)})
    row = precision_dtype(*row_dtypes)
    tol = float(rtol) if rtol is not None else tolerance(row, "dot_product")
    worst = max(records, key=lambda r: r["error"])
    if worst["error"] > tol:
        reason = (f"VJP is not the transpose of the JVP: trial {worst['trial']} <J u, w>={worst['forward']:.6g} "
                  f"but <u, J^T w>={worst['reverse']:.6g}, relative error {worst['error']:.2e} > tol {tol:.2e} "
                  f"({row.name})")
        status = FAIL
    else:
        reason = (f"<J u, w> = <u, J^T w> in {trials} random trials: worst relative error {worst['error']:.2e} "
                  f"<= tol {tol:.2e} ({row.name})")
        status = PASS
    return Verdict(status, "dot_product", float(worst["error"]), tol, reason, row.name, "", tuple(records))
