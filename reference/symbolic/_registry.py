"""The table of symbolic problems: CLI names (constructor names with dashes) and their size options."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from reference.errors import InvalidInputError
from reference.symbolic._bandit_rl import bandit_maml_rl
from reference.symbolic._common import LIMITS
from reference.symbolic._derivation import Derivation
from reference.symbolic._expectation import expected_linear_regression_maml, expected_quadratic_maml
from reference.symbolic._flow import gradient_flow_quadratic
from reference.symbolic._linear import anil_linear, linear_regression_maml
from reference.symbolic._nichol import nichol_fomaml, nichol_maml, nichol_reptile
from reference.symbolic._quadratic import (
    quadratic_imaml,
    quadratic_maml,
    quadratic_metasgd,
    quadratic_newton_maml,
    quadratic_reptile,
)
from reference.symbolic._r2d2 import r2d2_ridge


@dataclass(frozen=True)
class Problem:
    """A symbolic problem: its name, constructor and the size arguments it takes."""

    name: str
    constructor: Callable[..., Derivation]

    @property
    def summary(self) -> str:
        return (inspect.getdoc(self.constructor) or "").splitlines()[0]

    @property
    def sizes(self) -> dict[str, Any]:
        """Integer size arguments with their defaults."""
        sig = inspect.signature(self.constructor)
        return {k: p.default for k, p in sig.parameters.items() if isinstance(p.default, int)
                and not isinstance(p.default, bool)}

    @property
    def limits(self) -> dict[str, int]:
        return dict(LIMITS[self.name])

    def build(self, **sizes: Any) -> Derivation:
        return self.constructor(**sizes)


_CONSTRUCTORS = [
    quadratic_maml,
    quadratic_metasgd,
    quadratic_reptile,
    quadratic_newton_maml,
    quadratic_imaml,
    linear_regression_maml,
    anil_linear,
    r2d2_ridge,
    nichol_maml,
    nichol_fomaml,
    nichol_reptile,
    expected_quadratic_maml,
    expected_linear_regression_maml,
    gradient_flow_quadratic,
    bandit_maml_rl,
]

#: name (constructor name with dashes) -> :class:`Problem`.
PROBLEMS: dict[str, Problem] = {f.__name__.replace("_", "-"): Problem(f.__name__.replace("_", "-"), f)
                                for f in _CONSTRUCTORS}


def get_problem(name: str) -> Problem:
    """Look a problem up by its dashed name (underscores accepted); unknown names list close matches."""
    if not isinstance(name, str):
        raise InvalidInputError(f"problem={name!r} must be a string such as 'quadratic-maml'")
    key = name.strip().lower().replace("_", "-")
    if key in PROBLEMS:
        return PROBLEMS[key]
    close = difflib.get_close_matches(key, list(PROBLEMS), n=3)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    raise InvalidInputError(
        f"problem={name!r} is unknown{hint}. Known problems: {', '.join(PROBLEMS)}; list them with --list"
    )


def derive(name: str, **sizes: Any) -> Derivation:
    """Build the derivation of problem ``name`` (dashed) with the given size arguments."""
    return get_problem(name).build(**sizes)
