"""The JAX backend on reference.nets networks (conv, batch norm, pooling, residual) against the reference."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("jax")

import backend_helpers as H  # noqa: E402

from reference import anil as r_anil  # noqa: E402
from reference import maml as r_maml  # noqa: E402
from reference import protonet as r_proto  # noqa: E402
from reference.nets import (  # noqa: E402
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
from reference.tasks import Task  # noqa: E402
from verify.backends.jax import anil, maml, protonet  # noqa: E402
from verify.backends.jax._model import build_loss  # noqa: E402

N_WAY = 3
# float64: autodiff vs hand-written derivatives, both exact; summation order only.
TOL64 = 1e-10


def _tasks(shape=(1, 8, 8), n_tasks=2, seed=0):
    rng = np.random.default_rng(seed)
    return [Task(rng.normal(size=(N_WAY, *shape)), np.arange(N_WAY), rng.normal(size=(2 * N_WAY, *shape)),
                 np.repeat(np.arange(N_WAY), 2)) for _ in range(n_tasks)]


def _mixed():
    body = Sequential(Conv2d(2, 3, 3, stride=2, padding=1), BatchNorm2d(3), Activation("elu"),
                      Conv2d(3, 3, 3, padding=1, bias=False))
    return Network([Residual(body, Sequential(Conv2d(2, 3, 1, stride=2), BatchNorm2d(3))),
                    Activation("leaky_relu", slope=0.2), AvgPool2d(2, padding=1), Activation("softplus"),
                    MaxPool2d(2, ceil_mode=True), GlobalAvgPool2d(), Flatten(), Linear(3, 4), BatchNorm1d(4),
                    Activation("sigmoid"), Linear(4, N_WAY)], (2, 8, 8))


NETS = {
    "conv4": (lambda: conv4((1, 8, 8), N_WAY, hidden=2, ceil_mode=True), (1, 8, 8)),
    "conv4-eval": (lambda: conv4((1, 8, 8), N_WAY, hidden=2, ceil_mode=True).eval(), (1, 8, 8)),
    "mixed": (_mixed, (2, 8, 8)),
    "resnet12-tiny": (lambda: resnet12((3, 16, 16), N_WAY, widths=(2, 2, 3, 3)), (3, 16, 16)),
}


# The MAML/ANIL/ProtoNets comparisons take minutes on a loaded 2-core machine (JAX's op-by-op dispatch and
# compilation through the inner loop): slow. CI keeps the kink test (seconds).
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NETS))
def test_jax_maml_matches_reference(name):
    build, shape = NETS[name]
    net = build()
    rng = np.random.default_rng(0)
    p = [a + 0.1 * rng.normal(size=a.shape) for a in net.init(0)]
    tasks = _tasks(shape)
    want = r_maml.meta_loss_and_grad(net, p, tasks, 0.3, 2)
    got = maml.meta_loss_and_grad(net, p, tasks, 0.3, 2, dtype="float64")
    assert abs(float(got[0]) - want[0]) <= TOL64 * abs(want[0])
    assert H.rel_err(got[1], want[1]) <= TOL64


@pytest.mark.slow
def test_jax_anil_head_is_the_last_linear():
    net = conv4((1, 8, 8), N_WAY, hidden=2, ceil_mode=True)
    p = net.init(0)
    tasks = _tasks()
    want = r_anil.meta_loss_and_grad(net, p, tasks, 0.3, 2)
    got = anil.meta_loss_and_grad(net, p, tasks, 0.3, 2, dtype="float64")
    assert H.rel_err(got[1], want[1]) <= TOL64


@pytest.mark.slow
def test_jax_feature_batches_follow_the_spec():
    net = conv4((1, 8, 8), 0, hidden=3, ceil_mode=True, head=False)
    p = net.init(0)
    tasks = _tasks()
    for spec in (net, net.joint_batch()):
        want = r_proto.loss_and_grad(spec, p, tasks, N_WAY)
        got = protonet.loss_and_grad(spec, p, tasks, N_WAY, dtype="float64")
        assert abs(float(got[0]) - want[0]) <= TOL64 * abs(want[0])
        assert H.rel_err(got[1], want[1]) <= TOL64


def test_jax_kinks_follow_pytorch_convention():
    """Exact relu/leaky_relu zeros and max-pool ties: the JAX twin's autodiff agrees with the reference."""
    import jax

    rng = np.random.default_rng(0)
    x = np.kron(np.round(rng.normal(size=(4, 2, 3, 3))), np.ones((1, 1, 2, 2)))
    y = rng.integers(0, 3, size=4)
    for act in ("relu", "leaky_relu"):
        net = Network([Conv2d(2, 3, 1, bias=False), Activation(act, slope=0.3), MaxPool2d(2), Flatten(),
                       Linear(27, 3)], (2, 6, 6))
        p = net.init(1)
        p[0] = np.round(p[0] * 4)
        loss = build_loss(net)
        g = jax.grad(lambda q: loss(q, jax.numpy.asarray(x), jax.numpy.asarray(y)))([jax.numpy.asarray(a) for a in p])
        assert H.rel_err([np.asarray(a) for a in g], net.grad(p, x, y)) <= TOL64
