"""``verify.audit``: check someone's meta-gradient implementation and name the bug.

The calling contract (``docs/audit.md`` has complete examples):

* PyTorch, ``maml``/``fomaml``/``anil``: ``fn(model, tasks, inner_lr, inner_steps)``;
  ``model`` is a float64 ``nn.Sequential`` of ``nn.Linear`` and activation
  modules loaded with the reference's initial parameters, ``tasks`` a list of
  objects with tensor attributes ``x_support, y_support, x_query, y_query``.
  ``fn`` returns the meta-loss (mean over tasks) as a scalar tensor, which is
  differentiated with respect to ``model.parameters()``; or ``(loss, grads)``;
  or it calls ``.backward()`` itself and leaves the gradients in ``.grad``.
  ``metasgd``: ``fn(model, lrs, tasks, inner_steps)``; ``reptile``:
  ``fn(model, tasks, inner_lr, inner_steps)`` returning the direction;
  ``newton``: ``fn(model, tasks, inner_lr, inner_steps, damping)``; ``imaml``:
  ``fn(model, tasks, lam)``; ``r2d2``/``lrd2``: ``fn(backbone, tasks, lam,
  scale, offset)`` (0-dim tensors requiring grad); ``protonet``/``matchingnet``:
  ``fn(backbone, tasks, n_classes)``. Options the function declares by name
  (``n_classes``, ``bias_column``, ``normalize``, ``form``, ``newton_steps``)
  are passed as keywords.
* JAX: the same with ``model`` replaced by ``(params, apply_fn)``:
  ``fn(params, apply_fn, tasks, inner_lr, inner_steps)`` returning a scalar
  (differentiated with ``jax.value_and_grad``) or ``(loss, grads)``.

The verdict (float64): the meta-loss against the reference first, then the
meta-gradient per tensor against the reference (normwise relative error,
tolerance ``tolerance("float64", "reference_match", condition=kappa)`` with
``kappa`` the sensitivity of the reference gradient to rounding its inputs),
and independently against directional derivatives of the function's **own**
meta-loss (complex step where the function accepts complex input, else
Richardson extrapolation; :func:`verify.check_gradient`), so that a
disagreement says which side is wrong. On a mismatch the diagnosis catalogue
(:mod:`verify._diagnosis`) names the bug when a known-wrong variant explains
the claimed gradient.
"""

from __future__ import annotations

import inspect
import json
import math
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from reference.errors import InvalidInputError, NotAnalyticError
from reference.models import MLP, flatten, unflatten
from verify._diagnosis import Diagnosis, diagnose
from verify._verdict import FAIL, INCONCLUSIVE, PASS, jsonable
from verify.algorithms import ALGORITHMS, Case, build_case, evaluate
from verify.tolerance import tolerance

__all__ = ["AUDITABLE", "AuditInputError", "AuditResult", "TensorCheck", "audit", "parse_model"]

#: Algorithms with a calling contract (the base ``mlp`` check is not an audit).
AUDITABLE: tuple[str, ...] = tuple(a for a in ALGORITHMS if a != "mlp")
#: Keyword options passed to an audited function that declares a parameter of that name.
OPTIONS: dict[str, tuple[str, ...]] = {
    "r2d2": ("n_classes", "bias_column", "normalize", "form"),
    "lrd2": ("bias_column", "newton_steps"),
}
BACKENDS = ("torch", "jax")


class AuditInputError(InvalidInputError):
    """The audited function could not be audited: it raised, returned a non-scalar or non-finite
    loss, or the wrong number of gradients (exit code 2 in the CLI)."""


# ---------------------------------------------------------------------------
# problem description
# ---------------------------------------------------------------------------


def parse_model(text: str) -> dict[str, Any]:
    """``"mlp:1-40-40-1:tanh[:nobias]"`` -> ``{"sizes": [1, 40, 40, 1], "activation": "tanh", "bias": True}``."""
    parts = str(text).split(":")
    hint = "use mlp:SIZES[:ACTIVATION][:nobias], e.g. mlp:1-40-40-1:tanh"
    if len(parts) < 2 or parts[0] != "mlp":
        raise InvalidInputError(f"model={text!r} is not a model spec; {hint}")
    try:
        sizes = [int(s) for s in parts[1].split("-")]
    except ValueError:
        raise InvalidInputError(f"model={text!r}: sizes {parts[1]!r} must be integers joined by '-'; {hint}") from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise InvalidInputError(f"model={text!r}: needs at least two positive layer widths; {hint}")
    out: dict[str, Any] = {"sizes": sizes, "activation": None, "bias": True}
    for extra in parts[2:]:
        if extra == "nobias":
            out["bias"] = False
        elif extra in ("tanh", "sigmoid", "softplus", "relu", "identity"):
            out["activation"] = extra
        else:
            raise InvalidInputError(f"model={text!r}: unknown part {extra!r}; {hint}")
    return out


