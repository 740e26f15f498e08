"""Second-order checks of the single JAX operations meta-learning code relies on.

A meta-gradient through an inner loop (MAML, iMAML, R2-D2, ...) differentiates
a gradient: every operation on the path needs a correct second derivative.
For each operation this module builds a scalar function ``f(x)`` of one flat
vector ``x`` (the op's inputs, packed) and checks the Hessian-vector product
in both of JAX's second-order modes,

* forward-over-reverse: ``jax.jvp(jax.grad(f), (x,), (v,))[1]`` (what
  ``jax.hessian`` and most HVP code use),
* reverse-over-reverse: ``jax.grad(lambda x: jnp.vdot(jax.grad(f)(x), v))(x)``,

against finite differences of the float64 gradient ``jax.grad(f)`` (first
order only): for a few random ``u``, ``<u, H v>`` must equal
``D_v <u, grad f>(x)``, estimated by :func:`verify.directional_derivative`
with Richardson extrapolation, which also bounds its own error (the
``jax.check_grads`` habit: random projections, no Hessian). The HVPs under
test run in the requested dtype (the point is rounded to it first and the
reference is taken at the rounded point); the finite-difference reference is
always float64. Tolerance: ``verify.tolerance.tolerance(dtype, "gradient")``
plus the estimate's error bound, normwise (relative to ``||u|| ||H v||``).

Verdicts per op: ``"pass"``, ``"fail"`` (a wrong or non-finite HVP in either
mode), ``"unsupported"`` (a mode raises, e.g. forward mode through a
``jax.custom_vjp`` function; none of the ops below does in JAX 0.4-0.10).
The same op names as ``verify.backends.torch.ops`` where the op is the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import jax.scipy.special
import numpy as np

from reference.errors import InvalidInputError
from verify import directional_derivative
from verify.backends.jax._model import check_dtype, check_jit, loss_from_output
from verify.tolerance import tolerance

__all__ = ["MODES", "OPS", "check_second_order_ops"]

# Random projections <u, H v> compared per op and mode.
_PROJECTIONS = 3
# The epsilon of the hand-written normalisation layers (flax/haiku's default is 1e-5 or 1e-6).
_NORM_EPS = 1e-5

Fn = Callable[[jax.Array], jax.Array]


def _split(x: jax.Array, *shapes: tuple[int, ...]) -> list[jax.Array]:
    out, start = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(x[start : start + n].reshape(s))
        start += n
    return out


def _const(c: np.ndarray, x: jax.Array) -> jax.Array:
    """A constant in ``x``'s dtype (so a float32 check stays float32 under jax_enable_x64)."""
    return jnp.asarray(c, dtype=x.dtype)


def _away_from_zero(rng: np.random.Generator, n: int, low: float = 0.5, high: float = 2.0) -> np.ndarray:
    """Points with ``|x_i| >= low``: a finite-difference step never crosses relu's kink."""
    return rng.choice([-1.0, 1.0], size=n) * rng.uniform(low, high, size=n)


def _elementwise(act: Fn) -> Callable[[np.random.Generator], tuple[Fn, np.ndarray]]:
    def build(rng: np.random.Generator):
        c = rng.normal(size=8)
        return (lambda x: jnp.sum(_const(c, x) * act(x))), _away_from_zero(rng, 8)

    return build


def _cross_entropy(rng):
    y = jnp.asarray(rng.integers(0, 5, size=4), dtype=jnp.int32)
    return (lambda x: loss_from_output("ce", x.reshape(4, 5), y)), rng.normal(size=20)


def _log_softmax(rng):
    c = rng.normal(size=(4, 5))
    return (lambda x: jnp.sum(_const(c, x) * jax.nn.log_softmax(x.reshape(4, 5), axis=1))), rng.normal(size=20)


def _logsumexp(rng):
    c = rng.normal(size=4)
    return (lambda x: jnp.sum(_const(c, x) * jax.scipy.special.logsumexp(x.reshape(4, 5), axis=1))), \
        rng.normal(size=20)


def _mse(rng):
    y = rng.normal(size=(4, 3))
    return (lambda x: loss_from_output("mse", jnp.tanh(x.reshape(4, 3)), _const(y, x))), rng.normal(size=12)


