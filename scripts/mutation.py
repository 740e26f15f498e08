"""Mutation testing of metaverify's reference and engine (issue 19): does the suite catch a planted bug?

Usage (through ``bash scripts/mutation.sh``)::

    python scripts/mutation.py run [PATHS ...] [--shard I/N] [--timeout-factor F] [--max N]
    python scripts/mutation.py report
    python scripts/mutation.py list [PATHS ...]

Each mutant is one small syntactic change of one module (``+`` -> ``-``, ``<`` ->
``<=``, a number ``c`` -> ``c +- 1``, a negated condition, a loop run zero times,
...). For each mutant only the tests that exercise that module run (the
:data:`TESTS` map, fastest files first, ``pytest -x``): a failing test *kills* the
mutant, a passing run lets it *survive*. A survivor is either a gap in the tests
or an *equivalent* mutant (same behaviour, e.g. a changed tie-break that no input
reaches); equivalents are listed with a one-line argument in
``reports/mutation/equivalent.toml`` and excluded from the kill rate.

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
after every mutant under a lock, so shards may run in parallel and an
interrupted run resumes where it stopped).

``report`` writes ``reports/mutation/README.md``: per module the mutants run,
killed, survived, equivalent, the kill rate of the non-equivalent ones, and
every survivor with its diff.
"""

from __future__ import annotations

import argparse
import difflib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import time
import tomllib
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
    **{f"verify/auditing/diagnosis/{m}.py": ["tests/audit/test_audit_api.py", "tests/audit/test_audit_corpus.py"]
       for m in ("catalogue", "core", "gradient", "implicit", "backbone", "optimizer")},
    "reference/r2d2.py": ["tests/test_ref_r2d2_independent.py", "tests/test_symbolic.py",
                          "tests/test_check_matrix.py"],
    "reference/maml.py": ["tests/test_ref_gradient_family.py", "tests/test_symbolic_reference.py"],
    "reference/anil.py": ["tests/test_ref_gradient_family.py", "tests/test_symbolic_reference.py"],
    "reference/metasgd.py": ["tests/test_ref_gradient_family.py", "tests/test_symbolic_reference.py"],
    "reference/reptile.py": ["tests/test_ref_gradient_family.py", "tests/test_symbolic_reference.py"],
    "reference/newton.py": ["tests/test_ref_gradient_family.py", "tests/test_symbolic_reference.py"],
    "reference/imaml.py": ["tests/test_ref_imaml.py", "tests/test_hessian_inverse.py"],
    "reference/protonet.py": ["tests/test_ref_metric.py"],
    "reference/matchingnet.py": ["tests/test_ref_metric.py"],
    "reference/lrd2.py": ["tests/test_ref_closed_form.py", "tests/test_check_matrix.py"],
    "reference/models.py": ["tests/test_models.py", "tests/test_ref_gradient_family.py"],
    "reference/inner_loop.py": ["tests/test_ref_gradient_family.py", "tests/test_symbolic_reference.py"],
    "reference/features.py": ["tests/test_ref_r2d2_independent.py", "tests/test_ref_metric.py",
                               "tests/test_ref_closed_form.py"],
    "reference/linalg.py": ["tests/test_ref_closed_form.py", "tests/test_ref_imaml.py"],
    "reference/flow.py": ["tests/test_flow.py"],
    "reference/validation.py": ["tests/test_ref_gradient_family.py", "tests/test_models.py",
                                 "tests/test_ref_metric.py"],
    "reference/tasks.py": ["tests/test_models.py", "tests/test_ref_gradient_family.py", "tests/test_flow.py"],
}
#: Extra pytest arguments per module (deselect slow corpus seeds, select the relevant part).
PYTEST_EXTRA: dict[str, list[str]] = {
    **{f"verify/auditing/diagnosis/{m}.py": ["-k", "not more_seeds"]
       for m in ("catalogue", "core", "gradient", "implicit", "backbone", "optimizer")},
}
#: What is copied into a shard's scratch copy of the project.
COPY = ["verify", "reference", "tests", "benchmarks", "pyproject.toml"]

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
    from cosmic_ray.ast import ast_nodes, get_ast_from_path
    from cosmic_ray.plugins import get_operator

    tree = get_ast_from_path(ROOT / module)
    nodes = list(ast_nodes(tree))
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
# running


def _scratch(tag: str) -> Path:
    """A fresh copy of the project for one shard (mutants are written there, never in the tree)."""
    work = SCRATCH / f"work-{tag}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis")
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, work / name)
    return work


