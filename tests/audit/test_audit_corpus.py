"""The audit corpora, one table over backends: every buggy implementation fails with its diagnosis, the correct
ones pass, over seeds.

The corpora are ``corpus_torch.py`` and ``corpus_jax.py`` (imported per backend, after the ``backend``
fixture's ``pytest.importorskip``, so a backend that is not installed skips its rows with the reason).
"""

from __future__ import annotations

import importlib

import pytest
from _configs import CONFIGS
from backend_helpers import BACKENDS, backend_param

from verify._audit import audit

#: Seeds in CI; the slow test repeats the corpus over more seeds (false-alarm and naming hunt).
SEEDS = (0, 1)
MORE_SEEDS = {"torch": (2, 3, 4, 5), "jax": (2, 3, 4)}

#: MAML++ and the learned optimisers (issue 17), the same in both corpora: correct, and each approximation applied
#: without being declared
_LEARNED_ROWS = [
    ("mamlpp", "mamlpp", None, "MAMLPP"),
    ("mamlpp_first_order", "mamlpp", "first_order", "MAMLPP"),
    ("mamlpp_truncated", "mamlpp", "bptt_truncated", "MAMLPP"),
    ("lstm_optimizer", "lstm-optimizer", None, "LEARNED"),
    ("lstm_optimizer_first_order", "lstm-optimizer", "first_order", "LEARNED"),
    ("lstm_optimizer_truncated", "lstm-optimizer", "bptt_truncated", "LEARNED"),
    ("lstm_optimizer_state_detached", "lstm-optimizer", "optimizer_state_detached", "LEARNED"),
    ("meta_lstm", "meta-lstm", None, "META_LSTM"),
    ("meta_lstm_first_order", "meta-lstm", "first_order", "META_LSTM"),
    ("meta_lstm_truncated", "meta-lstm", "bptt_truncated", "META_LSTM"),
    ("meta_lstm_state_detached", "meta-lstm", "optimizer_state_detached", "META_LSTM"),
]

