"""Pooling, Flatten and Identity: the layers that reshape.

The four passes and their conventions are described in :mod:`reference.nets.layers`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reference.errors import InvalidInputError
from reference.nets.layers._base import _pair, Arr, Layer


class _Pool2d(Layer):
    def __init__(self, kernel_size: Any, stride: Any = None, padding: Any = 0, ceil_mode: bool = False):
        super().__init__()
        self.kernel_size = _pair("kernel_size", kernel_size, 1)
        self.stride = self.kernel_size if stride is None else _pair("stride", stride, 1)
        self.padding = _pair("padding", padding, 0)
        self.ceil_mode = bool(ceil_mode)
        kh, kw = self.kernel_size
        if 2 * self.padding[0] > kh or 2 * self.padding[1] > kw:
            raise InvalidInputError(f"padding={self.padding} must be at most half the kernel {self.kernel_size}")

    def __repr__(self) -> str:
        ceil = ", ceil_mode=True" if self.ceil_mode else ""
        return (f"{type(self).__name__}(kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}{ceil})")

    @staticmethod
    def _size(n: int, k: int, s: int, p: int, ceil: bool) -> int:
        # PyTorch's pooling_output_shape: with ceil_mode the last window must start inside the input
        # (or the left padding).
        num = n + 2 * p - k
        out = (-(-num // s) if ceil else num // s) + 1
        if ceil and (out - 1) * s >= n + p:
            out -= 1
        return out

    def out_shape(self, in_shape):
        if len(in_shape) != 3:
            raise InvalidInputError(f"{self!r} expects (C, H, W) per example, gets {tuple(in_shape)}")
        C, H, W = in_shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        Ho, Wo = self._size(H, kh, sh, ph, self.ceil_mode), self._size(W, kw, sw, pw, self.ceil_mode)
        if Ho < 1 or Wo < 1:
            raise InvalidInputError(f"{self!r} gets an input of spatial size {(H, W)}, smaller than its kernel; "
                                    "use ceil_mode=True or larger inputs")
        return (C, Ho, Wo)

    def _extra(self, H: int, W: int, Ho: int, Wo: int) -> tuple[int, int]:
        """Right/bottom padding beyond ``padding`` that ceil mode's last windows reach."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return max(0, (Ho - 1) * sh + kh - H - 2 * ph), max(0, (Wo - 1) * sw + kw - W - 2 * pw)

    def _slices(self, Ho: int, Wo: int):
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        for i in range(kh):
            for j in range(kw):
                yield i, j, (slice(None), slice(i, i + sh * (Ho - 1) + 1, sh), slice(j, j + sw * (Wo - 1) + 1, sw))

    def _pad(self, x: Arr, value: float, Ho: int, Wo: int) -> Arr:
        ph, pw = self.padding
        eh, ew = self._extra(x.shape[1], x.shape[2], Ho, Wo)
        if ph == pw == eh == ew == 0:
            return x
        return np.pad(x, ((0, 0), (ph, ph + eh), (pw, pw + ew), (0, 0)), constant_values=value)

    def _padded_shape(self, xshape, Ho: int, Wo: int) -> tuple[int, int, int, int]:
        N, H, W, C = xshape
        eh, ew = self._extra(H, W, Ho, Wo)
        return (N, H + 2 * self.padding[0] + eh, W + 2 * self.padding[1] + ew, C)

    def _unpad(self, gxp: Arr, xshape) -> Arr:
        ph, pw = self.padding
        return gxp[:, ph : ph + xshape[1], pw : pw + xshape[2]]

    def _geometry(self, x):
        N, H, W, C = x.shape
        _, Ho, Wo = self.out_shape((C, H, W))
        return N, Ho, Wo, C


class MaxPool2d(_Pool2d):
    """``nn.MaxPool2d(kernel_size, stride=kernel_size, padding, ceil_mode)`` (no dilation).

    Piecewise linear: the output is the input at the window's argmax, taken on
    the real part with ties going to the first index in row-major window order
    (PyTorch's). The derivative routes through that index; its R-image is the
    same routing (the second derivative vanishes away from ties).
    """

    kind = "maxpool2d"
    analytic = False

    def fwd(self, P, x):
        N, Ho, Wo, C = self._geometry(x)
        xp = self._pad(x, -np.inf, Ho, Wo)
        best = bestr = None
        masks = []
        # Scan the window in row-major order; a later element wins only if strictly larger (ties -> first).
        for _, _, sl in self._slices(Ho, Wo):
            v = xp[sl]
            vr = np.real(v)
            if best is None:
                best, bestr = v.copy(), vr.copy()
                masks.append(np.ones(vr.shape, dtype=bool))
                continue
            win = vr > bestr
            masks = [m & ~win for m in masks]
            masks.append(win)
            best = np.where(win, v, best)
            bestr = np.where(win, vr, bestr)
        return best, (masks, x.shape, Ho, Wo, x.dtype)

    def _scatter(self, cache, gy):
        masks, xshape, Ho, Wo, _ = cache
        gxp = np.zeros(self._padded_shape(xshape, Ho, Wo), dtype=gy.dtype)
        for (_, _, sl), m in zip(self._slices(Ho, Wo), masks):
            gxp[sl] += gy * m
        return self._unpad(gxp, xshape)

    def bwd(self, P, cache, gy, need_gx=True):
        return [], (self._scatter(cache, gy) if need_gx else None)

    def jvp(self, P, cache, dP, dx):
        if dx is None:
            return None, None
        masks, _, Ho, Wo, _ = cache
        dxp = self._pad(dx, 0.0, Ho, Wo)
        dy = None
        for (_, _, sl), m in zip(self._slices(Ho, Wo), masks):
            t = dxp[sl] * m
            dy = t if dy is None else dy + t
        return dy, None

    def rbwd(self, P, cache, rcache, gy, rgy, dP, dx, need_gx=True):
        if not need_gx:
            return [], None, [], None
        return [], self._scatter(cache, gy), [], self._scatter(cache, rgy)


