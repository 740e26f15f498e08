"""metaverify's reference: analytic (no autodiff) NumPy/SciPy meta-gradients.

Submodules are imported on demand (``from reference import maml``); this
package never imports torch or jax.
"""

from reference.errors import (
    ConvergenceError,
    InvalidInputError,
    MetaverifyError,
    NotAnalyticError,
    SingularMatrixError,
)

__all__ = [
    "ConvergenceError",
    "InvalidInputError",
    "MetaverifyError",
    "NotAnalyticError",
    "SingularMatrixError",
]
