"""The DECISIONS of the reference's thread policy (reference/_threads.py), against its documented rules.

tests/test_ref_threads.py checks that the pool changes no result (bit for bit).
The policy's mutants change only *which* path runs, so they are invisible
there; here each documented rule is checked as a decision, with the machine
replaced by doubles so the outcome is deterministic on any machine and load:

* a fake BLAS (``_threads._controller``: libraries at chosen thread counts,
  recording their setting), a fake core count (``_threads.os``) and a fake
  clock (``_threads.time``: monotonic, wall and CPU time set by the test);
* the expected decisions come from the module's docstrings and the measured
  constants its comments document (``PARALLEL_MIN_WORK = 5e5``, benchmark 1;
  ``STARVED_PARALLELISM = 1.3``: a balanced 2-worker call measures ~1.8;
  ``STARVED_CALLS = 2`` starved pooled calls in a row before a hold; holds
  of 20 x the call's duration within ``[2 s, 600 s]``, doubled per further
  starved try; ``CHECKED_PARALLELISM = 1.6``: below it a pooled call is followed by a
  sequential probe, measured 1.28-1.39 for pools that did not pay, 1.5-1.85 for pools
  that did), never from the code's expressions.

Nothing here monkeypatches those constants: a changed threshold must fail.
"""

from __future__ import annotations

import concurrent.futures
import sys
import threading
import types
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from reference import _threads
from reference.tasks import Task

#: The documented thresholds (module comments; measured on 2 cores, issue 18 / benchmark 1).
MIN_WORK = 5e5  # rows x parameters at and above which a call may use the pool
BALANCED = 1.8  # CPU seconds per wall second of a balanced 2-worker call on a free 2-core machine
THRESHOLD = 1.3  # below: starved
HOLD_LO, HOLD_HI = 2.0, 600.0  # bounds of a starvation hold, seconds
IN_A_ROW = 2  # starved pooled calls in a row before the pool is held back
CHECKED = 1.6  # below (and at or above THRESHOLD): the next call is a sequential probe


class FakeLib:
    """A BLAS library as threadpoolctl's controller shows it: ``num_threads``, ``set_num_threads``."""

    def __init__(self, n: int):
        self.num_threads = n

    def set_num_threads(self, n: int) -> None:
        assert n >= 1, f"set_num_threads({n})"
        self.num_threads = n


