"""Float32 really is float32 (no float64 anywhere in the traced graphs), and bad input raises clear errors.

The float32 guarantee matters because the backend switches JAX to 64-bit mode
globally (``jax_enable_x64``): an ``jnp.eye(n)`` or a Python-float
hyper-parameter without an explicit dtype would silently promote a float32
computation to float64. Each algorithm's jaxpr is traced with float32 inputs
(``jax.make_jaxpr``, no compilation) and every value in it, sub-jaxprs of
loops, solves and ``vmap`` included, must be float32 or integer.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402

from reference.errors import ConvergenceError, InvalidInputError, SingularMatrixError  # noqa: E402
from reference.models import MLP  # noqa: E402
from reference.tasks import Task, gaussian_classification, sinusoid  # noqa: E402
from verify.backends.jax import (  # noqa: E402
    anil,
    imaml,
    lrd2,
    maml,
    matchingnet,
    metasgd,
    newton,
    protonet,
    r2d2,
    reptile,
)
from verify.backends.jax._model import batch_tasks, spec_key, to_jax_params, to_jax_scalar, to_jax_tasks  # noqa: E402

# ---------------------------------------------------------------------------
# float32 graphs contain no float64
# ---------------------------------------------------------------------------


def _record(var, seen: set[str]) -> None:
    aval = getattr(var, "aval", None)
    dt = getattr(aval, "dtype", None)
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        return
    if getattr(aval, "weak_type", False) and aval.shape == ():
        # A weakly typed scalar is a Python-number constant (e.g. jax.scipy's CG squares its Python-float
        # ``tol``); it takes the dtype of the array it meets, so it never promotes float32 data.
        return
    seen.add(str(dt))


def _float_dtypes(jaxpr, seen=None) -> set[str]:
    """Every floating dtype of every (non-constant) value in ``jaxpr`` and its sub-jaxprs."""
    seen = set() if seen is None else seen
    inner = getattr(jaxpr, "jaxpr", jaxpr)
    for var in [*inner.invars, *inner.outvars, *inner.constvars]:
        _record(var, seen)
    for eqn in inner.eqns:
        for var in [*eqn.invars, *eqn.outvars]:
            _record(var, seen)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    _float_dtypes(sub, seen)
    return seen


def _f32(x):
    return to_jax_scalar(x, "float32")


def _gradient_family():
    m = MLP([1, 4, 1], "tanh", "mse")
    key, p = spec_key(m), to_jax_params(m.init(0), "float32")
    batch = batch_tasks(to_jax_tasks(sinusoid(2, 3, 3, seed=0), "float32"))
    ragged = batch_tasks(to_jax_tasks(sinusoid(1, 3, 3, seed=0) + sinusoid(1, 2, 3, seed=1), "float32"))
    lrs = to_jax_params([0.1 * np.ones_like(a) for a in m.init(0)], "float32")
    return {
        "maml": (maml._build(key, 2, False, True, False), (p, batch, _f32(0.1))),
        "fomaml": (maml._build(key, 2, True, True, False), (p, batch, _f32(0.1))),
        "maml-ragged": (maml._build(key, 2, False, True, False), (p, ragged, _f32(0.1))),
        "anil": (anil._build(key, 2, True, False), (p, batch, _f32(0.1))),
        "metasgd": (metasgd._build(key, 2, True, False), (p, lrs, batch)),
        "reptile": (reptile._build(key, 2, False), (p, batch, _f32(0.1))),
        "newton": (newton._build(key, 2, True, False), (p, batch, _f32(0.5), _f32(0.5))),
    }


def _backbone_family():
    m = MLP([3, 4, 3], "tanh")
    key, p = spec_key(m), to_jax_params(m.init(0), "float32")
    tasks = gaussian_classification(3, 2, 2, 3, n_tasks=2, seed=0)
    batch = batch_tasks(to_jax_tasks(tasks, "float32"))
    binary = batch_tasks(to_jax_tasks([Task(t.x_support, (t.y_support > 0).astype(float), t.x_query,
                                            (t.y_query > 0).astype(float)) for t in tasks], "float32"))
    regression = batch_tasks(to_jax_tasks([Task(t.x_support, np.ones((6, 2)), t.x_query, np.ones((6, 2)))
                                           for t in tasks], "float32"))
    hyper = (_f32(0.8), _f32(1.5), _f32(0.3))
    out = {}
    for form in ("primal", "dual"):
        out[f"r2d2-{form}"] = (r2d2._build(spec_key(m), 3, True, True, form, False, True, False), (p, *hyper, batch))
    out["r2d2-regression"] = (r2d2._build(key, 2, False, True, "dual", True, True, False), (p, *hyper, regression))
    out["lrd2"] = (lrd2._build(key, 2, True, True, False), (p, *hyper, binary))
    out["protonet"] = (protonet._build(key, 3, True, False), (p, batch))
    out["matchingnet"] = (matchingnet._build(key, 3, True, False), (p, batch))
    return out


def _imaml_family():
    m = MLP([1, 4, 1], "tanh", "mse")
    fns = imaml._build(spec_key(m), False)
    (t,) = to_jax_tasks(sinusoid(1, 3, 3, seed=0), "float32")
    z = jnp.concatenate([a.ravel() for a in to_jax_params(m.init(0), "float32")])
    return {
        "imaml-inner": (fns["value_and_grad"], (z, z, t.x_support, t.y_support, _f32(1.0))),
        "imaml-hvp": (fns["hvp_s"], (z, z, t.x_support, t.y_support)),
        "imaml-query": (fns["query"], (z, t.x_query, t.y_query)),
        "imaml-cg": (lambda *a: fns["cg"](*a, tol=1e-6, maxiter=10), (z, z, t.x_support, t.y_support, _f32(1.0),
                                                                     _f32(1.0))),
        "imaml-direct": (fns["direct"], (z, z, t.x_support, t.y_support, _f32(1.0), _f32(1.0))),
    }


GRAPHS = {**_gradient_family(), **_backbone_family(), **_imaml_family()}


@pytest.mark.parametrize("name", list(GRAPHS))
def test_float32_graph_has_no_float64(name):
    fn, args = GRAPHS[name]
    dtypes = _float_dtypes(jax.make_jaxpr(fn)(*args))
    assert dtypes == {"float32"}, f"{name}: the float32 computation contains {sorted(dtypes)}"


def test_float32_check_detects_promotion():
    """The detector itself: a float64 constant sneaking into a float32 graph is seen."""
    dtypes = _float_dtypes(jax.make_jaxpr(lambda x: jnp.sum(x * jnp.eye(2)))(jnp.ones((2, 2), jnp.float32)))
    assert "float64" in dtypes
    # ... and so is a float64 hyper-parameter passed as an array (what to_jax_scalar prevents).
    dtypes = _float_dtypes(jax.make_jaxpr(lambda x, a: x * a)(jnp.ones(2, jnp.float32), np.float64(0.1)))
    assert "float64" in dtypes


# ---------------------------------------------------------------------------
# Bad input and numerical refusals
# ---------------------------------------------------------------------------


def _reg():
    m = MLP([1, 3, 1], "tanh", "mse")
    return m, m.init(0), sinusoid(1, 3, 3, seed=0)


def test_bad_jit():
    """JAX's own switch (the argument checks both backends share: ``tests/backends/test_backend_errors.py``)."""
    m, p, ts = _reg()
    with pytest.raises(InvalidInputError, match="jit='yes'"):
        maml.meta_loss_and_grad(m, p, ts, 0.1, 1, jit="yes")


