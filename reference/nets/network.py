"""A network of reference layers with the model interface the algorithms use.

:class:`Network` wraps a tree of :mod:`reference.nets.layers` and exposes what
``reference.models.MLP`` exposes (``init``, ``forward``, ``loss``, ``grad``,
``hvp``, ``hessian``, ``third_order``, ``jvp``, ``vjp``, ``shapes``,
``check_params`` and the unvalidated ``_loss_and_grad``/``_hvp``/``_third``),
so the reference algorithms run on it unchanged. Parameters are a list in
PyTorch's ``.parameters()`` order of the equivalent ``nn.Module``
(CONVENTIONS); flatten/unflatten with ``reference.models.flatten``/``unflatten``.

Batch norm (CONVENTIONS, "Backbones beyond the MLP"): each batch-norm layer
is in train mode (batch statistics, differentiated through) or eval mode
(running statistics as constants), as the module's ``.train()``/``.eval()``
would set it; :meth:`Network.train`/:meth:`Network.eval` return copies with
every batch-norm layer switched. Every call normalises the batch it is given,
so an algorithm that evaluates the support and the query losses separately is
transductive by default; normalising support and query as one batch is a
named choice for the feature-extractor algorithms (R2-D2, LR-D2, ProtoNets,
Matching nets): :meth:`Network.joint_batch`. The running
statistics are state, never touched by a loss or a derivative:
:meth:`Network.running_stats` returns what one train-mode forward would leave
(PyTorch's update), :meth:`Network.with_state` a copy holding given statistics.

Constructors: :func:`conv4` (Finn et al. 2017; Vinyals et al. 2016) and
:func:`resnet12` (Lee et al. 2019, MetaOptNet).

Length: a little over 500 lines: :class:`Network` (the model interface the
algorithms use, with its fused MAML task pass) and the Conv4/ResNet-12
constructors that build it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np

from reference.validation import as_float_array, check_positive_int
from reference.errors import InvalidInputError, NotAnalyticError
from reference.models import LOSSES, _Loss, flatten, unflatten
from reference.nets.layers import (
    Activation,
    BatchNorm,
    BatchNorm2d,
    Conv2d,
    Flatten,
    GlobalAvgPool2d,
    Layer,
    Linear,
    MaxPool2d,
    Residual,
    Sequential,
)

Params = list[np.ndarray]

# Largest dense Hessian :meth:`Network.hessian` builds (one Hessian-vector product per column).
MAX_DENSE_HESSIAN = 4000
# Complex step used by :meth:`Network._third` (exact to round-off: no subtraction, O(h^2) truncation).
_H_CS = 1e-30


def _walk(layer: Layer, prefix: str):
    """Yield ``(path, layer)`` for the leaves of the layer tree, in parameter order."""
    subs = layer.sublayers()
    if not subs:
        yield prefix, layer
        return
    for name, sub in subs:
        path = name if not prefix else (prefix if not name else f"{prefix}.{name}")
        yield from _walk(sub, path)


class Network:
    """A feed-forward network of reference layers with exact derivatives.

    Args:
        layers: a :class:`~reference.nets.layers.Sequential` or a list of layers
            (wrapped in one; named ``"0", "1", ...`` as ``nn.Sequential``).
        in_shape: the per-example input shape, ``(C, H, W)`` (NCHW batches) or ``(D,)``.
        loss: ``ce`` (mean softmax cross-entropy, integer labels; the default),
            ``mse`` or ``bce``, as :class:`reference.models.MLP`.
        param_order: optional permutation: public parameter ``i`` is the
            tree's parameter ``param_order[i]`` (used by
            :func:`reference.from_torch` when a module registers its
            parameters in another order than its forward uses them).

    The output must be 2-D ``(n, d)`` (logits for ``ce``/``bce``).
    """

    def __init__(self, layers: Sequence[Layer] | Sequential, in_shape: Sequence[int], loss: str = "ce", *,
                 param_order: Sequence[int] | None = None):
        body = layers if isinstance(layers, Sequential) else Sequential(*list(layers))
        if isinstance(in_shape, (int, np.integer)):
            in_shape = (int(in_shape),)
        self.in_shape = tuple(check_positive_int(f"in_shape[{i}]", s) for i, s in enumerate(in_shape))
        if len(self.in_shape) not in (1, 3):
            raise InvalidInputError(f"in_shape={tuple(in_shape)!r} must be (C, H, W) for images or (D,) for vectors")
        out = body.out_shape(self.in_shape)
        if len(out) != 1:
            raise InvalidInputError(f"the network's output has shape {out} per example; end with Flatten/Linear so "
                                    "it is a vector of logits")
        self.n_out = out[0]
        if loss not in LOSSES:
            raise InvalidInputError(f"loss={loss!r} is unknown; choose one of {LOSSES}")
        if loss == "ce" and self.n_out < 2:
            raise InvalidInputError(f"loss='ce' needs at least 2 outputs but the network has {self.n_out}")
        self.body = body
        self.loss_name = loss
        self.activation = "network"  # no single activation; kept for code that prints it
        self._leaves = list(_walk(body, ""))
        names = [f"{path}.{pname}" if path else pname
                 for path, leaf in self._leaves for pname in leaf.param_names]
        tree_shapes = list(body.param_shapes)
        n = len(tree_shapes)
        if param_order is None:
            order = list(range(n))
        else:
            order = [int(i) for i in param_order]
            if sorted(order) != list(range(n)):
                raise InvalidInputError(f"param_order={list(param_order)!r} must be a permutation of range({n})")
        self._order = order  # public i <- tree order[i]
        self._inverse = [0] * n
        for i, j in enumerate(order):
            self._inverse[j] = i
        self._identity = order == list(range(n))
        self.param_names: tuple[str, ...] = tuple(names[j] for j in order)
        self.shapes: tuple[tuple[int, ...], ...] = tuple(tuple(tree_shapes[j]) for j in order)
        self.n_params = int(sum(int(np.prod(s)) for s in self.shapes))
        linears = [(path, leaf) for path, leaf in self._leaves if isinstance(leaf, Linear)]
        if linears:
            path, head = linears[-1]
            idx = {f"{path}.{p}" if path else p for p in head.param_names}
            self.head_indices: tuple[int, ...] = tuple(i for i, nm in enumerate(self.param_names) if nm in idx)
        else:
            self.head_indices = ()

    # -- description ---------------------------------------------------------

    def __repr__(self) -> str:
        return f"Network({self.body!r}, in_shape={self.in_shape}, loss={self.loss_name!r})"

    def summary(self) -> str:
        """One line: layer kinds, input shape, outputs, parameter count, batch-norm mode."""
        kinds = [type(leaf).__name__ for _, leaf in self._leaves]
        counts: dict[str, int] = {}
        for k in kinds:
            counts[k] = counts.get(k, 0) + 1
        layers = ", ".join(f"{n}x{k}" for k, n in counts.items())
        return (f"Network(in_shape={self.in_shape}, n_out={self.n_out}, {self.n_params} parameters, "
                f"batch norm {self.mode}; {layers})")

    @property
    def is_analytic(self) -> bool:
        """Whether every layer is analytic (complex step exact everywhere, no kinks)."""
        return self.body.analytic

    joint = False  # feature extractors: support and query normalised as one batch (see joint_batch)

    @property
    def batch_coupled(self) -> bool:
        """Whether examples interact (a batch-norm layer normalises with batch statistics)."""
        return any(bn.uses_batch_stats for _, bn in self.batchnorms)

    def joint_batch(self, joint: bool = True) -> Network:
        """A copy whose feature extraction (R2-D2, LR-D2, ProtoNets, Matching nets) normalises support and
        query as one batch (R2-D2's encoder); the default is two batches (transductive, CONVENTIONS).
        Losses and derivatives of a given batch are unaffected."""
        new = copy.deepcopy(self)
        new.joint = bool(joint)
        return new

    @property
    def batchnorms(self) -> list[tuple[str, BatchNorm]]:
        """The batch-norm layers with their paths."""
        return [(p, leaf) for p, leaf in self._leaves if isinstance(leaf, BatchNorm)]

    def init(self, seed: int = 0) -> Params:
        """PyTorch's default initialisation of each layer (``reset_parameters``), seeded."""
        tree = self.body.init(np.random.default_rng(seed))
        return self._to_public(tree)

    # -- parameter order -----------------------------------------------------

    def _to_tree(self, params: Sequence[Any]) -> list[Any]:
        return list(params) if self._identity else [params[self._inverse[j]] for j in range(len(params))]

    def _to_public(self, tree: Sequence[Any]) -> list[Any]:
        return list(tree) if self._identity else [tree[j] for j in self._order]

    # -- modes and state -----------------------------------------------------

    def _copy_with(self, fn) -> Network:
        new = copy.deepcopy(self)
        for _, bn in new.batchnorms:
            fn(bn)
        return new

    def train(self) -> Network:
        """A copy with every batch-norm layer in train mode (batch statistics)."""
        return self._copy_with(lambda bn: setattr(bn, "training", True))

    def eval(self) -> Network:
        """A copy with every batch-norm layer in eval mode (running statistics as constants)."""
        return self._copy_with(lambda bn: setattr(bn, "training", False))

    @property
    def mode(self) -> str:
        """``"train"``, ``"eval"`` or ``"mixed"`` over the batch-norm layers (``"train"`` without any)."""
        modes = {bn.training for _, bn in self.batchnorms}
        if not modes:
            return "train"
        return "mixed" if len(modes) == 2 else ("train" if modes.pop() else "eval")

    def state(self) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
        """Running statistics ``{path: (running_mean, running_var, num_batches_tracked)}``."""
        return {p: (bn.running_mean.copy(), bn.running_var.copy(), bn.num_batches_tracked)
                for p, bn in self.batchnorms if bn.track_running_stats}

    def with_state(self, state: dict[str, tuple[Any, Any, int]]) -> Network:
        """A copy whose batch-norm layers hold the given running statistics."""
        new = copy.deepcopy(self)
        known = {p: bn for p, bn in new.batchnorms if bn.track_running_stats}
        for path, (mean, var, count) in state.items():
            if path not in known:
                raise InvalidInputError(f"state has statistics for {path!r} but the network's tracked batch-norm "
                                        f"layers are {sorted(known)}")
            bn = known[path]
            bn.running_mean = as_float_array(f"state[{path!r}].mean", mean, allow_complex=False).copy()
            bn.running_var = as_float_array(f"state[{path!r}].var", var, allow_complex=False).copy()
            bn.num_batches_tracked = int(count)
        return new

    def running_stats(self, params: Sequence[Any], x: Any) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
        """The running statistics one train-mode forward on ``x`` leaves (PyTorch's update), as new state.

        ``r <- (1 - momentum) r + momentum * stat`` per tracked batch-norm layer
        in train mode, with the batch mean and the *unbiased* batch variance;
        layers in eval mode keep theirs. The network itself is not modified.
        """
        params, x, _ = self._checked(params, x)
        tree = self._to_tree(params)
        xi = self._internal_x(x)
        state = self.state()
        self._collect_stats(self.body, tree, xi, "", state)
        return state

    def _collect_stats(self, layer, P, x, prefix, state):
        """Forward through ``layer`` recording each train-mode BN's update (paths as in :func:`_walk`)."""
        if isinstance(layer, Sequential):
            parts = layer._split(P)
            for name, sub, p in zip(layer.names, layer.layers, parts):
                path = name if not prefix else (prefix if not name else f"{prefix}.{name}")
                x = self._collect_stats(sub, p, x, path, state)
            return x
        if isinstance(layer, Residual):
            nb = layer._nb
            pa = prefix if not layer.names[0] else (f"{prefix}.{layer.names[0]}" if prefix else layer.names[0])
            pb = prefix if not layer.names[1] else (f"{prefix}.{layer.names[1]}" if prefix else layer.names[1])
            a = self._collect_stats(layer.body, P[:nb], x, pa, state)
            b = self._collect_stats(layer.shortcut, P[nb:], x, pb, state)
            return a + b
        y, cache = layer.fwd(P, x)
        if isinstance(layer, BatchNorm):
            upd = layer.updated_stats(cache, x.shape)
            if upd is not None:
                state[prefix] = upd
        return y

    # -- validation ----------------------------------------------------------

    def check_params(self, params: Sequence[Any], name: str = "params") -> Params:
        """Validate a parameter list (count, shapes, finiteness) and return arrays."""
        if isinstance(params, np.ndarray) or not isinstance(params, Sequence):
            raise InvalidInputError(
                f"{name} must be a list of {len(self.shapes)} arrays shaped {list(self.shapes)}, got "
                f"{type(params).__name__}; use reference.models.unflatten(vector, model.shapes) for a flat vector"
            )
        if len(params) != len(self.shapes):
            raise InvalidInputError(f"{name} has {len(params)} arrays but the network has {len(self.shapes)} "
                                    f"parameter tensors ({', '.join(self.param_names)})")
        out = []
        for i, (p, shape) in enumerate(zip(params, self.shapes)):
            arr = as_float_array(f"{name}[{i}]", p)
            if arr.shape != shape:
                raise InvalidInputError(f"{name}[{i}] ({self.param_names[i]}) has shape {arr.shape}, expected {shape}")
            out.append(arr)
        return out

    def check_x(self, x: Any, name: str = "x") -> np.ndarray:
        arr = as_float_array(name, x)
        if arr.ndim != 1 + len(self.in_shape) or tuple(arr.shape[1:]) != self.in_shape:
            layout = " (NCHW)" if len(self.in_shape) == 3 else ""
            raise InvalidInputError(f"{name} has shape {arr.shape}, expected (n, {', '.join(map(str, self.in_shape))})"
                                    f"{layout}")
        if arr.shape[0] < 1:
            raise InvalidInputError(f"{name} is empty; pass at least one example")
        return arr

    def check_y(self, y: Any, n: int, name: str = "y") -> np.ndarray:
        d = self.n_out
        if self.loss_name == "ce":
            arr = np.asarray(y)
            if arr.ndim != 1 or arr.shape[0] != n:
                raise InvalidInputError(f"{name} has shape {arr.shape}; loss='ce' needs integer labels of shape ({n},)")
            if np.issubdtype(arr.dtype, np.floating):
                if not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
                    raise InvalidInputError(f"{name} must hold integer class labels, got non-integer floats")
            elif not np.issubdtype(arr.dtype, np.integer):
                raise InvalidInputError(f"{name} must hold integer class labels, got dtype {arr.dtype}")
            arr = arr.astype(np.int64)
            if arr.min() < 0 or arr.max() >= d:
                raise InvalidInputError(f"{name} has labels in [{arr.min()}, {arr.max()}] but the network has {d} "
                                        f"classes; labels must lie in [0, {d - 1}]")
            return arr
        arr = as_float_array(name, y)
        if arr.ndim == 1 and d == 1:
            arr = arr.reshape(-1, 1)
        if arr.shape != (n, d):
            raise InvalidInputError(f"{name} has shape {arr.shape}, expected ({n}, {d}) for loss={self.loss_name!r}")
        return arr

    def _checked(self, params: Any, x: Any, y: Any = None) -> tuple[Params, np.ndarray, np.ndarray | None]:
        params = self.check_params(params)
        x = self.check_x(x)
        return params, x, (None if y is None else self.check_y(y, x.shape[0]))

    # -- internal passes (unvalidated; the algorithms call these) -------------

    def _internal_x(self, x: np.ndarray) -> np.ndarray:
        return x.transpose(0, 2, 3, 1) if x.ndim == 4 else x  # NCHW -> NHWC (a view)

    def _forward(self, params: Sequence[np.ndarray], x: np.ndarray) -> tuple[np.ndarray, Any, list[Any]]:
        tree = self._to_tree(params)
        out, caches = self.body.fwd(tree, self._internal_x(x))
        return out, caches, tree

    def _grads_public(self, tree_grads: Sequence[np.ndarray]) -> Params:
        return self._to_public(tree_grads)

    def _loss_and_grad(self, params, x, y):
        out, caches, tree = self._forward(params, x)
        loss = _Loss(self.loss_name, out, y)
        grads, _ = self.body.bwd(tree, caches, loss.grad(), need_gx=False)
        return loss.value()[()], self._to_public(grads)

    def _grad_and_hvp(self, params, x, y, v):
        """``(loss, grad, H v)`` in one forward, one R-forward and one combined backward."""
        out, caches, tree = self._forward(params, x)
        dtree = self._to_tree(v)
        dout, rcaches = self.body.jvp(tree, caches, dtree, None)
        loss = _Loss(self.loss_name, out, y)
        g = loss.grad()
        rg = loss.hvp(dout) if dout is not None else np.zeros_like(g)
        grads, _, hv, _ = self.body.rbwd(tree, caches, rcaches, g, rg, dtree, None, need_gx=False)
        return loss.value()[()], self._to_public(grads), self._to_public(hv)

    def _hvp(self, params, x, y, v):
        return self._grad_and_hvp(params, x, y, v)[2]

    def loss_and_grad_unchecked(self, params: Sequence[Any], x: np.ndarray, y: np.ndarray) -> tuple[Any, Params]:
        """:meth:`loss_and_grad` without the argument checks (for validated inputs), as ``MLP``'s."""
        return self._loss_and_grad(params, x, y)

    def hvp_unchecked(self, params: Sequence[Any], x: np.ndarray, y: np.ndarray, v: Sequence[Any]) -> Params:
        """:meth:`hvp` without the argument checks (for validated inputs), as ``MLP``'s."""
        return self._hvp(params, x, y, v)

    def _maml_task(self, params: Params, task: Any, lrs: Sequence[Any], steps: int, *, first_order: bool,
                   lr_grad: bool) -> tuple[Any, Params, Params | None]:
        """One task of ``reference.inner_loop``'s reverse accumulation, reusing each inner step's forward pass.

        The same recursion as ``_inner.task_loss_and_grad`` (``v <- v - H_s(p_k) (a * v)``), but the
        forward caches of the support pass at each ``p_k`` are kept from the inner loop (memory
        ``K x activations``), so each Hessian-vector product costs an R-forward and a combined
        backward only, not a fresh forward pass.
        """
        xs, ys = task.x_support, task.y_support
        states = []
        p = list(params)
        for _ in range(steps):
            out, caches, tree = self._forward(p, xs)
            loss = _Loss(self.loss_name, out, ys)
            g_tree, _ = self.body.bwd(tree, caches, loss.grad(), need_gx=False)
            g = self._to_public(g_tree)
            if not first_order:
                states.append((p, caches, tree, loss, g))
            p = [pi if a is None else pi - a * gi for pi, gi, a in zip(p, g, lrs)]
        loss_q, v = self._loss_and_grad(p, task.x_query, task.y_query)
        if first_order:
            return loss_q, v, None
        grad_lrs = [None if a is None else 0.0 for a in lrs] if lr_grad else None
        for _, caches, tree, loss, g in reversed(states):
            if grad_lrs is not None:
                grad_lrs = [None if a is None else acc - gk * vk for acc, gk, vk, a in zip(grad_lrs, g, v, lrs)]
            dtree = self._to_tree([np.zeros_like(vk) if a is None else a * vk for vk, a in zip(v, lrs)])
            dout, rcaches = self.body.jvp(tree, caches, dtree, None)
            _, _, hv, _ = self.body.rbwd(tree, caches, rcaches, loss.grad(), loss.hvp(dout), dtree, None,
                                         need_gx=False)
            v = [vk - hk for vk, hk in zip(v, self._to_public(hv))]
        return loss_q, v, grad_lrs

    def _third(self, params, x, y, u, w):
        """``grad_params (u^T H(params) w)`` by a complex step of the exact R-operator.

        ``d/dt H(p + t w) u = D^3 L[u, w, .]``; with the complex-safe passes,
        ``Im(H(p + i h w) u) / h`` (``h = 1e-30``) equals it to round-off (no
        subtraction, ``O(h^2)`` truncation). At kinks it is the one-sided
        derivative of the branch the real part selects, as PyTorch's autograd.
        """
        if any(np.iscomplexobj(a) for a in (*params, *u, *w)) or np.iscomplexobj(x):
            raise NotAnalyticError("Network.third_order takes real arguments: it is itself a complex step")
        shifted = [p + 1j * _H_CS * wi for p, wi in zip(params, w)]
        return [np.imag(a) / _H_CS for a in self._hvp(shifted, x, y, u)]

    # -- public API ----------------------------------------------------------

    def forward(self, params: Sequence[Any], x: Any) -> np.ndarray:
        """The output ``f(x)``, shape ``(n, d)`` (logits for ce/bce); x is NCHW for images."""
        params, x, _ = self._checked(params, x)
        return self._forward(params, x)[0]

    def loss(self, params: Sequence[Any], x: Any, y: Any) -> Any:
        """The loss (a NumPy scalar; complex for complex parameters)."""
        params, x, y = self._checked(params, x, y)
        out = self._forward(params, x)[0]
        return _Loss(self.loss_name, out, y).value()[()]

    def loss_and_grad(self, params: Sequence[Any], x: Any, y: Any) -> tuple[Any, Params]:
        """Loss and its gradient by backpropagation."""
        params, x, y = self._checked(params, x, y)
        return self._loss_and_grad(params, x, y)

    def grad(self, params: Sequence[Any], x: Any, y: Any) -> Params:
        """Gradient of the loss w.r.t. every parameter tensor."""
        return self.loss_and_grad(params, x, y)[1]

    def hvp(self, params: Sequence[Any], x: Any, y: Any, v: Sequence[Any]) -> Params:
        """Exact Hessian-vector product ``H(params) v`` by Pearlmutter's R-operator (no Hessian formed)."""
        params, x, y = self._checked(params, x, y)
        return self._hvp(params, x, y, self.check_params(v, name="v"))

    def third_order(self, params: Sequence[Any], x: Any, y: Any, u: Sequence[Any], w: Sequence[Any]) -> Params:
        """Gradient w.r.t. ``params`` of ``u^T H(params) w`` (see :meth:`_third`)."""
        params, x, y = self._checked(params, x, y)
        return self._third(params, x, y, self.check_params(u, "u"), self.check_params(w, "w"))

    def hessian(self, params: Sequence[Any], x: Any, y: Any) -> np.ndarray:
        """Dense Hessian in flat order, one Hessian-vector product per column (small networks only)."""
        params, x, y = self._checked(params, x, y)
        n = self.n_params
        if n > MAX_DENSE_HESSIAN:
            raise InvalidInputError(f"the network has {n} parameters; a dense Hessian is limited to "
                                    f"{MAX_DENSE_HESSIAN}. Use hvp() for matrix-free products")
        H = np.empty((n, n), dtype=np.result_type(*params, x))
        for j in range(n):
            e = np.zeros(n)
            e[j] = 1.0
            H[:, j] = flatten(self._hvp(params, x, y, unflatten(e, self.shapes)))
        return H

    def jvp(self, params: Sequence[Any], x: Any, v: Sequence[Any]) -> np.ndarray:
        """Forward-mode product ``d f(x; params)[v]``, shape ``(n, d)``."""
        params, x, _ = self._checked(params, x)
        v = self.check_params(v, name="v")
        _, caches, tree = self._forward(params, x)
        dout, _ = self.body.jvp(tree, caches, self._to_tree(v), None)
        return dout

    def vjp(self, params: Sequence[Any], x: Any, cotangent: Any, *,
            wrt_input: bool = False) -> Params | tuple[Params, np.ndarray]:
        """Gradient of ``sum(cotangent * f(x; params))`` w.r.t. the parameters (and ``x``, NCHW)."""
        params, x, _ = self._checked(params, x)
        out, caches, tree = self._forward(params, x)
        cot = as_float_array("cotangent", cotangent)
        if cot.shape != out.shape:
            raise InvalidInputError(f"cotangent has shape {cot.shape}, expected the output shape {out.shape}")
        grads, gx = self.body.bwd(tree, caches, cot, need_gx=wrt_input)
        grads = self._to_public(grads)
        if not wrt_input:
            return grads
        return grads, (gx.transpose(0, 3, 1, 2) if gx.ndim == 4 else gx)


# ---------------------------------------------------------------------------
# Constructors
# ---------------------------------------------------------------------------


def _image_shape(in_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(in_shape)
    if len(shape) != 3:
        raise InvalidInputError(f"in_shape={shape!r} must be (C, H, W), e.g. (1, 28, 28) for Omniglot")
    return tuple(check_positive_int(f"in_shape[{i}]", s) for i, s in enumerate(shape))  # type: ignore[return-value]


def conv4(in_shape: Sequence[int], n_out: int, hidden: int = 64, *, ceil_mode: bool = False,
          head: bool = True, loss: str = "ce") -> Network:
    """Conv4 (Finn et al. 2017, MAML; Vinyals et al. 2016, Matching networks).

    Four blocks ``Conv2d(3x3, hidden, padding=1) -> BatchNorm2d -> relu ->
    MaxPool2d(2)``, then ``Flatten -> Linear(n_out)``; the equivalent
    ``nn.Sequential`` has 18 children, indices ``0..17`` (parameters
    ``0.weight, 0.bias, 1.weight, 1.bias, 4.weight, ...``). Images smaller than
    16x16 need ``ceil_mode=True`` (``MaxPool2d(2, ceil_mode=True)``: 8 -> 4 -> 2 -> 1 -> 1).
    ``head=False`` drops the ``Linear``: the output is the flattened feature vector (the backbone of
    R2-D2, ProtoNets, Matching nets; ``n_out`` is then ignored).
    """
    C, H, W = _image_shape(in_shape)
    hidden = check_positive_int("hidden", hidden)
    n_out = check_positive_int("n_out", n_out) if head else 0
    layers: list[Layer] = []
    c = C
    for _ in range(4):
        pool = MaxPool2d(2, ceil_mode=ceil_mode)
        layers += [Conv2d(c, hidden, 3, padding=1), BatchNorm2d(hidden), Activation("relu"), pool]
        c = hidden
        H, W = pool._size(H, 2, 2, 0, ceil_mode), pool._size(W, 2, 2, 0, ceil_mode)
        if H < 1 or W < 1:
            raise InvalidInputError(f"in_shape={tuple(in_shape)!r} is too small for 4 max-pools of 2 (needs >= 16); "
                                    "pass ceil_mode=True for small images")
    layers += [Flatten(), Linear(hidden * H * W, n_out)] if head else [Flatten()]
    return Network(layers, (C, *in_shape[1:]), loss=loss)


def resnet_block(in_planes: int, planes: int, slope: float = 0.1) -> Sequential:
    """MetaOptNet's ``BasicBlock`` (Lee et al. 2019): three 3x3 conv+BN (leaky relu between), a 1x1
    conv+BN shortcut, the sum, leaky relu, ``MaxPool2d(2)``. Convolutions have no bias.

    Parameter (and name) order: ``conv1, bn1, conv2, bn2, conv3, bn3, downsample.0, downsample.1``.
    """
    body = Sequential(
        Conv2d(in_planes, planes, 3, padding=1, bias=False), BatchNorm2d(planes), Activation("leaky_relu", slope=slope),
        Conv2d(planes, planes, 3, padding=1, bias=False), BatchNorm2d(planes), Activation("leaky_relu", slope=slope),
        Conv2d(planes, planes, 3, padding=1, bias=False), BatchNorm2d(planes),
        names=["conv1", "bn1", "relu", "conv2", "bn2", "relu", "conv3", "bn3"],
    )
    shortcut = Sequential(Conv2d(in_planes, planes, 1, bias=False), BatchNorm2d(planes), names=["0", "1"])
    return Sequential(Residual(body, shortcut, names=("", "downsample")), Activation("leaky_relu", slope=slope),
                      MaxPool2d(2), names=["", "relu", "maxpool"])


def resnet12(in_shape: Sequence[int], n_out: int, widths: Sequence[int] = (64, 160, 320, 640), *,
             avg_pool: bool = False, head: bool = True, loss: str = "ce") -> Network:
    """ResNet-12 (Lee et al. 2019, "Meta-Learning with Differentiable Convex Optimization"; MetaOptNet).

    Four :func:`resnet_block` s of the given widths (each halves H and W),
    then (``avg_pool=True``) a global average pool, ``Flatten`` and
    ``Linear(n_out)`` (dropped with ``head=False``: a feature extractor). Without DropBlock (CONVENTIONS). At 3x84x84 the features
    are ``640 x 5 x 5`` (MetaOptNet's miniImageNet setting, ``avg_pool=False``).
    """
    C, H, W = _image_shape(in_shape)
    n_out = check_positive_int("n_out", n_out) if head else 0
    widths = [check_positive_int(f"widths[{i}]", w) for i, w in enumerate(widths)]
    if len(widths) != 4:
        raise InvalidInputError(f"widths={widths!r} must have 4 entries, one per residual block")
    layers: list[Layer] = []
    names: list[str] = []
    c = C
    for i, w in enumerate(widths):
        layers.append(resnet_block(c, w))
        names.append(f"layer{i + 1}")
        c = w
        H, W = H // 2, W // 2
        if H < 1 or W < 1:
            raise InvalidInputError(f"in_shape={tuple(in_shape)!r} is too small for 4 max-pools of 2 (needs >= 16)")
    if avg_pool:
        layers.append(GlobalAvgPool2d())
        names.append("avgpool")
        H = W = 1
    layers += [Flatten(), Linear(c * H * W, n_out)] if head else [Flatten()]
    names += ["flatten", "fc"] if head else ["flatten"]
    return Network(Sequential(*layers, names=names), (C, *in_shape[1:]), loss=loss)


__all__ = ["MAX_DENSE_HESSIAN", "Network", "conv4", "resnet12", "resnet_block"]
