"""The :class:`Derivation` object every constructor of ``reference.symbolic`` returns.

A derivation holds the SymPy symbols of a toy problem, its exact meta-loss and
meta-gradient (a column in CONVENTIONS flat order), the intermediate steps that
lead there (rendered by :meth:`Derivation.latex` / :meth:`Derivation.text`) and
named by-products (``extras``) that the tests check independently (the
chain-rule form of the gradient, the implicit-function form, series in
``alpha``, ...).

Length: a little over 500 lines, one class with its renderers (LaTeX, text,
SymPy code) and evaluators, which share the display rules; kept together.
"""

from __future__ import annotations

import fractions
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sympy as sp

from reference.errors import InvalidInputError

#: Larger right-hand sides are summarised in latex()/text() (they stay in the
#: attributes and in sympy_code()); a page of formula nobody can read helps no one.
MAX_DISPLAY_NODES = 800
_OMITTED = "(a large expression, omitted here; --format sympy prints the meta-loss and meta-gradient in full)"

# A derivation line whose right-hand side is written by hand: (latex, plain text).
Formula = tuple[str, str]


@dataclass(frozen=True)
class Step:
    """One line of a derivation: ``lhs = rhs`` with a short label.

    ``lhs`` and a hand-written ``rhs`` are ``(latex, text)`` pairs; a SymPy
    ``rhs`` is rendered by SymPy with the derivation's symbol names.
    """

    label: str
    lhs: Formula
    rhs: Any


def _escape_text(text: str) -> str:
    """Escape the characters that are special inside LaTeX ``\\text{...}``."""
    for char, repl in (("\\", r"\textbackslash "), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                       ("$", r"\$"), ("{", r"\{"), ("}", r"\}"), ("^", r"\^{}")):
        text = text.replace(char, repl)
    return text


def to_exact(value: Any, name: str = "value") -> sp.Expr:
    """Convert a number to an exact SymPy number.

    Integers and fractions stay exact; a float becomes the rational it
    represents exactly in binary (so a dyadic rational such as ``0.375`` maps
    to ``3/8`` and float64 inputs to the NumPy reference are the same numbers).
    Strings are parsed by SymPy (``"3/8"``, ``"sqrt(2)"``).
    """
    if isinstance(value, bool):
        raise InvalidInputError(f"{name}={value!r} must be a number, not a bool")
    if isinstance(value, sp.Basic):
        if not value.is_number:
            raise InvalidInputError(f"{name}={value!r} must be a number, not a symbolic expression")
        return value
    if isinstance(value, (int, np.integer)):
        return sp.Integer(int(value))
    if isinstance(value, fractions.Fraction):
        return sp.Rational(value.numerator, value.denominator)
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            raise InvalidInputError(f"{name}={value!r} must be finite")
        return sp.Rational(float(value))
    if isinstance(value, str):
        try:
            out = sp.sympify(value, rational=True)
        except (sp.SympifyError, SyntaxError, TypeError) as exc:
            raise InvalidInputError(f"{name}={value!r} is not a number SymPy can parse") from exc
        return to_exact(out, name)
    if isinstance(value, (complex, np.complexfloating)):
        return to_exact(float(np.real(value)), name) + sp.I * to_exact(float(np.imag(value)), name)
    raise InvalidInputError(f"{name}={value!r} must be a number (int, float, Fraction, SymPy number or string)")


