"""Fast checks of the Nichol et al. 2018 section-5 derivations (reference/symbolic/_nichol.py) against NumPy.

Each derivation is built once per parameter set (0.01-0.3 s). An independent
NumPy implementation evaluates the same problem at a dyadic point (exact in
float64): the losses ``L_i(phi) = sum_e l^(i)_e phi^e`` over the monomials of
total degree ``1..degree`` (enumerated here, read off each coefficient's
documented name ``l{i}_{e}``), their gradients and Hessians by differentiating
monomials, ``k`` SGD steps, and

* MAML's update ``d/dphi L_k(phi_k)`` as the Jacobian product
  ``(I - alpha H_1) ... (I - alpha H_{k-1}) L_k'(phi_k)``, itself checked
  against a complex-step derivative of ``phi -> L_k(phi_k(phi))``;
  FOMAML's ``L_k'(phi_k)``, Reptile's ``(phi_1 - phi_{k+1}) / alpha``;
* the Taylor coefficients in alpha: ``c0`` the update at ``alpha = 0`` and
  ``c1`` a complex-step derivative in alpha (the update is a polynomial in alpha);
* the expectation over minibatch orderings, averaging the NumPy series over all
  ``k!`` permutations of the losses.

The derivation's meta-loss, update, displayed Taylor expansion and its
displayed ``E[g] = a AvgGrad - b alpha AvgGradInner`` (``a, b`` parsed from the
text and the LaTeX) must reproduce these numbers.
"""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import sympy as sp

from reference.errors import InvalidInputError
from reference.symbolic import PROBLEMS, derive, nichol_fomaml, nichol_maml, nichol_reptile

# Not cached across tests: the mutation runner selects tests by per-test coverage, and a derivation built
# once would be attributed to the first test only.
_derive = derive

#: (algorithm, dim, k, degree): the defaults, k = 3, quadratic losses, two variables.
CASES = [("maml", 1, 2, 3), ("fomaml", 1, 2, 3), ("reptile", 1, 2, 3), ("reptile", 1, 3, 2), ("maml", 1, 3, 2),
         ("fomaml", 2, 2, 2), ("maml", 2, 2, 2)]


def monomials(dim: int, degree: int) -> set[tuple[int, ...]]:
    """Exponent tuples of total degree 1..degree (by filtering all tuples with entries <= degree)."""
    return {e for e in itertools.product(range(degree + 1), repeat=dim) if 1 <= sum(e) <= degree}


class Losses:
    """The ``k`` polynomial losses in NumPy (complex-safe), from the derivation's coefficient arrays."""

    def __init__(self, d, values: dict[str, float]):
        self.k, self.dim = d.params["steps"], d.params["dim"]
        self.terms = []  # per loss: [(coefficient value, exponent array)]
        for i in range(1, self.k + 1):
            row = []
            for sym in d.arrays[f"l{i}"]:
                m = re.fullmatch(rf"l{i}_(\d+)", sym.name)
                assert m and len(m.group(1)) == self.dim, sym.name
                row.append((values[sym.name], np.array([int(c) for c in m.group(1)])))
            self.terms.append(row)

    def value(self, i, phi):
        return sum(c * np.prod(phi**e) for c, e in self.terms[i])

    def grad(self, i, phi):
        g = np.zeros(self.dim, dtype=complex if np.iscomplexobj(phi) else float)
        for c, e in self.terms[i]:
            for j in range(self.dim):
                if e[j]:
                    f = e.copy()
                    f[j] -= 1
                    g[j] += c * e[j] * np.prod(phi**f)
        return g

    def hess(self, i, phi):
        H = np.zeros((self.dim, self.dim), dtype=complex if np.iscomplexobj(phi) else float)
        for c, e in self.terms[i]:
            for j in range(self.dim):
                for m in range(self.dim):
                    f = e.copy()
                    a = f[j]
                    f[j] -= 1
                    b = f[m]
                    f[m] -= 1
                    if a and b:
                        H[j, m] += c * a * b * np.prod(phi**f)
        return H

    def path(self, phi, alpha, order):
        """phi_1..phi_{k+1} of SGD on the losses in ``order``."""
        out = [phi]
        for i in order:
            out.append(out[-1] - alpha * self.grad(i, out[-1]))
        return out

    def update(self, algorithm, phi, alpha, order=None):
        order = list(range(self.k)) if order is None else list(order)
        path = self.path(phi, alpha, order)
        if algorithm == "reptile":  # sum_i L_i'(phi_i) = (phi_1 - phi_{k+1}) / alpha, without the division
            return sum(self.grad(i, p) for i, p in zip(order, path[:-1]))
        g = self.grad(order[-1], path[self.k - 1])
        if algorithm == "fomaml":
            return g
        J = np.eye(self.dim)
        for i, p in zip(order[:-1], path[:-2]):
            J = (np.eye(self.dim) - alpha * self.hess(i, p)) @ J
        return J.T @ g

    def series(self, algorithm, phi, alpha, order=None):
        """c0 + alpha c1: c1 by a complex step in alpha (the update is a polynomial in alpha)."""
        h = 1e-30
        c0 = self.update(algorithm, phi, 0.0, order).real
        return c0 + alpha * self.update(algorithm, phi, 1j * h, order).imag / h


