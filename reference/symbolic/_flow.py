"""The inner loop as a dynamical system: gradient flow on a quadratic task (CONVENTIONS, "Continuous time").

``dp/dt = -grad L_s(p) = -A_s (p - c_s)``, ``p(0) = theta`` has the solution
``p(T) = c_s + exp(-A_s T) (theta - c_s)`` (matrix exponential). The
meta-gradient of ``L_q(p(T))`` follows from the adjoint system
``da/dt = H_s a = A_s a``, ``a(T) = grad L_q(p(T))``, integrated backwards:
``grad = a(0) = exp(-A_s T) A_q (p(T) - c_q)``. MAML with ``K`` steps of size
``T / K`` is the explicit Euler discretisation of the flow and converges to it
at the rate ``O(1/K)``; for ``dim = 1`` the leading error coefficient is derived.
"""

from __future__ import annotations

import sympy as sp

from reference.symbolic._common import check_size, quadratic_loss, quadratic_symbols, scalar_or_matrix
from reference.symbolic._derivation import Derivation, Step, SymbolTable, gradient
from reference.symbolic._quadratic import _unique


def expm_symmetric_2x2(A: sp.Matrix, s: sp.Expr) -> sp.Matrix:
    """``exp(s A)`` for a symmetric 2x2 ``A`` in closed form (Cayley-Hamilton).

    With ``m = tr(A)/2`` and ``d = sqrt(((a00 - a11)/2)^2 + a01^2)`` (half the
    eigenvalue gap): ``exp(s A) = e^{m s} (cosh(d s) I + sinh(d s)/d (A - m I))``.
    Undefined (0/0) at ``d = 0``, i.e. ``A`` a multiple of the identity.
    """
    m = (A[0, 0] + A[1, 1]) / 2
    d = sp.sqrt(((A[0, 0] - A[1, 1]) / 2) ** 2 + A[0, 1] ** 2)
    return sp.exp(m * s) * (sp.cosh(d * s) * sp.eye(2) + sp.sinh(d * s) / d * (A - m * sp.eye(2)))