#: backend -> (implementation, algorithm, expected diagnosis key or None for "verified", problem configuration)
CORPUS = {
    "torch": [
        ("maml", "maml", None, "GRAD"),
        ("maml", "maml", None, "GRAD_CE"),
        ("maml_returns_grads", "maml", None, "GRAD"),
        ("maml_calls_backward", "maml", None, "GRAD"),
        ("maml_first_order", "maml", "first_order", "GRAD"),
        ("maml_first_order", "maml", "first_order", "GRAD_CE"),
        ("maml_last_step_only", "maml", "last_step_only", "GRAD_CE"),
        ("maml_first_step_only", "maml", "first_step_only", "GRAD_CE"),
        ("maml_half_lr", "maml", "wrong_inner_lr", "GRAD"),
        ("maml_sign", "maml", "wrong_inner_lr", "GRAD"),
        ("maml_sum_tasks", "maml", "scale", "GRAD"),
        ("maml_query_sum", "maml", "scale", "GRAD"),
        ("maml_extra_step", "maml", "wrong_inner_steps", "GRAD"),
        ("maml_swapped", "maml", "swapped_support_query", "GRAD"),
        ("maml_head_only", "maml", "anil_instead_of_maml", "GRAD"),
        ("maml_no_adaptation", "maml", "no_adaptation", "GRAD"),
        ("maml_bias_detached", "maml", "disconnected", "GRAD"),
        ("anil", "anil", None, "GRAD"),
        ("maml", "anil", "maml_instead_of_anil", "GRAD"),
        ("anil_first_order", "anil", "first_order", "GRAD"),
        ("fomaml", "fomaml", None, "GRAD"),
        ("maml", "fomaml", "second_order_instead", "GRAD"),
        ("metasgd", "metasgd", None, "METASGD"),
        ("metasgd_manual", "metasgd", None, "METASGD"),
        ("metasgd_lrs_detached", "metasgd", "metasgd_lrs_no_grad", "METASGD"),
        ("metasgd_transposed", "metasgd", "metasgd_transposed", "METASGD"),
        ("metasgd_first_order", "metasgd", "first_order", "METASGD"),
        ("reptile", "reptile", None, "GRAD"),
        ("reptile_sign", "reptile", "scale", "GRAD"),
        ("reptile_extra_step", "reptile", "wrong_inner_steps", "GRAD"),
        ("reptile_on_query", "reptile", "swapped_support_query", "GRAD"),
        ("reptile_head_only", "reptile", "reptile_head_only", "GRAD"),
        ("imaml", "imaml", None, "IMAML"),
        ("imaml_truncated_cg", "imaml", "imaml_truncated_cg", "IMAML"),
        ("imaml_first_order", "imaml", "first_order", "IMAML"),
        ("imaml_no_identity", "imaml", "imaml_system", "IMAML"),
        ("imaml_lam_inverted", "imaml", "imaml_system", "IMAML"),
        ("r2d2", "r2d2", None, "R2D2"),
        ("r2d2_lam_detached", "r2d2", "hyper_detached", "R2D2"),
        ("r2d2_no_normalize", "r2d2", "normalize_mismatch", "R2D2"),
        ("r2d2_no_bias_column", "r2d2", "bias_column_mismatch", "R2D2"),
        ("r2d2_support_detached", "r2d2", "support_detached", "R2D2"),
        ("lrd2", "lrd2", None, "LRD2"),
        ("lrd2_extra_newton_step", "lrd2", "wrong_inner_steps", "LRD2"),
        ("lrd2_scale_detached", "lrd2", "hyper_detached", "LRD2"),
        ("protonet", "protonet", None, "METRIC"),
        ("protonet_support_detached", "protonet", "support_detached", "METRIC"),
        ("protonet_swapped", "protonet", "swapped_support_query", "METRIC"),
        ("protonet_sum_tasks", "protonet", "scale", "METRIC"),
        ("matchingnet", "matchingnet", None, "METRIC"),
        ("matchingnet_support_detached", "matchingnet", "support_detached", "METRIC"),
        ("newton", "newton", None, "NEWTON"),
        ("newton_first_order", "newton", "first_order", "NEWTON"),
        ("maml_adam", "maml-adam", None, "OPTIM"),
        ("maml_adam_eps_hat", "maml-adam", "adam_eps_placement", "OPTIM"),
        ("maml_adam_state_detached", "maml-adam", "optimizer_state_detached", "OPTIM"),
        ("maml_adam_truncated", "maml-adam", "bptt_truncated", "OPTIM"),
        ("maml_momentum", "maml-momentum", None, "OPTIM"),
        ("maml_momentum_state_detached", "maml-momentum", "optimizer_state_detached", "OPTIM"),
        ("anil_adam", "anil-adam", None, "OPTIM"),
        ("anil_adam_eps_hat", "anil-adam", "adam_eps_placement", "OPTIM"),
        # issue 17: approximations a user did not declare (test_audit_approximations.py declares them)
        ("metasgd_truncated", "metasgd", "bptt_truncated", "METASGD"),
        *_LEARNED_ROWS,
    ],
    "jax": [
        ("maml", "maml", None, "GRAD"),
        ("maml_returns_grads", "maml", None, "GRAD"),
        ("maml_first_order", "maml", "first_order", "GRAD"),
        ("maml_last_step_only", "maml", "last_step_only", "GRAD"),
        ("maml_double_lr", "maml", "wrong_inner_lr", "GRAD"),
        ("maml_sum_tasks", "maml", "scale", "GRAD"),
        ("maml_swapped", "maml", "swapped_support_query", "GRAD"),
        ("maml_missing_step", "maml", "wrong_inner_steps", "GRAD"),
        ("maml_head_only", "maml", "anil_instead_of_maml", "GRAD"),
        ("maml_bias_cut", "maml", "disconnected", "GRAD"),
        ("anil", "anil", None, "GRAD"),
        ("anil_full", "anil", "maml_instead_of_anil", "GRAD"),
        ("metasgd", "metasgd", None, "METASGD"),
        ("metasgd_lrs_stopped", "metasgd", "metasgd_lrs_no_grad", "METASGD"),
        ("reptile", "reptile", None, "GRAD"),
        ("reptile_sign", "reptile", "scale", "GRAD"),
        ("imaml", "imaml", None, "IMAML"),
        ("imaml_truncated_cg", "imaml", "imaml_truncated_cg", "IMAML"),
        ("r2d2", "r2d2", None, "R2D2"),
        ("r2d2_lam_stopped", "r2d2", "hyper_detached", "R2D2"),
        ("r2d2_no_normalize", "r2d2", "normalize_mismatch", "R2D2"),
        ("protonet", "protonet", None, "METRIC"),
        ("protonet_support_stopped", "protonet", "support_detached", "METRIC"),
        # issue 19: the diagnoses the JAX corpus lacked (every catalogue entry in both corpora)
        ("maml_first_step_only", "maml", "first_step_only", "GRAD_CE"),
        ("maml_no_adaptation", "maml", "no_adaptation", "GRAD"),
        ("fomaml", "fomaml", None, "GRAD"),
        ("maml", "fomaml", "second_order_instead", "GRAD"),
        ("metasgd_manual", "metasgd", None, "METASGD"),
        ("metasgd_transposed", "metasgd", "metasgd_transposed", "METASGD"),
        ("reptile_head_only", "reptile", "reptile_head_only", "GRAD"),
        ("imaml_no_identity", "imaml", "imaml_system", "IMAML"),
        ("r2d2_no_bias_column", "r2d2", "bias_column_mismatch", "R2D2"),
        ("maml_adam", "maml-adam", None, "OPTIM"),
        ("maml_adam_eps_hat", "maml-adam", "adam_eps_placement", "OPTIM"),
        ("maml_adam_state_detached", "maml-adam", "optimizer_state_detached", "OPTIM"),
        ("maml_adam_truncated", "maml-adam", "bptt_truncated", "OPTIM"),
        ("maml_momentum", "maml-momentum", None, "OPTIM"),
        ("anil_adam", "anil-adam", None, "OPTIM"),
        ("metasgd_truncated", "metasgd", "bptt_truncated", "METASGD"),
        *_LEARNED_ROWS,
    ],
}
#: Algorithms whose JAX audits compile an unrolled double backward through a recurrent update (5-14 s per
#: function on 2 cores): their JAX rows run with the slow tests.
SLOW_IN_JAX = ("mamlpp", "lstm-optimizer", "meta-lstm")


