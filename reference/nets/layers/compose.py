"""Composition: Sequential and the residual block.

The four passes and their conventions are described in :mod:`reference.nets.layers`.
"""

from __future__ import annotations

from collections.abc import Sequence

from reference.errors import InvalidInputError
from reference.nets.layers._base import _add, Arr, Layer
from reference.nets.layers.activation import Activation
from reference.nets.layers.conv import Conv2d
from reference.nets.layers.linear import Linear
from reference.nets.layers.norm import BatchNorm, BatchNorm1d, BatchNorm2d
from reference.nets.layers.pool import AvgPool2d, Flatten, GlobalAvgPool2d, Identity, MaxPool2d


class Sequential(Layer):
    """Layers applied in order; parameters in order of the layers (``nn.Sequential``)."""

    kind = "sequential"

    def __init__(self, *layers: Layer, names: Sequence[str] | None = None):
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise InvalidInputError(f"layers[{i}]={layer!r} is not a reference.nets layer")
        self.layers = list(layers)
        self.names = [str(i) for i in range(len(layers))] if names is None else [str(n) for n in names]
        if len(self.names) != len(self.layers):
            raise InvalidInputError(f"names has {len(self.names)} entries for {len(self.layers)} layers")
        self.param_shapes = tuple(s for layer in self.layers for s in layer.param_shapes)
        self._counts = [len(layer.param_shapes) for layer in self.layers]
        self.analytic = all(layer.analytic for layer in self.layers)

    def __repr__(self) -> str:
        return "Sequential(" + ", ".join(repr(layer) for layer in self.layers) + ")"

    def sublayers(self):
        return list(zip(self.names, self.layers))

    def out_shape(self, in_shape):
        for name, layer in zip(self.names, self.layers):
            try:
                in_shape = layer.out_shape(in_shape)
            except InvalidInputError as exc:
                raise InvalidInputError(f"{name}: {exc}") from None
        return in_shape

    def init(self, rng):
        return [p for layer in self.layers for p in layer.init(rng)]

    def _split(self, P):
        out, k = [], 0
        for c in self._counts:
            out.append(P[k : k + c])
            k += c
        return out

    def fwd(self, P, x):
        caches = []
        for layer, p in zip(self.layers, self._split(P)):
            x, c = layer.fwd(p, x)
            caches.append(c)
        return x, caches

    def bwd(self, P, caches, gy, need_gx=True):
        parts = self._split(P)
        grads: list[list[Arr]] = [None] * len(self.layers)  # type: ignore[list-item]
        g = gy
        for i in reversed(range(len(self.layers))):
            grads[i], g = self.layers[i].bwd(parts[i], caches[i], g, need_gx or i > 0)
        return [a for gs in grads for a in gs], g

    def jvp(self, P, caches, dP, dx):
        rcaches = []
        for layer, p, dp, c in zip(self.layers, self._split(P), self._split(dP), caches):
            dx_in = dx
            dx, rc = layer.jvp(p, c, dp, dx)
            rcaches.append((dx_in, rc))
        return dx, rcaches

    def rbwd(self, P, caches, rcaches, gy, rgy, dP, dx, need_gx=True):
        parts, dparts = self._split(P), self._split(dP)
        grads: list[list[Arr]] = [None] * len(self.layers)  # type: ignore[list-item]
        rgrads: list[list[Arr]] = [None] * len(self.layers)  # type: ignore[list-item]
        g, rg = gy, rgy
        for i in reversed(range(len(self.layers))):
            dx_in, rc = rcaches[i]
            grads[i], g, rgrads[i], rg = self.layers[i].rbwd(parts[i], caches[i], rc, g, rg, dparts[i], dx_in,
                                                             need_gx or i > 0)
        return [a for gs in grads for a in gs], g, [a for gs in rgrads for a in gs], rg


class Residual(Layer):
    """``y = body(x) + shortcut(x)`` (``shortcut=None``: the identity), a ResNet block's sum.

    Parameters: the body's, then the shortcut's (a ``BasicBlock`` registering
    ``downsample`` after its convolutions has this ``.parameters()`` order).
    """

    kind = "residual"

    def __init__(self, body: Layer, shortcut: Layer | None = None, names: tuple[str, str] = ("body", "shortcut")):
        super().__init__()
        self.body = body
        self.shortcut = shortcut if shortcut is not None else Identity()
        self.names = names
        self.param_shapes = tuple(body.param_shapes) + tuple(self.shortcut.param_shapes)
        self._nb = len(body.param_shapes)
        self.analytic = body.analytic and self.shortcut.analytic

    def __repr__(self) -> str:
        return f"Residual(body={self.body!r}, shortcut={self.shortcut!r})"

    def sublayers(self):
        return [(self.names[0], self.body), (self.names[1], self.shortcut)]

    def out_shape(self, in_shape):
        a = self.body.out_shape(in_shape)
        b = self.shortcut.out_shape(in_shape)
        if tuple(a) != tuple(b):
            raise InvalidInputError(f"residual branches disagree: body gives {tuple(a)}, shortcut gives {tuple(b)}; "
                                    "add a downsampling shortcut (1x1 conv + batch norm)")
        return a

    def init(self, rng):
        return self.body.init(rng) + self.shortcut.init(rng)

    def fwd(self, P, x):
        a, ca = self.body.fwd(P[: self._nb], x)
        b, cb = self.shortcut.fwd(P[self._nb :], x)
        return a + b, (ca, cb)

    def bwd(self, P, cache, gy, need_gx=True):
        ga, gxa = self.body.bwd(P[: self._nb], cache[0], gy, need_gx)
        gb, gxb = self.shortcut.bwd(P[self._nb :], cache[1], gy, need_gx)
        return ga + gb, _add(gxa, gxb) if need_gx else None

    def jvp(self, P, cache, dP, dx):
        da, ra = self.body.jvp(P[: self._nb], cache[0], dP[: self._nb], dx)
        db, rb = self.shortcut.jvp(P[self._nb :], cache[1], dP[self._nb :], dx)
        return _add(da, db), (ra, rb)

    def rbwd(self, P, cache, rcache, gy, rgy, dP, dx, need_gx=True):
        ga, gxa, rga, rgxa = self.body.rbwd(P[: self._nb], cache[0], rcache[0], gy, rgy, dP[: self._nb], dx, need_gx)
        gb, gxb, rgb, rgxb = self.shortcut.rbwd(P[self._nb :], cache[1], rcache[1], gy, rgy, dP[self._nb :], dx,
                                                need_gx)
        if not need_gx:
            return ga + gb, None, rga + rgb, None
        return ga + gb, _add(gxa, gxb), rga + rgb, _add(rgxa, rgxb)