def gradient_flow_quadratic(dim: int = 1) -> Derivation:
    """Gradient flow on a quadratic support loss, its meta-gradient by the adjoint equation.

    Symbols: ``theta, T, a_s, c_s, a_q, c_q`` for ``dim=1`` (indexed for
    ``dim>1`` as in :func:`quadratic_maml`). ``extras`` hold the adjoint
    solution ``a(t)`` (symbol ``t``; by ``sympy.dsolve`` for ``dim=1``), the
    MAML meta-gradient with ``alpha = T/K`` as a function of the symbol ``K``
    (``maml_meta_gradient``), and for ``dim=1`` the coefficient ``C`` of
    ``g_MAML(K) - g_flow = C / K + O(1/K^2)`` (``maml_error_coefficient``).
    """
    name = "gradient-flow-quadratic"
    dim = check_size(name, "dim", dim)
    t = SymbolTable()
    q = quadratic_symbols(t, dim)
    T = t.scalar("T", "T", positive=True)
    order = [*q.theta, T, *_unique(q.A_s), *q.c_s, *_unique(q.A_q), *q.c_q]
    t.symbols = {s.name: s for s in order}
    time = sp.Symbol("t", real=True)
    K = sp.Symbol("K", integer=True, positive=True)
    if dim == 1:
        E = sp.Matrix([[sp.exp(-q.A_s[0, 0] * T)]])
    else:
        E = expm_symmetric_2x2(q.A_s, -T)
    p_T = q.c_s + E * (q.theta - q.c_s)
    meta_loss = quadratic_loss(p_T, q.A_q, q.c_q)
    grad = gradient(meta_loss, list(q.theta))
    a_T = q.A_q * (p_T - q.c_q)
    if dim == 1:
        a = sp.Function("a")
        sol = sp.dsolve(sp.Eq(a(time).diff(time), q.A_s[0, 0] * a(time)), a(time), ics={a(T): a_T[0]})
        adjoint = sp.Matrix([sol.rhs])
    else:
        adjoint = expm_symmetric_2x2(q.A_s, time - T) * a_T
    adjoint_gradient = adjoint.xreplace({time: 0})
    J = sp.eye(dim) - q.A_s * T / K
    p_K = q.c_s + J**K * (q.theta - q.c_s) if dim == 1 else None
    extras: dict[str, object] = {
        "flow_solution": p_T,
        "adjoint_solution": adjoint,
        "adjoint_gradient": adjoint_gradient,
        "time": time,
        "steps_symbol": K,
    }
    if dim == 1:
        g_K = J[0, 0] ** K * q.A_q[0, 0] * (p_K[0] - q.c_q[0])
        # (1 - a T/K)^K = u0 + u1 / K + O(1/K^2): series of the scalar factor only
        # (cheap), then the first-order term of g_K, which is polynomial in it.
        eps = sp.Symbol("epsilon", positive=True)
        u_series = sp.series((1 - q.A_s[0, 0] * T * eps) ** (1 / eps), eps, 0, 2).removeO()
        u0, u1 = u_series.coeff(eps, 0), u_series.coeff(eps, 1)
        u = sp.Symbol("u")
        g_of_u = u * q.A_q[0, 0] * (q.c_s[0] - q.c_q[0] + u * (q.theta[0] - q.c_s[0]))
        coefficient = sp.factor(sp.diff(g_of_u, u).xreplace({u: u0}) * u1)
        extras["maml_meta_gradient"] = sp.Matrix([g_K])
        extras["maml_error_coefficient"] = coefficient
    a_s = ("a_{s}", "a_s") if dim == 1 else ("A_{s}", "A_s")
    a_q = ("a_{q}", "a_q") if dim == 1 else ("A_{q}", "A_q")
    steps = [
        Step("gradient flow on the support loss", (r"\tfrac{dp}{dt}", "dp/dt"),
             (rf"-\nabla L_{{s}}(p) = -{a_s[0]} \left(p - c_{{s}}\right),\quad p(0) = \theta",
              f"-grad L_s(p) = -{a_s[1]} (p - c_s), p(0) = theta")),
        Step("solution (matrix exponential)", ("p(T)", "p(T)"),
             (rf"c_{{s}} + e^{{-{a_s[0]} T}} \left(\theta - c_{{s}}\right)", f"c_s + exp(-{a_s[1]} T) (theta - c_s)")),
        Step("meta-loss", (r"\mathcal{L}(\theta)", "L(theta)"), (r"L_{q}(p(T))", "L_q(p(T))")),
        Step("adjoint system, integrated from T back to 0", (r"\tfrac{da}{dt}", "da/dt"),
             (rf"H_{{s}}(p(t))\, a = {a_s[0]} a,\quad a(T) = \nabla L_{{q}}(p(T)) = {a_q[0]} \left(p(T) - c_{{q}}\right)",
              f"H_s(p(t)) a = {a_s[1]} a, a(T) = grad L_q(p(T)) = {a_q[1]} (p(T) - c_q)")),
        Step("adjoint solution" + (" (sympy.dsolve)" if dim == 1 else ""), ("a(t)", "a(t)"),
             scalar_or_matrix(adjoint) if dim == 1 else
             (rf"e^{{{a_s[0]} (t - T)}} a(T)", f"exp({a_s[1]} (t - T)) a(T)")),
        Step("meta-gradient", (r"\nabla_{\theta} \mathcal{L} = a(0)", "grad L = a(0)"),
             (rf"e^{{-{a_s[0]} T}} {a_q[0]} \left(p(T) - c_{{q}}\right)", f"exp(-{a_s[1]} T) {a_q[1]} (p(T) - c_q)")),
        Step("explicitly", (r"\nabla_{\theta} \mathcal{L}", "grad L"), scalar_or_matrix(grad)),
        Step("MAML with K steps of size alpha = T/K (explicit Euler)", (r"p_{K}", "p_K"),
             (rf"c_{{s}} + \left(I - \tfrac{{T}}{{K}} {a_s[0]}\right)^{{K}} \left(\theta - c_{{s}}\right) \;\to\; p(T)\ (K \to \infty)",
              f"c_s + (I - T/K {a_s[1]})**K (theta - c_s) -> p(T) as K -> oo")),
    ]
    if dim == 1:
        steps.append(Step("first-order error of MAML's meta-gradient", (r"g_{K} - \nabla_{\theta} \mathcal{L}", "g_K - grad L"),
                          (rf"\tfrac{{1}}{{K}} \left({sp.latex(extras['maml_error_coefficient'], symbol_names=t.latex_names)}\right) + O(K^{{-2}})",
                           f"(1/K) ({sp.sstr(extras['maml_error_coefficient'])}) + O(1/K**2)")))
    return Derivation(
        name=name,
        params={"dim": dim},
        title="Gradient flow on a quadratic task and its adjoint",
        summary=(
            "The inner loop as the ODE dp/dt = -grad L_s(p) up to time T (CONVENTIONS, continuous time); the "
            "meta-gradient of L_q(p(T)) by direct differentiation of the matrix-exponential solution and by the "
            "adjoint equation; MAML with K steps of size T/K converges to it at rate O(1/K)."
        ),
        symbols=t.symbols,
        arrays=t.arrays,
        wrt=[("theta", (dim,))],
        wrt_symbols=list(q.theta),
        meta_loss=meta_loss,
        meta_gradient=grad,
        steps=steps,
        extras=extras,
        latex_names=t.latex_names,
    )
