"""The optimiser-driven inner loop in plain functional PyTorch (autograd through parameters and state).

Mirrors :mod:`reference.inner_optim` name for name: the same optimiser
*specs* (``reference.optimizers.SGD/Momentum/Adam``,
``reference.learned_optimizers.LSTMOptimizer/MetaLearnerLSTM``: their
hyper-parameters and ``phi``) are read and their formulas written again with
torch ops, as a practitioner would::

    for k in range(K):
        loss = L_s(p)
        g = torch.autograd.grad(loss, p, create_graph=True)
        d, state = T_k(p, state, g, loss)
        p = [p_i - a[k][i] * d_i for ...]

so ``torch.autograd.grad`` of the (multi-step) query loss gives the exact
meta-gradient w.r.t. ``theta``, every learning rate and ``phi`` by double
backward. The declared approximations are the usual ``detach`` idioms:
``first_order`` -> ``create_graph=False`` (gradient and loss inputs are
constants); ``truncate=T`` -> the steps before the last ``T`` run under
``torch.no_grad()`` and are applied as ``p - increment``; ``detach_state`` ->
``state = state.detach()`` before every step.

Known: at a coordinate where Adam's ``v = 0`` (every gradient so far exactly
zero) autograd's chain rule through ``sqrt`` gives ``0 * inf = NaN``; this
backend returns what torch returns there (the reference gives the exact limit).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from reference import inner_optim as ref
from reference.validation import check_positive_int
from reference.learned_optimizers import LSTMOptimizer, MetaLearnerLSTM
from reference.models import MLP, Quadratic
from reference.optimizers import SGD, Adam, Momentum
from reference.tasks import Task
from verify.backends.torch._model import FunctionalMLP, resolve_device, resolve_dtype, to_numpy, to_torch_tasks

__all__ = ["direction", "init_state", "meta_loss", "meta_loss_and_grad", "shared_rates"]

T = torch.Tensor


class _TorchQuadratic:
    """``1/2 (theta - c)^T A (theta - c)`` (``reference.models.Quadratic``) in torch."""

    def __init__(self, spec: Quadratic, dtype: Any, device: Any):
        self.dtype, self.device = resolve_dtype(dtype), resolve_device(device)

    def tensors(self, arrays: Sequence[Any], *, requires_grad: bool = False) -> list[T]:
        return [torch.tensor(np.asarray(a), dtype=self.dtype, device=self.device).requires_grad_(requires_grad)
                for a in arrays]

    def loss(self, params: Sequence[T], A: T, c: T) -> T:
        r = params[0] - c
        return 0.5 * (r @ (A @ r))


def _functional(model: Any, dtype: Any, device: Any) -> Any:
    if isinstance(model, Quadratic):
        return _TorchQuadratic(model, dtype, device)
    if isinstance(model, MLP):
        return FunctionalMLP(model, dtype, device)
    raise TypeError(f"model={model!r}: the torch inner loop supports reference.models.MLP and Quadratic")


def _tasks(model: Any, tasks: Sequence[Task], fm: Any) -> list[Any]:
    if isinstance(model, Quadratic):
        return [tuple(torch.as_tensor(np.asarray(a), dtype=fm.dtype, device=fm.device) for a in t) for t in tasks]
    return to_torch_tasks(tasks, fm.dtype, fm.device)


# ---------------------------------------------------------------------------
# Optimisers: torch formulas of the reference specs
# ---------------------------------------------------------------------------


def init_state(opt: Any, params: Sequence[T], active: Sequence[bool]) -> Any:
    """``s_0``: zero moments / hidden states, shaped as in the reference."""
    if isinstance(opt, (SGD, Momentum, Adam)):
        n = {SGD: 0, Momentum: 1, Adam: 2}[type(opt)]
        return [tuple(torch.zeros_like(p) for _ in range(n)) if a else None for p, a in zip(params, active)]
    n = sum(p.numel() for p, a in zip(params, active) if a)
    like = next(p for p, a in zip(params, active) if a)
    if isinstance(opt, LSTMOptimizer):
        return [like.new_zeros((n, opt.hidden)) for _ in range(2 * opt.layers)]
    if isinstance(opt, MetaLearnerLSTM):
        return [like.new_zeros(n), like.new_zeros(n)]
    raise TypeError(f"optimizer={opt!r} has no torch implementation")


def _flat(xs: Sequence[Any], active: Sequence[bool]) -> T:
    return torch.cat([x.reshape(-1) for x, a in zip(xs, active) if a])


def _split(flat: T, like: Sequence[Any], active: Sequence[bool]) -> list[Any]:
    out, i = [], 0
    for x, a in zip(like, active):
        if not a:
            out.append(None)
            continue
        out.append(flat[i:i + x.numel()].reshape(x.shape))
        i += x.numel()
    return out


def hyper_tensors(opt: Any, dtype: torch.dtype, device: torch.device) -> dict[str, T]:
    """The hand-designed optimiser's hyper-parameters as leaf tensors requiring grad (``MetaGradient.hyper``)."""
    names = {Momentum: ("momentum", "dampening"), Adam: ("b1", "b2", "eps", "eps_root")}.get(type(opt), ())
    return {n: torch.tensor(float(getattr(opt, n)), dtype=dtype, device=device, requires_grad=True) for n in names}