class FakeClock:
    """``time`` as _threads reads it: monotonic == wall clock, process_time the CPU seconds."""

    def __init__(self, now: float = 100.0):
        self.now, self.cpu = now, 0.0

    def monotonic(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        return self.now

    def process_time(self) -> float:
        return self.cpu


@pytest.fixture
def machine(monkeypatch) -> Iterator[Callable[..., list[FakeLib]]]:
    """``machine(threads..., cores=N)``: the loaded BLAS libraries at those thread counts, N cores.

    Fresh starvation records and pools; the clock is a FakeClock (``_threads.time``) that moves only
    when a test moves it, so no real timing decides anything here. Pools made here are shut down.
    """
    pools: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
    monkeypatch.setattr(_threads, "_pools", pools)
    monkeypatch.setattr(_threads, "_starved", {})
    monkeypatch.setattr(_threads, "_probes", {})
    monkeypatch.setattr(_threads, "time", FakeClock())

    def make(*threads: int, cores: int | None = 2) -> list[FakeLib]:
        libs = [FakeLib(n) for n in threads]
        monkeypatch.setattr(_threads, "_controller", types.SimpleNamespace(lib_controllers=libs))
        monkeypatch.setattr(_threads, "os", types.SimpleNamespace(cpu_count=lambda: cores))
        return libs

    yield make
    for pool in pools.values():
        pool.shutdown(wait=True)


def _threads_of(fn_items, work: float) -> tuple[list, set[int]]:
    """Run map_tasks; return its results and the set of thread ids the items ran on."""
    seen: set[int] = set()

    def fn(i):
        seen.add(threading.get_ident())
        return i * i

    return list(_threads.map_tasks(fn, fn_items, work=work)), seen


# ---------------------------------------------------------------------------
# The BLAS limit: blas_threads, single_threaded_blas
# ---------------------------------------------------------------------------


def test_blas_limit_holds_every_library_at_one_thread_and_restores_the_users_setting(machine):
    libs = machine(4, 2, 1)
    setting = [4, 2, 1]
    # Outside any reference call: the user's setting (the largest of the loaded libraries).
    assert _threads.blas_threads() == 4
    for _ in range(2):  # twice: the second entry must behave as the first (the depth count is back at 0)
        with _threads.single_threaded_blas() as user:
            assert user == 4  # yields the user's thread count (the pool size to use) ...
            assert [lib.num_threads for lib in libs] == [1, 1, 1]  # ... while every library runs one thread
            assert _threads.blas_threads() == 4  # "outside the reference's own limit": still the user's
            with _threads.single_threaded_blas() as inner:  # nested (a reference call inside another)
                assert inner == 4 and _threads.blas_threads() == 4
                assert [lib.num_threads for lib in libs] == [1, 1, 1]
            # The inner exit must not restore: the outer call still holds the limit.
            assert [lib.num_threads for lib in libs] == [1, 1, 1]
        assert [lib.num_threads for lib in libs] == setting  # the last one out restores every library
        assert _threads.blas_threads() == 4
    with pytest.raises(RuntimeError, match="inside"), _threads.single_threaded_blas():
        raise RuntimeError("inside")
    assert [lib.num_threads for lib in libs] == setting  # also after an error


def test_a_user_change_between_calls_is_what_the_next_call_saves(machine):
    libs = machine(3, 2)
    with _threads.single_threaded_blas() as user:
        assert user == 3
    libs[0].num_threads, libs[1].num_threads = 1, 5  # the user sets other counts between two calls
    assert _threads.blas_threads() == 5
    with _threads.single_threaded_blas() as user:
        assert user == 5 and [lib.num_threads for lib in libs] == [1, 1]
    assert [lib.num_threads for lib in libs] == [1, 5]


def test_no_blas_library_means_one_thread(machine):
    machine()  # threadpoolctl found no BLAS: "1 if unknown"
    assert _threads.blas_threads() == 1
    with _threads.single_threaded_blas() as user:
        assert user == 1 and _threads.blas_threads() == 1
    assert _threads.pool_size(8) == 1


def test_without_threadpoolctl_everything_runs_sequentially(machine, monkeypatch):
    machine(4, cores=8)
    monkeypatch.setattr(_threads, "_controller", None)
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # "import threadpoolctl" raises ImportError
    assert not _threads._blas()
    assert _threads.blas_threads() == 1
    with _threads.single_threaded_blas() as user:
        assert user == 1
    assert _threads.pool_size(8) == 1
    out, seen = _threads_of(range(6), work=1e12)
    assert out == [i * i for i in range(6)] and seen == {threading.get_ident()}  # in the calling thread


def test_the_blas_controller_is_built_once():
    pytest.importorskip("threadpoolctl")
    saved = _threads._controller
    try:
        _threads._controller = None
        first = _threads._blas()
        assert first is not None and first is not False
        assert hasattr(first, "lib_controllers")
        assert _threads._blas() is first
    finally:
        _threads._controller = saved


# ---------------------------------------------------------------------------
# Pool size and path: pool_size, map_tasks
# ---------------------------------------------------------------------------


def test_pool_size_is_threads_capped_by_items_and_cores(machine):
    # "the user's BLAS thread count, at most one per item and per core"
    machine(4, cores=8)
    assert [_threads.pool_size(n) for n in (1, 3, 4, 10)] == [1, 3, 4, 4]
    machine(4, cores=2)
    assert [_threads.pool_size(n) for n in (1, 3, 10)] == [1, 2, 2]
    machine(1, cores=8)
    assert _threads.pool_size(10) == 1  # a 1-thread BLAS: sequential
    machine(4, cores=None)  # os.cpu_count() unknown: count one core
    assert _threads.pool_size(10) == 1


def test_which_path_map_tasks_takes(machine):
    me = threading.get_ident()
    machine(4, cores=2)
    # At the documented threshold the pool runs the items (not in this thread), results in order.
    out, seen = _threads_of(range(5), work=MIN_WORK)
    assert out == [i * i for i in range(5)] and me not in seen
    # Just below it ("below PARALLEL_MIN_WORK the calls run in this thread").
    out, seen = _threads_of(range(5), work=float(np.nextafter(MIN_WORK, 0.0)))
    assert out == [i * i for i in range(5)] and seen == {me}
    # One item: one worker, so no pool, whatever the work.
    assert _threads_of([3], work=1e12) == ([9], {me})
    # A 1-thread BLAS: one worker, no pool.
    machine(1, cores=8)
    assert _threads_of(range(5), work=1e12)[1] == {me}
    # One core: no pool.
    machine(4, cores=1)
    assert _threads_of(range(5), work=1e12)[1] == {me}


def test_nested_calls_run_in_the_worker(machine):
    machine(4, cores=2)

    def outer(i):
        here = threading.get_ident()
        out, seen = _threads_of(range(3), work=1e12)  # big enough for a pool, but we are in one
        return out, seen == {here}, here

    res = list(_threads.map_tasks(outer, range(4), work=1e12))
    assert all(r[0] == [0, 1, 4] and r[1] for r in res)
    assert threading.get_ident() not in {r[2] for r in res}


class SyncExecutor:
    """A one-thread executor that finishes each task before submit returns: map_tasks' submissions are
    then deterministic (the tasks still run on another thread, as on the real pool)."""

    def __init__(self):
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="test-sync")
        self.submitted: list = []

    def submit(self, fn, *args):
        self.submitted.append(args[-1])  # _in_worker(ctx, fn, item)
        future = self.pool.submit(fn, *args)
        concurrent.futures.wait([future])
        return future


