"""iMAML's solves in the coordinates of the support Hessian's range (reference/imaml_subspace.py).

* The coordinates embed the invariant subspace isometrically: norms and inner products are those of the
  flat vectors, and a flat vector comes back from its coordinates.
* A product in coordinates is the model's Hessian-vector product (the R-operator on the flat vectors,
  another code path), for every activation and loss, with and without biases, several factored layers,
  rank-deficient rows and a point with zero backpropagated rows; the complement it drops is annihilated.
* The trust region is scipy's ``trust-ncg`` (the same algorithm on the full vectors, another
  implementation): the same iterates on Rosenbrock's function.
* The meta-gradient through the coordinates is the dense solve's (``solver="direct"``) and the flat CG's.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
from hypothesis import given
from hypothesis import strategies as st

from reference import imaml, imaml_subspace
from reference.errors import ConvergenceError
from reference.models import MLP, flatten, unflatten
from reference.tasks import Task, sinusoid

EPS = np.finfo(float).eps


def _point(sizes, activation="tanh", loss="mse", bias=True, rows=10, seed=0, x=None, y=None):
    model = MLP(sizes, activation, loss, bias=bias)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, sizes[0])) if x is None else x
    if y is None:
        y = (rng.integers(0, sizes[-1], rows) if loss == "ce" else
             rng.integers(0, 2, (rows, sizes[-1])).astype(float) if loss == "bce" else
             rng.standard_normal((rows, sizes[-1])))
    params = model.init(seed)
    return model, params, x, y


def _subspace(model, params, x, y, factored=None):
    point = model._hvp_point(params, x, y)
    return imaml_subspace.Subspace(model, point, imaml_subspace.layers(model, x.shape[0])
                                   if factored is None else factored)


def _hvp(model, params, x, y, v):
    return flatten(model._hvp(params, x, y, unflatten(v, model.shapes)))


def test_row_basis_spans_the_rows_with_orthonormal_rows():
    rng = np.random.default_rng(0)
    for rank in (1, 3, 10):
        a = rng.standard_normal((10, rank)) @ rng.standard_normal((rank, 256))
        q = imaml_subspace._row_basis(a)
        assert q.shape == (rank, 256)  # round-off directions (~1e-16 of the largest) are dropped
        assert np.max(np.abs(q @ q.T - np.eye(rank))) <= 1e-14
        assert np.max(np.abs(a - (a @ q.T) @ q)) <= 1e-13 * np.max(np.abs(a))
    assert imaml_subspace._row_basis(np.zeros((10, 256))).shape == (0, 256)
    # a small but genuine direction is kept: 1e-9 of the largest, far above max(shape) eps
    a = np.outer(rng.standard_normal(10), rng.standard_normal(256)) + 1e-9 * np.outer(
        rng.standard_normal(10), rng.standard_normal(256))
    assert imaml_subspace._row_basis(a).shape == (2, 256)


def test_layers_factored_are_the_large_blocks_with_few_rows():
    assert imaml_subspace.layers(MLP([1, 256, 256, 1]), 10) == (1,)
    assert imaml_subspace.layers(MLP([1, 40, 40, 1]), 10) == ()  # 1,600 weights: below MIN_BLOCK
    assert imaml_subspace.layers(MLP([3, 160, 160, 160, 1]), 10) == (1, 2)
    # 128 x 128 = MIN_BLOCK weights: factored while rows (128 + 128) <= 16,384 / 4, i.e. up to 16 rows
    assert imaml_subspace.layers(MLP([1, 128, 128, 1]), 16) == (1,)
    assert imaml_subspace.layers(MLP([1, 128, 128, 1]), 17) == ()
    assert imaml_subspace.layers(MLP([1, 128, 127, 1]), 1) == ()  # 16,256 weights: one block short
    assert imaml_subspace.layers(MLP([160, 120, 2]), 10) == (0,)


CASES = [
    ([1, 256, 256, 1], "tanh", "mse", True),
    ([3, 200, 150, 2], "softplus", "mse", True),
    ([2, 160, 160, 160, 1], "sigmoid", "mse", False),
    ([4, 150, 150, 3], "relu", "ce", True),
    ([4, 150, 150, 3], "identity", "bce", False),
    ([2, 200, 130], "tanh", "mse", True),  # the factored layer is the output layer
    ([160, 120, 2], "tanh", "mse", True),  # the first layer factored (no R{h} term), the next one dense
]


@pytest.mark.parametrize("sizes, activation, loss, bias", CASES)
def test_coordinates_are_an_isometry_and_come_back(sizes, activation, loss, bias):
    model, params, x, y = _point(sizes, activation, loss, bias)
    sub = _subspace(model, params, x, y)
    assert sub.factored
    rng = np.random.default_rng(5)
    u, v = rng.standard_normal(model.n_params), rng.standard_normal(model.n_params)
    yu, eu = sub.project(u)
    yv, ev = sub.project(v)
    assert sub.size < model.n_params / 2
    assert abs(np.linalg.norm(yu) - np.linalg.norm(u)) <= 1e-14 * np.linalg.norm(u)
    assert np.max(np.abs(sub.expand(yu, eu) - u)) <= 1e-14 * np.max(np.abs(u))
    # Inner products of the invariant parts (t is along each vector's own complement: excluded)
    su, sv = sub.expand(np.concatenate((yu[:-1], [0.0])), None), sub.expand(np.concatenate((yv[:-1], [0.0])), None)
    assert abs(yu[:-1] @ yv[:-1] - su @ sv) <= 1e-13 * np.linalg.norm(u) * np.linalg.norm(v)
    assert abs(eu @ su) <= 1e-14 * np.linalg.norm(su)  # the complement is orthogonal to the subspace
    assert abs(np.linalg.norm(eu) - 1.0) <= 1e-14


@pytest.mark.parametrize("sizes, activation, loss, bias", CASES)
def test_a_product_in_coordinates_is_the_hessian_vector_product(sizes, activation, loss, bias):
    model, params, x, y = _point(sizes, activation, loss, bias, seed=2)
    sub = _subspace(model, params, x, y)
    v = np.random.default_rng(7).standard_normal(model.n_params)
    want = _hvp(model, params, x, y, v)
    yv, e = sub.project(v)
    got = sub.expand(sub.hvp(yv), None)
    assert np.max(np.abs(got - want)) <= 1e-13 * np.max(np.abs(want))
    # the dropped complement: H e = 0 (to the round-off of a product of its size)
    scale = np.max(np.abs(want)) / np.max(np.abs(v))
    assert np.max(np.abs(_hvp(model, params, x, y, e))) <= 1e-12 * scale * np.max(np.abs(e))


@given(widths=st.lists(st.integers(1, 12), min_size=2, max_size=4), rows=st.integers(1, 9),
       activation=st.sampled_from(["tanh", "sigmoid", "softplus", "relu", "identity"]),
       loss=st.sampled_from(["mse", "ce", "bce"]), bias=st.booleans(), seed=st.integers(0, 2**16),
       pick=st.integers(0, 2**16))
def test_products_in_coordinates_on_any_small_net(widths, rows, activation, loss, bias, seed, pick):
    """Any subset of layers factored, on nets too small for layers() to choose them: rows above and below the
    widths (bases of every rank, the coordinates at times longer than the blocks), every activation and loss.
    The product in coordinates is the flat R-operator's; the coordinates are an isometry."""
    if loss == "ce" and widths[-1] < 2:
        widths = [*widths[:-1], 2]
    model, params, x, y = _point(widths, activation, loss, bias, rows=rows, seed=seed)
    factored = [l for l in range(model.n_layers) if (pick >> l) & 1] or [pick % model.n_layers]
    sub = _subspace(model, params, x, y, factored=factored)
    v = np.random.default_rng(seed + 1).standard_normal(model.n_params)
    yv, e = sub.project(v)
    assert abs(np.linalg.norm(yv) - np.linalg.norm(v)) <= 1e-13 * np.linalg.norm(v)
    assert np.max(np.abs(sub.expand(yv, e) - v)) <= 1e-13 * np.max(np.abs(v))
    want = _hvp(model, params, x, y, v)
    got = sub.expand(sub.hvp(yv), None)
    scale = max(np.max(np.abs(want)), 1e-300)
    # relative to the product's largest entry, or to |H| |v| where the product cancels to near zero
    bound = 1e-12 * max(scale, np.linalg.norm(model.hessian(params, x, y), 2) * np.linalg.norm(v) * 1e-3)
    assert np.max(np.abs(got - want)) <= bound, (np.max(np.abs(got - want)), bound)


