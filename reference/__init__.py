"""metaverify's reference: analytic (no autodiff) NumPy/SciPy meta-gradients.

Submodules are imported on demand (``from reference import maml``); this
package never imports torch or jax (``reference.from_torch``, the torch-module
translator of :mod:`reference.nets.from_torch`, imports torch when first used).
"""

from reference.errors import (
    ConvergenceError,
    InvalidInputError,
    MetaverifyError,
    NotAnalyticError,
    SingularMatrixError,
)

__all__ = [
    "from_torch",
    "ConvergenceError",
    "InvalidInputError",
    "MetaverifyError",
    "NotAnalyticError",
    "SingularMatrixError",
]


def __getattr__(name: str):  # noqa: ANN202 - module-level lazy attribute
    """``reference.from_torch`` imports torch only when first used."""
    if name == "from_torch":
        import importlib

        return importlib.import_module("reference.nets.from_torch").from_torch
    raise AttributeError(f"module 'reference' has no attribute {name!r}")
