"""Mutation testing of metaverify's reference and engine (issue 19): does the suite catch a planted bug?

Usage (through ``bash scripts/mutation.sh``)::

    python scripts/mutation.py coverage [-n 2]      # once: which test runs which line (.mutation/)
    python scripts/mutation.py coverage --update     # merge in only the test files changed since
    python scripts/mutation.py run [PATHS ...] [--shard I/N] [--budget S] [--timeout-factor F] [--max N]
    python scripts/mutation.py run --complete-partial [--budget S] [PATHS ...]   # budgeted survivors again
    python scripts/mutation.py report
    python scripts/mutation.py rekey MODULE --from REV   # equivalents' keys after MODULE was edited
    python scripts/mutation.py list [PATHS ...]
    python scripts/mutation.py selftest [--mutator]

Each mutant is one small syntactic change of one module (``+`` -> ``-``, ``<`` ->
``<=``, a number ``c`` -> ``c +- 1``, a negated condition, a loop run zero times,
...). A failing test *kills* the mutant, a passing run lets it *survive*. A
survivor is either a gap in the tests or an *equivalent* mutant (same behaviour,
e.g. a changed tie-break that no input reaches); equivalents are listed with a
one-line argument in ``reports/mutation/equivalent.toml`` and excluded from the
kill rate.

Which tests (``coverage``, then ``Runner.plan``). The not-slow suite runs once
under coverage with per-test contexts (pytest-cov ``--cov-context=test``; xdist
allowed for that one run); ``.mutation/coverage-map.json`` maps every line of
``reference/`` and ``verify/`` to the node ids that executed it, with each test's
duration and outcome (junit), keyed by a hash of the tree: a stale map is said
so, and a module whose source changed since falls back to its mapped test files
(:data:`TESTS`). A mutant runs the tests covering its statement; a default
argument, the tests covering the function's body; a module-level statement, the
tests covering the lines that read the names it binds (plus the mapped test
files when a name is public). Threads are traced (coverage's default thread
concurrency: the reference's task thread pool is attributed to the test that
started it). Subprocesses are measured without a test context: a line run only
there (or only at import) runs the module's mapped test files. A line no test
executes is recorded as *survived, no covering test* without running anything:
a gap, never a kill. Tests that failed or were skipped in the coverage run are
never selected. Order: tests that already killed mutants of the same function,
then of the module, then the fastest; ``pytest -x`` semantics (stop at the first
failure). ``--budget S`` (default 10) runs, in that order, each covering test
whose baseline duration still fits in S seconds (a slow one is skipped, not the
end of the list; at least one runs); a survivor that did not run them
all is marked ``partial`` in its record and in the report (it survived the tests
that ran; more may kill it). ``--complete-partial`` re-runs only those, with
every covering test, or in stages with a larger explicit ``--budget``.

How a mutant is applied. The parent imports numpy/scipy/sympy/torch/jax, forks
a *fresh-import server* (nothing of the project imported), then starts one
pytest session on a scratch copy of the project (``.mutation/work-*``), collects
every not-slow test once and, instead of running them, forks a child per mutant:

* *fast* path: the child swaps the mutated function's code into the live
  function objects (``func.__code__``; staticmethod/classmethod/property/
  ``__wrapped__`` unwrapped; ``__defaults__``/``__kwdefaults__`` re-evaluated for
  a mutant in a signature), so every reference to the function sees the mutant,
  and runs the selected items through ``pytest_runtest_protocol`` (fixtures,
  warnings as errors, hypothesis as in a normal run). A module-level constant
  (``NAME = expr``) is re-run in the live module (and rebound where it was
  imported), when no module-level code reads the name and no function reading it
  ran in the parent.
* *fresh* path: the mutant is written into a second scratch copy and a child of
  the fresh-import server runs pytest there, importing the project anew. Used for
  whatever the swap cannot reach honestly: other module-level code, class bodies,
  decorators; functions that ran while the parent imported the project or
  collected the tests (a profiler records them: results computed then, e.g. a
  parametrisation built from the reference, would hold the unmutated value); for
  a function only some test files ran at collection, those files' tests; test
  files the session does not collect (:data:`SESSION_IGNORE`).

``selftest`` checks the fast path is as real as a fresh import: known mutants
(the Richardson ``(16 r1 - r1') / 15`` constant, a no-op counter start, a module
constant, ...) run by both paths with the expected, identical outcomes;
``--mutator`` also checks the one-parse mutator reproduces Cosmic Ray's text.

Kills and timeouts are checked. The first failing test is recorded; the first
time a test kills, it runs once unmutated in the same path: if it fails there
too, it is excluded everywhere and the mutant re-run without it. Timeout per
mutant = max(30 s, factor x the selected tests' baseline durations) (+30 s on the
fresh path: it imports and collects); a timeout counts as killed (``timeout``)
only when the same tests pass unmutated well inside it (under half), else it is
``timeout-inconclusive`` (not counted either way). A test process that dies of a
crash signal (SIGSEGV, SIGBUS, SIGABRT, SIGFPE, SIGILL: e.g. a mutated ctypes
call that reads outside an array) counts as killed (``crashed``) when the same
tests pass unmutated on that path; a run that ends without a result otherwise is
an error (undecided).

Tool: the mutation operators and the source rewriting are Cosmic Ray's
(``cosmic-ray`` 8.x on PyPI, maintained, parso-based so formatting and comments
survive; Bingham & contributors). Its own runner (``cosmic-ray exec``) is not used:

* it mutates the module *in place* in the working tree and restores it after the
  test run; in a worktree shared with an editor, other test runs and concurrent
  workers a killed or interrupted run leaves a mutant on disk, and every other
  process importing the package meanwhile sees it. Here each shard copies the
  project to ``.mutation/work-<shard>/`` and mutates only the copy;
* one test command per session, while each module needs its own tests (running
  the whole suite per mutant is hours per module on 2 cores);
* sessions are keyed by random job ids, so a re-initialised session cannot
  resume. Here a mutant's key is ``operator#occurrence`` under the SHA-256 of the
  module: results are reused while the module is unchanged, and a survivor is
  re-run when the module's test files changed (a new test may kill it).

mutmut 3 was the alternative: it mutates only inside functions (the module-level
constants that carry the numerics here -- the tolerance table's entries via
``_row`` are inside a function, but ``SAFETY_FACTOR``, ``_ROMBERG_W``,
``COMPLEX_STEP`` are not -- would never be mutated), and its first phase runs the
whole test suite to map tests to functions.

The bare ``*`` of a signature (keyword-only marker), which Cosmic Ray's
``Mul -> Div`` turns into ``/``, is skipped: it is no multiplication.

Operators (a subset of Cosmic Ray's 213, the ones that model numerical
mistakes; the full cross product ``+`` -> ``%``, ``<<``, ``^`` ... mostly produces
crashes and costs 5x the time): arithmetic ``+ <-> -``, ``* <-> /``, ``** -> *``;
comparisons at the boundary and negated (``< <-> <=``, ``> <-> >=``, ``== <-> !=``,
``is <-> is not``); unary minus dropped; ``not`` dropped; ``and <-> or``;
``True <-> False``; a condition negated; a number ``c`` -> ``c + 1`` and ``c - 1``;
``break <-> continue``; a ``for`` loop run zero times.

Sharding and resuming: ``--shard I/N`` runs the mutants whose index (in Cosmic
Ray's deterministic enumeration, per module) is ``I - 1`` modulo ``N``; results
go to ``reports/mutation/results/<module>.json`` (one file per module, written
atomically after every mutant under a lock, so shards may run in parallel and an
interrupted run resumes where it stopped). Modules others often change run last
(:data:`RUN_LAST`; modules named on the command line run in the order given). Each run's wall time, throughput and paths go to
``reports/mutation/runs.json``.

``report`` writes ``reports/mutation/README.md``: per module the mutants run,
killed, timeouts, survived (no covering test, partial), equivalent, undecided,
paths, the kill rate of the non-equivalent ones, the runs, and every survivor
with its diff.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import fcntl
import functools
import gc
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
import warnings
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "reports" / "mutation"
RESULTS = OUT / "results"
EQUIVALENT = OUT / "equivalent.toml"
SCRATCH = ROOT / ".mutation"

#: module -> the test files that exercise it, fastest (and most likely to kill) first.
TESTS: dict[str, list[str]] = {
    "verify/_numdiff.py": ["tests/test_engine_properties.py", "tests/test_engine_numdiff.py",
                           "tests/test_engine_check.py"],
    "verify/tolerance.py": ["tests/test_engine_properties.py", "tests/test_engine_tolerance.py",
                            "tests/test_engine_check.py", "tests/test_engine_dottest.py",
                            "tests/test_hessian_inverse.py", "tests/test_engine_taylor.py"],
    "verify/_taylor.py": ["tests/test_engine_properties.py", "tests/test_engine_taylor.py"],
    "verify/_dottest.py": ["tests/test_engine_properties.py", "tests/test_engine_dottest.py"],
    "verify/_check.py": ["tests/test_engine_properties.py", "tests/test_engine_check.py"],
    "verify/_verdict.py": ["tests/test_engine_properties.py", "tests/test_engine_check.py",
                           "tests/test_engine_dottest.py", "tests/test_report.py"],
    "verify/hessian_inverse.py": ["tests/test_engine_properties.py", "tests/test_hessian_inverse.py"],
    **{f"verify/auditing/diagnosis/{m}.py": ["tests/audit/test_diagnosis_units.py", "tests/audit/test_audit_api.py",
                                             "tests/audit/test_audit_corpus.py"]
       for m in ("backbone", "optimizer")},
    **{f"verify/auditing/diagnosis/{m}.py": ["tests/audit/test_diagnosis_rate_search.py",
                                             "tests/audit/test_diagnosis_units.py", "tests/audit/test_audit_api.py",
                                             "tests/audit/test_audit_corpus.py"]
       for m in ("catalogue", "gradient")},
    **{f"verify/auditing/diagnosis/{m}.py": ["tests/audit/test_diagnosis_units_implicit.py",
                                             "tests/audit/test_diagnosis_units.py", "tests/audit/test_audit_api.py",
                                             "tests/audit/test_audit_corpus.py"]
       for m in ("core", "implicit")},
    "reference/r2d2.py": ["tests/test_ref_r2d2_batched.py", "tests/test_ref_r2d2_independent.py", "tests/test_symbolic.py",
                          "tests/test_check_matrix.py"],
    "reference/maml.py": ["tests/test_ref_maml_adapt.py", "tests/test_ref_gradient_family.py", "tests/test_symbolic_reference.py"],
    "reference/anil.py": ["tests/test_ref_gradient_family.py", "tests/test_symbolic_reference.py"],
    "reference/metasgd.py": ["tests/test_ref_gradient_family.py", "tests/test_symbolic_reference.py",
                             "tests/test_ref_inner_optim.py"],
    "reference/formatting.py": ["tests/test_ref_formatting.py", "tests/test_models.py"],
    "reference/reptile.py": ["tests/test_ref_reptile.py", "tests/test_ref_gradient_family.py", "tests/test_symbolic_reference.py"],
    "reference/newton.py": ["tests/test_ref_newton_values.py", "tests/test_ref_gradient_family.py", "tests/test_symbolic_reference.py"],
    "reference/imaml.py": ["tests/test_ref_imaml_paths.py", "tests/test_ref_imaml_fast.py", "tests/test_ref_imaml_polish.py",
                           "tests/test_ref_imaml.py", "tests/test_hessian_inverse.py", "tests/test_ref_imaml_subspace.py"],
    "reference/imaml_subspace.py": ["tests/test_ref_imaml_subspace.py", "tests/test_ref_imaml_polish.py",
                                    "tests/test_ref_imaml_fast.py"],
    "reference/protonet.py": ["tests/test_ref_protonet_paths.py", "tests/test_ref_metric.py"],
    "reference/matchingnet.py": ["tests/test_ref_metric.py"],
    "reference/optimizers.py": ["tests/test_ref_optimizer_steps.py", "tests/test_ref_reptile.py",
                                "tests/test_ref_maml_adapt.py", "tests/test_step_rounding.py",
                                "tests/torch/test_torch_adam_float32.py", "tests/test_inner_audit.py",
                                "tests/jax/test_jax_inner_optim.py", "tests/test_ref_inner_optim.py",
                                "tests/torch/test_torch_inner_optim.py"],
    "reference/lrd2.py": ["tests/test_ref_lrd2_values.py", "tests/test_ref_closed_form.py", "tests/test_check_matrix.py"],
    "reference/models.py": ["tests/test_ref_models_contract.py", "tests/test_models.py", "tests/test_ref_gradient_family.py"],
    "reference/inner_loop.py": ["tests/test_ref_gemm_nogil.py", "tests/test_ref_inner_loop_engine.py",
                                "tests/test_ref_gradient_family.py", "tests/test_symbolic_reference.py"],
    "reference/features.py": ["tests/test_ref_features.py", "tests/test_ref_r2d2_independent.py", "tests/test_ref_metric.py",
                               "tests/test_ref_closed_form.py"],
    "reference/linalg.py": ["tests/test_ref_linalg_batched.py", "tests/test_ref_linalg.py", "tests/test_ref_closed_form.py",
                            "tests/test_ref_imaml.py"],
    "reference/flow.py": ["tests/test_flow.py"],
    "reference/_threads.py": ["tests/test_ref_threads_policy.py", "tests/test_ref_threads.py",
                              "tests/test_ref_factored.py"],
    "reference/factored.py": ["tests/test_ref_factored.py", "tests/test_ref_threads.py"],
    "reference/_heap.py": ["tests/test_ref_heap.py"],
    "reference/inner_optim.py": ["tests/test_ref_inner_optim_fast.py", "tests/test_inner_audit.py",
                                 "tests/jax/test_jax_inner_optim.py", "tests/test_ref_inner_optim.py",
                                 "tests/torch/test_torch_inner_optim.py"],
    "reference/learned_optimizers.py": ["tests/test_ref_learned_optimizers_fast.py", "tests/test_ref_inner_optim.py",
                                        "tests/test_step_rounding.py", "tests/test_check_matrix.py",
                                        "tests/torch/test_torch_inner_optim.py", "tests/jax/test_jax_inner_optim.py"],
    "reference/imaml_solver.py": ["tests/test_ref_imaml_solver.py", "tests/test_inner_audit.py"],
    "reference/mamlpp.py": ["tests/test_ref_mamlpp.py", "tests/test_ref_inner_optim.py", "tests/test_inner_audit.py",
                            "tests/test_check_matrix.py"],
    "reference/validation.py": ["tests/test_ref_validation.py", "tests/test_ref_gradient_family.py", "tests/test_models.py",
                                 "tests/test_ref_metric.py"],
    "reference/tasks.py": ["tests/test_ref_tasks.py", "tests/test_models.py", "tests/test_ref_gradient_family.py", "tests/test_flow.py"],
    "reference/nets/layers/pool.py": ["tests/test_nets_pool_layers.py", "tests/test_nets_layers.py"],
    "reference/nets/network.py": ["tests/test_nets_network_contract.py", "tests/test_nets_layers.py",
                                  "tests/test_nets_algorithms.py", "tests/test_ref_metric.py"],
    "reference/rl/_checks.py": ["tests/test_rl_properties.py", "tests/test_rl_reference.py", "tests/test_rl_estimators.py"],
    "reference/rl/estimators.py": ["tests/test_rl_properties.py", "tests/test_rl_estimators.py", "tests/test_rl_audit_core.py"],
    **{f"reference/rl/{m}.py": ["tests/test_rl_properties.py", "tests/test_rl_reference.py", "tests/test_rl_estimators.py",
                                "tests/test_rl_audit_core.py", "tests/test_rl_symbolic.py"]
       for m in ("maml_rl", "mdp", "trajectories")},
    "reference/symbolic/_linear.py": ["tests/test_symbolic_fast_linear.py", "tests/test_symbolic.py",
                                      "tests/test_symbolic_properties.py", "tests/test_cli_derive.py",
                                      "tests/test_symbolic_reference.py"],
    "reference/symbolic/_nichol.py": ["tests/test_symbolic_fast_nichol.py", "tests/test_symbolic_nichol.py",
                                      "tests/test_symbolic.py", "tests/test_symbolic_properties.py",
                                      "tests/test_cli_derive.py"],
    **{f"reference/symbolic/{m}.py": ["tests/test_symbolic_properties.py", "tests/test_rl_symbolic.py",
                                      "tests/test_cli_derive.py", "tests/test_symbolic_nichol.py", "tests/test_flow.py",
                                      "tests/test_symbolic_expectation.py", "tests/test_symbolic_reference.py",
                                      "tests/test_symbolic.py"]
       for m in ("_registry", "_common", "_derivation")},
    "reference/symbolic/_flow.py": ["tests/test_symbolic_fast_flow.py", "tests/test_flow.py", "tests/test_symbolic.py",
                                    "tests/test_symbolic_reference.py", "tests/test_symbolic_properties.py",
                                    "tests/test_cli_derive.py", "tests/test_benchmarks_smoke.py"],
    "reference/symbolic/_r2d2.py": ["tests/test_symbolic_fast_r2d2.py", "tests/test_symbolic.py",
                                    "tests/test_symbolic_reference.py", "tests/test_symbolic_properties.py",
                                    "tests/test_cli_derive.py", "tests/test_ref_closed_form.py"],
    # s5a: the fast quadratic-derivation tests first (they override the comprehension's entries above)
    "reference/symbolic/_quadratic.py": ["tests/test_symbolic_fast_quadratic.py", "tests/test_symbolic_properties.py",
                                         "tests/test_symbolic.py", "tests/test_symbolic_reference.py",
                                         "tests/test_cli_derive.py"],
    "reference/symbolic/_common.py": ["tests/test_symbolic_properties.py", "tests/test_symbolic_fast_quadratic.py",
                                      "tests/test_rl_symbolic.py", "tests/test_cli_derive.py",
                                      "tests/test_symbolic_nichol.py", "tests/test_flow.py",
                                      "tests/test_symbolic_expectation.py", "tests/test_symbolic_reference.py",
                                      "tests/test_symbolic.py"],
    # s5d: the fast Derivation tests first (after the comprehension, so they override its _derivation entry)
    "reference/symbolic/_derivation.py": ["tests/test_symbolic_fast_derivation.py", "tests/test_symbolic_properties.py",
                                         "tests/test_rl_symbolic.py", "tests/test_cli_derive.py",
                                         "tests/test_symbolic_nichol.py", "tests/test_flow.py",
                                         "tests/test_symbolic_expectation.py", "tests/test_symbolic_reference.py",
                                         "tests/test_symbolic.py"],
    "reference/symbolic/_expectation.py": ["tests/test_symbolic_fast_expectation.py", "tests/test_symbolic_expectation.py",
                                          "tests/test_symbolic.py", "tests/test_symbolic_properties.py"],
    "reference/symbolic/_bandit_rl.py": ["tests/test_symbolic_fast_expectation.py", "tests/test_rl_symbolic.py",
                                        "tests/test_symbolic.py", "tests/test_symbolic_properties.py"],
}
#: Extra pytest arguments per module (deselect slow corpus seeds, select the relevant part).
PYTEST_EXTRA: dict[str, list[str]] = {
    **{f"verify/auditing/diagnosis/{m}.py": ["-k", "not more_seeds"]
       for m in ("catalogue", "core", "gradient", "implicit", "backbone", "optimizer")},
}
#: What is copied into a shard's scratch copy of the project.
COPY = ["verify", "reference", "tests", "benchmarks", "docs", "README.md", "pyproject.toml"]  # docs: tests hold docs to the code

#: Cosmic Ray operators used (see the module docstring for why these).
OPERATORS: tuple[str, ...] = (
    "core/ReplaceBinaryOperator_Add_Sub", "core/ReplaceBinaryOperator_Sub_Add",
    "core/ReplaceBinaryOperator_Mul_Div", "core/ReplaceBinaryOperator_Div_Mul",
    "core/ReplaceBinaryOperator_Pow_Mul",
    "core/ReplaceComparisonOperator_Lt_LtE", "core/ReplaceComparisonOperator_LtE_Lt",
    "core/ReplaceComparisonOperator_Gt_GtE", "core/ReplaceComparisonOperator_GtE_Gt",
    "core/ReplaceComparisonOperator_Eq_NotEq", "core/ReplaceComparisonOperator_NotEq_Eq",
    "core/ReplaceComparisonOperator_Is_IsNot", "core/ReplaceComparisonOperator_IsNot_Is",
    "core/ReplaceUnaryOperator_USub_UAdd", "core/ReplaceUnaryOperator_Delete_Not",
    "core/ReplaceAndWithOr", "core/ReplaceOrWithAnd",
    "core/ReplaceTrueWithFalse", "core/ReplaceFalseWithTrue",
    "core/AddNot", "core/NumberReplacer",
    "core/ReplaceBreakWithContinue", "core/ReplaceContinueWithBreak",
    "core/ZeroIterationForLoop",
)

#: The engine's modules in scope (verify/ numerics, tolerance, verdict, diagnosis), in run order.
ENGINE: tuple[str, ...] = ("verify/_numdiff.py", "verify/tolerance.py", "verify/_taylor.py", "verify/_dottest.py",
                           "verify/_check.py", "verify/_verdict.py", "verify/hessian_inverse.py",
                           "verify/auditing/diagnosis/catalogue.py", "verify/auditing/diagnosis/core.py",
                           "verify/auditing/diagnosis/gradient.py", "verify/auditing/diagnosis/implicit.py",
                           "verify/auditing/diagnosis/backbone.py", "verify/auditing/diagnosis/optimizer.py")
#: Not mutated: exception classes and messages only.
EXCLUDE: tuple[str, ...] = ("reference/errors.py",)


def default_modules() -> list[str]:
    """The scope: the engine first, then every module of ``reference/`` (new families join as they land)."""
    ref = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "reference").rglob("*.py")
                 if p.name != "__init__.py" and "__pycache__" not in p.parts)
    return [m for m in ENGINE if (ROOT / m).exists()] + [m for m in ref if m not in EXCLUDE]


def tests_for(module: str) -> list[str]:
    """The test files of ``module``: the explicit map, else every test file that imports it.

    Discovery (for modules without a map entry: a renamed or newly added module) looks for an
    import line naming the module, ``import reference.nets.conv`` / ``from reference.nets import
    conv`` / ``from reference.nets.conv import ...``; smallest files first (a cheap proxy for fast).
    """
    if module in TESTS:
        return [t for t in TESTS[module] if (ROOT / t).exists()]
    dotted = module.removesuffix(".py").replace("/", ".")
    parent, _, name = dotted.rpartition(".")
    pattern = re.compile(rf"^\s*(from\s+{re.escape(dotted)}\s+import|import\s+{re.escape(dotted)}\b|"
                         rf"from\s+{re.escape(parent)}\s+import\s+[^\n]*\b{re.escape(name)}\b)", re.M)
    found = [p for p in (ROOT / "tests").rglob("test_*.py") if pattern.search(p.read_text(encoding="utf-8"))]
    if not found and parent.count(".") >= 1:  # a private module of a subpackage: its package's tests
        return tests_for(parent.replace(".", "/") + ".py")
    found.sort(key=lambda p: p.stat().st_size)
    return [str(p.relative_to(ROOT)) for p in found]


# ---------------------------------------------------------------------------------------------
# enumeration


def _sha(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _signature_marker(node) -> bool:
    """The bare ``*`` (keyword-only marker) of a ``def``: not a multiplication.

    Cosmic Ray's Mul -> Div operator rewrites it to ``/`` (positional-only
    marker), an API change with nothing numerical in it; skipped.
    """
    return getattr(node, "type", "") == "operator" and getattr(node.parent, "type", "") == "parameters"


def enumerate_mutants(module: str) -> list[dict]:
    """Cosmic Ray's mutants of ``module``, in its deterministic order: key, operator, occurrence, line."""
    from cosmic_ray.util import read_python_source

    return _mutants_of_source(read_python_source(ROOT / module))


