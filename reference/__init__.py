"""metaverify's reference: analytic (no autodiff) NumPy/SciPy meta-gradients.

The package re-exports the models (:class:`MLP`, :class:`Quadratic`), the task
type (:class:`Task`), the task generators and the errors; the algorithms are
submodules imported on demand (``from reference import maml``), as are the
public building blocks :mod:`reference.inner_loop` (the unrolled inner loop and
its adjoint), :mod:`reference.features` (backbone features and their VJP),
:mod:`reference.linalg` and :mod:`reference.validation`. This package never
imports torch or jax (``reference.from_torch``, the torch-module translator of
:mod:`reference.nets.from_torch`, imports torch when first used; the
convolutional networks are :mod:`reference.nets`).
"""

from reference.errors import (
    ConvergenceError,
    InvalidInputError,
    MetaverifyError,
    NotAnalyticError,
    SingularMatrixError,
)
from reference.models import MLP, Quadratic, flatten, unflatten
from reference.tasks import Task, gaussian_classification, linear_regression, sinusoid

__all__ = [
    "from_torch",
    "ConvergenceError",
    "InvalidInputError",
    "MLP",
    "MetaverifyError",
    "NotAnalyticError",
    "Quadratic",
    "SingularMatrixError",
    "Task",
    "flatten",
    "gaussian_classification",
    "linear_regression",
    "sinusoid",
    "unflatten",
]


def __getattr__(name: str):  # noqa: ANN202 - module-level lazy attribute
    """``reference.from_torch`` imports torch only when first used."""
    if name == "from_torch":
        import importlib

        return importlib.import_module("reference.nets.from_torch").from_torch
    raise AttributeError(f"module 'reference' has no attribute {name!r}")
