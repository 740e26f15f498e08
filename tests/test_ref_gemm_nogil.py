"""The MAML engine's fused GEMM ``c + alpha a^T b`` (reference/inner_loop.py ``_addmm_t``), issue 18.

On the task pool's workers it calls SciPy's OpenBLAS ``cblas_xgemm`` through ``ctypes`` (which
releases the GIL) where that library is loaded, elsewhere SciPy's f2py ``xgemm`` wrapper (which
holds it, at a lower per-call cost). Both paths are run here (``worker``). Checked: the value
against NumPy's ``c + alpha * (a.T @ b)`` (another code path, to round-off), and the ctypes call
against the f2py one bit for bit (the same routine of the same library, so switching changes no
number of the reference), for real and complex (complex-step) data, in place or not, and inputs
that are transposed views or of another dtype.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg.blas import get_blas_funcs

from reference import _threads, inner_loop

CASES = [(10, 256, 256), (1, 1, 1), (10, 1, 256), (10, 256, 1), (3, 40, 8), (7, 5, 3)]


@pytest.fixture(params=[True, False], ids=["pool-worker", "main-thread"])
def worker(request, monkeypatch) -> bool:
    """Run the test as on a worker of reference/_threads.py's pool (the ctypes path) or not (f2py)."""
    monkeypatch.setattr(_threads._local, "inside", request.param, raising=False)
    return request.param


def _data(m: int, p: int, q: int, complex_step: bool, seed: int):
    rng = np.random.default_rng(seed)
    a, b, c = rng.standard_normal((m, p)), rng.standard_normal((m, q)), rng.standard_normal((p, q))
    if complex_step:
        a = a + 1e-20j * rng.standard_normal(a.shape)
        c = c + 1j * rng.standard_normal(c.shape)
    return a, b, c


def _f2py(c, a, b, alpha):
    dtype = np.result_type(c, a, b, alpha)
    gemm = get_blas_funcs("gemm", dtype=dtype)
    return gemm(alpha, b.T.astype(dtype), a.T.astype(dtype), beta=1.0, c=c.T.astype(dtype), trans_b=1).T


@pytest.mark.parametrize("complex_step", [False, True])
@pytest.mark.parametrize("shape", CASES)
def test_addmm_t_is_the_gemm_and_the_f2py_call_bit_for_bit(shape, complex_step: bool, worker: bool) -> None:
    a, b, c = _data(*shape, complex_step, seed=sum(shape))
    for alpha in (-0.3, np.float64(0.7), 0.5 + 1e-20j):
        want = c + alpha * (a.T @ b)
        got = inner_loop._addmm_t(c, a, b, alpha, inplace=False)
        assert got.dtype == np.result_type(c, a, b, alpha) and got.shape == c.shape
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)
        assert np.array_equal(got, _f2py(c, a, b, alpha))
        # In place: c's own array is written when its dtype is the result's.
        c2 = c.astype(got.dtype)
        out = inner_loop._addmm_t(c2, a, b, alpha, inplace=True)
        assert out is c2 or np.shares_memory(out, c2)
        assert np.array_equal(c2, got)
    # Not in place: c is left as it was.
    before = c.copy()
    inner_loop._addmm_t(c, a, b, -1.0, inplace=False)
    assert np.array_equal(c, before)


def test_addmm_t_on_views_and_other_dtypes_and_without_the_ctypes_path(monkeypatch, worker: bool) -> None:
    rng = np.random.default_rng(3)
    a = rng.standard_normal((12, 10))[::2].T.copy().T  # (6, 10) Fortran-ordered
    b = rng.standard_normal((6, 9)).astype(np.float32)
    c = np.asfortranarray(rng.standard_normal((10, 9)))
    want = c + 0.25 * (a.T @ b.astype(np.float64))
    got = inner_loop._addmm_t(c, a, b, 0.25, inplace=True)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)
    monkeypatch.setattr(inner_loop, "_cblas", False)  # no ctypes library: the f2py wrapper, the same numbers
    assert np.array_equal(inner_loop._addmm_t(np.ascontiguousarray(c), a, b, 0.25, inplace=False), got)


