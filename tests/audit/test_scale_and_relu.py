"""Scale bugs explained (issue 15, item 6) and relu networks first-class (item 5)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import corpus_torch as C  # noqa: E402
from _configs import GRAD  # noqa: E402

from reference.errors import ConvergenceError  # noqa: E402
from verify.auditing import audit  # noqa: E402


def test_sum_over_tasks_stays_a_mismatch_and_says_the_direction_is_right():
    r = audit(C.maml_sum_tasks, "maml", "torch", seed=0, directions=0, **GRAD)
    assert not r.passed
    assert r.diagnosis.key == "scale" and r.diagnosis.fitted["scale"] == pytest.approx(GRAD["n_tasks"], rel=1e-10)
    assert "direction is right" in r.diagnosis.detail and "Adam" in r.diagnosis.detail
    assert "except through eps" in r.diagnosis.detail


def test_the_adam_claim_holds_for_torch_adam():
    # Independent check of the sentence with torch.optim.Adam itself: one step on g and on N g from the
    # same state differ only through eps; SGD's steps differ by the factor N.
    g = torch.tensor([0.3, -1e-3, 2.0, -0.05], dtype=torch.float64)
    n, lr, eps = 2.0, 1e-3, 1e-8

    def step(opt_cls, grad, **kw):
        p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
        opt = opt_cls([p], lr=lr, **kw)
        p.grad = grad.clone()
        opt.step()
        return p.detach()

    adam1, adamN = step(torch.optim.Adam, g, eps=eps), step(torch.optim.Adam, n * g, eps=eps)
    assert torch.all(torch.abs(adam1 - adamN) <= lr * eps / torch.abs(g))  # only eps tells them apart
    assert not torch.equal(adam1, adamN)
    assert torch.allclose(step(torch.optim.SGD, n * g), n * step(torch.optim.SGD, g), rtol=1e-15, atol=0)


def test_sign_flip_says_the_direction_is_reversed():
    r = audit(C.reptile_sign, "reptile", "torch", seed=0, directions=0, **GRAD)
    assert r.diagnosis.key == "scale" and "reversed" in r.diagnosis.detail


def _maml_lr_037(model, tasks, inner_lr, inner_steps):
    """Bug: inner learning rate 0.37 x the one passed (not a grid point of the fit)."""
    return C._maml(model, tasks, 0.37 * inner_lr, inner_steps)


@pytest.mark.parametrize("seed", [0, 1])
def test_wrong_inner_lr_is_fitted_on_relu_networks(seed):
    r = audit(_maml_lr_037, "maml", "torch", model="mlp:2-6-1:relu", n_tasks=2, shots=4, queries=3, inner_steps=2,
              inner_lr=0.2, seed=seed, directions=0)
    assert r.diagnosis is not None and r.diagnosis.key == "wrong_inner_lr", r.report()
    assert r.diagnosis.fitted["inner_lr"] == pytest.approx(0.074, rel=1e-9)


def test_imaml_on_relu_solves_or_names_the_kink():
    ok = audit(C.imaml, "imaml", "torch", model="mlp:2-8-1:relu", seed=2, directions=0)  # its FD check is slow
    assert ok.passed, ok.report()
    with pytest.raises(ConvergenceError, match="minimiser lies on a kink of relu") as info:
        audit(C.imaml, "imaml", "torch", model="mlp:2-8-1:relu", seed=0, directions=1)
    assert "increase lam" not in str(info.value)
    # independently: at the point the solver reached, a hidden pre-activation of a support example is ~0
    from verify.algorithms import build_case

    case = build_case("imaml", seed=0, sizes=[2, 8, 1], activation="relu", loss="mse")
    W1, b1 = np.asarray(info.value.phi[0]), np.asarray(info.value.phi[1])
    zs = [t.x_support @ W1.T + b1 for t in case.tasks]
    assert min(float(np.min(np.abs(z)) / np.max(np.abs(z))) for z in zs) < 1e-12