def test_rank_deficient_rows_and_zero_backpropagated_rows():
    # Repeated support inputs: rank-5 h rows of 10 (the basis has 5 rows); targets equal to the outputs:
    # every backpropagated row g is 0 (an empty g basis) and H = J^T J's products still match.
    base = np.random.default_rng(3).standard_normal((5, 2))
    x = np.concatenate((base, base))
    model, params, x, _ = _point([2, 200, 200, 1], x=x)
    y = model.forward(params, x)
    sub = _subspace(model, params, x, y)
    assert sub.bases[1][0].shape[0] == 5 and sub.bases[1][1].shape[0] == 0
    v = np.random.default_rng(4).standard_normal(model.n_params)
    want = _hvp(model, params, x, y, v)
    got = sub.expand(sub.hvp(sub.project(v)[0]), None)
    assert np.max(np.abs(got - want)) <= 1e-13 * np.max(np.abs(want))


def test_a_vector_inside_the_subspace_has_no_complement():
    model, params, x, y = _point([1, 256, 256, 1])
    sub = _subspace(model, params, x, y)
    hv = _hvp(model, params, x, y, np.random.default_rng(1).standard_normal(model.n_params))
    yv, e = sub.project(hv)
    assert yv[-1] <= 1e-14 * np.linalg.norm(hv)  # round-off of the two projections only
    zero = np.zeros(model.n_params)
    yz, ez = sub.project(zero)
    assert ez is None and yz[-1] == 0.0 and not np.any(yz) and not np.any(sub.expand(yz, ez))


