"""Linear: ``y = x W^T + b`` (PyTorch's ``nn.Linear``).

The four passes and their conventions are described in :mod:`reference.nets.layers`.
"""

from __future__ import annotations

import numpy as np

from reference.errors import InvalidInputError
from reference.nets.layers._base import _check_int, Layer
from reference.nets.layers.pool import Flatten


class Linear(Layer):
    """``y = x W^T + b`` (``nn.Linear``), ``W`` of shape ``(out, in)``; input ``(N, in)``."""

    kind = "linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features = _check_int("in_features", in_features)
        self.out_features = _check_int("out_features", out_features)
        self.bias = bool(bias)
        self.param_names = ("weight", "bias") if self.bias else ("weight",)
        shapes: list[tuple[int, ...]] = [(self.out_features, self.in_features)]
        if self.bias:
            shapes.append((self.out_features,))
        self.param_shapes = tuple(shapes)

    def __repr__(self) -> str:
        return f"Linear({self.in_features}, {self.out_features}, bias={self.bias})"

    def out_shape(self, in_shape):
        if tuple(in_shape) != (self.in_features,):
            raise InvalidInputError(
                f"{self!r} expects inputs of shape ({self.in_features},) per example but gets {tuple(in_shape)}; "
                "insert a Flatten or fix in_features"
            )
        return (self.out_features,)

    def init(self, rng):
        # nn.Linear.reset_parameters: kaiming_uniform(a=sqrt(5)) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in)); bias alike.
        bound = 1.0 / np.sqrt(self.in_features)
        out = [rng.uniform(-bound, bound, size=self.param_shapes[0])]
        if self.bias:
            out.append(rng.uniform(-bound, bound, size=self.param_shapes[1]))
        return out

    def fwd(self, P, x):
        y = x @ P[0].T
        if self.bias:
            y = y + P[1]
        return y, x

    def bwd(self, P, x, gy, need_gx=True):
        gP = [gy.T @ x]
        if self.bias:
            gP.append(gy.sum(axis=0))
        return gP, (gy @ P[0] if need_gx else None)

    def jvp(self, P, x, dP, dx):
        dy = x @ dP[0].T
        if self.bias:
            dy = dy + dP[1]
        if dx is not None:
            dy = dy + dx @ P[0].T
        return dy, None

    def rbwd(self, P, x, rcache, gy, rgy, dP, dx, need_gx=True):
        gP, gx = self.bwd(P, x, gy, need_gx)
        rgW = rgy.T @ x
        if dx is not None:
            rgW = rgW + gy.T @ dx
        rgP = [rgW]
        if self.bias:
            rgP.append(rgy.sum(axis=0))
        rgx = (rgy @ P[0] + gy @ dP[0]) if need_gx else None
        return gP, gx, rgP, rgx
