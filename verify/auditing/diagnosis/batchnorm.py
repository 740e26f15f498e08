"""Batch-norm diagnoses: the variants of a meta-gradient on a network with batch norm.

PyTorch's batch norm has two behaviours (CONVENTIONS, "Backbones beyond the MLP"):
train mode normalises with the batch statistics (differentiated through) and
updates the running statistics in place, ``r <- (1 - m) r + m * stat``; eval
mode normalises with the running statistics (constants). The usual bugs of a
Conv4/ResNet-12 MAML are mode and scope mistakes, each computed here from the
reference's pieces (:meth:`reference.nets.Network.eval`/``train``/``with_state``/
``running_stats``, exact gradients and Hessian-vector products of each mode):

* ``bn_running_stats``: the inner loop runs in eval mode (``model.eval()``
  before adapting, ``model.train()`` for the query loss): the support loss uses
  the running statistics. In PyTorch those statistics are the module's state
  *as the call goes*: every train-mode query forward updates them in place, so
  task ``t``'s inner loop uses the statistics left by tasks ``0..t-1``; the
  variant tracks that state (it starts from the module's statistics at the call,
  which the harness restores before every call). Also: eval mode everywhere.
* ``bn_batch_stats``: the reverse, batch statistics (train mode) where the
  network is in eval mode.
* ``bn_params_frozen`` (MAML): the batch-norm affine parameters (``weight``,
  ``bias``) left out of the inner update; ``bn_params_adapted`` (ANIL): adapted
  with the head.

The meta-gradient of a variant is the reference's adjoint (Finn et al. 2017,
``v_K = grad L_q(p_K)``, ``v_k = v_{k+1} - H_s(p_k) (a * v_{k+1})``) with the
support and query losses taken on the networks the variant says.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from reference import inner_loop
from reference.models import flatten
from reference.nets.layers import BatchNorm
from verify.algorithms import Case

__all__ = ["applies", "batchnorm_indices", "variants"]

Variant = tuple[str, str, Callable[[], tuple[Any, np.ndarray]]]


def applies(case: Case) -> bool:
    """Whether the case's model is a network with batch-norm layers."""
    return bool(getattr(case.model, "batchnorms", None))


def batchnorm_indices(model: Any) -> tuple[int, ...]:
    """Indices (public parameter order) of the batch-norm affine parameters."""
    paths = [p for p, bn in model.batchnorms]
    return tuple(i for i, name in enumerate(model.param_names)
                 if any(name == f"{p}.weight" or name == f"{p}.bias" for p in paths))


def _unrolled(case: Case, support_net: Any, query_net: Any, lrs: Sequence[Any], *, first_order: bool = False,
              track_state: bool = False) -> tuple[Any, np.ndarray]:
    """Meta-loss and meta-gradient with the support losses on ``support_net``, the query loss on ``query_net``.

    ``track_state``: the running statistics are the module's state as a PyTorch call leaves it: task ``t``'s
    networks hold the statistics after the train-mode query forwards of tasks ``0..t-1`` (eval-mode support
    forwards leave them unchanged).
    """
    params, steps = case.params, int(case.hyper["inner_steps"])
    state = query_net.state()
    total, grad = 0.0, None
    for t in case.tasks:
        s_net = support_net.with_state(state) if track_state else support_net
        q_net = query_net.with_state(state) if track_state else query_net
        iterates, _ = inner_loop.adapt(s_net, params, t.x_support, t.y_support, lrs, steps)
        loss, v = q_net.loss_and_grad_unchecked(iterates[-1], t.x_query, t.y_query)
        if not first_order:
            for k in reversed(range(steps)):
                direction = [np.zeros_like(vk) if a is None else a * vk for vk, a in zip(v, lrs)]
                hv = s_net.hvp_unchecked(iterates[k], t.x_support, t.y_support, direction)
                v = [vk - hk for vk, hk in zip(v, hv)]
        if track_state and q_net.mode != "eval":
            state = q_net.running_stats(iterates[-1], t.x_query)
        total = total + loss
        grad = list(v) if grad is None else [a + b for a, b in zip(grad, v)]
    m = len(case.tasks)
    return total / m, flatten([g / m for g in grad])