class _Identity:
    """A stand-in subspace: the coordinates are the vector (for the trust region on an explicit function)."""

    def __init__(self, hessp, z):
        self.hessp, self.z = hessp, z

    def project(self, b):
        return b.copy(), None

    def expand(self, y, e):
        return y.copy()

    def hvp(self, y):
        return self.hessp(self.z, y)


def _rosenbrock_with_shift(lam):
    # F(z) = rosen(z) - lam/2 ||z||^2 + lam/2 ||z||^2: trust_region adds lam I to the products it is given
    def fun(z):
        return scipy.optimize.rosen(z), scipy.optimize.rosen_der(z)

    def hessp(z, v):
        return scipy.optimize.rosen_hess_prod(z, v) - lam * v

    return fun, hessp


@pytest.mark.parametrize("z0", [[-1.2, 1.0], [-1.2, 1.0, 0.5, -0.7, 2.0], [3.0, -3.0, 3.0]])
def test_trust_region_is_scipys_trust_ncg(z0):
    lam = 0.7
    z0 = np.array(z0)
    fun, hessp = _rosenbrock_with_shift(lam)

    def scipy_run(maxiter):
        return scipy.optimize.minimize(scipy.optimize.rosen, z0, jac=scipy.optimize.rosen_der,
                                       hessp=scipy.optimize.rosen_hess_prod, method="trust-ncg",
                                       options={"gtol": 1e-10, "maxiter": maxiter})

    # The same iterates, step for step, while the ratio tests are far from round-off (the first 12 steps):
    want = scipy_run(12)
    z, nit, message = imaml_subspace.trust_region(fun, lambda z: _Identity(hessp, z), lam, z0, gtol=1e-10,
                                                  maxiter=12)
    assert nit == want.nit == 12 and message == want.message
    assert np.max(np.abs(z - want.x)) <= 1e-12 * max(1.0, np.max(np.abs(want.x)))
    # and to the end: the minimum, in about as many steps (near it, round-off may move a ratio test's decision)
    want = scipy_run(500)
    z, nit, message = imaml_subspace.trust_region(fun, lambda z: _Identity(hessp, z), lam, z0, gtol=1e-10,
                                                  maxiter=500)
    assert want.success and message == want.message and abs(nit - want.nit) <= 3
    assert np.max(np.abs(z - 1.0)) <= 1e-9 and np.linalg.norm(scipy.optimize.rosen_der(z)) < 1e-10


