"""The JAX corpus: every buggy implementation fails with its diagnosis, the correct ones pass, over seeds."""

from __future__ import annotations

import pytest

pytest.importorskip("jax")

import corpus_jax as C  # noqa: E402
from _configs import CONFIGS  # noqa: E402

from verify._audit import audit  # noqa: E402

SEEDS = (0, 1)
MORE_SEEDS = (2, 3, 4)

CORPUS = [
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
]


def _ids(row):
    return f"{row[0]}-as-{row[1]}-{row[3]}"


def check_row(row, seeds):
    name, algorithm, expected, config = row
    fn = getattr(C, name)
    for seed in seeds:
        directions = 1 if expected is None else 0  # as in the torch corpus
        result = audit(fn, algorithm, "jax", seed=seed, directions=directions, **CONFIGS[config])
        if expected is None:
            assert result.passed, result.report()
            assert result.diagnosis is None
        else:
            assert not result.passed, f"seed {seed}: {name} was verified as {algorithm}\n{result.report()}"
            assert result.diagnosis is not None, f"seed {seed}: unexplained\n{result.report()}"
            assert result.diagnosis.key == expected, f"seed {seed}\n{result.report()}"


@pytest.mark.parametrize("row", CORPUS, ids=_ids)
def test_corpus(row):
    check_row(row, SEEDS)


@pytest.mark.slow
@pytest.mark.parametrize("row", CORPUS, ids=_ids)
def test_corpus_more_seeds(row):
    check_row(row, MORE_SEEDS)
