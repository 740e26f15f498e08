"""reference/features.py: label/target validation, overflow reports, stacked VJPs, task blocks (issue 19).

Expected values are the documented contracts (label ranges, accepted shapes,
which task/part/row an overflow names), linearity of the VJP for a complex
(complex-step) cotangent, and the block invariants of :func:`task_blocks`
(consecutive, covering, at most ``max_rows`` rows each, a multiple of ``parts``).
"""

from __future__ import annotations

import numpy as np
import pytest

from reference.errors import InvalidInputError
from reference.features import (StackedFeatures, TaskFeatures, binary_label_check, check_feature_tasks,
                                check_n_classes, class_label_check, target_check, task_blocks)
from reference.models import MLP
from reference.tasks import Task


def test_check_n_classes_minimum_two():
    assert check_n_classes(2) == 2
    with pytest.raises(InvalidInputError, match="n_classes"):
        check_n_classes(1)


def test_class_labels():
    check = class_label_check(3)
    np.testing.assert_array_equal(check("y", [0, 2, 1, 2], 4), [0, 2, 1, 2])
    out = check("y", np.array([0.0, 2.0, 1.0]), 3)  # integer-valued floats are labels
    assert out.dtype == np.int64 and list(out) == [0, 2, 1]
    for bad, msg in (([0, 1], r"shape \(2,\); expected integer class labels of shape \(3,\)"),
                     (np.zeros((3, 1), dtype=int), r"shape \(3, 1\)"),
                     ([0.0, 0.5, 1.0], "non-integer floats"),
                     (np.array(["a", "b", "c"]), "got dtype <U1"),
                     ([0, -1, 1], r"labels in \[-1, 1\] but n_classes=3; labels must lie in \[0, 2\]$"),
                     ([0, 3, 1], r"labels in \[0, 3\] but n_classes=3; labels must lie in \[0, 2\]$")):
        with pytest.raises(InvalidInputError, match=msg):
            check("y", bad, 3)


def test_binary_labels():
    np.testing.assert_array_equal(binary_label_check("y", [0, 1, 1], 3), [0.0, 1.0, 1.0])
    col = binary_label_check("y", np.array([[1.0], [0.0], [1.0]]), 3)  # an (n, 1) column is accepted
    assert col.shape == (3,) and list(col) == [1.0, 0.0, 1.0]
    assert list(binary_label_check("y", np.array([True, False]), 2)) == [1.0, 0.0]
    for bad, msg in (([0, 1], r"shape \(2,\); expected binary labels of shape \(3,\)"),
                     (np.zeros((3, 2)), r"shape \(3, 2\)"),
                     (np.array(["0", "1", "1"]), "must hold binary labels 0/1, got dtype <U1"),
                     (np.array([0, 1, 1], dtype=complex), "must hold binary labels 0/1, got dtype complex128"),
                     ([0, 2, 1], r"y\[1\]=np.int64\(2\) is not binary|y\[1\]=2 is not binary")):
        with pytest.raises(InvalidInputError, match=msg):
            binary_label_check("y", bad, 3)


def test_regression_targets():
    one = target_check(1)
    y = one("y", [1.0, 2.0, 3.0], 3)  # (n,) accepted when n_out == 1
    assert y.shape == (3, 1) and list(y[:, 0]) == [1.0, 2.0, 3.0]
    assert one("y", np.ones((3, 1)), 3).shape == (3, 1)
    with pytest.raises(InvalidInputError, match=r"shape \(3, 2\), expected \(6, 1\)"):
        one("y", np.ones((3, 2)), 6)  # 6 numbers, but not 6 targets
    two = target_check(2)
    assert two("y", np.ones((4, 2)), 4).shape == (4, 2)
    with pytest.raises(InvalidInputError, match=r"shape \(4,\), expected \(4, 2\)"):
        two("y", np.ones(4), 4)
    with pytest.raises(InvalidInputError, match="y"):
        one("y", np.ones(3) + 1j, 3)


def test_feature_tasks_refuse_complex_inputs_in_either_part():
    net = MLP([2, 3], "tanh")
    rng = np.random.default_rng(0)
    xs, xq, ys, yq = rng.normal(size=(4, 2)), rng.normal(size=(3, 2)), np.array([0, 1, 0, 1]), np.array([1, 0, 1])
    check_feature_tasks(net, [Task(xs, ys, xq, yq)], class_label_check(2))
    for t in (Task(xs + 0j, ys, xq, yq), Task(xs, ys, xq + 1e-20j, yq)):
        with pytest.raises(InvalidInputError, match=r"tasks\[0\] has complex inputs"):
            check_feature_tasks(net, [t], class_label_check(2))