def test_trust_region_stops_at_maxiter_and_on_a_bad_model():
    fun, hessp = _rosenbrock_with_shift(0.0)
    z0 = np.array([-1.2, 1.0])
    z, nit, message = imaml_subspace.trust_region(fun, lambda z: _Identity(hessp, z), 0.0, z0, gtol=1e-10, maxiter=3)
    assert nit == 3 and message == "Maximum number of iterations has been exceeded."
    assert scipy.optimize.rosen(z) < scipy.optimize.rosen(z0)
    # a Hessian product that is NaN: no predicted decrease, stop where it is
    z, nit, message = imaml_subspace.trust_region(fun, lambda z: _Identity(lambda z, v: v * np.nan, z), 0.0, z0,
                                                  gtol=1e-10, maxiter=50)
    assert nit == 0 and message == "A bad approximation caused failure to predict improvement."
    assert np.array_equal(z, z0)
    # already stationary: no iteration
    z, nit, _ = imaml_subspace.trust_region(fun, lambda z: _Identity(hessp, z), 0.0, np.ones(2), gtol=1e-10,
                                            maxiter=50)
    assert nit == 0 and np.array_equal(z, np.ones(2))


def test_trust_region_rejects_and_shrinks_a_step_to_nan():
    # F is NaN outside the unit ball around 0: the first step (radius 1, the Newton step is longer) lands
    # outside, is rejected and the radius shrinks until a step stays inside.
    A = np.diag([1.0, 4.0])
    b = np.array([3.0, -8.0])

    def fun(z):
        f = 0.5 * z @ A @ z - b @ z
        return (f if z @ z < 0.81 else np.nan), A @ z - b

    z, nit, message = imaml_subspace.trust_region(fun, lambda z: _Identity(lambda z, v: A @ v, z), 0.0, np.zeros(2),
                                                  gtol=1e-12, maxiter=6)
    assert nit == 6 and np.all(np.isfinite(z)) and 0 < z @ z < 0.81
    assert fun(z)[0] < 0.0


@pytest.mark.parametrize("g, radius", [([1.0, -2.0, 0.5], 10.0), ([1.0, -2.0, 0.5], 0.3), ([0.0, 0.0, 1e-3], 5.0)])
def test_steihaug_on_explicit_matrices(g, radius):
    g = np.array(g)
    spd = np.array([[4.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 2.0]])
    p, bp, boundary = imaml_subspace._steihaug(lambda v: spd @ v, g, radius)
    assert np.max(np.abs(bp - spd @ p)) <= 1e-14 * max(1.0, np.max(np.abs(bp)))
    newton = np.linalg.solve(spd, -g)
    if np.linalg.norm(newton) < radius:
        # inside: CG to the relative residual min(0.5, sqrt(|g|)) of the Newton system
        assert not boundary
        assert np.linalg.norm(spd @ p + g) < min(0.5, np.sqrt(np.linalg.norm(g))) * np.linalg.norm(g)
    else:
        assert boundary and abs(np.linalg.norm(p) - radius) <= 1e-14 * radius
        assert g @ p + 0.5 * p @ bp < 0  # a decrease of the model
    indefinite = np.diag([1.0, -1.0, 2.0])
    p, bp, boundary = imaml_subspace._steihaug(lambda v: indefinite @ v, np.array([1.0, 1.0, 1.0]), 2.0)
    assert boundary and abs(np.linalg.norm(p) - 2.0) <= 1e-14
    assert g @ p + 0.5 * p @ bp == pytest.approx(g @ p + 0.5 * p @ indefinite @ p, rel=1e-14)


