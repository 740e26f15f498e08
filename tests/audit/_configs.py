"""Problem configurations shared by the audit tests (fixed shapes, so several seeds reuse JAX compilations)."""

GRAD = dict(model="mlp:2-4-1:tanh", n_tasks=2, shots=4, queries=3, inner_steps=2, inner_lr=0.2)
GRAD_CE = dict(model="mlp:2-3-3:softplus", loss="ce", n_tasks=2, shots=4, queries=3, inner_steps=3, inner_lr=0.3)
METASGD = dict(model="mlp:2-3-1:tanh", n_tasks=2, shots=4, queries=3, inner_steps=2, inner_lr=0.2)
IMAML = dict(model="mlp:1-3-1:tanh", n_tasks=1, shots=3, queries=2, lam=4.0)
R2D2 = dict(model="mlp:2-4-3:tanh", n_tasks=2, shots=2, queries=2, n_way=3, normalize=True, bias_column=True,
            form="dual")
LRD2 = dict(model="mlp:2-3-3:tanh", n_tasks=2, shots=3, queries=2, n_way=2, newton_steps=2, bias_column=True)
METRIC = dict(model="mlp:2-4-3:tanh", n_tasks=2, shots=2, queries=2, n_way=3)
NEWTON = dict(model="mlp:1-2-1:tanh", n_tasks=1, shots=3, queries=2, inner_steps=1, inner_lr=0.2, damping=1.5)

CONFIGS = {"GRAD": GRAD, "GRAD_CE": GRAD_CE, "METASGD": METASGD, "IMAML": IMAML, "R2D2": R2D2, "LRD2": LRD2,
           "METRIC": METRIC, "NEWTON": NEWTON}
