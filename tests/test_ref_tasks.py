"""reference/tasks.py: the task generators' documented distributions, recovered from their data (issue 19).

The generators are checked by fitting their documented model back with least
squares (sinusoid: ``y = a sin x + b cos x`` gives the amplitude and phase;
linear regression: ``[x, 1]`` gives ``w, b``) and by the ranges and counts the
docstrings promise, over enough seeded draws that a shifted range is visible.
"""

from __future__ import annotations

import numpy as np
import pytest

from reference.errors import InvalidInputError
from reference.models import MLP
from reference.tasks import Task, as_tasks, check_tasks, gaussian_classification, linear_regression, sinusoid


def test_sinusoid_amplitude_phase_and_inputs():
    tasks = sinusoid(300, k_shot=4, k_query=3, seed=1)
    assert len(tasks) == 300
    amps, phases, xs_all, parts = [], [], [], ([], [])
    for t in tasks:
        assert t.x_support.shape == (4, 1) and t.y_support.shape == (4, 1)
        assert t.x_query.shape == (3, 1) and t.y_query.shape == (3, 1)
        x = np.vstack([t.x_support, t.x_query])[:, 0]
        y = np.vstack([t.y_support, t.y_query])[:, 0]
        M = np.stack([np.sin(x), np.cos(x)], axis=1)
        (a, b), *_ = np.linalg.lstsq(M, y, rcond=None)
        np.testing.assert_allclose(M @ [a, b], y, rtol=0, atol=1e-12)  # one sinusoid for support and query
        amps.append(np.hypot(a, b))
        phases.append(np.arctan2(-b, a))  # A sin(x - phi) = A cos(phi) sin x - A sin(phi) cos x
        xs_all.append(x)
        parts[0].append(t.x_support[:, 0])
        parts[1].append(t.x_query[:, 0])
    amps, phases, xs_all = np.array(amps), np.array(phases), np.concatenate(xs_all)
    # A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]: inside the ranges, and reaching both ends.
    assert 0.1 <= amps.min() < 0.2 and 4.9 < amps.max() <= 5.0
    assert -1e-12 <= phases.min() < 0.05 and np.pi - 0.05 < phases.max() <= np.pi + 1e-12
    for part in parts:  # support and query inputs each cover [-5, 5]
        xp = np.concatenate(part)
        assert -5.0 <= xp.min() < -4.9 and 4.9 < xp.max() <= 5.0
    # Defaults: one task, 10 + 10 points, seed 0.
    (t0,) = sinusoid()
    assert t0.x_support.shape == (10, 1) and t0.x_query.shape == (10, 1)
    np.testing.assert_array_equal(t0.y_query, sinusoid(1, 10, 10, seed=0)[0].y_query)
    for bad in (dict(n_tasks=0), dict(k_shot=0), dict(k_query=0)):
        with pytest.raises(InvalidInputError):
            sinusoid(**bad)


def test_linear_regression_recovers_w_and_b():
    for bias in (True, False):
        tasks = linear_regression(40, k_shot=5, k_query=4, dim=3, bias=bias, seed=2)
        ws, bs = [], []
        for t in tasks:
            assert t.x_support.shape == (5, 3) and t.y_support.shape == (5, 1) and t.x_query.shape == (4, 3)
            X = np.vstack([t.x_support, t.x_query])
            Y = np.vstack([t.y_support, t.y_query])[:, 0]
            M = np.hstack([X, np.ones((9, 1))])
            coef, *_ = np.linalg.lstsq(M, Y, rcond=None)
            np.testing.assert_allclose(M @ coef, Y, rtol=0, atol=1e-12)  # noise = 0: exact
            ws.append(coef[:3])
            bs.append(coef[3])
        ws, bs = np.array(ws), np.array(bs)
        assert abs(ws.mean()) < 0.4 and 0.7 < ws.std() < 1.3  # w ~ N(0, I)
        if bias:
            assert 0.6 < bs.std() < 1.4
        else:
            np.testing.assert_allclose(bs, 0.0, atol=1e-12)
    # noise > 0: the residual of the true fit has the noise's standard deviation (support and query).
    t = linear_regression(1, k_shot=4000, k_query=4000, dim=2, noise=0.3, seed=3)[0]
    for X, Y in ((t.x_support, t.y_support), (t.x_query, t.y_query)):
        M = np.hstack([X, np.ones((4000, 1))])
        coef, *_ = np.linalg.lstsq(M, Y[:, 0], rcond=None)
        assert 0.28 < np.std(Y[:, 0] - M @ coef) < 0.32
    # Defaults: one task, 10 + 10 points, dim 1, with a bias, seed 0.
    (t0,) = linear_regression()
    assert t0.x_support.shape == (10, 1) and t0.x_query.shape == (10, 1)
    M = np.hstack([t0.x_support, np.ones((10, 1))])
    assert abs(np.linalg.lstsq(M, t0.y_support[:, 0], rcond=None)[0][1]) > 1e-3
    np.testing.assert_array_equal(t0.y_query, linear_regression(1, 10, 10, 1, bias=True, seed=0)[0].y_query)
    for bad in (dict(n_tasks=0), dict(k_shot=0), dict(k_query=0), dict(dim=0), dict(noise=-0.1)):
        with pytest.raises(InvalidInputError):
            linear_regression(**bad)


