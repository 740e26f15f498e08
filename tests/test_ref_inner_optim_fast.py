"""Fast tests of reference.inner_optim (issue 19): the declared approximations (the CLI spelling's parser,
its refusals and the value semantics of :class:`Approximation`), the schedule's refusals, MAML++-style step
weights against plain SGD written out (complex step for the gradients) and the momentum hyper-gradients
against central differences."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from reference import inner_optim
from reference.errors import InvalidInputError
from reference.inner_optim import Approximation
from reference.models import Quadratic
from reference.optimizers import SGD, Momentum
from reference.tasks import Task


@pytest.mark.parametrize("text, expected", [
    ("exact", Approximation()),
    ("exact+first_order", Approximation(first_order=True)),
    ("exact + stop_gradient + truncated:3", Approximation(truncate=3, detach_state=True)),
    ("truncated:0", Approximation(truncate=0)),
])
def test_parse_reads_every_part(text, expected):
    assert Approximation.parse(text) == expected
    assert Approximation.parse(str(expected)) == expected  # str is the CLI spelling again


@pytest.mark.parametrize("text, match", [
    (None, "must be a string"), ("   ", "must be a string"), ("truncated:3:4", "needs an integer"),
    ("truncated:x", "needs an integer"), ("exact+sgd", "unknown part"), ("truncated:-1", "truncate="),
])
def test_parse_refuses_bad_spellings(text, match):
    with pytest.raises(InvalidInputError, match=match):
        Approximation.parse(text)


def test_approximation_is_an_immutable_value():
    a = Approximation(truncate=2)
    with pytest.raises(InvalidInputError, match="truncate="):
        Approximation(truncate=-1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.truncate = 3  # type: ignore[misc]
    assert hash(a) == hash(Approximation(truncate=2))


# ---------------------------------------------------------------------------
# check_lrs refusals and MAML++-style step weights (issue 19, session 5)
# ---------------------------------------------------------------------------

class _TwoTensors(Quadratic):
    """``Quadratic`` split into two parameter tensors of shapes (2,) and (1,) (one ``L`` on their concatenation)."""

    def __init__(self):
        super().__init__(3)
        self.shapes = ((2,), (1,))

    def check_params(self, params, name="params"):
        return [np.asarray(p) for p in params]

    def _loss_and_grad(self, params, A, c):
        loss, (g,) = super()._loss_and_grad([np.concatenate(params)], A, c)
        return loss, [g[:2], g[2:]]

    def _hvp(self, params, A, c, v):
        (hv,) = super()._hvp([np.concatenate(params)], A, c, [np.concatenate(v)])
        return [hv[:2], hv[2:]]


def test_check_lrs_refuses_what_is_not_a_list_of_lists():
    model = _TwoTensors()
    row = [0.1, 0.2]
    cases = [
        ({0: row, 1: row}, 2, r"lrs must be a list of 2 per-step lists .*got dict"),  # a mapping, right length
        ([row] * 3, 2, r"lrs must be a list of 2 per-step lists .*got 3"),
        (np.array([row, row]), 2, r"lrs must be a list of 2 per-step lists .*got ndarray"),
        ([{0: 0.1, 1: 0.2}], 1, r"lrs\[0\] must be a list of 2 entries"),  # a mapping row, right length
        ([[0.1]], 1, r"lrs\[0\] must be a list of 2 entries"),  # a list row, too short
        ([[np.ones(3), 0.1]], 1, r"lrs\[0\]\[0\] has shape \(3,\)"),  # finite, wrong shape
        ([[np.array([0.1, np.nan]), 0.1]], 1, r"lrs\[0\]\[0\] has shape \(2,\), expected .*finite"),  # right shape
    ]
    for lrs, steps, match in cases:
        with pytest.raises(InvalidInputError, match=match):
            inner_optim.check_lrs(model, lrs, steps)
    out, active = inner_optim.check_lrs(model, [[np.array([0.1, 0.2]), None]], 1)
    assert active == [True, False] and out[0][1] is None


def _quadratic_problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    B, C = rng.normal(size=(2, 3, 3))
    A_s, A_q = B @ B.T / 3 + 0.2 * np.eye(3), C @ C.T / 3 + 0.2 * np.eye(3)
    return Task(A_s, rng.normal(size=3), A_q, rng.normal(size=3)), rng.normal(size=3)


def _sgd_weighted_loss(task, theta, lrs, weights):
    """``sum_k w_k L_q(p_k)`` of plain SGD on the quadratic, written out (complex-safe)."""
    p, total = theta, 0.0
    for a, w in zip(lrs, weights):
        p = p - a * (task.x_support @ (p - task.y_support))
        d = p - task.y_query
        total = total + w * 0.5 * (d @ (task.x_query @ d))
    return total


def test_step_weights_with_zero_and_negative_entries():
    """MAML++'s multi-step loss with weights 1, 0, -1, 0.5, 1 (a zero skips a term, -1 and 1 count): the
    loss against SGD written out, its theta-gradient and rate gradients against the complex step."""
    task, theta = _quadratic_problem(1)
    weights = np.array([1.0, 0.0, -1.0, 0.5, 1.0])
    rates = [0.3, 0.2, 0.25, 0.1, 0.15]
    lrs = [[a] for a in rates]
    model = Quadratic(3)
    expected = _sgd_weighted_loss(task, theta, rates, weights)
    loss = inner_optim.meta_loss(model, [theta], [task], lrs, 5, weights=weights)
    assert loss == pytest.approx(expected, rel=1e-13)
    result = inner_optim.meta_loss_and_grad(model, [theta], [task], lrs, 5, weights=weights)
    assert result.loss == pytest.approx(expected, rel=1e-13)
    h = 1e-30
    grad = [(_sgd_weighted_loss(task, theta + 1j * h * e, rates, weights)).imag / h for e in np.eye(3)]
    np.testing.assert_allclose(result.params[0], grad, rtol=1e-12, atol=1e-14)
    for k in range(5):
        bumped = list(rates)
        bumped[k] = rates[k] + 1j * h
        assert result.lrs[k][0] == pytest.approx(_sgd_weighted_loss(task, theta, bumped, weights).imag / h,
                                                 rel=1e-11, abs=1e-14)


def test_momentum_hyper_gradients_match_central_differences():
    """``hyper['momentum']`` and ``hyper['dampening']`` (accumulated over the steps) against central
    differences of the forward meta-loss (the forward pass is independent of the reverse accumulation)."""
    task, theta = _quadratic_problem(2)
    model, lrs = Quadratic(3), inner_optim.constant_lrs(Quadratic(3), 0.2, 3)
    mu, damp = 0.6, 0.3
    result = inner_optim.meta_loss_and_grad(model, [theta], [task], lrs, 3, optimizer=Momentum(mu, dampening=damp))
    assert set(result.hyper) == {"momentum", "dampening"}
    h = 1e-5

    def loss(m, d):
        return inner_optim.meta_loss(model, [theta], [task], lrs, 3, optimizer=Momentum(m, dampening=d))

    fd_mu = (loss(mu + h, damp) - loss(mu - h, damp)) / (2 * h)
    fd_damp = (loss(mu, damp + h) - loss(mu, damp - h)) / (2 * h)
    assert abs(fd_mu) > 1e-3 and abs(fd_damp) > 1e-3
    assert result.hyper["momentum"] == pytest.approx(fd_mu, rel=1e-7)
    assert result.hyper["dampening"] == pytest.approx(fd_damp, rel=1e-7)
    sgd = inner_optim.meta_loss_and_grad(model, [theta], [task], lrs, 3, optimizer=SGD())
    assert sgd.hyper == {}
