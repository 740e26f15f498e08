"""The reference networks' hand-written derivatives against independent sources (NumPy only).

Every layer type sits in a small network (table ``CASES``); its gradient is
checked against the complex step of the loss and the engine's
``verify.check_gradient`` (complex step and, independently of complex
arithmetic, Richardson extrapolation); its Hessian-vector product (the
R-operators) against the complex step of the gradient (a different code
path: the backward pass in complex arithmetic) and the engine's Taylor
test; the JVP/VJP pair by the dot-product identity and the JVP against the
complex step of the forward pass. Batch-norm running statistics are compared
with PyTorch's formula written out with NumPy. Torch's own double backward is
in ``tests/torch/test_nets_torch.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reference import maml
from reference.errors import InvalidInputError, NotAnalyticError
from reference.models import flatten, unflatten
from reference.nets import (
    Activation,
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Flatten,
    GlobalAvgPool2d,
    Linear,
    MaxPool2d,
    Network,
    Residual,
    Sequential,
    conv4,
    resnet12,
)
from reference.nets.layers.norm import BatchNorm
from reference.tasks import Task
from verify import FAIL, PASS, check_gradient, dot_product_test, taylor_test

H_CS = 1e-30  # complex step: no subtractive cancellation, so the step can be tiny
# Both sides exact to round-off; a few hundred ulps of the gradient's scale leaves room for
# the summation order of GEMMs and reductions over ~10^3 terms.
EXACT = 1e-12


def _cs(fun, params, v):
    return np.imag(fun([p + 1j * H_CS * d for p, d in zip(params, v)])) / H_CS


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


def _small(act: str = "tanh") -> list:
    return [Conv2d(2, 3, 3, stride=2, padding=1, bias=False), BatchNorm2d(3), Activation(act),
            AvgPool2d(2, padding=1), Conv2d(3, 4, 2), BatchNorm2d(4, track_running_stats=False), Activation(act),
            MaxPool2d(2, ceil_mode=True), Flatten(), Linear(4, 5), BatchNorm1d(5), Activation(act), Linear(5, 3)]


def _resblock() -> list:
    body = Sequential(Conv2d(2, 3, 3, padding=1), BatchNorm2d(3), Activation("elu"), Conv2d(3, 3, 3, padding=1))
    short = Sequential(Conv2d(2, 3, 1, bias=False), BatchNorm2d(3))
    return [Residual(body, short), Activation("softplus"), GlobalAvgPool2d(), Flatten(), Linear(3, 3)]


# name -> (builder, in_shape, batch, loss)
CASES = {
    "conv-bn-pools-tanh": (lambda: Network(_small("tanh"), (2, 9, 9)), 6),
    "conv-bn-pools-sigmoid": (lambda: Network(_small("sigmoid"), (2, 9, 9)), 6),
    "conv-bn-pools-softplus": (lambda: Network(_small("softplus"), (2, 9, 9)), 6),
    "conv-bn-pools-elu": (lambda: Network(_small("elu"), (2, 9, 9)), 6),
    "conv-bn-pools-relu": (lambda: Network(_small("relu"), (2, 9, 9)), 6),
    "conv-bn-pools-leaky": (lambda: Network(_small("leaky_relu"), (2, 9, 9)), 6),
    "eval-mode-bn": (lambda: Network(_small("tanh"), (2, 9, 9)).eval(), 6),
    "residual-gap": (lambda: Network(_resblock(), (2, 6, 6)), 5),
    "conv4-ceil": (lambda: conv4((1, 8, 8), 3, hidden=3, ceil_mode=True), 5),
    "resnet12-tiny": (lambda: resnet12((3, 16, 16), 3, widths=(2, 3, 3, 4)), 4),
}


def _problem(name: str, seed: int = 0):
    build, n = CASES[name]
    net = build()
    rng = np.random.default_rng(seed)
    # Perturb the defaults (BN weight 1, bias 0) so every parameter matters at second order.
    params = [p + 0.2 * rng.normal(size=p.shape) for p in net.init(seed)]
    x = rng.normal(size=(n, *net.in_shape))
    y = rng.integers(0, net.n_out, size=n)
    v = [rng.normal(size=s) for s in net.shapes]
    return net, params, x, y, v


@pytest.mark.parametrize("name", sorted(CASES))
def test_grad_and_hvp_match_complex_step(name):
    net, p, x, y, v = _problem(name)
    loss, g, hv = net._grad_and_hvp(p, x, y, v)
    assert abs(loss - net.loss(p, x, y)) <= EXACT * abs(loss)
    d = _cs(lambda q: net.loss(q, x, y), p, v)
    assert abs(np.dot(flatten(g), flatten(v)) - d) <= EXACT * np.linalg.norm(flatten(g)) * np.linalg.norm(flatten(v))
    # H v against the complex step of the (separately coded) backward pass.
    want = flatten(_cs(lambda q: flatten(net.grad(q, x, y)), p, v))
    assert _rel(flatten(hv), want) <= EXACT
    assert _rel(flatten(net.hvp(p, x, y, v)), want) <= EXACT


@pytest.mark.parametrize("name", ["conv-bn-pools-tanh", "conv-bn-pools-relu", "residual-gap", "eval-mode-bn"])
def test_engine_check_gradient_and_taylor(name):
    net, p, x, y, v = _problem(name)
    flat = flatten(p)

    def f(z):
        return net.loss(unflatten(z, net.shapes), x, y)

    g = flatten(net.grad(p, x, y))
    verdict = check_gradient(f, g, flat, budget="fast")
    assert verdict.status == PASS, verdict.reason
    # Richardson extrapolation: no complex arithmetic involved at all.
    verdict = check_gradient(lambda z: float(np.real(f(z))), g, flat, method="richardson", directions=3)
    assert verdict.status == PASS, verdict.reason
    direction = flatten(v)
    result = taylor_test(f, flat, direction, grad=g,
                         hvp=lambda z, w: flatten(net.hvp(unflatten(z, net.shapes), x, y, unflatten(w, net.shapes))))
    assert result.status == PASS, result.reason


def test_engine_catches_a_wrong_hvp():
    """The Taylor check above can fail: the first block's Hessian-vector product with the wrong sign.

    (Taylor's rate test resolves only errors comparable with the second-order term along ``v``; small
    errors are the complex-step comparisons' job.)"""
    net, p, x, y, v = _problem("conv-bn-pools-tanh")
    flat = flatten(p)

    def bad(z, w):
        hv = net.hvp(unflatten(z, net.shapes), x, y, unflatten(w, net.shapes))
        hv[0] = -hv[0]
        return flatten(hv)

    result = taylor_test(lambda z: net.loss(unflatten(z, net.shapes), x, y), flat, flatten(v),
                         grad=flatten(net.grad(p, x, y)), hvp=bad)
    assert result.status == FAIL


@pytest.mark.parametrize("name", ["conv-bn-pools-elu", "residual-gap", "eval-mode-bn"])
def test_jvp_vjp_dot_product_and_complex_step(name):
    net, p, x, y, v = _problem(name)
    out = net.forward(p, x)
    verdict = dot_product_test(lambda u: net.jvp(p, x, unflatten(u, net.shapes)),
                               lambda c: flatten(net.vjp(p, x, c)), in_shape=(net.n_params,), out_shape=out.shape)
    assert verdict.status == PASS, verdict.reason
    want = _cs(lambda q: net.forward(q, x), p, v)
    assert _rel(net.jvp(p, x, v), want) <= EXACT
    # The input gradient: dot product with the complex step along an input direction.
    c = np.random.default_rng(3).normal(size=out.shape)
    _, gx = net.vjp(p, x, c, wrt_input=True)
    dx = np.random.default_rng(4).normal(size=x.shape)
    d = np.imag(np.sum(c * net.forward(p, x + 1j * H_CS * dx))) / H_CS
    assert abs(np.sum(gx * dx) - d) <= EXACT * np.linalg.norm(gx) * np.linalg.norm(dx)


conv_configs = st.tuples(
    st.integers(1, 3),  # in channels
    st.integers(1, 3),  # out channels
    st.integers(1, 3),  # kernel
    st.integers(1, 2),  # stride
    st.integers(0, 1),  # padding
    st.integers(4, 7),  # image size
    st.booleans(),      # bias
    st.integers(2, 4),  # batch
    st.integers(0, 2**16),
)


@given(conv_configs)
def test_conv_bn_random_geometry(cfg):
    c_in, c_out, k, s, pad, size, bias, n, seed = cfg
    layers = [Conv2d(c_in, c_out, k, stride=s, padding=pad, bias=bias), BatchNorm2d(c_out), Activation("tanh")]
    out = Sequential(*layers).out_shape((c_in, size, size))
    net = Network(layers + [Flatten(), Linear(int(np.prod(out)), 2)], (c_in, size, size))
    rng = np.random.default_rng(seed)
    p = [a + 0.2 * rng.normal(size=a.shape) for a in net.init(seed)]
    x = rng.normal(size=(n, c_in, size, size))
    y = rng.integers(0, 2, size=n)
    v = [rng.normal(size=sh) for sh in net.shapes]
    _, g, hv = net._grad_and_hvp(p, x, y, v)
    d = _cs(lambda q: net.loss(q, x, y), p, v)
    assert abs(np.dot(flatten(g), flatten(v)) - d) <= EXACT * max(np.linalg.norm(flatten(g)) *
                                                                  np.linalg.norm(flatten(v)), 1e-300)
    want = flatten(_cs(lambda q: flatten(net.grad(q, x, y)), p, v))
    assert np.max(np.abs(flatten(hv) - want)) <= EXACT * max(np.max(np.abs(want)), 1e-12)


def test_conv_matches_direct_loop():
    """Cross-correlation, stride and padding against the definition written as loops."""
    rng = np.random.default_rng(0)
    conv = Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0))
    W, b = rng.normal(size=(3, 2, 3, 2)), rng.normal(size=3)
    x = rng.normal(size=(2, 2, 5, 4))
    y, _ = conv.fwd([W, b], x.transpose(0, 2, 3, 1))
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)))
    Ho, Wo = (5 + 2 - 3) // 2 + 1, 4 - 2 + 1
    want = np.zeros((2, 3, Ho, Wo))
    for n in range(2):
        for o in range(3):
            for h in range(Ho):
                for w in range(Wo):
                    want[n, o, h, w] = b[o] + np.sum(W[o] * xp[n, :, 2 * h : 2 * h + 3, w : w + 2])
    assert _rel(y.transpose(0, 3, 1, 2), want) <= 1e-14


