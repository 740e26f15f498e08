"""The reshaping layers (max/avg/global pooling, Flatten, Identity) as layers, each pass against direct loops.

Fast, NumPy only (issue 19: the mutation runner tries the fastest covering tests first). Each layer's
``fwd`` is compared with PyTorch's pooling written out window by window over NCHW (windows enumerated
one by one, max ignoring the padding and going to the first maximum in row-major order, average
dividing by ``kh kw``); its ``jvp`` with the same loop applied to the direction (the routing at the
argmax for max-pooling); its ``bwd`` and ``rbwd`` (called with their default ``need_gx=True``) with
the loop's scatter, the transpose of the forward map; ``need_gx=False`` returns no input gradient.
Geometries include kernel 1 (the identity for stride 1), non-square inputs whose ceil-mode windows
need extra padding on one axis only, and a global average over a non-square image. Argument checks
carry the argument's name and what is expected.
"""

from __future__ import annotations

import numpy as np
import pytest

from reference.errors import InvalidInputError
from reference.nets import AvgPool2d, Flatten, GlobalAvgPool2d, Identity, Linear, MaxPool2d, Network


def _windows(n: int, k: int, s: int, p: int, ceil: bool) -> list[int]:
    """Start rows (input coordinates, may be negative) of PyTorch's windows: floor mode keeps windows
    inside the padded input; ceil mode also the partial last one unless it starts in the right padding."""
    out, i = [], 0
    while True:
        start = i * s - p
        if start + k <= n + p or (ceil and start < n and (not out or out[-1] + k < n + p)):
            out.append(start)
            i += 1
        else:
            return out


def _loop(x, k, s, p, ceil, op):
    """Pooling of an NCHW batch, window by window; for max also the argmax (flat index into H W) per output."""
    N, C, H, W = x.shape
    rows, cols = _windows(H, k[0], s[0], p[0], ceil), _windows(W, k[1], s[1], p[1], ceil)
    y = np.zeros((N, C, len(rows), len(cols)))
    arg = np.zeros(y.shape, dtype=int)
    for a, r in enumerate(rows):
        for b, c in enumerate(cols):
            for n in range(N):
                for ch in range(C):
                    if op == "avg":  # count_include_pad: the padding counts as zeros
                        win = x[n, ch, max(r, 0) : r + k[0], max(c, 0) : c + k[1]]
                        y[n, ch, a, b] = win.sum() / (k[0] * k[1])
                        continue
                    best = None
                    for i in range(max(r, 0), min(r + k[0], H)):  # row-major over the real positions
                        for j in range(max(c, 0), min(c + k[1], W)):
                            if best is None or x[n, ch, i, j] > best:
                                best, arg[n, ch, a, b] = x[n, ch, i, j], i * W + j
                    y[n, ch, a, b] = best
    return y, arg


def _max_routing(arg, H, W, gy=None, dx=None):
    """The max-pool's derivative as the loop defines it: dy = dx at the argmax; gx = gy summed into the argmax."""
    N, C, Ho, Wo = arg.shape
    if dx is not None:
        flat = dx.reshape(N, C, H * W)
        return np.take_along_axis(flat, arg.reshape(N, C, -1), axis=2).reshape(N, C, Ho, Wo)
    gx = np.zeros((N, C, H * W))
    for n in range(N):
        for c in range(C):
            np.add.at(gx[n, c], arg[n, c].ravel(), gy[n, c].ravel())
    return gx.reshape(N, C, H, W)


def _avg_adjoint(gy, shape, k, s, p, ceil):
    """Transpose of the average pool by the loop: each output spreads gy / (kh kw) over its window's real part."""
    N, C, H, W = shape
    rows, cols = _windows(H, k[0], s[0], p[0], ceil), _windows(W, k[1], s[1], p[1], ceil)
    gx = np.zeros(shape)
    for a, r in enumerate(rows):
        for b, c in enumerate(cols):
            gx[:, :, max(r, 0) : r + k[0], max(c, 0) : c + k[1]] += gy[:, :, a, b][:, :, None, None] / (k[0] * k[1])
    return gx


