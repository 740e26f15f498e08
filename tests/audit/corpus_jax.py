"""A corpus of JAX meta-learning implementations, correct and deliberately buggy.

Calling contract: ``fn(params, apply_fn, tasks, ...)`` returning the meta-loss
(the audit applies ``jax.value_and_grad``) or ``(loss, grads)``. Each buggy
function carries one bug of the diagnosis catalogue, named in its docstring.
The inner loops are Python loops over static step counts, as JAX code writes
them (the audit runs them under ``jax.jit``).
"""

from __future__ import annotations

import jax
import jax.flatten_util
import jax.numpy as jnp


def task_loss(out, y, reduction="mean"):
    if jnp.issubdtype(y.dtype, jnp.integer):
        per = -jnp.take_along_axis(jax.nn.log_softmax(out, axis=-1), y[:, None], axis=-1)
    else:
        per = (out - y) ** 2
    return jnp.mean(per) if reduction == "mean" else jnp.sum(per)


def _maml(params, apply_fn, tasks, inner_lr, inner_steps, *, stop=lambda k: False, sign=-1.0, steps_delta=0,
          swap=False, head_only=False, average=True, cut=(), adapt_query=True):
    params = [jax.lax.stop_gradient(p) if i in cut else p for i, p in enumerate(params)]
    n_head = 2
    total = 0.0
    for t in tasks:
        xs, ys, xq, yq = (t.x_query, t.y_query, t.x_support, t.y_support) if swap else tuple(t)
        fast = list(params)
        for k in range(inner_steps + steps_delta):
            g = jax.grad(lambda p: task_loss(apply_fn(p, xs), ys))(fast)
            if stop(k):
                g = jax.lax.stop_gradient(g)
            if head_only:
                g = [jnp.zeros_like(x) for x in g[:-n_head]] + list(g[-n_head:])
            fast = [p + sign * inner_lr * gi for p, gi in zip(fast, g)]
        total = total + task_loss(apply_fn(fast if adapt_query else params, xq), yq)
    return total / len(tasks) if average else total


def maml(params, apply_fn, tasks, inner_lr, inner_steps):
    """Correct MAML."""
    return _maml(params, apply_fn, tasks, inner_lr, inner_steps)


def maml_first_order(params, apply_fn, tasks, inner_lr, inner_steps):
    """Bug: jax.lax.stop_gradient on every inner gradient."""
    return _maml(params, apply_fn, tasks, inner_lr, inner_steps, stop=lambda k: True)


def maml_last_step_only(params, apply_fn, tasks, inner_lr, inner_steps):
    """Bug: stop_gradient on all but the last inner gradient."""
    return _maml(params, apply_fn, tasks, inner_lr, inner_steps, stop=lambda k: k < inner_steps - 1)


def maml_double_lr(params, apply_fn, tasks, inner_lr, inner_steps):
    """Bug: twice the inner learning rate."""
    return _maml(params, apply_fn, tasks, 2.0 * inner_lr, inner_steps)


def maml_sum_tasks(params, apply_fn, tasks, inner_lr, inner_steps):
    """Bug: summed over tasks."""
    return _maml(params, apply_fn, tasks, inner_lr, inner_steps, average=False)


def maml_swapped(params, apply_fn, tasks, inner_lr, inner_steps):
    """Bug: support and query swapped."""
    return _maml(params, apply_fn, tasks, inner_lr, inner_steps, swap=True)


def maml_missing_step(params, apply_fn, tasks, inner_lr, inner_steps):
    """Bug: range(inner_steps - 1)."""
    return _maml(params, apply_fn, tasks, inner_lr, inner_steps, steps_delta=-1)


def maml_head_only(params, apply_fn, tasks, inner_lr, inner_steps):
    """Bug (for MAML): only the head adapted."""
    return _maml(params, apply_fn, tasks, inner_lr, inner_steps, head_only=True)


def maml_bias_cut(params, apply_fn, tasks, inner_lr, inner_steps):
    """Bug: stop_gradient on the first layer's bias."""
    return _maml(params, apply_fn, tasks, inner_lr, inner_steps, cut=(1,))


def maml_returns_grads(params, apply_fn, tasks, inner_lr, inner_steps):
    """Correct MAML returning (loss, grads)."""
    return jax.value_and_grad(maml)(params, apply_fn, tasks, inner_lr, inner_steps)


