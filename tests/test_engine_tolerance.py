"""verify.tolerance: one table keyed by dtype, derived from each dtype's epsilon."""

from __future__ import annotations

import numpy as np
import pytest

from reference.errors import InvalidInputError
from verify.tolerance import KINDS, TF32, TF32_EPS, TOLERANCES, precision_dtype, tolerance


def test_rows_and_kinds() -> None:
    assert set(TOLERANCES) == {np.float32, np.float64, np.complex64, np.complex128, TF32}
    for row in TOLERANCES.values():
        assert tuple(row) == KINDS  # every row defines every kind
    assert {"gradient", "dot_product", "reference_match", "solve_backward_error", "roundoff"} <= set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_float32_is_looser_and_entries_follow_eps(kind: str) -> None:
    t32, t64 = tolerance(np.float32, kind), tolerance(np.float64, kind)
    assert 0 < t64 < t32 < 1
    # each entry is a fixed function of eps: the float32/float64 ratio is a power of the eps ratio
    ratio = np.log(t32 / t64) / np.log(np.finfo(np.float32).eps / np.finfo(np.float64).eps)
    assert 0.5 <= ratio <= 1.0
    assert tolerance(np.complex128, kind) == t64 and tolerance(np.complex64, kind) == t32


@pytest.mark.parametrize("kind", KINDS)
def test_tf32_row_is_float32_scaled_by_the_rounding_ratio(kind: str) -> None:
    # TF32 rounds matmul inputs to 10 mantissa bits: 2**13 times float32's rounding
    assert TF32_EPS == 2.0**-10 and TF32_EPS / np.finfo(np.float32).eps == 2.0**13
    assert tolerance("tf32", kind) == pytest.approx(tolerance(np.float32, kind) * 2.0**13)
    assert tolerance("TensorFloat32", kind) == tolerance(TF32, kind)


def test_dtype_spellings() -> None:
    assert tolerance("float64") == tolerance(np.dtype("float64")) == tolerance(np.zeros(1).dtype)
    assert tolerance(np.float64) == pytest.approx(np.finfo(np.float64).eps ** (2 / 3))


def test_condition_scales_linearly() -> None:
    assert tolerance(np.float64, "reference_match", condition=1e3) == pytest.approx(
        1e3 * tolerance(np.float64, "reference_match")
    )


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((np.int64,), {}, r"dtype=.*no row"),
        ((np.float16,), {}, r"dtype=.*no row"),
        (("nonsense-dtype",), {}, r"dtype='nonsense-dtype'"),
        ((np.float64, "hessian"), {}, r"kind='hessian'"),
        ((np.float64,), {"condition": 0.5}, r"condition=0.5"),
        ((np.float64,), {"condition": float("nan")}, r"condition=nan"),
    ],
)
def test_invalid(args, kwargs, match) -> None:
    with pytest.raises(InvalidInputError, match=match):
        tolerance(*args, **kwargs)


def test_precision_dtype_picks_the_least_precise() -> None:
    assert precision_dtype(np.float64, np.float32) == np.float32
    assert precision_dtype(np.complex64, np.float64) == np.float32
    assert precision_dtype(np.int64, None) == np.float64
    assert precision_dtype() == np.float64


def test_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        TOLERANCES[np.float64]["gradient"] = 1.0  # type: ignore[index]


def test_condition_is_keyword_only() -> None:
    # tolerance(dtype, kind, *, condition=...): a positional third argument is a mistake (it would read as
    # a condition number silently), so it is refused.
    with pytest.raises(TypeError):
        tolerance(np.float64, "gradient", 10.0)  # type: ignore[misc]
    assert tolerance(np.float64, "gradient", condition=10.0) == 10.0 * tolerance(np.float64, "gradient")
