"""Exactness: the NumPy reference at rational points against SymPy's exact result.

Every input is a dyadic rational (k / 2^m), so the float64 numbers given to
the NumPy reference are exactly the rationals SymPy evaluates with. SymPy's
value is exact (rational problems) or computed by mpmath at 50 digits
(R2-D2's softmax, gradient flow's exponentials); the reference must agree to
``EXACT_RTOL`` in float64, normwise (``max |ref - exact| / max |exact|``, so
entries that are exactly zero, such as R2-D2's offset gradient under
softmax, are covered too).

Table-driven: one row per (problem, sizes), one test. The references are the
other engineers' modules (issues 3 and 4); each is imported with
``pytest.importorskip`` so a missing module skips rather than errors.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import sympy as sp
from hypothesis import given
from hypothesis import strategies as st

from reference.models import MLP, Quadratic
from reference.symbolic import derive
from reference.tasks import Task

# float64 round-off of the reference's own arithmetic on these small problems is
# ~1e-16; 1e-13 is the exactness requirement.
EXACT_RTOL = 1e-13

# Not cached across tests (SymPy's own cache makes a rebuild cheap): the mutation runner selects tests
# by per-test coverage, and a derivation built once would be attributed to the first test only.
_derive = derive


def _ref(module: str):
    return pytest.importorskip(f"reference.{module}")


def dyadic(rng: np.random.Generator, shape, scale: float = 1.5, den: int = 16) -> np.ndarray:
    k = int(scale * den)
    return rng.integers(-k, k + 1, size=shape) / den


def spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    """A symmetric positive-definite matrix with dyadic entries (B B^T / 2 + I / 2, B in (1/8) Z)."""
    B = rng.integers(-8, 9, size=(dim, dim)) / 8
    return B @ B.T / 2 + np.eye(dim) / 2


def rel_error(ref: np.ndarray, exact: np.ndarray) -> float:
    ref = np.asarray(ref, dtype=float).ravel()
    exact = np.asarray(exact, dtype=float).ravel()
    scale = np.max(np.abs(exact))
    return float(np.max(np.abs(ref - exact)) / scale) if scale > 0 else float(np.max(np.abs(ref)))


def exact_values(d, values: dict, digits: int | None) -> tuple[float, np.ndarray]:
    loss, grad = d.evaluate(values, digits=digits)
    if digits is None:  # the rational problems really are rational
        assert loss.is_Rational and all(g.is_Rational for g in grad)
    return float(loss), np.array([float(g) for g in grad])


def flat(arrays) -> np.ndarray:
    return np.concatenate([np.ravel(a) for a in arrays])


# ---------------------------------------------------------------------------
# One function per problem: (derivation, rng) -> (values, reference loss, reference flat gradient, digits)
# ---------------------------------------------------------------------------


def _quadratic_task(rng, dim):
    return dict(theta=dyadic(rng, dim), A_s=spd(rng, dim), c_s=dyadic(rng, dim), A_q=spd(rng, dim), c_q=dyadic(rng, dim))


def case_maml(d, rng, first_order=False):
    maml = _ref("maml")
    dim, steps = d.params["dim"], d.params["steps"]
    v = _quadratic_task(rng, dim)
    v["alpha"] = rng.integers(1, 5) / 16
    task = Task(v["A_s"], v["c_s"], v["A_q"], v["c_q"])
    loss, grad = maml.meta_loss_and_grad(Quadratic(dim), [v["theta"]], [task], v["alpha"], steps, first_order=first_order)
    return v, loss, flat(grad), None


def case_metasgd(d, rng):
    metasgd = _ref("metasgd")
    dim, steps = d.params["dim"], d.params["steps"]
    v = _quadratic_task(rng, dim)
    v["alpha"] = rng.integers(1, 5, size=dim) / 16
    task = Task(v["A_s"], v["c_s"], v["A_q"], v["c_q"])
    loss, g, g_lr = metasgd.meta_loss_and_grad(Quadratic(dim), [v["theta"]], [v["alpha"]], [task], steps)
    return v, loss, flat(g + g_lr), None


def case_reptile(d, rng):
    reptile = _ref("reptile")
    dim, steps = d.params["dim"], d.params["steps"]
    v = _quadratic_task(rng, dim)
    v["alpha"] = rng.integers(1, 5) / 16
    task = Task(v["A_s"], v["c_s"], v["A_q"], v["c_q"])
    direction = reptile.direction(Quadratic(dim), [v["theta"]], [task], v["alpha"], steps)
    del v["A_q"], v["c_q"]  # Reptile uses the support set only
    return v, None, flat(direction), None


def case_newton(d, rng):
    newton = _ref("newton")
    dim, steps = d.params["dim"], d.params["steps"]
    v = _quadratic_task(rng, dim)
    v["alpha"], v["delta"] = rng.integers(1, 9) / 16, rng.integers(0, 5) / 8
    task = Task(v["A_s"], v["c_s"], v["A_q"], v["c_q"])
    loss, grad = newton.meta_loss_and_grad(Quadratic(dim), [v["theta"]], [task], v["alpha"], steps, damping=v["delta"])
    return v, loss, flat(grad), None


def case_imaml(d, rng, solver="cg"):
    imaml = _ref("imaml")
    dim = d.params["dim"]
    v = _quadratic_task(rng, dim)
    v["lam"] = rng.integers(2, 17) / 8
    task = Task(v["A_s"], v["c_s"], v["A_q"], v["c_q"])
    loss, grad = imaml.meta_loss_and_grad(Quadratic(dim), [v["theta"]], [task], v["lam"], solver=solver)
    return v, loss, flat(grad), None


def case_linear_regression(d, rng):
    maml = _ref("maml")
    p = d.params
    dim, bias = p["dim"], p["bias"]
    xs, xq = dyadic(rng, (p["shots"], dim)), dyadic(rng, (p["queries"], dim))
    ys, yq = dyadic(rng, p["shots"]), dyadic(rng, p["queries"])
    W, b = dyadic(rng, (1, dim)), dyadic(rng, 1)
    v = dict(W=W, alpha=rng.integers(1, 5) / 16, x_s=xs if dim > 1 else xs[:, 0], y_s=ys,
             x_q=xq if dim > 1 else xq[:, 0], y_q=yq)
    params = [W, b] if bias else [W]
    if bias:
        v["b"] = b[0]
    model = MLP([dim, 1], activation="identity", loss="mse", bias=bias)
    task = Task(xs, ys.reshape(-1, 1), xq, yq.reshape(-1, 1))
    loss, grad = maml.meta_loss_and_grad(model, params, [task], v["alpha"], p["steps"])
    return v, loss, flat(grad), None


def case_anil(d, rng):
    anil = _ref("anil")
    p = d.params
    h = p["dim"]
    W1, b1, W2, b2 = dyadic(rng, (h, 1)), dyadic(rng, h), dyadic(rng, (1, h)), dyadic(rng, 1)
    xs, ys, xq, yq = dyadic(rng, p["shots"]), dyadic(rng, p["shots"]), dyadic(rng, p["queries"]), dyadic(rng, p["queries"])
    alpha = rng.integers(1, 5) / 16
    v = dict(W1=W1, b1=b1, W2=W2, b2=b2[0], alpha=alpha, x_s=xs, y_s=ys, x_q=xq, y_q=yq)
    model = MLP([1, h, 1], activation="identity", loss="mse")
    task = Task(xs.reshape(-1, 1), ys.reshape(-1, 1), xq.reshape(-1, 1), yq.reshape(-1, 1))
    loss, grad = anil.meta_loss_and_grad(model, [W1, b1, W2, b2], [task], alpha, p["steps"])
    return v, loss, flat(grad), None


def case_r2d2(d, rng, form="dual"):
    r2d2 = _ref("r2d2")
    p = d.params
    dim, n, q = p["dim"], p["shots"], p["queries"]
    W, xs, xq = dyadic(rng, (dim, dim)), dyadic(rng, (n, dim)), dyadic(rng, (q, dim))
    lam, scale, offset = rng.integers(2, 17) / 8, rng.integers(-16, 17) / 8, rng.integers(-8, 9) / 8
    v = dict(W=W, x_s=xs, x_q=xq, lam=lam, scale=scale, offset=offset)
    if p["regression"]:
        ys, yq = dyadic(rng, n), dyadic(rng, q)
        v.update(y_s=ys, y_q=yq)
        task, n_classes = Task(xs, ys.reshape(-1, 1), xq, yq.reshape(-1, 1)), 1
    else:
        task = Task(xs, np.array(d.extras["support_labels"]), xq, np.array(d.extras["query_labels"]))
        n_classes = p["classes"]
    backbone = MLP([dim, dim], activation="identity", bias=False)
    loss, g, hyper = r2d2.meta_loss_and_grad(backbone, [W], [task], n_classes, lam, scale, offset,
                                             bias_column=p["bias_column"], normalize=p["normalize"], form=form,
                                             regression=p["regression"])
    grad = np.r_[g[0].ravel(), hyper["lam"], hyper["scale"], hyper["offset"]]
    return v, loss, grad, (None if p["regression"] else 50)


_fast = [
    ("quadratic-maml", dict(dim=1, steps=1), case_maml),
    ("quadratic-maml", dict(dim=1, steps=3), case_maml),
    ("quadratic-maml", dict(dim=2, steps=2), case_maml),
    ("quadratic-maml", dict(dim=2, steps=2, first_order=True), functools.partial(case_maml, first_order=True)),
    ("quadratic-metasgd", dict(dim=1, steps=2), case_metasgd),
    ("quadratic-metasgd", dict(dim=2, steps=2), case_metasgd),
    ("quadratic-reptile", dict(dim=2, steps=3), case_reptile),
    ("quadratic-newton-maml", dict(dim=1, steps=2), case_newton),
    ("quadratic-newton-maml", dict(dim=2, steps=1), case_newton),
    ("quadratic-imaml", dict(dim=1), case_imaml),
    ("quadratic-imaml", dict(dim=2), functools.partial(case_imaml, solver="direct")),
    ("quadratic-imaml", dict(dim=2), case_imaml),
    ("linear-regression-maml", dict(dim=1, steps=1, shots=1), case_linear_regression),
    ("linear-regression-maml", dict(dim=1, steps=2, shots=2), case_linear_regression),
    ("linear-regression-maml", dict(dim=1, steps=3, shots=3, bias=False), case_linear_regression),
    ("linear-regression-maml", dict(dim=2, steps=2, shots=3, bias=False), case_linear_regression),
    ("anil-linear", dict(dim=2, steps=2), case_anil),
    ("r2d2-ridge", dict(dim=2), case_r2d2),
    ("r2d2-ridge", dict(dim=2), functools.partial(case_r2d2, form="primal")),
    ("r2d2-ridge", dict(dim=2, bias_column=True, normalize=True), functools.partial(case_r2d2, form="primal")),
    ("r2d2-ridge", dict(dim=3, shots=3, regression=True, bias_column=True), case_r2d2),
]
_slow = [
    ("quadratic-maml", dict(dim=3, steps=4), case_maml),
    ("quadratic-metasgd", dict(dim=3, steps=2), case_metasgd),
    ("quadratic-newton-maml", dict(dim=2, steps=3), case_newton),
    ("quadratic-imaml", dict(dim=3), case_imaml),
    ("linear-regression-maml", dict(dim=2, steps=3, shots=3), case_linear_regression),
    ("anil-linear", dict(dim=3, steps=2, shots=3, queries=3), case_anil),
    ("r2d2-ridge", dict(dim=3, shots=3, queries=2, classes=3, bias_column=True, normalize=True), case_r2d2),
    ("r2d2-ridge", dict(dim=3, shots=3, queries=2, classes=3), functools.partial(case_r2d2, form="primal")),
]
CASES = [pytest.param(*c, id=f"{c[0]}-{'-'.join(f'{k}{v}' for k, v in c[1].items())}-{getattr(c[2], 'keywords', '')}")
         for c in _fast] + [
    pytest.param(*c, id=f"{c[0]}-{'-'.join(f'{k}{v}' for k, v in c[1].items())}", marks=pytest.mark.slow)
    for c in _slow]


@pytest.mark.parametrize("problem, sizes, case", CASES)
def test_reference_agrees_with_sympy_at_rational_points(problem, sizes, case):
    d = _derive(problem, **sizes)
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        values, ref_loss, ref_grad, digits = case(d, rng)
        exact_loss, exact_grad = exact_values(d, values, digits)
        err = rel_error(ref_grad, exact_grad)
        assert err <= EXACT_RTOL, (
            f"{problem} {sizes} seed {seed}: meta-gradient reference={ref_grad} sympy={exact_grad} "
            f"rel={err:.1e} (tol {EXACT_RTOL:.0e}, float64)"
        )
        if ref_loss is not None:
            assert abs(ref_loss - exact_loss) <= EXACT_RTOL * abs(exact_loss), (
                f"{problem} {sizes} seed {seed}: meta-loss reference={ref_loss!r} sympy={exact_loss!r}"
            )


@given(dim=st.integers(1, 2), steps=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_maml_property_random_rational_points(dim, steps, seed):
    """Hypothesis over sizes and points: reference MAML == SymPy MAML exactly, to 1e-13."""
    d = _derive("quadratic-maml", dim=dim, steps=steps)
    values, ref_loss, ref_grad, _ = case_maml(d, np.random.default_rng(seed))
    exact_loss, exact_grad = exact_values(d, values, None)
    assert rel_error(ref_grad, exact_grad) <= EXACT_RTOL
    assert abs(ref_loss - exact_loss) <= EXACT_RTOL * abs(exact_loss)


def test_r2d2_exact_offset_gradient_is_zero_under_softmax():
    """A softmax is shift invariant: SymPy's offset derivative is exactly 0 and the reference's is round-off."""
    d = _derive("r2d2-ridge", dim=2)
    values, _, ref_grad, _ = case_r2d2(d, np.random.default_rng(3))
    _, exact = d.evaluate(values, digits=50)
    assert abs(exact[-1]) < sp.Float(10) ** -45
    assert abs(ref_grad[-1]) <= 1e-15 * np.max(np.abs(ref_grad))
