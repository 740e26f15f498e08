"""The reference's use of threads (reference/_threads.py) changes nothing but the speed.

* Tasks on a thread pool give the same meta-gradient, bit for bit, as the
  sequential loop (results are reduced in task order), for MAML and iMAML.
* R2-D2's stacked backbone pass (one forward/VJP for a block of tasks) equals
  the per-task passes up to round-off, whatever the block size.
* The user's BLAS thread setting is restored after a call, also after an error;
  the first failing task's error is the one raised; the caller's ``np.errstate``
  reaches the worker threads; nested calls do not deadlock.

The pool is forced to two workers (``_threads._workers``) so the parallel path
runs whatever the machine's core count.
"""

from __future__ import annotations

import numpy as np
import pytest

from reference import _threads, imaml, maml, r2d2
from reference.features import TaskFeatures, feature_blocks
from reference.models import MLP
from reference.tasks import gaussian_classification, sinusoid

threadpoolctl = pytest.importorskip("threadpoolctl")


@pytest.fixture
def two_workers(monkeypatch):
    monkeypatch.setattr(_threads, "_workers", lambda threads, n: min(2, n))


def _blas_threads() -> list[int]:
    return [info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]


def _maml_problem():
    # 10 rows x 23k parameters: above PARALLEL_MIN_WORK, so the pool is used.
    model = MLP([1, 150, 150, 1], "tanh", "mse")
    assert model.n_params * 10 >= _threads.PARALLEL_MIN_WORK
    return model, model.init(3), sinusoid(4, 10, 10, seed=5)


def test_maml_parallel_is_bitwise_sequential(monkeypatch):
    model, params, tasks = _maml_problem()
    monkeypatch.setattr(_threads, "_workers", lambda threads, n: 1)
    loss1, g1 = maml.meta_loss_and_grad(model, params, tasks, 0.05, 3)
    ml1 = maml.meta_loss(model, params, tasks, 0.05, 3)
    calls = []
    real = _threads._in_worker
    monkeypatch.setattr(_threads, "_workers", lambda threads, n: min(2, n))
    monkeypatch.setattr(_threads, "_in_worker", lambda *a: calls.append(1) or real(*a))
    loss2, g2 = maml.meta_loss_and_grad(model, params, tasks, 0.05, 3)
    ml2 = maml.meta_loss(model, params, tasks, 0.05, 3)
    assert len(calls) == 2 * len(tasks)  # the pool really ran every task
    assert loss1 == loss2 and ml1 == ml2
    for a, b in zip(g1, g2):
        np.testing.assert_array_equal(a, b)


def test_imaml_parallel_is_bitwise_sequential(monkeypatch):
    model = MLP([1, 80, 80, 1], "tanh", "mse")
    params, tasks = model.init(1), sinusoid(2, 30, 10, seed=2)
    assert model.n_params * 30 >= _threads.PARALLEL_MIN_WORK
    monkeypatch.setattr(_threads, "_workers", lambda threads, n: 1)
    loss1, g1 = imaml.meta_loss_and_grad(model, params, tasks, 2.0)
    monkeypatch.setattr(_threads, "_workers", lambda threads, n: min(2, n))
    loss2, g2 = imaml.meta_loss_and_grad(model, params, tasks, 2.0)
    assert loss1 == loss2
    for a, b in zip(g1, g2):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("max_rows", [1, 150, 10_000])
def test_stacked_features_equal_per_task(max_rows):
    model = MLP([4, 12, 6], "tanh", "mse")
    params = model.init(0)
    tasks = gaussian_classification(3, 2, 3, 4, n_tasks=5, seed=4)
    rng = np.random.default_rng(0)
    cots = {i: (rng.standard_normal((t.x_support.shape[0], 6)), rng.standard_normal((t.x_query.shape[0], 6)))
            for i, t in enumerate(tasks)}
    expected = None
    for i, t in enumerate(tasks):
        f = TaskFeatures(model, params, t, f"tasks[{i}]")
        g = f.vjp(*cots[i])
        expected = g if expected is None else [a + b for a, b in zip(expected, g)]
        blocks = [b for b in feature_blocks(model, params, tasks, max_rows=max_rows) if i in b.indices]
        assert len(blocks) == 1
        np.testing.assert_array_equal(blocks[0].support(i), f.support)
        np.testing.assert_array_equal(blocks[0].query(i), f.query)
    got = None
    for block in feature_blocks(model, params, tasks, max_rows=max_rows):
        g = block.vjp({i: cots[i] for i in block.indices})
        got = g if got is None else [a + b for a, b in zip(got, g)]
    for a, b in zip(got, expected):
        # Sums of the same products in another order (inside one GEMM vs task by task): round-off only.
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15 * np.max(np.abs(b)))


