"""Measured figures of issue #17 (differentiable inner-loop optimisers, learned optimisers), as one script.

Run from the repository root::

    python scripts/inner_optim_figures.py > reports/inner-optimizers/figures.md

Prints Markdown tables:

1. the reference's momentum / Adam meta-gradients against plain torch
   autograd, ``higher``, ``torchopt`` and optax (K = 1..5; normwise relative
   difference of ``dL/dtheta``; the named variants where a library computes a
   different function);
2. the LSTM optimiser (Andrychowicz et al. 2016) through T = 20 steps on a
   quadratic and an MLP optimisee, and Ravi & Larochelle's meta-learner:
   reference vs torch autograd, vs the engine's complex step
   (``verify.check_gradient``), and the distance of the truncated (K = 5),
   first-order (Andrychowicz's stop-gradient) and detached-state gradients
   from the exact one (relative error and cosine).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import numpy as np

sys.path.insert(0, os.getcwd())

from reference import inner_optim  # noqa: E402
from reference.inner_optim import constant_lrs  # noqa: E402
from reference.learned_optimizers import LSTMOptimizer, MetaLearnerLSTM  # noqa: E402
from reference.models import MLP, Quadratic, flatten, unflatten  # noqa: E402
from reference.optimizers import Adam, Momentum  # noqa: E402
from reference.tasks import Task, check_tasks  # noqa: E402
from verify import check_gradient  # noqa: E402


def rel(a: Any, b: Any) -> float:
    a, b = flatten([np.asarray(x) for x in a]), flatten([np.asarray(x) for x in b])
    if not np.all(np.isfinite(b)):
        return float("nan")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), 1e-300))


def cos(a: Any, b: Any) -> float:
    a, b = flatten([np.asarray(x) for x in a]), flatten([np.asarray(x) for x in b])
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def problem(seed: int) -> tuple[MLP, list[np.ndarray], list[Task]]:
    rng = np.random.default_rng(seed)
    model = MLP([3, 5, 2], "tanh", "mse")
    params = [0.7 * rng.normal(size=s) for s in model.shapes]
    tasks = [Task(rng.normal(size=(5, 3)), rng.normal(size=(5, 2)), rng.normal(size=(4, 3)), rng.normal(size=(4, 2)))
             for _ in range(2)]
    return model, params, check_tasks(model, tasks)


def libraries() -> None:
    import higher
    import jax
    import optax
    import torch
    import torchopt

    from verify.backends.jax._model import build_loss, to_jax_tasks
    from verify.backends.torch import build_model
    from verify.backends.torch import inner_optim as tio
    from verify.backends.torch._model import FunctionalMLP, loss_fn, to_torch_tasks

    def run_higher(model, params, tasks, make, steps):
        module = build_model(model, params, "float64")
        opt = make(module.parameters())
        grads = None
        tt = to_torch_tasks(tasks, "float64", model=model)
        for t in tt:
            with higher.innerloop_ctx(module, opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(loss_fn(model.loss_name, fmodel(t.x_support), t.y_support))
                q = loss_fn(model.loss_name, fmodel(t.x_query), t.y_query) / len(tt)
            g = torch.autograd.grad(q, list(module.parameters()))
            grads = g if grads is None else [a + b for a, b in zip(grads, g)]
        return [x.detach().numpy() for x in grads]

    def run_torchopt(model, params, tasks, make, steps, default64=False):
        previous = torch.get_default_dtype()
        if default64:
            torch.set_default_dtype(torch.float64)
        try:
            fm = FunctionalMLP(model, "float64")
            theta = fm.tensors(params, requires_grad=True)
            grads = None
            for t in to_torch_tasks(tasks, "float64", model=model):
                opt = make()
                p = tuple(theta)
                state = opt.init(p)
                for _ in range(steps):
                    g = torch.autograd.grad(fm.loss(list(p), t.x_support, t.y_support), p, create_graph=True)
                    updates, state = opt.update(g, state, params=p, inplace=False)
                    p = torchopt.apply_updates(p, updates, inplace=False)
                g = torch.autograd.grad(fm.loss(list(p), t.x_query, t.y_query) / len(tasks), theta)
                grads = g if grads is None else [a + b for a, b in zip(grads, g)]
        finally:
            torch.set_default_dtype(previous)
        return [x.detach().numpy() for x in grads]

    def run_optax(model, params, tasks, tx, steps):
        loss = build_loss(model)
        jt = to_jax_tasks(tasks)

        def meta(theta):
            total = 0.0
            for t in jt:
                p, state = theta, tx.init(theta)
                for _ in range(steps):
                    updates, state = tx.update(jax.grad(loss)(p, t.x_support, t.y_support), state, p)
                    p = optax.apply_updates(p, updates)
                total = total + loss(p, t.x_query, t.y_query)
            return total / len(jt)

        return jax.grad(meta)([jax.numpy.asarray(p) for p in params])

    rows = [
        ("momentum 0.9", lambda: Momentum(0.9), {
            "torch autograd": lambda m, p, t, k, opt: tio.meta_loss_and_grad(m, p, t, constant_lrs(m, 0.1, k), k,
                                                                             optimizer=opt).params,
            "higher": lambda m, p, t, k, opt: run_higher(m, p, t, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), k),
            "torchopt": lambda m, p, t, k, opt: run_torchopt(m, p, t, lambda: torchopt.sgd(0.1, momentum=0.9,
                                                                                          moment_requires_grad=True), k),
            "optax": lambda m, p, t, k, opt: run_optax(m, p, t, optax.sgd(0.1, momentum=0.9), k)}),
        ("nesterov 0.9", lambda: Momentum(0.9, nesterov=True), {
            "torch autograd": lambda m, p, t, k, opt: tio.meta_loss_and_grad(m, p, t, constant_lrs(m, 0.1, k), k,
                                                                             optimizer=opt).params,
            "higher": lambda m, p, t, k, opt: run_higher(m, p, t, lambda ps: torch.optim.SGD(
                ps, lr=0.1, momentum=0.9, nesterov=True), k),
            "torchopt": lambda m, p, t, k, opt: run_torchopt(m, p, t, lambda: torchopt.sgd(
                0.1, momentum=0.9, nesterov=True, moment_requires_grad=True), k),
            "optax": lambda m, p, t, k, opt: run_optax(m, p, t, optax.sgd(0.1, momentum=0.9, nesterov=True), k)}),
        ("momentum 0.9, dampening 0.3", lambda: Momentum(0.9, dampening=0.3), {
            "torch autograd": lambda m, p, t, k, opt: tio.meta_loss_and_grad(m, p, t, constant_lrs(m, 0.1, k), k,
                                                                             optimizer=opt).params,
            "higher": lambda m, p, t, k, opt: run_higher(m, p, t, lambda ps: torch.optim.SGD(
                ps, lr=0.1, momentum=0.9, dampening=0.3), k),
            "torchopt (fresh per task)": lambda m, p, t, k, opt: run_torchopt(m, p, t, lambda: torchopt.sgd(
                0.1, momentum=0.9, dampening=0.3, moment_requires_grad=True), k)}),
        ("Adam eps=1e-3 (torch)", lambda: Adam(eps=1e-3), {
            "torch autograd": lambda m, p, t, k, opt: tio.meta_loss_and_grad(m, p, t, constant_lrs(m, 0.1, k), k,
                                                                             optimizer=opt).params,
            "higher": lambda m, p, t, k, opt: run_higher(m, p, t, lambda ps: torch.optim.Adam(ps, lr=0.1, eps=1e-3), k),
            "torchopt (default dtype float32)": lambda m, p, t, k, opt: run_torchopt(
                m, p, t, lambda: torchopt.adam(0.1, eps=1e-3, moment_requires_grad=True), k),
            "torchopt (default dtype float64)": lambda m, p, t, k, opt: run_torchopt(
                m, p, t, lambda: torchopt.adam(0.1, eps=1e-3, moment_requires_grad=True), k, default64=True),
            "optax": lambda m, p, t, k, opt: run_optax(m, p, t, optax.adam(0.1, eps=1e-3), k)}),
        ("Adam eps=1e-3, eps_placement='v' (eps-hat)", lambda: Adam(eps=1e-3, eps_placement="v"), {
            "higher": lambda m, p, t, k, opt: run_higher(m, p, t, lambda ps: torch.optim.Adam(ps, lr=0.1, eps=1e-3), k)}),
        ("Adam eps=1e-3, eps_root=1e-6 (optax)", lambda: Adam(eps=1e-3, eps_root=1e-6), {
            "torchopt (default dtype float64)": lambda m, p, t, k, opt: run_torchopt(
                m, p, t, lambda: torchopt.adam(0.1, eps=1e-3, eps_root=1e-6, moment_requires_grad=True), k,
                default64=True),
            "optax": lambda m, p, t, k, opt: run_optax(m, p, t, optax.adam(0.1, eps=1e-3, eps_root=1e-6), k)}),
    ]
    print("## 1. Momentum and Adam inner loops: reference vs libraries (float64, dL/dtheta)\n")
    print("Normwise relative difference `||ref - lib|| / max(||ref||, ||lib||)`; MLP 3-5-2 tanh, mse, 2 tasks,")
    print("lr 0.1; K = 1 is Adam's first step. Bar: <= 1e-12.\n")
    print("| reference optimiser | implementation | K=1 | K=2 | K=3 | K=4 | K=5 | max |")
    print("|---|---|---|---|---|---|---|---|")
    for label, make, libs in rows:
        for lib, fn in libs.items():
            vals = []
            for k in range(1, 6):
                m, p, t = problem(k)
                opt = make()
                ref = inner_optim.meta_loss_and_grad(m, p, t, constant_lrs(m, 0.1, k), k, optimizer=opt).params
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    vals.append(rel(ref, fn(m, p, t, k, opt)))
            print(f"| {label} | {lib} | " + " | ".join(f"{v:.1e}" for v in vals) + f" | **{max(vals):.1e}** |")
    print()


def learned() -> None:
    from verify.backends.torch import inner_optim as tio

    def quad(seed):
        rng = np.random.default_rng(seed)
        W = rng.normal(size=(5, 5))
        A = W @ W.T / 5 + 0.1 * np.eye(5)
        c = rng.normal(size=5)
        return Quadratic(5), [rng.normal(size=5)], [Task(A, c, A, c)]

    cases = [
        ("LSTM (2x6) on a quadratic", quad(0), 20, lambda phi: LSTMOptimizer(phi, hidden=6, layers=2),
         LSTMOptimizer.random_params(6, 2)),
        ("LSTM (1x4) on an MLP", problem(4), 20, lambda phi: LSTMOptimizer(phi, hidden=4),
         LSTMOptimizer.random_params(4)),
        ("Ravi-Larochelle meta-learner on an MLP", problem(6), 20, lambda phi: MetaLearnerLSTM(phi),
         MetaLearnerLSTM.random_params()),
    ]
    print("## 2. Learned optimisers through T = 20 steps (meta-loss: mean of f(theta_t) over the trajectory)\n")
    print("| optimiser | gradient | vs torch autograd | engine complex step (verdict, error) |")
    print("|---|---|---|---|")
    dist = []
    for label, (model, params, tasks), steps, make, phi in cases:
        lrs, w = constant_lrs(model, 1.0, steps), np.ones(steps) / steps
        r = inner_optim.meta_loss_and_grad(model, params, tasks, lrs, steps, optimizer=make(phi), weights=w)
        t = tio.meta_loss_and_grad(model, params, tasks, lrs, steps, optimizer=make(phi), weights=w)
        shapes = [np.shape(x) for x in phi]
        v_phi = check_gradient(lambda x: inner_optim.meta_loss(model, params, tasks, lrs, steps,
                                                               optimizer=make(unflatten(x, shapes)), weights=w),
                               flatten(r.optimizer), flatten(phi))
        v_theta = check_gradient(lambda x: inner_optim.meta_loss(model, unflatten(x, model.shapes), tasks, lrs, steps,
                                                                 optimizer=make(phi), weights=w),
                                 flatten(r.params), flatten(params))
        print(f"| {label} | phi | {rel(r.optimizer, t.optimizer):.1e} | {v_phi.status}, {v_phi.error:.1e} |")
        print(f"| {label} | theta | {rel(r.params, t.params):.1e} | {v_theta.status}, {v_theta.error:.1e} |")
        for approx in ("truncated:5", "first_order", "stop_gradient"):
            a = inner_optim.meta_loss_and_grad(model, params, tasks, lrs, steps, optimizer=make(phi), weights=w,
                                               approximation=approx)
            ta = tio.meta_loss_and_grad(model, params, tasks, lrs, steps, optimizer=make(phi), weights=w,
                                        approximation=approx)
            dist.append((label, approx, rel(a.optimizer, r.optimizer), cos(a.optimizer, r.optimizer),
                         rel(a.optimizer, ta.optimizer)))
    print()
    print("Declared approximations of `dL/dphi` and their distance from the exact BPTT gradient")
    print("(`first_order` is Andrychowicz et al.'s stop-gradient on the optimisee gradient input; `stop_gradient`")
    print("detaches the optimiser's state between steps); last column: the same approximation by torch `detach`.\n")
    print("| optimiser | approximation | rel. distance from exact | cosine with exact | vs torch detach |")
    print("|---|---|---|---|---|")
    for label, approx, d, c, tt in dist:
        print(f"| {label} | {approx} | {d:.3g} | {c:.4f} | {tt:.1e} |")
    print()


if __name__ == "__main__":
    learned()
    libraries()
