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

from reference import _threads, imaml, inner_loop, maml, r2d2
from reference.features import TaskFeatures, feature_blocks
from reference.models import MLP
from reference.tasks import gaussian_classification, sinusoid

threadpoolctl = pytest.importorskip("threadpoolctl")


@pytest.fixture(autouse=True)
def never_starved(monkeypatch):
    # A busy test machine would send map_tasks down its sequential path (pool_starved); these tests are
    # about the pooled path, so the CPU measurement never holds the pool back here.
    monkeypatch.setattr(_threads, "STARVED_PARALLELISM", 0.0)
    monkeypatch.setattr(_threads, "CHECKED_PARALLELISM", 0.0)  # nor does a sequential probe replace it
    monkeypatch.setattr(_threads, "_starved", {})
    monkeypatch.setattr(_threads, "_probes", {})
    # The problems here are small (fast tests) but above this threshold, so the pool runs them; the
    # threshold's value (5e5) is a speed matter measured by benchmark 1, not a correctness one.
    monkeypatch.setattr(_threads, "PARALLEL_MIN_WORK", 2e5)


@pytest.fixture
def two_workers(monkeypatch):
    monkeypatch.setattr(_threads, "_workers", lambda threads, n: min(2, n))


def _blas_threads() -> list[int]:
    return [info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]


def _maml_problem():
    # 30 rows x 41k parameters: above PARALLEL_MIN_WORK, so the pool is used; 30 support rows and 3 steps make the
    # factored engine's adjoint (up to 190 rows) dearer than the dense 200 x 200 layer, so the task-batch engine
    # of reference/inner_loop.py runs (the factored engine's threads: tests/test_ref_factored.py).
    from reference import factored

    model = MLP([1, 200, 200, 1], "tanh", "mse")
    assert model.n_params * 30 >= _threads.PARALLEL_MIN_WORK
    tasks = sinusoid(4, 30, 10, seed=5)
    lr = 0.05
    assert not factored.applicable(model, model.init(3), tasks, [lr] * 6, 3, first_order=False, lr_grad=False)
    return model, model.init(3), tasks


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
    # The pool really ran: the gradient's batches of tasks (2 workers: 2 batches), then every task of the loss.
    assert len(calls) == len(inner_loop.task_batches(model, tasks, 2)) + len(tasks) == 2 + len(tasks)
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
    monkeypatch.setattr(imaml, "POOL_MIN_WORK", 0.0)  # (iMAML pools only products of 1e7 and more)
    calls = []
    real = _threads._in_worker
    monkeypatch.setattr(_threads, "_in_worker", lambda *a: calls.append(1) or real(*a))
    loss2, g2 = imaml.meta_loss_and_grad(model, params, tasks, 2.0)
    assert len(calls) == len(tasks)
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
        # The same products, row by row: bitwise equal where the BLAS computes a row the same way whatever rows
        # it is stacked with, and within an ulp or two where it does not (OpenBLAS's Zen kernels round a row that
        # falls in a product's one-row tail differently: seen on an AMD EPYC, 3 of 54 entries 1 ulp apart).
        for got, want in ((blocks[0].support(i), f.support), (blocks[0].query(i), f.query)):
            np.testing.assert_allclose(got, want, rtol=0, atol=4 * np.finfo(float).eps * np.max(np.abs(want)))
    got = None
    for block in feature_blocks(model, params, tasks, max_rows=max_rows):
        g = block.vjp({i: cots[i] for i in block.indices})
        got = g if got is None else [a + b for a, b in zip(got, g)]
    for a, b in zip(got, expected):
        # Sums of the same products in another order (inside one GEMM vs task by task): round-off only.
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15 * np.max(np.abs(b)))


