"""A corpus of PyTorch meta-learning implementations, correct and deliberately buggy.

Each function follows ``verify.audit``'s calling contract and is written the
way a practitioner writes it (``torch.autograd.grad`` with ``create_graph``,
``torch.func.functional_call`` on the fast weights); each buggy one carries one
bug of the diagnosis catalogue, named in its docstring. Nothing here uses
metaverify: the audit's expectations come from the analytic reference, these
implementations from PyTorch's autograd.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call


def task_loss(out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    if y.dtype == torch.int64:
        return F.cross_entropy(out, y, reduction=reduction)
    return F.mse_loss(out, y, reduction=reduction)


def _forward(model: torch.nn.Module, params: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    return functional_call(model, dict(zip(names, params)), (x,))


def _maml(model, tasks, inner_lr, inner_steps, *, differentiate: Callable[[int], bool] = lambda k: True,
          sign: float = -1.0, steps_delta: int = 0, swap: bool = False, head_only: bool = False,
          average: bool = True, query_reduction: str = "mean", cut: Callable[[str], bool] = lambda n: False,
          adapt_query_model: bool = True):
    theta = [p.detach().requires_grad_() if cut(n) else p for n, p in model.named_parameters()]
    n_head = 2 if model[-1].bias is not None else 1
    total = 0.0
    for t in tasks:
        xs, ys, xq, yq = (t.x_query, t.y_query, t.x_support, t.y_support) if swap else tuple(t)
        fast = list(theta)
        for k in range(inner_steps + steps_delta):
            loss = task_loss(_forward(model, fast, xs), ys)
            adapt = fast[-n_head:] if head_only else fast
            grads = torch.autograd.grad(loss, adapt, create_graph=differentiate(k))
            new = [p + sign * inner_lr * g for p, g in zip(adapt, grads)]
            fast = fast[:-n_head] + new if head_only else new
        query_params = fast if adapt_query_model else theta
        total = total + task_loss(_forward(model, query_params, xq), yq, query_reduction)
    return total / len(tasks) if average else total


# -- MAML ----------------------------------------------------------------------------------------------


def maml(model, tasks, inner_lr, inner_steps):
    """Correct MAML: create_graph=True through every inner step, mean over tasks."""
    return _maml(model, tasks, inner_lr, inner_steps)


def maml_first_order(model, tasks, inner_lr, inner_steps):
    """Bug: create_graph=False (first-order only)."""
    return _maml(model, tasks, inner_lr, inner_steps, differentiate=lambda k: False)


def maml_last_step_only(model, tasks, inner_lr, inner_steps):
    """Bug: create_graph only on the last inner step."""
    return _maml(model, tasks, inner_lr, inner_steps, differentiate=lambda k: k == inner_steps - 1)


def maml_first_step_only(model, tasks, inner_lr, inner_steps):
    """Bug: create_graph=(k == 0)."""
    return _maml(model, tasks, inner_lr, inner_steps, differentiate=lambda k: k == 0)


def maml_half_lr(model, tasks, inner_lr, inner_steps):
    """Bug: a stale inner learning rate (half the one passed)."""
    return _maml(model, tasks, 0.5 * inner_lr, inner_steps)


def maml_sign(model, tasks, inner_lr, inner_steps):
    """Bug: p + lr * grad in the inner loop."""
    return _maml(model, tasks, inner_lr, inner_steps, sign=+1.0)


def maml_sum_tasks(model, tasks, inner_lr, inner_steps):
    """Bug: meta-loss summed over tasks."""
    return _maml(model, tasks, inner_lr, inner_steps, average=False)


def maml_query_sum(model, tasks, inner_lr, inner_steps):
    """Bug: per-task query loss with reduction='sum'."""
    return _maml(model, tasks, inner_lr, inner_steps, query_reduction="sum")


def maml_extra_step(model, tasks, inner_lr, inner_steps):
    """Bug: range(inner_steps + 1)."""
    return _maml(model, tasks, inner_lr, inner_steps, steps_delta=1)


def maml_swapped(model, tasks, inner_lr, inner_steps):
    """Bug: adapt on the query set, evaluate on the support set."""
    return _maml(model, tasks, inner_lr, inner_steps, swap=True)


def maml_head_only(model, tasks, inner_lr, inner_steps):
    """Bug (for MAML): only the head is adapted (that is ANIL)."""
    return _maml(model, tasks, inner_lr, inner_steps, head_only=True)


def maml_no_adaptation(model, tasks, inner_lr, inner_steps):
    """Bug: the query loss is evaluated with the initial weights."""
    return _maml(model, tasks, inner_lr, inner_steps, adapt_query_model=False)


def maml_bias_detached(model, tasks, inner_lr, inner_steps):
    """Bug: the biases enter the inner loop as .detach().requires_grad_() copies: no meta-gradient reaches them."""
    return _maml(model, tasks, inner_lr, inner_steps, cut=lambda name: name.endswith("bias"))


def maml_returns_grads(model, tasks, inner_lr, inner_steps):
    """Correct MAML returning (loss, grads)."""
    loss = _maml(model, tasks, inner_lr, inner_steps)
    return loss, torch.autograd.grad(loss, list(model.parameters()))


def maml_calls_backward(model, tasks, inner_lr, inner_steps):
    """Correct MAML that calls .backward() itself (gradients in .grad)."""
    loss = _maml(model, tasks, inner_lr, inner_steps)
    loss.backward()
    return loss.detach()


def maml_noisy(model, tasks, inner_lr, inner_steps):
    """Bug outside the catalogue: a tiny entry-dependent perturbation of the gradient (unexplained)."""
    loss = _maml(model, tasks, inner_lr, inner_steps)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss, [g * (1 + 1e-7 * torch.cos(torch.arange(g.numel(), dtype=g.dtype)).reshape(g.shape))
                  for g in grads]


# -- MAML / ANIL with torch.optim's momentum and Adam in the inner loop (rows maml-momentum, maml-adam, anil-adam) --


def _maml_optim(model, tasks, inner_lr, inner_steps, *, kind: str = "adam", head_only: bool = False,
                eps_hat: bool = False, detach_state: bool = False, backprop_last: int | None = None):
    """MAML/ANIL with torch.optim.Adam (defaults) or SGD(momentum=0.9)'s update written functionally.

    Adam: ``m = b1 m + (1-b1) g``, ``v = b2 v + (1-b2) g^2``, ``p -= lr m_hat / (sqrt(v_hat) + eps)``
    (``eps_hat``: ``lr sqrt(1-b2^k)/(1-b1^k) m / (sqrt(v) + eps)``, higher's and Kingma & Ba's placement).
    Momentum: ``buf = g`` at the first step, then ``buf = 0.9 buf + g``; ``p -= lr buf``.
    """
    b1, b2, eps = 0.9, 0.999, 1e-8
    n_head = 2 if model[-1].bias is not None else 1
    theta = list(model.parameters())
    total = 0.0
    for t in tasks:
        fast = list(theta)
        m = v = buf = None
        for k in range(1, inner_steps + 1):
            adapt = fast[-n_head:] if head_only else fast
            g = torch.autograd.grad(task_loss(_forward(model, fast, t.x_support), t.y_support), adapt,
                                    create_graph=True)
            if detach_state and m is not None:
                m, v = [a.detach() for a in m], [b.detach() for b in v]
            if detach_state and buf is not None:
                buf = [a.detach() for a in buf]
            if kind == "adam":
                m = [(1 - b1) * gi for gi in g] if m is None else [b1 * a + (1 - b1) * gi for a, gi in zip(m, g)]
                v = [(1 - b2) * gi * gi for gi in g] if v is None else [b2 * a + (1 - b2) * gi * gi
                                                                        for a, gi in zip(v, g)]
                c1, c2 = 1 - b1**k, 1 - b2**k
                if eps_hat:
                    step = [inner_lr * c2**0.5 / c1 * a / (b.sqrt() + eps) for a, b in zip(m, v)]
                else:
                    step = [inner_lr * (a / c1) / (b.sqrt() / c2**0.5 + eps) for a, b in zip(m, v)]
            else:
                buf = list(g) if buf is None else [0.9 * a + gi for a, gi in zip(buf, g)]
                step = [inner_lr * a for a in buf]
            if backprop_last is not None and k <= inner_steps - backprop_last:
                step = [u.detach() for u in step]
                m = None if m is None else [a.detach() for a in m]
                v = None if v is None else [b.detach() for b in v]
                buf = None if buf is None else [a.detach() for a in buf]
            new = [p - u for p, u in zip(adapt, step)]
            fast = fast[:-n_head] + new if head_only else new
        total = total + task_loss(_forward(model, fast, t.x_query), t.y_query)
    return total / len(tasks)


def maml_adam(model, tasks, inner_lr, inner_steps):
    """Correct MAML with torch.optim.Adam's update (eps added to sqrt(v_hat)), differentiated through m, v."""
    return _maml_optim(model, tasks, inner_lr, inner_steps)


