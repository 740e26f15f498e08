"""iMAML as its authors compute it: the declared approximations of the implicit meta-gradient.

Rajeswaran, Finn, Kakade & Levine (2019), "Meta-Learning with Implicit
Gradients", NeurIPS; the released code (``implicit_maml``) computes, per task,

1. an *unconverged* inner loop: ``N`` gradient steps of size ``inner_lr`` on
   ``L_s(phi) + lam/2 ||phi - theta||^2`` from ``phi_0 = theta``;
2. a *damped* system ``A v = (1 + regu) v + H_s(phi_N) v / (lam + damping)``
   (``regu_coef``, ``lam_damping`` in their code) in place of
   ``I + H_s(phi*) / lam``;
3. *truncated* conjugate gradient: ``M`` iterations from ``x_0 = 0``, stopping
   early only when ``r^T r < 1e-10`` (their ``cg_solve``), applied to
   ``grad L_q(phi_N)``.

Each is a declared approximation (``inner_steps:N``, ``damping:D``, ``cg:M``);
:func:`meta_loss_and_grad` computes exactly this deterministic approximation
(so an implementation of it can be verified to round-off) and
:func:`reference.imaml.meta_loss_and_grad` the exact implicit gradient (tight
inner solve, converged CG), so the audit can report the distance between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from reference.validation import check_finite_scalar, check_positive_int
from reference.errors import InvalidInputError
from reference.models import flatten, unflatten
from reference.tasks import Task, check_tasks

__all__ = ["Declared", "cg_solve", "meta_loss_and_grad"]

#: Their ``cg_solve``'s stopping test on the squared residual norm.
RESIDUAL_TOL = 1e-10


@dataclass(frozen=True)
class Declared:
    """The approximations of the authors' solver: ``cg:M``, ``inner_steps:N``, ``damping:D`` (and ``regu``)."""

    cg_steps: int = 5
    inner_steps: int = 16
    damping: float = 0.0
    regu: float = 0.0

    @classmethod
    def parse(cls, text: str, **defaults: Any) -> Declared:
        """``"cg:5+inner_steps:16+damping:1.0"`` (parts not given keep ``defaults`` or the class defaults)."""
        kw: dict[str, Any] = dict(defaults)
        for part in str(text).split("+"):
            part = part.strip()
            if not part or part == "exact":
                continue
            name, _, value = part.partition(":")
            key = {"cg": "cg_steps", "inner_steps": "inner_steps", "damping": "damping", "regu": "regu"}.get(name)
            if key is None or not value:
                raise InvalidInputError(
                    f"approximation={text!r}: unknown part {part!r}; iMAML takes cg:M, inner_steps:N, damping:D, regu:R")
            try:
                kw[key] = int(value) if key in ("cg_steps", "inner_steps") else float(value)
            except ValueError:
                raise InvalidInputError(f"approximation={text!r}: {part!r} needs a number") from None
        return cls(**kw)

    def __str__(self) -> str:
        return f"cg:{self.cg_steps}+inner_steps:{self.inner_steps}+damping:{self.damping:g}" + (
            f"+regu:{self.regu:g}" if self.regu else "")


def cg_solve(matvec: Any, b: np.ndarray, iterations: int, residual_tol: float = RESIDUAL_TOL) -> np.ndarray:
    """Their ``cg_solve``: ``iterations`` CG steps from 0, early exit when ``r^T r < residual_tol``."""
    x = np.zeros_like(b)
    r = b - matvec(x)
    p = r.copy()
    for _ in range(iterations):
        rdotr = r @ r
        Ap = matvec(p)
        alpha = rdotr / (p @ Ap)
        x = x + alpha * p
        r = r - alpha * Ap
        new = r @ r
        p = r + (new / rdotr) * p
        if new < residual_tol:
            break
    return x


def _task(model: Any, params: list[np.ndarray], task: Task, lam: float, inner_lr: float, d: Declared
          ) -> tuple[Any, list[np.ndarray]]:
    phi = list(params)
    for _ in range(d.inner_steps):
        _, g = model._loss_and_grad(phi, task.x_support, task.y_support)
        phi = [p - inner_lr * (gi + lam * (p - t)) for p, gi, t in zip(phi, g, params)]
    loss_q, g_q = model._loss_and_grad(phi, task.x_query, task.y_query)
    shapes = [p.shape for p in params]

    def matvec(v: np.ndarray) -> np.ndarray:
        hv = flatten(model._hvp(phi, task.x_support, task.y_support, unflatten(v, shapes)))
        return (1.0 + d.regu) * v + hv / (lam + d.damping)

    return loss_q, unflatten(cg_solve(matvec, flatten(g_q), d.cg_steps), shapes)


def meta_loss_and_grad(model: Any, params: Sequence[Any], tasks: Sequence[Task], lam: float, *, inner_lr: float,
                       declared: Declared | str = Declared()) -> tuple[float, list[np.ndarray]]:
    """The authors' approximate iMAML meta-loss ``mean L_q(phi_N)`` and meta-gradient (module notes).

    Args:
        model, params, tasks, lam: as :func:`reference.imaml.meta_loss_and_grad`.
        inner_lr: step of the inner gradient descent on the proximal loss.
        declared: a :class:`Declared` or its string, e.g. ``"cg:5+inner_steps:16+damping:1"``.
    """
    params = model.check_params(params)
    tasks = check_tasks(model, tasks)
    lam = check_finite_scalar("lam", lam, positive=True, hint="; the proximal weight, e.g. lam=1.0")
    inner_lr = check_finite_scalar("inner_lr", inner_lr, positive=True, hint="; e.g. inner_lr=0.05")
    d = Declared.parse(declared) if isinstance(declared, str) else declared
    check_positive_int("cg_steps", d.cg_steps, hint="; cg:M with M >= 1")
    check_positive_int("inner_steps", d.inner_steps, minimum=0, hint="; inner_steps:N with N >= 0")
    total, grad = 0.0, None
    for t in tasks:
        loss, g = _task(model, params, t, float(lam), float(inner_lr), d)
        total += float(np.real(loss))
        grad = g if grad is None else [a + b for a, b in zip(grad, g)]
    n = len(tasks)
    return total / n, [g / n for g in grad]