def test_maxpool_ties_go_to_the_first_index_and_relu_kink_is_zero():
    """At exact ties / zeros the reference takes PyTorch's convention (first index; relu'(0) = 0)."""
    # 1x1 convolution of piecewise-constant 2x2 blocks: every max-pool window is a 4-way tie.
    x = np.kron(np.array([[[[1.0, -2.0], [0.5, 3.0]]]]), np.ones((1, 1, 2, 2)))
    net = Network([Conv2d(1, 1, 1, bias=False), MaxPool2d(2), Flatten(), Linear(4, 1)], (1, 4, 4), loss="mse")
    p = [np.array([[[[2.0]]]]), np.ones((1, 4)), np.zeros(1)]
    c = np.ones((1, 1))
    _, gx = net.vjp(p, x, c, wrt_input=True)
    # Only the top-left element of each window receives the cotangent.
    mask = np.zeros((4, 4))
    mask[0::2, 0::2] = 1
    assert np.array_equal(gx[0, 0] != 0, mask.astype(bool))
    relu_net = Network([Linear(2, 2, bias=False), Activation("relu"), Linear(2, 1)], (2,), loss="mse")
    q = [np.array([[1.0, -1.0], [1.0, 1.0]]), np.ones((1, 2)), np.zeros(1)]
    xs = np.array([[1.0, 1.0]])  # first hidden pre-activation is exactly 0
    _, gxs = relu_net.vjp(q, xs, np.ones((1, 1)), wrt_input=True)
    assert np.array_equal(gxs, np.array([[1.0, 1.0]]))  # only the second unit (z = 2) passes gradient


def test_richardson_at_a_relu_kink_is_not_a_false_failure():
    """At a kink the finite-difference verdict may be inconclusive but never 'fail' on the right convention."""
    net = Network([Linear(2, 3), Activation("relu"), Linear(3, 1)], (2,), loss="mse")
    rng = np.random.default_rng(0)
    p = [rng.normal(size=s) for s in net.shapes]
    x = rng.normal(size=(4, 2))
    p[1][0] = -(x[0] @ p[0][0])  # unit 0's pre-activation is exactly 0 on example 0
    y = rng.normal(size=(4, 1))
    g = flatten(net.grad(p, x, y))
    verdict = check_gradient(lambda z: float(np.real(net.loss(unflatten(z, net.shapes), x, y))), g, flatten(p),
                             method="richardson")
    assert verdict.status != FAIL, verdict.reason


def test_third_order_by_complex_step_of_hvp_matches_hvp_differences():
    """``third_order`` (a complex step of the R-operator) against a central difference of ``hvp``."""
    net, p, x, y, u = _problem("residual-gap")
    w = [np.random.default_rng(9).normal(size=s) for s in net.shapes]
    t = flatten(net.third_order(p, x, y, u, w))
    h = 1e-5
    plus = flatten(net.hvp([a + h * b for a, b in zip(p, w)], x, y, u))
    minus = flatten(net.hvp([a - h * b for a, b in zip(p, w)], x, y, u))
    # Central difference: O(h^2) truncation ~1e-10 relative and round-off eps/h ~ 1e-11.
    assert _rel(t, (plus - minus) / (2 * h)) <= 1e-7
    with pytest.raises(NotAnalyticError):
        net.third_order([a + 0j for a in p], x, y, u, w)


