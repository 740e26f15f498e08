"""reference.symbolic's quadratic-task derivations (MAML/FOMAML, Meta-SGD, Reptile, Newton-MAML, iMAML), fast.

Issue 19: each test builds one small derivation (well under a second) and checks, at one random exact
rational point, everything it carries against an independent exact model of the algorithm written here
from its definition (the inner loop iterated on rational matrices, the derivative of that model's
meta-loss taken by SymPy along one coordinate at a time, ``t -> L(x + t e_i)``):

* ``meta_loss``, ``meta_gradient`` and every extra (iterates, closed forms, chain-rule / implicit
  gradients, FOMAML's direction, the proximal solution), and ``is_gradient`` (the direction is the
  gradient of the meta-loss exactly when the flag says so);
* every line of the derivation: a SymPy line evaluates to the quantity its left-hand side names; in one
  dimension a hand-written line, read back by SymPy, does too (the displays say what is true);
* the display dialects (LaTeX names ``a_{s}``, text names ``a_s``), a power of one never written,
  which lines are explicit, the titles, the defaults, the arrays and the symbols' assumptions.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import sympy as sp

from reference.symbolic import (
    quadratic_imaml,
    quadratic_maml,
    quadratic_metasgd,
    quadratic_newton_maml,
    quadratic_reptile,
)

# --------------------------------------------------------------------------------------------
# an independent exact model: the algorithms' definitions on rational matrices


def _rat(rng: np.random.Generator, lo: int = -9, hi: int = 9) -> sp.Rational:
    return sp.Rational(int(rng.integers(lo, hi + 1)), int(rng.integers(1, 6)))


def _point(algo: str, dim: int, seed: int) -> dict:
    """Random exact values of every input (A symmetric; the matrices to invert are invertible)."""
    rng = np.random.default_rng(seed)

    def sym() -> sp.Matrix:
        m = sp.zeros(dim, dim)
        for i in range(dim):
            for j in range(i, dim):
                m[i, j] = m[j, i] = _rat(rng)
        return m

    def vec() -> sp.Matrix:
        return sp.Matrix([_rat(rng) for _ in range(dim)])

    v = {"theta": vec(), "A_s": sym(), "c_s": vec()}
    if algo != "reptile":
        v.update(A_q=sym(), c_q=vec())
    if algo == "metasgd":
        v["alpha"] = sp.Matrix([_rat(rng, 1, 4) / 4 for _ in range(dim)])
    elif algo != "imaml":
        v["alpha"] = _rat(rng, 1, 4) / 4
    if algo == "newton":
        v["delta"] = sp.Rational(int(rng.integers(0, 5)), int(rng.integers(1, 4)))
        assert (v["A_s"] + v["delta"] * sp.eye(dim)).det() != 0
    if algo == "imaml":
        v["lam"] = sp.Rational(int(rng.integers(1, 10)), int(rng.integers(1, 4)))
        assert (v["A_s"] + v["lam"] * sp.eye(dim)).det() != 0
    return v


def _model(algo: str, v: dict, steps: int) -> dict:
    """Iterates, meta-loss (and phi* for iMAML) from the algorithms' definitions (CONVENTIONS)."""
    A_s, c_s, theta = v["A_s"], v["c_s"], v["theta"]
    dim = A_s.shape[0]

    def loss(p, A, c):
        return ((p - c).T * A * (p - c))[0, 0] / 2

    out: dict = {}
    if algo == "imaml":  # phi* = argmin L_s(phi) + lam/2 |phi - theta|^2: stationarity is a linear system
        phi = (A_s + v["lam"] * sp.eye(dim)).LUsolve(A_s * c_s + v["lam"] * theta)
        out.update(phi=phi, loss=loss(phi, v["A_q"], v["c_q"]))
        return out
    its = [theta]
    for _ in range(steps):
        p = its[-1]
        g = A_s * (p - c_s)  # grad L_s(p)
        if algo == "metasgd":
            p = p - sp.diag(*v["alpha"]) * g
        elif algo == "newton":
            p = p - v["alpha"] * (A_s + v["delta"] * sp.eye(dim)).LUsolve(g)
        else:
            p = p - v["alpha"] * g
        its.append(p)
    out["iterates"] = its
    out["loss"] = loss(its[-1], A_s, c_s) if algo == "reptile" else loss(its[-1], v["A_q"], v["c_q"])
    return out