class Derivation:
    """An exact meta-loss and meta-gradient of a toy problem, with its derivation.

    Attributes:
        name: the problem's name (``quadratic-maml``, ...) and ``params`` the
            sizes it was built with.
        title: one line; ``summary``: a few sentences (the setting and the paper).
        symbols: ``name -> Symbol`` for every free symbol of the problem (the
            inputs of :meth:`numeric` and :meth:`evaluate`), in a fixed order.
        arrays: ``name -> Matrix`` grouping symbols into the problem's arrays
            (``"theta"`` a column, ``"A_s"`` a symmetric matrix, ...); values
            may be bound by array name.
        wrt: ``[(name, shape), ...]``: the layout of the gradient column
            (CONVENTIONS parameter order, flattened in C order);
            ``wrt_symbols`` the matching symbols.
        meta_loss: the exact meta-loss (SymPy expression).
        meta_gradient: a column ``Matrix``; the exact gradient of ``meta_loss``
            with respect to ``wrt_symbols`` when ``is_gradient``, otherwise the
            algorithm's defined direction (FOMAML, Reptile) described in
            ``summary``.
        steps: the derivation, line by line.
        extras: named by-products (SymPy objects) checked by the tests.
    """

    def __init__(
        self,
        *,
        name: str,
        params: Mapping[str, Any],
        title: str,
        summary: str,
        symbols: Mapping[str, sp.Symbol],
        arrays: Mapping[str, sp.Matrix],
        wrt: Sequence[tuple[str, tuple[int, ...]]],
        wrt_symbols: Sequence[sp.Symbol],
        meta_loss: sp.Expr,
        meta_gradient: sp.Matrix,
        steps: Sequence[Step],
        is_gradient: bool = True,
        extras: Mapping[str, Any] | None = None,
        latex_names: Mapping[sp.Symbol, str] | None = None,
        definitions: Sequence[tuple[sp.Symbol, sp.Expr]] | None = None,
    ):
        self.name = name
        self.params = dict(params)
        self.title = title
        self.summary = summary
        self.symbols = dict(symbols)
        self.arrays = dict(arrays)
        self.wrt = [(n, tuple(s)) for n, s in wrt]
        self.wrt_symbols = list(wrt_symbols)
        self.definitions: list[tuple[sp.Symbol, sp.Expr]] = list(definitions or [])
        self.compact_meta_loss = sp.sympify(meta_loss)
        self.compact_meta_gradient = sp.Matrix(meta_gradient)
        self._full: dict[str, Any] = {}
        self.steps = list(steps)
        self.is_gradient = is_gradient
        self.extras = dict(extras or {})
        self.latex_names = dict(latex_names or {})
        n_wrt = sum(int(np.prod(s)) for _, s in self.wrt)
        if self.compact_meta_gradient.shape != (n_wrt, 1) or len(self.wrt_symbols) != n_wrt:
            raise AssertionError(  # a bug in a constructor, not bad user input
                f"{name}: gradient shape {self.compact_meta_gradient.shape} does not match the layout {self.wrt}"
            )
        known = set(self.symbols.values())
        for sym, expr in self.definitions:
            if not expr.free_symbols <= known:
                raise AssertionError(f"{name}: definition of {sym} uses undefined {expr.free_symbols - known}")
            known.add(sym)
        free = set(self.compact_meta_loss.free_symbols) | set(self.compact_meta_gradient.free_symbols)
        unknown = free - known
        if unknown:
            raise AssertionError(f"{name}: symbols {sorted(map(str, unknown))} are not listed in symbols")
        self._numeric: Callable[..., tuple[float, np.ndarray]] | None = None

    # -- full expressions ------------------------------------------------------

    def expand_definitions(self, obj: Any) -> Any:
        """Substitute the intermediate ``definitions`` so ``obj`` depends on ``symbols`` only."""
        if "subs" not in self._full:
            subs: dict[sp.Symbol, sp.Expr] = {}
            for sym, expr in self.definitions:
                subs[sym] = expr.xreplace(subs)
            self._full["subs"] = subs
        subs = self._full["subs"]
        return obj.xreplace(subs) if subs else obj

    @property
    def meta_loss(self) -> sp.Expr:
        """The exact meta-loss as an expression in ``symbols`` (intermediates substituted)."""
        if "loss" not in self._full:
            self._full["loss"] = self.expand_definitions(self.compact_meta_loss)
        return self._full["loss"]

    @property
    def meta_gradient(self) -> sp.Matrix:
        """The exact meta-gradient column in ``symbols`` (intermediates substituted).

        Problems with intermediate ``definitions`` (R2-D2) keep a compact form
        in ``compact_meta_gradient``; substituting gives a large tree.
        """
        if "grad" not in self._full:
            self._full["grad"] = self.expand_definitions(self.compact_meta_gradient)
        return self._full["grad"]

    # -- description ---------------------------------------------------------

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"<Derivation {self.name}({sizes}): {len(self.symbols)} symbols, gradient of size {len(self.wrt_symbols)}>"

    def _latex(self, obj: Any) -> str:
        return sp.latex(obj, symbol_names=self.latex_names, mat_delim="(", order="none")

    @staticmethod
    def _too_big(obj: Any) -> int:
        """Node count (capped) of ``obj`` if it is too large to display legibly, else 0.

        Counting stops at the cap, so deciding costs O(cap) even for huge trees.
        """
        count = 0
        for item in (obj if isinstance(obj, sp.MatrixBase) else [obj]):
            for _ in sp.preorder_traversal(item):
                count += 1
                if count > MAX_DISPLAY_NODES:
                    return count
        return 0

    def latex(self) -> str:
        """The derivation as LaTeX: one ``aligned`` environment, a line per step.

        Only standard LaTeX that KaTeX and MathJax understand is used
        (``aligned``, ``\\text``, ``\\nabla``, ``\\left( \\right)``, ``matrix``).
        """
        lines = []
        for step in self.steps:
            if isinstance(step.rhs, tuple):
                rhs = step.rhs[0]
            elif self._too_big(step.rhs):
                rhs = rf"\text{{{_OMITTED}}}"
            else:
                rhs = self._latex(step.rhs)
            label = rf" && \text{{{_escape_text(step.label)}}}" if step.label else ""
            lines.append(f"{step.lhs[0]} &= {rhs}{label}")
        body = " \\\\\n".join(lines)
        return "\\begin{aligned}\n" + body + "\n\\end{aligned}"

    def text(self) -> str:
        """The derivation as plain text (SymPy's string form of each expression)."""
        sizes = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        out = [f"{self.name} ({sizes}): {self.title}", "", self.summary, ""]
        for step in self.steps:
            if isinstance(step.rhs, tuple):
                rhs = step.rhs[1]
            elif self._too_big(step.rhs):
                rhs = _OMITTED
            else:
                rhs = sp.sstr(step.rhs, order="none")
            if step.label:
                out.append(f"  # {step.label}")
            out.append(f"  {step.lhs[1]} = {rhs}")
        layout = ", ".join(f"{n}{list(s)}" for n, s in self.wrt)
        out += ["", f"gradient layout (flat, C order): {layout}"]
        if not self.is_gradient:
            out.append("note: meta_gradient is the algorithm's defined direction, not the gradient of meta_loss")
        return "\n".join(out)

    def sympy_code(self) -> str:
        """Python source that rebuilds ``meta_loss`` and ``meta_gradient`` with SymPy.

        Intermediate definitions (if any) become assignments, so executing the
        code yields the full expressions in the problem's symbols.
        """
        names = list(self.symbols)
        lines = [
            "from sympy import *",
            # seq=True: symbols() returns a tuple for one name too, so "x, = symbols('x', ...)" unpacks
            f"{', '.join(names)}{',' if len(names) == 1 else ''} = symbols({' '.join(names)!r}, real=True, seq=True)",
        ]
        lines += [f"{sym.name} = {sp.sstr(expr)}" for sym, expr in self.definitions]
        lines += [
            f"meta_loss = {sp.sstr(self.compact_meta_loss)}",
            f"meta_gradient = Matrix({sp.sstr(list(self.compact_meta_gradient))})",
        ]
        return "\n".join(lines)

    # -- evaluation ------------------------------------------------------------

    def bind(self, values: Mapping[str, Any] | None = None, **kwargs: Any) -> dict[sp.Symbol, sp.Expr]:
        """Map symbol or array names to exact numbers: ``{Symbol: number}``.

        Keys are symbol names (``"a_s"``, ``"theta_0"``) or array names
        (``"A_s"``, ``"theta"``) whose value is array-like of the array's
        shape (a column may be given as a 1-D array). Floats are converted to
        the exact rationals they represent. Every symbol must receive a value.
        """
        merged = dict(values or {})
        merged.update(kwargs)
        out: dict[sp.Symbol, sp.Expr] = {}
        for key, value in merged.items():
            if key in self.symbols and not (key in self.arrays and np.ndim(value) > 0):
                out[self.symbols[key]] = to_exact(value, key)
            elif key in self.arrays:
                mat = self.arrays[key]
                arr = _shaped(key, np.asarray(value, dtype=object), mat)
                for i in range(mat.shape[0]):
                    for j in range(mat.shape[1]):
                        sym = mat[i, j]
                        if not isinstance(sym, sp.Symbol):
                            continue  # a constant entry of the array
                        exact = to_exact(arr[i, j], f"{key}[{i}, {j}]")
                        if sym in out and out[sym] != exact:
                            raise InvalidInputError(
                                f"{key}[{i}, {j}]={arr[i, j]!r} conflicts with {out[sym]} given for the same "
                                f"symbol {sym} (is {key} symmetric?)"
                            )
                        out[sym] = exact
            else:
                raise InvalidInputError(
                    f"{key!r} is not a symbol or array of {self.name}; known: "
                    f"{sorted(set(self.symbols) | set(self.arrays))}"
                )
        missing = [n for n, s in self.symbols.items() if s not in out]
        if missing:
            raise InvalidInputError(f"no value given for {missing} of {self.name}")
        return out

    def evaluate(
        self, values: Mapping[str, Any] | None = None, *, digits: int | None = None, **kwargs: Any
    ) -> tuple[sp.Expr, sp.Matrix]:
        """Evaluate meta-loss and meta-gradient exactly (``digits=None``) or with ``digits`` digits.

        Exact evaluation keeps rationals rational (and ``exp``/``log`` of
        rationals symbolic); ``digits=50`` evaluates with mpmath at 50
        significant digits.
        """
        subs = self._bind_with_definitions(values, **kwargs)
        loss = self.compact_meta_loss.xreplace(subs)
        grad = self.compact_meta_gradient.xreplace(subs)
        if digits is not None:
            loss = sp.N(loss, digits)
            grad = grad.applyfunc(lambda e: sp.N(e, digits))
        return loss, grad

    def _bind_with_definitions(self, values: Mapping[str, Any] | None, **kwargs: Any) -> dict[sp.Symbol, sp.Expr]:
        """Bound values plus the exact values of the intermediate definitions, in order."""
        subs = self.bind(values, **kwargs)
        for sym, expr in self.definitions:
            subs[sym] = expr.xreplace(subs)
        return subs

    def evaluate_extra(self, key: str, values: Mapping[str, Any] | None = None, *, digits: int | None = None,
                       **kwargs: Any) -> Any:
        """Evaluate ``extras[key]`` at the bound values (exact or ``digits`` digits)."""
        if key not in self.extras:
            raise InvalidInputError(f"key={key!r} is not an extra of {self.name}; known: {sorted(self.extras)}")
        obj = sp.sympify(self.extras[key]).xreplace(self._bind_with_definitions(values, **kwargs))
        if digits is None:
            return obj
        return obj.applyfunc(lambda e: sp.N(e, digits)) if isinstance(obj, sp.MatrixBase) else sp.N(obj, digits)

    def numeric(self) -> Callable[..., tuple[float, np.ndarray]]:
        """A float64 evaluator ``f(**values) -> (meta_loss, meta_gradient)``.

        ``values`` are given by symbol or array name as for :meth:`bind`;
        the gradient comes back as a flat ``np.ndarray`` in the ``wrt`` layout.
        Built with ``sympy.lambdify`` (NumPy backend) once and cached.
        """
        if self._numeric is None:
            syms = list(self.symbols.values())
            # Intermediates are evaluated in stages (each a small lambdified
            # function) instead of one huge substituted expression.
            stages = []
            for sym, expr in self.definitions:
                stages.append(sp.lambdify(syms, expr, modules="numpy"))
                syms = syms + [sym]
            final = sp.lambdify(syms, [self.compact_meta_loss, list(self.compact_meta_gradient)],
                                modules="numpy", cse=True)
            names = list(self.symbols)

            def evaluate(values: Mapping[str, Any] | None = None, **kwargs: Any) -> tuple[float, np.ndarray]:
                merged = dict(values or {})
                merged.update(kwargs)
                flat = self._flat_values(merged)
                args = [flat[n] for n in names]
                for stage in stages:
                    args.append(stage(*args))
                loss, grad = final(*args)
                return float(loss), np.array([float(g) for g in grad])

            self._numeric = evaluate
        return self._numeric

    def _flat_values(self, values: Mapping[str, Any]) -> dict[str, float]:
        flat: dict[str, float] = {}
        for key, value in values.items():
            if key in self.symbols and not (key in self.arrays and np.ndim(value) > 0):
                try:
                    flat[key] = float(value)
                except (TypeError, ValueError):
                    raise InvalidInputError(f"{key}={value!r} must be a real number (a scalar symbol of "
                                            f"{self.name})") from None
            elif key in self.arrays:
                mat = self.arrays[key]
                try:
                    arr = np.asarray(value, dtype=float)
                except (TypeError, ValueError):
                    raise InvalidInputError(f"{key}={value!r} must be an array of real numbers of shape "
                                            f"{mat.shape}") from None
                arr = _shaped(key, arr, mat)
                for i in range(mat.shape[0]):
                    for j in range(mat.shape[1]):
                        if isinstance(mat[i, j], sp.Symbol):
                            flat[mat[i, j].name] = float(arr[i, j])
            else:
                raise InvalidInputError(f"{key!r} is not a symbol or array of {self.name}")
        missing = [n for n in self.symbols if n not in flat]
        if missing:
            raise InvalidInputError(f"no value given for {missing} of {self.name}")
        return flat

    def split_gradient(self, flat: Sequence[Any]) -> list[np.ndarray]:
        """Split a flat gradient (this layout) into a list of arrays shaped as ``wrt``."""
        arr = np.asarray(flat, dtype=object if isinstance(flat, sp.MatrixBase) else None).ravel()
        out, start = [], 0
        for _, shape in self.wrt:
            size = int(np.prod(shape))
            out.append(arr[start : start + size].reshape(shape))
            start += size
        return out


