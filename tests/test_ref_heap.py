"""reference/_heap.py: when the reference changes glibc's malloc thresholds, to what, and that results do not care.

The decisions are tested on a fake C library (which calls, in which order, when none); the effect and
the numbers in fresh processes on the real glibc (skipped elsewhere).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from reference import _heap, _threads

ROOT = Path(__file__).resolve().parent.parent


class FakeLibc:
    """Records ``mallopt(param, value)``; answers from ``answers`` in turn (glibc: 1 on success, 0 when it refuses).

    ``mallopt`` is a plain function, so ``tune_heap`` can set its ``argtypes``/``restype`` as on a ctypes one."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.answers = [1, 1]

        def mallopt(param: int, value: int) -> int:
            self.calls.append((param, value))
            return self.answers[len(self.calls) - 1]

        self.mallopt = mallopt


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch):
    """The policy undecided, a clean malloc environment and a fake glibc; yields the fake."""
    fake = FakeLibc()
    monkeypatch.setattr(_heap, "_state", None)
    monkeypatch.setattr(_heap, "_glibc", lambda: fake)
    for name in _heap.USER_SETTINGS + (_heap.OPT_OUT, "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    yield fake


def test_glibcs_dynamic_maxima_are_set_once(fresh: FakeLibc) -> None:
    # glibc's malloc.h: M_TRIM_THRESHOLD -1, M_MMAP_THRESHOLD -3; DEFAULT_MMAP_THRESHOLD_MAX is
    # 4 MiB * sizeof(long), and the dynamic rule sets the trim threshold to twice the mmap threshold.
    mmap_max = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)
    assert _heap.tune_heap() is True
    assert fresh.calls == [(-3, mmap_max), (-1, 2 * mmap_max)]
    if ctypes.sizeof(ctypes.c_long) == 8:
        assert fresh.calls == [(-3, 32 * 2**20), (-1, 64 * 2**20)]
    assert _heap.tune_heap() is True and _heap.tune_heap() is True
    assert len(fresh.calls) == 2  # once per process


def test_concurrent_first_calls_set_it_once(fresh: FakeLibc) -> None:
    barrier = threading.Barrier(8)
    results: list[bool] = []

    def go() -> None:
        barrier.wait()
        results.append(_heap.tune_heap())

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 8
    assert len(fresh.calls) == 2


@pytest.mark.parametrize("name", _heap.USER_SETTINGS)
def test_the_users_own_malloc_settings_win(fresh: FakeLibc, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "1048576")
    assert _heap.tune_heap() is False
    assert fresh.calls == []
    assert _heap.tune_heap() is False and fresh.calls == []  # decided once: not retried


@pytest.mark.parametrize("tunables, touched", [
    ("glibc.malloc.trim_threshold=1048576", False),
    ("glibc.cpu.hwcaps=-AVX512F:glibc.malloc.mmap_threshold=65536", False),
    ("glibc.cpu.hwcaps=-AVX512F", True),  # not a malloc tunable: the policy applies
    ("", True),
])
def test_glibc_tunables_of_malloc_win(fresh: FakeLibc, monkeypatch: pytest.MonkeyPatch, tunables: str,
                                      touched: bool) -> None:
    monkeypatch.setenv("GLIBC_TUNABLES", tunables)
    assert _heap.tune_heap() is touched
    assert (len(fresh.calls) == 2) is touched


@pytest.mark.parametrize("value, touched", [("off", False), ("OFF", False), (" 0 ", False), ("no", False),
                                            ("false", False), ("on", True), ("1", True), ("", True)])
def test_opt_out(fresh: FakeLibc, monkeypatch: pytest.MonkeyPatch, value: str, touched: bool) -> None:
    monkeypatch.setenv(_heap.OPT_OUT, value)
    assert _heap.tune_heap() is touched
    assert (fresh.calls != []) is touched


def test_not_glibc_is_left_alone(fresh: FakeLibc, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_heap, "_glibc", lambda: None)
    assert _heap.tune_heap() is False


def test_a_refused_mallopt_reports_false(fresh: FakeLibc) -> None:
    fresh.answers = [0]
    assert _heap.tune_heap() is False
    assert fresh.calls == [(-3, _heap.MMAP_THRESHOLD)]  # the trim threshold is not set after a refusal


def test_a_refused_trim_threshold_reports_false(fresh: FakeLibc) -> None:
    fresh.answers = [1, 0]
    assert _heap.tune_heap() is False
    assert len(fresh.calls) == 2


def test_map_tasks_applies_it(fresh: FakeLibc) -> None:
    assert list(_threads.map_tasks(lambda i: i * i, range(3), work=0.0)) == [0, 1, 4]
    assert len(fresh.calls) == 2