@pytest.fixture
def sync_executor(monkeypatch) -> Iterator[tuple[SyncExecutor, list[int]]]:
    ex, sizes = SyncExecutor(), []
    monkeypatch.setattr(_threads, "_executor", lambda workers: sizes.append(workers) or ex)
    yield ex, sizes
    ex.pool.shutdown(wait=True)


def test_at_most_two_tasks_per_worker_wait(machine, sync_executor):
    # "at most 2 x workers results wait at a time": 2 workers keep 4 tasks submitted ahead of the
    # caller (each worker has its next task queued while the caller consumes in order), never more.
    ex, sizes = sync_executor
    machine(4, cores=2)
    ahead = []
    for k, value in enumerate(_threads.map_tasks(lambda i: 10 * i, range(10), work=1e12)):
        assert value == 10 * k
        ahead.append(len(ex.submitted) - k)  # submitted but not yet consumed, this one included
    assert sizes == [2]  # a pool of min(4 threads, 10 items, 2 cores)
    assert ex.submitted == list(range(10))
    assert ahead == [4, 4, 4, 4, 4, 4, 4, 3, 2, 1]
    machine(3, cores=8)
    ex.submitted.clear()
    for k, _ in enumerate(_threads.map_tasks(lambda i: i, range(8), work=1e12)):
        assert len(ex.submitted) == min(8, 6 + k)  # 3 workers: 6 ahead
    assert sizes == [2, 3]


def test_a_pooled_call_records_its_cpu_per_wall_second(machine, sync_executor):
    machine(4, cores=2)
    clock = _threads.time

    def run(fn):
        return list(_threads.map_tasks(fn, range(4), work=1e12))

    def balanced(i):  # 4 tasks, 1 wall second, 1.8 CPU seconds: two cores' worth
        clock.now += 0.25
        clock.cpu += BALANCED / 4
        return i

    def one_core(i):  # 4 tasks, 1 wall second, 1 CPU second: the pool ran like one thread
        clock.now += 0.25
        clock.cpu += 0.25
        return i

    run(balanced)
    assert not _threads.pool_starved(balanced, 1e12)
    for _ in range(IN_A_ROW - 1):
        run(one_core)
        assert not _threads.pool_starved(one_core, 1e12)  # one starved call alone: the pool is tried again
    t0 = clock.now
    run(one_core)
    # Held back for 20 x the call's 1 s duration from the end of the call.
    clock.now = t0 + 1.0 + 19.9
    assert _threads.pool_starved(one_core, 1e12) and not _threads.pool_starved(balanced, 1e12)
    submitted = len(sync_executor[0].submitted)
    assert run(one_core) == [0, 1, 2, 3] and len(sync_executor[0].submitted) == submitted  # sequential
    clock.now = t0 + 1.0 + 20.0
    assert not _threads.pool_starved(one_core, 1e12)
    run(one_core)
    assert len(sync_executor[0].submitted) == submitted + 4  # the pool is tried again


