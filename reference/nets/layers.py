"""Layers of the reference networks, each with exact hand-written derivatives.

Semantics are PyTorch's (``shared/CONVENTIONS.md``, "Backbones beyond the
MLP"). Every layer provides four passes, with no autodiff anywhere:

* ``fwd(P, x) -> (y, cache)``: the value, keeping what the other passes need;
* ``bwd(P, cache, gy) -> (gP, gx)``: the vector-Jacobian product (backprop);
* ``jvp(P, cache, dP, dx) -> (dy, rcache)``: the Jacobian-vector product,
  i.e. Pearlmutter's R-forward pass ``R{y} = dy/dP[dP] + dy/dx[dx]``;
* ``rbwd(P, cache, rcache, gy, rgy, dP, dx) -> (gP, gx, rgP, rgx)``: the
  backward pass *and its R-image* ``R{gP}, R{gx}``, the directional derivative
  of ``bwd`` along ``(dP, dx)`` with ``R{gy} = rgy`` coming from above.

Chaining ``fwd``, ``jvp``, the loss's ``grad``/``hvp`` and ``rbwd`` gives an exact
Hessian-vector product (Pearlmutter 1994, "Fast exact multiplication by the
Hessian"); chaining ``fwd`` and ``bwd`` the gradient.

Why hand-written R-operators rather than a complex step of the backward pass:
both are exact (the complex step ``Im grad(p + i h v) / h`` with ``h = 1e-30``
has an ``O(h^2)`` truncation error far below round-off), but the R-operator
costs about two real backward passes where a complex backward costs about four
(a complex GEMM is four real ones), and it needs no nesting, so a complex step
*of the R-operator* is still available: that is how :meth:`Network._third`
(Newton-MAML's third derivative) is computed, and how the tests check the
R-operators independently of the code under test.

Complex-step safety: every pass accepts complex arrays (``.T`` is a plain
transpose, no ``abs`` or conjugation) and every branch is taken on the real
part. For analytic layers the complex step is then exact to round-off. At a
kink (relu, leaky_relu, max-pool ties, softplus's threshold) the branch
chosen by the real part is PyTorch's (relu'(0) = 0, leaky_relu'(0) = slope,
max-pool ties to the first index in row-major window order), so the complex
step returns the one-sided derivative PyTorch's autograd returns: piecewise
correct, and equal to PyTorch's convention exactly at the kink.

Layout: spatial activations are held internally as NHWC (channels last, so
convolution is one GEMM over contiguous channels and batch-norm statistics
reduce over leading axes); the network converts its NCHW input once, and
:class:`Flatten` restores PyTorch's ``(C, H, W)`` flattening order.

Convolution: im2col by ``numpy.lib.stride_tricks.sliding_window_view`` (a
strided view; one copy into ``(N*Ho*Wo, kh*kw*C)`` columns), then one GEMM
with the weight rearranged to ``(O, kh*kw*C)``. The columns are cached for the
weight gradient and its R-image when they fit in ``COLS_CACHE_BYTES``, and
the batch is processed in chunks of at most ``COLS_CHUNK_BYTES`` of columns
otherwise (ResNet-12 at 84x84), so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from reference.errors import InvalidInputError
from reference.models import activation_derivatives

# Columns of a convolution kept between passes when they fit (bytes); larger ones are recomputed.
COLS_CACHE_BYTES = 64 * 2**20
# Largest block of columns formed at once (bytes); bounds the temporary of a big convolution.
COLS_CHUNK_BYTES = 32 * 2**20

Arr = np.ndarray


def _add(a: Arr | None, b: Arr | None) -> Arr | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InvalidInputError(f"{name}={value!r} must be an integer >= {minimum}")
    return int(value)


def _pair(name: str, value: Any, minimum: int) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise InvalidInputError(f"{name}={value!r} must be an int or a pair (h, w)")
        return _check_int(f"{name}[0]", value[0], minimum), _check_int(f"{name}[1]", value[1], minimum)
    v = _check_int(name, value, minimum)
    return v, v


def _real_positive(x: Arr) -> Arr:
    """``Re x > 0``: the branch PyTorch takes (strict, so the kink goes to the left piece)."""
    return np.real(x) > 0


class Layer:
    """Base class: a layer with no parameters that maps shapes one to one.

    ``param_names``/``param_shapes`` are in PyTorch registration order.
    ``in_shape``/``out_shape`` are per-example shapes in PyTorch's convention
    (``(C, H, W)`` or ``(D,)``); arrays are NHWC internally.
    """

    kind = "layer"
    param_names: tuple[str, ...] = ()
    analytic = True  # False when a complex step meets a kink (relu, max-pool, ...)

    def __init__(self) -> None:
        self.param_shapes: tuple[tuple[int, ...], ...] = ()

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        return in_shape

    def init(self, rng: np.random.Generator) -> list[Arr]:
        return []

    def sublayers(self) -> list[tuple[str, Layer]]:
        return []

    # The four passes; parameterless elementwise layers override these.
    def fwd(self, P: Sequence[Arr], x: Arr) -> tuple[Arr, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def bwd(self, P: Sequence[Arr], cache: Any, gy: Arr, need_gx: bool = True) -> tuple[list[Arr], Arr | None]:
        raise NotImplementedError  # pragma: no cover - abstract

    def jvp(self, P: Sequence[Arr], cache: Any, dP: Sequence[Arr], dx: Arr | None) -> tuple[Arr | None, Any]:
        raise NotImplementedError  # pragma: no cover - abstract

    def rbwd(self, P, cache, rcache, gy, rgy, dP, dx, need_gx=True):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# ---------------------------------------------------------------------------
# Linear
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Conv2d (NHWC internally, weight (out, in, kh, kw) as PyTorch)
# ---------------------------------------------------------------------------


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
            y += P[1]
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
            dy += dP[1]
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


# ---------------------------------------------------------------------------
# Batch norm
# ---------------------------------------------------------------------------


class BatchNorm(Layer):
    """``nn.BatchNorm1d`` (input ``(N, C)``) / ``nn.BatchNorm2d`` (``(N, C, H, W)``; NHWC here).

    Train mode (``training=True``) or ``track_running_stats=False``: batch
    statistics over every axis but the channel, mean ``mu`` and *biased*
    variance ``var``, differentiated through:

        xhat = (x - mu) / sqrt(var + eps),   y = gamma * xhat + beta.

    Eval mode with running statistics: ``mu, var`` are the constants
    ``running_mean, running_var``. The running-statistics update of a train-mode
    forward is :meth:`updated_stats` (state, not a parameter):
    ``r <- (1 - m) r + m * stat`` with the *unbiased* variance ``var * M/(M-1)``
    (``m = 1/num_batches_tracked`` when ``momentum is None``).
    """

    kind = "batchnorm"

    def __init__(self, num_features: int, *, dims: int = 2, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, training: bool = True,
                 running_mean: Any = None, running_var: Any = None, num_batches_tracked: int = 0):
        super().__init__()
        self.num_features = _check_int("num_features", num_features)
        if dims not in (1, 2):
            raise InvalidInputError(f"dims={dims!r} must be 1 (BatchNorm1d) or 2 (BatchNorm2d)")
        self.dims = dims
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise InvalidInputError(f"eps={eps!r} must be a positive float (PyTorch's default is 1e-5)")
        self.eps = float(eps)
        if momentum is not None and not (isinstance(momentum, (int, float)) and 0 <= momentum <= 1):
            raise InvalidInputError(f"momentum={momentum!r} must be in [0, 1] or None (cumulative average)")
        self.momentum = None if momentum is None else float(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.training = bool(training)
        self.param_names = ("weight", "bias") if self.affine else ()
        self.param_shapes = ((self.num_features,), (self.num_features,)) if self.affine else ()
        C = self.num_features
        if self.track_running_stats:
            self.running_mean = np.zeros(C) if running_mean is None else np.array(running_mean, dtype=np.float64)
            self.running_var = np.ones(C) if running_var is None else np.array(running_var, dtype=np.float64)
            if self.running_mean.shape != (C,) or self.running_var.shape != (C,):
                raise InvalidInputError(f"running_mean/running_var must have shape ({C},)")
            if np.any(self.running_var < 0):
                raise InvalidInputError("running_var must be >= 0")
        else:
            self.running_mean = self.running_var = None
        self.num_batches_tracked = int(num_batches_tracked)

    def __repr__(self) -> str:
        mode = "train" if self.training else "eval"
        return (f"BatchNorm{self.dims}d({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, mode={mode!r})")

    @property
    def uses_batch_stats(self) -> bool:
        return self.training or not self.track_running_stats

    def out_shape(self, in_shape):
        ok = (len(in_shape) == 1) if self.dims == 1 else (len(in_shape) == 3)
        if not ok or in_shape[0] != self.num_features:
            want = "(C,)" if self.dims == 1 else "(C, H, W)"
            raise InvalidInputError(f"{self!r} expects {want} with C={self.num_features} per example, "
                                    f"gets {tuple(in_shape)}")
        return in_shape

    def init(self, rng):
        # nn.BatchNorm reset_parameters: weight = 1, bias = 0.
        return [np.ones(self.num_features), np.zeros(self.num_features)] if self.affine else []

    def _affine(self, P):
        if self.affine:
            return P[0], P[1]
        return 1.0, 0.0

    def fwd(self, P, x):
        axes = tuple(range(x.ndim - 1))
        gamma, beta = self._affine(P)
        if self.uses_batch_stats:
            M = x.size // x.shape[-1]
            if M < 2 and self.training:
                raise InvalidInputError(
                    f"{self!r} in train mode needs more than 1 value per channel (got a batch of shape "
                    f"{x.shape}), as PyTorch; use eval mode or a larger batch"
                )
            mu = x.mean(axis=axes)
            xc = x - mu
            var = (xc * xc).mean(axis=axes)
        else:
            mu, var = self.running_mean, self.running_var
            xc = x - mu
        inv = 1.0 / np.sqrt(var + self.eps)
        xhat = xc * inv
        y = xhat * gamma + beta if self.affine else xhat
        return y, (xhat, inv, mu, var)

    def bwd(self, P, cache, gy, need_gx=True):
        xhat, inv, _, _ = cache
        axes = tuple(range(gy.ndim - 1))
        gamma, _ = self._affine(P)
        gP = [(gy * xhat).sum(axis=axes), gy.sum(axis=axes)] if self.affine else []
        gx = None
        if need_gx:
            ghat = gy * gamma if self.affine else gy
            if self.uses_batch_stats:
                # d xhat/dx is (1/sigma) times the projection removing the mean and the xhat-component.
                gx = inv * (ghat - ghat.mean(axis=axes) - xhat * (ghat * xhat).mean(axis=axes))
            else:
                gx = ghat * inv
        return gP, gx

    def jvp(self, P, cache, dP, dx):
        xhat, inv, _, _ = cache
        axes = tuple(range(xhat.ndim - 1))
        gamma, _ = self._affine(P)
        dxhat = a = None
        if dx is not None:
            if self.uses_batch_stats:
                # d sigma = mean(xhat dx); d xhat = (dx - mean dx - xhat mean(xhat dx)) / sigma.
                a = (xhat * dx).mean(axis=axes)
                dxhat = inv * (dx - dx.mean(axis=axes) - xhat * a)
            else:
                dxhat = dx * inv
        dy = None
        if self.affine:
            dy = xhat * dP[0] + dP[1]
            if dxhat is not None:
                dy = dy + dxhat * gamma
        else:
            dy = dxhat
        return dy, (dxhat, a)

    def rbwd(self, P, cache, rcache, gy, rgy, dP, dx, need_gx=True):
        xhat, inv, _, _ = cache
        dxhat, a = rcache
        axes = tuple(range(gy.ndim - 1))
        gamma, _ = self._affine(P)
        gP, rgP = [], []
        if self.affine:
            gP = [(gy * xhat).sum(axis=axes), gy.sum(axis=axes)]
            r = rgy * xhat if dxhat is None else rgy * xhat + gy * dxhat
            rgP = [r.sum(axis=axes), rgy.sum(axis=axes)]
        gx = rgx = None
        if need_gx:
            ghat = gy * gamma if self.affine else gy
            rghat = (rgy * gamma + gy * dP[0]) if self.affine else rgy
            if self.uses_batch_stats:
                b = (ghat * xhat).mean(axis=axes)
                gx = inv * (ghat - ghat.mean(axis=axes) - xhat * b)
                rb = (rghat * xhat).mean(axis=axes)
                inner = rghat - rghat.mean(axis=axes)
                if dxhat is not None:
                    rb = rb + (ghat * dxhat).mean(axis=axes)
                    inner = inner - dxhat * b
                rgx = inv * (inner - xhat * rb)
                if a is not None:
                    # R{1/sigma} = -(1/sigma) mean(xhat dx) = -inv * a.
                    rgx = rgx - (inv * a) * gx
            else:
                gx = ghat * inv
                rgx = rghat * inv
        return gP, gx, rgP, rgx

    def updated_stats(self, cache: Any, batch_shape: tuple[int, ...]) -> tuple[Arr, Arr, int] | None:
        """Running statistics after this train-mode forward (PyTorch's update), or None if not tracked."""
        if not (self.training and self.track_running_stats):
            return None
        _, _, mu, var = cache
        M = int(np.prod(batch_shape[:-1]))
        n = self.num_batches_tracked + 1
        m = (1.0 / n) if self.momentum is None else self.momentum
        mu, var = np.real(mu), np.real(var)
        unbiased = var * M / (M - 1)
        return (1 - m) * self.running_mean + m * mu, (1 - m) * self.running_var + m * unbiased, n


def BatchNorm1d(num_features: int, **kwargs: Any) -> BatchNorm:
    """``nn.BatchNorm1d`` on ``(N, C)`` inputs (see :class:`BatchNorm`)."""
    return BatchNorm(num_features, dims=1, **kwargs)


def BatchNorm2d(num_features: int, **kwargs: Any) -> BatchNorm:
    """``nn.BatchNorm2d`` on ``(N, C, H, W)`` inputs (see :class:`BatchNorm`)."""
    return BatchNorm(num_features, dims=2, **kwargs)


# ---------------------------------------------------------------------------
# Elementwise activations
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Pooling, flatten, identity
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Composites: Sequential and Residual
# ---------------------------------------------------------------------------


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


__all__ = [
    "Activation",
    "AvgPool2d",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "Conv2d",
    "Flatten",
    "GlobalAvgPool2d",
    "Identity",
    "Layer",
    "Linear",
    "MaxPool2d",
    "Residual",
    "Sequential",
]
