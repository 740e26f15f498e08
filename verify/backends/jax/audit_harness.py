"""The JAX audit harness: calls a user's JAX meta-gradient under the calling contract.

The contract (``docs/audit.md``): the torch contract with ``model`` replaced by
``(params, apply_fn)``; a scalar result is differentiated with ``jax.value_and_grad``
with respect to the differentiated arguments the algorithm's row declares.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from reference.errors import NotAnalyticError
from reference.models import unflatten
from verify.algorithms import Case
from verify.auditing.harness import Claim, Harness, extra_keys, raised, short
from verify.auditing.problem import AuditInputError

__all__ = ["HARNESS", "JaxHarness"]

#: Compiled JAX functions, reused across audits of the same function on problems of the same
#: shapes and static hyper-parameters (several seeds of one configuration compile once).
_JAX_CACHE: OrderedDict[Any, dict[str, Any]] = OrderedDict()
_JAX_CACHE_SIZE = 64


class JaxHarness(Harness):
    backend = "jax"

    def __init__(self, fn: Callable[..., Any], case: Case, *, dtype: str = "float64",
                 default_dtype: str | None = None):
        if dtype != "float64":
            raise AuditInputError(f"dtype={dtype!r}: the JAX audit runs in float64 only (jax_enable_x64); "
                                  "audit float32 code with the torch backend or in float64")
        super().__init__(fn, case, dtype=dtype, default_dtype=default_dtype)
        import jax

        from verify.backends.jax import build_apply, to_jax_tasks  # enables float64 (jax_enable_x64)
        from verify.backends.jax._model import spec_key

        self.jax = jax
        self.tasks = to_jax_tasks(case.tasks, "float64")
        a = case.algorithm
        # Every hyper-parameter is static (closed over by the compiled call): part of the cache key.
        statics = tuple(sorted(case.hyper.items()))
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
            raise AuditInputError(f"the audited function must return a scalar, got {short(loss)}") from None
        if not (np.issubdtype(arr.dtype, np.number) and arr.dtype != bool):
            raise AuditInputError(f"the audited function must return a scalar, got {short(loss)}")
        return arr

    def _to_numpy(self, leaf: Any) -> np.ndarray:
        return np.asarray(leaf, dtype=float)

    def diff_arguments(self, variables: Sequence[Any]) -> list[Any]:
        """The differentiated arguments: ``[params, *extra]`` in the row's ``extra`` order
        (``[params]``, ``[params, lrs]``, ``[params, lam, scale, offset]``, ``[params, phi]``)."""
        jnp = self.jax.numpy
        case = self.case
        params, extra = case.split(list(variables))
        out: list[Any] = [[jnp.asarray(v) for v in params]]
        for name in self.row.extra:
            keys = extra_keys(case, name)
            if keys == [name]:  # one array: a scalar (lam) or MAML++'s (K, n) rates
                out.append(jnp.asarray(np.asarray(extra[name])[()]))
            else:  # a list: Meta-SGD's lrs (one per parameter), a learned optimiser's phi
                out.append([jnp.asarray(extra[k]) for k in keys])
        return out

    def assemble(self, diff_args: Sequence[Any], tasks: Any) -> list[Any]:
        """The full positional argument list of the calling contract (the row's JAX signature)."""
        h, row = self.case.hyper, self.row
        args: list[Any] = []
        for name in row.jax_signature():
            if name == "params":
                args.append(diff_args[0])
            elif name == "apply_fn":
                args.append(self.apply_fn)
            elif name == "tasks":
                args.append(tasks)
            elif name in row.extra:
                args.append(diff_args[1 + row.extra.index(name)])
            else:
                args.append(h[name])
        return args

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

    def find_low_precision(self) -> tuple[str, ...]:
        """Floating dtypes below float64 in the function's traced computation (``jnp.float32`` constants,
        ``.astype(jnp.float32)``): the evidence the audit needs before naming a mismatch float32 round-off.
        One more trace (``jax.make_jaxpr``), taken only on a mismatch; nested jaxprs (scan, cond, jit)
        are part of the printed program, so the types are read from it."""
        import re

        try:
            text = str(self.jax.make_jaxpr(self._call_fn)(self.diff_arguments(self.case.variables), self.tasks))
        except Exception:
            return ()
        names = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
        return tuple(sorted({names[m] for m in re.findall(r"\b(bf16|f16|f32)\[", text)}))

    def claim(self) -> Claim:
        jax, case = self.jax, self.case
        diff0 = self.diff_arguments(case.variables)
        # The output's structure from an abstract trace (no compilation): a scalar loss goes straight
        # to jax.value_and_grad, saving a compilation of the plain call.
        try:
            shape = jax.eval_shape(self._call_fn, diff0, self.tasks)
        except Exception:
            shape = None
        scalar = (self.row.quantity != "direction" and shape is not None and hasattr(shape, "shape")
                  and getattr(shape, "size", 2) == 1)
        if not scalar:
            try:
                out = self._run("call", self._call_fn, diff0)
            except Exception as exc:
                raise raised(exc, "the audited function") from exc
            if out is None:
                self._check_loss(None)  # "the audited function returned None; ..."
        if scalar:
            out = None
        elif self.row.quantity == "direction":
            if not isinstance(out, (list, tuple)):
                raise AuditInputError(f"{case.algorithm}: the function must return the direction as a list of arrays "
                                      f"shaped like params, got {short(out)}")
            grads, missing = self._check_grads(self.leaves(list(out)), "returned direction")
            return Claim(None, grads, missing, "returned direction")
        if isinstance(out, (tuple, list)):
            if len(out) != 2:
                raise AuditInputError(f"the function must return the meta-loss or (loss, grads), got a "
                                      f"{type(out).__name__} of length {len(out)}")
            loss = self._check_loss(out[0])
            grads, missing = self._check_grads(self.leaves(out[1]), "returned grads")
            return Claim(loss, grads, missing, "returned (loss, grads)", loss_dtype=str(np.asarray(out[0]).dtype))
        if out is not None:
            self._check_loss(out)

        def value_and_grad(diff_args: list[Any], tasks: Any) -> Any:
            return jax.value_and_grad(lambda d: self._call_fn(d, tasks))(diff_args)

        try:
            loss, g = self._run("value_and_grad", value_and_grad, diff0)
        except Exception as exc:
            raise raised(exc, "jax.value_and_grad of the audited function") from exc
        grads, missing = self._check_grads(self.leaves(list(g)), "jax.value_and_grad")
        return Claim(self._check_loss(loss), grads, missing, "jax.value_and_grad of the returned meta-loss",
                     loss_dtype=str(np.asarray(loss).dtype))

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
                    raise raised(exc, "the audited function") from exc
            return self._check_loss(out[0] if isinstance(out, (tuple, list)) else out)

        return f


#: The harness :func:`verify.auditing.harness.make_harness` builds for this backend.
HARNESS = JaxHarness