def test_steihaug_along_negative_curvature_takes_the_lower_boundary_point():
    # B = -I, g = e1: the first direction -g has negative curvature; of p = -tau e1 at |p| = r, the model
    # g.p - |p|^2/2 is lower at p = -r e1 (-r - r^2/2) than at p = r e1 (r - r^2/2).
    p, bp, boundary = imaml_subspace._steihaug(lambda v: -v, np.array([1.0, 0.0]), 2.0)
    assert boundary and np.array_equal(p, [-2.0, 0.0]) and np.array_equal(bp, [2.0, 0.0])
    # and a CG step before the curvature turns negative: B = diag(1, -1/2), g = (1, 1), radius 100. The first
    # step p1 = -4 g stays inside; the next direction d = (-6, -12) has d.B d = -36. Of the two points of
    # p1 + tau d on the boundary (roots by numpy.roots), the one of lower model value.
    B = np.diag([1.0, -0.5])
    g = np.array([1.0, 1.0])
    p, bp, boundary = imaml_subspace._steihaug(lambda v: B @ v, g, 100.0)
    p1, d = -4.0 * g, np.array([-6.0, -12.0])
    candidates = [p1 + t.real * d for t in np.roots([d @ d, 2 * p1 @ d, p1 @ p1 - 100.0**2])]
    best = min(candidates, key=lambda q: g @ q + 0.5 * q @ B @ q)
    assert boundary and np.max(np.abs(p - best)) <= 1e-12 * 100
    assert np.max(np.abs(bp - B @ p)) <= 1e-12 * 100


def test_boundary_roots():
    p, d = np.array([0.3, -0.2]), np.array([1.0, 2.0])
    ta, tb = imaml_subspace._boundary(p, d, 1.5)
    assert ta < 0 < tb
    for t in (ta, tb):
        assert np.linalg.norm(p + t * d) == pytest.approx(1.5, rel=1e-15)


def _meta(model, params, tasks, lam, **kw):
    return imaml.meta_loss_and_grad_info(model, params, tasks, lam, **kw)


def _rel(a, b):
    return float(np.linalg.norm(flatten(a) - flatten(b)) / np.linalg.norm(flatten(b)))


def test_meta_gradient_in_coordinates_is_the_dense_solve(monkeypatch):
    # A net small enough for the dense Hessian (1,761 parameters), factored by lowering MIN_BLOCK:
    # 5 rows x 80 <= 1,600 / 4.
    monkeypatch.setattr(imaml_subspace, "MIN_BLOCK", 1000)
    model = MLP([1, 40, 40, 1], "tanh", "mse")
    params, tasks = model.init(3), sinusoid(2, 5, 7, seed=3)
    assert imaml_subspace.layers(model, 5) == (1,)
    cg = _meta(model, params, tasks, 0.5)
    direct = _meta(model, params, tasks, 0.5, solver="direct")
    cond = max(t.cond_estimate for t in direct.tasks)
    assert _rel(cg.grad, direct.grad) <= 10 * cond * (1e-12 + EPS), (_rel(cg.grad, direct.grad), cond)
    for c, d, task in zip(cg.tasks, direct.tasks, tasks):
        assert _rel(c.phi, d.phi) <= 10 * cond * EPS
        assert c.linear_residual <= 1e-12
        # the Lanczos estimate of the coordinates' CG: a lower bound on cond_2(I + H_s/lam) (eigenvalues of
        # the dense Hessian at phi*), as on the flat vectors
        eig = np.linalg.eigvalsh(np.eye(model.n_params) + model.hessian(c.phi, task.x_support, task.y_support) / 0.5)
        assert 1.0 < c.cond_estimate <= eig[-1] / eig[0] * (1 + 1e-8), (c.cond_estimate, eig[-1] / eig[0])