def test_the_ctypes_path_is_found_with_scipys_openblas_and_used_on_workers(monkeypatch) -> None:
    # SciPy's wheels bundle libscipy_openblas (symbols scipy_cblas_*): the GIL-free path must be the one used.
    import scipy

    info = scipy.show_config(mode="dicts")["Build Dependencies"]["blas"]
    if info.get("name") != "scipy-openblas":
        pytest.skip(f"SciPy built against {info.get('name')!r}: the f2py wrapper is used")
    pytest.importorskip("threadpoolctl")
    real = inner_loop._cblas_gemm()
    assert real
    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)

    # Used on a pool worker, not elsewhere.
    monkeypatch.setattr(inner_loop, "_cblas", counted)
    a, b, c = _data(10, 6, 5, False, seed=0)
    for inside in (False, True):
        monkeypatch.setattr(_threads._local, "inside", inside, raising=False)
        inner_loop._addmm_t(c, a, b, 0.5, inplace=False)
    assert calls == [(6, 5)]


def test_a_library_whose_gemm_differs_from_the_f2py_one_is_not_taken() -> None:
    # The probe admits a ctypes library only if it reproduces the f2py call bit for bit.
    pytest.importorskip("threadpoolctl")
    real = inner_loop._cblas_gemm()
    if not real:
        pytest.skip("no SciPy OpenBLAS with scipy_cblas_* symbols loaded")
    assert inner_loop._same_as_f2py(real)

    class OffByOneUlp:
        def __call__(self, c, a, b, alpha):
            real(c, a, b, alpha)
            c[0, 0] = np.nextafter(c[0, 0].real, np.inf) + 1j * c[0, 0].imag if np.iscomplexobj(c) else \
                np.nextafter(c[0, 0], np.inf)

    assert not inner_loop._same_as_f2py(OffByOneUlp())


class _Listed:
    """A library as threadpoolctl lists it: only its ``filepath`` is read by the search."""

    def __init__(self, filepath: str):
        self.filepath = filepath


class _Controller:
    """threadpoolctl's controller as ``_threads._blas()`` returns it: its ``lib_controllers``."""

    def __init__(self, libs: list):
        self.lib_controllers = libs


def test_the_ctypes_library_search_skips_what_it_cannot_use(monkeypatch) -> None:
    # The search over threadpoolctl's BLAS list: nothing listed -> False (the f2py wrapper); a path that
    # cannot be opened and a library without scipy_cblas_* symbols are passed over, and SciPy's OpenBLAS
    # listed after them is still found.
    import ctypes.util

    def search(libs: list):
        monkeypatch.setattr(inner_loop, "_cblas", None)
        monkeypatch.setattr(_threads, "_controller", _Controller(libs))
        return inner_loop._cblas_gemm()

    assert search([]) is False
    libm = ctypes.util.find_library("m") or "libm.so.6"
    unusable = [_Listed("/nonexistent/libopenblas.so"), _Listed(libm)]
    assert search(unusable) is False
    pytest.importorskip("threadpoolctl")
    monkeypatch.setattr(_threads, "_controller", None)
    real = _threads._blas()
    scipy_libs = [_Listed(lib.filepath) for lib in (real.lib_controllers if real else [])]
    if not any(hasattr(ctypes.CDLL(lib.filepath), "scipy_cblas_dgemm") for lib in scipy_libs):
        pytest.skip("no SciPy OpenBLAS with scipy_cblas_* symbols loaded")
    found = search(unusable + scipy_libs)
    assert isinstance(found, inner_loop._CblasGemm) and inner_loop._same_as_f2py(found)


def test_a_library_with_only_one_of_the_two_gemms_is_passed_over(monkeypatch) -> None:
    # _CblasGemm needs both scipy_cblas_dgemm (real) and scipy_cblas_zgemm (complex-step): a library
    # exporting only one of them is skipped, not half-built, and a full library listed after it is found.
    import ctypes

    class Fn:  # a ctypes foreign function's settable restype/argtypes, never called here
        pass

    class Half:
        def __init__(self, name: str):
            setattr(self, name, Fn())

    class Full:
        def __init__(self):
            self.scipy_cblas_dgemm, self.scipy_cblas_zgemm = Fn(), Fn()

    handles = {"/fake/only-d.so": Half("scipy_cblas_dgemm"), "/fake/only-z.so": Half("scipy_cblas_zgemm"),
               "/fake/full.so": Full()}
    opened: list[str] = []

    def cdll(path, *args, **kwargs):
        opened.append(path)
        return handles[path]

    probed: list = []
    monkeypatch.setattr(ctypes, "CDLL", cdll)
    monkeypatch.setattr(inner_loop, "_same_as_f2py", lambda cblas: probed.append(cblas) or True)

    def search(paths: list[str]):
        opened.clear(), probed.clear()
        monkeypatch.setattr(inner_loop, "_cblas", None)
        monkeypatch.setattr(_threads, "_controller", _Controller([_Listed(p) for p in paths]))
        return inner_loop._cblas_gemm()

    assert search(["/fake/only-d.so", "/fake/only-z.so"]) is False
    assert opened == ["/fake/only-d.so", "/fake/only-z.so"] and probed == []
    found = search(["/fake/only-d.so", "/fake/only-z.so", "/fake/full.so"])
    assert isinstance(found, inner_loop._CblasGemm) and probed == [found]
    full = handles["/fake/full.so"]
    assert found.d is full.scipy_cblas_dgemm and found.z is full.scipy_cblas_zgemm


