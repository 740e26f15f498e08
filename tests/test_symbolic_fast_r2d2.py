"""Fast checks of the symbolic R2-D2 head (``r2d2-ridge``) against an independent NumPy head.

Each case builds its derivation once (well under a second at these sizes) and checks many
properties, so the mutation runner's per-mutant budget reaches it (issue 19). Independent sources:

* the ridge head written out here in NumPy, in the primal form ``(Z^T Z + lam I)^{-1} Z^T Y`` by
  ``np.linalg.solve`` (the derivation uses the dual form and an adjugate), with CONVENTIONS' R2-D2
  options (ones column, ``1/sqrt(n)`` normalisation, ce or mse loss), and its gradient by complex step;
* the displayed derivative steps, evaluated through the derivation's intermediates, against that gradient;
* the docstring and CONVENTIONS for what the title, summary and steps must say for each option;
* the NumPy reference's own domain (``reference.r2d2``: ``lam > 0``, at least 2 classes).
"""

from __future__ import annotations

import functools
import itertools
import re

import numpy as np
import pytest
import sympy as sp

from reference.errors import InvalidInputError
from reference.symbolic import r2d2_ridge

# Not cached across tests: the mutation runner selects tests by the coverage of each test, and a
# derivation built once (lru_cache, module fixture) would be attributed to the first test only.
_r2d2 = r2d2_ridge


def numpy_head(theta, xs, xq, ys, yq, *, dim, bias_column, normalize, regression, classes):
    """Meta-loss of R2-D2 at ``theta = [W (C order), lam, scale, offset]`` (complex-step safe: no conj, no abs)."""
    W = theta[: dim * dim].reshape(dim, dim)
    lam, scale, offset = theta[dim * dim:]
    Zs, Zq = xs @ W.T, xq @ W.T
    if bias_column:
        Zs = np.hstack([Zs, np.ones((len(xs), 1))])
        Zq = np.hstack([Zq, np.ones((len(xq), 1))])
    Y = ys.reshape(-1, 1) if regression else np.eye(classes)[ys]
    if normalize:
        Zs, Y = Zs / np.sqrt(len(xs)), Y / np.sqrt(len(xs))
    Wr = np.linalg.solve(Zs.T @ Zs + lam * np.eye(Zs.shape[1]), Zs.T @ Y)  # primal form
    O = scale * Zq @ Wr + offset
    if regression:
        return np.mean((O[:, 0] - yq) ** 2)
    return np.mean(np.log(np.sum(np.exp(O), axis=1)) - O[np.arange(len(xq)), yq])


def complex_step_gradient(f, theta, h=1e-30):
    out = np.empty(theta.size)
    for i in range(theta.size):
        e = np.zeros(theta.size, dtype=complex)
        e[i] = 1j * h
        out[i] = f(theta + e).imag / h
    return out


def _steps(text: str) -> dict[str, str]:
    """``label -> formula line`` from :meth:`Derivation.text`."""
    lines = text.splitlines()
    return {lines[i].strip()[2:]: lines[i + 1].strip() for i in range(len(lines) - 1) if lines[i].startswith("  # ")}


# Every combination of the three options (the issue asks for all of them); the sizes vary so that
# one query (no 1/q factor) and two (mean over queries), 2 and 3 classes, dim 1 and 2 all occur.
CASES = [dict(bias_column=b, normalize=n, regression=r, dim=2 if (b + n + r) % 2 else 1, shots=2,
              queries=1 + (b ^ r), classes=2 + n)
         for b, n, r in itertools.product([False, True], repeat=3)]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(k for k in ("bias_column", "normalize", "regression")
                                                                if kw[k]) or "plain")