def _mutants_of_source(source: str) -> list[dict]:
    """The mutants of a module's source text (the working tree's, or another revision's for ``rekey``)."""
    from cosmic_ray.ast import ast_nodes, get_ast
    from cosmic_ray.plugins import get_operator

    nodes = list(ast_nodes(get_ast(source)))
    out = []
    for name in OPERATORS:
        op = get_operator(name)()
        positions = [(node, pos) for node in nodes for pos in op.mutation_positions(node)]
        for occurrence, (node, (start, _end)) in enumerate(positions):
            if _signature_marker(node):
                continue  # keeps Cosmic Ray's occurrence numbering: the key is its occurrence index
            out.append({"key": f"{name}#{occurrence}", "operator": name, "occurrence": occurrence,
                        "line": start[0]})
    return out


def _mutant_signature(source: str, operator: str, occurrence: int) -> tuple | None:
    """What a mutant does, independent of where its module's other code moved: the operator, the
    enclosing ``def``/``class`` names, and the removed and added lines (stripped)."""
    from cosmic_ray.mutating import mutate_code
    from cosmic_ray.plugins import get_operator

    mutated = mutate_code(source, get_operator(operator)(), occurrence)
    if mutated is None:
        return None
    a, b = source.splitlines(), mutated.splitlines()
    sm = difflib.SequenceMatcher(None, a, b, autojunk=False)
    removed, added, first = [], [], None
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag != "equal":
            first = i1 if first is None else first
            removed += [x.strip() for x in a[i1:i2]]
            added += [x.strip() for x in b[j1:j2]]
    scope = []
    for line in reversed(a[:(first or 0) + 1]):  # the enclosing definitions, innermost first
        m = re.match(r"(\s*)(?:async\s+)?(?:def|class)\s+(\w+)", line)
        if m and (not scope or len(m.group(1)) < scope[-1][0]):
            scope.append((len(m.group(1)), m.group(2)))
    return operator, tuple(n for _, n in scope), tuple(removed), tuple(added)


def rekey(module: str, rev: str, dry_run: bool = False) -> int:
    """Carry ``module``'s equivalent-mutant keys from revision ``rev`` to the working tree.

    A key is Cosmic Ray's occurrence index, which shifts when the module is edited. Each listed key is
    matched to the mutant of the current source that does the same thing (:func:`_mutant_signature`); among
    identical signatures the k-th old one maps to the k-th new one. Keys with no match are reported and
    removed (the mutant no longer exists, or its line changed: argue it again).
    """
    module = _check_paths([module])[0]
    old_src = subprocess.run(["git", "show", f"{rev}:{module}"], cwd=ROOT, capture_output=True, text=True)
    if old_src.returncode != 0:
        raise SystemExit(f"mutation.py rekey: cannot read {module} at rev={rev!r}: {old_src.stderr.strip()}")
    new_src = (ROOT / module).read_text(encoding="utf-8")
    keys = list(load_equivalent().get(module, {}))
    if not keys:
        print(f"{module}: no equivalent mutants listed")
        return 0
    mapping = _rekey_map(old_src.stdout, new_src, keys)
    moved = {k: v for k, v in mapping.items() if v is not None and v != k}
    lost = [k for k, v in mapping.items() if v is None]
    for k, v in sorted(moved.items()):
        print(f"{module}: {k} -> {v}")
    for k in lost:
        print(f"{module}: {k} has no counterpart in the current source: removed (argue it again if it survives)")
    if dry_run or (not moved and not lost):
        print(f"{module}: {len(keys)} keys, {len(moved)} moved, {len(lost)} lost" + (" (dry run)" if dry_run else ""))
        return 0
    _rewrite_equivalent_section(module, mapping)
    print(f"{module}: {len(keys)} keys, {len(moved)} moved, {len(lost)} lost -> {EQUIVALENT.relative_to(ROOT)}")
    return 0


