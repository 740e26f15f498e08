"""Reference networks beyond the MLP: convolutions, batch norm, pooling, residual blocks.

Layers with exact hand-written derivatives (:mod:`reference.nets.layers`), the
:class:`Network` model type with the interface the algorithms use
(:mod:`reference.nets.network`), the Conv4 and ResNet-12 constructors, and
the torch bridge :mod:`reference.nets.from_torch` (``reference.from_torch(module)``
translates a ``torch.nn.Module``; ``reference.nets.to_torch(network, params)``
builds one). The bridge is imported lazily: ``import reference.nets`` never
imports torch. (``reference.nets.from_torch`` is the module; the function is
``reference.from_torch`` or ``reference.nets.from_torch.from_torch``.)
"""

from __future__ import annotations

from typing import Any

from reference.nets.layers import (
    Activation,
    AvgPool2d,
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Flatten,
    GlobalAvgPool2d,
    Identity,
    Layer,
    Linear,
    MaxPool2d,
    Residual,
    Sequential,
)
from reference.nets.network import MAX_DENSE_HESSIAN, Network, conv4, resnet12, resnet_block

def __getattr__(name: str) -> Any:
    if name == "to_torch":
        import importlib

        return importlib.import_module("reference.nets.from_torch").to_torch
    raise AttributeError(f"module 'reference.nets' has no attribute {name!r}")


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
    "MAX_DENSE_HESSIAN",
    "MaxPool2d",
    "Network",
    "Residual",
    "Sequential",
    "conv4",
    "resnet12",
    "resnet_block",
]
