"""The verdict sentence matches the numbers, for every combination of the three checks (issue 15, item 3)."""

from __future__ import annotations

import itertools

import pytest

from verify._verdict import FAIL, INCONCLUSIVE, PASS
from verify.auditing.decision import WHICH_SIDE, which_side

LOSS = (PASS, FAIL, None)
TENSORS = (PASS, FAIL)
OWN = (PASS, FAIL, INCONCLUSIVE, None)


def test_the_table_covers_every_combination():
    assert set(WHICH_SIDE) == set(itertools.product(LOSS, TENSORS, OWN))


@pytest.mark.parametrize("loss, tensors, own", list(itertools.product(LOSS, TENSORS, OWN)))
def test_sentence_agrees_with_each_check(loss, tensors, own):
    text = which_side(loss, tensors, own, "maml")
    assert text and "{" not in text
    if tensors == PASS:
        # never blame the gradient when every tensor matches the reference
        assert "gradient disagrees" not in text and "backward pass" not in text and "differs from the reference" \
            not in text.replace("meta-loss differs from the reference", "")
        assert "match" in text
    else:
        assert "gradient matches the reference" not in text
    if loss == FAIL and tensors == PASS:
        assert "only the meta-loss" in text or "returned loss is not the function that was differentiated" in text
        assert "every gradient tensor matches the reference" in text
    if loss == PASS:
        assert "meta-loss and the gradient both differ" not in text and "both the forward" not in text
    if own == INCONCLUSIVE:
        assert "inconclusive" in text
    if own == FAIL and tensors == PASS:
        assert "not the function that was differentiated" in text
    if own is None and loss is not None:
        assert "no finite-difference check" in text or (loss == FAIL and tensors == PASS)


def test_all_tensors_pass_only_the_loss_differs():
    torch = pytest.importorskip("torch")
    import corpus_torch as C
    from _configs import GRAD

    from verify.auditing import audit

    def fn(model, tasks, inner_lr, inner_steps):
        return C.maml(model, tasks, inner_lr, inner_steps) + torch.tensor(0.5, dtype=torch.float64)  # a constant

    r = audit(fn, "maml", "torch", seed=0, directions=2, **GRAD)
    assert not r.passed
    assert all(t.status == PASS for t in r.tensors) and r.loss["status"] == FAIL
    assert r.which_side == WHICH_SIDE[(FAIL, PASS, r.independent["status"])]
    assert "gradient disagrees" not in r.report()
    assert r.headline().startswith("maml meta-loss mismatch")
