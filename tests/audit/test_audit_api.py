"""verify.audit's verdict: sensitivity, which side is wrong, fitted values, messages, bad input, JSON/JUnit."""

from __future__ import annotations

import json
import re

import pytest

torch = pytest.importorskip("torch")

import corpus_torch as C  # noqa: E402
from _configs import GRAD, first_order_gap, sensitivity_case  # noqa: E402

from reference.errors import InvalidInputError  # noqa: E402
from verify._audit import AuditInputError, audit, parse_model  # noqa: E402


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_first_order_bug_named_at_gap_1e_6(seed):
    case = sensitivity_case(seed, 1e-6)
    gap = first_order_gap(case)
    assert 0.5e-6 < gap < 2e-6  # the problem really has a 1e-6 first-order gap
    correct = audit(C.maml, "maml", "torch", case=case, directions=1)
    assert correct.passed, correct.report()
    buggy = audit(C.maml_first_order, "maml", "torch", case=case, directions=1)
    assert not buggy.passed
    assert buggy.diagnosis is not None and buggy.diagnosis.key == "first_order", buggy.report()
    # The independent check sees it too: the gradient is not the gradient of the function's own meta-loss.
    assert buggy.loss["status"] == "pass"
    assert buggy.independent["status"] == "fail", buggy.report()


def test_which_side_forward_vs_backward():
    fo = audit(C.maml_first_order, "maml", "torch", seed=3, directions=2, **GRAD)
    assert fo.loss["status"] == "pass" and fo.independent["status"] == "fail"
    assert "backward pass" in fo.which_side
    lr = audit(C.maml_half_lr, "maml", "torch", seed=3, directions=2, **GRAD)
    assert lr.loss["status"] == "fail" and lr.independent["status"] == "pass"
    assert "forward computation" in lr.which_side


def test_returned_loss_not_the_one_differentiated():
    def fn(model, tasks, inner_lr, inner_steps):
        loss = C.maml(model, tasks, inner_lr, inner_steps)
        grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        return loss + 1e-2 * (model[0].bias ** 2).sum(), grads  # the returned loss has an extra term

    r = audit(fn, "maml", "torch", seed=0, directions=2, **GRAD)
    assert not r.passed
    # The loss differs from the reference, the gradient does not: the returned loss is not what was differentiated.
    assert all(t.status == "pass" for t in r.tensors)
    assert r.independent["status"] == "fail"


def test_fitted_values_and_names():
    seed = 4
    lr = audit(C.maml_half_lr, "maml", "torch", seed=seed, directions=0, **GRAD)
    assert lr.diagnosis.fitted["inner_lr"] == pytest.approx(0.5 * GRAD["inner_lr"], rel=1e-8)
    sign = audit(C.maml_sign, "maml", "torch", seed=seed, directions=0, **GRAD)
    assert sign.diagnosis.fitted["inner_lr"] == pytest.approx(-GRAD["inner_lr"], rel=1e-8)
    assert "sign" in sign.diagnosis.detail
    total = audit(C.maml_sum_tasks, "maml", "torch", seed=seed, directions=0, **GRAD)
    assert total.diagnosis.fitted["scale"] == pytest.approx(GRAD["n_tasks"], rel=1e-10)
    assert "summed over the 2 tasks" in total.diagnosis.detail
    q = audit(C.maml_query_sum, "maml", "torch", seed=seed, directions=0, **GRAD)
    assert q.diagnosis.fitted["scale"] == pytest.approx(GRAD["queries"], rel=1e-10)
    assert "reduction='sum'" in q.diagnosis.detail
    steps = audit(C.maml_extra_step, "maml", "torch", seed=seed, directions=0, **GRAD)
    assert "inner_steps=3 instead of 2" in steps.diagnosis.detail
    cut = audit(C.maml_bias_detached, "maml", "torch", seed=seed, directions=0, **GRAD)
    assert "b1, b2" in cut.diagnosis.detail
    assert [t.missing for t in cut.tensors] == [False, True, False, True]


def test_unexplained_mismatch():
    r = audit(C.maml_noisy, "maml", "torch", seed=0, directions=1, **GRAD)
    assert not r.passed and r.diagnosis is None
    assert "unexplained mismatch" in r.report()
    assert r.to_dict()["unexplained"] is True


def test_headline_is_chex_style():
    r = audit(C.maml_first_order, "maml", "torch", seed=0, directions=0, **GRAD)
    assert re.fullmatch(r"maml meta-gradient mismatch: [Wb]\d\[[\d, ]*\] reference=\S+ got=\S+ rel=\S+ "
                        r"\(tol \S+, float64\)", r.headline()), r.headline()
    ok = audit(C.maml, "maml", "torch", seed=0, directions=0, **GRAD)
    assert ok.headline().startswith("maml meta-gradient verified")


