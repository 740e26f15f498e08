"""The formulas the report typesets: notation, each algorithm's text, the engine, the symbolic problems.

Each row of :data:`verify.algorithms.ALGORITHMS` carries its
:class:`~verify.formulas.AlgorithmText` (``Algorithm.text``: display name, paper,
one sentence, display formulas for the meta-objective and the meta-gradient) and
its symbolic toy problem (``Algorithm.symbolic``); :data:`TEXTS` and
:data:`SYMBOLIC_PROBLEMS` are live views of those rows, so an algorithm
registered later appears in the report without an edit here.

Where :mod:`reference.symbolic` is importable, :func:`symbolic_derivation`
adds the exact SymPy derivation of the algorithm's toy problem (its
``Derivation.latex()``), so a reader sees the calculus carried out on a case
small enough to check by hand.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any

from verify.algorithms import ALGORITHMS
from verify.formulas import AlgorithmText

__all__ = ["AlgorithmText", "ENGINE_FORMULAS", "NOTATION", "SYMBOLIC_PROBLEMS", "TEXTS", "symbolic_derivation"]


class _RowView(Mapping):
    """``{algorithm: row.<attr>}`` over the rows of :data:`verify.algorithms.ALGORITHMS` where it is set."""

    def __init__(self, attr: str):
        self._attr = attr

    def _items(self) -> dict[str, Any]:
        return {name: getattr(row, self._attr) for name, row in ALGORITHMS.items()
                if getattr(row, self._attr) is not None}

    def __getitem__(self, key: str) -> Any:
        return self._items()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())


#: Shared notation, shown once before the algorithm sections.
NOTATION: list[tuple[str, str]] = [
    ("a meta-batch of N tasks, each a support and a query set",
     r"\mathcal{T}_i = (x^s_i, y^s_i, x^q_i, y^q_i), \quad i = 1, \dots, N"),
    ("support and query losses of task i, their gradients and the support Hessian",
     r"L^s_i(p) = \ell\big(f(x^s_i; p), y^s_i\big), \quad L^q_i(p) = \ell\big(f(x^q_i; p), y^q_i\big), "
     r"\quad H^s_i(p) = \nabla^2 L^s_i(p)"),
    ("parameters: the flat vector of the MLP's [W1, b1, ..., WL, bL] (C order)",
     r"\theta = \operatorname{vec}(W_1, b_1, \dots, W_L, b_L)"),
]

#: algorithm -> its :class:`AlgorithmText` (the rows' ``text``).
TEXTS: Mapping[str, AlgorithmText] = _RowView("text")

#: How the checks are computed (verify._numdiff, verify._check, verify._taylor).
ENGINE_FORMULAS: list[tuple[str, str]] = [
    ("the directional derivative every check estimates, along seeded random unit directions v",
     r"D_v f(x) = \frac{d}{dt} f(x + t v)\Big|_{t=0} = \langle \nabla f(x), v \rangle"),
    ("complex step (Squire and Trapp 1998): no subtraction, so no cancellation; h about 1e-30",
     r"D_v f(x) \approx \frac{\operatorname{Im} f(x + i h v)}{h}, \qquad \text{error } \frac{h^2}{6} "
     r"\lvert f'''\rvert"),
    ("central difference at the step that balances truncation against round-off",
     r"D(t) = \frac{f(x + t v) - f(x - t v)}{2 t}, \qquad \text{error} \approx c\, t^2 + "
     r"\frac{\epsilon \lvert f \rvert}{t}, \qquad t^* \propto \epsilon^{1/3}"),
    ("Richardson extrapolation of central differences on steps t, 2t, 4t (removes the t^2 and t^4 terms)",
     r"R(t) = \frac{64\, D(t) - 20\, D(2t) + D(4t)}{45}"),
    ("gradient check: pass when the claimed directional derivative agrees within the tolerance plus the "
     "estimate's own error",
     r"\big\lvert \langle g, v \rangle - D \big\rvert \le \mathrm{rtol} \cdot \max\big(\lVert g \rVert "
     r"\lVert v \rVert, \lvert D \rvert\big) + \mathrm{err}(D)"),
    ("Taylor test (Farrell et al. 2013): the remainders shrink at rates 1, 2, 3 when the derivatives are right",
     r"\begin{aligned} r_0(h) &= \big\lvert f(x + h v) - f(x) \big\rvert = O(h) \\ "
     r"r_1(h) &= \big\lvert f(x + h v) - f(x) - h \langle g, v \rangle \big\rvert = O(h^2) \\ "
     r"r_2(h) &= \big\lvert f(x + h v) - f(x) - h \langle g, v\rangle - \tfrac{h^2}{2} \langle v, H v \rangle "
     r"\big\rvert = O(h^3) \end{aligned}"),
]
#: algorithm -> (reference.symbolic constructor, keyword arguments): the toy problem shown in its section
#: (the rows' ``symbolic``).
SYMBOLIC_PROBLEMS: Mapping[str, tuple[str, dict[str, Any]]] = _RowView("symbolic")



def symbolic_derivation(algorithm: str) -> dict[str, str] | None:
    """The exact SymPy derivation of ``algorithm``'s toy problem, or a note saying why there is none.

    Returns ``{"title", "summary", "latex", "call"}`` or ``{"note"}``; None when
    the algorithm has no toy problem.
    """
    spec = SYMBOLIC_PROBLEMS.get(algorithm)
    if spec is None:
        return None
    name, kwargs = spec
    call = f"reference.symbolic.{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    try:
        module = importlib.import_module("reference.symbolic")
        constructor = getattr(module, name)
    except (ImportError, AttributeError) as exc:
        return {"note": f"{call} is not available in this installation ({type(exc).__name__}: {exc})"}
    try:
        derivation = constructor(**kwargs)
        return {"title": str(derivation.title), "summary": str(derivation.summary), "latex": derivation.latex(),
                "call": call}
    except Exception as exc:  # an optional illustration must never sink the report; say what happened instead
        return {"note": f"{call} failed: {type(exc).__name__}: {exc}"}
