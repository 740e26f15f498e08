"""Exact R2-D2 (Bertinetto et al. 2019) ridge-regression head on a linear backbone.

The backbone is the MLP ``[dim, dim]`` without bias (``Z = X W^T``, identity
"activation"), so the NumPy reference runs on
``MLP([dim, dim], activation="identity", bias=False)``. The ridge weights
are built in the dual (Woodbury) form, whose inverse is only ``shots x shots``;
the primal form is shown equal by the push-through identity.
"""

from __future__ import annotations

import sympy as sp

from reference.symbolic._common import check_size, require_bool
from reference.symbolic._derivation import Derivation, Step, SymbolTable, chain_gradient, flat_symbols


def ridge_weights(Z: sp.Matrix, Y: sp.Matrix, lam: sp.Expr, form: str) -> sp.Matrix:
    """``(Z^T Z + lam I)^{-1} Z^T Y`` (primal) or ``Z^T (Z Z^T + lam I)^{-1} Y`` (dual), exactly.

    The inverse is taken by the adjugate (exact rational functions; fine for
    the small symbolic sizes used here, or for numeric rational matrices).
    """
    if form == "primal":
        return (Z.T * Z + lam * sp.eye(Z.shape[1])).inv(method="ADJ") * Z.T * Y
    if form == "dual":
        return Z.T * (Z * Z.T + lam * sp.eye(Z.shape[0])).inv(method="ADJ") * Y
    raise ValueError(f"form={form!r} must be 'primal' or 'dual'")


def _mean(n: int) -> str:
    return "" if n == 1 else rf"\tfrac{{1}}{{{n}}} "


def _logsumexp(row: list[sp.Expr]) -> sp.Expr:
    return sp.log(sum((sp.exp(v) for v in row), sp.Integer(0)))