def _model_gradient(algo: str, v: dict, steps: int, wrt: tuple[str, ...]) -> sp.Matrix:
    """d meta-loss / d x_i for x in ``wrt``: SymPy's derivative at t = 0 of the model along x + t e_i."""
    t = sp.Symbol("t")
    out = []
    for name in wrt:
        for i in range(v[name].shape[0]):
            w = dict(v)
            w[name] = v[name] + t * sp.eye(v[name].shape[0])[:, i]
            out.append(sp.diff(sp.expand(_model(algo, w, steps)["loss"]), t).subs(t, 0))
    return sp.Matrix(out)


# --------------------------------------------------------------------------------------------
# the cases: every constructor, one and two dimensions, one and two steps (J**K vs J*K needs K >= 2)

CASES = [
    ("maml", 1, 2, False), ("maml", 2, 1, False), ("maml", 1, 1, True),
    ("metasgd", 1, 2, False), ("reptile", 1, 2, False), ("reptile", 2, 1, False),
    ("newton", 1, 2, False), ("imaml", 1, 0, False),
]
IDS = [f"{a}-dim{d}-steps{s}{'-fo' if fo else ''}" for a, d, s, fo in CASES]


def _build(algo: str, dim: int, steps: int, first_order: bool):
    if algo == "maml":
        return quadratic_maml(dim=dim, steps=steps, first_order=first_order)
    if algo == "imaml":
        return quadratic_imaml(dim=dim)
    return {"metasgd": quadratic_metasgd, "reptile": quadratic_reptile,
            "newton": quadratic_newton_maml}[algo](dim=dim, steps=steps)


def _col(x) -> sp.Matrix:
    return sp.Matrix(x) if isinstance(x, sp.MatrixBase) else sp.Matrix([x])


def _same(got, want) -> bool:
    """Exact equality of two numbers or columns (every input is bound to a rational: no simplification)."""
    a, b = _col(got), _col(want)
    diff = [sp.sympify(x - y) for x, y in zip(a, b)]
    assert all(e.is_Rational for e in diff), diff  # evaluated at rationals: exact rational numbers
    return a.shape == b.shape and all(e == 0 for e in diff)


def _binding(v: dict) -> dict:
    return {k: (list(m) if isinstance(m, sp.MatrixBase) and m.shape[1] == 1 else m.tolist())
            if isinstance(m, sp.MatrixBase) else m for k, m in v.items()}


# --------------------------------------------------------------------------------------------
# values, gradients, extras and every line of the derivation


