"""Adding an algorithm is adding a row: a toy algorithm registered here reaches the check, the audit and the report.

The toy is "no adaptation": the meta-loss is the mean over tasks of the query loss at
``theta`` itself, ``L(theta) = 1/N sum_i L^q_i(theta)``; its reference gradient is the
mean of the MLP's backpropagated query gradients (the MLP's gradient is checked
independently by the ``mlp`` row against finite differences). Nothing outside this file
is edited for it: the row (:func:`verify.algorithms.register`) carries the calling
contract, the formulas, the diagnoses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from verify.algorithms import ALGORITHMS, Algorithm, build_case, evaluate, register, unregister
from verify.cli import main
from verify.formulas import AlgorithmText


def _call_toy(mod, case, variables, **kw):
    if mod.__name__ != "reference":
        raise NotImplementedError("the toy algorithm has a reference only")
    params, _ = case.split(variables)
    total, grads = 0.0, None
    for t in case.tasks:
        loss, g = case.model.loss_and_grad(params, t.x_query, t.y_query)
        total += loss
        grads = g if grads is None else [a + b for a, b in zip(grads, g)]
    n = len(case.tasks)
    return total / n, [g / n for g in grads]


TOY = Algorithm(
    "toy", "mlp", _call_toy, paper="a test fixture", signature=("model", "tasks"), backends=("numpy",),
    text=AlgorithmText("Toy (no adaptation)", "a test fixture", "", "The query loss at theta, averaged over tasks.",
                       [("meta-loss", r"\mathcal{L}(\theta) = \frac{1}{N} \sum_i L^q_i(\theta)")],
                       [("gradient", r"\nabla \mathcal{L} = \frac{1}{N} \sum_i \nabla L^q_i(\theta)")]),
    diagnoses=("scale", "disconnected"))

USER_CODE = '''
import torch
import torch.nn.functional as F


def toy(model, tasks):
    return sum(F.mse_loss(model(t.x_query), t.y_query) for t in tasks) / len(tasks)


def toy_summed(model, tasks):  # the classic bug: summed over tasks instead of averaged
    return sum(F.mse_loss(model(t.x_query), t.y_query) for t in tasks)
'''


@pytest.fixture
def toy():
    register(TOY)
    try:
        yield TOY
    finally:
        unregister("toy")
    assert "toy" not in ALGORITHMS


def test_register_refuses_a_taken_name_and_a_non_row(toy):
    from reference.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="already registered"):
        register(TOY)
    with pytest.raises(InvalidInputError, match="not an Algorithm"):
        register("toy")  # type: ignore[arg-type]


def test_toy_reference_gradient_matches_central_differences(toy):
    # Independent of the engine under test: plain central differences of the reference meta-loss.
    case = build_case("toy", seed=3, sizes=[2, 3, 1], loss="mse")
    _, grads = evaluate(case)
    flat = np.concatenate([np.ravel(g) for g in grads])
    x0 = np.concatenate([np.ravel(v) for v in case.variables])
    shapes = case.shapes

    def f(x):
        parts, k = [], 0
        for s in shapes:
            n = int(np.prod(s))
            parts.append(x[k:k + n].reshape(s))
            k += n
        return evaluate(case, variables=parts)[0]

    h = 1e-6
    fd = np.array([(f(x0 + h * e) - f(x0 - h * e)) / (2 * h) for e in np.eye(x0.size)])
    assert np.max(np.abs(fd - flat)) <= 1e-7 * max(1.0, np.max(np.abs(flat)))


def test_toy_appears_in_check(toy, tmp_path, capsys):
    out = tmp_path / "check.json"
    code = main(["check", "--algorithm", "toy", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    cells = json.loads(out.read_text())["result"]["check"]["cells"]
    assert [(c["algorithm"], c["backend"], c["status"]) for c in cells] == [("toy", "numpy", "pass")]


def test_toy_appears_in_audit_and_names_the_bug(toy, tmp_path, capsys):
    pytest.importorskip("torch")
    user = tmp_path / "user_toy.py"
    user.write_text(USER_CODE)
    problem = ["--algorithm", "toy", "--model", "mlp:2-3-1:tanh", "--loss", "mse", "--tasks", "2", "--directions", "1"]
    assert main(["audit", f"{user}:toy", *problem]) == 0
    assert "VERIFIED" in capsys.readouterr().out
    out = tmp_path / "audit.json"
    assert main(["audit", f"{user}:toy_summed", *problem, "--json", str(out)]) == 1
    doc = json.loads(out.read_text())["result"]["audit"]
    assert doc["status"] == "fail" and doc["diagnosis"]["key"] == "scale"
    assert doc["diagnosis"]["fitted"]["scale"] == pytest.approx(2.0, rel=1e-9)


def test_toy_appears_in_the_report(toy, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["report", "--algorithm", "toy", "--backend", "numpy", "--dtype", "float64", "--quick",
                 "--out", str(out)])
    capsys.readouterr()
    assert code == 0
    text = "\n".join(p.read_text() for p in Path(out).rglob("*.md"))
    assert "Toy (no adaptation)" in text and r"\frac{1}{N} \sum_i L^q_i(\theta)" in text