def test_stacked_vjp_counts_missing_and_none_cotangents_as_zero():
    # StackedFeatures.vjp writes every row once (no zero-filled pass): a task left out of the dict, or
    # a None part, must still count as zero -- against TaskFeatures.vjp with explicit zeros.
    model = MLP([4, 12, 6], "tanh", "mse")
    params = model.init(1)
    tasks = gaussian_classification(3, 2, 3, 4, n_tasks=4, seed=5)
    rng = np.random.default_rng(2)
    shapes = [(t.x_support.shape[0], 6) for t in tasks], [(t.x_query.shape[0], 6) for t in tasks]
    cots = {0: (rng.standard_normal(shapes[0][0]), rng.standard_normal(shapes[1][0])),
            2: (None, rng.standard_normal(shapes[1][2])), 3: (rng.standard_normal(shapes[0][3]), None)}
    got = None
    for block in feature_blocks(model, params, tasks, max_rows=10_000):
        g = block.vjp({i: c for i, c in cots.items() if i in block.indices})
        got = g if got is None else [a + b for a, b in zip(got, g)]
    expected = None
    for i, t in enumerate(tasks):
        gs, gq = cots.get(i, (None, None))
        g = TaskFeatures(model, params, t, f"tasks[{i}]").vjp(
            np.zeros(shapes[0][i]) if gs is None else gs, np.zeros(shapes[1][i]) if gq is None else gq)
        expected = g if expected is None else [a + b for a, b in zip(expected, g)]
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15 * np.max(np.abs(b)))
    with pytest.raises(KeyError):
        block.vjp({7: (None, None)})  # not a task of this stack


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


# ---------------------------------------------------------------------------
# The stacked MAML engine (several tasks per NumPy call) and the other algorithms on the pool
# ---------------------------------------------------------------------------


def _engine_problem(act: str, loss: str, bias: bool, n_tasks: int = 4, seed: int = 0):
    from reference.tasks import Task

    model = MLP([3, 7, 5, 4] if loss != "mse" else [3, 7, 5, 2], act, loss, bias=bias)
    rng = np.random.default_rng(seed)
    tasks = []
    for _ in range(n_tasks):
        xs, xq = rng.standard_normal((6, 3)), rng.standard_normal((4, 3))
        if loss == "ce":
            ys, yq = rng.integers(0, 4, 6), rng.integers(0, 4, 4)
        elif loss == "bce":
            ys, yq = (rng.random((6, 4)) > 0.5) * 1.0, (rng.random((4, 4)) > 0.5) * 1.0
        else:
            ys, yq = rng.standard_normal((6, 2)), rng.standard_normal((4, 2))
        tasks.append(Task(xs, ys, xq, yq))
    return model, model.init(1), inner_loop.check_tasks(model, tasks)


def _lrs(model, kind, a, rng):
    k = 2 if model.bias else 1
    if kind == "maml":
        return [a] * len(model.shapes)
    if kind == "anil":  # the body is not adapted
        return [None] * (len(model.shapes) - k) + [a] * k
    return [0.1 + 0.01 * rng.random(s) for s in model.shapes]  # Meta-SGD: an array per tensor


@pytest.mark.parametrize("act,loss,bias", [("tanh", "mse", True), ("relu", "ce", True), ("sigmoid", "bce", False),
                                           ("softplus", "ce", False)])
@pytest.mark.parametrize("kind", ["maml", "anil", "metasgd"])
def test_batched_engine_is_bitwise_the_per_task_engine(act, loss, bias, kind):
    # Every quantity per task, bit for bit: losses, meta-gradients, learning-rate adjoints, FOMAML,
    # and complex parameters (the complex step's path).
    model, params, tasks = _engine_problem(act, loss, bias)
    rng = np.random.default_rng(3)
    single = batched = inner_loop._MLPEngine(model)  # one engine: task() (2-D arrays) against tasks() (stacked)
    complex_too = act != "relu"
    for cplx in (False, True) if complex_too else (False,):
        p = [x + 1e-20j * rng.standard_normal(x.shape) for x in params] if cplx else params
        lrs = _lrs(model, kind, 0.1 + (1e-20j if cplx else 0.0), rng)
        for first_order, lr_grad in ((False, False), (False, True), (True, False)):
            want = [single.task(p, t, lrs, 3, first_order=first_order, lr_grad=lr_grad) for t in tasks]
            got = batched.tasks(p, tasks, lrs, 3, first_order=first_order, lr_grad=lr_grad)
            for (l1, g1, a1), (l2, g2, a2) in zip(want, got):
                assert l1 == l2
                for x, y in zip(g1, g2):
                    assert x.shape == y.shape and x.dtype == y.dtype
                    np.testing.assert_array_equal(x, y)
                assert (a1 is None) == (a2 is None)
                for x, y in zip(a1 or [], a2 or []):
                    assert (x is None) == (y is None)
                    if x is not None:
                        np.testing.assert_array_equal(x, y)


