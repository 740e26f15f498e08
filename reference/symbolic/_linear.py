"""Exact MAML on linear regression and ANIL on a two-layer linear network, symbolic data.

Both models are CONVENTIONS MLPs with identity activation and the ``mse``
loss (mean of squared errors), so the NumPy reference runs on
``MLP([dim, 1], activation="identity")`` and
``MLP([1, dim, 1], activation="identity")`` with the same parameter layout.
"""

from __future__ import annotations

import sympy as sp

from reference.symbolic._common import check_size, require_bool
from reference.symbolic._derivation import Derivation, Step, SymbolTable, flat_symbols, gradient


def _frac(num: int, den: int) -> tuple[str, str]:
    """``num/den`` as a LaTeX and a text coefficient ("" when it is 1)."""
    r = sp.Rational(num, den)
    if r == 1:
        return "", ""
    tex = str(r.p) if r.q == 1 else rf"\tfrac{{{r.p}}}{{{r.q}}}"
    return tex + " ", f"{r} "


def _power(tex: str, txt: str, k: int) -> tuple[str, str]:
    return (rf"\left({tex}\right)", f"({txt})") if k == 1 else (rf"\left({tex}\right)^{{{k}}}", f"({txt})**{k}")


def _mse(pred: sp.Matrix, y: sp.Matrix) -> sp.Expr:
    r = pred - y
    return sum((e**2 for e in r), sp.Integer(0)) / len(r)


def linear_regression_maml(dim: int = 1, steps: int = 1, shots: int = 2, queries: int = 2,
                           bias: bool = True) -> Derivation:
    """MAML on one linear-regression task with symbolic data (Finn et al. 2017, section 5.1 setting).

    Model ``f(x) = x W^T + b`` (the MLP ``[dim, 1]``, parameters ``[W, b]``,
    ``W`` of shape ``(1, dim)``), loss ``mse``. With ``X~ = [X, 1]`` the
    support loss has gradient ``(2/n) X~^T (X~ p - y)`` and constant Hessian
    ``H_s = (2/n) X~^T X~``; MAML's meta-gradient is ``(I - alpha H_s)^K grad L_q(p_K)``.

    Symbols: ``w`` (``dim=1``) or ``w_j``; ``b`` (if ``bias``); ``alpha``;
    support inputs ``x_s_i`` (``dim=1``) or ``x_s_i_j``, targets ``y_s_i``;
    query ``x_q_*``, ``y_q_*``. ``shots``/``queries``: support/query sizes.
    """
    name = "linear-regression-maml"
    dim = check_size(name, "dim", dim)
    steps = check_size(name, "steps", steps)
    shots = check_size(name, "shots", shots)
    queries = check_size(name, "queries", queries)
    bias = require_bool("bias", bias)
    t = SymbolTable()
    W = sp.Matrix([[t.scalar("w", "w") if dim == 1 else t.scalar(f"w_{j}", f"w_{{{j}}}") for j in range(dim)]])
    t.arrays["W"] = W
    b = t.vector("b", 1, "b") if bias else None
    alpha = t.scalar("alpha", r"\alpha")
    data = {}
    for role, n in (("s", shots), ("q", queries)):
        X = (t.vector(f"x_{role}", n, f"x^{{({role})}}", array=f"x_{role}") if dim == 1
             else t.matrix(f"x_{role}", n, dim, f"x^{{({role})}}", scalar_if_1x1=False))
        y = t.vector(f"y_{role}", n, f"y^{{({role})}}", array=f"y_{role}")
        data[role] = (sp.Matrix(X).reshape(n, dim), y)
    params = flat_symbols(W) + ([b[0]] if bias else [])
    n_p = len(params)

    def design(X: sp.Matrix) -> sp.Matrix:
        return X.row_join(sp.ones(X.shape[0], 1)) if bias else X

    def predict(p: sp.Matrix, X: sp.Matrix) -> sp.Matrix:
        return design(X) * p

    Xs, ys = data["s"]
    Xq, yq = data["q"]
    Ds, Dq = design(Xs), design(Xq)
    H_s = 2 * Ds.T * Ds / shots
    iterates = [sp.Matrix(params)]
    for _ in range(steps):
        p = iterates[-1]
        iterates.append(p - alpha * 2 * Ds.T * (Ds * p - ys) / shots)
    p_K = iterates[-1]
    meta_loss = _mse(predict(p_K, Xq), yq)
    grad = gradient(meta_loss, params)
    grad_q = 2 * Dq.T * (Dq * p_K - yq) / queries
    chain = (sp.eye(n_p) - alpha * H_s) ** steps * grad_q
    xt = r"\tilde{X}" if bias else "X"
    xt_txt = "X1" if bias else "X"
    fs, fq, f2s, f2q = _frac(1, shots), _frac(1, queries), _frac(2, shots), _frac(2, queries)
    pw = _power(r"I - \alpha H_{s}", "I - alpha H_s", steps)
    p_tex, p_txt = (r"\left(W, b\right)", "(W, b)") if bias else ("W", "W")
    sym_steps = [
        Step("model (MLP [d, 1], identity)" + ("; X1 = [X, 1]" if bias else ""), ("f(x)", "f(x)"),
             (r"x W^{\top} + b" if bias else r"x W^{\top}", "x W^T + b" if bias else "x W^T")),
        Step("support loss (mse)", (r"L_{s}(p)", "L_s(p)"),
             (rf"{fs[0]}\lVert {xt}_{{s}} p - y_{{s}} \rVert^{{2}}", f"{fs[1]}||{xt_txt}_s p - y_s||^2")),
        Step("its gradient", (r"\nabla L_{s}(p)", "grad L_s(p)"),
             (rf"{f2s[0]}{xt}_{{s}}^{{\top}} \left({xt}_{{s}} p - y_{{s}}\right)",
              f"{f2s[1]}{xt_txt}_s^T ({xt_txt}_s p - y_s)")),
        Step("constant Hessian", (r"H_{s}", "H_s"), H_s),
        Step("inner steps from the initialisation", (r"p_{k+1}", "p_{k+1}"),
             (rf"p_{{k}} - \alpha \nabla L_{{s}}(p_{{k}}),\quad p_{{0}} = {p_tex}", f"p_k - alpha grad L_s(p_k), p_0 = {p_txt}")),
        Step("meta-loss", (r"\mathcal{L}", "L"),
             (rf"{fq[0]}\lVert {xt}_{{q}} p_{{{steps}}} - y_{{q}} \rVert^{{2}}",
              f"{fq[1]}||{xt_txt}_q p_{steps} - y_q||^2")),
        Step("chain rule", (r"\nabla \mathcal{L}", "grad L"),
             (rf"{pw[0]} {f2q[0]}{xt}_{{q}}^{{\top}} \left({xt}_{{q}} p_{{{steps}}} - y_{{q}}\right)",
              f"{pw[1]} {f2q[1]}{xt_txt}_q^T ({xt_txt}_q p_{steps} - y_q)")),
        Step("explicitly", (r"\nabla \mathcal{L}", "grad L"), chain),
    ]
    wrt = [("W", (1, dim))] + ([("b", (1,))] if bias else [])
    return Derivation(
        name=name,
        params={"dim": dim, "steps": steps, "shots": shots, "queries": queries, "bias": bias},
        title="MAML on linear regression with symbolic data",
        summary=(
            f"MAML with K = {steps} inner steps on a {shots}-shot linear-regression task (model x W^T"
            f"{' + b' if bias else ''}, mse loss, symbolic inputs and targets), meta-loss on {queries} query points."
        ),
        symbols=t.symbols,
        arrays=t.arrays,
        wrt=wrt,
        wrt_symbols=params,
        meta_loss=meta_loss,
        meta_gradient=grad,
        steps=sym_steps,
        extras={"iterates": iterates, "hessian_support": H_s, "chain_rule_gradient": chain},
        latex_names=t.latex_names,
    )


