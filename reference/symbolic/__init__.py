"""Exact SymPy derivations of meta-losses and meta-gradients on toy problems.

Each constructor returns a :class:`Derivation` (symbols, exact meta-loss,
meta-gradient as a column in CONVENTIONS flat order, a readable multi-line
derivation via ``latex()`` / ``text()``, and ``numeric()`` for float
evaluation). The test suite uses them as the independent ground truth for the
NumPy reference. Problem names for ``metaverify derive`` are the constructor
names with dashes (:data:`PROBLEMS`).

Families: gradient-based algorithms on quadratics (MAML/FOMAML, Meta-SGD,
Reptile, Newton-MAML, iMAML), MAML on linear regression, ANIL on a two-layer
linear network, the R2-D2 ridge head, Nichol et al. 2018's expansions in
alpha, expectations over Gaussian task distributions, and gradient flow with
its adjoint, and MAML-RL on a 2-armed bandit (exact objective, gradient and
estimator bias).
"""

from reference.symbolic._bandit_rl import bandit_maml_rl
from reference.symbolic._common import LIMITS
from reference.symbolic._derivation import Derivation, Step, chain_gradient, to_exact
from reference.symbolic._expectation import (
    expected_linear_regression_maml,
    expected_quadratic_maml,
    gaussian_expectation,
)
from reference.symbolic._flow import expm_symmetric_2x2, gradient_flow_quadratic
from reference.symbolic._linear import anil_linear, linear_regression_maml
from reference.symbolic._nichol import nichol_fomaml, nichol_maml, nichol_reptile
from reference.symbolic._quadratic import (
    quadratic_imaml,
    quadratic_maml,
    quadratic_metasgd,
    quadratic_newton_maml,
    quadratic_reptile,
)
from reference.symbolic._r2d2 import r2d2_ridge, ridge_weights
from reference.symbolic._registry import PROBLEMS, Problem, derive, get_problem

__all__ = [
    "LIMITS",
    "PROBLEMS",
    "Derivation",
    "Problem",
    "Step",
    "anil_linear",
    "bandit_maml_rl",
    "chain_gradient",
    "derive",
    "expected_linear_regression_maml",
    "expected_quadratic_maml",
    "expm_symmetric_2x2",
    "gaussian_expectation",
    "get_problem",
    "gradient_flow_quadratic",
    "linear_regression_maml",
    "nichol_fomaml",
    "nichol_maml",
    "nichol_reptile",
    "quadratic_imaml",
    "quadratic_maml",
    "quadratic_metasgd",
    "quadratic_newton_maml",
    "quadratic_reptile",
    "r2d2_ridge",
    "ridge_weights",
    "to_exact",
]