def _overflowing():
    # identity backbone with one output: a huge input row overflows to inf in exactly that row.
    net = MLP([2, 1], "identity")
    params = [np.array([[10.0, 10.0]]), np.zeros(1)]
    return net, params


def test_task_features_name_the_first_overflowing_row():
    net, params = _overflowing()
    x = np.ones((5, 2))
    xs, xq = x.copy(), x.copy()
    xs[2] = xs[4] = 1e308  # rows 2 and 4 of the support overflow: the first is named
    with pytest.raises(InvalidInputError, match=r"of T\.x_support\[2\] are not finite"):
        TaskFeatures(net, params, Task(xs, None, x, None), "T")
    xq[1] = xq[3] = 1e308
    with pytest.raises(InvalidInputError, match=r"of T\.x_query\[1\] are not finite"):
        TaskFeatures(net, params, Task(x, None, xq, None), "T")
    # The rows next to the support/query seam: the last support row and the first query row.
    xs, xq = x.copy(), x.copy()
    xs[4] = 1e308
    with pytest.raises(InvalidInputError, match=r"of T\.x_support\[4\] are not finite"):
        TaskFeatures(net, params, Task(xs, None, x, None), "T")
    xq[0] = 1e308
    with pytest.raises(InvalidInputError, match=r"of T\.x_query\[0\] are not finite"):
        TaskFeatures(net, params, Task(x, None, xq, None), "T")


def test_stacked_features_name_task_part_and_row():
    net, params = _overflowing()
    ok = np.ones((3, 2))
    for part, row in (("x_support", 0), ("x_support", 2), ("x_query", 0), ("x_query", 1)):
        bad = ok.copy()
        bad[row] = 1e308
        t1 = Task(bad, None, ok[:2], None) if part == "x_support" else Task(ok, None, np.vstack([bad[:2]]), None)
        tasks = [Task(ok, None, ok[:2], None), t1, Task(ok, None, ok, None)]
        with pytest.raises(InvalidInputError, match=rf"of tasks\[7\]\.{part}\[{row}\] are not finite"):
            StackedFeatures(net, params, tasks, [3, 7, 9])
    # Several overflowing rows in several tasks: the first in stacking order is named.
    bad = ok.copy()
    bad[1] = 1e308
    tasks = [Task(ok, None, ok[:2], None), Task(bad, None, bad, None), Task(bad, None, ok, None)]
    with pytest.raises(InvalidInputError, match=r"of tasks\[7\]\.x_support\[1\] are not finite"):
        StackedFeatures(net, params, tasks, [3, 7, 9])


def test_stacked_vjp_is_linear_in_a_complex_cotangent():
    rng = np.random.default_rng(1)
    net = MLP([3, 4, 2], "tanh")
    params = [rng.normal(size=s) for s in net.shapes]
    tasks = [Task(rng.normal(size=(3, 3)), None, rng.normal(size=(2, 3)), None) for _ in range(2)]
    sf = StackedFeatures(net, params, tasks, [0, 1])
    gr, gi = rng.normal(size=(3, 2)), rng.normal(size=(2, 2))
    re = sf.vjp({0: (gr, None), 1: (None, gi)})
    im = sf.vjp({1: (None, gi)})
    both = sf.vjp({0: (gr + 0j, None), 1: (None, 1j * gi)})
    for a, b, c in zip(re, im, both):
        assert np.iscomplexobj(c)
        np.testing.assert_allclose(c, (a - b) + 1j * b, rtol=1e-13, atol=1e-15)
    # Each task's part equals its own TaskFeatures VJP.
    tf = TaskFeatures(net, params, tasks[1], "t")
    for a, b in zip(sf.vjp({1: (None, gi)}), tf.vjp(None, gi)):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