def _build_problem(algorithm: str, *, model: Any, loss: str | None, n_tasks: int | None, shots: int | None,
                   queries: int | None, n_way: int | None, seed: int, hyper: dict[str, Any]) -> Case:
    kwargs: dict[str, Any] = {}
    if isinstance(model, MLP):
        kwargs.update(sizes=list(model.sizes), activation=model.activation, bias=model.bias)
        loss = loss or model.loss_name
    elif model is not None:
        spec = parse_model(model)
        kwargs.update(sizes=spec["sizes"], bias=spec["bias"])
        if spec["activation"]:
            kwargs["activation"] = spec["activation"]
    for name, value in (("n_tasks", n_tasks), ("shots", shots), ("queries", queries), ("n_way", n_way)):
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise InvalidInputError(f"{name}={value!r} must be a positive integer")
            kwargs[name] = int(value)
    if loss is None and kwargs.get("sizes") and kwargs["sizes"][-1] == 1:
        loss = "mse"  # one output: cross-entropy is undefined
    if loss is not None:
        if loss not in ("mse", "ce"):
            raise InvalidInputError(f"loss={loss!r} must be 'mse' or 'ce'")
        kwargs["loss"] = loss
    if ALGORITHMS[algorithm].family == "backbone" and "sizes" in kwargs and kwargs.get("loss"):
        kwargs.pop("loss")  # the backbone's output is a feature vector; its loss is fixed by the algorithm
    if "inner_steps" in hyper and (isinstance(hyper["inner_steps"], bool) or int(hyper["inner_steps"]) < 1):
        raise InvalidInputError(f"inner_steps={hyper['inner_steps']!r} must be >= 1")
    try:
        case = build_case(algorithm, seed=seed, **kwargs, **hyper)
    except TypeError as exc:
        raise InvalidInputError(f"bad problem description for {algorithm}: {exc}") from exc
    if loss == "ce" and case.model.sizes[-1] < 2 and ALGORITHMS[algorithm].family != "backbone":
        raise InvalidInputError(f"loss='ce' needs at least 2 outputs; model sizes {list(case.model.sizes)}")
    return case


# ---------------------------------------------------------------------------
# calling the audited function
# ---------------------------------------------------------------------------


@dataclass
class Claim:
    """What the audited function claimed: loss, gradients aligned with the case's variables."""

    loss: float | None
    grads: list[np.ndarray]
    missing: list[bool]
    source: str
    notes: list[str] = field(default_factory=list)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _raised(exc: BaseException, what: str) -> AuditInputError:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return AuditInputError(f"{what} raised {type(exc).__name__}: {exc}\n{tb.rstrip()}")