@pytest.mark.parametrize("sizes, activation, lam, seed", [
    ([1, 256, 256, 1], "tanh", 1.0, 0),
    ([1, 128, 128, 1], "softplus", 0.5, 1),
    ([2, 160, 160, 160, 1], "sigmoid", 2.0, 2),
])
def test_meta_gradient_in_coordinates_is_the_flat_cg(monkeypatch, sizes, activation, lam, seed):
    model = MLP(sizes, activation, "mse")
    params = model.init(seed)
    rng = np.random.default_rng(seed)
    tasks = [Task(rng.standard_normal((10, sizes[0])), rng.standard_normal((10, 1)),
                  rng.standard_normal((12, sizes[0])), rng.standard_normal((12, 1))) for _ in range(2)]
    fast = _meta(model, params, tasks, lam)
    monkeypatch.setattr(imaml_subspace, "MIN_BLOCK", 10**12)  # every layer dense: scipy's trust region, flat CG
    flat = _meta(model, params, tasks, lam)
    cond = max(t.cond_estimate for t in flat.tasks)
    assert _rel(fast.grad, flat.grad) <= 10 * cond * (1e-12 + EPS), (_rel(fast.grad, flat.grad), cond)
    assert fast.loss == pytest.approx(flat.loss, rel=10 * cond * EPS)
    for f, t in zip(fast.tasks, flat.tasks):
        assert _rel(f.phi, t.phi) <= 10 * cond * EPS
        assert f.stationarity_residual <= 1e-2 * f.stationarity_tolerance


def test_complex_step_keeps_the_flat_vectors():
    model = MLP([1, 256, 256, 1], "tanh", "mse")
    params, task = model.init(0), sinusoid(1, 10, 10, seed=0)[0]
    prob = imaml._Problem(model, params, task, 1.0, "task")
    z = flatten(params)
    assert prob.subspace_at(z) is not None
    assert prob.subspace_at(z.astype(complex)) is None
    assert imaml._Problem(model, [p.astype(complex) for p in params], task, 1.0, "task").subspace_at(z) is None
    assert imaml._Problem(model, params, task, 1.0 + 0j, "task").subspace_at(z) is None
    assert prob.subspace_at(z) is prob.subspace_at(z.copy())  # one subspace per point


def test_a_trust_region_short_of_its_iterations_is_refused():
    model = MLP([1, 256, 256, 1], "tanh", "mse")
    params, tasks = model.init(0), sinusoid(1, 10, 10, seed=0)
    with pytest.raises(ConvergenceError, match=r"did not converge.*trust region: 'Maximum number of iterations"):
        imaml.meta_loss_and_grad(model, params, tasks, 1.0, inner_maxiter=2)


@pytest.mark.parametrize("k, g2, radius, winner", [
    (5.0, 0.2, 1.4, 0),  # the point behind wins by ~3
    (1.1, 0.25, None, 0),  # the point behind wins by 0.06
    (0.9, 0.25, None, 1),  # the point ahead wins by 0.05
])
def test_steihaug_on_negative_curvature_takes_the_boundary_point_of_lower_model_value(k, g2, radius, winner):
    # B = diag(1, -k), g = (1, g2): the first CG step p1 = -a0 g (a0 = |g|^2 / g.B g) stays inside, the next
    # direction d1 = -r1 + beta d0 has negative curvature. Of the two points of p1 + tau d1 on the boundary
    # (radius default 1.05 |p1|), the lower model value: recomputed here, roots by numpy.roots.
    B, g = np.diag([1.0, -k]), np.array([1.0, g2])
    a0 = (g @ g) / (g @ B @ g)
    p1 = -a0 * g
    r1 = g - a0 * (B @ g)
    d1 = -r1 + (r1 @ r1) / (g @ g) * (-g)
    radius = 1.05 * np.linalg.norm(p1) if radius is None else radius
    assert d1 @ B @ d1 < 0 and np.linalg.norm(p1) < radius
    assert np.linalg.norm(r1) > min(0.5, np.sqrt(np.linalg.norm(g))) * np.linalg.norm(g)  # CG goes on
    taus = sorted(t.real for t in np.roots([d1 @ d1, 2 * p1 @ d1, p1 @ p1 - radius**2]))
    values = [g @ (p1 + t * d1) + 0.5 * (p1 + t * d1) @ B @ (p1 + t * d1) for t in taus]
    assert int(np.argmin(values)) == winner and abs(values[0] - values[1]) > 0.04
    p, bp, boundary = imaml_subspace._steihaug(lambda v: B @ v, g, radius)
    assert boundary and np.max(np.abs(p - (p1 + taus[winner] * d1))) <= 1e-12
    assert np.max(np.abs(bp - B @ p)) <= 1e-12


