"""Network's contract beyond the layer passes: the constructors' published architectures, their input-size
checks, the dense-Hessian limit, and the third derivative at an exact relu kink (NumPy only, fast).

Expected values come from the papers' architectures (Finn et al. 2017's Conv4 with 64 filters; MetaOptNet's
ResNet-12, Lee et al. 2019: widths 64-160-320-640, bias-free convolutions, LeakyReLU(0.1)), from the pooling
arithmetic, and, for the kink, from the softmax cross-entropy written out in the test (its Hessian
``diag(s) - s s^T`` differentiated by a complex step).
"""

from __future__ import annotations

import numpy as np
import pytest

from reference.errors import InvalidInputError
from reference.nets import Activation, Linear, Network, conv4, resnet12
from reference.nets.network import resnet_block


class _Reached(Exception):
    pass


def test_dense_hessian_limit_is_4000_parameters_inclusive(monkeypatch):
    """Exactly 4000 parameters pass the size check (the products are not needed to see it); 4001 are refused
    with the limit named."""
    rng = np.random.default_rng(0)
    at, over = Network([Linear(3999, 1)], (3999,), loss="mse"), Network([Linear(4000, 1)], (4000,), loss="mse")
    assert (at.n_params, over.n_params) == (4000, 4001)

    def reached(*args, **kwargs):
        raise _Reached

    with monkeypatch.context() as m:
        m.setattr(Network, "_hvp", reached)
        with pytest.raises(_Reached):
            at.hessian([np.zeros(s) for s in at.shapes], rng.normal(size=(2, 3999)), np.zeros((2, 1)))
        with pytest.raises(InvalidInputError, match="has 4001 parameters; a dense Hessian is limited to 4000"):
            over.hessian([np.zeros(s) for s in over.shapes], rng.normal(size=(2, 4000)), np.zeros((2, 1)))


def _ce_hessian_third(b, u, w):
    """grad_b (u^T H(b) w) for the mean cross-entropy of logits b shared by every example: H(b) = diag(s) - s s^T
    (independent of the labels), differentiated by a complex step of the softmax written out here."""
    h = 1e-30
    out = np.empty(b.size)
    for k in range(b.size):
        bc = b + 1j * h * np.eye(b.size)[k]
        e = np.exp(bc - np.max(b))
        s = e / e.sum()
        out[k] = np.imag(u @ (np.diag(s) - np.outer(s, s)) @ w) / h
    return out


def test_third_order_at_an_exact_relu_kink_takes_pytorchs_branch():
    """All first-layer pre-activations exactly 0 (zero weights and biases): relu'(0) = 0 (PyTorch's branch),
    so the hidden layer is 0 and stays 0 under perturbations taken on that branch; the loss is then the
    cross-entropy of the output bias b2 alone. The third derivative must vanish in W1, b1, W2 and equal the
    cross-entropy's in b2 (a complex step must move only the imaginary part: a real shift of the
    parameters, however small, puts the pre-activations on the other side of the kink)."""
    rng = np.random.default_rng(3)
    net = Network([Linear(3, 4), Activation("relu"), Linear(4, 3)], (3,))
    params = [np.zeros((4, 3)), np.zeros(4), rng.normal(size=(3, 4)), rng.normal(size=3)]
    x, y = rng.normal(size=(5, 3)), np.array([0, 1, 2, 1, 0])
    u = [rng.normal(size=s) for s in net.shapes]
    w = [rng.normal(size=s) for s in net.shapes]
    third = net.third_order(params, x, y, u, w)
    for k in range(3):
        assert np.array_equal(third[k], np.zeros(net.shapes[k])), f"block {net.param_names[k]} must be 0 at the kink"
    want = _ce_hessian_third(params[3], u[3], w[3])
    assert np.max(np.abs(third[3] - want)) <= 1e-13 * np.max(np.abs(want))


def test_conv4_default_is_finns_64_filters_and_checks_each_axis():
    """Conv4 (Finn et al. 2017): 64 3x3 filters per block; at 28x28 the features are 64 x 1 x 1; a side that
    four pools of 2 reduce to 0 is refused with the hint, on either axis."""
    net = conv4((1, 28, 28), 5)
    assert net.shapes[:4] == ((64, 1, 3, 3), (64,), (64,), (64,))
    assert net.shapes[4] == (64, 64, 3, 3) and net.shapes[-2:] == ((5, 64), (5,))
    assert conv4((1, 28, 28), 5, head=False).n_out == 64
    assert conv4((3, 16, 32), 5, hidden=2, head=False).n_out == 2 * 1 * 2
    for shape in [(1, 8, 28), (1, 28, 8), (1, 15, 16), (1, 16, 15)]:
        with pytest.raises(InvalidInputError, match="too small for 4 max-pools of 2"):
            conv4(shape, 5, hidden=2)
    assert conv4((1, 8, 28), 5, hidden=2, ceil_mode=True).n_out == 5


def test_resnet12_default_is_metaoptnets():
    """MetaOptNet's ResNet-12 (Lee et al. 2019): widths 64-160-320-640, 640 x 5 x 5 features at 84x84, three
    bias-free 3x3 convolutions and a bias-free 1x1 shortcut per block (PyTorch's state_dict names)."""
    net = resnet12((3, 84, 84), 5, head=False)
    assert net.n_out == 640 * 5 * 5
    block = ["conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight", "bn2.weight", "bn2.bias",
             "conv3.weight", "bn3.weight", "bn3.bias", "downsample.0.weight", "downsample.1.weight",
             "downsample.1.bias"]
    assert net.param_names == tuple(f"layer{i}.{n}" for i in range(1, 5) for n in block)
    widths = [3, 64, 160, 320, 640]
    for i in range(4):
        shapes = dict(zip(net.param_names, net.shapes))
        cin, cout = widths[i], widths[i + 1]
        assert shapes[f"layer{i + 1}.conv1.weight"] == (cout, cin, 3, 3)
        assert shapes[f"layer{i + 1}.conv2.weight"] == (cout, cout, 3, 3)
        assert shapes[f"layer{i + 1}.downsample.0.weight"] == (cout, cin, 1, 1)
    with pytest.raises(InvalidInputError, match="too small for 4 max-pools of 2"):
        resnet12((3, 84, 8), 5, widths=(2, 2, 2, 2))
    with pytest.raises(InvalidInputError, match="too small for 4 max-pools of 2"):
        resnet12((3, 8, 84), 5, widths=(2, 2, 2, 2))


def test_resnet_block_uses_leaky_relu_01():
    """MetaOptNet's BasicBlock: LeakyReLU(0.1) after the first two convolutions and after the sum."""
    block = resnet_block(2, 3)
    leaves = []

    def walk(layer):
        subs = layer.sublayers()
        if not subs:
            leaves.append(layer)
        for _, sub in subs:
            walk(sub)

    walk(block)
    acts = [a for a in leaves if isinstance(a, Activation)]
    assert len(acts) == 3
    z = np.array([[-2.0, -0.5, 0.0, 1.5]])
    for a in acts:
        np.testing.assert_allclose(a.fwd([], z)[0], [[-0.2, -0.05, 0.0, 1.5]], rtol=1e-15, atol=0)