def _leaves_keep_none(obj: Any) -> list[Any]:
    """Flatten nested lists/tuples/dicts of gradients, keeping ``None`` entries (dicts in key order,
    except R2-D2's ``{"lam", "scale", "offset"}`` which is put in that order)."""
    if isinstance(obj, dict):
        keys = list(obj)
        if set(keys) == {"lam", "scale", "offset"}:
            keys = ["lam", "scale", "offset"]
        return [leaf for k in keys for leaf in _leaves_keep_none(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [leaf for item in obj for leaf in _leaves_keep_none(item)]
    return [obj]


def _optional_kwargs(fn: Callable[..., Any], case: Case) -> dict[str, Any]:
    names = OPTIONS.get(case.algorithm, ())
    if not names:
        return {}
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    return {n: case.hyper[n] for n in names if n in params and n in case.hyper}


def infer_backend(fn: Callable[..., Any]) -> str:
    """``"jax"`` when the function's second parameter is named like an apply function, else ``"torch"``."""
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return "torch"
    return "jax" if len(names) >= 2 and names[1] in ("apply_fn", "apply", "apply_fun", "forward") else "torch"


class _Harness:
    """Runs the audited function on a case; backend subclasses build the arguments."""

    backend = ""

    def __init__(self, fn: Callable[..., Any], case: Case):
        self.fn, self.case = fn, case
        self.kwargs = _optional_kwargs(fn, case)
        self.n = len(case.variables)

    def _check_loss(self, loss: Any) -> float:
        arr = self._loss_array(loss)
        if arr.size != 1:
            raise AuditInputError(
                f"the audited function must return a scalar meta-loss, got shape {arr.shape} ({_short(loss)}); "
                "return the mean over tasks of the query losses")
        value = arr.reshape(()).item()
        if isinstance(value, complex):
            return value  # complex-step evaluation (JAX)
        value = float(value)
        if not math.isfinite(value):
            raise AuditInputError(f"the audited function returned a non-finite meta-loss {value!r}")
        return value

    def _check_grads(self, leaves: list[Any], source: str) -> tuple[list[np.ndarray], list[bool]]:
        names, shapes = self.case.names, self.case.shapes
        if len(leaves) != self.n:
            raise AuditInputError(
                f"the audited function returned {len(leaves)} gradient(s) but {self.case.algorithm} has {self.n} "
                f"differentiated tensors ({', '.join(names)}); return one gradient per tensor, in that order")
        grads, missing = [], []
        for name, shape, leaf in zip(names, shapes, leaves):
            if leaf is None:
                grads.append(np.zeros(shape))
                missing.append(True)
                continue
            arr = self._to_numpy(leaf)
            if arr.shape != tuple(shape) and arr.size == int(np.prod(shape)) and len(shape) == 0:
                arr = arr.reshape(())
            if arr.shape != tuple(shape):
                raise AuditInputError(f"the gradient of {name} ({source}) has shape {arr.shape}, expected {tuple(shape)}")
            if not np.all(np.isfinite(arr)):
                raise AuditInputError(f"the gradient of {name} ({source}) has non-finite entries")
            grads.append(arr)
            missing.append(False)
        return grads, missing

    # subclasses: _loss_array, _to_numpy, claim(), own_loss(flat)


class _TorchHarness(_Harness):
    backend = "torch"

    def __init__(self, fn: Callable[..., Any], case: Case):
        super().__init__(fn, case)
        import torch

        from verify.backends.torch import build_model, to_torch_tasks

        self.torch, self.build_model = torch, build_model
        self.tasks = to_torch_tasks(case.tasks, "float64")

    def _loss_array(self, loss: Any) -> np.ndarray:
        torch = self.torch
        if torch.is_tensor(loss):
            return loss.detach().to("cpu", torch.float64).numpy()
        try:
            return np.asarray(loss, dtype=float)
        except (TypeError, ValueError):
            raise AuditInputError(f"the audited function must return a scalar tensor, got {_short(loss)}") from None

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
            model = self.build_model(case.model, params, "float64", "cpu")
            if reuse is not None:
                reuse["model"] = model
        else:
            with torch.no_grad():
                for p, value in zip(model.parameters(), params):
                    p.copy_(torch.as_tensor(np.asarray(value), dtype=torch.float64))
            for p in model.parameters():
                p.grad = None
                p.requires_grad_(True)
        leaves: list[Any] = list(model.parameters())
        h, a = case.hyper, case.algorithm

        def scalar(v: Any) -> Any:
            return torch.tensor(float(np.asarray(v)), dtype=torch.float64, requires_grad=True)

        if a in ("maml", "fomaml", "anil", "reptile"):
            args = (model, self.tasks, h["inner_lr"], h["inner_steps"])
        elif a == "newton":
            args = (model, self.tasks, h["inner_lr"], h["inner_steps"], h["damping"])
        elif a == "metasgd":
            lrs = [torch.tensor(np.asarray(extra[f"lrs[{i}]"]), dtype=torch.float64, requires_grad=True)
                   for i in range(len(params))]
            leaves += lrs
            args = (model, lrs, self.tasks, h["inner_steps"])
        elif a == "imaml":
            args = (model, self.tasks, h["lam"])
        elif a in ("r2d2", "lrd2"):
            hyper = [scalar(extra[k]) for k in ("lam", "scale", "offset")]
            leaves += hyper
            args = (model, self.tasks, *hyper)
        else:
            args = (model, self.tasks, h["n_classes"])
        return args, leaves

    def _call(self, variables: Sequence[np.ndarray],
              reuse: dict[str, Any] | None = None) -> tuple[Any, list[Any], list[np.ndarray]]:
        torch = self.torch
        args, leaves = self.arguments(variables, reuse)
        # The in-place check of claim() needs the values before the call; own-loss calls do not.
        before = [leaf.detach().clone() for leaf in leaves] if reuse is None else []
        # The audit's problems are small: intra-op threads only add synchronisation, which on a busy
        # machine costs milliseconds per op (measured 30x slower with 2 threads under load). One thread
        # for the call, the caller's setting restored after; results do not depend on it.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.enable_grad():
                out = self.fn(*args, **self.kwargs)
        except Exception as exc:  # the audited code's failure is bad input, shown in full
            raise _raised(exc, "the audited function") from exc
        finally:
            torch.set_num_threads(threads)
        return out, leaves, before

    def claim(self) -> Claim:
        torch, case = self.torch, self.case
        out, leaves, before = self._call(case.variables)
        notes: list[str] = []
        changed = [case.names[i] for i, (leaf, b) in enumerate(zip(leaves, before))
                   if not torch.equal(leaf.detach(), b)]
        if changed:
            notes.append(f"the function modified {', '.join(changed)} in place (through .data, an in-place "
                         "optimiser step or copy_); the audit is at the initial values, and in-place updates "
                         "also cut the autograd graph")
        if case.algorithm == "reptile":
            if torch.is_tensor(out) or not isinstance(out, (list, tuple)):
                raise AuditInputError(f"reptile: the function must return the direction as a list of tensors "
                                      f"shaped like model.parameters(), got {_short(out)}")
            grads, missing = self._check_grads(_leaves_keep_none(list(out)), "returned direction")
            return Claim(None, grads, missing, "returned direction", notes)
        grads_out = None
        if isinstance(out, (tuple, list)) and not torch.is_tensor(out):
            if len(out) != 2:
                raise AuditInputError(f"the function must return the meta-loss or (loss, grads), got a "
                                      f"{type(out).__name__} of length {len(out)}")
            out, grads_out = out
        loss = self._check_loss(out)
        if grads_out is not None:
            grads, missing = self._check_grads(_leaves_keep_none(grads_out), "returned grads")
            return Claim(loss, grads, missing, "returned (loss, grads)", notes)
        if any(leaf.grad is not None for leaf in leaves):
            grads, missing = self._check_grads([leaf.grad for leaf in leaves], ".grad")
            return Claim(loss, grads, missing, ".grad left by the function's own backward()", notes)
        if torch.is_tensor(out) and out.requires_grad:
            try:
                g = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
            except RuntimeError as exc:
                raise _raised(exc, "differentiating the returned meta-loss (torch.autograd.grad)") from exc
            grads, missing = self._check_grads(list(g), "torch.autograd.grad of the returned loss")
            return Claim(loss, grads, missing, "torch.autograd.grad of the returned meta-loss", notes)
        notes.append("the returned meta-loss does not require grad and no .grad was set: no gradient reached "
                     "any tensor")
        return Claim(loss, [np.zeros(s) for s in case.shapes], [True] * self.n, "none", notes)

    def own_loss(self) -> Callable[[np.ndarray], float]:
        shapes = self.case.shapes
        reuse: dict[str, Any] = {}

        def f(x: np.ndarray) -> float:
            out, _, _ = self._call(unflatten(np.asarray(x, dtype=float), shapes), reuse)
            if isinstance(out, (tuple, list)) and not self.torch.is_tensor(out):
                out = out[0]
            return self._check_loss(out)

        return f


#: Compiled JAX functions, reused across audits of the same function on problems of the same
#: shapes and static hyper-parameters (several seeds of one configuration compile once).
_JAX_CACHE: OrderedDict[Any, dict[str, Any]] = OrderedDict()
_JAX_CACHE_SIZE = 64


class _JaxHarness(_Harness):
    backend = "jax"

    def __init__(self, fn: Callable[..., Any], case: Case):
        super().__init__(fn, case)
        import jax

        from verify.backends.jax import build_apply, to_jax_tasks  # enables float64 (jax_enable_x64)
        from verify.backends.jax._model import spec_key

        self.jax = jax
        self.tasks = to_jax_tasks(case.tasks, "float64")
        a = case.algorithm
        # Positions of the differentiated arguments and of the task list in the call.
        self.diff = {"metasgd": (0, 2), "r2d2": (0, 3, 4, 5), "lrd2": (0, 3, 4, 5)}.get(a, (0,))
        self.task_pos = 3 if a == "metasgd" else 2
        statics = tuple((k, v) for k, v in sorted(case.hyper.items()) if k in ("inner_lr", "inner_steps", "lam",
                                                                                  "damping", "n_classes"))
        shapes = (tuple(case.shapes), tuple(tuple((a.shape, str(a.dtype)) for a in t) for t in self.tasks))
        try:
            key = (fn, a, spec_key(case.model), statics, tuple(sorted(self.kwargs.items())), shapes)
            hash(key)
        except TypeError:
            key = None
        entry = _JAX_CACHE.get(key) if key is not None else None
        if entry is None:
            entry = {"apply": build_apply(case.model), "jits": {}, "eager": set()}
            if key is not None:
                _JAX_CACHE[key] = entry
                while len(_JAX_CACHE) > _JAX_CACHE_SIZE:
                    _JAX_CACHE.popitem(last=False)
        else:
            _JAX_CACHE.move_to_end(key)
        self.apply_fn, self._jits, self._eager = entry["apply"], entry["jits"], entry["eager"]

    def _loss_array(self, loss: Any) -> np.ndarray:
        try:
            arr = np.asarray(loss)
        except Exception:
            raise AuditInputError(f"the audited function must return a scalar, got {_short(loss)}") from None
        if not (np.issubdtype(arr.dtype, np.number) and arr.dtype != bool):
            raise AuditInputError(f"the audited function must return a scalar, got {_short(loss)}")
        return arr

    def _to_numpy(self, leaf: Any) -> np.ndarray:
        return np.asarray(leaf, dtype=float)

    def diff_arguments(self, variables: Sequence[Any]) -> list[Any]:
        """The differentiated arguments: ``[params]``, ``[params, lrs]`` or ``[params, lam, scale, offset]``."""
        jnp = self.jax.numpy
        case = self.case
        params, extra = case.split(list(variables))
        p = [jnp.asarray(v) for v in params]
        if case.algorithm == "metasgd":
            return [p, [jnp.asarray(extra[f"lrs[{i}]"]) for i in range(len(params))]]
        if case.algorithm in ("r2d2", "lrd2"):
            return [p, *(jnp.asarray(np.asarray(extra[k])[()]) for k in ("lam", "scale", "offset"))]
        return [p]

    def assemble(self, diff_args: Sequence[Any], tasks: Any) -> list[Any]:
        """The full positional argument list of the calling contract."""
        h, a = self.case.hyper, self.case.algorithm
        p = diff_args[0]
        if a in ("maml", "fomaml", "anil", "reptile"):
            return [p, self.apply_fn, tasks, h["inner_lr"], h["inner_steps"]]
        if a == "newton":
            return [p, self.apply_fn, tasks, h["inner_lr"], h["inner_steps"], h["damping"]]
        if a == "metasgd":
            return [p, self.apply_fn, diff_args[1], tasks, h["inner_steps"]]
        if a == "imaml":
            return [p, self.apply_fn, tasks, h["lam"]]
        if a in ("r2d2", "lrd2"):
            return [p, self.apply_fn, tasks, *diff_args[1:]]
        return [p, self.apply_fn, tasks, h["n_classes"]]

    def _call_fn(self, diff_args: Sequence[Any], tasks: Any) -> Any:
        return self.fn(*self.assemble(diff_args, tasks), **self.kwargs)

    def _run(self, key: str, fun: Callable[..., Any], diff_args: Sequence[Any]) -> Any:
        """``fun(diff_args, tasks)`` under ``jax.jit`` (compiled once per key), eagerly if it cannot be traced.

        Eager JAX dispatches op by op, which makes the hundreds of meta-loss
        evaluations of a finite-difference check take minutes; under ``jit`` the
        static arguments (``apply_fn``, step counts, learning rates) are Python
        values closed over, so Python control flow on them works, and the tasks
        are traced arguments, so another seed of the same shapes reuses the
        compilation. Code that cannot be traced (``float(x)``, value-dependent
        branches) runs eagerly, and its own exceptions surface from that run.
        """
        diff_args = list(diff_args)
        if key not in self._eager:
            jitted = self._jits.get(key)
            if jitted is None:
                jitted = self._jits[key] = self.jax.jit(fun)
            try:
                return jitted(diff_args, self.tasks)
            except Exception:
                self._eager.add(key)
        return fun(diff_args, self.tasks)

    def claim(self) -> Claim:
        jax, case = self.jax, self.case
        diff0 = self.diff_arguments(case.variables)
        # The output's structure from an abstract trace (no compilation): a scalar loss goes straight
        # to jax.value_and_grad, saving a compilation of the plain call.
        try:
            shape = jax.eval_shape(self._call_fn, diff0, self.tasks)
        except Exception:
            shape = None
        scalar = (case.algorithm != "reptile" and shape is not None and hasattr(shape, "shape")
                  and getattr(shape, "size", 2) == 1)
        if not scalar:
            try:
                out = self._run("call", self._call_fn, diff0)
            except Exception as exc:
                raise _raised(exc, "the audited function") from exc
        if scalar:
            out = None
        elif case.algorithm == "reptile":
            if not isinstance(out, (list, tuple)):
                raise AuditInputError(f"reptile: the function must return the direction as a list of arrays "
                                      f"shaped like params, got {_short(out)}")
            grads, missing = self._check_grads(_leaves_keep_none(list(out)), "returned direction")
            return Claim(None, grads, missing, "returned direction")
        if isinstance(out, (tuple, list)):
            if len(out) != 2:
                raise AuditInputError(f"the function must return the meta-loss or (loss, grads), got a "
                                      f"{type(out).__name__} of length {len(out)}")
            loss = self._check_loss(out[0])
            grads, missing = self._check_grads(_leaves_keep_none(out[1]), "returned grads")
            return Claim(loss, grads, missing, "returned (loss, grads)")
        if out is not None:
            self._check_loss(out)

        def value_and_grad(diff_args: list[Any], tasks: Any) -> Any:
            return jax.value_and_grad(lambda d: self._call_fn(d, tasks))(diff_args)

        try:
            loss, g = self._run("value_and_grad", value_and_grad, diff0)
        except Exception as exc:
            raise _raised(exc, "jax.value_and_grad of the audited function") from exc
        grads, missing = self._check_grads(_leaves_keep_none(list(g)), "jax.value_and_grad")
        return Claim(self._check_loss(loss), grads, missing, "jax.value_and_grad of the returned meta-loss")

    def own_loss(self) -> Callable[[np.ndarray], Any]:
        shapes = self.case.shapes

        def f(x: np.ndarray) -> Any:
            x = np.asarray(x)
            diff = self.diff_arguments(unflatten(x, shapes))
            if np.iscomplexobj(x):
                # Complex step: a function that cannot take complex parameters (jax.grad inside
                # rejects complex outputs) is not analytic for the engine, which then uses Richardson.
                if "complex-rejected" in self._eager:
                    raise NotAnalyticError("the audited function rejects complex parameters")
                try:
                    out = self._run("call-complex", self._call_fn, diff)
                except Exception as exc:
                    self._eager.add("complex-rejected")
                    raise NotAnalyticError(f"the audited function rejects complex parameters: {exc}") from exc
            else:
                try:
                    out = self._run("call", self._call_fn, diff)
                except Exception as exc:
                    raise _raised(exc, "the audited function") from exc
            return self._check_loss(out[0] if isinstance(out, (tuple, list)) else out)

        return f


# ---------------------------------------------------------------------------
# the result
# ---------------------------------------------------------------------------


@dataclass
class TensorCheck:
    """One differentiated tensor: worst entry of ``|got - reference|`` relative to the gradient's scale."""

    name: str
    shape: tuple[int, ...]
    status: str
    error: float
    where: str
    reference: float
    got: float
    missing: bool = False

    def to_dict(self) -> dict[str, Any]:
        return jsonable(self.__dict__)


def _g(x: float) -> str:
    return f"{x:.12g}"


@dataclass
class AuditResult:
    """The verdict of an audit.

    Attributes:
        status: ``"pass"`` (verified) or ``"fail"`` (mismatch).
        algorithm, backend: what was audited.
        problem: the generated problem (sizes, tasks, hyper-parameters, seed).
        tolerance: the relative tolerance of the reference comparisons, and
            ``tolerance_reason`` where it comes from.
        loss: the meta-loss comparison (None for Reptile).
        tensors: per-tensor worst relative errors against the reference.
        independent: the claimed gradient against directional derivatives of
            the function's own meta-loss (None where the algorithm's direction
            is not a gradient: FOMAML, Reptile).
        which_side: the sentence saying which side is wrong.
        diagnosis: the named bug (None when verified or unexplained).
    """

    status: str
    algorithm: str
    backend: str
    problem: str
    seed: int
    tolerance: float
    tolerance_reason: str
    condition: float
    loss: dict[str, Any] | None
    tensors: list[TensorCheck]
    independent: dict[str, Any] | None
    which_side: str
    diagnosis: Diagnosis | None
    source: str
    notes: list[str] = field(default_factory=list)
    title: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == PASS

    @property
    def worst(self) -> TensorCheck | None:
        return max(self.tensors, key=lambda t: t.error) if self.tensors else None

    def headline(self) -> str:
        """The one-line chex-style message."""
        a = self.algorithm
        tol = f"(tol {self.tolerance:.1e}, float64)"
        if self.passed:
            w = self.worst
            err = w.error if w else 0.0
            return f"{a} meta-gradient verified: worst rel {err:.1e} {tol}"
        if self.loss and self.loss["status"] == FAIL:
            return (f"{a} meta-loss mismatch: reference={_g(self.loss['reference'])} got={_g(self.loss['got'])} "
                    f"rel={self.loss['error']:.1e} {tol}")
        bad = [t for t in self.tensors if t.status == FAIL]
        if bad:
            w = max(bad, key=lambda t: t.error)
            what = "direction" if a == "reptile" else ("meta-gradient" if a not in ("protonet", "matchingnet")
                                                       else "gradient")
            return f"{a} {what} mismatch: {w.where} reference={_g(w.reference)} got={_g(w.got)} rel={w.error:.1e} {tol}"
        ind = self.independent or {}
        return (f"{a} meta-gradient inconsistent with its own meta-loss: {ind.get('reason', '')}")

    def report(self) -> str:
        """The full human-readable verdict (what the CLI prints and the pytest plugin fails with)."""
        lines = [self.headline()]
        head = f"metaverify audit of {self.algorithm} ({self.backend})" + (f": {self.title}" if self.title else "")
        lines.append(f"{head}: {'VERIFIED' if self.passed else 'MISMATCH'}")
        lines.append(f"  problem: {self.problem}")
        lines.append(f"  gradients from: {self.source}")
        lines.append(f"  tolerance: {self.tolerance:.2e} relative ({self.tolerance_reason})")
        if self.loss:
            L = self.loss
            lines.append(f"  meta-loss: reference={_g(L['reference'])} got={_g(L['got'])} rel={L['error']:.1e} "
                         f"-> {L['status']}")
        what = "direction" if self.algorithm == "reptile" else "meta-gradient"
        lines.append(f"  {what} vs reference (per tensor, worst entry, relative to the largest reference entry):")
        width = max((len(t.name) for t in self.tensors), default=4)
        for t in self.tensors:
            flag = " (no gradient: None)" if t.missing else ""
            lines.append(f"    {t.name:<{width}} {str(list(t.shape)):<10} rel={t.error:.1e} at {t.where}: "
                         f"reference={_g(t.reference)} got={_g(t.got)} -> {t.status}{flag}")
        if self.independent:
            ind = self.independent
            lines.append(f"  {what} vs {ind['method']} derivatives of the function's own meta-loss "
                         f"({ind.get('budget', 'thorough')}): {ind['status']} (error {ind['error']:.1e}, "
                         f"tol {ind['tolerance']:.1e}): {ind['reason']}")
        if self.which_side:
            lines.append(f"  verdict: {self.which_side}")
        if not self.passed:
            if self.diagnosis is not None:
                lines.append(f"  diagnosis: {self.diagnosis}".replace("\n", "\n  "))
            else:
                lines.append("  diagnosis: unexplained mismatch (no variant of the catalogue matches within the "
                             "tolerance)")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.report()

    def to_dict(self) -> dict[str, Any]:
        """The ``result.audit`` object of the versioned JSON schema (``docs/audit.md``)."""
        return jsonable({
            "status": self.status,
            "algorithm": self.algorithm,
            "backend": self.backend,
            "title": self.title,
            "problem": self.problem,
            "seed": self.seed,
            "dtype": "float64",
            "tolerance": self.tolerance,
            "tolerance_reason": self.tolerance_reason,
            "condition": self.condition,
            "gradient_source": self.source,
            "meta_loss": self.loss,
            "tensors": [t.to_dict() for t in self.tensors],
            "independent": self.independent,
            "which_side": self.which_side,
            "diagnosis": None if self.diagnosis is None else self.diagnosis.to_dict(),
            "unexplained": (not self.passed) and self.diagnosis is None,
            "headline": self.headline(),
            "notes": list(self.notes),
            "seconds": round(self.seconds, 3),
        })

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, **({"indent": 2} | kwargs))

    def junit_cases(self) -> list[dict[str, Any]]:
        """One JUnit test case per check (meta-loss, each tensor, the independent check)."""
        cls = f"metaverify.audit.{self.backend}.{self.algorithm}"
        detail = self.report()
        cases = []
        if self.loss:
            cases.append({"classname": cls, "name": "meta-loss", "status": self.loss["status"],
                          "message": f"meta-loss rel={self.loss['error']:.1e} (tol {self.tolerance:.1e})",
                          "detail": detail})
        for t in self.tensors:
            cases.append({"classname": cls, "name": t.name, "status": t.status,
                          "message": f"{t.where} reference={_g(t.reference)} got={_g(t.got)} rel={t.error:.1e} "
                                     f"(tol {self.tolerance:.1e})", "detail": detail})
        if self.independent:
            st = self.independent["status"]
            cases.append({"classname": cls, "name": "finite differences of own meta-loss",
                          "status": st if st in (PASS, FAIL) else "skipped",
                          "message": self.independent["reason"][:300], "detail": detail})
        if cases:
            cases[0]["seconds"] = self.seconds
        return cases


# ---------------------------------------------------------------------------
# the audit
# ---------------------------------------------------------------------------


def _which_side(loss_ok: bool | None, ref_ok: bool, own: str | None, algorithm: str) -> str:
    if own is None:
        return ("" if ref_ok else f"{algorithm}'s direction is defined, not derived: it is compared with the "
                "reference only")
    own_ok = own == PASS
    if ref_ok and own_ok:
        return "the gradient matches the reference and finite differences of the function's own meta-loss"
    if ref_ok and own == INCONCLUSIVE:
        return "the gradient matches the reference; finite differences of the function's meta-loss were inconclusive"
    if ref_ok:
        return ("the gradient matches the reference but not finite differences of the meta-loss the function "
                "returns: the returned loss is not the function that was differentiated")
    if own_ok:
        if loss_ok is False:
            return ("the gradient is the exact gradient of the function's own meta-loss, but that meta-loss is not "
                    f"{algorithm}'s: the forward computation (the inner loop or the loss) differs from the algorithm")
        return ("the gradient is the gradient of the function's own meta-loss, which agrees with the reference at "
                "this point but not nearby: the forward computation differs from the algorithm")
    if own == INCONCLUSIVE:
        return "the gradient disagrees with the reference; finite differences of the function's meta-loss were inconclusive"
    if loss_ok is False:
        return ("the gradient disagrees with the reference and is not the gradient of the function's own meta-loss, "
                "which also differs from the reference: both the forward and the backward computation are wrong")
    return ("the meta-loss matches the reference but the gradient is not the gradient of that meta-loss: the "
            "backward pass (what is differentiated) is wrong")


def audit(
    fn: Callable[..., Any],
    algorithm: str,
    backend: str | None = None,
    *,
    model: str | MLP | None = None,
    loss: str | None = None,
    inner_lr: float | None = None,
    inner_steps: int | None = None,
    n_tasks: int | None = None,
    shots: int | None = None,
    queries: int | None = None,
    n_way: int | None = None,
    lam: float | None = None,
    scale: float | None = None,
    offset: float | None = None,
    damping: float | None = None,
    bias_column: bool | None = None,
    normalize: bool | None = None,
    form: str | None = None,
    newton_steps: int | None = None,
    seed: int = 0,
    directions: int = 4,
    thorough: bool = False,
    title: str = "",
    case: Case | None = None,
) -> AuditResult:
    """Audit a meta-gradient implementation ``fn`` of ``algorithm`` against the reference.

    Builds a seeded random problem (or uses ``case``), calls ``fn`` under the
    calling contract of the backend (module docstring), and compares its
    meta-loss and meta-gradient with the analytic reference and its gradient
    with directional derivatives of its own meta-loss; on a mismatch, names the
    bug from the diagnosis catalogue (:mod:`verify._diagnosis`).

    Args:
        fn: the implementation under audit.
        algorithm: ``maml``, ``fomaml``, ``anil``, ``metasgd``, ``reptile``,
            ``newton``, ``imaml``, ``r2d2``, ``lrd2``, ``protonet``, ``matchingnet``.
        backend: ``"torch"`` or ``"jax"``; default: ``"jax"`` when ``fn``'s
            second parameter is named ``apply_fn``, else ``"torch"``.
        model: ``"mlp:1-40-40-1:tanh[:nobias]"`` or a ``reference.models.MLP``;
            default: a small random MLP drawn from ``seed``.
        loss: ``"mse"`` or ``"ce"`` (gradient-based algorithms).
        inner_lr, inner_steps, n_tasks, shots, queries, n_way, lam, scale,
            offset, damping, bias_column, normalize, form, newton_steps: the
            problem; unspecified values are drawn from ``seed`` within ranges
            where the algorithm is well posed (:func:`verify.algorithms.build_case`).
        seed: seed of the problem and of the random directions.
        directions: random directions of the full independent finite-difference check
            (0 skips every finite-difference check: for expensive functions; the verdict then
            rests on the reference).
        thorough: run the full finite-difference check (``directions`` random directions)
            even when the meta-loss and meta-gradient match the reference. By default
            (``False``) the full check runs only on a mismatch, where it says which side is
            wrong, and a match gets the fast check (:func:`verify.check_gradient` with
            ``budget="fast"``: one direction along the claimed gradient plus a random one,
            about 11 evaluations of the function's meta-loss); a fast check that is not
            conclusive is followed by the full one.
        title: a label for reports.
        case: a ready :class:`verify.algorithms.Case` (overrides the problem arguments).

    Returns:
        An :class:`AuditResult`; ``result.passed`` is the verdict.

    Raises:
        InvalidInputError: unknown algorithm/backend, backend not installed, bad problem.
        AuditInputError: ``fn`` raised (the message holds its traceback), returned a
            non-scalar or non-finite meta-loss, or the wrong number or shape of gradients.
    """
    from verify._check import _check_gradient, check_gradient
    from verify.backends import load_backend
    from verify.matrix import float32_condition, locate

    t0 = time.perf_counter()
    if not callable(fn):
        raise InvalidInputError(f"fn={_short(fn)} is not callable; pass the function to audit")
    if algorithm not in AUDITABLE:
        raise InvalidInputError(f"algorithm={algorithm!r} cannot be audited; choose one of {', '.join(AUDITABLE)}")
    backend = backend or infer_backend(fn)
    if backend not in BACKENDS:
        raise InvalidInputError(f"backend={backend!r} is unknown; choose 'torch' or 'jax'")
    if not isinstance(thorough, (bool, np.bool_)):
        raise InvalidInputError(f"thorough={thorough!r} must be True or False")
    if isinstance(directions, bool) or not isinstance(directions, int) or directions < 0:
        raise InvalidInputError(f"directions={directions!r} must be an integer >= 0 (0 skips the finite-difference "
                                "check of the function's own meta-loss)")
    load_backend(backend)  # a clear error with the install hint when missing
    if case is None:
        hyper = {k: v for k, v in dict(inner_lr=inner_lr, inner_steps=inner_steps, lam=lam, scale=scale,
                                       offset=offset, damping=damping, bias_column=bias_column,
                                       normalize=normalize, form=form, newton_steps=newton_steps).items()
                 if v is not None}
        case = _build_problem(algorithm, model=model, loss=loss, n_tasks=n_tasks, shots=shots, queries=queries,
                              n_way=n_way, seed=seed, hyper=hyper)
    elif case.algorithm != algorithm:
        raise InvalidInputError(f"case.algorithm={case.algorithm!r} differs from algorithm={algorithm!r}")

    ref_loss, ref_grads = evaluate(case)
    ref = flatten([np.asarray(g, dtype=float) for g in ref_grads])
    try:
        cond = float32_condition(case, ref)
    except Exception:  # rounding made the problem singular: no estimate, the table value stands
        cond = 1.0
    why = "the reference gradient's relative change when its inputs are rounded to float32, in units of float32's eps"
    if algorithm == "imaml":
        # The implicit gradient goes through (I + H/lam)^{-1}: forward errors (the reference's own
        # CG and inner solves included, each to a 1e-12 relative residual) scale with its condition.
        from reference import imaml

        info = imaml.meta_loss_and_grad_info(case.model, case.params, case.tasks, case.hyper["lam"])
        kappa = max(t.cond_estimate for t in info.tasks)
        if kappa > cond:
            cond, why = kappa, "max over tasks of cond(I + H_s(phi*)/lam), estimated by the reference's CG"
    tol = tolerance("float64", "reference_match", condition=cond)
    reason = "float64 'reference_match' = eps^(3/4)" + (f" x condition estimate {cond:.3g} ({why})" if cond > 1 else "")

    harness: _Harness = _TorchHarness(fn, case) if backend == "torch" else _JaxHarness(fn, case)
    claim = harness.claim()
    g = flatten(claim.grads)

    loss_check = None
    loss_ok: bool | None = None
    if claim.loss is not None and ref_loss is not None:
        err = abs(claim.loss - float(ref_loss)) / max(abs(float(ref_loss)), np.finfo(float).tiny)
        loss_ok = err <= tol
        loss_check = {"status": PASS if loss_ok else FAIL, "reference": float(ref_loss), "got": claim.loss,
                      "error": err, "tolerance": tol}

    scale_ = max(float(np.max(np.abs(ref), initial=0.0)), np.finfo(float).tiny)
    tensors = []
    offset_ = 0
    for name, shape, got, want, miss in zip(case.names, case.shapes, claim.grads, ref_grads, claim.missing):
        got, want = np.asarray(got, dtype=float).ravel(), np.asarray(want, dtype=float).ravel()
        diff = np.abs(got - want)
        idx = int(np.argmax(diff)) if diff.size else 0
        err = float(diff[idx]) / scale_ if diff.size else 0.0
        tensors.append(TensorCheck(name, tuple(shape), PASS if err <= tol else FAIL, err,
                                   locate(case, offset_ + idx), float(want[idx]), float(got[idx]), miss))
        offset_ += got.size
    ref_ok = all(t.status == PASS for t in tensors)

    independent = None
    own_status = None
    if ALGORITHMS[algorithm].differentiable and claim.loss is not None and directions > 0:
        own, x_own = harness.own_loss(), flatten(case.variables)
        v = None
        used, budget = directions, "thorough"
        if not thorough and ref_ok and loss_ok is not False:
            # The reference already confirms the gradient (to ~1e-12); the own-loss check only has to
            # confirm that the returned loss is the function that was differentiated: one direction
            # along the claimed gradient (plus a random part), without the kink probe and the noise
            # probes (both only matter for verdicts other than "pass"): 5 meta-loss evaluations
            # (central differences) or 3 (complex step). The full check (below) is for
            # mismatches, where it says which side is wrong, and for a fast check that did not pass.
            fast = _check_gradient(own, g, x_own, seed=seed, method="central" if backend == "torch" else None,
                                   budget="fast", probe_kinks=False, noise_probes=0)
            if fast.status == PASS:
                v, used, budget = fast, 1, "fast"
        if v is None:
            method = "richardson" if backend == "torch" else None
            v = check_gradient(own, g, x_own, directions=directions, seed=seed, method=method)
        own_status = v.status
        independent = {"status": v.status, "method": v.method or "finite-difference", "error": v.error,
                       "tolerance": v.tolerance, "reason": v.reason, "directions": used, "budget": budget}

    status = PASS if (ref_ok and loss_ok is not False and own_status != FAIL) else FAIL
    diagnosis = None
    if status == FAIL and not (ref_ok and loss_ok is not False):
        diagnosis = diagnose(case, claim.loss, claim.grads, missing=claim.missing, reference_loss=ref_loss,
                             reference_grads=ref_grads, tol=tol)
    return AuditResult(status, algorithm, backend, case.describe(), case.seed, tol, reason, cond, loss_check,
                       tensors, independent, _which_side(loss_ok, ref_ok and loss_ok is not False, own_status,
                                                         algorithm),
                       diagnosis, claim.source, claim.notes, title, time.perf_counter() - t0)
