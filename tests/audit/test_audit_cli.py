"""``metaverify audit``: exit codes 0/1/2, the report, --json (versioned schema) and --junit."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

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