def maml_adam_eps_hat(model, tasks, inner_lr, inner_steps):
    """Bug (for maml-adam): eps added to sqrt(v) before bias correction (higher's DifferentiableAdam)."""
    return _maml_optim(model, tasks, inner_lr, inner_steps, eps_hat=True)


def maml_adam_state_detached(model, tasks, inner_lr, inner_steps):
    """Bug: Adam's moments detached before each step (state stored with .detach())."""
    return _maml_optim(model, tasks, inner_lr, inner_steps, detach_state=True)


def maml_adam_truncated(model, tasks, inner_lr, inner_steps):
    """Bug: backpropagation through the last inner step only (earlier steps applied as detached increments)."""
    return _maml_optim(model, tasks, inner_lr, inner_steps, backprop_last=1)


def maml_momentum(model, tasks, inner_lr, inner_steps):
    """Correct MAML with torch.optim.SGD(momentum=0.9)'s update, differentiated through the buffer."""
    return _maml_optim(model, tasks, inner_lr, inner_steps, kind="momentum")


def maml_momentum_state_detached(model, tasks, inner_lr, inner_steps):
    """Bug: the momentum buffer detached between steps."""
    return _maml_optim(model, tasks, inner_lr, inner_steps, kind="momentum", detach_state=True)


def anil_adam(model, tasks, inner_lr, inner_steps):
    """Correct ANIL with torch.optim.Adam's update on the head."""
    return _maml_optim(model, tasks, inner_lr, inner_steps, head_only=True)


