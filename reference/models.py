"""Reference MLPs with hand-written exact derivatives (no autodiff).

The model follows ``shared/CONVENTIONS.md``: parameters ``[W1, b1, ..., WL, bL]``
in PyTorch ``nn.Sequential(nn.Linear, act, ..., nn.Linear)`` order, ``Wl`` of
shape ``(d_l, d_{l-1})``; ``h_l = act(h_{l-1} W_l^T + b_l)`` for ``l < L`` and a
linear output layer.

Derivatives are written out by hand:

* ``grad``: backpropagation.
* ``hvp``: Pearlmutter's R-operator (Pearlmutter 1994, "Fast exact
  multiplication by the Hessian"): a forward pass of directional derivatives
  ``R{z_l}`` followed by the R-image of the backward pass. Matrix-free:
  ``O(params)`` memory, about twice the cost of a gradient.
* ``hessian``: the same R-operator vectorised over blocks of basis directions.
* ``jvp`` / ``vjp``: forward and reverse products of the output with respect to
  the parameters (and the input), for backbones that produce features.

Every routine is complex-step safe for analytic activations: no ``abs``,
no conjugation (``.T`` is a plain transpose), numerically stable branches are
chosen on the real part. ``relu`` is not analytic and refuses complex input.

Length: over 500 lines because :class:`MLP` keeps its hand-written passes
(forward, backpropagation, the R-operator, third-order products, VJP/JVP) in one
class, where they share the parameter layout and the cached forward quantities;
:class:`Quadratic` is the small test model with the same interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from reference.lowrank import LowRankRows
from reference.validation import as_float_array, check_positive_int
from reference.errors import InvalidInputError, NotAnalyticError

ACTIVATIONS: tuple[str, ...] = ("tanh", "sigmoid", "softplus", "relu", "identity")
LOSSES: tuple[str, ...] = ("mse", "ce", "bce")
ANALYTIC_ACTIVATIONS: frozenset[str] = frozenset({"tanh", "sigmoid", "softplus", "identity"})

Params = list[np.ndarray]

# Largest dense Hessian ``hessian`` will build (n x n float64 = 8 n^2 bytes; 4000 -> 128 MB).
MAX_DENSE_HESSIAN = 4000
# Directions processed together when building a dense Hessian (memory/speed trade-off).
_HESSIAN_BLOCK = 128


# ---------------------------------------------------------------------------
# Parameter-list utilities
# ---------------------------------------------------------------------------


def flatten(params: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate ``p.ravel()`` (C order) in list order, as CONVENTIONS defines."""
    if len(params) == 0:
        return np.zeros(0)
    return np.concatenate([np.asarray(p).ravel() for p in params])


def unflatten(vector: np.ndarray, like: Sequence[np.ndarray] | Sequence[tuple[int, ...]]) -> Params:
    """Inverse of :func:`flatten`: split ``vector`` into arrays shaped like ``like``.

    ``like`` is a list of arrays or of shapes. The pieces are views of ``vector``
    reshaped; a leading batch axis is not supported (use a loop).
    """
    shapes = [tuple(s) if isinstance(s, tuple) else tuple(np.shape(s)) for s in like]
    sizes = [int(np.prod(s)) for s in shapes]
    vector = np.asarray(vector)
    if vector.ndim != 1 or vector.size != sum(sizes):
        raise InvalidInputError(
            f"vector has shape {vector.shape} but the parameter layout needs a flat array of {sum(sizes)} entries"
        )
    out, start = [], 0
    for shape, size in zip(shapes, sizes):
        out.append(vector[start : start + size].reshape(shape))
        start += size
    return out


def tree_add(a: Sequence[np.ndarray], b: Sequence[np.ndarray], scale: Any = 1.0) -> Params:
    """``a + scale * b`` leaf by leaf."""
    return [x + scale * y for x, y in zip(a, b)]


