"""Audit code shaped like a training step: episode batches, ``backward()`` and ``optimizer.step()``.

Most meta-learning code is not written as "return the meta-loss"; it is a
training step (MAML-Pytorch's ``Meta.forward``, torchmeta examples)::

    def forward(self, x_spt, y_spt, x_qry, y_qry):      # [tasks, n, ...] tensors
        ...inner loop per task...
        loss_q = losses_q[-1] / task_num                # mean over tasks
        self.meta_optim.zero_grad()
        loss_q.backward()
        self.meta_optim.step()
        return accs                                     # accuracies, or nothing

:func:`training_step` turns such a function into ``verify.audit``'s calling
contract. The wrapped function receives

* the episode batch stacked as tensors, an :class:`EpisodeBatch`
  ``(x_spt, y_spt, x_qry, y_qry)`` of shapes ``[tasks, n, ...]`` (class labels
  ``int64 [tasks, n]``), in place of the task list;
* ``optimizer``: a :class:`RecordingOptimizer`, a real
  :class:`torch.optim.Optimizer` over the differentiated tensors whose
  ``step()`` records the gradient it is asked to apply (``p.grad`` of every
  parameter) instead of changing the parameters. What is checked is the
  gradient the code *applies*.

The meta-loss is the value of the tensor(s) ``backward()`` was called on.
They are seen through a :class:`torch.overrides.TorchFunctionMode` active
only during the call (no global patch of ``Tensor.backward``: a torch function
mode is a scoped, thread-local hook through which ``Tensor.backward`` and
``torch.autograd.backward`` already dispatch). A backward call counts when it
changed the gradient of a differentiated tensor; calls made while every such
gradient was zero or None start the sum afresh (the code zeroed the gradients
before it, with ``optimizer.zero_grad()``, ``model.zero_grad()`` or by hand), so
per-task ``backward()`` calls accumulating into ``.grad`` give the sum of their
losses, as the accumulated gradient is the gradient of that sum.

What the audit receives (in the contract's ``(loss, grads)`` form):

* ``optimizer.step()`` called once: the recorded gradients and the backward
  losses accumulated until then;
* no ``step()``, but ``backward()`` called: the ``.grad`` of the
  differentiated tensors and the backward losses;
* neither: the function's return value, as in the plain contract (a scalar
  meta-loss, or ``(loss, grads)``).

A user's adapter is at most three lines, e.g. for MAML-Pytorch's ``Meta``::

    @training_step
    def maml(model, batch, inner_lr, inner_steps, optimizer):
        meta = Meta(model, update_lr=inner_lr, update_step=inner_steps)
        meta.meta_optim = optimizer
        return meta(*batch)
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch.overrides import TorchFunctionMode

from reference.errors import InvalidInputError

__all__ = ["EpisodeBatch", "RecordingOptimizer", "StepOutput", "stack_tasks", "training_step"]


class EpisodeBatch(NamedTuple):
    """A meta-batch stacked as tensors ``[tasks, n, ...]`` (the torchmeta / MAML-Pytorch layout).

    ``x_spt [tasks, n_support, d_in]``, ``y_spt [tasks, n_support]`` (class
    labels, ``int64``) or ``[tasks, n_support, d_out]`` (regression targets),
    and the same for the query set. Unpacks as ``x_spt, y_spt, x_qry, y_qry``.
    """

    x_spt: torch.Tensor
    y_spt: torch.Tensor
    x_qry: torch.Tensor
    y_qry: torch.Tensor


def _is_task(obj: Any) -> bool:
    return all(hasattr(obj, a) for a in ("x_support", "y_support", "x_query", "y_query"))


def _is_task_list(obj: Any) -> bool:
    return isinstance(obj, (list, tuple)) and len(obj) > 0 and not torch.is_tensor(obj[0]) and \
        all(_is_task(t) for t in obj)


def stack_tasks(tasks: Sequence[Any]) -> EpisodeBatch:
    """Stack a task list (objects with tensor fields ``x_support, y_support, x_query, y_query``).

    Raises:
        InvalidInputError: the tasks' support or query sets differ in shape (they cannot be stacked).
    """
    fields = ("x_support", "y_support", "x_query", "y_query")
    out = []
    for f in fields:
        parts = [torch.as_tensor(getattr(t, f)) for t in tasks]
        shapes = {tuple(p.shape) for p in parts}
        if len(shapes) != 1:
            raise InvalidInputError(f"the tasks' {f} have different shapes {sorted(shapes)}; an episode batch "
                                    "[tasks, n, ...] needs equal-sized tasks")
        out.append(torch.stack(parts))
    return EpisodeBatch(*out)


class RecordingOptimizer(torch.optim.Optimizer):
    """A :class:`torch.optim.Optimizer` whose ``step()`` records the gradients instead of stepping.

    ``step()`` appends ``[p.grad.clone() or None for every parameter]`` (in the
    order of the parameter groups) to :attr:`steps` and leaves the parameters
    unchanged; ``zero_grad()`` is the ordinary one. ``param_groups``,
    ``state_dict()`` and the ``lr`` default behave as in any optimizer, so code
    that reads or schedules the learning rate runs unchanged.

    Args:
        params: the differentiated tensors (or parameter groups).
        lr: the nominal learning rate (recorded, never applied).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3):
        super().__init__(params, {"lr": lr})
        self.steps: list[list[torch.Tensor | None]] = []
        #: the backward losses accumulated at each step (filled in by the training-step harness)
        self.step_losses: list[torch.Tensor | None] = []
        self._on_step: Callable[[], torch.Tensor | None] | None = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Record ``p.grad`` of every parameter (after running ``closure``, if given); change nothing."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.steps.append([None if p.grad is None else p.grad.detach().clone()
                           for group in self.param_groups for p in group["params"]])
        self.step_losses.append(self._on_step() if self._on_step is not None else None)
        return loss