def anil_adam_eps_hat(model, tasks, inner_lr, inner_steps):
    """Bug (for anil-adam): higher's eps placement on the head's Adam."""
    return _maml_optim(model, tasks, inner_lr, inner_steps, head_only=True, eps_hat=True)


def anil(model, tasks, inner_lr, inner_steps):
    """Correct ANIL."""
    return _maml(model, tasks, inner_lr, inner_steps, head_only=True)


def anil_first_order(model, tasks, inner_lr, inner_steps):
    """Bug: ANIL without create_graph."""
    return _maml(model, tasks, inner_lr, inner_steps, head_only=True, differentiate=lambda k: False)


def fomaml(model, tasks, inner_lr, inner_steps):
    """Correct FOMAML (create_graph=False)."""
    return _maml(model, tasks, inner_lr, inner_steps, differentiate=lambda k: False)


# -- Meta-SGD --------------------------------------------------------------------------------------------


def metasgd(model, lrs, tasks, inner_steps, *, detach_lrs=False, first_order=False):
    """Correct Meta-SGD: p <- p - a * grad, gradients w.r.t. theta and a."""
    theta = list(model.parameters())
    rates = [a.detach() for a in lrs] if detach_lrs else list(lrs)
    total = 0.0
    for t in tasks:
        fast = theta
        for _ in range(inner_steps):
            grads = torch.autograd.grad(task_loss(_forward(model, fast, t.x_support), t.y_support), fast,
                                        create_graph=not first_order)
            fast = [p - a * g for p, a, g in zip(fast, rates, grads)]
        total = total + task_loss(_forward(model, fast, t.x_query), t.y_query)
    return total / len(tasks)


def metasgd_lrs_detached(model, lrs, tasks, inner_steps):
    """Bug: the learning rates used through .detach()."""
    return metasgd(model, lrs, tasks, inner_steps, detach_lrs=True)


def metasgd_first_order(model, lrs, tasks, inner_steps):
    """Bug: no create_graph in Meta-SGD."""
    return metasgd(model, lrs, tasks, inner_steps, first_order=True)


def _hvp(model, params, x, y, v):
    params = [p.detach().requires_grad_() for p in params]
    g = torch.autograd.grad(task_loss(_forward(model, params, x), y), params, create_graph=True)
    return torch.autograd.grad(g, params, grad_outputs=v)


def metasgd_manual(model, lrs, tasks, inner_steps, *, transposed=False):
    """Meta-SGD with a hand-written backward pass (reverse accumulation with HVPs), returning (loss, grads)."""
    theta = [p.detach() for p in model.parameters()]
    a = [x.detach() for x in lrs]
    total, g_theta, g_lrs = 0.0, [torch.zeros_like(p) for p in theta], [torch.zeros_like(p) for p in theta]
    for t in tasks:
        iterates, sgrads = [theta], []
        for _ in range(inner_steps):
            p = [q.requires_grad_() for q in (x.detach().clone() for x in iterates[-1])]
            g = torch.autograd.grad(task_loss(_forward(model, p, t.x_support), t.y_support), p)
            sgrads.append(g)
            iterates.append([q.detach() - ak * gk for q, ak, gk in zip(p, a, g)])
        p_k = [q.requires_grad_() for q in (x.detach().clone() for x in iterates[-1])]
        loss = task_loss(_forward(model, p_k, t.x_query), t.y_query)
        v = list(torch.autograd.grad(loss, p_k))
        for k in reversed(range(inner_steps)):
            g_lrs = [acc - gk * vk / len(tasks) for acc, gk, vk in zip(g_lrs, sgrads[k], v)]
            if transposed:  # the bug: a * (H v) instead of H (a * v)
                hv = _hvp(model, iterates[k], t.x_support, t.y_support, v)
                v = [vk - ak * hk for vk, ak, hk in zip(v, a, hv)]
            else:
                hv = _hvp(model, iterates[k], t.x_support, t.y_support, [ak * vk for ak, vk in zip(a, v)])
                v = [vk - hk for vk, hk in zip(v, hv)]
        g_theta = [acc + vk / len(tasks) for acc, vk in zip(g_theta, v)]
        total = total + loss.detach()
    return total / len(tasks), g_theta + g_lrs


def metasgd_transposed(model, lrs, tasks, inner_steps):
    """Bug: hand-written backward applying the transposed step Jacobian."""
    return metasgd_manual(model, lrs, tasks, inner_steps, transposed=True)


# -- Reptile ---------------------------------------------------------------------------------------------


