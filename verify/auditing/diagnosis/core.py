"""The diagnosis: the candidates of a problem, the layers on them, and the match that names the bug.

A row of :data:`verify.algorithms.ALGORITHMS` names its family's module
(``Algorithm.diagnosis``: ``gradient``, ``implicit``, ``backbone`` under this
package, or a dotted path); that module's ``variants(case)`` gives the fixed
variants and ``fitted(case, g, reference_loss, same_as_correct)`` the ones fitted
to the claim. The layers (a constant factor, disconnected tensors) apply to
every algorithm.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType

import numpy as np

from reference.models import flatten
from verify.algorithms import ALGORITHMS, Case
from verify.auditing.diagnosis.catalogue import (CATALOGUE, Candidate, Diagnosis, close, loss_elements_per_row, loss_ok,
                                                 match_error, safe)

__all__ = ["candidates", "diagnose", "family_module"]


def family_module(case: Case) -> ModuleType | None:
    """The module of the case's row's ``diagnosis`` (None when the row names none)."""
    name = ALGORITHMS[case.algorithm].diagnosis
    if not name:
        return None
    return importlib.import_module(name if "." in name else f"verify.auditing.diagnosis.{name}")


def candidates(case: Case) -> list[Candidate]:
    """The fixed variants of the catalogue for this problem (fitted ones need the claim: see :func:`diagnose`)."""
    family = family_module(case)
    out: list[Candidate] = []
    from verify.auditing.diagnosis import batchnorm

    fixed = (family.variants(case) if family is not None else []) + batchnorm.variants(case)
    for key, label, fn in fixed:
        res = safe(fn)
        if res is None:
            continue
        loss, g = res
        if not np.all(np.isfinite(g)):
            continue
        out.append(Candidate(key, label, np.asarray(g, dtype=float), () if loss is None else (float(np.real(loss)),)))
    return out


# ---------------------------------------------------------------------------
# layers: constant factor, disconnected tensors
# ---------------------------------------------------------------------------


def _scale_label(case: Case, c: float) -> str:
    T = len(case.tasks)
    nq = {t.x_query.shape[0] for t in case.tasks}
    d_out = loss_elements_per_row(case)  # the query loss's mean runs over rows x d_out
    # first match wins: with one task, -1 is named as the sign flip before "summed over the 1 tasks and sign
    # flipped", and a factor 1 never reaches here (it is the correct gradient)
    named: list[tuple[float, str]] = [
        (-1.0, "sign flipped"),
        (float(T), f"summed over the {T} tasks instead of averaged"),
        (-float(T), f"summed over the {T} tasks and sign flipped"),
    ]
    if len(nq) == 1:
        q = nq.pop() * d_out
        named += [(float(q), f"per-task query loss summed over its {q} elements (reduction='sum') instead of averaged"),
                  (float(q * T), f"summed over the {T} tasks and over the {q} query elements (reduction='sum')")]
    if ALGORITHMS[case.algorithm].family == "implicit":
        lam = float(case.hyper["lam"])
        named += [(1.0 / lam, "iMAML solving (lam I + H) x = grad L_q: a factor 1/lam missing"),
                  (lam, "scaled by lam")]
    for value, text in named:
        if close(c, value, 1e-8):
            return f"{text} (factor {c:.6g})"
    return f"scaled by a constant factor {c:.6g}"


def scale_consequence(c: float) -> str:
    """What a meta-gradient ``c`` times the correct one does to training (appended to the diagnosis).

    It stays a mismatch (the meta-loss is the mean over tasks, CONVENTIONS), but its effect depends on the
    optimiser: SGD takes steps ``|c|`` times larger; Adam-like optimisers (Adam, AdamW, RMSProp, Adagrad)
    divide each entry by a running root mean square of the same gradients, ``m / (sqrt(v) + eps)``, which a
    positive constant ``c`` leaves unchanged except through ``eps`` (as if ``eps`` were ``eps / c``).
    """
    if c > 0:
        return (f". Its direction is right: it is exactly {c:.6g} times the correct meta-gradient. With SGD that is "
                f"a meta learning rate {c:.6g} times larger; under Adam-like optimisers (Adam, AdamW, RMSProp), which "
                f"divide by a running RMS of the same gradients, the update is unchanged except through eps (it acts "
                f"as eps / {c:.6g}), so training barely differs. It is still a mismatch: the meta-loss is the mean "
                "over tasks (CONVENTIONS)")
    return (f". Its direction is reversed: it is {c:.6g} times the correct meta-gradient, so a descent step on it "
            "ascends the meta-loss, under any optimiser")


def _with_scale(case: Case, base: Candidate, g: np.ndarray, ref_scale: float) -> Candidate | None:
    G = base.grads
    s = float(np.max(np.abs(G), initial=0.0))
    if s == 0.0:
        return None
    Gs = G / s  # the projection on unit-scale vectors: |G|^2 overflows for gradients above ~1e154
    c = float(Gs @ (g / s)) / float(Gs @ Gs)
    if c == 0.0 or close(c, 1.0, 1e-10):
        return None
    label = _scale_label(case, c)
    if base.key != "correct":
        label = f"{base.label}, {label}"
    losses = tuple(v for loss in base.losses for v in (loss, c * loss))
    return Candidate("scale" if base.key == "correct" else base.key, label, c * G, losses,
                     {**base.fitted, "scale": c}, rank=2 if base.key == "correct" else 4)


#: Relative size (to the largest entry of a candidate's gradient) at or below which an entry is round-off of a zero.
ROUNDOFF_ZERO = 64 * float(np.finfo(float).eps)


def _zero_tensors(case: Case, claimed: Sequence[np.ndarray], missing: Sequence[bool]) -> list[int]:
    return [i for i, (g, m) in enumerate(zip(claimed, missing)) if m or not np.any(np.asarray(g))]


def _with_disconnected(case: Case, base: Candidate, zeros: list[int]) -> Candidate | None:
    sizes = [int(np.prod(s)) for s in case.shapes]
    offsets = np.cumsum([0] + sizes)
    G = base.grads.copy()
    # A tensor whose correct gradient is zero up to round-off is not named (R2-D2's offset under cross-entropy:
    # exactly 0.0 on one machine, 1e-17 against entries of 0.1 on another).
    floor = ROUNDOFF_ZERO * float(np.max(np.abs(G)))  # G: every variable's entries, never empty
    hit = []
    for i in zeros:
        block = G[offsets[i]:offsets[i + 1]]
        if np.any(np.abs(block) > floor):
            hit.append(i)
        G[offsets[i]:offsets[i + 1]] = 0.0
    if not hit:
        return None
    names = [case.names[i] for i in hit]
    n_params = len(case.params)
    row = ALGORITHMS[case.algorithm]
    if len(zeros) == len(case.variables):
        key, label = "disconnected", "no gradient reached any tensor (all None or exactly zero)"
    elif "lrs" in row.extra and all(i >= n_params for i in hit):
        key, label = "metasgd_lrs_no_grad", f"the Meta-SGD learning rates receive no gradient ({', '.join(names)})"
    elif row.extra and all(i >= n_params for i in hit):
        key, label = "hyper_detached", f"{', '.join(names)} detached (no gradient)"
    else:
        key, label = "disconnected", f"no gradient reached {', '.join(names)} (None or exactly zero)"
    if base.key != "correct":
        label = f"{base.label}, and {label}"
    return Candidate(key, label, G, base.losses, dict(base.fitted), rank=2 if base.key == "correct" else 4)


# ---------------------------------------------------------------------------
# the diagnosis
# ---------------------------------------------------------------------------


def diagnose(
    case: Case,
    claimed_loss: float | None,
    claimed_grads: Sequence[np.ndarray],
    *,
    missing: Sequence[bool],
    reference_loss: float | None,
    reference_grads: Sequence[np.ndarray],
    tol: float,
) -> Diagnosis | None:
    """Name the bug behind a mismatching claimed meta-gradient, or return None ("unexplained mismatch").

    Args:
        case: the audited problem.
        claimed_loss: the meta-loss the implementation returned (None if none, e.g. Reptile).
        claimed_grads: its gradients, aligned with ``case.variables`` (zeros where it gave None).
        missing: per tensor, whether the implementation gave no gradient at all (None).
        reference_loss, reference_grads: the correct values.
        tol: the match tolerance (the audit's, ``tolerance("float64", "reference_match", condition=...)``).
    """
    g = flatten([np.asarray(x, dtype=float) for x in claimed_grads])
    ref = flatten([np.asarray(x, dtype=float) for x in reference_grads])
    ref_losses = () if reference_loss is None else (float(reference_loss),)
    correct = Candidate("correct", "the correct meta-gradient", ref, ref_losses, rank=0)

    def same_as_correct(c: Candidate) -> bool:
        return match_error(c.grads, ref) <= tol and loss_ok(reference_loss, c.losses, tol)

    fixed = [c for c in candidates(case) if not same_as_correct(c)]
    fitted: list[Candidate] = []
    family = family_module(case)
    if family is not None:
        more_fixed, fits = family.fitted(case, g, reference_loss, same_as_correct)
        fitted += fits
        fixed += more_fixed
    zeros = _zero_tensors(case, claimed_grads, missing)
    layered: list[Candidate] = []
    ref_scale = float(np.max(np.abs(ref), initial=0.0))
    for base in [correct, *fixed]:
        s = _with_scale(case, base, g, ref_scale)
        if s is not None:
            layered.append(s)
        if zeros:
            d = _with_disconnected(case, base, zeros)
            if d is not None:
                layered.append(d)

    matches = []
    for cand in [*fixed, *fitted, *layered]:
        if not np.all(np.isfinite(cand.grads)) or cand.grads.shape != g.shape:
            continue
        err = match_error(g, cand.grads)
        if err <= tol and loss_ok(claimed_loss, cand.losses, tol):
            matches.append((cand.rank, err, cand))
    if not matches:
        return None
    matches.sort(key=lambda m: (m[0], m[1]))
    _, err, best = matches[0]
    gap = match_error(g, ref)
    entry = CATALOGUE[best.key]
    detail = (f"{entry.title}. The claimed meta-gradient matches this variant ({best.label}) to rel {err:.1e} "
              f"(tol {tol:.1e}) and differs from the correct meta-gradient by rel {gap:.1e}")
    if best.key == "scale" and "scale" in best.fitted:
        detail += scale_consequence(float(best.fitted["scale"]))
    also = tuple(dict.fromkeys(m[2].label for m in matches[1:] if m[2].label != best.label))
    return Diagnosis(best.key, entry.title, detail, entry.cause, dict(best.fitted), err, tol, also[:5])