class _BackwardRecorder(TorchFunctionMode):
    """Sees every ``Tensor.backward`` / ``torch.autograd.backward`` call while active.

    Keeps the running sum of the losses whose backward changed a gradient of
    ``leaves``; a backward call made while every leaf gradient is None or zero
    restarts the sum (the gradients were zeroed).
    """

    def __init__(self, leaves: Sequence[torch.Tensor]):
        super().__init__()
        self.leaves = list(leaves)
        self.total: torch.Tensor | None = None
        self.calls = 0

    def _state(self) -> list[tuple[int, int] | None]:
        return [None if p.grad is None else (id(p.grad), p.grad._version) for p in self.leaves]

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not torch.Tensor.backward and func is not torch.autograd.backward:
            return func(*args, **kwargs)
        roots = args[0] if args else kwargs.get("tensors")
        grad = args[1] if len(args) > 1 else kwargs.get("gradient", kwargs.get("grad_tensors"))
        roots_list = [roots] if torch.is_tensor(roots) else list(roots)
        grads_list = [grad] if (grad is None or torch.is_tensor(grad)) else list(grad)
        grads_list = grads_list + [None] * (len(roots_list) - len(grads_list))
        with torch.no_grad():
            value = sum((r.detach().to(torch.float64) * (1 if g is None else g.detach().to(torch.float64))).sum()
                        for r, g in zip(roots_list, grads_list))
        zeroed = all(p.grad is None or not bool(torch.any(p.grad != 0)) for p in self.leaves)
        before = self._state()
        out = func(*args, **kwargs)
        self.calls += 1
        if self._state() != before:  # this backward reached the differentiated tensors
            self.total = value if (zeroed or self.total is None) else self.total + value
        return out


class StepOutput(tuple):
    """``(loss, grads)`` as the audit's contract expects, with :attr:`source` saying where they came from."""

    source: str
    notes: list[str]

    def __new__(cls, loss: torch.Tensor, grads: list[torch.Tensor | None], source: str,
                notes: list[str] | None = None) -> StepOutput:
        obj = super().__new__(cls, (loss, grads))
        obj.source = source
        obj.notes = list(notes or [])
        return obj


def _differentiated(args: Sequence[Any]) -> list[torch.Tensor]:
    """The differentiated tensors among the contract's arguments, in the audit's order:
    module parameters, then lists of tensors requiring grad (Meta-SGD's ``lrs``), then 0-dim
    tensors requiring grad (R2-D2's ``lam, scale, offset``), in argument order."""
    leaves: list[torch.Tensor] = []
    for a in args:
        if isinstance(a, torch.nn.Module):
            leaves += list(a.parameters())
        elif torch.is_tensor(a) and a.requires_grad:
            leaves.append(a)
        elif isinstance(a, (list, tuple)) and a and all(torch.is_tensor(t) and t.requires_grad for t in a):
            leaves += list(a)
    return leaves


