"""Diagnosis variants of the inner-loop family: MAML, FOMAML, ANIL, Meta-SGD, Reptile, Newton-MAML.

Fixed variants (first-order only, only the first or last step differentiated,
``K' != K`` steps, support and query swapped, no adaptation, ANIL for MAML and
back, Meta-SGD's transposed step Jacobian, Reptile's head-only loop) come from
the reference's own inner loop with its adjoint switched
(:func:`reference.inner_loop.task_loss_and_grad`'s ``keep`` and ``transpose``);
the fitted variant is the effective inner learning rate and a scale,
``g ~ c * G(a)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from reference import inner_loop
from reference.models import flatten
from reference.tasks import Task
from verify.algorithms import Case
from verify.auditing.diagnosis.catalogue import Candidate, close, loss_elements_per_row, rerun, safe, swapped

__all__ = ["fitted", "variants"]

Variant = tuple[str, str, Callable[[], tuple[Any, np.ndarray]]]

GRADIENT_BASED = ("maml", "fomaml", "anil", "metasgd")


def _step_sizes(case: Case, kind: str, rate: Any) -> list[Any]:
    """Per-tensor inner step sizes: MAML ``rate`` everywhere, ANIL on the head, Meta-SGD ``rate * lrs``."""
    n = len(case.params)
    if kind == "maml":
        return [rate] * n
    if kind == "anil":
        head = set(case.model.head_indices)
        return [rate if i in head else None for i in range(n)]
    return [rate * np.asarray(case.extra[f"lrs[{i}]"]) for i in range(n)]


def _unrolled(case: Case, kind: str, rate: Any, *, steps: int | None = None, keep: Callable[[int], bool] = lambda k: True,
              transpose: bool = False, tasks: Sequence[Task] | None = None) -> tuple[Any, np.ndarray]:
    """Meta-loss and meta-gradient of the unrolled inner loop with only the step Jacobians ``keep(k)`` kept.

    The reference's adjoint (:func:`reference.inner_loop.task_loss_and_grad`,
    ``v <- v - H_s(p_k) (a * v)``, exact HVPs), except that a step ``k`` with
    ``keep(k)`` False contributes the identity (its inner gradient treated as a
    constant), and with ``transpose`` the Meta-SGD factor is applied as
    ``a * (H_s v)`` (the transposed Jacobian). Learning-rate gradients
    ``-sum_k grad L_s(p_k) * v_{k+1}`` are appended for Meta-SGD (a detached
    inner gradient still multiplies ``a``).
    """
    model, params = case.model, case.params
    tasks = list(tasks or case.tasks)
    steps = int(case.hyper["inner_steps"] if steps is None else steps)
    lrs = _step_sizes(case, kind, rate)
    lr_grad = kind == "metasgd"
    total, grad, glr = 0.0, None, None
    for t in tasks:
        loss, v, gl = inner_loop.task_loss_and_grad(model, params, t, lrs, steps, lr_grad=lr_grad, keep=keep,
                                                    transpose=transpose)
        total = total + loss
        grad = list(v) if grad is None else [a + b for a, b in zip(grad, v)]
        if gl is not None:
            glr = gl if glr is None else [a + b for a, b in zip(glr, gl)]
    m = len(tasks)
    out = [g / m for g in grad] + ([g / m for g in glr] if glr is not None else [])
    return total / m, flatten(out)


def _reptile(case: Case, kind: str, rate: Any, *, steps: int | None = None,
             tasks: Sequence[Task] | None = None) -> tuple[None, np.ndarray]:
    """Reptile direction ``mean_t (theta - p_K^t)`` with the given step sizes (analytic forward pass)."""
    model, params = case.model, case.params
    tasks = list(tasks or case.tasks)
    steps = int(case.hyper["inner_steps"] if steps is None else steps)
    lrs = _step_sizes(case, kind, rate)
    total = [np.zeros_like(np.asarray(p, dtype=np.result_type(p, rate))) for p in params]
    for t in tasks:
        p_k = inner_loop.adapt(model, params, t.x_support, t.y_support, lrs, steps, keep_iterates=False)[0][0]
        total = [acc + (p - q) for acc, p, q in zip(total, params, p_k)]
    return None, flatten([a / len(tasks) for a in total])



def _newton_first_order(case: Case) -> tuple[Any, np.ndarray]:
    from reference import newton

    h = case.hyper
    total, grad = 0.0, None
    for t in case.tasks:
        p_k = newton.adapt(case.model, case.params, t, h["inner_lr"], h["inner_steps"], h["damping"])
        loss, g = case.model.loss_and_grad_unchecked(p_k, t.x_query, t.y_query)
        total = total + loss
        grad = list(g) if grad is None else [a + b for a, b in zip(grad, g)]
    m = len(case.tasks)
    return total / m, flatten([g / m for g in grad])


def _metasgd_truncated(case: Case, t: int) -> tuple[Any, np.ndarray]:
    """Meta-SGD's meta-gradient with backpropagation through the last ``t`` inner steps only (the declared
    ``truncated:t`` of :mod:`verify.inner_audit`: the optimiser-driven loop with array rates)."""
    from reference.inner_optim import Approximation
    from verify import inner_audit

    r = inner_audit._loop_problem(case).gradient(Approximation(truncate=t))
    return r.loss, flatten(inner_audit.case_gradients(case, r))


def _gradient_kind(algorithm: str) -> str:
    return {"maml": "maml", "fomaml": "maml", "anil": "anil", "metasgd": "metasgd"}.get(algorithm, "maml")


def _base_rate(case: Case) -> float:
    return 1.0 if case.algorithm == "metasgd" else float(case.hyper["inner_lr"])



def variants(case: Case) -> list[Variant]:
    """The fixed variants of this problem: ``(catalogue key, label, () -> (loss, flat grads))``."""
    a = case.algorithm
    out: list[Variant] = []

    def add(key: str, label: str, fn: Callable[[], tuple[Any, np.ndarray]]) -> None:
        out.append((key, label, fn))

    if a in GRADIENT_BASED:
        kind, rate, K = _gradient_kind(a), _base_rate(case), int(case.hyper["inner_steps"])
        first = a == "fomaml"
        keep_all = (lambda k: False) if first else (lambda k: True)
        if first:
            add("second_order_instead", "the exact second-order MAML meta-gradient", lambda: _unrolled(case, kind, rate))
        elif a == "maml":
            add("first_order", "first-order MAML (the reference FOMAML direction)", lambda: rerun(case, "fomaml"))
        else:
            add("first_order", f"first-order {a} (inner gradients treated as constants)",
                lambda: _unrolled(case, kind, rate, keep=lambda k: False))
        if not first and K >= 2:
            add("last_step_only", f"only the last of the {K} inner steps differentiated",
                lambda: _unrolled(case, kind, rate, keep=lambda k: k == K - 1))
            add("first_step_only", f"only the first of the {K} inner steps differentiated",
                lambda: _unrolled(case, kind, rate, keep=lambda k: k == 0))
        for k2 in range(1, max(2 * K, K + 3) + 1):
            if k2 != K:
                add("wrong_inner_steps", f"inner_steps={k2} instead of {K}",
                    lambda k2=k2: _unrolled(case, kind, rate, steps=k2, keep=keep_all))
        add("swapped_support_query", "support and query sets swapped",
            lambda: _unrolled(case, kind, rate, keep=keep_all, tasks=swapped(case.tasks)))
        add("no_adaptation", "no adaptation: the query loss at the initial parameters",
            lambda: _unrolled(case, kind, 0.0, keep=keep_all))
        if a == "maml":
            add("anil_instead_of_maml", "ANIL (head-only inner loop) instead of MAML", lambda: rerun(case, "anil"))
        if a == "anil":
            add("maml_instead_of_anil", "MAML (all layers adapted) instead of ANIL", lambda: rerun(case, "maml"))
        if a == "metasgd":
            add("metasgd_transposed", "Meta-SGD with the step Jacobian transposed (a * (H v) instead of H (a * v))",
                lambda: _unrolled(case, kind, rate, transpose=True))
            for t in range(1, K):  # truncated BPTT: earlier increments a * g detached, rates included
                add("bptt_truncated", f"backpropagation through the last {t} of {K} inner steps only (earlier "
                    "increments lrs * grad detached)", lambda t=t: _metasgd_truncated(case, t))
    elif a == "reptile":
        K, rate = int(case.hyper["inner_steps"]), float(case.hyper["inner_lr"])
        for k2 in range(1, max(2 * K, K + 3) + 1):
            if k2 != K:
                add("wrong_inner_steps", f"inner_steps={k2} instead of {K}",
                    lambda k2=k2: _reptile(case, "maml", rate, steps=k2))
        add("swapped_support_query", "inner loop run on the query set",
            lambda: _reptile(case, "maml", rate, tasks=swapped(case.tasks)))
        add("reptile_head_only", "only the head adapted", lambda: _reptile(case, "anil", rate))
    elif a == "newton":
        K = int(case.hyper["inner_steps"])
        add("first_order", "first-order Newton-MAML (grad L_q(p_K), the inner steps not differentiated)",
            lambda: _newton_first_order(case))
        for k2 in range(1, max(2 * K, K + 3) + 1):
            if k2 != K:
                add("wrong_inner_steps", f"inner_steps={k2} instead of {K}", lambda k2=k2: rerun(case, inner_steps=k2))
        add("swapped_support_query", "support and query sets swapped", lambda: rerun(case, tasks=swapped(case.tasks)))
        add("no_adaptation", "no adaptation: the query loss at the initial parameters",
            lambda: rerun(case, inner_lr=0.0))
    return out


# ---------------------------------------------------------------------------
# fitted variant: the effective inner learning rate (and a scale)
# ---------------------------------------------------------------------------

_RATE_GRID = (0.0625, 0.125, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0, 16.0, 32.0, 64.0)


def _rate_function(case: Case) -> Callable[[Any], tuple[Any, np.ndarray]] | None:
    """``a -> (loss, flat grad)`` of the asked algorithm with inner rate ``a`` (complex ``a`` allowed)."""
    a = case.algorithm
    if a in GRADIENT_BASED:
        kind = _gradient_kind(a)
        keep = (lambda k: False) if a == "fomaml" else (lambda k: True)
        if a == "metasgd":
            # rates r * lrs: the chain rule multiplies the gradient with respect to lrs by r
            n = sum(int(np.size(p)) for p in case.params)

            def scaled(r: Any) -> tuple[Any, np.ndarray]:
                loss, G = _unrolled(case, kind, r, keep=keep)
                return loss, np.concatenate([G[:n], r * G[n:]])

            return scaled
        return lambda r: _unrolled(case, kind, r, keep=keep)
    if a == "reptile":
        return lambda r: _reptile(case, "maml", r)
    if a == "newton":
        return lambda r: rerun(case, inner_lr=r)
    return None


def _fit_rate(case: Case, g: np.ndarray) -> Candidate | None:
    """Fit ``g ~ c * G(a)``: the effective inner learning rate ``a`` and a scale ``c``.

    Grid over ``a`` (``c`` by projection at each point), then Gauss-Newton on
    ``(a, c)`` from the three best grid points with ``dG/da`` by a complex step
    in ``a`` (the reference is analytic in the step size), so the fit converges
    to round-off when ``g`` really is ``c G(a)``.
    """
    fn = _rate_function(case)
    if fn is None:
        return None
    base = _base_rate(case)
    # reduction='sum' scales the rate by the support size n: one effective rate alpha x n only when every task's
    # support set has the same n (else 0: no such rate, no such label)
    support_sizes = {t.x_support.shape[0] for t in case.tasks}
    shots = support_sizes.pop() if len(support_sizes) == 1 else 0
    d_out = loss_elements_per_row(case)  # the support loss's mean runs over rows x d_out
    grid = sorted({base * s * f for f in _RATE_GRID for s in (1.0, -1.0)} | ({base * shots * d_out} if shots else set()))
    gnorm = float(np.linalg.norm(g))
    if gnorm == 0.0:
        return None

    def project(G: np.ndarray) -> tuple[float, float]:
        gg = float(G @ G)
        c = float(G @ g) / gg if gg > 0 else 0.0
        return c, float(np.linalg.norm(g - c * G)) / gnorm

    scored = []
    for r in grid:
        res = safe(lambda r=r: fn(r))
        if res is None or not np.all(np.isfinite(res[1])):
            continue
        c, err = project(np.asarray(res[1], dtype=float))
        scored.append((err, r, c))
    scored.sort()
    best: tuple[float, float, float] | None = None
    # dG/da by a complex step where the network is analytic; for relu (not analytic: complex input is
    # refused) by real central differences. G(a) is piecewise analytic in a (a kink only where a
    # pre-activation crosses zero), so away from a kink the central difference is accurate to ~1e-10,
    # and Gauss-Newton with that approximate Jacobian still converges to the exact root: each step
    # evaluates the residual exactly, only the step direction is approximate (linear convergence at a
    # rate ~ the Jacobian's relative error).
    analytic = getattr(case.model, "is_analytic", True)

    def derivative(r: float) -> tuple[np.ndarray, np.ndarray] | None:
        if analytic:
            h = 1e-20 * max(abs(r), 1e-300)
            res = safe(lambda: fn(complex(r, h)))
            if res is None:
                return None
            z = np.asarray(res[1])
            return z.real, z.imag / h
        h = 1e-6 * max(abs(r), 1e-300)
        mid, up, down = safe(lambda: fn(r)), safe(lambda: fn(r + h)), safe(lambda: fn(r - h))
        if mid is None or up is None or down is None:
            return None
        return (np.asarray(mid[1], dtype=float),
                (np.asarray(up[1], dtype=float) - np.asarray(down[1], dtype=float)) / (2 * h))

    for _, r, c in scored[:3]:
        for _ in range(40 if analytic else 60):
            pair = derivative(r)
            if pair is None:
                break
            G, dG = pair
            J = np.stack([c * dG, G], axis=1)
            if not np.all(np.isfinite(J)):
                break  # this start diverged (a relu fit can jump pieces): its non-finite end is dropped below
            # columns scaled to a unit largest entry (Jacobi scaling of the least squares): the rate column
            # c dG/da ~ c |G| / a and the scale column G differ by c / a, which is 1e-21 for a ~ 1e11 and c ~ 1e-10;
            # unscaled, lstsq's rcond cut-off (eps x the larger dimension, relative to the largest singular value)
            # drops the rate column as if it were zero. (Max-abs, not 2-norms: |J|^2 overflows for entries ~1e154.)
            norms = np.max(np.abs(J), axis=0, initial=np.finfo(float).tiny)  # a zero column stays zero
            step, *_ = np.linalg.lstsq(J / norms, g - c * G, rcond=None)
            step = step / norms
            r, c = r + float(step[0]), c + float(step[1])
            if abs(step[0]) <= 1e-15 * abs(r) and abs(step[1]) <= 1e-15 * abs(c):
                break
            if not analytic and abs(step[0]) <= 1e-14 * abs(r) and abs(step[1]) <= 1e-14 * abs(c):
                break  # linear convergence: the last steps are at round-off
        res = safe(lambda: fn(r))
        if res is None:
            continue
        err = float(np.linalg.norm(g - c * np.asarray(res[1], dtype=float))) / gnorm
        if np.isfinite(err) and (best is None or err < best[0]):  # a diverged start (nan) never wins
            best = (err, r, c)
    if best is None:
        return None
    _, r, c = best
    if close(r, base, 1e-9):
        return None  # the asked rate: a pure scale, which the scale layer names
    loss, G = fn(r)
    label = _rate_label(case, r, base, shots * d_out)
    if abs(c - 1.0) > 1e-9:
        label += f", scaled by {c:.6g}"
    losses = () if loss is None else (float(np.real(loss)), float(np.real(loss)) * c)
    fitted = {"inner_lr" if case.algorithm != "metasgd" else "lrs_multiplier": r, "scale": c}
    return Candidate("wrong_inner_lr", label, c * np.asarray(G, dtype=float), losses, fitted, rank=3)



def _rate_label(case: Case, r: float, base: float, n_sum: int) -> str:
    what = "Meta-SGD learning rates multiplied by" if case.algorithm == "metasgd" else "effective inner_lr ="
    text = f"{what} {r:.10g}" + ("" if case.algorithm == "metasgd" else f" instead of {base:.10g}")
    if close(r, -base):
        return text + " (the inner update's sign is flipped: p + alpha grad L_s)"
    if close(r, base * n_sum) and n_sum > 1:
        return text + f" (= alpha x {n_sum}: the support loss is summed over its {n_sum} elements, reduction='sum')"
    return text


def fitted(case: Case, g: np.ndarray, reference_loss: Any,
           same_as_correct: Callable[[Candidate], bool]) -> tuple[list[Candidate], list[Candidate]]:
    """``(more fixed candidates, fitted candidates)`` for the claimed flat gradient ``g``."""
    rate = safe(lambda: _fit_rate(case, g))
    return [], ([] if rate is None else [rate])
