"""Conv2d: PyTorch's cross-correlation by im2col and one GEMM.

The four passes and their conventions are described in :mod:`reference.nets.layers`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from reference.errors import InvalidInputError
from reference.nets.layers._base import _check_int, _pair, Arr, COLS_CACHE_BYTES, COLS_CHUNK_BYTES, Layer


class Conv2d(Layer):
    """2-D cross-correlation as ``nn.Conv2d`` (no dilation, groups=1, zero padding).

    ``y[n, o, h, w] = b[o] + sum_{c,i,j} W[o, c, i, j] x_pad[n, c, s h + i, s w + j]``.
    """

    kind = "conv2d"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 bias: bool = True):
        super().__init__()
        self.in_channels = _check_int("in_channels", in_channels)
        self.out_channels = _check_int("out_channels", out_channels)
        self.kernel_size = _pair("kernel_size", kernel_size, 1)
        self.stride = _pair("stride", stride, 1)
        self.padding = _pair("padding", padding, 0)
        self.bias = bool(bias)
        self.param_names = ("weight", "bias") if self.bias else ("weight",)
        shapes: list[tuple[int, ...]] = [(self.out_channels, self.in_channels, *self.kernel_size)]
        if self.bias:
            shapes.append((self.out_channels,))
        self.param_shapes = tuple(shapes)

    def __repr__(self) -> str:
        return (f"Conv2d({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.bias})")

    def out_shape(self, in_shape):
        if len(in_shape) != 3 or in_shape[0] != self.in_channels:
            raise InvalidInputError(
                f"{self!r} expects (C={self.in_channels}, H, W) per example but gets {tuple(in_shape)}"
            )
        _, H, W = in_shape
        kh, kw = self.kernel_size
        (sh, sw), (ph, pw) = self.stride, self.padding
        Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
        if Ho < 1 or Wo < 1:
            raise InvalidInputError(f"{self!r} gets an input of spatial size {(H, W)}, smaller than its kernel")
        return (self.out_channels, Ho, Wo)

    def init(self, rng):
        # nn.Conv2d.reset_parameters: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in * kh * kw.
        bound = 1.0 / np.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
        out = [rng.uniform(-bound, bound, size=self.param_shapes[0])]
        if self.bias:
            out.append(rng.uniform(-bound, bound, size=self.param_shapes[1]))
        return out

    # -- helpers -------------------------------------------------------------

    def _wmat(self, W: Arr) -> Arr:
        """``(O, C, kh, kw) -> (O, kh*kw*C)``, matching the (i, j, c) order of the columns."""
        return W.transpose(0, 2, 3, 1).reshape(W.shape[0], -1)

    def _unwmat(self, Wm: Arr) -> Arr:
        kh, kw = self.kernel_size
        return Wm.reshape(Wm.shape[0], kh, kw, self.in_channels).transpose(0, 3, 1, 2)

    def _pad(self, x: Arr) -> Arr:
        ph, pw = self.padding
        if ph == 0 and pw == 0:
            return x
        return np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))

    def _geometry(self, x: Arr) -> tuple[int, int, int]:
        N, H, W, _ = x.shape
        _, Ho, Wo = self.out_shape((self.in_channels, H, W))
        return N, Ho, Wo

    def _cols(self, xp: Arr, Ho: int, Wo: int, lo: int = 0, hi: int | None = None) -> Arr:
        """im2col of examples ``lo:hi``: ``(n*Ho*Wo, kh*kw*C)``, one copy of a strided view."""
        kh, kw = self.kernel_size
        sh, sw = self.stride
        win = sliding_window_view(xp[lo:hi], (kh, kw), axis=(1, 2))  # (n, Hp-kh+1, Wp-kw+1, C, kh, kw)
        win = win[:, : sh * (Ho - 1) + 1 : sh, : sw * (Wo - 1) + 1 : sw]
        n = win.shape[0]
        return np.ascontiguousarray(win.transpose(0, 1, 2, 4, 5, 3)).reshape(n * Ho * Wo, -1)

    def _chunks(self, N: int, Ho: int, Wo: int, itemsize: int) -> list[tuple[int, int]]:
        per = Ho * Wo * self.kernel_size[0] * self.kernel_size[1] * self.in_channels * itemsize
        step = max(1, COLS_CHUNK_BYTES // max(per, 1))
        return [(lo, min(lo + step, N)) for lo in range(0, N, step)]

    def _col2im(self, gcols: Arr, N: int, Ho: int, Wo: int, xpshape: tuple[int, ...], out: Arr | None = None,
                lo: int = 0) -> Arr:
        """Adjoint of :meth:`_cols`: scatter-add of columns into the *padded* input of shape ``xpshape``."""
        kh, kw = self.kernel_size
        sh, sw = self.stride
        C = xpshape[-1]
        n = gcols.shape[0] // (Ho * Wo)
        if out is None:
            out = np.zeros((N, *xpshape[1:]), dtype=gcols.dtype)
        g = gcols.reshape(n, Ho, Wo, kh, kw, C)
        for i in range(kh):
            for j in range(kw):
                out[lo : lo + n, i : i + sh * (Ho - 1) + 1 : sh, j : j + sw * (Wo - 1) + 1 : sw] += g[:, :, :, i, j]
        return out

    def _unpad(self, gxp: Arr) -> Arr:
        ph, pw = self.padding
        H, W = gxp.shape[1] - 2 * ph, gxp.shape[2] - 2 * pw
        return gxp[:, ph : ph + H, pw : pw + W]

    def _col_blocks(self, cache: Any, itemsize: int):
        """Yield ``(lo, hi, cols)`` over the batch: the cached columns or recomputed chunks."""
        xp, cols, (N, Ho, Wo) = cache
        if cols is not None:
            yield 0, N, cols
            return
        for lo, hi in self._chunks(N, Ho, Wo, itemsize):
            yield lo, hi, self._cols(xp, Ho, Wo, lo, hi)

    # -- passes --------------------------------------------------------------

    def fwd(self, P, x):
        N, Ho, Wo = self._geometry(x)
        xp = self._pad(x)
        Wm = self._wmat(P[0])
        dtype = np.result_type(x, P[0])
        per = Ho * Wo * Wm.shape[1] * np.dtype(dtype).itemsize
        if N * per <= COLS_CACHE_BYTES:
            cols = self._cols(xp, Ho, Wo)
            y = cols @ Wm.T
        else:
            cols = None
            y = np.empty((N * Ho * Wo, self.out_channels), dtype=dtype)
            for lo, hi in self._chunks(N, Ho, Wo, np.dtype(dtype).itemsize):
                y[lo * Ho * Wo : hi * Ho * Wo] = self._cols(xp, Ho, Wo, lo, hi) @ Wm.T
        if self.bias:
            y = y + P[1]  # not +=: a complex bias with real weights and input (complex step along b alone)
        return y.reshape(N, Ho, Wo, self.out_channels), (xp, cols, (N, Ho, Wo))

    def _grads(self, P, cache, gy, need_gx):
        """``([gW, gb], gx)``: ``gW = gy^T cols``, ``gx = col2im(gy W)``."""
        xp, _, (N, Ho, Wo) = cache
        O = self.out_channels
        gm = gy.reshape(-1, O)
        gWm = None
        for lo, hi, cols in self._col_blocks(cache, np.result_type(xp, gy).itemsize):
            part = gm[lo * Ho * Wo : hi * Ho * Wo].T @ cols
            gWm = part if gWm is None else gWm + part
        gP = [self._unwmat(gWm)]
        if self.bias:
            gP.append(gm.sum(axis=0))
        gx = None
        if need_gx:
            gx = self._unpad(self._col2im(gm @ self._wmat(P[0]), N, Ho, Wo, xp.shape))
        return gP, gx

    def bwd(self, P, cache, gy, need_gx=True):
        return self._grads(P, cache, gy, need_gx)

    def jvp(self, P, cache, dP, dx):
        xp, cols, (N, Ho, Wo) = cache
        O = self.out_channels
        dWm = self._wmat(dP[0])
        dtype = np.result_type(xp, dP[0])
        dy = np.empty((N * Ho * Wo, O), dtype=dtype if dx is None else np.result_type(dtype, dx))
        for lo, hi, c in self._col_blocks(cache, dy.itemsize):
            dy[lo * Ho * Wo : hi * Ho * Wo] = c @ dWm.T
        if self.bias:
            dy = dy + dP[1]  # not +=: a complex bias direction with a real weight direction
        dcache = None
        if dx is not None:
            Wm = self._wmat(P[0])
            dxp = self._pad(dx)
            dcache = (dxp, None, (N, Ho, Wo))
            if N * Ho * Wo * Wm.shape[1] * dy.itemsize <= COLS_CACHE_BYTES:
                dcols = self._cols(dxp, Ho, Wo)
                dcache = (dxp, dcols, (N, Ho, Wo))
            for lo, hi, c in self._col_blocks(dcache, dy.itemsize):
                dy[lo * Ho * Wo : hi * Ho * Wo] += c @ Wm.T
        return dy.reshape(N, Ho, Wo, O), dcache

    def rbwd(self, P, cache, dcache, gy, rgy, dP, dx, need_gx=True):
        xp, _, (N, Ho, Wo) = cache
        O = self.out_channels
        gm, rgm = gy.reshape(-1, O), rgy.reshape(-1, O)
        itemsize = np.result_type(xp, gy, rgy).itemsize
        # gW = gy^T cols; R{gW} = R{gy}^T cols + gy^T R{cols} (R{cols} = im2col(dx)).
        gWm = rgWm = None
        for lo, hi, cols in self._col_blocks(cache, itemsize):
            rows = slice(lo * Ho * Wo, hi * Ho * Wo)
            a, b = gm[rows].T @ cols, rgm[rows].T @ cols
            gWm = a if gWm is None else gWm + a
            rgWm = b if rgWm is None else rgWm + b
        if dcache is not None:
            for lo, hi, dcols in self._col_blocks(dcache, itemsize):
                rgWm = rgWm + gm[lo * Ho * Wo : hi * Ho * Wo].T @ dcols
        gP, rgP = [self._unwmat(gWm)], [self._unwmat(rgWm)]
        if self.bias:
            gP.append(gm.sum(axis=0))
            rgP.append(rgm.sum(axis=0))
        gx = rgx = None
        if need_gx:
            Wm, dWm = self._wmat(P[0]), self._wmat(dP[0])
            gx = self._unpad(self._col2im(gm @ Wm, N, Ho, Wo, xp.shape))
            # R{gx} = col2im(R{gy} W + gy dW).
            rgx = self._unpad(self._col2im(rgm @ Wm + gm @ dWm, N, Ho, Wo, xp.shape))
        return gP, gx, rgP, rgx