def _maml_optim(params, apply_fn, tasks, inner_lr, inner_steps, *, kind="adam", head_only=False, eps_hat=False,
                detach_state=False, backprop_last=None):
    """MAML/ANIL with torch.optim.Adam (defaults) / SGD(momentum=0.9)'s update (optax.adam's eps_root=0 form).

    ``eps_hat``: eps added to sqrt(v) before the bias correction (Kingma & Ba's eps-hat).
    ``backprop_last``: differentiate through the last ``backprop_last`` steps only (earlier increments and
    the optimiser state behind them under ``stop_gradient``), as corpus_torch's truncated BPTT.
    """
    b1, b2, eps = 0.9, 0.999, 1e-8
    n_head = 2
    total = 0.0
    for t in tasks:
        fast = list(params)
        m = v = buf = None
        for k in range(1, inner_steps + 1):
            g = jax.grad(lambda p: task_loss(apply_fn(p, t.x_support), t.y_support))(fast)
            if head_only:  # only the head is adapted (a zero gradient through sqrt(v = 0) would be NaN)
                g = g[-n_head:]
            if detach_state and m is not None:
                m, v = jax.lax.stop_gradient(m), jax.lax.stop_gradient(v)
            if detach_state and buf is not None:
                buf = jax.lax.stop_gradient(buf)
            if kind == "adam":
                m = [(1 - b1) * gi for gi in g] if m is None else [b1 * a + (1 - b1) * gi for a, gi in zip(m, g)]
                v = [(1 - b2) * gi * gi for gi in g] if v is None else [b2 * a + (1 - b2) * gi * gi
                                                                        for a, gi in zip(v, g)]
                c1, c2 = 1 - b1**k, 1 - b2**k
                if eps_hat:
                    step = [inner_lr * c2**0.5 / c1 * a / (jnp.sqrt(b) + eps) for a, b in zip(m, v)]
                else:
                    step = [inner_lr * (a / c1) / (jnp.sqrt(b) / c2**0.5 + eps) for a, b in zip(m, v)]
            else:
                buf = list(g) if buf is None else [0.9 * a + gi for a, gi in zip(buf, g)]
                step = [inner_lr * a for a in buf]
            if backprop_last is not None and k <= inner_steps - backprop_last:
                sg = jax.lax.stop_gradient
                step = [sg(u) for u in step]
                m = None if m is None else [sg(a) for a in m]
                v = None if v is None else [sg(b) for b in v]
                buf = None if buf is None else [sg(a) for a in buf]
            if head_only:
                fast = fast[:-n_head] + [p - u for p, u in zip(fast[-n_head:], step)]
            else:
                fast = [p - u for p, u in zip(fast, step)]
        total = total + task_loss(apply_fn(fast, t.x_query), t.y_query)
    return total / len(tasks)


def maml_adam(params, apply_fn, tasks, inner_lr, inner_steps):
    """Correct MAML with torch.optim.Adam's update, differentiated through the moments."""
    return _maml_optim(params, apply_fn, tasks, inner_lr, inner_steps)


def maml_adam_eps_hat(params, apply_fn, tasks, inner_lr, inner_steps):
    """Bug (for maml-adam): eps added to sqrt(v) before bias correction."""
    return _maml_optim(params, apply_fn, tasks, inner_lr, inner_steps, eps_hat=True)


def maml_adam_state_detached(params, apply_fn, tasks, inner_lr, inner_steps):
    """Bug: stop_gradient on Adam's moments between steps."""
    return _maml_optim(params, apply_fn, tasks, inner_lr, inner_steps, detach_state=True)


def maml_adam_truncated(params, apply_fn, tasks, inner_lr, inner_steps):
    """Bug: backpropagation through the last inner step only (earlier steps applied as stopped increments)."""
    return _maml_optim(params, apply_fn, tasks, inner_lr, inner_steps, backprop_last=1)


def maml_momentum(params, apply_fn, tasks, inner_lr, inner_steps):
    """Correct MAML with SGD(momentum=0.9)'s update (buffer = g at the first step)."""
    return _maml_optim(params, apply_fn, tasks, inner_lr, inner_steps, kind="momentum")


