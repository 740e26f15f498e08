"""Judge a claimed inner-loop meta-gradient against the exact one or a *declared* approximation.

The Python side of ``metaverify audit ... --approximation first_order |
truncated:K | stop_gradient | inner_steps:N`` for the optimiser-driven inner
loop (:mod:`reference.inner_optim`). Given a problem (model, ``theta``, tasks,
per-step rates, optimiser, multi-step weights) and the gradient a user's code
returned, :func:`audit_inner_loop`

1. computes the exact meta-gradient and the declared approximation's (the
   reference's switches: the approximation is defined as the ``detach`` a
   framework would apply, so a correct implementation of it matches to
   round-off);
2. verifies the claimed gradient against the *declared* one: verdict "matches
   the declared approximation; distance from exact X" (relative error and
   cosine of the declared gradient against the exact one);
3. on a mismatch (an undeclared approximation is still a mismatch), names the
   computation the claimed gradient does match, from a catalogue of the
   family's bugs: Adam ``eps`` placement, optimiser state detached between
   steps, second derivatives dropped, BPTT truncated at the wrong length, the
   multi-step loss weights ignored, a different number of inner steps, the
   momentum buffer's first step, per-step learning rates shared across steps
   (on the learning-rate gradient).

The audit's rows (``metaverify audit --approximation``, :func:`declare`): ``maml``, ``anil`` and the
optimiser rows judge ``dL/dtheta``; ``metasgd``, ``mamlpp``, ``lstm-optimizer`` and ``meta-lstm`` every
differentiated variable (:func:`case_gradients`: the rates, a learned optimiser's ``phi``).

Matching is normwise relative difference ``<= tolerance(dtype,
"reference_match") * condition`` over the concatenated gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from reference import inner_optim
from reference.errors import InvalidInputError
from reference.inner_optim import Approximation, MetaGradient
from reference.optimizers import Adam, Momentum
from verify.tolerance import tolerance

__all__ = ["Candidate", "CaseDeclaration", "DeclaredTarget", "InnerLoopAudit", "InnerLoopProblem", "audit_imaml",
           "audit_inner_loop", "case_gradients", "declare", "declared_target", "distance", "name_declared_mismatch",
           "parse_declared"]


@dataclass(frozen=True)
class InnerLoopProblem:
    """What the user's code computes: the loop of :func:`reference.inner_optim.meta_loss_and_grad`."""

    model: Any
    params: Sequence[np.ndarray]
    tasks: Sequence[Any]
    lrs: Sequence[Sequence[Any]]
    inner_steps: int
    optimizer: Any = None
    weights: Any = None

    def gradient(self, approximation: Approximation | None = None, **changes: Any) -> MetaGradient:
        """The reference gradient of this problem, or of a variant (``changes`` replace fields)."""
        pb = replace(self, **changes) if changes else self
        return inner_optim.meta_loss_and_grad(pb.model, pb.params, pb.tasks, pb.lrs, pb.inner_steps,
                                              optimizer=pb.optimizer, weights=pb.weights,
                                              approximation=approximation)


@dataclass(frozen=True)
class Candidate:
    """A named computation a claimed gradient may match (the exact one, the declared one, or a known bug)."""

    name: str
    explanation: str
    compute: Callable[[], MetaGradient] = field(repr=False)
    on: str = "params"  # which gradient the candidate is judged on: "params" or "lrs"