def _outcome(fn):
    try:
        return "value", fn()
    except Exception as exc:  # noqa: BLE001 - compared between the two paths below
        return "raises", type(exc)


@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
def test_empty_shapes_take_the_same_path_outcome_on_a_worker_and_off_it(monkeypatch, capfd, dtype) -> None:
    # Empty operands: a pool worker's _addmm_t behaves exactly as the main thread's (the ctypes call stands in
    # for the f2py one on every input, empty ones included: the same array, or the same exception), BLAS
    # prints nothing (no xerbla message on fd 1 or 2), and with m = 0 rows the sum is c itself (NumPy's
    # empty product is zero; alpha * 0 + c = c, -0.0 entries of c included since beta = 1 leaves c as is).
    if not inner_loop._cblas_gemm():
        pytest.skip("no SciPy OpenBLAS with scipy_cblas_* symbols loaded: one path only")
    rng = np.random.default_rng(11)
    for m, p, q in [(0, 3, 4), (0, 1, 1), (3, 0, 4), (3, 4, 0), (0, 0, 4), (0, 3, 0), (2, 0, 0), (0, 0, 0)]:
        a, b = rng.standard_normal((m, p)).astype(dtype), rng.standard_normal((m, q)).astype(dtype)
        c = rng.standard_normal((p, q)).astype(dtype)
        results = []
        for inside in (False, True):
            monkeypatch.setattr(_threads._local, "inside", inside, raising=False)
            results.append(_outcome(lambda: inner_loop._addmm_t(c.copy(), a, b, -0.3, inplace=False)))
        (kind0, got0), (kind1, got1) = results
        assert kind0 == kind1, ((m, p, q), results)
        if kind0 == "value":
            assert got0.shape == got1.shape == (p, q) and np.array_equal(got0, got1)
            if m == 0:
                assert np.array_equal(got1, c)
        else:
            assert got0 is got1
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_dimensions_beyond_a_c_int_never_reach_the_ctypes_call(monkeypatch) -> None:
    # cblas_xgemm takes its sizes as C ints, and ctypes converts a Python int to c_int silently modulo 2^32
    # (2^31 becomes -2^31): a dimension above np.iinfo(np.intc).max must go to the f2py wrapper instead.
    # A read-only anonymous mapping stands in for the 2^31-row operand (zero pages, no memory committed);
    # both GEMMs are recorders, so nothing reads it.
    import ctypes
    import mmap

    top = int(np.iinfo(np.intc).max)
    assert ctypes.c_int(top + 1).value < 0  # why: the wrapped size would be negative
    if not hasattr(mmap, "MAP_PRIVATE"):  # pragma: no cover - Windows
        pytest.skip("needs a POSIX read-only private mapping")
    try:
        buf = mmap.mmap(-1, (top + 1) * 8, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    except (OSError, OverflowError, ValueError):  # pragma: no cover - a 32-bit or address-limited platform
        pytest.skip("cannot map 16 GiB of address space")
    calls: list[str] = []

    def cblas(c, a, b, alpha):
        calls.append("ctypes")

    def gemm(alpha, b, a, beta, c, trans_b, overwrite_c):
        calls.append("f2py")
        return c

    monkeypatch.setattr(inner_loop, "_cblas", cblas)
    monkeypatch.setattr(inner_loop, "get_blas_funcs", lambda name, dtype: gemm)
    monkeypatch.setattr(_threads._local, "inside", True, raising=False)
    whole = np.frombuffer(buf, dtype=np.float64)
    c = np.zeros((1, 1))
    for rows, path in ((top + 1, "f2py"), (top, "ctypes"), (3, "ctypes")):
        a = whole[:rows].reshape(rows, 1)  # C-contiguous: no copy on either path
        calls.clear()
        inner_loop._addmm_t(c, a, a, 0.5, inplace=True)
        assert calls == [path], (rows, calls)
    del whole, a
