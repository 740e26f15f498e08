"""Former home of the audit, kept so ``from verify._audit import audit`` (tests, benchmarks) keeps working.

The code lives in :mod:`verify.auditing` (decision, result, harnesses, diagnosis).
"""

from verify.auditing import AuditInputError, AuditResult, Claim, TensorCheck, audit, infer_backend, parse_model

__all__ = ["AuditInputError", "AuditResult", "Claim", "TensorCheck", "audit", "infer_backend", "parse_model"]