def _shaped(key: str, arr: np.ndarray, mat: sp.Matrix) -> np.ndarray:
    """``arr`` in the shape of the array ``mat``, as ``bind()`` and ``numeric()`` accept it: exactly its
    shape, a 1-D array for a column, a scalar for a 1x1 array; anything else is refused with both shapes."""
    if arr.ndim == 1 and mat.shape[1] == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim == 0 and mat.shape == (1, 1):
        arr = arr.reshape(1, 1)
    if arr.shape != mat.shape:
        raise InvalidInputError(f"{key} has shape {arr.shape}, expected {mat.shape}")
    return arr


@dataclass
class SymbolTable:
    """Builds the symbols of a derivation with their LaTeX names and array groups."""

    symbols: dict[str, sp.Symbol] = field(default_factory=dict)
    arrays: dict[str, sp.Matrix] = field(default_factory=dict)
    latex_names: dict[sp.Symbol, str] = field(default_factory=dict)

    def scalar(self, name: str, latex: str | None = None, **assumptions: Any) -> sp.Symbol:
        assumptions.setdefault("real", True)
        sym = sp.Symbol(name, **assumptions)
        if name in self.symbols:
            raise AssertionError(f"symbol {name} defined twice")
        self.symbols[name] = sym
        if latex is not None:
            self.latex_names[sym] = latex
        return sym

    def vector(self, name: str, n: int, latex: str, *, array: str | None = None, **assumptions: Any) -> sp.Matrix:
        """A column of ``n`` symbols ``name_0, ...`` (just ``name`` when ``n == 1``)."""
        if n == 1:
            entries = [self.scalar(name, latex, **assumptions)]
        else:
            entries = [self.scalar(f"{name}_{i}", f"{latex}_{{{i}}}", **assumptions) for i in range(n)]
        mat = sp.Matrix(entries)
        self.arrays[array or name] = mat
        return mat

    def matrix(self, name: str, rows: int, cols: int, latex: str, *, array: str | None = None,
               symmetric: bool = False, scalar_if_1x1: bool = True) -> sp.Matrix:
        """A ``rows x cols`` matrix of symbols ``name_i_j`` (symmetric: ``name_i_j`` for ``i <= j``)."""
        if rows == cols == 1 and scalar_if_1x1:
            mat = sp.Matrix([[self.scalar(name, latex)]])
        else:
            entries: dict[tuple[int, int], sp.Symbol] = {}
            for i in range(rows):
                for j in range(cols):
                    if symmetric and j < i:
                        entries[i, j] = entries[j, i]
                    else:
                        entries[i, j] = self.scalar(f"{name}_{i}_{j}", f"{latex}_{{{i}{j}}}")
            mat = sp.Matrix(rows, cols, lambda i, j: entries[i, j])
        self.arrays[array or name] = mat
        return mat


