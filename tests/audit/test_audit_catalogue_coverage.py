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

import test_audit_jax_corpus as jax_driver  # noqa: E402
import test_audit_torch_corpus as torch_driver  # noqa: E402

from verify._diagnosis import CATALOGUE  # noqa: E402


@pytest.mark.parametrize("driver", [torch_driver, jax_driver], ids=["torch", "jax"])
def test_every_diagnosis_is_in_the_corpus(driver) -> None:
    named = {row[2] for row in driver.CORPUS if row[2] is not None}
    assert set(CATALOGUE) - named == set(), f"diagnoses never produced by the {driver.__name__} corpus"
    assert named <= set(CATALOGUE), named - set(CATALOGUE)


@pytest.mark.parametrize("driver", [torch_driver, jax_driver], ids=["torch", "jax"])
def test_every_algorithm_has_a_correct_implementation_in_the_corpus(driver) -> None:
    # a bug row is only evidence if the correct implementation of the same algorithm passes
    algorithms = {row[1] for row in driver.CORPUS}
    correct = {row[1] for row in driver.CORPUS if row[2] is None}
    assert algorithms - correct == set()
