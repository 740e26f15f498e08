"""The factored MAML engine (reference/factored.py): adapted weights and adjoints as low-rank factors.

* Its meta-gradient is MAML's: against the generic loop of reference/inner_loop.py (Hessian-vector products
  of the model, another algorithm), for every activation, loss and with and without biases, and against a
  complex-step derivative of the meta-loss.
* It serves exactly the calls it is meant for (:func:`factored.applicable`), and keeps a layer factored
  exactly when the factors are the cheaper form.
* Its numbers do not depend on the thread count (batches and the pieces of a split product are fixed by the
  sizes); other batch sizes change only round-off.
* :func:`reference._threads.split_range` covers its range once, with the same pieces on one thread or several,
  and raises a worker's error.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from reference import _threads, factored, inner_loop, maml
from reference.models import MLP
from reference.tasks import Task, gaussian_classification, sinusoid

EPS = np.finfo(float).eps


def _rel(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b)) / max(float(np.max(np.abs(y))) for y in b)


def _problem(activation: str, loss: str, bias: bool, n_tasks: int = 3):
    if loss == "mse":
        model = MLP([2, 48, 40, 3], activation, loss, bias=bias)
        rng = np.random.default_rng(1)
        tasks = [Task(rng.standard_normal((4, 2)), rng.standard_normal((4, 3)), rng.standard_normal((5, 2)),
                      rng.standard_normal((5, 3))) for _ in range(n_tasks)]
    else:
        model = MLP([4, 48, 40, 3], activation, loss, bias=bias)
        tasks = gaussian_classification(3, 1, 2, 4, n_tasks=n_tasks, seed=3)
        if loss == "bce":  # multi-label 0/1 targets of the same rows
            rng = np.random.default_rng(2)
            tasks = [Task(t.x_support, rng.integers(0, 2, (3, 3)).astype(float), t.x_query,
                          rng.integers(0, 2, (6, 3)).astype(float)) for t in tasks]
    return model, model.init(4), tasks


@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid", "softplus", "identity"])
@pytest.mark.parametrize("loss", ["mse", "ce", "bce"])
@pytest.mark.parametrize("bias", [True, False])
def test_factored_gradient_is_the_generic_loops(activation, loss, bias):
    model, params, tasks = _problem(activation, loss, bias)
    lr, steps = 0.3, 2
    lrs = [lr] * len(params)
    assert factored.applicable(model, params, tasks, lrs, steps, first_order=False, lr_grad=False)
    assert factored.factored_layers(model, tasks[0].x_support.shape[0], tasks[0].x_query.shape[0], steps) == \
        [False, True, False]
    got = list(factored.batch_results(model, params, tasks, lr, steps))
    assert len(got) == len(factored._batches(model, tasks, steps))
    want_loss, want = _generic_sum(model, params, tasks, lrs, steps)
    loss, g = _sum(got)
    assert abs(loss - want_loss) <= 1e-13 * abs(want_loss)
    assert [x.shape for x in g] == [x.shape for x in params]
    assert _rel(g, want) < 1e-12, _rel(g, want)
    # one task at a time: each task's own gradient
    for t in tasks:
        (loss_t, g_t, extra), = factored.batch_results(model, params, [t], lr, steps)
        want_t, want_g, _ = inner_loop.task_loss_and_grad(model, params, t, lrs, steps)
        assert extra is None
        assert abs(loss_t - want_t) <= 1e-13 * abs(want_t) and _rel(g_t, want_g) < 1e-12


def _sum(results) -> tuple[float, list[np.ndarray]]:
    loss, grad = 0.0, None
    for value, g, _ in results:
        loss += value
        grad = list(g) if grad is None else [a + b for a, b in zip(grad, g)]
    return loss, grad


def _generic_sum(model, params, tasks, lrs, steps) -> tuple[float, list[np.ndarray]]:
    return _sum(inner_loop.task_loss_and_grad(model, params, t, lrs, steps) for t in tasks)


def test_factored_gradient_against_complex_step():
    # An independent source: d/ds meta_loss(theta + i h s u) / h along a random direction u.
    model = MLP([1, 64, 64, 1], "tanh", "mse")
    params, tasks = model.init(0), sinusoid(3, 5, 6, seed=1)
    lr, steps = 0.05, 2
    assert factored.applicable(model, params, tasks, [lr] * len(params), steps, first_order=False, lr_grad=False)
    loss, grad = maml.meta_loss_and_grad(model, params, tasks, lr, steps)
    rng = np.random.default_rng(0)
    u = [rng.standard_normal(p.shape) for p in params]
    h = 1e-30
    cs = np.imag(maml.meta_loss(model, [p + 1j * h * d for p, d in zip(params, u)], tasks, lr, steps)) / h
    dot = sum(float(np.sum(g * d)) for g, d in zip(grad, u))
    assert abs(dot - cs) <= 1e-12 * abs(cs), (dot, cs)
    assert abs(loss - maml.meta_loss(model, params, tasks, lr, steps)) <= 1e-14 * loss


def test_maml_goes_through_the_factored_engine_when_it_applies(monkeypatch):
    model = MLP([1, 64, 64, 1], "tanh", "mse")
    params, tasks = model.init(0), sinusoid(4, 5, 6, seed=1)
    calls = []
    real = factored.batch_results
    monkeypatch.setattr(factored, "batch_results", lambda *a: calls.append(1) or real(*a))
    loss, g = maml.meta_loss_and_grad(model, params, tasks, 0.05, 2)
    assert calls == [1]
    loss0, g0, _ = inner_loop.meta_loss_and_grad(model, params, tasks, [0.05] * len(params), 2, fused=False)
    assert abs(loss - loss0) <= 1e-14 * loss0 and _rel(g, g0) < 1e-12
    maml.meta_loss_and_grad(model, params, tasks, 0.05, 2, first_order=True)  # FOMAML: the task-batch engine
    assert calls == [1]


def test_applicable_only_to_second_order_maml_on_a_wide_real_mlp():
    model = MLP([1, 64, 64, 1], "tanh", "mse")
    params, tasks = model.init(0), sinusoid(2, 5, 6, seed=1)
    a = 0.05
    lrs = [a] * len(params)

    def ok(model=model, params=params, tasks=tasks, lrs=lrs, steps=2, **kw):
        return factored.applicable(model, params, tasks, lrs, steps,
                                   **{"first_order": False, "lr_grad": False, **kw})

    assert ok()
    assert not ok(first_order=True)
    assert not ok(lr_grad=True)
    assert not ok(lrs=[None, None] + lrs[2:])  # ANIL-like: a tensor not adapted
    assert not ok(lrs=[a, a, 0.05000001] + lrs[3:])  # two step sizes (the same object is MAML's)
    assert not ok(lrs=[np.full(p.shape, a) for p in params])  # Meta-SGD's per-entry rates
    assert not ok(lrs=[a + 1e-30j] * len(params))  # complex step in the step size
    assert not ok(tasks=[Task(*(x + 0j for x in t)) for t in tasks])  # complex step in the data
    assert not ok(params=[p + 0j for p in params])  # or in the parameters
    assert ok(params=[p.copy() for p in params])
    assert not ok(tasks=[Task(*(x.astype(np.float32) for x in t)) for t in tasks])
    assert not ok(tasks=[])
    assert not ok(model=object())  # not an MLP (a Quadratic, a reference.nets network: their own engines)
    assert not ok(steps=20)  # 5 + 2 x 5 x 20 = 205 rows x 128 > 64 x 64: no layer is cheaper factored
    assert not ok(model=MLP([1, 20, 20, 1], "tanh", "mse"))
    one = MLP([64, 64], "tanh", "mse", bias=False)  # one tensor: one step size, nothing to compare it with
    assert factored.applicable(one, one.init(0), [Task(np.zeros((5, 64)), np.zeros((5, 64)), np.zeros((6, 64)),
                                                       np.zeros((6, 64)))], [a], 2, first_order=False, lr_grad=False)
    # the query rows count: 5 support rows, K = 2, a 64 x 64 layer is factored while (n_q + 20) x 128 < 4096
    for nq, want in ((11, True), (12, False)):
        t = Task(np.zeros((5, 1)), np.zeros((5, 1)), np.zeros((nq, 1)), np.zeros((nq, 1)))
        assert ok(tasks=[t]) is want
    # every task must have a factored layer
    big = Task(np.zeros((40, 1)), np.zeros((40, 1)), np.zeros((6, 1)), np.zeros((6, 1)))
    assert not ok(tasks=tasks + [big])


def test_a_layer_is_factored_exactly_when_the_factors_are_smaller():
    # rank x (out + in) < out x in; the first layer's adjoint has n_q + n K rows, the others n_q + 2 n K.
    for (width, n, nq, steps) in [(30, 5, 5, 1), (60, 5, 5, 1), (60, 7, 2, 3), (120, 10, 10, 5)]:
        model = MLP([width, width, width, width], "tanh", "mse")
        got = factored.factored_layers(model, n, nq, steps)
        want = [(nq + (1 if l == 0 else 2) * n * steps) * 2 * width < width * width for l in range(3)]
        assert got == want
    # At the boundary, 60 x 60 layers (3,600 entries), n = 10, K = 1: the first layer's adjoint has 10 + 10 rows
    # (20 x 120 < 3,600), the second's 10 + 20 = 30 (30 x 120 = 3,600: not smaller), 29 with one query row less.
    model = MLP([60, 60, 60], "tanh", "mse")
    assert factored.factored_layers(model, 10, 10, 1) == [True, False]
    assert factored.factored_layers(model, 10, 9, 1) == [True, True]


def test_no_bias_and_one_task():
    model = MLP([1, 64, 64, 1], "tanh", "mse", bias=False)
    params, tasks = model.init(2), sinusoid(1, 5, 6, seed=3)
    lrs = [0.1] * len(params)
    (loss, g, _), = factored.batch_results(model, params, tasks, 0.1, 2)
    want_loss, want, _ = inner_loop.task_loss_and_grad(model, params, tasks[0], lrs, 2)
    assert abs(loss - want_loss) <= 1e-13 * want_loss and _rel(g, want) < 1e-12


def _wide_problem(n_tasks: int = 5):
    model = MLP([1, 64, 64, 1], "tanh", "mse")
    return model, model.init(0), sinusoid(n_tasks, 5, 6, seed=1)


@pytest.mark.parametrize("n_tasks", [1, 5])  # one batch (its products split by columns), several (the pool)
def test_thread_count_does_not_change_a_bit(monkeypatch, n_tasks):
    model, params, tasks = _wide_problem(n_tasks)
    monkeypatch.setattr(_threads, "SPLIT_MIN_WORK", 0.0)  # split even these small products
    monkeypatch.setattr(_threads, "PARALLEL_MIN_WORK", 0.0)  # and pool these small batches
    monkeypatch.setattr(_threads, "_starved", {})
    monkeypatch.setattr(_threads, "_probes", {})
    monkeypatch.setattr(_threads, "STARVED_PARALLELISM", 0.0)
    monkeypatch.setattr(_threads, "CHECKED_PARALLELISM", 0.0)
    monkeypatch.setattr(factored, "BATCH_BYTES", 1)  # a batch per task
    monkeypatch.setattr(_threads, "_workers", lambda threads, n: 1)
    one = list(factored.batch_results(model, params, tasks, 0.05, 3))
    ran: list[int] = []
    real = _threads._in_worker
    monkeypatch.setattr(_threads, "_workers", lambda threads, n: min(2, n))
    monkeypatch.setattr(_threads, "_in_worker", lambda *a: ran.append(threading.get_ident()) or real(*a))
    if n_tasks == 1:
        # One batch: its products' pieces are shared with a helper that may start after this thread has taken
        # every piece (then it is taken back, not run). A pool that runs the helper at once, before this thread
        # takes any, makes the helper compute every piece, every time.
        monkeypatch.setattr(_threads, "_executor", lambda n: _EagerPool())
    two = list(factored.batch_results(model, params, tasks, 0.05, 3))
    assert ran, "the pool never ran"
    assert len(one) == len(two) == n_tasks
    for (l1, g1, _), (l2, g2, _) in zip(one, two):
        assert l1 == l2
        for a, b in zip(g1, g2):
            np.testing.assert_array_equal(a, b)


def test_batches_of_equal_shapes_within_the_byte_budget(monkeypatch):
    model, params, tasks = _wide_problem(5)
    odd = sinusoid(2, 4, 6, seed=9)  # other support size: a batch of its own
    tasks = tasks[:3] + odd + tasks[3:]
    # Each run of equal shapes in a multiple of BLOCK_MULTIPLE (2) batches where it has the tasks.
    assert factored.BLOCK_MULTIPLE == 2
    assert factored._batches(model, tasks, 3) == [[0, 1], [2], [3], [4], [5], [6]]
    assert factored._batches(model, tasks[:3], 3) == [[0, 1], [2]]
    assert factored._batches(model, tasks[:1], 3) == [[0]]
    per_task = 8 * 6 * sum(model.sizes[1:]) * (3 * 5 + 6)
    many = sinusoid(9, 5, 6, seed=2)
    assert factored._batches(model, many, 3) == [[0, 1, 2, 3, 4], [5, 6, 7, 8]]
    monkeypatch.setattr(factored, "BATCH_BYTES", 2 * per_task)  # at most 2 tasks a batch: 5 batches -> 6
    assert factored._batches(model, many, 3) == [[0, 1], [2, 3], [4, 5], [6], [7], [8]]
    monkeypatch.setattr(factored, "BATCH_BYTES", 2 * per_task - 1)  # one task a batch (never none)
    assert factored._batches(model, many, 3) == [[i] for i in range(9)]
    monkeypatch.setattr(factored, "BATCH_BYTES", 1)
    assert factored._batches(model, tasks, 3) == [[i] for i in range(7)]
    small = _sum(factored.batch_results(model, params, tasks, 0.05, 3))
    monkeypatch.setattr(factored, "BATCH_BYTES", 2**40)
    large = _sum(factored.batch_results(model, params, tasks, 0.05, 3))
    # other stacks of rows and other sums: round-off only; both against the generic loop
    want_loss, want = _generic_sum(model, params, tasks, [0.05] * len(params), 3)
    for loss, g in (small, large):
        assert abs(loss - want_loss) <= 1e-13 * want_loss and _rel(g, want) < 1e-12


def test_split_range_covers_once_with_fixed_pieces(monkeypatch):
    for n, work, min_piece, pieces in [(250, 1e9, 64, 3), (1024, 1e9, 64, 8), (5, 1e9, 1, 5), (100, 1.0, 1, 1),
                                       (3, 1e9, 64, 2), (1, 1e9, 1, 1), (0, 1e9, 1, 1)]:
        cuts = {}
        for workers in (1, 2, 3):
            monkeypatch.setattr(_threads, "_workers", lambda threads, n, w=workers: min(w, n))
            seen: list[tuple[int, int]] = []
            lock = threading.Lock()

            def fn(a: int, b: int) -> None:
                with lock:
                    seen.append((a, b))

            _threads.split_range(fn, n, work=work, min_piece=min_piece)
            cuts[workers] = sorted(seen)
        assert cuts[1] == cuts[2] == cuts[3], cuts
        assert len(cuts[1]) == pieces
        covered = [i for a, b in cuts[1] for i in range(a, b)]
        assert covered == list(range(n))
    assert _threads.SPLIT_MIN_WORK == 3e7
    monkeypatch.setattr(_threads, "_workers", lambda threads, n: 1)
    got: list = []
    _threads.split_range(lambda a, b: got.append((a, b)), 100, work=3e7, min_piece=10)
    assert len(got) == 8  # at SPLIT_MIN_WORK: split (below it: one piece)
    got.clear()
    _threads.split_range(lambda a, b: got.append((a, b)), 100, work=3e7 - 1, min_piece=10)
    assert got == [(0, 100)]


class _EagerPool:
    """Runs a submitted call at once, in the calling thread (a helper that starts before the caller goes on)."""

    def submit(self, fn, *a):
        import concurrent.futures

        f = concurrent.futures.Future()
        f.set_running_or_notify_cancel()
        try:
            f.set_result(fn(*a))
        except BaseException as e:  # noqa: BLE001 - handed to the caller through the future, as a pool does
            f.set_exception(e)
        return f


class _FakePool:
    """Records submissions; its futures never start (so split_range's cancel() takes them back)."""

    def __init__(self):
        import concurrent.futures

        self.futures: list = []
        self._future = concurrent.futures.Future

    def submit(self, *a):
        f = self._future()
        self.futures.append(f)
        return f


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_split_range_asks_workers_minus_one_helpers_and_takes_back_the_unstarted(monkeypatch, workers):
    pools: list[_FakePool] = []
    monkeypatch.setattr(_threads, "_executor", lambda n: pools.append(_FakePool()) or pools[-1])
    monkeypatch.setattr(_threads, "_workers", lambda threads, n, w=workers: min(w, n))
    seen: list = []
    _threads.split_range(lambda a, b: seen.append((a, b)), 64, work=1e9, min_piece=8)
    assert seen == [(8 * i, 8 * (i + 1)) for i in range(8)]  # all taken by this thread: the helpers never ran
    if workers == 1:
        assert pools == []  # no pool at all
    else:
        assert len(pools) == 1 and len(pools[0].futures) == workers - 1
        assert all(f.cancelled() for f in pools[0].futures)


def test_split_range_default_piece_is_one_item(monkeypatch):
    monkeypatch.setattr(_threads, "_workers", lambda threads, n: 1)
    seen: list = []
    _threads.split_range(lambda a, b: seen.append((a, b)), 5, work=1e9)
    assert seen == [(i, i + 1) for i in range(5)]


def test_split_range_raises_a_workers_error_and_waits(monkeypatch):
    monkeypatch.setattr(_threads, "_workers", lambda threads, n: min(2, n))
    # The helper runs at once (an eager pool), inside a worker's context, takes the first piece and fails; this
    # thread takes the others, then raises the helper's error.
    monkeypatch.setattr(_threads, "_executor", lambda n: _EagerPool())
    done: list[int] = []

    def fn(a: int, b: int) -> None:
        if getattr(_threads._local, "inside", False):
            raise ValueError(f"piece {a}:{b}")
        done.append(a)

    with _threads.single_threaded_blas(), pytest.raises(ValueError, match="piece 0:1"):
        _threads.split_range(fn, 8, work=1e9, min_piece=1)
    assert done == list(range(1, 8))
    monkeypatch.undo()
    monkeypatch.setattr(_threads, "_workers", lambda threads, n: min(2, n))

    def boom(a: int, b: int) -> None:
        raise KeyError(a)

    with pytest.raises(KeyError):
        _threads.split_range(boom, 8, work=1e9, min_piece=1)


def test_split_range_runs_in_the_calling_thread_inside_a_worker(monkeypatch):
    monkeypatch.setattr(_threads, "_workers", lambda threads, n: min(2, n))
    threads: set[int] = set()
    monkeypatch.setattr(_threads._local, "inside", True, raising=False)
    _threads.split_range(lambda a, b: threads.add(threading.get_ident()), 64, work=1e9, min_piece=1)
    assert threads == {threading.get_ident()}


def test_sizes_that_decide_speed_only_are_pinned():
    # Values measured in issue 18 (reference/factored.py, reference/_threads.py); a change is a decision.
    assert factored.BATCH_BYTES == 32 * 2**20
    assert (_threads.SPLIT_MIN_WORK, _threads.SPLIT_MAX_PIECES) == (3e7, 8)


def test_stacked_products_report_their_work_and_cut_by_columns(monkeypatch):
    calls = []
    real = _threads.split_range

    def spy(fn, n, *, work, min_piece=1):
        calls.append((n, work, min_piece))
        return real(fn, n, work=work, min_piece=min_piece)

    monkeypatch.setattr(_threads, "split_range", spy)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 5, 7)), rng.standard_normal((7, 11))
    out = factored._rows(a, b)
    assert calls == [(11, 3.0 * 5 * 7 * 11, 64)]
    np.testing.assert_allclose(out, a @ b, rtol=1e-14, atol=1e-14)