def _rekey_map(old_src: str, new_src: str, keys: list[str]) -> dict[str, str | None]:
    """``{old key: new key or None}``: each mutant of ``old_src`` named in ``keys`` to the mutant of
    ``new_src`` with the same :func:`_mutant_signature` (the k-th of equal signatures to the k-th)."""
    ops = {k.split("#")[0] for k in keys}

    def sigs(src: str) -> tuple[dict[str, tuple], dict[tuple, list[str]]]:
        by_key, by_sig = {}, {}
        for m in _mutants_of_source(src):
            if m["operator"] in ops:
                sig = _mutant_signature(src, m["operator"], m["occurrence"])
                by_key[m["key"]] = sig
                by_sig.setdefault(sig, []).append(m["key"])
        return by_key, by_sig

    old_key, old_sig = sigs(old_src)
    _, new_sig = sigs(new_src)
    mapping: dict[str, str | None] = {}
    for k in keys:
        sig = old_key.get(k)
        cand = new_sig.get(sig, []) if sig is not None else []
        rank = old_sig[sig].index(k) if sig is not None else -1
        mapping[k] = cand[rank] if 0 <= rank < len(cand) else None
    return mapping


def _rewrite_equivalent_section(module: str, mapping: dict[str, str | None]) -> None:
    """Rename (or drop, for ``None``) the keys of ``module``'s section of equivalent.toml, in place, keeping
    every other line (comments, other sections) as written."""
    lines = EQUIVALENT.read_text(encoding="utf-8").splitlines(keepends=True)
    out, inside = [], False
    for line in lines:
        head = re.match(r'\s*\[\s*"?([^"\]]+)"?\s*\]\s*$', line)
        if head:
            inside = head.group(1) == module
        m = re.match(r'(\s*)"([^"]+)"(\s*=.*)', line, re.S) if inside else None
        if m and m.group(2) in mapping:
            new = mapping[m.group(2)]
            if new is None:
                continue
            line = f'{m.group(1)}"{new}"{m.group(3)}'
        out.append(line)
    text = "".join(out)
    tomllib.loads(text)  # never write a file the runner cannot read (e.g. two keys mapped onto one)
    EQUIVALENT.write_text(text, encoding="utf-8")


def mutate(module: str, operator: str, occurrence: int) -> str | None:
    """The mutated source of ``module`` (None when the operator has no such occurrence)."""
    from cosmic_ray.mutating import mutate_code
    from cosmic_ray.plugins import get_operator

    source = (ROOT / module).read_text(encoding="utf-8")
    return mutate_code(source, get_operator(operator)(), occurrence)


def diff_of(module: str, mutated: str) -> str:
    source = (ROOT / module).read_text(encoding="utf-8")
    return "".join(difflib.unified_diff(source.splitlines(True), mutated.splitlines(True),
                                        f"a/{module}", f"b/{module}", n=1))


# ---------------------------------------------------------------------------------------------
# results store (one JSON per module, locked, so shards can run in parallel and resume)


def _results_path(module: str) -> Path:
    return RESULTS / (module.replace("/", "__").removesuffix(".py") + ".json")


def _fingerprint(module: str) -> str:
    """The module's source: a mutant's identity (operator#occurrence) depends on nothing else."""
    return _sha(ROOT / module)


def _tests_fingerprint(module: str) -> str:
    """The module's test files: a survivor is re-run when they change (a kill stays a kill)."""
    return _sha(*(ROOT / t for t in tests_for(module)))


def load_results(module: str) -> dict:
    path = _results_path(module)
    if not path.exists():
        return {"module": module, "fingerprint": _fingerprint(module), "mutants": {}}
    return json.loads(path.read_text())


def _store(module: str, key: str, record: dict) -> None:
    path = _results_path(module)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_suffix(".lock")
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        data = load_results(module)
        fp = _fingerprint(module)
        if data.get("fingerprint") != fp:  # the module changed: old results are stale
            data = {"module": module, "fingerprint": fp, "mutants": {}}
        data["mutants"][key] = record
        data["mutants"] = dict(sorted(data["mutants"].items(), key=lambda kv: (kv[1]["index"], kv[0])))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
        tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# mutants from one parse per module (Cosmic Ray's mutate_code re-parses the module for every mutant)


class Mutator:
    """Every mutant of one module from a single parso parse, text-identical to Cosmic Ray's ``mutate_code``.

    Cosmic Ray's operators edit the parse tree in place; here the edited node's code (prefix
    included) is spliced into the source between the node's original prefix start and end, and the
    node's subtree is restored afterwards. ``check()`` compares with ``mutate_code`` (the selftest).
    """

    def __init__(self, module: str, source: str | None = None) -> None:
        from cosmic_ray.ast import ast_nodes, get_ast

        self.module = module
        self.source = source if source is not None else (ROOT / module).read_text(encoding="utf-8")
        self.nodes = list(ast_nodes(get_ast(self.source)))
        self._positions: dict[str, list] = {}
        self._starts = [0]
        for line in self.source.splitlines(keepends=True):
            self._starts.append(self._starts[-1] + len(line))

    def _offset(self, pos: tuple[int, int]) -> int:
        row, col = pos
        return self._starts[row - 1] + col if row - 1 < len(self._starts) else len(self.source)

    def _op(self, name: str):
        from cosmic_ray.plugins import get_operator

        return get_operator(name)()

    def positions(self, name: str) -> list:
        if name not in self._positions:
            op = self._op(name)
            self._positions[name] = [(node, k) for node in self.nodes
                                     for k, _ in enumerate(op.mutation_positions(node))]
        return self._positions[name]

    @staticmethod
    def _save(node) -> list:
        saved = []
        stack = [node]
        while stack:
            n = stack.pop()
            if hasattr(n, "children"):
                saved.append((n, "children", list(n.children)))
                stack.extend(n.children)
            else:
                saved.append((n, "value", n.value))
        return saved

    def mutate(self, operator: str, occurrence: int) -> str | None:
        pos = self.positions(operator)
        if occurrence >= len(pos):
            return None
        node, index = pos[occurrence]
        start = self._offset(node.get_start_pos_of_prefix())
        end = self._offset(node.end_pos)
        saved = self._save(node)
        try:
            text = self._op(operator).mutate(node, index).get_code()
        finally:
            for n, attr, value in saved:
                setattr(n, attr, value)
        return self.source[:start] + text + self.source[end:]


# ---------------------------------------------------------------------------------------------
# coverage map: which tests execute which line (built once by `mutation.py coverage`)

COV = SCRATCH / "cov"
MAP = SCRATCH / "coverage-map.json"
#: Context id of code run outside any test: at import / collection time, or in a subprocess.
IMPORT_CTX = -1


def tree_hash() -> str:
    """SHA-256 of the sources and tests the map was collected from (stale map detection)."""
    h = hashlib.sha256()
    files = sorted(p for d in ("reference", "verify", "tests") for p in (ROOT / d).rglob("*.py")
                   if "__pycache__" not in p.parts and p.name != "test_mutation_sample.py")
    for p in [*files, ROOT / "pyproject.toml"]:
        h.update(str(p.relative_to(ROOT)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _junit_key(nodeid: str) -> tuple[str, str]:
    """``(classname, name)`` of a node id in pytest's junitxml (``mangle_test_address``)."""
    path, bracket, params = nodeid.partition("[")
    names = [n for n in path.split("::") if n != "()"]
    names[0] = re.sub(r"\.py$", "", names[0].replace("/", "."))
    names[-1] += bracket + params
    return ".".join(names[:-1]), names[-1]


def _write_covrc(rc: Path, data_file: Path) -> None:
    rc.write_text(f"[run]\nsource = reference,verify\ndata_file = {data_file}\npatch = subprocess\nbranch = False\n")


def _context_node(context: str) -> str:
    """The node id of a pytest-cov test context ("" for the import/subprocess context)."""
    return context.rsplit("|", 1)[0] if context.endswith(("|run", "|setup", "|teardown")) else context


def _read_junit(path: Path) -> dict[tuple[str, str], tuple[float, str]]:
    """(classname, name) -> (seconds, passed/skipped/failed); a test reported twice keeps its worst outcome."""
    import xml.etree.ElementTree as ET

    junit: dict[tuple[str, str], tuple[float, str]] = {}
    rank = {"passed": 0, "skipped": 1, "failed": 2}
    for tc in ET.parse(path).iter("testcase"):
        key = (tc.get("classname") or "", tc.get("name") or "")
        status = ("failed" if tc.find("failure") is not None or tc.find("error") is not None
                  else "skipped" if tc.find("skipped") is not None else "passed")
        t = float(tc.get("time") or 0.0)
        old = junit.get(key)
        if old is None or rank[status] > rank[old[1]]:
            junit[key] = (max(t, old[0]) if old else t, status)
    return junit


def collect_coverage(jobs: int, build_only: bool) -> int:
    """Run the not-slow suite once under coverage with per-test contexts, then build the map.

    Every test's context is its node id (pytest-cov's ``--cov-context=test``, which also works
    under xdist). Threads are traced (coverage's default ``thread`` concurrency: the reference's
    task thread pool is attributed to the test that started it). Subprocesses are measured too
    (``patch = subprocess``) but have no test context: their lines land in the import/subprocess
    context, and a mutant there runs the module's mapped test files (see ``Planner``).
    """
    tree = tree_hash()
    if not build_only:
        COV.mkdir(parents=True, exist_ok=True)
        for f in COV.glob(".coverage*"):
            f.unlink()
        rc = COV / "covrc"
        _write_covrc(rc, COV / ".coverage")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
               *(["-n", str(jobs)] if jobs > 1 else []), "--cov", f"--cov-config={rc}",
               "--cov-context=test", "--cov-report=", f"--junitxml={COV / 'junit.xml'}",
               "--ignore=tests/test_mutation_sample.py", "tests"]
        print(" ".join(cmd), flush=True)
        # failing tests are fine here: they are excluded from the map (never counted as killers)
        subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, HYPOTHESIS_PROFILE="ci"), check=False)
        if tree_hash() != tree:
            raise SystemExit("the sources or tests changed during the collection; run it again")
        (COV / "tree").write_text(tree)
    elif (COV / "tree").exists():
        tree = (COV / "tree").read_text().strip()
    return build_map(tree)


def build_map(tree: str) -> int:
    from coverage import CoverageData

    data = CoverageData(basename=str(COV / ".coverage"))
    data.read()
    index: dict[str, int] = {}
    lines: dict[str, dict[str, list[int]]] = {}
    for f in sorted(data.measured_files()):
        try:
            rel = str(Path(f).resolve().relative_to(ROOT))
        except ValueError:
            continue
        out = {}
        for ln, ctxs in sorted(data.contexts_by_lineno(f).items()):
            ids = set()
            for c in ctxs:
                node = _context_node(c)
                ids.add(index.setdefault(node, len(index)) if node else IMPORT_CTX)
            out[str(ln)] = sorted(ids)
        lines[rel] = out
    junit = _read_junit(COV / "junit.xml")
    tests = sorted(index, key=index.get)
    seconds, outcome = [], []
    for node in tests:
        t, status = junit.get(_junit_key(node), (1.0, "unknown"))
        seconds.append(round(t, 4))
        outcome.append(status)
    doc = {"tree": tree, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "modules": {m: _fingerprint(m) for m in default_modules()},
           # the sources themselves, so that a module edited later can carry the map through a diff (remap_lines)
           "sources": {m: (ROOT / m).read_text(encoding="utf-8") for m in default_modules()},
           "test_files": _test_file_hashes(),
           "tests": tests, "seconds": seconds, "outcome": outcome, "lines": lines}
    tmp = MAP.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(MAP)
    unknown = outcome.count("unknown")
    print(f"coverage map: {len(tests)} tests ({outcome.count('failed')} failed, {outcome.count('skipped')} skipped, "
          f"{unknown} without a junit duration), {sum(len(v) for v in lines.values())} lines in {len(lines)} "
          f"files -> {MAP}", flush=True)
    return 0


def _test_file_hashes() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): _sha(p) for p in sorted((ROOT / "tests").rglob("test_*.py"))
            if "__pycache__" not in p.parts}


def update_map(paths: list[str]) -> int:
    """Bring the map up to date for test files added or changed since it was built, without the whole suite.

    Only those files run under coverage (one process); their old node ids are retired (outcome
    ``removed``, never selected), their new ones added with this run's durations and outcomes. Modules
    whose source changed since are first carried through the diff (:func:`remap_lines`); lines of new
    code stay *unknown* (their mutants run the mapped test files) unless an updated test ran them, in
    which case those tests are known to cover them but others may too. Tests of unchanged files keep
    the coverage of the full run; a changed module may have changed which lines they reach, so a full
    ``coverage`` run stays the exact selection.
    """
    SCRATCH.mkdir(exist_ok=True)
    with open(SCRATCH / "coverage-update.lock", "w") as lock:
        # two runs started at once would share the coverage data file and record each other's tests as failed
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _update_map(paths)