def direction(opt: Any, k: int, params: Sequence[T], state: Any, grads: Sequence[Any], loss: T,
              active: Sequence[bool], phi: Sequence[T], hp: dict[str, Any] | None = None) -> tuple[list[Any], Any]:
    """``(d_k, s_{k+1})`` of the optimiser spec ``opt`` in torch ops.

    ``phi``: a learned optimiser's meta-parameters as tensors; ``hp``: hyper-parameters as tensors
    (:func:`hyper_tensors`), default the spec's floats.
    """
    hp = hp or {}
    if isinstance(opt, SGD):
        return [None if not a else (g + opt.weight_decay * p if opt.weight_decay else g)
                for p, g, a in zip(params, grads, active)], state
    if isinstance(opt, Momentum):
        ds, ss = [], []
        for p, s, g, a in zip(params, state, grads, active):
            if not a:
                ds.append(None), ss.append(None)
                continue
            gp = g + opt.weight_decay * p if opt.weight_decay else g
            mu, tau = hp.get("momentum", opt.momentum), hp.get("dampening", opt.dampening)
            if k == 0 and opt.init_rule == "torch":
                b = gp
            else:
                b = mu * s[0] + (1.0 - tau) * gp
            ds.append(gp + mu * b if opt.nesterov else b)
            ss.append((b,))
        return ds, ss
    if isinstance(opt, Adam):
        ds, ss = [], []
        b1, b2 = hp.get("b1", opt.b1), hp.get("b2", opt.b2)
        eps, eps_root = hp.get("eps", opt.eps), hp.get("eps_root", opt.eps_root)
        bc1, bc2 = 1.0 - b1 ** (k + 1), 1.0 - b2 ** (k + 1)
        eps_k = eps if opt.eps_placement == "v_hat" else eps / bc2 ** 0.5
        for p, s, g, a in zip(params, state, grads, active):
            if not a:
                ds.append(None), ss.append(None)
                continue
            gp = g + opt.weight_decay * p if (opt.weight_decay and not opt.decoupled) else g
            m = b1 * s[0] + (1.0 - b1) * gp
            v = b2 * s[1] + (1.0 - b2) * gp * gp
            r = v.sqrt() / bc2 ** 0.5 if opt.eps_root == 0.0 else (v / bc2 + eps_root).sqrt()
            d = m / (bc1 * (r + eps_k))
            if opt.weight_decay and opt.decoupled:
                d = d + opt.weight_decay * p
            ds.append(d), ss.append((m, v))
        return ds, ss
    if isinstance(opt, LSTMOptimizer):
        H = opt.hidden
        inp = opt.input_scale * _flat(grads, active)[:, None]
        new = []
        for l in range(opt.layers):
            W_ih, W_hh, b = phi[3 * l], phi[3 * l + 1], phi[3 * l + 2]
            h, c = state[2 * l], state[2 * l + 1]
            z = inp @ W_ih.T + h @ W_hh.T + b
            i, f, o = torch.sigmoid(z[:, :H]), torch.sigmoid(z[:, H:2 * H]), torch.sigmoid(z[:, 3 * H:])
            c = f * c + i * torch.tanh(z[:, 2 * H:3 * H])
            h = o * torch.tanh(c)
            new += [h, c]
            inp = h
        d = opt.output_scale * (inp @ phi[-2].T + phi[-1])[:, 0]
        return _split(d, grads, active), new
    if isinstance(opt, MetaLearnerLSTM):
        sc = [float(x) for x in opt.input_scales]
        g, p = _flat(grads, active), _flat(params, active)
        ell = loss * torch.ones_like(g)
        W_I, b_I, W_F, b_F = phi
        i = torch.sigmoid(W_I[0] * sc[0] * g + W_I[1] * sc[1] * ell + W_I[2] * sc[2] * p + W_I[3] * sc[3] * state[0]
                          + b_I)
        f = torch.sigmoid(W_F[0] * sc[0] * g + W_F[1] * sc[1] * ell + W_F[2] * sc[2] * p + W_F[3] * sc[3] * state[1]
                          + b_F)
        return _split((1.0 - f) * p + i * g, grads, active), [i, f]
    raise TypeError(f"optimizer={opt!r} has no torch implementation")