@pytest.mark.parametrize(("algo", "dim", "steps", "fo"), CASES, ids=IDS)
def test_values_extras_and_every_line_against_an_independent_model(algo, dim, steps, fo):
    d = _build(algo, dim, steps, fo)
    v = _point(algo, dim, seed=17 * dim + steps + 5 * fo)
    subs = d.bind(_binding(v))
    m = _model(algo, v, steps)
    wrt = ("theta", "alpha") if algo == "metasgd" else ("theta",)
    grad = _model_gradient(algo, v, steps, wrt)
    assert [n for n, _ in d.wrt] == list(wrt)

    # the meta-loss and the direction
    assert _same(d.meta_loss.xreplace(subs), m["loss"])
    q = {"loss": m["loss"], "grad": grad}
    if algo == "imaml":
        q["phi"] = m["phi"]
    else:
        pK = m["iterates"][-1]
        q["pK"] = pK
        if algo == "reptile":
            q["direction"] = v["theta"] - pK
        elif algo == "maml":
            q["fomaml"] = v["A_q"] * (pK - v["c_q"])
    want_dir = q["fomaml"] if fo else q["direction"] if algo == "reptile" else grad
    got_dir = d.meta_gradient.xreplace(subs)
    assert _same(got_dir, want_dir)
    # is_gradient says whether the direction is the meta-loss's gradient (FOMAML and Reptile are not)
    assert d.is_gradient == (algo not in ("reptile",) and not fo)
    assert _same(got_dir, grad) == d.is_gradient
    assert ("note: meta_gradient is the algorithm's defined direction" in d.text()) == (not d.is_gradient)

    # extras, each against the model
    ex = {k: sp.sympify(e).xreplace(subs) if not isinstance(e, list) else [x.xreplace(subs) for x in e]
          for k, e in d.extras.items()}
    expected_extras = {
        "maml": {"iterates", "closed_form_iterate", "chain_rule_gradient", "exact_gradient", "fomaml_direction"},
        "metasgd": {"iterates", "chain_rule_gradient"},
        "reptile": {"iterates", "closed_form_direction"},
        "newton": {"iterates", "chain_rule_gradient", "preconditioned_hessian"},
        "imaml": {"phi_star", "implicit_gradient", "stationarity_residual"},
    }[algo]
    assert set(ex) == expected_extras
    if "iterates" in ex:
        assert len(ex["iterates"]) == steps + 1
        assert all(_same(a, b) for a, b in zip(ex["iterates"], m["iterates"]))
    for key, want in (("closed_form_iterate", q.get("pK")), ("chain_rule_gradient", grad), ("exact_gradient", grad),
                      ("fomaml_direction", q.get("fomaml")), ("closed_form_direction", q.get("direction")),
                      ("phi_star", q.get("phi")), ("implicit_gradient", grad)):
        if key in ex:
            assert _same(ex[key], want), key
    if algo == "newton":
        A = v["A_s"]
        assert _same(ex["preconditioned_hessian"], (A + v["delta"] * sp.eye(dim)).LUsolve(A))
    if algo == "imaml":
        assert _same(ex["stationarity_residual"], sp.zeros(dim, 1))

    # every line: the quantity its left-hand side names
    K = steps
    names = {f"p_{K}": "pK", f"L(theta) = L_q(p_{K})": "loss", "L(theta)": "loss", "L(theta, a)": "loss",
             "grad L": "grad", "g_FO": "fomaml", "d": "direction", "phi*": "phi",
             "grad_theta L": "grad_theta"}
    if algo == "metasgd":
        q["grad_theta"] = grad[:dim, :]
    for step in d.steps:
        lhs = step.lhs[1]
        if not isinstance(step.rhs, tuple):  # a SymPy line
            assert _same(step.rhs.xreplace(subs), q[names[lhs]]), lhs
        elif dim == 1:
            _check_text_line(algo, step, v, q, names)
    _check_display(d, algo, dim, steps, fo)


#: The symbols of the one-dimensional problems, as the constructors' docstrings list them.
SYMBOLS_1D = {
    "maml": {"theta", "alpha", "a_s", "c_s", "a_q", "c_q"},
    "metasgd": {"theta", "alpha", "a_s", "c_s", "a_q", "c_q"},
    "reptile": {"theta", "alpha", "a_s", "c_s"},
    "newton": {"theta", "alpha", "delta", "a_s", "c_s", "a_q", "c_q"},
    "imaml": {"theta", "lam", "a_s", "c_s", "a_q", "c_q"},
}


