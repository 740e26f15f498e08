"""reference/models.py: contracts the derivative tests do not reach (issue 19, mutation testing).

Independent sources: SciPy's ``logsumexp``/``softmax`` on batched (3-D) logits,
complex step on the reference's own forward pass / Hessian-vector product (a
different code path from the analytic VJP and third-order product), PyTorch's
``nn.Linear`` initialisation bounds, the documented validation rules, Cauchy-integral
derivatives of the textbook activations, and the quadratic's closed form.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special

from reference.errors import InvalidInputError
from reference.models import (MAX_DENSE_HESSIAN, MLP, Quadratic, _logsumexp, _Loss, _softmax, activation_derivatives,
                              flatten, tree_add, unflatten)

H = 1e-20


def test_flatten_unflatten_tree_add():
    assert flatten([]).shape == (0,)
    a = [np.arange(3.0), np.ones((2, 2))]
    assert unflatten(flatten(a), a)[1].shape == (2, 2)
    with pytest.raises(InvalidInputError):
        unflatten(np.zeros((7, 1)), a)  # the right size, but not a vector
    b = [np.full(3, 2.0), np.full((2, 2), 4.0)]
    out = tree_add(a, b, scale=0.5)
    np.testing.assert_array_equal(out[0], a[0] + 1.0)
    np.testing.assert_array_equal(out[1], a[1] + 2.0)
    np.testing.assert_array_equal(tree_add(a, b)[0], a[0] + 2.0)


def test_relu_derivative_at_zero_is_zero():
    d = activation_derivatives("relu", np.array([-1.0, 0.0, 2.0]), 1)
    np.testing.assert_array_equal(d[0], [0.0, 0.0, 2.0])
    np.testing.assert_array_equal(d[1], [0.0, 0.0, 1.0])  # relu'(0) = 0 (CONVENTIONS, as torch)


def test_batched_softmax_logsumexp_and_loss_hessian_against_scipy():
    rng = np.random.default_rng(0)
    o = rng.normal(size=(3, 4, 5)) * 3  # batched logits: the class axis is the last, not axis 1
    np.testing.assert_allclose(_logsumexp(o), scipy.special.logsumexp(o, axis=-1), rtol=1e-14)
    np.testing.assert_allclose(_softmax(o), scipy.special.softmax(o, axis=-1), rtol=1e-14)
    # The cross-entropy Hessian-vector product along a batch of directions (n, d) x (k, n, d):
    # H v = (diag(s) - s s^T) v / n per row, by complex step of the softmax.
    n, d = 4, 5
    logits, y = rng.normal(size=(n, d)), rng.integers(0, d, size=n)
    loss = _Loss("ce", logits, y)
    V = rng.normal(size=(3, n, d))
    hv = loss.hvp(V)
    for k in range(3):
        cs = _softmax(logits + 1j * H * V[k]).imag / H
        np.testing.assert_allclose(hv[k], cs / n, rtol=1e-10, atol=1e-14)
    # third(a, b) = grad_o (a^T H(o) b), batched: <third(a, b)[k], c> = d/dt a_k^T H(o + t c) b_k.
    A, B, C = rng.normal(size=(3, n, d)), rng.normal(size=(3, n, d)), rng.normal(size=(n, d))
    third = loss.third(A, B)
    moved = _Loss("ce", logits + 1j * H * C, y)
    for k in range(3):
        assert np.sum(third[k] * C) == pytest.approx(np.sum(A[k] * moved.hvp(B[k]).imag) / H, rel=1e-9)


def test_mse_is_the_mean_over_all_entries():
    rng = np.random.default_rng(1)
    o, y = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    loss = _Loss("mse", o, y)
    assert loss.value() == pytest.approx(np.mean((o - y) ** 2), rel=1e-14)
    np.testing.assert_allclose(loss.grad(), 2 * (o - y) / o.size, rtol=1e-14)
    # bce with several outputs: the mean over all n*d entries of softplus(o) - y o.
    t = (rng.uniform(size=(4, 3)) > 0.5).astype(float)
    bce = _Loss("bce", o, t)
    assert bce.value() == pytest.approx(np.mean(np.logaddexp(0.0, o) - t * o), rel=1e-14)


def test_mlp_constructor_and_init():
    MLP(np.array([2, 3, 1]))
    for bad in (5, "23", b"23"):
        with pytest.raises(InvalidInputError, match="sizes"):
            MLP(bad)
    with pytest.raises(InvalidInputError, match=r"sizes\[-1\]=1"):
        MLP([2, 3, 1], loss="ce")
    net = MLP([4, 50, 1])
    p0 = net.init()
    for a, b in zip(p0, net.init(0)):
        np.testing.assert_array_equal(a, b)
    # PyTorch nn.Linear: W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)); both signs occur among 50 biases.
    for p, fan_in in zip(p0, (4, 4, 50, 50)):
        assert np.all(np.abs(p) <= 1 / np.sqrt(fan_in))
        if p.size > 1:
            assert p.min() < 0 < p.max()


def test_mlp_validation_rules():
    net = MLP([1, 3, 2])
    for bad in (np.zeros(net.n_params), 5, None, {"W": 1}):
        with pytest.raises(InvalidInputError):
            net.check_params(bad)
    # A 1-D input to a 1-input network gets the reshape hint; to a 2-input network it does not.
    with pytest.raises(InvalidInputError, match=r"x\.reshape\(-1, 1\)"):
        net.check_x(np.ones(4))
    with pytest.raises(InvalidInputError) as err:
        MLP([2, 3, 1]).check_x(np.ones(4))
    assert "reshape" not in str(err.value)
    with pytest.raises(InvalidInputError):
        MLP([2, 3, 1]).check_x(np.ones((0, 2)))  # no rows
    ce = MLP([2, 3, 3], loss="ce")
    np.testing.assert_array_equal(ce.check_y(np.array([0.0, 2.0, 1.0]), 3), [0, 2, 1])
    for bad in (np.zeros((3, 1), dtype=int), [0, 1], [0, -1, 1], [0.5, 1, 2], [0, 3, 1]):
        with pytest.raises(InvalidInputError):
            ce.check_y(bad, 3)
    mse = MLP([2, 3, 1])
    assert mse.check_y(np.ones(6), 6).shape == (6, 1)
    with pytest.raises(InvalidInputError):
        mse.check_y(np.ones((3, 2)), 6)  # 6 numbers but not 6 targets
    bce = MLP([2, 3, 1], loss="bce")
    bce.check_y(np.array([0.0, 1.0, 0.25]), 3)
    for bad in ([0.0, -0.5, 1.0], [0.0, 1.5, 1.0]):
        with pytest.raises(InvalidInputError):
            bce.check_y(np.array(bad), 3)


def test_vjp_wrt_input_against_complex_step_of_the_forward_pass():
    rng = np.random.default_rng(2)
    net = MLP([3, 5, 4, 2], "tanh")
    p = [rng.normal(size=s) for s in net.shapes]
    x, c, dx = rng.normal(size=(6, 3)), rng.normal(size=(6, 2)), rng.normal(size=(6, 3))
    grads = net.vjp(p, x, c)
    assert isinstance(grads, list) and len(grads) == len(net.shapes)  # parameters only by default
    _, gx = net.vjp(p, x, c, wrt_input=True)
    expect = np.sum(c * net.forward(p, x + 1j * H * dx).imag) / H
    assert np.sum(gx * dx) == pytest.approx(expect, rel=1e-12)


def test_third_order_against_complex_step_of_the_hvp():
    rng = np.random.default_rng(3)
    for loss, d_out in (("mse", 2), ("ce", 3)):
        net = MLP([3, 4, 5, d_out], "tanh", loss)
        p = [rng.normal(size=s) for s in net.shapes]
        x = rng.normal(size=(5, 3))
        y = rng.normal(size=(5, d_out)) if loss == "mse" else rng.integers(0, d_out, size=5)
        u, w = [rng.normal(size=s) for s in net.shapes], [rng.normal(size=s) for s in net.shapes]
        third = net.third_order(p, x, y, u, w)
        cs = net.hvp([a + 1j * H * b for a, b in zip(p, u)], x, y, w)
        for t, c in zip(third, cs):
            np.testing.assert_allclose(t, c.imag / H, rtol=1e-9, atol=1e-12)


class _Reached(Exception):
    pass


def test_dense_hessian_limit_and_blocks(monkeypatch):
    # A model of exactly MAX_DENSE_HESSIAN parameters is built; one more is refused, naming 8 n^2 bytes.
    assert MAX_DENSE_HESSIAN == 4000
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(2, 4)), rng.normal(size=(2, 1))
    big = MLP([4, 800, 1], "tanh", bias=False)  # 3200 + 800 = 4000 parameters
    over = MLP([4, 800, 1], "tanh", bias=True)
    with pytest.raises(InvalidInputError, match=r"has 4801 parameters; a dense Hessian is limited to 4000 \(128 MB\)"):
        over.hessian(over.init(0), x, y)
    with monkeypatch.context() as m:  # 4000 passes the size check (the products themselves are not needed)
        def reached(*args, **kwargs):
            raise _Reached
        m.setattr(MLP, "_hvp", reached)
        with pytest.raises(_Reached):
            big.hessian(big.init(0), x, y)
    # Several blocks of directions: every column is H e_j (R-operator) and matches complex step of the gradient.
    net = MLP([3, 20, 10, 2], "tanh")  # 60 + 20 + 200 + 10 + 20 + 2 = 312 parameters: 3 blocks of 128
    p = net.init(1)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 2))
    Hm = net.hessian(p, x, y)
    np.testing.assert_allclose(Hm, Hm.T, rtol=0, atol=1e-12)
    for j in (0, 127, 128, 255, 256, 311):
        e = np.zeros(net.n_params)
        e[j] = 1.0
        pc = unflatten(flatten(p) + 1j * H * e, net.shapes)
        col = flatten(net.grad(pc, x, y)).imag / H
        np.testing.assert_allclose(Hm[:, j], col, rtol=1e-10, atol=1e-13)


def test_quadratic_contract():
    q = Quadratic(3)
    assert q.is_analytic is True and q.bias is False and len(q.shapes) == 1
    for bad in (np.zeros(3), 5, None):
        with pytest.raises(InvalidInputError):
            q.check_params(bad)
    np.testing.assert_array_equal(q.init()[0], q.init(0)[0])
    with pytest.raises(InvalidInputError):
        q.check_params([np.zeros(3), np.zeros(3)])
    # A large symmetric matrix with round-off asymmetry (relative 1e-14) is symmetric.
    rng = np.random.default_rng(5)
    B = rng.normal(size=(3, 3)) * 1e6
    A = B + B.T
    A[0, 1] += 1e-8
    q.check_x(A)
    # Batched directions (k, dim): each row is A v.
    V = rng.normal(size=(4, 3))
    np.testing.assert_allclose(q._hvp([np.zeros(3)], A, np.zeros(3), [V])[0], np.stack([A @ v for v in V]),
                               rtol=1e-13)


def _cauchy_derivatives(f, z, kmax, r=0.5, n=64):
    """f^(k)(z), k = 0..kmax, by Cauchy's integral formula on the circle |w - z| = r: the trapezoidal rule
    k!/(n r^k) sum_j f(z + r e^(i t_j)) e^(-i k t_j) is spectrally accurate for f analytic on a larger disc
    (the singularities of tanh, the logistic function and softplus nearest the test points are >= 1.2 away)."""
    t = 2 * np.pi * np.arange(n) / n
    vals = f(z[..., None] + r * np.exp(1j * t))
    return [math.factorial(k) / r**k * np.mean(vals * np.exp(-1j * k * t), axis=-1) for k in range(kmax + 1)]


def test_activation_derivatives_to_third_order_against_cauchy_integrals():
    """act, act', act'', act''' of every activation against Cauchy-integral derivatives of the textbook
    definitions (tanh, 1 / (1 + e^-z), log(1 + e^z), z), at real points of both signs (large |z| too: the
    stable branches) and at complex points (complex-step safety); lower orders return the leading entries."""
    forms = {"tanh": np.tanh, "sigmoid": lambda w: 1 / (1 + np.exp(-w)), "softplus": lambda w: np.log(1 + np.exp(w)),
             "identity": lambda w: w}
    real = np.array([-30.0, -3.0, -0.7, -1e-3, 0.0, 0.4, 2.5, 30.0])
    for name, f in forms.items():
        for z in (real, np.array([-2.0 + 0.3j, 0.5 - 1e-3j, 1.5 + 1e-20j])):
            got = activation_derivatives(name, z, 3)
            assert len(got) == 4
            for k, want in enumerate(_cauchy_derivatives(f, z, 3)):
                want = want if np.iscomplexobj(z) else want.real
                np.testing.assert_allclose(got[k], want, rtol=1e-10, atol=1e-12, err_msg=f"{name} order {k}")
            for order in range(3):  # lower orders: the same leading entries
                low = activation_derivatives(name, z, order)
                assert len(low) == order + 1 and all(np.allclose(a, b, rtol=1e-15, atol=0) for a, b in zip(low, got))


def test_mixed_real_and_complex_parameters():
    """Complex step along the biases alone (real weights, complex biases: z = x W^T real, z + b complex) and
    along the input alone (real parameters and cotangent, complex activations): the results equal the
    complex-analytic extension, checked against the gradient (bias direction) and the JVP (input direction)."""
    rng = np.random.default_rng(7)
    for act in ("tanh", "softplus", "sigmoid"):
        net = MLP([3, 4, 2], act, loss="mse")
        p = net.init(1)
        x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 2))
        db = [np.zeros_like(a) if a.ndim == 2 else rng.normal(size=a.shape) for a in p]
        pc = [a if a.ndim == 2 else a + 1j * H * d for a, d in zip(p, db)]
        assert pc[0].dtype == np.float64 and pc[1].dtype == np.complex128
        value, g = net.loss_and_grad(p, x, y)
        lc = net.loss(pc, x, y)
        assert lc.real == pytest.approx(value, rel=1e-14)
        assert lc.imag / H == pytest.approx(sum(np.sum(a * d) for a, d in zip(g, db)), rel=1e-12)
        np.testing.assert_allclose(net.forward(pc, x).real, net.forward(p, x), rtol=1e-14, atol=1e-15)
        # Input direction: <vjp(x + i h dx, c), u> = <c, jvp(x + i h dx, u)> as complex numbers (the same
        # bilinear form c^T J(x) u of the complex-analytic Jacobian), with real params and cotangent.
        xc = x + 1j * H * rng.normal(size=x.shape)
        c = rng.normal(size=(5, 2))
        u = [rng.normal(size=a.shape) for a in p]
        grads, gx = net.vjp(p, xc, c, wrt_input=True)
        lhs = sum(np.sum(a * b) for a, b in zip(grads, u))
        rhs = np.sum(c * net.jvp(p, xc, u))
        assert abs(lhs.real - rhs.real) <= 1e-13 * abs(rhs.real)
        assert abs(lhs.imag - rhs.imag) <= 1e-10 * abs(rhs.imag)
        dxx = rng.normal(size=x.shape)
        assert np.sum(gx * dxx).real == pytest.approx(np.sum(c * net.forward(p, x + 1j * H * dxx).imag / H), rel=1e-12)


def test_quadratic_public_api_against_its_closed_form():
    """L = 1/2 (theta - c)^T A (theta - c): value, gradient A (theta - c), H v = A v, a vanishing third
    derivative and the Hessian A, each from its public entry point (written out here, not by the model)."""
    rng = np.random.default_rng(8)
    q = Quadratic(4)
    B = rng.normal(size=(4, 4))
    A, c, theta, v = B @ B.T + np.eye(4), rng.normal(size=4), rng.normal(size=4), rng.normal(size=4)
    r = theta - c
    value = 0.5 * float(r @ A @ r)
    assert q.loss([theta], A, c) == pytest.approx(value, rel=1e-14)
    loss, (g,) = q.loss_and_grad([theta], A, c)
    assert loss == pytest.approx(value, rel=1e-14)
    np.testing.assert_allclose(g, A @ r, rtol=1e-13)
    (g2,) = q.grad([theta], A, c)
    np.testing.assert_allclose(g2, A @ r, rtol=1e-13)
    # Complex step of the loss along v: <grad, v>.
    assert np.imag(q.loss([theta + 1j * H * v], A, c)) / H == pytest.approx(float(A @ r @ v), rel=1e-12)
    np.testing.assert_allclose(q.hvp([theta], A, c, [v])[0], A @ v, rtol=1e-13)
    assert np.array_equal(q.third_order([theta], A, c, [v], [r])[0], np.zeros(4))
    np.testing.assert_array_equal(q.hessian([theta], A, c), A)


def test_quadratic_symmetry_tolerance_is_absolute_1e_12_of_the_largest_entry_at_least_1():
    """check_x accepts |A - A^T| <= 1e-12 max(1, max|A|) entrywise and refuses more (rtol 0): at max|A| = 1e-3
    (the floor 1 applies), at 1, and at 1e6 (the scale applies); a large relative asymmetry is refused."""
    q = Quadratic(2)
    for scale in (1e-3, 1.0, 1e6):
        tol = 1e-12 * max(1.0, scale)
        for off, ok in [(0.6 * tol, True), (1.5 * tol, False)]:
            A = scale * np.array([[1.0, 0.5], [0.5, 1.0]])
            A[1, 0] += off
            if ok:
                q.check_x(A)
            else:
                with pytest.raises(InvalidInputError, match="symmetric"):
                    q.check_x(A)
    with pytest.raises(InvalidInputError, match="symmetric"):
        q.check_x(np.array([[1.0, 1.0], [1.5, 1.0]]))  # within a relative 100 %: still refused


def test_flat_hessian_vector_product_with_biases_matches_complex_step():
    """MLP._hvp_flat (iMAML's flat products) on a biased 3-layer MLP against the complex step of the gradient:
    every parameter block, weights and biases, at its offset in the flat vector."""
    rng = np.random.default_rng(9)
    for bias in (True, False):
        net = MLP([3, 5, 4, 2], "tanh", loss="ce", bias=bias)
        p = [a + 0.3 * rng.normal(size=a.shape) for a in net.init(2)]
        x, y = rng.normal(size=(6, 3)), rng.integers(0, 2, size=6)
        v = rng.normal(size=net.n_params)
        got = net._hvp_flat(net._hvp_flat_point(p, x, y), v)
        want = flatten(net.grad(unflatten(flatten(p) + 1j * H * v, net.shapes), x, y)).imag / H
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14 * np.max(np.abs(want)))