def _tasks_of(rows, d=5):
    # support and query of unequal sizes and a feature dimension d unequal to both
    return [Task(np.zeros((n - n // 3, d)), None, np.zeros((n // 3, d)), None) for n in rows]


def _check_blocks(blocks, rows, max_rows):
    assert [i for b in blocks for i in b] == list(range(len(rows)))  # consecutive, each task once
    for b in blocks:
        assert b and (len(b) == 1 or sum(rows[i] for i in b) <= max_rows)


def test_task_blocks_invariants():
    # Greedy fill: sizes adding up to exactly max_rows share a block.
    rows = [6, 6, 6, 6]
    assert task_blocks(_tasks_of(rows), max_rows=12, parts=1) == [[0, 1], [2, 3]]
    assert task_blocks(_tasks_of(rows), max_rows=11, parts=1) == [[0], [1], [2], [3]]
    assert task_blocks(_tasks_of([9]), max_rows=4, parts=1) == [[0]]  # one task larger than max_rows
    # 25 tasks of 100 rows, 512-row blocks, 2 workers: 6 even groups (the docstring's example).
    blocks = task_blocks(_tasks_of([100] * 25), max_rows=512, parts=2)
    assert len(blocks) == 6
    _check_blocks(blocks, [100] * 25, 512)
    assert max(len(b) for b in blocks) - min(len(b) for b in blocks) <= 1
    rng = np.random.default_rng(2)
    for _ in range(30):
        rows = list(rng.integers(3, 60, size=int(rng.integers(1, 12))))
        max_rows, parts = int(rng.integers(40, 130)), int(rng.integers(1, 4))
        blocks = task_blocks(_tasks_of(rows), max_rows=max_rows, parts=parts)
        _check_blocks(blocks, rows, max_rows)
        greedy = task_blocks(_tasks_of(rows), max_rows=max_rows, parts=1)
        assert len(blocks) >= len(greedy)


def test_task_blocks_even_split_worked_examples():
    # Each example worked by hand: the greedy count g, the groups count = g rounded up to a multiple of
    # parts (at most one per task), the task middles m_i against the boundaries k T / count, and the fallback
    # to the greedy split when the even one overfills a group of several tasks.
    examples = [
        # g = 1, count 2, T = 249, boundary 124.5: m = 50, 125, 199.5.
        ([100, 50, 99], 512, 2, [[0], [1, 2]]),
        # g = 1, count 2, T = 251, boundary 125.5: m = 50, 125, 200.5.
        ([100, 50, 101], 512, 2, [[0, 1], [2]]),
        # g = 1, count 2, T = 12, boundary 6: m = 3, 7.5, 10.5 (7 rows fit in 50).
        ([6, 3, 3], 50, 2, [[0], [1, 2]]),
        # g = 2 ([21], [8, 11]), count 3, T = 40, boundaries 13.3, 26.7: m = 10.5, 25, 34.5; a single task
        # above max_rows is a group of its own, not a reason to fall back.
        ([21, 8, 11], 20, 3, [[0], [1], [2]]),
        # g = 2 ([34, 4], [33, 7]), count 3, T = 78, boundaries 26, 52: m = 17, 36, 55.5, 74.5; the last
        # group holds exactly max_rows = 40 rows, which fits.
        ([34, 4, 33, 7], 40, 3, [[0], [1], [2, 3]]),
        # g = 3, count 3, T = 70, boundaries 23.3, 46.7: m = 14.5, 48, 68.5 put 38 + 3 = 41 > 40 rows in one
        # group: the greedy split is kept.
        ([29, 38, 3], 40, 3, [[0], [1], [2]]),
        # g = 2 (8 + 33 = 41 > 40), count 2, T = 41, boundary 20.5: m = 4, 24.5.
        ([8, 33], 40, 1, [[0], [1]]),
        # g = 2 ([20, 7], [14]), count 2 (parts = 1: no rounding), T = 41, boundary 20.5: m = 10, 23.5, 34.
        ([20, 7, 14], 40, 1, [[0], [1, 2]]),
        # g = 1, parts = 1: one group, not one per task.
        ([3, 3], 40, 1, [[0, 1]]),
        # parts below 1 count as 1.
        ([3, 3], 40, 0, [[0, 1]]),
        ([20, 7, 14], 40, -2, [[0], [1, 2]]),
    ]
    for rows, max_rows, parts, expect in examples:
        blocks = task_blocks(_tasks_of(rows), max_rows=max_rows, parts=parts)
        assert blocks == expect, (rows, max_rows, parts)
        _check_blocks(blocks, rows, max_rows)


def test_task_blocks_defaults_balance_an_even_number_of_groups():
    # The defaults (512 rows, groups in multiples of 2 for a 2-worker pool). 11 tasks of 100 rows: the greedy
    # split needs 3 groups (5, 5, 1 tasks); 4 balanced groups instead. 16 tasks: greedy 4 groups of 500, 500,
    # 500 and 100 rows (1000 rows' time on 2 workers) -- already a multiple of 2, but the rows are still
    # shared evenly: 4 groups of 4 tasks (800 rows' time).
    for n, count in ((11, 4), (16, 4), (25, 6), (3, 2), (1, 1)):
        blocks = task_blocks(_tasks_of([100] * n))
        assert len(blocks) == count, (n, blocks)
        _check_blocks(blocks, [100] * n, 512)
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1, blocks
