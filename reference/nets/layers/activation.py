"""Elementwise activations, branches on the real part (PyTorch's kink conventions).

The four passes and their conventions are described in :mod:`reference.nets.layers`.
"""

from __future__ import annotations

import numpy as np

from reference.errors import InvalidInputError
from reference.models import activation_derivatives
from reference.nets.layers._base import _real_positive, Arr, Layer


class Activation(Layer):
    """An elementwise activation ``y = f(x)``: ``gx = gy f'(x)``, ``R{gx} = R{gy} f'(x) + gy f''(x) dx``.

    Names: ``relu``, ``leaky_relu`` (``slope``, PyTorch's ``negative_slope``),
    ``elu`` (``alpha``), ``tanh``, ``sigmoid``, ``softplus`` (``beta``,
    ``threshold``: PyTorch returns ``x`` where ``beta x > threshold``).
    Derivatives at kinks are PyTorch's: relu'(0) = 0, leaky_relu'(0) = slope,
    elu: the ``x <= 0`` piece at 0.
    """

    kind = "activation"
    NAMES = ("relu", "leaky_relu", "elu", "tanh", "sigmoid", "softplus", "identity")

    def __init__(self, name: str, *, slope: float = 0.01, alpha: float = 1.0, beta: float = 1.0,
                 threshold: float = 20.0):
        super().__init__()
        if name not in self.NAMES:
            raise InvalidInputError(f"activation={name!r} is unknown; choose one of {self.NAMES}")
        self.name = name
        self.slope, self.alpha, self.beta, self.threshold = float(slope), float(alpha), float(beta), float(threshold)
        self.analytic = name in ("tanh", "sigmoid", "identity")

    def __repr__(self) -> str:
        extra = {"leaky_relu": f", slope={self.slope}", "elu": f", alpha={self.alpha}",
                 "softplus": f", beta={self.beta}, threshold={self.threshold}"}.get(self.name, "")
        return f"Activation({self.name!r}{extra})"

    def derivs(self, x: Arr, order: int) -> list[Arr]:
        """``[f, f', f'']`` up to ``order`` at ``x``."""
        name = self.name
        if name in ("tanh", "sigmoid", "identity"):
            return activation_derivatives(name, x, order)
        if name in ("relu", "leaky_relu"):
            pos = _real_positive(x)
            low = 0.0 if name == "relu" else self.slope
            d1 = np.where(pos, 1.0, low).astype(np.result_type(x, 1.0), copy=False)
            out = [x * d1, d1, np.zeros_like(d1)]
            return out[: order + 1]
        if name == "elu":
            pos = _real_positive(x)
            e = self.alpha * np.exp(np.where(pos, 0.0, x))  # exp only on the non-positive piece
            out = [np.where(pos, x, e - self.alpha), np.where(pos, 1.0, e), np.where(pos, 0.0, e)]
            return [o.astype(np.result_type(x, 1.0), copy=False) for o in out[: order + 1]]
        # softplus(x) = log(1 + exp(beta x)) / beta, and x itself where beta x > threshold (PyTorch).
        bx = self.beta * x
        lin = np.real(bx) > self.threshold
        safe = np.where(lin, 0.0, bx)
        sp, s, ds = activation_derivatives("softplus", safe, 2)
        out = [np.where(lin, x, sp / self.beta), np.where(lin, 1.0, s), np.where(lin, 0.0, self.beta * ds)]
        return [o.astype(np.result_type(x, 1.0), copy=False) for o in out[: order + 1]]

    def fwd(self, P, x):
        if self.name == "identity":
            return x, None
        if self.name == "relu":
            pos = _real_positive(x)
            return x * pos, (x, pos)
        f, d1 = self.derivs(x, 1)
        return f, (x, d1)

    def bwd(self, P, cache, gy, need_gx=True):
        if self.name == "identity":
            return [], gy
        return [], gy * cache[1]

    def jvp(self, P, cache, dP, dx):
        if dx is None:
            return None, None
        if self.name == "identity":
            return dx, None
        return dx * cache[1], None

    def rbwd(self, P, cache, rcache, gy, rgy, dP, dx, need_gx=True):
        if self.name == "identity":
            return [], gy, [], rgy
        x, d1 = cache
        gx, rgx = gy * d1, rgy * d1
        if dx is not None and self.name not in ("relu", "leaky_relu"):
            rgx = rgx + gy * self.derivs(x, 2)[2] * dx
        return [], gx, [], rgx