def anil_adam(params, apply_fn, tasks, inner_lr, inner_steps):
    """Correct ANIL with Adam on the head."""
    return _maml_optim(params, apply_fn, tasks, inner_lr, inner_steps, head_only=True)


def anil(params, apply_fn, tasks, inner_lr, inner_steps):
    """Correct ANIL."""
    return _maml(params, apply_fn, tasks, inner_lr, inner_steps, head_only=True)


def anil_full(params, apply_fn, tasks, inner_lr, inner_steps):
    """Bug (for ANIL): every layer adapted."""
    return _maml(params, apply_fn, tasks, inner_lr, inner_steps)


def metasgd(params, apply_fn, lrs, tasks, inner_steps, *, stop_lrs=False):
    """Correct Meta-SGD."""
    lrs = [jax.lax.stop_gradient(a) for a in lrs] if stop_lrs else lrs
    total = 0.0
    for t in tasks:
        fast = list(params)
        for _ in range(inner_steps):
            g = jax.grad(lambda p: task_loss(apply_fn(p, t.x_support), t.y_support))(fast)
            fast = [p - a * gi for p, a, gi in zip(fast, lrs, g)]
        total = total + task_loss(apply_fn(fast, t.x_query), t.y_query)
    return total / len(tasks)


def metasgd_lrs_stopped(params, apply_fn, lrs, tasks, inner_steps):
    """Bug: stop_gradient on the learning rates."""
    return metasgd(params, apply_fn, lrs, tasks, inner_steps, stop_lrs=True)


def reptile(params, apply_fn, tasks, inner_lr, inner_steps, *, sign=1.0):
    """Correct Reptile direction."""
    total = [jnp.zeros_like(p) for p in params]
    for t in tasks:
        fast = list(params)
        for _ in range(inner_steps):
            g = jax.grad(lambda p: task_loss(apply_fn(p, t.x_support), t.y_support))(fast)
            fast = [p - inner_lr * gi for p, gi in zip(fast, g)]
        total = [acc + sign * (p0 - p) for acc, p0, p in zip(total, params, fast)]
    return [acc / len(tasks) for acc in total]


def reptile_sign(params, apply_fn, tasks, inner_lr, inner_steps):
    """Bug: p_K - theta."""
    return reptile(params, apply_fn, tasks, inner_lr, inner_steps, sign=-1.0)


def _imaml(params, apply_fn, tasks, lam, *, cg_iterations=None):
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    total, grad = 0.0, jnp.zeros_like(flat)
    for t in tasks:
        ls = lambda z: task_loss(apply_fn(unravel(z), t.x_support), t.y_support)  # noqa: E731
        lq = lambda z: task_loss(apply_fn(unravel(z), t.x_query), t.y_query)  # noqa: E731


        def newton(_, phi):  # Newton on L_s(phi) + lam/2 ||phi - theta||^2
            r = jax.grad(ls)(phi) + lam * (phi - flat)
            return phi - jnp.linalg.solve(jax.hessian(ls)(phi) + lam * jnp.eye(flat.size), r)

        phi = jax.lax.stop_gradient(jax.lax.fori_loop(0, 12, newton, flat))
        A = jnp.eye(flat.size) + jax.hessian(ls)(phi) / lam
        b = jax.grad(lq)(phi)
        if cg_iterations is None:
            x = jnp.linalg.solve(A, b)
        else:
            x, r = jnp.zeros_like(b), b
            p = r
            for _ in range(cg_iterations):
                Ap = A @ p
                alpha = (r @ r) / (p @ Ap)
                x = x + alpha * p
                r_new = r - alpha * Ap
                p = r_new + (r_new @ r_new) / (r @ r) * p
                r = r_new
        total = total + lq(phi)
        grad = grad + x / len(tasks)
    return total / len(tasks), unravel(grad)


def imaml(params, apply_fn, tasks, lam):
    """Correct iMAML returning (loss, grads)."""
    return _imaml(params, apply_fn, tasks, lam)


def imaml_truncated_cg(params, apply_fn, tasks, lam):
    """Bug: 2 CG iterations."""
    return _imaml(params, apply_fn, tasks, lam, cg_iterations=2)