def test_a_caller_that_stops_early_drops_the_tasks_not_started(machine, monkeypatch):
    # "drop the tasks not started, wait for the running ones": 2 workers, 4 tasks submitted ahead;
    # tasks 1 and 2 are running when the caller stops after the first result, task 3 is queued.
    machine(4, cores=2)
    gate, both = threading.Event(), threading.Barrier(3, timeout=5)
    ran: list[int] = []

    def fn(i):
        if i in (1, 2):
            both.wait()
            assert gate.wait(5)
        ran.append(i)
        return i

    real_wait = _threads.wait
    monkeypatch.setattr(_threads, "wait", lambda fs: (gate.set(), real_wait(fs))[1])  # release 1, 2 only now
    gen = _threads.map_tasks(fn, range(6), work=1e12)
    assert next(gen) == 0
    both.wait()  # tasks 1 and 2 are running
    gen.close()
    assert sorted(ran) == [0, 1, 2]  # the running ones finished before close() returned; 3.. never ran


# ---------------------------------------------------------------------------
# Starvation: pool_starved, the holds
# ---------------------------------------------------------------------------


def f_a(i):
    return i


def f_b(i):
    return i


def f_c(i):
    return i


def test_starvation_threshold(machine):
    machine(4)
    clock = _threads.time
    clock.now = 0.5  # monotonic()'s origin is undefined: half a second after it is a valid time too
    assert not _threads.pool_starved(f_a, 1e9)  # never recorded: not starved
    assert not _threads.pool_starved(f_a, 0.0)  # (no work: a valid size)
    clock.now = 100.0
    _threads._record(f_a, 1e9, cpu=BALANCED, wall=1.0)  # a balanced call: the pool paid
    assert not _threads.pool_starved(f_a, 1e9)
    assert THRESHOLD / 1.0 == THRESHOLD
    _threads._record(f_a, 1e9, cpu=THRESHOLD, wall=1.0)  # exactly the threshold is not "less than"
    assert not _threads.pool_starved(f_a, 1e9)
    _threads._record(f_a, 1e9, cpu=1.0, wall=1.0)  # one core's worth from the pool: starved, noted
    assert not _threads.pool_starved(f_a, 1e9)  # (a neighbour's spinning threads, once, hold nothing back)
    _threads._record(f_a, 1e9, cpu=1.0, wall=1.0)  # starved twice in a row: held back
    assert _threads.pool_starved(f_a, 1e9)
    _threads._record(f_b, 1e9, cpu=0.0, wall=0.001)  # too short to tell: nothing recorded
    assert not _threads.pool_starved(f_b, 1e9)
    # Per function and per size (power of two of the work): other keys keep the pool.
    assert not _threads.pool_starved(f_b, 1e9) and not _threads.pool_starved(f_a, 1e5)
    assert _threads.pool_starved(f_a, 6e8)  # the same power of two (2^29 <= work < 2^30)
    assert not _threads.pool_starved(f_a, 2.0 ** 30)
    _threads._record(f_c, 0.0, cpu=0.0, wall=1.0)  # work 0 (no tasks) is a size like any other
    _threads._record(f_c, 0.0, cpu=0.0, wall=1.0)
    assert _threads.pool_starved(f_c, 0.0)
    assert not _threads.pool_starved(f_c, 3.0) and not _threads.pool_starved(f_c, 1e9)


def test_starved_calls_count_in_a_row_per_function_and_size(machine):
    machine(4)
    _threads.time.now = 0.5  # monotonic()'s origin is undefined: half a second after it is a valid time too
    # Starved, good, starved: never two in a row, never held (CHECKED, exactly, is a good call).
    for cpu in (1.0, BALANCED, 1.0, CHECKED, 1.0):
        _threads._record(f_a, 1e9, cpu=cpu, wall=1.0)
        assert not _threads.pool_starved(f_a, 1e9)
    # Interleaved with other keys, the count is each key's own: f_a at 1e9 is now held, the others are not.
    _threads._record(f_b, 1e9, cpu=1.0, wall=1.0)
    _threads._record(f_a, 1e5, cpu=1.0, wall=1.0)
    _threads._record(f_a, 1e9, cpu=1.0, wall=1.0)
    assert _threads.pool_starved(f_a, 1e9)
    assert not _threads.pool_starved(f_b, 1e9) and not _threads.pool_starved(f_a, 1e5)
    # A call too short to judge neither counts nor resets.
    _threads._record(f_b, 1e9, cpu=0.0, wall=0.001)
    assert not _threads.pool_starved(f_b, 1e9)
    _threads._record(f_b, 1e9, cpu=1.0, wall=1.0)
    assert _threads.pool_starved(f_b, 1e9)