def test_task_batches_group_equal_shapes_in_order(monkeypatch):
    from reference.tasks import Task

    model, params, tasks = _engine_problem("tanh", "mse", True, n_tasks=7)
    # Task 3 has another support size: it cannot share a stack with its neighbours.
    t = tasks[3]
    tasks[3] = Task(t.x_support[:5], t.y_support[:5], t.x_query, t.y_query)
    batches = inner_loop.task_batches(model, tasks, 2)
    assert [i for b in batches for i in b] == list(range(7))
    assert [3] in batches
    monkeypatch.setattr(inner_loop, "BATCH_BYTES", 2 * model.n_params * 8)  # at most 2 tasks a batch
    one_shape = inner_loop.task_batches(model, tasks[4:] + tasks[:3], 2)
    assert all(len(b) <= 2 for b in one_shape) and len(one_shape) % 2 == 0  # a multiple of the pool size
    # The meta-gradient through uneven batches equals the per-task loop (reduced in the same order).
    lrs = [0.05] * len(model.shapes)
    loss1, g1, _ = inner_loop.meta_loss_and_grad(model, params, tasks, lrs, 2)
    total, grad = 0.0, None
    for t in tasks:
        loss, g, _ = inner_loop._MLPEngine(model).task(params, t, lrs, 2, first_order=False, lr_grad=False)
        total = total + loss
        grad = g if grad is None else [a + b for a, b in zip(grad, g)]
    assert loss1 == inner_loop.as_scalar(total / len(tasks))
    for a, b in zip(g1, grad):
        np.testing.assert_array_equal(a, b / len(tasks))


def test_task_blocks_share_rows_evenly_between_workers():
    from reference.features import task_blocks

    tasks = gaussian_classification(5, 5, 15, 8, n_tasks=25, seed=1)  # 100 rows each
    greedy = task_blocks(tasks, max_rows=512, parts=1)
    assert [len(b) for b in greedy] == [5, 5, 5, 5, 5]  # 5 blocks: 3 rounds on 2 workers
    even = task_blocks(tasks, max_rows=512, parts=2)
    assert len(even) == 6 and [i for b in even for i in b] == list(range(25))
    assert max(len(b) for b in even) - min(len(b) for b in even) <= 1
    assert all(len(b) * 100 <= 512 for b in even)


def _other_algorithms():
    """``name -> zero-argument call`` of the per-task algorithms outside MAML/iMAML/R2-D2, small problems."""
    from reference import flow, lrd2, matchingnet, newton, protonet, reptile

    backbone = MLP([8, 30, 6], "tanh", "mse")
    bp = backbone.init(0)
    cls = gaussian_classification(3, 2, 3, 8, n_tasks=4, seed=2)
    binary = gaussian_classification(2, 3, 3, 8, n_tasks=4, seed=3)
    small = MLP([1, 4, 1], "tanh", "mse")
    sp, st = small.init(1), sinusoid(3, 5, 5, seed=4)
    reg = MLP([1, 30, 30, 1], "tanh", "mse")
    return {
        "protonet": lambda: protonet.loss_and_grad(backbone, bp, cls, 3),
        "protonet loss": lambda: protonet.loss(backbone, bp, cls, 3),
        "matchingnet": lambda: matchingnet.loss_and_grad(backbone, bp, cls, 3),
        "matchingnet loss": lambda: matchingnet.loss(backbone, bp, cls, 3),
        "lrd2": lambda: lrd2.meta_loss_and_grad(backbone, bp, binary, 1.0, 1.0, 0.0, 2),
        "lrd2 loss": lambda: lrd2.meta_loss(backbone, bp, binary, 1.0, 1.0, 0.0, 2),
        "newton": lambda: newton.meta_loss_and_grad(small, sp, st, 0.1, 2, 0.5),
        "newton loss": lambda: newton.meta_loss(small, sp, st, 0.1, 2, 0.5),
        "flow": lambda: flow.meta_loss_and_grad(small, sp, st, 0.3),
        "flow loss": lambda: flow.meta_loss(small, sp, st, 0.3),
        "reptile": lambda: reptile.direction(reg, reg.init(2), sinusoid(4, 10, 10, seed=5), 0.02, 3),
    }