def r2d2(params, apply_fn, tasks, lam, scale, offset, n_classes=None, *, normalize=True, stop_lam=False):
    """R2-D2, primal form, bias column, normalize=True by default; ``n_classes`` passed by the audit by name."""
    lam = jax.lax.stop_gradient(lam) if stop_lam else lam
    total = 0.0
    for t in tasks:
        zs, zq = apply_fn(params, t.x_support), apply_fn(params, t.x_query)
        zs = jnp.concatenate([zs, jnp.ones((zs.shape[0], 1))], 1)
        zq = jnp.concatenate([zq, jnp.ones((zq.shape[0], 1))], 1)
        y = jax.nn.one_hot(t.y_support, n_classes)
        n = zs.shape[0]
        if normalize:
            zs, y = zs / jnp.sqrt(n), y / jnp.sqrt(n)
        w = jnp.linalg.solve(zs.T @ zs + lam * jnp.eye(zs.shape[1]), zs.T @ y)
        total = total + task_loss(scale * (zq @ w) + offset, t.y_query)
    return total / len(tasks)


def r2d2_lam_stopped(params, apply_fn, tasks, lam, scale, offset, n_classes=None):
    """Bug: stop_gradient on lam."""
    return r2d2(params, apply_fn, tasks, lam, scale, offset, n_classes, stop_lam=True)


def r2d2_no_normalize(params, apply_fn, tasks, lam, scale, offset, n_classes=None):
    """Bug (normalize=True asked): no division by sqrt(n)."""
    return r2d2(params, apply_fn, tasks, lam, scale, offset, n_classes, normalize=False)


def protonet(params, apply_fn, tasks, n_classes, *, stop_support=False):
    """Prototypical networks."""
    total = 0.0
    for t in tasks:
        zs, zq = apply_fn(params, t.x_support), apply_fn(params, t.x_query)
        if stop_support:
            zs = jax.lax.stop_gradient(zs)
        onehot = jax.nn.one_hot(t.y_support, n_classes)
        protos = (onehot.T @ zs) / onehot.sum(0)[:, None]
        logits = -jnp.sum((zq[:, None, :] - protos[None]) ** 2, -1)
        total = total + task_loss(logits, t.y_query)
    return total / len(tasks)


def protonet_support_stopped(params, apply_fn, tasks, n_classes):
    """Bug: stop_gradient on the support features."""
    return protonet(params, apply_fn, tasks, n_classes, stop_support=True)


# -- entries added so that every diagnosis of the catalogue is exercised in JAX too (issue 19) ---------


def maml_first_step_only(params, apply_fn, tasks, inner_lr, inner_steps):
    """Bug: stop_gradient on every inner gradient but the first."""
    return _maml(params, apply_fn, tasks, inner_lr, inner_steps, stop=lambda k: k > 0)


def maml_no_adaptation(params, apply_fn, tasks, inner_lr, inner_steps):
    """Bug: the query loss evaluated with the initial parameters."""
    return _maml(params, apply_fn, tasks, inner_lr, inner_steps, adapt_query=False)


def fomaml(params, apply_fn, tasks, inner_lr, inner_steps):
    """Correct first-order MAML (FOMAML): stop_gradient on every inner gradient."""
    return _maml(params, apply_fn, tasks, inner_lr, inner_steps, stop=lambda k: True)


def _hvp(apply_fn, p, x, y, v):
    """``H(p) v`` of the support loss, forward-over-reverse."""
    return jax.jvp(jax.grad(lambda q: task_loss(apply_fn(q, x), y)), (p,), (v,))[1]


def metasgd_manual(params, apply_fn, lrs, tasks, inner_steps, *, transposed=False):
    """Meta-SGD with a hand-written backward pass (reverse accumulation with HVPs), returning (loss, grads)."""
    m = len(tasks)
    total = 0.0
    g_theta = [jnp.zeros_like(p) for p in params]
    g_lrs = [jnp.zeros_like(p) for p in params]
    for t in tasks:
        iterates, sgrads = [list(params)], []
        for _ in range(inner_steps):
            g = jax.grad(lambda q: task_loss(apply_fn(q, t.x_support), t.y_support))(iterates[-1])
            sgrads.append(g)
            iterates.append([q - a * gk for q, a, gk in zip(iterates[-1], lrs, g)])
        loss, v = jax.value_and_grad(lambda q: task_loss(apply_fn(q, t.x_query), t.y_query))(iterates[-1])
        v = list(v)
        for k in reversed(range(inner_steps)):
            g_lrs = [acc - gk * vk / m for acc, gk, vk in zip(g_lrs, sgrads[k], v)]
            if transposed:  # the bug: a * (H v) instead of H (a * v)
                hv = _hvp(apply_fn, iterates[k], t.x_support, t.y_support, v)
                v = [vk - a * hk for vk, a, hk in zip(v, lrs, hv)]
            else:
                hv = _hvp(apply_fn, iterates[k], t.x_support, t.y_support, [a * vk for a, vk in zip(lrs, v)])
                v = [vk - hk for vk, hk in zip(v, hv)]
        g_theta = [acc + vk / m for acc, vk in zip(g_theta, v)]
        total = total + loss
    return total / m, g_theta + g_lrs


