"""metaverify's checking engine.

The public API is re-exported here; the code lives in private modules.
Backends (``verify.backends.torch``, ``verify.backends.jax``) are imported
lazily: ``import verify`` never imports torch or jax.
"""

from __future__ import annotations

__version__ = "0.1.0"

# The derivative-checking engine (numerical differentiation, Taylor test, dot-product test,
# gradient verdicts) and the one tolerance table. ``verify.tolerance`` stays the module
# (read tolerances with ``verify.tolerance.tolerance(dtype, kind)``); the function is not
# re-exported under the same name so the module is never shadowed.
from verify import tolerance
from verify.auditing import AuditInputError, AuditResult, audit
from verify._check import check_gradient
from verify._dottest import dot_product_test
from verify._numdiff import Estimate, directional_derivative
from verify._taylor import TaylorResult, taylor_test
from verify._verdict import FAIL, INCONCLUSIVE, PASS, STATUSES, Verdict
from verify.tolerance import TOLERANCES

__all__ = [
    "__version__",
    "AuditInputError",
    "AuditResult",
    "Estimate",
    "FAIL",
    "INCONCLUSIVE",
    "PASS",
    "STATUSES",
    "TOLERANCES",
    "TaylorResult",
    "Verdict",
    "audit",
    "check_gradient",
    "directional_derivative",
    "dot_product_test",
    "taylor_test",
    "tolerance",
]