def tree_vdot(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> Any:
    """``sum(a_i * b_i)`` over all leaves; no conjugation (complex-step safe)."""
    return sum(np.sum(x * y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------
# Activations and losses (value and derivatives), complex-step safe
# ---------------------------------------------------------------------------


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic function, stable on both tails; the branch is chosen on Re z."""
    z = np.asarray(z)
    out = np.empty_like(z)
    pos = np.real(z) >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


def _softplus(z: np.ndarray) -> np.ndarray:
    """``log(1 + e^z)`` without overflow: ``z + log1p(e^-z)`` for Re z > 0."""
    z = np.asarray(z)
    out = np.empty_like(z)
    pos = np.real(z) > 0
    out[pos] = z[pos] + np.log1p(np.exp(-z[pos]))
    out[~pos] = np.log1p(np.exp(z[~pos]))
    return out


def activation_derivatives(name: str, z: np.ndarray, order: int) -> list[np.ndarray]:
    """Return ``[act(z), act'(z), ..., act^(order)(z)]`` elementwise (order <= 3).

    relu's derivative at 0 is 0 (CONVENTIONS); its higher derivatives are 0.
    """
    # Orders above ``order`` are not computed (each is a pass over an activation-sized array).
    if name == "tanh":
        t = np.tanh(z)
        derivs = [t]
        if order >= 1:
            # 1 - t*t and (-2 t) d1 with their results written over the fresh temporaries (the same
            # numbers, one activation-sized allocation less each).
            d1 = t * t
            np.subtract(1.0, d1, out=d1)
            derivs.append(d1)
        if order >= 2:
            d2 = -2.0 * t
            np.multiply(d2, d1, out=d2)
            derivs.append(d2)
        if order >= 3:
            derivs.append(-2.0 * (d1 * d1 + t * d2))
    elif name == "sigmoid":
        s = _sigmoid(z)
        derivs = [s]
        if order >= 1:
            d1 = s * (1.0 - s)
            derivs.append(d1)
        if order >= 2:
            d2 = d1 * (1.0 - 2.0 * s)
            derivs.append(d2)
        if order >= 3:
            derivs.append(d2 * (1.0 - 2.0 * s) - 2.0 * d1 * d1)
    elif name == "softplus":
        s = _sigmoid(z)
        d2 = s * (1.0 - s)
        derivs = [_softplus(z), s, d2, d2 * (1.0 - 2.0 * s)]
    elif name == "relu":
        if np.iscomplexobj(z):
            raise NotAnalyticError(
                "relu is not analytic, so complex-step differentiation does not apply to it; "
                "use method='richardson' (finite differences) or an analytic activation"
            )
        pos = (z > 0).astype(z.dtype)
        derivs = [z * pos, pos]
        if order >= 2:
            zero = np.zeros_like(z)
            derivs += [zero, zero]
    elif name == "identity":
        one = np.ones_like(z)
        zero = np.zeros_like(z)
        derivs = [z, one, zero, zero]
    else:  # pragma: no cover - validated in MLP.__init__
        raise InvalidInputError(f"activation={name!r} is unknown; choose one of {ACTIVATIONS}")
    return derivs[: order + 1]


def _logsumexp(o: np.ndarray) -> np.ndarray:
    m = np.max(np.real(o), axis=-1, keepdims=True)
    return (m + np.log(np.sum(np.exp(o - m), axis=-1, keepdims=True)))[..., 0]


def _softmax(o: np.ndarray) -> np.ndarray:
    m = np.max(np.real(o), axis=-1, keepdims=True)
    e = np.exp(o - m)
    return e / np.sum(e, axis=-1, keepdims=True)


class _Loss:
    """Value and derivatives of a loss ``Phi(o)`` of the network output ``o`` (n, d).

    ``y`` is fixed at construction. ``hvp`` and ``third`` accept a leading batch
    axis on their direction arguments.
    """

    def __init__(self, name: str, o: np.ndarray, y: np.ndarray):
        self.name, self.o, self.y = name, o, y
        n, d = o.shape
        if name == "mse":
            self.scale = 1.0 / (n * d)
        elif name == "ce":
            self.scale = 1.0 / n
            self.s = _softmax(o)
            self.onehot = np.zeros((n, d))
            self.onehot[np.arange(n), y] = 1.0
        else:  # bce
            self.scale = 1.0 / (n * d)
            self.s = _sigmoid(o)

    def value(self) -> Any:
        o, y = self.o, self.y
        if self.name == "mse":
            r = o - y
            return np.sum(r * r) * self.scale
        if self.name == "ce":
            picked = o[np.arange(o.shape[0]), self.y]
            return np.sum(_logsumexp(o) - picked) * self.scale
        return np.sum(_softplus(o) - y * o) * self.scale

    def grad(self) -> np.ndarray:
        if self.name == "mse":
            return 2.0 * (self.o - self.y) * self.scale
        if self.name == "ce":
            return (self.s - self.onehot) * self.scale
        return (self.s - self.y) * self.scale

    def _softmax_hess(self, v: np.ndarray) -> np.ndarray:
        s = self.s
        return s * v - s * np.sum(s * v, axis=-1, keepdims=True)

    def hvp(self, do: np.ndarray) -> np.ndarray:
        """``Phi''(o)[do]``."""
        if self.name == "mse":
            return 2.0 * do * self.scale
        if self.name == "ce":
            return self._softmax_hess(do) * self.scale
        return self.s * (1.0 - self.s) * do * self.scale

    def third(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``grad_o (a^T Phi''(o) b)``: the third derivative contracted twice."""
        if self.name == "mse":
            return np.zeros(np.broadcast_shapes(a.shape, b.shape), dtype=np.result_type(a, b, self.o))
        if self.name == "ce":
            # Per row, with H = diag(s) - s s^T and dH[do] = diag(H do) - (H do) s^T - s (H do)^T:
            # grad (a^T H b) = H(a*b) - (s.b) H a - (s.a) H b.
            s = self.s
            sa = np.sum(s * a, axis=-1, keepdims=True)
            sb = np.sum(s * b, axis=-1, keepdims=True)
            h = self._softmax_hess
            return (h(a * b) - sb * h(a) - sa * h(b)) * self.scale
        s = self.s
        return s * (1.0 - s) * (1.0 - 2.0 * s) * a * b * self.scale


def _plus(z: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``z + b`` for a fresh product ``z``, written over ``z`` when the dtypes allow (the same numbers)."""
    if z.dtype == np.result_type(z, b):
        return np.add(z, b, out=z)
    return z + b


def _times(a: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``a * d`` for a fresh product ``a``, written over ``a`` when the shapes and dtypes allow."""
    if a.dtype == np.result_type(a, d) and a.shape == np.broadcast_shapes(a.shape, d.shape):
        return np.multiply(a, d, out=a)
    return a * d


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


class MLP:
    """A multilayer perceptron with exact hand-written derivatives.

    Args:
        sizes: layer widths ``[d0, d1, ..., dL]`` (at least two entries).
        activation: one of ``tanh``, ``sigmoid``, ``softplus``, ``relu``, ``identity``.
        loss: ``mse`` (mean over all elements of ``(f(x) - y)^2``), ``ce`` (mean
            softmax cross-entropy, integer labels) or ``bce`` (mean binary
            cross-entropy of logits).
        bias: whether each ``nn.Linear`` has a bias (parameter list then
            ``[W1, b1, ...]``, else ``[W1, W2, ...]``).

    All methods take ``params`` as a list of float64 (or complex128, for
    complex-step checks) arrays in CONVENTIONS order, ``x`` of shape ``(n, d0)``.
    """

    def __init__(self, sizes: Sequence[int], activation: str = "tanh", loss: str = "mse", bias: bool = True):
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) and not isinstance(sizes, np.ndarray):
            raise InvalidInputError(f"sizes={sizes!r} must be a sequence of layer widths like [1, 40, 40, 1]")
        sizes = list(sizes)
        if len(sizes) < 2:
            raise InvalidInputError(f"sizes={sizes!r} needs at least an input and an output width, e.g. [d, 1]")
        self.sizes = tuple(check_positive_int(f"sizes[{i}]", s) for i, s in enumerate(sizes))
        if activation not in ACTIVATIONS:
            raise InvalidInputError(f"activation={activation!r} is unknown; choose one of {ACTIVATIONS}")
        if loss not in LOSSES:
            raise InvalidInputError(f"loss={loss!r} is unknown; choose one of {LOSSES}")
        if loss == "ce" and self.sizes[-1] < 2:
            raise InvalidInputError(
                f"loss='ce' needs at least 2 outputs (classes) but sizes[-1]={self.sizes[-1]}; "
                "use loss='bce' for a single logit"
            )
        self.activation = activation
        self.loss_name = loss
        self.bias = bool(bias)
        self.n_layers = len(self.sizes) - 1
        shapes: list[tuple[int, ...]] = []
        for d_in, d_out in zip(self.sizes[:-1], self.sizes[1:]):
            shapes.append((d_out, d_in))
            if self.bias:
                shapes.append((d_out,))
        self.shapes: tuple[tuple[int, ...], ...] = tuple(shapes)
        self.n_params = int(sum(int(np.prod(s)) for s in shapes))

    # -- description ---------------------------------------------------------

    def __repr__(self) -> str:
        return (
            f"MLP(sizes={list(self.sizes)}, activation={self.activation!r}, "
            f"loss={self.loss_name!r}, bias={self.bias})"
        )

    @property
    def is_analytic(self) -> bool:
        """Whether complex-step differentiation applies (False for relu)."""
        return self.activation in ANALYTIC_ACTIVATIONS

    @property
    def head_indices(self) -> tuple[int, ...]:
        """Indices in the parameter list of the last layer ``(W_L, b_L)`` (ANIL's head)."""
        k = 2 if self.bias else 1
        n = len(self.shapes)
        return tuple(range(n - k, n))

    def init(self, seed: int = 0) -> Params:
        """PyTorch ``nn.Linear``'s default initialisation, seeded.

        ``W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (kaiming_uniform with
        ``a = sqrt(5)`` reduces to this bound).
        """
        rng = np.random.default_rng(seed)
        params = []
        for d_in, d_out in zip(self.sizes[:-1], self.sizes[1:]):
            bound = 1.0 / np.sqrt(d_in)
            params.append(rng.uniform(-bound, bound, size=(d_out, d_in)))
            if self.bias:
                params.append(rng.uniform(-bound, bound, size=(d_out,)))
        return params

    # -- validation ----------------------------------------------------------

    def check_params(self, params: Sequence[Any], name: str = "params") -> Params:
        """Validate a parameter list (count, shapes, finiteness) and return arrays."""
        if isinstance(params, np.ndarray) or not isinstance(params, Sequence):
            raise InvalidInputError(
                f"{name} must be a list of {len(self.shapes)} arrays shaped {list(self.shapes)}, "
                f"got {type(params).__name__}; use reference.models.unflatten for a flat vector"
            )
        if len(params) != len(self.shapes):
            raise InvalidInputError(
                f"{name} has {len(params)} arrays but {self!r} has {len(self.shapes)} parameter tensors "
                f"shaped {list(self.shapes)}"
            )
        out = []
        for i, (p, shape) in enumerate(zip(params, self.shapes)):
            arr = as_float_array(f"{name}[{i}]", p)
            if arr.shape != shape:
                raise InvalidInputError(f"{name}[{i}] has shape {arr.shape}, expected {shape} for {self!r}")
            out.append(arr)
        if not self.is_analytic and any(np.iscomplexobj(p) for p in out):
            raise NotAnalyticError(
                f"{name} is complex but activation={self.activation!r} is not analytic, so complex-step "
                "differentiation does not apply; use finite differences (method='richardson')"
            )
        return out

    def check_x(self, x: Any, name: str = "x") -> np.ndarray:
        arr = as_float_array(name, x)
        if arr.ndim != 2 or arr.shape[1] != self.sizes[0]:
            hint = " (reshape a 1-D input with x.reshape(-1, 1))" if arr.ndim == 1 and self.sizes[0] == 1 else ""
            raise InvalidInputError(f"{name} has shape {arr.shape}, expected (n, {self.sizes[0]}){hint}")
        if arr.shape[0] == 0:
            raise InvalidInputError(f"{name} has no rows; a loss needs at least one example")
        return arr

    def check_y(self, y: Any, n: int, name: str = "y") -> np.ndarray:
        d = self.sizes[-1]
        if self.loss_name == "ce":
            arr = np.asarray(y)
            if arr.ndim != 1 or arr.shape[0] != n:
                raise InvalidInputError(f"{name} has shape {arr.shape}; loss='ce' needs integer labels of shape ({n},)")
            if not (np.issubdtype(arr.dtype, np.integer) or (np.issubdtype(arr.dtype, np.floating)
                                                             and np.all(np.isfinite(arr))
                                                             and np.all(arr == np.round(arr)))):
                raise InvalidInputError(f"{name} must hold integer class labels for loss='ce', got dtype {arr.dtype}")
            arr = arr.astype(np.int64)
            if arr.min() < 0 or arr.max() >= d:
                raise InvalidInputError(
                    f"{name} has labels in [{arr.min()}, {arr.max()}] but the model has {d} classes; "
                    f"labels must lie in [0, {d - 1}]"
                )
            return arr
        arr = as_float_array(name, y)
        if arr.ndim == 1 and d == 1:
            arr = arr.reshape(-1, 1)
        if arr.shape != (n, d):
            raise InvalidInputError(f"{name} has shape {arr.shape}, expected ({n}, {d}) for loss={self.loss_name!r}")
        if self.loss_name == "bce" and (np.any(np.real(arr) < 0) or np.any(np.real(arr) > 1)):
            raise InvalidInputError(f"{name} must lie in [0, 1] for loss='bce' (binary targets)")
        return arr

    def _checked(self, params: Any, x: Any, y: Any = None) -> tuple[Params, np.ndarray, np.ndarray | None]:
        params = self.check_params(params)
        x = self.check_x(x)
        if not self.is_analytic and np.iscomplexobj(x):
            raise NotAnalyticError(f"x is complex but activation={self.activation!r} is not analytic")
        return params, x, (None if y is None else self.check_y(y, x.shape[0]))

    # -- internal passes (no validation: used in hot loops by the algorithms) --

    def _split(self, params: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
        if self.bias:
            return list(params[0::2]), list(params[1::2])
        return list(params), [None] * self.n_layers

    def _forward(self, params: Sequence[np.ndarray], x: np.ndarray, order: int = 1):
        """Forward pass keeping what the backward passes need.

        Returns ``(out, hs, derivs)``: ``hs[l]`` is the input of layer ``l``
        (``hs[0] = x``), ``derivs[l]`` the activation derivatives at layer
        ``l``'s pre-activation (``l < L-1``), up to ``order``.
        """
        Ws, bs = self._split(params)
        h, hs, derivs = x, [x], []
        for l in range(self.n_layers):
            z = h @ Ws[l].T
            if bs[l] is not None:
                z = _plus(z, bs[l])
            if l == self.n_layers - 1:
                return z, hs, derivs
            ds = activation_derivatives(self.activation, z, order)
            derivs.append(ds)
            h = ds[0]
            hs.append(h)
        raise AssertionError("unreachable")  # pragma: no cover

    def _backward(self, params, hs, derivs, g_out, *, wrt_input: bool = False):
        """Reverse pass: gradient of ``<g_out, out>`` w.r.t. params (and input).

        ``g_out`` may be a :class:`reference.lowrank.LowRankRows` (R2-D2's feature cotangents): the linear
        output layer's products then go through its factors; the layers below get the dense ``g``.
        """
        Ws, _ = self._split(params)
        grads: list[np.ndarray] = [None] * len(self.shapes)  # type: ignore[list-item]
        k = 2 if self.bias else 1
        g = g_out
        for l in reversed(range(self.n_layers)):
            low = isinstance(g, LowRankRows)
            grads[k * l] = g.t_matmul(hs[l]) if low else np.swapaxes(g, -1, -2) @ hs[l]
            if self.bias:
                grads[k * l + 1] = g.row_sum() if low else np.sum(g, axis=-2)
            if l > 0 or wrt_input:
                gh = g.matmul(Ws[l]) if low else g @ Ws[l]
                g = _times(gh, derivs[l - 1][1]) if l > 0 else gh
        return (grads, g) if wrt_input else grads

    def _r_forward(self, params, hs, derivs, v):
        """Directional derivatives ``R{z_l}`` of the pre-activations along ``v``.

        ``v`` may carry a leading batch axis (for Hessian blocks). Returns
        ``(r_out, r_hs)`` with ``r_hs[l] = R{h_l}`` (``r_hs[0] = 0``).
        """
        Ws, _ = self._split(params)
        Us, cs = self._split(v)
        r_h = None
        r_hs = [None]
        for l in range(self.n_layers):
            r_z = hs[l] @ np.swapaxes(Us[l], -1, -2)
            if cs[l] is not None:
                r_z = r_z + cs[l][..., None, :]
            if r_h is not None:
                r_z = r_z + r_h @ Ws[l].T
            if l == self.n_layers - 1:
                return r_z, r_hs
            r_h = derivs[l][1] * r_z
            r_hs.append((r_h, r_z))
        raise AssertionError("unreachable")  # pragma: no cover

    def _hvp(self, params, x, y, v) -> Params:
        return self._hvp_at(self._hvp_point(params, x, y), v)

    def _hvp_point(self, params, x, y):
        """The forward pass an ``H v`` at ``params`` needs, reusable for every ``v`` (see :meth:`_hvp_at`)."""
        out, hs, derivs = self._forward(params, x, order=2)
        loss = _Loss(self.loss_name, out, y)
        # The backward pass at the point does not depend on v: its deltas g_l and products g_l W_l are
        # computed once here, not once per product (iMAML's CG takes hundreds of products per point).
        Ws, _ = self._split(params)
        gs: list[np.ndarray] = [None] * self.n_layers  # type: ignore[list-item]
        ghs: list[np.ndarray | None] = [None] * self.n_layers
        g = loss.grad()
        for l in reversed(range(self.n_layers)):
            gs[l] = g
            if l > 0:
                ghs[l] = g @ Ws[l]
                g = ghs[l] * derivs[l - 1][1]
        return params, hs, derivs, loss, gs, ghs

    def _hvp_at(self, point, v) -> Params:
        """``H v`` from a :meth:`_hvp_point`: the R-forward and R-backward passes only (no validation)."""
        params, hs, derivs, loss, gs, ghs = point
        r_out, r_hs = self._r_forward(params, hs, derivs, v)
        Ws, _ = self._split(params)
        Us, _ = self._split(v)
        k = 2 if self.bias else 1
        r_g = loss.hvp(r_out)
        hv: list[np.ndarray] = [None] * len(self.shapes)  # type: ignore[list-item]
        for l in reversed(range(self.n_layers)):
            g = gs[l]
            # W-gradient is g^T h_l; its R-image is R{g}^T h_l + g^T R{h_l}.
            term = np.swapaxes(r_g, -1, -2) @ hs[l]
            if l > 0:
                term = term + g.T @ r_hs[l][0]
            hv[k * l] = term
            if self.bias:
                hv[k * l + 1] = np.sum(r_g, axis=-2)
            if l > 0:
                d1, d2 = derivs[l - 1][1], derivs[l - 1][2]
                r_gh = r_g @ Ws[l] + g @ Us[l]
                r_g = r_gh * d1 + ghs[l] * d2 * r_hs[l][1]
        return hv

    def _hvp_flat_point(self, params, x, y):
        """:meth:`_hvp_point` plus the transposed weights (contiguous), for :meth:`_hvp_flat`."""
        Ws, _ = self._split(params)
        return (*self._hvp_point(params, x, y), [None] + [np.ascontiguousarray(W.T) for W in Ws[1:]])

    def _hvp_flat(self, point, v: np.ndarray) -> np.ndarray:
        """``flatten(_hvp_at(point, unflatten(v)))`` for a flat ``v`` at a :meth:`_hvp_flat_point`, written
        straight into one flat array.

        The same R-forward/R-backward passes as :meth:`_hvp_at` (Pearlmutter 1994), for the loops
        that take hundreds of products at one point on flat vectors (iMAML's CG and trust region).
        The weight block of layer ``l``, ``R{g}^T h_l + g^T R{h_l}``, is formed by one BLAS GEMM
        over the two terms' stacked rows, written into its slice of the output, instead of two
        weight-sized temporaries, their sum and the final concatenation: for few
        rows against wide layers those passes over weight-sized memory cost more than the products'
        arithmetic. Equal to the flattened :meth:`_hvp_at` up to round-off (the GEMM kernels may sum
        in another order).
        """
        params, hs, derivs, loss, gs, ghs, Wts = point
        bounds = self._bounds()
        views = [v[bounds[i]:bounds[i + 1]].reshape(s) for i, s in enumerate(self.shapes)]
        Ws, _ = self._split(params)
        Us, cs = self._split(views)
        # R-forward (as _r_forward), with W_l^T stored contiguously at the point: BLAS's product of
        # few rows by a transposed operand is ~1.7x slower than by a contiguous one.
        r_h = None
        r_hs: list[Any] = [None]
        for l in range(self.n_layers):
            r_z = hs[l] @ Us[l].T
            if cs[l] is not None:
                r_z = r_z + cs[l]
            if r_h is not None:
                r_z = r_z + r_h @ Wts[l]
            if l == self.n_layers - 1:
                break
            r_h = derivs[l][1] * r_z
            r_hs.append((r_h, r_z))
        r_out = r_z
        k = 2 if self.bias else 1
        r_g = loss.hvp(r_out)
        dtype = np.result_type(v, r_g, *hs, *gs)
        out = np.empty(self.n_params, dtype=dtype)
        for l in reversed(range(self.n_layers)):
            g = gs[l]
            block = out[bounds[k * l]:bounds[k * l + 1]].reshape(self.shapes[k * l])
            # block = R{g}^T h_l + g^T R{h_l} = [R{g}; g]^T [h_l; R{h_l}]: one GEMM over the stacked rows
            # (2m rows: small copies), written by BLAS straight into the block. np.matmul releases the GIL
            # inside BLAS (scipy's f2py gemm wrapper, used here before, holds it), so the tasks of iMAML's
            # pool overlap their products.
            if l > 0:
                a = np.concatenate((r_g, g), axis=-2).astype(dtype, copy=False)
                b = np.concatenate((hs[l], r_hs[l][0]), axis=-2).astype(dtype, copy=False)
            else:
                a, b = r_g.astype(dtype, copy=False), hs[l].astype(dtype, copy=False)
            np.matmul(a.T, b, out=block)
            if self.bias:
                np.sum(r_g, axis=-2, out=out[bounds[k * l + 1]:bounds[k * l + 2]])
            if l > 0:
                d1, d2 = derivs[l - 1][1], derivs[l - 1][2]
                r_gh = r_g @ Ws[l] + g @ Us[l]
                r_g = r_gh * d1 + ghs[l] * d2 * r_hs[l][1]
        return out

    def _bounds(self) -> list[int]:
        """Offsets of the parameter tensors in the flat vector (CONVENTIONS' order)."""
        b = getattr(self, "_flat_bounds", None)
        if b is None:
            b = np.cumsum([0] + [int(np.prod(s)) for s in self.shapes]).tolist()
            self._flat_bounds = b
        return b

    # -- public API ----------------------------------------------------------

    def forward(self, params: Sequence[Any], x: Any) -> np.ndarray:
        """Network output ``f(x)`` of shape ``(n, d_L)`` (logits for ce/bce)."""
        params, x, _ = self._checked(params, x)
        return self._forward(params, x, order=0)[0]

    def loss(self, params: Sequence[Any], x: Any, y: Any) -> Any:
        """The loss (a Python/NumPy scalar; complex for complex parameters)."""
        params, x, y = self._checked(params, x, y)
        out = self._forward(params, x, order=0)[0]
        return _Loss(self.loss_name, out, y).value()[()]

    def loss_and_grad(self, params: Sequence[Any], x: Any, y: Any) -> tuple[Any, Params]:
        """Loss and its gradient by backpropagation."""
        params, x, y = self._checked(params, x, y)
        return self._loss_and_grad(params, x, y)

    def _loss_and_grad(self, params, x, y):
        out, hs, derivs = self._forward(params, x, order=1)
        loss = _Loss(self.loss_name, out, y)
        return loss.value()[()], self._backward(params, hs, derivs, loss.grad())

    def loss_and_grad_unchecked(self, params: Sequence[Any], x: np.ndarray, y: np.ndarray) -> tuple[Any, Params]:
        """:meth:`loss_and_grad` without the argument checks: the fast path of inner loops.

        For inputs already validated (:meth:`check_params`, :meth:`check_x`,
        :meth:`check_y`): the same values, without the checks' conversions.
        """
        return self._loss_and_grad(params, x, y)

    def hvp_unchecked(self, params: Sequence[Any], x: np.ndarray, y: np.ndarray, v: Sequence[Any]) -> Params:
        """:meth:`hvp` (Pearlmutter's R-operator, exact) without the argument checks, for validated inputs."""
        return self._hvp(params, x, y, v)

    def grad(self, params: Sequence[Any], x: Any, y: Any) -> Params:
        """Gradient of the loss w.r.t. every parameter tensor (backpropagation)."""
        return self.loss_and_grad(params, x, y)[1]

    def hvp(self, params: Sequence[Any], x: Any, y: Any, v: Sequence[Any]) -> Params:
        """Exact Hessian-vector product ``H(params) v`` by Pearlmutter's R-operator.

        Never forms the Hessian: one forward pass, one R-forward pass, one
        backward pass and its R-image.
        """
        params, x, y = self._checked(params, x, y)
        v = self.check_params(v, name="v")
        return self._hvp(params, x, y, v)

    def hessian(self, params: Sequence[Any], x: Any, y: Any) -> np.ndarray:
        """Dense ``(n_params, n_params)`` Hessian in CONVENTIONS flat order.

        Built by the R-operator on blocks of basis directions; refuses models
        with more than ``MAX_DENSE_HESSIAN`` parameters (use :meth:`hvp`).
        """
        params, x, y = self._checked(params, x, y)
        n = self.n_params
        if n > MAX_DENSE_HESSIAN:
            raise InvalidInputError(
                f"{self!r} has {n} parameters; a dense Hessian is limited to {MAX_DENSE_HESSIAN} "
                f"({8 * MAX_DENSE_HESSIAN**2 / 1e6:.0f} MB). Use hvp() for matrix-free products"
            )
        dtype = np.result_type(*params, x)
        H = np.empty((n, n), dtype=dtype)
        for start in range(0, n, _HESSIAN_BLOCK):
            stop = min(start + _HESSIAN_BLOCK, n)
            m = stop - start
            basis = np.zeros((m, n))
            basis[np.arange(m), np.arange(start, stop)] = 1.0
            offsets = np.cumsum([0] + [int(np.prod(s)) for s in self.shapes])
            v = [basis[:, a:b].reshape((m, *shape)) for a, b, shape in zip(offsets[:-1], offsets[1:], self.shapes)]
            cols = self._hvp(params, x, y, v)
            H[:, start:stop] = np.concatenate([c.reshape(stop - start, -1) for c in cols], axis=1).T
        return H

    def _third(self, params, x, y, u, w) -> Params:
        """``grad_params (u^T H(params) w)``, the third derivative contracted twice (no validation).

        Computed by running backpropagation in hyper-dual arithmetic
        (Fike & Alonso 2011): with parameters ``p + e1 u + e2 w`` (``e1^2 =
        e2^2 = 0``, ``e1 e2 != 0``) the ``e1 e2`` part of the gradient is exactly
        ``D^3 L[u, w, .]``. No truncation error; needs activation derivatives up
        to order 3 and the loss's third derivative. Complex-step safe.
        """
        # A hyper-dual array is a 4-tuple (a, b, c, d) meaning a + b e1 + c e2 + d e1e2.
        def mul(X, Y, op):
            a1, b1, c1, d1 = X
            a2, b2, c2, d2 = Y
            return (op(a1, a2), op(a1, b2) + op(b1, a2), op(a1, c2) + op(c1, a2),
                    op(a1, d2) + op(b1, c2) + op(c1, b2) + op(d1, a2))

        def matmul(a, b):
            return a @ b

        def times(a, b):
            return a * b

        def zero(a):
            return np.zeros_like(a)

        Ws, bs = self._split(params)
        Us, cus = self._split(u)
        Vs, cvs = self._split(w)
        h = (x, zero(x), zero(x), zero(x))
        hs, slopes = [h], []
        for l in range(self.n_layers):
            W = (Ws[l], Us[l], Vs[l], zero(Ws[l]))
            z = mul(h, tuple(m.T for m in W), matmul)
            if bs[l] is not None:
                z = (z[0] + bs[l], z[1] + cus[l], z[2] + cvs[l], z[3])
            if l == self.n_layers - 1:
                break
            a, b, c, d = z
            s0, s1, s2, s3 = activation_derivatives(self.activation, a, 3)
            # act(z) and act'(z) as hyper-dual functions of the hyper-dual z.
            h = (s0, s1 * b, s1 * c, s1 * d + s2 * b * c)
            slopes.append((s1, s2 * b, s2 * c, s2 * d + s3 * b * c))
            hs.append(h)
        a, b, c, d = z
        loss = _Loss(self.loss_name, a, y)
        # Phi'(o) as a hyper-dual function of o: Phi''[.] and Phi'''[., .] give the parts.
        g = (loss.grad(), loss.hvp(b), loss.hvp(c), loss.hvp(d) + loss.third(b, c))
        k = 2 if self.bias else 1
        out: list[np.ndarray] = [None] * len(self.shapes)  # type: ignore[list-item]
        for l in reversed(range(self.n_layers)):
            out[k * l] = mul(tuple(m.T for m in g), hs[l], matmul)[3]
            if self.bias:
                out[k * l + 1] = np.sum(g[3], axis=0)
            if l > 0:
                W = (Ws[l], Us[l], Vs[l], zero(Ws[l]))
                g = mul(mul(g, W, matmul), slopes[l - 1], times)
        return out

    def third_order(self, params: Sequence[Any], x: Any, y: Any, u: Sequence[Any], w: Sequence[Any]) -> Params:
        """Gradient w.r.t. ``params`` of ``u^T H(params) w`` (a contracted third derivative).

        ``D^3 L(params)[u, w, .]``, symmetric in ``u`` and ``w``; Newton-MAML's
        meta-gradient needs it. Computed exactly by backpropagation in
        hyper-dual arithmetic (see :meth:`_third`); complex-step safe.
        """
        params, x, y = self._checked(params, x, y)
        u = self.check_params(u, name="u")
        w = self.check_params(w, name="w")
        return self._third(params, x, y, u, w)

    def jvp(self, params: Sequence[Any], x: Any, v: Sequence[Any]) -> np.ndarray:
        """Forward-mode product ``d f(x; params)[v]``, shape ``(n, d_L)``."""
        params, x, _ = self._checked(params, x)
        v = self.check_params(v, name="v")
        _, hs, derivs = self._forward(params, x, order=1)
        return self._r_forward(params, hs, derivs, v)[0]

    def vjp(
        self, params: Sequence[Any], x: Any, cotangent: Any, *, wrt_input: bool = False
    ) -> Params | tuple[Params, np.ndarray]:
        """Reverse-mode product: gradient of ``sum(cotangent * f(x; params))``.

        Returns the list of parameter gradients, and with ``wrt_input=True``
        also the gradient w.r.t. ``x`` (shape ``(n, d0)``).
        """
        params, x, _ = self._checked(params, x)
        out, hs, derivs = self._forward(params, x, order=1)
        cot = as_float_array("cotangent", cotangent)
        if cot.shape != out.shape:
            raise InvalidInputError(f"cotangent has shape {cot.shape}, expected the output shape {out.shape}")
        return self._backward(params, hs, derivs, cot, wrt_input=wrt_input)


__all__ = [
    "ACTIVATIONS",
    "LOSSES",
    "MAX_DENSE_HESSIAN",
    "MLP",
    "Params",
    "activation_derivatives",
    "flatten",
    "tree_add",
    "tree_vdot",
    "unflatten",
]


class Quadratic:
    """A quadratic "model" for toy problems with closed forms (``reference.symbolic``).

    The parameters are one vector ``[theta]`` of shape ``(dim,)``; a task's
    ``x`` is a symmetric matrix ``A`` (dim, dim) and ``y`` a centre ``c`` (dim,),
    and the loss is ``L(theta) = 1/2 (theta - c)^T A (theta - c)``, so
    ``grad = A (theta - c)`` and the Hessian is ``A`` (third derivatives vanish).
    It exposes the same interface as :class:`MLP` where it makes sense, so the
    algorithm references run on it unchanged.
    """

    activation = "identity"
    loss_name = "quadratic"
    bias = False
    is_analytic = True

    def __init__(self, dim: int):
        self.dim = check_positive_int("dim", dim)
        self.sizes = (self.dim,)
        self.shapes: tuple[tuple[int, ...], ...] = ((self.dim,),)
        self.n_params = self.dim
        self.head_indices = (0,)

    def __repr__(self) -> str:
        return f"Quadratic(dim={self.dim})"

    def init(self, seed: int = 0) -> Params:
        return [np.random.default_rng(seed).normal(size=self.dim)]

    def check_params(self, params: Sequence[Any], name: str = "params") -> Params:
        if isinstance(params, np.ndarray) or not isinstance(params, Sequence) or len(params) != 1:
            raise InvalidInputError(f"{name} must be a list holding one vector of shape ({self.dim},)")
        arr = as_float_array(f"{name}[0]", params[0])
        if arr.shape != (self.dim,):
            raise InvalidInputError(f"{name}[0] has shape {arr.shape}, expected ({self.dim},)")
        return [arr]

    def check_x(self, x: Any, name: str = "x") -> np.ndarray:
        arr = as_float_array(name, x)
        if arr.shape != (self.dim, self.dim):
            raise InvalidInputError(f"{name} (the matrix A) has shape {arr.shape}, expected ({self.dim}, {self.dim})")
        if not np.allclose(arr, arr.T, rtol=0, atol=1e-12 * max(1.0, float(np.max(np.abs(arr))))):
            raise InvalidInputError(f"{name} (the matrix A) must be symmetric")
        return arr

    def check_y(self, y: Any, n: int, name: str = "y") -> np.ndarray:
        arr = as_float_array(name, y)
        if arr.shape != (self.dim,):
            raise InvalidInputError(f"{name} (the centre c) has shape {arr.shape}, expected ({self.dim},)")
        return arr

    def _loss_and_grad(self, params, A, c):
        r = params[0] - c
        Ar = A @ r
        return 0.5 * (r @ Ar), [Ar]

    def _hvp(self, params, A, c, v):
        return [v[0] @ A.T if np.ndim(v[0]) > 1 else A @ v[0]]

    def loss(self, params, A, c):
        params, A, c = self.check_params(params), self.check_x(A), self.check_y(c, 0)
        return self._loss_and_grad(params, A, c)[0]

    def loss_and_grad(self, params, A, c):
        params, A, c = self.check_params(params), self.check_x(A), self.check_y(c, 0)
        return self._loss_and_grad(params, A, c)

    def grad(self, params, A, c):
        return self.loss_and_grad(params, A, c)[1]

    def hvp(self, params, A, c, v):
        params, A, c = self.check_params(params), self.check_x(A), self.check_y(c, 0)
        return self._hvp(params, A, c, self.check_params(v, "v"))

    def _third(self, params, A, c, u, w):
        # The Hessian A does not depend on theta: every third derivative vanishes.
        return [np.zeros(self.dim, dtype=np.result_type(params[0], A, c, u[0], w[0]))]

    def third_order(self, params, A, c, u, w):
        """Gradient w.r.t. ``params`` of ``u^T H w``: identically zero for a quadratic."""
        params, A, c = self.check_params(params), self.check_x(A), self.check_y(c, 0)
        return self._third(params, A, c, self.check_params(u, "u"), self.check_params(w, "w"))

    def hessian(self, params, A, c):
        self.check_params(params)
        return self.check_x(A).copy()


__all__ += ["Quadratic"]