def _check_display(d, algo: str, dim: int, steps: int, fo: bool) -> None:
    """What the LaTeX and the text must say, beyond the values their lines hold."""
    tex, txt = d.latex(), d.text()
    # two dialects: LaTeX spells a_{s}, A_{q}, c_{s}; the text the names a user binds (a_s, A_q, c_s)
    assert not re.search(r"(?<![\\\w])[aAc]_[sq](?!\w)", tex), tex
    assert not re.search(r"[aAc]_\{[sq]\}", txt), txt
    # a power of one is not written: (I - alpha A_s) after one step, (...)^K after K >= 2
    assert r"\right)^{1}" not in tex and not re.search(r"\)\*\*1(?!\d)", txt)
    power = f"^{{{steps}}}" if steps >= 2 else None
    if power and algo in ("maml", "metasgd", "reptile", "newton"):
        assert rf"\right){power}" in tex and f")**{steps}" in txt
    # the task's losses: the support loss always, the query loss exactly when there is a query task
    lhs = [s.lhs[1] for s in d.steps]
    assert lhs.count("L_s(p)") == 1 and lhs.count("L_q(p)") == (algo != "reptile")
    assert lhs.index("L_s(p)") == 0
    # which lines are explicit SymPy expressions: the final results; in one dimension also MAML's closed
    # form and meta-loss (short there; an explicit d x d expansion of p_K is unreadable for d >= 2)
    explicit = {s.label for s in d.steps if not isinstance(s.rhs, tuple)}
    assert explicit == {
        "maml": {"explicitly"} | ({f"closed form after K = {steps} steps", "meta-loss"} if dim == 1 else set()),
        "metasgd": {"explicitly, [theta; a]"}, "reptile": {"explicitly"}, "newton": {"explicitly"},
        "imaml": {"", "explicitly (direct differentiation)"},
    }[algo]
    if dim == 1:
        assert set(d.symbols) == SYMBOLS_1D[algo]
        if algo == "imaml":  # one-dimensional results are shown factored (tidy / sp.factor)
            shown = d.steps[-1].rhs
            assert shown == sp.factor(shown) and shown != sp.expand(shown)
    # the arrays a user binds: the query task's only where there is one
    arrays = {"theta", "A_s", "c_s"} | ({"A_q", "c_q"} if algo != "reptile" else set())
    assert set(d.arrays) == arrays | ({"alpha"} if algo == "metasgd" else set())
    if algo == "maml":
        word = "FOMAML" if fo else "MAML"
        assert d.title == f"{word} on a quadratic task" and d.summary.startswith(f"{word} (Finn et al. 2017)")
        assert ("not the gradient of the meta-loss" in d.summary) == fo
    if algo == "metasgd":
        # the adjoint sum runs over the K inner steps k = 0..K-1; a scalar rate is the symbol alpha
        assert re.search(r"\\sum_\{k=0\}\^\{(-?\d+)\}", tex).group(1) == str(steps - 1)
        if dim == 1:
            rate = d.latex_names[d.symbols["alpha"]]
            assert rate == r"\alpha" and f"p_{{k}} - {rate} \\odot" in tex
    if algo == "newton":  # the damping is declared nonnegative, so SymPy may use it
        delta = d.symbols["delta"]
        assert delta.is_nonnegative and sp.Abs(delta) == delta
    if algo == "imaml":  # the proximal weight is declared positive
        lam = d.symbols["lam"]
        assert lam.is_positive and sp.sqrt(lam**2) == lam


@pytest.mark.parametrize("name", ["quadratic-maml", "quadratic-metasgd", "quadratic-reptile", "quadratic-newton-maml",
                                  "quadratic-imaml"])
def test_defaults_are_the_smallest_problems(name):
    """``metaverify derive NAME`` without sizes (and ``derive --list``) gives dimension 1 and one step.

    The constructor is called without arguments (what the CLI does), so the test runs its body."""
    from reference.symbolic import PROBLEMS

    prob = PROBLEMS[name]
    want = {"dim": 1} if name == "quadratic-imaml" else {"dim": 1, "steps": 1}
    assert prob.sizes == want
    d = prob.constructor()
    assert {k: d.params[k] for k in want} == want and d.wrt[0] == ("theta", (1,))


