"""Model, loss, dtype/device and conversion helpers shared by the torch backend.

The model is the PyTorch module a practitioner would write for a
``reference.models.MLP`` spec, ``nn.Sequential(nn.Linear, act, ..., nn.Linear)``,
loaded with the given parameters and used functionally through
:func:`torch.func.functional_call`, so the algorithms can differentiate through
the inner loop with respect to a parameter list (CONVENTIONS order
``[W1, b1, ..., WL, bL]`` is exactly ``nn.Sequential.parameters()`` order).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from reference.validation import check_finite_scalar
from reference.errors import InvalidInputError
from reference.tasks import as_tasks, check_tasks
from verify.tolerance import TF32_EPS

DTYPES: dict[str, torch.dtype] = {"float64": torch.float64, "float32": torch.float32}

# nn.Softplus returns x itself above ``threshold`` (default 20). At z = 20 that is
# off from log(1 + e^z) by e^-20 ~ 2e-9 in the value and in the derivative, which
# a 1e-10 float64 check would flag as a (false) disagreement with CONVENTIONS.
# Above 40, e^-z < 2^-57 so the cut-off is exact in float64, and exp(40) ~ 2e17
# is still finite in float32.
SOFTPLUS_THRESHOLD = 40.0


def _activation_module(name: str) -> nn.Module:
    if name == "tanh":
        return nn.Tanh()
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "softplus":
        return nn.Softplus(beta=1.0, threshold=SOFTPLUS_THRESHOLD)
    if name == "relu":
        return nn.ReLU()  # derivative 0 at 0, as CONVENTIONS says
    if name == "identity":
        return nn.Identity()
    raise InvalidInputError(f"activation={name!r} is unknown; choose tanh, sigmoid, softplus, relu or identity")


# ---------------------------------------------------------------------------
# dtype, device, TF32
# ---------------------------------------------------------------------------


def resolve_dtype(dtype: Any) -> torch.dtype:
    """``"float64"`` / ``"float32"`` (or the torch dtypes) -> ``torch.dtype``."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise InvalidInputError(f"dtype={dtype!r} is not supported; use 'float64' or 'float32'")


