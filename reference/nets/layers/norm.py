"""Batch norm (train mode through the batch statistics, eval mode, running-statistics state).

The four passes and their conventions are described in :mod:`reference.nets.layers`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reference.errors import InvalidInputError
from reference.nets.layers._base import _check_int, Arr, Layer


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
