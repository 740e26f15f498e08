"""Exception types shared by the reference and the checking engine.

Every validation failure raises :class:`InvalidInputError` (a ``ValueError``)
whose message repeats the offending ``name=value`` and says how to fix it.
Numerical failures that would otherwise produce a silently wrong answer raise
:class:`ConvergenceError` or :class:`SingularMatrixError`.
"""

from __future__ import annotations


class MetaverifyError(Exception):
    """Base class of every error metaverify raises on purpose."""


class InvalidInputError(MetaverifyError, ValueError):
    """An argument is malformed: wrong shape, type, range, or non-finite."""


class ConvergenceError(MetaverifyError, RuntimeError):
    """An iterative solve did not reach its tolerance; answering would be a lie."""


class SingularMatrixError(MetaverifyError, ArithmeticError):
    """A matrix that must be invertible (or SPD) is singular in floating point."""


class NotAnalyticError(MetaverifyError, TypeError):
    """Complex-step differentiation was asked of a non-analytic function (relu)."""


__all__ = [
    "MetaverifyError",
    "InvalidInputError",
    "ConvergenceError",
    "SingularMatrixError",
    "NotAnalyticError",
]
