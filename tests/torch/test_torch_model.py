"""The torch model builders against the NumPy reference MLP (loss, gradient, HVP to ~1e-13)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hypothesis import given  # noqa: E402

from reference.errors import InvalidInputError  # noqa: E402
from reference.models import MLP  # noqa: E402
from reference.tasks import Task, sinusoid  # noqa: E402
from verify.backends.torch import build_model, tf32, to_torch_tasks  # noqa: E402
from verify.backends.torch._model import FunctionalMLP, loss_fn  # noqa: E402
from verify.strategies import mlp_problems  # noqa: E402

# Reference (hand-written backprop / Pearlmutter R-op) vs torch autograd, both float64: the same
# sums in a different order, so agreement to a few hundred ulps of the largest entry.
TOL64 = 1e-13


def _close(got, want, tol=TOL64):
    got = np.concatenate([np.ravel(g) for g in got]) if isinstance(got, list) else np.ravel(got)
    want = np.concatenate([np.ravel(w) for w in want]) if isinstance(want, list) else np.ravel(want)
    scale = max(1.0, float(np.max(np.abs(want))) if want.size else 0.0)
    err = float(np.max(np.abs(got - want))) / scale if want.size else 0.0
    assert err <= tol, f"mismatch: max abs diff / max(1, max|ref|) = {err:.3e} > {tol:.0e}"


def test_layout_and_modules():
    spec = MLP([3, 5, 4, 2], "softplus", "ce", bias=True)
    model = build_model(spec, spec.init(3))
    assert [type(m).__name__ for m in model] == ["Linear", "Softplus", "Linear", "Softplus", "Linear"]
    assert [tuple(p.shape) for p in model.parameters()] == list(spec.shapes)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    for p, q in zip(model.parameters(), spec.init(3)):
        np.testing.assert_array_equal(p.detach().numpy(), q)
    nobias = build_model(MLP([2, 3, 1], "identity", bias=False), None, "float32")
    assert [type(m).__name__ for m in nobias] == ["Linear", "Identity", "Linear"]
    assert all(m.bias is None for m in nobias if isinstance(m, torch.nn.Linear))
    assert all(p.dtype == torch.float32 for p in nobias.parameters())


@given(mlp_problems())
def test_loss_grad_hvp_match_reference(problem):
    """Loss, gradient (backward) and HVP (double backward) of the nn.Sequential vs reference.models.MLP."""
    m, params = problem.model, problem.params
    task = problem.tasks[0]
    fm = FunctionalMLP(m)
    (t,) = to_torch_tasks([task])
    ys = torch.as_tensor(m.check_y(task.y_support, task.x_support.shape[0]))
    theta = fm.tensors(params, requires_grad=True)
    # forward through the plain module too (the audit contract's model)
    out_module = build_model(m, params)(t.x_support).detach().numpy()
    _close(out_module, m.forward(params, task.x_support))
    loss = fm.loss(theta, t.x_support, ys)
    grads = torch.autograd.grad(loss, theta, create_graph=True)
    v = [np.random.default_rng(problem.seed).normal(size=s) for s in m.shapes]
    hv = torch.autograd.grad(grads, theta, [torch.as_tensor(a) for a in v])
    _close(float(loss.detach()), m.loss(params, task.x_support, task.y_support))
    _close([g.detach().numpy() for g in grads], m.grad(params, task.x_support, task.y_support))
    _close([h.numpy() for h in hv], m.hvp(params, task.x_support, task.y_support, v))


def test_softplus_matches_conventions_above_torch_default_threshold():
    """nn.Softplus() returns z above 20 (error e^-20 ~ 2e-9); ours follows log(1 + e^z) there."""
    spec = MLP([1, 1, 1], "softplus")
    params = [np.array([[1.0]]), np.array([0.0]), np.array([[1.0]]), np.array([0.0])]
    x = np.array([[20.5], [25.0], [30.0]])
    out = build_model(spec, params)(torch.as_tensor(x)).detach().numpy()
    want = np.log1p(np.exp(x))  # no cancellation here: e^x >> 1
    np.testing.assert_allclose(out, want, rtol=1e-15)


def test_to_torch_tasks_dtypes():
    tasks = sinusoid(2, 3, 4, seed=1) + [Task(np.zeros((2, 1)), np.array([0, 1]), np.zeros((1, 1)), np.array([1]))]
    out = to_torch_tasks(tasks, "float32")
    assert out[0].x_support.dtype == torch.float32 and out[0].y_query.shape == (4, 1)
    assert out[2].y_support.dtype == torch.int64
    assert hasattr(out[0], "x_query") and len(out) == 3


def test_loss_fn_names():
    with pytest.raises(InvalidInputError, match="loss='hinge'"):
        loss_fn("hinge", torch.zeros(1), torch.zeros(1))


def test_bad_dtype_and_device():
    spec = MLP([1, 2, 1])
    with pytest.raises(InvalidInputError, match="dtype='float16'"):
        build_model(spec, None, "float16")
    with pytest.raises(InvalidInputError, match="device='tpu'"):
        build_model(spec, None, "float64", "tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_without_gpu_is_a_clear_error():
    from verify.backends.torch import maml

    spec = MLP([1, 2, 1])
    with pytest.raises(InvalidInputError, match="no CUDA device is available"):
        build_model(spec, None, "float64", "cuda")
    with pytest.raises(InvalidInputError, match="no CUDA device is available"):
        maml.meta_loss_and_grad(spec, spec.init(0), sinusoid(1, 2, 2), 0.1, 1, device="cuda")


def test_tf32_context_sets_and_restores():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with tf32(True):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    with pytest.raises(RuntimeError):
        with tf32(not before[0]):
            raise RuntimeError("boom")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_to_torch_tasks_with_model_reshapes_targets():
    spec = MLP([1, 2, 1])
    flat_y = [Task(np.zeros((3, 1)), np.zeros(3), np.zeros((2, 1)), np.zeros(2))]
    assert to_torch_tasks(flat_y)[0].y_support.shape == (3,)
    assert to_torch_tasks(flat_y, model=spec)[0].y_support.shape == (3, 1)


def test_complex_params_are_refused():
    from verify.backends.torch import maml

    spec = MLP([1, 2, 1])
    params = [p + 1e-20j for p in spec.init(0)]
    with pytest.raises(InvalidInputError, match="complex"):
        maml.meta_loss_and_grad(spec, params, sinusoid(1, 2, 2), 0.1, 1)
