"""``verify.audit``: check someone's meta-gradient implementation and name the bug.

The calling contract (``docs/audit.md`` has complete examples):

* PyTorch, ``maml``/``fomaml``/``anil``: ``fn(model, tasks, inner_lr, inner_steps)``;
  ``model`` is a float64 ``nn.Sequential`` of ``nn.Linear`` and activation
  modules loaded with the reference's initial parameters, ``tasks`` a list of
  objects with tensor attributes ``x_support, y_support, x_query, y_query``.
  ``fn`` returns the meta-loss (mean over tasks) as a scalar tensor, which is
  differentiated with respect to ``model.parameters()``; or ``(loss, grads)``;
  or it calls ``.backward()`` itself and leaves the gradients in ``.grad``.
  ``metasgd``: ``fn(model, lrs, tasks, inner_steps)``; ``reptile``:
  ``fn(model, tasks, inner_lr, inner_steps)`` returning the direction;
  ``newton``: ``fn(model, tasks, inner_lr, inner_steps, damping)``; ``imaml``:
  ``fn(model, tasks, lam)``; ``r2d2``/``lrd2``: ``fn(backbone, tasks, lam,
  scale, offset)`` (0-dim tensors requiring grad); ``protonet``/``matchingnet``:
  ``fn(backbone, tasks, n_classes)``. Options the function declares by name
  (``n_classes``, ``bias_column``, ``normalize``, ``form``, ``newton_steps``)
  are passed as keywords.
* JAX: the same with ``model`` replaced by ``(params, apply_fn)``:
  ``fn(params, apply_fn, tasks, inner_lr, inner_steps)`` returning a scalar
  (differentiated with ``jax.value_and_grad``) or ``(loss, grads)``.

The verdict (float64): the meta-loss against the reference first, then the
meta-gradient per tensor against the reference (normwise relative error,
tolerance ``tolerance("float64", "reference_match", condition=kappa)`` with
``kappa`` the sensitivity of the reference gradient to rounding its inputs),
and independently against directional derivatives of the function's **own**
meta-loss (complex step where the function accepts complex input, else
Richardson extrapolation; :func:`verify.check_gradient`), so that a
disagreement says which side is wrong. On a mismatch the diagnosis catalogue
(:mod:`verify.auditing.diagnosis`) names the bug when a known-wrong variant explains
the claimed gradient.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from reference.errors import InvalidInputError
from reference.models import MLP, flatten
from verify._verdict import FAIL, INCONCLUSIVE, PASS
from verify.algorithms import ALGORITHMS, Case, auditable, evaluate
from verify.auditing.diagnosis import diagnose
from verify.auditing.harness import Harness, infer_backend, make_harness, short
from verify.auditing.problem import BACKENDS, build_problem
from verify.auditing.result import AuditResult, TensorCheck
from verify.tolerance import tolerance

__all__ = ["audit"]

# ---------------------------------------------------------------------------
# the audit
# ---------------------------------------------------------------------------


def _which_side(loss_ok: bool | None, ref_ok: bool, own: str | None, algorithm: str) -> str:
    if own is None:
        return ("" if ref_ok else f"{algorithm}'s direction is defined, not derived: it is compared with the "
                "reference only")
    own_ok = own == PASS
    if ref_ok and own_ok:
        return "the gradient matches the reference and finite differences of the function's own meta-loss"
    if ref_ok and own == INCONCLUSIVE:
        return "the gradient matches the reference; finite differences of the function's meta-loss were inconclusive"
    if ref_ok:
        return ("the gradient matches the reference but not finite differences of the meta-loss the function "
                "returns: the returned loss is not the function that was differentiated")
    if own_ok:
        if loss_ok is False:
            return ("the gradient is the exact gradient of the function's own meta-loss, but that meta-loss is not "
                    f"{algorithm}'s: the forward computation (the inner loop or the loss) differs from the algorithm")
        return ("the gradient is the gradient of the function's own meta-loss, which agrees with the reference at "
                "this point but not nearby: the forward computation differs from the algorithm")
    if own == INCONCLUSIVE:
        return "the gradient disagrees with the reference; finite differences of the function's meta-loss were inconclusive"
    if loss_ok is False:
        return ("the gradient disagrees with the reference and is not the gradient of the function's own meta-loss, "
                "which also differs from the reference: both the forward and the backward computation are wrong")
    return ("the meta-loss matches the reference but the gradient is not the gradient of that meta-loss: the "
            "backward pass (what is differentiated) is wrong")


def audit(
    fn: Callable[..., Any],
    algorithm: str,
    backend: str | None = None,
    *,
    model: str | MLP | None = None,
    loss: str | None = None,
    inner_lr: float | None = None,
    inner_steps: int | None = None,
    n_tasks: int | None = None,
    shots: int | None = None,
    queries: int | None = None,
    n_way: int | None = None,
    lam: float | None = None,
    scale: float | None = None,
    offset: float | None = None,
    damping: float | None = None,
    bias_column: bool | None = None,
    normalize: bool | None = None,
    form: str | None = None,
    newton_steps: int | None = None,
    seed: int = 0,
    directions: int = 4,
    thorough: bool = False,
    title: str = "",
    case: Case | None = None,
    approximation: str | None = None,
) -> AuditResult:
    """Audit a meta-gradient implementation ``fn`` of ``algorithm`` against the reference.

    Builds a seeded random problem (or uses ``case``), calls ``fn`` under the
    calling contract of the backend (module docstring), and compares its
    meta-loss and meta-gradient with the analytic reference and its gradient
    with directional derivatives of its own meta-loss; on a mismatch, names the
    bug from the diagnosis catalogue (:mod:`verify.auditing.diagnosis`).

    Args:
        fn: the implementation under audit.
        algorithm: ``maml``, ``fomaml``, ``anil``, ``metasgd``, ``reptile``,
            ``newton``, ``imaml``, ``r2d2``, ``lrd2``, ``protonet``, ``matchingnet``.
        backend: ``"torch"`` or ``"jax"``; default: ``"jax"`` when ``fn``'s
            second parameter is named ``apply_fn``, else ``"torch"``.
        model: ``"mlp:1-40-40-1:tanh[:nobias]"`` or a ``reference.models.MLP``;
            default: a small random MLP drawn from ``seed``.
        loss: ``"mse"`` or ``"ce"`` (gradient-based algorithms).
        inner_lr, inner_steps, n_tasks, shots, queries, n_way, lam, scale,
            offset, damping, bias_column, normalize, form, newton_steps: the
            problem; unspecified values are drawn from ``seed`` within ranges
            where the algorithm is well posed (:func:`verify.algorithms.build_case`).
        seed: seed of the problem and of the random directions.
        directions: random directions of the full independent finite-difference check
            (0 skips every finite-difference check: for expensive functions; the verdict then
            rests on the reference).
        thorough: run the full finite-difference check (``directions`` random directions)
            even when the meta-loss and meta-gradient match the reference. By default
            (``False``) the full check runs only on a mismatch, where it says which side is
            wrong, and a match gets the fast check (:func:`verify.check_gradient` with
            ``budget="fast"``: one direction along the claimed gradient plus a random one,
            about 11 evaluations of the function's meta-loss); a fast check that is not
            conclusive is followed by the full one.
        title: a label for reports.
        case: a ready :class:`verify.algorithms.Case` (overrides the problem arguments).
        approximation: a declared approximation (:mod:`verify.inner_audit`): ``first_order``,
            ``truncated:K``, ``stop_gradient``, ``inner_steps:N`` (``+``-joined) for maml, anil,
            maml-momentum, maml-adam, anil-adam; ``cg:M``, ``inner_steps:N``, ``damping:D`` (the
            iMAML authors' solver, inner step ``inner_lr``, default 0.05) for imaml. The claimed
            gradient is then verified against the declared approximation's reference, and the
            result carries the declared gradient's distance from the exact one (relative error and
            cosine). ``None``/``"exact"``: the exact meta-gradient (an undeclared approximation is a
            mismatch and is named by the diagnosis).

    Returns:
        An :class:`AuditResult`; ``result.passed`` is the verdict.

    Raises:
        InvalidInputError: unknown algorithm/backend, backend not installed, bad problem.
        AuditInputError: ``fn`` raised (the message holds its traceback), returned a
            non-scalar or non-finite meta-loss, or the wrong number or shape of gradients.
    """
    from verify._check import _check_gradient, check_gradient
    from verify.backends import load_backend
    from verify.matrix import float32_condition, locate

    t0 = time.perf_counter()
    if not callable(fn):
        raise InvalidInputError(f"fn={short(fn)} is not callable; pass the function to audit")
    if algorithm not in auditable():
        raise InvalidInputError(f"algorithm={algorithm!r} cannot be audited; choose one of {', '.join(auditable())}")
    if ALGORITHMS[algorithm].audit:
        raise InvalidInputError(f"algorithm={algorithm!r} has an audit of its own with another calling contract: "
                                f"use {ALGORITHMS[algorithm].audit} (or metaverify audit FILE.py:fn --algorithm "
                                f"{algorithm})")
    backend = backend or infer_backend(fn)
    if backend not in BACKENDS:
        raise InvalidInputError(f"backend={backend!r} is unknown; choose 'torch' or 'jax'")
    if not isinstance(thorough, (bool, np.bool_)):
        raise InvalidInputError(f"thorough={thorough!r} must be True or False")
    if isinstance(directions, bool) or not isinstance(directions, int) or directions < 0:
        raise InvalidInputError(f"directions={directions!r} must be an integer >= 0 (0 skips the finite-difference "
                                "check of the function's own meta-loss)")
    load_backend(backend)  # a clear error with the install hint when missing
    decl = None
    solver_lr = None
    if approximation is not None and str(approximation).strip() not in ("", "exact"):
        from verify import inner_audit

        decl = inner_audit.declare(algorithm, str(approximation))  # a usage error before any work
        if decl.kind == "imaml":  # iMAML's case has no inner_lr: it is the authors' solver's step
            solver_lr, inner_lr = inner_lr, None
    if case is None:
        hyper = {k: v for k, v in dict(inner_lr=inner_lr, inner_steps=inner_steps, lam=lam, scale=scale,
                                       offset=offset, damping=damping, bias_column=bias_column,
                                       normalize=normalize, form=form, newton_steps=newton_steps).items()
                 if v is not None}
        case = build_problem(algorithm, model=model, loss=loss, n_tasks=n_tasks, shots=shots, queries=queries,
                              n_way=n_way, seed=seed, hyper=hyper)
    elif case.algorithm != algorithm:
        raise InvalidInputError(f"case.algorithm={case.algorithm!r} differs from algorithm={algorithm!r}")

    ref_loss, ref_grads = evaluate(case)
    ref = flatten([np.asarray(g, dtype=float) for g in ref_grads])
    target = None
    if decl is not None:
        from verify import inner_audit

        # Verify against the declared approximation; the exact gradient stays for the distance and the
        # condition estimate (the declared one is a perturbation of it, computed the same way).
        target = inner_audit.declared_target(case, decl, ref_grads, inner_lr=solver_lr)
    try:
        cond = float32_condition(case, ref)
    except Exception:  # rounding made the problem singular: no estimate, the table value stands
        cond = 1.0
    why = "the reference gradient's relative change when its inputs are rounded to float32, in units of float32's eps"
    row = ALGORITHMS[algorithm]
    if row.condition is not None:
        # e.g. iMAML: the implicit gradient goes through (I + H/lam)^{-1}, so forward errors scale with its
        # condition (the row's condition estimate).
        kappa, why_row = row.condition(case)
        if kappa > cond:
            cond, why = kappa, why_row
    tol = tolerance("float64", "reference_match", condition=cond)
    reason = "float64 'reference_match' = eps^(3/4)" + (f" x condition estimate {cond:.3g} ({why})" if cond > 1 else "")

    if target is not None:
        ref_loss, ref_grads = target.loss, target.grads
        reason += f"; against the declared approximation {target.label}"
    harness: Harness = make_harness(backend, fn, case)
    claim = harness.claim()
    g = flatten(claim.grads)

    loss_check = None
    loss_ok: bool | None = None
    if claim.loss is not None and ref_loss is not None:
        err = abs(claim.loss - float(ref_loss)) / max(abs(float(ref_loss)), np.finfo(float).tiny)
        loss_ok = err <= tol
        loss_check = {"status": PASS if loss_ok else FAIL, "reference": float(ref_loss), "got": claim.loss,
                      "error": err, "tolerance": tol}

    scale_ = max(float(np.max(np.abs(ref), initial=0.0)), np.finfo(float).tiny)
    tensors = []
    offset_ = 0
    for name, shape, got, want, miss in zip(case.names, case.shapes, claim.grads, ref_grads, claim.missing):
        got, want = np.asarray(got, dtype=float).ravel(), np.asarray(want, dtype=float).ravel()
        diff = np.abs(got - want)
        idx = int(np.argmax(diff)) if diff.size else 0
        err = float(diff[idx]) / scale_ if diff.size else 0.0
        tensors.append(TensorCheck(name, tuple(shape), PASS if err <= tol else FAIL, err,
                                   locate(case, offset_ + idx), float(want[idx]), float(got[idx]), miss))
        offset_ += got.size
    ref_ok = all(t.status == PASS for t in tensors)

    independent = None
    own_status = None
    # A declared approximation's gradient is not the derivative of the meta-loss (only inner_steps:N is:
    # the exact gradient of a shorter loop), so the own-loss check would fail by design.
    own_check = decl is None or decl.differentiable
    if ALGORITHMS[algorithm].differentiable and claim.loss is not None and directions > 0 and own_check:
        own, x_own = harness.own_loss(), flatten(case.variables)
        v = None
        used, budget = directions, "thorough"
        if not thorough and ref_ok and loss_ok is not False:
            # The reference already confirms the gradient (to ~1e-12); the own-loss check only has to
            # confirm that the returned loss is the function that was differentiated: one direction
            # along the claimed gradient (plus a random part), without the kink probe and the noise
            # probes (both only matter for verdicts other than "pass"): 5 meta-loss evaluations
            # (central differences) or 3 (complex step). The full check (below) is for
            # mismatches, where it says which side is wrong, and for a fast check that did not pass.
            fast = _check_gradient(own, g, x_own, seed=seed, method="central" if backend == "torch" else None,
                                   budget="fast", probe_kinks=False, noise_probes=0)
            if fast.status == PASS:
                v, used, budget = fast, 1, "fast"
        if v is None:
            method = "richardson" if backend == "torch" else None
            v = check_gradient(own, g, x_own, directions=directions, seed=seed, method=method)
        own_status = v.status
        independent = {"status": v.status, "method": v.method or "finite-difference", "error": v.error,
                       "tolerance": v.tolerance, "reason": v.reason, "directions": used, "budget": budget}

    status = PASS if (ref_ok and loss_ok is not False and own_status != FAIL) else FAIL
    diagnosis = None
    if status == FAIL and not (ref_ok and loss_ok is not False):
        if decl is None:
            diagnosis = diagnose(case, claim.loss, claim.grads, missing=claim.missing, reference_loss=ref_loss,
                                 reference_grads=ref_grads, tol=tol)
        else:
            diagnosis = _declared_diagnosis(case, decl, claim.grads, solver_lr, cond)
    side = _which_side(loss_ok, ref_ok and loss_ok is not False, own_status, algorithm)
    if decl is not None and not own_check:
        side = (f"the declared approximation {decl.label}'s gradient is not the derivative of the meta-loss: the "
                "claimed gradient is compared with the reference's declared approximation only")
    return AuditResult(status, algorithm, backend, case.describe(), case.seed, tol, reason, cond, loss_check,
                       tensors, independent, side, diagnosis, claim.source, claim.notes, title,
                       time.perf_counter() - t0, approximation=target.label if target else "",
                       distance_from_exact=target.distance_from_exact if target else None)


def _declared_diagnosis(case: Case, decl: Any, grads: Any, solver_lr: float | None, cond: float) -> Any:
    """Name what a gradient that misses its declared approximation computes (:mod:`verify.inner_audit`)."""
    from verify import inner_audit
    from verify.auditing.diagnosis import Diagnosis

    n = len(case.params)
    r = inner_audit.name_declared_mismatch(case, decl, [np.asarray(g, dtype=float) for g in grads[:n]],
                                           inner_lr=solver_lr, condition=cond)
    if r.passed or r.diagnosis is None:
        return None
    err = float(dict(r.matches).get(r.diagnosis, r.error_vs_declared))
    if r.diagnosis == "exact":
        detail = (f"the exact meta-gradient: the declared approximation {decl.label} was not applied. The claimed "
                  f"gradient matches the exact one to rel {err:.1e} (tol {r.tolerance:.1e})")
        cause = f"the declaration does not describe the code: drop --approximation, or apply {decl.label}"
    else:
        detail = (f"{r.diagnosis}, not the declared {decl.label}: {r.explanation}. The claimed gradient matches "
                  f"this variant to rel {err:.1e} (tol {r.tolerance:.1e})")
        cause = f"the implementation computes {r.diagnosis} where {decl.label} was declared"
    return Diagnosis("approximation_mismatch", r.diagnosis, detail, cause, {}, err, r.tolerance,
                     tuple(m for m, _ in r.matches[1:]))