#: Third-party modules the runner imports once; each mutant's test run is a fork of it (saves ~1 s of
#: CPU per mutant on this machine). verify/ and reference/ are never imported by the parent: the
#: forked child imports them fresh from the scratch copy, mutant included. Not hypothesis: a pytest
#: plugin imported before pytest starts cannot be assertion-rewritten (a warning, an error here).
PRELOAD = ("numpy", "scipy", "scipy.linalg", "scipy.optimize", "mpmath", "pytest", "numdifftools",
           "sympy")


_CHILDREN: set[int] = set()


def _terminate(*_: object) -> None:
    """SIGTERM: stop the running test child, then exit (the scratch copy is removed on the way out)."""
    for pid in list(_CHILDREN):
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
    sys.exit(143)


def _preload() -> None:
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    assert not any(m == "verify" or m.startswith(("verify.", "reference")) for m in sys.modules), \
        "the runner must not import the project (the forked test runs import the mutated copy)"


def _pytest(work: Path, module: str, timeout: float) -> tuple[str, float, str]:
    """Run the module's tests in ``work`` in a forked child: ("killed" | "survived" | "timeout", seconds, why)."""
    args = ["-x", "-q", "-p", "no:cacheprovider", "-m", "not slow", *PYTEST_EXTRA.get(module, []),
            *tests_for(module)]
    t0 = time.monotonic()
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: run pytest on the scratch copy, report the exit code through the pipe
        code = 97
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
                code = 98  # would test the installed tree, not the mutant
            else:
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 1)
                os.dup2(null, 2)
                import pytest

                code = int(pytest.main(args))
        except BaseException:  # noqa: BLE001 - any crash of the child is reported as its code
            import traceback

            (work / ".runner-crash.txt").write_text(traceback.format_exc())
            code = 96
        finally:
            os.write(wfd, str(code).encode())
            os._exit(0)
    os.close(wfd)
    _CHILDREN.add(pid)
    try:
        while True:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() - t0 > timeout:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return "timeout", time.monotonic() - t0, ""
            time.sleep(0.05)
        raw = os.read(rfd, 16).decode() or "95"
    finally:
        os.close(rfd)
        _CHILDREN.discard(pid)
    dt = time.monotonic() - t0
    code = int(raw)
    if code == 98:
        raise SystemExit(f"the scratch copy {work} does not shadow the installed verify package; aborting")
    if code == 0:
        return "survived", dt, "pytest exit 0"
    if code in (1, 2, 3):  # tests failed / interrupted / internal error (an import of the mutant failed)
        return "killed", dt, f"pytest exit {code}"
    crash = work / ".runner-crash.txt"
    why = crash.read_text()[-500:] if crash.exists() else ""
    return "killed", dt, f"pytest exit {code} (crash) {why}"


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


