"""The optimiser-driven inner loop in plain functional JAX (``jax.grad`` through parameters and state).

Mirrors :mod:`reference.inner_optim` and ``verify.backends.torch.inner_optim``:
the reference's optimiser specs are read and their formulas written with
``jax.numpy``; ``jax.value_and_grad`` of the (multi-step) query loss w.r.t.
``(theta, lrs, phi)`` gives the meta-gradient. Declared approximations are
``jax.lax.stop_gradient`` on the inner gradient and loss (``first_order``), on
the increment and state of every step before the last ``T``
(``truncate=T``), and on the state entering each step (``detach_state``).

``jit=True`` compiles the unrolled loop and its reverse pass as one ``jax.jit``
program per configuration (model spec, optimiser hyper-parameters, adapted
tensors, rate pattern, ``K``, non-zero weights, approximation), cached in
:data:`_PROGRAMS`; the values (``theta``, rates, ``phi``, tasks, weights) are
its arguments. Eager (``jit=False``) runs the same code op by op. In the check
matrix, compiled under :func:`verify.backends.jax.quick_compile`, a cell costs
~0.6-1.4 s of CPU where the eager loop took 3-4 s (MAML with momentum) to
10-18 s (MAML++, the LSTM optimiser), almost all of it compiling single
primitives (issue #18).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from reference import inner_optim as ref
from reference.validation import check_positive_int
from reference.learned_optimizers import LSTMOptimizer, MetaLearnerLSTM
from reference.models import MLP, Quadratic
from reference.optimizers import SGD, Adam, Momentum
from reference.tasks import Task
from verify.backends.jax._model import build_loss, check_dtype, check_jit, maybe_jit, spec_key, to_jax_tasks

import jax.numpy as jnp  # noqa: E402  (after verify.backends.jax._model, which enables x64)

__all__ = ["direction", "init_state", "meta_loss", "meta_loss_and_grad", "shared_rates"]

sg = jax.lax.stop_gradient


def _loss_fn(model: Any) -> Any:
    if isinstance(model, Quadratic):
        def quadratic(params: Sequence[jax.Array], A: jax.Array, c: jax.Array) -> jax.Array:
            r = params[0] - c
            return 0.5 * r @ (A @ r)
        return quadratic
    if isinstance(model, MLP):
        return build_loss(model)
    raise TypeError(f"model={model!r}: the JAX inner loop supports reference.models.MLP and Quadratic")


def init_state(opt: Any, params: Sequence[jax.Array], active: Sequence[bool]) -> Any:
    """``s_0`` shaped as in the reference."""
    if isinstance(opt, (SGD, Momentum, Adam)):
        n = {SGD: 0, Momentum: 1, Adam: 2}[type(opt)]
        return [tuple(jnp.zeros_like(p) for _ in range(n)) if a else None for p, a in zip(params, active)]
    n = sum(p.size for p, a in zip(params, active) if a)
    dtype = next(p for p, a in zip(params, active) if a).dtype
    if isinstance(opt, LSTMOptimizer):
        return [jnp.zeros((n, opt.hidden), dtype) for _ in range(2 * opt.layers)]
    if isinstance(opt, MetaLearnerLSTM):
        return [jnp.zeros(n, dtype), jnp.zeros(n, dtype)]
    raise TypeError(f"optimizer={opt!r} has no JAX implementation")


def _flat(xs: Sequence[Any], active: Sequence[bool]) -> jax.Array:
    return jnp.concatenate([jnp.ravel(x) for x, a in zip(xs, active) if a])


def _split(flat: jax.Array, like: Sequence[Any], active: Sequence[bool]) -> list[Any]:
    out, i = [], 0
    for x, a in zip(like, active):
        if not a:
            out.append(None)
            continue
        out.append(flat[i:i + x.size].reshape(x.shape))
        i += x.size
    return out


def direction(opt: Any, k: int, params: Sequence[Any], state: Any, grads: Sequence[Any], loss: Any,
              active: Sequence[bool], phi: Sequence[Any]) -> tuple[list[Any], Any]:
    """``(d_k, s_{k+1})`` of the optimiser spec ``opt`` in ``jax.numpy``."""
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
            b = gp if (k == 0 and opt.init_rule == "torch") else opt.momentum * s[0] + (1.0 - opt.dampening) * gp
            ds.append(gp + opt.momentum * b if opt.nesterov else b)
            ss.append((b,))
        return ds, ss
    if isinstance(opt, Adam):
        ds, ss = [], []
        bc1, bc2 = 1.0 - opt.b1 ** (k + 1), 1.0 - opt.b2 ** (k + 1)
        for p, s, g, a in zip(params, state, grads, active):
            if not a:
                ds.append(None), ss.append(None)
                continue
            gp = g + opt.weight_decay * p if (opt.weight_decay and not opt.decoupled) else g
            m = opt.b1 * s[0] + (1.0 - opt.b1) * gp
            v = opt.b2 * s[1] + (1.0 - opt.b2) * gp * gp
            r = jnp.sqrt(v) / np.sqrt(bc2) if opt.eps_root == 0.0 else jnp.sqrt(v / bc2 + opt.eps_root)
            d = m / (bc1 * (r + opt.eps_at(k)))
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
            i, f, o = jax.nn.sigmoid(z[:, :H]), jax.nn.sigmoid(z[:, H:2 * H]), jax.nn.sigmoid(z[:, 3 * H:])
            c = f * c + i * jnp.tanh(z[:, 2 * H:3 * H])
            h = o * jnp.tanh(c)
            new += [h, c]
            inp = h
        d = opt.output_scale * (inp @ phi[-2].T + phi[-1])[:, 0]
        return _split(d, grads, active), new
    if isinstance(opt, MetaLearnerLSTM):
        sc = [float(x) for x in opt.input_scales]
        g, p = _flat(grads, active), _flat(params, active)
        ell = loss * jnp.ones_like(g)
        W_I, b_I, W_F, b_F = phi
        i = jax.nn.sigmoid(W_I[0] * sc[0] * g + W_I[1] * sc[1] * ell + W_I[2] * sc[2] * p
                           + W_I[3] * sc[3] * state[0] + b_I)
        f = jax.nn.sigmoid(W_F[0] * sc[0] * g + W_F[1] * sc[1] * ell + W_F[2] * sc[2] * p
                           + W_F[3] * sc[3] * state[1] + b_F)
        return _split((1.0 - f) * p + i * g, grads, active), [i, f]
    raise TypeError(f"optimizer={opt!r} has no JAX implementation")


class JaxMetaGradient(NamedTuple):
    loss: float
    params: list[np.ndarray]
    lrs: list[list[Any]]
    optimizer: list[np.ndarray]


def _task_loss(loss_fn: Any, opt: Any, theta: Sequence[Any], task: Task, lrs: Sequence[Sequence[Any]],
               active: Sequence[bool], steps: int, weighted: Sequence[bool], w: jax.Array, phi: Sequence[Any],
               approx: ref.Approximation) -> jax.Array:
    """``sum_k w_k L_q(p_k)`` of one task; ``weighted[k]`` (static) says whether ``w_k != 0``."""
    p = list(theta)
    s = init_state(opt, p, active)
    first = 0 if approx.truncate is None else max(0, steps - approx.truncate)
    total = 0.0
    value_and_grad = jax.value_and_grad(loss_fn)
    for k in range(steps):
        loss_s, g = value_and_grad(p, task.x_support, task.y_support)
        g = [gi if a else None for gi, a in zip(g, active)]
        in_window = k >= first
        if approx.first_order or not in_window:
            loss_s, g = sg(loss_s), [None if gi is None else sg(gi) for gi in g]
        if approx.detach_state or not in_window:
            s = jax.tree_util.tree_map(sg, s)
        if in_window:
            d, s = direction(opt, k, p, s, g, loss_s, active, phi)
            p = [pi if a is None else pi - a * di for pi, di, a in zip(p, d, lrs[k])]
        else:
            d, s = direction(opt, k, [sg(pi) for pi in p], s, g, loss_s, active, [sg(x) for x in phi])
            s = jax.tree_util.tree_map(sg, s)
            p = [pi if a is None else pi - sg(a * di) for pi, di, a in zip(p, d, lrs[k])]
        if weighted[k]:
            total = total + w[k] * loss_fn(p, task.x_query, task.y_query)
    return total


def _hashable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value if isinstance(value, (bool, int, float, str, type(None))) else repr(value)


def _optimizer_key(opt: Any) -> tuple:
    """Every attribute of the optimiser spec but its meta-parameters ``phi`` (traced arguments)."""
    return (type(opt).__module__, type(opt).__qualname__,
            tuple(sorted((k, _hashable(v)) for k, v in vars(opt).items() if k != "_phi")))


def _model_key(model: Any) -> tuple:
    return ("quadratic",) if isinstance(model, Quadratic) else spec_key(model)


#: Compiled programs per configuration (see :func:`_program`); bounded so that a long session does not grow.
_PROGRAMS: OrderedDict[tuple, Any] = OrderedDict()
_MAX_PROGRAMS = 128


def _program(model: Any, opt: Any, active: Sequence[bool], pattern: tuple, steps: int, weighted: tuple,
             approx: ref.Approximation, with_grad: bool, jit: bool) -> Any:
    """``f(theta, flat_lrs, phi, tasks, w)``: the mean over ``tasks`` of :func:`_task_loss` (with its gradients
    w.r.t. ``theta``, the rates and ``phi`` when ``with_grad``), jitted when ``jit``.

    Everything Python branches on is static and in the cache key: the model spec, every non-array attribute of
    the optimiser (its formulas read them as constants), the adapted tensors, the ``None`` pattern of the rate
    schedule, ``K``, which weights are non-zero, the approximation. The values (``theta``, rates, ``phi``,
    tasks, weights) are arguments, so a new problem of the same configuration and shapes reuses the compiled
    program (``jax.jit`` retraces for new shapes or dtypes by itself).
    """
    key = (_model_key(model), _optimizer_key(opt), tuple(active), pattern, steps, weighted, approx, with_grad, jit)
    fn = _PROGRAMS.get(key)
    if fn is not None:
        _PROGRAMS.move_to_end(key)
        return fn
    loss_fn = _loss_fn(model)

    def total(theta: list[Any], flat: list[Any], phi: list[Any], tasks: list[Task], w: jax.Array) -> jax.Array:
        it = iter(flat)
        rows = [[next(it) if a else None for a in row] for row in pattern]
        out = 0.0
        for t in tasks:
            out = out + _task_loss(loss_fn, opt, theta, t, rows, active, steps, weighted, w, phi, approx)
        return out / len(tasks)

    fn = jax.value_and_grad(total, argnums=(0, 1, 2)) if with_grad else total
    fn = maybe_jit(fn, jit)
    _PROGRAMS[key] = fn
    if len(_PROGRAMS) > _MAX_PROGRAMS:
        _PROGRAMS.popitem(last=False)
    return fn


def _jax_inputs(model: Any, params: Sequence[Any], tasks: Sequence[Task], lrs: Any, opt: Any, w: np.ndarray,
                dtype: str) -> tuple[list[Any], list[Task], list[Any], list[Any], jax.Array, tuple]:
    """``theta``, the tasks, the flat non-``None`` rates, ``phi`` and the weights in ``dtype``; the rates' pattern."""
    jdt = check_dtype(dtype)
    if isinstance(model, Quadratic):
        jtasks = [Task(*(jnp.asarray(np.asarray(a), dtype=jdt) for a in t)) for t in tasks]
    else:
        jtasks = to_jax_tasks(tasks, dtype)
    theta = [jnp.asarray(p, dtype=jdt) for p in params]
    flat_lrs = [jnp.asarray(np.asarray(a), dtype=jdt) for row in lrs for a in row if a is not None]
    phi = [jnp.asarray(x, dtype=jdt) for x in opt.meta_params]
    pattern = tuple(tuple(a is not None for a in row) for row in lrs)
    # w_k * L_q in dtype, as the float w_k times a dtype loss was before (a Python float is weakly typed)
    return theta, jtasks, flat_lrs, phi, jnp.asarray(np.asarray(w, dtype=np.float64), dtype=jdt), pattern


