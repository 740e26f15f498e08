"""How the reference uses the machine's cores: one BLAS thread per task, tasks in parallel.

The meta-gradients of the gradient-based algorithms are sums over tasks of
per-task computations made of many *small-row* matrix products (a task's 10
support examples against a 1024 x 1024 weight: ``10 x 1024 @ 1024 x 1024``).
A multithreaded BLAS splits each such product across its threads and meets
them at a barrier once per call, thousands of times per meta-gradient; the
work per call is too small to pay for that, and when the threads are not all
scheduled at once (any other load on the machine) every call waits for a
descheduled thread. Measured on a 2-core machine (issue 18), OpenBLAS's
default two threads made the MAML reference 2.5-3x slower than one thread on
an otherwise idle machine, and 40x slower under load. NumPy and SciPy also
load two OpenBLAS copies, each with its own spinning thread pool.

So the reference parallelises where the work is independent and coarse, over
tasks: :func:`map_tasks` runs a per-task function on a pool of
``blas_threads()`` worker threads (what the user's BLAS would use: 1 under
``OPENBLAS_NUM_THREADS=1``, the core count by default), each calling BLAS with
one thread (NumPy releases the GIL inside BLAS and inside ufunc loops over
more than a few hundred elements). The results come back in task order and
the callers reduce them in that order, so the meta-gradient is bit-for-bit
that of a sequential run. Small problems, where Python overhead and the GIL
dominate, run sequentially, still with one BLAS thread.

Tasks of equal shapes can also run several per NumPy call (the MAML engine's
batches, R2-D2's stacked blocks), fewer and longer calls, which is what lets
the pool's threads release the GIL for long stretches; callers cut their work
into a multiple of :func:`pool_size` pieces of equal size so no worker idles.
A pool only pays if its threads get cores: each pooled call measures the CPU
time it got per wall second, and when that is below
:data:`STARVED_PARALLELISM` on :data:`STARVED_CALLS` pooled calls in a row (a
busy machine; measured on the shared 2-core machine at load 3-12: the pool
was 1.1-1.2x slower than one thread) the next calls of that function at that
size run sequentially for a while (longer after each further starved try) and
the pool is then tried again. The same
measurement catches tasks that hold the GIL most of the time (iMAML's
trust-region and CG loops), where two threads take turns instead of running
at once. Between the two, CPU time is not proof of progress (two threads
taking turns at the GIL both count as busy), so after a pooled call that got
less than :data:`CHECKED_PARALLELISM` cores' worth the next call runs
sequentially as a probe and the faster of the two wall times per item
decides: a sequential probe as fast counts as a starved call.

One computation can also be cut into independent pieces that this thread and
the pool's workers take in turn (:func:`split_range`: the columns of the
factored MAML engine's large stacked GEMMs, :mod:`reference.factored`); the
pieces depend on the sizes alone, so the numbers do not depend on the thread
count either.

The BLAS limit is process-wide while a reference call runs (``threadpoolctl``;
reference counted, so concurrent or nested calls restore the user's setting
only when the last one leaves). Without ``threadpoolctl`` everything runs
sequentially and BLAS is left as it is.
"""

from __future__ import annotations

import contextvars
import itertools
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Any, TypeVar

from reference import _heap

T = TypeVar("T")
R = TypeVar("R")

# Size of one call's matrix products (rows x parameters: a task's, or a whole batch's or block's when
# the caller stacks tasks) below which the calls run sequentially. Measured on 2 cores (benchmark 1):
# MAML 1-40-40-1 in two batches of 13 tasks (2.3e5) is made of microsecond-sized operations and took
# 1.36x its sequential time on the pool; MAML 1-256-256-1 (2 tasks a batch, 1.3e6), R2-D2 8-40-40 (blocks
# of ~420 rows x 2,000, 8e5) and larger gained from a second core (0.53-0.73x).
PARALLEL_MIN_WORK = 5e5

# The pool pays only if its workers run at once: CPU seconds per wall second of a pooled call (all threads
# of the process) below this mean they did not -- the cores were busy (2 cores, load 3-12: a pooled MAML
# 1-256-256-1 call ran 1.1-1.2x slower than the sequential one) or the tasks hold the GIL most of the time
# (iMAML's trust-region and CG loops: 1.3x slower on a quiet machine, 2.6x at load 5). The next calls of
# the same function at the same size then run sequentially for a while (STARVED_HOLD_S: 20 times that
# call's duration within the bounds, doubled at each further starved try, reset by a good one) before the
# pool is tried again. A balanced 2-worker call on a free 2-core machine measures ~1.8; 1.3 is where a
# pool costing ~1.1x the sequential CPU time starts to win.
STARVED_PARALLELISM = 1.3
STARVED_HOLD_S = (2.0, 600.0)