def _table(slow=False):
    return [backend_param(b, row, id=f"{b}-{row[0]}-as-{row[1]}-{row[3]}",
                          slow=slow or (b == "jax" and row[1] in SLOW_IN_JAX))
            for b in BACKENDS for row in CORPUS[b]]


def check_row(backend, row, seeds):
    name, algorithm, expected, config = row
    fn = getattr(importlib.import_module(f"corpus_{backend.name}"), name)
    for seed in seeds:
        # The corpus tests the verdict and the naming: a correct implementation gets one direction of
        # the finite-difference check of its own meta-loss (it must not raise a false alarm either), a
        # buggy one none (the reference decides; the independent check is tested in test_audit_api.py).
        directions = 1 if expected is None else 0
        result = audit(fn, algorithm, backend.name, seed=seed, directions=directions, **CONFIGS[config])
        if expected is None:
            assert result.passed, result.report()
            assert result.diagnosis is None
        else:
            assert not result.passed, f"seed {seed}: {name} was verified as {algorithm}\n{result.report()}"
            assert result.diagnosis is not None, f"seed {seed}: unexplained\n{result.report()}"
            assert result.diagnosis.key == expected, f"seed {seed}\n{result.report()}"


@pytest.mark.parametrize("backend,row", _table(), indirect=["backend"])
def test_corpus(backend, row):
    check_row(backend, row, SEEDS)


@pytest.mark.parametrize("backend,row", _table(slow=True), indirect=["backend"])
def test_corpus_more_seeds(backend, row):
    check_row(backend, row, MORE_SEEDS[backend.name])
