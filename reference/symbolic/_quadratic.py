"""Exact meta-gradients of the gradient-based algorithms on one quadratic task.

Support and query losses are ``L_s(p) = 1/2 (p - c_s)^T A_s (p - c_s)`` and
``L_q`` likewise (``A`` symmetric), the toy problem of
:class:`reference.models.Quadratic`. The inner loop is iterated symbolically
and the meta-gradient is obtained by differentiating the meta-loss directly
(SymPy ``diff``); the chain-rule / implicit forms of CONVENTIONS are kept in
``extras`` so the tests can check that the two agree.
"""

from __future__ import annotations

import sympy as sp

from reference.symbolic._common import (
    check_size,
    quadratic_loss,
    quadratic_symbols,
    require_bool,
    scalar_or_matrix,
    tidy,
)
from reference.symbolic._derivation import Derivation, Step, SymbolTable, gradient


def _loss_steps(dim: int, query: bool = True) -> list[Step]:
    """The lines defining ``L_s`` (and ``L_q``)."""
    steps = []
    for role, word in (("s", "support loss"), ("q", "query loss"))[: 2 if query else 1]:
        if dim == 1:
            tex = rf"\tfrac{{1}}{{2}} a_{{{role}}} \left(p - c_{{{role}}}\right)^{{2}}"
            txt = f"a_{role}/2 * (p - c_{role})**2"
        else:
            tex = rf"\tfrac{{1}}{{2}} \left(p - c_{{{role}}}\right)^{{\top}} A_{{{role}}} \left(p - c_{{{role}}}\right)"
            txt = f"1/2 (p - c_{role})^T A_{role} (p - c_{role})"
        steps.append(Step(word, (f"L_{{{role}}}(p)", f"L_{role}(p)"), (tex, txt)))
    return steps


def _hess(dim: int, role: str = "s") -> tuple[str, str]:
    return (f"a_{{{role}}}", f"a_{role}") if dim == 1 else (f"A_{{{role}}}", f"A_{role}")


def _identity(dim: int) -> tuple[str, str]:
    return ("1", "1") if dim == 1 else ("I", "I")


def _prod_power(tex: str, txt: str, steps: int) -> tuple[str, str]:
    if steps == 1:
        return rf"\left({tex}\right)", f"({txt})"
    return rf"\left({tex}\right)^{{{steps}}}", f"({txt})**{steps}"