def reptile(model, tasks, inner_lr, inner_steps, *, sign=1.0, steps_delta=0, on_query=False, head_only=False):
    """Correct Reptile direction mean_t (theta - p_K) with SGD on the support set."""
    theta = [p.detach() for p in model.parameters()]
    total = [torch.zeros_like(p) for p in theta]
    n_head = 2 if model[-1].bias is not None else 1
    rates = [0.0 if head_only and i < len(theta) - n_head else inner_lr for i in range(len(theta))]
    for t in tasks:
        x, y = (t.x_query, t.y_query) if on_query else (t.x_support, t.y_support)
        fast = [p.clone().requires_grad_() for p in theta]
        for _ in range(inner_steps + steps_delta):
            grads = torch.autograd.grad(task_loss(_forward(model, fast, x), y), fast)
            fast = [(p - lr * g).detach().requires_grad_() for p, lr, g in zip(fast, rates, grads)]
        total = [acc + sign * (p0 - p.detach()) for acc, p0, p in zip(total, theta, fast)]
    return [acc / len(tasks) for acc in total]


def reptile_sign(model, tasks, inner_lr, inner_steps):
    """Bug: p_K - theta."""
    return reptile(model, tasks, inner_lr, inner_steps, sign=-1.0)


def reptile_extra_step(model, tasks, inner_lr, inner_steps):
    """Bug: one inner step too many."""
    return reptile(model, tasks, inner_lr, inner_steps, steps_delta=1)


def reptile_head_only(model, tasks, inner_lr, inner_steps):
    """Bug: the inner SGD over the head only."""
    return reptile(model, tasks, inner_lr, inner_steps, head_only=True)


def reptile_on_query(model, tasks, inner_lr, inner_steps):
    """Bug: the inner loop on the query set."""
    return reptile(model, tasks, inner_lr, inner_steps, on_query=True)


# -- iMAML -----------------------------------------------------------------------------------------------


def _flat_loss(model, flat, x, y, shapes):
    params, start = [], 0
    for s in shapes:
        n = int(torch.Size(s).numel())
        params.append(flat[start:start + n].view(s))
        start += n
    return task_loss(_forward(model, params, x), y)


def _grad_hess(f, z):
    """Gradient and Hessian of a scalar f at z by double backward (torch.func.hessian warns in torch 2.13)."""
    z = z.detach().requires_grad_()
    g = torch.autograd.grad(f(z), z, create_graph=True)[0]
    H = torch.stack([torch.autograd.grad(g[i], z, retain_graph=True)[0] for i in range(len(g))])
    return g.detach(), H


def imaml(model, tasks, lam, *, solve="exact", cg_iterations=3, c=1.0, beta=None):
    """iMAML: Newton's method on the proximal inner problem, implicit gradient (c I + beta H)^{-1} grad L_q.

    Correct: c = 1, beta = 1/lam, exact solve. Returns (loss, grads).
    """
    beta = 1.0 / lam if beta is None else beta
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]
    total, grad = 0.0, torch.zeros_like(theta)
    for t in tasks:
        phi = theta.clone()
        support = lambda z: _flat_loss(model, z, t.x_support, t.y_support, shapes)  # noqa: E731
        for _ in range(20):  # Newton on F(phi) = L_s(phi) + lam/2 ||phi - theta||^2 (quadratic convergence)
            g, H = _grad_hess(support, phi)
            r = g + lam * (phi - theta)
            if float(r.norm()) <= 1e-15:
                break
            phi = phi - torch.linalg.solve(H + lam * torch.eye(len(phi), dtype=phi.dtype), r)
        _, H = _grad_hess(support, phi)
        z = phi.detach().requires_grad_()
        loss_q = _flat_loss(model, z, t.x_query, t.y_query, shapes)
        b = torch.autograd.grad(loss_q, z)[0]
        loss_q = loss_q.detach()
        A = c * torch.eye(len(phi), dtype=phi.dtype) + beta * H
        if solve == "exact":
            x = torch.linalg.solve(A, b)
        else:  # conjugate gradient from x = 0, a fixed number of iterations
            x = torch.zeros_like(b)
            r = b.clone()
            p = r.clone()
            for _ in range(cg_iterations):
                Ap = A @ p
                alpha = (r @ r) / (p @ Ap)
                x = x + alpha * p
                r_new = r - alpha * Ap
                p = r_new + ((r_new @ r_new) / (r @ r)) * p
                r = r_new
        total = total + loss_q
        grad = grad + x / len(tasks)
    grads, start = [], 0
    for s in shapes:
        n = int(torch.Size(s).numel())
        grads.append(grad[start:start + n].view(s))
        start += n
    return total / len(tasks), grads