def _bce(rng):
    y = rng.integers(0, 2, size=(4, 3)).astype(float)
    return (lambda x: loss_from_output("bce", x.reshape(4, 3), _const(y, x))), rng.normal(size=12)


def _pairwise(kind: str):
    def build(rng):
        c = rng.normal(size=(4, 5))

        def f(x):
            a, b = _split(x, (4, 3), (5, 3))
            if kind == "broadcast":
                d = jnp.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=-1)
            elif kind == "expanded":
                # The matmul form many codebases use: |a|^2 + |b|^2 - 2 a b^T.
                d = jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :] - 2 * a @ b.T
            else:
                # Euclidean distance, the analogue of torch.cdist (points kept apart: sqrt is smooth there).
                d = jnp.sqrt(jnp.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=-1))
            return jnp.sum(_const(c, x) * d)

        return f, rng.normal(size=27)

    return build


def _cosine(rng):
    c = rng.normal(size=(3, 4))

    def f(x):
        a, b = _split(x, (3, 5), (4, 5))
        ah = a / jnp.linalg.norm(a, axis=1, keepdims=True)
        bh = b / jnp.linalg.norm(b, axis=1, keepdims=True)
        return jnp.sum(_const(c, x) * (ah @ bh.T))

    return f, rng.normal(size=35)


def _solve(rng):
    c = rng.normal(size=4)
    x0 = np.concatenate([(rng.normal(size=(4, 4)) + 4 * np.eye(4)).ravel(), rng.normal(size=4)])

    def f(x):
        a, b = _split(x, (4, 4), (4,))
        return jnp.sum(_const(c, x) * jnp.linalg.solve(a, b))

    return f, x0


def _spd(m: jax.Array) -> jax.Array:
    return m @ m.T + 4 * jnp.eye(m.shape[0], dtype=m.dtype)


def _cholesky(rng):
    c = np.tril(rng.normal(size=(4, 4)))

    def f(x):
        (m,) = _split(x, (4, 4))
        return jnp.sum(_const(c, x) * jnp.linalg.cholesky(_spd(m)))

    return f, rng.normal(size=16)


def _cho_solve(rng):
    c = rng.normal(size=4)

    def f(x):
        m, b = _split(x, (4, 4), (4,))
        return jnp.sum(_const(c, x) * jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(_spd(m)), b))

    return f, rng.normal(size=20)


def _layer_norm(rng):
    c = rng.normal(size=(3, 6))
    x0 = np.concatenate([rng.normal(size=18), 1 + 0.1 * rng.normal(size=6), 0.1 * rng.normal(size=6)])

    def f(x):
        h, w, b = _split(x, (3, 6), (6,), (6,))
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.var(h, axis=-1, keepdims=True)
        return jnp.sum(_const(c, x) * ((h - mean) * jax.lax.rsqrt(var + _NORM_EPS) * w + b))

    return f, x0


def _batch_norm(rng):
    c = rng.normal(size=(6, 4))
    x0 = np.concatenate([rng.normal(size=24), 1 + 0.1 * rng.normal(size=4), 0.1 * rng.normal(size=4)])

    def f(x):
        h, w, b = _split(x, (6, 4), (4,), (4,))
        # Training mode: the batch's own statistics (biased variance), differentiated through.
        mean = jnp.mean(h, axis=0)
        var = jnp.var(h, axis=0)
        return jnp.sum(_const(c, x) * ((h - mean) * jax.lax.rsqrt(var + _NORM_EPS) * w + b))

    return f, x0


def _conv(stride: tuple[int, int], dilation: tuple[int, int], padding: str, out_hw: tuple[int, int]):
    def build(rng):
        c = rng.normal(size=(1, 3, *out_hw))
        x0 = np.concatenate([rng.normal(size=50), 0.3 * rng.normal(size=54), 0.1 * rng.normal(size=3)])

        def f(x):
            inp, w, b = _split(x, (1, 2, 5, 5), (3, 2, 3, 3), (3,))
            out = jax.lax.conv_general_dilated(inp, w, window_strides=stride, padding=padding,
                                               rhs_dilation=dilation, dimension_numbers=("NCHW", "OIHW", "NCHW"))
            return jnp.sum(_const(c, x) * jnp.tanh(out + b[None, :, None, None]))

        return f, x0

    return build


