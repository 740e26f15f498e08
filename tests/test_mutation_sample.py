"""CI's mutation sample (issue 19): fixed, realistic planted bugs that the suite must kill, on every change.

Each entry rewrites one line of the reference or the engine in a temporary copy
of the project and runs the tests that must catch it there; the entry fails
when they pass (the mutant survived: a test that guarded it was weakened or
removed). The unmutated copy runs the same tests first, so a kill is due to the
mutation and not to a broken copy. The full, sharded run is
``bash scripts/mutation.sh`` (reports/mutation/README.md).

The rewrites are exact strings: when the code they target changes, the entry
fails with "not found" and must be updated (never deleted to make CI green).
Cost: 1 + len(MUTANTS) pytest processes, ~40-50 s on one core.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: (id, file, original text (must occur exactly once), mutated text, tests that must fail)
MUTANTS: list[tuple[str, str, str, str, list[str]]] = [
    ("richardson-second-level-for-t2", "verify/_numdiff.py",
     "r2 = (16.0 * r1[:-1] - r1[1:]) / 15.0", "r2 = (8.0 * r1[:-1] - r1[1:]) / 7.0",
     ["tests/test_engine_properties.py::test_richardson_error_is_sixth_order_at_fixed_steps"]),
    ("gradient-tolerance-1000x-looser", "verify/tolerance.py",
     '"gradient": eps ** (2.0 / 3.0),', '"gradient": 1000.0 * eps ** (2.0 / 3.0),',
     ["tests/test_engine_properties.py::test_gradient_tolerance_edge"]),
    ("taylor-backward-remainder-sign", "verify/_taylor.py",
     "rm = fm - p.f0 + h * gv - 0.5 * h * h * hv", "rm = fm - p.f0 - h * gv - 0.5 * h * h * hv",
     ["tests/test_engine_taylor.py::test_rates"]),
    ("dot-test-sum-for-difference", "verify/_dottest.py",
     "diff = abs(a - b)", "diff = abs(a + b)",
     ["tests/test_engine_dottest.py::test_transpose_pair_passes"]),
    ("solve-residual-sign", "verify/hessian_inverse.py",
     "r = np.linalg.norm(b64 - Ax)", "r = np.linalg.norm(b64 + Ax)",
     ["tests/test_hessian_inverse.py::test_lapack_solutions_pass_whatever_the_condition_number"]),
    ("fast-direction-sign-rule", "verify/_check.py",
     "r = dirs[0] if float(np.dot(dirs[0], ghat)) >= 0 else -dirs[0]",
     "r = dirs[0] if float(np.dot(dirs[0], ghat)) >= 0 else dirs[0]",
     ["tests/test_engine_properties.py::test_fast_complex_estimate_value"]),
    ("r2d2-query-cotangent-without-scale", "reference/r2d2.py",
     "U_q, V_q = scale * G_O, W", "U_q, V_q = G_O, W",
     ["tests/test_ref_r2d2_independent.py::test_meta_gradient_equals_complex_step_of_independent_head"]),
    ("cross-entropy-gradient-unscaled", "reference/models.py",
     "return (self.s - self.onehot) * self.scale", "return self.s - self.onehot",
     ["tests/test_models.py::test_grad_matches_complex_step"]),
    # the families added by issues 14-17 (backbones, meta-RL, inner optimisers)
    ("batchnorm-train-backward-without-projection", "reference/nets/layers/norm.py",
     "gx = inv * (ghat - ghat.mean(axis=axes) - xhat * (ghat * xhat).mean(axis=axes))",
     "gx = inv * (ghat - ghat.mean(axis=axes))",
     ["tests/test_nets_layers.py::test_grad_and_hvp_match_complex_step[conv-bn-pools-tanh]"]),
    ("adam-vjp-second-moment-factor", "reference/optimizers.py",
     "bar_gp = (1.0 - self.b1) * bar_m + 2.0 * (1.0 - self.b2) * gp * bar_v",
     "bar_gp = (1.0 - self.b1) * bar_m + (1.0 - self.b2) * gp * bar_v",
     ["tests/test_ref_inner_optim.py::test_theta_and_lr_gradients_match_complex_step[3-adam]"]),
    ("dice-hessian-without-causal-sum", "reference/rl/estimators.py",
     "cum = np.cumsum(st, axis=-2)  # S_{<=t}", "cum = st  # S_{<=t}",
     ["tests/test_rl_estimators.py::test_bias_orders_in_alpha"]),
]

_COPY = ["verify", "reference", "tests", "pyproject.toml"]


@pytest.fixture(scope="module")
def project_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("mutation-sample")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis")
    for name in _COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=ignore)
        else:
            shutil.copy2(src, work / name)
    return work


def _pytest(work: Path, nodes: list[str]) -> subprocess.CompletedProcess:
    # PYTHONPATH: the copy's verify/reference shadow the installed ones. -x: one failure kills.
    env = dict(os.environ, HYPOTHESIS_PROFILE="ci", PYTHONPATH=str(work), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *nodes],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)


def test_unmutated_copy_passes_the_sample_tests(project_copy: Path) -> None:
    nodes = sorted({n for *_, tests in MUTANTS for n in tests})
    proc = _pytest(project_copy, nodes)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


@pytest.mark.parametrize(("name", "path", "old", "new", "tests"), MUTANTS, ids=[m[0] for m in MUTANTS])
def test_sampled_mutant_is_killed(project_copy: Path, name: str, path: str, old: str, new: str,
                                  tests: list[str]) -> None:
    target = project_copy / path
    source = target.read_text(encoding="utf-8")
    assert source.count(old) == 1, (
        f"mutant {name!r}: {old!r} occurs {source.count(old)} times in {path}; update the sample to the "
        "current code (keep a mutant of the same kind)")
    target.write_text(source.replace(old, new), encoding="utf-8")
    try:
        proc = _pytest(project_copy, tests)
    finally:
        target.write_text(source, encoding="utf-8")
    assert proc.returncode == 1, (
        f"mutant {name!r} ({path}: {old!r} -> {new!r}) SURVIVED {tests} (pytest exit {proc.returncode}):\n"
        + proc.stdout[-2000:] + proc.stderr[-1000:])