def imaml_authors(model, tasks, lam, *, inner_lr=0.05, inner_steps=16, cg_steps=5, damping=0.0):
    """iMAML as the authors' released code computes it (declared approximation cg:M+inner_steps:N+damping:D).

    N gradient steps of size inner_lr on L_s(phi) + lam/2 ||phi - theta||^2 from theta, then M conjugate-gradient
    iterations from 0 on (I + H_s(phi_N) / (lam + damping)) x = grad L_q(phi_N), stopping when r^T r < 1e-10;
    Hessian-vector products by double backward. Returns (loss, grads).
    """
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]
    total, grad = 0.0, torch.zeros_like(theta)
    for t in tasks:
        phi = theta.clone()
        for _ in range(inner_steps):
            z = phi.detach().requires_grad_()
            g = torch.autograd.grad(_flat_loss(model, z, t.x_support, t.y_support, shapes), z)[0]
            phi = phi - inner_lr * (g + lam * (phi - theta))
        z = phi.detach().requires_grad_()
        g_s = torch.autograd.grad(_flat_loss(model, z, t.x_support, t.y_support, shapes), z, create_graph=True)[0]

        def matvec(v):
            hv = torch.autograd.grad(g_s, z, grad_outputs=v, retain_graph=True)[0]
            return v + hv / (lam + damping)

        zq = phi.detach().requires_grad_()
        loss_q = _flat_loss(model, zq, t.x_query, t.y_query, shapes)
        b = torch.autograd.grad(loss_q, zq)[0]
        x = torch.zeros_like(b)
        r = b - matvec(x)
        p = r.clone()
        for _ in range(cg_steps):
            rdotr = r @ r
            Ap = matvec(p)
            alpha = rdotr / (p @ Ap)
            x = x + alpha * p
            r = r - alpha * Ap
            new = r @ r
            p = r + (new / rdotr) * p
            if float(new) < 1e-10:
                break
        total = total + loss_q.detach()
        grad = grad + x / len(tasks)
    grads, start = [], 0
    for s in shapes:
        n = int(torch.Size(s).numel())
        grads.append(grad[start:start + n].view(s))
        start += n
    return total / len(tasks), grads


def imaml_authors_cg3(model, tasks, lam):
    """The authors' solver with 3 CG iterations (declared cg:5 elsewhere: a named mismatch)."""
    return imaml_authors(model, tasks, lam, cg_steps=3)


def imaml_truncated_cg(model, tasks, lam):
    """Bug: 3 conjugate-gradient iterations for the implicit system."""
    return imaml(model, tasks, lam, solve="cg", cg_iterations=3)


def imaml_first_order(model, tasks, lam):
    """Bug: the implicit solve skipped (x = grad L_q(phi*))."""
    return imaml(model, tasks, lam, c=1.0, beta=0.0)


def imaml_no_identity(model, tasks, lam):
    """Bug: H x = lam grad L_q (the identity term dropped)."""
    return imaml(model, tasks, lam, c=0.0, beta=1.0 / lam)


def imaml_lam_inverted(model, tasks, lam):
    """Bug: (I + lam H) x = grad L_q."""
    return imaml(model, tasks, lam, beta=lam)


# -- R2-D2 / LR-D2 / metric --------------------------------------------------------------------------------


def r2d2(backbone, tasks, lam, scale, offset, *, normalize=True, bias_column=True, detach=(), support_detached=False):
    """R2-D2 with the dual (Woodbury) ridge solve; defaults: normalize=True, bias_column=True."""
    lam = lam.detach() if "lam" in detach else lam
    scale = scale.detach() if "scale" in detach else scale
    offset = offset.detach() if "offset" in detach else offset
    total = 0.0
    for t in tasks:
        zs, zq = backbone(t.x_support), backbone(t.x_query)
        if support_detached:
            zs = zs.detach()
        if bias_column:
            zs = torch.cat([zs, torch.ones_like(zs[:, :1])], 1)
            zq = torch.cat([zq, torch.ones_like(zq[:, :1])], 1)
        n_classes = int(t.y_support.max()) + 1
        y = F.one_hot(t.y_support, n_classes).to(zs.dtype)
        if normalize:
            zs, y = zs / len(zs) ** 0.5, y / len(zs) ** 0.5
        w = zs.T @ torch.linalg.solve(zs @ zs.T + lam * torch.eye(len(zs), dtype=zs.dtype), y)
        total = total + F.cross_entropy(scale * (zq @ w) + offset, t.y_query)
    return total / len(tasks)


def r2d2_lam_detached(backbone, tasks, lam, scale, offset):
    """Bug: lam.detach()."""
    return r2d2(backbone, tasks, lam, scale, offset, detach=("lam",))


def r2d2_no_normalize(backbone, tasks, lam, scale, offset):
    """Bug (when normalize=True is asked): no division by sqrt(n)."""
    return r2d2(backbone, tasks, lam, scale, offset, normalize=False)


def r2d2_no_bias_column(backbone, tasks, lam, scale, offset):
    """Bug (when bias_column=True is asked): no ones column."""
    return r2d2(backbone, tasks, lam, scale, offset, bias_column=False)


def r2d2_support_detached(backbone, tasks, lam, scale, offset):
    """Bug: the support features detached."""
    return r2d2(backbone, tasks, lam, scale, offset, support_detached=True)