NHWC = (0, 2, 3, 1)
NCHW = (0, 3, 1, 2)

POOL_GEOMS = [  # (kernel, stride, padding, ceil, H, W)
    ((3, 3), (2, 2), (1, 1), True, 7, 6),  # H > W: only the columns' last ceil window needs extra padding
    ((3, 3), (2, 2), (1, 1), True, 6, 7),  # H < W: only the rows' last ceil window needs extra padding
    ((2, 2), (2, 2), (1, 0), False, 5, 4),
    ((3, 2), (2, 1), (1, 1), False, 4, 7),
    ((1, 1), (1, 1), (0, 0), False, 3, 4),  # kernel 1, stride 1: the identity
    ((1, 2), (2, 1), (0, 1), True, 5, 3),  # kernel 1 on one axis: a strided subsampling
]


@pytest.mark.parametrize("geom", POOL_GEOMS)
def test_pool_layer_passes_against_loops(geom):
    k, s, p, ceil, H, W = geom
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 3, H, W))
    dx = rng.normal(size=x.shape)
    layers = [(MaxPool2d(k, s, p, ceil_mode=ceil), "max")] + ([] if ceil else [(AvgPool2d(k, s, p), "avg")])
    for layer, op in layers:
        want, arg = _loop(x, k, s, p, ceil, op)
        assert layer.out_shape((3, H, W)) == want.shape[1:]
        y, cache = layer.fwd([], x.transpose(NHWC))
        assert y.shape == want.transpose(NHWC).shape
        assert np.max(np.abs(y.transpose(NCHW) - want)) <= 1e-15
        gy, rgy = rng.normal(size=want.shape), rng.normal(size=want.shape)
        if op == "max":
            dy_want = _max_routing(arg, H, W, dx=dx)
            gx_want, rgx_want = _max_routing(arg, H, W, gy=gy), _max_routing(arg, H, W, gy=rgy)
        else:
            dy_want, _ = _loop(dx, k, s, p, ceil, "avg")
            gx_want, rgx_want = (_avg_adjoint(g, x.shape, k, s, p, ceil) for g in (gy, rgy))
        dy, rcache = layer.jvp([], cache, [], dx.transpose(NHWC))
        assert dy.shape == y.shape and np.max(np.abs(dy.transpose(NCHW) - dy_want)) <= 1e-15
        assert layer.jvp([], cache, [], None)[0] is None
        gP, gx = layer.bwd([], cache, gy.transpose(NHWC))  # need_gx defaults to True
        assert gP == [] and gx.shape == x.transpose(NHWC).shape
        assert np.max(np.abs(gx.transpose(NCHW) - gx_want)) <= 1e-14
        out = layer.rbwd([], cache, rcache, gy.transpose(NHWC), rgy.transpose(NHWC), [], dx.transpose(NHWC))
        assert out[1] is not None and out[3] is not None, f"{layer!r}.rbwd must return gx by default"
        assert np.max(np.abs(out[1].transpose(NCHW) - gx_want)) <= 1e-14
        assert np.max(np.abs(out[3].transpose(NCHW) - rgx_want)) <= 1e-14
        assert layer.bwd([], cache, gy.transpose(NHWC), need_gx=False)[1] is None
        assert layer.rbwd([], cache, rcache, gy.transpose(NHWC), rgy.transpose(NHWC), [], None,
                          need_gx=False) == ([], None, [], None)


def test_kernel_one_is_the_identity_and_a_subsampling():
    """Kernel 1 (allowed in PyTorch) with stride 1 returns the input; with stride 2 every other row/column."""
    x = np.random.default_rng(0).normal(size=(2, 5, 4, 3))  # NHWC
    for layer in (MaxPool2d(1), AvgPool2d(1), MaxPool2d(1, stride=1), AvgPool2d((1, 1), stride=(1, 1))):
        assert np.array_equal(layer.fwd([], x)[0], x)
    assert np.array_equal(MaxPool2d(1, stride=2).fwd([], x)[0], x[:, ::2, ::2])


