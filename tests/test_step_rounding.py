"""``verify.step_rounding.float32_step`` and the float32 condition estimate of the optimiser rows (issue #17).

Expected values are closed forms: Adam's first-step derivative ``dd/dg = eps / (|g| + eps)^2`` and
float32's rounding of one number (``np.float32``).
"""

from __future__ import annotations

import numpy as np
import pytest

from reference.errors import InvalidInputError
from reference.learned_optimizers import LSTMOptimizer
from reference.optimizers import Adam, Momentum
from verify.algorithms import build_case, evaluate
from verify.matrix import ReferenceData, float32_condition
from verify.step_rounding import float32_step

EPS32 = float(np.finfo(np.float32).eps)


def _first_step(opt, g, bar_d):
    p = np.zeros_like(g)
    d, _, cache = opt.direction(0, [p], opt.init([p], [True]), [g], None, [True])
    vjp = opt.vjp(0, cache, [bar_d], None)
    return d[0], vjp.grads[0]


def test_float32_step_is_the_same_optimiser_rounded_to_float32():
    rng = np.random.default_rng(0)
    g = rng.standard_normal(200)
    for opt in (Adam(), Adam(eps_root=1e-8), Momentum(0.9, nesterov=True)):
        d64, _ = _first_step(opt, g, np.ones_like(g))
        f32 = float32_step(opt)
        assert isinstance(f32, type(opt)) and repr(f32) == repr(opt)
        d32, _ = _first_step(f32, g, np.ones_like(g))
        assert d32.dtype == np.float64  # handed back to the float64 reference
        assert np.array_equal(d32, d32.astype(np.float32).astype(np.float64))  # but a float32 result
        assert 0 < np.max(np.abs(d32 - d64) / np.abs(d64)) < 8 * EPS32
        assert np.array_equal(_first_step(opt, g, np.ones_like(g))[0], d64)  # the spec it copied is untouched


def test_adams_step_jacobian_in_float32_errs_by_eps32_over_g():
    # d = g / (|g| + eps) at the first step, so dd/dg = eps / (|g| + eps)^2 (closed form): with |g| = 1e-3 the
    # VJP sums two terms of size 1/|g| = 1e3 cancelling down to 1e-2. float64 resolves it; float32 leaves an
    # absolute error of order eps32 / |g| = 1.2e-4 (1% of the value): the mechanism the estimate measures.
    rng = np.random.default_rng(1)
    g = rng.choice([-1.0, 1.0], 500) * rng.uniform(0.5e-3, 2e-3, 500)
    bar_d = rng.uniform(0.5, 2.0, 500)
    eps = Adam().eps
    exact = bar_d * eps / (np.abs(g) + eps) ** 2
    _, b64 = _first_step(Adam(), g, bar_d)
    _, b32 = _first_step(float32_step(Adam()), g, bar_d)
    scale = bar_d / np.abs(g)  # size of the cancelling terms
    assert np.max(np.abs(b64 - exact) / scale) < 1e-13
    err32 = np.abs(b32 - exact) / scale
    assert 0.1 * EPS32 < np.max(err32) < 16 * EPS32
    assert np.max(np.abs(b32 - exact) / exact) > 1e-3  # relative to the value: far above eps32


def test_forward_and_vjp_can_be_rounded_separately():
    g = np.random.default_rng(2).uniform(1e-3, 2e-3, 50)
    d64, b64 = _first_step(Adam(), g, np.ones_like(g))
    d_f, b_f = _first_step(float32_step(Adam(), ("direction",)), g, np.ones_like(g))
    d_v, b_v = _first_step(float32_step(Adam(), ("vjp",)), g, np.ones_like(g))
    assert not np.array_equal(d_f, d64) and np.array_equal(d_v, d64)
    assert not np.array_equal(b_v, b64)


def test_bias_corrections_are_computed_in_double_and_rounded_once():
    # torch.optim and optax compute 1 - b2^t from Python floats; in float32, 1 - 0.999^2 would be 2e-5 off
    opt = float32_step(Adam())
    assert opt._bias(1) == Adam()._bias(1)  # outside the float32 step: the float64 values
    opt._in_float32 = True
    bc2 = opt._bias(1)[1]
    assert bc2.dtype == np.float32 and bc2 == np.float32(1.0 - 0.999**2)
    naive = np.float32(1.0) - np.float32(0.999) ** 2
    assert abs(float(naive) / (1.0 - 0.999**2) - 1) > 1e-5 > abs(float(bc2) / (1.0 - 0.999**2) - 1)


@pytest.mark.parametrize(("arg", "kw", "message"), [
    (LSTMOptimizer.random_params(2, seed=0), {}, "elementwise optimiser spec"),
    (None, {"parts": ("forward",)}, "parts="),
])
def test_float32_step_rejects_what_it_cannot_round(arg, kw, message):
    opt = LSTMOptimizer(arg, hidden=2) if arg is not None else Adam()
    with pytest.raises(InvalidInputError, match=message):
        float32_step(opt, **kw)


def test_condition_estimate_of_optimizer_rows_includes_the_float32_step():
    # maml-adam seed 14: rounding the inputs moves the reference by 1e-7 (condition ~1), evaluating Adam's step
    # in float32 by ~5e-6 (condition ~40): the torch float32 error is 7e-6 (scripts/adam_float32.py)
    case = build_case("maml-adam", seed=14)
    ref = ReferenceData(case)
    inputs_only = float32_condition(case, ref.grad, optimizer_step=False)
    with_step = float32_condition(case, ref.grad)
    assert inputs_only < 3 and with_step > 10 * inputs_only
    assert ref.condition32 == with_step  # the matrix's float32 cells use it
    # rows without an inner optimiser: unchanged (the flag has nothing to round)
    plain = build_case("maml", seed=14)
    g = np.concatenate([np.ravel(x) for x in evaluate(plain)[1]])
    assert float32_condition(plain, g) == float32_condition(plain, g, optimizer_step=False)