def test_layers_take_the_form_factored_layers_says(monkeypatch):
    model, params, tasks = _wide_problem(3)
    steps = 2
    engine = factored._Engine(model, 0.05, steps, 5, 6)
    assert engine.factored == factored.factored_layers(model, 5, 6, steps) == [False, True, False]
    seen = []
    real = factored._Pass.__init__

    def spy(self, engine, Ws, bs, *a):
        seen.append([type(W) for W in Ws])
        real(self, engine, Ws, bs, *a)

    monkeypatch.setattr(factored._Pass, "__init__", spy)
    _, adj, _ = engine.run(params, *(np.stack([getattr(t, f) for t in tasks]) for f in Task._fields))
    assert [type(x) for x in adj] == [factored._DenseAdjoint, factored._FactoredAdjoint, factored._DenseAdjoint]
    assert len(seen) == steps + 1
    assert all(kinds == [factored._DenseWeight, factored._FactoredWeight, factored._DenseWeight] for kinds in seen)
    # the factored adjoint holds every row it was given: n_q + 2 n K
    assert adj[1].r == adj[1].A.shape[1] == 6 + 2 * 5 * steps


def test_a_factored_first_layer():
    # A wide input: the first layer (48 x 48) is factored too; its adjoint has no R{h} rows: n_q + n K.
    model = MLP([48, 48, 3], "tanh", "mse")
    rng = np.random.default_rng(5)
    tasks = [Task(rng.standard_normal((4, 48)), rng.standard_normal((4, 3)), rng.standard_normal((5, 48)),
                  rng.standard_normal((5, 3))) for _ in range(2)]
    params, steps = model.init(1), 2
    engine = factored._Engine(model, 0.1, steps, 4, 5)
    assert engine.factored == [True, False]
    _, adj, _ = engine.run(params, *(np.stack([getattr(t, f) for t in tasks]) for f in Task._fields))
    assert isinstance(adj[0], factored._FactoredAdjoint) and adj[0].r == adj[0].A.shape[1] == 5 + 4 * steps
    loss, g = _sum(factored.batch_results(model, params, tasks, 0.1, steps))
    want_loss, want = _generic_sum(model, params, tasks, [0.1] * len(params), steps)
    assert abs(loss - want_loss) <= 1e-13 * want_loss and _rel(g, want) < 1e-12


