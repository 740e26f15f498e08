"""The reference networks against PyTorch float64 autograd (gradient, double backward, MAML) and from_torch."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

import reference  # noqa: E402
from reference import maml  # noqa: E402
from reference.errors import InvalidInputError  # noqa: E402
from reference.models import flatten  # noqa: E402
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
    to_torch,
)
from reference.tasks import Task  # noqa: E402

# Two exact computations in float64 (hand-written R-operators vs autograd's double backward) differ
# only by summation order: a few hundred ulps of the largest entry.
EXACT = 1e-12


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


def _torch_grad_hvp(module, params, x, y, v, loss="ce"):
    names = [n for n, _ in module.named_parameters()]
    tp = [torch.tensor(a, requires_grad=True) for a in params]
    out = functional_call(module, dict(zip(names, tp)), (torch.tensor(x),))
    L = F.cross_entropy(out, torch.tensor(y)) if loss == "ce" else F.mse_loss(out, torch.tensor(y))
    g = torch.autograd.grad(L, tp, create_graph=True)
    hv = torch.autograd.grad(sum((gi * torch.tensor(vi)).sum() for gi, vi in zip(g, v)), tp, allow_unused=True)
    hv = [torch.zeros_like(t) if h is None else h for h, t in zip(hv, tp)]
    return L.item(), [t.detach().numpy() for t in g], [t.numpy() for t in hv]


def _small(act):
    return [Conv2d(2, 3, 3, stride=2, padding=1, bias=False), BatchNorm2d(3), Activation(act),
            AvgPool2d(2, padding=1), Conv2d(3, 4, 2), BatchNorm2d(4, track_running_stats=False), Activation(act),
            MaxPool2d(2, ceil_mode=True), Flatten(), Linear(4, 5), BatchNorm1d(5), Activation(act), Linear(5, 3)]


def _resblock():
    body = Sequential(Conv2d(2, 3, 3, padding=1), BatchNorm2d(3), Activation("elu"), Conv2d(3, 3, 3, padding=1))
    short = Sequential(Conv2d(2, 3, 1, bias=False), BatchNorm2d(3))
    return [Residual(body, short), Activation("softplus"), GlobalAvgPool2d(), Flatten(), Linear(3, 3)]


CASES = {
    **{f"small-{a}": (lambda a=a: Network(_small(a), (2, 9, 9)), 6)
       for a in ("relu", "leaky_relu", "elu", "tanh", "sigmoid", "softplus")},
    "small-eval": (lambda: Network(_small("tanh"), (2, 9, 9)).eval(), 6),
    "residual": (lambda: Network(_resblock(), (2, 6, 6)), 5),
    "conv4-28": (lambda: conv4((1, 28, 28), 5, hidden=4), 5),
    "conv4-8-ceil": (lambda: conv4((1, 8, 8), 5, hidden=3, ceil_mode=True), 5),
    "resnet12-tiny": (lambda: resnet12((3, 16, 16), 5, widths=(2, 3, 4, 5)), 5),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_grad_and_hvp_match_torch_double_backward(name):
    build, n = CASES[name]
    net = build()
    rng = np.random.default_rng(0)
    p = [a + 0.2 * rng.normal(size=a.shape) for a in net.init(0)]
    x = rng.normal(size=(n, *net.in_shape))
    y = rng.integers(0, net.n_out, size=n)
    v = [rng.normal(size=s) for s in net.shapes]
    loss, g, hv = net._grad_and_hvp(p, x, y, v)
    t_loss, t_g, t_hv = _torch_grad_hvp(to_torch(net, p), p, x, y, v)
    assert abs(loss - t_loss) <= EXACT * abs(t_loss)
    assert _rel(flatten(g), flatten(t_g)) <= EXACT
    assert _rel(flatten(hv), flatten(t_hv)) <= EXACT


def test_kinks_agree_with_torch_exactly():
    """Exact zeros before relu/leaky_relu and exact max-pool ties: PyTorch's one-sided convention.

    Inputs built from constant 2x2 blocks and a 1x1 convolution make every max-pool window a tie;
    a zero bias and inputs with exact zeros put relu pre-activations exactly at 0. Another convention
    (e.g. the last index, or relu'(0) = 1) changes the gradient by O(1), so agreement to round-off
    means the same convention.
    """
    rng = np.random.default_rng(0)
    blocks = np.round(rng.normal(size=(4, 2, 3, 3)))  # integers: many exact zeros
    x = np.kron(blocks, np.ones((1, 1, 2, 2)))
    for act in ("relu", "leaky_relu"):
        net = Network([Conv2d(2, 3, 1, bias=False), Activation(act), MaxPool2d(2), Conv2d(3, 2, 1),
                       Activation(act), Flatten(), Linear(2 * 3 * 3, 3)], (2, 6, 6))
        p = net.init(1)
        p[0] = np.round(p[0] * 4)  # integer weights: exact zeros and exact ties survive the 1x1 conv
        p[2] = np.round(p[2] * 4)
        p[3] = np.zeros_like(p[3])
        z = np.einsum("oc,nchw->nohw", p[0][:, :, 0, 0], x)
        assert np.sum(z == 0) > 10  # kinks really present
        y = rng.integers(0, 3, size=4)
        v = [rng.normal(size=s) for s in net.shapes]
        loss, g, hv = net._grad_and_hvp(p, x, y, v)
        _, t_g, t_hv = _torch_grad_hvp(to_torch(net, p), p, x, y, v)
        assert _rel(flatten(g), flatten(t_g)) <= EXACT
        assert _rel(flatten(hv), flatten(t_hv)) <= EXACT
        # input gradient (routes through the tied windows)
        c = rng.normal(size=(4, 3))
        _, gx = net.vjp(p, x, c, wrt_input=True)
        tx = torch.tensor(x, requires_grad=True)
        (to_torch(net, p)(tx) * torch.tensor(c)).sum().backward()
        assert _rel(gx, tx.grad.numpy()) <= EXACT


def test_running_stats_match_torch_after_a_train_forward():
    net = resnet12((3, 16, 16), 4, widths=(2, 3, 4, 5))
    p = net.init(0)
    x = np.random.default_rng(0).normal(size=(3, 3, 16, 16))
    module = to_torch(net, p)
    module.train()
    with torch.no_grad():
        module(torch.tensor(x))
    net2, _ = reference.from_torch(module, net.in_shape)
    state = net.running_stats(p, x)
    got = net2.state()  # paths are the twin's (0.0.body.1, ...); both are in layer order
    assert len(state) == len(got) == 16  # 4 blocks x (3 + 1 shortcut)
    for (m, v, c), (tm, tv, tc) in zip(state.values(), got.values()):
        assert _rel(m, tm) <= 1e-13 and _rel(v, tv) <= 1e-13 and c == tc == 1


def test_maml_meta_gradient_matches_torch_create_graph():
    net = conv4((1, 16, 16), 3, hidden=4)
    rng = np.random.default_rng(0)
    p = net.init(0)
    tasks = [Task(rng.normal(size=(3, 1, 16, 16)), np.arange(3), rng.normal(size=(6, 1, 16, 16)),
                  np.repeat(np.arange(3), 2)) for _ in range(2)]
    loss, g = maml.meta_loss_and_grad(net, p, tasks, 0.1, 3)
    module = to_torch(net, p)
    names = [n for n, _ in module.named_parameters()]
    theta = [torch.tensor(a, requires_grad=True) for a in p]
    total = 0
    for t in tasks:
        q = theta
        for _ in range(3):
            out = functional_call(module, dict(zip(names, q)), (torch.tensor(t.x_support),))
            gr = torch.autograd.grad(F.cross_entropy(out, torch.tensor(t.y_support)), q, create_graph=True)
            q = [a - 0.1 * b for a, b in zip(q, gr)]
        out = functional_call(module, dict(zip(names, q)), (torch.tensor(t.x_query),))
        total = total + F.cross_entropy(out, torch.tensor(t.y_query)) / len(tasks)
    t_g = torch.autograd.grad(total, theta)
    assert abs(loss - total.item()) <= EXACT * abs(total.item())
    assert _rel(flatten(g), flatten([a.numpy() for a in t_g])) <= EXACT


# ---------------------------------------------------------------------------
# from_torch
# ---------------------------------------------------------------------------


class TorchvisionStyleBlock(nn.Module):
    """torchvision's BasicBlock layout: conv1, bn1, relu, conv2, bn2, downsample."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class ShortcutFirstBlock(nn.Module):
    """MetaOptNet-like block registering its shortcut first: parameter order differs from use order."""

    def __init__(self, cin, cout):
        super().__init__()
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act = nn.LeakyReLU(0.1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv3 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.maxpool = nn.MaxPool2d(2)

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.maxpool(self.act(out + self.shortcut(x)))


class Model(nn.Module):
    """A user model: features then a head, a container whose forward is its children in order."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(TorchvisionStyleBlock(2, 3), nn.Sequential(ShortcutFirstBlock(3, 4)),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.features(x))


def test_from_torch_user_model_with_blocks_and_permuted_parameters():
    torch.manual_seed(0)
    module = Model().double()
    with torch.no_grad():  # non-trivial BN state and affine parameters
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    net, p = reference.from_torch(module, (2, 8, 8))
    assert list(net.param_names) == [n for n, _ in module.named_parameters()]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 2, 8, 8))
    y = rng.integers(0, 3, size=4)
    v = [rng.normal(size=s) for s in net.shapes]
    for mode in ("train", "eval"):
        module.train(mode == "train")
        net, p = reference.from_torch(module, (2, 8, 8))
        assert net.mode == mode
        loss, g, hv = net._grad_and_hvp(p, x, y, v)
        t_loss, t_g, t_hv = _torch_grad_hvp(module, p, x, y, v)
        assert abs(loss - t_loss) <= EXACT * abs(t_loss)
        assert _rel(flatten(g), flatten(t_g)) <= EXACT
        assert _rel(flatten(hv), flatten(t_hv)) <= EXACT


def test_from_torch_round_trip_of_resnet12():
    net = resnet12((3, 16, 16), 5, widths=(2, 3, 4, 5))
    p = net.init(3)
    net2, p2 = reference.from_torch(to_torch(net, p), (3, 16, 16))
    assert net2.shapes == net.shapes
    assert all(np.array_equal(a, b) for a, b in zip(p, p2))


class _GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Identity(), nn.GroupNorm(2, 4))


class _Swapped(nn.Module):
    """Children registered in an order its forward does not follow."""

    def __init__(self):
        super().__init__()
        self.b = nn.Linear(4, 2)
        self.a = nn.Linear(3, 4)

    def forward(self, x):
        return self.b(self.a(x))


def test_from_torch_errors_name_the_module():
    with pytest.raises(InvalidInputError, match=r"features\.3: nn\.GroupNorm is not supported"):
        reference.from_torch(_GroupNormNet(), (1, 8, 8))
    with pytest.raises(InvalidInputError, match=r"1: nn\.Dropout is not supported.*eval mode"):
        reference.from_torch(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Linear(3, 2)), (3,))
    # eval-mode dropout is the identity
    net, _ = reference.from_torch(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Linear(3, 2)).eval(), (3,))
    assert net.n_params == 3 * 3 + 3 + 3 * 2 + 2
    with pytest.raises(InvalidInputError, match="registration order|does not map|expects"):
        reference.from_torch(_Swapped(), (3,))
    with pytest.raises(InvalidInputError, match="groups=2"):
        reference.from_torch(nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)), (2, 5, 5))


def test_import_reference_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, reference, reference.nets; reference.nets.conv4((1, 28, 28), 5); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _zoo():
    """Small float64 modules covering every translated leaf type and option (asymmetric conv geometry)."""
    acts = [nn.ReLU(), nn.LeakyReLU(0.2), nn.ELU(alpha=0.7), nn.Tanh(), nn.Sigmoid(), nn.Softplus(beta=2.0,
                                                                                                  threshold=5.0)]
    mods = [nn.Sequential(nn.Linear(3, 4), a, nn.Linear(4, 2)) for a in acts]
    mods.append(nn.Sequential(nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0)), nn.BatchNorm2d(3), nn.ELU(),
                              nn.Conv2d(3, 2, (2, 3), padding="valid"), nn.AvgPool2d(2, stride=1),
                              nn.Flatten(), nn.Linear(2 * 2 * 2, 5), nn.BatchNorm1d(5), nn.Tanh(),
                              nn.Dropout(0.0), nn.Linear(5, 2)))
    mods.append(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.MaxPool2d(2, ceil_mode=True),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Identity(), nn.Linear(2, 2)))
    return mods


@pytest.mark.parametrize("check", [True, False])
def test_from_torch_leaf_translations_match_torch_forward(check):
    """Every leaf type and option through from_torch: the network's forward equals torch's in float64."""
    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    for i, m in enumerate(_zoo()):
        m = m.double().train(i % 2 == 0)
        in_shape = (3,) if isinstance(m[0], nn.Linear) else (2, 7, 6)
        if i % 2 == 1:  # eval mode with non-trivial running statistics
            for b in m.modules():
                if isinstance(b, (nn.BatchNorm1d, nn.BatchNorm2d)):
                    b.running_mean.normal_()
                    b.running_var.uniform_(0.5, 2.0)
        net, p = reference.from_torch(m, in_shape, check_forward=check)
        x = rng.normal(size=(5, *in_shape)) * 3
        with torch.no_grad():
            want = m(torch.from_numpy(x)).numpy()
        assert _rel(net.forward(p, x), want) <= 1e-12, (i, m)
        assert list(net.param_names) == [n for n, _ in m.named_parameters()]
    # A bare leaf as the root module (no parent name), inside a nested Sequential (dotted names).
    for m in (nn.Linear(3, 2), nn.Sequential(nn.Sequential(nn.Linear(3, 2), nn.Tanh()), nn.Linear(2, 2))):
        net, p = reference.from_torch(m.double(), (3,), check_forward=check)
        assert list(net.param_names) == [n for n, _ in m.named_parameters()]
        x = rng.normal(size=(4, 3))
        with torch.no_grad():
            assert _rel(net.forward(p, x), m(torch.from_numpy(x)).numpy()) <= 1e-12


def test_from_torch_rejects_unsupported_options():
    bad = [nn.AvgPool2d(2, count_include_pad=False), nn.AvgPool2d(2, ceil_mode=True),
           nn.AvgPool2d(2, divisor_override=3), nn.MaxPool2d(2, dilation=2), nn.MaxPool2d(2, return_indices=True),
           nn.Flatten(start_dim=2),
           nn.Flatten(end_dim=2), nn.Conv2d(2, 2, 3, padding="same"), nn.Dropout(0.1),
           nn.AdaptiveAvgPool2d((1, 2)), nn.AdaptiveAvgPool2d((2, 1)), nn.Conv2d(2, 2, 1, dilation=(1, 2)),
           nn.Conv2d(2, 2, 1, dilation=(2, 1))]
    for m in bad:
        with pytest.raises(InvalidInputError, match="not supported"):
            reference.from_torch(nn.Sequential(nn.Conv2d(2, 2, 1), m), (2, 6, 6), check_forward=False)


class _Scaled(nn.Sequential):
    """A Sequential whose forward is not the composition of its children: the output times (1 + 1e-8)."""

    def forward(self, x):
        return super().forward(x) * (1 + 1e-8)


def test_from_torch_forward_check_is_relative_and_on_by_default():
    """The forward check (on by default) compares relatively at 1e-9: a 1e-8 relative deviation of a small
    (~1e-3) output is caught, an all-zero output (0 / 0) is not a false alarm, check_forward=False skips it."""
    lin = nn.Linear(3, 2).double()
    with torch.no_grad():
        lin.weight.mul_(1e-3)
        lin.bias.mul_(1e-3)
    with pytest.raises(InvalidInputError, match="differs from the module's"):
        reference.from_torch(_Scaled(lin), (3,))
    net, p = reference.from_torch(_Scaled(lin), (3,), check_forward=False)
    assert net.n_params == 8
    zero = nn.Sequential(nn.Linear(3, 2)).double()
    with torch.no_grad():
        zero[0].weight.zero_()
        zero[0].bias.zero_()
    reference.from_torch(zero, (3,))


class _Container(nn.Module):
    """A parameterless custom container (not a basic block) whose forward is its children in order."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.act = nn.Tanh()
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        return self.b(self.act(self.a(x)))


def test_from_torch_custom_container_with_an_activation_is_not_a_basic_block():
    m = _Container().double()
    net, p = reference.from_torch(m, (3,))
    assert list(net.param_names) == ["a.weight", "a.bias", "b.weight", "b.bias"]
    x = np.random.default_rng(0).normal(size=(4, 3))
    with torch.no_grad():
        assert _rel(net.forward(p, x), m(torch.from_numpy(x)).numpy()) <= 1e-12


class _OwnParam(nn.Module):
    """A module with a parameter of its own and a child: not a container, so not supported."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(2, dtype=torch.float64))
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x) * self.scale


def test_from_torch_errors_give_the_dotted_path_and_reject_own_parameters():
    nested = nn.Sequential(nn.Conv2d(2, 2, 1), nn.Sequential(nn.Conv2d(2, 2, 1), nn.GroupNorm(1, 2)))
    with pytest.raises(InvalidInputError, match=r"^1\.1: nn\.GroupNorm is not supported"):
        reference.from_torch(nested, (2, 6, 6))
    with pytest.raises(InvalidInputError, match=r"^<root>: nn\.GroupNorm is not supported"):
        reference.from_torch(nn.GroupNorm(1, 2), (2, 6, 6))
    with pytest.raises(InvalidInputError, match=r"^<root>: nn\._OwnParam is not supported"):
        reference.from_torch(_OwnParam(), (3,))


class _Block(nn.Module):
    """A ResNet basic block (conv1, bn1, relu, conv2, bn2) with one extra child named ``extra``."""

    def __init__(self, extra):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)
        self.relu = nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)
        setattr(self, extra, nn.Conv2d(2, 2, 1) if extra.startswith("conv") else nn.BatchNorm2d(2))


@pytest.mark.parametrize("extra", ["conv0", "conv3", "bn0", "bn3"])
def test_from_torch_basic_block_rejects_an_unrecognised_child(extra):
    """conv3 without bn3 (or the reverse) is not a 3-conv block; conv0/bn0 are nothing; each is named."""
    with pytest.raises(InvalidInputError, match=rf"unrecognised children \['{extra}'\]"):
        reference.from_torch(nn.Sequential(_Block(extra)), (2, 5, 5))


def test_from_torch_rejects_tied_parameters():
    """A weight shared by two layers appears once in named_parameters but twice in the translation."""
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    with pytest.raises(InvalidInputError, match="one to one"):
        reference.from_torch(nn.Sequential(a, nn.Tanh(), b), (3,))