def test_running_stats_follow_pytorch_update():
    """Momentum update with the biased mean and unbiased variance, written out with NumPy."""
    net = Network([Conv2d(1, 2, 3), BatchNorm2d(2, momentum=0.3), Flatten(), Linear(2 * 4 * 4, 2)], (1, 6, 6))
    rng = np.random.default_rng(0)
    p = net.init(0)
    x = rng.normal(size=(3, 1, 6, 6))
    z = net.body.layers[0].fwd(p[:2], x.transpose(0, 2, 3, 1))[0]  # conv output, NHWC
    mean, var = z.mean(axis=(0, 1, 2)), z.var(axis=(0, 1, 2), ddof=1)
    state = net.running_stats(p, x)
    rm, rv, count = state["1"]
    assert count == 1
    assert _rel(rm, 0.3 * mean) <= 1e-14
    assert _rel(rv, 0.7 * np.ones(2) + 0.3 * var) <= 1e-14
    # The network is unchanged; with_state installs the statistics; eval mode then uses them as constants.
    assert np.array_equal(net.state()["1"][0], np.zeros(2))
    ev = net.with_state(state).eval()
    zhat = (z - rm) / np.sqrt(rv + 1e-5) * p[2] + p[3]
    want = zhat.transpose(0, 3, 1, 2).reshape(3, -1) @ p[4].T + p[5]
    assert _rel(ev.forward(p, x), want) <= 1e-13
    # Momentum None: cumulative average with factor 1/num_batches_tracked.
    cum = Network([Conv2d(1, 2, 3), BatchNorm2d(2, momentum=None), Flatten(), Linear(32, 2)], (1, 6, 6))
    assert _rel(cum.running_stats(p, x)["1"][0], mean) <= 1e-14


def test_eval_mode_treats_statistics_as_constants():
    """In eval mode the loss is affine in (gamma, beta) before the head: the BN-parameter Hessian block of a
    linear-output mse net is then that of a least-squares problem, PSD; in train mode the statistics move."""
    net, p, x, y, v = _problem("eval-mode-bn")
    train = net.train()
    assert net.mode == "eval" and train.mode == "train"
    assert abs(net.loss(p, x, y) - train.loss(p, x, y)) > 1e-3  # batch vs running statistics differ


def test_maml_meta_gradient_on_conv4_matches_complex_step():
    net = conv4((1, 8, 8), 3, hidden=3, ceil_mode=True)
    rng = np.random.default_rng(0)
    p = net.init(0)
    tasks = [Task(rng.normal(size=(3, 1, 8, 8)), np.arange(3), rng.normal(size=(6, 1, 8, 8)),
                  np.repeat(np.arange(3), 2)) for _ in range(2)]
    loss, g = maml.meta_loss_and_grad(net, p, tasks, 0.3, 2)
    flat = flatten(p)
    verdict = check_gradient(lambda z: maml.meta_loss(net, unflatten(z, net.shapes), tasks, 0.3, 2),
                             flatten(g), flat, budget="fast")
    assert verdict.status == PASS, verdict.reason
    assert abs(loss - maml.meta_loss(net, p, tasks, 0.3, 2)) <= 1e-14 * abs(loss)


def test_parameter_order_and_names():
    net = conv4((1, 28, 28), 5, hidden=4)
    assert net.param_names[:4] == ("0.weight", "0.bias", "1.weight", "1.bias")
    assert net.param_names[-2:] == ("17.weight", "17.bias")
    assert net.shapes[0] == (4, 1, 3, 3) and net.shapes[-2] == (5, 4)
    assert net.head_indices == (16, 17)
    r = resnet12((3, 84, 84), 5)
    assert r.param_names[:4] == ("layer1.conv1.weight", "layer1.bn1.weight", "layer1.bn1.bias", "layer1.conv2.weight")
    assert "layer4.downsample.0.weight" in r.param_names
    assert r.shapes[-2] == (5, 640 * 5 * 5)
    # A permuted public order round-trips.
    perm = Network(Sequential(Linear(3, 4), Activation("tanh"), Linear(4, 2)), (3,), param_order=[2, 3, 0, 1])
    assert perm.param_names == ("2.weight", "2.bias", "0.weight", "0.bias")
    assert perm.shapes == ((2, 4), (2,), (4, 3), (4,))


def test_bad_inputs_are_clear_errors():
    net = conv4((1, 28, 28), 5, hidden=4)
    p = net.init(0)
    with pytest.raises(InvalidInputError, match=r"expected \(n, 1, 28, 28\)"):
        net.forward(p, np.zeros((2, 28, 28, 1)))
    with pytest.raises(InvalidInputError, match="0.weight"):
        net.forward([np.zeros((4, 1, 3, 2))] + p[1:], np.zeros((2, 1, 28, 28)))
    with pytest.raises(InvalidInputError, match="ceil_mode=True"):
        conv4((1, 8, 8), 5)
    with pytest.raises(InvalidInputError, match="Flatten"):
        Network([Conv2d(1, 2, 3), Linear(2, 2)], (1, 5, 5))
    with pytest.raises(InvalidInputError, match="more than 1 value per channel"):
        Network([Linear(2, 3), BatchNorm1d(3), Linear(3, 2)], (2,)).loss(
            Network([Linear(2, 3), BatchNorm1d(3), Linear(3, 2)], (2,)).init(0), np.zeros((1, 2)), [0])
    with pytest.raises(InvalidInputError, match="labels"):
        net.loss(p, np.zeros((2, 1, 28, 28)), [0, 7])


def test_fused_maml_task_equals_the_generic_loop():
    """Network._maml_task (forward passes reused) against _inner's generic loop (fresh passes), incl. lr grads."""
    from reference import inner_loop as _inner

    net = conv4((2, 8, 8), 3, hidden=2, ceil_mode=True)
    rng = np.random.default_rng(1)
    p = [a + 0.1 * rng.normal(size=a.shape) for a in net.init(1)]
    tasks = [Task(rng.normal(size=(3, 2, 8, 8)), np.arange(3), rng.normal(size=(3, 2, 8, 8)), np.arange(3))]
    lrs = [0.2 * (1 + rng.random(s)) if i % 3 else (None if i == 3 else 0.1) for i, s in enumerate(net.shapes)]
    a = _inner.meta_loss_and_grad(net, p, tasks, lrs, 2, lr_grad=True)
    b = _inner.meta_loss_and_grad(net, p, tasks, lrs, 2, lr_grad=True, fused=False)
    assert abs(a[0] - b[0]) <= 1e-15 * abs(b[0])
    assert _rel(flatten(a[1]), flatten(b[1])) <= 1e-13
    assert all((x is None and y is None) or _rel(x, y) <= 1e-13 for x, y in zip(a[2], b[2]))


# -- Conv2d as a layer: its four passes against a direct loop, the complex step of its own forward/backward,
#    the memory rules of its column cache and chunks (small sizes forced with monkeypatch). --

# (C, O, kernel, stride, padding, H, W, bias, N): asymmetric kernel/stride/padding and H != W so that an index
# swapped between the two spatial axes shows.
CONV_GEOMS = [
    (2, 3, (3, 2), (2, 1), (1, 0), 7, 5, True, 3),
    (3, 2, (2, 3), (1, 2), (0, 1), 5, 8, False, 3),
]


def _conv_loop(W, b, x, stride, padding):
    """``nn.Conv2d``'s definition as loops over NCHW arrays (independent of im2col)."""
    (sh, sw), (ph, pw) = stride, padding
    O, _, kh, kw = W.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    Ho, Wo = (xp.shape[2] - kh) // sh + 1, (xp.shape[3] - kw) // sw + 1
    out = np.zeros((x.shape[0], O, Ho, Wo), dtype=np.result_type(W, x))
    for n in range(x.shape[0]):
        for o in range(O):
            for h in range(Ho):
                for w in range(Wo):
                    out[n, o, h, w] = np.sum(W[o] * xp[n, :, sh * h : sh * h + kh, sw * w : sw * w + kw])
    return out if b is None else out + b[None, :, None, None]


