"""Shared pieces of the symbolic problems: size limits, quadratic-task symbols, display helpers."""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from reference.validation import check_positive_int
from reference.errors import InvalidInputError
from reference.symbolic._derivation import SymbolTable

#: problem name -> {size argument: largest accepted value}. Sizes beyond these make
#: SymPy run for minutes (expression swell is exponential in the inner steps and
#: polynomial in the dimension). Measured: with every size at its limit, each
#: problem builds in under about 30 s on one CPU core (e.g. ANIL with 3 inner
#: steps, 3 hidden units and 3 shots took 160 s, hence steps <= 2 there).
LIMITS: dict[str, dict[str, int]] = {
    "quadratic-maml": {"dim": 3, "steps": 5},
    "quadratic-metasgd": {"dim": 3, "steps": 4},
    "quadratic-reptile": {"dim": 3, "steps": 5},
    "quadratic-newton-maml": {"dim": 2, "steps": 3},
    "quadratic-imaml": {"dim": 3},
    "linear-regression-maml": {"dim": 2, "steps": 3, "shots": 3, "queries": 3},
    "anil-linear": {"dim": 3, "steps": 2, "shots": 3, "queries": 3},
    "r2d2-ridge": {"dim": 3, "shots": 3, "queries": 2, "classes": 3},
    "nichol-maml": {"dim": 2, "steps": 3, "degree": 4},
    "nichol-fomaml": {"dim": 2, "steps": 3, "degree": 4},
    "nichol-reptile": {"dim": 2, "steps": 3, "degree": 4},
    "expected-quadratic-maml": {"dim": 2, "steps": 4},
    "expected-linear-regression-maml": {"steps": 3, "shots": 3, "queries": 3},
    "gradient-flow-quadratic": {"dim": 2},
    "bandit-maml-rl": {"batch": 4},
}


def check_size(problem: str, name: str, value: object, *, minimum: int = 1) -> int:
    """Validate a size argument of ``problem`` against :data:`LIMITS` (clear message with the limit)."""
    value = check_positive_int(name, value, minimum=minimum)
    limit = LIMITS[problem].get(name)
    if limit is not None and value > limit:
        raise InvalidInputError(
            f"{name}={value!r} is too large for {problem}: the limit is {name} <= {limit}, beyond which the "
            f"symbolic derivation takes minutes (expression swell); use the NumPy reference for larger sizes"
        )
    return value


@dataclass
class QuadraticSymbols:
    """Symbols of one quadratic task ``L(p) = 1/2 (p - c)^T A (p - c)`` on ``dim`` parameters."""

    theta: sp.Matrix
    A_s: sp.Matrix
    c_s: sp.Matrix
    A_q: sp.Matrix | None
    c_q: sp.Matrix | None


def quadratic_symbols(table: SymbolTable, dim: int, *, query: bool = True, theta: str = "theta",
                      theta_tex: str = r"\theta") -> QuadraticSymbols:
    """``theta, A_s, c_s[, A_q, c_q]``: scalars ``a_s, c_s`` when ``dim == 1``, else ``a_s_i_j`` (i <= j), ``c_s_i``."""
    th = table.vector(theta, dim, theta_tex)
    out = {}
    for role in ("s", "q") if query else ("s",):
        one = dim == 1
        out[f"A_{role}"] = table.matrix(f"a_{role}", dim, dim, f"a_{{{role}}}" if one else f"a^{{({role})}}",
                                        array=f"A_{role}", symmetric=True)
        out[f"c_{role}"] = table.vector(f"c_{role}", dim, f"c_{{{role}}}" if one else f"c^{{({role})}}",
                                        array=f"c_{role}")
    return QuadraticSymbols(th, out["A_s"], out["c_s"], out.get("A_q"), out.get("c_q"))


def quadratic_loss(p: sp.Matrix, A: sp.Matrix, c: sp.Matrix) -> sp.Expr:
    r = p - c
    return (r.T * A * r)[0, 0] / 2


def scalar_or_matrix(m: sp.Matrix) -> sp.Basic:
    """A 1x1 matrix as its entry (for dim = 1 displays), otherwise the matrix."""
    return m[0, 0] if m.shape == (1, 1) else m


def tidy(m: sp.Matrix, dim: int) -> sp.Matrix:
    """Factor entries for display when cheap (dim = 1); leave larger ones as computed."""
    return m.applyfunc(sp.factor) if dim == 1 else m


def require_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidInputError(f"{name}={value!r} must be True or False")
    return value
