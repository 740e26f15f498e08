"""Translate a ``torch.nn.Module`` into a reference :class:`~reference.nets.Network` (and back).

``from_torch(module, in_shape)`` reads the module tree and returns the
reference network and the module's current parameter values, in the
module's ``.parameters()`` order, with each batch-norm layer's mode
(``module.training``) and running statistics. It understands

* ``nn.Sequential`` (nested), and any container whose forward is the
  composition of its children in registration order (checked numerically);
* ``nn.Linear``, ``nn.Conv2d`` (groups=1, dilation=1, zero padding),
  ``nn.BatchNorm1d/2d``, ``nn.MaxPool2d`` (dilation=1), ``nn.AvgPool2d``
  (``count_include_pad=True``, floor mode), ``nn.AdaptiveAvgPool2d(1)``,
  ``nn.Flatten()``, ``nn.Identity``, ``nn.Dropout`` in eval mode (the
  identity), ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.ELU``, ``nn.Tanh``,
  ``nn.Sigmoid``, ``nn.Softplus``;
* a ResNet basic block recognised by structure: children ``conv1, bn1, conv2,
  bn2`` (optionally ``conv3, bn3``), one activation module (applied after each
  batch norm but the last, and after the sum), an optional ``maxpool``, and an
  optional ``downsample``/``shortcut`` (torchvision's ``BasicBlock``,
  MetaOptNet's ResNet-12 block).

Anything else is an error naming the module path and type, e.g.
``features.3: nn.GroupNorm is not supported``. A recognised structure is not
trusted blindly: the translated network's output is compared with the
module's own (float64, on a copy, in the module's modes) on a seeded random
batch, and a mismatch is an error, never a silent approximation.

``to_torch(network, params)`` builds the equivalent float64 module (used by
the tests and benchmarks as the independent torch twin).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from reference.errors import InvalidInputError
from reference.nets import layers as L
from reference.nets.network import Network

# Relative agreement required between the module's forward and the translated network's (float64).
FORWARD_CHECK_RTOL = 1e-9

_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.Tanh, nn.Sigmoid, nn.Softplus)


def _unsupported(path: str, module: nn.Module, why: str = "") -> InvalidInputError:
    where = path or "<root>"
    extra = f" ({why})" if why else ""
    return InvalidInputError(
        f"{where}: nn.{type(module).__name__} is not supported{extra}; metaverify translates Sequential, Linear, "
        "Conv2d, BatchNorm1d/2d, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), Flatten, Identity, Dropout (eval), "
        "ReLU, LeakyReLU, ELU, Tanh, Sigmoid, Softplus and ResNet basic blocks"
    )


def _join(prefix: str, name: str) -> str:
    return name if not prefix else (prefix if not name else f"{prefix}.{name}")


def _activation(path: str, m: nn.Module) -> L.Activation:
    if isinstance(m, nn.ReLU):
        return L.Activation("relu")
    if isinstance(m, nn.LeakyReLU):
        return L.Activation("leaky_relu", slope=m.negative_slope)
    if isinstance(m, nn.ELU):
        return L.Activation("elu", alpha=m.alpha)
    if isinstance(m, nn.Tanh):
        return L.Activation("tanh")
    if isinstance(m, nn.Sigmoid):
        return L.Activation("sigmoid")
    if isinstance(m, nn.Softplus):
        return L.Activation("softplus", beta=m.beta, threshold=m.threshold)
    raise _unsupported(path, m)  # pragma: no cover - guarded by the caller


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _leaf(path: str, m: nn.Module) -> L.Layer:
    if isinstance(m, nn.Linear):
        return L.Linear(m.in_features, m.out_features, bias=m.bias is not None)
    if isinstance(m, nn.Conv2d):
        if m.groups != 1:
            raise _unsupported(path, m, f"groups={m.groups}; only groups=1")
        if _pair(m.dilation) != (1, 1):
            raise _unsupported(path, m, f"dilation={m.dilation}; only 1")
        if m.padding_mode != "zeros":
            raise _unsupported(path, m, f"padding_mode={m.padding_mode!r}; only 'zeros'")
        padding = m.padding
        if isinstance(padding, str):
            if padding == "valid":
                padding = 0
            else:
                raise _unsupported(path, m, f"padding={padding!r}; give the padding as integers")
        return L.Conv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=padding,
                        bias=m.bias is not None)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        dims = 1 if isinstance(m, nn.BatchNorm1d) else 2
        kwargs: dict[str, Any] = {}
        if m.track_running_stats:
            kwargs = {
                "running_mean": m.running_mean.detach().cpu().double().numpy(),
                "running_var": m.running_var.detach().cpu().double().numpy(),
                "num_batches_tracked": int(m.num_batches_tracked.item()),
            }
        return L.BatchNorm(m.num_features, dims=dims, eps=m.eps, momentum=m.momentum, affine=m.affine,
                           track_running_stats=m.track_running_stats, training=m.training, **kwargs)
    if isinstance(m, nn.MaxPool2d):
        if _pair(m.dilation) != (1, 1) or m.return_indices:
            raise _unsupported(path, m, "dilation and return_indices are not supported")
        return L.MaxPool2d(m.kernel_size, stride=m.stride, padding=m.padding, ceil_mode=m.ceil_mode)
    if isinstance(m, nn.AvgPool2d):
        if not m.count_include_pad or m.ceil_mode or m.divisor_override is not None:
            raise _unsupported(path, m, "only count_include_pad=True, ceil_mode=False, no divisor_override")
        return L.AvgPool2d(m.kernel_size, stride=m.stride, padding=m.padding)
    if isinstance(m, nn.AdaptiveAvgPool2d):
        if _pair(m.output_size) != (1, 1):
            raise _unsupported(path, m, f"output_size={m.output_size}; only 1 (global average pooling)")
        return L.GlobalAvgPool2d()
    if isinstance(m, nn.Flatten):
        if m.start_dim != 1 or m.end_dim != -1:
            raise _unsupported(path, m, "only Flatten(start_dim=1, end_dim=-1)")
        return L.Flatten()
    if isinstance(m, nn.Identity):
        return L.Identity()
    if isinstance(m, nn.Dropout):
        if m.training and m.p > 0:
            raise _unsupported(path, m, "in train mode its mask is random; put it in eval mode (module.eval()) or "
                                        "set p=0")
        return L.Identity()
    if isinstance(m, _ACTIVATIONS):
        return _activation(path, m)
    raise _unsupported(path, m)


def _is_basic_block(m: nn.Module) -> bool:
    names = dict(m.named_children())
    return (not isinstance(m, nn.Sequential) and all(k in names for k in ("conv1", "bn1", "conv2", "bn2"))
            and any(isinstance(c, _ACTIVATIONS) for c in names.values()))


def _basic_block(path: str, m: nn.Module) -> L.Layer:
    children = dict(m.named_children())
    acts = [(n, c) for n, c in children.items() if isinstance(c, _ACTIVATIONS)]
    if len(acts) != 1:
        raise _unsupported(path, m, "a basic block needs exactly one activation module")
    act_name, act_mod = acts[0]
    n_conv = 3 if "conv3" in children and "bn3" in children else 2
    body, names = [], []
    for i in range(1, n_conv + 1):
        for nm in (f"conv{i}", f"bn{i}"):
            body.append(_leaf(_join(path, nm), children[nm]))
            names.append(nm)
        if i < n_conv:
            body.append(_activation(_join(path, act_name), act_mod))
            names.append(act_name)
    short_name = next((n for n in ("downsample", "shortcut") if n in children), None)
    known = {f"conv{i}" for i in range(1, n_conv + 1)} | {f"bn{i}" for i in range(1, n_conv + 1)} | {act_name}
    if short_name:
        known.add(short_name)
    if "maxpool" in children:
        known.add("maxpool")
    extra = [n for n in children if n not in known]
    if extra:
        raise _unsupported(path, m, f"basic block with unrecognised children {extra}")
    shortcut = _translate(_join(path, short_name), children[short_name]) if short_name else None
    res = L.Residual(L.Sequential(*body, names=names), shortcut, names=("", short_name or "shortcut"))
    tail: list[L.Layer] = [res, _activation(_join(path, act_name), act_mod)]
    tail_names = ["", act_name]
    if "maxpool" in children:
        tail.append(_leaf(_join(path, "maxpool"), children["maxpool"]))
        tail_names.append("maxpool")
    return L.Sequential(*tail, names=tail_names)


def _translate(path: str, m: nn.Module) -> L.Layer:
    if isinstance(m, TorchResidual):
        return L.Residual(_translate(_join(path, "body"), m.body), _translate(_join(path, "shortcut"), m.shortcut))
    if _is_basic_block(m):
        return _basic_block(path, m)
    children = list(m.named_children())
    if isinstance(m, nn.Sequential) or (children and not any(True for _ in m.named_parameters(recurse=False))
                                        and not _is_leaf_type(m)):
        if not children:
            return L.Identity()
        return L.Sequential(*(_translate(_join(path, n), c) for n, c in children), names=[n for n, _ in children])
    return _leaf(path, m)


def _is_leaf_type(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d,
                          nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity, nn.Dropout, *_ACTIVATIONS))


def from_torch(module: nn.Module, in_shape: Sequence[int], *, loss: str = "ce",
               check_forward: bool = True) -> tuple[Network, list[np.ndarray]]:
    """Translate ``module`` into a reference network and its current parameter values.

    Args:
        module: the ``torch.nn.Module`` (see the module docstring for what is understood).
        in_shape: the per-example input shape, ``(C, H, W)`` or ``(D,)``.
        loss: the reference loss on the module's output (``ce`` for logits).
        check_forward: compare the module's forward with the translation on a
            seeded random batch of 4 (float64, on a deep copy; default True).

    Returns:
        ``(network, params)``: ``params`` are float64 arrays in
        ``module.parameters()`` order; batch-norm modes and running
        statistics are the module's.

    Raises:
        InvalidInputError: an unsupported layer (naming its path and type),
            shared parameters, or a forward that the translation does not reproduce.
    """
    if not isinstance(module, nn.Module):
        raise InvalidInputError(f"module={module!r} must be a torch.nn.Module")
    body = _translate("", module)
    if not isinstance(body, L.Sequential):
        body = L.Sequential(body, names=[""])
    named = list(module.named_parameters())
    probe = Network(body, in_shape, loss=loss)
    tree_names = list(probe.param_names)
    torch_names = [n for n, _ in named]
    if sorted(tree_names) != sorted(torch_names) or len(set(tree_names)) != len(tree_names):
        raise InvalidInputError(
            "the module's parameters do not map one to one onto its layers (shared or unregistered parameters?): "
            f"module has {torch_names}, translation has {tree_names}"
        )
    index = {n: i for i, n in enumerate(tree_names)}
    net = Network(body, in_shape, loss=loss, param_order=[index[n] for n in torch_names])
    params = [p.detach().cpu().double().numpy().copy() for _, p in named]
    if check_forward:
        _check_forward(module, net, params)
    # The user's own module, kept so a torch harness can run *their* class (verify.backends.torch.build_model).
    net.source_module = copy.deepcopy(module).cpu()
    return net, params


def _check_forward(module: nn.Module, net: Network, params: list[np.ndarray]) -> None:
    twin = copy.deepcopy(module).double()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, *net.in_shape))
    with torch.no_grad():
        want = twin(torch.as_tensor(x)).cpu().numpy()
    got = net.forward(params, x)
    if want.shape != got.shape:
        raise InvalidInputError(f"the module's output has shape {want.shape} but its translation gives {got.shape}: "
                                "its forward is not the composition of its children; wrap it in nn.Sequential")
    err = float(np.max(np.abs(want - got)) / max(float(np.max(np.abs(want))), 1e-300))
    if not err <= FORWARD_CHECK_RTOL:
        raise InvalidInputError(
            f"the translated network's output differs from the module's by {err:.1e} (relative; tolerance "
            f"{FORWARD_CHECK_RTOL:g}): its forward is not the composition of its children in registration order "
            "(or a basic block's forward is not the standard one); express it with nn.Sequential"
        )


# ---------------------------------------------------------------------------
# Network -> torch
# ---------------------------------------------------------------------------


class TorchResidual(nn.Module):
    """``body(x) + shortcut(x)``: the torch twin of :class:`reference.nets.layers.Residual`."""

    def __init__(self, body: nn.Module, shortcut: nn.Module):
        super().__init__()
        self.body = body
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


def _torch_layer(layer: L.Layer) -> nn.Module:
    if isinstance(layer, L.Sequential):
        return nn.Sequential(*(_torch_layer(sub) for sub in layer.layers))
    if isinstance(layer, L.Residual):
        return TorchResidual(_torch_layer(layer.body), _torch_layer(layer.shortcut))
    if isinstance(layer, L.Linear):
        return nn.Linear(layer.in_features, layer.out_features, bias=layer.bias)
    if isinstance(layer, L.Conv2d):
        return nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                         padding=layer.padding, bias=layer.bias)
    if isinstance(layer, L.BatchNorm):
        cls = nn.BatchNorm1d if layer.dims == 1 else nn.BatchNorm2d
        m = cls(layer.num_features, eps=layer.eps, momentum=layer.momentum, affine=layer.affine,
                track_running_stats=layer.track_running_stats)
        if layer.track_running_stats:
            m.running_mean.copy_(torch.as_tensor(layer.running_mean))
            m.running_var.copy_(torch.as_tensor(layer.running_var))
            m.num_batches_tracked.fill_(layer.num_batches_tracked)
        m.train(layer.training)
        return m
    if isinstance(layer, L.MaxPool2d):
        return nn.MaxPool2d(layer.kernel_size, stride=layer.stride, padding=layer.padding, ceil_mode=layer.ceil_mode)
    if isinstance(layer, L.AvgPool2d):
        return nn.AvgPool2d(layer.kernel_size, stride=layer.stride, padding=layer.padding)
    if isinstance(layer, L.GlobalAvgPool2d):
        return nn.AdaptiveAvgPool2d(1)
    if isinstance(layer, L.Flatten):
        return nn.Flatten()
    if isinstance(layer, L.Identity):
        return nn.Identity()
    if isinstance(layer, L.Activation):
        return {
            "relu": lambda: nn.ReLU(),
            "leaky_relu": lambda: nn.LeakyReLU(layer.slope),
            "elu": lambda: nn.ELU(layer.alpha),
            "tanh": lambda: nn.Tanh(),
            "sigmoid": lambda: nn.Sigmoid(),
            "softplus": lambda: nn.Softplus(beta=layer.beta, threshold=layer.threshold),
            "identity": lambda: nn.Identity(),
        }[layer.name]()
    raise InvalidInputError(f"no torch twin for {layer!r}")  # pragma: no cover - every layer is covered


def to_torch(network: Network, params: Sequence[Any] | None = None, *, dtype: torch.dtype = torch.float64) -> nn.Module:
    """The equivalent ``nn.Module`` (float64 by default), loaded with ``params`` (public order).

    Its ``.parameters()`` follow the network's layer-tree order, which is the
    public order for networks built by :func:`~reference.nets.conv4`,
    :func:`~reference.nets.resnet12` or a layer list; batch-norm modes and
    running statistics are copied.
    """
    module = _torch_layer(network.body).to(dtype)
    if params is not None:
        params = network.check_params(params)
        tree = network._to_tree(params)
        with torch.no_grad():
            for p, value in zip(module.parameters(), tree):
                p.copy_(torch.as_tensor(np.asarray(value, dtype=np.float64)))
    return module


__all__ = ["FORWARD_CHECK_RTOL", "TorchResidual", "from_torch", "to_torch"]
