"""JAX's float32 check-matrix cells of ``maml-adam`` / ``anil-adam`` on the hardest seeds (issue #17).

The seeds whose torch float32 error was largest (5, 14: a first-step support gradient of 2e-6 / 1.2e-4) or
that failed before the fix of the torch backend's bias corrections (29, 34); JAX computes ``1 - b^t`` from
Python floats, so it never had that defect. ``slow``: JAX's optimiser loop runs eagerly (10-50 s a cell).
"""

from __future__ import annotations

import pytest

pytest.importorskip("jax")

from verify.algorithms import build_case  # noqa: E402
from verify.backends import load_backend  # noqa: E402
from verify.matrix import check_case  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("row", ["maml-adam", "anil-adam"])
@pytest.mark.parametrize("seed", [5, 14, 29, 34])
def test_jax_float32_adam_cell_passes(row, seed):
    result = check_case(build_case(row, seed=seed), "jax", "float32", module=load_backend("jax"))
    assert result.status == "pass", [(c["check"], c["error"], c["tolerance"]) for c in result.checks]
    c = next(c for c in result.checks if c["check"] == "meta-gradient vs reference")
    assert c["error"] < c["tolerance"] / 2