def meta_loss_and_grad(model: Any, params: Sequence[Any], tasks: Sequence[Task], lrs: Any, inner_steps: int, *,
                       optimizer: Any = None, weights: Any = None, approximation: Any = None,
                       dtype: str = "float64", jit: bool = False) -> JaxMetaGradient:
    """Meta-loss and its gradients w.r.t. ``theta``, every ``lrs[k][i]`` and ``phi`` by ``jax.value_and_grad``.

    ``jit=True`` compiles the unrolled loop with ``jax.jit`` (one program per configuration, cached:
    see :func:`_program`); ``False`` runs it eagerly, op by op.
    """
    params, tasks, steps, lrs, active, w, opt = ref.check_arguments(model, params, tasks, lrs, inner_steps, weights,
                                                                    optimizer)
    approx = ref.check_approximation(approximation)
    jit = check_jit(jit)
    theta, jtasks, flat_lrs, phi, jw, pattern = _jax_inputs(model, params, tasks, lrs, opt, w, dtype)
    fn = _program(model, opt, active, pattern, steps, tuple(bool(x != 0) for x in w), approx, True, jit)
    value, (g_theta, g_lrs, g_phi) = fn(theta, flat_lrs, phi, jtasks, jw)
    it = iter(g_lrs)
    rows = [[None if a is None else (lambda x: x if x.ndim else float(x))(np.asarray(next(it))) for a in row]
            for row in lrs]
    return JaxMetaGradient(float(value), [np.asarray(g) for g in g_theta], rows, [np.asarray(g) for g in g_phi])