def _update_map(paths: list[str]) -> int:
    m = load_map()
    if m is None:
        raise SystemExit("no coverage map to update: build one with `python scripts/mutation.py coverage`")
    known = m.get("test_files", {})
    now = _test_file_hashes()
    if not paths:
        paths = [f for f, h in now.items() if known.get(f) != h and f != "tests/test_mutation_sample.py"]
    if not paths:
        print("coverage map: no test file changed since it was built", flush=True)
        return 0
    COV.mkdir(parents=True, exist_ok=True)
    data_file = COV / ".coverage-update"
    for f in COV.glob(".coverage-update*"):
        f.unlink()
    rc = COV / "covrc-update"
    _write_covrc(rc, data_file)
    junit = COV / "junit-update.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", "--cov",
           f"--cov-config={rc}", "--cov-context=test", "--cov-report=", f"--junitxml={junit}", *paths]
    print(f"updating the coverage map for {len(paths)} test files: " + " ".join(paths), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, HYPOTHESIS_PROFILE="ci"), check=False)

    from coverage import CoverageData

    retired = set(paths)
    index = {t: i for i, t in enumerate(m["tests"])}
    for i, t in enumerate(m["tests"]):
        if t.split("::")[0] in retired:
            m["outcome"][i] = "removed"
    durations = _read_junit(junit)
    ran: set[int] = set()
    unknown_all = m.setdefault("unknown", {})
    cov = CoverageData(basename=str(data_file))
    cov.read()
    for f in sorted(cov.measured_files()):
        try:
            rel = str(Path(f).resolve().relative_to(ROOT))
        except ValueError:
            continue
        source = (ROOT / rel).read_text(encoding="utf-8")
        table = m["lines"].setdefault(rel, {})
        if rel in m.get("sources", {}) and m["sources"][rel] != source:
            table, unknown = remap_lines(m["sources"][rel], source, table)
            m["lines"][rel] = table
            unknown_all[rel] = sorted(unknown)
            m["sources"][rel] = source
            if rel in m["modules"]:
                m["modules"][rel] = _fingerprint(rel)
        for ln, ctxs in cov.contexts_by_lineno(f).items():
            for c in ctxs:
                node = _context_node(c)
                if not node:
                    continue
                i = index.get(node)
                if i is None:  # a new test; a re-run one keeps its id (its old lines stay: a superset)
                    i = index[node] = len(m["tests"])
                    m["tests"].append(node)
                    m["seconds"].append(1.0)
                    m["outcome"].append("unknown")
                ran.add(i)
                ids = table.setdefault(str(ln), [])
                if i not in ids:
                    ids.append(i)
    for i in ran:  # this run's duration and outcome, once per test
        t, st = durations.get(_junit_key(m["tests"][i]), (1.0, "unknown"))
        m["seconds"][i], m["outcome"][i] = round(t, 4), st
    for f in paths:
        m.setdefault("test_files", {})[f] = now.get(f, "")
    if all(m.get("test_files", {}).get(f) == h for f, h in now.items() if f != "tests/test_mutation_sample.py"):
        m["tree"] = tree_hash()  # every test file is now known: newer-test padding no longer needed
    m["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    tmp = MAP.with_suffix(".tmp")
    tmp.write_text(json.dumps(m))
    tmp.replace(MAP)
    print(f"coverage map updated: {len(paths)} test files, {len(m['tests'])} node ids "
          f"({m['outcome'].count('removed')} retired) -> {MAP}", flush=True)
    return 0


def load_map() -> dict | None:
    if not MAP.exists():
        return None
    return json.loads(MAP.read_text())


def remap_lines(old_src: str, new_src: str, table: dict[str, list[int]]) -> tuple[dict[str, list[int]], set[int]]:
    """Carry a module's line -> tests table from the source it was collected on to the edited source.

    A map is expensive (the whole suite under coverage); an edit between two runs should not send every
    mutant of the module back to its whole test files. Lines of functions the edit did not touch keep
    their tests (matched through ``difflib``); every line of a function the edit touched gets the union
    of the tests that ran any line of that function before (a superset: more tests run, so no kill is
    lost and no line is wrongly left uncovered); lines outside any old function that changed (new
    functions, changed module-level code) are returned as *unknown*: their mutants run the mapped test
    files, as for a module without a map.
    """
    import difflib

    old_lines, new_lines = old_src.splitlines(), new_src.splitlines()
    sm = difflib.SequenceMatcher(None, old_lines, new_lines, autojunk=False)
    carried: dict[int, int] = {}  # new line -> old line (1-based), for text-identical lines
    changed_new: set[int] = set()
    changed_old: set[int] = set()
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag == "equal":
            carried.update({j1 + k + 1: i1 + k + 1 for k in range(i2 - i1)})
        else:
            changed_new.update(range(j1 + 1, j2 + 1))
            changed_old.update(range(i1 + 1, i2 + 1))
    old_loc, new_loc = Locator(old_src), Locator(new_src)

    def span(d) -> range:
        n = d[0]
        first = n.decorator_list[0].lineno if n.decorator_list else n.lineno
        return range(first, n.end_lineno + 1)

    old_defs = {(q, k): d for d in old_loc.defs for (q, k) in [(d[1], d[2])]}
    out: dict[str, list[int]] = {}
    unknown: set[int] = set()
    for d in new_loc.defs:
        lines = span(d)
        od = old_defs.get((d[1], d[2]))
        touched = od is None or any(ln in changed_new for ln in lines) or any(ln in changed_old for ln in span(od))
        if not touched:
            for ln in lines:
                if ln in carried and str(carried[ln]) in table:
                    out[str(ln)] = table[str(carried[ln])]
            continue
        if od is None:  # a new function: no history
            unknown.update(lines)
            continue
        ids = sorted({i for ln in span(od) for i in table.get(str(ln), ())})
        for ln in lines:
            out[str(ln)] = ids
    in_def = {ln for d in new_loc.defs for ln in span(d)}
    for ln in range(1, len(new_lines) + 1):  # module level and class bodies
        if ln in in_def:
            continue
        if ln in changed_new:
            unknown.add(ln)
        elif ln in carried and str(carried[ln]) in table:
            out[str(ln)] = table[str(carried[ln])]
    return out, unknown


# ---------------------------------------------------------------------------------------------
# where a mutant is: which live function it changes, which lines decide the tests


class Locator:
    """The outermost function/method of each line of a module, from its (unmutated) AST."""

    def __init__(self, source: str) -> None:
        self.tree = ast.parse(source)
        self.defs: list[tuple[ast.AST, str, int]] = []  # (def node, qualname, ordinal among same qualname)
        seen: dict[str, int] = {}

        def walk(body: list, prefix: str) -> None:
            for n in body:
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    q = prefix + n.name
                    self.defs.append((n, q, seen.get(q, 0)))
                    seen[q] = seen.get(q, 0) + 1
                elif isinstance(n, ast.ClassDef):
                    walk(n.body, prefix + n.name + ".")

        walk(self.tree.body, "")
        self.stmts = [n for n in ast.walk(self.tree) if isinstance(n, ast.stmt)]

    def where(self, line: int) -> tuple[str, tuple | None]:
        """``("body" | "signature" | "decorator", def)`` or ``("module", None)``."""
        for d in self.defs:
            n = d[0]
            first = n.decorator_list[0].lineno if n.decorator_list else n.lineno
            if not first <= line <= n.end_lineno:
                continue
            if line < n.lineno:
                return "decorator", d
            if line < n.body[0].lineno or (line == n.lineno and line == n.body[0].lineno):
                return "signature", d
            return "body", d
        return "module", None

    def statement_lines(self, line: int) -> range:
        """The lines of the innermost statement holding ``line`` (a compound one: its header up to it)."""
        held = [s for s in self.stmts if s.lineno <= line <= (s.end_lineno or s.lineno)]
        best = min(held, key=lambda s: ((s.end_lineno or s.lineno) - s.lineno, -s.lineno)) if held else None
        if best is None:
            return range(line, line + 1)
        if hasattr(best, "body"):
            return range(best.lineno, line + 1)
        return range(best.lineno, (best.end_lineno or best.lineno) + 1)

    def top_statement(self, line: int) -> ast.stmt | None:
        for s in self.tree.body:
            if s.lineno <= line <= (s.end_lineno or s.lineno):
                return s
        return None

    def name_load_lines(self, names: set[str]) -> set[int]:
        """Lines inside function bodies that read one of ``names`` (as a name or an attribute)."""
        out: set[int] = set()
        for d, _q, _k in self.defs:
            for n in ast.walk(d):
                if (isinstance(n, ast.Name) and n.id in names) or (isinstance(n, ast.Attribute) and n.attr in names):
                    out.add(n.lineno)
        return out


def _bound_names(stmt: ast.stmt) -> set[str]:
    names: set[str] = set()
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        names.add(stmt.name)
    for n in ast.walk(stmt):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            names.add(n.id)
    return names


def _code_objects(code, qualname: str) -> list:
    """Code objects named ``qualname`` under ``code``, in source order."""
    out = []
    stack = [code]
    while stack:
        c = stack.pop(0)
        for const in c.co_consts:
            if hasattr(const, "co_qualname"):
                if const.co_qualname == qualname:
                    out.append(const)
                stack.append(const)
    out.sort(key=lambda c: c.co_firstlineno)
    return out


def _live_functions(mod, qualname: str, firstlineno: int) -> list:
    """The live function objects of ``mod`` whose code is ``qualname`` defined at ``firstlineno``.

    Looks through module and class attributes, unwrapping staticmethod/classmethod/property and
    ``functools.wraps`` chains (``__wrapped__``).
    """
    found, seen = [], set()
    parts = qualname.split(".")
    owner_chain = [mod]
    obj = mod
    for p in parts[:-1]:  # the class the method lives in (nested classes included)
        obj = getattr(obj, p, None)
        if obj is None:
            return []
        owner_chain.append(obj)
    owner = owner_chain[-1]
    cands = [owner.__dict__.get(parts[-1])] if isinstance(owner, type) else [getattr(owner, parts[-1], None)]
    # a property's setter/deleter share the name; the registry is the owner's attribute either way
    while cands:
        c = cands.pop()
        if c is None or id(c) in seen:
            continue
        seen.add(id(c))
        if isinstance(c, (staticmethod, classmethod)):
            cands.append(c.__func__)
        elif isinstance(c, property):
            cands += [c.fget, c.fset, c.fdel]
        elif isinstance(c, functools.partial):
            cands.append(c.func)
        else:
            code = getattr(c, "__code__", None)
            if code is not None and code.co_qualname == qualname and code.co_firstlineno == firstlineno:
                found.append(c)
            wrapped = getattr(c, "__wrapped__", None)
            if wrapped is not None:
                cands.append(wrapped)
            func = getattr(c, "__func__", None)
            if func is not None:
                cands.append(func)
    return found


# ---------------------------------------------------------------------------------------------
# running: one pytest session collects once, each mutant is a fork of it


class _Recorder:
    """pytest plugin: the first failure of a run (test, phase, the assertion's first lines)."""

    def __init__(self) -> None:
        self.failed: dict | None = None
        self.ran = 0

    @staticmethod
    def _why(report) -> str:
        text = getattr(report, "longreprtext", "") or ""
        elines = [ln for ln in text.splitlines() if ln.startswith("E ")]
        return ("\n".join(elines[:4]) if elines else text[-400:])[:600]

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call":
            self.ran += 1
        if report.failed and self.failed is None:
            self.failed = {"node": report.nodeid, "when": report.when, "why": self._why(report)}

    def pytest_collectreport(self, report) -> None:
        if report.failed and self.failed is None:
            self.failed = {"node": report.nodeid, "when": "collect", "why": self._why(report)}


_CHILDREN: set[int] = set()
#: Signals that end a test process on a mutant which corrupts memory or aborts (a crash, not a timeout:
#: the runner's own timeout uses SIGKILL).
CRASH_SIGNALS = frozenset({int(signal.SIGSEGV), int(signal.SIGBUS), int(signal.SIGABRT), int(signal.SIGFPE),
                           int(signal.SIGILL)})


def _terminate(*_: object) -> None:
    """SIGTERM: stop the running test child, then exit (the scratch copy is removed on the way out)."""
    for pid in list(_CHILDREN):  # SIGTERM first: the fresh-import server then stops its own child
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    time.sleep(0.3)
    for pid in list(_CHILDREN):
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
    sys.exit(143)


def _wait_child(pid: int, rfd: int, timeout: float) -> tuple[dict | None, float]:
    """Wait for a forked child (SIGKILL after ``timeout``); its JSON result, or None on a timeout."""
    t0 = time.monotonic()
    _CHILDREN.add(pid)
    chunks = []
    try:
        os.set_blocking(rfd, False)
        while True:
            try:
                b = os.read(rfd, 65536)
                if b:
                    chunks.append(b)
            except BlockingIOError:
                pass
            done, wstatus = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() - t0 > timeout:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return None, time.monotonic() - t0
            time.sleep(0.01)
        while True:
            try:
                b = os.read(rfd, 65536)
            except BlockingIOError:
                break
            if not b:
                break
            chunks.append(b)
    finally:
        os.close(rfd)
        _CHILDREN.discard(pid)
    raw = b"".join(chunks).decode()
    if raw:
        return json.loads(raw), time.monotonic() - t0
    if os.WIFSIGNALED(wstatus):  # e.g. a mutated ctypes call that reads outside an array: SIGSEGV
        sig = os.WTERMSIG(wstatus)
        name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
        return {"crash": f"the test process died of {name}", "signal": sig}, time.monotonic() - t0
    return {"crash": "no result from the child"}, time.monotonic() - t0


def _fresh_pytest(work: Path, args: list[str], timeout: float) -> dict:
    """The fresh-import path: pytest.main in a forked child of a process that never imported the project.

    The child imports the project (the mutant included, written into ``work`` by the caller) from
    ``work`` and collects only the test files named in ``args``.
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        res: dict = {}
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.close(rfd)
            os.chdir(work)
            sys.path.insert(0, str(work))
            os.environ.update(HYPOTHESIS_PROFILE="ci", PYTHONDONTWRITEBYTECODE="1")
            sys.dont_write_bytecode = True
            import importlib.util

            spec = importlib.util.find_spec("verify")
            if spec is None or not str(spec.origin).startswith(str(work)):
                res = {"code": 98}
            else:
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 1)
                os.dup2(null, 2)
                import pytest

                rec = _Recorder()
                code = int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", "-p", "no:cov", "-m", "not slow",
                                        f"--basetemp={work}/.tmp", *args], plugins=[rec]))
                res = {"code": code, "failed": rec.failed, "ran": rec.ran}
        except BaseException:  # noqa: BLE001 - any crash of the child is reported
            import traceback

            res = {"code": 96, "crash": traceback.format_exc()[-600:]}
        finally:
            os.write(wfd, json.dumps(res).encode())
            os._exit(0)
    os.close(wfd)
    res, dt = _wait_child(pid, rfd, timeout)
    if res is None:
        return {"status": "timeout", "seconds": dt}
    code = res.get("code", 96)
    if code == 98:
        raise SystemExit(f"the scratch copy {work} does not shadow the installed verify package; aborting")
    if code == 0:
        status = "survived"
    elif code in (1, 2, 3):  # tests failed / collection error (the mutant does not import) / internal error
        status = "killed"
    elif code == 5:
        status = "no-tests"
    else:
        status = "error"
    return {**res, "status": status, "seconds": dt}


def _zygote(req: int, resp: int) -> None:
    """The fresh path's server: forked before the project is imported; runs one pytest child per request."""
    signal.signal(signal.SIGTERM, _terminate)
    with os.fdopen(req, "r") as fh:
        for line in fh:
            r = json.loads(line)
            try:
                out = _fresh_pytest(Path(r["work"]), r["args"], r["timeout"])
            except SystemExit as e:
                out = {"status": "error", "why": str(e)}
            os.write(resp, (json.dumps(out) + "\n").encode())
    os._exit(0)


#: Third-party modules the runner imports once, before forking anything (saves seconds per mutant).
#: Not hypothesis: a pytest plugin imported before pytest starts cannot be assertion-rewritten (a
#: warning, an error here); pytest loads it. JAX is imported, never initialised (no backend: a forked
#: child of an initialised XLA client can hang).
PRELOAD = ("numpy", "scipy", "scipy.linalg", "scipy.optimize", "scipy.special", "mpmath", "pytest", "numdifftools",
           "sympy", "torch", "jax", "jax.numpy", "threadpoolctl")


def _preload() -> None:
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    assert not any(m == "verify" or m.startswith(("verify.", "reference")) for m in sys.modules), \
        "the runner must not import the project before forking the fresh-import server"


def _jax_initialised() -> bool:
    xb = sys.modules.get("jax._src.xla_bridge")
    return bool(getattr(xb, "_backends", None))


#: Test files the parent session does not collect: they initialise a JAX backend at import (XLA's
#: threads do not survive a fork). Their tests still run, on the fresh path (a pytest process of their own).
SESSION_IGNORE: tuple[str, ...] = ("tests/jax/test_jax_errors.py",)

#: Modules others are likely to change during a session: run last (their results may go stale).
RUN_LAST: tuple[str, ...] = (
    "reference/_threads.py", "reference/maml.py", "reference/imaml.py", "reference/r2d2.py",
    "reference/protonet.py", "reference/matchingnet.py", "reference/lrd2.py", "reference/newton.py",
    "reference/flow.py", "reference/reptile.py", "reference/inner_loop.py", "reference/learned_optimizers.py",
    "reference/inner_optim.py", "reference/optimizers.py", "verify/_taylor.py",
)


class Driver:
    """pytest plugin that replaces the test loop by the mutation loop (see the module docstring).

    The parent session (project imported from the scratch copy, every test collected once, nothing
    run) forks one child per mutant. The *fast* path swaps the mutated function's ``__code__`` in
    the child and runs the covering test items there through ``pytest_runtest_protocol`` (so
    fixtures, warnings-as-errors, hypothesis... behave as in a normal run). Everything the swap
    cannot reach honestly goes to the *fresh* path: the mutant is written into a second scratch
    copy and a child of the fresh-import server (forked before the project was imported) runs pytest
    there, importing the project, mutant included.
    """

    def __init__(self, runner: "Runner") -> None:
        self.r = runner
        #: project function (file, qualname, first line) -> the test files whose import/collection ran it
        #: ("*": the project's own import, conftest or a helper: any test may hold its results)
        self.called: dict[tuple[str, str, int], set[str]] = {}
        self._project = (str(runner.work / "reference") + os.sep, str(runner.work / "verify") + os.sep)
        self._tests = str(runner.work / "tests") + os.sep

    # -- the profiler: project functions run by the parent (import, collection), and for which test file
    def _profile(self, frame, event, arg) -> None:  # noqa: ARG002
        if event != "call":
            return
        co = frame.f_code
        if not co.co_filename.startswith(self._project):
            return
        src = "*"
        f = frame.f_back
        while f is not None:
            fn = f.f_code.co_filename
            if fn.startswith(self._tests):
                if os.path.basename(fn).startswith("test_"):
                    src = fn[len(self._tests) - len("tests/"):]
                break
            f = f.f_back
        self.called.setdefault((co.co_filename, co.co_qualname, co.co_firstlineno), set()).add(src)

    def start_profile(self) -> None:
        sys.setprofile(self._profile)
        threading.setprofile(self._profile)

    def pytest_collection_finish(self, session) -> None:
        import importlib

        for module in self.r.modules:  # modules no test imports are imported (and profiled) too
            try:
                importlib.import_module(module.removesuffix(".py").replace("/", "."))
            except Exception as e:  # noqa: BLE001
                self.r.log(f"cannot import {module}: {e!r}")
        sys.setprofile(None)
        threading.setprofile(None)

    def pytest_runtestloop(self, session) -> bool:
        self.session = session
        self.items = {it.nodeid: it for it in session.items}
        self.r.log(f"parent: {len(self.items)} test items collected; {len(self.called)} project functions ran "
                   f"at import/collection (their mutants take the fresh path); JAX initialised: {_jax_initialised()}")
        if _jax_initialised():
            self.r.log("WARNING: a JAX backend was initialised in the parent; forked JAX tests may hang "
                       "(a hang is a timeout, checked against an unmutated run, never a silent kill)")
        # Every child would otherwise walk (and so copy-on-write) the parent's whole heap at its first
        # full garbage collection: freeze what the parent holds, children only collect their own objects.
        gc.collect()
        gc.freeze()
        self.r.loop(self)
        return True

    # -- one forked run of test items -------------------------------------------------------------
    def run_items(self, nodes: list[str], apply, timeout: float) -> dict:
        items = [self.items[n] for n in nodes]
        rfd, wfd = os.pipe()
        with warnings.catch_warnings():  # JAX warns on any fork once initialised (see SESSION_IGNORE)
            warnings.simplefilter("ignore")
            pid = os.fork()
        if pid == 0:
            res: dict = {}
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.close(rfd)
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 1)
                os.dup2(null, 2)
                tr = self.session.config.pluginmanager.get_plugin("terminalreporter")
                if tr is not None:
                    from _pytest.config import create_terminal_writer

                    tr._tw = create_terminal_writer(self.session.config, open(os.devnull, "w"))  # noqa: SIM115
                if apply is not None:
                    apply()
                rec = self.r.recorder
                rec.failed, rec.ran = None, 0  # the parent's collection reports are not this run's
                for k, item in enumerate(items):
                    nxt = items[k + 1] if k + 1 < len(items) else None
                    item.ihook.pytest_runtest_protocol(item=item, nextitem=nxt)
                    if rec.failed is not None or self.session.shouldstop:
                        break
                res = {"failed": rec.failed, "ran": rec.ran}
            except BaseException:  # noqa: BLE001
                import traceback

                res = {"crash": traceback.format_exc()[-600:]}
            finally:
                os.write(wfd, json.dumps(res).encode()[:60000])
                os._exit(0)
        os.close(wfd)
        res, dt = _wait_child(pid, rfd, timeout)
        if res is None:
            return {"status": "timeout", "seconds": dt}
        if "crash" in res:
            return {**res, "status": "error", "seconds": dt}
        return {**res, "status": "killed" if res.get("failed") else "survived", "seconds": dt}


