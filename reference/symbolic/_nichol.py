"""Nichol et al. 2018, "On First-Order Meta-Learning Algorithms", section 5: Taylor expansions in alpha.

``k`` SGD steps on losses ``L_1, ..., L_k`` (minibatches of one task):
``phi_1 = phi``, ``phi_{i+1} = phi_i - alpha L_i'(phi_i)``. With
``gbar_i = L_i'(phi_1)`` and ``Hbar_i = L_i''(phi_1)`` the paper shows, to
``O(alpha^2)``::

    g_MAML    = d/dphi_1 L_k(phi_k)
              = gbar_k - alpha Hbar_k sum_{j<k} gbar_j - alpha sum_{j<k} Hbar_j gbar_k
    g_FOMAML  = L_k'(phi_k)
              = gbar_k - alpha Hbar_k sum_{j<k} gbar_j
    g_Reptile = (phi_1 - phi_{k+1}) / alpha = sum_i L_i'(phi_i)
              = sum_i gbar_i - alpha sum_i sum_{j<i} Hbar_i gbar_j

and, in expectation over the (exchangeable) minibatches, with
``AvgGrad = E[gbar]`` and ``AvgGradInner = E[Hbar_i gbar_j]`` (``i != j``)::

    E[g_MAML]    = AvgGrad - 2 (k-1) alpha AvgGradInner
    E[g_FOMAML]  = AvgGrad - (k-1) alpha AvgGradInner
    E[g_Reptile] = k AvgGrad - k (k-1) / 2 alpha AvgGradInner

Here the losses are general polynomials with symbolic coefficients; the exact
update is expanded in alpha (Taylor coefficients by SymPy), compared with the
paper's formula, and the expectation is realised exactly as the average over
all ``k!`` orderings of the minibatches (the symmetrisation that
exchangeability implies), compared with the AvgGrad / AvgGradInner form.
"""

from __future__ import annotations

import itertools
import math

import sympy as sp

from reference.symbolic._common import check_size
from reference.symbolic._derivation import Derivation, Step, SymbolTable, gradient

_ALGORITHMS = ("maml", "fomaml", "reptile")


def _monomials(dim: int, degree: int) -> list[tuple[int, ...]]:
    """Exponent tuples of total degree 1..degree (constants do not affect any gradient)."""
    out = []
    for total in range(1, degree + 1):
        for exps in itertools.product(range(total + 1), repeat=dim):
            if sum(exps) == total:
                out.append(exps)
    return out