def meta_loss(model: Any, params: Sequence[Any], tasks: Sequence[Task], lrs: Any, inner_steps: int, *,
              optimizer: Any = None, weights: Any = None, dtype: str = "float64", jit: bool = False) -> float:
    """Meta-loss of :func:`reference.inner_optim.meta_loss`, computed by JAX (forward only; ``jit`` as above)."""
    params, tasks, steps, lrs, active, w, opt = ref.check_arguments(model, params, tasks, lrs, inner_steps, weights,
                                                                    optimizer)
    jit = check_jit(jit)
    theta, jtasks, flat_lrs, phi, jw, pattern = _jax_inputs(model, params, tasks, lrs, opt, w, dtype)
    fn = _program(model, opt, active, pattern, steps, tuple(bool(x != 0) for x in w), ref.EXACT, False, jit)
    return float(fn(theta, flat_lrs, phi, jtasks, jw))


def shared_rates(model: Any, params: Sequence[Any], tasks: Sequence[Task], rates: Sequence[Any], inner_steps: int, *,
                 optimizer: Any, first_order: bool = False, dtype: str = "float64", jit: bool = False
                 ) -> tuple[float, list[np.ndarray], list[Any]]:
    """One rate per tensor for every step (MAML, ANIL, Meta-SGD with ``inner_optimizer=``); see the reference's."""
    steps = check_positive_int("inner_steps", inner_steps)
    r = meta_loss_and_grad(model, params, tasks, [list(rates)] * steps, steps, optimizer=optimizer,
                           approximation=ref.Approximation(first_order=bool(first_order)), dtype=dtype, jit=jit)
    return r.loss, r.params, [None if a is None else sum(r.lrs[k][i] for k in range(steps))
                              for i, a in enumerate(rates)]