def quadratic_maml(dim: int = 1, steps: int = 1, first_order: bool = False) -> Derivation:
    """MAML (Finn et al. 2017) on one quadratic task, exactly.

    ``p_0 = theta``, ``p_{k+1} = p_k - alpha A_s (p_k - c_s)`` so
    ``p_K = c_s + (I - alpha A_s)^K (theta - c_s)``; meta-loss ``L_q(p_K)`` and
    meta-gradient ``(I - alpha A_s)^K A_q (p_K - c_q)`` (CONVENTIONS, MAML).
    With ``first_order=True`` the meta-gradient is FOMAML's ``grad L_q(p_K)``
    (``is_gradient`` is then False).

    Symbols: ``theta, alpha, a_s, c_s, a_q, c_q`` for ``dim=1``; otherwise
    ``theta_i``, ``c_s_i``, ``c_q_i`` and the upper triangle ``a_s_i_j``
    (``i <= j``) of the symmetric ``A_s``, ``A_q``.
    """
    name = "quadratic-maml"
    dim = check_size(name, "dim", dim)
    steps = check_size(name, "steps", steps)
    first_order = require_bool("first_order", first_order)
    t = SymbolTable()
    q = quadratic_symbols(t, dim)
    alpha = t.scalar("alpha", r"\alpha")
    # Reorder so that dim=1 reads theta, alpha, a_s, c_s, a_q, c_q (the naming).
    order = [*q.theta, alpha, *_unique(q.A_s), *q.c_s, *_unique(q.A_q), *q.c_q]
    t.symbols = {s.name: s for s in order}
    identity = sp.eye(dim)
    iterates = [q.theta]
    for _ in range(steps):
        p = iterates[-1]
        iterates.append(p - alpha * q.A_s * (p - q.c_s))
    p_K = iterates[-1]
    meta_loss = quadratic_loss(p_K, q.A_q, q.c_q)
    J = identity - alpha * q.A_s
    closed_iterate = q.c_s + J**steps * (q.theta - q.c_s)
    chain = J**steps * q.A_q * (p_K - q.c_q)  # (I - alpha H)^T ... with H symmetric
    fomaml = q.A_q * (p_K - q.c_q)
    exact = gradient(meta_loss, list(q.theta))
    grad = fomaml if first_order else exact

    a_s, i1 = _hess(dim), _identity(dim)
    jac_tex, jac_txt = _prod_power(f"{i1[0]} - \\alpha {a_s[0]}", f"{i1[1]} - alpha*{a_s[1]}", steps)
    sym_steps = _loss_steps(dim)
    sym_steps += [
        Step("initialisation", ("p_{0}", "p_0"), (r"\theta", "theta")),
        Step("inner step, k = 0..K-1", ("p_{k+1}", "p_{k+1}"),
             (rf"p_{{k}} - \alpha {a_s[0]} \left(p_{{k}} - c_{{s}}\right)", f"p_k - alpha*{a_s[1]}*(p_k - c_s)")),
        Step(f"closed form after K = {steps} steps", (f"p_{{{steps}}}", f"p_{steps}"),
             scalar_or_matrix(closed_iterate) if dim == 1 else
             (rf"c_{{s}} + {jac_tex} \left(\theta - c_{{s}}\right)", f"c_s + {jac_txt} (theta - c_s)")),
        Step("meta-loss", (rf"\mathcal{{L}}(\theta) = L_{{q}}(p_{{{steps}}})", f"L(theta) = L_q(p_{steps})"),
             quadratic_loss(closed_iterate, q.A_q, q.c_q) if dim == 1 else
             (rf"\tfrac{{1}}{{2}} \left(p_{{{steps}}} - c_{{q}}\right)^{{\top}} A_{{q}} \left(p_{{{steps}}} - c_{{q}}\right)",
              f"1/2 (p_{steps} - c_q)^T A_q (p_{steps} - c_q)")),
    ]
    a_q = _hess(dim, "q")
    if first_order:
        sym_steps += [
            Step("FOMAML: every Jacobian dp_{k+1}/dp_k replaced by the identity",
                 (r"g_{\mathrm{FO}}", "g_FO"),
                 (rf"\nabla L_{{q}}(p_{{{steps}}}) = {a_q[0]} \left(p_{{{steps}}} - c_{{q}}\right)",
                  f"grad L_q(p_{steps}) = {a_q[1]} (p_{steps} - c_q)")),
            Step("explicitly", (r"g_{\mathrm{FO}}", "g_FO"), scalar_or_matrix(tidy(grad, dim))),
        ]
    else:
        sym_steps += [
            Step("chain rule (CONVENTIONS, MAML)", (r"\nabla_{\theta} \mathcal{L}", "grad L"),
                 (rf"{jac_tex} {a_q[0]} \left(p_{{{steps}}} - c_{{q}}\right)",
                  f"{jac_txt} {a_q[1]} (p_{steps} - c_q)")),
            Step("explicitly", (r"\nabla_{\theta} \mathcal{L}", "grad L"), scalar_or_matrix(tidy(chain, dim))),
        ]
    return Derivation(
        name=name,
        params={"dim": dim, "steps": steps, "first_order": first_order},
        title=("FOMAML" if first_order else "MAML") + " on a quadratic task",
        summary=(
            f"{'FOMAML' if first_order else 'MAML'} (Finn et al. 2017) with K = {steps} inner gradient step(s) of size "
            f"alpha on the support loss of one quadratic task in {dim} dimension(s); the meta-loss is the query loss "
            "after adaptation. The Hessians are constant (A_s), so the chain-rule product is a matrix power."
            + (" FOMAML's direction is grad L_q(p_K), not the gradient of the meta-loss." if first_order else "")
        ),
        symbols=t.symbols,
        arrays=t.arrays,
        wrt=[("theta", (dim,))],
        wrt_symbols=list(q.theta),
        meta_loss=meta_loss,
        meta_gradient=grad,
        steps=sym_steps,
        is_gradient=not first_order,
        extras={
            "iterates": iterates,
            "closed_form_iterate": closed_iterate,
            "chain_rule_gradient": chain,
            "exact_gradient": exact,
            "fomaml_direction": fomaml,
        },
        latex_names=t.latex_names,
    )


