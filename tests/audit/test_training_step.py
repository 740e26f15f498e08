"""Code shaped like a training step: episode batches, ``backward()`` + ``optimizer.step()``, accuracies returned."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import corpus_torch as C  # noqa: E402
import corpus_training_step as S  # noqa: E402
from _configs import GRAD, GRAD_CE, METASGD  # noqa: E402

from reference.errors import InvalidInputError  # noqa: E402
from verify.auditing import audit  # noqa: E402
from verify.backends.torch import TorchTask  # noqa: E402
from verify.backends.torch.training_step import (  # noqa: E402
    EpisodeBatch,
    RecordingOptimizer,
    StepOutput,
    stack_tasks,
    training_step,
)


@pytest.mark.parametrize("cfg", [GRAD, GRAD_CE], ids=["mse", "ce"])
def test_maml_pytorch_meta_class_verified(cfg):
    r = audit(S.maml_pytorch, "maml", seed=1, directions=2, **cfg)
    assert r.passed, r.report()
    assert "optimizer.step()" in r.source and "backward() was called on" in r.source
    assert r.loss["status"] == "pass" and r.independent["status"] == "pass"


@pytest.mark.parametrize("cfg", [GRAD, GRAD_CE], ids=["mse", "ce"])
def test_maml_pytorch_first_order_named(cfg):
    # MAML-Pytorch's torch.autograd.grad(loss, params) without create_graph: first-order only.
    r = audit(S.maml_pytorch_first_order, "maml", seed=1, directions=2, **cfg)
    assert not r.passed
    assert r.diagnosis is not None and r.diagnosis.key == "first_order", r.report()
    assert r.loss["status"] == "pass"  # the meta-loss was taken from the tensor backward() was called on


def test_per_task_backward_accumulation_verified():
    # backward() once per task on loss_q / tasks: the accumulated .grad is the gradient of the sum of those losses.
    r = audit(S.maml_per_task_backward, "maml", seed=2, directions=2, **GRAD)
    assert r.passed, r.report()


def test_metasgd_step_orders_params_then_lrs():
    @training_step
    def step(model, lrs, batch, inner_steps, optimizer):
        tasks = [TorchTask(*(f[i] for f in batch)) for i in range(batch.x_spt.shape[0])]
        loss = C.metasgd(model, lrs, tasks, inner_steps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    r = audit(step, "metasgd", seed=0, directions=1, **METASGD)
    assert r.passed, r.report()
    assert [t.name for t in r.tensors][-1].startswith("lrs")


def test_contract_signature_and_batch_layout():
    assert list(inspect.signature(S.maml_pytorch).parameters) == ["model", "tasks", "inner_lr", "inner_steps"]
    rng = np.random.default_rng(0)
    tasks = [TorchTask(torch.tensor(rng.normal(size=(4, 2))), torch.tensor(rng.integers(0, 3, 4)),
                       torch.tensor(rng.normal(size=(3, 2))), torch.tensor(rng.integers(0, 3, 3)))
             for _ in range(5)]
    b = stack_tasks(tasks)
    assert isinstance(b, EpisodeBatch)
    assert b.x_spt.shape == (5, 4, 2) and b.y_spt.shape == (5, 4) and b.y_spt.dtype == torch.int64
    assert b.x_qry.shape == (5, 3, 2) and torch.equal(b.y_qry[3], tasks[3].y_query)
    uneven = tasks[:1] + [TorchTask(tasks[1].x_support[:2], tasks[1].y_support[:2], *tasks[1][2:])]
    with pytest.raises(InvalidInputError, match="different shapes"):
        stack_tasks(uneven)


def test_recording_optimizer_records_and_never_steps():
    w = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    opt = RecordingOptimizer([w], lr=0.5)
    assert isinstance(opt, torch.optim.Optimizer) and opt.param_groups[0]["lr"] == 0.5
    (w ** 2).sum().backward()
    opt.step()
    assert torch.equal(w.detach(), torch.tensor([1.0, -2.0], dtype=torch.float64))  # unchanged
    assert torch.equal(opt.steps[0][0], torch.tensor([2.0, -4.0], dtype=torch.float64))
    opt.zero_grad()
    assert w.grad is None
    opt.step(closure=lambda: (3 * w).sum().backward())
    assert torch.equal(opt.steps[1][0], torch.tensor([3.0, 3.0], dtype=torch.float64))


def test_meta_loss_is_the_backward_tensor_and_nothing_is_patched():
    original = torch.Tensor.backward

    @training_step
    def step(model, batch, inner_lr, inner_steps, optimizer):
        loss = sum((p ** 2).sum() for p in model.parameters())
        (2 * loss).backward(retain_graph=True)  # zeroed before: starts the sum
        optimizer.zero_grad()
        loss.backward(retain_graph=True)        # the sum restarts after zero_grad
        torch.autograd.backward(loss)   # accumulates: meta-loss 2 * loss
        torch.tensor(1.0, requires_grad=True).backward()  # reaches no parameter: not counted
        optimizer.step()
        return "accuracies"

    model = torch.nn.Sequential(torch.nn.Linear(2, 1).double())
    tasks = [TorchTask(torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64),
                       torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64))]
    out = step(model, tasks, 0.1, 1)
    assert isinstance(out, StepOutput) and "optimizer.step()" in out.source
    squares = sum(float((p.detach() ** 2).sum()) for p in model.parameters())
    assert float(out[0]) == pytest.approx(2 * squares, rel=1e-15)
    for g, p in zip(out[1], model.parameters()):
        assert torch.allclose(g, 4 * p.detach(), rtol=1e-15, atol=0)
    assert torch.Tensor.backward is original
    assert not torch.overrides._is_torch_function_mode_enabled()


def test_bad_training_steps_are_clear_errors():
    model = torch.nn.Sequential(torch.nn.Linear(2, 1).double())
    tasks = [TorchTask(torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64),
                       torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64))]

    @training_step
    def twice(model, batch, inner_lr, inner_steps, optimizer):
        sum(p.sum() for p in model.parameters()).backward()
        optimizer.step()
        optimizer.step()

    with pytest.raises(InvalidInputError, match=r"optimizer.step\(\) 2 times"):
        twice(model, tasks, 0.1, 1)

    @training_step
    def nothing(model, batch, inner_lr, inner_steps, optimizer):
        return None

    with pytest.raises(InvalidInputError, match="returned None"):
        nothing(model, tasks, 0.1, 1)

    with pytest.raises(InvalidInputError, match="no parameter 'optimizer'"):
        training_step(lambda model, batch, inner_lr, inner_steps: None)
