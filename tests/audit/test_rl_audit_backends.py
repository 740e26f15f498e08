"""The MAML-RL audit of PyTorch and JAX surrogate losses (corpora corpus_rl_torch.py / corpus_rl_jax.py).

Bar (issue 16): the audit names a planted "no inner score term" estimator and
passes a correct DiCE implementation, in torch and JAX, in under a minute each
on 2 cores. Those four run in CI; the rest of the corpus is marked slow.
"""

from __future__ import annotations

import importlib
import time

import pytest

from reference.errors import InvalidInputError
from verify.rl_audit import audit_function, default_problem

BAR_SECONDS = 60.0


def corpus(backend: str):
    pytest.importorskip(backend)
    return importlib.import_module(f"corpus_rl_{backend}").CORPUS


def _check(backend: str, name: str) -> float:
    fn, expected = corpus(backend)[name]
    t0 = time.perf_counter()
    res = audit_function(fn, backend)
    seconds = time.perf_counter() - t0
    if expected is None:
        assert res.passed and res.mode == "exact" and res.relative_error < 1e-12, res.report()
    elif expected == "unexplained":
        assert not res.passed and res.matches == [], res.report()
    else:
        assert not res.passed and res.matches[0] == expected, res.report()
    return seconds


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("name", ["dice", "no-inner-score"])
def test_bar_cases_within_a_minute(backend, name):
    assert _check(backend, name) < BAR_SECONDS


TORCH_REST = ["dice-loss-and-grads", "emaml-mean", "lr-twice-averaged", "undiscounted-inner", "reversed-box",
              "batch-mean-baseline", "sign-flipped", "lvc", "squared-rewards"]


@pytest.mark.slow
@pytest.mark.parametrize("backend,name", [("torch", n) for n in TORCH_REST]
                         + [("jax", "dice-loss-and-grads"), ("jax", "emaml-mean")])
def test_rest_of_the_corpus(backend, name):
    _check(backend, name)


@pytest.mark.slow  # ~7 s: eager JAX re-traces jax.grad on every call
def test_jax_function_that_cannot_be_traced_runs_eagerly():
    pytest.importorskip("jax")
    from corpus_rl_jax import maml_rl_eager_only

    from verify.backends.jax.rl_harness import gradient_callable
    from verify.rl_audit import audit_maml_rl

    problem = default_problem(0, horizon=1, batch_size=1)  # 4 pairs: eager JAX costs ~0.3 s per call
    grad_fn = gradient_callable(maml_rl_eager_only)
    res = audit_maml_rl(grad_fn, problem=problem, backend="jax")
    assert res.passed and grad_fn.mode == "eager", res.report()


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_user_errors_are_reported_with_the_traceback(backend):
    mod = pytest.importorskip(backend)
    del mod

    def broken(params, inner, outer, alpha, gamma):
        raise KeyError("advantages")

    with pytest.raises(InvalidInputError, match=r"raised KeyError: 'advantages'(.|\n)*Traceback"):
        audit_function(broken, backend, problem=default_problem(0, horizon=1, batch_size=1))


def test_torch_loss_must_depend_on_params():
    torch = pytest.importorskip("torch")

    def constant(params, inner, outer, alpha, gamma):
        return torch.tensor(1.0, dtype=torch.float64)

    with pytest.raises(InvalidInputError, match="does not depend on params"):
        audit_function(constant, "torch", problem=default_problem(0, horizon=1, batch_size=1))


def test_unknown_backend():
    with pytest.raises(InvalidInputError, match="backend='tf' must be 'torch' or 'jax'"):
        audit_function(lambda *a: 0, "tf")


@pytest.mark.slow  # ~14 s on a loaded machine: a fresh interpreter importing torch; the dispatch itself is fast
def test_cli_audits_a_file_target(tmp_path):
    """``python -m verify audit FILE.py:fn --algorithm maml-rl``: dispatch from the row, exit code, report, JSON."""
    pytest.importorskip("torch")
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    corpus_file = Path(__file__).with_name("corpus_rl_torch.py")
    out = tmp_path / "verdict.json"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "verify", "audit", f"{corpus_file}:maml_rl_no_inner_score",
                           "--algorithm", "maml-rl", "--json", str(out)], cwd=root, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "matches the catalogue entry 'maml-original'" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["audit"]["status"] == "fail" and doc["audit"]["matches"][0] == "maml-original"
    assert doc["audit"]["backend"] == "torch"


def test_the_row_refuses_the_case_machinery():
    from verify.algorithms import ALGORITHMS, auditable, build_case, case_algorithms
    from verify.auditing import audit

    assert "maml-rl" in auditable() and "maml-rl" not in case_algorithms()
    assert ALGORITHMS["maml-rl"].audit == "verify.rl_audit:audit_function"
    with pytest.raises(InvalidInputError, match="has no Case"):
        build_case("maml-rl")
    with pytest.raises(InvalidInputError, match="has an audit of its own"):
        audit(lambda *a: 0, "maml-rl", "torch")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_monte_carlo_mode_with_a_framework(backend):
    fns = corpus(backend)
    ok = audit_function(fns["dice"][0], backend, max_pairs=100, samples=2000, seed=1)
    bad = audit_function(fns["no-inner-score"][0], backend, max_pairs=100, samples=2000, seed=1)
    assert ok.mode == "monte-carlo" and ok.passed, ok.report()
    assert bad.mode == "monte-carlo" and not bad.passed and "maml-original" in bad.matches, bad.report()
