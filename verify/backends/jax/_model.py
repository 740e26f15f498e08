"""Model, loss and conversion helpers shared by the JAX backend's algorithm modules.

Importing this module switches JAX to 64-bit mode with
``jax.config.update("jax_enable_x64", True)``. This is a **global** JAX
setting: it affects every JAX computation in the process after
``verify.backends.jax`` is imported (new arrays default to float64/int64
instead of float32/int32). The backend needs it because the reference is
float64; float32 computations stay float32 because every array and scalar
this backend creates is cast to the requested dtype explicitly.

The model is a pure function ``apply(params, x)`` over the CONVENTIONS list
layout ``[W1, b1, ..., WL, bL]`` (``Wl`` of shape ``(d_l, d_{l-1})``,
``h_l = act(h_{l-1} Wl^T + bl)``, linear last layer), built from a
``reference.models.MLP`` used as a *spec* (sizes, activation, loss, bias).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax

# Global JAX setting (see the module docstring): float64 must be available before any array is created.
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from reference.errors import InvalidInputError  # noqa: E402
from reference.tasks import Task  # noqa: E402

DTYPES: dict[str, Any] = {"float64": jnp.float64, "float32": jnp.float32}
# Integer class labels: int32 is what JAX code uses by default and indexes fine in both dtypes.
LABEL_DTYPE = jnp.int32

Params = list[jax.Array]
ApplyFn = Callable[[Sequence[jax.Array], jax.Array], jax.Array]
LossFn = Callable[[Sequence[jax.Array], jax.Array, jax.Array], jax.Array]


def check_dtype(dtype: Any) -> Any:
    """Map ``"float64"``/``"float32"`` to the JAX dtype; anything else is an error."""
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise InvalidInputError(f"dtype={dtype!r} is not supported; choose 'float64' or 'float32'")
    return DTYPES[dtype]


def check_jit(jit: Any) -> bool:
    if not isinstance(jit, bool):
        raise InvalidInputError(f"jit={jit!r} must be True or False")
    return jit


# ---------------------------------------------------------------------------
# The model as a pure function
# ---------------------------------------------------------------------------

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "softplus": jax.nn.softplus,
    # jax.nn.relu's custom JVP gives derivative 0 at 0, as CONVENTIONS requires.
    "relu": jax.nn.relu,
    "identity": lambda z: z,
}


def spec_key(spec: Any) -> tuple[tuple[int, ...], str, str, bool]:
    """A hashable description of an ``MLP`` spec (used to cache compiled functions).

    A ``reference.nets.Network`` (Conv4, ResNet-12, a layer list) gets the key of
    :func:`verify.backends.jax._nets.network_key` (first entry ``"network"``).
    """
    from reference.nets.network import Network

    if isinstance(spec, Network):
        from verify.backends.jax._nets import network_key

        return network_key(spec)  # type: ignore[return-value]
    try:
        key = (tuple(int(d) for d in spec.sizes), str(spec.activation), str(spec.loss_name), bool(spec.bias))
    except AttributeError as exc:
        raise InvalidInputError(
            f"model={spec!r} must be a reference.models.MLP (sizes, activation, loss_name, bias)"
        ) from exc
    if key[1] not in ACTIVATIONS:
        raise InvalidInputError(
            f"activation={key[1]!r} is not supported by the JAX backend; use one of {list(ACTIVATIONS)}"
        )
    return key


def _apply_from_key(key: tuple[tuple[int, ...], str, str, bool]) -> ApplyFn:
    if key[0] == "network":
        from verify.backends.jax._nets import apply_from_network_key

        return apply_from_network_key(key)
    sizes, activation, _, bias = key
    act = ACTIVATIONS[activation]
    n_layers = len(sizes) - 1
    stride = 2 if bias else 1

    def apply(params: Sequence[jax.Array], x: jax.Array) -> jax.Array:
        h = x
        for layer in range(n_layers):
            h = h @ params[stride * layer].T
            if bias:
                h = h + params[stride * layer + 1]
            if layer < n_layers - 1:
                h = act(h)
        return h

    return apply


def build_apply(spec: Any) -> ApplyFn:
    """``apply(params, x)``: the network output ``f(x)`` of an ``MLP`` spec, as a pure JAX function.

    ``h_0 = x``, ``h_l = act(h_{l-1} W_l^T + b_l)`` for ``l < L``, output
    ``h_{L-1} W_L^T + b_L`` (CONVENTIONS). ``params`` is the list
    ``[W1, b1, ..., WL, bL]`` (``[W1, ..., WL]`` without biases).
    """
    return _apply_from_key(spec_key(spec))


def loss_from_output(name: str, out: jax.Array, y: jax.Array) -> jax.Array:
    """CONVENTIONS losses of the network output, written the way JAX code writes them (no optax).

    * ``mse``: ``mean((out - y)^2)`` over all elements (``F.mse_loss``).
    * ``ce``: ``mean(-log_softmax(out)[y])`` with integer labels (``F.cross_entropy``).
    * ``bce``: ``mean(-y log sigmoid(out) - (1 - y) log sigmoid(-out))`` (``F.binary_cross_entropy_with_logits``),
      via ``jax.nn.log_sigmoid`` as optax's ``sigmoid_binary_cross_entropy`` does.
    """
    if name == "mse":
        return jnp.mean((out - y) ** 2)
    if name == "ce":
        logp = jax.nn.log_softmax(out, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))
    if name == "bce":
        return jnp.mean(-y * jax.nn.log_sigmoid(out) - (1 - y) * jax.nn.log_sigmoid(-out))
    raise InvalidInputError(f"loss={name!r} is unknown; choose 'mse', 'ce' or 'bce'")


def _loss_from_key(key: tuple[tuple[int, ...], str, str, bool]) -> LossFn:
    apply = _apply_from_key(key)
    name = key[2]

    def loss(params: Sequence[jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
        return loss_from_output(name, apply(params, x), y)

    return loss


def build_loss(spec: Any) -> LossFn:
    """``loss(params, x, y)``: the spec's loss of ``apply(params, x)`` (see :func:`loss_from_output`)."""
    return _loss_from_key(spec_key(spec))