def _force_chunks(monkeypatch, conv, x_nhwc, per_chunk):
    """No column cache and chunks of ``per_chunk`` examples, from the measured bytes of one example's columns."""
    import reference.nets.layers.conv as conv_mod

    _, Ho, Wo = conv.out_shape((conv.in_channels, *x_nhwc.shape[1:3]))
    one = conv._cols(conv._pad(x_nhwc[:1]), Ho, Wo).nbytes
    monkeypatch.setattr(conv_mod, "COLS_CACHE_BYTES", 0)
    monkeypatch.setattr(conv_mod, "COLS_CHUNK_BYTES", per_chunk * one)
    return one


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("geom", CONV_GEOMS)
def test_conv_layer_passes_against_loop_and_complex_step(geom, chunked, monkeypatch):
    C, O, k, s, pad, H, Wd, bias, N = geom
    conv = Conv2d(C, O, k, stride=s, padding=pad, bias=bias)
    rng = np.random.default_rng(5)
    P = [rng.normal(size=sh) for sh in conv.param_shapes]
    dP = [rng.normal(size=sh) for sh in conv.param_shapes]
    x = rng.normal(size=(N, C, H, Wd))
    dx = rng.normal(size=x.shape)
    t = lambda a: a.transpose(0, 2, 3, 1)  # NCHW -> NHWC  # noqa: E731
    if chunked:
        _force_chunks(monkeypatch, conv, t(x), 2)  # N = 3: chunks (0, 2), (2, 3)
    y, cache = conv.fwd(P, t(x))
    assert (cache[1] is None) == chunked
    want = _conv_loop(P[0], P[1] if bias else None, x, conv.stride, conv.padding)
    assert y.shape == t(want).shape and _rel(y, t(want)) <= 1e-14

    def cs_fwd(i):  # complex step of the forward along argument i alone (the others stay real)
        Q = [p + 1j * H_CS * d if j == i else p for j, (p, d) in enumerate(zip(P, dP))]
        xx = t(x) + 1j * H_CS * t(dx) if i == len(P) else t(x)
        return np.imag(conv.fwd(Q, xx)[0]) / H_CS

    gy, rgy = rng.normal(size=y.shape), rng.normal(size=y.shape)
    gP, gx = conv.bwd(P, cache, gy)  # need_gx defaults to True
    assert gx is not None and gx.shape == t(x).shape
    parts = [np.sum(g * d) for g, d in zip(gP, dP)] + [np.sum(gx * t(dx))]
    for i, part in enumerate(parts):  # adjoint identity per argument: <gy, J_i d_i> = <J_i^T gy, d_i>
        d = np.sum(gy * cs_fwd(i))
        assert abs(part - d) <= EXACT * max(abs(d), 1.0)
    # JVP along the parameters alone and along parameters and input.
    dyP, dcP = conv.jvp(P, cache, dP, None)
    assert dcP is None
    assert _rel(dyP, sum(cs_fwd(i) for i in range(len(P)))) <= EXACT
    dy, dcache = conv.jvp(P, cache, dP, t(dx))
    assert (dcache[1] is None) == chunked
    assert _rel(dy, sum(cs_fwd(i) for i in range(len(P) + 1))) <= EXACT
    # The JVP is complex-linear: a complex direction in one argument (the others real) splits into parts.
    for i in range(len(P) + 1):
        re = [d if j == i else 0 * d for j, d in enumerate(dP)] + [t(dx) if i == len(P) else None]
        im = [rng.normal(size=d.shape) if j == i else 0 * d for j, d in enumerate(dP)]
        imx = rng.normal(size=t(dx).shape) if i == len(P) else None
        cdP = [a + 1j * b if j == i else a for j, (a, b) in enumerate(zip(re[:-1], im))]  # others stay real
        cdx = None if imx is None else re[-1] + 1j * imx
        got = conv.jvp(P, cache, cdP, cdx)[0]
        a = conv.jvp(P, cache, re[:-1], re[-1])[0]
        b = conv.jvp(P, cache, im, imx)[0]
        assert _rel(got, a + 1j * b) <= EXACT
    # R-operator: the complex step of the backward pass at (P + ih dP, x + ih dx) with cotangent gy + ih rgy.
    Pc = [p + 1j * H_CS * d for p, d in zip(P, dP)]
    _, cc = conv.fwd(Pc, t(x) + 1j * H_CS * t(dx))
    gPc, gxc = conv.bwd(Pc, cc, gy + 1j * H_CS * rgy)
    g2, gx2, rgP, rgx = conv.rbwd(P, cache, dcache, gy, rgy, dP, t(dx))  # need_gx defaults to True
    assert all(_rel(a, b) <= EXACT for a, b in zip(g2, gP)) and _rel(gx2, gx) <= EXACT
    assert all(_rel(a, np.imag(b) / H_CS) <= EXACT for a, b in zip(rgP, gPc))
    assert _rel(rgx, np.imag(gxc) / H_CS) <= EXACT
    # Without an input direction (dcache None): R{gW} loses the gy^T im2col(dx) term.
    _, cc0 = conv.fwd(Pc, t(x))
    gPc0, _ = conv.bwd(Pc, cc0, gy + 1j * H_CS * rgy, need_gx=False)
    _, _, rgP0, _ = conv.rbwd(P, cache, dcP, gy, rgy, dP, None, need_gx=False)
    assert all(_rel(a, np.imag(b) / H_CS) <= EXACT for a, b in zip(rgP0, gPc0))


def test_conv_chunks_partition_the_batch_within_the_byte_budget(monkeypatch):
    """Chunks cover 0..N once, in order; each holds at most COLS_CHUNK_BYTES of columns and is the largest that
    does (one example at least), the bytes measured on the columns themselves."""
    import reference.nets.layers.conv as conv_mod

    conv = Conv2d(3, 2, (3, 2), stride=(1, 2), padding=(1, 0))
    x = np.zeros((1, 6, 7, 3))
    _, Ho, Wo = conv.out_shape((3, 6, 7))
    one = conv._cols(conv._pad(x), Ho, Wo).nbytes
    for budget, N in [(1, 3), (one, 4), (2 * one, 5), (2 * one + one // 2, 7), (3 * one - 1, 7), (100 * one, 6)]:
        monkeypatch.setattr(conv_mod, "COLS_CHUNK_BYTES", budget)
        chunks = conv._chunks(N, Ho, Wo, x.itemsize)
        assert [lo for lo, _ in chunks] == [0] + [hi for _, hi in chunks[:-1]] and chunks[-1][1] == N
        step = max(1, budget // one)
        assert all(hi - lo == min(step, N - lo) for lo, hi in chunks)


def test_conv_caches_its_columns_exactly_when_they_fit(monkeypatch):
    """``cache[1]`` (forward) and ``dcache[1]`` (JVP) hold the columns iff their bytes <= COLS_CACHE_BYTES."""
    import reference.nets.layers.conv as conv_mod

    conv = Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(0, 1))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 7, 5, 2))
    P = [rng.normal(size=s) for s in conv.param_shapes]
    _, full = conv.fwd(P, x)
    nbytes = full[1].nbytes  # the columns, measured
    for cap, kept in [(nbytes, True), (nbytes - 1, False)]:
        monkeypatch.setattr(conv_mod, "COLS_CACHE_BYTES", cap)
        _, cache = conv.fwd(P, x)
        assert (cache[1] is not None) == kept
        _, dcache = conv.jvp(P, cache, P, x)
        assert (dcache[1] is not None) == kept