def resolve_device(device: Any) -> torch.device:
    """Validate ``device`` ("cpu", "cuda", "cuda:1", or a ``torch.device``).

    Raises:
        InvalidInputError: for an unknown device string, or a CUDA device on a
            machine where ``torch.cuda.is_available()`` is False.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInputError(f"device={device!r} is not a valid torch device; use 'cpu' or 'cuda'") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(
                f"device={device!r} was requested but no CUDA device is available "
                f"(torch {torch.__version__}, torch.cuda.is_available() is False); use device='cpu'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidInputError(
                f"device={device!r} does not exist: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    elif dev.type != "cpu":
        raise InvalidInputError(f"device={device!r} is not supported; use 'cpu' or 'cuda'")
    return dev


@contextlib.contextmanager
def tf32(allow: bool) -> Iterator[None]:
    """Set ``torch.backends.cuda.matmul.allow_tf32`` (and cuDNN's) for the block, then restore.

    TF32 rounds float32 matmul inputs to a 10-bit mantissa on Ampere+ GPUs
    (relative error ~ 2^-11 ~ 5e-4 per product instead of float32's 6e-8); the
    default is off so float32 results are true float32. It has no effect on the
    CPU or in float64.
    """
    old_mm = torch.backends.cuda.matmul.allow_tf32
    old_cudnn = torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = bool(allow)
    torch.backends.cudnn.allow_tf32 = bool(allow)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_mm
        torch.backends.cudnn.allow_tf32 = old_cudnn


def round_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """Round a float32 tensor to TF32 (10 mantissa bits, round to nearest even); other dtypes pass.

    TF32 keeps float32's sign and 8-bit exponent and drops the 13 low mantissa
    bits: adding ``0xFFF`` plus the lowest kept bit and masking rounds to
    nearest, ties to even, on the integer view of the bits (a carry into the
    exponent is the correct rounding up to the next binade).
    """
    if t.dtype != torch.float32:
        return t
    bits = t.contiguous().view(torch.int32)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return bits.view(torch.float32)


def _tf32_mode_class() -> type:
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    # the matrix products cuBLAS/cuDNN run in TF32 when allowed; (b)addmm's first
    # argument is the added term, which is not rounded
    two_operand = {aten.mm.default, aten.bmm.default}
    with_bias = {aten.addmm.default, aten.baddbmm.default}
    conv = {aten.convolution.default}

    class _EmulateTF32(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            kwargs = kwargs or {}
            if func in two_operand:
                args = (round_to_tf32(args[0]), round_to_tf32(args[1]), *args[2:])
            elif func in with_bias:
                args = (args[0], round_to_tf32(args[1]), round_to_tf32(args[2]), *args[3:])
            elif func in conv:
                args = (round_to_tf32(args[0]), round_to_tf32(args[1]), *args[2:])
            return func(*args, **kwargs)

    return _EmulateTF32


@contextlib.contextmanager
def emulate_tf32() -> Iterator[None]:
    """Emulate TF32 matrix products on any device, for checks on machines without an Ampere+ GPU.

    Inside the block every float32 ``mm``/``bmm``/``addmm``/``baddbmm`` and
    convolution, forward and backward (double backward included: the mode sees
    the operations autograd dispatches), rounds its matrix operands to TF32
    with :func:`round_to_tf32` and then multiplies in float32, which is what
    cuBLAS/cuDNN do with ``allow_tf32`` (products of TF32 inputs, float32
    accumulation). Vector products (``mv``, ``dot``) are left alone, as on
    the GPU. Use it to see the effect of TF32 on a float32 meta-gradient
    without a GPU; ``--device cuda`` measures the real thing.
    """
    global _EMULATING
    _EMULATING += 1
    try:
        with _tf32_mode_class()():
            yield
    finally:
        _EMULATING -= 1


_EMULATING = 0  # depth of emulate_tf32() blocks (read by tf32_active)


def tf32_active(device: torch.device | str = "cpu") -> bool:
    """Whether float32 matrix products on ``device`` currently run in TF32 (allowed on CUDA, or emulated)."""
    return _EMULATING > 0 or (torch.device(device).type == "cuda" and bool(torch.backends.cuda.matmul.allow_tf32))


def working_eps(dtype: torch.dtype, device: torch.device | str = "cpu") -> float:
    """The rounding unit a computation in ``dtype`` on ``device`` resolves: TF32's for float32 under TF32."""
    if dtype == torch.float32 and tf32_active(device):
        return TF32_EPS
    return float(torch.finfo(dtype).eps)


# ---------------------------------------------------------------------------
# Models and losses
# ---------------------------------------------------------------------------


def build_model(spec: Any, params: Sequence[Any] | None = None, dtype: Any = "float64", device: Any = "cpu") -> nn.Module:
    """The ``nn.Sequential`` of ``nn.Linear`` and activation modules for an MLP spec.

    A ``reference.nets.Network`` spec (Conv4, ResNet-12, a layer list) gives its
    module twin instead (``reference.nets.to_torch``: conv, batch norm in the
    network's modes with its running statistics, pooling, residual blocks).

    Layout: ``Linear(d0, d1), act, Linear(d1, d2), act, ..., Linear(d_{L-1}, d_L)``
    with ``act`` one of ``nn.Tanh``, ``nn.Sigmoid``, ``nn.Softplus``
    (threshold 40, see ``SOFTPLUS_THRESHOLD``), ``nn.ReLU``, ``nn.Identity``
    (identity gets an ``nn.Identity`` module so the layout is always the same),
    biases per ``spec.bias``. So ``list(model.parameters())`` is in the
    CONVENTIONS order ``[W1, b1, ..., WL, bL]``.

    Args:
        spec: a ``reference.models.MLP`` (sizes, activation, bias).
        params: parameter arrays in CONVENTIONS order, copied into the module;
            ``None`` keeps ``spec.init(0)``.
        dtype: ``"float64"`` or ``"float32"``.
        device: ``"cpu"`` or ``"cuda"``.
    """
    tdtype, dev = resolve_dtype(dtype), resolve_device(device)
    from reference.nets.network import Network

    if isinstance(spec, Network):
        # A convolutional / batch-norm network: its nn.Module twin (reference.nets.to_torch), modes and
        # running statistics included; .parameters() in the network's order.
        from reference.nets.from_torch import to_torch

        params = spec.check_params(spec.init(0) if params is None else params)
        if any(np.iscomplexobj(p) for p in params):
            raise InvalidInputError("params are complex; the torch backend computes in real float64/float32")
        source = getattr(spec, "source_module", None)
        if source is not None:
            # Translated from the user's own module (reference.from_torch): audit *their* class, a copy
            # with the given values (its .parameters() order is the network's public order).
            import copy

            module = copy.deepcopy(source).to(dtype=tdtype, device=dev)
            with torch.no_grad():
                for p, value in zip(module.parameters(), params):
                    p.copy_(torch.as_tensor(value, dtype=tdtype, device=dev))
            return module
        return to_torch(spec, params, dtype=tdtype).to(dev)
    sizes = tuple(spec.sizes)
    if len(sizes) < 2 or not hasattr(spec, "activation"):
        raise InvalidInputError(f"spec={spec!r} is not an MLP spec (needs sizes [d0, ..., dL] and an activation)")
    params = spec.check_params(spec.init(0) if params is None else params)
    if any(np.iscomplexobj(p) for p in params):
        raise InvalidInputError("params are complex; the torch backend computes in real float64/float32")
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(d_in, d_out, bias=spec.bias, dtype=tdtype, device=dev))
        if i < len(sizes) - 2:
            layers.append(_activation_module(spec.activation))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for p, value in zip(model.parameters(), params):
            p.copy_(torch.as_tensor(value, dtype=tdtype, device=dev))
    return model


def loss_fn(name: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The CONVENTIONS losses, as PyTorch users write them (reduction ``"mean"``)."""
    if name == "mse":
        return F.mse_loss(out, y)
    if name == "ce":
        return F.cross_entropy(out, y)
    if name == "bce":
        return F.binary_cross_entropy_with_logits(out, y)
    raise InvalidInputError(f"loss={name!r} is unknown; choose mse, ce or bce")


class FunctionalMLP:
    """An ``nn.Sequential`` used as a pure function of a parameter list.

    ``forward(params, x)`` runs ``functional_call(module, {name: p}, x)`` so the
    parameters may be non-leaf tensors carrying an autograd graph (the adapted
    weights of an inner loop).
    """

    def __init__(self, spec: Any, dtype: Any = "float64", device: Any = "cpu"):
        self.spec = spec
        self.dtype = resolve_dtype(dtype)
        self.device = resolve_device(device)
        self.module = build_model(spec, None, self.dtype, self.device)
        self.names = [name for name, _ in self.module.named_parameters()]
        self.shapes = [tuple(p.shape) for p in self.module.parameters()]
        self.loss_name = spec.loss_name
        self.head_indices = tuple(spec.head_indices)

    def tensors(self, arrays: Sequence[Any], *, requires_grad: bool = False) -> list[torch.Tensor]:
        """NumPy arrays -> fresh leaf tensors of this model's dtype/device."""
        if any(np.iscomplexobj(a) for a in arrays):
            raise InvalidInputError(
                "complex parameters (complex-step differentiation) are not supported by the torch backend, "
                "which computes in real float64/float32; use the NumPy reference for complex step"
            )
        return [
            torch.tensor(np.asarray(a), dtype=self.dtype, device=self.device).requires_grad_(requires_grad)
            for a in arrays
        ]

    def forward(self, params: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, dict(zip(self.names, params)), (x,))

    def loss(self, params: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(self.loss_name, self.forward(params, x), y)

    # -- flat views (Newton-MAML, iMAML) ---------------------------------------

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Split a flat vector (CONVENTIONS order) into parameter-shaped views."""
        out, start = [], 0
        for shape in self.shapes:
            size = int(np.prod(shape))
            out.append(flat[start : start + size].view(shape))
            start += size
        return out

    def flat_loss(self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(self.unflatten(flat), x, y)


# ---------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------


class TorchTask(NamedTuple):
    """A task whose four fields are tensors (the audit calling contract's task object)."""

    x_support: torch.Tensor
    y_support: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor


def _to_tensor(a: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    arr = np.asarray(a)
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool:
        return torch.as_tensor(arr.astype(np.int64), device=device)  # class labels for F.cross_entropy
    if np.iscomplexobj(arr):
        raise InvalidInputError("task data are complex; the torch backend computes in real float64/float32")
    return torch.as_tensor(arr, dtype=dtype, device=device)


def to_torch_tasks(tasks: Sequence[Any], dtype: Any = "float64", device: Any = "cpu", *,
                   model: Any = None) -> list[TorchTask]:
    """Convert tasks (``reference.tasks.Task`` or anything with the four fields) to tensors.

    Floating arrays become ``dtype`` tensors; integer arrays (class labels)
    become ``int64`` tensors, as ``F.cross_entropy`` expects. Shapes are kept,
    unless ``model`` (a ``reference.models.MLP``) is given: the tasks are then
    validated against it first (``reference.tasks.check_tasks``: targets of a
    scalar regression become ``(n, 1)``, so ``F.mse_loss`` does not broadcast).
    """
    tdtype, dev = resolve_dtype(dtype), resolve_device(device)
    tasks = as_tasks(tasks) if model is None else check_tasks(model, tasks)
    return [TorchTask(*(_to_tensor(a, tdtype, dev) for a in t)) for t in tasks]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A result tensor as a float64 NumPy array (values computed in the tensor's dtype)."""
    return t.detach().to("cpu", torch.float64).numpy()


def scalar(t: torch.Tensor) -> float:
    return float(t.detach().to("cpu", torch.float64))


def as_scalar_tensor(name: str, value: Any, like: FunctionalMLP | tuple[torch.dtype, torch.device], **checks: bool) -> torch.Tensor:
    """A validated real hyper-parameter as a 0-dim leaf tensor requiring grad."""
    value = check_finite_scalar(name, value, **checks)
    if isinstance(value, complex) or np.iscomplexobj(value):
        raise InvalidInputError(f"{name}={value!r} is complex; the torch backend computes in real arithmetic")
    dtype, device = (like.dtype, like.device) if isinstance(like, FunctionalMLP) else like
    return torch.tensor(float(value), dtype=dtype, device=device, requires_grad=True)


__all__ = [
    "DTYPES",
    "SOFTPLUS_THRESHOLD",
    "FunctionalMLP",
    "TorchTask",
    "build_model",
    "loss_fn",
    "resolve_device",
    "resolve_dtype",
    "scalar",
    "tf32",
    "to_numpy",
    "to_torch_tasks",
]