def anil_linear(dim: int = 2, steps: int = 1, shots: int = 2, queries: int = 1) -> Derivation:
    """ANIL (Raghu et al. 2020) on a two-layer linear network with scalar input and output.

    Model ``f(x) = (x W1^T + b1) W2^T + b2`` (the MLP ``[1, dim, 1]`` with
    identity activation; ``dim`` is the hidden width), loss ``mse``. Only the
    head ``(W2, b2)`` adapts: ``h_{k+1} = h_k - alpha grad_h L_s(body, h_k)``.
    The meta-gradient is exact with respect to all four tensors: the body part
    ``d/d(W1, b1) L_q(body, h_K(body))`` carries the body/head cross second
    derivatives ``d^2 L_s / d body d h`` of the inner steps.

    Symbols: ``W1_i_0, b1_i, W2_0_i, b2`` (``i < dim``), ``alpha``, data
    ``x_s_i, y_s_i, x_q_i, y_q_i``.
    """
    name = "anil-linear"
    dim = check_size(name, "dim", dim)
    steps = check_size(name, "steps", steps)
    shots = check_size(name, "shots", shots)
    queries = check_size(name, "queries", queries)
    t = SymbolTable()
    W1 = t.matrix("W1", dim, 1, "W^{(1)}", scalar_if_1x1=False)
    b1 = sp.Matrix([t.scalar(f"b1_{i}", f"b^{{(1)}}_{{{i}}}") for i in range(dim)])
    t.arrays["b1"] = b1
    W2 = t.matrix("W2", 1, dim, "W^{(2)}", scalar_if_1x1=False)
    b2 = t.vector("b2", 1, "b^{(2)}")
    alpha = t.scalar("alpha", r"\alpha")
    data = {}
    for role, n in (("s", shots), ("q", queries)):
        data[role] = (t.vector(f"x_{role}", n, f"x^{{({role})}}"), t.vector(f"y_{role}", n, f"y^{{({role})}}"))
    body = flat_symbols(W1) + list(b1)
    head0 = flat_symbols(W2) + [b2[0]]

    def features(x: sp.Matrix) -> sp.Matrix:  # (n, dim)
        return x * W1.T + sp.ones(x.shape[0], 1) * b1.T

    def loss(head: sp.Matrix, x: sp.Matrix, y: sp.Matrix) -> sp.Expr:
        Z = features(x).row_join(sp.ones(x.shape[0], 1))  # head acts linearly on [z, 1]
        return _mse(Z * head, y)

    xs, ys = data["s"]
    xq, yq = data["q"]
    Zs = features(xs).row_join(sp.ones(shots, 1))
    heads = [sp.Matrix(head0)]
    for _ in range(steps):
        h = heads[-1]
        heads.append(h - alpha * 2 * Zs.T * (Zs * h - ys) / shots)
    meta_loss = loss(heads[-1], xq, yq)
    params = body + head0
    grad = gradient(meta_loss, params)
    # Cross second derivative d/d body of grad_h L_s, the term ANIL's body gradient relies on.
    hsym = sp.Matrix(sp.symbols(f"h0:{dim + 1}", real=True))
    grad_h_Ls = gradient(loss(hsym, xs, ys), list(hsym))
    cross = grad_h_Ls.jacobian(body).xreplace(dict(zip(hsym, head0)))
    sym_steps = [
        Step("two-layer linear model (MLP [1, d, 1], identity)", ("f(x)", "f(x)"),
             (r"\left(x W_{1}^{\top} + b_{1}\right) W_{2}^{\top} + b_{2}", "(x W1^T + b1) W2^T + b2")),
        Step("support loss (mse); head h = (W2, b2), body = (W1, b1)", (r"L_{s}(\text{body}, h)", "L_s(body, h)"),
             (rf"{_frac(1, shots)[0]}\sum_{{i}} \left(f(x^{{(s)}}_{{i}}) - y^{{(s)}}_{{i}}\right)^{{2}}",
              f"{_frac(1, shots)[1]}sum_i (f(x_s_i) - y_s_i)^2")),
        Step("ANIL inner loop: only the head adapts", (r"h_{k+1}", "h_{k+1}"),
             (r"h_{k} - \alpha \nabla_{h} L_{s}(\text{body}, h_{k}),\quad h_{0} = (W_{2}, b_{2})",
              "h_k - alpha grad_h L_s(body, h_k), h_0 = (W2, b2)")),
        Step("meta-loss", (r"\mathcal{L}", "L"), (rf"L_{{q}}(\text{{body}}, h_{{{steps}}})", f"L_q(body, h_{steps})")),
        Step("body gradient: direct term plus the path through the head",
             (r"\nabla_{\text{body}} \mathcal{L}", "grad_body L"),
             (rf"\partial_{{\text{{body}}}} L_{{q}} + \left(\tfrac{{\partial h_{{{steps}}}}}{{\partial \text{{body}}}}\right)^{{\top}} \nabla_{{h}} L_{{q}}",
              f"d_body L_q + (dh_{steps}/dbody)^T grad_h L_q")),
        Step("with the cross term of the inner step", (r"\tfrac{\partial h_{k+1}}{\partial \text{body}}", "dh_{k+1}/dbody"),
             (r"\left(I - \alpha \nabla^{2}_{hh} L_{s}\right) \tfrac{\partial h_{k}}{\partial \text{body}} - \alpha \nabla^{2}_{h\,\text{body}} L_{s}",
              "(I - alpha d2L_s/dh dh) dh_k/dbody - alpha d2L_s/dh dbody")),
        Step("cross second derivatives at h_0", (r"\nabla^{2}_{h\,\text{body}} L_{s}", "d2L_s/dh dbody"),
             cross.applyfunc(sp.expand)),
        Step("explicitly, [W1, b1, W2, b2]", (r"\nabla \mathcal{L}", "grad L"), grad),
    ]
    wrt = [("W1", (dim, 1)), ("b1", (dim,)), ("W2", (1, dim)), ("b2", (1,))]
    return Derivation(
        name=name,
        params={"dim": dim, "steps": steps, "shots": shots, "queries": queries},
        title="ANIL on a two-layer linear network",
        summary=(
            f"ANIL (Raghu et al. 2020): K = {steps} inner steps on the head (W2, b2) of a 1-{dim}-1 linear network "
            f"({shots} support, {queries} query points, mse); the exact meta-gradient with respect to the body "
            "(W1, b1) flows through the adapted head and contains the body/head cross second derivatives."
        ),
        symbols=t.symbols,
        arrays=t.arrays,
        wrt=wrt,
        wrt_symbols=params,
        meta_loss=meta_loss,
        meta_gradient=grad,
        steps=sym_steps,
        extras={"heads": heads, "cross_hessian_support": cross, "body_gradient": grad[: len(body), :]},
        latex_names=t.latex_names,
    )