def lrd2(backbone, tasks, lam, scale, offset, *, newton_steps=2, bias_column=True, detach=()):
    """LR-D2: IRLS from w = 0 with ridge lam, bce on scale * Z_q w + offset."""
    scale = scale.detach() if "scale" in detach else scale
    total = 0.0
    for t in tasks:
        zs, zq = backbone(t.x_support), backbone(t.x_query)
        if bias_column:
            zs = torch.cat([zs, torch.ones_like(zs[:, :1])], 1)
            zq = torch.cat([zq, torch.ones_like(zq[:, :1])], 1)
        y = t.y_support.to(zs.dtype)
        w = torch.zeros(zs.shape[1], dtype=zs.dtype)
        for _ in range(newton_steps):
            s = torch.sigmoid(zs @ w)
            A = zs.T @ ((s * (1 - s))[:, None] * zs) + lam * torch.eye(zs.shape[1], dtype=zs.dtype)
            w = w - torch.linalg.solve(A, zs.T @ (s - y) + lam * w)
        total = total + F.binary_cross_entropy_with_logits(scale * (zq @ w) + offset, t.y_query.to(zs.dtype))
    return total / len(tasks)


def lrd2_extra_newton_step(backbone, tasks, lam, scale, offset):
    """Bug: 3 Newton steps where 2 are asked."""
    return lrd2(backbone, tasks, lam, scale, offset, newton_steps=3)


def lrd2_scale_detached(backbone, tasks, lam, scale, offset):
    """Bug: scale.detach()."""
    return lrd2(backbone, tasks, lam, scale, offset, detach=("scale",))


def protonet(backbone, tasks, n_classes, *, support_detached=False, swap=False, average=True):
    """Prototypical networks: prototypes = class means of the support features, logits -||q - c||^2."""
    total = 0.0
    for t in tasks:
        xs, ys, xq, yq = (t.x_query, t.y_query, t.x_support, t.y_support) if swap else tuple(t)
        zs, zq = backbone(xs), backbone(xq)
        if support_detached:
            zs = zs.detach()
        protos = torch.stack([zs[ys == k].mean(0) for k in range(n_classes)])
        logits = -((zq[:, None, :] - protos[None, :, :]) ** 2).sum(-1)
        total = total + F.cross_entropy(logits, yq)
    return total / len(tasks) if average else total


def protonet_support_detached(backbone, tasks, n_classes):
    """Bug: prototypes from detached support features."""
    return protonet(backbone, tasks, n_classes, support_detached=True)


def protonet_swapped(backbone, tasks, n_classes):
    """Bug: prototypes from the query set, loss on the support set."""
    return protonet(backbone, tasks, n_classes, swap=True)


def protonet_sum_tasks(backbone, tasks, n_classes):
    """Bug: summed over tasks."""
    return protonet(backbone, tasks, n_classes, average=False)


def matchingnet(backbone, tasks, n_classes, *, support_detached=False):
    """Matching networks: cosine attention over the support set, -log p(true class)."""
    total = 0.0
    for t in tasks:
        zs, zq = backbone(t.x_support), backbone(t.x_query)
        if support_detached:
            zs = zs.detach()
        att = torch.softmax(F.normalize(zq, dim=1) @ F.normalize(zs, dim=1).T, dim=1)
        probs = att @ F.one_hot(t.y_support, n_classes).to(zs.dtype)
        total = total - torch.log(probs[torch.arange(len(zq)), t.y_query]).mean()
    return total / len(tasks)


def matchingnet_support_detached(backbone, tasks, n_classes):
    """Bug: the support embeddings detached."""
    return matchingnet(backbone, tasks, n_classes, support_detached=True)


