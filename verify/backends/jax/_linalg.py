"""Conditioning diagnostics for the solves of the JAX backend (Newton-MAML, iMAML, R2-D2, LR-D2).

``jnp.linalg.solve`` on a singular or indefinite matrix returns noise, inf or
NaN without complaint, and a jitted function cannot raise on values. So the
differentiated code records the extreme eigenvalues of each system matrix
(``jnp.linalg.eigvalsh`` of its ``stop_gradient``: a diagnostic, no gradient
flows through it) as an auxiliary output, and the host checks them after the
call with the rules of the NumPy reference (``reference.linalg``):

* an SPD system (ridge, IRLS, iMAML's ``I + H/lam``) must have a positive
  smallest eigenvalue;
* its condition number must not exceed ``1e-4 / eps`` (fewer than four correct
  digits would survive the solve): 4.5e11 in float64, 8.4e2 in float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from reference.errors import SingularMatrixError

#: ``reference.linalg.MAX_COND`` (``1e-4 / eps``) per dtype.
MAX_COND: dict[str, float] = {dt: 1e-4 / float(np.finfo(dt).eps) for dt in ("float64", "float32")}


def eig_extremes(a: jax.Array) -> jax.Array:
    """``[lambda_min, lambda_max]`` of the symmetric matrix ``a`` (no gradient flows through it)."""
    eig = jnp.linalg.eigvalsh(jax.lax.stop_gradient(a))
    return jnp.stack([eig[0], eig[-1]])


def check_spd(extremes: Any, dtype: str, what: str, hint: str = "increase lam") -> None:
    """Raise :class:`SingularMatrixError` unless every recorded matrix is SPD and well conditioned.

    ``extremes`` has shape ``(..., 2)`` (``[lambda_min, lambda_max]`` per
    matrix, e.g. per task and per Newton step); ``what(index)`` names the
    offending matrix from its index tuple.
    """
    ext = np.asarray(extremes, dtype=np.float64)
    small, large = ext[..., 0], ext[..., 1]
    not_pd = ~(small > 0)  # NaN counts as not PD
    if np.any(not_pd):
        idx = tuple(int(i) for i in np.argwhere(not_pd)[0])
        raise SingularMatrixError(
            f"{what(idx)} is not positive definite in floating point (smallest eigenvalue {small[idx]:.3g}); {hint}"
        )
    cond = large / small
    limit = MAX_COND[dtype]
    bad = ~(cond <= limit)
    if np.any(bad):
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise SingularMatrixError(
            f"{what(idx)} is singular in floating point: cond = {cond[idx]:.3g} > {limit:.3g} for {dtype} "
            f"(fewer than 4 correct digits would survive the solve); {hint}"
        )


__all__ = ["MAX_COND", "check_spd", "eig_extremes"]