def _unique(m: sp.Matrix) -> list[sp.Symbol]:
    seen: list[sp.Symbol] = []
    for s in m:
        if s not in seen:
            seen.append(s)
    return seen


def quadratic_metasgd(dim: int = 1, steps: int = 1) -> Derivation:
    """Meta-SGD (Li et al. 2017) on one quadratic task: learnable per-parameter learning rates.

    ``p_{k+1} = p_k - a * A_s (p_k - c_s)`` (``*`` elementwise, ``a`` the rates),
    meta-loss ``L_q(p_K)``; the meta-gradient is exact with respect to
    ``theta`` and ``a`` (layout ``[theta, a]``). With ``D = diag(a)`` the
    theta-part is ``(I - A_s D)^K A_q (p_K - c_q)``.
    Symbols: ``theta, alpha`` (``dim=1``) or ``theta_i, alpha_i``; task as in
    :func:`quadratic_maml`.
    """
    name = "quadratic-metasgd"
    dim = check_size(name, "dim", dim)
    steps = check_size(name, "steps", steps)
    t = SymbolTable()
    q = quadratic_symbols(t, dim)
    lrs = t.vector("alpha", dim, r"\alpha")
    order = [*q.theta, *lrs, *_unique(q.A_s), *q.c_s, *_unique(q.A_q), *q.c_q]
    t.symbols = {s.name: s for s in order}
    D = sp.diag(*lrs)
    iterates = [q.theta]
    for _ in range(steps):
        p = iterates[-1]
        iterates.append(p - D * q.A_s * (p - q.c_s))
    p_K = iterates[-1]
    meta_loss = quadratic_loss(p_K, q.A_q, q.c_q)
    wrt = [*q.theta, *lrs]
    grad = gradient(meta_loss, wrt)
    J_T = sp.eye(dim) - q.A_s * D  # transpose of dp_{k+1}/dp_k = I - D A_s
    chain_theta = J_T**steps * q.A_q * (p_K - q.c_q)
    # d p_{k+1} / d a = -diag(A_s (p_k - c_s)); accumulate the adjoint backwards.
    adj = q.A_q * (p_K - q.c_q)
    chain_lr = sp.zeros(dim, 1)
    for k in reversed(range(steps)):
        g_k = q.A_s * (iterates[k] - q.c_s)
        chain_lr -= sp.Matrix([adj[i] * g_k[i] for i in range(dim)])
        adj = J_T * adj
    lr_tex = r"\alpha" if dim == 1 else r"a"
    jt_tex, jt_txt = _prod_power(rf"I - A_{{s}} \operatorname{{diag}}({lr_tex})", "I - A_s diag(a)", steps)
    sym_steps = _loss_steps(dim) + [
        Step("initialisation", ("p_{0}", "p_0"), (r"\theta", "theta")),
        Step("inner step with per-parameter rates (elementwise product)", ("p_{k+1}", "p_{k+1}"),
             (rf"p_{{k}} - {lr_tex} \odot \nabla L_{{s}}(p_{{k}})", "p_k - a * grad L_s(p_k)")),
        Step("meta-loss", (rf"\mathcal{{L}}(\theta, {lr_tex})", "L(theta, a)"), (rf"L_{{q}}(p_{{{steps}}})", f"L_q(p_{steps})")),
        Step("chain rule, theta part", (rf"\nabla_{{\theta}} \mathcal{{L}}", "grad_theta L"),
             (rf"{jt_tex} A_{{q}} \left(p_{{{steps}}} - c_{{q}}\right)", f"{jt_txt} A_q (p_{steps} - c_q)")),
        Step("chain rule, learning-rate part",
             (rf"\nabla_{{{lr_tex}}} \mathcal{{L}}", "grad_a L"),
             (rf"-\sum_{{k=0}}^{{{steps - 1}}} \lambda_{{k+1}} \odot \nabla L_{{s}}(p_{{k}}),\quad "
              rf"\lambda_{{K}} = \nabla L_{{q}}(p_{{K}}),\ \lambda_{{k}} = \left(I - A_{{s}} \operatorname{{diag}}({lr_tex})\right) \lambda_{{k+1}}",
              "-sum_k lam_{k+1} * grad L_s(p_k), lam_K = grad L_q(p_K), lam_k = (I - A_s diag(a)) lam_{k+1}")),
        Step("explicitly, [theta; a]", (rf"\nabla \mathcal{{L}}", "grad L"), tidy(sp.Matrix([*chain_theta, *chain_lr]), dim)),
    ]
    return Derivation(
        name=name,
        params={"dim": dim, "steps": steps},
        title="Meta-SGD on a quadratic task",
        summary=(
            f"Meta-SGD (Li et al. 2017): K = {steps} inner steps with a learnable learning rate per parameter; "
            "the meta-gradient is taken with respect to the initialisation theta and the rates (layout [theta, alpha])."
        ),
        symbols=t.symbols,
        arrays=t.arrays,
        wrt=[("theta", (dim,)), ("alpha", (dim,))],
        wrt_symbols=wrt,
        meta_loss=meta_loss,
        meta_gradient=grad,
        steps=sym_steps,
        extras={"iterates": iterates, "chain_rule_gradient": sp.Matrix([*chain_theta, *chain_lr])},
        latex_names=t.latex_names,
    )