def _held_until(fn, work: float) -> float:
    """The end of fn's hold, found on the fake clock by bisection on pool_starved (1e-6 s)."""
    clock = _threads.time
    now = clock.now
    lo, hi = now, now + 10 * HOLD_HI
    assert _threads.pool_starved(fn, work) and (setattr(clock, "now", hi) or not _threads.pool_starved(fn, work))
    while hi - lo > 1e-6:
        clock.now = (lo + hi) / 2
        if _threads.pool_starved(fn, work):
            lo = clock.now
        else:
            hi = clock.now
    clock.now = now
    return hi


def test_starvation_holds(machine):
    machine(4)
    clock = _threads.time
    # 20 x the call's duration, at least 2 s: a 10 ms call holds 2 s (from the second starved call in a row).
    clock.now = 100.0
    _threads._record(f_a, 1e9, cpu=0.004, wall=0.01)
    assert not _threads.pool_starved(f_a, 1e9)
    _threads._record(f_a, 1e9, cpu=0.004, wall=0.01)
    assert _threads.pool_starved(f_a, 1e9)
    clock.now = 100.0 + HOLD_LO - 1e-3
    assert _threads.pool_starved(f_a, 1e9)
    clock.now = 100.0 + HOLD_LO  # "before which": at the end of the hold the pool is tried again
    assert not _threads.pool_starved(f_a, 1e9)
    # A 0.5 s call holds 10 s; each further starved try doubles it (20 s, 40 s).
    clock.now = 199.0
    _threads._record(f_b, 1e9, cpu=0.5, wall=0.5)
    assert not _threads.pool_starved(f_b, 1e9)
    for start, hold in ((200.0, 10.0), (300.0, 20.0), (400.0, 40.0)):
        clock.now = start
        _threads._record(f_b, 1e9, cpu=0.5, wall=0.5)
        assert _held_until(f_b, 1e9) == pytest.approx(start + hold, abs=1e-5)
    # A good try resets: the next starved one is noted, the one after holds 10 s again.
    clock.now = 500.0
    _threads._record(f_b, 1e9, cpu=BALANCED * 0.5, wall=0.5)
    assert not _threads.pool_starved(f_b, 1e9)
    _threads._record(f_b, 1e9, cpu=0.5, wall=0.5)
    assert not _threads.pool_starved(f_b, 1e9)
    _threads._record(f_b, 1e9, cpu=0.5, wall=0.5)
    assert _held_until(f_b, 1e9) == pytest.approx(510.0, abs=1e-5)
    # At most 600 s: a long call, and many starved tries in a row.
    clock.now = 1000.0
    _threads._record(f_c, 1e9, cpu=0.0, wall=100.0)
    _threads._record(f_c, 1e9, cpu=0.0, wall=100.0)
    assert _held_until(f_c, 1e9) == pytest.approx(1000.0 + HOLD_HI, abs=1e-5)
    for k in range(30):
        _threads._record(f_c, 1e9, cpu=0.0, wall=0.01)
    assert _held_until(f_c, 1e9) == pytest.approx(1000.0 + HOLD_HI, abs=1e-5)


# ---------------------------------------------------------------------------
# work(): the size of one call's matrix products
# ---------------------------------------------------------------------------