# Pooled calls in a row below STARVED_PARALLELISM before the pool is held back. One starved call alone is
# often a neighbour's thread pool still spinning right after its own call (torch's OpenMP, XLA's), not a busy
# machine: in benchmark 1's rotation (reference, torch, JAX, each at default threads) the R2-D2 8-256-256 pool
# read 1.12 once, after JAX, and 1.5-1.7 otherwise; held back on that one reading, its next 2 s of calls ran
# sequentially at 1.0x their one-thread time instead of ~0.65x.
STARVED_CALLS = 2

# Enough CPU is not enough progress: a pooled call that got at least STARVED_PARALLELISM but less than this many
# cores' worth may be two threads taking turns at the GIL while both count as busy. Measured quiet on 2 cores
# (issue 18): MAML 1-256-256-1 pooled read 1.28-1.38 and took 1.05-1.08x its sequential time, Reptile 1.39 and
# 1.09x; R2-D2 8-1024-1024 reads 1.85 at 0.54x, 8-256-256 1.5-1.7 at 0.65x. After such a call the next call
# of that function at that size runs sequentially as a probe, timed per item against the pooled one: a probe
# at least as fast counts as a starved call (so STARVED_CALLS of them hold the pool back, as above); a slower
# one clears the count and no probe follows for the hold time a starved call would have got, doubled after
# each further probe the pool wins (a pool that pays is not probed again and again).
CHECKED_PARALLELISM = 1.6

_lock = threading.Lock()
_local = threading.local()
_controller: Any = None  # threadpoolctl's controller of the loaded BLAS libraries (False: unavailable)
_depth = 0  # reference calls currently holding the BLAS at one thread
_saved: list[tuple[Any, int]] = []
_pools: dict[int, ThreadPoolExecutor] = {}
# Per (function, size) key: (time.monotonic() before which map_tasks runs it sequentially, starved tries in a row).
_starved: dict[tuple[str, int], tuple[float, int]] = {}
# Per key: (the last pooled call's wall seconds per item when a probe is due, else None; time.monotonic() before
# which no probe is scheduled; probes the pool won in a row).
_probes: dict[tuple[str, int], tuple[float | None, float, int]] = {}


def _blas() -> Any:
    """The BLAS libraries' controller, built once (NumPy's and SciPy's OpenBLAS are loaded by then)."""
    global _controller
    if _controller is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # an optional nicety: without it BLAS keeps its own setting
            _controller = False
        else:
            _controller = ThreadpoolController().select(user_api="blas")
    return _controller


def blas_threads() -> int:
    """Threads the user's BLAS is set to use (outside the reference's own limit); 1 if unknown."""
    blas = _blas()
    if not blas:
        return 1
    with _lock:
        if _depth:
            return max([n for _, n in _saved] or [1])
        return max([lib.num_threads for lib in blas.lib_controllers] or [1])


@contextmanager
def single_threaded_blas() -> Iterator[int]:
    """Hold every loaded BLAS at one thread; yields the user's thread count (the pool size to use)."""
    global _depth
    blas = _blas()
    if not blas:
        yield 1
        return
    with _lock:
        if _depth == 0:
            _saved[:] = [(lib, lib.num_threads) for lib in blas.lib_controllers]
            for lib, n in _saved:
                if n != 1:
                    lib.set_num_threads(1)
        _depth += 1
        user = max([n for _, n in _saved] or [1])
    try:
        yield user
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for lib, n in _saved:
                    if n != 1:
                        lib.set_num_threads(n)
                _saved.clear()


def _executor(workers: int) -> ThreadPoolExecutor:
    # One pool per size, kept for the next call (starting threads costs ~0.1 ms each).
    with _lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reference-task")
        return _pools[workers]


def work(n_params: float, tasks: Sequence[Any], *, query: bool = True) -> float:
    """``map_tasks``'s ``work`` for per-task passes through a model: ``n_params x`` the largest task's rows
    (support plus query rows when ``query``, the support set alone otherwise)."""
    rows = max((t[0].shape[0] + (t[2].shape[0] if query else 0) for t in tasks), default=0)
    return float(n_params) * rows


def pool_size(n_items: int) -> int:
    """Workers :func:`map_tasks` would use for ``n_items`` items (work permitting): 1 under a 1-thread BLAS."""
    return _workers(blas_threads(), n_items)


def _workers(threads: int, n_items: int) -> int:
    """Pool size: the user's BLAS thread count, at most one per item and per core."""
    return min(threads, n_items, os.cpu_count() or 1)


def _in_worker(ctx: contextvars.Context, fn: Callable[[T], R], item: T) -> R:
    # The caller's context (np.errstate lives in a context variable) and no nested pools.
    _local.inside = True
    try:
        return ctx.run(fn, item)
    finally:
        _local.inside = False


