"""Precision named, never "unexplained": float32 constants, a float32 meta-loss, ``dtype="float32"`` (issue 15, item 2);
defaults instead of dice and the problem line (item 4); bad input of the API (item 7)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import corpus_precision as P  # noqa: E402
import corpus_torch as C  # noqa: E402
from _configs import GRAD, GRAD_CE, R2D2, sensitivity_case  # noqa: E402

from reference.errors import InvalidInputError  # noqa: E402
from verify.auditing import audit  # noqa: E402
from verify.auditing.problem import AuditInputError  # noqa: E402


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("fn, algorithm, cfg", [
    (P.maml_float32_constants, "maml", GRAD),
    (P.maml_float32_constants, "maml", GRAD_CE),
    (P.maml_float32_step_size, "maml", GRAD),
    (P.r2d2_float32_eye, "r2d2", R2D2),
], ids=["maml-accumulator-mse", "maml-accumulator-ce", "maml-step-size", "r2d2-eye"])
def test_float32_constants_are_named_as_precision(fn, algorithm, cfg, seed):
    r = audit(fn, algorithm, "torch", seed=seed, directions=1, **cfg)
    assert r.passed, r.report()
    assert r.precision.startswith("float32 constants: the function creates tensors in the default dtype"), r.report()
    assert "unexplained" not in r.report()
    assert r.to_dict()["precision"] == r.precision
    assert torch.get_default_dtype() == torch.float32  # the caller's default is restored


def test_returned_float32_loss_is_reported_as_such():
    r = audit(P.maml_backward_returns_float32, "maml", "torch", seed=0, directions=1, **GRAD_CE)
    assert r.passed, r.report()
    assert 0 < r.loss["error"] <= r.loss["tolerance"] == pytest.approx(2 * 2.0 ** -23)
    assert any("meta-loss is a float32 tensor" in n for n in r.notes)


def test_real_bug_in_code_with_float32_constants_is_still_named():
    r = audit(P.maml_first_order_float32_constants, "maml", "torch", seed=0, directions=1, **GRAD)
    assert not r.passed
    assert r.diagnosis is not None and r.diagnosis.key == "first_order", r.report()
    assert not r.precision
    assert any("torch.set_default_dtype(torch.float64)" in n for n in r.notes)


def test_correct_float64_code_is_not_rerun():
    r = audit(C.maml, "maml", "torch", seed=0, directions=1, **GRAD)
    assert r.passed and not r.precision and not r.notes


# -- dtype="float32": the whole audit in float32 ----------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_float32_audit_verifies_correct_and_catches_first_order(seed):
    ok = audit(C.maml, "maml", "torch", seed=seed, directions=1, dtype="float32", **GRAD)
    assert ok.passed, ok.report()
    assert ok.dtype == "float32" and "float32" in ok.headline() and ok.tolerance > 1e-6
    assert "would be caught" in ok.precision
    bad = audit(C.maml_first_order, "maml", "torch", seed=seed, directions=1, dtype="float32", **GRAD)
    assert not bad.passed and bad.diagnosis is not None and bad.diagnosis.key == "first_order", bad.report()


def test_float32_audit_says_where_first_order_is_below_its_floor():
    case = sensitivity_case(0, 1e-8)  # first-order gap 1e-8: below float32's floor
    r = audit(C.maml_first_order, "maml", "torch", case=case, directions=1, dtype="float32")
    assert "would NOT be caught" in r.precision, r.report()
    # and float64 catches it on the same problem
    r64 = audit(C.maml_first_order, "maml", "torch", case=case, directions=1)
    assert not r64.passed and r64.diagnosis.key == "first_order"


# -- defaults, not dice; the problem line ------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_r2d2_conventions_default_not_drawn(seed):
    cfg = {k: v for k, v in R2D2.items() if k not in ("normalize", "bias_column", "form")}
    r = audit(C.r2d2, "r2d2", "torch", seed=seed, directions=1, **cfg)
    assert r.passed, r.report()
    assert "bias_column=True, normalize=True, form='dual'" in r.problem
    assert "lam=" in r.problem and "scale=" in r.problem and "offset=" in r.problem
    assert "loss='mse'" not in r.problem


# -- bad input of the API ------------------------------------------------------------------------


def test_api_bad_input_is_a_clear_error():
    with pytest.raises(AuditInputError, match="returned None"):
        audit(P.maml_returns_none, "maml", "torch", seed=0, **GRAD)
    with pytest.raises(InvalidInputError, match="seed=-1 must be an integer >= 0"):
        audit(C.maml, "maml", "torch", seed=-1, **GRAD)
    with pytest.raises(InvalidInputError, match="lam= does not apply to maml"):
        audit(C.maml, "maml", "torch", lam=1.0, **GRAD)
    with pytest.raises(InvalidInputError, match="of memory"):
        audit(C.maml, "maml", "torch", **{**GRAD, "shots": 10**9})
    with pytest.raises(InvalidInputError, match="not a fault of the audited function"):
        audit(C.maml, "maml", "torch", seed=0, **{**GRAD, "inner_lr": 1e200})


def test_cli_dtype_float32_and_precision_line(capsys):
    from pathlib import Path

    from verify.cli import main

    here = Path(__file__).parent
    small = ["--model", "mlp:2-4-1:tanh", "--tasks", "2", "--shots", "4", "--queries", "3", "--inner-steps", "2",
             "--inner-lr", "0.2", "--directions", "1"]
    assert main(["audit", f"{here / 'corpus_torch.py'}:maml", "--algorithm", "maml", *small, "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "(tol 6.4e-06, float32)" in out.splitlines()[0] or "float32)" in out.splitlines()[0]
    assert "precision: float32 audit" in out
    assert main(["audit", f"{here / 'corpus_precision.py'}:maml_float32_constants", "--algorithm", "maml",
                 *small]) == 0
    out = capsys.readouterr().out
    assert "VERIFIED" in out and "precision: float32 constants" in out


def test_hardcoded_float32_is_named_as_precision_not_unexplained():
    r = audit(P.maml_hardcoded_float32_query, "maml", "torch", seed=0, directions=1, **GRAD)
    assert not r.passed  # it cannot be verified to float64's tolerance
    assert r.precision.startswith("float32 round-off: "), r.report()
    assert r.diagnosis is None and r.to_dict()["unexplained"] is False and "unexplained" not in r.report()
    # audited as float32 code, it verifies
    assert audit(P.maml_hardcoded_float32_query, "maml", "torch", seed=0, directions=1, dtype="float32",
                 **GRAD).passed


def test_bug_in_hardcoded_float32_code_is_named_at_float32_tolerance():
    r = audit(P.maml_first_order_hardcoded_float32_query, "maml", "torch", seed=0, directions=1, **GRAD)
    assert r.diagnosis is not None and r.diagnosis.key == "first_order", r.report()
    assert any("float32's tolerance" in n for n in r.notes)


def test_small_unexplained_mismatch_of_float64_code_is_not_called_precision():
    # a forward change of 1e-9 in pure float64 code: no float32 anywhere, so no precision excuse
    def fn(model, tasks, inner_lr, inner_steps):
        return C.maml(model, tasks, inner_lr, inner_steps) * (1 + 1e-9) + 1e-9 * sum(
            (p ** 3).sum() for p in model.parameters())

    r = audit(fn, "maml", "torch", seed=0, directions=1, **GRAD)
    assert not r.passed and not r.precision, r.report()
