"""The C heap's policy for large blocks while the reference runs: keep freed arrays for reuse (issue 18).

The reference's hot loops allocate and free the same large NumPy temporaries
over and over (a 25-task R2-D2 block at 8-1024-1024 makes arrays of 417 x
1024 float64, 3.4 MB; a MAML 8-1024-1024-1 step weight-sized ones, 8.4 MB).
glibc's ``malloc`` serves a block above its *mmap threshold* with a fresh
``mmap`` and gives it back to the kernel on ``free``, and trims the top of a
heap back to the kernel once more than its *trim threshold* is free: either
way the next array of that size is new memory, and every 4 KiB page of it
costs a page fault (the kernel zeroes it) on first touch. Both thresholds
start at 128 KiB and glibc raises them itself ("dynamic threshold": after a
freed ``mmap``-ed block of size ``s``, the mmap threshold becomes ``s`` and
the trim threshold ``2 s``, up to 32 MiB and 64 MiB on a 64-bit system,
``DEFAULT_MMAP_THRESHOLD_MAX``); but a block of exactly the freed size still
lands on the top of the heap, which is trimmed again when it is freed. Measured
on the 2-core machine (``resource.getrusage`` minor faults per call):
R2-D2 8-256-256 (25 tasks) ~3,600 faults per call on one thread, ~4,500 on
the task pool, where the two workers' faults also contend for the kernel's
lock of the process's address space (system time 0.012-0.027 s of a
0.030-0.038 s call).

:func:`tune_heap` therefore sets, once per process, the state glibc's own
dynamic rule ends in: mmap threshold 32 MiB, trim threshold 64 MiB (on a
64-bit ``long``; half that on 32 bits). Arrays up to 32 MiB are then reused
from the heap, and a process keeps at most 64 MiB of freed memory at the top
of each heap instead of 128 KiB. Faults per call fall to ~0-10 (iMAML's
13,000 to 6,000: SciPy's trust-region solver maps a fresh workspace), and the
reference's time at default threads (``python benchmarks/heap_ab.py ALGO LABEL
ROUNDS PAIRS``: fresh processes with and without the policy, alternating;
medians; 2-core machine, load ~1): R2-D2 8-256-256 0.040 -> 0.034 s (0.77x per
process pair), 8-1024-1024 0.288 -> 0.218 s (0.76x), MAML 1-256-256-1 0.128 ->
0.094 s (0.70x); MAML 8-1024-1024-1 (1.00x), iMAML (0.95x, 0.96x) and the
smallest problems (faults already ~0) do not change. The numbers the reference
computes do not depend on where an array lives (``tests/test_ref_heap.py``
checks bitwise equal meta-gradients with and without the policy).

The setting is the process's, and is kept after the reference returns (glibc
has no way back to its dynamic rule: any ``mallopt`` of a threshold switches
it off, at whatever value it had reached). It is left alone, and
:func:`tune_heap` returns ``False``, when

- the C library is not glibc (musl, macOS, Windows: their allocators differ);
- the user has set glibc's malloc parameters themselves (any of
  ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``,
  ``MALLOC_MMAP_MAX_`` in the environment, or a ``glibc.malloc.`` tunable in
  ``GLIBC_TUNABLES``): their choice wins;
- ``METAVERIFY_MALLOC`` is ``off`` (or ``0``, ``no``, ``false``): the opt-out.

A ``mallopt`` the program made itself, in-process, cannot be seen: set
``METAVERIFY_MALLOC=off`` to keep it.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from typing import Any

# mallopt's parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# glibc's DEFAULT_MMAP_THRESHOLD_MAX: 4 MiB x sizeof(long), the highest value its dynamic rule reaches; the
# trim threshold the rule sets with it is twice that.
MMAP_THRESHOLD = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD

OPT_OUT = "METAVERIFY_MALLOC"
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_lock = threading.Lock()
_state: bool | None = None  # None: not decided yet; True: applied; False: left alone


def _glibc() -> Any:
    """The running glibc (``ctypes.CDLL(None)``), or ``None`` for any other C library."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):
        return None  # musl has neither glibc's version call nor its thresholds
    return libc


def _user_configured(environ: Any) -> bool:
    """Whether the environment sets glibc's malloc parameters (the user's choice, or an opt-out of ours)."""
    if environ.get(OPT_OUT, "").strip().lower() in ("off", "0", "no", "false"):
        return True
    if any(name in environ for name in USER_SETTINGS):
        return True
    return "glibc.malloc." in environ.get("GLIBC_TUNABLES", "")


def tune_heap() -> bool:
    """Set glibc's mmap and trim thresholds to their dynamic maxima, once per process.

    See the module docstring: freed NumPy temporaries up to ``MMAP_THRESHOLD``
    bytes are reused instead of being returned to the kernel and faulted in
    again. Thread-safe; later calls return the first call's outcome at once.

    Returns:
        Whether the setting is in effect (``False``: not glibc, malloc set by
        the user's environment, ``METAVERIFY_MALLOC=off``, or ``mallopt``
        refused it).
    """
    global _state
    if _state is not None:
        return _state
    with _lock:
        if _state is None:
            libc = None if _user_configured(os.environ) else _glibc()
            ok = False
            if libc is not None:
                libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                libc.mallopt.restype = ctypes.c_int
                # The mmap threshold first: glibc refuses one above HEAP_MAX_SIZE / 2, and then nothing changes.
                ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                    libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
            _state = ok
    return _state


__all__ = ["MMAP_THRESHOLD", "OPT_OUT", "TRIM_THRESHOLD", "USER_SETTINGS", "tune_heap"]
