"""Every bad input of the CLI is a clear error before any work: exit code 2, no traceback, one line
``metaverify SUBCOMMAND: error: ...`` naming the value and the fix (issue 15, item 7).

One table row per kind of bad input; the rows that need a subprocess (a backend that fails to
import, a closed pipe) and the behaviours that are not errors (prints shown once, the umask's file
mode) follow the table.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from verify.cli import main

ROOT = Path(__file__).resolve().parents[1]
CORPUS = str(ROOT / "tests" / "audit" / "corpus_torch.py")
SMALL = ["--model", "mlp:2-3-1:tanh", "--tasks", "2", "--shots", "3", "--queries", "2", "--inner-steps", "1",
         "--inner-lr", "0.2", "--directions", "1"]


@pytest.fixture()
def sentinel_target(tmp_path: Path) -> tuple[str, Path]:
    """A target file whose import leaves a marker: proof that an error came before any work."""
    marker = tmp_path / "imported"
    src = tmp_path / "target.py"
    src.write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('x')\n\n"
                   "def maml(model, tasks, inner_lr, inner_steps):\n    raise AssertionError('must not run')\n")
    return f"{src}:maml", marker


def _a_file(tmp_path: Path) -> Path:
    f = tmp_path / "a_file"
    f.write_text("")
    return f


# (id, argv builder (tmp_path, target) -> argv, fragment of the error line)
ROWS = [
    ("audit-negative-seed", lambda t, tg: ["audit", tg, "--algorithm", "maml", "--seed", "-1"],
     "argument --seed: -1 is negative; give a seed >= 0"),
    ("check-negative-seed", lambda t, tg: ["check", "--seed", "-1"], "argument --seed: -1 is negative"),
    ("report-negative-seed", lambda t, tg: ["report", "--seed", "-1"], "argument --seed: -1 is negative"),
    ("audit-zero-shots", lambda t, tg: ["audit", tg, "--algorithm", "maml", "--shots", "0"],
     "argument --shots: 0 must be >= 1"),
    ("audit-json-below-a-file", lambda t, tg: ["audit", tg, "--algorithm", "maml",
                                               "--json", str(_a_file(t) / "r.json")], "is a file, not a folder"),
    ("audit-junit-is-a-folder", lambda t, tg: ["audit", tg, "--algorithm", "maml", "--junit", str(t)],
     "is a directory; give a file path"),
    ("check-json-below-a-file", lambda t, tg: ["check", "--backend", "numpy", "--algorithm", "mlp",
                                               "--json", str(_a_file(t) / "x" / "r.json")], "is a file, not a folder"),
    ("check-junit-is-a-folder", lambda t, tg: ["check", "--backend", "numpy", "--junit", str(t)],
     "is a directory"),
    ("report-out-below-a-file", lambda t, tg: ["report", "--quick", "--backend", "numpy",
                                               "--out", str(_a_file(t) / "rep")], "cannot create its parent folder"),
    ("audit-shots-do-not-fit", lambda t, tg: ["audit", tg, "--algorithm", "maml", "--shots", "1000000000"],
     "of memory (activations"),
    ("audit-tasks-do-not-fit", lambda t, tg: ["audit", tg, "--algorithm", "maml", "--tasks", "1000000000"],
     "of memory (activations"),
    ("audit-model-does-not-fit", lambda t, tg: ["audit", tg, "--algorithm", "maml",
                                                "--model", "mlp:1-100000-100000-1"], "of memory (parameters"),
    ("report-audit-options-do-not-fit", lambda t, tg: ["report", "--quick", "--backend", "numpy", "--out",
                                                       str(t / "rep"), "--algorithm", "maml", "--audit", tg,
                                                       "--audit-option", "shots=1000000000"], "of memory"),
    ("report-audit-missing-file", lambda t, tg: ["report", "--quick", "--backend", "numpy", "--out", str(t / "rep"),
                                                 "--algorithm", "maml", "--audit", "missing.py:f"],
     "file 'missing.py' does not exist"),
    ("audit-option-not-of-the-algorithm", lambda t, tg: ["audit", tg, "--algorithm", "maml", "--lam", "1"],
     "--lam does not apply to maml; its problem options are --inner-lr"),
    ("audit-loss-of-a-backbone", lambda t, tg: ["audit", tg, "--algorithm", "r2d2", "--loss", "mse"],
     "--loss does not apply to r2d2"),
    ("report-audit-option-not-of-the-algorithm", lambda t, tg: ["report", "--quick", "--backend", "numpy", "--out",
                                                                str(t / "rep"), "--algorithm", "maml", "--audit", tg,
                                                                "--audit-option", "lam=2"],
     "--audit-option lam does not apply to maml"),
    ("check-empty-selection-dtype", lambda t, tg: ["check", "--backend", "numpy", "--dtype", "float32"],
     "the numpy reference is float64 only"),
    ("check-empty-selection-mlp", lambda t, tg: ["check", "--backend", "numpy", "--algorithm", "mlp",
                                                 "--shard", "2/2"], "--shard 2/2 is empty"),
    ("check-empty-selection-backend", lambda t, tg: ["check", "--algorithm", "mlp", "--backend", "torch"],
     "runs on the numpy backend only"),
]


@pytest.mark.parametrize("make_argv, fragment", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_one_clear_line_before_any_work(make_argv, fragment, tmp_path, sentinel_target, capsys):
    target, marker = sentinel_target
    argv = make_argv(tmp_path, target)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors (types, choices) exit from the parser
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2, err
    assert "Traceback" not in err and out == ""
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"metaverify {argv[0]}: error: "), err
    assert fragment in last, err
    assert not marker.exists(), "the target was imported before the error"
    assert not (tmp_path / "rep").exists()


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "verify", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_backend_installed_but_failing_to_import(tmp_path):
    fake = tmp_path / "jax"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('libjax.so: cannot open shared object file')\n")
    r = _run(["check", "--backend", "jax", "--algorithm", "maml"], {"PYTHONPATH": f"{tmp_path}:{ROOT}"})
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("metaverify check: error: backend='jax': jax is installed but importing it failed: "
                           "ImportError: libjax.so"), r.stderr


def test_closed_pipe_is_quiet():
    # `metaverify check | head`: the reader is gone before the table is printed.
    p = subprocess.Popen([sys.executable, "-m", "verify", "check", "--backend", "numpy", "--algorithm", "mlp"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()
    err = p.stderr.read()
    p.stderr.close()
    assert p.wait(timeout=300) == 141
    assert err == ""


def test_user_prints_shown_once(tmp_path, capsys):
    pytest.importorskip("torch")
    src = tmp_path / "chatty.py"
    src.write_text(f"import sys\nsys.path.insert(0, {str(Path(CORPUS).parent)!r})\nimport corpus_torch as C\n\n"
                   "def maml(model, tasks, inner_lr, inner_steps):\n"
                   "    print('epoch 1: loss ...')\n"
                   "    return C.maml(model, tasks, inner_lr, inner_steps)\n")
    code = main(["audit", f"{src}:maml", "--algorithm", "maml", *SMALL, "--thorough"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count("epoch 1: loss ...") == 1
    assert "shown for its first call only" in out


def test_output_files_get_the_umask_mode(tmp_path, capsys):
    old = os.umask(0o027)
    try:
        code = main(["check", "--backend", "numpy", "--algorithm", "mlp", "--json", str(tmp_path / "r.json"),
                     "--junit", str(tmp_path / "r.xml")])
    finally:
        os.umask(old)
    assert code == 0, capsys.readouterr().out
    for name in ("r.json", "r.xml"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640


PRECISION = str(ROOT / "tests" / "audit" / "corpus_precision.py")

# Bad input found once the audited function runs (or the reference does): still one clear line, exit 2.
RUN_ROWS = [
    ("audit-function-returns-none", ["audit", f"{PRECISION}:maml_returns_none", "--algorithm", "maml", *SMALL],
     "the audited function returned None; return the meta-loss"),
    ("audit-reference-overflows", ["audit", f"{CORPUS}:maml", "--algorithm", "maml", *SMALL[:-4], "--inner-lr",
                                   "1e200", "--directions", "1"], "not a fault of the audited function"),
]


@pytest.mark.parametrize("argv, fragment", [r[1:] for r in RUN_ROWS], ids=[r[0] for r in RUN_ROWS])
def test_bad_input_found_while_running_is_one_clear_line(argv, fragment, capsys):
    pytest.importorskip("torch")
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, out + err
    assert "Traceback" not in err and out == ""
    last = err.strip().splitlines()[-1]
    assert last.startswith("metaverify audit: error: ") and fragment in last, err
