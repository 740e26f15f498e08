"""Problem configurations shared by the audit tests (fixed shapes, so several seeds reuse JAX compilations)."""

import numpy as np

from reference.models import flatten
from verify.algorithms import Case, build_case, evaluate

GRAD = dict(model="mlp:2-4-1:tanh", n_tasks=2, shots=4, queries=3, inner_steps=2, inner_lr=0.2)
GRAD_CE = dict(model="mlp:2-3-3:softplus", loss="ce", n_tasks=2, shots=4, queries=3, inner_steps=3, inner_lr=0.3)
METASGD = dict(model="mlp:2-3-1:tanh", n_tasks=2, shots=4, queries=3, inner_steps=2, inner_lr=0.2)
IMAML = dict(model="mlp:1-3-1:tanh", n_tasks=1, shots=3, queries=2, lam=4.0)
R2D2 = dict(model="mlp:2-4-3:tanh", n_tasks=2, shots=2, queries=2, n_way=3, normalize=True, bias_column=True,
            form="dual")
LRD2 = dict(model="mlp:2-3-3:tanh", n_tasks=2, shots=3, queries=2, n_way=2, newton_steps=2, bias_column=True)
METRIC = dict(model="mlp:2-4-3:tanh", n_tasks=2, shots=2, queries=2, n_way=3)
NEWTON = dict(model="mlp:1-2-1:tanh", n_tasks=1, shots=3, queries=2, inner_steps=1, inner_lr=0.2, damping=1.5)

#: the optimiser rows: 3 steps (Adam's bias corrections and the momentum buffer differ from step 1 on)
OPTIM = dict(model="mlp:2-4-1:tanh", n_tasks=2, shots=4, queries=3, inner_steps=3, inner_lr=0.05)
CONFIGS = {"OPTIM": OPTIM, "GRAD": GRAD, "GRAD_CE": GRAD_CE, "METASGD": METASGD, "IMAML": IMAML, "R2D2": R2D2,
           "LRD2": LRD2, "METRIC": METRIC, "NEWTON": NEWTON}


def first_order_gap(case: Case) -> float:
    """Normwise relative gap between the exact (MAML) and first-order (FOMAML) reference gradients."""
    _, g2 = evaluate(case)
    _, g1 = evaluate(Case("fomaml", case.model, case.params, case.tasks, case.hyper, case.seed))
    g1, g2 = flatten(g1), flatten(g2)
    return float(np.max(np.abs(g1 - g2)) / np.max(np.abs(g2)))


def sensitivity_case(seed: int, gap: float) -> Case:
    """A MAML problem whose first-order gap is ``gap`` (inner_lr scaled down: the gap is linear in it)."""
    kw = dict(sizes=[2, 4, 1], activation="tanh", loss="mse", n_tasks=2, shots=4, queries=3, inner_steps=2)
    probe = build_case("maml", seed=seed, inner_lr=1e-3, **kw)
    lr = 1e-3 * gap / first_order_gap(probe)
    return build_case("maml", seed=seed, inner_lr=lr, **kw)


#: declared approximations on Meta-SGD, MAML++ and the learned optimisers (3 steps: truncated:1 and the state
#: differ from the exact meta-gradient; test_audit_approximations.py)
MAMLPP = dict(model="mlp:2-3-1:tanh", n_tasks=2, shots=4, queries=3, inner_steps=3, inner_lr=0.2)
LEARNED = dict(model="mlp:2-3-1:tanh", n_tasks=2, shots=4, queries=3, inner_steps=3, inner_lr=0.5)
META_LSTM = dict(model="mlp:2-3-1:tanh", n_tasks=2, shots=4, queries=3, inner_steps=3)
CONFIGS.update(MAMLPP=MAMLPP, LEARNED=LEARNED, META_LSTM=META_LSTM)
