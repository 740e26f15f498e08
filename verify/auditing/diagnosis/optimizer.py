"""Diagnosis variants of inner loops driven by a differentiable optimiser (rows ``maml-momentum``, ``maml-adam``,
``anil-adam``, and MAML++ and the learned optimisers ``mamlpp``, ``lstm-optimizer``, ``meta-lstm``; issue #17).

Each variant is the reference's optimiser loop (:mod:`reference.inner_optim`) with one known mistake:
Adam's ``eps`` placement (eps-hat, higher/TensorFlow) or ``eps`` inside the root, the optimiser state
detached between steps, second derivatives dropped, backpropagation truncated to the last ``T`` steps,
a different number of inner steps. (The momentum buffer's first step only differs with dampening, which
the row does not use; :mod:`verify.inner_audit` names it where the dampening is known.) Declared approximations are judged by
:mod:`verify.inner_audit`; here an undeclared one is a named mismatch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from reference import inner_optim
from reference.inner_optim import Approximation
from reference.models import flatten
from reference.optimizers import Adam, Momentum  # noqa: F401  (Momentum: the maml-momentum row's optimiser)
from verify.algorithms import Case
from verify.auditing.diagnosis.catalogue import Candidate

__all__ = ["fitted", "variants"]

Variant = tuple[str, str, Callable[[], tuple[Any, np.ndarray]]]

#: row -> (which tensors adapt, the optimiser the row runs)
ROWS: dict[str, tuple[str, Callable[[], Any]]] = {
    "maml-momentum": ("maml", lambda: Momentum(0.9)),
    "maml-adam": ("maml", lambda: Adam()),
    "anil-adam": ("anil", lambda: Adam()),
}


def _run(case: Case, optimizer: Any, approximation: Approximation | None = None,
         steps: int | None = None) -> tuple[Any, np.ndarray]:
    kind, _ = ROWS[case.algorithm]
    K = int(case.hyper["inner_steps"] if steps is None else steps)
    head = set(case.model.head_indices)
    rate = case.hyper["inner_lr"]
    row = [rate if (kind == "maml" or i in head) else None for i in range(len(case.params))]
    r = inner_optim.meta_loss_and_grad(case.model, case.params, case.tasks, [row] * K, K, optimizer=optimizer,
                                       approximation=approximation)
    return r.loss, flatten(r.params)


#: rows with differentiated variables besides theta (MAML++'s rates, a learned optimiser's phi): their variants
#: come from :mod:`verify.inner_audit`'s problem of the case, aligned with ``case.variables``
LEARNED = ("mamlpp", "lstm-optimizer", "meta-lstm")


def _learned_variants(case: Case) -> list[Variant]:
    from verify import inner_audit

    pb = inner_audit._loop_problem(case)
    K = pb.inner_steps

    def run(approximation: Approximation | None = None, steps: int | None = None) -> tuple[Any, np.ndarray]:
        r = pb.gradient(approximation, **inner_audit._with_steps(pb, K if steps is None else steps))
        return r.loss, flatten(inner_audit.case_gradients(case, r))

    learned = case.algorithm != "mamlpp"
    out: list[Variant] = [("first_order", "the gradients (and losses) fed to the inner update treated as constants "
                           "(Andrychowicz et al.'s d grad / d phi = 0)" if learned else
                           "the inner gradients treated as constants (first-order MAML++)",
                           lambda: run(Approximation(first_order=True)))]
    if learned:
        out.append(("optimizer_state_detached", "the meta-learner's LSTM state detached between steps",
                    lambda: run(Approximation(detach_state=True))))
    for t in range(1, K):
        out.append(("bptt_truncated", f"backpropagation through the last {t} of {K} inner steps only",
                    lambda t=t: run(Approximation(truncate=t))))
    if learned:  # MAML++'s (K, n) rates fix K: a loop of another length is another problem's shape
        for k2 in range(1, K + 3):
            if k2 != K:
                out.append(("wrong_inner_steps", f"inner_steps={k2} instead of {K}", lambda k2=k2: run(steps=k2)))
    return out


def variants(case: Case) -> list[Variant]:
    """The fixed variants of this problem: ``(catalogue key, label, () -> (loss, flat grads))``."""
    if case.algorithm in LEARNED:
        return _learned_variants(case)
    if case.algorithm not in ROWS:
        return []
    _, make = ROWS[case.algorithm]
    opt = make()
    K = int(case.hyper["inner_steps"])
    out: list[Variant] = [
        ("first_order", "the optimiser's gradient inputs treated as constants",
         lambda: _run(case, opt, Approximation(first_order=True))),
        ("optimizer_state_detached", "the optimiser state (momentum buffer / Adam moments) detached between steps",
         lambda: _run(case, opt, Approximation(detach_state=True))),
    ]
    for t in range(1, K):
        out.append(("bptt_truncated", f"backpropagation through the last {t} of {K} inner steps only",
                    lambda t=t: _run(case, opt, Approximation(truncate=t))))
    for k2 in range(1, K + 3):
        if k2 != K:
            out.append(("wrong_inner_steps", f"inner_steps={k2} instead of {K}", lambda k2=k2: _run(case, opt, steps=k2)))
    if isinstance(opt, Adam):
        out.append(("adam_eps_placement", "eps added to sqrt(v) before bias correction (eps-hat: higher, TensorFlow)",
                    lambda: _run(case, Adam(opt.b1, opt.b2, opt.eps, eps_placement="v"))))
        out.append(("adam_eps_placement", "eps inside the square root (sqrt(v_hat + eps), optax eps_root)",
                    lambda: _run(case, Adam(opt.b1, opt.b2, 0.0, eps_root=opt.eps))))
    return out


def fitted(case: Case, g: np.ndarray, reference_loss: Any,
           same_as_correct: Callable[[Candidate], bool]) -> tuple[list[Candidate], list[Candidate]]:
    """No fitted variants for this family (the generic layers still apply)."""
    return [], []