def quadratic_reptile(dim: int = 1, steps: int = 1) -> Derivation:
    """Reptile (Nichol et al. 2018) on one quadratic task: the direction ``theta - p_K``.

    ``p_K = c_s + (I - alpha A_s)^K (theta - c_s)`` so the direction is
    ``(I - (I - alpha A_s)^K)(theta - c_s)``. Reptile is not the gradient of
    anything (``is_gradient`` False); ``meta_loss`` holds the support loss after
    adaptation ``L_s(p_K)`` for reference. Symbols: ``theta, alpha, a_s, c_s``.
    """
    name = "quadratic-reptile"
    dim = check_size(name, "dim", dim)
    steps = check_size(name, "steps", steps)
    t = SymbolTable()
    q = quadratic_symbols(t, dim, query=False)
    alpha = t.scalar("alpha", r"\alpha")
    order = [*q.theta, alpha, *_unique(q.A_s), *q.c_s]
    t.symbols = {s.name: s for s in order}
    iterates = [q.theta]
    for _ in range(steps):
        p = iterates[-1]
        iterates.append(p - alpha * q.A_s * (p - q.c_s))
    direction = q.theta - iterates[-1]
    J = sp.eye(dim) - alpha * q.A_s
    closed = (sp.eye(dim) - J**steps) * (q.theta - q.c_s)
    a_s, i1 = _hess(dim), _identity(dim)
    jac_tex, jac_txt = _prod_power(f"{i1[0]} - \\alpha {a_s[0]}", f"{i1[1]} - alpha*{a_s[1]}", steps)
    sym_steps = _loss_steps(dim, query=False) + [
        Step("initialisation", ("p_{0}", "p_0"), (r"\theta", "theta")),
        Step("inner SGD step", ("p_{k+1}", "p_{k+1}"),
             (rf"p_{{k}} - \alpha {a_s[0]} \left(p_{{k}} - c_{{s}}\right)", f"p_k - alpha*{a_s[1]}*(p_k - c_s)")),
        Step("Reptile direction (CONVENTIONS)", (r"d", "d"), (rf"\theta - p_{{{steps}}}", f"theta - p_{steps}")),
        Step("closed form", (r"d", "d"),
             (rf"\left({i1[0]} - {jac_tex}\right) \left(\theta - c_{{s}}\right)", f"({i1[1]} - {jac_txt}) (theta - c_s)")),
        Step("explicitly", (r"d", "d"), scalar_or_matrix(tidy(closed, dim))),
    ]
    return Derivation(
        name=name,
        params={"dim": dim, "steps": steps},
        title="Reptile direction on a quadratic task",
        summary=(
            f"Reptile (Nichol et al. 2018): K = {steps} SGD steps from theta on the task loss; the direction is "
            "theta - p_K (not the gradient of any meta-loss; meta_loss holds L_s(p_K))."
        ),
        symbols=t.symbols,
        arrays=t.arrays,
        wrt=[("theta", (dim,))],
        wrt_symbols=list(q.theta),
        meta_loss=quadratic_loss(iterates[-1], q.A_s, q.c_s),
        meta_gradient=direction,
        steps=sym_steps,
        is_gradient=False,
        extras={"iterates": iterates, "closed_form_direction": closed},
        latex_names=t.latex_names,
    )