def metasgd_transposed(params, apply_fn, lrs, tasks, inner_steps):
    """Bug: hand-written backward applying the transposed step Jacobian."""
    return metasgd_manual(params, apply_fn, lrs, tasks, inner_steps, transposed=True)


def reptile_head_only(params, apply_fn, tasks, inner_lr, inner_steps):
    """Bug: the inner SGD over the head (last weight and bias) only."""
    n_head = 2
    total = [jnp.zeros_like(p) for p in params]
    for t in tasks:
        fast = list(params)
        for _ in range(inner_steps):
            g = jax.grad(lambda p: task_loss(apply_fn(p, t.x_support), t.y_support))(fast)
            fast = fast[:-n_head] + [p - inner_lr * gi for p, gi in zip(fast[-n_head:], g[-n_head:])]
        total = [acc + (p0 - p) for acc, p0, p in zip(total, params, fast)]
    return [acc / len(tasks) for acc in total]


def _imaml_system(params, apply_fn, tasks, lam, *, c, beta):
    """iMAML solving ``(c I + beta H) x = grad L_q`` (correct: c = 1, beta = 1/lam)."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    total, grad = 0.0, jnp.zeros_like(flat)
    for t in tasks:
        ls = lambda z: task_loss(apply_fn(unravel(z), t.x_support), t.y_support)  # noqa: E731
        lq = lambda z: task_loss(apply_fn(unravel(z), t.x_query), t.y_query)  # noqa: E731

        def newton(_, phi):  # Newton on L_s(phi) + lam/2 ||phi - theta||^2
            r = jax.grad(ls)(phi) + lam * (phi - flat)
            return phi - jnp.linalg.solve(jax.hessian(ls)(phi) + lam * jnp.eye(flat.size), r)

        phi = jax.lax.stop_gradient(jax.lax.fori_loop(0, 12, newton, flat))
        x = jnp.linalg.solve(c * jnp.eye(flat.size) + beta * jax.hessian(ls)(phi), jax.grad(lq)(phi))
        total = total + lq(phi)
        grad = grad + x / len(tasks)
    return total / len(tasks), unravel(grad)


def imaml_no_identity(params, apply_fn, tasks, lam):
    """Bug: H x = lam grad L_q (the identity term dropped)."""
    return _imaml_system(params, apply_fn, tasks, lam, c=0.0, beta=1.0 / lam)


def r2d2_no_bias_column(params, apply_fn, tasks, lam, scale, offset, n_classes=None):
    """Bug (bias_column=True asked): the column of ones forgotten."""
    total = 0.0
    for t in tasks:
        zs, zq = apply_fn(params, t.x_support), apply_fn(params, t.x_query)
        y = jax.nn.one_hot(t.y_support, n_classes)
        n = zs.shape[0]
        zs, y = zs / jnp.sqrt(n), y / jnp.sqrt(n)
        w = jnp.linalg.solve(zs.T @ zs + lam * jnp.eye(zs.shape[1]), zs.T @ y)
        total = total + task_loss(scale * (zq @ w) + offset, t.y_query)
    return total / len(tasks)


# -- declared approximations on Meta-SGD, MAML++ and the learned optimisers (verify.inner_audit) ----------
# As corpus_torch: truncated backpropagation applies the increments of the steps before the last ``T`` under
# stop_gradient (the identity path through ``p`` stays) and stops the optimiser state leaving them.

_sg = jax.lax.stop_gradient


def metasgd_truncated(params, apply_fn, lrs, tasks, inner_steps):
    """Meta-SGD differentiating the last inner step only (declared truncated:1)."""
    total = 0.0
    for t in tasks:
        fast = list(params)
        for k in range(inner_steps):
            g = jax.grad(lambda p: task_loss(apply_fn(p, t.x_support), t.y_support))(fast)
            inc = [a * gi for a, gi in zip(lrs, g)]
            fast = [p - (u if k >= inner_steps - 1 else _sg(u)) for p, u in zip(fast, inc)]
        total = total + task_loss(apply_fn(fast, t.x_query), t.y_query)
    return total / len(tasks)


def _mamlpp(params, apply_fn, lrs, tasks, inner_steps, weights, *, first_order=False, backprop_last=None):
    """MAML++ (LSLR + MSL): ``p <- p - lrs[k, i] grad_i``, loss ``sum_k weights[k] L_q(p_{k+1})``."""
    total = 0.0
    for t in tasks:
        fast = list(params)
        for k in range(inner_steps):
            window = backprop_last is None or k >= inner_steps - backprop_last
            g = jax.grad(lambda p: task_loss(apply_fn(p, t.x_support), t.y_support))(fast)
            if first_order:
                g = _sg(g)
            inc = [lrs[k, i] * gi for i, gi in enumerate(g)]
            fast = [p - (u if window else _sg(u)) for p, u in zip(fast, inc)]
            if weights[k] != 0:
                total = total + weights[k] * task_loss(apply_fn(fast, t.x_query), t.y_query)
    return total / len(tasks)


def mamlpp(params, apply_fn, lrs, tasks, inner_steps, weights):
    """Correct MAML++."""
    return _mamlpp(params, apply_fn, lrs, tasks, inner_steps, weights)


def mamlpp_first_order(params, apply_fn, lrs, tasks, inner_steps, weights):
    """MAML++ with stop_gradient on the inner gradients (first_order)."""
    return _mamlpp(params, apply_fn, lrs, tasks, inner_steps, weights, first_order=True)


def mamlpp_truncated(params, apply_fn, lrs, tasks, inner_steps, weights):
    """MAML++ differentiating the last inner step only (truncated:1)."""
    return _mamlpp(params, apply_fn, lrs, tasks, inner_steps, weights, backprop_last=1)


def _lstm_optimizer(params, apply_fn, phi, tasks, inner_lr, inner_steps, *, first_order=False, backprop_last=None,
                    detach_state=False):
    """Andrychowicz et al.'s coordinatewise LSTM optimiser (gates i, f, g, o), ``d = 0.1 (W_out h + b_out)``."""
    W_ih, W_hh, b, W_out, b_out = phi
    H = W_hh.shape[1]
    total = 0.0
    for t in tasks:
        fast = list(params)
        flat, unravel = jax.flatten_util.ravel_pytree(fast)
        h = c = jnp.zeros((flat.size, H))
        for k in range(inner_steps):
            window = backprop_last is None or k >= inner_steps - backprop_last
            g = jax.grad(lambda p: task_loss(apply_fn(p, t.x_support), t.y_support))(fast)
            if first_order or not window:
                g = _sg(g)
            if detach_state or not window:
                h, c = _sg(h), _sg(c)
            x = jax.flatten_util.ravel_pytree(g)[0][:, None]
            z = x @ W_ih.T + h @ W_hh.T + b
            i, f, o = jax.nn.sigmoid(z[:, :H]), jax.nn.sigmoid(z[:, H:2 * H]), jax.nn.sigmoid(z[:, 3 * H:])
            c = f * c + i * jnp.tanh(z[:, 2 * H:3 * H])
            h = o * jnp.tanh(c)
            d = inner_lr * 0.1 * (h @ W_out.T + b_out)[:, 0]
            if not window:
                d, h, c = _sg(d), _sg(h), _sg(c)
            flat = jax.flatten_util.ravel_pytree(fast)[0] - d
            fast = unravel(flat)
        total = total + task_loss(apply_fn(fast, t.x_query), t.y_query)
    return total / len(tasks)