#: op name -> builder ``rng -> (f, x0)``; ``f`` maps one flat array to a scalar.
OPS: dict[str, Callable[[np.random.Generator], tuple[Fn, np.ndarray]]] = {
    "tanh": _elementwise(jnp.tanh),
    "sigmoid": _elementwise(jax.nn.sigmoid),
    "softplus": _elementwise(jax.nn.softplus),
    "relu": _elementwise(jax.nn.relu),
    "gelu(approximate=False)": _elementwise(lambda z: jax.nn.gelu(z, approximate=False)),
    "gelu(approximate=True)": _elementwise(lambda z: jax.nn.gelu(z, approximate=True)),
    "log_softmax": _log_softmax,
    "cross_entropy": _cross_entropy,
    "logsumexp": _logsumexp,
    "mse_loss": _mse,
    "binary_cross_entropy_with_logits": _bce,
    "pairwise_sqdist(broadcast)": _pairwise("broadcast"),
    "pairwise_sqdist(expanded)": _pairwise("expanded"),
    "pairwise_dist(sqrt)": _pairwise("sqrt"),
    "cosine_similarity": _cosine,
    "linalg.solve": _solve,
    "linalg.cholesky": _cholesky,
    "scipy.linalg.cho_solve": _cho_solve,
    "layer_norm": _layer_norm,
    "batch_norm(training)": _batch_norm,
    "conv_general_dilated": _conv((1, 1), (1, 1), "VALID", (3, 3)),
    "conv_general_dilated(stride=2, dilation=2, SAME)": _conv((2, 2), (2, 2), "SAME", (3, 3)),
}


MODES = ("forward-over-reverse (jvp of grad)", "reverse-over-reverse (grad of <grad, v>)")


def _hvps(f: Fn, jit: bool) -> Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """``(x, v) -> (H v by jvp of grad, H v by grad of <grad, v>)``; one function, so one compilation under jit."""
    grad = jax.grad(f)

    def both(x, v):
        fwd_rev = jax.jvp(grad, (x,), (v,))[1]
        rev_rev = jax.grad(lambda y: jnp.vdot(grad(y), v))(x)
        return fwd_rev, rev_rev

    return jax.jit(both) if jit else both


def _gradient64(f: Fn) -> Callable[[np.ndarray], np.ndarray]:
    """``x -> grad f(x)`` in float64 (first-order reverse mode only), cached per point."""
    grad = jax.jit(jax.grad(f))
    cache: dict[bytes, np.ndarray] = {}

    def g(x: np.ndarray) -> np.ndarray:
        key = np.ascontiguousarray(x, dtype=np.float64).tobytes()
        if key not in cache:
            cache[key] = np.asarray(grad(jnp.asarray(x, dtype=jnp.float64)), dtype=np.float64)
        return cache[key]

    return g


