"""Former home of the audit, kept so ``from verify._audit import audit`` (tests, benchmarks) keeps working.

The code lives in :mod:`verify.auditing` (decision, result, harnesses, diagnosis).
"""

from verify.auditing import AUDITABLE, AuditInputError, AuditResult, Claim, TensorCheck, audit, infer_backend, parse_model
from verify.auditing.problem import BACKENDS, OPTIONS

__all__ = ["AUDITABLE", "BACKENDS", "OPTIONS", "AuditInputError", "AuditResult", "Claim", "TensorCheck", "audit",
           "infer_backend", "parse_model"]