# ---------------------------------------------------------------------------
# Conversions NumPy <-> JAX
# ---------------------------------------------------------------------------


def to_jax_params(params: Sequence[Any], dtype: str = "float64") -> Params:
    """A parameter list as JAX arrays of ``dtype`` (the cast makes float32 runs really float32)."""
    jdt = check_dtype(dtype)
    return [jnp.asarray(np.asarray(p), dtype=jdt) for p in params]


def to_jax_scalar(value: Any, dtype: str = "float64") -> jax.Array:
    """A hyper-parameter as a 0-d array of ``dtype`` (a Python float would be weakly typed float64)."""
    return jnp.asarray(value, dtype=check_dtype(dtype))


def _is_label_array(y: np.ndarray) -> bool:
    return np.issubdtype(y.dtype, np.integer)


def to_jax_tasks(tasks: Sequence[Any], dtype: str = "float64") -> list[Task]:
    """Convert a list of tasks to :class:`reference.tasks.Task` of JAX arrays.

    Inputs and real-valued targets become ``dtype``; integer class labels
    become ``int32``. A ``Task`` is a NamedTuple, hence a JAX pytree: the list
    can be passed straight into ``jax.jit``/``jax.grad``-transformed code
    (the calling contract of audited functions is
    ``fn(params, apply_fn, tasks, inner_lr, inner_steps)``).
    """
    jdt = check_dtype(dtype)
    out = []
    for t in tasks:
        fields = []
        for name in Task._fields:
            a = np.asarray(getattr(t, name) if hasattr(t, name) else t[Task._fields.index(name)])
            if name.startswith("y") and _is_label_array(a):
                fields.append(jnp.asarray(a, dtype=LABEL_DTYPE))
            else:
                fields.append(jnp.asarray(a, dtype=jdt))
        out.append(Task(*fields))
    return out


def batch_tasks(tasks: Sequence[Task]) -> Task | tuple[Task, ...]:
    """Stack tasks of equal shapes into one ``Task`` with a leading task axis (for ``jax.vmap``).

    Tasks of different shapes cannot be stacked; they are returned as a tuple
    and the meta-loss loops over them in Python instead.
    """
    shapes = {tuple(a.shape for a in t) for t in tasks}
    if len(shapes) == 1:
        return Task(*(jnp.stack(arrays) for arrays in zip(*tasks)))
    return tuple(tasks)


def task_map(task_fn: Callable[..., Any], batch: Task | tuple[Task, ...], *args: Any) -> Any:
    """``task_fn(task, *args)`` for every task of the meta-batch, stacked along a leading task axis.

    A stacked batch is mapped with ``jax.vmap`` (how JAX meta-learning code
    processes a meta-batch); a tuple of ragged tasks is looped over.
    """
    if isinstance(batch, Task):
        return jax.vmap(task_fn, in_axes=(0,) + (None,) * len(args))(batch, *args)
    outs = [task_fn(t, *args) for t in batch]
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs)


def task_mean(task_fn: Callable[..., Any], batch: Task | tuple[Task, ...], *args: Any) -> Any:
    """Mean over the meta-batch of ``task_fn(task, *args)`` (a pytree of arrays); see :func:`task_map`."""
    return jax.tree_util.tree_map(lambda a: jnp.mean(a, axis=0), task_map(task_fn, batch, *args))


def to_numpy(tree: Any) -> Any:
    """JAX results as float64 NumPy arrays (lists, tuples, dicts kept; 0-d values become Python floats)."""
    if isinstance(tree, list):
        return [to_numpy(t) for t in tree]
    if isinstance(tree, tuple):
        return tuple(to_numpy(t) for t in tree)
    if isinstance(tree, dict):
        return {k: to_numpy(v) for k, v in tree.items()}
    arr = np.asarray(tree, dtype=np.float64)
    return float(arr) if arr.ndim == 0 else arr


