"""The one tolerance table of metaverify, keyed by dtype, read through :func:`tolerance`.

Every numerical comparison in the project (engine verdicts, reference-vs-backend
matches, float32 backends, linear-solve checks) takes its tolerance from
:data:`TOLERANCES` through :func:`tolerance`; a tolerance written anywhere else
must carry a comment saying why it cannot come from here (the jax
``public_test_util.py`` habit).

All entries are *relative* and derived from the dtype's machine epsilon
``eps = np.finfo(dtype).eps`` (float32: 1.19e-07, float64: 2.22e-16), never
written as bare literals, so a float32 check can never use float64's numbers.
What each kind is relative *to* is part of its definition (below); callers
must use the same scale.

Kinds (columns of the table):

``"gradient"``
    :func:`verify.check_gradient`: allowed ``|<g, v> - D_v f(x)|`` relative
    to ``||g|| ||v||`` (not to ``|<g, v>|``, which can be ~0 for an unlucky
    direction and would turn round-off into a false alarm).
``"dot_product"``
    :func:`verify.dot_product_test`: allowed ``|<u, J^T w> - <J u, w>|``
    relative to ``max(||u|| ||J^T w||, ||J u|| ||w||)``.
``"reference_match"``
    Two implementations of the same quantity in ``dtype`` (the analytic
    reference against a PyTorch/JAX backend): allowed normwise relative
    difference ``||a - b|| / max(||a||, ||b||)``.
``"solve_backward_error"``
    Normwise backward error of a linear solve ``A x = b``:
    ``||b - A x|| / (||A|| ||x|| + ||b||)``.
``"roundoff"``
    The level at which a computed quantity is pure round-off, relative to the
    magnitudes it was computed from (used to drop round-off-dominated Taylor
    remainders in :func:`verify.taylor_test`).

Conditioning: the entries are for a well-conditioned computation. A forward
error scales with the condition number ``kappa`` of the problem (forward error
<= kappa * backward error), so :func:`tolerance` multiplies the entry by
``condition`` (default 1). Pass ``condition=kappa`` when comparing forward
quantities of an ill-conditioned computation, e.g. an iMAML meta-gradient
through ``(I + H/lam)^{-1}`` with ``kappa = cond(I + H/lam)``, or a
Newton-MAML meta-gradient through a damped Hessian solve. Backward errors do
not scale with ``kappa``: read ``"solve_backward_error"`` with ``condition=1``
and use ``condition=kappa`` only for the forward error ``||x - x*|| / ||x*||``.

Extending: a new kind is a new key in every row of :data:`TOLERANCES`, derived
from that row's ``eps`` with a comment saying why; :func:`tolerance` needs no
change, and a kind missing from a row is an error, not a silent default.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from reference.errors import InvalidInputError

__all__ = ["TOLERANCES", "KINDS", "TF32", "TF32_EPS", "tolerance", "precision_dtype"]

#: Key of the TensorFloat-32 row: float32 computations whose matrix products
#: (cuBLAS matmuls, cuDNN convolutions on NVIDIA Ampere and later) round their
#: inputs to TF32, i.e. float32's 8-bit exponent with a 10-bit mantissa.
TF32 = "tf32"
#: TF32's machine epsilon, 2**-10 (float32's is 2**-23).
TF32_EPS = 2.0**-10


def _row(dtype: type[np.generic]) -> MappingProxyType:
    eps = float(np.finfo(dtype).eps)
    return MappingProxyType(
        {
            # eps^(2/3): float64 3.7e-11 (~1.7e5 ulps), float32 2.4e-05 (~200 ulps).
            # Room for the round-off a claimed gradient accumulates through a long
            # chain of operations (inner loops, Hessian products), yet more than 100x
            # below the smallest error the suite must catch (1e-8 relative in float64,
            # 1e-3 in float32) even after dividing by sqrt(n) for a random direction.
            "gradient": eps ** (2.0 / 3.0),
            # eps^(2/3): a JVP and a VJP are two separately rounded computations of
            # J; their mismatch relative to the norms is O(sqrt(n) eps) for a
            # well-conditioned J, far below eps^(2/3); a wrong transpose gives O(1).
            "dot_product": eps ** (2.0 / 3.0),
            # eps^(3/4): float64 1.8e-12, float32 6.3e-06. Same mathematics, different
            # operation order: agreement to a few thousand ulps (float64) or ~50 ulps
            # (float32) normwise; pass condition=kappa for ill-conditioned pipelines.
            "reference_match": eps ** (3.0 / 4.0),
            # 1024 eps: a backward-stable solve (LU with partial pivoting, Cholesky)
            # has backward error c(n) eps with c(n) modest for the n <= ~1000 systems
            # of meta-learning; 1024 covers c(n) and the residual's own rounding.
            "solve_backward_error": 1024.0 * eps,
            # 64 eps: a difference of computed quantities of size M carries round-off of
            # a few eps*M; above 64 eps*M it is at least ~16x its round-off, so a rate
            # fitted there is biased by < 0.1.
            "roundoff": 64.0 * eps,
        }
    )


def _tf32_row() -> MappingProxyType:
    # TF32 keeps float32's exponent, additions and accumulation, but rounds the
    # inputs of every matrix product to 10 mantissa bits: the rounding a TF32
    # meta-gradient carries is float32's scaled by TF32_EPS / eps32 = 2**13. The
    # row grants the same allowance *in units of that rounding* as float32's row
    # (e.g. reference_match 6.3e-06 * 8192 = 5.2e-02). Not eps_tf32**(3/4): that
    # would allow only ~6 TF32 ulps, and an emulated TF32 MAML meta-gradient
    # already differs from float64 by 1.5e-4 to 2.3e-3 (seeds 0-5).
    f32 = _row(np.float32)
    scale = TF32_EPS / float(np.finfo(np.float32).eps)
    return MappingProxyType({k: v * scale for k, v in f32.items()})


#: The table: ``TOLERANCES[np.float64]["gradient"]``. Complex rows equal their
#: real part's row (a complex number carries two reals of the same precision).
#: ``TOLERANCES[TF32]`` is float32 with TF32 matrix products (see :data:`TF32`).
TOLERANCES: MappingProxyType = MappingProxyType(
    {
        np.float32: _row(np.float32),
        np.float64: _row(np.float64),
        np.complex64: _row(np.float32),
        np.complex128: _row(np.float64),
        TF32: _tf32_row(),
    }
)

#: The kinds every row defines.
KINDS: tuple[str, ...] = tuple(TOLERANCES[np.float64].keys())


def _dtype_type(dtype: Any) -> Any:
    if isinstance(dtype, str) and dtype.lower() in (TF32, "tensorfloat32"):
        return TF32
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise InvalidInputError(
            f"dtype={dtype!r} is not a NumPy dtype; use one of float32, float64, complex64, complex128 or 'tf32'"
        ) from exc
    if dt.type not in TOLERANCES:
        raise InvalidInputError(
            f"dtype={dtype!r} has no row in the tolerance table; use one of "
            f"{', '.join(t if isinstance(t, str) else np.dtype(t).name for t in TOLERANCES)} (cast the data, or add a row to "
            "verify.tolerance.TOLERANCES with a comment saying why)"
        )
    return dt.type


def precision_dtype(*dtypes: DTypeLike) -> np.dtype:
    """The least precise floating dtype among ``dtypes`` (ints and bools ignored).

    Used to pick the table row: a check involving any float32 quantity is a
    float32 check. Returns float64 when no floating dtype is given.
    """
    worst = np.dtype(np.float64)
    for d in dtypes:
        if d is None:
            continue
        dt = np.dtype(d)
        if not np.issubdtype(dt, np.inexact):
            continue
        real = np.dtype(np.finfo(dt).dtype)  # complex128 -> float64, complex64 -> float32
        if np.finfo(real).eps > np.finfo(worst).eps:
            worst = real
    return worst


def tolerance(dtype: DTypeLike, kind: str = "gradient", *, condition: float = 1.0) -> float:
    """The relative tolerance of ``kind`` for computations in ``dtype``.

    ``tol = TOLERANCES[dtype][kind] * condition``; see the module docstring for
    what each kind is relative to and when to pass a condition number.

    Args:
        dtype: float32, float64, complex64 or complex128 (anything ``np.dtype``
            accepts, or an array's ``.dtype``), or ``"tf32"`` for float32 with
            TensorFloat-32 matrix products.
        kind: a column of the table, one of :data:`KINDS`.
        condition: the condition number ``kappa >= 1`` of the computation
            compared (forward error <= kappa * backward error).

    Returns:
        The tolerance, a positive float.

    Raises:
        InvalidInputError: unknown dtype or kind, or ``condition < 1``.
    """
    row = TOLERANCES[_dtype_type(dtype)]
    if kind not in row:
        raise InvalidInputError(f"kind={kind!r} is not a tolerance kind; use one of {', '.join(KINDS)}")
    cond = float(condition)
    if not np.isfinite(cond) or cond < 1.0:
        raise InvalidInputError(
            f"condition={condition!r} must be a finite condition number >= 1 (use 1 for a well-conditioned check)"
        )
    return float(row[kind]) * cond