def quadratic_newton_maml(dim: int = 1, steps: int = 1) -> Derivation:
    """Newton-MAML on one quadratic task: ``p_{k+1} = p_k - alpha (A_s + delta I)^{-1} A_s (p_k - c_s)``.

    The Hessian-preconditioned inner step of CONVENTIONS with damping
    ``delta``. On a quadratic the third derivatives vanish, so the exact
    meta-gradient is ``(I - alpha (A_s + delta I)^{-1} A_s)^K A_q (p_K - c_q)``
    (the matrices commute, so the product is symmetric). With ``alpha = 1,
    delta = 0`` one step lands on ``c_s``. Symbols: those of
    :func:`quadratic_maml` and ``delta``.
    """
    name = "quadratic-newton-maml"
    dim = check_size(name, "dim", dim)
    steps = check_size(name, "steps", steps)
    t = SymbolTable()
    q = quadratic_symbols(t, dim)
    alpha = t.scalar("alpha", r"\alpha")
    delta = t.scalar("delta", r"\delta", nonnegative=True)
    order = [*q.theta, alpha, delta, *_unique(q.A_s), *q.c_s, *_unique(q.A_q), *q.c_q]
    t.symbols = {s.name: s for s in order}
    damped = q.A_s + delta * sp.eye(dim)
    P = damped.inv(method="ADJ").applyfunc(sp.cancel) * q.A_s  # (A_s + delta I)^{-1} A_s
    iterates = [q.theta]
    for _ in range(steps):
        p = iterates[-1]
        iterates.append(p - alpha * P * (p - q.c_s))
    p_K = iterates[-1]
    meta_loss = quadratic_loss(p_K, q.A_q, q.c_q)
    grad = gradient(meta_loss, list(q.theta))
    M = sp.eye(dim) - alpha * P
    chain = (M.T) ** steps * q.A_q * (p_K - q.c_q)
    a_s, i1 = _hess(dim), _identity(dim)
    inv = rf"\left({a_s[0]} + \delta {i1[0]}\right)^{{-1}}"
    m_tex, m_txt = _prod_power(rf"{i1[0]} - \alpha {inv} {a_s[0]}", f"{i1[1]} - alpha ({a_s[1]} + delta)^-1 {a_s[1]}", steps)
    sym_steps = _loss_steps(dim) + [
        Step("initialisation", ("p_{0}", "p_0"), (r"\theta", "theta")),
        Step("damped Newton step (H_s = A_s constant)", ("p_{k+1}", "p_{k+1}"),
             (rf"p_{{k}} - \alpha {inv} {a_s[0]} \left(p_{{k}} - c_{{s}}\right)",
              f"p_k - alpha ({a_s[1]} + delta)^-1 {a_s[1]} (p_k - c_s)")),
        Step("meta-loss", (rf"\mathcal{{L}}(\theta)", "L(theta)"), (rf"L_{{q}}(p_{{{steps}}})", f"L_q(p_{steps})")),
        Step("chain rule; third derivatives of a quadratic vanish", (r"\nabla_{\theta} \mathcal{L}", "grad L"),
             (rf"{m_tex} {_hess(dim, 'q')[0]} \left(p_{{{steps}}} - c_{{q}}\right)",
              f"{m_txt} {_hess(dim, 'q')[1]} (p_{steps} - c_q)")),
        Step("explicitly", (r"\nabla_{\theta} \mathcal{L}", "grad L"), scalar_or_matrix(tidy(chain, dim))),
    ]
    return Derivation(
        name=name,
        params={"dim": dim, "steps": steps},
        title="Newton-MAML (damped) on a quadratic task",
        summary=(
            f"Newton-MAML: K = {steps} Hessian-preconditioned inner steps p - alpha (H_s + delta I)^-1 grad L_s; "
            "on a quadratic H_s = A_s is constant, so the third-derivative term of the exact meta-gradient vanishes."
        ),
        symbols=t.symbols,
        arrays=t.arrays,
        wrt=[("theta", (dim,))],
        wrt_symbols=list(q.theta),
        meta_loss=meta_loss,
        meta_gradient=grad,
        steps=sym_steps,
        extras={"iterates": iterates, "chain_rule_gradient": chain, "preconditioned_hessian": P},
        latex_names=t.latex_names,
    )


