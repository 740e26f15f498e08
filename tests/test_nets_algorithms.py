"""Every reference algorithm on convolutional networks (reference.nets), against the engine.

Table-driven: each row is an algorithm's meta-loss and claimed meta-gradient on
a small Conv4 (or a Conv4 feature extractor for the closed-form heads); the
claimed gradient must pass ``verify.check_gradient`` (complex step of the
meta-loss: the layers are complex-safe, branches on the real part). Small
images (1x8x8, ceil-mode pooling) keep it fast.
"""

from __future__ import annotations

import numpy as np
import pytest

from reference import anil, imaml, lrd2, maml, matchingnet, metasgd, newton, protonet, r2d2, reptile
from reference.errors import InvalidInputError
from reference.models import flatten, unflatten
from reference.nets import Activation, BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, Network, conv4
from reference.tasks import Task
from verify import PASS, check_gradient

N_WAY = 3


def _images(rng, n):
    return rng.normal(size=(n, 1, 8, 8))


def _tasks(seed=0, n_tasks=2, shot=1, query=2, binary=False):
    rng = np.random.default_rng(seed)
    k = 2 if binary else N_WAY
    out = []
    for _ in range(n_tasks):
        ys = np.repeat(np.arange(k), shot)
        yq = np.repeat(np.arange(k), query)
        out.append(Task(_images(rng, ys.size), ys, _images(rng, yq.size), yq))
    return out


def _classifier():
    return conv4((1, 8, 8), N_WAY, hidden=2, ceil_mode=True)


def _tanh_net():
    # Smooth and small (for iMAML's inner solve and Newton-MAML's dense Hessians).
    return Network([Conv2d(1, 2, 3, padding=1), BatchNorm2d(2), Activation("tanh"), MaxPool2d(4), Flatten(),
                    Linear(8, N_WAY)], (1, 8, 8))


def _features():
    return conv4((1, 8, 8), 0, hidden=3, ceil_mode=True, head=False)


def _smooth_features():
    # elu and no final relu: no feature vector vanishes (Matching nets' cosine needs nonzero features).
    return Network([Conv2d(1, 3, 3, padding=1), BatchNorm2d(3), Activation("elu"), MaxPool2d(2), Conv2d(3, 4, 3),
                    Flatten()], (1, 8, 8))


def _params(net, seed=0):
    rng = np.random.default_rng(seed)
    return [p + 0.1 * rng.normal(size=p.shape) for p in net.init(seed)]


ALGORITHMS = {
    "maml": (_classifier, lambda m, p, t: maml.meta_loss(m, p, t, 0.3, 2),
             lambda m, p, t: maml.meta_loss_and_grad(m, p, t, 0.3, 2)[1]),
    "anil": (_classifier, lambda m, p, t: anil.meta_loss(m, p, t, 0.3, 3),
             lambda m, p, t: anil.meta_loss_and_grad(m, p, t, 0.3, 3)[1]),
    "metasgd": (_classifier,
                lambda m, p, t: metasgd.meta_loss(m, p, [np.full(s, 0.2) for s in m.shapes], t, 2),
                lambda m, p, t: metasgd.meta_loss_and_grad(m, p, [np.full(s, 0.2) for s in m.shapes], t, 2)[1]),
    "newton": (_tanh_net, lambda m, p, t: newton.meta_loss(m, p, t, 0.5, 1, damping=1.0),
               lambda m, p, t: newton.meta_loss_and_grad(m, p, t, 0.5, 1, damping=1.0)[1]),
    "imaml": (_tanh_net, lambda m, p, t: imaml.meta_loss(m, p, t, 5.0),
              lambda m, p, t: imaml.meta_loss_and_grad(m, p, t, 5.0)[1]),
    "r2d2": (_features, lambda m, p, t: r2d2.meta_loss(m, p, t, N_WAY, 1.0, 1.0, 0.0),
             lambda m, p, t: r2d2.meta_loss_and_grad(m, p, t, N_WAY, 1.0, 1.0, 0.0)[1]),
    "protonet": (_features, lambda m, p, t: protonet.loss(m, p, t, N_WAY),
                 lambda m, p, t: protonet.loss_and_grad(m, p, t, N_WAY)[1]),
    "matchingnet": (_smooth_features, lambda m, p, t: matchingnet.loss(m, p, t, N_WAY),
                    lambda m, p, t: matchingnet.loss_and_grad(m, p, t, N_WAY)[1]),
}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_meta_gradient_on_conv_networks(name):
    build, loss, grad = ALGORITHMS[name]
    net = build()
    p = _params(net)
    # One task for the dense-Hessian algorithms (their complex-step meta-loss is the slow part).
    tasks = _tasks(n_tasks=1 if name in ("newton", "imaml") else 2)
    g = flatten(grad(net, p, tasks))
    verdict = check_gradient(lambda z: loss(net, unflatten(z, net.shapes), tasks), g, flatten(p), budget="fast")
    assert verdict.status == PASS, f"{name}: {verdict.reason}"


