"""The pytest plugin ``verify.testing``: assert_meta_gradient, the fixture, and a clean import."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_plugin_import_loads_no_framework():
    code = "import sys, verify.testing; assert 'torch' not in sys.modules and 'jax' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)


def test_assert_meta_gradient():
    pytest.importorskip("torch")
    import corpus_torch as C
    from _configs import GRAD

    from verify.testing import MetaGradientAssertionError, assert_meta_gradient

    results = assert_meta_gradient(C.maml, "maml", seeds=(0,), backend="torch", directions=0, **GRAD)
    assert results[0].passed
    with pytest.raises(MetaGradientAssertionError) as info:
        assert_meta_gradient(C.maml_first_order, "maml", seeds=(0, 1), directions=0, **GRAD)
    text = str(info.value)
    assert text.startswith("2 of 2 audit(s) of maml_first_order as maml failed")
    assert "diagnosis: first-order only" in text and isinstance(info.value, AssertionError)


def test_fixture_in_a_pytest_session(tmp_path):
    pytest.importorskip("torch")
    test_file = tmp_path / "test_user_maml.py"
    test_file.write_text(textwrap.dedent('''
        import corpus_torch as C

        PROBLEM = dict(model="mlp:2-3-1:tanh", n_tasks=1, shots=3, queries=2, inner_steps=1, inner_lr=0.2,
                       directions=0)

        def test_good(assert_meta_gradient):
            assert_meta_gradient(C.maml, algorithm="maml", **PROBLEM)

        def test_bad(assert_meta_gradient):
            assert_meta_gradient(C.maml_first_order, algorithm="maml", **PROBLEM)
    '''))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent)])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:metaverify", "-p", "verify.testing",
                           "-p", "no:cacheprovider", "-q", str(test_file)], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert "1 failed, 1 passed" in proc.stdout, proc.stdout + proc.stderr
    assert "first-order only" in proc.stdout