def run(paths: list[str], shard: str | None, timeout_factor: float, max_mutants: int | None,
        survivors_only: bool = False) -> int:
    i, n = _parse_shard(shard)
    modules = _check_paths(paths) if paths else default_modules()
    # SIGTERM (kill PID) ends the run cleanly: the scratch copy is removed, finished results are kept.
    signal.signal(signal.SIGTERM, _terminate)
    _preload()
    tag = f"{i}of{n}-{os.getpid()}"
    work = _scratch(tag)
    done_here = 0
    try:
        for module in modules:
            if not tests_for(module):
                print(f"{module}: no test imports it and it has no entry in TESTS; skipped (add one)", flush=True)
                continue
            every = enumerate_mutants(module)
            mutants = [m for k, m in enumerate(every) if k % n == i - 1]
            indexed = {m["key"]: k for k, m in enumerate(every)}
            data = load_results(module)
            if data.get("fingerprint") != _fingerprint(module):
                data = {"mutants": {}}
            tests_fp = _tests_fingerprint(module)
            todo = [m for m in mutants if (m["key"] not in data["mutants"] and not survivors_only)
                    or (m["key"] in data["mutants"] and data["mutants"][m["key"]]["outcome"] == "survived"
                        and data["mutants"][m["key"]].get("tests") != tests_fp
                        and not (survivors_only and m["key"] in load_equivalent().get(module, {})))]
            print(f"{module}: {len(mutants)} mutants in shard {i}/{n}, {len(todo)} to run", flush=True)
            if not todo:
                continue
            # baseline: the unmutated copy must pass (else every mutant would look killed)
            target = work / module
            original = target.read_text(encoding="utf-8")
            status, base_dt, tail = _pytest(work, module, timeout=1800)
            if status != "survived":
                print(f"  baseline FAILED for {module}; not mutating it:\n{tail}", flush=True)
                continue
            timeout = max(30.0, timeout_factor * base_dt)
            print(f"  baseline {base_dt:.1f} s, timeout {timeout:.0f} s", flush=True)
            for m in todo:
                if max_mutants is not None and done_here >= max_mutants:
                    return 0
                mutated = mutate(module, m["operator"], m["occurrence"])
                record = {"index": indexed[m["key"]], "operator": m["operator"], "occurrence": m["occurrence"],
                          "line": m["line"], "tests": tests_fp}
                if mutated is None:
                    record.update(outcome="no-mutation")
                else:
                    target.write_text(mutated, encoding="utf-8")
                    try:
                        outcome, dt, tail = _pytest(work, module, timeout)
                    finally:
                        target.write_text(original, encoding="utf-8")
                    record.update(outcome=outcome, seconds=round(dt, 1))
                    if outcome == "survived":
                        record["diff"] = diff_of(module, mutated)
                    else:
                        record["killed_by"] = tail
                _store(module, m["key"], record)
                done_here += 1
                print(f"  {m['key']:55s} line {m['line']:4d}: {record['outcome']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


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
    rows, survivors = [], []
    scope = default_modules()
    for module in scope:
        path = _results_path(module)
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        stale = data.get("fingerprint") != _fingerprint(module)
        keys = {m["key"] for m in enumerate_mutants(module)}
        total = len(keys)
        recs = {k: r for k, r in data["mutants"].items() if k in keys}
        run_ = {k: r for k, r in recs.items() if r["outcome"] != "no-mutation"}
        killed = [k for k, r in run_.items() if r["outcome"] in ("killed", "timeout")]
        surv = [k for k, r in run_.items() if r["outcome"] == "survived"]
        eq = [k for k in surv if k in equivalent.get(module, {})]
        gaps = [k for k in surv if k not in eq]
        denom = len(run_) - len(eq)
        rate = 100.0 * len(killed) / denom if denom else float("nan")
        rows.append((module, total, len(run_), len(killed), len(gaps), len(eq), rate, stale))
        for k in surv:
            survivors.append((module, k, run_[k], equivalent.get(module, {}).get(k)))
    lines = [
        "# Mutation testing of the reference and the engine",
        "",
        "Generated by `bash scripts/mutation.sh report` from `reports/mutation/results/*.json`",
        "(method, operators and tool choice: `scripts/mutation.py`'s docstring). Kill rate = killed /",
        "(run - equivalent); a timeout counts as killed. `run < mutants` means the module was only",
        "partly run (shards or `--max`); modules absent from the table were not run at all.",
        "",
        "| module | mutants | run | killed | survived (gaps) | equivalent | kill rate |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for module, total, ran, killed, gaps, eq, rate, stale in rows:
        flag = " (stale: the module changed since)" if stale else ""
        lines.append(f"| `{module}`{flag} | {total} | {ran} | {killed} | {gaps} | {eq} | {rate:.1f} % |")
    not_run = [m for m in scope if not _results_path(m).exists()]
    if not_run:
        lines += ["", "Not run: " + ", ".join(f"`{m}`" for m in not_run) + "."]
    lines += ["", "## Survivors", ""]
    if not survivors:
        lines.append("None.")
    for module, key, rec, why in survivors:
        label = f"equivalent: {why}" if why else "**not killed: a gap in the tests**"
        lines += [f"### `{module}` {key} (line {rec['line']}) -- {label}", "", "```diff",
                  rec.get("diff", "").rstrip(), "```", ""]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:9 + len(rows)]))
    return 0


def list_mutants(paths: list[str]) -> int:
    modules = _check_paths(paths) if paths else default_modules()
    for module in modules:
        print(f"{module}: {len(enumerate_mutants(module))} mutants; tests: {' '.join(tests_for(module)) or 'NONE'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run mutants (resumes; results in reports/mutation/results)")
    r.add_argument("paths", nargs="*", help="modules or folders (default: every module of the map)")
    r.add_argument("--shard", help="I/N: run the I-th of N interleaved shards")
    r.add_argument("--timeout-factor", type=float, default=4.0, help="timeout = factor x baseline (>= 30 s)")
    r.add_argument("--max", type=int, default=None, help="stop after this many mutants (a time-boxed run)")
    r.add_argument("--survivors-only", action="store_true",
                   help="only re-run survivors (not those listed as equivalent) whose module's tests changed since")
    sub.add_parser("report", help="write reports/mutation/README.md from the results")
    lst = sub.add_parser("list", help="count the mutants per module")
    lst.add_argument("paths", nargs="*")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(args.paths, args.shard, args.timeout_factor, args.max, args.survivors_only)
    if args.command == "report":
        return report()
    return list_mutants(args.paths)


if __name__ == "__main__":
    raise SystemExit(main())