def _key(fn: Callable[..., Any], work: float) -> tuple[str, int]:
    # The per-task function (e.g. MAML's per_batch, iMAML's per_task) and the work's power of two.
    name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    return name, int(math.log2(work)) if work >= 1 else 0


def pool_starved(fn: Callable[..., Any], work: float) -> bool:
    """Whether recent pooled calls of ``fn`` at this ``work`` did not run in parallel (then
    :func:`map_tasks` runs them sequentially until the hold expires)."""
    with _lock:
        until, _ = _starved.get(_key(fn, work), (0.0, 0))
    return time.monotonic() < until


def _hold_s(wall: float, tries: int) -> float:
    """20 times a call's duration within ``STARVED_HOLD_S``, doubled ``tries`` times (at most 20)."""
    lo, hi = STARVED_HOLD_S
    return min(hi, max(lo, 20.0 * wall) * 2.0 ** min(tries, 20))


def _strike(key: tuple[str, int], wall: float) -> None:
    """One more starved call of ``key`` in a row (caller holds ``_lock``): held back from ``STARVED_CALLS`` on."""
    _, strikes = _starved.get(key, (0.0, 0))
    strikes += 1
    if strikes < STARVED_CALLS:
        _starved[key] = (0.0, strikes)  # noted, not held: the next pooled call decides
        return
    _starved[key] = (time.monotonic() + _hold_s(wall, strikes - STARVED_CALLS), strikes)


def _record(fn: Callable[..., Any], work: float, cpu: float, wall: float, items: int = 1) -> None:
    """Note a pooled call of ``items`` items: hold the pool back after ``STARVED_CALLS`` calls in a row that got
    less than ``STARVED_PARALLELISM``; below ``CHECKED_PARALLELISM`` schedule a sequential probe instead."""
    if wall < 0.005:  # too short to tell
        return
    key = _key(fn, work)
    with _lock:
        if cpu / wall < STARVED_PARALLELISM:
            _strike(key, wall)
        elif cpu / wall < CHECKED_PARALLELISM:
            # Undecided until the probe: the count of starved calls stays as it is.
            _, not_before, wins = _probes.get(key, (None, 0.0, 0))
            if time.monotonic() >= not_before:
                _probes[key] = (wall / items, not_before, wins)
        else:
            _starved.pop(key, None)


def _probe_due(fn: Callable[..., Any], work: float) -> bool:
    """Whether the next call of ``fn`` at this ``work`` is a sequential probe (see ``CHECKED_PARALLELISM``)."""
    with _lock:
        return _probes.get(_key(fn, work), (None,))[0] is not None


def _probed(fn: Callable[..., Any], work: float, wall: float, items: int) -> None:
    """A sequential probe of ``items`` items took ``wall`` seconds: against the pooled call it follows, a starved
    call if at least as fast, else the pool's win (the count cleared, the next probe put off)."""
    key = _key(fn, work)
    with _lock:
        pooled, _, wins = _probes.get(key, (None, 0.0, 0))
        if pooled is None:  # no probe pending any more (a concurrent call of the same key took it)
            return
        if wall / items <= pooled:
            _probes[key] = (None, 0.0, 0)
            _strike(key, wall)
        else:
            _starved.pop(key, None)
            _probes[key] = (None, time.monotonic() + _hold_s(wall, wins), wins + 1)