class AvgPool2d(_Pool2d):
    """``nn.AvgPool2d(kernel_size, stride, padding)``, ``count_include_pad=True``, floor mode: linear."""

    kind = "avgpool2d"

    def __init__(self, kernel_size: Any, stride: Any = None, padding: Any = 0):
        super().__init__(kernel_size, stride, padding)

    def _apply(self, x):
        N, Ho, Wo, C = self._geometry(x)
        xp = self._pad(x, 0.0, Ho, Wo)
        y = None
        for _, _, sl in self._slices(Ho, Wo):
            y = xp[sl].copy() if y is None else y + xp[sl]
        return y / (self.kernel_size[0] * self.kernel_size[1])

    def _adjoint(self, xshape, gy):
        Ho, Wo = gy.shape[1], gy.shape[2]
        gxp = np.zeros(self._padded_shape(xshape, Ho, Wo), dtype=gy.dtype)
        g = gy / (self.kernel_size[0] * self.kernel_size[1])
        for _, _, sl in self._slices(Ho, Wo):
            gxp[sl] += g
        return self._unpad(gxp, xshape)

    def fwd(self, P, x):
        return self._apply(x), x.shape

    def bwd(self, P, xshape, gy, need_gx=True):
        return [], (self._adjoint(xshape, gy) if need_gx else None)

    def jvp(self, P, xshape, dP, dx):
        return (None if dx is None else self._apply(dx)), None

    def rbwd(self, P, xshape, rcache, gy, rgy, dP, dx, need_gx=True):
        if not need_gx:
            return [], None, [], None
        return [], self._adjoint(xshape, gy), [], self._adjoint(xshape, rgy)


class GlobalAvgPool2d(Layer):
    """Mean over the spatial axes, ``nn.AdaptiveAvgPool2d(1)``: ``(C, H, W) -> (C, 1, 1)``."""

    kind = "globalavgpool2d"

    def out_shape(self, in_shape):
        if len(in_shape) != 3:
            raise InvalidInputError(f"{self!r} expects (C, H, W) per example, gets {tuple(in_shape)}")
        return (in_shape[0], 1, 1)

    def fwd(self, P, x):
        return x.mean(axis=(1, 2), keepdims=True), x.shape

    def _adjoint(self, xshape, gy):
        return np.broadcast_to(gy / (xshape[1] * xshape[2]), xshape).copy()

    def bwd(self, P, xshape, gy, need_gx=True):
        return [], (self._adjoint(xshape, gy) if need_gx else None)

    def jvp(self, P, xshape, dP, dx):
        return (None if dx is None else dx.mean(axis=(1, 2), keepdims=True)), None

    def rbwd(self, P, xshape, rcache, gy, rgy, dP, dx, need_gx=True):
        if not need_gx:
            return [], None, [], None
        return [], self._adjoint(xshape, gy), [], self._adjoint(xshape, rgy)


class Flatten(Layer):
    """``nn.Flatten()``: ``(C, H, W) -> (C*H*W,)`` in PyTorch's (C, H, W) order (from NHWC here)."""

    kind = "flatten"

    def out_shape(self, in_shape):
        return (int(np.prod(in_shape)),)

    def _f(self, x):
        if x.ndim == 4:
            return x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)
        return x.reshape(x.shape[0], -1)

    def _b(self, xshape, g):
        if len(xshape) == 4:
            N, H, W, C = xshape
            return g.reshape(N, C, H, W).transpose(0, 2, 3, 1)
        return g.reshape(xshape)

    def fwd(self, P, x):
        return self._f(x), x.shape

    def bwd(self, P, xshape, gy, need_gx=True):
        return [], (self._b(xshape, gy) if need_gx else None)

    def jvp(self, P, xshape, dP, dx):
        return (None if dx is None else self._f(dx)), None

    def rbwd(self, P, xshape, rcache, gy, rgy, dP, dx, need_gx=True):
        if not need_gx:
            return [], None, [], None
        return [], self._b(xshape, gy), [], self._b(xshape, rgy)


class Identity(Layer):
    """``nn.Identity`` (and ``nn.Dropout`` in eval mode)."""

    kind = "identity"

    def fwd(self, P, x):
        return x, None

    def bwd(self, P, cache, gy, need_gx=True):
        return [], gy

    def jvp(self, P, cache, dP, dx):
        return dx, None

    def rbwd(self, P, cache, rcache, gy, rgy, dP, dx, need_gx=True):
        return [], gy, [], rgy