def test_documented_size_limits_are_enforced_at_the_boundary():
    """docs/derive.md's table of largest sizes: each documented limit is accepted, one more is refused with the
    limit stated (the check every constructor runs first), for every problem and size."""
    from pathlib import Path

    from reference.errors import InvalidInputError
    from reference.symbolic import PROBLEMS
    from reference.symbolic._common import check_size

    doc = (Path(__file__).resolve().parents[1] / "docs" / "derive.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|.*\| (`.*`) \|$", doc, flags=re.M)
    assert {r[0] for r in rows} == set(PROBLEMS) and len(rows) == len(PROBLEMS)
    for problem, cell in rows:
        documented = {k: int(v) for k, v in re.findall(r"`([a-z]+) <= (\d+)`", cell)}
        assert documented and PROBLEMS[problem].limits == documented, problem
        for size, limit in documented.items():
            assert check_size(problem, size, limit) == limit
            with pytest.raises(InvalidInputError, match=rf"{size}={limit + 1} is too large for {problem}: "
                                                        rf"the limit is {size} <= {limit},"):
                check_size(problem, size, limit + 1)


def _check_text_line(algo: str, step, v: dict, q: dict, names: dict) -> None:
    """A hand-written one-dimensional line, read back by SymPy, is true at the point ``v``."""
    lhs, txt = step.lhs[1], step.rhs[1]
    if "argmin" in txt or "sum_k" in txt:  # the proximal problem's statement; Meta-SGD's adjoint recursion
        return
    val = {k: (m[0, 0] if isinstance(m, sp.MatrixBase) else m) for k, m in v.items()}
    a_s, c_s = val["A_s"], val["c_s"]
    P = sp.Rational(7, 3)  # a free p (p, p_k): the per-step lines are functions of it
    loc = {"theta": val["theta"], "alpha": val.get("alpha"), "a_s": a_s, "c_s": c_s,
           "p": P, "p_k": P, "delta": val.get("delta"), "lam": val.get("lam"),
           "gLs": lambda x: a_s * (x - c_s)}
    if "A_q" in v:
        a_q, c_q = val["A_q"], val["c_q"]
        loc.update(a_q=a_q, c_q=c_q, gLq=lambda x: a_q * (x - c_q), Lq=lambda x: a_q * (x - c_q) ** 2 / 2)
    if "pK" in q:
        loc[next(k for k in names if names[k] == "pK")] = q["pK"][0, 0]  # p_K
    if "phi" in q:
        loc["phi_star"] = q["phi"][0, 0]
    if algo == "metasgd":  # Meta-SGD's lines are written in matrix notation at every size (1x1 here)
        loc.update(I=1, A_s=a_s, A_q=loc["a_q"], a=val["alpha"], diag=lambda x: x)
    per_step = {
        "L_s(p)": a_s * (P - c_s) ** 2 / 2,
        "L_q(p)": (loc.get("a_q", 0) * (P - loc.get("c_q", 0)) ** 2 / 2),
        "p_0": val["theta"],
        "p_{k+1}": {"metasgd": P - val.get("alpha", 0) * a_s * (P - c_s),
                    "newton": P - val.get("alpha", 0) * a_s * (P - c_s) / (a_s + (val.get("delta") or 0))
                    }.get(algo, P - (val.get("alpha") or 0) * a_s * (P - c_s)),
    }
    want = per_step[lhs] if lhs in per_step else q[names[lhs]]
    want = want[0, 0] if isinstance(want, sp.MatrixBase) else want
    for part in txt.split(" = "):
        src = part.replace("grad L_q(", "gLq(").replace("grad L_s(", "gLs(").replace("L_q(", "Lq(")
        src = src.replace("phi*(theta)", "phi*").replace("phi*", "phi_star").replace("^", "**")
        src = re.sub(r"(?<=[\w)])\s+(?=[\w(])", "*", src)  # juxtaposition is a product
        got = sp.sympify(src, locals=loc)
        assert _same(got, want), (lhs, part)