def map_tasks(fn: Callable[[T], R], items: Sequence[T], *, work: float) -> Iterator[R]:
    """``fn(item) for item in items``, with one BLAS thread, on ``blas_threads()`` workers when worth it.

    A generator: results come in ``items`` order, so a caller that reduces them
    as they come (in that order) gets results independent of the thread count,
    and at most ``2 x workers`` results wait at a time (a 1M-parameter
    meta-gradient is 8 MB per task). Memory is about ``workers`` times a
    sequential loop's. An exception is raised as the sequential loop would
    raise it: that of the first failing item.

    Args:
        fn: the per-task computation (must not mutate shared state).
        items: the tasks (or anything per task).
        work: the size of one call's matrix products, ``rows x parameters``;
            below :data:`PARALLEL_MIN_WORK` the calls run in this thread (still
            with one BLAS thread).

    When the last ``STARVED_CALLS`` pooled calls of ``fn`` at this ``work`` got less than
    ``STARVED_PARALLELISM`` cores' worth of CPU (:func:`pool_starved`: busy
    cores, or GIL-bound tasks) the calls run in this thread until the hold
    expires; after a pooled call below ``CHECKED_PARALLELISM`` the next call is a
    sequential probe (timed; as fast as the pool, it counts as starved). Only the
    speed depends on these choices.

    Each call first makes sure glibc keeps freed large arrays for reuse
    (:func:`reference._heap.tune_heap`, once per process; ``METAVERIFY_MALLOC=off`` opts out).
    """
    items = list(items)
    _heap.tune_heap()  # freed temporaries are reused, not faulted in again (reference/_heap.py)
    with single_threaded_blas() as threads:
        workers = _workers(threads, len(items))
        if (workers <= 1 or work < PARALLEL_MIN_WORK or getattr(_local, "inside", False)
                or pool_starved(fn, work)):
            for item in items:
                yield fn(item)
            return
        if _probe_due(fn, work):  # the last pooled call was in the grey zone: time this one sequentially
            wall0 = time.perf_counter()
            for item in items:
                yield fn(item)
            _probed(fn, work, time.perf_counter() - wall0, len(items))
            return
        pool = _executor(workers)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        ctx = contextvars.copy_context()
        pending: deque[Future[R]] = deque()
        submitted = 0
        try:
            while submitted < len(items) or pending:
                while submitted < len(items) and len(pending) < 2 * workers:
                    pending.append(pool.submit(_in_worker, ctx.copy(), fn, items[submitted]))
                    submitted += 1
                yield pending.popleft().result()
            _record(fn, work, time.process_time() - cpu0, time.perf_counter() - wall0, len(items))
        finally:
            # After a failure (or a caller that stops early): drop the tasks not started, wait for the
            # running ones (they use the single-threaded BLAS this call holds).
            for f in pending:
                f.cancel()
            wait(pending)


# split_range: work (multiply-adds) below which one piece, and at most this many pieces. Measured on a 2-vCPU AMD
# EPYC VM (issue 18, session 8; single-threaded BLAS, the product cut by columns between this thread and a worker):
# 90 x 1024 @ 1024 x 1024 (9.4e7) 3.9 -> 2.0 ms, 2750 x 256 @ 256 x 256 (1.8e8) 5.7 -> 3.0 ms, but
# 250 x 256 @ 256 x 256 (1.6e7, 0.56 ms) 0.60 ms: a worker woken for half a millisecond's work starts too late.
SPLIT_MIN_WORK = 3e7
SPLIT_MAX_PIECES = 8


def split_range(fn: Callable[[int, int], None], n: int, *, work: float, min_piece: int = 1) -> None:
    """``fn(start, stop)`` over consecutive ranges covering ``range(n)``, shared by this thread and the pool.

    For one large computation made of independent parts (the columns of a GEMM, the tasks of a batch: the
    factored MAML engine, :mod:`reference.factored`): ``fn`` writes the parts ``start:stop`` of a result.
    The range is cut into pieces that depend on ``n``, ``work`` and ``min_piece`` alone -- one piece below
    :data:`SPLIT_MIN_WORK` of ``work`` (multiply-adds), else ``n // min_piece`` pieces, 2 to
    :data:`SPLIT_MAX_PIECES` -- and the same pieces are computed whether one thread takes them all or several
    share them, so the result does not depend on the thread count. This thread and up to ``workers - 1``
    pool workers take the pieces in turn: a worker that is not scheduled (a busy machine) delays at most the
    piece it took, and one that has not started when the pieces run out is not waited for. Each ``fn`` call
    runs with the BLAS at one thread (callers hold :func:`single_threaded_blas`). All in this thread with one
    worker (a 1-thread BLAS, one core) or on a pool worker already. ``min_piece`` is at least 1.
    """
    pieces = 1 if work < SPLIT_MIN_WORK else max(2, min(SPLIT_MAX_PIECES, n // min_piece))
    pieces = min(pieces, max(n, 1))
    taken = itertools.count()  # next() on a count is atomic under the GIL: each piece is taken once

    def take(_: Any = None) -> None:
        for i in taken:
            if i >= pieces:
                return
            fn(n * i // pieces, n * (i + 1) // pieces)

    workers = _workers(blas_threads(), pieces)
    if workers <= 1 or getattr(_local, "inside", False):
        take()
        return
    ctx = contextvars.copy_context()
    pool = _executor(workers)
    helpers = [pool.submit(_in_worker, ctx.copy(), take, None) for _ in range(workers - 1)]
    try:
        take()
    finally:
        # A helper not started yet has nothing left to do: taken back, not waited for (wait() would block until a
        # worker thread dequeued it). One that started is waited for: it may still be computing its piece.
        started = [f for f in helpers if not f.cancel()]
        wait(started)
    for f in started:
        f.result()  # a worker's exception


__all__ = ["CHECKED_PARALLELISM", "PARALLEL_MIN_WORK", "STARVED_CALLS", "STARVED_PARALLELISM", "blas_threads",
           "map_tasks", "pool_size", "pool_starved", "single_threaded_blas", "split_range", "work",
           "SPLIT_MAX_PIECES", "SPLIT_MIN_WORK"]