def test_r2d2_stacked_matches_blocks_of_one(monkeypatch, two_workers):
    from reference import features as _features

    model = MLP([8, 300, 20], "tanh", "mse")  # 8,720 parameters x 5 rows: the pool runs the blocks
    params = model.init(2)
    tasks = gaussian_classification(5, 2, 3, 8, n_tasks=6, seed=7)
    assert model.n_params * 25 >= _threads.PARALLEL_MIN_WORK
    monkeypatch.setattr(r2d2, "task_blocks", lambda tasks: _features.task_blocks(tasks, max_rows=50))
    loss1, g1, h1 = r2d2.meta_loss_and_grad(model, params, tasks, 5, 1.0, 1.0, 0.0)
    loss0 = r2d2.meta_loss(model, params, tasks, 5, 1.0, 1.0, 0.0)
    assert loss0 == loss1
    # One task per block: the per-task computation.
    monkeypatch.setattr(r2d2, "task_blocks", lambda tasks: _features.task_blocks(tasks, max_rows=1))
    loss2, g2, h2 = r2d2.meta_loss_and_grad(model, params, tasks, 5, 1.0, 1.0, 0.0)
    assert loss1 == pytest.approx(loss2, rel=1e-14)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14 * np.max(np.abs(b)))
    for k in h1:
        assert h1[k] == pytest.approx(h2[k], rel=1e-12, abs=1e-15)


def test_blas_threads_restored_also_after_an_error(two_workers):
    before = _blas_threads()

    def fn(i):
        assert max(_blas_threads()) == 1  # one BLAS thread while tasks run
        if i in (1, 3):
            raise ValueError(f"task {i}")
        return i

    with pytest.raises(ValueError, match="task 1"):  # the first failing task, as a loop would raise
        list(_threads.map_tasks(fn, range(5), work=1e9))
    assert _blas_threads() == before
    assert list(_threads.map_tasks(lambda i: i * i, range(12), work=1e9)) == [i * i for i in range(12)]
    assert _blas_threads() == before


def test_user_thread_setting_is_the_pool_size():
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        assert _threads.blas_threads() == 1
        seen = []
        list(_threads.map_tasks(lambda i: seen.append(i), range(4), work=1e9))
        assert seen == [0, 1, 2, 3]  # sequential: one worker under a 1-thread BLAS
        assert max(_blas_threads()) == 1


def test_errstate_reaches_workers_and_nesting(two_workers):
    def fn(i):
        with np.errstate(over="ignore"):  # nested calls run inline in the worker
            inner = list(_threads.map_tasks(lambda j: j + i, range(3), work=1e9))
        return float(np.float64(1e308) * 10.0), inner

    with np.errstate(over="ignore"):
        out = list(_threads.map_tasks(fn, range(4), work=1e9))
    assert [o[1] for o in out] == [[i, i + 1, i + 2] for i in range(4)]
    with np.errstate(over="raise"), pytest.raises(FloatingPointError):
        list(_threads.map_tasks(lambda i: np.float64(1e308) * 10.0, range(4), work=1e9))


def test_small_problems_stay_sequential(two_workers, monkeypatch):
    monkeypatch.setattr(_threads, "_in_worker", lambda *a: pytest.fail("a small problem used the pool"))
    assert list(_threads.map_tasks(lambda i: i, range(3), work=_threads.PARALLEL_MIN_WORK / 2)) == [0, 1, 2]