def test_json_and_junit():
    r = audit(C.maml_first_order, "maml", "torch", seed=0, directions=1, **GRAD, title="demo")
    doc = json.loads(r.to_json())
    assert doc["status"] == "fail" and doc["algorithm"] == "maml" and doc["title"] == "demo"
    assert doc["diagnosis"]["key"] == "first_order"
    assert [t["name"] for t in doc["tensors"]] == ["W1", "b1", "W2", "b2"]
    cases = r.junit_cases()
    assert [c["name"] for c in cases][:2] == ["meta-loss", "W1"]
    assert {c["status"] for c in cases[1:5]} == {"fail"}


@pytest.mark.parametrize("name, match", [
    ("raises", "boom inside the user's code"),
    ("non_scalar", "scalar meta-loss"),
    ("non_finite", "non-finite meta-loss"),
    ("too_few_grads", "returned 3 gradient"),
])
def test_bad_input(name, match):
    with pytest.raises(AuditInputError, match=match) as info:
        audit(getattr(C, name), "maml", "torch", seed=0, directions=0, **GRAD)
    if name == "raises":
        assert "corpus_torch.py" in str(info.value)  # the function's traceback is shown


def test_bad_problem():
    with pytest.raises(InvalidInputError, match="cannot be audited"):
        audit(C.maml, "mlp")
    with pytest.raises(InvalidInputError, match="backend"):
        audit(C.maml, "maml", "tensorflow")
    with pytest.raises(InvalidInputError, match="model spec"):
        parse_model("1-40-1")
    assert parse_model("mlp:1-40-40-1:tanh:nobias") == {"sizes": [1, 40, 40, 1], "activation": "tanh", "bias": False}


@pytest.mark.slow
@pytest.mark.parametrize("gap", [1e-8, 1e-10, 1e-11, 3e-12])
def test_first_order_bug_named_down_to_the_tolerance(gap):
    """The sensitivity figure of docs/audit.md: named down to a 3e-12 gap (the tolerance is 1.8e-12)."""
    for seed in range(3):
        case = sensitivity_case(seed, gap)
        assert audit(C.maml, "maml", "torch", case=case, directions=0).passed
        buggy = audit(C.maml_first_order, "maml", "torch", case=case, directions=0)
        assert buggy.diagnosis is not None and buggy.diagnosis.key == "first_order", buggy.report()


# ---------------------------------------------------------------------------
# the own-loss check's budget: fast confirmation of a match, full check on a mismatch


def _counting(fn):
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        return fn(*args, **kwargs)

    return wrapped, calls


def test_match_is_confirmed_in_one_fast_direction():
    fn, calls = _counting(C.maml)
    r = audit(fn, "maml", "torch", seed=1, **GRAD)
    assert r.passed, r.report()
    ind = r.independent
    assert ind["budget"] == "fast" and ind["directions"] == 1 and ind["status"] == "pass"
    assert ind["method"] == "central" and "budget='fast'" in ind["reason"]
    # the claim, then f(x) and f(x +- t v), f(x +- 2 t v): no kink or noise probes
    assert calls[0] == 1 + 5
    assert "(fast): pass" in r.report()
    fn, calls = _counting(C.maml)
    full = audit(fn, "maml", "torch", seed=1, thorough=True, **GRAD)
    assert full.passed and full.independent["budget"] == "thorough" and full.independent["directions"] == 4
    assert full.independent["method"] == "richardson"
    assert calls[0] > 100  # Richardson: up to 28 evaluations per direction, kink and noise probes


def test_mismatch_always_gets_the_full_check():
    r = audit(C.maml_first_order, "maml", "torch", seed=1, directions=3, **GRAD)
    assert not r.passed
    assert r.independent["budget"] == "thorough" and r.independent["directions"] == 3
    assert r.independent["status"] == "fail"


def test_fast_confirmation_that_does_not_pass_falls_back_to_the_full_check(monkeypatch):
    import verify._check as engine
    from verify._verdict import INCONCLUSIVE, Verdict

    real = engine._check_gradient

    def undecided(*args, **kwargs):
        if kwargs.get("budget") == "fast":
            return Verdict(INCONCLUSIVE, "gradient", 0.0, 1.0, "stub: undecided", "float64", "central", ())
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "_check_gradient", undecided)
    r = audit(C.maml, "maml", "torch", seed=1, **GRAD)
    assert r.passed and r.independent["budget"] == "thorough" and r.independent["directions"] == 4


def test_thorough_must_be_a_bool():
    with pytest.raises(InvalidInputError, match="thorough='yes'"):
        audit(C.maml, "maml", "torch", seed=0, thorough="yes", **GRAD)