def training_step(fn: Callable[..., Any] | None = None, *, batch: str = "batch",
                  optimizer: str = "optimizer") -> Any:
    """Turn a training-step function into ``verify.audit``'s calling contract (module docstring).

    ``fn`` takes the contract's arguments with the task list replaced by an
    :class:`EpisodeBatch` (its parameter named ``batch``) and a keyword
    ``optimizer`` (a :class:`RecordingOptimizer` over the differentiated
    tensors), e.g. ``fn(model, batch, inner_lr, inner_steps, optimizer)`` for
    MAML. It may call ``backward()`` and ``optimizer.step()`` and return
    anything (accuracies, ``None``); the audit then checks the gradient passed
    to ``optimizer.step()`` against the meta-gradient of the loss ``backward()``
    was called on. Usable as ``@training_step`` or ``training_step(fn)``.

    Args:
        fn: the training step.
        batch: the name of ``fn``'s parameter receiving the episode batch.
        optimizer: the name of ``fn``'s parameter receiving the recording optimizer.

    Returns:
        A function with the contract's signature (``batch`` renamed ``tasks``,
        ``optimizer`` removed), returning a :class:`StepOutput` ``(loss, grads)``
        or ``fn``'s own return value when it neither called ``backward()`` nor
        ``optimizer.step()``.
    """
    if fn is None:
        return functools.partial(training_step, batch=batch, optimizer=optimizer)
    if not callable(fn):
        raise InvalidInputError(f"fn={fn!r} is not callable; decorate the training-step function")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"training_step: cannot read the signature of {fn!r}: {exc}") from exc
    names = list(sig.parameters)
    if optimizer not in names:
        raise InvalidInputError(f"training_step: {fn.__qualname__}{sig} has no parameter {optimizer!r}; declare "
                                f"it to receive the recording optimizer (or pass optimizer='NAME')")
    if batch not in names:
        raise InvalidInputError(f"training_step: {fn.__qualname__}{sig} has no parameter {batch!r}; declare it to "
                                f"receive the episode batch (or pass batch='NAME')")
    params = [p.replace(name="tasks") if p.name == batch else p for p in sig.parameters.values() if p.name != optimizer]
    contract = sig.replace(parameters=params)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = contract.bind(*args, **kwargs)
        call_args = dict(bound.arguments)
        tasks = call_args.pop("tasks")
        episode = stack_tasks(tasks) if _is_task_list(tasks) else tasks
        leaves = _differentiated([v for k, v in bound.arguments.items() if k != "tasks"])
        if not leaves:
            raise InvalidInputError("training_step: no tensor requiring grad among the arguments "
                                    f"{list(bound.arguments)}; nothing to differentiate")
        recorder = _BackwardRecorder(leaves)
        opt = RecordingOptimizer(leaves)
        opt._on_step = lambda: recorder.total
        call = {**call_args, batch: episode, optimizer: opt}
        with recorder:
            out = fn(**call)
        return _result(out, opt, recorder, leaves)

    wrapper.__signature__ = contract  # type: ignore[attr-defined]
    del wrapper.__wrapped__  # inspect.signature must see the contract, not fn's own parameters
    wrapper.training_step = True  # type: ignore[attr-defined]
    return wrapper


def _result(out: Any, opt: RecordingOptimizer, recorder: _BackwardRecorder,
            leaves: Sequence[torch.Tensor]) -> Any:
    notes: list[str] = []
    if len(opt.steps) > 1:
        raise InvalidInputError(f"the training step called optimizer.step() {len(opt.steps)} times; a meta-gradient "
                                "check needs one meta-update per call (one meta-batch)")
    if opt.steps:
        loss = opt.step_losses[0]
        if loss is None:
            loss = _returned_loss(out)
            if loss is None:
                raise InvalidInputError(
                    "the training step called optimizer.step() but never backward() on a loss that reaches the "
                    f"parameters, and returned {_short(out)}: there is no meta-loss to check; call backward() on the "
                    "meta-loss, or return it")
            notes.append("the meta-loss is the returned value (no backward() reached the parameters)")
        return StepOutput(loss.detach().to(torch.float64), opt.steps[0],
                          "the gradient passed to optimizer.step() (metaverify's recording optimizer); meta-loss: "
                          "the tensor backward() was called on", notes)
    if recorder.total is not None:
        return StepOutput(recorder.total, [None if p.grad is None else p.grad.detach().clone() for p in leaves],
                          ".grad after the function's backward() (optimizer.step() was not called); meta-loss: the "
                          "tensor backward() was called on", notes)
    if out is None:
        raise InvalidInputError("the training step returned None and called neither backward() on a loss reaching "
                                "the parameters nor optimizer.step(): there is no meta-loss or gradient to check; "
                                "call loss.backward() and optimizer.step() (the optimizer metaverify passes), or "
                                "return the meta-loss")
    return out


def _returned_loss(out: Any) -> torch.Tensor | None:
    if torch.is_tensor(out) and out.numel() == 1 and out.is_floating_point():
        return out.reshape(())
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
