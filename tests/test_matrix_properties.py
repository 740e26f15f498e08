"""The check matrix never raises a false alarm: generated problems x every backend x dtype.

For each algorithm and backend, hypothesis draws whole problems with
:func:`verify.strategies.cases` (model sizes, activation, loss, bias, tasks,
shots, inner_lr, K, lam, head options, seeds) and every check of the matrix
(:func:`verify.matrix.check_case`: backend vs the NumPy reference, vs complex
step / Richardson, the Taylor rate, the Hessian-inverse identities) must pass
on the correct implementations, in float64 and float32 (a numpy cell checks
the reference itself). A failure prints the ``build_case(...)`` call that
rebuilds the problem, shrunk field by field.

Example counts per property depend on the hypothesis profile
(``HYPOTHESIS_PROFILE``); each torch/JAX example is two cases (float64 and
float32). iMAML and Newton-MAML examples cost 5-10x the others (inner
solves, dense Hessians, Richardson with re-solved inner problems), so they
get fewer:

=========  ===========  ===========  =========  ===================================
profile    numpy        torch        jax        cases over the 34 properties
           (other/i,N)  (other/i,N)  (other/i,N)
=========  ===========  ===========  =========  ===================================
ci         3 / 1        3 / 1        1 / 1      10*3+2 + (9*3+2)*2 + 11*2   = 112
dev        6 / 2        6 / 2        1 / 1      64 + 116 + 22               = 202
thorough   350 / 60     350 / 60     40 / 15    3,620 + 6,540 + 780         = 10,940
=========  ===========  ===========  =========  ===================================

JAX examples are fewer because every drawn shape is a new ``jax.jit``
compilation (~1.5 s each). Run the false-alarm hunt with::

    HYPOTHESIS_PROFILE=thorough python -m pytest tests/test_matrix_properties.py -n auto \\
        --hypothesis-show-statistics

With ``METAVERIFY_CASE_LOG=DIR`` every passed case appends a line
``algorithm backend dtype`` to a file in ``DIR`` (so a long hunt cut short
still says how many cases passed).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings

from verify.algorithms import ALGORITHMS, case_algorithms
from verify.backends import is_available, load_backend
from verify.matrix import ReferenceData, check_case
from verify.strategies import cases

#: profile -> backend -> (examples for most algorithms, examples for iMAML and Newton-MAML)
EXAMPLES = {
    "ci": {"numpy": (3, 1), "torch": (3, 1), "jax": (1, 1)},
    "dev": {"numpy": (6, 2), "torch": (6, 2), "jax": (1, 1)},
    "thorough": {"numpy": (350, 60), "torch": (350, 60), "jax": (40, 15)},
}
EXPENSIVE = ("imaml", "newton")


def _examples(algorithm: str, backend: str) -> int:
    counts = EXAMPLES.get(os.environ.get("HYPOTHESIS_PROFILE", "dev"), EXAMPLES["dev"])[backend]
    return counts[1] if algorithm in EXPENSIVE else counts[0]


def _cells() -> list:
    out = []
    for backend in ("numpy", "torch", "jax"):
        for algorithm in case_algorithms():
            if algorithm == "mlp" and backend != "numpy":
                continue
            marks = [pytest.mark.torch] if backend == "torch" else [pytest.mark.jax] if backend == "jax" else []
            if backend == "jax" and not ALGORITHMS[algorithm].default:
                # an opt-in row (Algorithm.default False: its cells lengthen the matrix): its torch and
                # reference cells stay in CI, the JAX ones run with the slow tests.
                marks.append(pytest.mark.slow)
            out.append(pytest.param(algorithm, backend, marks=marks, id=f"{algorithm}-{backend}"))
    # the slowest properties first, so that `pytest -n N` starts them early
    weight = {"numpy": 1, "jax": 2, "torch": 3}
    return sorted(out, key=lambda p: (p.values[0] not in EXPENSIVE, -weight[p.values[1]]))


def _log(algorithm: str, backend: str, dtypes: tuple[str, ...]) -> None:
    """With ``METAVERIFY_CASE_LOG=DIR``, one line per passed case (per process: safe under xdist) for counting."""
    folder = os.environ.get("METAVERIFY_CASE_LOG")
    if folder:
        with open(os.path.join(folder, f"cases-{os.getpid()}.txt"), "a") as fh:
            fh.writelines(f"{algorithm} {backend} {dtype}\n" for dtype in dtypes)


def _failure_report(case, results) -> str:
    lines = [repr(case)]
    for dtype, r in results:
        for c in r.checks:
            if c["status"] != "pass":
                lines.append(f"  [{dtype}] {c['check']}: {c['status']} error={c['error']:.3e} "
                             f"tol={c['tolerance']:.3e}: {c['detail'].splitlines()[0]}")
    return "\n".join(lines)


@pytest.mark.parametrize(("algorithm", "backend"), _cells())
def test_correct_implementations_never_fail(algorithm: str, backend: str) -> None:
    if not is_available(backend):
        pytest.skip(f"backend {backend} is not installed")
    module = None if backend == "numpy" else load_backend(backend)
    dtypes = ("float64",) if backend == "numpy" else ("float64", "float32")

    @settings(max_examples=_examples(algorithm, backend))
    @given(case=cases(algorithm))
    def prop(case) -> None:
        ref = ReferenceData(case)
        results = [(dtype, check_case(case, backend, dtype, module=module, ref=ref)) for dtype in dtypes]
        assert all(r.status == "pass" for _, r in results), _failure_report(case, results)
        _log(algorithm, backend, dtypes)

    prop()
