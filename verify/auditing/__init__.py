"""``verify.audit`` and its parts: check someone's meta-gradient implementation and name the bug.

One concern per module:

* :mod:`.problem`: ``--model`` specs, the seeded problem;
* :mod:`.harness`: what the audited function claimed (:class:`~.harness.Claim`) and the
  framework-neutral part of calling it; the framework parts live beside their backends
  (:mod:`verify.backends.torch.audit_harness`, :mod:`verify.backends.jax.audit_harness`);
* :mod:`.decision`: :func:`audit`: reference comparison, own-loss check, tolerance, verdict;
* :mod:`.result`: :class:`AuditResult` and its JSON/JUnit forms;
* :mod:`.diagnosis`: the catalogue of known bugs that names a mismatch.

The package is ``verify.auditing`` rather than ``verify.audit`` so that the function
:func:`verify.audit` (re-exported by :mod:`verify`) never shadows a module of the same name.
"""

from verify.auditing.decision import audit
from verify.auditing.diagnosis import Diagnosis, diagnose
from verify.auditing.harness import Claim, infer_backend
from verify.auditing.problem import AuditInputError, parse_model
from verify.auditing.result import AuditResult, TensorCheck

__all__ = ["AuditInputError", "AuditResult", "Claim", "Diagnosis", "TensorCheck", "audit", "diagnose",
           "infer_backend", "parse_model"]