def point(d, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    vals = {n: int(rng.integers(-24, 25)) / 16 for n in d.symbols}
    vals["alpha"] = int(rng.integers(1, 5)) / 16
    return vals


def close(a, b, rtol=1e-12):
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    assert a.shape == b.shape and np.max(np.abs(a - b)) <= rtol * max(1.0, np.max(np.abs(b))), (a, b)


@pytest.mark.parametrize("algorithm, dim, k, degree", CASES)
def test_nichol_update_loss_series_and_expectation_against_numpy(algorithm, dim, k, degree):
    d = _derive(f"nichol-{algorithm}", dim=dim, steps=k, degree=degree)
    assert d.params == dict(dim=dim, steps=k, degree=degree)
    # The losses are general polynomials: one coefficient per monomial of degree 1..degree, nothing else.
    phi = list(d.arrays["phi"])
    assert [s.name for s in d.wrt_symbols] == (["phi"] if dim == 1 else [f"phi_{j}" for j in range(dim)]) == \
        [s.name for s in phi]
    expected = monomials(dim, degree)
    assert len(expected) == math.comb(dim + degree, dim) - 1
    for i in range(1, k + 1):
        tags = [s.name.split("_", 1)[1] for s in d.arrays[f"l{i}"]]
        assert sorted(tuple(int(c) for c in t) for t in tags) == sorted(expected) and len(set(tags)) == len(tags)
    assert len(d.symbols) == k * len(expected) + dim + 1
    alpha = d.symbols["alpha"]
    L_k = sp.Poly(d.meta_loss.xreplace({alpha: 0}), *phi)  # meta_loss = L_k(phi_k) and phi_k = phi at alpha = 0
    assert {m: c for m, c in L_k.terms()} == {tuple(int(c) for c in s.name.split("_", 1)[1]): s
                                               for s in d.arrays[f"l{k}"]}

    a_txt, b_txt, a_tex, b_tex = averaged_step_factors(d)
    assert (a_txt, b_txt) == (a_tex, b_tex)
    for seed in (0, 1):
        vals = point(d, seed)
        losses = Losses(d, vals)
        x, al = np.array([vals[s.name] for s in phi]), vals["alpha"]
        loss, update = d.evaluate(vals)
        assert loss.is_Rational
        path = losses.path(x, al, range(k))
        close(float(loss), losses.value(k - 1, path[k - 1]))  # meta_loss = L_k(phi_k)
        ours = losses.update(algorithm, x, al)
        close(update, ours)
        if algorithm == "reptile":
            close((path[0] - path[-1]) / al, ours)
        if algorithm == "maml":  # our Jacobian product is the gradient of phi -> L_k(phi_k(phi)) (complex step)
            cs = [losses.value(k - 1, losses.path(x + 1e-30j * np.eye(dim)[j], al, range(k))[k - 1]).imag / 1e-30
                  for j in range(dim)]
            close(ours, cs)
        subs = d.bind(vals)
        series = losses.series(algorithm, x, al)
        close(d.extras["series"].xreplace(subs), series)
        taylor = next(s for s in d.steps if s.label.startswith("Taylor expansion"))
        close(sp.Matrix(taylor.rhs).xreplace(subs), series)
        # E over orderings (all k! permutations of the minibatches) = a AvgGrad - b alpha AvgGradInner.
        orders = list(itertools.permutations(range(k)))
        mean = sum(losses.series(algorithm, x, al, order) for order in orders) / len(orders)
        g = [losses.grad(i, x) for i in range(k)]
        H = [losses.hess(i, x) for i in range(k)]
        avg_grad = sum(g) / k
        avg_inner = sum(H[i] @ g[j] for i in range(k) for j in range(k) if i != j) / (k * (k - 1))
        close(mean, float(a_txt) * avg_grad - float(b_txt) * al * avg_inner)
        close(d.extras["expected_series"].xreplace(subs), mean)


def averaged_step_factors(d):
    """``a, b`` of the displayed ``E[g] = a AvgGrad - b alpha AvgGradInner + O(alpha^2)`` (text, LaTeX).

    A factor ``a = 1`` is not written (the paper's ``AvgGrad - ...``).
    """
    step = next(s for s in d.steps if s.label.startswith("averaging over minibatch orderings"))
    tex, txt = step.rhs
    m = re.fullmatch(r"(?:(\d+) )?AvgGrad - (\d+) alpha AvgGradInner \+ O\(alpha\^2\)", txt)
    m_tex = re.fullmatch(r"(?:(\d+) )?\\mathrm\{AvgGrad\} - (\d+)\\, \\alpha\\, \\mathrm\{AvgGradInner\} "
                         r"\+ O\(\\alpha\^\{2\}\)", tex)
    assert m and m_tex, (txt, tex)
    assert m.group(1) != "1" and m_tex.group(1) != "1", "a unit factor before AvgGrad is written out"
    return int(m.group(1) or 1), int(m.group(2)), int(m_tex.group(1) or 1), int(m_tex.group(2))


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile"])
def test_only_maml_is_the_gradient_of_the_meta_loss(algorithm):
    """``is_gradient`` and the summary's note are true: FOMAML's and Reptile's updates are not d meta_loss / d phi."""
    d = _derive(f"nichol-{algorithm}", dim=1, steps=2, degree=3)
    vals = point(d, 3)
    losses = Losses(d, vals)
    x, al = np.array([vals["phi"]]), vals["alpha"]
    grad_of_loss = losses.value(1, losses.path(x + 1e-30j, al, range(2))[1]).imag / 1e-30
    gap = abs(float(d.evaluate(vals)[1][0]) - grad_of_loss)
    note = "The update is not the gradient of meta_loss = L_k(phi_k)."
    if algorithm == "maml":
        assert d.is_gradient and note not in d.summary and gap <= 1e-12 * max(1, abs(grad_of_loss))
    else:
        assert not d.is_gradient and d.summary.endswith(note) and gap > 1e-3


@pytest.mark.parametrize("dim", [1, 2])
def test_displayed_loss_family(dim):
    d = _derive("nichol-fomaml", dim=dim, steps=2, degree=2)
    step = d.steps[0]
    assert step.lhs == (r"L_{i}(\phi)", "L_i(phi)")
    tex, txt = step.rhs
    assert txt == "sum over monomials of degree 1..2 of l_i_e * phi^e"
    if dim == 1:  # one variable: the powers phi^1 .. phi^degree
        assert tex == r"\sum_{m=1}^{2} \ell^{(i)}_{m} \phi^{m}"
    else:  # a multi-index e with 1 <= |e| <= degree
        assert tex == r"\sum_{1 \le |e| \le 2} \ell^{(i)}_{e} \phi^{e}"


@pytest.mark.parametrize("constructor", [nichol_maml, nichol_fomaml, nichol_reptile])
def test_sizes_below_the_minimum_are_refused(constructor):
    """k >= 2 (AvgGradInner needs two distinct minibatches) and degree >= 2 (linear losses have no Hbar term)."""
    with pytest.raises(InvalidInputError, match=r"steps=1 must be >= 2"):
        constructor(steps=1)
    with pytest.raises(InvalidInputError, match=r"degree=1 must be >= 2"):
        constructor(degree=1)
    with pytest.raises(InvalidInputError, match=r"dim=0 must be >= 1"):
        constructor(dim=0)


def test_default_sizes():
    """``metaverify derive nichol-*`` without sizes: one variable, k = 2 minibatches, cubic losses."""
    for name in ("nichol-maml", "nichol-fomaml", "nichol-reptile"):
        assert PROBLEMS[name].sizes == dict(dim=1, steps=2, degree=3)
    # the constructors' own defaults (what a Python caller gets) are the same problems
    for build in (nichol_maml, nichol_fomaml, nichol_reptile):
        assert build().text() == build(dim=1, steps=2, degree=3).text(), build.__name__
