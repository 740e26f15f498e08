"""Smoke test of the benchmarks: ``python benchmarks/run.py --quick`` runs every benchmark end to end.

No timing assertions (the machines are shared and noisy). What is asserted is
what a quick run can establish independently of speed:

* every page, plot and the JSON are written;
* the implementations that are timed agree with the reference (PyTorch
  autograd vs the analytic NumPy meta-gradients, to 1e-10 relative);
* every verification tool passes the correct implementations (no false alarm
  at the tiny quick sizes) and metaverify's tools flag a 1e-2 injected error
  of every kind, the audit naming the FOMAML substitution;
* the estimators meet the issue's accuracy goals at the automatic step
  (complex step <= 1e-13, Richardson <= 1e-10 relative, float64; the exact
  value comes from mpmath at 40 digits).

The run happens in a subprocess (its own thread settings, no
warnings-as-errors from this test session leaking into torch/JAX/matplotlib)
with a generous hang guard; the quick run takes well under a minute on an
idle 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("jax")
pytest.importorskip("matplotlib")
pytest.importorskip("mpmath")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ("1-speed", "2-verification-cost", "3-sensitivity", "4-fd-accuracy", "5-scale")
PLOTS = ("speed.png", "verification_cost.png", "sensitivity.png", "fd_accuracy.png", "scale.png")


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("bench"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick", "--out", out],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"run.py --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    with open(os.path.join(out, "results.json")) as fh:
        return out, json.load(fh)


def test_every_page_plot_and_json_is_written(quick_run: tuple[str, dict]) -> None:
    out, results = quick_run
    for name in PAGES:
        text = _read(os.path.join(out, f"{name}.md"))
        assert "| ---" in text or "| :---" in text, f"{name}.md has no table"
    for name in PLOTS:
        with open(os.path.join(out, name), "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n", f"{name} is not a PNG"
    readme = _read(os.path.join(out, "README.md"))
    assert "quick" in readme and "## Machine and libraries" in readme and "load" in readme
    assert set(results["benchmarks"]) == set(PAGES)
    for key in ("numpy", "torch", "jax", "cpu_count", "load_average"):
        assert key in results["environment"]


def test_timed_implementations_agree_with_the_reference(quick_run: tuple[str, dict]) -> None:
    speed = quick_run[1]["benchmarks"]["1-speed"]["data"]
    for algo in ("maml", "imaml", "r2d2"):
        for row in speed[algo]:
            for impl, diff in row["max_rel_diff"].items():
                # Same mathematics, different operation order (and an iterative solve for iMAML, which
                # each side runs to near machine precision): far below 1e-10, far above a wrong formula.
                assert diff < 1e-10, f"{algo} {row['model']} {impl} differs from the reference by {diff:.1e}"
    # The other per-task algorithms: the reference at default threads and pinned to one thread gives the same
    # numbers bit for bit (tasks reduced in order, blocks fixed); with its thread policy off, round-off only.
    assert {r["algorithm"] for r in speed["other"]} == {"ProtoNets", "Matching nets", "LR-D2", "Newton-MAML",
                                                        "gradient flow", "Reptile"}
    for row in speed["other"]:
        assert row["identical"], f"{row['algorithm']}: the thread settings changed the numbers"
        assert row["policy_off_rel_diff"] < 1e-12, row


def test_every_tool_passes_the_correct_implementations(quick_run: tuple[str, dict]) -> None:
    cost = quick_run[1]["benchmarks"]["2-verification-cost"]["data"]
    for row in cost["rows"]:
        assert row["statuses"], row
        for check, status in row["statuses"].items():
            assert status == "pass", f"{check} flagged the correct implementation at {row['model']}: {status}"
    sens = quick_run[1]["benchmarks"]["3-sensitivity"]["data"]["tools"]
    for name, d in sens.items():
        assert d["false_alarms"]["hits"] == 0, f"{name} raised a false alarm"


def test_metaverify_flags_every_injected_error_and_names_fomaml(quick_run: tuple[str, dict]) -> None:
    sens = quick_run[1]["benchmarks"]["3-sensitivity"]["data"]["tools"]
    for name in ("verify.check_gradient", "verify.audit"):
        for kind, seeds in sens[name]["kinds"].items():
            for r in seeds:
                assert r["threshold"] is not None, f"{name} missed a 1e-2 {kind} error (seed {r['seed']})"
    fomaml = sens["verify.audit"]["kinds"]["fomaml"]
    assert all(r["note"] == "named: first_order" for r in fomaml), fomaml
    scale = sens["verify.audit"]["kinds"]["scale"]
    assert all(r["note"] == "located: W2" for r in scale), scale


def test_estimators_meet_the_accuracy_goals(quick_run: tuple[str, dict]) -> None:
    auto = quick_run[1]["benchmarks"]["4-fd-accuracy"]["data"]["auto"]
    assert max(a["true"] for a in auto["complex/float64"]) <= 1e-13
    assert max(a["true"] for a in auto["richardson/float64"]) <= 1e-10
    for key, rows in auto.items():
        for a in rows:
            assert a["true"] <= a["reported"], f"{key}: true error {a['true']:.1e} above the reported bound"