def test_meta_loss_gradient_and_displayed_steps_against_a_numpy_head(kw):
    d = _r2d2(**kw)
    dim, n, q, c = kw["dim"], kw["shots"], kw["queries"], kw["classes"]
    bias, norm, reg = kw["bias_column"], kw["normalize"], kw["regression"]
    rng = np.random.default_rng(7 + 3 * dim + q)
    W = rng.integers(-8, 9, size=(dim, dim)) / 8
    xs, xq = rng.integers(-8, 9, size=(n, dim)) / 8, rng.integers(-8, 9, size=(q, dim)) / 8
    lam, scale, offset = 0.625, 1.375, -0.75
    values = dict(W=W, x_s=xs, x_q=xq, lam=lam, scale=scale, offset=offset)
    if reg:
        ys, yq = rng.integers(-8, 9, size=n) / 8, rng.integers(-8, 9, size=q) / 8
        values.update(y_s=ys, y_q=yq)
    else:  # the documented fixed labels: example i has class i % classes
        ys, yq = np.arange(n) % c, np.arange(q) % c
        assert d.extras["support_labels"] == list(ys) and d.extras["query_labels"] == list(yq)
    theta = np.r_[W.ravel(), lam, scale, offset]
    f = functools.partial(numpy_head, xs=xs, xq=xq, ys=ys, yq=yq, dim=dim, bias_column=bias, normalize=norm,
                          regression=reg, classes=c)
    expected_loss, expected_grad = f(theta), complex_step_gradient(f, theta)

    assert d.wrt == [("W", (dim, dim)), ("lam", ()), ("scale", ()), ("offset", ())]
    loss, grad = d.evaluate(values, digits=30)
    assert float(loss) == pytest.approx(expected_loss, rel=1e-13)
    np.testing.assert_allclose(np.array(grad, dtype=float).ravel(), expected_grad, rtol=1e-12, atol=1e-14)
    if not reg:  # softmax is shift invariant: the offset derivative vanishes
        assert abs(expected_grad[-1]) < 1e-13

    # the displayed derivative steps are the gradient's entries (through the intermediates)
    subs = d.bind(values)
    for sym, expr in d.definitions:
        subs[sym] = expr.xreplace(subs)

    def shown(label):
        (step,) = [s for s in d.steps if s.label == label]
        return np.array(sp.Matrix([step.rhs]).xreplace(subs).applyfunc(lambda e: sp.N(e, 30)), dtype=float).ravel()

    np.testing.assert_allclose(shown("derivative in lam through the chain of intermediates"), expected_grad[-3], rtol=1e-12)
    np.testing.assert_allclose(shown("derivative in scale"), expected_grad[-2], rtol=1e-12)
    offset_label = "derivative in offset" + ("" if reg else " (softmax is shift invariant)")
    np.testing.assert_allclose(shown(offset_label), expected_grad[-1], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(shown("backbone gradient (Z_s = X_s W^T, Z_q = X_q W^T)"), expected_grad[:-3],
                               rtol=1e-12, atol=1e-14)
    # the push-through identity on a generic matrix of the features' shape: (Z^T Z + lam I) Z^T = Z^T (Z Z^T + lam I)
    residual = d.extras["push_through_residual"]
    assert residual.shape == d.extras["support_features"].T.shape == (dim + bias, n)
    assert residual.applyfunc(sp.expand) == sp.zeros(dim + bias, n)

    # what the title, summary and steps say, option by option (docstring, CONVENTIONS)
    assert d.title.endswith(" (regression)") == reg
    assert ("regression targets" in d.summary) == reg and (f"{c} classes, one-hot" in d.summary) == (not reg)
    assert f"the query loss ({'mse' if reg else 'ce'}) on {q} example(s)" in d.summary
    text, tex = d.text(), d.latex()
    steps = _steps(text)
    features = "support features (linear backbone, no bias)" + ("; ones column appended" if bias else "")
    assert steps[features] == "Z = " + ("1/sqrt(n) " if norm else "") + ("[X_s W^T, 1]" if bias else "X_s W^T")
    targets = steps["targets" + (" (normalised)" if norm else "")]
    assert targets == "Y = " + ("1/sqrt(n) " if norm else "") + ("y_s" if reg else "onehot(labels)")
    logits = steps["query " + ("predictions" if reg else "logits")]
    assert logits == "O = scale * [X_q W^T" + (", 1" if bias else "") + "] W_r + offset"
    loss_text = steps[f"meta-loss ({'mse' if reg else 'ce'})"]
    assert loss_text == f"L = 1/{q} sum_i " + ("(O_i - y_q_i)^2" if reg else "(logsumexp(O_i) - O_i[y_i])")
    assert (r"\mathbf{1}" in tex) == bias and tex.count(r"\tfrac{1}{\sqrt{n}}") == 2 * norm
    (loss_line,) = [line for line in tex.splitlines() if line.startswith(r"\mathcal{L} &= ")]
    # the mean over q queries: a 1/q factor in front, none for a single query
    assert loss_line.startswith(r"\mathcal{L} &= " + (rf"\tfrac{{1}}{{{q}}} " if q > 1 else r"\sum"))
    assert (r"\log \sum_{c} e^{O_{ic}}" in loss_line) == (not reg) and (r"y^{(q)}_{i}" in loss_line) == reg
    assert re.search(r"(?<!\\)_(?!\{)", tex) is None  # every LaTeX subscript braced


def test_defaults_sizes_names_and_domains():
    d = r2d2_ridge()
    # the documented interface: `derive r2d2-ridge` builds the plain 2-class problem (--list shows the sizes)
    assert d.params == dict(dim=2, shots=2, queries=1, classes=2, bias_column=False, normalize=False, regression=False)
    # symbol names of the docstring, indexed even for 1x1 arrays
    d1 = _r2d2(dim=1, shots=1, queries=1, classes=2)
    assert list(d1.symbols) == ["W_0_0", "x_s_0_0", "x_q_0_0", "lam", "scale", "offset"]
    # lam > 0 (the NumPy reference refuses lam <= 0); scale and offset are real
    assert (d1.symbols["lam"] > 0) is sp.true
    assert d1.symbols["scale"].is_real and d1.symbols["offset"].is_real
    # a classification head needs two classes (the NumPy reference requires n_classes >= 2 too)
    with pytest.raises(InvalidInputError, match="classes=1"):
        r2d2_ridge(dim=1, shots=1, classes=1)
