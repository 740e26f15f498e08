"""The JAX model and loss builders against the hand-written NumPy ``reference.models.MLP``.

Loss, gradient (``jax.grad``) and Hessian-vector product (``jax.jvp`` of
``jax.grad``) must match backpropagation and Pearlmutter's R-operator to
float64 round-off (``verify.tolerance`` "reference_match", 1.8e-12; measured
~1e-15). Plus: the float64 switch, the float32 guarantee (no float64 in any
float32 graph, checked on the jaxprs), the conversion helpers, and that
``import verify`` / ``import reference`` never import JAX.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
import backend_helpers as H  # noqa: E402
from hypothesis import given, strategies as st  # noqa: E402

from reference.models import ACTIVATIONS, MLP  # noqa: E402
from reference.tasks import Task, gaussian_classification, sinusoid  # noqa: E402
from verify.backends.jax import build_apply, build_loss, to_jax_params, to_jax_tasks  # noqa: E402
from verify.backends.jax._model import batch_tasks, spec_key  # noqa: E402


def _data(m: MLP, rng: np.random.Generator, n: int = 5):
    x = rng.normal(size=(n, m.sizes[0]))
    d = m.sizes[-1]
    if m.loss_name == "ce":
        y = rng.integers(0, d, size=n)
    elif m.loss_name == "bce":
        y = rng.integers(0, 2, size=(n, d)).astype(float)
    else:
        y = rng.normal(size=(n, d))
    return x, y


# Fixed sizes (one compile per activation/loss/bias); values drawn by hypothesis.
@given(st.sampled_from(ACTIVATIONS), st.sampled_from(["mse", "ce", "bce"]), st.booleans(), st.integers(0, 2**31 - 1))
def test_loss_grad_hvp_match_reference_mlp(act, loss_name, bias, seed):
    rng = np.random.default_rng(seed)
    m = MLP([3, 4, 2], act, loss_name, bias)
    params = [p * rng.uniform(0.5, 2.0) for p in m.init(seed)]
    x, y = _data(m, rng)
    v = [rng.normal(size=p.shape) for p in params]
    (task,) = to_jax_tasks([Task(x, m.check_y(y, len(x)), x, m.check_y(y, len(x)))])
    loss = build_loss(m)
    p_j, v_j = to_jax_params(params), to_jax_params(v)

    # Eager: with fixed shapes the per-primitive compilations are shared across examples (jit would
    # compile one program per activation/loss/bias combination).
    value, grads = jax.value_and_grad(loss)(p_j, task.x_support, task.y_support)
    hv = jax.jvp(lambda q: jax.grad(loss)(q, task.x_support, task.y_support), (p_j,), (v_j,))[1]
    out = build_apply(m)(p_j, task.x_support)

    H.assert_close("forward", [out], [m.forward(params, x)], "float64")
    H.assert_close("loss", [value], [m.loss(params, x, y)], "float64")
    H.assert_close("grad", grads, m.grad(params, x, y), "float64")
    H.assert_close("hvp", hv, m.hvp(params, x, y, v), "float64")


def test_relu_derivative_at_zero_is_zero():
    """CONVENTIONS: relu'(0) = 0 (jax.nn.relu's custom JVP); a pre-activation exactly at 0 must not leak gradient."""
    m = MLP([1, 1, 1], "relu", "mse")
    params = [np.array([[1.0]]), np.array([0.0]), np.array([[1.0]]), np.array([0.0])]
    x, y = np.array([[0.0]]), np.array([[1.0]])
    g = jax.grad(build_loss(m))(to_jax_params(params), jnp.asarray(x), jnp.asarray(y))
    H.assert_close("relu grad at the kink", g, m.grad(params, x, y), "float64")
    assert float(g[0][0, 0]) == 0.0


def test_float64_is_enabled_globally():
    assert jax.config.jax_enable_x64
    assert jnp.asarray(1.0).dtype == jnp.float64


def test_to_jax_tasks_dtypes():
    ts = gaussian_classification(3, 2, 2, 2, seed=0) + sinusoid(1, 3, 3, seed=0)
    for dtype, want in (("float64", jnp.float64), ("float32", jnp.float32)):
        out = to_jax_tasks(ts, dtype)
        assert isinstance(out[0], Task)
        assert out[0].x_support.dtype == want and out[0].y_support.dtype == jnp.int32
        assert out[1].x_query.dtype == want and out[1].y_query.dtype == want


def test_batch_tasks_stacks_equal_shapes_only():
    equal = to_jax_tasks(sinusoid(3, 4, 5, seed=0))
    stacked = batch_tasks(equal)
    assert isinstance(stacked, Task) and stacked.x_support.shape == (3, 4, 1)
    ragged = to_jax_tasks(sinusoid(1, 4, 5, seed=0) + sinusoid(1, 3, 5, seed=1))
    assert isinstance(batch_tasks(ragged), tuple) and not isinstance(batch_tasks(ragged), Task)


def test_build_apply_is_the_audit_contract():
    """``fn(params, apply_fn, tasks, inner_lr, inner_steps)`` can be written and jitted with these helpers."""
    m = MLP([1, 4, 1], "tanh", "mse")
    params, tasks = m.init(0), sinusoid(2, 3, 3, seed=0)
    apply_fn = build_apply(m)

    def user_maml(params, apply_fn, tasks, inner_lr, inner_steps):
        def loss(p, x, y):
            return jnp.mean((apply_fn(p, x) - y) ** 2)

        total = 0.0
        for t in tasks:
            p = params
            for _ in range(inner_steps):
                p = [a - inner_lr * g for a, g in zip(p, jax.grad(loss)(p, t.x_support, t.y_support))]
            total = total + loss(p, t.x_query, t.y_query)
        return total / len(tasks)

    from reference import maml as r_maml

    value, grads = jax.jit(jax.value_and_grad(user_maml), static_argnums=(1, 4))(
        to_jax_params(params), apply_fn, to_jax_tasks(tasks), 0.1, 2)
    want_loss, want = r_maml.meta_loss_and_grad(m, params, tasks, 0.1, 2)
    H.assert_close("audit-contract meta-loss", [value], [want_loss], "float64")
    H.assert_close("audit-contract meta-gradient", grads, want, "float64")


def test_spec_key_rejects_non_models():
    from reference.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="reference.models.MLP"):
        spec_key(object())


def test_import_verify_does_not_import_jax():
    code = ("import sys, verify, reference, verify.backends, verify.algorithms, verify.matrix; "
            "assert 'jax' not in sys.modules, 'jax imported'")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert proc.returncode == 0, proc.stderr


def test_placement_pins_the_device_and_the_matmul_precision():
    from reference.errors import InvalidInputError
    from verify.backends.jax import placement

    with placement("cpu"):
        x = jnp.ones(3)
        assert {d.platform for d in x.devices()} == {"cpu"}
        assert jax.config.jax_default_matmul_precision == "highest"
    with placement("cpu", tf32=True):
        assert jax.config.jax_default_matmul_precision == "tensorfloat32"
    with pytest.raises(InvalidInputError, match="device='tpu'"):
        with placement("tpu"):
            pass
    if not any(d.platform == "gpu" for d in jax.devices()):
        with pytest.raises(InvalidInputError, match="JAX sees no GPU"):
            with placement("cuda"):
                pass


def test_quick_compile_is_scoped_and_agrees_to_round_off():
    """quick_compile only changes how XLA emits machine code: the same program gives the same numbers to
    round-off, each setting keeps its own compiled version, and the setting is restored after the block."""
    from verify.backends.jax._model import _QUICK, maybe_jit, quick_compile

    m = MLP([2, 4, 1], "tanh", "mse")
    loss = build_loss(m)
    p = to_jax_params(m.init(3))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 2)))
    y = jnp.asarray(np.random.default_rng(1).normal(size=(5, 1)))
    f = maybe_jit(lambda q: jax.grad(loss)(q, x, y), True)
    default = f(p)
    with pytest.raises(RuntimeError):
        with quick_compile():
            assert _QUICK.get()
            quick = f(p)
            raise RuntimeError("leave the block by an error")
    assert not _QUICK.get()
    assert set(f._jitted) == {False, True}
    want = m.loss_and_grad([np.asarray(a) for a in p], np.asarray(x), np.asarray(y))[1]
    for got in (default, quick):
        H.assert_close("quick_compile gradient", [np.asarray(g) for g in got], want, "float64")
