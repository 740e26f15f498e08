"""``reference.lowrank.LowRankRows`` and the backward passes that take it (issue 18).

Expected values are the dense products, with ``G`` assembled here from its blocks by
``np.zeros`` and slice assignment of ``U @ V.T`` (not by the class), and the dense
backward pass of ``reference.models.MLP`` (itself checked against finite differences
and the complex step elsewhere).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reference.features import StackedFeatures
from reference.lowrank import LowRankRows
from reference.models import MLP
from reference.tasks import Task


def _layout(draw_sizes, rng, out, complex_values=False):
    """Blocks ``(a, U, V)`` with gaps between them: ``draw_sizes`` is ``[(gap, m, r), ...]``."""
    blocks, a = [], 0
    for gap, m, r in draw_sizes:
        a += gap
        U, V = rng.standard_normal((m, r)), rng.standard_normal((out, r))
        if complex_values:
            U = U + 1j * rng.standard_normal((m, r))
        blocks.append((a, U, V))
        a += m
    return blocks, a


def _assemble(rows, out, blocks):
    G = np.zeros((rows, out), dtype=np.result_type(*[U for _, U, _ in blocks], *[V for _, _, V in blocks]))
    for a, U, V in blocks:
        G[a:a + U.shape[0]] = U @ V.T
    return G


@given(sizes=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 6), st.integers(1, 4)), min_size=1, max_size=4),
       tail=st.integers(0, 3), out=st.integers(1, 7), k=st.integers(1, 5), seed=st.integers(0, 2**16),
       complex_values=st.booleans(), shuffled=st.booleans())
def test_products_are_the_dense_products(sizes, tail, out, k, seed, complex_values, shuffled):
    rng = np.random.default_rng(seed)
    blocks, rows = _layout(sizes, rng, out, complex_values)
    rows += tail  # zero rows after the last block too
    if shuffled:  # the blocks need not come in row order
        blocks = blocks[::-1]
    G = _assemble(rows, out, blocks)
    g = LowRankRows(rows, blocks)
    h, W = rng.standard_normal((rows, k)), rng.standard_normal((out, k))
    assert g.shape == (rows, out) and g.dtype == G.dtype
    np.testing.assert_allclose(g.t_matmul(h), G.T @ h, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g.row_sum(), G.sum(axis=0), rtol=1e-12, atol=1e-12)
    GW = g.matmul(W)
    np.testing.assert_allclose(GW, G @ W, rtol=1e-12, atol=1e-12)
    covered = np.zeros(rows, dtype=bool)
    for a, U, _ in blocks:
        covered[a:a + U.shape[0]] = True
    assert np.all(GW[~covered] == 0)  # rows outside every block are exactly zero (np.empty underneath)
    np.testing.assert_array_equal(g.dense(), G)


def test_cheaper_than_dense_counts_the_multiply_adds():
    # factored: sum_blocks m r + out R; dense: rows out; strictly fewer is cheaper.
    def cheaper(rows, m, r, out):
        return LowRankRows(rows, [(0, np.ones((m, r)), np.ones((out, r)))]).cheaper_than_dense

    assert cheaper(4, 4, 1, 2)  # 4 + 2 = 6 < 8
    assert not cheaper(4, 4, 2, 2)  # 8 + 4 = 12 > 8
    assert not cheaper(2, 2, 1, 2)  # 2 + 2 = 4 = 4: a tie keeps the dense products
    assert cheaper(3, 2, 1, 2)  # 2 + 2 = 4 < 6: a zero row costs the dense products, not the factored ones
    assert not cheaper(5, 5, 2, 3)  # 10 + 6 = 16 > 15
    assert cheaper(5, 5, 2, 4)  # 10 + 8 = 18 < 20


@pytest.mark.parametrize("blocks, message", [
    ([], "LowRankRows needs at least one block (a, U, V)"),
    ([(0, np.ones((2, 1)), np.ones((3, 2)))], "block at row 0: U (2, 1) and V (3, 2) are not (m, r) and (3, r)"),
    # out is the first block's; the block that differs is named
    ([(0, np.ones((2, 1)), np.ones((3, 1))), (2, np.ones((1, 1)), np.ones((4, 1)))],
     "block at row 2: U (1, 1) and V (4, 1) are not (m, r) and (3, r)"),
    ([(0, np.ones(2), np.ones((3, 1)))], "block at row 0: U (2,) and V (3, 1) are not (m, r) and (3, r)"),
    ([(0, np.ones((3, 1)), np.ones((3, 1))), (2, np.ones((1, 1)), np.ones((3, 1)))],
     "block at row 2 (1 rows) overlaps another or leaves [0, 5)"),
    ([(4, np.ones((2, 1)), np.ones((3, 1)))], "block at row 4 (2 rows) overlaps another or leaves [0, 5)"),
    ([(-1, np.ones((2, 1)), np.ones((3, 1)))], "block at row -1 (2 rows) overlaps another or leaves [0, 5)"),
])
def test_bad_blocks_are_refused(blocks, message):
    with pytest.raises(ValueError) as info:
        LowRankRows(5, blocks)
    assert str(info.value) == message


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("sizes", [[3, 5, 6], [4, 6], [2, 4, 3, 7]])
@pytest.mark.parametrize("wrt_input", [False, True])
def test_mlp_backward_takes_a_low_rank_cotangent(bias, sizes, wrt_input):
    rng = np.random.default_rng(len(sizes) + 10 * bias)
    model = MLP(sizes, "tanh", "mse", bias=bias)
    params = model.init(3)
    x = rng.standard_normal((9, sizes[0]))
    out, hs, derivs = model._forward(params, x, order=1)
    blocks = [(0, rng.standard_normal((4, 2)), rng.standard_normal((sizes[-1], 2))),
              (6, rng.standard_normal((3, 1)), rng.standard_normal((sizes[-1], 1)))]  # rows 4-5 zero
    g = LowRankRows(9, blocks)
    dense = model._backward(params, hs, derivs, _assemble(9, sizes[-1], blocks), wrt_input=wrt_input)
    low = model._backward(params, hs, derivs, g, wrt_input=wrt_input)
    if wrt_input:
        (dense, dx), (low, lx) = dense, low
        np.testing.assert_allclose(lx, dx, rtol=1e-12, atol=1e-13)
    assert len(low) == len(dense) == len(params)
    for a, b in zip(low, dense):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


def _stack(seed=0, out=12):
    rng = np.random.default_rng(seed)
    model = MLP([3, 5, out], "tanh", "mse")
    params = model.init(seed)
    tasks = [Task(rng.standard_normal((ns, 3)), np.zeros(ns, int), rng.standard_normal((nq, 3)), np.zeros(nq, int))
             for ns, nq in ((6, 4), (5, 7), (6, 4))]
    return rng, model, params, tasks, StackedFeatures(model, params, tasks, [4, 7, 9])


def _factors(rng, out, ns, nq, r):
    return ((rng.standard_normal((ns, r)), rng.standard_normal((out, r))),
            (rng.standard_normal((nq, r)), rng.standard_normal((out, r))))


def backward_cotangent_types(monkeypatch) -> list[str]:
    """Record the type name of the output cotangent of every ``MLP._backward`` call (``LowRankRows`` or
    ``ndarray``): which path a backward pass took. The list fills as the calls happen."""
    seen: list[str] = []
    backward = MLP._backward

    def spy(self, params, hs, derivs, g_out, **kw):
        seen.append(type(g_out).__name__)
        return backward(self, params, hs, derivs, g_out, **kw)

    monkeypatch.setattr(MLP, "_backward", spy)
    return seen


@pytest.mark.parametrize("rank, expected", [(1, "LowRankRows"), (5, "ndarray")])
def test_stacked_vjp_factored_is_the_dense_vjp(rank, expected, monkeypatch):
    # Tasks 4 and 9 (6 + 4 rows each) have factors; task 7 is left out (its 12 rows are zero). The stack has
    # 32 rows. Rank r: sum m r + out R = 20 r + out 4 r against 32 out. r = 1, out = 12: 68 < 384, the
    # factored products; r = 5, out = 3: 160 > 96, the dense fallback.
    out = 12 if rank == 1 else 3
    rng, model, params, tasks, feats = _stack(out=out)
    fac = {4: _factors(rng, out, 6, 4, rank), 9: _factors(rng, out, 6, 4, rank)}
    seen = backward_cotangent_types(monkeypatch)
    got = feats.vjp_factored(fac)
    want = feats.vjp({i: (us @ vs.T, uq @ vq.T) for i, ((us, vs), (uq, vq)) in fac.items()})
    assert seen == [expected, "ndarray"]
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
    with pytest.raises(KeyError):
        feats.vjp_factored({5: fac[4]})
