"""Ravi & Larochelle's meta-learner LSTM step and its VJP against an independent step (issue 19).

The step is written here from the paper's equations (Ravi & Larochelle 2017,
``reference.learned_optimizers``' docstring) with distinct input scales, a
non-zero previous gate state and an inactive tensor, and every cotangent of
:meth:`MetaLearnerLSTM.vjp` is checked against a complex-step derivative
(Squire & Trapp 1998) of that independent step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from reference.errors import InvalidInputError
from reference.learned_optimizers import LSTMOptimizer, MetaLearnerLSTM

H = 1e-30
SCALES = (0.7, 1.3, 0.4, 2.1)  # distinct, so that a scale read for the wrong input shows


def _sig(z: Any) -> Any:
    return 1.0 / (1.0 + np.exp(-z))


def _step(phi: list[Any], s, g, L, p, i_prev, f_prev) -> tuple[Any, Any, Any]:
    """``i = sig(W_I . s*[g, L, p, i_prev] + b_I)``, ``f`` likewise with ``f_prev``, ``d = (1 - f) p + i g``."""
    W_I, b_I, W_F, b_F = phi
    i = _sig(W_I[0] * s[0] * g + W_I[1] * s[1] * L + W_I[2] * s[2] * p + W_I[3] * s[3] * i_prev + b_I)
    f = _sig(W_F[0] * s[0] * g + W_F[1] * s[1] * L + W_F[2] * s[2] * p + W_F[3] * s[3] * f_prev + b_F)
    return (1.0 - f) * p + i * g, i, f


def _setup(seed: int):
    rng = np.random.default_rng(seed)
    params = [rng.normal(size=(2, 3)), rng.normal(size=4), rng.normal(size=3)]
    grads = [rng.normal(size=(2, 3)), rng.normal(size=4), rng.normal(size=3)]
    active = [True, False, True]
    n = 6 + 3
    state = [rng.uniform(0.1, 0.9, size=n), rng.uniform(0.1, 0.9, size=n)]
    phi = [rng.normal(size=4), np.array(rng.normal()), rng.normal(size=4), np.array(rng.normal())]
    return rng, params, grads, active, state, phi, float(rng.uniform(0.5, 2.0))


def _flat(xs, active):
    return np.concatenate([np.ravel(x) for x, a in zip(xs, active) if a])


@pytest.mark.parametrize("seed", [0, 1])
def test_meta_learner_lstm_step_matches_the_paper(seed):
    _, params, grads, active, state, phi, loss = _setup(seed)
    opt = MetaLearnerLSTM(phi, input_scales=SCALES)
    d, new_state, _ = opt.direction(0, params, state, grads, loss, active)
    expected, i, f = _step(phi, SCALES, _flat(grads, active), loss, _flat(params, active), *state)
    assert d[1] is None
    np.testing.assert_allclose(_flat(d, active), expected, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(new_state[0], i, rtol=1e-14)
    np.testing.assert_allclose(new_state[1], f, rtol=1e-14)


@pytest.mark.parametrize("seed", [0, 1])
def test_meta_learner_lstm_vjp_matches_complex_step_of_the_paper_step(seed):
    rng, params, grads, active, state, phi, loss = _setup(seed)
    opt = MetaLearnerLSTM(phi, input_scales=SCALES)
    _, _, cache = opt.direction(0, params, state, grads, loss, active)
    bar_d = [rng.normal(size=np.shape(x)) if a else None for x, a in zip(params, active)]
    bar_next = [rng.normal(size=state[0].shape), rng.normal(size=state[1].shape)]
    vjp = opt.vjp(0, cache, bar_d, bar_next)
    g, p = _flat(grads, active), _flat(params, active)
    bd = _flat(bar_d, active)

    def J(phi_, g_, L_, p_, i_prev, f_prev):  # <bar_d, d> + <bar_i', i> + <bar_f', f>
        d, i, f = _step(phi_, SCALES, g_, L_, p_, i_prev, f_prev)
        return np.sum(bd * d) + np.sum(bar_next[0] * i) + np.sum(bar_next[1] * f)

    args = [phi, g, loss, p, state[0], state[1]]
    got = {1: _flat(vjp.grads, active), 2: vjp.loss, 3: _flat(vjp.params, active), 4: vjp.state[0],
           5: vjp.state[1]}
    for k, cot in got.items():
        e = rng.normal(size=np.shape(args[k]))
        shifted = list(args)
        shifted[k] = args[k] + 1j * H * e
        expected = np.imag(J(*shifted)) / H
        assert abs(np.sum(cot * e) - expected) <= 1e-12 * (1.0 + abs(expected)), k
    for m in range(4):  # the meta-parameters W_I, b_I, W_F, b_F
        e = rng.normal(size=np.shape(phi[m]))
        phi_c = [x.astype(complex) for x in phi]
        phi_c[m] = phi[m] + 1j * H * e
        expected = np.imag(J(phi_c, *args[1:])) / H
        assert abs(np.sum(vjp.meta[m] * e) - expected) <= 1e-12 * (1.0 + abs(expected)), m


def test_meta_learner_lstm_refuses_bad_scales():
    from reference.errors import InvalidInputError

    phi = MetaLearnerLSTM.random_params()
    for scales in ((1.0, 1.0, 1.0), (1.0, np.nan, 1.0, 1.0)):
        with pytest.raises(InvalidInputError, match="input_scales"):
            MetaLearnerLSTM(phi, input_scales=scales)


def test_lstm_optimizer_random_params_follow_their_documented_distribution():
    """``N(0, scale^2 / fan_in)`` entries (fan_in = the input width of a weight, the hidden size for a
    bias), the forget-gate bias shifted by +1; the constructor's defaults accept the defaults' output."""
    from reference.learned_optimizers import LSTMOptimizer

    LSTMOptimizer(LSTMOptimizer.random_params())  # default hidden sizes agree
    hidden, scale = 16, 0.5
    draws = [LSTMOptimizer.random_params(hidden, 2, seed=s) for s in range(20)]
    shapes = LSTMOptimizer.shapes(hidden, 2)
    for j, shape in enumerate(shapes):
        arr = np.stack([d[j] for d in draws])
        assert arr.shape[1:] == shape
        fan = shape[1] if len(shape) == 2 else hidden
        if len(shape) == 1 and shape[0] == 4 * hidden:  # an LSTM bias: gates i, f, g, o
            forget = arr[:, hidden:2 * hidden] - 1.0
            others = np.concatenate([arr[:, :hidden], arr[:, 2 * hidden:]], axis=1)
            for part in (forget, others):
                assert abs(np.mean(part)) < 0.1
                assert 0.7 < np.std(part) / (scale / np.sqrt(fan)) < 1.4, j
        else:
            assert abs(np.mean(arr)) < 4 * scale / np.sqrt(fan * arr.size)
            assert 0.7 < np.std(arr) / (scale / np.sqrt(fan)) < 1.4, j


def test_meta_learner_lstm_random_params_are_the_documented_ones():
    """Small weights (N(0, 0.3^2)), b_I = -3 (small steps), b_F = 3 (keep the parameters)."""
    draws = [MetaLearnerLSTM.random_params(seed=s) for s in range(50)]
    for d in draws:
        assert float(d[1]) == -3.0 and float(d[3]) == 3.0
    for j in (0, 2):
        w = np.concatenate([d[j] for d in draws])
        assert 0.8 < np.std(w) / 0.3 < 1.25 and abs(np.mean(w)) < 0.1


def test_meta_params_must_be_a_list_and_the_message_names_the_builder():
    """A mapping with the right number of entries is not a list of arrays; the refusal says which class's
    ``random_params`` builds a valid one (the class, not the attribute, of ``Class.meta_params``)."""
    good = MetaLearnerLSTM.random_params(seed=0)
    cases = [
        (MetaLearnerLSTM, dict(enumerate(good)), r"MetaLearnerLSTM\.meta_params must be a list of 4 arrays"),
        (MetaLearnerLSTM, good[:3], r"build one with MetaLearnerLSTM\.random_params\(seed=0\)$"),
        (LSTMOptimizer, np.zeros(len(LSTMOptimizer.shapes(8))), r"build one with LSTMOptimizer\.random_params"),
    ]
    for cls, meta, match in cases:
        with pytest.raises(InvalidInputError, match=match):
            cls(meta)
