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

from reference.nets.layers._base import COLS_CACHE_BYTES, COLS_CHUNK_BYTES, Layer
from reference.nets.layers.linear import Linear
from reference.nets.layers.conv import Conv2d
from reference.nets.layers.norm import BatchNorm, BatchNorm1d, BatchNorm2d
from reference.nets.layers.activation import Activation
from reference.nets.layers.pool import AvgPool2d, Flatten, GlobalAvgPool2d, Identity, MaxPool2d, _Pool2d
from reference.nets.layers.compose import Residual, Sequential

__all__ = [
    "Activation",
    "AvgPool2d",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "COLS_CACHE_BYTES",
    "COLS_CHUNK_BYTES",
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