def test_global_average_pool_passes_on_a_non_square_image():
    """mean over H W (not H H or W W); jvp keeps the (N, 1, 1, C) shape of fwd; bwd/rbwd spread g / (H W)."""
    rng = np.random.default_rng(1)
    layer = GlobalAvgPool2d()
    x, dx = rng.normal(size=(2, 2, 5, 3)), rng.normal(size=(2, 2, 5, 3))  # NHWC, H = 2, W = 5
    assert layer.out_shape((3, 2, 5)) == (3, 1, 1)
    y, cache = layer.fwd([], x)
    want = np.array([[[[x[n, :, :, c].sum() / 10 for c in range(3)]]] for n in range(2)])
    assert y.shape == (2, 1, 1, 3) and np.max(np.abs(y - want)) <= 1e-15
    dy, rcache = layer.jvp([], cache, [], dx)
    assert dy.shape == y.shape
    assert np.max(np.abs(dy - [[[[dx[n, :, :, c].sum() / 10 for c in range(3)]]] for n in range(2)])) <= 1e-15
    assert layer.jvp([], cache, [], None)[0] is None
    gy, rgy = rng.normal(size=y.shape), rng.normal(size=y.shape)
    spread = lambda g: np.broadcast_to(g / 10, x.shape)  # noqa: E731  d mean / d x = 1 / (H W) everywhere
    gP, gx = layer.bwd([], cache, gy)
    assert gP == [] and gx is not None and np.max(np.abs(gx - spread(gy))) <= 1e-15
    out = layer.rbwd([], cache, rcache, gy, rgy, [], dx)
    assert out[1] is not None and np.max(np.abs(out[1] - spread(gy))) <= 1e-15
    assert np.max(np.abs(out[3] - spread(rgy))) <= 1e-15
    assert layer.bwd([], cache, gy, need_gx=False)[1] is None
    assert layer.rbwd([], cache, rcache, gy, rgy, [], dx, need_gx=False) == ([], None, [], None)
    with pytest.raises(InvalidInputError, match=r"expects \(C, H, W\)"):
        layer.out_shape((3, 4))


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 7)])
def test_flatten_passes_in_pytorch_order(shape):
    """NHWC (N, H, W, C) flattens in PyTorch's (C, H, W) order; (N, F) is unchanged; bwd/rbwd invert it."""
    rng = np.random.default_rng(2)
    x, dx = rng.normal(size=shape), rng.normal(size=shape)
    layer = Flatten()
    to_torch = (lambda a: a.transpose(NCHW)) if len(shape) == 4 else (lambda a: a)  # noqa: E731
    want = np.stack([to_torch(x)[n].ravel() for n in range(shape[0])])  # C-order over (C, H, W) per example
    per_example = shape[1:] if len(shape) == 2 else (shape[3], shape[1], shape[2])
    assert layer.out_shape(per_example) == (want.shape[1],)
    y, cache = layer.fwd([], x)
    assert np.array_equal(y, want)
    dy, rcache = layer.jvp([], cache, [], dx)
    assert np.array_equal(dy, np.stack([to_torch(dx)[n].ravel() for n in range(shape[0])]))
    assert layer.jvp([], cache, [], None)[0] is None
    gy, rgy = rng.normal(size=y.shape), rng.normal(size=y.shape)
    gP, gx = layer.bwd([], cache, gy)
    assert gP == [] and gx is not None and gx.shape == x.shape
    assert np.sum(gx * dx) == pytest.approx(np.sum(gy * dy), rel=1e-14)  # the transpose of a permutation
    assert np.array_equal(layer.fwd([], gx)[0], gy)
    out = layer.rbwd([], cache, rcache, gy, rgy, [], dx)
    assert out[1] is not None and np.array_equal(out[1], gx)
    assert np.array_equal(layer.fwd([], out[3])[0], rgy)
    assert layer.bwd([], cache, gy, need_gx=False)[1] is None
    assert layer.rbwd([], cache, rcache, gy, rgy, [], dx, need_gx=False) == ([], None, [], None)


