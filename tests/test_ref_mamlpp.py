"""reference/mamlpp.py's MSL schedule and LSLR layout against MAML++'s published schedule (issue 19).

Antoniou, Edwards & Storkey (2019), "How to train your MAML": the multi-step loss
weights start uniform ``1/K``; each non-final weight falls by ``1/(K E)`` per epoch
to the floor ``0.03/K``, the final one rises by ``(K-1)/(K E)`` per epoch to
``1 - 0.03 (K-1)/K`` (``E = msl_epochs``). The expected values below are worked
out by hand from that description (fractions), not from the code.
"""

from __future__ import annotations

import numpy as np
import pytest

from reference.errors import InvalidInputError
from reference.mamlpp import msl_weights, schedule
from reference.models import MLP


@pytest.mark.parametrize("K,E,epoch,expected", [
    (5, 10, 0, [1 / 5] * 5),
    # non-final 1/5 - 3/50 = 7/50, final 1/5 + 3*4/50 = 22/50
    (5, 10, 3, [7 / 50] * 4 + [22 / 50]),
    # all at the floor 0.03/5 = 0.006, the final capped at 1 - 4 * 0.006 = 0.976
    (5, 10, 10, [0.006] * 4 + [0.976]),
    (5, 10, 25, [0.006] * 4 + [0.976]),
    # K = 3, E = 4, epoch 2: non-final 1/3 - 2/12 = 1/6, final 1/3 + 2*2/12 = 2/3
    (3, 4, 2, [1 / 6, 1 / 6, 2 / 3]),
    (1, 7, 5, [1.0]),
])
def test_msl_weights_follow_the_published_schedule(K, E, epoch, expected):
    w = msl_weights(K, epoch, E)
    np.testing.assert_allclose(w, expected, rtol=1e-12, atol=1e-15)
    # The weights are a convex combination at every epoch.
    assert w.sum() == pytest.approx(1.0, rel=1e-12)


def test_msl_weights_sum_to_one_over_the_whole_annealing():
    for K in (2, 4, 8):
        for epoch in range(0, 40, 3):
            w = msl_weights(K, epoch, 15)
            assert w.sum() == pytest.approx(1.0, rel=1e-12)
            assert np.all(w[:-1] >= 0.03 / K - 1e-15) and np.all(np.diff(w[:-1]) == 0)


def test_msl_weights_validate_the_epoch():
    msl_weights(4, 0, 10)  # epoch 0 is the start of training
    with pytest.raises(InvalidInputError, match="epoch"):
        msl_weights(4, -1, 10)


def test_schedule_layout_and_exclude_validation():
    model = MLP([1, 4, 1], "tanh", "mse")  # 4 tensors
    n = len(model.shapes)
    lrs = np.arange(2 * n, dtype=float).reshape(2, n) / 10
    s = schedule(model, lrs, 2, exclude=(0, n - 1))
    assert s == [[None, 0.1, 0.2, None], [None, 0.5, 0.6, None]]
    for bad in ((n,), (-1,), (1.5,), (1.0,)):
        with pytest.raises(InvalidInputError, match=r"expected tensor indices in \[0, 4\)"):
            schedule(model, lrs, 2, exclude=bad)
    assert schedule(model, lrs, 2, exclude=(np.int64(2),))[1] == [0.4, 0.5, None, 0.7]