def test_batches_go_to_the_pool_with_their_work(monkeypatch):
    model, params, tasks = _wide_problem(5)
    tasks = tasks + sinusoid(3, 4, 9, seed=7)  # a second run: 3 tasks of 4 + 9 rows
    seen = []
    real = _threads.map_tasks

    def spy(fn, items, *, work):
        items = list(items)
        seen.append((items, work))
        return real(fn, items, work=work)

    monkeypatch.setattr(_threads, "map_tasks", spy)
    list(factored.batch_results(model, params, tasks, 0.05, 2))
    batches = factored._batches(model, tasks, 2)
    assert seen == [(batches, float(model.n_params) * max(len(b) * (11 if b[0] < 5 else 13) for b in batches))]


def test_theta_products_are_one_stacked_gemm_and_derivatives_only_to_the_order_used(monkeypatch):
    # Speed decisions the numbers cannot show: a weight still shared by every task (theta, before the first step)
    # multiplies the stacked rows through _rows (one GEMM); a per-task weight does not. The support passes
    # compute the activations' derivatives to order 2 (the reverse pass uses act''), the query pass to order 1.
    model, params, tasks = _wide_problem(2)
    rows = []
    real_rows = factored._rows
    monkeypatch.setattr(factored, "_rows", lambda a, b: rows.append(b.shape) or real_rows(a, b))
    rng = np.random.default_rng(0)
    W, h = rng.standard_normal((4, 3)), rng.standard_normal((2, 5, 3))
    g = rng.standard_normal((2, 5, 4))
    shared = factored._DenseWeight(W)
    np.testing.assert_allclose(shared.times_t(h, 0.1), h @ W.T, rtol=1e-14)
    np.testing.assert_allclose(shared.times(g, 0.1), g @ W, rtol=1e-14)
    assert rows == [(3, 4), (4, 3)]
    rows.clear()
    per_task = shared.step(g, h, 0.1)
    assert per_task.W.shape == (2, 4, 3)
    per_task.times_t(h, 0.1), per_task.times(g, 0.1)
    assert rows == []
    orders = []
    real_act = factored.activation_derivatives
    monkeypatch.setattr(factored, "activation_derivatives", lambda name, z, order: orders.append(order) or
                        real_act(name, z, order))
    steps = 3
    list(factored.batch_results(model, params, tasks, 0.05, steps))
    hidden, batches = model.n_layers - 1, len(factored._batches(model, tasks, steps))
    assert batches == 2 and orders == ([2] * (hidden * steps) + [1] * hidden) * batches