def newton(model, tasks, inner_lr, inner_steps, damping, *, first_order=False):
    """Newton-MAML: p <- p - lr (H + damping I)^{-1} grad, differentiated through torch.linalg.solve."""
    theta = torch.cat([p.reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]
    total = 0.0
    for t in tasks:
        phi = theta
        for _ in range(inner_steps):
            f = lambda z: _flat_loss(model, z, t.x_support, t.y_support, shapes)  # noqa: E731
            if first_order:
                g, H = _grad_hess(f, phi)
            else:
                g = torch.autograd.grad(f(phi), phi, create_graph=True)[0]
                H = torch.stack([torch.autograd.grad(g[i], phi, create_graph=True)[0] for i in range(len(g))])
            phi = phi - inner_lr * torch.linalg.solve(H + damping * torch.eye(len(g), dtype=g.dtype), g)
        total = total + _flat_loss(model, phi, t.x_query, t.y_query, shapes)
    return total / len(tasks)


def newton_first_order(model, tasks, inner_lr, inner_steps, damping):
    """Bug: the Newton steps computed on detached parameters."""
    return newton(model, tasks, inner_lr, inner_steps, damping, first_order=True)


# -- not auditable -----------------------------------------------------------------------------------------


def raises(model, tasks, inner_lr, inner_steps):
    """Bad input: the function raises."""
    raise ValueError("boom inside the user's code")


def non_scalar(model, tasks, inner_lr, inner_steps):
    """Bad input: per-task losses instead of their mean."""
    return torch.stack([task_loss(model(t.x_query), t.y_query) for t in tasks] * 2)


def non_finite(model, tasks, inner_lr, inner_steps):
    """Bad input: NaN meta-loss."""
    return maml(model, tasks, inner_lr, inner_steps) * float("nan")


def too_few_grads(model, tasks, inner_lr, inner_steps):
    """Bad input: one gradient missing."""
    loss = maml(model, tasks, inner_lr, inner_steps)
    return loss, torch.autograd.grad(loss, list(model.parameters()))[:-1]


TaskList = Sequence[Any]


# -- declared approximations on Meta-SGD, MAML++ and the learned optimisers (verify.inner_audit) ----------
# Truncated backpropagation is written as the reference declares it: the steps before the last ``T`` apply
# their increment detached (``p - (a * d).detach()``; the identity path through ``p`` stays), and the optimiser
# state leaving them is detached.


def metasgd_truncated(model, lrs, tasks, inner_steps):
    """Meta-SGD with truncated backpropagation: only the last inner step differentiated (declared truncated:1)."""
    theta = list(model.parameters())
    total = 0.0
    for t in tasks:
        fast = theta
        for k in range(inner_steps):
            window = k >= inner_steps - 1
            grads = torch.autograd.grad(task_loss(_forward(model, fast, t.x_support), t.y_support), fast,
                                        create_graph=window)
            inc = [a * g for a, g in zip(lrs, grads)]
            fast = [p - (u if window else u.detach()) for p, u in zip(fast, inc)]
        total = total + task_loss(_forward(model, fast, t.x_query), t.y_query)
    return total / len(tasks)


def _mamlpp(model, lrs, tasks, inner_steps, weights, *, first_order=False, backprop_last=None):
    """MAML++ (LSLR + MSL): ``p <- p - lrs[k, i] * grad_i``, loss ``sum_k weights[k] L_q(p_{k+1})``."""
    theta = list(model.parameters())
    total = 0.0
    for t in tasks:
        fast = theta
        for k in range(inner_steps):
            window = backprop_last is None or k >= inner_steps - backprop_last
            grads = torch.autograd.grad(task_loss(_forward(model, fast, t.x_support), t.y_support), fast,
                                        create_graph=window and not first_order)
            inc = [lrs[k, i] * g for i, g in enumerate(grads)]
            fast = [p - (u if window else u.detach()) for p, u in zip(fast, inc)]
            if weights[k] != 0:
                total = total + weights[k] * task_loss(_forward(model, fast, t.x_query), t.y_query)
    return total / len(tasks)


def mamlpp(model, lrs, tasks, inner_steps, weights):
    """Correct MAML++: per-step per-layer rates (a (K, n) tensor) and the multi-step loss."""
    return _mamlpp(model, lrs, tasks, inner_steps, weights)


def mamlpp_first_order(model, lrs, tasks, inner_steps, weights):
    """MAML++ without create_graph (first_order; MAML++'s own first-order phase)."""
    return _mamlpp(model, lrs, tasks, inner_steps, weights, first_order=True)


def mamlpp_truncated(model, lrs, tasks, inner_steps, weights):
    """MAML++ backpropagating through the last inner step only (truncated:1)."""
    return _mamlpp(model, lrs, tasks, inner_steps, weights, backprop_last=1)


def _lstm_optimizer(model, phi, tasks, inner_lr, inner_steps, *, first_order=False, backprop_last=None,
                    detach_state=False):
    """Andrychowicz et al.'s coordinatewise LSTM optimiser (one torch.nn.LSTMCell-style cell, gates i, f, g, o):
    ``x = grad``, ``d = 0.1 (W_out h + b_out)``, ``p <- p - inner_lr d``, meta-loss ``L_q(p_K)``."""
    W_ih, W_hh, b, W_out, b_out = phi
    H = W_hh.shape[1]
    theta = list(model.parameters())
    total = 0.0
    for t in tasks:
        fast = theta
        n = sum(p.numel() for p in fast)
        h = c = torch.zeros(n, H, dtype=W_hh.dtype)
        for k in range(inner_steps):
            window = backprop_last is None or k >= inner_steps - backprop_last
            grads = torch.autograd.grad(task_loss(_forward(model, fast, t.x_support), t.y_support), fast,
                                        create_graph=window and not first_order)
            if detach_state or not window:
                h, c = h.detach(), c.detach()
            x = torch.cat([g.reshape(-1) for g in grads])[:, None]
            z = x @ W_ih.T + h @ W_hh.T + b
            i, f, o = torch.sigmoid(z[:, :H]), torch.sigmoid(z[:, H:2 * H]), torch.sigmoid(z[:, 3 * H:])
            c = f * c + i * torch.tanh(z[:, 2 * H:3 * H])
            h = o * torch.tanh(c)
            d = inner_lr * 0.1 * (h @ W_out.T + b_out)[:, 0]
            if not window:
                d, h, c = d.detach(), h.detach(), c.detach()
            out, j = [], 0
            for p in fast:
                out.append(p - d[j:j + p.numel()].reshape(p.shape))
                j += p.numel()
            fast = out
        total = total + task_loss(_forward(model, fast, t.x_query), t.y_query)
    return total / len(tasks)


def lstm_optimizer(model, phi, tasks, inner_lr, inner_steps):
    """Correct LSTM optimiser: exact BPTT through the optimisee's gradients and the LSTM state."""
    return _lstm_optimizer(model, phi, tasks, inner_lr, inner_steps)


def lstm_optimizer_first_order(model, phi, tasks, inner_lr, inner_steps):
    """Andrychowicz et al.'s approximation: the optimisee gradients are constants (create_graph=False)."""
    return _lstm_optimizer(model, phi, tasks, inner_lr, inner_steps, first_order=True)


def lstm_optimizer_truncated(model, phi, tasks, inner_lr, inner_steps):
    """Truncated BPTT: only the last inner step backpropagated (truncated:1)."""
    return _lstm_optimizer(model, phi, tasks, inner_lr, inner_steps, backprop_last=1)


def lstm_optimizer_state_detached(model, phi, tasks, inner_lr, inner_steps):
    """The LSTM state detached before each step (stop_gradient)."""
    return _lstm_optimizer(model, phi, tasks, inner_lr, inner_steps, detach_state=True)


def _meta_lstm(model, phi, tasks, inner_steps, *, first_order=False, backprop_last=None, detach_state=False):
    """Ravi & Larochelle's meta-learner: the learner's parameters are the cell state (c_0 = theta);
    ``i = sigma(W_I . [g, L, c, i_prev] + b_I)``, ``f = sigma(W_F . [g, L, c, f_prev] + b_F)``,
    ``c <- f c - i g``; meta-loss ``L_q(c_K)``."""
    W_I, b_I, W_F, b_F = phi
    theta = list(model.parameters())
    total = 0.0
    for t in tasks:
        fast = theta
        n = sum(p.numel() for p in fast)
        i_prev = f_prev = torch.zeros(n, dtype=W_I.dtype)
        for k in range(inner_steps):
            window = backprop_last is None or k >= inner_steps - backprop_last
            exact = window and not first_order
            loss = task_loss(_forward(model, fast, t.x_support), t.y_support)
            grads = torch.autograd.grad(loss, fast, create_graph=exact)
            loss = loss if exact else loss.detach()  # the paper's dashed edges: no gradient through L, grad
            if detach_state or not window:
                i_prev, f_prev = i_prev.detach(), f_prev.detach()
            g = torch.cat([x.reshape(-1) for x in grads])
            c = torch.cat([p.reshape(-1) for p in fast])
            i = torch.sigmoid(W_I[0] * g + W_I[1] * loss + W_I[2] * c + W_I[3] * i_prev + b_I)
            f = torch.sigmoid(W_F[0] * g + W_F[1] * loss + W_F[2] * c + W_F[3] * f_prev + b_F)
            update = (1 - f) * c + i * g  # c_new = f c - i g = c - update
            if not window:
                update, i, f = update.detach(), i.detach(), f.detach()
            c = c - update
            i_prev, f_prev = i, f
            out, j = [], 0
            for p in fast:
                out.append(c[j:j + p.numel()].reshape(p.shape))
                j += p.numel()
            fast = out
        total = total + task_loss(_forward(model, fast, t.x_query), t.y_query)
    return total / len(tasks)


def meta_lstm(model, phi, tasks, inner_steps):
    """Correct Ravi & Larochelle meta-learner: exact BPTT (gradients w.r.t. theta = c_0 and the gates' phi)."""
    return _meta_lstm(model, phi, tasks, inner_steps)


def meta_lstm_first_order(model, phi, tasks, inner_steps):
    """The paper's approximation: no gradient through the learner's gradient and loss inputs (first_order)."""
    return _meta_lstm(model, phi, tasks, inner_steps, first_order=True)


def meta_lstm_truncated(model, phi, tasks, inner_steps):
    """Truncated BPTT through the last inner step (truncated:1)."""
    return _meta_lstm(model, phi, tasks, inner_steps, backprop_last=1)


def meta_lstm_state_detached(model, phi, tasks, inner_steps):
    """The previous gates (the meta-learner's state) detached before each step (stop_gradient)."""
    return _meta_lstm(model, phi, tasks, inner_steps, detach_state=True)


def metasgd_short(model, lrs, tasks, inner_steps):
    """Meta-SGD running one inner step fewer than asked (declared inner_steps:N)."""
    return metasgd(model, lrs, tasks, inner_steps - 1)


def lstm_optimizer_short(model, phi, tasks, inner_lr, inner_steps):
    """The LSTM optimiser unrolled one step fewer than asked (declared inner_steps:N)."""
    return _lstm_optimizer(model, phi, tasks, inner_lr, inner_steps - 1)


def meta_lstm_short(model, phi, tasks, inner_steps):
    """The meta-learner unrolled one step fewer than asked (declared inner_steps:N)."""
    return _meta_lstm(model, phi, tasks, inner_steps - 1)