def r2d2_ridge(dim: int = 2, shots: int = 2, queries: int = 1, classes: int = 2, *, bias_column: bool = False,
               normalize: bool = False, regression: bool = False) -> Derivation:
    """R2-D2's differentiable ridge head with symbolic ``lam``, ``scale``, ``offset`` (CONVENTIONS).

    Support features ``Z = X_s W^T`` (``n = shots`` rows, ``dim`` features;
    a ones column appended if ``bias_column``), one-hot labels ``Y``
    (classification) or targets ``y_s`` (``regression=True``); with
    ``normalize`` both are divided by ``sqrt(n)``. Ridge weights
    ``W_r = Z^T (Z Z^T + lam I)^{-1} Y`` (equal to the primal
    ``(Z^T Z + lam I)^{-1} Z^T Y``); query logits ``scale * Z_q W_r + offset``
    and the ``ce`` loss (or predictions and ``mse``). Meta-gradient layout
    ``[W, lam, scale, offset]``.

    Labels are fixed: support example ``i`` has class ``i % classes``, query
    example ``i`` class ``i % classes`` (``extras["support_labels"]``,
    ``extras["query_labels"]``). Symbols: ``W_i_j`` (backbone), ``x_s_i_j``,
    ``x_q_i_j``, ``lam``, ``scale``, ``offset`` (and ``y_s_i``, ``y_q_i`` for
    regression).
    """
    name = "r2d2-ridge"
    dim = check_size(name, "dim", dim)
    shots = check_size(name, "shots", shots)
    queries = check_size(name, "queries", queries)
    classes = check_size(name, "classes", classes, minimum=2)
    bias_column = require_bool("bias_column", bias_column)
    normalize = require_bool("normalize", normalize)
    regression = require_bool("regression", regression)
    t = SymbolTable()
    W = t.matrix("W", dim, dim, "W", scalar_if_1x1=False)
    Xs = t.matrix("x_s", shots, dim, "x^{(s)}", scalar_if_1x1=False)
    Xq = t.matrix("x_q", queries, dim, "x^{(q)}", scalar_if_1x1=False)
    lam = t.scalar("lam", r"\lambda", positive=True)
    scale = t.scalar("scale", r"\alpha_{\mathrm{s}}")
    offset = t.scalar("offset", r"\beta_{\mathrm{o}}")
    support_labels = [i % classes for i in range(shots)]
    query_labels = [i % classes for i in range(queries)]
    if regression:
        Y = t.vector("y_s", shots, "y^{(s)}", array="y_s")
        yq = t.vector("y_q", queries, "y^{(q)}", array="y_q")
    else:
        Y = sp.Matrix(shots, classes, lambda i, j: 1 if support_labels[i] == j else 0)
        yq = None

    # The computation is kept as a chain of small named intermediates
    # (features, Gram matrix, its inverse, ridge weights, logits) and
    # differentiated by symbolic reverse mode over that chain (chain_gradient):
    # the fully substituted expression is the same function but SymPy needs
    # minutes to differentiate it.
    defs: list[tuple[sp.Symbol, sp.Expr]] = []
    names: dict[sp.Symbol, str] = dict(t.latex_names)

    def define(sym_name: str, tex: str, expr: sp.Expr) -> sp.Symbol:
        sym = sp.Symbol(sym_name)  # no assumptions: assumption queries on exp/log dominate otherwise
        defs.append((sym, expr))
        names[sym] = tex
        return sym

    def feature_block(X: sp.Matrix, tag: str) -> sp.Matrix:
        F = X * W.T
        return sp.Matrix(X.shape[0], dim, lambda i, j: define(f"Z{tag}_{i}_{j}", f"Z^{{({tag})}}_{{{i}{j}}}", F[i, j]))

    def with_ones(Zm: sp.Matrix) -> sp.Matrix:
        return Zm.row_join(sp.ones(Zm.shape[0], 1)) if bias_column else Zm

    Zs_sym = feature_block(Xs, "s")
    Zq_sym = feature_block(Xq, "q")
    Z = with_ones(Zs_sym)
    Zq = with_ones(Zq_sym)
    Yn = Y
    if normalize:
        Z = Z / sp.sqrt(shots)
        Yn = Y / sp.sqrt(shots)
    gram = Z * Z.T + lam * sp.eye(shots)
    G_entries: dict[tuple[int, int], sp.Symbol] = {}
    for i in range(shots):
        for j in range(i, shots):
            G_entries[i, j] = G_entries[j, i] = define(f"G_{i}_{j}", f"G_{{{i}{j}}}", gram[i, j])
    G = sp.Matrix(shots, shots, lambda i, j: G_entries[i, j])
    det = define("detG", r"\det G", G.det(method="berkowitz"))
    adj = G.adjugate(method="berkowitz")
    Ginv_entries: dict[tuple[int, int], sp.Symbol] = {}
    for i in range(shots):
        for j in range(i, shots):
            Ginv_entries[i, j] = Ginv_entries[j, i] = define(f"Ginv_{i}_{j}", f"(G^{{-1}})_{{{i}{j}}}", adj[i, j] / det)
    Ginv = sp.Matrix(shots, shots, lambda i, j: Ginv_entries[i, j])
    ridge = Z.T * Ginv * Yn
    W_r = sp.Matrix(*ridge.shape, lambda i, j: define(f"Wr_{i}_{j}", f"W^{{r}}_{{{i}{j}}}", ridge[i, j]))
    logits = scale * Zq * W_r + offset * sp.ones(queries, W_r.shape[1])
    out = sp.Matrix(*logits.shape, lambda i, j: define(f"O_{i}_{j}", f"O_{{{i}{j}}}", logits[i, j]))
    if regression:
        r = out - yq
        meta_loss = sum((e**2 for e in r), sp.Integer(0)) / queries
    else:
        meta_loss = sum((_logsumexp(list(out.row(i))) - out[i, query_labels[i]] for i in range(queries)),
                        sp.Integer(0)) / queries
    params = flat_symbols(W) + [lam, scale, offset]
    grad, adjoints = chain_gradient(meta_loss, defs, params, names)
    defs += adjoints
    # The push-through identity behind primal = dual, on a generic matrix (it expands to zero).
    d_feat = dim + (1 if bias_column else 0)
    G = sp.Matrix(shots, d_feat, lambda i, j: sp.Symbol(f"z_{i}_{j}", real=True))
    push_through = (G.T * G + lam * sp.eye(d_feat)) * G.T - G.T * (G * G.T + lam * sp.eye(shots))
    z_tex = r"\tfrac{1}{\sqrt{n}}\," if normalize else ""
    ones = r"\ \mathbf{1}" if bias_column else ""
    sym_steps = [
        Step("support features (linear backbone, no bias)" + ("; ones column appended" if bias_column else ""),
             ("Z", "Z"), (rf"{z_tex}\left[X_{{s}} W^{{\top}}{ones}\right]",
                          ("1/sqrt(n) " if normalize else "") + ("[X_s W^T, 1]" if bias_column else "X_s W^T"))),
        Step("targets" + (" (normalised)" if normalize else ""), ("Y", "Y"),
             (rf"{z_tex}y^{{(s)}}", ("1/sqrt(n) " if normalize else "") + "y_s") if regression else
             (rf"{z_tex}\operatorname{{onehot}}(\text{{labels}})", ("1/sqrt(n) " if normalize else "") + "onehot(labels)")),
        Step("ridge weights, primal", (r"W_{r}", "W_r"),
             (r"\left(Z^{\top} Z + \lambda I\right)^{-1} Z^{\top} Y", "(Z^T Z + lam I)^-1 Z^T Y")),
        Step("push-through identity, so primal = dual (Woodbury)",
             (r"\left(Z^{\top} Z + \lambda I\right) Z^{\top}", "(Z^T Z + lam I) Z^T"),
             (r"Z^{\top} \left(Z Z^{\top} + \lambda I\right) \;\Rightarrow\; W_{r} = Z^{\top} \left(Z Z^{\top} + \lambda I\right)^{-1} Y",
              "Z^T (Z Z^T + lam I)  =>  W_r = Z^T (Z Z^T + lam I)^-1 Y")),
        Step("query " + ("predictions" if regression else "logits"), (r"O", "O"),
             (rf"\alpha_{{\mathrm{{s}}}}\, \left[X_{{q}} W^{{\top}}{ones}\right] W_{{r}} + \beta_{{\mathrm{{o}}}}",
              "scale * [X_q W^T" + (", 1" if bias_column else "") + "] W_r + offset")),
        Step("meta-loss (" + ("mse" if regression else "ce") + ")", (r"\mathcal{L}", "L"),
             (rf"{_mean(queries)}\sum_{{i}} \left(O_{{i}} - y^{{(q)}}_{{i}}\right)^{{2}}",
              f"1/{queries} sum_i (O_i - y_q_i)^2") if regression else
             (rf"{_mean(queries)}\sum_{{i}} \Big(\log \sum_{{c}} e^{{O_{{ic}}}} - O_{{i, y_{{i}}}}\Big)",
              f"1/{queries} sum_i (logsumexp(O_i) - O_i[y_i])")),
        Step("Gram matrix of the dual form (computed)", ("G", "G"), gram),
        Step("derivative in lam through the chain of intermediates", (r"\partial_{\lambda} \mathcal{L}", "dL/dlam"),
             grad[dim * dim]),
        Step("derivative in scale", (r"\partial_{\alpha_{\mathrm{s}}} \mathcal{L}", "dL/dscale"), grad[dim * dim + 1]),
        Step("derivative in offset" + ("" if regression else " (softmax is shift invariant)"),
             (r"\partial_{\beta_{\mathrm{o}}} \mathcal{L}", "dL/doffset"), sp.simplify(grad[dim * dim + 2])),
        Step("backbone gradient (Z_s = X_s W^T, Z_q = X_q W^T)", (r"\nabla_{W} \mathcal{L}", "grad_W L"),
             sp.Matrix(grad[: dim * dim]).reshape(dim, dim)),
    ]
    return Derivation(
        name=name,
        params={"dim": dim, "shots": shots, "queries": queries, "classes": classes, "bias_column": bias_column,
                "normalize": normalize, "regression": regression},
        title="R2-D2 ridge-regression head" + (" (regression)" if regression else ""),
        summary=(
            f"R2-D2 (Bertinetto et al. 2019): a ridge-regression head on {dim} linear features of {shots} support "
            f"examples ({'regression targets' if regression else f'{classes} classes, one-hot'}), learnable lam, "
            f"scale and offset; the query loss ({'mse' if regression else 'ce'}) on {queries} example(s) is "
            "differentiated through the closed-form solve with respect to the backbone and the three hyper-parameters."
        ),
        symbols=t.symbols,
        arrays=t.arrays,
        wrt=[("W", (dim, dim)), ("lam", ()), ("scale", ()), ("offset", ())],
        wrt_symbols=params,
        meta_loss=meta_loss,
        meta_gradient=grad,
        steps=sym_steps,
        extras={
            "support_features": Z,
            "support_targets": Yn,
            "query_features": Zq,
            "ridge_weights": W_r,
            "push_through_residual": push_through,
            "support_labels": support_labels,
            "query_labels": query_labels,
        },
        latex_names=names,
        definitions=defs,
    )