def test_a_grey_pooled_call_is_followed_by_a_sequential_probe(machine, sync_executor):
    # Between THRESHOLD and CHECKED cores' worth the pool may be two threads taking turns at the GIL: the next
    # call of the same function and size runs in this thread, timed; per item as fast as the pooled call, it
    # counts as a starved call (IN_A_ROW of them hold the pool back, 20 x the probe's 1 s); slower, the pool won.
    machine(4, cores=2)
    clock, me = _threads.time, threading.get_ident()
    ex = sync_executor[0]

    def make(name: str, rate: float, seq_item_s: float):
        def fn(i):  # 0.25 s an item on the pool at `rate` cores' worth; seq_item_s an item in this thread
            pooled = threading.get_ident() != me
            clock.now += 0.25 if pooled else seq_item_s
            clock.cpu += 0.25 * rate if pooled else seq_item_s
            return i
        fn.__qualname__ = name  # the policy's key: each its own function
        return fn

    def run(fn) -> bool:
        """One call of 4 items; whether it ran on the pool."""
        before = len(ex.submitted)
        assert list(_threads.map_tasks(fn, range(4), work=1e12)) == [0, 1, 2, 3]
        return len(ex.submitted) > before

    even = make("even", 1.4, 0.25)  # the sequential loop is as fast: the pool does not pay
    assert run(even) and _threads._probe_due(even, 1e12)
    assert not run(even) and not _threads._probe_due(even, 1e12)  # the probe: one starved call, noted
    assert not _threads.pool_starved(even, 1e12)
    assert run(even) and not run(even)  # pooled (undecided: the count stays at one), probe: the second
    t0 = clock.now
    assert _threads.pool_starved(even, 1e12)
    clock.now = t0 + 19.9
    assert not run(even)  # held back: sequential, and not a probe
    clock.now = t0 + 20.0
    assert not _threads.pool_starved(even, 1e12) and run(even)

    paid = make("paid", 1.5, 0.375)  # grey; the sequential loop is slower: the pool paid (exact binary times)
    assert run(paid) and _threads._probe_due(paid, 1e12)
    assert not run(paid)  # the probe, 1.5 s against the pool's 1 s: a win for the pool
    t1 = clock.now
    # Grey pooled calls (1 s each, judged when they end) schedule no probe for 20 x the probe's 1.5 s.
    for _ in range(3):
        assert run(paid) and not _threads._probe_due(paid, 1e12)
    clock.now = t1 + 28.75
    assert run(paid) and not _threads._probe_due(paid, 1e12)  # ends at t1 + 29.75
    clock.now = t1 + 29.0
    assert run(paid) and _threads._probe_due(paid, 1e12)  # ends at t1 + 30
    assert not run(paid)  # the pool wins again: the next probe waits twice as long (60 s)
    t2 = clock.now
    clock.now = t2 + 58.75
    assert run(paid) and not _threads._probe_due(paid, 1e12)
    clock.now = t2 + 59.0
    assert run(paid) and _threads._probe_due(paid, 1e12)

    # The bounds, exactly: THRESHOLD is grey (a probe), CHECKED is a good call (none; a noted starved call cleared).
    _threads._record(f_c, 1e12, cpu=THRESHOLD, wall=1.0)
    assert _threads._probe_due(f_c, 1e12)
    _threads._record(f_b, 1e12, cpu=1.0, wall=1.0)
    _threads._record(f_b, 1e12, cpu=CHECKED, wall=1.0)
    assert not _threads._probe_due(f_b, 1e12)
    _threads._record(f_b, 1e12, cpu=1.0, wall=1.0)
    assert not _threads.pool_starved(f_b, 1e12)  # one starved call since the good one: not held


def test_a_probe_needs_a_pending_pooled_reading(machine):
    machine(4)
    _threads._probed(f_a, 1e9, wall=0.1, items=4)  # no grey pooled call before it: no verdict
    assert not _threads._probe_due(f_a, 1e9) and not _threads.pool_starved(f_a, 1e9)
    assert _threads._key(f_a, 1e9) not in _threads._starved
    _threads._record(f_a, 1e9, cpu=1.4, wall=1.0, items=4)  # 0.25 s an item
    assert _threads._probe_due(f_a, 1e9) and not _threads._probe_due(f_a, 1e5) and not _threads._probe_due(f_b, 1e9)
    _threads._record(f_a, 1e9, cpu=1.0, wall=1.0)  # a starved pooled call counts as before (noted)
    _threads._probed(f_a, 1e9, wall=1.0, items=4)  # as fast per item: the second starved call in a row
    assert _threads.pool_starved(f_a, 1e9) and not _threads._probe_due(f_a, 1e9)
    _threads._record(f_b, 1e9, cpu=1.4, wall=0.004)  # too short to tell: no probe
    assert not _threads._probe_due(f_b, 1e9)