def lstm_optimizer(params, apply_fn, phi, tasks, inner_lr, inner_steps):
    """Correct LSTM optimiser (exact BPTT)."""
    return _lstm_optimizer(params, apply_fn, phi, tasks, inner_lr, inner_steps)


def lstm_optimizer_first_order(params, apply_fn, phi, tasks, inner_lr, inner_steps):
    """Andrychowicz et al.'s approximation: stop_gradient on the optimisee gradients (first_order)."""
    return _lstm_optimizer(params, apply_fn, phi, tasks, inner_lr, inner_steps, first_order=True)


def lstm_optimizer_truncated(params, apply_fn, phi, tasks, inner_lr, inner_steps):
    """Truncated BPTT through the last inner step (truncated:1)."""
    return _lstm_optimizer(params, apply_fn, phi, tasks, inner_lr, inner_steps, backprop_last=1)


def lstm_optimizer_state_detached(params, apply_fn, phi, tasks, inner_lr, inner_steps):
    """stop_gradient on the LSTM state before each step (stop_gradient)."""
    return _lstm_optimizer(params, apply_fn, phi, tasks, inner_lr, inner_steps, detach_state=True)


def _meta_lstm(params, apply_fn, phi, tasks, inner_steps, *, first_order=False, backprop_last=None,
               detach_state=False):
    """Ravi & Larochelle's meta-learner: ``c <- f c - i g`` with the gates on ``[g, L, c, previous gate]``."""
    W_I, b_I, W_F, b_F = phi
    total = 0.0
    for t in tasks:
        fast = list(params)
        c, unravel = jax.flatten_util.ravel_pytree(fast)
        i_prev = f_prev = jnp.zeros(c.size)
        for k in range(inner_steps):
            window = backprop_last is None or k >= inner_steps - backprop_last
            loss, g = jax.value_and_grad(lambda p: task_loss(apply_fn(p, t.x_support), t.y_support))(fast)
            if first_order or not window:  # the paper's dashed edges: no gradient through L and grad
                loss, g = _sg(loss), _sg(g)
            if detach_state or not window:
                i_prev, f_prev = _sg(i_prev), _sg(f_prev)
            g = jax.flatten_util.ravel_pytree(g)[0]
            i = jax.nn.sigmoid(W_I[0] * g + W_I[1] * loss + W_I[2] * c + W_I[3] * i_prev + b_I)
            f = jax.nn.sigmoid(W_F[0] * g + W_F[1] * loss + W_F[2] * c + W_F[3] * f_prev + b_F)
            update = (1 - f) * c + i * g
            if not window:
                update, i, f = _sg(update), _sg(i), _sg(f)
            c = c - update
            i_prev, f_prev = i, f
            fast = unravel(c)
        total = total + task_loss(apply_fn(fast, t.x_query), t.y_query)
    return total / len(tasks)