def test_conv_init_and_geometry_checks():
    """PyTorch's init U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = C kh kw, for weight and bias; bad geometry."""
    conv = Conv2d(3, 400, (3, 2))
    bound = 1 / np.sqrt(3 * 3 * 2)
    W, b = conv.init(np.random.default_rng(0))
    for a in (W, b):
        assert np.max(np.abs(a)) <= bound and a.min() < -0.9 * bound and a.max() > 0.9 * bound
    for kw in [dict(kernel_size=0), dict(kernel_size=(2, 0)), dict(kernel_size=2, stride=0),
               dict(kernel_size=2, padding=-1), dict(kernel_size=2, padding=(0, -1))]:
        with pytest.raises(InvalidInputError):
            Conv2d(1, 1, **kw)
    c = Conv2d(2, 1, 3)
    assert c.out_shape((2, 3, 3)) == (1, 1, 1)
    for shape in [(3, 5, 5), (2, 5), (2, 2, 5), (2, 5, 2)]:  # wrong channels, rank, one side too small
        with pytest.raises(InvalidInputError):
            c.out_shape(shape)


def test_activation_defaults_and_pieces_match_pytorch_closed_forms():
    """PyTorch's documented defaults (negative_slope 0.01, alpha 1, beta 1, threshold 20) and formulas, each
    derivative checked by complex step or its closed form, on both sides of every kink and threshold."""
    x = np.array([-2.0, -0.5, 0.7, 3.0])
    assert np.array_equal(Activation("leaky_relu").fwd([], x)[0], np.where(x > 0, x, 0.01 * x))
    assert _rel(Activation("elu").fwd([], x)[0], np.where(x > 0, x, np.expm1(x))) <= 1e-15
    assert _rel(Activation("softplus").fwd([], x)[0], np.log1p(np.exp(x))) <= 1e-15
    sp2 = Activation("softplus", beta=2.0)
    f, d1, d2 = sp2.derivs(x, 2)
    assert _rel(f, np.log1p(np.exp(2 * x)) / 2) <= 1e-15
    assert _rel(d1, np.imag(sp2.derivs(x + 1j * H_CS, 0)[0]) / H_CS) <= 1e-14
    assert _rel(d2, np.imag(sp2.derivs(x + 1j * H_CS, 1)[1]) / H_CS) <= 1e-14
    # Threshold 20 (beta x > 20 strictly): log1p(exp(t)) - t = exp(-t) ~ 2e-9 is far above round-off at t ~ 20.
    t = np.array([19.5, 20.0, 20.5])
    got = Activation("softplus").fwd([], t)[0]
    assert got[2] == 20.5 and got[0] != 19.5 and got[1] != 20.0
    assert _rel(got[:2], np.log1p(np.exp(t[:2]))) <= 1e-15
    # Past the threshold softplus is x itself: f' = 1, f'' = 0 (also with beta != 1: beta x > 20).
    assert [list(a) for a in sp2.derivs(np.array([10.5]), 2)] == [[10.5], [1.0], [0.0]]
    # relu / leaky_relu derivatives, incl. the kink (PyTorch: relu'(0) = 0, leaky'(0) = slope).
    z = np.array([-1.5, 0.0, 2.0])
    assert [list(a) for a in Activation("relu").derivs(z, 2)] == [[0.0, 0.0, 2.0], [0.0, 0.0, 1.0], [0.0] * 3]
    f, d1 = Activation("leaky_relu", slope=0.25).derivs(z, 1)  # slope a power of 2: exact products
    assert list(f) == [-0.375, 0.0, 2.0] and list(d1) == [0.25, 0.25, 1.0]


@pytest.mark.parametrize("name", ["tanh", "elu", "softplus", "sigmoid"])
def test_activation_rbwd_without_input_direction(name):
    """R{gx} = R{gy} f'(x) when dx is None (no second-order term), = R{gy} f' + gy f'' dx otherwise."""
    act = Activation(name)
    rng = np.random.default_rng(1)
    x, gy, rgy, dx = (rng.normal(size=5) for _ in range(4))
    _, cache = act.fwd([], x)
    _, d1, d2 = act.derivs(x, 2)
    _, gx, _, rgx = act.rbwd([], cache, None, gy, rgy, [], None)
    assert _rel(gx, gy * d1) <= 1e-15 and _rel(rgx, rgy * d1) <= 1e-15
    _, _, _, rgx = act.rbwd([], cache, None, gy, rgy, [], dx)
    # Complex step of the backward pass: gx(x + ih dx, gy + ih rgy).
    _, cc = act.fwd([], x + 1j * H_CS * dx)
    want = np.imag(act.bwd([], cc, gy + 1j * H_CS * rgy)[1]) / H_CS
    assert _rel(rgx, want) <= 1e-14


def test_layer_argument_checks_and_analytic_flags():
    """Sizes are integers >= 1 (bools, floats, 0 rejected); a network is analytic iff no layer has a kink."""
    for bad in [0, -1, True, 2.0, "3"]:
        with pytest.raises(InvalidInputError):
            Linear(bad, 2)
        with pytest.raises(InvalidInputError):
            Conv2d(1, bad, 3)
    with pytest.raises(InvalidInputError):
        Sequential(Linear(2, 2), "tanh")
    smooth = [Conv2d(1, 2, 3), AvgPool2d(2), Flatten(), Linear(8, 2), Activation("tanh"), Linear(2, 2)]
    assert Network(smooth, (1, 6, 6)).is_analytic
    assert not Network(smooth[:4] + [Activation("relu"), Linear(2, 2)], (1, 6, 6)).is_analytic
    assert Residual(Sequential(Linear(3, 3), Activation("tanh"))).analytic
    assert not Residual(Sequential(Linear(3, 3), Activation("tanh")), Sequential(Linear(3, 3), Activation("relu"))
                        ).analytic
    assert not Residual(Sequential(Linear(3, 3), Activation("elu")), Linear(3, 3)).analytic


def test_sequential_and_residual_need_gx_and_repr():
    """need_gx defaults to True; need_gx=False returns no input gradient (but the same parameter gradients)."""
    act = Activation("tanh")
    seq = Sequential(Linear(3, 4), Activation("tanh"), Linear(4, 2))
    assert repr(seq) == f"Sequential({Linear(3, 4)!r}, {act!r}, {Linear(4, 2)!r})"
    res = Residual(Sequential(Linear(3, 3), Activation("tanh")), Linear(3, 3))
    rng = np.random.default_rng(2)
    x, dx = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    for layer in (seq, res):
        P = [rng.normal(size=s) for s in layer.param_shapes]
        dP = [rng.normal(size=s) for s in layer.param_shapes]
        y, cache = layer.fwd(P, x)
        gy, rgy = rng.normal(size=y.shape), rng.normal(size=y.shape)
        _, rcache = layer.jvp(P, cache, dP, dx)
        gP, gx = layer.bwd(P, cache, gy)
        assert gx is not None and gx.shape == x.shape
        gP0, gx0 = layer.bwd(P, cache, gy, need_gx=False)
        assert gx0 is None and all(np.array_equal(a, b) for a, b in zip(gP, gP0))
        out = layer.rbwd(P, cache, rcache, gy, rgy, dP, dx)
        assert out[1] is not None and out[3] is not None and _rel(out[1], gx) <= 1e-15
        out0 = layer.rbwd(P, cache, rcache, gy, rgy, dP, dx, need_gx=False)
        assert out0[1] is None and out0[3] is None