def test_the_real_glibc_is_found_on_linux() -> None:
    libc = _heap._glibc()
    if not sys.platform.startswith("linux"):
        assert libc is None
        return
    try:
        glibc = ctypes.CDLL(None).gnu_get_libc_version
    except AttributeError:
        assert libc is None  # musl
        return
    glibc.restype = ctypes.c_char_p
    assert libc is not None and glibc().startswith(b"2.")


@pytest.mark.parametrize("symbols, found", [
    (("gnu_get_libc_version", "mallopt"), True),
    (("mallopt",), False),  # a C library with mallopt but not glibc's version call: not glibc, left alone
    (("gnu_get_libc_version",), False),  # no mallopt to call
    ((), False),
])
def test_glibc_is_recognised_by_both_of_its_symbols(monkeypatch: pytest.MonkeyPatch, symbols, found) -> None:
    class Lib:
        pass

    lib = Lib()
    for name in symbols:
        setattr(lib, name, lambda *a: 1)
    monkeypatch.setattr(_heap.sys, "platform", "linux")
    monkeypatch.setattr(_heap.ctypes, "CDLL", lambda name: lib)
    assert (_heap._glibc() is lib) is found


def test_no_c_library_to_open_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(name):
        raise OSError("no such library")

    monkeypatch.setattr(_heap.sys, "platform", "linux")
    monkeypatch.setattr(_heap.ctypes, "CDLL", refuse)
    assert _heap._glibc() is None
    monkeypatch.setattr(_heap.sys, "platform", "darwin")
    monkeypatch.setattr(_heap.ctypes, "CDLL", lambda name: pytest.fail("not linux: no C library is opened"))
    assert _heap._glibc() is None


def _glibc_or_skip() -> None:
    if _heap._glibc() is None:
        pytest.skip("glibc only: other C libraries are left alone")


_FAULTS = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from reference import _heap

    def faults():
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            x = np.ones(640_000)  # 5 MB: above glibc's initial 128 KiB thresholds
            y = x * 2.0
            del x, y
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 20

    before = faults()
    applied = _heap.tune_heap()
    faults()  # the first round after the change fills the heap once
    print(json.dumps({"before": before, "after": faults(), "applied": applied}))
""")


def _run(code: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in _heap.USER_SETTINGS + (_heap.OPT_OUT,)}
    environ.update(env)
    environ["PYTHONPATH"] = str(ROOT) + os.pathsep + environ.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, check=True,
                         cwd=ROOT, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_arrays_are_reused_instead_of_faulted_in_again() -> None:
    """A 5 MB array allocated and freed in a loop: 1,250 fresh pages per array with glibc's defaults (two
    arrays per round; fewer where the kernel gives huge pages), next to none once the thresholds are up."""
    _glibc_or_skip()
    r = _run(_FAULTS)
    assert r["applied"] is True
    # The defaults must really fault for the comparison to show anything (here ~960 per round; with transparent
    # huge pages on every mapping a 5 MB array is 3 faults).
    if r["before"] < 50:
        pytest.skip(f"glibc's defaults barely fault on this machine ({r['before']} per round): nothing to compare")
    assert r["after"] < r["before"] / 10, r
    off = _run(_FAULTS, METAVERIFY_MALLOC="off")
    assert off["applied"] is False
    assert off["after"] > off["before"] / 2, off  # opted out: nothing changed


_GRADS = textwrap.dedent("""
    import json
    import numpy as np
    from reference import maml, r2d2
    from reference.models import MLP
    from reference.tasks import gaussian_classification, sinusoid

    out = {}
    tasks = gaussian_classification(3, 4, 6, 5, n_tasks=7, seed=3)
    model = MLP([5, 300, 200], "tanh", "mse")
    loss, grads, head = r2d2.meta_loss_and_grad(model, model.init(1), tasks, 3, 0.5, 1.3, 0.1)
    out["r2d2"] = [float(loss).hex()] + [g.tobytes().hex() for g in grads] + [float(v).hex() for v in head.values()]
    tasks = sinusoid(6, 10, 10, seed=4)
    model = MLP([1, 300, 300, 1], "tanh", "mse")
    loss, grads = maml.meta_loss_and_grad(model, model.init(2), tasks, 0.01, 3)
    out["maml"] = [float(loss).hex()] + [a.tobytes().hex() for a in grads]
    print(json.dumps(out))
""")


def test_meta_gradients_are_bitwise_the_same_with_and_without_the_policy() -> None:
    """Where an array lives (heap or its own mapping, and so its alignment) must not change a bit."""
    _glibc_or_skip()
    assert _run(_GRADS) == _run(_GRADS, METAVERIFY_MALLOC="off")
