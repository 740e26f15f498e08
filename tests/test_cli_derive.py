"""``metaverify derive``: output formats, --list, and clear exit-2 errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import sympy as sp

from reference.symbolic import LIMITS, PROBLEMS, quadratic_maml
from verify.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["derive", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_latex_derivation_of_quadratic_maml(capsys):
    code, out, err = run(capsys, "quadratic-maml", "--dim", "1", "--steps", "2", "--format", "latex")
    assert code == 0 and err == ""
    assert out.startswith("\\begin{aligned}") and out.rstrip().endswith("\\end{aligned}")
    assert "p_{2}" in out and "\\nabla_{\\theta}" in out
    assert out.strip() == quadratic_maml(1, 2).latex()


def test_text_and_sympy_formats(capsys):
    code, out, _ = run(capsys, "quadratic-maml", "--steps", "2", "--format", "text")
    assert code == 0 and out.startswith("quadratic-maml (dim=1, steps=2") and "grad L" in out
    code, out, _ = run(capsys, "quadratic-maml", "--format", "sympy")
    assert code == 0
    namespace: dict = {}
    exec(out, namespace)  # noqa: S102 - the command's own output
    d = quadratic_maml(1, 1)
    sub = {namespace[n]: s for n, s in d.symbols.items()}
    assert sp.expand(namespace["meta_gradient"][0].xreplace(sub) - d.meta_gradient[0]) == 0


def test_options_reach_the_constructor(capsys):
    code, out, _ = run(capsys, "quadratic-maml", "--option", "first_order=true", "--format", "text")
    assert code == 0 and "FOMAML" in out
    code, out, _ = run(capsys, "r2d2-ridge", "--option", "regression=yes", "--option", "shots=3", "--format", "text")
    assert code == 0 and "shots=3" in out and "regression=True" in out


def test_list_names_every_problem_with_its_limits(capsys):
    code, out, _ = run(capsys, "--list")
    assert code == 0
    for name in PROBLEMS:
        assert name in out
    assert f"dim=1 (max {LIMITS['quadratic-maml']['dim']})" in out


@pytest.mark.parametrize("argv, message", [
    (["quadratic-mam"], "problem='quadratic-mam' is unknown (did you mean 'quadratic-maml'"),
    (["no-such-thing"], "is unknown. Known problems: quadratic-maml"),
    (["quadratic-maml", "--dim", "4"], "dim=4 is too large for quadratic-maml: the limit is dim <= 3"),
    (["quadratic-maml", "--steps", "50"], "steps=50 is too large for quadratic-maml: the limit is steps <= 5"),
    (["quadratic-maml", "--dim", "0"], "dim=0 must be >= 1"),
    (["quadratic-imaml", "--steps", "2"], "--steps=2 does not apply to quadratic-imaml"),
    (["quadratic-maml", "--option", "shots=2"], "not an argument of quadratic-maml"),
    (["quadratic-maml", "--option", "first_order"], "must look like KEY=VALUE"),
    (["quadratic-maml", "--option", "steps=1.5"], "must be an integer or true/false"),
    ([], "give a PROBLEM"),
])
def test_bad_input_exits_2_with_a_clear_message(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert message in err


def test_bad_format_is_an_argparse_error(capsys):
    # main() returns argparse's exit code instead of raising SystemExit
    assert main(["derive", "quadratic-maml", "--format", "pdf"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and "metaverify derive: error:" in err


def test_python_dash_m_verify_derive():
    proc = subprocess.run(
        [sys.executable, "-m", "verify", "derive", "quadratic-maml", "--dim", "1", "--steps", "2", "--format", "latex"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == quadratic_maml(1, 2).latex()