def test_identity_passes():
    rng = np.random.default_rng(3)
    x, dx, gy, rgy = (rng.normal(size=(2, 3)) for _ in range(4))
    layer = Identity()
    y, cache = layer.fwd([], x)
    assert y is x and layer.jvp([], cache, [], dx)[0] is dx
    assert layer.bwd([], cache, gy) == ([], gy)
    out = layer.rbwd([], cache, None, gy, rgy, [], dx)
    assert out[1] is gy and out[3] is rgy


def test_pool_argument_checks_name_the_argument():
    """Kernel and stride are integers >= 1, padding >= 0 and at most half the kernel (PyTorch's limits)."""
    for kw, name in [(dict(kernel_size=0), "kernel_size"), (dict(kernel_size=(2, 0)), r"kernel_size\[1\]"),
                     (dict(kernel_size=2, stride=0), "stride"), (dict(kernel_size=2, stride=(1, 0)), r"stride\[1\]"),
                     (dict(kernel_size=2, padding=-1), "padding"), (dict(kernel_size=2, padding=(0, -1)),
                                                                    r"padding\[1\]")]:
        for cls in (MaxPool2d, AvgPool2d):
            with pytest.raises(InvalidInputError, match=rf"^{name}="):
                cls(**kw)
    assert MaxPool2d(2, padding=0).padding == (0, 0) and AvgPool2d(3, stride=1).stride == (1, 1)


def test_pool_refuses_an_input_smaller_than_its_kernel_on_either_axis():
    """No window fits: 0 outputs on one axis (H or W alone) is refused with a hint, not an empty array."""
    for shape in [(1, 2, 6), (1, 6, 2), (1, 2, 2)]:
        for layer in (MaxPool2d(3), AvgPool2d(3)):
            with pytest.raises(InvalidInputError, match="smaller than its kernel"):
                layer.out_shape(shape)
    assert MaxPool2d(3).out_shape((1, 3, 6)) == (1, 1, 2)
    with pytest.raises(InvalidInputError, match=r"expects \(C, H, W\)"):
        MaxPool2d(2).out_shape((4, 4))


def test_pool_repr_names_the_geometry_and_ceil_mode():
    assert repr(MaxPool2d(2)) == "MaxPool2d(kernel_size=(2, 2), stride=(2, 2), padding=(0, 0))"
    assert repr(MaxPool2d((3, 2), 1, 1, ceil_mode=True)) == (
        "MaxPool2d(kernel_size=(3, 2), stride=(1, 1), padding=(1, 1), ceil_mode=True)")
    assert repr(AvgPool2d(2, padding=1)) == "AvgPool2d(kernel_size=(2, 2), stride=(2, 2), padding=(1, 1))"


def test_max_pool_has_a_kink_so_its_network_is_not_analytic():
    """At a tie the max is not differentiable (one-sided slopes differ), so a network with a max-pool must
    not claim analyticity (the audit then uses real differences, not the complex step); avg-pool is linear."""
    net = Network([MaxPool2d(2), Flatten(), Linear(1, 2)], (1, 2, 2))
    params = [np.ones((2, 1)), np.zeros(2)]
    x, d = np.zeros((1, 1, 2, 2)), np.array([[[[0.0, 1.0], [0.0, 0.0]]]])
    t = 1e-3
    up = (net.forward(params, x + t * d) - net.forward(params, x)) / t
    down = (net.forward(params, x) - net.forward(params, x - t * d)) / t
    assert np.max(np.abs(up - down)) > 0.5  # slopes 1 and 0 at the tie
    assert not net.is_analytic
    assert Network([AvgPool2d(2), Flatten(), Linear(1, 2)], (1, 2, 2)).is_analytic
