"""Second-order checks of single JAX operations (``verify.backends.jax.ops``).

Each op's HVPs (forward-over-reverse and reverse-over-reverse) are compared
with Richardson finite differences of the float64 first-order gradient. JAX
has no known gap among these ops (every row passes); a planted wrong second
derivative must fail, so the check can fail.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402

from reference.errors import InvalidInputError  # noqa: E402
from verify.backends.jax import ops  # noqa: E402

# float32 in CI on a representative subset (elementwise, softmax family, distances, linear algebra,
# normalisation, convolution); every op in the slow run.
FLOAT32_CI = ["gelu(approximate=False)", "cross_entropy", "pairwise_sqdist(expanded)", "linalg.solve",
              "linalg.cholesky", "batch_norm(training)", "conv_general_dilated"]


def _assert_rows(rows, dtype):
    assert rows, "no op was checked"
    for r in rows:
        assert set(r) >= {"op", "status", "error", "tolerance", "detail"}
        assert r["dtype"] == dtype
        assert r["status"] == "pass", f"{r['op']} ({dtype}): {r['status']} error={r['error']} tol={r['tolerance']} " \
                                      f"{r['detail']}"
        assert 0 <= r["error"] <= r["tolerance"]


def test_all_ops_float64():
    rows = ops.check_second_order_ops(dtype="float64")
    assert [r["op"] for r in rows] == list(ops.OPS)
    _assert_rows(rows, "float64")
    # Only the tolerance's finite-difference part can exceed the table: float64 Richardson is good to ~1e-10.
    assert max(r["tolerance"] for r in rows) < 1e-9


def test_float32_subset():
    rows = ops.check_second_order_ops(dtype="float32", ops=FLOAT32_CI)
    _assert_rows(rows, "float32")


@pytest.mark.slow
@pytest.mark.parametrize("dtype,jit", [("float32", True), ("float64", False), ("float32", False)])
def test_all_ops_slow(dtype, jit):
    _assert_rows(ops.check_second_order_ops(dtype=dtype, jit=jit), dtype)


def test_subset_reproduces_full_run_rows():
    """Rows are seeded by the op's position in OPS, so a subset gives the same numbers."""
    (a,) = ops.check_second_order_ops(ops=["logsumexp"], seed=3)
    rows = ops.check_second_order_ops(ops=["tanh", "logsumexp"], seed=3)
    assert rows[1]["error"] == a["error"] and rows[1]["detail"] == a["detail"]


def test_a_wrong_second_derivative_fails(monkeypatch):
    """A custom_jvp op whose derivative rule is correct to first order but wrong to second must fail."""

    @jax.custom_jvp
    def bad_tanh(x):
        return jnp.tanh(x)

    @bad_tanh.defjvp
    def _jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        # d tanh = (1 - tanh^2) dx is right at first order, but the rule uses stop_gradient on the
        # derivative factor, so the second derivative (-2 tanh (1 - tanh^2)) comes out as 0.
        return jnp.tanh(x), jax.lax.stop_gradient(1 - jnp.tanh(x) ** 2) * t

    monkeypatch.setitem(ops.OPS, "bad_tanh", ops._elementwise(bad_tanh))
    (row,) = ops.check_second_order_ops(ops=["bad_tanh"])
    assert row["status"] == "fail" and row["error"] > 1e-3, row


def test_unsupported_op_is_reported(monkeypatch):
    """An op JAX cannot differentiate in reverse mode (a while_loop with a dynamic trip count) is reported as
    "unsupported", naming both HVP modes, never as a pass or a NaN."""

    def halve_until_small(x):
        # Dynamic trip count: jax.grad raises for lax.while_loop.
        return jax.lax.while_loop(lambda s: jnp.max(jnp.abs(s)) > 0.1, lambda s: 0.5 * jnp.sin(s), x)

    monkeypatch.setitem(ops.OPS, "while_loop", ops._elementwise(halve_until_small))
    (row,) = ops.check_second_order_ops(ops=["while_loop"])
    assert row["status"] == "unsupported", row
    assert "forward-over-reverse" in row["detail"] and "reverse-over-reverse" in row["detail"], row
    assert row["error"] is None


def test_unknown_op_and_bad_dtype():
    with pytest.raises(InvalidInputError, match="unknown"):
        ops.check_second_order_ops(ops=["cdist"])
    with pytest.raises(InvalidInputError, match="dtype"):
        ops.check_second_order_ops(dtype="float16")


def test_rows_are_seeded():
    a = ops.check_second_order_ops(ops=["softplus"], seed=1)
    b = ops.check_second_order_ops(ops=["softplus"], seed=1)
    c = ops.check_second_order_ops(ops=["softplus"], seed=2)
    assert a[0]["detail"] == b[0]["detail"] and a[0]["detail"] != c[0]["detail"]
    assert np.isfinite(a[0]["error"])