class _StaleBatchNorm(BatchNorm):
    """An eval-mode batch norm whose values use the running statistics of the forward (``S_t``) and whose
    derivatives use later ones (``S_F``, attribute ``stale = (mean, var)``).

    PyTorch's eval-mode ``batch_norm`` saves *references* to the running-statistics buffers for its
    backward, and a later train-mode forward updates those buffers in place without bumping their version
    counter (no "modified by an inplace operation" error): the backward and double backward run after the
    call then use the statistics in the buffers at that time, ``d y/d x = gamma / sqrt(var_F + eps)``,
    ``d y/d gamma = (x - mean_F) / sqrt(var_F + eps)``, while the values (the forward and the inner-loop
    gradients computed during the call) used ``S_t``. Values: the parent's passes; derivatives (``jvp`` and
    the R-parts of ``rbwd``): ``S_F``.
    """

    stale: tuple[np.ndarray, np.ndarray]

    def _f(self, x):
        mean, var = self.stale
        inv = 1.0 / np.sqrt(var + self.eps)
        return (x - mean) * inv, inv

    def fwd(self, P, x):
        y, cache = super().fwd(P, x)
        return y, (*cache, *self._f(x))

    def bwd(self, P, cache, gy, need_gx=True):
        return super().bwd(P, cache[:4], gy, need_gx)

    def jvp(self, P, cache, dP, dx):
        _, _, _, _, xhat_f, inv_f = cache
        gamma, _ = self._affine(P)
        dxhat = None if dx is None else dx * inv_f
        if self.affine:
            dy = xhat_f * dP[0] + dP[1]
            if dxhat is not None:
                dy = dy + dxhat * gamma
        else:
            dy = dxhat
        return dy, (dxhat, None)

    def rbwd(self, P, cache, rcache, gy, rgy, dP, dx, need_gx=True):
        xhat, inv, _, _, xhat_f, inv_f = cache
        dxhat, _ = rcache
        axes = tuple(range(gy.ndim - 1))
        gamma, _ = self._affine(P)
        gP, rgP = [], []
        if self.affine:
            gP = [(gy * xhat).sum(axis=axes), gy.sum(axis=axes)]
            r = rgy * xhat_f if dxhat is None else rgy * xhat_f + gy * dxhat
            rgP = [r.sum(axis=axes), rgy.sum(axis=axes)]
        gx = rgx = None
        if need_gx:
            ghat = gy * gamma if self.affine else gy
            rghat = (rgy * gamma + gy * dP[0]) if self.affine else rgy
            gx, rgx = ghat * inv, rghat * inv_f
        return gP, gx, rgP, rgx


def _stale(net: Any, final: dict[str, tuple[np.ndarray, np.ndarray, int]]) -> Any:
    """A copy of the eval-mode ``net`` whose batch-norm derivatives use the statistics ``final``."""
    new = net.with_state({})
    for path, bn in new.batchnorms:
        if path in final:
            bn.__class__ = _StaleBatchNorm
            bn.stale = (np.asarray(final[path][0]), np.asarray(final[path][1]))
    return new


