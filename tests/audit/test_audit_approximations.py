"""Declared approximations on Meta-SGD, MAML++ and the learned optimisers (``audit(approximation=...)``, issue 17).

One table over both corpora: a user implementation that applies an approximation on purpose (``create_graph=False``
/ ``stop_gradient`` on the inner gradients, truncated BPTT written as detached increments, the optimiser state
detached) is

* verified against the *declared* approximation, with its distance from the exact meta-gradient; that distance is
  checked against one computed without the reference: the framework's own gradients of the approximate and of the
  exact implementation (autograd / ``jax.grad`` through the user's code);
* a named mismatch when the same approximation is not declared (``test_audit_corpus.py`` holds those rows too;
  here the naming is checked on the same problem as the declaration);
* a named mismatch under a wrong declaration: the catalogue says which approximation the code applies.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from _configs import CONFIGS
from backend_helpers import BACKENDS, backend_param

from verify._audit import audit
from verify.auditing.harness import make_harness
from verify.auditing.problem import build_problem

#: (approximate implementation, its exact twin, algorithm, configuration, declaration, undeclared diagnosis key,
#:  a wrong declaration, the text its diagnosis names)
DECLARED = [
    ("metasgd_truncated", "metasgd", "metasgd", "METASGD", "truncated:1", "bptt_truncated", "first_order",
     "truncated:1 instead of first_order"),
    ("metasgd_short", "metasgd", "metasgd", "METASGD", "inner_steps:1", "wrong_inner_steps", "first_order",
     "inner_steps:1 instead of first_order"),
    ("mamlpp_first_order", "mamlpp", "mamlpp", "MAMLPP", "first_order", "first_order", "truncated:1",
     "first_order instead of truncated:1"),
    ("mamlpp_truncated", "mamlpp", "mamlpp", "MAMLPP", "truncated:1", "bptt_truncated", "first_order",
     "truncated:1 instead of first_order"),
    ("lstm_optimizer_first_order", "lstm_optimizer", "lstm-optimizer", "LEARNED", "first_order", "first_order",
     "stop_gradient", "first_order instead of stop_gradient"),
    ("lstm_optimizer_truncated", "lstm_optimizer", "lstm-optimizer", "LEARNED", "truncated:1", "bptt_truncated",
     "truncated:2", "BPTT truncated at the wrong length: truncated:1"),
    ("lstm_optimizer_state_detached", "lstm_optimizer", "lstm-optimizer", "LEARNED", "stop_gradient",
     "optimizer_state_detached", "first_order", "stop_gradient instead of first_order"),
    ("lstm_optimizer_short", "lstm_optimizer", "lstm-optimizer", "LEARNED", "inner_steps:2", "wrong_inner_steps",
     "first_order", "inner_steps:2 instead of first_order"),
    ("meta_lstm_first_order", "meta_lstm", "meta-lstm", "META_LSTM", "first_order", "first_order", "stop_gradient",
     "first_order instead of stop_gradient"),
    ("meta_lstm_truncated", "meta_lstm", "meta-lstm", "META_LSTM", "truncated:1", "bptt_truncated", "truncated:2",
     "BPTT truncated at the wrong length: truncated:1"),
    ("meta_lstm_state_detached", "meta_lstm", "meta-lstm", "META_LSTM", "stop_gradient", "optimizer_state_detached",
     "truncated:1", "stop_gradient instead of truncated:1"),
    ("meta_lstm_short", "meta_lstm", "meta-lstm", "META_LSTM", "inner_steps:2", "wrong_inner_steps", "truncated:1",
     "inner_steps:2 instead of truncated:1"),
]


def _table() -> list:
    # JAX compiles each user function's unrolled double backward (5-14 s per function on 2 cores, ~40 s a row):
    # its rows run with the slow tests; test_jax_declared_meta_learner_in_ci keeps one JAX declaration in CI.
    return [backend_param(b, row, id=f"{b}-{row[0]}-{row[4]}", slow=b == "jax") for b in BACKENDS for row in DECLARED]


def _own_gradient(backend: str, fn, case) -> np.ndarray:
    """The framework's gradient of the user's function (autograd / jax.value_and_grad), flattened."""
    claim = make_harness(backend, fn, case).claim()
    return np.concatenate([np.ravel(np.asarray(g, dtype=float)) for g in claim.grads])


@pytest.mark.parametrize("backend,row", _table(), indirect=["backend"])
def test_declared_approximation_is_verified_and_its_distance_is_measured(backend, row):
    name, exact_name, algorithm, config, spec, undeclared_key, wrong, named = row
    corpus = importlib.import_module(f"corpus_{backend.name}")
    fn, exact_fn = getattr(corpus, name), getattr(corpus, exact_name)
    cfg = dict(CONFIGS[config])
    result = audit(fn, algorithm, backend.name, seed=0, directions=0, approximation=spec, **cfg)
    assert result.passed, result.report()
    assert result.approximation == spec and result.diagnosis is None
    assert f"matches the declared approximation {spec}" in result.report()

    # The distance from exact, against the framework's own gradients of the approximate and the exact code.
    model = cfg.pop("model")
    hyper = {k: cfg.pop(k) for k in ("inner_lr", "inner_steps") if k in cfg}
    case = build_problem(algorithm, model=model, loss=None, n_way=None, seed=0, hyper=hyper, **cfg)
    g_approx, g_exact = _own_gradient(backend.name, fn, case), _own_gradient(backend.name, exact_fn, case)
    rel = np.linalg.norm(g_approx - g_exact) / max(np.linalg.norm(g_approx), np.linalg.norm(g_exact))
    cos = g_approx @ g_exact / (np.linalg.norm(g_approx) * np.linalg.norm(g_exact))
    assert rel > 1e3 * result.tolerance  # a real approximation on this problem, not round-off
    assert result.distance_from_exact["relative"] == pytest.approx(rel, rel=1e-8)
    assert result.distance_from_exact["cosine"] == pytest.approx(cos, rel=1e-8, abs=1e-12)

    # Not declared: a mismatch, named.
    plain = audit(fn, algorithm, backend.name, seed=0, directions=0, **CONFIGS[config])
    assert not plain.passed and plain.diagnosis is not None and plain.diagnosis.key == undeclared_key, plain.report()

    # Declared wrongly: a mismatch naming what the code computes.
    other = audit(fn, algorithm, backend.name, seed=0, directions=0, approximation=wrong, **CONFIGS[config])
    assert not other.passed and other.diagnosis is not None, other.report()
    assert other.diagnosis.key == "approximation_mismatch" and other.diagnosis.detail.startswith(named), \
        other.report()


@pytest.mark.parametrize("backend", [backend_param("jax")], indirect=True)
def test_jax_declared_meta_learner_in_ci(backend):
    """The JAX contract's ``phi`` (a list of arrays) under a declaration: Ravi & Larochelle's first-order
    meta-learner verified against the declared first_order, two inner steps (one compilation)."""
    corpus = importlib.import_module("corpus_jax")
    cfg = {**CONFIGS["META_LSTM"], "inner_steps": 2, "n_tasks": 1}
    r = audit(corpus.meta_lstm_first_order, "meta-lstm", "jax", seed=0, directions=0, approximation="first_order",
              **cfg)
    assert r.passed and r.approximation == "first_order", r.report()
    assert r.distance_from_exact["relative"] > 1e-3


@pytest.mark.parametrize("backend", [backend_param("torch")], indirect=True)
def test_exact_code_under_a_declaration_is_named_exact(backend):
    corpus = importlib.import_module("corpus_torch")
    for name, algorithm, config in (("metasgd", "metasgd", "METASGD"), ("mamlpp", "mamlpp", "MAMLPP"),
                                    ("lstm_optimizer", "lstm-optimizer", "LEARNED"),
                                    ("meta_lstm", "meta-lstm", "META_LSTM")):
        r = audit(getattr(corpus, name), algorithm, "torch", seed=1, directions=0, approximation="first_order",
                  **CONFIGS[config])
        assert not r.passed and r.diagnosis is not None and r.diagnosis.key == "approximation_mismatch"
        assert "the declared approximation first_order was not applied" in r.diagnosis.detail, r.report()


@pytest.mark.parametrize("algorithm,spec,message", [
    ("metasgd", "stop_gradient", "Meta-SGD's inner loop is plain SGD"),
    ("mamlpp", "stop_gradient", "MAML++'s inner loop is plain SGD"),
    ("mamlpp", "first_order+inner_steps:2", "fix the number of inner steps"),
    ("meta-lstm", "cg:5", "'cg:5' does not apply to algorithm='meta-lstm'"),
    ("lstm-optimizer", "truncated:x", "needs an integer"),
])
def test_inapplicable_declarations_are_refused(algorithm, spec, message):
    from verify import inner_audit
    from verify.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="does not apply|needs an integer") as info:
        inner_audit.declare(algorithm, spec)
    assert message in str(info.value)


@pytest.mark.parametrize("algorithm", ["mamlpp", "lstm-optimizer", "meta-lstm"])
def test_convolutional_models_are_refused_for_the_mlp_rows(algorithm):
    from verify.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="is audited on MLPs"):
        build_problem(algorithm, model="conv4:1x8x8:2", loss=None, n_tasks=1, shots=1, queries=1, n_way=None, seed=0,
                      hyper={})
