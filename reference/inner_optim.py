"""The unrolled inner loop with a generic differentiable optimiser, and its exact adjoint.

Contract: ``shared/CONVENTIONS.md``, sections "Gradient-based algorithms" and
"Inner-loop optimisers". For one task, ``p_0 = theta``, ``s_0 = init`` and

    g_k = grad L_s(p_k),   d_k, s_{k+1} = T_k(p_k, s_k, g_k, L_s(p_k); phi),   p_{k+1} = p_k - a_k * d_k,

for ``k = 0 .. K-1`` (``T`` from :mod:`reference.optimizers` or
:mod:`reference.learned_optimizers`; ``a_k`` one learning rate per tensor and
step). The meta-loss is ``L = sum_{k=1}^{K} w_k L_q(p_k)`` (``w = e_K``, the
final query loss, unless MAML++'s multi-step weights are given), averaged over
tasks.

Adjoint (reverse accumulation, ``k = K-1 .. 0``; ``bar_p_K = w_K grad L_q(p_K)``, ``bar_s_K = 0``):

    bar_d   = -a_k * bar_p_{k+1},             dL/da_k = -<bar_p_{k+1}, d_k>   (summed for a scalar a_k),
    (bar_p^T, bar_s_k, bar_g, bar_l, bar_phi_k) = T_k^*(bar_d, bar_s_{k+1}),
    bar_p_k = bar_p_{k+1} + bar_p^T + H_s(p_k) (bar_g + bar_l g_k) + w_k grad L_q(p_k),
    dL/dtheta = bar_p_0,   dL/dphi = sum_k bar_phi_k.

``H_s v`` is the model's exact Hessian-vector product (``model._hvp``, the
interface :mod:`reference.inner_loop` uses); the optimiser's Jacobians are
elementwise (or coordinatewise for learned optimisers) and their VJPs are
hand-written. Cost: one gradient, one Hessian-vector product and one query
gradient per weighted step; memory ``O(K x (params + state))``.

Declared approximations are switches on this one loop (:class:`Approximation`),
each defined as what a framework's ``detach`` would do, so a torch or JAX
implementation of the approximation can be checked exactly:

* ``first_order``: the observations ``g_k`` (and ``L_s(p_k)``) fed to the
  optimiser are constants (FOMAML; Andrychowicz et al. 2016's "dnabla/dphi = 0";
  Ravi & Larochelle 2017's dashed lines): the ``H_s`` term is dropped.
* ``truncate=T``: backpropagation through the last ``T`` steps only; every
  earlier step is applied as ``p_{k+1} = p_k - stop_gradient(a_k d_k)`` with
  its state ``stop_gradient(s_{k+1})`` (identity Jacobian in ``p``, no
  learning-rate, state or ``phi`` cotangent). ``truncate >= K`` is exact.
* ``detach_state``: the optimiser state is detached between steps
  (``s_k -> stop_gradient(s_k)``): no cotangent flows through momenta, Adam's
  moments or an LSTM's hidden state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from reference import inner_loop
from reference.validation import check_finite_scalar, check_positive_int
from reference.errors import InvalidInputError
from reference.optimizers import SGD, Optimizer
from reference.tasks import Task

__all__ = [
    "EXACT",
    "Approximation",
    "MetaGradient",
    "check_approximation",
    "check_arguments",
    "check_inner_optimizer",
    "check_lrs",
    "constant_lrs",
    "meta_loss",
    "meta_loss_and_grad",
    "shared_rates",
    "task_loss_and_grad",
    "unroll",
    "validate",
]

Params = list[np.ndarray]
#: lrs[k][i]: the learning rate of tensor i at step k: None (not adapted), a scalar, or an array like the tensor.
Schedule = list[list[Any]]


@dataclass(frozen=True)
class Approximation:
    """A declared approximation of the exact meta-gradient (see the module notes).

    ``Approximation.parse("truncated:3+stop_gradient")`` reads the CLI spelling:
    ``exact``, ``first_order``, ``truncated:T``, ``stop_gradient`` (the
    optimiser state detached), joined by ``+``.
    """

    first_order: bool = False
    truncate: int | None = None
    detach_state: bool = False

    def __post_init__(self) -> None:
        if self.truncate is not None:
            check_positive_int("truncate", self.truncate, minimum=0,
                               hint="; truncate=T backpropagates through the last T inner steps (None: all)")

    @classmethod
    def parse(cls, text: str) -> Approximation:
        """Parse ``"first_order"``, ``"truncated:K"``, ``"stop_gradient"``, ``"exact"`` (``+``-joined)."""
        if not isinstance(text, str) or not text.strip():
            raise InvalidInputError(f"approximation={text!r} must be a string such as 'first_order' or 'truncated:5'")
        kwargs: dict[str, Any] = {}
        for part in text.strip().split("+"):
            part = part.strip()
            if part == "exact":
                continue
            if part == "first_order":
                kwargs["first_order"] = True
            elif part == "stop_gradient":
                kwargs["detach_state"] = True
            elif part.startswith("truncated:"):
                try:
                    kwargs["truncate"] = int(part.split(":", 1)[1])
                except ValueError:
                    raise InvalidInputError(
                        f"approximation={text!r}: {part!r} needs an integer, e.g. 'truncated:5'") from None
            else:
                raise InvalidInputError(
                    f"approximation={text!r}: unknown part {part!r}; expected exact, first_order, truncated:K "
                    "or stop_gradient (joined by '+')")
        return cls(**kwargs)

    def __str__(self) -> str:
        parts = (["first_order"] if self.first_order else []) + (
            [f"truncated:{self.truncate}"] if self.truncate is not None else []) + (
            ["stop_gradient"] if self.detach_state else [])
        return "+".join(parts) or "exact"

    @property
    def is_exact(self) -> bool:
        return not self.first_order and self.truncate is None and not self.detach_state


EXACT = Approximation()


class MetaGradient(NamedTuple):
    """Meta-loss and its gradients: w.r.t. ``theta``, the rates ``lrs[k][i]``, ``phi`` and the hyper-parameters.

    ``hyper`` maps a hand-designed optimiser's hyper-parameter names
    (``momentum``, ``dampening``; ``b1``, ``b2``, ``eps``, ``eps_root``) to
    their meta-gradients (empty for SGD and learned optimisers).
    """

    loss: Any
    params: Params
    lrs: Schedule
    optimizer: list[np.ndarray]
    hyper: dict[str, Any] = {}


class _Step(NamedTuple):
    params: Params        # p_k
    full_grads: Params    # grad L_s(p_k), every tensor
    loss: Any             # L_s(p_k)
    direction: list[Any]  # d_k
    cache: Any            # the optimiser's cache of step k


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def constant_lrs(model: Any, inner_lr: Any, inner_steps: int, *, exclude: Sequence[int] = ()) -> Schedule:
    """The schedule ``lrs[k][i] = inner_lr`` (``None`` for the tensors in ``exclude``)."""
    steps = check_positive_int("inner_steps", inner_steps)
    return [[None if i in exclude else inner_lr for i in range(len(model.shapes))] for _ in range(steps)]


def check_lrs(model: Any, lrs: Any, inner_steps: int) -> tuple[Schedule, list[bool]]:
    """Validate a per-step schedule ``lrs[k][i]``; return it and the mask of adapted tensors.

    ``lrs`` has one entry per step (``inner_steps`` of them), each a list with
    one entry per parameter tensor: ``None`` (not adapted; the same tensors at
    every step), a finite scalar (complex allowed, for complex step) or an
    array shaped like the tensor (Meta-SGD-style).
    """
    n = len(model.shapes)
    hint = (f"; lrs[k][i] is the rate of tensor i at step k, e.g. "
            f"reference.inner_optim.constant_lrs(model, 0.1, {inner_steps})")
    if isinstance(lrs, np.ndarray) or not isinstance(lrs, Sequence) or len(lrs) != inner_steps:
        got = len(lrs) if isinstance(lrs, Sequence) else type(lrs).__name__
        raise InvalidInputError(f"lrs must be a list of {inner_steps} per-step lists (one per inner step), got {got}{hint}")
    out: Schedule = []
    active: list[bool] | None = None
    for k, row in enumerate(lrs):
        if isinstance(row, np.ndarray) or not isinstance(row, Sequence) or len(row) != n:
            raise InvalidInputError(f"lrs[{k}] must be a list of {n} entries (one per parameter tensor){hint}")
        mask = [a is not None for a in row]
        if active is None:
            active = mask
        elif mask != active:
            raise InvalidInputError(
                f"lrs[{k}] adapts tensors {[i for i, m in enumerate(mask) if m]} but lrs[0] adapts "
                f"{[i for i, m in enumerate(active) if m]}; a tensor is excluded (None) at every step or none")
        new_row: list[Any] = []
        for i, a in enumerate(row):
            if a is None:
                new_row.append(None)
            elif np.ndim(a) == 0:
                new_row.append(check_finite_scalar(f"lrs[{k}][{i}]", a))
            else:
                arr = np.asarray(a)
                if arr.shape != tuple(model.shapes[i]) or not np.all(np.isfinite(arr)):
                    raise InvalidInputError(
                        f"lrs[{k}][{i}] has shape {arr.shape}, expected a scalar or a finite array of shape "
                        f"{tuple(model.shapes[i])}{hint}")
                new_row.append(arr.astype(np.result_type(arr, np.float64)))
        out.append(new_row)
    if not any(active):  # type: ignore[arg-type]
        raise InvalidInputError(f"lrs excludes every tensor (all None); adapt at least one{hint}")
    return out, list(active)  # type: ignore[arg-type]


def _check_weights(weights: Any, steps: int) -> np.ndarray:
    if weights is None:
        w = np.zeros(steps)
        w[-1] = 1.0
        return w
    w = np.asarray(weights)
    if w.shape != (steps,) or not np.all(np.isfinite(w)):
        raise InvalidInputError(
            f"weights has shape {w.shape}, expected ({steps},) finite numbers: w_k weights L_q(p_k), k = 1..K "
            "(MAML++'s multi-step loss); None for the final query loss only")
    return w


def _check_optimizer(optimizer: Any) -> Optimizer:
    if optimizer is None:
        return SGD()
    if not isinstance(optimizer, Optimizer):
        raise InvalidInputError(
            f"optimizer={optimizer!r} must be a reference.optimizers.Optimizer (SGD(), Momentum(0.9), Adam(), "
            "or a learned optimiser from reference.learned_optimizers)")
    return optimizer


def check_approximation(approximation: Any) -> Approximation:
    """``None`` (exact), an :class:`Approximation` or its string (``Approximation.parse``)."""
    if approximation is None:
        return EXACT
    if isinstance(approximation, str):
        return Approximation.parse(approximation)
    if not isinstance(approximation, Approximation):
        raise InvalidInputError(f"approximation={approximation!r} must be an Approximation or a string like 'truncated:5'")
    return approximation


def check_arguments(model: Any, params: Any, tasks: Any, lrs: Any, inner_steps: Any, weights: Any, optimizer: Any
                    ) -> tuple[Params, list[Task], int, Schedule, list[bool], np.ndarray, Optimizer]:
    """Validate the loop's arguments once: ``(params, tasks, K, lrs, active, w, opt)``.

    The backends call this check and add only their framework's limits.
    """
    params, tasks, steps = inner_loop.check_common(model, params, tasks, inner_steps)
    lrs, active = check_lrs(model, lrs, steps)
    return params, tasks, steps, lrs, active, _check_weights(weights, steps), _check_optimizer(optimizer)


validate = check_arguments  # the former name


# ---------------------------------------------------------------------------
# Forward and adjoint
# ---------------------------------------------------------------------------


def unroll(model: Any, params: Params, task: Task, optimizer: Optimizer, lrs: Schedule, active: Sequence[bool],
           steps: int, weights: np.ndarray, *, keep: bool = True) -> tuple[Any, list[_Step], Params]:
    """Run the inner loop on validated inputs; return ``(sum_k w_k L_q(p_k), steps, p_K)``.

    With ``keep=False`` no step records are kept (``O(params + state)`` memory).
    """
    p = list(params)
    s = optimizer.init(p, active)
    total: Any = 0.0
    record: list[_Step] = []
    for k in range(steps):
        loss_s, g = model._loss_and_grad(p, task.x_support, task.y_support)
        d, s, cache = optimizer.direction(k, p, s, [gi if a else None for gi, a in zip(g, active)], loss_s, active)
        if keep:
            record.append(_Step(p, g, loss_s, d, cache))
        p = [pi if a is None else pi - a * di for pi, di, a in zip(p, d, lrs[k])]
        if weights[k] != 0:
            total = total + weights[k] * model._loss_and_grad(p, task.x_query, task.y_query)[0]
    return total, record, p


def _lr_cotangent(a: Any, bar_p: np.ndarray, d: np.ndarray) -> Any:
    prod = -bar_p * d
    return prod if np.ndim(a) else np.sum(prod)


def task_loss_and_grad(model: Any, params: Params, task: Task, optimizer: Optimizer, lrs: Schedule,
                       active: Sequence[bool], steps: int, weights: np.ndarray,
                       approximation: Approximation = EXACT) -> MetaGradient:
    """Meta-loss of one task and its gradients (exact, or the declared approximation)."""
    # The weighted query losses are evaluated in the reverse pass (with their gradients), not here.
    _, record, p_final = unroll(model, params, task, optimizer, lrs, active, steps, np.zeros(steps))
    xq, yq = task.x_query, task.y_query
    loss, bar_p = model._loss_and_grad(p_final, xq, yq)
    total = weights[-1] * loss
    bar_p = [weights[-1] * b for b in bar_p]
    grad_lrs: Schedule = [[None if a is None else 0.0 for a in row] for row in lrs]
    grad_meta = [np.zeros_like(m) for m in optimizer.meta_params]
    grad_hyper: dict[str, Any] = {}
    bar_s = None
    first = 0 if approximation.truncate is None else max(0, steps - approximation.truncate)
    for k in reversed(range(steps)):
        step = record[k]
        if k >= first:
            bar_d = [None if a is None else -a * bp for bp, a in zip(bar_p, lrs[k])]
            grad_lrs[k] = [None if a is None else _lr_cotangent(a, bp, dk)
                           for a, bp, dk in zip(lrs[k], bar_p, step.direction)]
            vjp = optimizer.vjp(k, step.cache, bar_d, None if approximation.detach_state else bar_s)
            grad_meta = [acc + b for acc, b in zip(grad_meta, vjp.meta)]
            for name, value in vjp.hyper.items():
                grad_hyper[name] = grad_hyper.get(name, 0.0) + value
            bar_p = [bp if extra is None else bp + extra for bp, extra in zip(bar_p, vjp.params)]
            if not approximation.first_order:
                direction = [np.zeros_like(pk) if bg is None else bg for pk, bg in zip(step.params, vjp.grads)]
                hv = model._hvp(step.params, task.x_support, task.y_support, direction)
                if optimizer.uses_loss:
                    # L_s(p_k) is an input of T_k: d L_s / d p_k = grad L_s(p_k) (every tensor).
                    hv = [h + vjp.loss * gk for h, gk in zip(hv, step.full_grads)]
                bar_p = [bp + h for bp, h in zip(bar_p, hv)]
            bar_s = vjp.state
        else:
            bar_s = None  # the state leaving a truncated step is a constant
        if k >= 1 and weights[k - 1] != 0:
            lq, gq = model._loss_and_grad(step.params, xq, yq)
            total = total + weights[k - 1] * lq
            bar_p = [bp + weights[k - 1] * gi for bp, gi in zip(bar_p, gq)]
    return MetaGradient(total, bar_p, grad_lrs, grad_meta, {k: float(np.real(v)) for k, v in grad_hyper.items()})


def _as_scalar(value: Any) -> Any:
    value = np.asarray(value)[()]
    return complex(value) if np.iscomplexobj(value) else float(value)


def meta_loss(model: Any, params: Sequence[Any], tasks: Sequence[Task], lrs: Any, inner_steps: int, *,
              optimizer: Optimizer | None = None, weights: Any = None) -> Any:
    """Meta-loss ``(1/T) sum_t sum_k w_k L_q^t(p_k^t)`` of the optimiser-driven inner loop (forward only).

    Complex ``params``, learning rates or learned-optimiser meta-parameters
    give a complex loss (complex-step differentiation).

    Args:
        model: a ``reference.models.MLP`` or ``Quadratic`` (anything with ``_loss_and_grad``/``_hvp``).
        params: ``theta`` in CONVENTIONS order.
        tasks: non-empty list of tasks.
        lrs: per-step schedule ``lrs[k][i]`` (:func:`check_lrs`; :func:`constant_lrs` builds one).
        inner_steps: ``K >= 1``.
        optimizer: the direction transform (default ``SGD()``).
        weights: ``(K,)`` weights of ``L_q(p_1) .. L_q(p_K)`` (default: final step only).
    """
    params, tasks, steps, lrs, active, w, opt = check_arguments(model, params, tasks, lrs, inner_steps, weights,
                                                                optimizer)
    total: Any = 0.0
    for task in tasks:
        total = total + unroll(model, params, task, opt, lrs, active, steps, w, keep=False)[0]
    return _as_scalar(total / len(tasks))


def meta_loss_and_grad(model: Any, params: Sequence[Any], tasks: Sequence[Task], lrs: Any, inner_steps: int, *,
                       optimizer: Optimizer | None = None, weights: Any = None,
                       approximation: Approximation | str | None = None) -> MetaGradient:
    """Meta-loss and its exact gradients w.r.t. ``theta``, every ``lrs[k][i]`` and the optimiser's ``phi``.

    Reverse accumulation through parameters and optimiser state (module
    notes); with ``approximation`` the declared approximation's gradient
    instead (the loss is unchanged). Averaged over tasks.

    Returns:
        :class:`MetaGradient` ``(loss, params, lrs, optimizer)``: gradients
        shaped like ``params``, like ``lrs`` (``None`` where not adapted; an
        array for an array rate, a scalar for a scalar rate) and like
        ``optimizer.meta_params``.
    """
    params, tasks, steps, lrs, active, w, opt = check_arguments(model, params, tasks, lrs, inner_steps, weights,
                                                                optimizer)
    approx = check_approximation(approximation)
    n = len(tasks)
    acc: MetaGradient | None = None
    for task in tasks:
        r = task_loss_and_grad(model, params, task, opt, lrs, active, steps, w, approx)
        if acc is None:
            acc = r
        else:
            acc = MetaGradient(
                acc.loss + r.loss,
                [a + b for a, b in zip(acc.params, r.params)],
                [[None if a is None else a + b for a, b in zip(ra, rb)] for ra, rb in zip(acc.lrs, r.lrs)],
                [a + b for a, b in zip(acc.optimizer, r.optimizer)],
                {k: acc.hyper[k] + r.hyper[k] for k in acc.hyper},
            )
    assert acc is not None
    return MetaGradient(
        _as_scalar(acc.loss / n),
        [g / n for g in acc.params],
        [[None if a is None else a / n for a in row] for row in acc.lrs],
        [g / n for g in acc.optimizer],
        {k: v / n for k, v in acc.hyper.items()},
    )


def shared_rates(model: Any, params: Sequence[Any], tasks: Sequence[Task], rates: Sequence[Any], inner_steps: int, *,
                 optimizer: Optimizer, first_order: bool = False) -> tuple[Any, Params, list[Any]]:
    """The loop with one rate per tensor shared by every step (MAML, ANIL, Meta-SGD with ``inner_optimizer=``).

    ``rates[i]``: ``None`` (tensor not adapted), a scalar or an array. Returns
    ``(meta_loss, dL/dtheta, dL/drates)``; a shared rate's gradient is the sum
    of its per-step gradients (``None`` for tensors not adapted).
    """
    steps = check_positive_int("inner_steps", inner_steps, hint="; the inner loop needs at least one step (K >= 1)")
    r = meta_loss_and_grad(model, params, tasks, [list(rates)] * steps, steps, optimizer=optimizer,
                           approximation=Approximation(first_order=bool(first_order)))
    grad_rates = [None if a is None else sum(r.lrs[k][i] for k in range(steps)) for i, a in enumerate(rates)]
    return r.loss, r.params, grad_rates


def check_inner_optimizer(inner_optimizer: Any) -> Optimizer | None:
    """``None`` (plain SGD, the algorithm's own fast path) or an :class:`~reference.optimizers.Optimizer`."""
    return None if inner_optimizer is None else _check_optimizer(inner_optimizer)