class Runner:
    """The mutation loop: plans each mutant (path, tests, timeout), runs it, checks kills and timeouts."""

    def __init__(self, modules: list[str], shard: tuple[int, int], timeout_factor: float, max_mutants: int | None,
                 survivors_only: bool, log, force: str | None = None, only: dict[str, set[str]] | None = None,
                 store: bool = True, budget: float | None = None, complete_partial: bool = False) -> None:
        self.modules = modules
        self.shard = shard
        self.factor = timeout_factor
        self.max = max_mutants
        self.survivors_only = survivors_only
        self.log = log
        self.force = force  # "fast" / "fresh" / "both": the selftest runs a mutant by one path on purpose
        self.budget = budget
        self.complete_partial = complete_partial
        self.only = only
        self.store = store
        self.recorder = _Recorder()
        self.tag = f"{shard[0]}of{shard[1]}-{os.getpid()}"
        self.work = SCRATCH / f"work-{self.tag}"
        self.fresh = SCRATCH / f"fresh-{self.tag}"
        self.map = load_map()
        # module -> new lines a remapped map knows nothing of (from `coverage --update`, and remaps in this run)
        self.unknown_lines: dict[str, set[int]] = {k: set(v) for k, v in (self.map or {}).get("unknown", {}).items()}
        self.tree = tree_hash()
        self.broken: set[str] = set()
        self.kills: dict[str, dict[str, int]] = {}  # "module::function" and "module" -> killer test -> kills
        self._scope = ""
        self.baseline_ok: dict[str, bool] = {}
        # (path, tests) -> their unmutated run, the reference a timeout or a crash on a mutant is judged against
        self.baseline_runs: dict[tuple[str, tuple[str, ...]], dict] = {}
        self.outcomes: list[dict] = []
        self.stats = {"fast": 0, "fresh": 0, "none": 0, "killed": 0, "survived": 0, "timeout": 0,
                      "timeout-inconclusive": 0, "no-coverage": 0}
        self.t0 = time.time()

    # -- setup ------------------------------------------------------------------------------------
    def _copy(self, dest: Path) -> None:
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis")
        for name in COPY:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, dest / name, ignore=ignore)
            elif src.exists():
                shutil.copy2(src, dest / name)

    def start(self) -> int:
        self._copy(self.work)
        self._copy(self.fresh)
        if self.map is None:
            self.log("no coverage map (.mutation/coverage-map.json): every mutant runs its module's mapped test "
                     "files; build one with `python scripts/mutation.py coverage`")
        elif self.map["tree"] != self.tree:
            self.log(f"WARNING: the coverage map is stale (collected from tree {self.map['tree']}, the tree is now "
                     f"{self.tree}); a module whose source changed is carried through a diff (remap_lines) or "
                     "runs its mapped test files, and tests added since run for every mutant of the modules whose "
                     "test files hold them: rebuild with `python scripts/mutation.py coverage` for exact selection")
        _preload()
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        zpid = os.fork()
        if zpid == 0:
            os.close(req_w)
            os.close(resp_r)
            _zygote(req_r, resp_w)
        os.close(req_r)
        os.close(resp_w)
        self.zygote = (zpid, os.fdopen(req_w, "w"), os.fdopen(resp_r, "r"))
        _CHILDREN.add(zpid)
        import pytest

        driver = Driver(self)
        os.chdir(self.work)
        sys.path.insert(0, str(self.work))
        os.environ.update(HYPOTHESIS_PROFILE="ci", PYTHONDONTWRITEBYTECODE="1")
        sys.dont_write_bytecode = True
        driver.start_profile()
        try:
            code = pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:cov", "-p", "no:xdist", "-m", "not slow",
                                f"--basetemp={self.work}/.tmp", "--ignore=tests/test_mutation_sample.py",
                                *(f"--ignore={f}" for f in SESSION_IGNORE), "tests"],
                               plugins=[driver, self.recorder])
        finally:
            sys.setprofile(None)
            os.chdir(ROOT)
            self.zygote[1].close()
            try:
                os.waitpid(zpid, 0)
            except OSError:
                pass
            _CHILDREN.discard(zpid)
            shutil.rmtree(self.work, ignore_errors=True)
            shutil.rmtree(self.fresh, ignore_errors=True)
        return 0 if int(code) in (0, 5) else int(code)

    def fresh_run(self, args: list[str], timeout: float) -> dict:
        _pid, w, r = self.zygote
        w.write(json.dumps({"work": str(self.fresh), "args": args, "timeout": timeout}) + "\n")
        w.flush()
        line = r.readline()
        if not line:
            raise SystemExit("the fresh-import server died")
        return json.loads(line)

    # -- test selection ---------------------------------------------------------------------------
    def _mapped_nodes(self, module: str) -> list[str]:
        files = set(tests_for(module))
        extra = PYTEST_EXTRA.get(module, [])
        excl = extra[1].removeprefix("not ").strip() if len(extra) == 2 and extra[0] == "-k" else None
        return [n for n in self.driver.items if n.split("::")[0] in files and not (excl and excl in n)]

    def _ids(self, module: str, lines) -> set[int]:
        table = self.map["lines"].get(module, {})
        out: set[int] = set()
        for ln in lines:
            out.update(table.get(str(ln), ()))
        return out

    def _usable(self, ids: set[int]) -> list[str]:
        tests, outcome = self.map["tests"], self.map["outcome"]
        return [tests[i] for i in ids if i != IMPORT_CTX and outcome[i] in ("passed", "unknown")
                and tests[i] not in self.broken]

    def _seconds(self, nodes: list[str]) -> float:
        if self.map is None:
            return 1.0 * len(nodes)
        sec = self._sec
        return sum(sec.get(n, 1.0) for n in nodes)

    def _order(self, nodes: list[str], scope: str = "") -> list[str]:
        """Tests that already killed mutants of the same function first, then of the module, then fastest.

        Only the order changes (a kill stays a kill whatever test finds it); with a budget, the tests
        most likely to kill are the ones run.
        """
        sec = self._sec if self.map is not None else {}
        here = self.kills.get(scope, {})
        module = self.kills.get(scope.split("::")[0], {})
        return sorted(set(nodes), key=lambda n: (-here.get(n, 0), -module.get(n, 0), sec.get(n, 1.0), n))

    def plan(self, module: str, loc: Locator, line: int, map_ok: bool) -> dict:
        """Which tests cover a mutant at ``line``; with a stale map, plus the tests the map does not know."""
        plan = self._plan(module, loc, line, map_ok)
        if map_ok and self.map["tree"] != self.tree:
            # tests added since the map was built (e.g. to kill survivors): unknown coverage, so every new test
            # of the module's mapped files and of the files the selection already uses runs too
            known = self._known if hasattr(self, "_known") else set(self.map["tests"])
            self._known = known
            files = set(tests_for(module)) | {n.split("::")[0] for n in plan["tests"]}
            new = [n for n in self.driver.items if n not in known and n.split("::")[0] in files]
            if new:
                plan["tests"] = sorted(set(plan["tests"]) | set(new))
                plan["why"] += f" + {len(new)} tests newer than the coverage map"
        return plan

    def _plan(self, module: str, loc: Locator, line: int, map_ok: bool) -> dict:
        kind, d = loc.where(line)
        plan = {"kind": kind, "def": d, "line": line}
        if not map_ok:
            plan["tests"] = self._mapped_nodes(module)
            plan["why"] = "mapped test files (no usable coverage map for this module)"
            return plan
        if self.unknown_lines.get(module) and set(loc.statement_lines(line)) & self.unknown_lines[module]:
            plan["tests"] = self._mapped_nodes(module)
            plan["why"] = "code written after the coverage map: mapped test files"
            return plan
        if kind == "body":
            ids = self._ids(module, loc.statement_lines(line))
        elif kind == "signature":  # a default is read by any call: the tests that run the body
            ids = self._ids(module, range(d[0].body[0].lineno, d[0].end_lineno + 1))
        else:  # module level, class body, decorator: the tests that read the names the statement binds
            top = loc.top_statement(line)
            names = _bound_names(top) if top is not None else set()
            if kind == "decorator":
                names.add(d[0].name)
            ids = self._ids(module, loc.name_load_lines(names)) if names else set()
            if isinstance(top, ast.ClassDef):  # class body: everything that runs the class's methods
                ids |= self._ids(module, range(top.lineno, top.end_lineno + 1))
            ids.discard(IMPORT_CTX)
            nodes = self._usable(ids)
            if not nodes or any(not n.startswith("_") for n in names):  # public: importers elsewhere too
                nodes = sorted(set(nodes) | set(self._mapped_nodes(module)))
                plan["why"] = "module-level: readers of its names + mapped test files"
            else:
                plan["why"] = "module-level: tests that read its names"
            plan["tests"] = nodes
            return plan
        nodes = self._usable(ids)
        if not nodes and IMPORT_CTX in ids:
            plan["tests"] = self._mapped_nodes(module)
            plan["why"] = "run only outside a test context (import time or a subprocess): mapped test files"
            plan["subprocess"] = True
        elif not nodes and ids:
            plan["tests"] = []
            plan["why"] = "covered only by tests that failed or were skipped in the baseline"
        else:
            plan["tests"] = nodes
            plan["why"] = "covering tests"
        return plan

    # -- applying a mutant in the session -----------------------------------------------------------
    def fast_apply(self, module: str, loc: Locator, plan: dict, mutated: str):
        """A closure that swaps the mutated function into the live objects, or (None, why not)."""
        if plan["kind"] == "module" and not plan.get("subprocess"):
            return self.const_apply(module, loc, plan, mutated)
        if plan["kind"] not in ("body", "signature") or plan.get("subprocess"):
            return None, f"{plan['kind']} code"
        node, qualname, ordinal = plan["def"]
        first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
        mod = sys.modules.get(module.removesuffix(".py").replace("/", "."))
        if mod is None:
            return None, "module not imported by the session"
        tainted = self.driver.called.get((mod.__file__, qualname, first), set())
        if "*" in tainted:
            return None, "function ran at the project's import or in conftest (its results may be held anywhere)"
        funcs = _live_functions(mod, qualname, first)
        if not funcs:
            return None, "no live function object"
        try:
            code = compile(mutated, mod.__file__, "exec", dont_inherit=True)
        except SyntaxError as e:
            return None, f"does not compile: {e}"
        cands = _code_objects(code, qualname)
        same = [q for (_n, q, _k) in loc.defs if q == qualname]
        if len(cands) != len(same):
            return None, "mutated code objects do not match the definitions"
        new = cands[ordinal]
        if any(len(new.co_freevars) != len(f.__code__.co_freevars) for f in funcs):
            return None, "closure mismatch"
        defaults = None
        if plan["kind"] == "signature":
            mnode = [n for (n, q, _k) in Locator(mutated).defs if q == qualname][ordinal]
            try:
                g = vars(mod)
                pos = tuple(eval(compile(ast.Expression(e), mod.__file__, "eval"), g) for e in mnode.args.defaults)
                kw = {a.arg: eval(compile(ast.Expression(e), mod.__file__, "eval"), g)
                      for a, e in zip(mnode.args.kwonlyargs, mnode.args.kw_defaults) if e is not None}
            except Exception as e:  # noqa: BLE001 - a default naming a class-scope name, ...
                return None, f"defaults not evaluable at module scope: {e!r}"
            defaults = (pos or None, kw or None)

        self._tainted = tainted  # test files whose collection ran it: those tests take the fresh path

        def apply() -> None:
            for f in funcs:
                f.__code__ = new
                if defaults is not None:
                    f.__defaults__, f.__kwdefaults__ = defaults

        return apply, f"swap {qualname} ({len(funcs)} object{'s' if len(funcs) > 1 else ''})"

    def _name_index(self) -> None:
        """Once: names read by module-level code anywhere in the project, and which functions read each name."""
        self._toplevel_loads: set[str] = set()
        self._readers: dict[str, list[tuple[str, str, int]]] = {}
        for p in sorted([*(ROOT / "reference").rglob("*.py"), *(ROOT / "verify").rglob("*.py")]):
            if "__pycache__" in p.parts:
                continue
            rel = str(p.relative_to(ROOT))
            try:
                lc = Locator(p.read_text(encoding="utf-8"))
            except SyntaxError:
                continue

            def scan(body: list) -> None:
                for st in body:
                    if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        parts = [*st.decorator_list, *st.args.defaults, *(e for e in st.args.kw_defaults if e)]
                    elif isinstance(st, ast.ClassDef):
                        parts = [*st.decorator_list, *st.bases, *st.keywords]
                        scan(st.body)
                    else:
                        parts = [st]
                    for part in parts:
                        for n in ast.walk(part):
                            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
                                self._toplevel_loads.add(n.id)
                            elif isinstance(n, ast.Attribute):
                                self._toplevel_loads.add(n.attr)

            scan(lc.tree.body)
            live = str(self.work / rel)
            for d, q, _k in lc.defs:
                first = d.decorator_list[0].lineno if d.decorator_list else d.lineno
                for n in ast.walk(d):
                    name = n.id if isinstance(n, ast.Name) else n.attr if isinstance(n, ast.Attribute) else None
                    if name is not None:
                        self._readers.setdefault(name, []).append((live, q, first))

    def const_apply(self, module: str, loc: Locator, plan: dict, mutated: str):
        """A module-level constant (``NAME = expr``): re-run the mutated statement in the live module.

        Safe only when nothing computed from the name at import or collection time holds the old
        value: no module-level code of the project reads the name, and no function that reads it
        ran in the parent. Modules that imported the name (``from m import NAME``, same object) are
        rebound too.
        """
        if not hasattr(self, "_readers"):
            self._name_index()
        top = loc.top_statement(plan["line"])
        if not isinstance(top, (ast.Assign, ast.AnnAssign)) or (isinstance(top, ast.AnnAssign) and top.value is None):
            return None, f"module-level {type(top).__name__ if top else 'code'}"
        names = _bound_names(top)
        if not names or names & self._toplevel_loads:
            return None, "module-level name read by other module-level code (a table, a default, a class body)"
        for name in names:
            for key in self._readers.get(name, ()):
                if key in self.driver.called:
                    return None, f"{key[1]} reads {name} and ran at import/collection time"
        mod = sys.modules.get(module.removesuffix(".py").replace("/", "."))
        if mod is None:
            return None, "module not imported by the session"
        index = loc.tree.body.index(top)
        mtree = ast.parse(mutated)
        if len(mtree.body) != len(loc.tree.body):
            return None, "mutated module has another statement count"
        try:
            code = compile(ast.Module(body=[mtree.body[index]], type_ignores=[]), mod.__file__, "exec")
        except SyntaxError as e:
            return None, f"does not compile: {e}"
        dotted = mod.__name__

        def apply() -> None:
            old = {n: mod.__dict__.get(n) for n in names}
            exec(code, mod.__dict__)  # noqa: S102 - the mutated statement, in its own module
            plain = (int, float, bool, str, complex, type(None))
            for other in list(sys.modules.values()):
                d = getattr(other, "__dict__", None)
                if other is mod or not isinstance(d, dict):
                    continue
                for n in names:
                    if n in d and d[n] is old[n]:
                        src = getattr(other, "__file__", "") or ""
                        if not isinstance(old[n], plain) or (src.endswith(".py") and dotted in Path(src).read_text(
                                encoding="utf-8", errors="replace")):
                            d[n] = mod.__dict__[n]

        return apply, f"re-run the constant {', '.join(sorted(names))}"

    # -- one mutant -------------------------------------------------------------------------------
    def timeout_for(self, nodes: list[str], fresh: bool) -> float:
        t = max(30.0, self.factor * self._seconds(nodes))
        return t + 30.0 if fresh else t  # the fresh path also imports the project and collects its files

    def _fresh_args(self, nodes: list[str]) -> list[str]:
        return nodes

    def run_fast(self, nodes, apply, timeout) -> dict:
        return self.driver.run_items(nodes, apply, timeout)

    def run_fresh(self, module: str, mutated: str | None, nodes: list[str], timeout: float) -> dict:
        target = self.fresh / module
        original = target.read_text(encoding="utf-8")
        if mutated is not None:
            target.write_text(mutated, encoding="utf-8")
        try:
            return self.fresh_run(self._fresh_args(nodes), timeout)
        finally:
            target.write_text(original, encoding="utf-8")

    def _killer_ok(self, killer: dict, path: str, module: str) -> bool:
        """An unmutated run of the killing test passes (else the kill is the environment's, not the mutant's)."""
        node = killer.get("node", "")
        if node not in self.baseline_ok:
            if path == "fast" and node in self.driver.items:
                res = self.driver.run_items([node], None, 300)
            else:
                args = [node] if "::" in node else [node, "--co"]
                res = self.run_fresh(module, None, args, 300)
            self.baseline_ok[node] = res["status"] == "survived"
            if not self.baseline_ok[node]:
                self.broken.add(node)
                self.log(f"  test {node} fails UNMUTATED in the {path} path ({res.get('failed') or res.get('status')}); "
                         "excluded from all selections")
        return self.baseline_ok[node]

    def _one(self, module: str, path: str, nodes: list[str], apply, mutated: str, rec: dict) -> str:
        """Run ``nodes`` on the mutant by ``path``; "killed" / "survived" / "retry" (a broken killer) / "error"."""
        timeout = self.timeout_for(nodes, path == "fresh")
        res = self.run_fast(nodes, apply, timeout) if path == "fast" else self.run_fresh(module, mutated, nodes, timeout)
        rec["runs"] = rec.get("runs", []) + [f"{path}: {len(nodes)} tests, {res['seconds']:.1f} s of {timeout:.0f} s"]
        rec["seconds"] = round(rec.get("seconds", 0.0) + res["seconds"], 2)
        status = res["status"]
        if status == "killed":
            killer = res.get("failed") or {"node": "", "why": f"pytest exit {res.get('code')}"}
            if killer.get("node") and not self._killer_ok(killer, path, module):
                return "retry"  # the test is broken in this environment: re-run without it
            for sc in (self._scope, self._scope.split("::")[0]):
                self.kills.setdefault(sc, {})[killer.get("node", "")] = self.kills.get(sc, {}).get(
                    killer.get("node", ""), 0) + 1
            rec.update(outcome="killed", killed_by=f"{killer.get('node')} [{killer.get('when', '')}] "
                                                   f"{killer.get('why', '')}"[:700])
            return "killed"
        if status == "survived":
            return "survived"
        if status == "timeout":
            base = self._unmutated(module, path, nodes, timeout)
            rec["baseline_seconds"] = round(base["seconds"], 2)
            if base["status"] == "survived" and base["seconds"] < timeout / 2:
                rec.update(outcome="timeout", killed_by=f"no result within {timeout:.0f} s; the unmutated tests "
                                                        "pass well inside it (an infinite loop or a slowdown)")
                return "killed"
            rec.update(outcome="timeout-inconclusive", killed_by="the unmutated tests do not pass well inside the "
                                                                 "limit either")
            return "error"
        if res.get("signal") in CRASH_SIGNALS:
            # The covering tests cannot finish on the mutant (the process dies, as a CI run would): killed, if the
            # same tests pass unmutated on this path (else the crash is the environment's).
            if self._unmutated(module, path, nodes, timeout)["status"] == "survived":
                rec.update(outcome="killed", crashed=True,
                           killed_by=f"{res['crash']} running the covering tests ({path} path); they pass unmutated")
                return "killed"
        rec.setdefault("errors", []).append(f"{path}: {status} {res.get('crash') or res.get('why', '')}"[:400])
        return "error"

    def _unmutated(self, module: str, path: str, nodes: list[str], timeout: float) -> dict:
        """``nodes``' run on the unmutated code by ``path`` (once per path and tests; cached)."""
        key = (path, tuple(nodes))
        if key not in self.baseline_runs:
            self.baseline_runs[key] = self.run_fast(nodes, None, timeout) if path == "fast" else self.run_fresh(
                module, None, nodes, timeout)
        return self.baseline_runs[key]

    def run_mutant(self, module: str, loc: Locator, m: dict, mutated: str, map_ok: bool, force: str | None) -> dict:
        """Plan, then run: the fast path on the session's items; tests the session lacks (and every test of
        a mutant the swap cannot reach) on the fresh path. Killed at the first failing test."""
        plan = self.plan(module, loc, m["line"], map_ok)
        rec: dict = {"why_tests": plan["why"]}
        self._tainted = set()
        apply, how = (None, "forced fresh") if force == "fresh" else self.fast_apply(module, loc, plan, mutated)
        if force == "fast" and apply is None:
            raise SystemExit(f"selftest: {module} line {m['line']} cannot take the fast path: {how}")
        rec["how"] = how
        for _attempt in range(6):
            scope = f"{module}::{plan['def'][1] if plan.get('def') else ''}"
            self._scope = scope
            nodes = self._order([n for n in plan["tests"] if n not in self.broken], scope)
            if not nodes:
                rec.update(outcome="survived", path="none", no_covering_test=True, n_tests=0)
                return rec
            covering = len(nodes)
            if self.budget is not None:
                nodes = _within_budget(nodes, self._sec, self.budget)
            rec.update(n_covering=covering, partial=len(nodes) < covering)
            tainted = self._tainted if apply is not None else set()
            inside = [n for n in nodes if n in self.driver.items and n.split("::")[0] not in tainted]
            outside = [n for n in nodes if n not in inside]
            stages = [("fast", inside), ("fresh", outside)] if apply is not None and inside else [("fresh", nodes)]
            rec.update(path=stages[0][0], n_tests=len(nodes))
            result = "survived"
            for path, group in stages:
                if not group:
                    continue
                result = self._one(module, path, group, apply if path == "fast" else None, mutated, rec)
                if result != "survived":
                    break
            if result == "retry":
                continue
            if result == "survived":
                rec["outcome"] = "survived"
            elif result == "error":
                if apply is not None and force is None and rec.get("outcome") != "timeout-inconclusive":
                    apply, rec["how"] = None, f"{how}; the fast run errored, so the fresh path"
                    continue
                rec.setdefault("outcome", "error")
            return rec
        rec.update(outcome="error", errors=rec.get("errors", []) + ["too many broken killers"])
        return rec

    # -- the loop ---------------------------------------------------------------------------------
    def loop(self, driver: Driver) -> None:
        self.driver = driver
        self._sec = dict(zip(self.map["tests"], self.map["seconds"])) if self.map else {}
        i, n = self.shard
        done = 0
        equivalent = load_equivalent()
        for module in self.modules:
            every = enumerate_mutants(module)
            mutants = [mm for k, mm in enumerate(every) if k % n == i - 1]
            if self.only is not None:
                mutants = [mm for mm in mutants if mm["key"] in self.only.get(module, set())]
            indexed = {mm["key"]: k for k, mm in enumerate(every)}
            data = load_results(module)
            if data.get("fingerprint") != _fingerprint(module):
                if self.survivors_only and data.get("mutants"):
                    self.log(f"{module}: its source changed since its results, so they have no survivors to re-run; "
                             "run the module without --survivors-only")
                data = {"mutants": {}}
            tests_fp = _tests_fingerprint(module)
            if self.only is not None:
                todo = mutants
            elif self.complete_partial:  # survivors of a budgeted run: now every covering test
                todo = [mm for mm in mutants if data["mutants"].get(mm["key"], {}).get("outcome") == "survived"
                        and data["mutants"][mm["key"]].get("partial")
                        and mm["key"] not in equivalent.get(module, {})]
            else:
                cur_map = self.map["tree"] if self.map else None

                def rerun(rec: dict, key: str) -> bool:
                    """A survivor is re-run when its tests changed, or when it was partial under a staler map."""
                    if rec["outcome"] != "survived" or (self.survivors_only and key in equivalent.get(module, {})):
                        return False
                    return rec.get("tests") != tests_fp or bool(rec.get("partial") and rec.get("map") != cur_map)

                todo = [mm for mm in mutants if (mm["key"] not in data["mutants"] and not self.survivors_only)
                        or (mm["key"] in data["mutants"] and rerun(data["mutants"][mm["key"]], mm["key"]))]
            self.log(f"{module}: {len(mutants)} mutants in shard {i}/{n}, {len(todo)} to run")
            if not todo:
                continue
            map_ok = self.map is not None and self.map["modules"].get(module) == _fingerprint(module) \
                and module in self.map["lines"]
            source = (ROOT / module).read_text(encoding="utf-8")
            if (self.map is not None and not map_ok and module in self.map["lines"]
                    and module in self.map.get("sources", {})):
                table, unknown = remap_lines(self.map["sources"][module], source, self.map["lines"][module])
                self.map["lines"][module] = table
                self.map["modules"][module] = _fingerprint(module)
                self.map.setdefault("sources", {})[module] = source
                self.unknown_lines[module] = unknown
                map_ok = True
                self.log(f"  {module}: changed since the coverage map: {len(table)} lines carried through the diff "
                         f"(a touched function's lines get every test that ran it), {len(unknown)} lines of new code "
                         "run the mapped test files")
            elif self.map is not None and not map_ok:
                self.log(f"  {module}: not in the coverage map or changed since it was built: mapped test files")
            loc = Locator(source)
            mutator = Mutator(module)
            for mm in todo:
                if self.max is not None and done >= self.max:
                    return
                mutated = mutator.mutate(mm["operator"], mm["occurrence"])
                record = {"index": indexed[mm["key"]], "operator": mm["operator"], "occurrence": mm["occurrence"],
                          "line": mm["line"], "tests": tests_fp, "map": self.map["tree"] if self.map else None}
                t0 = time.monotonic()
                invalid = None
                if mutated is not None:
                    try:
                        compile(mutated, module, "exec", dont_inherit=True)
                    except SyntaxError as e:  # Cosmic Ray's rewrite is not Python (e.g. {**d} -> {*d}): no mutant
                        invalid = f"the rewrite does not compile: {e.msg} (line {e.lineno})"
                if mutated is None:
                    record.update(outcome="no-mutation")
                elif invalid is not None:
                    record.update(outcome="invalid", why=invalid, diff=diff_of(module, mutated))
                elif self.force == "both":  # the selftest: each path on its own, side by side
                    for force in ("fast", "fresh"):
                        self.outcomes.append({"module": module, "key": mm["key"], "force": force,
                                              **self.run_mutant(module, loc, mm, mutated, map_ok, force)})
                        o = self.outcomes[-1]
                        self.log(f"  {mm['key']:50s} line {mm['line']:4d} [{force}]: {o['outcome']} via {o.get('path')} "
                                 f"{o.get('n_tests')} tests {o.get('seconds')} s ({o.get('how')})")
                    continue
                else:
                    record.update(self.run_mutant(module, loc, mm, mutated, map_ok, self.force))
                    if record["outcome"] in ("survived", "timeout-inconclusive", "error"):
                        record["diff"] = diff_of(module, mutated)
                record["wall"] = round(time.monotonic() - t0, 2)
                self.outcomes.append({"module": module, **record, "key": mm["key"]})
                if self.store:
                    _store(module, mm["key"], record)
                done += 1
                self._count(record)
                self.log(f"  {mm['key']:50s} line {mm['line']:4d}: {record['outcome']:9s} "
                         f"{record.get('path', '-'):5s} {record.get('n_tests', 0):4d} tests {record['wall']:6.1f} s"
                         f"{'  (no covering test)' if record.get('no_covering_test') else ''}"
                         f"{'  (partial: %s of %s covering tests)' % (record['n_tests'], record['n_covering']) if record.get('partial') and record['outcome'] == 'survived' else ''}")
                if self.store and done % 25 == 0:
                    self.save_run()
        if self.store:
            self.save_run()

    def _count(self, record: dict) -> None:
        self.stats[record.get("path", "none")] = self.stats.get(record.get("path", "none"), 0) + 1
        if record.get("no_covering_test"):
            self.stats["no-coverage"] += 1
        self.stats[record["outcome"]] = self.stats.get(record["outcome"], 0) + 1

    def save_run(self) -> None:
        """reports/mutation/runs.json: this run's wall time, throughput and paths (the report quotes it)."""
        path = OUT / "runs.json"
        with open(OUT / "runs.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            self._save_run_locked(path)

    def _save_run_locked(self, path: Path) -> None:
        runs = json.loads(path.read_text()) if path.exists() else []
        runs = [r for r in runs if r.get("id") != self.tag]
        n = sum(1 for o in self.outcomes if o["outcome"] != "no-mutation")
        wall = time.time() - self.t0
        runs.append({"id": self.tag, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.t0)),
                     "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_s": round(wall),
                     "mutants": n, "per_minute": round(60.0 * n / wall, 1) if wall > 0 else None,
                     "load": os.getloadavg()[0], "map": self.map["tree"] if self.map else None, **self.stats})
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(runs, indent=1) + "\n")
        tmp.replace(path)