# -- BatchNorm, pooling, Flatten and Linear as layers: direct loops, complex step of their own forward and
#    backward, PyTorch's update of the running statistics and the argument checks. --

def _bn_loop(x, gamma, beta, eps, mean=None, var=None):
    """Batch norm per channel with explicit sums (x channel-last); batch statistics unless given."""
    y = np.empty_like(x)
    for c in range(x.shape[-1]):
        v = x[..., c]
        m = v.sum() / v.size if mean is None else mean[c]
        s2 = ((v - m) ** 2).sum() / v.size if var is None else var[c]
        y[..., c] = (v - m) / np.sqrt(s2 + eps) * gamma[c] + beta[c]
    return y


BN_CASES = [  # (dims, affine, training, track_running_stats, x shape channel-last)
    (2, True, True, True, (2, 3, 4, 2)),
    (2, False, True, True, (2, 3, 4, 2)),
    (1, True, False, True, (5, 3)),
    (1, False, False, True, (5, 3)),
    (1, True, False, False, (2, 3)),  # eval mode without running statistics: batch statistics, N = 2
]


@pytest.mark.parametrize("case", BN_CASES)
def test_batchnorm_passes_against_loop_and_complex_step(case):
    dims, affine, training, track, shape = case
    C = shape[-1]
    rng = np.random.default_rng(7)
    rm, rv = rng.normal(size=C), rng.uniform(0.5, 2.0, size=C)
    bn = BatchNorm1d(C, eps=1e-3, affine=affine, training=training, track_running_stats=track,
                     running_mean=rm if track else None, running_var=rv if track else None) if dims == 1 else \
        BatchNorm2d(C, eps=1e-3, affine=affine, training=training, track_running_stats=track,
                    running_mean=rm, running_var=rv)
    P = [rng.normal(size=s) for s in bn.param_shapes]
    dP = [rng.normal(size=s) for s in bn.param_shapes]
    x, dx = 3.0 + rng.normal(size=shape), rng.normal(size=shape)
    y, cache = bn.fwd(P, x)
    g, b = (P[0], P[1]) if affine else (np.ones(C), np.zeros(C))
    batch = training or not track
    want = _bn_loop(x, g, b, 1e-3) if batch else _bn_loop(x, g, b, 1e-3, rm, rv)
    assert _rel(y, want) <= 1e-13
    if batch:  # invariant to a per-channel shift of the input
        assert _rel(bn.fwd(P, x + rng.normal(size=C))[0], y) <= 1e-12

    def cs(Q, xx, gy=None):  # imaginary part / h of the forward (gy None) or of the backward
        _, cc = bn.fwd(Q, xx)
        return bn.fwd(Q, xx)[0] if gy is None else bn.bwd(Q, cc, gy)

    gy, rgy = rng.normal(size=y.shape), rng.normal(size=y.shape)
    gP, gx = bn.bwd(P, cache, gy)  # need_gx defaults to True
    assert gx is not None
    Pc = [p + 1j * H_CS * d for p, d in zip(P, dP)]
    for Q, xx, d in [(Pc, x, dP), (P, x + 1j * H_CS * dx, None)]:  # adjoint identity per argument
        lhs = np.sum(gy * np.imag(cs(Q, xx)) / H_CS)
        rhs = sum(np.sum(a * b) for a, b in zip(gP, d)) if d is not None else np.sum(gx * dx)
        assert abs(lhs - rhs) <= EXACT * max(abs(lhs), 1.0)
    dy, rcache = bn.jvp(P, cache, dP, dx)
    assert _rel(dy, np.imag(cs(Pc, x + 1j * H_CS * dx)) / H_CS) <= EXACT
    # R-operator with and without an input direction: complex step of the backward pass.
    for xdir in (dx, None):
        _, rc = bn.jvp(P, cache, dP, xdir)
        xx = x if xdir is None else x + 1j * H_CS * xdir
        gPc, gxc = cs(Pc, xx, gy + 1j * H_CS * rgy)
        out = bn.rbwd(P, cache, rc, gy, rgy, dP, xdir)  # need_gx defaults to True
        assert all(_rel(a, b) <= EXACT for a, b in zip(out[0], gP)) and _rel(out[1], gx) <= EXACT
        assert all(_rel(a, np.imag(b) / H_CS) <= EXACT for a, b in zip(out[2], gPc))
        assert _rel(out[3], np.imag(gxc) / H_CS) <= EXACT


def test_batchnorm_running_stats_update_and_modes():
    """PyTorch: r <- (1 - m) r + m stat, unbiased variance, m = 1/num_batches_tracked when momentum is None;
    no update in eval mode or without running statistics."""
    rng = np.random.default_rng(3)
    rm, rv = rng.normal(size=2), rng.uniform(0.5, 2.0, size=2)
    x = rng.normal(size=(3, 2, 4, 2))
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2), ddof=1)
    for momentum, m in [(0.25, 0.25), (None, 1 / 3)]:
        bn = BatchNorm2d(2, momentum=momentum, running_mean=rm, running_var=rv, num_batches_tracked=2)
        new_m, new_v, n = bn.updated_stats(bn.fwd([np.ones(2), np.zeros(2)], x)[1], x.shape)
        assert n == 3
        assert _rel(new_m, (1 - m) * rm + m * mean) <= 1e-14 and _rel(new_v, (1 - m) * rv + m * var) <= 1e-14
    for kw in [dict(training=False), dict(track_running_stats=False)]:
        bn = BatchNorm2d(2, **kw)
        assert bn.updated_stats(bn.fwd([np.ones(2), np.zeros(2)], x)[1], x.shape) is None


def test_batchnorm_argument_checks():
    """PyTorch's domains: eps > 0, momentum in [0, 1] or None, running_var >= 0 of shape (C,); train mode
    needs more than one value per channel; dims 2 by default."""
    assert BatchNorm1d(2).dims == 1 and repr(BatchNorm(2)).startswith("BatchNorm2d(2,")
    assert "mode='train'" in repr(BatchNorm1d(2)) and "mode='eval'" in repr(BatchNorm1d(2, training=False))
    for kw in [dict(eps=0), dict(eps=-0.5), dict(eps="1e-5"), dict(momentum=-0.5), dict(momentum=1.5),
               dict(momentum=-1.5), dict(momentum=2.5), dict(momentum="0.1"), dict(running_var=[1.0, -0.5]),
               dict(running_var=[1.0, -2.0]), dict(running_var=[1.0]), dict(running_mean=[0.0])]:
        with pytest.raises(InvalidInputError):
            BatchNorm1d(2, **kw)
    for kw in [dict(momentum=0), dict(momentum=1), dict(running_var=[0.0, 0.5])]:  # boundaries accepted
        BatchNorm1d(2, **kw)
    with pytest.raises(InvalidInputError, match=r"expects \(C,\) with C=2"):
        BatchNorm1d(2).out_shape((2, 3))  # right channels, wrong rank
    with pytest.raises(InvalidInputError, match=r"expects \(C, H, W\) with C=2"):
        BatchNorm2d(2).out_shape((2, 3))
    assert BatchNorm2d(2).out_shape((2, 3, 1)) == (2, 3, 1)
    # M = values per channel = N H W: 3 values in one example pass, 1 value (with 2 channels) fails.
    BatchNorm2d(1).fwd([np.ones(1), np.zeros(1)], np.arange(3.0).reshape(1, 3, 1, 1))
    BatchNorm1d(3).fwd([np.ones(3), np.zeros(3)], np.arange(6.0).reshape(2, 3))  # N = 2 is enough
    with pytest.raises(InvalidInputError, match="more than 1 value per channel"):
        BatchNorm2d(2).fwd([np.ones(2), np.zeros(2)], np.ones((1, 1, 1, 2)))


