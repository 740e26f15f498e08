"""Fast tests of reference.inner_optim's declared approximations (issue 19): the CLI spelling's parser,
its refusals and the value semantics of :class:`Approximation`."""

from __future__ import annotations

import dataclasses

import pytest

from reference.errors import InvalidInputError
from reference.inner_optim import Approximation


@pytest.mark.parametrize("text, expected", [
    ("exact", Approximation()),
    ("exact+first_order", Approximation(first_order=True)),
    ("exact + stop_gradient + truncated:3", Approximation(truncate=3, detach_state=True)),
    ("truncated:0", Approximation(truncate=0)),
])
def test_parse_reads_every_part(text, expected):
    assert Approximation.parse(text) == expected
    assert Approximation.parse(str(expected)) == expected  # str is the CLI spelling again


@pytest.mark.parametrize("text, match", [
    (None, "must be a string"), ("   ", "must be a string"), ("truncated:3:4", "needs an integer"),
    ("truncated:x", "needs an integer"), ("exact+sgd", "unknown part"), ("truncated:-1", "truncate="),
])
def test_parse_refuses_bad_spellings(text, match):
    with pytest.raises(InvalidInputError, match=match):
        Approximation.parse(text)


def test_approximation_is_an_immutable_value():
    a = Approximation(truncate=2)
    with pytest.raises(InvalidInputError, match="truncate="):
        Approximation(truncate=-1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.truncate = 3  # type: ignore[misc]
    assert hash(a) == hash(Approximation(truncate=2))