def test_gaussian_classification_counts_order_and_clusters():
    tasks = gaussian_classification(3, 200, 150, 4, n_tasks=2, spread=3.0, seed=4)
    assert len(tasks) == 2
    means_seen = []
    for t in tasks:
        assert t.x_support.shape == (600, 4) and t.x_query.shape == (450, 4)
        assert t.y_support.dtype == np.int64
        assert list(np.bincount(t.y_support)) == [200] * 3 and list(np.bincount(t.y_query)) == [150] * 3
        assert not np.all(np.diff(t.y_support) >= 0)  # seeded random order, not sorted
        for c in range(3):
            ms, mq = t.x_support[t.y_support == c].mean(0), t.x_query[t.y_query == c].mean(0)
            np.testing.assert_allclose(ms, mq, atol=0.45)  # one mean per class for support and query
            resid = t.x_support[t.y_support == c] - ms
            assert 0.85 < resid.std() < 1.15  # examples = mean + N(0, I)
            means_seen.append(ms)
    assert 1.5 < np.std(means_seen) < 5.0  # means ~ N(0, spread^2 I), spread = 3
    # Defaults: one task, spread 2, seed 0; two classes are allowed.
    d = gaussian_classification(2, 3, 2, 2)
    e = gaussian_classification(2, 3, 2, 2, n_tasks=1, spread=2.0, seed=0)
    assert len(d) == 1 and d[0].x_support.shape == (6, 2)
    np.testing.assert_array_equal(d[0].x_query, e[0].x_query)
    for bad in (dict(n_way=1), dict(k_shot=0), dict(k_query=0), dict(dim=0), dict(n_tasks=0), dict(spread=0.0)):
        kw = dict(n_way=2, k_shot=1, k_query=1, dim=1) | bad
        with pytest.raises(InvalidInputError):
            gaussian_classification(**kw)


class _Obj:
    def __init__(self, *a):
        self.x_support, self.y_support, self.x_query, self.y_query = a


def test_as_tasks_and_check_tasks():
    a = (np.ones((2, 1)), np.zeros((2, 1)), np.ones((3, 1)), np.zeros((3, 1)))
    for form in ([Task(*a)], [a], [list(a)], [_Obj(*a)], (Task(*a), a)):
        out = as_tasks(form)
        assert len(out) == len(form) and all(isinstance(t, Task) for t in out)
        assert out[0].x_query.shape == (3, 1)
    for bad, msg in ((Task(*a), "must be a list of Task, got Task"), ("abcd", "got str"), (b"abcd", "got bytes"),
                     (5, "got int"), ([], "tasks is empty"), ([a, 5], r"tasks\[1\] is an int"),
                     ([a[:3]], r"tasks\[0\] is a tuple")):
        with pytest.raises(InvalidInputError, match=msg):
            as_tasks(bad)
    net = MLP([1, 3, 1])
    t = check_tasks(net, [(np.ones((2, 1)), np.zeros(2), np.ones((3, 1)), np.zeros(3))])[0]
    assert t.y_support.shape == (2, 1) and t.y_query.shape == (3, 1)
    with pytest.raises(InvalidInputError, match=r"mytasks\[0\]\.y_query"):
        check_tasks(net, [(np.ones((2, 1)), np.zeros(2), np.ones((3, 1)), np.zeros(4))], name="mytasks")
