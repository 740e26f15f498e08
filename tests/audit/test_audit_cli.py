"""``metaverify audit``: exit codes 0/1/2, the report, --json (versioned schema) and --junit."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from verify.cli import main  # noqa: E402

CORPUS = str(Path(__file__).with_name("corpus_torch.py"))
PROBLEM = ["--model", "mlp:2-3-1:tanh", "--tasks", "2", "--shots", "3", "--queries", "2", "--inner-steps", "2",
           "--inner-lr", "0.2", "--directions", "1"]


def test_verified_exit_0_with_json_and_junit(tmp_path, capsys):
    out_json, out_xml = tmp_path / "r.json", tmp_path / "r.xml"
    code = main(["audit", f"{CORPUS}:maml", "--algorithm", "maml", *PROBLEM, "--json", str(out_json),
                 "--junit", str(out_xml), "--title", "my maml"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "VERIFIED" in text
    doc = json.loads(out_json.read_text())
    assert doc["schema"] == "metaverify.results" and doc["version"] == 1
    assert doc["result"]["audit"]["status"] == "pass" and doc["result"]["audit"]["title"] == "my maml"
    assert doc["result"]["audit"]["independent"]["budget"] == "fast"  # a match is confirmed in one direction
    suite = ET.parse(out_xml).getroot()
    assert suite.get("failures") == "0" and int(suite.get("tests")) == 6  # loss, 4 tensors, finite differences


def test_mismatch_exit_1_names_the_bug(tmp_path, capsys):
    out_xml = tmp_path / "r.xml"
    code = main(["audit", f"{CORPUS}:maml_first_order", "--algorithm", "maml", *PROBLEM, "--junit", str(out_xml)])
    text = capsys.readouterr().out
    assert code == 1
    assert text.startswith("maml meta-gradient mismatch: ")
    assert "diagnosis: first-order only" in text
    assert int(ET.parse(out_xml).getroot().get("failures")) >= 4


@pytest.mark.parametrize("args, message", [
    ([f"{CORPUS}:raises", "--algorithm", "maml"], "boom inside the user's code"),
    ([f"{CORPUS}:non_scalar", "--algorithm", "maml"], "scalar"),
    ([f"{CORPUS}:too_few_grads", "--algorithm", "maml"], "gradient(s)"),
    (["no/such/file.py:maml", "--algorithm", "maml"], "does not exist"),
    ([f"{CORPUS}:no_such_function", "--algorithm", "maml"], "has no function"),
    (["maml", "--algorithm", "maml"], "must look like"),
    (["verify_no_such_module:fn", "--algorithm", "maml"], "not found"),
    ([f"{CORPUS}:maml", "--library", "higher", "--algorithm", "maml"], "not both"),
    (["--algorithm", "maml"], "neither"),
])
def test_bad_input_exit_2(args, message, capsys):
    code = main(["audit", *args, *PROBLEM])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    if "raises" in args[0]:
        assert "Traceback" in err and "corpus_torch.py" in err


def test_module_target(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    code = main(["audit", "corpus_torch:fomaml", "--algorithm", "fomaml", *PROBLEM])
    assert code == 0, capsys.readouterr().out


def test_thorough_flag_runs_the_full_finite_difference_check(tmp_path, capsys):
    out_json = tmp_path / "r.json"
    code = main(["audit", f"{CORPUS}:maml", "--algorithm", "maml", *PROBLEM, "--thorough", "--json", str(out_json)])
    assert code == 0, capsys.readouterr().out
    independent = json.loads(out_json.read_text())["result"]["audit"]["independent"]
    assert independent["budget"] == "thorough" and independent["directions"] == 1  # --directions 1 in PROBLEM


# -- declared approximations (--approximation; verify.inner_audit) -------------------------------------------

IMAML = ["--model", "mlp:2-3-1:tanh", "--tasks", "2", "--shots", "3", "--queries", "2", "--lam", "2"]


def _torch_grads(name: str, algorithm: str, args: list[str]) -> np.ndarray:
    """The corpus function's own gradient (torch), flattened: the independent side of a distance."""
    import corpus_torch  # tests/audit is on sys.path (as for test_audit_corpus.py)

    from verify.auditing.harness import make_harness
    from verify.auditing.problem import build_problem

    opts = dict(zip(args[::2], args[1::2]))
    hyper = {"inner_steps": int(opts["--inner-steps"]), "inner_lr": float(opts["--inner-lr"])}
    case = build_problem(algorithm, model=opts["--model"], loss=None, n_tasks=int(opts["--tasks"]),
                         shots=int(opts["--shots"]), queries=int(opts["--queries"]), n_way=None, seed=0, hyper=hyper)
    claim = make_harness("torch", getattr(corpus_torch, name), case).claim()
    return np.concatenate([np.ravel(np.asarray(g, dtype=float)) for g in claim.grads])


