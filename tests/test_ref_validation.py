"""reference/validation.py: the API-boundary checks, rule by rule, with their boundary values (issue 19).

Every rule is documented in the helpers' docstrings (integers ``>= minimum``,
bools rejected; finite real scalars, complex allowed with the sign tested on the
real part; numeric arrays converted to float64/complex128 with rank, shape and
finiteness checks naming the first bad index).
"""

from __future__ import annotations

import numpy as np
import pytest

from reference.errors import InvalidInputError
from reference.validation import (as_float_array, check_finite_scalar, check_nonempty, check_positive_int,
                                  isclose_int)


def test_check_positive_int_boundaries():
    assert check_positive_int("k", 1) == 1
    assert check_positive_int("k", np.int64(3)) == 3 and type(check_positive_int("k", np.int64(3))) is int
    assert check_positive_int("k", 0, minimum=0) == 0
    with pytest.raises(InvalidInputError, match=r"^k=0 must be >= 1; hint$"):
        check_positive_int("k", 0, hint="; hint")
    with pytest.raises(InvalidInputError, match=r"^k=-1 must be >= 0$"):
        check_positive_int("k", -1, minimum=0)
    # A long value is quoted cut to 60 characters (57 + "...").
    with pytest.raises(InvalidInputError) as err:
        check_positive_int("k", "x" * 100)
    assert str(err.value) == "k=" + repr("x" * 100)[:57] + "... must be an integer >= 1"
    for bad in (True, 2.0, "3", None):
        with pytest.raises(InvalidInputError, match=r"must be an integer >= 1$"):
            check_positive_int("k", bad)


def test_check_finite_scalar_rules():
    assert check_finite_scalar("a", 2) == 2.0 and type(check_finite_scalar("a", 2)) is float
    assert check_finite_scalar("a", np.float32(0.5)) == 0.5
    z = 1.0 + 1e-20j
    assert check_finite_scalar("a", z, positive=True) is z  # complex kept as is (complex step)
    assert check_finite_scalar("a", 0.0, nonnegative=True) == 0.0
    assert check_finite_scalar("a", -3.0) == -3.0
    for value, kw, msg in ((0.0, dict(positive=True), "must be > 0"), (-1e-300, dict(positive=True), "must be > 0"),
                           (-1e-300, dict(nonnegative=True), "must be >= 0"),
                           (-1.0 + 5j, dict(positive=True), "must be > 0"),
                           (True, {}, "not a bool"), (np.inf, {}, "must be finite"), (np.nan, {}, "must be finite"),
                           (complex(1, np.inf), {}, "must be finite"),
                           ([1.0], {}, "finite scalar number"), ("1", {}, "finite scalar number"),
                           (None, {}, "finite scalar number")):
        with pytest.raises(InvalidInputError, match=msg):
            check_finite_scalar("a", value, **kw)


def test_as_float_array_rules():
    a = as_float_array("x", [1, 2, 3])
    assert a.dtype == np.float64 and a.shape == (3,)
    assert as_float_array("x", [True, False]).dtype == np.float64
    c = as_float_array("x", np.array([1, 2], dtype=np.complex64))
    assert c.dtype == np.complex128
    assert as_float_array("x", np.ones((2, 3)), ndim=2, shape=(2, 3)).shape == (2, 3)
    # Already-valid float64/complex128 data is checked in place, not copied (large tasks, every call).
    for x in (np.ones(5), np.ones(5, dtype=complex)):
        assert as_float_array("x", x) is x
    for value, kw, msg in ((["a"], {}, "must be a numeric array, got dtype <U1"),
                           (np.array([1, None], dtype=object), {}, "got dtype object"),
                           ([1j], dict(allow_complex=False), "must be real, got a complex array"),
                           (np.ones(3), dict(ndim=2), r"must be 2-D, got shape \(3,\)"),
                           (np.ones((2, 3)), dict(shape=(3, 2)), r"has shape \(2, 3\), expected \(3, 2\)"),
                           (np.array([[0.0, 1.0], [np.nan, np.inf]]), {}, r"first at index \(1, 0\)"),
                           (np.array([1.0, 1j * np.inf]), {}, r"first at index \(1,\)")):
        with pytest.raises(InvalidInputError, match=msg):
            as_float_array("x", value, **kw)
    with pytest.raises(InvalidInputError, match=r"; for the weights$"):
        as_float_array("x", [np.nan], hint="; for the weights")


def test_check_nonempty_and_isclose_int():
    check_nonempty("tasks", [1])
    with pytest.raises(InvalidInputError, match="tasks is empty"):
        check_nonempty("tasks", [])
    assert isclose_int(3.0) and isclose_int(0.0) and not isclose_int(2.5)
    assert not isclose_int(float("inf")) and not isclose_int(float("nan"))