def _build(algorithm: str, dim: int, steps: int, degree: int) -> Derivation:
    name = f"nichol-{algorithm}"
    dim = check_size(name, "dim", dim)
    steps = check_size(name, "steps", steps, minimum=2)
    degree = check_size(name, "degree", degree, minimum=2)
    k = steps
    t = SymbolTable()
    phi = t.vector("phi", dim, r"\phi")
    alpha = t.scalar("alpha", r"\alpha")
    monos = _monomials(dim, degree)
    coeffs: list[list[sp.Symbol]] = []
    losses: list[sp.Expr] = []
    for i in range(1, k + 1):
        row = []
        for e in monos:
            tag = "".join(str(x) for x in e)
            row.append(t.scalar(f"l{i}_{tag}", rf"\ell^{{({i})}}_{{{tag}}}"))
        coeffs.append(row)
        losses.append(sum((c * sp.Mul(*(v**p for v, p in zip(phi, e))) for c, e in zip(row, monos)), sp.Integer(0)))
        t.arrays[f"l{i}"] = sp.Matrix(row)
    phi_list = list(phi)

    def at(expr: sp.Expr, point: sp.Matrix) -> sp.Expr:
        return expr.xreplace(dict(zip(phi_list, point)))

    grads = [gradient(L, phi_list) for L in losses]  # gbar_i as functions of phi
    hessians = [sp.hessian(L, phi_list) for L in losses]
    iterates = [sp.Matrix(phi_list)]
    for i in range(k):
        p = iterates[-1]
        iterates.append(p - alpha * grads[i].xreplace(dict(zip(phi_list, p))))
    if algorithm == "maml":
        exact = gradient(at(losses[k - 1], iterates[k - 1]), phi_list)
    elif algorithm == "fomaml":
        exact = grads[k - 1].xreplace(dict(zip(phi_list, iterates[k - 1])))
    else:  # reptile: (phi_1 - phi_{k+1}) / alpha, i.e. the sum of the gradients along the path
        exact = sum((grads[i].xreplace(dict(zip(phi_list, iterates[i]))) for i in range(k)), sp.zeros(dim, 1))
    meta_loss = at(losses[k - 1], iterates[k - 1])
    # Taylor coefficients in alpha at 0 (everything is polynomial in alpha).
    c0 = exact.xreplace({alpha: 0}).applyfunc(sp.expand)
    c1 = exact.diff(alpha).xreplace({alpha: 0}).applyfunc(sp.expand)
    series = c0 + alpha * c1
    g, H = grads, hessians
    if algorithm == "maml":
        paper = g[k - 1] - alpha * H[k - 1] * sum((g[j] for j in range(k - 1)), sp.zeros(dim, 1)) \
            - alpha * sum((H[j] for j in range(k - 1)), sp.zeros(dim, dim)) * g[k - 1]
    elif algorithm == "fomaml":
        paper = g[k - 1] - alpha * H[k - 1] * sum((g[j] for j in range(k - 1)), sp.zeros(dim, 1))
    else:
        paper = sum(g, sp.zeros(dim, 1)) - alpha * sum(
            (H[i] * g[j] for i in range(k) for j in range(i)), sp.zeros(dim, 1))
    # Expectation over exchangeable minibatches = average over the k! orderings.
    perms = list(itertools.permutations(range(k)))

    def permute(obj: sp.Matrix, perm: tuple[int, ...]) -> sp.Matrix:
        mapping = {coeffs[i][m]: coeffs[perm[i]][m] for i in range(k) for m in range(len(monos))}
        return obj.xreplace(mapping)

    expected_series = (sum((permute(series, pm) for pm in perms), sp.zeros(dim, 1)) / len(perms)).applyfunc(sp.expand)
    avg_grad = sum(g, sp.zeros(dim, 1)) / k
    avg_grad_inner = sum((H[i] * g[j] for i in range(k) for j in range(k) if i != j), sp.zeros(dim, 1)) / (k * (k - 1))
    # Nichol's remark: Hbar_i gbar_j + Hbar_j gbar_i = d/dphi (gbar_i . gbar_j).
    inner_as_grad = sum((gradient((g[i].T * g[j])[0, 0], phi_list) for i in range(k) for j in range(i + 1, k)),
                        sp.zeros(dim, 1)) / (k * (k - 1))
    factor = {"maml": (1, 2 * (k - 1)), "fomaml": (1, k - 1), "reptile": (k, sp.Rational(k * (k - 1), 2))}[algorithm]
    expected_paper = factor[0] * avg_grad - factor[1] * alpha * avg_grad_inner

    sums = {
        "maml": (r"\bar{g}_{k} - \alpha \bar{H}_{k} \sum_{j<k} \bar{g}_{j} - \alpha \sum_{j<k} \bar{H}_{j} \bar{g}_{k} + O(\alpha^{2})",
                 "gbar_k - alpha Hbar_k sum_{j<k} gbar_j - alpha sum_{j<k} Hbar_j gbar_k + O(alpha^2)"),
        "fomaml": (r"\bar{g}_{k} - \alpha \bar{H}_{k} \sum_{j<k} \bar{g}_{j} + O(\alpha^{2})",
                   "gbar_k - alpha Hbar_k sum_{j<k} gbar_j + O(alpha^2)"),
        "reptile": (r"\sum_{i=1}^{k} \bar{g}_{i} - \alpha \sum_{i=1}^{k} \sum_{j<i} \bar{H}_{i} \bar{g}_{j} + O(\alpha^{2})",
                    "sum_i gbar_i - alpha sum_i sum_{j<i} Hbar_i gbar_j + O(alpha^2)"),
    }[algorithm]
    defn = {
        "maml": (r"\tfrac{\partial}{\partial \phi_{1}} L_{k}(\phi_{k})", "d/dphi_1 L_k(phi_k)"),
        "fomaml": (r"L_{k}'(\phi_{k})", "L_k'(phi_k)"),
        "reptile": (r"\left(\phi_{1} - \phi_{k+1}\right) / \alpha = \sum_{i=1}^{k} L_{i}'(\phi_{i})",
                    "(phi_1 - phi_{k+1}) / alpha = sum_i L_i'(phi_i)"),
    }[algorithm]
    f0 = "" if factor[0] == 1 else f"{factor[0]} "
    label = {"maml": "MAML", "fomaml": "FOMAML", "reptile": "Reptile"}[algorithm]
    g_tex = rf"g_{{\mathrm{{{label}}}}}"
    g_txt = f"g_{label}"
    poly_tex = (r"\sum_{m=1}^{%d} \ell^{(i)}_{m} \phi^{m}" % degree if dim == 1
                else rf"\sum_{{1 \le |e| \le {degree}}} \ell^{{(i)}}_{{e}} \phi^{{e}}")
    sym_steps = [
        Step(f"general polynomial losses, i = 1..{k} (symbolic coefficients)", (r"L_{i}(\phi)", "L_i(phi)"),
             (poly_tex, f"sum over monomials of degree 1..{degree} of l_i_e * phi^e")),
        Step("SGD on the minibatch losses in turn", (r"\phi_{i+1}", "phi_{i+1}"),
             (r"\phi_{i} - \alpha L_{i}'(\phi_{i}),\quad \phi_{1} = \phi", "phi_i - alpha L_i'(phi_i), phi_1 = phi")),
        Step("gradients and Hessians at the initial point", (r"\bar{g}_{i},\ \bar{H}_{i}", "gbar_i, Hbar_i"),
             (r"L_{i}'(\phi_{1}),\ L_{i}''(\phi_{1})", "L_i'(phi_1), L_i''(phi_1)")),
        Step(f"the update, k = {k}", (g_tex, g_txt), defn),
        Step("Nichol et al. 2018, section 5 (checked against the exact Taylor coefficients)", (g_tex, g_txt), sums),
        Step("Taylor expansion of the exact update to O(alpha^2)", (g_tex, g_txt), c0 + alpha * c1 if dim == 1 else series),
        Step("averaging over minibatch orderings; AvgGrad = E[gbar]", (rf"\mathbb{{E}}[{g_tex}]", f"E[{g_txt}]"),
             (rf"{f0}\mathrm{{AvgGrad}} - {sp.latex(factor[1])}\, \alpha\, \mathrm{{AvgGradInner}} + O(\alpha^{{2}})",
              f"{f0}AvgGrad - {factor[1]} alpha AvgGradInner + O(alpha^2)")),
        Step("with i != j (two distinct minibatches)", (r"\mathrm{AvgGradInner}", "AvgGradInner"),
             (r"\mathbb{E}\big[\bar{H}_{i} \bar{g}_{j}\big] = \tfrac{1}{2} \mathbb{E}\big[\tfrac{\partial}{\partial \phi} (\bar{g}_{i} \cdot \bar{g}_{j})\big]",
              "E[Hbar_i gbar_j] = 1/2 E[d/dphi (gbar_i . gbar_j)]")),
    ]
    return Derivation(
        name=name,
        params={"dim": dim, "steps": k, "degree": degree},
        title=f"Nichol et al. 2018 expansion of the {label} update",
        summary=(
            f"The {algorithm} update after k = {k} minibatch losses (general polynomials of degree {degree} in "
            f"{dim} variable(s)), exactly and as a series in alpha to O(alpha^2), compared with Nichol et al. 2018 "
            "section 5; the expected update (average over minibatch orderings) in terms of AvgGrad and AvgGradInner. "
            "meta_gradient is the exact update; extras hold the series and the paper's formulas."
            + ("" if algorithm == "maml" else " The update is not the gradient of meta_loss = L_k(phi_k).")
        ),
        symbols=t.symbols,
        arrays=t.arrays,
        wrt=[("phi", (dim,))],
        wrt_symbols=phi_list,
        meta_loss=meta_loss,
        meta_gradient=exact,
        steps=sym_steps,
        is_gradient=algorithm == "maml",
        extras={
            "iterates": iterates,
            "series": series,
            "paper_series": paper.applyfunc(sp.expand),
            "expected_series": expected_series,
            "expected_paper": expected_paper.applyfunc(sp.expand),
            "avg_grad": avg_grad,
            "avg_grad_inner": avg_grad_inner,
            "avg_grad_inner_as_gradient": inner_as_grad,
            "orderings": math.factorial(k),
        },
        latex_names=t.latex_names,
    )


def nichol_maml(dim: int = 1, steps: int = 2, degree: int = 3) -> Derivation:
    """MAML's update ``d/dphi_1 L_k(phi_k)`` expanded to O(alpha^2) (Nichol et al. 2018, section 5).

    ``steps`` is the paper's ``k`` (MAML takes ``k - 1`` inner steps and
    evaluates ``L_k``); ``degree`` the degree of the polynomial losses.
    """
    return _build("maml", dim, steps, degree)


def nichol_fomaml(dim: int = 1, steps: int = 2, degree: int = 3) -> Derivation:
    """FOMAML's update ``L_k'(phi_k)`` expanded to O(alpha^2) (Nichol et al. 2018, section 5)."""
    return _build("fomaml", dim, steps, degree)


def nichol_reptile(dim: int = 1, steps: int = 2, degree: int = 3) -> Derivation:
    """Reptile's update ``(phi_1 - phi_{k+1}) / alpha`` expanded to O(alpha^2) (Nichol et al. 2018, section 5)."""
    return _build("reptile", dim, steps, degree)