def test_declared_first_order_is_verified_with_its_distance_from_exact(tmp_path, capsys):
    out_json, out_xml = tmp_path / "r.json", tmp_path / "r.xml"
    code = main(["audit", f"{CORPUS}:maml_first_order", "--algorithm", "maml", *PROBLEM, "--approximation",
                 "first_order", "--json", str(out_json), "--junit", str(out_xml)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert text.startswith("maml meta-gradient matches the declared approximation first_order: ")
    a = json.loads(out_json.read_text())["result"]["audit"]
    assert a["status"] == "pass" and a["approximation"] == "first_order"
    # The reported distance against the one between the two torch implementations (create_graph=True/False).
    g_fo = _torch_grads("maml_first_order", "maml", PROBLEM)
    g_ex = _torch_grads("maml", "maml", PROBLEM)
    rel = np.linalg.norm(g_fo - g_ex) / max(np.linalg.norm(g_fo), np.linalg.norm(g_ex))
    cos = g_fo @ g_ex / (np.linalg.norm(g_fo) * np.linalg.norm(g_ex))
    assert rel > 0.1  # a real approximation here, not round-off
    assert a["distance_from_exact"]["relative"] == pytest.approx(rel, rel=1e-10)
    assert a["distance_from_exact"]["cosine"] == pytest.approx(cos, rel=1e-10)
    assert f"distance from exact {rel:.3g}" in text
    assert a["independent"] is None  # a first-order gradient is not the derivative of the meta-loss
    cases = list(ET.parse(out_xml).getroot().iter("testcase"))
    assert cases[0].get("name") == "declared approximation first_order" and cases[0].find("failure") is None


def test_undeclared_first_order_is_still_a_named_mismatch(tmp_path, capsys):
    out_json = tmp_path / "r.json"
    code = main(["audit", f"{CORPUS}:maml_first_order", "--algorithm", "maml", *PROBLEM, "--json", str(out_json)])
    text = capsys.readouterr().out
    assert code == 1
    assert "diagnosis: first-order only" in text
    a = json.loads(out_json.read_text())["result"]["audit"]
    assert "approximation" not in a and a["diagnosis"]["key"] == "first_order"


def test_declared_but_not_applied_is_a_mismatch_named_exact(capsys):
    code = main(["audit", f"{CORPUS}:maml", "--algorithm", "maml", *PROBLEM, "--approximation", "first_order"])
    text = capsys.readouterr().out
    assert code == 1
    assert "diagnosis: the exact meta-gradient: the declared approximation first_order was not applied" in text


def test_imaml_authors_solver_declared_cg_matches_and_a_shorter_cg_is_named(tmp_path, capsys):
    out_xml = tmp_path / "r.xml"
    code = main(["audit", f"{CORPUS}:imaml_authors", "--algorithm", "imaml", *IMAML, "--inner-lr", "0.05",
                 "--approximation", "cg:5+inner_steps:16", "--junit", str(out_xml)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "matches the declared approximation cg:5+inner_steps:16+damping:0" in text
    first = next(ET.parse(out_xml).getroot().iter("testcase"))
    assert first.get("name") == "declared approximation cg:5+inner_steps:16+damping:0" and \
        first.find("failure") is None
    # The paper's 5 CG iterations and 16 inner steps are far from the exact implicit gradient here.
    assert float(text.split("distance from exact ")[1].split()[0]) > 1e-2
    code = main(["audit", f"{CORPUS}:imaml_authors_cg3", "--algorithm", "imaml", *IMAML, "--approximation",
                 "cg:5+inner_steps:16"])
    text = capsys.readouterr().out
    assert code == 1
    assert "diagnosis: cg:3, not the declared cg:5+inner_steps:16+damping:0" in text


@pytest.mark.parametrize("algorithm, spec, message", [
    ("maml", "cg:5", "'cg:5' does not apply to algorithm='maml'"),
    ("maml", "cg:5+inner_steps:16", "does not apply to algorithm='maml'"),
    ("imaml", "first_order", "'first_order' does not apply to algorithm='imaml'"),
    ("maml", "truncated:x", "needs an integer"),
    ("maml", "second_order", "unknown part"),
    ("reptile", "first_order", "does not apply to algorithm='reptile'"),
])
def test_inapplicable_approximation_is_a_usage_error(algorithm, spec, message, capsys):
    target = f"{CORPUS}:imaml_authors" if algorithm == "imaml" else f"{CORPUS}:maml"
    code = main(["audit", target, "--algorithm", algorithm, *PROBLEM, "--approximation", spec])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("metaverify audit: error: ") and message in err


OPTIM = ["--model", "mlp:2-4-1:tanh", "--tasks", "2", "--shots", "4", "--queries", "3", "--inner-steps", "3",
         "--inner-lr", "0.05"]


@pytest.mark.parametrize("name, spec", [("maml_adam_truncated", "truncated:1"),
                                        ("maml_adam_state_detached", "stop_gradient")])
def test_declared_truncation_and_stop_gradient_on_the_adam_row(name, spec, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    code = main(["audit", f"{CORPUS}:{name}", "--algorithm", "maml-adam", *OPTIM, "--approximation", spec,
                 "--json", str(out_json)])
    text = capsys.readouterr().out
    assert code == 0, text
    a = json.loads(out_json.read_text())["result"]["audit"]
    assert a["approximation"] == spec and 0 < a["distance_from_exact"]["relative"] < 1
    # Declared the other way round, the same code is a named mismatch.
    other = "stop_gradient" if spec.startswith("truncated") else "truncated:1"
    assert main(["audit", f"{CORPUS}:{name}", "--algorithm", "maml-adam", *OPTIM, "--approximation", other]) == 1
    text = capsys.readouterr().out
    assert ("diagnosis: stop_gradient instead of truncated:1" in text if name == "maml_adam_state_detached" else
            "diagnosis: backpropagation truncated (undeclared): truncated:1, not the declared stop_gradient" in text)


LEARNED = ["--model", "mlp:2-3-1:tanh", "--tasks", "2", "--shots", "4", "--queries", "3", "--inner-steps", "3"]


def test_declared_truncation_on_the_meta_learner_lstm(tmp_path, capsys):
    """Ravi & Larochelle's meta-learner from the CLI: truncated BPTT declared, verified, its distance reported."""
    out_json = tmp_path / "r.json"
    code = main(["audit", f"{CORPUS}:meta_lstm_truncated", "--algorithm", "meta-lstm", *LEARNED, "--approximation",
                 "truncated:1", "--json", str(out_json)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert text.startswith("meta-lstm meta-gradient matches the declared approximation truncated:1: ")
    a = json.loads(out_json.read_text())["result"]["audit"]
    assert a["approximation"] == "truncated:1" and 0.01 < a["distance_from_exact"]["relative"] < 1
    assert {t["name"] for t in a["tensors"]} >= {"phi[0]", "phi[1]", "phi[2]", "phi[3]"}
    # the meta-learner's gates set the step: --inner-lr is refused, not silently ignored
    assert main(["audit", f"{CORPUS}:meta_lstm", "--algorithm", "meta-lstm", *LEARNED, "--inner-lr", "0.1"]) == 2
    assert "--inner-lr does not apply to meta-lstm" in capsys.readouterr().err