def _parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 1, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise SystemExit(f"--shard={text!r} must be I/N with 1 <= I <= N, e.g. --shard 2/4") from None
    if not 1 <= i <= n:
        raise SystemExit(f"--shard={text!r} must be I/N with 1 <= I <= N, e.g. --shard 2/4")
    return i, n


def _check_paths(paths: list[str]) -> list[str]:
    scope = default_modules()
    out = []
    for p in paths:
        p = p.rstrip("/")
        hits = [m for m in scope if m == p or m.startswith(p + "/")]
        if not hits:
            raise SystemExit(f"path {p!r} is not a module in scope (the engine modules of scripts/mutation.py "
                             f"ENGINE and reference/); in scope: {', '.join(scope)}")
        out += [h for h in hits if h not in out]
    return out


def _within_budget(nodes: list[str], seconds: Mapping[str, float], budget: float) -> list[str]:
    """The tests a budgeted mutant runs: in the given order, each one that still fits in ``budget`` seconds.

    A test that does not fit is skipped, not the end of the list: a slow test that killed a neighbour
    (ordered first) must not crowd out the fast tests behind it. At least one test runs (the first, when
    none fits). Unknown durations count 1 s.
    """
    acc, keep = 0.0, []
    for n in nodes:
        t = seconds.get(n, 1.0)
        if acc + t <= budget:
            keep.append(n)
            acc += t
    return keep or nodes[:1]


