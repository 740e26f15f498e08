"""Every exception type metaverify raises on purpose: one neutral module for the reference, the
engine and the audit (also importable as :mod:`verify.errors`).

It lives in :mod:`reference` because the reference imports nothing of :mod:`verify`
while everything in :mod:`verify` may import the reference.

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


class AuditInputError(InvalidInputError):
    """The audited function could not be audited: it raised, returned a non-scalar or non-finite
    loss, or the wrong number of gradients (exit code 2 in the CLI)."""


__all__ = [
    "MetaverifyError",
    "InvalidInputError",
    "ConvergenceError",
    "SingularMatrixError",
    "NotAnalyticError",
    "AuditInputError",
]
