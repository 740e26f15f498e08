"""The mutation runner's coverage map survives edits (scripts/mutation.py ``remap_lines``, issue 19).

The map (the whole suite under coverage) is expensive; a module edited after it was built keeps
line-level test selection for the functions the edit did not touch, a superset for the ones it did,
and sends only genuinely new code to the module's whole test files.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("cosmic_ray")

_PATH = Path(__file__).resolve().parent.parent / "scripts" / "mutation.py"


@pytest.fixture(scope="module")
def mutation():
    spec = importlib.util.spec_from_file_location("_mutation_runner", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


OLD = """\
X = 1


def f(a):
    b = a + 1
    return b


def g(a):
    c = a * 2
    return c
"""

NEW = """\
X = 1
Y = 2


def f(a):
    b = a + 1
    return b


def g(a):
    c = a * 2
    c = c - 1
    return c


def h(a):
    return a
"""


def test_untouched_function_keeps_its_lines_touched_gets_the_union_new_code_is_unknown(mutation) -> None:
    # old lines: X=1 (1), f (4-6), g (9-11); per-line test ids chosen so that every rule is visible
    table = {"1": [0], "4": [1], "5": [1, 2], "6": [2], "9": [3], "10": [4], "11": [5]}
    out, unknown = mutation.remap_lines(OLD, NEW, table)
    # f moved down one line and is untouched: line-level ids carried unchanged
    assert (out["5"], out["6"], out["7"]) == ([1], [1, 2], [2])
    # g was edited: every line of it gets every test that ran any line of old g
    assert all(out[str(ln)] == [3, 4, 5] for ln in range(10, 14))
    # X = 1 carried; Y = 2 and the new function h are unknown (their mutants run the mapped test files)
    assert out["1"] == [0]
    assert {2, 16, 17} <= unknown and not unknown & {1, 5, 6, 7, 10, 11, 12, 13}


def test_identical_source_is_the_identity(mutation) -> None:
    table = {"1": [0], "4": [1], "5": [1, 2], "6": [2], "9": [3], "10": [4], "11": [5]}
    out, unknown = mutation.remap_lines(OLD, OLD, table)
    assert out == table and not unknown


@pytest.mark.parametrize(("given", "complete", "expected"), [
    (None, False, 10.0),   # a plain run: the documented default
    (None, True, None),    # --complete-partial: every covering test
    (30.0, True, 30.0),    # --complete-partial in stages: the explicit larger budget is kept
    (5.0, False, 5.0),
    (0.0, False, None),    # 0: every covering test
    (0.0, True, None),
])
def test_budget_defaults_and_explicit_values(mutation, given, complete, expected):
    assert mutation._budget(given, complete) == expected


def test_budget_skips_a_slow_test_and_keeps_the_fast_ones_behind_it(mutation):
    sec = {"slow_killer": 8.0, "a": 1.0, "b": 2.0, "c": 3.0, "d": 0.5}
    # the order is the runner's (killers first): the 8 s killer does not fit 5 s, the rest fill it in order
    assert mutation._within_budget(["slow_killer", "a", "b", "c", "d"], sec, 5.0) == ["a", "b", "d"]
    assert mutation._within_budget(["a", "b", "c"], sec, 6.0) == ["a", "b", "c"]      # exactly the budget fits
    assert mutation._within_budget(["slow_killer", "c"], sec, 2.0) == ["slow_killer"]  # none fits: the first runs
    assert mutation._within_budget(["unknown", "a"], sec, 1.5) == ["unknown"]         # unknown durations count 1 s
    assert mutation._within_budget([], sec, 5.0) == []


def test_negative_budget_is_refused_with_the_value(mutation):
    with pytest.raises(SystemExit, match=r"--budget=-1\.0 must be >= 0"):
        mutation._budget(-1.0, False)


REKEY_OLD = """\
def f(a):
    return a + 1


def g(a):
    return a * 2 + 3
"""

# a new function above both, a changed line in f: g's mutants move, f's "+ 1" mutants are gone
REKEY_NEW = """\
def h(a):
    return a - 5


def f(a):
    return a + 7


def g(a):
    return a * 2 + 3
"""


def test_rekey_follows_a_mutant_to_its_new_occurrence(mutation):
    old = {m["key"]: m for m in mutation._mutants_of_source(REKEY_OLD)}
    new = {m["key"]: m for m in mutation._mutants_of_source(REKEY_NEW)}
    g_old = [k for k, m in old.items() if m["line"] == 6 and k.startswith("core/NumberReplacer")]
    f_old = [k for k, m in old.items() if m["line"] == 2 and k.startswith("core/NumberReplacer")]
    assert g_old and f_old
    mapping = mutation._rekey_map(REKEY_OLD, REKEY_NEW, g_old + f_old)
    for k in g_old:  # same operator, same def, same removed/added lines: found in g, at its new line 10
        assert mapping[k] is not None and mapping[k] != k and new[mapping[k]]["line"] == 10
        assert (mutation._mutant_signature(REKEY_OLD, old[k]["operator"], old[k]["occurrence"])
                == mutation._mutant_signature(REKEY_NEW, new[mapping[k]]["operator"], new[mapping[k]]["occurrence"]))
    assert all(mapping[k] is None for k in f_old)  # its line changed: the argument must be made again
    assert len({mapping[k] for k in g_old}) == len(g_old)  # never two keys onto one


def test_no_test_module_caches_the_code_under_test_across_tests():
    """A cached build is covered by the first test only, so the runner would never select the others."""
    import re
    from pathlib import Path

    root = Path(__file__).parent
    cached = re.compile(r"functools\.(lru_cache|cache)\b|^\s*@(lru_cache|cache)\b", re.M)
    offenders = [str(p.relative_to(root)) for p in sorted(root.rglob("*.py")) if cached.search(p.read_text())
                 and p.name != "test_mutation_runner.py"]
    assert offenders == [], f"build the object inside each test instead of caching it: {offenders}"


@pytest.mark.skipif(sys.platform == "win32", reason="the runner forks its test children (POSIX)")
@pytest.mark.parametrize("how", ["segv", "abort", "silent"])
def test_a_child_that_dies_is_reported_with_its_signal(mutation, how):
    """A mutant that makes the test process crash (a ctypes call reading outside an array) is told apart from a
    child that merely wrote nothing: the signal comes back, and only the crash signals count as a kill.

    The child is a fresh interpreter (subprocess), not an ``os.fork()`` of this test process: a pytest worker that
    has run JAX tests warns at every fork, and warnings are errors here."""
    import os
    import signal
    import subprocess

    body = {"segv": "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "abort": "import os; os.abort()",
            "silent": "import os; os._exit(0)"}[how]
    rfd, wfd = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", body], pass_fds=(wfd,))
    os.close(wfd)
    try:
        res, _ = mutation._wait_child(proc.pid, rfd, 30)  # reaps the child itself (os.waitpid)
    finally:
        proc.returncode = 0  # reaped above: Popen must not wait for it again
    if how == "silent":
        assert res == {"crash": "no result from the child"}
        return
    sig = signal.SIGSEGV if how == "segv" else signal.SIGABRT
    assert res["signal"] == int(sig) and res["signal"] in mutation.CRASH_SIGNALS
    assert res["crash"] == f"the test process died of {sig.name}"
    assert int(signal.SIGKILL) not in mutation.CRASH_SIGNALS  # the runner's own timeout kill is not a crash