def test_lrd2_on_a_conv_feature_extractor():
    net = _features()
    p = _params(net)
    tasks = _tasks(binary=True)
    g = flatten(lrd2.meta_loss_and_grad(net, p, tasks, 1.0, 1.0, 0.0, 3)[1])
    verdict = check_gradient(lambda z: lrd2.meta_loss(net, unflatten(z, net.shapes), tasks, 1.0, 1.0, 0.0, 3), g,
                             flatten(p), budget="fast")
    assert verdict.status == PASS, verdict.reason


def test_reptile_direction_is_alpha_times_support_gradient_for_one_step():
    net = _classifier()
    p = _params(net)
    tasks = _tasks()
    d = reptile.direction(net, p, tasks, 0.3, 1)
    want = [0.3 * sum(gs) / len(tasks) for gs in zip(*(net.grad(p, t.x_support, t.y_support) for t in tasks))]
    assert np.max(np.abs(flatten(d) - flatten(want))) <= 1e-14 * np.max(np.abs(flatten(want)))


def test_feature_batches_separate_by_default_and_joint_on_request():
    """Train-mode batch norm: support and query normalised separately (transductive) unless joint_batch()."""
    net = _features()
    p = _params(net)
    tasks = _tasks()
    sep = protonet.loss(net, p, tasks, N_WAY)
    joint = protonet.loss(net.joint_batch(), p, tasks, N_WAY)
    assert abs(sep - joint) > 1e-6
    # The separate default equals features computed batch by batch by hand.
    t = tasks[0]
    zs, zq = net.forward(p, t.x_support), net.forward(p, t.x_query)
    zj = net.forward(p, np.concatenate([t.x_support, t.x_query]))
    from reference.features import TaskFeatures

    f = TaskFeatures(net, p, t, "t")
    assert np.array_equal(f.support, zs) and np.array_equal(f.query, zq)
    fj = TaskFeatures(net.joint_batch(), p, t, "t")
    assert np.allclose(np.concatenate([fj.support, fj.query]), zj, rtol=0, atol=1e-14)
    # Eval mode: rows independent, both choices coincide.
    ev = net.eval()
    assert abs(protonet.loss(ev, p, tasks, N_WAY) - protonet.loss(ev.joint_batch(), p, tasks, N_WAY)) <= 1e-14
    # The joint gradient is right too.
    g = flatten(protonet.loss_and_grad(net.joint_batch(), p, tasks, N_WAY)[1])
    verdict = check_gradient(lambda z: protonet.loss(net.joint_batch(), unflatten(z, net.shapes), tasks, N_WAY), g,
                             flatten(p), budget="fast")
    assert verdict.status == PASS, verdict.reason


def test_backbone_type_error_names_both_model_types():
    with pytest.raises(InvalidInputError, match="reference.nets.Network"):
        protonet.loss(object(), [], _tasks(), N_WAY)