def _budget(given: float | None, complete_partial: bool) -> float | None:
    """The per-mutant test budget in seconds (``None``: every covering test).

    A plain run defaults to 10 s; ``--complete-partial`` defaults to every covering test, and takes an
    explicit ``--budget`` (larger than the first run's) to re-run its partial survivors in stages.
    """
    if given is None:
        return None if complete_partial else 10.0
    if given < 0:
        raise SystemExit(f"mutation.py run: --budget={given!r} must be >= 0 (0: every covering test)")
    return None if given == 0 else given


def run(paths: list[str], shard: str | None, timeout_factor: float, max_mutants: int | None,
        survivors_only: bool = False, budget: float | None = None, complete_partial: bool = False) -> int:
    sh = _parse_shard(shard)
    if paths:  # the order given (folders expanded in place): the caller prioritises
        modules = _check_paths(paths)
    else:
        modules = default_modules()
        modules = [m for m in modules if m not in RUN_LAST] + [m for m in RUN_LAST if m in modules]
    # SIGTERM (kill PID) ends the run cleanly: the scratch copies are removed, finished results are kept.
    signal.signal(signal.SIGTERM, _terminate)
    out = os.fdopen(os.dup(1), "w", buffering=1)  # pytest captures fd 1 in the session; the log keeps it

    def log(msg: str) -> None:
        out.write(time.strftime("%H:%M:%S ", time.gmtime()) + msg + "\n")
        out.flush()

    # --complete-partial re-runs budgeted survivors with every covering test, or, with an explicit larger
    # --budget, with that many seconds of them (a survivor of the larger budget stays partial if some remain).
    return Runner(modules, sh, timeout_factor, max_mutants, survivors_only, log, budget=budget,
                  complete_partial=complete_partial).start()