def _check_op(name: str, build, rng: np.random.Generator, dtype: str, jit: bool) -> dict[str, Any]:
    f, x0 = build(rng)
    v = rng.normal(size=x0.size)
    v /= np.max(np.abs(v))
    jdt = check_dtype(dtype)
    # The point and direction in the dtype under test; the reference is taken at the same (rounded) point.
    x_t, v_t = jnp.asarray(x0, dtype=jdt), jnp.asarray(v, dtype=jdt)
    x0, v = np.asarray(x_t, dtype=np.float64), np.asarray(v_t, dtype=np.float64)
    row: dict[str, Any] = {"op": name, "dtype": dtype, "device": str(jax.devices()[0].platform), "jit": jit}
    try:
        outs = _hvps(f, jit)(x_t, v_t)
    except (TypeError, NotImplementedError, ValueError) as exc:
        # Retry mode by mode to name the one that raised.
        grad = jax.grad(f)
        single = {MODES[0]: lambda: jax.jvp(grad, (x_t,), (v_t,))[1],
                  MODES[1]: lambda: jax.grad(lambda y: jnp.vdot(grad(y), v_t))(x_t)}
        failing = []
        for mode, run in single.items():
            try:
                run()
            except (TypeError, NotImplementedError, ValueError):
                failing.append(mode)
        detail = f"{' and '.join(failing) or 'an HVP mode'} raised {type(exc).__name__}: {str(exc).splitlines()[0]}"
        return {**row, "status": "unsupported", "error": None, "tolerance": None, "detail": detail}
    hvps: dict[str, np.ndarray] = {}
    for mode, out in zip(MODES, outs):
        if out.dtype != jdt:
            return {**row, "status": "fail", "error": math.inf, "tolerance": None,
                    "detail": f"{mode} returned {out.dtype}, not {dtype}: the check did not run in {dtype}"}
        hvps[mode] = np.asarray(out, dtype=np.float64)
    tol_table = tolerance(np.dtype(dtype), "gradient")
    for mode, hv in hvps.items():
        if not np.all(np.isfinite(hv)):
            return {**row, "status": "fail", "error": math.inf, "tolerance": tol_table,
                    "detail": f"{mode} returned non-finite values"}
    grad = _gradient64(f)
    worst_err, worst_tol, worst = 0.0, tol_table, ""
    for _ in range(_PROJECTIONS):
        u = rng.normal(size=x0.size)
        est = directional_derivative(lambda x, u=u: float(u @ grad(x)), x0, v, method="richardson")
        for mode, hv in hvps.items():
            claimed = float(u @ hv)
            u_norm = float(np.linalg.norm(u))
            scale = u_norm * max(float(np.linalg.norm(hv)), abs(est.value) / u_norm)
            if scale == 0.0:
                err, tol = 0.0, tol_table  # H v = 0 and D_v <u, g> = 0
            else:
                # Normwise, like the "gradient" kind: relative to ||u|| ||H v||, plus the estimate's own bound.
                err, tol = abs(claimed - est.value) / scale, tol_table + est.error / scale
            if err / tol >= worst_err / worst_tol:
                worst_err, worst_tol = err, tol
                worst = (f"{mode}: <u, Hv> = {claimed:.12g}, Richardson D_v<u, grad> = {est.value:.12g} "
                         f"+- {est.error:.2g}")
    status = "pass" if worst_err <= worst_tol else "fail"
    return {**row, "status": status, "error": worst_err, "tolerance": worst_tol, "detail": worst}


def check_second_order_ops(*, dtype: str = "float64", seed: int = 0, jit: bool = True,
                           ops: list[str] | None = None) -> list[dict[str, Any]]:
    """Check JAX Hessian-vector products (both second-order modes) of single ops against finite differences.

    Args:
        dtype: dtype of the HVPs under test (``"float64"`` or ``"float32"``);
            the finite-difference reference is always float64.
        seed: seeds the points, directions and projections.
        jit: run the HVPs under ``jax.jit`` (default: eager dispatch compiles every primitive of
            the second-order graph separately, about 3x slower for these small functions).
        ops: names from :data:`OPS` (default: all).

    Returns:
        One dict per op: ``op``, ``status`` (``"pass"``, ``"fail"``,
        ``"unsupported"``), ``error`` (worst normwise relative error of
        ``<u, H v>`` over projections and both modes; ``None`` when
        unsupported), ``tolerance`` (``tolerance(dtype, "gradient")`` plus the
        finite-difference error bound, same scale), ``detail`` (which mode and
        projection was worst), ``dtype``, ``device``, ``jit``.
    """
    check_dtype(dtype)
    check_jit(jit)
    names = list(OPS) if ops is None else list(ops)
    unknown = [n for n in names if n not in OPS]
    if unknown:
        raise InvalidInputError(f"ops={unknown!r} are unknown; choose from {list(OPS)}")
    rows = []
    index = list(OPS)
    for name in names:
        # Seeded by the op's position in OPS, so a subset reproduces the full run's rows.
        rng = np.random.default_rng([seed, index.index(name)])
        rows.append(_check_op(name, OPS[name], rng, dtype, jit))
    return rows
