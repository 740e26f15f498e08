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


#: Batch-norm diagnoses need a network with batch norm and the user's own module: they are planted in
#: the conv corpus (``conv_user.py``, asserted by ``test_audit_conv.py``), PyTorch only. The JAX contract
#: passes ``(params, apply_fn)`` with no module state, so running statistics have no JAX plant yet.
CONV_CORPUS = {"bn_running_stats", "bn_batch_stats", "bn_params_frozen", "bn_params_adapted", "bn_joint_batch",
               "bn_state_leaked"}
NOT_IN_JAX = CONV_CORPUS


def test_the_conv_corpus_asserts_every_batch_norm_diagnosis() -> None:
    import pathlib

    text = (pathlib.Path(__file__).parent / "test_audit_conv.py").read_text()
    for key in CONV_CORPUS:
        # a named diagnosis is asserted by its key; the state-leak note by its catalogue title
        assert f'"{key}"' in text or CATALOGUE[key].title.split(": ", 1)[-1] in text, key


@pytest.mark.parametrize("backend", sorted(CORPUS))
def test_every_diagnosis_is_in_the_corpus(backend) -> None:
    named = {row[2] for row in CORPUS[backend] if row[2] is not None}
    named |= CONV_CORPUS if backend == "torch" else set()
    expected = set(CATALOGUE) - (NOT_IN_JAX if backend == "jax" else set())
    assert expected - named == set(), f"diagnoses never produced by the {backend} corpus"
    assert named <= set(CATALOGUE), named - set(CATALOGUE)


@pytest.mark.parametrize("backend", sorted(CORPUS))
def test_every_algorithm_has_a_correct_implementation_in_the_corpus(backend) -> None:
    # a bug row is only evidence if the correct implementation of the same algorithm passes
    algorithms = {row[1] for row in CORPUS[backend]}
    correct = {row[1] for row in CORPUS[backend] if row[2] is None}
    assert algorithms - correct == set()