def test_steihaug_at_zero_and_mild_negative_curvature_and_without_a_gradient():
    # zero curvature along the first direction: to the boundary (the linear term decides), no division by 0
    p, bp, boundary = imaml_subspace._steihaug(lambda v: np.diag([1.0, 0.0]) @ v, np.array([0.0, 1.0]), 3.0)
    assert boundary and np.array_equal(p, [0.0, -3.0]) and np.array_equal(bp, [0.0, 0.0])
    # curvature -1/2 along -g: to the boundary along -g, not a step to the model's maximum
    p, bp, boundary = imaml_subspace._steihaug(lambda v: -0.5 * v, np.array([1.0, 0.0]), 3.0)
    assert boundary and np.array_equal(p, [-3.0, 0.0]) and np.array_equal(bp, [1.5, 0.0])
    # no gradient (or a NaN one): no step, no product
    never = lambda v: pytest.fail("no product expected")  # noqa: E731
    for g in (np.zeros(3), np.array([np.nan, 1.0, 0.0])):
        p, bp, boundary = imaml_subspace._steihaug(never, g, 1.0)
        assert not boundary and not np.any(p) and not np.any(bp)


def test_steihaug_stops_after_its_product_budget():
    # a non-symmetric operator (d.B d = |d|^2 > 0 but CG does not converge on it): 2 n + 100 products, then
    # the last iterate, inside the (infinite) region
    B = np.array([[1.0, 10.0], [-10.0, 1.0]])
    calls = [0]

    def hvp(v):
        calls[0] += 1
        return B @ v

    p, bp, boundary = imaml_subspace._steihaug(hvp, np.array([1.0, 0.3]), np.inf)
    assert calls[0] == 2 * 2 + 100 and not boundary and np.all(np.isfinite(p))


def test_boundary_roots_without_cancellation():
    # |p| = radius (1 - 1e-10): the small root ~ 1e-8 would lose ~7 digits to cancellation in the textbook
    # formula. Against the 40-digit roots (mpmath) of the polynomial |d|^2 t^2 + 2 p.d t + |p|^2 - r^2 whose
    # coefficients are rounded as the function rounds them (|p|^2 - r^2 itself cancels: not the formula's doing).
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    d = np.array([0.6, -0.8])
    p = 2.0 * np.array([0.8, 0.6]) + 0.05 * d
    radius = float(np.linalg.norm(p)) * (1 + 1e-10)
    ta, tb = imaml_subspace._boundary(p, d, radius)
    a, b, c = (mpmath.mpf(float(d @ d)), mpmath.mpf(2.0 * float(p @ d)), mpmath.mpf(float(p @ p) - radius**2))
    disc = mpmath.sqrt(b * b - 4 * a * c)
    exact = sorted([(-b - disc) / (2 * a), (-b + disc) / (2 * a)])
    assert abs(tb) < 1e-7 < abs(ta)
    for got, want in zip((ta, tb), exact):
        assert abs(got - float(want)) <= 4 * EPS * abs(float(want)), (got, float(want))