def _pool_loop(x, k, s, p, ceil, op):
    """PyTorch's pooling by its documented windows over NCHW: window i starts at i s - p (padded coordinates
    i s); floor mode keeps the windows inside the padded input, ceil mode also the partial last one unless it
    starts in the right padding. max ignores padding; avg divides by kh kw (count_include_pad=True)."""
    def starts(n, kk, ss, pp):
        out, i = [], 0
        while True:
            fits = i * ss + kk <= n + 2 * pp
            partial = ceil and i * ss - pp < n and (i - 1) * ss + kk < n + 2 * pp
            if not (fits or partial):
                return out
            out.append(i * ss - pp)
            i += 1
    rows, cols = starts(x.shape[2], k[0], s[0], p[0]), starts(x.shape[3], k[1], s[1], p[1])
    y = np.zeros((x.shape[0], x.shape[1], len(rows), len(cols)))
    for a, r in enumerate(rows):
        for b, c in enumerate(cols):
            win = x[:, :, max(r, 0) : r + k[0], max(c, 0) : c + k[1]]
            y[:, :, a, b] = win.max(axis=(2, 3)) if op == "max" else win.sum(axis=(2, 3)) / (k[0] * k[1])
    return y


POOL_GEOMS = [  # (kernel, stride, padding, ceil, H, W): asymmetric, ceil windows in/out of the right padding
    ((2, 2), (2, 2), (1, 0), True, 5, 4),
    ((2, 2), (2, 2), (1, 1), True, 4, 5),
    ((2, 2), (2, 2), (1, 1), True, 5, 5),
    ((3, 2), (2, 1), (1, 0), False, 6, 5),
    ((2, 3), (1, 2), (0, 1), True, 4, 6),
    ((3, 3), (2, 2), (0, 0), True, 6, 7),
    ((3, 3), (2, 2), (1, 1), True, 6, 5),  # ceil extra row only
    ((3, 3), (2, 2), (1, 1), True, 6, 6),  # ceil extra row and column
]


@pytest.mark.parametrize("geom", POOL_GEOMS)
def test_pools_against_loop_and_adjoint(geom):
    k, s, p, ceil, H, W = geom
    rng = np.random.default_rng(11)
    x = rng.normal(size=(2, 3, H, W))
    t = lambda a: a.transpose(0, 2, 3, 1)  # NCHW -> NHWC  # noqa: E731
    layers = [(MaxPool2d(k, s, p, ceil_mode=ceil), "max")]
    if not ceil:
        layers.append((AvgPool2d(k, s, p), "avg"))
    for layer, op in layers:
        want = _pool_loop(x, k, s, p, ceil, op)
        assert layer.out_shape((3, H, W)) == want.shape[1:]
        y, cache = layer.fwd([], t(x))
        assert _rel(y, t(want)) <= 1e-15
        dx, gy = rng.normal(size=t(x).shape), rng.normal(size=y.shape)
        dy = layer.jvp([], cache, [], dx)[0]
        assert _rel(dy, np.imag(layer.fwd([], t(x) + 1j * H_CS * dx)[0]) / H_CS) <= 1e-15
        gx = layer.bwd([], cache, gy)[1]
        assert abs(np.sum(gy * dy) - np.sum(gx * dx)) <= EXACT * abs(np.sum(gy * dy))


def test_pool_padding_flatten_and_linear_checks():
    """Padding at most half the kernel on each axis (PyTorch); Flatten of (N, F); Linear's PyTorch init
    U(-1/sqrt(in), 1/sqrt(in)) and need_gx=True by default."""
    for kw in [dict(padding=(2, 0)), dict(padding=(0, 2))]:
        with pytest.raises(InvalidInputError, match="at most half"):
            MaxPool2d(3, **kw)
    MaxPool2d(3, padding=(1, 1))
    x = np.arange(12.0).reshape(3, 4)
    f = Flatten()
    y, cache = f.fwd([], x)
    assert np.array_equal(y, x) and np.array_equal(f.jvp([], cache, [], x)[0], x)
    lin = Linear(400, 300)
    bound = 1 / np.sqrt(400)
    for a in lin.init(np.random.default_rng(0)):
        assert np.max(np.abs(a)) <= bound and a.min() < -0.9 * bound and a.max() > 0.9 * bound
    rng = np.random.default_rng(4)
    lin = Linear(3, 2)
    P, dP = lin.init(rng), lin.init(rng)
    x, dx, gy, rgy = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.normal(size=(4, 2)), rng.normal(size=(4, 2))
    _, cache = lin.fwd(P, x)
    gx = lin.bwd(P, cache, gy)[1]
    assert gx is not None and _rel(gx, gy @ P[0]) <= 1e-15
    out = lin.rbwd(P, cache, None, gy, rgy, dP, dx)
    assert out[1] is not None and out[3] is not None
    Pc = [a + 1j * H_CS * b for a, b in zip(P, dP)]
    _, cc = lin.fwd(Pc, x + 1j * H_CS * dx)
    assert _rel(out[3], np.imag(lin.bwd(Pc, cc, gy + 1j * H_CS * rgy)[1]) / H_CS) <= EXACT


# (Sequential names, Residual names, expected paths of the body BN, the shortcut BN, the BN after the sum).
RES_NAMES = [(None, ("body", "shortcut"), "0.body.1", "0.shortcut.1", "1"),
             (None, ("", "sc"), "0.1", "0.sc.1", "1"),  # an unnamed body: its layers sit at the residual's path
             (["", "n", "f", "h"], ("a", "b"), "a.1", "b.1", "n")]  # an unnamed residual at the top


@pytest.mark.parametrize("names", RES_NAMES)
def test_network_running_stats_through_a_residual_and_mode(names):
    """Residual branches get their own paths (the paths of the batch-norm weights); 1x1-conv outputs written
    out, z = w x + b per channel; the batch norm after the sum sees body + shortcut (each normalised)."""
    seq_names, res_names, key_a, key_b, key_n = names

    def branch():
        return Sequential(Conv2d(1, 2, 1), BatchNorm2d(2, momentum=0.5))
    net = Network(Sequential(Residual(branch(), branch(), names=res_names), BatchNorm2d(2, momentum=0.5),
                             Flatten(), Linear(18, 2), names=seq_names), (1, 3, 3))
    assert {f"{k}.weight" for k in (key_a, key_b, key_n)} <= set(net.param_names)
    p = net.init(0)
    x = np.random.default_rng(0).normal(size=(4, 1, 3, 3))
    state = net.running_stats(p, x)
    assert sorted(state) == sorted([key_a, key_b, key_n])
    total = 0.0
    for key, (w, b) in [(key_a, (p[0], p[1])), (key_b, (p[4], p[5]))]:
        z = np.stack([w[o, 0, 0, 0] * x[:, 0] + b[o] for o in range(2)], axis=-1)  # (N, H, W, C)
        rm, rv, count = state[key]
        assert count == 1 and _rel(rm, 0.5 * z.mean(axis=(0, 1, 2))) <= 1e-14
        assert _rel(rv, 0.5 + 0.5 * z.reshape(-1, 2).var(axis=0, ddof=1)) <= 1e-14
        total = total + _bn_loop(z, np.ones(2), np.zeros(2), 1e-5)
    assert _rel(state[key_n][1], 0.5 + 0.5 * total.reshape(-1, 2).var(axis=0, ddof=1)) <= 1e-13


