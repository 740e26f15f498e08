"""Every diagnosis of the catalogue is exercised in both the PyTorch and the JAX audit corpus (issue 19).

A diagnosis that only one backend's corpus produces could break in the other
backend's harness (a detached tensor is ``None`` in torch and an exact zero in
JAX; a hand-written backward returns its grads in another structure) without a
test noticing. This reads the corpus tables only (no audit runs).
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("jax")

from test_audit_corpus import CORPUS  # noqa: E402

from verify.auditing.diagnosis import CATALOGUE  # noqa: E402


@pytest.mark.parametrize("backend", sorted(CORPUS))
def test_every_diagnosis_is_in_the_corpus(backend) -> None:
    named = {row[2] for row in CORPUS[backend] if row[2] is not None}
    assert set(CATALOGUE) - named == set(), f"diagnoses never produced by the {backend} corpus"
    assert named <= set(CATALOGUE), named - set(CATALOGUE)


@pytest.mark.parametrize("backend", sorted(CORPUS))
def test_every_algorithm_has_a_correct_implementation_in_the_corpus(backend) -> None:
    # a bug row is only evidence if the correct implementation of the same algorithm passes
    algorithms = {row[1] for row in CORPUS[backend]}
    correct = {row[1] for row in CORPUS[backend] if row[2] is None}
    assert algorithms - correct == set()