@pytest.mark.parametrize("distance, cap_iterations", [(10018.0, 19), (10023.5, 20)])
def test_trust_region_radius_doubles_up_to_its_cap(distance, cap_iterations):
    # F = lam/2 |z - c|^2 with c far away: every step hits the boundary with rho = 1 and the radius doubles,
    # 1, 2, ..., 512 (10 steps, 1,023), then stays at MAX_RADIUS = 1000; the rest is covered in steps of 1000
    # and a last, interior Newton step. 10,018 = 1,023 + 8 x 1000 + 995 (19 steps; a cap of 999 would need 20);
    # 10,023.5 = 1,023 + 9 x 1000 + 0.5 (20 steps; a cap of 1001 would need 19). scipy's trust-ncg agrees.
    lam = 0.5
    c = np.array([distance, 0.0])

    def fun(z):
        return 0.5 * lam * (z - c) @ (z - c), lam * (z - c)

    z, nit, message = imaml_subspace.trust_region(fun, lambda z: _Identity(lambda z, v: 0.0 * v, z), lam,
                                                  np.zeros(2), gtol=1e-6, maxiter=100)
    want = scipy.optimize.minimize(lambda z: fun(z)[0], np.zeros(2), jac=lambda z: fun(z)[1],
                                   hessp=lambda z, v: lam * v, method="trust-ncg", options={"gtol": 1e-6})
    assert nit == cap_iterations == want.nit
    assert np.max(np.abs(z - c)) <= 1e-9 * distance and message == want.message


def test_problem_factors_by_the_number_of_support_rows():
    # 40 support rows of 3 features: 40 x (256 + 256) > 256 x 256 / 4, so nothing is factored (with 3 rows,
    # the feature count, it would be)
    model = MLP([3, 256, 256, 1], "tanh", "mse")
    rng = np.random.default_rng(0)
    task = Task(rng.standard_normal((40, 3)), rng.standard_normal((40, 1)), rng.standard_normal((5, 3)),
                rng.standard_normal((5, 1)))
    assert imaml._Problem(model, model.init(0), task, 1.0, "task")._factored == () != imaml_subspace.layers(model, 3)
    small = Task(task.x_support[:10], task.y_support[:10], task.x_query, task.y_query)
    assert imaml._Problem(model, model.init(0), small, 1.0, "task")._factored == (1,)


def test_trust_region_budget_is_what_the_inner_solve_has_left(monkeypatch):
    # The trust region gets inner_maxiter minus the iterations spent so far; with the polish switched off the
    # first (loose) pass leaves the residual above the tolerance and the second pass runs on what is left.
    calls = []
    run = imaml_subspace.trust_region

    def recording(*args, **kwargs):
        out = run(*args, **kwargs)
        calls.append((kwargs["maxiter"], kwargs["gtol"], out[1]))
        return out

    monkeypatch.setattr(imaml_subspace, "trust_region", recording)
    monkeypatch.setattr(imaml, "_NEWTON_STEPS", 0)
    model = MLP([1, 256, 256, 1], "tanh", "mse")
    params, tasks = model.init(0), sinusoid(1, 10, 10, seed=0)
    try:  # without the polish, whether the trust region alone reaches 1e-12 is up to round-off
        total = imaml.meta_loss_and_grad_info(model, params, tasks, 1.0, inner_maxiter=200).tasks[0].inner_iterations
    except ConvergenceError:
        total = None
    (max1, gtol1, nit1), (max2, gtol2, nit2) = calls
    g0 = np.linalg.norm(flatten(model.loss_and_grad(params, tasks[0].x_support, tasks[0].y_support)[1]))
    assert max1 == 200 and 1 <= nit1 < 200 and max2 == 200 - nit1 and nit2 >= 1
    assert gtol1 == pytest.approx(1e-8 * max(1.0, g0), rel=1e-12) and gtol2 == pytest.approx(1e-12 * max(1.0, g0))
    assert total in (None, nit1 + nit2)
    calls.clear()
    with pytest.raises(ConvergenceError):
        imaml.meta_loss_and_grad(model, params, tasks, 1.0, inner_maxiter=1)
    assert calls[0][0] == 1 and calls[0][2] == 1
