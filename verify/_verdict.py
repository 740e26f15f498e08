"""Statuses and the :class:`Verdict` record every engine check returns."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

__all__ = ["PASS", "FAIL", "INCONCLUSIVE", "STATUSES", "Verdict", "combine_statuses", "jsonable"]

#: The check found the derivative correct to within the tolerance.
PASS = "pass"
#: The check found a discrepancy that round-off and estimation error cannot explain.
FAIL = "fail"
#: The check could not decide (kink, round-off everywhere, estimate too uncertain).
INCONCLUSIVE = "inconclusive"
STATUSES: tuple[str, ...] = (PASS, FAIL, INCONCLUSIVE)


def combine_statuses(statuses: list[str] | tuple[str, ...]) -> str:
    """Any fail -> fail; else any inconclusive -> inconclusive; else pass."""
    if FAIL in statuses:
        return FAIL
    if INCONCLUSIVE in statuses:
        return INCONCLUSIVE
    return PASS


def jsonable(value: Any) -> Any:
    """Convert NumPy scalars/arrays, tuples and non-finite floats to JSON-safe values."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.complexfloating, complex)):
        return {"real": jsonable(float(value.real)), "imag": jsonable(float(value.imag))}
    if isinstance(value, (np.floating, float)):
        f = float(value)
        if math.isnan(f):
            return "nan"
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        return f
    if isinstance(value, np.dtype):
        return value.name
    return value


def record(obj: Any, layout: Sequence[str] | None = None, **values: Any) -> dict[str, Any]:
    """The JSON form of a result object: the one ``to_dict`` of every result type.

    Keys follow ``layout`` (default: the dataclass fields of ``obj`` in declaration
    order); each key's value is ``values[key]`` when given (computed or renamed
    entries), else the attribute of that name. Values with a ``to_dict`` (nested
    results), also inside lists and tuples, are converted by it, and the whole is
    made JSON-safe by :func:`jsonable` (NumPy scalars, tuples, non-finite floats).
    """
    keys = list(layout) if layout is not None else [f.name for f in fields(obj)]
    return jsonable({k: _plain(values[k] if k in values else getattr(obj, k)) for k in keys})


def _plain(value: Any) -> Any:
    if hasattr(value, "to_dict") and not isinstance(value, type):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class Verdict:
    """The outcome of a derivative check.

    Attributes:
        status: ``"pass"``, ``"fail"`` or ``"inconclusive"``.
        check: which check produced it (``"gradient"``, ``"dot_product"``).
        error: the deciding observed relative error (the worst one found).
        tolerance: the tolerance that error was compared with.
        reason: one human-readable sentence saying why.
        dtype: the precision row of the tolerance table used (``"float64"``).
        method: how the reference derivative was estimated (``"complex"``,
            ``"richardson"``, ``"central"``), or ``""`` when none was needed.
        details: one dict per direction / trial with the raw figures.
    """

    status: str
    check: str
    error: float
    tolerance: float
    reason: str
    dtype: str = "float64"
    method: str = ""
    details: tuple[dict[str, Any], ...] = field(default=(), repr=False)

    @property
    def passed(self) -> bool:
        """True when the status is ``"pass"``."""
        return self.status == PASS

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (non-finite numbers as strings)."""
        return record(self)
