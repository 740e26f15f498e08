"""metaverify's exception types, under :mod:`verify` (the one module is :mod:`reference.errors`).

``from verify.errors import InvalidInputError`` and ``from reference.errors import
InvalidInputError`` name the same class: the engine, the audit and the reference
raise the types of that one module.
"""

from reference.errors import (
    AuditInputError,
    ConvergenceError,
    InvalidInputError,
    MetaverifyError,
    NotAnalyticError,
    SingularMatrixError,
)

__all__ = [
    "AuditInputError",
    "ConvergenceError",
    "InvalidInputError",
    "MetaverifyError",
    "NotAnalyticError",
    "SingularMatrixError",
]