#: XLA options of the backend's programs compiled inside :func:`quick_compile`: LLVM at optimisation level 0
#: and XLA:CPU's classic elemental emitters for fused loops instead of its newer MLIR fusion emitters. The
#: HLO (the computation, its derivatives, XLA's algebraic simplification and fusion decisions) is the same;
#: only how the fused loops become machine code differs (results agree to round-off). On the check matrix's
#: small problems compiling is ~90% of a JAX cell's time; these options cut a program's compile CPU time
#: 3-5x (jax 0.10, 2-core CPU: Newton-MAML 3.3 s -> 0.7 s, LR-D2 2.4 -> 0.7, LSTM optimiser 3.5 -> 1.1)
#: while running it stays in the milliseconds.
QUICK_COMPILE_OPTIONS: dict[str, Any] = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
_QUICK = contextvars.ContextVar("verify_jax_quick_compile", default=False)


@contextlib.contextmanager
def quick_compile(enabled: bool = True) -> Iterator[None]:
    """Compile the backend's jitted programs called in the block with :data:`QUICK_COMPILE_OPTIONS`.

    The check matrix runs each program once or twice, so compile time, not run time, is its cost; benchmarks
    and library users keep XLA's default (optimised) compilation. Each :func:`maybe_jit` program keeps one
    compiled version per setting, so switching does not serve a program compiled under the other one.
    """
    token = _QUICK.set(bool(enabled))
    try:
        yield
    finally:
        _QUICK.reset(token)


class _Jitted:
    """``jax.jit(fn)``, or under :func:`quick_compile` ``jax.jit(fn, compiler_options=QUICK_COMPILE_OPTIONS)``."""

    def __init__(self, fn: Callable[..., Any], kwargs: dict[str, Any]):
        self._fn, self._kwargs = fn, kwargs
        self._jitted: dict[bool, Callable[..., Any]] = {}
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        quick = _QUICK.get()
        f = self._jitted.get(quick)
        if f is None:
            options = {"compiler_options": QUICK_COMPILE_OPTIONS} if quick else {}
            f = self._jitted[quick] = jax.jit(self._fn, **self._kwargs, **options)
        return f(*args, **kwargs)


def maybe_jit(fn: Callable[..., Any], jit: bool, **kwargs: Any) -> Callable[..., Any]:
    """``jax.jit(fn)`` when ``jit`` (compiled as :func:`quick_compile` says) else ``fn`` (eager, op by op)."""
    return _Jitted(fn, kwargs) if jit else fn


@contextlib.contextmanager
def placement(device: str = "cpu", *, tf32: bool = False) -> Iterator[None]:
    """Run the block's JAX computations on ``device`` with float32 matrix products in full or TF32 precision.

    ``device`` is ``"cpu"`` or ``"cuda"`` (JAX's ``"gpu"`` platform): the block
    runs under ``jax.default_device``, so arrays this backend creates from
    NumPy inputs, and the jitted computations on them, live there, whatever
    JAX's own default is (on a GPU machine it is the GPU). Matrix products run
    under ``jax.default_matmul_precision``: ``"highest"`` (true float32) unless
    ``tf32`` asks for ``"tensorfloat32"``. Both settings are part of the jit
    cache key, so switching them retraces instead of reusing a stale program.

    Raises:
        InvalidInputError: an unknown ``device``, or ``"cuda"`` where JAX sees
            no GPU.
    """
    if device not in ("cpu", "cuda", "gpu"):
        raise InvalidInputError(f"device={device!r} is not supported; use 'cpu' or 'cuda'")
    platform = "cpu" if device == "cpu" else "gpu"
    try:
        target = jax.devices(platform)[0]
    except RuntimeError as exc:
        raise InvalidInputError(
            f"device={device!r} was requested but JAX sees no {platform.upper()} "
            f"(jax {jax.__version__}, devices {jax.devices()}); install a CUDA jaxlib or use device='cpu'"
        ) from exc
    with jax.default_device(target), jax.default_matmul_precision("tensorfloat32" if tf32 else "highest"):
        yield


def cached(builder: Callable[..., Any]) -> Callable[..., Any]:
    """Cache a builder of (jitted) functions on its hashable arguments.

    ``jax.jit`` caches compilations per function object and input shapes, so
    the function objects themselves must be reused across calls for the
    compile cache to hit.
    """
    return functools.lru_cache(maxsize=256)(builder)


__all__ = [
    "ACTIVATIONS",
    "DTYPES",
    "batch_tasks",
    "build_apply",
    "build_loss",
    "cached",
    "check_dtype",
    "check_jit",
    "loss_from_output",
    "maybe_jit",
    "placement",
    "quick_compile",
    "spec_key",
    "task_map",
    "task_mean",
    "to_jax_params",
    "to_jax_scalar",
    "to_jax_tasks",
    "to_numpy",
]
