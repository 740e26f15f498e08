"""Each algorithm's meta-objective and meta-gradient as display formulas, as in CONVENTIONS.

An :class:`AlgorithmText` per algorithm: a display name, the paper (with its
arXiv identifier), one sentence, and display formulas (``(label, TeX)``) for
the meta-objective and the meta-gradient, written from ``shared/CONVENTIONS.md``.
The TeX uses only what KaTeX and GitHub's MathJax both understand.

The rows of :data:`verify.algorithms.ALGORITHMS` carry these texts (``Algorithm.text``)
and the report reads them from there; this module only holds the data, below the
algorithm table, so the table never imports the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["AlgorithmText", "TEXTS"]


@dataclass(frozen=True)
class AlgorithmText:
    title: str
    paper: str
    arxiv: str
    summary: str
    objective: list[tuple[str, str]] = field(default_factory=list)
    gradient: list[tuple[str, str]] = field(default_factory=list)


_INNER = r"p^{(i)}_0 = \theta, \qquad p^{(i)}_{k+1} = p^{(i)}_k - \alpha\, \nabla L^s_i(p^{(i)}_k), \quad k = 0, \dots, K-1"
_MEAN = r"\mathcal{L}(\theta) = \frac{1}{N} \sum_{i=1}^{N} L^q_i\big(p^{(i)}_K\big)"

TEXTS: dict[str, AlgorithmText] = {
    "mlp": AlgorithmText(
        "The base model (MLP)", "backpropagation; Pearlmutter 1994 (Hessian-vector products)", "",
        "Every algorithm is built on this model; its gradient and Hessian-vector product are checked first.",
        [("the MLP with sizes [d0, ..., dL] and activation sigma (no activation on the last layer)",
          r"h_0 = x, \quad h_l = \sigma\big(h_{l-1} W_l^\top + b_l\big) \;(l < L), \quad "
          r"f(x; \theta) = h_{L-1} W_L^\top + b_L"),
         ("the loss: mse (mean over elements), ce (mean over the batch of -log softmax), or bce of logits",
          r"\mathcal{L}(\theta) = \ell\big(f(x; \theta), y\big)")],
        [("backpropagation gives the gradient; the Hessian-vector product is the directional derivative of the "
          "gradient (Pearlmutter's R-operator)",
          r"H(\theta)\, v = \frac{d}{dt} \nabla \mathcal{L}(\theta + t v) \Big|_{t=0}")]),
    "maml": AlgorithmText(
        "MAML", "Finn, Abbeel, Levine 2017", "1703.03400",
        "K gradient steps on the support loss, then the query loss; the meta-gradient differentiates through "
        "the inner loop (second order).",
        [("inner loop", _INNER), ("meta-loss: mean over tasks of the query loss after adaptation", _MEAN)],
        [("exact meta-gradient: the chain rule through every inner step",
          r"\nabla_\theta \mathcal{L} = \frac{1}{N} \sum_{i=1}^{N} \big(I - \alpha H^s_i(p_0)\big)"
          r"\big(I - \alpha H^s_i(p_1)\big) \cdots \big(I - \alpha H^s_i(p_{K-1})\big)\, \nabla L^q_i(p_K)")]),
    "fomaml": AlgorithmText(
        "First-order MAML", "Finn, Abbeel, Levine 2017 (first-order approximation)", "1703.03400",
        "The MAML meta-loss, with a direction that drops the inner-loop Jacobians; it is defined, not derived, "
        "so it is compared with the reference only.",
        [("inner loop and meta-loss as in MAML", _INNER), ("", _MEAN)],
        [("the FOMAML direction: every Jacobian of an inner step replaced by the identity",
          r"g_{\mathrm{FO}} = \frac{1}{N} \sum_{i=1}^{N} \nabla L^q_i\big(p^{(i)}_K\big), \qquad "
          r"\frac{\partial p_{k+1}}{\partial p_k} := I")]),
    "anil": AlgorithmText(
        "ANIL (almost no inner loop)", "Raghu, Raghu, Bengio, Vinyals 2020", "1909.09157",
        "Only the head (W_L, b_L) adapts in the inner loop; the meta-gradient is exact for all parameters and "
        "contains the body/head cross second derivatives.",
        [("inner loop on the head only; the body b stays at its meta-parameters",
          r"\theta = (b, h), \quad h_0 = h, \quad h_{k+1} = h_k - \alpha\, \nabla_h L^s_i(b, h_k), \qquad "
          r"\mathcal{L}(\theta) = \frac{1}{N} \sum_{i=1}^{N} L^q_i(b, h_K)"),],
        [("adjoint of the head through the inner loop",
          r"\lambda_K = \nabla_h L^q_i(b, h_K), \qquad \lambda_k = \big(I - \alpha\, \nabla^2_{hh} L^s_i(b, h_k)\big)"
          r"\lambda_{k+1}"),
         ("meta-gradient (mean over tasks): the head gets the adjoint, the body its direct term plus the "
          "cross second derivatives",
          r"\nabla_h \mathcal{L} = \lambda_0, \qquad \nabla_b \mathcal{L} = \nabla_b L^q_i(b, h_K) - \alpha "
          r"\sum_{k=0}^{K-1} \nabla^2_{bh} L^s_i(b, h_k)\, \lambda_{k+1}")]),
    "metasgd": AlgorithmText(
        "Meta-SGD", "Li, Zhou, Chen, Li 2017", "1707.09835",
        "A learned learning rate per parameter entry; the meta-gradient is exact with respect to both theta "
        "and the learning rates.",
        [("inner loop with elementwise learning rates a (shaped like theta)",
          r"p_0 = \theta, \qquad p_{k+1} = p_k - a \odot \nabla L^s_i(p_k), \qquad " + _MEAN)],
        [("adjoint (mean over tasks)",
          r"\lambda_K = \nabla L^q_i(p_K), \qquad \lambda_k = \big(I - H^s_i(p_k) \operatorname{diag}(a)\big)"
          r"\lambda_{k+1}"),
         ("gradients with respect to theta and the learning rates",
          r"\nabla_\theta \mathcal{L} = \lambda_0, \qquad \nabla_a \mathcal{L} = -\sum_{k=0}^{K-1} "
          r"\nabla L^s_i(p_k) \odot \lambda_{k+1}")]),
    "reptile": AlgorithmText(
        "Reptile", "Nichol, Achiam, Schulman 2018", "1803.02999",
        "Not the gradient of any loss: a direction defined by K SGD steps; compared with the reference only.",
        [("K SGD steps from theta on the support loss", _INNER)],
        [("the Reptile direction (mean over tasks) and the outer update",
          r"d = \frac{1}{N} \sum_{i=1}^{N} \big(\theta - p^{(i)}_K\big), \qquad \theta \leftarrow \theta - "
          r"\epsilon\, d")]),
    "newton": AlgorithmText(
        "Newton-MAML (Hessian-preconditioned inner step)", "CONVENTIONS: damped Newton inner step", "",
        "Each inner step is a damped Newton step; the exact meta-gradient contains third derivatives of the "
        "support loss. A singular damped Hessian is an error, not a NaN.",
        [("damped Newton inner step, delta >= 0",
          r"p_{k+1} = p_k - \alpha \big(H^s_i(p_k) + \delta I\big)^{-1} \nabla L^s_i(p_k), \qquad " + _MEAN)],
        [("the Jacobian of one step, with u_k the Newton direction and T the third-derivative tensor",
          r"J_k = I - \alpha \big(H_k + \delta I\big)^{-1} \big(H_k - T_k[u_k]\big), \quad "
          r"u_k = \big(H_k + \delta I\big)^{-1} \nabla L^s_i(p_k), \quad T_k[u]_{jl} = \sum_m "
          r"\frac{\partial^3 L^s_i(p_k)}{\partial p_j \partial p_l \partial p_m} u_m"),
         ("exact meta-gradient",
          r"\nabla_\theta \mathcal{L} = \frac{1}{N} \sum_{i=1}^{N} J_0^\top J_1^\top \cdots J_{K-1}^\top\, "
          r"\nabla L^q_i(p_K)")]),
    "meta-lstm": AlgorithmText(
        "Meta-learner LSTM", "Ravi & Larochelle 2017 (optimization as a model for few-shot learning)", "",
        "The learner's parameters are the cell state of a coordinatewise LSTM whose input and forget gates read "
        "the gradient, the loss, the parameters and their own previous value; the initial cell state is theta. "
        "The meta-gradient w.r.t. theta and the gates' phi is exact BPTT through the learner's gradients.",
        [("gates (coordinatewise; L_k = L^s_i(c_k) shared by all coordinates, i_{-1} = f_{-1} = 0)",
          r"i_k = \sigma\big(W_I \cdot [g_k, L_k, c_k, i_{k-1}] + b_I\big), \quad "
          r"f_k = \sigma\big(W_F \cdot [g_k, L_k, c_k, f_{k-1}] + b_F\big), \quad g_k = \nabla L^s_i(c_k)"),
         ("cell-state update, c_0 = theta", r"c_{k+1} = f_k \odot c_k - i_k \odot g_k, \qquad "
          r"\mathcal{L}(\theta, \phi) = \frac{1}{N} \sum_{i=1}^{N} L^q_i\big(c^{(i)}_K\big)")],
        [("BPTT through parameters and gates (the reference's adjoint; the paper's first-order approximation "
          "drops the terms through g_k and L_k)",
          r"\bar c_k = \frac{\partial c_{k+1}}{\partial c_k}^{\!\top} \bar c_{k+1} + "
          r"\frac{\partial (i_k, f_k)}{\partial c_k}^{\!\top} (\bar i_k, \bar f_k), \qquad "
          r"\nabla_\theta \mathcal{L} = \bar c_0")]),
    "imaml": AlgorithmText(
        "iMAML (implicit MAML)", "Rajeswaran, Finn, Kakade, Levine 2019", "1909.04630",
        "The inner problem is solved to near machine precision; the meta-gradient follows from the implicit "
        "function theorem (solved directly and matrix-free by conjugate gradients).",
        [("proximally regularised inner problem and the meta-loss",
          r"\phi^*_i(\theta) = \operatorname*{arg\,min}_\phi\; L^s_i(\phi) + \frac{\lambda}{2} \lVert \phi - "
          r"\theta \rVert^2, \qquad \mathcal{L}(\theta) = \frac{1}{N} \sum_{i=1}^{N} L^q_i\big(\phi^*_i\big)")],
        [("implicit function theorem: differentiate the optimality condition",
          r"\nabla L^s_i(\phi^*) + \lambda (\phi^* - \theta) = 0 \;\Rightarrow\; \frac{d\phi^*}{d\theta} = "
          r"\Big(I + \frac{1}{\lambda} H^s_i(\phi^*)\Big)^{-1}"),
         ("exact meta-gradient",
          r"\nabla_\theta \mathcal{L} = \frac{1}{N} \sum_{i=1}^{N} \Big(I + \frac{1}{\lambda} "
          r"H^s_i(\phi^*_i)\Big)^{-1} \nabla L^q_i(\phi^*_i)")]),
    "r2d2": AlgorithmText(
        "R2-D2 (ridge regression head)", "Bertinetto, Henriques, Torr, Vedaldi 2019", "1805.08136",
        "A closed-form ridge-regression classifier on backbone features; exact with respect to the backbone, "
        "lambda, scale and offset.",
        [("ridge weights on the support features Z = f(x^s) (optional ones column, optional 1/sqrt(n) "
          "normalisation of Z and Y); primal and dual (Woodbury) forms agree",
          r"W = \big(Z^\top Z + \lambda I\big)^{-1} Z^\top Y = Z^\top \big(Z Z^\top + \lambda I\big)^{-1} Y"),
         ("query logits (the paper's alpha, beta are scale, offset) and the meta-loss",
          r"\hat{Y}_q = \mathrm{scale} \cdot Z_q W + \mathrm{offset}, \qquad \mathcal{L} = \frac{1}{N} "
          r"\sum_{i=1}^{N} \mathrm{ce}\big(\hat{Y}_{q,i}, y^q_i\big)")],
        [("gradient through the ridge solution, with G = the gradient of the loss with respect to W",
          r"\frac{\partial \mathcal{L}}{\partial \lambda} = -\Big\langle G,\; \big(Z^\top Z + \lambda I\big)^{-1}"
          r" W \Big\rangle, \qquad \frac{\partial W}{\partial Z} \text{ by } d\big(A^{-1}\big) = -A^{-1} (dA) A^{-1}"),
         ("the backbone gradient flows through Z and Z_q (chain rule through f)",
          r"\nabla_\theta \mathcal{L} = \Big(\frac{\partial Z}{\partial \theta}\Big)^{\!\top} "
          r"\frac{\partial \mathcal{L}}{\partial Z} + \Big(\frac{\partial Z_q}{\partial \theta}\Big)^{\!\top} "
          r"\frac{\partial \mathcal{L}}{\partial Z_q}")]),
    "lrd2": AlgorithmText(
        "LR-D2 (logistic regression head)", "Bertinetto, Henriques, Torr, Vedaldi 2019", "1805.08136",
        "Binary logistic regression on backbone features by K Newton (IRLS) steps from w = 0; the meta-gradient "
        "is exact through all K steps.",
        [("K ridge-regularised IRLS steps, s = sigmoid(Z w), S = diag(s(1 - s))",
          r"w_0 = 0, \qquad w_{k+1} = w_k - \big(Z^\top S_k Z + \lambda I\big)^{-1} \big(Z^\top (s_k - y) + "
          r"\lambda w_k\big)"),
         ("query loss", r"\mathcal{L} = \frac{1}{N} \sum_{i=1}^{N} \mathrm{bce}\big(\mathrm{scale} \cdot "
          r"Z_{q,i} w_K + \mathrm{offset},\; y^q_i\big)")],
        [("the Jacobian of one Newton step (it vanishes at the optimum: Newton's quadratic convergence), with "
          "u_k the Newton direction",
          r"\frac{\partial w_{k+1}}{\partial w_k} = A_k^{-1} Z^\top D_k Z, \quad A_k = Z^\top S_k Z + \lambda I, "
          r"\quad D_k = \operatorname{diag}\big(s_k (1 - s_k)(1 - 2 s_k) \odot Z u_k\big), \quad u_k = "
          r"A_k^{-1}\big(Z^\top (s_k - y) + \lambda w_k\big)"),
         ("exact meta-gradient: the adjoint of the query loss carried back through all K steps, plus the "
          "explicit dependence of each step on Z (hence theta) and lambda",
          r"\nabla_\theta \mathcal{L} = \Big(\frac{\partial Z_q}{\partial \theta}\Big)^{\!\top} "
          r"\frac{\partial \mathcal{L}}{\partial Z_q} + \sum_{k=0}^{K-1} \Big(\frac{\partial w_{k+1}}"
          r"{\partial Z} \frac{\partial Z}{\partial \theta}\Big)^{\!\top} \mu_{k+1}, \qquad \mu_K = "
          r"\nabla_{w_K} \mathcal{L}, \quad \mu_k = \Big(\frac{\partial w_{k+1}}{\partial w_k}\Big)^{\!\top}"
          r" \mu_{k+1}")]),
    "protonet": AlgorithmText(
        "Prototypical networks", "Snell, Swersky, Zemel 2017", "1703.05175",
        "Class prototypes are support-feature means; logits are negative squared distances.",
        [("prototypes, logits and loss",
          r"c_k = \frac{1}{|S_k|} \sum_{j \in S_k} f_\theta(x_j), \qquad \mathrm{logit}_k(x_q) = "
          r"-\big\lVert f_\theta(x_q) - c_k \big\rVert^2, \qquad \mathcal{L} = \mathrm{ce}")],
        [("exact gradient with respect to the backbone (through both the query features and the prototypes)",
          r"\nabla_\theta \mathcal{L} = \sum_{q,k} \frac{\partial \mathcal{L}}{\partial \mathrm{logit}_k(x_q)}"
          r"\, \Big(-2 \big(f_\theta(x_q) - c_k\big)^{\!\top} \Big(\frac{\partial f_\theta(x_q)}{\partial \theta}"
          r" - \frac{\partial c_k}{\partial \theta}\Big)\Big)")]),
    "matchingnet": AlgorithmText(
        "Matching networks", "Vinyals, Blundell, Lillicrap, Kavukcuoglu, Wierstra 2016", "1606.04080",
        "Cosine-similarity attention over the support set (no full-context embeddings).",
        [("attention, predicted class distribution and loss",
          r"a_j(x_q) = \operatorname{softmax}_j \cos\big(f_\theta(x_q), f_\theta(x_j)\big), \qquad "
          r"P(k \mid x_q) = \sum_j a_j(x_q)\, [y_j = k], \qquad \mathcal{L} = -\frac{1}{|Q|} \sum_q "
          r"\log P(y_q \mid x_q)")],
        [("exact gradient with respect to the backbone (the cosine differentiated through both features)",
          r"\frac{\partial \cos(u, w)}{\partial u} = \frac{w}{\lVert u \rVert \lVert w \rVert} - "
          r"\frac{\cos(u, w)\, u}{\lVert u \rVert^2}")]),
}