def _detach(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.detach()
    if isinstance(tree, (list, tuple)):
        return type(tree)(_detach(t) for t in tree)
    return tree


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


class TorchMetaGradient(NamedTuple):
    loss: float
    params: list[np.ndarray]
    lrs: list[list[Any]]
    optimizer: list[np.ndarray]
    hyper: dict[str, float] = {}


def _task_loss(fm: Any, opt: Any, theta: Sequence[T], task: Any, lrs: Sequence[Sequence[Any]],
               active: Sequence[bool], steps: int, weights: np.ndarray, phi: Sequence[T],
               approx: ref.Approximation, hp: dict[str, T] | None = None) -> T:
    xs, ys, xq, yq = task
    p = list(theta)
    s = init_state(opt, p, active)
    first = 0 if approx.truncate is None else max(0, steps - approx.truncate)
    total = None
    idx = [i for i, a in enumerate(active) if a]
    for k in range(steps):
        in_window = k >= first
        loss_s = fm.loss(p, xs, ys)
        exact_inputs = in_window and not approx.first_order
        g_act = torch.autograd.grad(loss_s, [p[i] for i in idx], create_graph=exact_inputs)
        g: list[Any] = [None] * len(p)
        for i, gi in zip(idx, g_act):
            g[i] = gi
        loss_in = loss_s if exact_inputs else loss_s.detach()
        if approx.detach_state:
            s = _detach(s)
        if in_window:
            d, s = direction(opt, k, p, s, g, loss_in, active, phi, hp)
            p = [pi if a is None else pi - a * di for pi, di, a in zip(p, d, lrs[k])]
        else:
            with torch.no_grad():
                d, s = direction(opt, k, [pi.detach() for pi in p], _detach(s), g, loss_in, active,
                                 [ph.detach() for ph in phi])
                inc = [None if a is None else _detach(a) * di for di, a in zip(d, lrs[k])]
            p = [pi if u is None else pi - u for pi, u in zip(p, inc)]
        if weights[k] != 0:
            term = float(weights[k]) * fm.loss(p, xq, yq)
            total = term if total is None else total + term
    return total


def _setup(model: Any, params: Any, tasks: Any, lrs: Any, inner_steps: Any, optimizer: Any, weights: Any,
           dtype: Any, device: Any):
    params, tasks, steps, lrs, active, w, opt = ref.check_arguments(model, params, tasks, lrs, inner_steps, weights,
                                                                    optimizer)
    fm = _functional(model, dtype, device)
    theta = fm.tensors(params, requires_grad=True)
    t_lrs = [[None if a is None else torch.tensor(np.asarray(a), dtype=fm.dtype, device=fm.device,
                                                  requires_grad=True) for a in row] for row in lrs]
    phi = fm.tensors(opt.meta_params, requires_grad=True) if opt.meta_params else []
    return fm, theta, _tasks(model, tasks, fm), steps, t_lrs, active, w, opt, phi


def meta_loss(model: Any, params: Sequence[Any], tasks: Sequence[Task], lrs: Any, inner_steps: int, *,
              optimizer: Any = None, weights: Any = None, dtype: str = "float64", device: str = "cpu") -> float:
    """Meta-loss of :func:`reference.inner_optim.meta_loss`, computed by torch."""
    fm, theta, ttasks, steps, t_lrs, active, w, opt, phi = _setup(model, params, tasks, lrs, inner_steps, optimizer,
                                                                  weights, dtype, device)
    total = sum(_task_loss(fm, opt, theta, t, t_lrs, active, steps, w, phi, ref.EXACT) for t in ttasks)
    return float(total.detach()) / len(ttasks)


def meta_loss_and_grad(model: Any, params: Sequence[Any], tasks: Sequence[Task], lrs: Any, inner_steps: int, *,
                       optimizer: Any = None, weights: Any = None, approximation: Any = None,
                       dtype: str = "float64", device: str = "cpu") -> TorchMetaGradient:
    """Meta-loss and its gradients w.r.t. ``theta``, every ``lrs[k][i]`` and ``phi`` by torch autograd.

    One task's graph at a time (``(loss / T)`` differentiated per task, then
    summed), as a training loop would.
    """
    fm, theta, ttasks, steps, t_lrs, active, w, opt, phi = _setup(model, params, tasks, lrs, inner_steps, optimizer,
                                                                  weights, dtype, device)
    approx = ref.check_approximation(approximation)
    flat_lrs = [a for row in t_lrs for a in row if a is not None]
    # float64 even in a float32 run, as torch.optim's Python floats: the 0-dim tensors do not promote the float32
    # arrays they scale, and Adam's bias corrections 1 - b^t are computed in double. In float32, 1 - b2^2 =
    # 1 - 0.998001 turns b2^2's rounding (up to 6e-8) into up to 1.5e-5 relative, not shared by v's update
    # (torchopt's float32 bias correction); that put 4 of 80 float32 Adam cases over the matrix's tolerance
    # (scripts/adam_float32.py, reports/inner-optimizers/adam-float32.md).
    hp = hyper_tensors(opt, torch.float64, fm.device)
    wrt = [*theta, *flat_lrs, *phi, *hp.values()]
    n = len(ttasks)
    total, grads = 0.0, None
    for t in ttasks:
        loss = _task_loss(fm, opt, theta, t, t_lrs, active, steps, w, phi, approx, hp) / n
        g = torch.autograd.grad(loss, wrt, allow_unused=True)
        g = [torch.zeros_like(x) if gi is None else gi for gi, x in zip(g, wrt)]
        grads = g if grads is None else [a + b for a, b in zip(grads, g)]
        total += float(loss.detach())
    assert grads is not None
    out = [to_numpy(g) for g in grads]
    n_theta, n_lr = len(theta), len(flat_lrs)
    it = iter(out[n_theta:n_theta + n_lr])
    g_lrs = [[None if a is None else (lambda x: x if x.ndim else float(x))(next(it)) for a in row] for row in t_lrs]
    n_phi = len(phi)
    hyper = {name: float(g) for name, g in zip(hp, out[n_theta + n_lr + n_phi:])}
    return TorchMetaGradient(total, out[:n_theta], g_lrs, out[n_theta + n_lr:n_theta + n_lr + n_phi], hyper)


def shared_rates(model: Any, params: Sequence[Any], tasks: Sequence[Task], rates: Sequence[Any], inner_steps: int, *,
                 optimizer: Any, first_order: bool = False, dtype: str = "float64", device: str = "cpu"
                 ) -> tuple[float, list[np.ndarray], list[Any]]:
    """One rate per tensor for every step (MAML, ANIL, Meta-SGD with ``inner_optimizer=``); see the reference's."""
    steps = check_positive_int("inner_steps", inner_steps)
    r = meta_loss_and_grad(model, params, tasks, [list(rates)] * steps, steps, optimizer=optimizer,
                           approximation=ref.Approximation(first_order=bool(first_order)), dtype=dtype, device=device)
    return r.loss, r.params, [None if a is None else sum(r.lrs[k][i] for k in range(steps))
                              for i, a in enumerate(rates)]