def _flat(out) -> list:
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    if isinstance(out, (list, tuple)):
        return [y for x in out for y in _flat(x)]
    return [np.asarray(out)]


@pytest.mark.parametrize("name", list(_other_algorithms()))
def test_other_algorithms_run_on_the_pool_bitwise_sequential(name, monkeypatch):
    fn = _other_algorithms()[name]
    monkeypatch.setattr(_threads, "_workers", lambda threads, n: 1)
    want = _flat(fn())
    calls = []
    real = _threads._in_worker
    monkeypatch.setattr(_threads, "_workers", lambda threads, n: min(2, n))
    monkeypatch.setattr(_threads, "PARALLEL_MIN_WORK", 0.0)  # small problems here: force the pool
    monkeypatch.setattr(_threads, "_in_worker", lambda *a: calls.append(1) or real(*a))
    got = _flat(fn())
    assert len(calls) >= 2  # the tasks (or blocks of tasks) went through the pool
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_a_starved_pool_is_held_back_then_tried_again(two_workers, monkeypatch):
    monkeypatch.setattr(_threads, "STARVED_PARALLELISM", 1.3)

    def square(i):
        return i * i

    def other(i):
        return i

    _threads._record(square, 1e9, cpu=0.19, wall=0.1)  # 1.9 cores' worth: the pool paid
    assert not _threads.pool_starved(square, 1e9)
    _threads._record(square, 1e9, cpu=0.001, wall=0.001)  # too short to judge
    assert not _threads.pool_starved(square, 1e9)
    _threads._record(square, 1e9, cpu=0.1, wall=0.1)  # one core's worth from two workers: noted, not held
    assert not _threads.pool_starved(square, 1e9)
    _threads._record(square, 1e9, cpu=0.1, wall=0.1)  # the second in a row: held back
    assert _threads.pool_starved(square, 1e9)
    until1 = _threads._starved[_threads._key(square, 1e9)][0]
    _threads._record(square, 1e9, cpu=0.1, wall=0.1)  # starved again: a longer hold
    assert _threads._starved[_threads._key(square, 1e9)][0] > until1 + 1.0
    # Other functions, and the same function at another size, keep the pool.
    assert not _threads.pool_starved(other, 1e9) and not _threads.pool_starved(square, 1e5)
    calls = []
    real = _threads._in_worker
    monkeypatch.setattr(_threads, "_in_worker", lambda *a: calls.append(1) or real(*a))
    assert list(_threads.map_tasks(square, range(5), work=1e9)) == [0, 1, 4, 9, 16]
    assert calls == []  # held back: sequential
    assert list(_threads.map_tasks(other, range(5), work=1e9)) == list(range(5))
    assert len(calls) == 5  # not held back
    _threads._record(square, 1e9, cpu=0.19, wall=0.1)  # a good try clears the hold
    assert not _threads.pool_starved(square, 1e9)
    calls.clear()
    assert list(_threads.map_tasks(square, range(5), work=1e9)) == [0, 1, 4, 9, 16]
    assert len(calls) == 5
