"""One inner step of each optimiser of ``reference.optimizers``, checked transform by transform.

Expected values come from outside the hand-written VJPs and forward maps:

* the VJP of every input (parameters, state, gradient, hyper-parameters) is compared with the
  complex-step directional derivative of the forward map ``(d_k, s_{k+1})`` itself (a different
  code path from the elementwise adjoint; no subtractive cancellation, so ~1e-13 agreement);
* the forward map is compared with ``torch.optim`` float64 (SGD, SGD with momentum/Nesterov/
  dampening/weight decay, Adam, AdamW) driven by the same gradients, step by step
  (``pytest.importorskip``: skipped where torch is missing).

Small arrays and a few steps: each test runs in milliseconds, so the mutation runner reaches it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from reference import optimizers as O

H = 1e-30  # complex-step size: the imaginary part is the exact directional derivative to round-off
SHAPES = [(3,), (2, 2)]
ACTIVE = [True, False, True]  # the middle tensor is excluded: None in, None out


def configs() -> dict[str, Any]:
    return {
        "sgd": lambda: O.SGD(),
        "sgd_wd": lambda: O.SGD(weight_decay=0.3),
        "mom_torch": lambda: O.Momentum(0.7, weight_decay=0.2),
        "mom_damp_torch": lambda: O.Momentum(0.6, dampening=0.3),
        "mom_damp_zeros": lambda: O.Momentum(0.6, dampening=0.3, init="zeros", weight_decay=0.1),
        "nesterov": lambda: O.Momentum(0.8, nesterov=True, weight_decay=0.15),
        "adam": lambda: O.Adam(0.8, 0.9, 0.05),
        "adam_wd": lambda: O.Adam(0.7, 0.95, 0.02, weight_decay=0.25),
        "adamw": lambda: O.Adam(0.7, 0.95, 0.02, weight_decay=0.25, decoupled=True),
        "adam_root": lambda: O.Adam(0.85, 0.9, 0.03, eps_root=0.04),
        "adam_epsv": lambda: O.Adam(0.8, 0.9, 0.05, eps_placement="v"),
        "adam_epsv_root": lambda: O.Adam(0.75, 0.92, 0.05, eps_root=0.02, eps_placement="v"),
    }


def _tensors(rng: np.random.Generator, positive: bool = False) -> list[np.ndarray]:
    out = []
    for shape in [(3,), (2,), (2, 2)]:
        x = rng.normal(size=shape)
        out.append(np.abs(x) + 0.1 if positive else x)
    return out


def _state(opt: O.Optimizer, rng: np.random.Generator) -> list[Any]:
    """A generic (mid-run) state: moments of either sign, second moments positive."""
    n = opt.n_state
    if n == 0:
        return [() if a else None for a in ACTIVE]
    parts = [_tensors(rng, positive=(i == 1)) for i in range(n)]  # Adam's v (index 1) > 0
    return [tuple(parts[j][i] for j in range(n)) if a else None for i, a in enumerate(ACTIVE)]


def _dot(xs, ys) -> complex:
    return sum(np.sum(x * y) for x, y in zip(xs, ys) if x is not None and y is not None)


def _objective(opt, k, p, s, g, bar_d, bar_s) -> complex:
    """``<bar_d, d_k> + <bar_s, s_{k+1}>`` of the forward map (complex inputs allowed)."""
    d, s_new, _ = opt.direction(k, p, s, g, 0.0, ACTIVE)
    assert len(d) == len(s_new) == len(ACTIVE)
    val = _dot(bar_d, d)
    for sn, bs in zip(s_new, bar_s):
        if sn is not None:
            val = val + _dot(bs, sn)
    return val


def _cs(f) -> float:
    return float(np.imag(f(1j * H)) / H)


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("name", list(configs()))
def test_step_vjp_matches_complex_step_of_forward_map(name: str, k: int) -> None:
    rng = np.random.default_rng(1000 + 7 * k + len(name))
    opt = configs()[name]()
    p, g = _tensors(rng), _tensors(rng)
    s = _state(opt, rng)
    bar_d = [x if a else None for x, a in zip(_tensors(rng), ACTIVE)]
    bar_s = _state(opt, rng)
    for i, a in enumerate(ACTIVE):
        if a and opt.n_state:
            bar_s[i] = tuple(rng.normal(size=t.shape) for t in bar_s[i])
    _, _, cache = opt.direction(k, p, s, g, 0.0, ACTIVE)
    vjp = opt.vjp(k, cache, bar_d, bar_s)
    assert vjp.loss == 0.0 and vjp.meta == []
    for i, a in enumerate(ACTIVE):
        if not a:
            assert vjp.params[i] is None and vjp.grads[i] is None and vjp.state[i] is None

    dp, dg = _tensors(rng), _tensors(rng)
    ds = _state(opt, np.random.default_rng(5))
    ds = [tuple(rng.normal(size=t.shape) for t in x) if x is not None else None for x in ds]

    def zero_if_none(x, like):
        return np.zeros_like(like) if x is None else x

    # parameters
    want = _cs(lambda e: _objective(opt, k, [x + e * y for x, y in zip(p, dp)], s, g, bar_d, bar_s))
    got = sum(np.sum(zero_if_none(b, y) * y) for b, y, a in zip(vjp.params, dp, ACTIVE) if a)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-13)
    # gradients
    want = _cs(lambda e: _objective(opt, k, p, s, [x + e * y for x, y in zip(g, dg)], bar_d, bar_s))
    got = sum(np.sum(zero_if_none(b, y) * y) for b, y, a in zip(vjp.grads, dg, ACTIVE) if a)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-13)
    # state s_k (the torch-rule first momentum step ignores it: its cotangent is None / zero)
    if opt.n_state:
        def shifted(e):
            return [tuple(t + e * u for t, u in zip(x, y)) if x is not None else None for x, y in zip(s, ds)]
        want = _cs(lambda e: _objective(opt, k, p, shifted(e), g, bar_d, bar_s))
        got = 0.0
        for b, y, a in zip(vjp.state, ds, ACTIVE):
            if a and b is not None:
                got += sum(np.sum(bt * yt) for bt, yt in zip(b, y))
        assert got == pytest.approx(want, rel=1e-12, abs=1e-13)
    # hyper-parameters, one at a time (set on the instance: the complex step bypasses validation)
    assert set(vjp.hyper) == set(type(opt).hyper_names)
    for hname, bar in vjp.hyper.items():
        base = getattr(opt, hname)

        def f(e, hname=hname, base=base):
            setattr(opt, hname, base + e)
            try:
                return _objective(opt, k, p, s, g, bar_d, bar_s)
            finally:
                setattr(opt, hname, base)

        # (eps_root = 0: the complex step leaves torch's branch for sqrt(v_hat + eps_root), analytic at v > 0.)
        assert float(np.real(bar)) == pytest.approx(_cs(f), rel=1e-11, abs=1e-13), hname


def test_step_vjp_without_state_cotangent_is_the_d_part() -> None:
    # bar_state=None (last step): the cotangents equal those with an explicit zero state cotangent.
    rng = np.random.default_rng(3)
    for name, make in configs().items():
        opt = make()
        if not opt.n_state:
            continue
        p, g, s = _tensors(rng), _tensors(rng), _state(opt, rng)
        bar_d = _tensors(rng)
        _, _, cache = opt.direction(2, p, s, g, 0.0, ACTIVE)
        zero = [tuple(np.zeros_like(t) for t in x) if x is not None else None for x in s]
        a = opt.vjp(2, cache, bar_d, None)
        b = opt.vjp(2, cache, bar_d, zero)
        for x, y in zip(a.grads, b.grads):
            assert (x is None) == (y is None) and (x is None or np.allclose(x, y, rtol=1e-15, atol=0)), name


# ---------------------------------------------------------------------------
# forward maps against torch.optim float64
# ---------------------------------------------------------------------------


def _torch_run(name: str, steps: int, rng: np.random.Generator):
    torch = pytest.importorskip("torch")
    opt = configs()[name]()
    shapes = [(3,), (2,), (2, 2)]
    p0 = [rng.normal(size=sh) for sh in shapes]
    grads = [[rng.normal(size=sh) for sh in shapes] for _ in range(steps)]
    lr = 0.1
    tp = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in p0]
    if isinstance(opt, O.SGD):
        topt = torch.optim.SGD(tp, lr=lr, weight_decay=opt.weight_decay)
    elif isinstance(opt, O.Momentum):
        topt = torch.optim.SGD(tp, lr=lr, momentum=opt.momentum, dampening=opt.dampening,
                               nesterov=opt.nesterov, weight_decay=opt.weight_decay)
    elif opt.decoupled:
        topt = torch.optim.AdamW(tp, lr=lr, betas=(opt.b1, opt.b2), eps=opt.eps, weight_decay=opt.weight_decay)
    else:
        topt = torch.optim.Adam(tp, lr=lr, betas=(opt.b1, opt.b2), eps=opt.eps, weight_decay=opt.weight_decay)
    active = [True] * 3
    p = [x.copy() for x in p0]
    s = opt.init(p, active)
    for k in range(steps):
        for t, gk in zip(tp, grads[k]):
            t.grad = torch.tensor(gk, dtype=torch.float64)
        topt.step()
        d, s, _ = opt.direction(k, p, s, grads[k], 0.0, active)
        # (AdamW multiplies p by 1 - lr wd before the Adam update: the same as p - lr (adam + wd p).)
        p = [x - lr * y for x, y in zip(p, d)]
        for x, t in zip(p, tp):
            np.testing.assert_allclose(x, t.detach().numpy(), rtol=1e-13, atol=1e-14, err_msg=f"{name} k={k}")


@pytest.mark.parametrize("name", ["sgd", "sgd_wd", "mom_torch", "mom_damp_torch", "nesterov", "adam", "adam_wd",
                                  "adamw"])
def test_forward_matches_torch_optim_float64(name: str) -> None:
    _torch_run(name, 4, np.random.default_rng(11))


# ---------------------------------------------------------------------------
# Adam where v = 0 (every gradient so far exactly 0 in a coordinate): closed forms
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("eps_root", [0.0, 0.03])
@pytest.mark.parametrize("k", [0, 2])
def test_adam_vjp_at_v_zero_is_the_closed_form_limit(k: int, eps_root: float) -> None:
    # Coordinate 1 has m_k = v_k = g_k = 0, so d = (1 - b1) g / (bc1 (sqrt((1-b2) g^2 / bc2 + eps_root) + eps))
    # there: d d/dg = (1 - b1) / (bc1 (sqrt(eps_root) + eps)), d m'/dg = 1 - b1, d v'/dg = 2 (1 - b2) g = 0, and
    # d does not depend on v_k (m = 0), so bar_v_k = b2 bar_v' exactly and the coordinate adds nothing to the
    # hyper-parameter cotangents (d = 0 for every b1, b2, eps, eps_root).  The other coordinates: complex step.
    b1, b2, eps = 0.8, 0.9, 0.05
    opt = O.Adam(b1, b2, eps, eps_root=eps_root)
    rng = np.random.default_rng(k)
    p, g = rng.normal(size=3), rng.normal(size=3)
    m, v = rng.normal(size=3), np.abs(rng.normal(size=3)) + 0.1
    g[1] = m[1] = v[1] = 0.0
    bar_d, bar_m, bar_v = rng.normal(size=3), rng.normal(size=3), rng.normal(size=3)
    d, (m1, v1), cache = opt._direction(k, p, (m, v), g)
    assert d[1] == 0.0 and m1[1] == 0.0 and v1[1] == 0.0
    bar_p, (bm0, bv0), bar_g, hyper = opt._vjp(k, cache, bar_d, (bar_m, bar_v))
    bc1 = 1.0 - b1 ** (k + 1)
    assert bar_g[1] == pytest.approx((1 - b1) / (bc1 * (np.sqrt(eps_root) + eps)) * bar_d[1] + (1 - b1) * bar_m[1],
                                     rel=1e-13)
    assert bm0[1] == pytest.approx(b1 * (bar_m[1] + bar_d[1] / (bc1 * (np.sqrt(eps_root) + eps))), rel=1e-13)
    assert bv0[1] == pytest.approx(b2 * bar_v[1], rel=1e-15)
    # The regular coordinates and every hyper-parameter: complex step with coordinate 1 frozen at 0
    # (perturbing only coordinates 0 and 2 keeps the forward map analytic).
    mask = np.array([1.0, 0.0, 1.0])

    def obj(opt_, gg, mm, vv):
        dd, (mn, vn), _ = opt_._direction(k, p, (mm, vv), gg)
        return np.sum(bar_d * dd) + np.sum(bar_m * mn) + np.sum(bar_v * vn)

    dg, dm, dv = rng.normal(size=3) * mask, rng.normal(size=3) * mask, rng.normal(size=3) * mask
    assert np.sum(bar_g * dg) == pytest.approx(_cs(lambda e: obj(opt, g + e * dg, m, v)), rel=1e-12)
    assert np.sum(bm0 * dm) == pytest.approx(_cs(lambda e: obj(opt, g, m + e * dm, v)), rel=1e-12)
    assert np.sum(bv0 * dv) == pytest.approx(_cs(lambda e: obj(opt, g, m, v + e * dv)), rel=1e-12)
    for hname, bar in hyper.items():
        base = getattr(opt, hname)
        # (eps_root = 0: d = 0 / (...) = 0 at coordinate 1 for every complex eps_root, so the step stays exact.)

        def f(e, hname=hname, base=base):
            setattr(opt, hname, base + e)
            try:
                return obj(opt, g, m, v)
            finally:
                setattr(opt, hname, base)
        assert bar == pytest.approx(_cs(f), rel=1e-11, abs=1e-14), hname


def test_adam_refusals_name_the_first_offending_index() -> None:
    # eps = 0 and v = 0 at indices 1 and 2: d = 0/0 there.
    g = np.array([0.5, 0.0, 0.0])
    with pytest.raises(O.NotDifferentiableError, match=r"index \(1,\)"):
        O.Adam(eps=0.0)._direction(0, g, (np.zeros(3), np.zeros(3)), g)
    # eps > 0 (or eps_root > 0) and v = 0: d = 0 exactly, no error.
    d, _, _ = O.Adam(eps=1e-3)._direction(0, g, (np.zeros(3), np.zeros(3)), g)
    assert d[1] == d[2] == 0.0 and d[0] == pytest.approx(0.5 / (0.5 + 1e-3), rel=1e-14)
    # g^2 underflows to 0 at indices 0 and 2 while m != 0 there: d sqrt(v)/dv is infinite.
    g = np.array([1e-170, 1.0, -1e-170])
    opt = O.Adam()
    _, _, cache = opt._direction(0, g, (np.zeros(3), np.zeros(3)), g)
    with pytest.raises(O.NotDifferentiableError, match=r"index \(0,\)"):
        opt._vjp(0, cache, np.ones(3), None)


def test_constructor_domains_and_defaults() -> None:
    # Domains (torch.optim's): momentum, dampening, b1, b2 in [0, 1); eps, eps_root, weight_decay >= 0;
    # Nesterov needs momentum > 0 and no dampening.
    bad = [lambda: O.Momentum(1.0), lambda: O.Momentum(-0.5), lambda: O.Momentum(0.5, dampening=1.0),
           lambda: O.Adam(b1=1.0), lambda: O.Adam(b2=-0.5), lambda: O.Adam(eps=-1e-8),
           lambda: O.Adam(eps_root=-1e-8), lambda: O.SGD(weight_decay=-0.1),
           lambda: O.Momentum(0.5, weight_decay=-0.1), lambda: O.Momentum(0.0, nesterov=True),
           lambda: O.Momentum(0.5, dampening=0.1, nesterov=True), lambda: O.Momentum(0.5, init="ones"),
           lambda: O.Adam(eps_placement="sqrt")]
    for make in bad:
        with pytest.raises(O.InvalidInputError):
            make()
    # Documented defaults: torch.optim.Adam's (0.9, 0.999, 1e-8, no weight decay, L2 not decoupled),
    # momentum 0.9 without dampening, plain SGD; no hand-designed transform reads the loss value.
    a = O.Adam()
    assert (a.b1, a.b2, a.eps, a.eps_root, a.weight_decay, a.decoupled) == (0.9, 0.999, 1e-8, 0.0, 0.0, False)
    mo = O.Momentum()
    assert (mo.momentum, mo.dampening, mo.nesterov, mo.weight_decay) == (0.9, 0.0, False, 0.0)
    assert O.SGD().weight_decay == 0.0
    assert not (O.SGD().uses_loss or mo.uses_loss or a.uses_loss)
    # State: SGD none, momentum one buffer, Adam (m, v); zeros; None for excluded tensors.
    params = [np.ones(2), np.ones(3)]
    for opt, n in [(O.SGD(), 0), (mo, 1), (a, 2)]:
        st = opt.init(params, [True, False])
        assert st[1] is None and len(st[0]) == n and all(np.array_equal(x, np.zeros(2)) for x in st[0])


@pytest.mark.parametrize("b2, eps, eps_root, placement", [
    (0.9, 0.05, 0.04, "v_hat"), (0.9, 0.05, 1.0, "v_hat"), (0.5, 0.1, 0.75, "v_hat"), (0.9, 0.0, 0.0, "v_hat"),
    (0.99, 0.02, 0.0, "v"), (0.5, 0.1, 0.75, "v")])
def test_first_adam_step_closed_form(b2: float, eps: float, eps_root: float, placement: str) -> None:
    # k = 0 from zero moments: m_hat = g, v_hat = g^2 (the bias corrections cancel), so
    # d = g / (sqrt(g^2 + eps_root) + e) with e = eps (torch, optax) or eps / sqrt(1 - b2) (Kingma & Ba's eps-hat),
    # (eps = 0: d = sign(g), valid wherever g != 0) and with bar_d = 1: d/d eps_root = -sum g / (2 r (r + e)^2), d/d eps = -sum g / (r + e)^2 * de/deps.
    # g = +-0.5 with b2 = 0.5, eps_root = 0.75 makes r = 1 exactly (a value the code must not treat specially).
    g = np.array([0.5, 0.5, -2.0, -0.3])
    opt = O.Adam(0.7, b2, eps, eps_root=eps_root, eps_placement=placement)
    d, _, cache = opt._direction(0, g, (np.zeros(4), np.zeros(4)), g)
    de = 1.0 if placement == "v_hat" else 1.0 / np.sqrt(1.0 - b2)
    r, e = np.sqrt(g * g + eps_root), eps * de
    np.testing.assert_allclose(d, g / (r + e), rtol=1e-14, atol=0)
    _, _, bar_g, hyper = opt._vjp(0, cache, np.ones(4), None)
    assert hyper["eps_root"] == pytest.approx(np.sum(-g / (2 * r * (r + e) ** 2)), rel=1e-13)
    assert hyper["eps"] == pytest.approx(np.sum(-g / (r + e) ** 2) * de, rel=1e-13)
    # d d/dg = (r + e - g^2 / r) / (r + e)^2
    np.testing.assert_allclose(bar_g, (r + e - g * g / r) / (r + e) ** 2, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_adam_underflow_refusal_index_with_unit_moment(sign: float) -> None:
    # b1 = 0.5, m_k = 2 sign, g = 1e-170: m = sign exactly while g^2 underflows (v = 0): the first bad index is 0.
    g = np.array([1e-170, 1.0, 1e-170])
    m0 = np.array([2.0 * sign, 0.0, 0.0])
    opt = O.Adam(0.5, 0.9)
    _, (m, v), cache = opt._direction(0, g, (m0, np.zeros(3)), g)
    assert m[0] == sign and v[0] == 0.0
    with pytest.raises(O.NotDifferentiableError, match=r"index \(0,\)"):
        opt._vjp(0, cache, np.ones(3), None)
