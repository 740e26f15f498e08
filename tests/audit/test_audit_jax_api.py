"""JAX audits: the first-order bug at a 1e-6 gap, complex step on the function's own meta-loss where it applies."""

from __future__ import annotations

import pytest

pytest.importorskip("jax")

import corpus_jax as J  # noqa: E402
from _configs import first_order_gap, sensitivity_case  # noqa: E402

from verify._audit import audit  # noqa: E402


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_first_order_bug_named_at_gap_1e_6(seed):
    case = sensitivity_case(seed, 1e-6)
    assert 0.5e-6 < first_order_gap(case) < 2e-6
    correct = audit(J.maml, "maml", "jax", case=case, directions=1)
    assert correct.passed, correct.report()
    buggy = audit(J.maml_first_order, "maml", "jax", case=case, directions=1)
    assert not buggy.passed and buggy.diagnosis is not None and buggy.diagnosis.key == "first_order", buggy.report()
    assert buggy.independent["status"] == "fail"


def test_complex_step_on_own_loss_when_the_function_is_analytic():
    # Prototypical networks need no jax.grad inside, so the function accepts complex parameters and the
    # independent check uses the complex step; MAML's inner jax.grad rejects them (real differences:
    # central in the fast confirmation of a reference match, Richardson in the thorough check).
    proto = audit(J.protonet, "protonet", "jax", seed=0, directions=1, model="mlp:2-4-3:tanh", n_tasks=1,
                  shots=2, queries=2, n_way=3)
    assert proto.passed and proto.independent["method"] == "complex", proto.report()
    assert proto.independent["budget"] == "fast"
    problem = dict(seed=0, directions=1, model="mlp:2-4-1:tanh", n_tasks=1, shots=3, queries=2, inner_steps=1,
                   inner_lr=0.1)
    maml = audit(J.maml, "maml", "jax", **problem)
    assert maml.passed and maml.independent["method"] == "central" and maml.independent["budget"] == "fast"
    maml = audit(J.maml, "maml", "jax", thorough=True, **problem)
    assert maml.passed and maml.independent["method"] == "richardson", maml.report()
    assert maml.independent["budget"] == "thorough"


def test_declared_first_order_jax_from_the_cli(tmp_path, capsys):
    """``--approximation first_order`` with the JAX contract: verified against FOMAML, distance reported."""
    import json
    from pathlib import Path

    from verify.cli import main

    out = tmp_path / "r.json"
    args = ["--algorithm", "maml", "--model", "mlp:2-3-1:tanh", "--tasks", "2", "--inner-steps", "2",
            "--inner-lr", "0.2", "--approximation", "first_order", "--json", str(out)]
    corpus = str(Path(J.__file__))
    assert main(["audit", f"{corpus}:maml_first_order", *args]) == 0, capsys.readouterr().out
    a = json.loads(out.read_text())["result"]["audit"]
    assert a["backend"] == "jax" and a["approximation"] == "first_order"
    assert a["distance_from_exact"]["relative"] > 0.1
    assert main(["audit", f"{corpus}:maml", *args]) == 1  # exact code, first_order declared
    assert "the declared approximation first_order was not applied" in capsys.readouterr().out