def quadratic_imaml(dim: int = 1) -> Derivation:
    """iMAML (Rajeswaran et al. 2019) on one quadratic task, with the exact proximal solution.

    ``phi* = argmin_phi L_s(phi) + lam/2 ||phi - theta||^2 = (A_s + lam I)^{-1} (A_s c_s + lam theta)``;
    meta-loss ``L_q(phi*)``; the meta-gradient by direct differentiation equals
    the implicit formula ``(I + A_s/lam)^{-1} grad L_q(phi*)`` (kept in
    ``extras["implicit_gradient"]``). Symbols: ``theta, lam`` and the task.
    """
    name = "quadratic-imaml"
    dim = check_size(name, "dim", dim)
    t = SymbolTable()
    q = quadratic_symbols(t, dim)
    lam = t.scalar("lam", r"\lambda", positive=True)
    order = [*q.theta, lam, *_unique(q.A_s), *q.c_s, *_unique(q.A_q), *q.c_q]
    t.symbols = {s.name: s for s in order}
    I = sp.eye(dim)
    inv = (q.A_s + lam * I).inv(method="ADJ").applyfunc(sp.cancel)
    phi = (inv * (q.A_s * q.c_s + lam * q.theta)).applyfunc(sp.cancel)
    meta_loss = quadratic_loss(phi, q.A_q, q.c_q)
    grad = gradient(meta_loss, list(q.theta))
    implicit = (I + q.A_s / lam).inv(method="ADJ") * (q.A_q * (phi - q.c_q))
    stationarity = q.A_s * (phi - q.c_s) + lam * (phi - q.theta)
    a_s, i1 = _hess(dim), _identity(dim)
    sym_steps = _loss_steps(dim) + [
        Step("proximal inner problem", (r"\phi^{*}(\theta)", "phi*(theta)"),
             (r"\arg\min_{\phi}\ L_{s}(\phi) + \tfrac{\lambda}{2} \lVert \phi - \theta \rVert^{2}",
              "argmin_phi L_s(phi) + lam/2 ||phi - theta||^2")),
        Step("stationarity solved exactly", (r"\phi^{*}", "phi*"),
             (rf"\left({a_s[0]} + \lambda {i1[0]}\right)^{{-1}} \left({a_s[0]} c_{{s}} + \lambda \theta\right)",
              f"({a_s[1]} + lam)^-1 ({a_s[1]} c_s + lam theta)")),
        Step("", (r"\phi^{*}", "phi*"), scalar_or_matrix(phi)),
        Step("meta-loss", (r"\mathcal{L}(\theta)", "L(theta)"), (r"L_{q}(\phi^{*}(\theta))", "L_q(phi*(theta))")),
        Step("implicit function theorem", (r"\nabla_{\theta} \mathcal{L}", "grad L"),
             (rf"\left({i1[0]} + \tfrac{{1}}{{\lambda}} {a_s[0]}\right)^{{-1}} \nabla L_{{q}}(\phi^{{*}})",
              f"({i1[1]} + {a_s[1]}/lam)^-1 grad L_q(phi*)")),
        Step("explicitly (direct differentiation)", (r"\nabla_{\theta} \mathcal{L}", "grad L"),
             scalar_or_matrix(grad.applyfunc(sp.factor) if dim == 1 else grad)),
    ]
    return Derivation(
        name=name,
        params={"dim": dim},
        title="iMAML on a quadratic task (exact proximal solution)",
        summary=(
            "iMAML (Rajeswaran et al. 2019): the adapted parameters minimise the support loss plus a proximal "
            "term lam/2 ||phi - theta||^2; on a quadratic the minimiser is a linear solve, so the meta-gradient by "
            "direct differentiation can be compared with the implicit-function formula."
        ),
        symbols=t.symbols,
        arrays=t.arrays,
        wrt=[("theta", (dim,))],
        wrt_symbols=list(q.theta),
        meta_loss=meta_loss,
        meta_gradient=grad,
        steps=sym_steps,
        extras={"phi_star": phi, "implicit_gradient": implicit, "stationarity_residual": stationarity},
        latex_names=t.latex_names,
    )