def test_network_mode_summary_and_state_checks():
    def branch():
        return Sequential(Conv2d(1, 2, 1), BatchNorm2d(2))
    net = Network([Residual(branch(), branch()), Flatten(), Linear(18, 2)], (1, 3, 3))
    assert net.mode == "train" and net.eval().mode == "eval"
    mixed = Network([Linear(2, 3), BatchNorm1d(3), BatchNorm1d(3, training=False), Linear(3, 2)], (2,))
    assert mixed.mode == "mixed" and Network([Linear(2, 2)], (2,)).mode == "train"
    assert net.summary() == ("Network(in_shape=(1, 3, 3), n_out=2, 54 parameters, batch norm train; "
                             "2xConv2d, 2xBatchNorm, 1xFlatten, 1xLinear)")  # 2 x (conv 2 + 2, bn 2 + 2) + 36 + 2
    assert repr(net).startswith("Network(Sequential(Residual(") and "loss='ce'" in repr(net)
    with pytest.raises(InvalidInputError, match="state has statistics for 'nope'"):
        net.with_state({"nope": (np.zeros(2), np.ones(2), 1)})


def test_network_checks_and_unchecked_entry_points():
    """Every argument check raises a clear InvalidInputError; the unchecked entry points equal the checked ones."""
    lin = [Linear(3, 4), Activation("tanh"), Linear(4, 2)]
    bad_nets = [(lambda: Network(lin, (3, 3)), "must be"), (lambda: Network([Conv2d(1, 2, 3)], (1, 4, 4)), "vector"),
                (lambda: Network(lin, (3,), loss="huber"), "unknown"),
                (lambda: Network([Linear(3, 1)], (3,)), "at least 2 outputs"),
                (lambda: Network(lin, (3,), param_order=[0, 1, 2, 2]), "permutation"),
                (lambda: resnet12((3, 32), 5), "must be"), (lambda: resnet12((3, 8, 32), 5), "too small"),
                (lambda: resnet12((3, 32, 32), 5, widths=(2, 2, 2)), "4 entries")]
    for make, msg in bad_nets:
        with pytest.raises(InvalidInputError, match=msg):
            make()
    assert Network(lin, 3).in_shape == (3,)
    assert resnet12((3, 16, 16), 5, widths=(2, 2, 2, 3), avg_pool=True).shapes[-2:] == ((5, 3), (5,))
    net = Network(lin, (3,))
    p = net.init(0)
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(5, 3)), np.array([0, 1, 1, 0, 1])
    v = [rng.normal(size=s) for s in net.shapes]
    for bad, msg in [(flatten(p), "list of"), (p[:3], "has 3 arrays")]:
        with pytest.raises(InvalidInputError, match=msg):
            net.loss(bad, x, y)
    for xx, msg in [(np.zeros((0, 3)), "empty")]:
        with pytest.raises(InvalidInputError, match=msg):
            net.loss(p, xx, np.zeros(0, dtype=int))
    for yy, msg in [(y[:4], "shape"), (y + 0.5, "non-integer"), (np.array(["a"] * 5), "dtype"),
                    (np.array([0, 1, 2, 0, 1]), r"labels must lie in \[0, 1\]"), (y - 1, "labels")]:
        with pytest.raises(InvalidInputError, match=msg):
            net.loss(p, x, yy)
    assert net.loss(p, x, y.astype(float)) == net.loss(p, x, y)
    with pytest.raises(InvalidInputError, match="cotangent has shape"):
        net.vjp(p, x, np.zeros((5, 3)))
    loss, g = net.loss_and_grad_unchecked(p, x, y)
    assert loss == net.loss(p, x, y) and all(np.array_equal(a, b) for a, b in zip(g, net.grad(p, x, y)))
    assert all(np.array_equal(a, b) for a, b in zip(net.hvp_unchecked(p, x, y, v), net.hvp(p, x, y, v)))
    # Regression losses take (n, d) targets, or (n,) when d = 1.
    mse = Network([Linear(3, 1)], (3,), loss="mse")
    q = mse.init(0)
    t = rng.normal(size=5)
    assert mse.loss(q, x, t) == mse.loss(q, x, t[:, None])
    with pytest.raises(InvalidInputError, match=r"expected \(5, 1\)"):
        mse.loss(q, x, np.zeros((5, 2)))
    big = Network([Linear(70, 60)], (70,))  # 4260 parameters > MAX_DENSE_HESSIAN = 4000
    with pytest.raises(InvalidInputError, match="dense Hessian"):
        big.hessian(big.init(0), rng.normal(size=(2, 70)), [0, 1])


def test_network_param_order_state_and_defaults():
    """A permuted public order is the same function of the permuted parameters (grads permuted alike); the
    head is the last Linear; with_state takes real statistics only; defaults: init(0), joint off."""
    base = Network(Sequential(Linear(3, 4), Activation("tanh"), Linear(4, 2)), (3,), loss="mse")
    order = [3, 0, 1, 2]  # public i <- tree order[i] (not an involution)
    perm = Network(Sequential(Linear(3, 4), Activation("tanh"), Linear(4, 2)), (3,), loss="mse", param_order=order)
    rng = np.random.default_rng(6)
    p = [rng.normal(size=s) for s in base.shapes]
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 2))
    pp = [p[j] for j in order]
    assert perm.loss(pp, x, y) == base.loss(p, x, y)
    assert all(np.array_equal(a, b) for a, b in zip(perm.grad(pp, x, y), [base.grad(p, x, y)[j] for j in order]))
    assert base.head_indices == (2, 3) and perm.head_indices == (0, 3)
    with pytest.raises(InvalidInputError, match="expected \\(5, 2\\)"):
        base.loss(p, x, y.T)
    one = Network([Linear(3, 1)], (3,), loss="mse")
    with pytest.raises(InvalidInputError, match="expected \\(5, 1\\)"):
        one.loss(one.init(0), x, np.zeros((1, 5)))  # a row, not a column of targets
    with pytest.raises(InvalidInputError, match="list of"):
        base.loss(5, x, y)
    with pytest.raises(InvalidInputError, match=r"expected \(n, 3\)$"):
        base.loss(p, x[:, :2], y)
    img = conv4((1, 8, 8), 2, hidden=2, ceil_mode=True)
    with pytest.raises(InvalidInputError, match=r"expected \(n, 1, 8, 8\) \(NCHW\)"):
        img.forward(img.init(0), np.zeros((2, 8, 8, 1)))
    bn = Network([Linear(2, 3), BatchNorm1d(3), Linear(3, 2)], (2,))
    with pytest.raises(InvalidInputError):
        bn.with_state({"1": (np.zeros(3) + 1j, np.ones(3), 1)})
    with pytest.raises(InvalidInputError):
        bn.with_state({"1": (np.zeros(3), np.ones(3) + 1j, 1)})
    assert all(np.array_equal(a, b) for a, b in zip(bn.init(), bn.init(0)))
    assert not bn.joint and bn.joint_batch().joint and not bn.joint_batch(False).joint