# ---------------------------------------------------------------------------------------------
# report


def load_equivalent() -> dict[str, dict[str, str]]:
    """``{module: {key: argument}}`` from reports/mutation/equivalent.toml."""
    if not EQUIVALENT.exists():
        return {}
    data = tomllib.loads(EQUIVALENT.read_text())
    return {mod: dict(entries) for mod, entries in data.items()}


def report() -> int:
    equivalent = load_equivalent()
    rows, survivors, other = [], [], []
    scope = default_modules()
    totals = dict.fromkeys(("mutants", "run", "killed", "timeout", "gaps", "nocov", "partial", "eq", "other", "fast", "fresh"), 0)
    for module in scope:
        path = _results_path(module)
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        stale = data.get("fingerprint") != _fingerprint(module)
        keys = {m["key"] for m in enumerate_mutants(module)}
        recs = {k: r for k, r in data["mutants"].items() if k in keys}
        # not mutants: no occurrence, or a rewrite that is not Python (recorded as an error by earlier runs)
        run_ = {k: r for k, r in recs.items() if r["outcome"] not in ("no-mutation", "invalid")
                and not str(r.get("how", "")).startswith("does not compile")}
        killed = [k for k, r in run_.items() if r["outcome"] in ("killed", "timeout")]
        timeouts = [k for k, r in run_.items() if r["outcome"] == "timeout"]
        surv = [k for k, r in run_.items() if r["outcome"] == "survived"]
        undecided = [k for k, r in run_.items() if r["outcome"] not in ("killed", "timeout", "survived")]
        eq = [k for k in surv if k in equivalent.get(module, {})]
        gaps = [k for k in surv if k not in eq]
        nocov = [k for k in gaps if run_[k].get("no_covering_test")]
        partial = [k for k in gaps if run_[k].get("partial")]
        denom = len(run_) - len(eq) - len(undecided)
        rate = 100.0 * len(killed) / denom if denom else float("nan")
        fast = sum(1 for r in run_.values() if r.get("path") == "fast")
        fresh = sum(1 for r in run_.values() if r.get("path") == "fresh")
        row = dict(mutants=len(keys), run=len(run_), killed=len(killed), timeout=len(timeouts), gaps=len(gaps),
                   nocov=len(nocov), partial=len(partial), eq=len(eq), other=len(undecided), fast=fast, fresh=fresh)
        rows.append((module, row, rate, stale))
        if not stale:
            for k, v in row.items():
                totals[k] += v
        for k in surv:
            survivors.append((module, k, run_[k], equivalent.get(module, {}).get(k)))
        for k in undecided:
            other.append((module, k, run_[k]))
    lines = [
        "# Mutation testing of the reference and the engine",
        "",
        "Generated by `bash scripts/mutation.sh report` from `reports/mutation/results/*.json`",
        "(method, operators and tool choice: `scripts/mutation.py`'s docstring). Kill rate = killed /",
        "(run - equivalent - undecided); a timeout counts as killed only when the same tests pass",
        "unmutated well inside the limit (column `timeouts`, included in `killed`), and so does a crash of",
        "the test process (SIGSEGV, SIGABRT, ...) when the same tests pass unmutated; `undecided` are",
        "timeouts whose unmutated tests are slow too, and runs that errored. `no test` = survivors on a line",
        "that no test executes (counted as gaps, never run); `partial` = survivors of the fastest / most",
        "often killing covering tests within the per-mutant budget (`--budget`), not of all of them. `run < mutants` means the module was only",
        "partly run; modules absent from the table were not run at all. Paths: `fast` = the mutated",
        "function's code swapped into a forked, pre-collected pytest session; `fresh` = the project",
        "imported anew with the mutant on disk (module-level code, functions run at import time).",
        "",
        "| module | mutants | run | killed | timeouts | survived (gaps) | of which no test | of which partial "
        "| equivalent | undecided | fast / fresh | kill rate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for module, row, rate, stale in rows:
        flag = " (stale: the module changed since)" if stale else ""
        lines.append(f"| `{module}`{flag} | {row['mutants']} | {row['run']} | {row['killed']} | {row['timeout']} | "
                     f"{row['gaps']} | {row['nocov']} | {row['partial']} | {row['eq']} | {row['other']} | {row['fast']} / {row['fresh']} "
                     f"| {rate:.1f} % |")
    denom = totals["run"] - totals["eq"] - totals["other"]
    overall = 100.0 * totals["killed"] / denom if denom else float("nan")
    lines.append(f"| **all (not stale)** | {totals['mutants']} | {totals['run']} | {totals['killed']} | "
                 f"{totals['timeout']} | {totals['gaps']} | {totals['nocov']} | {totals['partial']} | {totals['eq']} | {totals['other']} | "
                 f"{totals['fast']} / {totals['fresh']} | {overall:.1f} % |")
    n_table = len(lines)
    not_run = [m for m in scope if not _results_path(m).exists()]
    if not_run:
        lines += ["", "Not run: " + ", ".join(f"`{m}`" for m in not_run) + "."]
    runs_path = OUT / "runs.json"
    if runs_path.exists():
        runs = json.loads(runs_path.read_text())
        lines += ["", "## Runs", "", "Wall time and throughput of each `run` (one process; `load` = 1-min load "
                  "average at the last update, of a shared 2-core machine).", "",
                  "| run | started (UTC) | last update | wall | mutants | per minute | fast | fresh | no test run "
                  "| load |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in runs:
            lines.append(f"| {r['id']} | {r['started']} | {r['updated']} | {r['wall_s'] / 60:.1f} min | {r['mutants']} "
                         f"| {r['per_minute']} | {r.get('fast', 0)} | {r.get('fresh', 0)} | {r.get('none', 0)} "
                         f"| {r.get('load', 0):.1f} |")
    lines += ["", "## Survivors", ""]
    if not survivors:
        lines.append("None.")
    for module, key, rec, why in survivors:
        if why:
            label = f"equivalent: {why}"
        elif rec.get("no_covering_test"):
            label = "**not killed: no test executes this line**"
        else:
            ran = (f"{rec.get('n_tests')} of {rec.get('n_covering')} covering tests ran (the budget's share: more "
                   "may kill it)" if rec.get("partial") else f"all {rec.get('n_tests', '?')} covering tests ran")
            label = f"**not killed: a gap in the tests** ({ran})"
        lines += [f"### `{module}` {key} (line {rec['line']}) -- {label}", "", "```diff",
                  rec.get("diff", "").rstrip(), "```", ""]
    if other:
        lines += ["## Undecided (timeouts with slow baselines, errors)", ""]
        for module, key, rec in other:
            lines += [f"- `{module}` {key} (line {rec['line']}): {rec['outcome']}: "
                      f"{(rec.get('killed_by') or '; '.join(rec.get('errors', [])))[:300]}"]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:n_table]))
    return 0


def list_mutants(paths: list[str]) -> int:
    modules = _check_paths(paths) if paths else default_modules()
    for module in modules:
        print(f"{module}: {len(enumerate_mutants(module))} mutants; tests: {' '.join(tests_for(module)) or 'NONE'}")
    return 0


#: The selftest's mutants: (module, the source text of the line, operator, the outcome it must have).
#: Each runs through BOTH paths (fast: ``__code__`` swapped in the forked session; fresh: the project
#: imported anew with the mutant on disk); the outcomes must agree with each other and with this table.
SELFTEST: tuple[tuple[str, str, str, str], ...] = (
    ("verify/_numdiff.py", "r2 = (16.0 * r1[:-1] - r1[1:]) / 15.0", "core/NumberReplacer", "killed"),
    ("verify/_numdiff.py", "self.evaluations = 0", "core/NumberReplacer", "survived"),
    ("verify/_dottest.py", "diff = abs(a - b)", "core/ReplaceBinaryOperator_Sub_Add", "killed"),
    ("verify/hessian_inverse.py", "r = np.linalg.norm(b64 - Ax)", "core/ReplaceBinaryOperator_Sub_Add", "killed"),
    ("reference/models.py", "return (self.s - self.onehot) * self.scale", "core/ReplaceBinaryOperator_Sub_Add",
     "killed"),
    ("reference/r2d2.py", "U_q, V_q = scale * G_O, W", "core/ReplaceBinaryOperator_Mul_Div", "killed"),
    # a module-level constant: the fast path re-runs the mutated assignment in the live module
    ("verify/_numdiff.py", "_ROMBERG_W = np.array([64.0, -20.0, 1.0]) / 45.0", "core/NumberReplacer", "killed"),
)


def selftest(mutator: bool) -> int:
    """Known mutants through both paths: the fast swap must be as real as a fresh import."""
    if mutator:  # the one-parse mutator reproduces Cosmic Ray's text exactly
        for module in default_modules():
            mt = Mutator(module)
            for m in enumerate_mutants(module):
                if mt.mutate(m["operator"], m["occurrence"]) != mutate(module, m["operator"], m["occurrence"]):
                    raise SystemExit(f"Mutator differs from Cosmic Ray: {module} {m['key']}")
            print(f"mutator ok: {module}", flush=True)
    only: dict[str, set[str]] = {}
    expect: dict[tuple[str, str], str] = {}
    for module, text, operator, outcome in SELFTEST:
        lines = (ROOT / module).read_text(encoding="utf-8").splitlines()
        hits = [k + 1 for k, ln in enumerate(lines) if ln.strip().startswith(text)]
        if len(hits) != 1:
            raise SystemExit(f"selftest: {text!r} is on {len(hits)} lines of {module}; update SELFTEST")
        keys = [m["key"] for m in enumerate_mutants(module) if m["line"] == hits[0] and m["operator"] == operator]
        if not keys:
            raise SystemExit(f"selftest: no {operator} mutant on line {hits[0]} of {module}")
        only.setdefault(module, set()).add(keys[0])
        expect[(module, keys[0])] = outcome
    out = os.fdopen(os.dup(1), "w", buffering=1)
    runner = Runner(list(only), (1, 1), 4.0, None, False, lambda msg: out.write(msg + "\n"), force="both", only=only,
                    store=False)
    runner.start()
    got: dict[str, dict] = {"fast": {}, "fresh": {}}
    for o in runner.outcomes:
        got[o["force"]][(o["module"], o["key"])] = o
    bad = 0
    for key, want in expect.items():
        fast, fresh = got["fast"].get(key, {}), got["fresh"].get(key, {})
        ok = fast.get("outcome") == fresh.get("outcome") == want and fast.get("path") == "fast" \
            and fresh.get("path") == "fresh"
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} {key[0]} {key[1]}: expected {want}; fast {fast.get('outcome')} "
              f"({fast.get('seconds')} s, {fast.get('n_tests')} tests), fresh {fresh.get('outcome')} "
              f"({fresh.get('seconds')} s)", flush=True)
    return 1 if bad else 0



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run mutants (resumes; results in reports/mutation/results)")
    r.add_argument("paths", nargs="*", help="modules or folders (default: every module of the map)")
    r.add_argument("--shard", help="I/N: run the I-th of N interleaved shards")
    r.add_argument("--timeout-factor", type=float, default=4.0, help="timeout = factor x baseline (>= 30 s)")
    r.add_argument("--max", type=int, default=None, help="stop after this many mutants (a time-boxed run)")
    r.add_argument("--budget", type=float, default=None,
                   help="per mutant, run covering tests (fastest first) up to this many seconds of their baseline "
                        "duration from the coverage run; a survivor that did not run them all is marked partial. "
                        "0: all covering tests. Default 10, and all covering tests with --complete-partial")
    r.add_argument("--survivors-only", action="store_true",
                   help="only re-run survivors (not those listed as equivalent) whose module's tests changed since")
    cov = sub.add_parser("coverage", help="collect the per-test coverage map (.mutation/coverage-map.json)")
    cov.add_argument("-n", type=int, default=1, help="pytest-xdist workers for this one collection run")
    cov.add_argument("--build-only", action="store_true", help="rebuild the map from the last collection's data")
    cov.add_argument("--update", nargs="*", metavar="TEST_FILE", default=None,
                     help="run only these test files (default: those added or changed since the map) under "
                          "coverage and merge them into the existing map")
    st = sub.add_parser("selftest", help="known mutants through both paths (fast swap, fresh import): same outcomes")
    st.add_argument("--mutator", action="store_true", help="also compare every mutant's text with Cosmic Ray's")
    r.add_argument("--complete-partial", action="store_true",
                   help="re-run only the partial survivors (budgeted runs), with every covering test")
    sub.add_parser("report", help="write reports/mutation/README.md from the results")
    rk = sub.add_parser("rekey", help="carry a module's equivalent-mutant keys from an older revision to the "
                                      "current source (keys are occurrence indices, which shift on edits)")
    rk.add_argument("module")
    rk.add_argument("--from", dest="rev", required=True, help="the git revision the keys were written against")
    rk.add_argument("--dry-run", action="store_true")
    lst = sub.add_parser("list", help="count the mutants per module")
    lst.add_argument("paths", nargs="*")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(args.paths, args.shard, args.timeout_factor, args.max, args.survivors_only,
                   _budget(args.budget, args.complete_partial), args.complete_partial)
    if args.command == "report":
        return report()
    if args.command == "rekey":
        return rekey(args.module, args.rev, args.dry_run)
    if args.command == "coverage":
        if args.update is not None:
            return update_map(args.update)
        return collect_coverage(args.n, args.build_only)
    if args.command == "selftest":
        return selftest(args.mutator)
    return list_mutants(args.paths)


if __name__ == "__main__":
    raise SystemExit(main())
