"""verify.dot_product_test: <J u, w> = <u, J^T w> for forward/reverse pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reference.errors import InvalidInputError
from verify import FAIL, PASS, dot_product_test
from verify.tolerance import tolerance


def _jacobian(seed: int, m: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((m, n))


@given(seed=st.integers(0, 2**32 - 1), m=st.integers(1, 20), n=st.integers(1, 20))
def test_transpose_pair_passes(seed: int, m: int, n: int) -> None:
    J = _jacobian(seed, m, n)
    verdict = dot_product_test(lambda u: J @ u, lambda w: J.T @ w, in_shape=n, out_shape=m, seed=seed)
    assert verdict.status == PASS, verdict.reason
    assert verdict.error <= verdict.tolerance == tolerance(np.float64, "dot_product")


@given(seed=st.integers(0, 2**32 - 1), m=st.integers(2, 20), n=st.integers(2, 20))
def test_wrong_adjoints_fail(seed: int, m: int, n: int) -> None:
    J = _jacobian(seed, m, n)
    K = J.copy()
    K[0, 0] += 1e-6 * np.linalg.norm(J)  # one entry of the reverse map is off
    for vjp in (lambda w: K.T @ w, lambda w: -(J.T @ w), lambda w: (J.T @ w) * (1 + 1e-7)):
        verdict = dot_product_test(lambda u: J @ u, vjp, in_shape=n, out_shape=m, seed=seed, trials=3)
        assert verdict.status == FAIL, verdict.reason
        assert "transpose" in verdict.reason


def test_nonlinear_map_jacobian_pair() -> None:
    # JVP/VJP of F(x) = tanh(B x) at x: J = diag(1 - tanh^2(Bx)) B (closed form).
    rng = np.random.default_rng(0)
    B = rng.standard_normal((4, 3, 5))
    x = rng.standard_normal(5)
    d = 1 - np.tanh(B @ x) ** 2  # (4, 3)

    def jvp(u):
        return d * (B @ u)

    def vjp(w):
        return np.einsum("ij,ijk->k", d * w, B)

    assert dot_product_test(jvp, vjp, in_shape=(5,), out_shape=(4, 3)).status == PASS
    assert dot_product_test(jvp, lambda w: np.einsum("ij,ijk->k", w, B), in_shape=5, out_shape=(4, 3)).status == FAIL


def test_complex_pair() -> None:
    rng = np.random.default_rng(1)
    J = rng.standard_normal((3, 4)) + 1j * rng.standard_normal((3, 4))
    ok = dot_product_test(lambda u: J @ u, lambda w: J.conj().T @ w, in_shape=4, out_shape=3, dtype=np.complex128)
    assert ok.status == PASS
    bad = dot_product_test(lambda u: J @ u, lambda w: J.T @ w, in_shape=4, out_shape=3, dtype=np.complex128)
    assert bad.status == FAIL  # the plain transpose is not the adjoint
    json.dumps(ok.to_dict())


def test_float32_row_from_example_arrays() -> None:
    rng = np.random.default_rng(2)
    J = rng.standard_normal((6, 8)).astype(np.float32)
    verdict = dot_product_test(
        lambda u: J @ u, lambda w: J.T @ w, in_shape=np.zeros(8, np.float32), out_shape=np.zeros(6, np.float32)
    )
    assert verdict.status == PASS and verdict.dtype == "float32"
    assert verdict.tolerance == tolerance(np.float32, "dot_product")
    # float32 rounding (~1e-8 relative here) would break the float64 row:
    assert verdict.error > tolerance(np.float64, "dot_product")


def test_wrong_shapes_and_non_finite_are_fail() -> None:
    J = np.ones((2, 3))
    assert dot_product_test(lambda u: J @ u, lambda w: w, in_shape=3, out_shape=2).status == FAIL
    v = dot_product_test(lambda u: (J @ u) * np.nan, lambda w: J.T @ w, in_shape=3, out_shape=2)
    assert v.status == FAIL and "non-finite" in v.reason


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_shape": "abc", "out_shape": 2}, r"in_shape='abc'"),
        ({"in_shape": 3, "out_shape": 2, "trials": 0}, r"trials=0"),
        ({"in_shape": 3, "out_shape": 2, "dtype": np.int64}, r"dtype="),
        ({"in_shape": 3, "out_shape": 2, "rtol": 5.0}, r"rtol=5.0"),
        ({"in_shape": (-1,), "out_shape": 2}, r"in_shape=\(-1,\)"),
        ({"in_shape": 3, "out_shape": 2, "seed": 1.5}, r"seed=1.5 must be an integer"),
        ({"in_shape": 3, "out_shape": 2, "vjp": None}, r"must be callables"),
    ],
)
def test_invalid_arguments(kwargs, match) -> None:
    J = np.ones((2, 3))
    kwargs = {"vjp": lambda w: J.T @ w, **kwargs}
    with pytest.raises(InvalidInputError, match=match):
        dot_product_test(lambda u: J @ u, **kwargs)


@pytest.mark.parametrize("rtol", [1e-9, 0.5])
def test_rtol_inside_0_1_is_accepted_and_used(rtol: float) -> None:
    J = np.arange(6.0).reshape(2, 3)
    verdict = dot_product_test(lambda u: J @ u, lambda w: J.T @ w, in_shape=3, out_shape=2, rtol=rtol)
    assert verdict.status == PASS and verdict.tolerance == rtol, verdict.reason


def test_default_is_three_seeded_trials() -> None:
    J = np.arange(6.0).reshape(2, 3)
    verdict = dot_product_test(lambda u: J @ u, lambda w: J.T @ w, in_shape=3, out_shape=2)
    assert len(verdict.details) == 3


@pytest.mark.parametrize("side", ["in", "out"])
def test_a_complex_example_array_on_either_side_makes_u_and_w_complex(side: str) -> None:
    # dtype default: "the example arrays'": one complex example makes the pairs complex (J^H for vdot);
    # one float32 example (the other side a plain shape) makes them float32.
    J = np.arange(6.0).reshape(2, 3) + 1j
    seen = []

    def jvp(u):
        seen.append(u.dtype)
        return J @ u

    example = {"in_shape": np.zeros(3, np.complex128), "out_shape": 2} if side == "in" else \
        {"in_shape": 3, "out_shape": np.zeros(2, np.complex128)}
    verdict = dot_product_test(jvp, lambda w: J.conj().T @ w, **example)
    assert verdict.status == PASS and seen and all(np.issubdtype(d, np.complexfloating) for d in seen), verdict.reason
    J32 = np.arange(6.0, dtype=np.float32).reshape(2, 3)
    example = {"in_shape": np.zeros(3, np.float32), "out_shape": 2} if side == "in" else \
        {"in_shape": 3, "out_shape": np.zeros(2, np.float32)}
    v32 = dot_product_test(lambda u: J32 @ u, lambda w: J32.T @ w, **example)
    assert v32.dtype == "float32", v32