def test_newton_singular_hessian_is_an_error_not_nan():
    # One support point, a linear model with 3 weights: H_s = 2/n x^T x has rank 1; no damping.
    m = MLP([3, 1], "identity", "mse", bias=False)
    t = Task(np.array([[1.0, 2.0, 3.0]]), np.array([[1.0]]), np.array([[0.5, 0.1, 0.2]]), np.array([[0.0]]))
    with pytest.raises(SingularMatrixError, match="increase damping"):
        newton.meta_loss_and_grad(m, [np.array([[0.1, 0.2, 0.3]])], [t], 1.0, 1, damping=0.0, jit=True)


def test_newton_float32_conditioning_limit():
    # cond(H + delta I) ~ 1e4: fine in float64 (limit 1e12), refused in float32 (limit ~1.9e3).
    m = MLP([2, 1], "identity", "mse", bias=False)
    t = Task(np.array([[1.0, 0.0], [0.0, 0.01]]), np.zeros((2, 1)), np.ones((1, 2)), np.zeros((1, 1)))
    w = [np.array([[0.3, 0.4]])]
    newton.meta_loss_and_grad(m, w, [t], 1.0, 1, damping=0.0, jit=True)
    with pytest.raises(SingularMatrixError, match="float32"):
        newton.meta_loss_and_grad(m, w, [t], 1.0, 1, damping=0.0, dtype="float32", jit=True)


def test_r2d2_singular_ridge_system():
    m = MLP([2, 3], "identity", bias=False)
    t = Task(np.ones((4, 2)), np.array([0, 1, 2, 0]), np.ones((2, 2)), np.array([0, 1]))
    # Identical support features: Z Z^T has rank 1, so Z Z^T + lam I with lam = 1e-14 is numerically singular.
    with pytest.raises(SingularMatrixError, match="Z Z\\^T \\+ lam I"):
        r2d2.meta_loss_and_grad(m, [np.eye(3, 2)], [t], 3, 1e-14, 1.0, 0.0, bias_column=False, normalize=False)


def test_backbone_label_errors():
    m = MLP([3, 4, 3], "tanh")
    p = m.init(0)
    (t,) = gaussian_classification(3, 2, 2, 3, seed=0)
    with pytest.raises(InvalidInputError, match="binary"):
        lrd2.meta_loss_and_grad(m, p, [t], 1.0, 1.0, 0.0, 1)
    missing = Task(t.x_support[:2], np.array([0, 0]), t.x_query, t.y_query)
    with pytest.raises(InvalidInputError, match="no example of class"):
        protonet.loss_and_grad(m, p, [missing], 3)
    with pytest.raises(InvalidInputError, match="no example in"):
        matchingnet.loss_and_grad(m, p, [Task(t.x_support[:2], np.array([0, 1]), t.x_query, np.array([2] * 6))], 3)


def test_matchingnet_zero_feature():
    m = MLP([2, 2], "identity", bias=False)
    t = Task(np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([0, 1]), np.array([[1.0, 1.0]]), np.array([0]))
    with pytest.raises(InvalidInputError, match="zero vector"):
        matchingnet.loss_and_grad(m, [np.eye(2)], [t], 2)


def test_imaml_nonconvergence_is_raised():
    m = MLP([1, 6, 1], "tanh", "mse")
    p = [3 * a for a in m.init(0)]
    with pytest.raises(ConvergenceError, match="stationarity residual"):
        imaml.meta_loss_and_grad(m, p, sinusoid(1, 5, 3, seed=0), 1e-3, inner_maxiter=1, jit=True)
