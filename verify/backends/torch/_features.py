"""Backbone plumbing shared by R2-D2, LR-D2, prototypical and matching networks (torch).

The backbone is a ``reference.models.MLP`` spec whose output is the feature
vector; it runs functionally on ``[x_support; x_query]`` so gradients flow to
its parameters. Argument validation reuses the reference's checks
(``reference.features``) so both sides refuse the same inputs with the same
messages; the math here is independent (torch autograd).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from reference.features import check_backbone, check_feature_tasks
from reference.validation import check_finite_scalar
from verify.backends.torch._model import (
    FunctionalMLP,
    TorchTask,
    as_scalar_tensor,
    resolve_device,
    resolve_dtype,
    to_torch_tasks,
)
from reference.errors import InvalidInputError, SingularMatrixError

# Largest accepted condition number of the SPD systems (ridge / IRLS matrices), per dtype. float64
# matches the reference (reference.linalg.MAX_COND = 1e-4 / eps: keep >= 4 correct digits); in
# float32 (7 digits) the same "4 digits" rule would refuse cond > 840, which normalised features
# exceed routinely, so float32 keeps >= 2 digits: 1e-2 / eps32 ~ 8.4e4.
MAX_COND: dict[torch.dtype, float] = {
    torch.float64: 1e-4 / float(torch.finfo(torch.float64).eps),
    torch.float32: 1e-2 / float(torch.finfo(torch.float32).eps),
}


def setup(backbone: Any, params: Any, tasks: Any, label_check: Any, dtype: Any, device: Any
          ) -> tuple[FunctionalMLP, list[torch.Tensor], list[TorchTask]]:
    """Validate (as the reference does), then build the functional backbone, leaf params and tensor tasks."""
    resolve_dtype(dtype), resolve_device(device)
    backbone = check_backbone(backbone)
    params = backbone.check_params(params)
    tasks = check_feature_tasks(backbone, tasks, label_check)
    fm = FunctionalMLP(backbone, dtype, device)
    return fm, fm.tensors(params, requires_grad=True), to_torch_tasks(tasks, fm.dtype, fm.device)


def real_scalar(name: str, value: Any, **checks: bool) -> float:
    """The torch limit on a hyper-parameter: a finite real number (no complex step)."""
    value = check_finite_scalar(name, value, **checks)
    if isinstance(value, complex):
        raise InvalidInputError(f"{name}={value!r} is complex; the torch backend computes in real arithmetic")
    return float(value)


def head_hyper(fm: FunctionalMLP, lam: Any, scale: Any, offset: Any) -> dict[str, torch.Tensor]:
    """R2-D2's and LR-D2's ``lam``, ``scale``, ``offset`` as real leaf tensors of ``fm``'s dtype and device."""
    return {
        "lam": as_scalar_tensor("lam", real_scalar("lam", lam, positive=True), fm),
        "scale": as_scalar_tensor("scale", real_scalar("scale", scale), fm),
        "offset": as_scalar_tensor("offset", real_scalar("offset", offset), fm),
    }


def features(fm: FunctionalMLP, params: Sequence[torch.Tensor], task: TorchTask, where: str
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f(x_support), f(x_query))``; non-finite features are an error.

    One forward pass over ``[x_support; x_query]``, except for a network whose batch norm uses batch
    statistics: support and query are then two batches (transductive), unless the spec asks for one
    (``Network.joint_batch()``), as the reference does.
    """
    n = task.x_support.shape[0]
    spec = fm.spec
    if getattr(spec, "batch_coupled", False) and not getattr(spec, "joint", False):
        out = torch.cat([fm.forward(params, task.x_support), fm.forward(params, task.x_query)], dim=0)
    else:
        out = fm.forward(params, torch.cat([task.x_support, task.x_query], dim=0))
    finite = torch.isfinite(out.detach())
    if not bool(finite.all()):
        row = int(torch.nonzero(~finite)[0, 0])
        part, row = ("x_support", row) if row < n else ("x_query", row - n)
        raise InvalidInputError(
            f"the backbone features of {where}.{part}[{row}] are not finite (NaN/inf): the backbone "
            "overflowed; rescale the inputs or the parameters"
        )
    return out[:n], out[n:]


def append_ones(Z: torch.Tensor) -> torch.Tensor:
    return torch.cat([Z, torch.ones(Z.shape[0], 1, dtype=Z.dtype, device=Z.device)], dim=1)


def check_spd(A: torch.Tensor, what: str, hint: str = "increase lam") -> None:
    """Refuse a system matrix that is not SPD or too ill-conditioned for ``A.dtype`` (no NaN, no noise)."""
    eig = torch.linalg.eigvalsh(A.detach())
    small, large = float(eig[0]), float(eig[-1])
    if not small > 0:
        raise SingularMatrixError(
            f"{what} is not positive definite in floating point (smallest eigenvalue {small:.3g}); {hint}"
        )
    cond, limit = large / small, MAX_COND[A.dtype]
    if not cond <= limit:
        raise SingularMatrixError(
            f"{what} is singular in {str(A.dtype).replace('torch.', '')}: cond ~ {cond:.3g} > {limit:.3g}; {hint}"
        )
