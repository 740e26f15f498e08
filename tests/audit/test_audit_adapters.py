"""Ready audits of higher, torchopt and learn2learn (run when the library imports, else skipped with the reason)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from _configs import GRAD, GRAD_CE  # noqa: E402

from verify._audit import audit  # noqa: E402
from verify.adapters import LIBRARIES, AdapterUnavailableError, availability, load_adapter  # noqa: E402

ROWS = [(lib, alg) for lib, (_, algs, _) in LIBRARIES.items() for alg in algs]


@pytest.mark.parametrize("library, algorithm", ROWS, ids=[f"{a}-{b}" for a, b in ROWS])
def test_library_idiom_is_verified(library, algorithm):
    ok, reason = availability(library)
    if not ok:
        pytest.skip(reason)
    fn = load_adapter(library, algorithm)
    for seed, config in ((0, GRAD), (1, GRAD_CE)):
        problem = dict(config) if algorithm != "metasgd" else {k: v for k, v in config.items()}
        result = audit(fn, algorithm, "torch", seed=seed, directions=1, **problem)
        assert result.passed, result.report()


def test_higher_default_copy_initial_weights_is_named():
    ok, reason = availability("higher")
    if not ok:
        pytest.skip(reason)
    import higher
    import torch

    from verify.adapters._common import task_loss

    def maml_with_defaults(model, tasks, inner_lr, inner_steps):
        # The classic mistake: copy_initial_weights=True (higher's default) cuts the model out of the graph.
        opt = torch.optim.SGD(model.parameters(), lr=inner_lr)
        total = 0.0
        for t in tasks:
            with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
                for _ in range(inner_steps):
                    diffopt.step(task_loss(fmodel(t.x_support), t.y_support))
                total = total + task_loss(fmodel(t.x_query), t.y_query)
        return total / len(tasks)

    result = audit(maml_with_defaults, "maml", "torch", seed=0, directions=0, **GRAD)
    assert not result.passed
    assert result.diagnosis.key == "disconnected" and "any tensor" in result.diagnosis.detail
    assert all(t.missing for t in result.tensors)


def test_unavailable_library_is_a_clear_error():
    ok, reason = availability("learn2learn")
    if ok:
        pytest.skip("learn2learn is installed here")
    assert "learn2learn" in reason
    with pytest.raises(AdapterUnavailableError, match="learn2learn"):
        load_adapter("learn2learn", "maml")
