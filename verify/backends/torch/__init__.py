"""The PyTorch backend: every CONVENTIONS algorithm written with torch autograd.

Modules mirror ``reference`` name for name (``maml``, ``anil``, ``metasgd``,
``reptile``, ``newton``, ``imaml``, ``r2d2``, ``lrd2``, ``protonet``,
``matchingnet``); each function takes the reference's arguments (an
``reference.models.MLP`` spec, NumPy parameters, ``reference.tasks.Task``
lists) plus keyword-only ``dtype`` ("float64"/"float32"), ``device``
("cpu"/"cuda") and ``allow_tf32``, and returns NumPy float64 results.
``ops.check_second_order_ops`` checks double backward of single ops.

For auditing third-party code: :func:`build_model` gives the
``nn.Sequential`` of ``nn.Linear`` + activation modules for a spec and
:func:`to_torch_tasks` tasks with tensor attributes.
"""

from verify.backends.torch._model import (
    TorchTask,
    build_model,
    emulate_tf32,
    resolve_device,
    resolve_dtype,
    round_to_tf32,
    tf32,
    to_torch_tasks,
)

__all__ = ["TorchTask", "build_model", "emulate_tf32", "resolve_device", "resolve_dtype", "round_to_tf32", "tf32",
           "to_torch_tasks"]