def test_probe_bookkeeping_per_item_and_after_a_strike(machine):
    clock = _threads.time
    clock.now = 0.5  # monotonic()'s origin is undefined: half a second after it is a valid time too
    # A pooled call of one item (the default) lasting 1 s, then a 1 s probe of one item: as fast, a starved call.
    _threads._record(f_a, 1e9, cpu=1.4, wall=1.0)
    assert _threads._probe_due(f_a, 1e9)  # a grey call schedules a probe at any time (no probe put off yet)
    _threads._probed(f_a, 1e9, wall=1.0, items=1)
    assert _threads._starved[_threads._key(f_a, 1e9)] == (0.0, 1)  # noted, not held
    _threads._record(f_a, 1e9, cpu=1.4, wall=1.0)  # right after a strike the next grey call is probed again
    assert _threads._probe_due(f_a, 1e9)
    # The pool wins twice (wins 0 -> 1 -> 2), loses once (wins back to 0), wins again: that win's hold is the
    # first hold again, 20 x the probe's 2 s = 40 s, not doubled.
    key = _threads._key(f_b, 1e9)
    for _ in range(2):
        clock.now += 1000.0
        _threads._record(f_b, 1e9, cpu=1.4, wall=1.0)
        _threads._probed(f_b, 1e9, wall=2.0, items=1)  # slower: the pool's win
    assert _threads._probes[key] == (None, clock.now + 80.0, 2)  # the second win: 40 s doubled
    clock.now += 1000.0
    _threads._record(f_b, 1e9, cpu=1.4, wall=1.0)
    _threads._probed(f_b, 1e9, wall=0.5, items=1)  # faster: a strike, and the wins start over
    _threads._record(f_b, 1e9, cpu=1.4, wall=1.0)
    _threads._probed(f_b, 1e9, wall=2.0, items=1)
    assert _threads._probes[key] == (None, clock.now + 40.0, 1)


@pytest.mark.parametrize("sizes, rows, pooled", [([1, 40, 40, 1], 10, False), ([1, 200, 200, 1], 95, True),
                                                  ([1, 833, 1], 100, True)])
def test_maml_batches_for_one_worker_when_the_pool_will_not_run(machine, monkeypatch, sizes, rows, pooled):
    # 2 BLAS threads, 2 cores, 4 tasks: task_batches cuts 2 batches of 2 for a 2-worker pool. 1-40-40-1 (1,761
    # parameters, 10 rows): 1,761 x 10 x 2 = 35,220 < MIN_WORK, so map_tasks will run them in this thread: one
    # batch of 4 instead. 1-200-200-1 (40,801; 95 support rows, so the factored engine of reference/factored.py,
    # which takes 10-row tasks at this width, does not apply): 7.8e6 >= MIN_WORK, the pool's 2 batches stay;
    # 1-833-1 (2,500 parameters, 100 rows): exactly MIN_WORK, which the pool runs ("below it ... in this thread"), so they stay.
    from reference import inner_loop, maml
    from reference.models import MLP
    from reference.tasks import sinusoid

    machine(2, cores=2)
    monkeypatch.setattr(inner_loop, "_cblas_gemm", lambda: None)  # the fake BLAS has no library file to load
    seen: list[int] = []
    real = inner_loop._MLPEngine.tasks
    monkeypatch.setattr(inner_loop._MLPEngine, "tasks", lambda self, params, tasks, *a, **kw: (
        seen.append(len(tasks)), real(self, params, tasks, *a, **kw))[1])
    model = MLP(sizes, "tanh", "mse")
    assert (model.n_params * rows * 2 >= MIN_WORK) == pooled
    maml.meta_loss_and_grad(model, model.init(0), sinusoid(4, rows, 10, seed=1), 0.01, 1)
    assert sorted(seen) == ([2, 2] if pooled else [4])


def test_work_is_params_times_the_largest_tasks_rows():
    rng = np.random.default_rng(0)

    def task(n_s, n_q, d=3):
        return Task(rng.standard_normal((n_s, d)), rng.standard_normal(n_s),
                    rng.standard_normal((n_q, d)), rng.standard_normal(n_q))

    tasks = [task(5, 9), task(6, 2)]  # support + query rows: 14 and 8; support alone: 5 and 6
    assert _threads.work(10, tasks) == 140.0
    assert _threads.work(10, tasks, query=True) == 140.0
    assert _threads.work(10, tasks, query=False) == 60.0
    assert _threads.work(10, [task(2, 1, d=40)]) == 30.0  # rows, not features
    assert _threads.work(7, []) == 0.0 and _threads.work(7, [], query=False) == 0.0
    assert isinstance(_threads.work(10, tasks), float)
