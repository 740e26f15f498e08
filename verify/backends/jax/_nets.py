"""JAX twins of ``reference.nets`` networks (Conv4, ResNet-12, layer lists), written as JAX code is.

A :class:`reference.nets.Network` is reduced to a hashable description (the
layer tree with its hyper-parameters, batch-norm modes and running statistics,
the public parameter order), from which a pure ``apply(params, x)`` is built
with ``jax.lax.conv_general_dilated`` (NCHW, OIHW: cross-correlation as
PyTorch), ``jax.lax.reduce_window`` pooling, batch norm with batch statistics
(train mode, differentiated through) or the running statistics as constants
(eval mode). Derivatives are JAX's autodiff, independent of the reference's
hand-written R-operators.

Kinks follow PyTorch: relu'(0) = 0 (``jax.nn.relu``), leaky_relu'(0) = slope
(``jnp.where(x > 0, ...)``; ``jax.nn.leaky_relu`` would give 1), elu's
``x <= 0`` piece at 0, softplus linear above ``threshold``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from reference.nets import layers as L
from reference.nets.network import Network


def _desc(layer: L.Layer) -> tuple:
    if isinstance(layer, L.Sequential):
        return ("seq", tuple(_desc(sub) for sub in layer.layers))
    if isinstance(layer, L.Residual):
        return ("res", _desc(layer.body), _desc(layer.shortcut))
    if isinstance(layer, L.Linear):
        return ("linear", layer.bias)
    if isinstance(layer, L.Conv2d):
        return ("conv", layer.stride, layer.padding, layer.bias)
    if isinstance(layer, L.BatchNorm):
        stats = None if layer.uses_batch_stats else (tuple(map(float, layer.running_mean)),
                                                    tuple(map(float, layer.running_var)))
        return ("bn", layer.eps, layer.affine, stats)
    if isinstance(layer, L.Activation):
        return ("act", layer.name, layer.slope, layer.alpha, layer.beta, layer.threshold)
    if isinstance(layer, L.MaxPool2d):
        return ("maxpool", layer.kernel_size, layer.stride, layer.padding, layer.ceil_mode)
    if isinstance(layer, L.AvgPool2d):
        return ("avgpool", layer.kernel_size, layer.stride, layer.padding)
    if isinstance(layer, L.GlobalAvgPool2d):
        return ("gap",)
    if isinstance(layer, L.Flatten):
        return ("flatten",)
    if isinstance(layer, L.Identity):
        return ("identity",)
    raise TypeError(f"no JAX twin for {layer!r}")  # pragma: no cover - every layer is covered


def network_key(net: Network) -> tuple:
    """``("network", description, loss_name, head_indices, param_order, joint)``: hashable, cacheable."""
    return ("network", _desc(net.body), net.loss_name, tuple(net.head_indices), tuple(net._order), bool(net.joint))


def _count(d: tuple) -> int:
    kind = d[0]
    if kind == "seq":
        return sum(_count(c) for c in d[1])
    if kind == "res":
        return _count(d[1]) + _count(d[2])
    if kind in ("linear", "conv"):
        return 2 if d[-1] else 1
    if kind == "bn":
        return 2 if d[2] else 0
    return 0


def _act(d: tuple, x: jax.Array) -> jax.Array:
    _, name, slope, alpha, beta, threshold = d
    if name == "relu":
        return jax.nn.relu(x)
    if name == "leaky_relu":
        return jnp.where(x > 0, x, slope * x)
    if name == "elu":
        return jnp.where(x > 0, x, alpha * jnp.expm1(jnp.minimum(x, 0.0)))
    if name == "tanh":
        return jnp.tanh(x)
    if name == "sigmoid":
        return jax.nn.sigmoid(x)
    if name == "softplus":
        bx = beta * x
        return jnp.where(bx > threshold, x, jax.nn.softplus(jnp.where(bx > threshold, 0.0, bx)) / beta)
    return x


def _pool_pads(d: tuple, x: jax.Array) -> tuple[tuple[int, int], ...]:
    (kh, kw), (sh, sw), (ph, pw) = d[1], d[2], d[3]
    ceil = len(d) > 4 and d[4]
    pads = []
    for n, k, s, p in ((x.shape[2], kh, sh, ph), (x.shape[3], kw, sw, pw)):
        out = L._Pool2d._size(n, k, s, p, ceil)
        extra = max(0, (out - 1) * s + k - n - 2 * p)
        pads.append((p, p + extra))
    return ((0, 0), (0, 0), *pads)


def _apply(d: tuple, P: Sequence[jax.Array], x: jax.Array) -> jax.Array:
    kind = d[0]
    if kind == "seq":
        k = 0
        for c in d[1]:
            n = _count(c)
            x = _apply(c, P[k : k + n], x)
            k += n
        return x
    if kind == "res":
        nb = _count(d[1])
        return _apply(d[1], P[:nb], x) + _apply(d[2], P[nb:], x)
    if kind == "linear":
        y = x @ P[0].T
        return y + P[1] if d[1] else y
    if kind == "conv":
        (sh, sw), (ph, pw) = d[1], d[2]
        y = lax.conv_general_dilated(x, P[0], (sh, sw), ((ph, ph), (pw, pw)),
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))
        return y + P[1][None, :, None, None] if d[3] else y
    if kind == "bn":
        _, eps, affine, stats = d
        axes = (0,) if x.ndim == 2 else (0, 2, 3)
        shape = (1, -1) if x.ndim == 2 else (1, -1, 1, 1)
        if stats is None:
            mean = jnp.mean(x, axis=axes, keepdims=True)
            var = jnp.mean((x - mean) ** 2, axis=axes, keepdims=True)
        else:
            mean = jnp.asarray(stats[0], dtype=x.dtype).reshape(shape)
            var = jnp.asarray(stats[1], dtype=x.dtype).reshape(shape)
        y = (x - mean) / jnp.sqrt(var + eps)
        return y * P[0].reshape(shape) + P[1].reshape(shape) if affine else y
    if kind == "act":
        return _act(d, x)
    if kind == "maxpool":
        (kh, kw), (sh, sw) = d[1], d[2]
        return lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, kh, kw), (1, 1, sh, sw), _pool_pads(d, x))
    if kind == "avgpool":
        (kh, kw), (sh, sw) = d[1], d[2]
        s = lax.reduce_window(x, 0.0, lax.add, (1, 1, kh, kw), (1, 1, sh, sw), _pool_pads(d, x))
        return s / (kh * kw)
    if kind == "gap":
        return jnp.mean(x, axis=(2, 3), keepdims=True)
    if kind == "flatten":
        return x.reshape(x.shape[0], -1)
    return x


def apply_from_network_key(key: tuple):
    """``apply(params, x)`` (params in the network's public order, x NCHW) for a :func:`network_key`."""
    _, desc, _, _, order, joint = key
    inverse = [0] * len(order)
    for i, j in enumerate(order):
        inverse[j] = i

    def apply(params: Sequence[jax.Array], x: jax.Array) -> jax.Array:
        tree = [params[inverse[j]] for j in range(len(order))]
        return _apply(desc, tree, x)

    apply.joint = joint  # type: ignore[attr-defined]  # read by the feature algorithms
    return apply


__all__ = ["apply_from_network_key", "network_key"]
