"""The PyTorch audit harness: calls a user's torch meta-gradient under the calling contract.

The contract (``docs/audit.md``): ``fn(model, tasks, ...)`` with ``model`` a float64
``nn.Sequential`` loaded with the case's parameters, the differentiated extra variables
(Meta-SGD's ``lrs``, R2-D2's ``lam, scale, offset``) as tensors requiring grad, and the
hyper-parameters as Python numbers, in the order the algorithm's row declares.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from reference.models import unflatten
from verify.algorithms import Case
from verify.auditing.harness import Claim, Harness, extra_keys, raised, short
from verify.auditing.problem import AuditInputError

__all__ = ["HARNESS", "TorchHarness"]

def _dtype_watch() -> Any:
    """A torch function mode that records the floating dtypes below float64 produced during a call
    (evidence that the function computes part of its result in float32), active only during the claim."""
    import torch
    from torch.overrides import TorchFunctionMode

    low = {torch.float32, torch.float16, torch.bfloat16}

    class DtypeWatch(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: set[str] = set()

        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype in low:
                self.seen.add(str(out.dtype).replace("torch.", ""))
            return out

    return DtypeWatch()


class TorchHarness(Harness):
    backend = "torch"

    def __init__(self, fn: Callable[..., Any], case: Case, *, dtype: str = "float64",
                 default_dtype: str | None = None):
        super().__init__(fn, case, dtype=dtype, default_dtype=default_dtype)
        import torch

        from verify.backends.torch import build_model, resolve_dtype, to_torch_tasks

        self.torch, self.build_model = torch, build_model
        self.tdtype = resolve_dtype(dtype)
        self.tasks = to_torch_tasks(case.tasks, dtype)

    def _loss_array(self, loss: Any) -> np.ndarray:
        torch = self.torch
        if torch.is_tensor(loss):
            return loss.detach().to("cpu", torch.float64).numpy()
        try:
            return np.asarray(loss, dtype=float)
        except (TypeError, ValueError):
            raise AuditInputError(f"the audited function must return a scalar tensor, got {short(loss)}") from None

    def _to_numpy(self, leaf: Any) -> np.ndarray:
        torch = self.torch
        if torch.is_tensor(leaf):
            return leaf.detach().to("cpu", torch.float64).numpy()
        return np.asarray(leaf, dtype=float)

    def arguments(self, variables: Sequence[np.ndarray],
                  reuse: dict[str, Any] | None = None) -> tuple[tuple[Any, ...], list[Any]]:
        """The call's positional arguments and the leaf tensors aligned with the case's variables.

        ``reuse`` (the own-loss evaluations of the finite-difference check): a dict holding one
        model built on the first call; later calls copy the values into its parameters (and clear
        their ``.grad``) instead of building a new ``nn.Sequential``, whose ``nn.Linear``
        initialisation costs as much as a small meta-loss evaluation.
        """
        torch, case = self.torch, self.case
        params, extra = case.split([np.asarray(v) for v in variables])
        model = reuse.get("model") if reuse is not None else None
        if model is None:
            model = self.build_model(case.model, params, self.dtype, "cpu")
            if reuse is not None:
                reuse["model"] = model
                reuse["buffers"] = [b.detach().clone() for b in model.buffers()]
        else:
            with torch.no_grad():
                for p, value in zip(model.parameters(), params):
                    p.copy_(torch.as_tensor(np.asarray(value), dtype=self.tdtype))
                # Batch norm's running statistics are state a train-mode forward updates in place: every
                # call starts from the module's statistics (those of the claim), never from the previous
                # call's, or an eval-mode forward would see statistics of earlier evaluations.
                for b, saved in zip(model.buffers(), reuse["buffers"]):
                    b.copy_(saved)
            for p in model.parameters():
                p.grad = None
                p.requires_grad_(True)
        leaves: list[Any] = list(model.parameters())
        h, row = case.hyper, self.row
        args: list[Any] = []
        # The row's signature says what goes where: the model, the tasks, a differentiated extra
        # variable (tensors requiring grad, appended to the leaves in case.variables order), or a
        # hyper-parameter.
        for name in row.signature or ():
            if name == "model":
                args.append(model)
            elif name == "tasks":
                args.append(self.tasks)
            elif name in row.extra:
                keys = extra_keys(case, name)
                if keys == [name]:  # one tensor: a scalar (lam) or an array (MAML++'s (K, n) rates)
                    value = np.asarray(extra[name])
                    leaf = torch.tensor(float(value) if value.ndim == 0 else value, dtype=self.tdtype,
                                        requires_grad=True)
                    leaves.append(leaf)
                    args.append(leaf)
                else:  # a list of tensors: Meta-SGD's lrs (one per parameter), a learned optimiser's phi
                    tensors = [torch.tensor(np.asarray(extra[k]), dtype=self.tdtype, requires_grad=True)
                               for k in keys]
                    leaves += tensors
                    args.append(tensors)
            else:
                args.append(h[name])
        return tuple(args), leaves

    def _call(self, variables: Sequence[np.ndarray],
              reuse: dict[str, Any] | None = None) -> tuple[Any, list[Any], list[np.ndarray]]:
        torch = self.torch
        args, leaves = self.arguments(variables, reuse)
        # The in-place check of claim() needs the values before the call; own-loss calls do not.
        before = [leaf.detach().clone() for leaf in leaves] if reuse is None else []
        model = args[self.row.signature.index("model")] if "model" in (self.row.signature or ()) else None
        if reuse is None and model is not None:
            # the module's modes and running statistics, restored after the call (see claim())
            self._state_before = ({n: b.detach().clone() for n, b in model.named_buffers()},
                                  {n: m.training for n, m in model.named_modules()})
            self._model = model
        # The audit's problems are small: intra-op threads only add synchronisation, which on a busy
        # machine costs milliseconds per op (measured 30x slower with 2 threads under load). One thread
        # for the call, the caller's setting restored after; results do not depend on it.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        # The precision re-run (verify.auditing.decision) calls the function with float64 as torch's
        # default dtype, so that tensors it creates itself (torch.tensor(0.), torch.eye(n)) are float64;
        # the caller's default is restored after the call.
        default = torch.get_default_dtype()
        if self.default_dtype is not None:
            torch.set_default_dtype(getattr(torch, self.default_dtype))
        watch = _dtype_watch() if reuse is None else None
        try:
            with torch.enable_grad():
                if watch is not None:
                    with watch:
                        out = self.fn(*args, **self.kwargs)
                    self.low_precision = tuple(sorted(watch.seen))
                else:
                    out = self.fn(*args, **self.kwargs)
        except Exception as exc:  # the audited code's failure is bad input, shown in full
            raise raised(exc, "the audited function") from exc
        finally:
            torch.set_num_threads(threads)
            torch.set_default_dtype(default)
        return out, leaves, before

    def _mark(self, claim: Claim) -> Claim:
        claim.low_precision = tuple(getattr(self, "low_precision", ()))
        return claim

    def _loss_dtype(self, out: Any) -> str | None:
        return str(out.dtype).replace("torch.", "") if self.torch.is_tensor(out) else None

    def claim(self) -> Claim:
        torch, case = self.torch, self.case
        out, leaves, before = self._call(case.variables)
        notes: list[str] = []
        changed = [case.names[i] for i, (leaf, b) in enumerate(zip(leaves, before))
                   if not torch.equal(leaf.detach(), b)]
        notes += self._state_notes()
        if changed:
            notes.append(f"the function modified {', '.join(changed)} in place (through .data, an in-place "
                         "optimiser step or copy_); the audit is at the initial values, and in-place updates "
                         "also cut the autograd graph")
        if self.row.quantity == "direction":
            if torch.is_tensor(out) or not isinstance(out, (list, tuple)):
                raise AuditInputError(f"{case.algorithm}: the function must return the direction as a list of tensors "
                                      f"shaped like model.parameters(), got {short(out)}")
            grads, missing = self._check_grads(self.leaves(list(out)), "returned direction")
            return Claim(None, grads, missing, "returned direction", notes)
        grads_out = None
        # verify.backends.torch.training_step returns (loss, grads) saying where they came from
        step_source, step_notes = getattr(out, "source", None), list(getattr(out, "notes", []) or [])
        if isinstance(out, (tuple, list)) and not torch.is_tensor(out):
            if len(out) != 2:
                raise AuditInputError(f"the function must return the meta-loss or (loss, grads), got a "
                                      f"{type(out).__name__} of length {len(out)}")
            out, grads_out = out
        if out is None and any(leaf.grad is not None for leaf in leaves):
            raise AuditInputError(
                "the audited function returned None (it called backward(): .grad is set, but the meta-loss is not "
                "returned); return the meta-loss, or wrap a training step with "
                "verify.backends.torch.training_step, which takes it from the tensor backward() was called on")
        loss = self._check_loss(out)
        dtype = self._loss_dtype(out)
        if grads_out is not None:
            grads, missing = self._check_grads(self.leaves(grads_out), "returned grads")
            return self._mark(Claim(loss, grads, missing, step_source or "returned (loss, grads)", notes + step_notes,
                                    dtype))
        if any(leaf.grad is not None for leaf in leaves):
            grads, missing = self._check_grads([leaf.grad for leaf in leaves], ".grad")
            return self._mark(Claim(loss, grads, missing, ".grad left by the function's own backward()", notes, dtype))
        if torch.is_tensor(out) and out.requires_grad:
            try:
                g = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
            except RuntimeError as exc:
                raise raised(exc, "differentiating the returned meta-loss (torch.autograd.grad)") from exc
            grads, missing = self._check_grads(list(g), "torch.autograd.grad of the returned loss")
            return self._mark(Claim(loss, grads, missing, "torch.autograd.grad of the returned meta-loss", notes,
                                    dtype))
        notes.append("the returned meta-loss does not require grad and no .grad was set: no gradient reached "
                     "any tensor")
        return self._mark(Claim(loss, [np.zeros(s) for s in case.shapes], [True] * self.n, "none", notes, dtype))

    def _state_notes(self) -> list[str]:
        """Batch-norm state the call changed: running statistics updated in place, modes left switched.

        The gradient is audited at the module's state of the call; statistics updated by the evaluation
        leak into the next call and the next task (catalogue ``bn_state_leaked``).
        """
        torch = self.torch
        saved = getattr(self, "_state_before", None)
        if saved is None:
            return []
        buffers, modes = saved
        model = self._model
        now = dict(model.named_buffers())
        moved = sorted({n.rsplit(".", 1)[0] for n, b in buffers.items()
                        if n.endswith(("running_mean", "running_var")) and not torch.equal(now[n].detach(), b)})
        notes = []
        if moved:
            from verify.auditing.diagnosis.catalogue import CATALOGUE

            notes.append(f"{CATALOGUE['bn_state_leaked'].title}: the call changed the running statistics of "
                         f"{', '.join(moved)} (train-mode forwards update them in place, so later tasks and later "
                         "calls see state from this one); the audit restores them before every evaluation")
        switched = sorted(n or "<model>" for n, m in model.named_modules() if n in modes and m.training != modes[n])
        if switched:
            notes.append(f"the call left {', '.join(switched[:4])}{' ...' if len(switched) > 4 else ''} in "
                         f"{'train' if model.training else 'eval'} mode, not the mode it was given")
        return notes

    def own_loss(self) -> Callable[[np.ndarray], float]:
        shapes = self.case.shapes
        reuse: dict[str, Any] = {}

        def f(x: np.ndarray) -> Any:
            out, _, _ = self._call(unflatten(np.asarray(x, dtype=float), shapes), reuse)
            if isinstance(out, (tuple, list)) and not self.torch.is_tensor(out):
                out = out[0]
            value = self._check_loss(out)
            # A float32 meta-loss is handed to the engine as float32, so that its finite differences are
            # judged with float32's tolerances (its rounding is not a wrong gradient).
            return np.float32(value) if self._loss_dtype(out) in ("float32", "float16", "bfloat16") else value

        return f


#: The harness :func:`verify.auditing.harness.make_harness` builds for this backend.
HARNESS = TorchHarness
