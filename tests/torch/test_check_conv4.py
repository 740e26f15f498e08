"""``metaverify check --backbone conv4``: the check matrix on a small Conv4 (train-mode batch norm, max-pool).

The torch backend's meta-gradient on the Conv4 cells is compared with the reference; a backend whose
gradient carries a known 1e-8 error in one batch-norm tensor must fail and be located there.
"""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

pytest.importorskip("torch")

from reference.errors import InvalidInputError  # noqa: E402
from verify.algorithms import ALGORITHMS, BACKBONE_ALGORITHMS, BACKBONES, build_case  # noqa: E402
from verify.backends import load_backend  # noqa: E402
from verify.cli import main  # noqa: E402
from verify.matrix import ReferenceData, build_cell_case, check_case, plan, split_cell_name  # noqa: E402


def test_plan_names_backbone_cells_and_keeps_the_mlp_cells():
    mlp = plan(list(ALGORITHMS), ["numpy", "torch"], ["float64", "float32"])
    both = plan(list(ALGORITHMS), ["numpy", "torch"], ["float64", "float32"], ["mlp", *BACKBONES])
    assert both[: len(mlp)] == mlp  # the MLP cells first, unchanged
    extra = both[len(mlp):]
    assert {split_cell_name(a) for a, _, _ in extra} == {(a, b) for a in BACKBONE_ALGORITHMS for b in BACKBONES}
    assert ("maml[conv4:1x8x8]", "torch", "float32") in extra and ("maml[conv4:1x8x8]", "numpy", "float32") not in extra
    assert split_cell_name("r2d2[conv4:3x12x12]") == ("r2d2", "conv4:3x12x12")


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_backbone_case_is_a_train_mode_conv4_on_images(backbone):
    case = build_cell_case(f"maml[{backbone}]", 0)
    shape, hidden = BACKBONES[backbone]
    assert case.model.in_shape == shape and case.model.mode == "train"
    assert case.tasks[0].x_support.shape[1:] == shape and case.model.shapes[0] == (hidden, shape[0], 3, 3)
    features = build_cell_case(f"protonet[{backbone}]", 0).model
    assert features.n_out == hidden and features.head_indices == ()  # headless: the feature extractor
    assert "backbone='" in repr(case)  # the recipe rebuilds it


def test_backbone_case_rejects_unknown_backbone_and_algorithm():
    with pytest.raises(InvalidInputError, match="backbone='conv4:1x9x9' is unknown"):
        build_case("maml", backbone="conv4:1x9x9")
    with pytest.raises(InvalidInputError, match="algorithm='imaml' has no conv4:1x8x8 case"):
        build_case("imaml", backbone="conv4:1x8x8")


def _perturbed_torch(monkeypatch, index: int):
    """A backend root whose ``maml`` is torch's with a relative 1e-8 error in gradient tensor ``index``."""
    torch_root = load_backend("torch")
    import verify.backends.torch.maml as tmaml

    root, sub = types.ModuleType("fake_conv"), types.ModuleType("fake_conv.maml")

    def meta_loss_and_grad(*args, **kw):
        loss, grads = tmaml.meta_loss_and_grad(*args, **kw)
        grads = [np.array(g, dtype=np.float64) for g in grads]
        grads[index] = grads[index] * (1 + 1e-8)
        return loss, grads

    sub.meta_loss_and_grad = meta_loss_and_grad
    monkeypatch.setitem(sys.modules, "fake_conv", root)
    monkeypatch.setitem(sys.modules, "fake_conv.maml", sub)
    return torch_root, root


def test_torch_conv4_maml_cells_pass_and_a_perturbed_batchnorm_gradient_fails(monkeypatch):
    case = build_cell_case("maml[conv4:1x8x8]", 0)
    ref = ReferenceData(case)
    torch_root, bad = _perturbed_torch(monkeypatch, 6)  # 5.weight: gamma of the second BatchNorm2d
    for dtype in ("float64", "float32"):
        r = check_case(case, "torch", dtype, module=torch_root, ref=ref)
        assert r.status == "pass", r.checks
    r = check_case(case, "fake_conv", "float64", module=bad, ref=ref)
    assert r.status == "fail"
    detail = next(c["detail"] for c in r.checks if c["check"] == "meta-gradient vs reference")
    assert f"worst at {case.names[6]}" in detail and case.names[6] == "5.weight"


def test_cli_backbone_cells_json(tmp_path, capsys):
    js = tmp_path / "r.json"
    code = main(["check", "--backbone", "mlp", "--backbone", "conv4:1x8x8", "--backend", "numpy", "--backend",
                 "torch", "--algorithm", "anil", "--json", str(js)])
    out = capsys.readouterr().out
    assert code == 0, out
    cells = json.loads(js.read_text())["result"]["check"]["cells"]
    assert [(c["algorithm"], c["backend"], c["dtype"]) for c in cells] == [
        ("anil", "numpy", "float64"), ("anil", "torch", "float64"), ("anil", "torch", "float32"),
        ("anil[conv4:1x8x8]", "numpy", "float64"), ("anil[conv4:1x8x8]", "torch", "float64"),
        ("anil[conv4:1x8x8]", "torch", "float32")]
    assert all(c["status"] == "pass" for c in cells)


def test_cli_backbone_without_backbone_algorithms_is_a_usage_error(capsys):
    assert main(["check", "--backbone", "conv4", "--backend", "numpy", "--algorithm", "imaml"]) == 2
    assert "has cells for maml, fomaml, anil, protonet, r2d2 only" in capsys.readouterr().err