def meta_lstm(params, apply_fn, phi, tasks, inner_steps):
    """Correct Ravi & Larochelle meta-learner (exact BPTT; gradients w.r.t. theta = c_0 and phi)."""
    return _meta_lstm(params, apply_fn, phi, tasks, inner_steps)


def meta_lstm_first_order(params, apply_fn, phi, tasks, inner_steps):
    """The paper's approximation: stop_gradient on the learner's gradient and loss inputs (first_order)."""
    return _meta_lstm(params, apply_fn, phi, tasks, inner_steps, first_order=True)


def meta_lstm_truncated(params, apply_fn, phi, tasks, inner_steps):
    """Truncated BPTT through the last inner step (truncated:1)."""
    return _meta_lstm(params, apply_fn, phi, tasks, inner_steps, backprop_last=1)


def meta_lstm_state_detached(params, apply_fn, phi, tasks, inner_steps):
    """stop_gradient on the previous gates before each step (stop_gradient)."""
    return _meta_lstm(params, apply_fn, phi, tasks, inner_steps, detach_state=True)


def metasgd_short(params, apply_fn, lrs, tasks, inner_steps):
    """Meta-SGD running one inner step fewer than asked (declared inner_steps:N)."""
    return metasgd(params, apply_fn, lrs, tasks, inner_steps - 1)


def lstm_optimizer_short(params, apply_fn, phi, tasks, inner_lr, inner_steps):
    """The LSTM optimiser unrolled one step fewer than asked (declared inner_steps:N)."""
    return _lstm_optimizer(params, apply_fn, phi, tasks, inner_lr, inner_steps - 1)


def meta_lstm_short(params, apply_fn, phi, tasks, inner_steps):
    """The meta-learner unrolled one step fewer than asked (declared inner_steps:N)."""
    return _meta_lstm(params, apply_fn, phi, tasks, inner_steps - 1)
