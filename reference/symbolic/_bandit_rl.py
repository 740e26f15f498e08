"""MAML-RL on the 2-armed bandit in closed form: ``J``, ``grad J`` and the bias of the original estimator.

The bandit of :func:`reference.rl.two_armed_bandit` (``S = 1``, ``A = 2``,
``H = 1``, deterministic rewards ``r_0, r_1``), softmax policy
``pi_a = exp(theta_a) / (exp(theta_0) + exp(theta_1))``, ``V(theta) =
pi_0 r_0 + pi_1 r_1``. An inner batch of ``n`` pulls with ``k`` pulls of arm 0
gives the REINFORCE step (CONVENTIONS, :mod:`reference.rl.maml_rl`; for
``H = 1`` the reward-to-go is the reward)
``g_hat_k = (1/n) [k (e_0 - pi) r_0 + (n - k) (e_1 - pi) r_1]`` and
``theta'_k = theta + alpha g_hat_k``. The batch order does not matter, so
``J(theta) = sum_k C(n, k) pi_0^k pi_1^(n-k) V(theta'_k)`` (a sum over counts,
not the ``2^n`` ordered batches the NumPy reference enumerates), and
``grad J`` is SymPy's derivative of that expression.

The original MAML-RL estimator (Finn et al. 2017) has expectation
``E[est] = sum_k w_k (I + alpha d g_hat_k / d theta)^T grad V(theta'_k)``
(``w_k`` the count probabilities); ``extras["bias_original"]`` is
``E[est] - grad J`` (both by SymPy differentiation) and
``extras["bias_formula"]`` the closed form
``-sum_k w_k V(theta'_k) [k (e_0 - pi) + (n - k) (e_1 - pi)]``, i.e.
``-E_D[V(theta') grad log p_theta(D)]``: the score term of the inner sampling
that the original estimator drops.
"""

from __future__ import annotations

import sympy as sp

from reference.symbolic._common import check_size
from reference.symbolic._derivation import Derivation, Step, SymbolTable, gradient


def bandit_maml_rl(batch: int = 1) -> Derivation:
    """MAML-RL on the 2-armed bandit: J = E_D[V(theta + alpha g_hat(D))], its gradient, the original estimator's bias.

    ``batch`` is the number ``n`` of inner pulls. Symbols: ``theta_0, theta_1``
    (the softmax logits), ``r_0, r_1`` (the arms' rewards), ``alpha`` (the
    inner step size). ``meta_loss`` holds the objective ``J`` (a return, to be
    *maximised*) and ``meta_gradient`` its exact gradient; ``extras`` hold the
    original estimator's expectation, its bias and the bias's closed form.
    """
    name = "bandit-maml-rl"
    n = check_size(name, "batch", batch)
    t = SymbolTable()
    theta = t.vector("theta", 2, r"\theta")
    r = t.vector("r", 2, "r")
    alpha = t.scalar("alpha", r"\alpha")
    th = list(theta)
    z = sp.exp(th[0]) + sp.exp(th[1])
    pi = sp.Matrix([sp.exp(th[0]) / z, sp.exp(th[1]) / z])
    e = [sp.Matrix([1, 0]), sp.Matrix([0, 1])]

    def value_at(p: sp.Matrix) -> sp.Expr:
        zp = sp.exp(p[0]) + sp.exp(p[1])
        return (sp.exp(p[0]) * r[0] + sp.exp(p[1]) * r[1]) / zp

    tp = sp.Matrix(sp.symbols("u_0 u_1", real=True))  # a free point for grad V
    grad_v_free = gradient(value_at(tp), list(tp))
    J = sp.Integer(0)
    expected_original = sp.zeros(2, 1)
    bias_formula = sp.zeros(2, 1)
    for k in range(n + 1):
        w = sp.binomial(n, k) * pi[0] ** k * pi[1] ** (n - k)
        g_k = (k * (e[0] - pi) * r[0] + (n - k) * (e[1] - pi) * r[1]) / n
        adapted = theta + alpha * g_k
        v_k = value_at(adapted)
        J += w * v_k
        jac = g_k.jacobian(th)
        gv = grad_v_free.xreplace(dict(zip(tp, adapted)))
        expected_original += w * (sp.eye(2) + alpha * jac).T * gv
        bias_formula -= w * v_k * (k * (e[0] - pi) + (n - k) * (e[1] - pi))
    grad = gradient(J, th)
    bias_original = expected_original - grad
    steps = [
        Step("softmax policy", (r"\pi_{a}", "pi_a"),
             (r"e^{\theta_{a}} / (e^{\theta_{0}} + e^{\theta_{1}})", "exp(theta_a) / (exp(theta_0) + exp(theta_1))")),
        Step("value", (r"V(\theta)", "V(theta)"), (r"\pi_{0} r_{0} + \pi_{1} r_{1}", "pi_0 r_0 + pi_1 r_1")),
        Step(f"REINFORCE step on n = {n} pulls, k of them arm 0", (r"\hat{g}_{k}", "g_hat_k"),
             (r"\tfrac{1}{n} \left( k (e_{0} - \pi) r_{0} + (n - k) (e_{1} - \pi) r_{1} \right)",
              "(1/n) (k (e_0 - pi) r_0 + (n - k) (e_1 - pi) r_1)")),
        Step("MAML-RL objective", (r"J(\theta)", "J(theta)"),
             (r"\sum_{k=0}^{n} \binom{n}{k} \pi_{0}^{k} \pi_{1}^{n-k} V(\theta + \alpha \hat{g}_{k})",
              "sum_k C(n, k) pi_0^k pi_1^(n-k) V(theta + alpha g_hat_k)")),
        Step("closed form", (r"J(\theta)", "J(theta)"), J),
        Step("exact gradient (SymPy)", (r"\nabla J", "grad J"), grad),
        Step("bias of the original MAML-RL estimator (no inner score term)",
             (r"\mathbb{E}[\hat{\nabla}_{\mathrm{MAML}}] - \nabla J", "E[est_MAML] - grad J"),
             (r"-\sum_{k} \binom{n}{k} \pi_{0}^{k} \pi_{1}^{n-k} V(\theta'_{k}) \left( k (e_{0} - \pi) "
              r"+ (n - k) (e_{1} - \pi) \right)",
              "-sum_k C(n, k) pi_0^k pi_1^(n-k) V(theta'_k) (k (e_0 - pi) + (n - k) (e_1 - pi))")),
        Step("closed form of the bias",
             (r"\mathbb{E}[\hat{\nabla}_{\mathrm{MAML}}] - \nabla J", "E[est_MAML] - grad J"), bias_formula),
    ]
    return Derivation(
        name=name, params={"batch": n},
        title="MAML-RL on the 2-armed bandit: exact objective, gradient and the original estimator's bias",
        summary=(f"Finn et al. 2017's MAML for RL on a 2-armed bandit with a softmax policy and n = {n} inner pulls; "
                 "J(theta) = E_D[V(theta + alpha g_hat(D))] as a sum over pull counts (meta_loss holds J, a return "
                 "to maximise). The original estimator drops the score term of the inner sampling; its bias is "
                 "-E_D[V(theta') grad log p_theta(D)]."),
        symbols=t.symbols, arrays=t.arrays, wrt=[("theta", (2,))], wrt_symbols=th, meta_loss=J, meta_gradient=grad,
        steps=steps, latex_names=t.latex_names,
        extras={"expected_original": expected_original, "bias_original": bias_original, "bias_formula": bias_formula,
                "policy": pi},
    )