@dataclass
class InnerLoopAudit:
    """The verdict: ``status`` ``"pass"``/``"fail"``, the sentence, and the measured figures."""

    status: str
    verdict: str
    declared: str
    error_vs_declared: float
    tolerance: float
    distance_from_exact: dict[str, float]
    diagnosis: str | None = None
    explanation: str | None = None
    matches: list[tuple[str, float]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def __str__(self) -> str:
        lines = [f"{self.status.upper()}: {self.verdict}"]
        if self.diagnosis:
            lines.append(f"diagnosis: {self.diagnosis}: {self.explanation}")
        return "\n".join(lines)


def _flat(tree: Sequence[Any]) -> np.ndarray:
    parts = [np.ravel(np.asarray(x, dtype=float)) for x in tree if x is not None]
    return np.concatenate(parts) if parts else np.zeros(0)


def _flat_lrs(lrs: Sequence[Sequence[Any]]) -> np.ndarray:
    return _flat([a for row in lrs for a in row])


def distance(a: Sequence[Any], b: Sequence[Any]) -> dict[str, float]:
    """``{"relative": ||a - b|| / max(||a||, ||b||), "cosine": <a, b> / (||a|| ||b||)}`` over flattened lists."""
    x, y = _flat(a), _flat(b)
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        return {"relative": float("nan"), "cosine": float("nan")}
    rel = float(np.linalg.norm(x - y)) / max(nx, ny) if max(nx, ny) > 0 else 0.0
    cos = float(x @ y) / (nx * ny) if nx > 0 and ny > 0 else float("nan")
    return {"relative": rel, "cosine": cos}


def parse_declared(text: str | Approximation | None, steps: int) -> tuple[Approximation, int]:
    """``(switches, inner steps)`` of a declaration: ``Approximation.parse`` plus ``inner_steps:N``."""
    if text is None:
        return inner_optim.EXACT, steps
    if isinstance(text, Approximation):
        return text, steps
    parts = [p.strip() for p in str(text).split("+")]
    n = steps
    rest = []
    for p in parts:
        if p.startswith("inner_steps:"):
            try:
                n = int(p.split(":", 1)[1])
            except ValueError:
                raise InvalidInputError(f"approximation={text!r}: {p!r} needs an integer, e.g. inner_steps:3") from None
            if n < 1:
                raise InvalidInputError(f"approximation={text!r}: inner_steps must be >= 1")
        else:
            rest.append(p)
    return Approximation.parse("+".join(rest) or "exact"), n


def _with_steps(pb: InnerLoopProblem, n: int) -> dict[str, Any]:
    """Field changes that run ``n`` inner steps (rates and weights cut or extended with the last entry)."""
    if n == pb.inner_steps:
        return {}
    lrs = [list(pb.lrs[min(k, len(pb.lrs) - 1)]) for k in range(n)]
    weights = None
    if pb.weights is not None:
        w = np.asarray(pb.weights, dtype=float)
        weights = np.concatenate([w, np.full(max(0, n - len(w)), w[-1])])[:n]
    return {"lrs": lrs, "inner_steps": n, "weights": weights}


def catalogue(pb: InnerLoopProblem, declared: Approximation, declared_steps: int) -> list[Candidate]:
    """The named computations a wrong gradient of this family is checked against (module notes)."""
    K = pb.inner_steps
    out: list[Candidate] = []
    base = _with_steps(pb, declared_steps)

    def add(name: str, explanation: str, approx: Approximation | None = None, on: str = "params",
            **changes: Any) -> None:
        merged = {**base, **changes}
        out.append(Candidate(name, explanation, lambda: pb.gradient(approx, **merged), on))

    add("exact", "the exact meta-gradient through parameters and optimiser state", inner_optim.EXACT, **{})
    if not declared.first_order:
        add("second derivatives dropped (first_order)",
            "the gradients fed to the optimiser were treated as constants (create_graph=False / stop_gradient)",
            replace(declared, first_order=True))
    if not declared.detach_state:
        add("optimiser state detached between steps (stop_gradient)",
            "momentum buffers / Adam moments / the LSTM state were detached before each step",
            replace(declared, detach_state=True))
    if not declared.is_exact:  # another approximation applied instead of the declared one
        for alt in (inner_optim.Approximation(first_order=True), inner_optim.Approximation(detach_state=True)):
            if alt != declared:
                add(f"{alt} instead of {declared}", f"the code computes {alt} (alone), not the declared {declared}",
                    alt)
    for t in range(0, K):
        if declared.truncate != t:
            what = ("BPTT truncated at the wrong length" if declared.truncate is not None else
                    "backpropagation truncated (undeclared)")
            add(f"{what}: truncated:{t}", f"only the last {t} inner steps were backpropagated "
                f"(declared: {declared.truncate if declared.truncate is not None else 'all'})",
                replace(declared, truncate=t))
    if not declared.is_exact and declared.truncate is None:  # truncated BPTT alone where another was declared
        for t in range(1, K):
            alt = inner_optim.Approximation(truncate=t)
            add(f"{alt} instead of {declared}", f"the code computes {alt} (alone), not the declared {declared}", alt)
    for n in (n for n in range(1, K + 3) if n != declared_steps):
        out.append(Candidate(f"inner_steps:{n}", f"the inner loop ran {n} steps, not {declared_steps}",
                             (lambda n=n: pb.gradient(declared, **_with_steps(pb, n)))))
    if not declared.is_exact:  # a shorter or longer exact loop where an approximation was declared
        for n in (n for n in range(1, K + 3) if n != K):
            out.append(Candidate(f"inner_steps:{n} instead of {declared}", f"the code computes the exact "
                                 f"meta-gradient of {n} inner steps, not the declared {declared}",
                                 (lambda n=n: pb.gradient(None, **_with_steps(pb, n)))))
    if pb.weights is not None and K > 1:
        w = np.zeros(declared_steps)
        w[-1] = 1.0
        add("multi-step loss weights ignored", "only the final query loss L_q(p_K) was differentiated "
            "(MAML++'s sum_k w_k L_q(p_k) ignored)", declared, weights=w)
        add("multi-step loss weights ignored (uniform)", "the multi-step loss used uniform weights 1/K",
            declared, weights=np.full(declared_steps, 1.0 / declared_steps))
    opt = pb.optimizer
    if isinstance(opt, Adam):
        other = "v" if opt.eps_placement == "v_hat" else "v_hat"
        alt = Adam(opt.b1, opt.b2, opt.eps, eps_root=opt.eps_root, weight_decay=opt.weight_decay,
                   decoupled=opt.decoupled, eps_placement=other)
        add("Adam eps placement", "eps added to sqrt(v) before bias correction (Kingma & Ba's eps-hat: "
            "higher, TensorFlow) instead of to sqrt(v_hat) (torch.optim.Adam)" if other == "v" else
            "eps added to sqrt(v_hat) (torch.optim.Adam) instead of to sqrt(v) (eps-hat)", declared, optimizer=alt)
        if opt.eps > 0:
            inside = Adam(opt.b1, opt.b2, 0.0, eps_root=opt.eps, weight_decay=opt.weight_decay,
                          decoupled=opt.decoupled)
            add("Adam eps inside the square root", "sqrt(v_hat + eps) (optax eps_root) instead of sqrt(v_hat) + eps",
                declared, optimizer=inside)
        if opt.weight_decay:
            wd = Adam(opt.b1, opt.b2, opt.eps, eps_root=opt.eps_root, weight_decay=opt.weight_decay,
                      decoupled=not opt.decoupled, eps_placement=opt.eps_placement)
            add("Adam weight decay coupling", "decoupled (AdamW) and L2 (Adam) weight decay confused",
                declared, optimizer=wd)
    if isinstance(opt, Momentum) and opt.dampening:
        alt_m = Momentum(opt.momentum, dampening=opt.dampening, nesterov=opt.nesterov,
                         weight_decay=opt.weight_decay, init="zeros" if opt.init_rule == "torch" else "torch")
        add("momentum buffer's first step", "the first step's buffer was (1 - dampening) g (zero-initialised, "
            "torchopt after its first call) instead of g (torch.optim.SGD)" if opt.init_rule == "torch" else
            "the first step's buffer was g instead of (1 - dampening) g", declared, optimizer=alt_m)
    if K > 1:
        def shared() -> MetaGradient:
            r = pb.gradient(declared, **base)
            tot = [None if a is None else sum(r.lrs[k][i] for k in range(len(r.lrs))) for i, a in enumerate(r.lrs[0])]
            return MetaGradient(r.loss, r.params, [tot for _ in r.lrs], r.optimizer)

        out.append(Candidate("per-step learning rates shared across steps",
                             "one rate per tensor for all steps: every step's rate gradient is the sum over steps",
                             shared, "lrs"))
    return out


def audit_inner_loop(problem: InnerLoopProblem, claimed_params: Sequence[Any], *,
                     claimed_lrs: Sequence[Sequence[Any]] | None = None, approximation: Any = None,
                     dtype: Any = np.float64, condition: float = 1.0,
                     variables: Callable[[MetaGradient], Sequence[Any]] | None = None) -> InnerLoopAudit:
    """Verify ``claimed_params`` (and ``claimed_lrs``) against the declared approximation of ``problem``.

    Args:
        problem: the inner-loop problem the user's code solved.
        claimed_params: the user's ``dL/dtheta``, shaped like ``problem.params``.
        claimed_lrs: optionally the user's ``dL/dlrs[k][i]`` (None entries for tensors not adapted).
        approximation: ``None``/``"exact"`` or a declaration such as ``"truncated:5"``,
            ``"first_order"``, ``"stop_gradient"``, ``"inner_steps:3"`` (``+``-joined).
        dtype: precision of the claimed gradient (selects the tolerance row).
        condition: multiplier of the tolerance for ill-conditioned problems.
        variables: maps a reference :class:`MetaGradient` to the list ``claimed_params`` holds, when the claim
            covers more than ``dL/dtheta`` (:func:`case_gradients`: Meta-SGD's or MAML++'s rates, a learned
            optimiser's ``phi``); default its ``params``.

    Returns:
        :class:`InnerLoopAudit`; ``str()`` of it is the one-paragraph verdict.
    """
    declared, n = parse_declared(approximation, problem.inner_steps)
    tol = tolerance(dtype, "reference_match", condition=condition)
    label = "exact" if declared.is_exact and n == problem.inner_steps else (
        "+".join(p for p in (str(declared) if not declared.is_exact else "",
                             f"inner_steps:{n}" if n != problem.inner_steps else "") if p))

    def held(r: MetaGradient) -> Sequence[Any]:
        return r.params if variables is None else variables(r)

    exact = problem.gradient()
    target = problem.gradient(declared, **_with_steps(problem, n))
    d_exact = distance(held(target), held(exact))
    err = distance(claimed_params, held(target))["relative"]
    err_lrs = distance(_flat_lrs(claimed_lrs), _flat_lrs(target.lrs))["relative"] if claimed_lrs is not None else 0.0
    if err <= tol and err_lrs <= tol:
        if label == "exact":
            verdict = f"matches the exact meta-gradient (relative error {err:.1e}, tolerance {tol:.1e})"
        else:
            verdict = (f"matches the declared approximation {label} (relative error {err:.1e}, tolerance {tol:.1e}); "
                       f"distance from exact {d_exact['relative']:.3g} (cosine {d_exact['cosine']:.4f})")
        return InnerLoopAudit("pass", verdict, label, max(err, err_lrs), tol, d_exact)
    matches = []
    for cand in catalogue(problem, declared, n):
        if cand.name == "exact" and label == "exact":
            continue
        try:
            g = cand.compute()
            mine = held(g)
            if variables is not None and _flat(mine).size != _flat(claimed_params).size:
                continue  # a variant of another shape (MAML++'s (K, n) rates over another K)
        except Exception:  # a variant that does not exist here (e.g. NotDifferentiableError) names nothing
            continue
        if cand.on == "lrs":
            if claimed_lrs is None or err > tol:
                continue
            e = distance(_flat_lrs(claimed_lrs), _flat_lrs(g.lrs))["relative"]
        else:
            e = distance(claimed_params, mine)["relative"]
            if claimed_lrs is not None and _flat_lrs(claimed_lrs).size == _flat_lrs(g.lrs).size:
                e = max(e, distance(_flat_lrs(claimed_lrs), _flat_lrs(g.lrs))["relative"])
        if e <= tol:
            matches.append((cand.name, e, cand.explanation))
    which = f"the declared approximation {label}" if label != "exact" else "the exact meta-gradient"
    verdict = f"does not match {which}: relative error {max(err, err_lrs):.3g} (tolerance {tol:.1e})"
    if matches:
        name, e, why = matches[0]
        if name == "exact":
            verdict += f"; it matches the exact meta-gradient ({e:.1e}): the declared {label} was not applied"
        return InnerLoopAudit("fail", verdict, label, max(err, err_lrs), tol, d_exact, name, why,
                              [(m[0], m[1]) for m in matches])
    return InnerLoopAudit("fail", verdict + "; no catalogued computation matches", label, max(err, err_lrs), tol,
                          d_exact)


# ---------------------------------------------------------------------------
# iMAML: the authors' solver (cg:M, inner_steps:N, damping:D) against the exact implicit gradient
# ---------------------------------------------------------------------------


def audit_imaml(model: Any, params: Sequence[Any], tasks: Sequence[Any], lam: float, claimed: Sequence[Any], *,
                inner_lr: float, approximation: str | None = None, dtype: Any = np.float64,
                condition: float = 1.0) -> InnerLoopAudit:
    """Verify an iMAML meta-gradient against the declared approximation of the authors' solver.

    ``approximation`` ``None`` means the exact implicit gradient
    (:func:`reference.imaml.meta_loss_and_grad`, converged inner problem and
    CG); otherwise ``"cg:M+inner_steps:N+damping:D"``
    (:mod:`reference.imaml_solver`). On a mismatch the catalogue tries other
    CG lengths, inner-loop lengths and the damping dropped or added.
    """
    from reference import imaml, imaml_solver

    tol = tolerance(dtype, "reference_match", condition=condition)
    _, exact = imaml.meta_loss_and_grad(model, params, tasks, lam)

    def approx(d: imaml_solver.Declared) -> list[np.ndarray]:
        return imaml_solver.meta_loss_and_grad(model, params, tasks, lam, inner_lr=inner_lr, declared=d)[1]

    if approximation is None or approximation == "exact":
        target, label, d0 = exact, "exact", None
    else:
        d0 = imaml_solver.Declared.parse(approximation)
        target, label = approx(d0), str(d0)
    d_exact = distance(target, exact)
    err = distance(claimed, target)["relative"]
    if err <= tol:
        verdict = (f"matches the exact meta-gradient (relative error {err:.1e}, tolerance {tol:.1e})" if d0 is None
                   else f"matches the declared approximation {label} (relative error {err:.1e}, tolerance "
                        f"{tol:.1e}); distance from exact {d_exact['relative']:.3g} (cosine {d_exact['cosine']:.4f})")
        return InnerLoopAudit("pass", verdict, label, err, tol, d_exact)
    base = d0 or imaml_solver.Declared()
    n = sum(int(np.size(p)) for p in params)
    candidates: list[tuple[str, str, Callable[[], list[np.ndarray]]]] = []
    if d0 is not None:
        candidates.append(("exact", "the exact implicit gradient (declared approximation not applied)", lambda: exact))
    for m in range(1, min(n, 40) + 1):
        if d0 is None:  # undeclared: the authors' solver with its defaults, named in full
            d = replace(base, cg_steps=m)
            candidates.append((f"undeclared approximation {d}", f"the authors' solver ({m} CG iterations, "
                               f"{d.inner_steps} inner steps) where the exact gradient was claimed",
                               lambda d=d: approx(d)))
        elif m != base.cg_steps:
            candidates.append((f"cg:{m}", f"CG stopped after {m} iterations (declared {label})",
                               lambda m=m: approx(replace(base, cg_steps=m))))
    for s in range(0, 2 * base.inner_steps + 2):
        if d0 is not None and s != base.inner_steps:
            candidates.append((f"inner_steps:{s}", f"the inner loop ran {s} steps, not {base.inner_steps}",
                               lambda s=s: approx(replace(base, inner_steps=s))))
    if d0 is not None and base.damping:
        candidates.append(("damping ignored", "lam_damping left out of the system matrix",
                           lambda: approx(replace(base, damping=0.0))))
    for name, why, fn in candidates:
        try:
            e = distance(claimed, fn())["relative"]
        except Exception:  # an exact solve that does not converge names nothing
            continue
        if e <= tol:
            verdict = f"does not match {'the exact meta-gradient' if d0 is None else 'the declared ' + label}: " \
                      f"relative error {err:.3g} (tolerance {tol:.1e})"
            return InnerLoopAudit("fail", verdict, label, err, tol, d_exact, name, why, [(name, e)])
    which = "the exact meta-gradient" if d0 is None else f"the declared {label}"
    return InnerLoopAudit("fail", f"does not match {which}: relative error {err:.3g} (tolerance {tol:.1e}); "
                          "no catalogued computation matches", label, err, tol, d_exact)


# ---------------------------------------------------------------------------
# The audit's side (``metaverify audit ... --approximation``): a Case of a row
# ---------------------------------------------------------------------------

#: rows whose reference is the optimiser-driven loop (:mod:`reference.inner_optim`):
#: name -> (adapted tensors: "all" or "head", the inner optimiser's factory or None for SGD)
_LOOP_ROWS: dict[str, tuple[str, Callable[[], Any] | None]] = {
    "maml": ("all", None),
    "anil": ("head", None),
    "maml-momentum": ("all", lambda: Momentum(0.9)),
    "maml-adam": ("all", lambda: Adam()),
    "anil-adam": ("head", lambda: Adam()),
}
#: rows whose reference is the same loop with differentiated variables besides ``theta`` (their gradients follow
#: the parameters' in ``case.variables`` order): Meta-SGD's per-parameter rates ``lrs[i]`` (shared by the steps),
#: MAML++'s ``(K, n_tensors)`` rates and multi-step loss, a learned optimiser's ``phi[j]``
_VARIABLE_ROWS = ("metasgd", "mamlpp", "lstm-optimizer", "meta-lstm")
#: declaration parts that mean nothing for a row: row -> {part name: why}
_NOT_APPLICABLE: dict[str, dict[str, str]] = {
    "metasgd": {"stop_gradient": "Meta-SGD's inner loop is plain SGD: it has no optimiser state to detach"},
    "mamlpp": {"stop_gradient": "MAML++'s inner loop is plain SGD: it has no optimiser state to detach",
               "inner_steps": "MAML++'s (K, n_tensors) learning rates fix the number of inner steps (audit another K "
                              "with --inner-steps)"},
}
#: rows whose declared approximation is the iMAML authors' solver (:mod:`reference.imaml_solver`)
_IMAML_ROWS = ("imaml",)
#: the inner step size of the authors' solver when ``--inner-lr`` is not given (their default)
IMAML_SOLVER_LR = 0.05


@dataclass(frozen=True)
class CaseDeclaration:
    """A parsed ``--approximation`` for one audited row: ``kind`` ``"loop"`` or ``"imaml"``."""

    algorithm: str
    text: str
    kind: str
    label: str
    #: the gradient is the exact derivative of the (possibly shorter) loop's loss: only ``inner_steps:N``
    differentiable: bool


def declare(algorithm: str, approximation: str) -> CaseDeclaration:
    """Parse ``approximation`` for ``algorithm`` (before any problem is built).

    Raises:
        InvalidInputError: the declaration is malformed, or does not apply to the
            algorithm (``cg:M`` with MAML, ``first_order`` with iMAML, any with a
            row that has no approximation catalogue).
    """
    text = str(approximation).strip()
    loop_parts = ("first_order", "truncated:K", "stop_gradient", "inner_steps:N")
    if algorithm in _LOOP_ROWS or algorithm in _VARIABLE_ROWS:
        refused = _NOT_APPLICABLE.get(algorithm, {})
        takes = [p for p in loop_parts if p.split(":")[0] not in refused]
        for part in text.split("+"):
            part = part.strip()
            if part.startswith(("cg:", "damping:", "regu:")):
                raise InvalidInputError(
                    f"approximation={text!r}: {part!r} does not apply to algorithm={algorithm!r} (cg:M, damping:D "
                    f"and regu:R are the iMAML authors' solver); {algorithm} takes {', '.join(takes)} joined "
                    "by '+'")
            why = refused.get(part.split(":")[0])
            if why:
                raise InvalidInputError(f"approximation={text!r}: {part!r} does not apply to algorithm={algorithm!r}: "
                                        f"{why}; {algorithm} takes {', '.join(takes)} joined by '+'")
        declared, _ = parse_declared(text, 1)  # validates every part
        steps_only = declared.is_exact
        return CaseDeclaration(algorithm, text, "loop", text, steps_only)
    if algorithm in _IMAML_ROWS:
        for part in text.split("+"):
            part = part.strip()
            if part.split(":", 1)[0] in ("first_order", "truncated", "stop_gradient"):
                raise InvalidInputError(
                    f"approximation={text!r}: {part!r} does not apply to algorithm='imaml'; iMAML's declared "
                    "approximation is the authors' solver: cg:M, inner_steps:N, damping:D (joined by '+', e.g. "
                    "cg:5+inner_steps:16)")
        from reference import imaml_solver

        d = imaml_solver.Declared.parse(text)
        return CaseDeclaration(algorithm, text, "imaml", str(d), False)
    rows = ", ".join((*_LOOP_ROWS, *_VARIABLE_ROWS, *_IMAML_ROWS))
    raise InvalidInputError(f"approximation={text!r} does not apply to algorithm={algorithm!r}: declared "
                            f"approximations are audited for {rows}; drop --approximation to audit the exact "
                            "meta-gradient")


def _loop_problem(case: Any) -> InnerLoopProblem:
    """The :class:`InnerLoopProblem` a row's case describes (``_LOOP_ROWS`` and ``_VARIABLE_ROWS``)."""
    if case.algorithm in _VARIABLE_ROWS:
        return _variable_problem(case)
    which, make = _LOOP_ROWS[case.algorithm]
    alpha = case.hyper["inner_lr"]
    K = int(case.hyper["inner_steps"])
    head = set(getattr(case.model, "head_indices", ())) if which == "head" else None
    rates = [alpha if head is None or i in head else None for i in range(len(case.params))]
    return InnerLoopProblem(case.model, list(case.params), list(case.tasks), [list(rates) for _ in range(K)], K,
                            optimizer=make() if make is not None else None)


def _variable_problem(case: Any) -> InnerLoopProblem:
    from reference.learned_optimizers import LSTMOptimizer, MetaLearnerLSTM
    from reference.mamlpp import schedule

    a, K, n = case.algorithm, int(case.hyper["inner_steps"]), len(case.params)
    params, tasks = list(case.params), list(case.tasks)
    if a == "metasgd":  # p_{k+1} = p_k - lrs * grad: the same array rates at every step
        rates = [np.asarray(case.extra[f"lrs[{i}]"]) for i in range(n)]
        return InnerLoopProblem(case.model, params, tasks, [list(rates) for _ in range(K)], K)
    if a == "mamlpp":
        return InnerLoopProblem(case.model, params, tasks, schedule(case.model, case.extra["lrs"], K), K,
                                weights=np.asarray(case.hyper["weights"], dtype=float))
    phi = [case.extra[f"phi[{j}]"] for j in range(len(case.extra))]
    if a == "lstm-optimizer":
        opt, rate = LSTMOptimizer(phi, hidden=case.hyper["hidden"]), case.hyper["inner_lr"]
    else:  # Ravi & Larochelle: the gates set the step, rate 1
        opt, rate = MetaLearnerLSTM(phi), 1.0
    return InnerLoopProblem(case.model, params, tasks, [[rate] * n for _ in range(K)], K, optimizer=opt)


def case_gradients(case: Any, r: MetaGradient) -> list[np.ndarray]:
    """A loop gradient ``r`` of ``case``'s problem aligned with ``case.variables``: ``dL/dtheta``, then Meta-SGD's
    ``dL/dlrs[i]`` (summed over the steps that share the rate), MAML++'s ``(K, n)`` rate gradient, or ``dL/dphi``."""
    out = [np.asarray(g, dtype=float) for g in r.params]
    if case.algorithm == "metasgd":
        out += [sum(np.asarray(r.lrs[k][i], dtype=float) for k in range(len(r.lrs))) for i in range(len(out))]
    elif case.algorithm == "mamlpp":
        out.append(np.array([[0.0 if x is None else float(np.real(x)) for x in row] for row in r.lrs]))
    elif case.algorithm in ("lstm-optimizer", "meta-lstm"):
        out += [np.asarray(g, dtype=float) for g in r.optimizer]
    return out


@dataclass
class DeclaredTarget:
    """The declared approximation's reference (``loss``, ``grads``) and its distance from the exact gradient."""

    label: str
    loss: float
    grads: list[np.ndarray]
    distance_from_exact: dict[str, float]


def declared_target(case: Any, decl: CaseDeclaration, exact_grads: Sequence[Any], *,
                    inner_lr: float | None = None) -> DeclaredTarget:
    """The reference gradient of ``decl`` on ``case`` (aligned with ``case.variables``).

    ``inner_lr``: the authors' iMAML solver's step (default :data:`IMAML_SOLVER_LR`).
    """
    if decl.kind == "loop":
        pb = _loop_problem(case)
        approx, n = parse_declared(decl.text, pb.inner_steps)
        r = pb.gradient(approx, **_with_steps(pb, n))
        loss, grads = float(np.real(r.loss)), case_gradients(case, r)
    else:
        from reference import imaml_solver

        loss, grads = imaml_solver.meta_loss_and_grad(case.model, case.params, case.tasks, case.hyper["lam"],
                                                      inner_lr=IMAML_SOLVER_LR if inner_lr is None else inner_lr,
                                                      declared=decl.text)
        grads = [np.asarray(g, dtype=float) for g in grads]
    return DeclaredTarget(decl.label, float(loss), grads, distance(grads, exact_grads))


def name_declared_mismatch(case: Any, decl: CaseDeclaration, claimed: Sequence[Any], *,
                           inner_lr: float | None = None, dtype: Any = np.float64,
                           condition: float = 1.0) -> InnerLoopAudit:
    """:func:`audit_inner_loop` / :func:`audit_imaml` of ``claimed`` (aligned with ``case.variables``) on ``case``
    against ``decl``."""
    if decl.kind == "loop":
        if case.algorithm in _VARIABLE_ROWS:  # judged on every differentiated variable (rates, phi)
            return audit_inner_loop(_loop_problem(case), claimed, approximation=decl.text, dtype=dtype,
                                    condition=condition, variables=lambda r: case_gradients(case, r))
        return audit_inner_loop(_loop_problem(case), claimed[:len(case.params)], approximation=decl.text,
                                dtype=dtype, condition=condition)
    return audit_imaml(case.model, case.params, case.tasks, case.hyper["lam"], claimed,
                       inner_lr=IMAML_SOLVER_LR if inner_lr is None else inner_lr, approximation=decl.text,
                       dtype=dtype, condition=condition)