def _pytorch_eval_inner(case: Case, ev: Any, tr: Any, lrs: Sequence[Any], *, first_order: bool) -> tuple[Any, np.ndarray]:
    """The eval-mode inner loop as a PyTorch call computes it (see :class:`_StaleBatchNorm`).

    Task ``t``'s inner loop runs with the running statistics ``S_t`` the earlier train-mode query forwards
    left (``S_0``: the module's at the call); the query loss in train mode; the backward, run after the
    call, differentiates every eval-mode batch norm with the final statistics ``S_T``.
    """
    params, steps = case.params, int(case.hyper["inner_steps"])
    state = tr.state()
    runs = []
    for t in case.tasks:
        s_net = ev.with_state(state)
        iterates, _ = inner_loop.adapt(s_net, params, t.x_support, t.y_support, lrs, steps)
        runs.append((state, iterates))
        state = tr.with_state(state).running_stats(iterates[-1], t.x_query)
    final = state
    total, grad = 0.0, None
    for t, (s_t, iterates) in zip(case.tasks, runs):
        q_net = tr.with_state(s_t)
        loss, v = q_net.loss_and_grad_unchecked(iterates[-1], t.x_query, t.y_query)
        if not first_order:
            s_net = _stale(ev.with_state(s_t), final)
            for k in reversed(range(steps)):
                direction = [np.zeros_like(vk) if a is None else a * vk for vk, a in zip(v, lrs)]
                hv = s_net.hvp_unchecked(iterates[k], t.x_support, t.y_support, direction)
                v = [vk - hk for vk, hk in zip(v, hv)]
        total = total + loss
        grad = list(v) if grad is None else [a + b for a, b in zip(grad, v)]
    m = len(case.tasks)
    return total / m, flatten([g / m for g in grad])


def _rates(case: Case, adapted: Callable[[int], bool]) -> list[Any]:
    lr = float(case.hyper["inner_lr"])
    return [lr if adapted(i) else None for i in range(len(case.params))]


def variants(case: Case) -> list[Variant]:
    """The batch-norm variants of this problem: ``(catalogue key, label, () -> (loss, flat grads))``."""
    a = case.algorithm
    if not applies(case) or a not in ("maml", "fomaml", "anil"):
        return []
    net = case.model
    first = a == "fomaml"
    head, bn = set(net.head_indices), set(batchnorm_indices(net))
    asked = (lambda i: i in head) if a == "anil" else (lambda i: True)
    lrs = _rates(case, asked)
    out: list[Variant] = []
    if net.mode != "eval":
        ev, tr = net.eval(), net.train()
        out.append(("bn_running_stats", "inner loop in eval mode (model.eval() before adapting, model.train() "
                    "for the query loss), as PyTorch computes it: each task's inner loop uses the running statistics "
                    "the earlier tasks' query forwards left, and the backward after the call the final ones",
                    lambda: _pytorch_eval_inner(case, ev, tr, lrs, first_order=first)))
        out.append(("bn_running_stats", "inner loop in eval mode (running statistics, carried from the earlier "
                    "tasks' train-mode query forwards), query loss in train mode",
                    lambda: _unrolled(case, ev, tr, lrs, first_order=first, track_state=True)))
        if len(case.tasks) > 1:
            out.append(("bn_running_stats", "inner loop in eval mode with the running statistics of the start of "
                        "the call (not updated between tasks), query loss in train mode",
                        lambda: _unrolled(case, ev, tr, lrs, first_order=first)))
        out.append(("bn_running_stats", "eval mode everywhere (running statistics in the inner loop and the query "
                    "loss)", lambda: _unrolled(case, ev, ev, lrs, first_order=first)))
    if net.mode != "train":
        tr = net.train()
        out.append(("bn_batch_stats", "train mode everywhere (batch statistics) where the network is in eval mode",
                    lambda: _unrolled(case, tr, tr, lrs, first_order=first)))
    if bn and a in ("maml", "fomaml"):
        out.append(("bn_params_frozen", "the batch-norm weight and bias left out of the inner update",
                    lambda: _unrolled(case, net, net, _rates(case, lambda i: i not in bn), first_order=first)))
    if bn and a == "anil":
        out.append(("bn_params_adapted", "the batch-norm weight and bias adapted with the head",
                    lambda: _unrolled(case, net, net, _rates(case, lambda i: i in head or i in bn))))
    return out