def chain_gradient(
    expr: sp.Expr,
    definitions: Sequence[tuple[sp.Symbol, sp.Expr]],
    wrt: Sequence[sp.Symbol],
    latex_names: dict[sp.Symbol, str] | None = None,
) -> tuple[sp.Matrix, list[tuple[sp.Symbol, sp.Expr]]]:
    """Exact gradient of ``expr`` through ordered intermediate ``definitions`` (symbolic reverse mode).

    ``expr`` may use the defined symbols; each definition may use earlier ones.
    Every local partial derivative is SymPy's ``diff`` of a small expression;
    they are combined by the chain rule into adjoint symbols ``bar_<name>``
    (returned as further definitions, in a valid evaluation order), so the
    result equals differentiating the fully substituted expression (the tests
    check this) while every expression stays small. ``latex_names`` (if
    given) receives ``\bar{...}`` names for the adjoints.
    """
    adjoint_terms: dict[sp.Symbol, sp.Expr] = {sym: sp.diff(expr, sym) for sym, _ in definitions}
    adjoint_defs: list[tuple[sp.Symbol, sp.Expr]] = []
    adjoint_sym: dict[sp.Symbol, sp.Expr] = {}
    for sym_i, expr_i in reversed(definitions):
        total = adjoint_terms[sym_i]
        if total == 0:
            adjoint_sym[sym_i] = sp.Integer(0)
            continue
        bar = sp.Symbol(f"bar_{sym_i.name}")
        adjoint_defs.append((bar, total))
        adjoint_sym[sym_i] = bar
        if latex_names is not None:
            latex_names[bar] = rf"\bar{{{latex_names.get(sym_i, sym_i.name)}}}"
        for sym_j in expr_i.free_symbols:
            if sym_j in adjoint_terms:
                adjoint_terms[sym_j] = adjoint_terms[sym_j] + bar * sp.diff(expr_i, sym_j)
    out = []
    for w in wrt:
        total = sp.diff(expr, w)
        for sym, e in definitions:
            if adjoint_sym[sym] != 0 and w in e.free_symbols:
                total += adjoint_sym[sym] * sp.diff(e, w)
        out.append(total)
    return sp.Matrix(out), adjoint_defs


def gradient(expr: sp.Expr, wrt: Sequence[sp.Symbol]) -> sp.Matrix:
    """Column of partial derivatives of ``expr`` (SymPy's ``diff``, i.e. direct differentiation)."""
    return sp.Matrix([sp.diff(expr, s) for s in wrt])


def flat_symbols(*mats: sp.Matrix) -> list[sp.Symbol]:
    """Symbols of matrices in C order (row by row), concatenated; repeated symmetric entries kept."""
    out: list[sp.Symbol] = []
    for m in mats:
        out.extend(m[i, j] for i in range(m.shape[0]) for j in range(m.shape[1]))
    return out


def tex_matrix(mat: sp.Matrix, names: Mapping[sp.Symbol, str]) -> str:
    return sp.latex(mat, symbol_names=dict(names), mat_delim="(")
