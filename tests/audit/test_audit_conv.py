"""``metaverify audit --model FILE.py:factory`` on a user's own Conv4 (batch norm, max-pool) in PyTorch."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("torch")

import conv_user  # noqa: E402

from reference.errors import InvalidInputError  # noqa: E402
from verify import audit  # noqa: E402
from verify.auditing.problem import network_from_spec  # noqa: E402

FACTORY = os.path.join(os.path.dirname(__file__), "conv_user.py") + ":make_conv4:1x16x16"


# Each audit takes ~20 s idle (about a minute on a loaded 2-core machine): slow.
@pytest.mark.slow
def test_audit_verifies_correct_maml_and_names_first_order_on_the_users_module():
    ok = audit(conv_user.maml, "maml", backend="torch", model=FACTORY)
    assert ok.status == "pass", ok.reason
    bad = audit(conv_user.maml_first_order, "maml", backend="torch", model=FACTORY)
    assert bad.status == "fail"
    assert bad.diagnosis is not None and bad.diagnosis.title.startswith("first-order only"), bad.diagnosis


@pytest.mark.slow
def test_audit_names_running_statistics_for_an_eval_mode_inner_loop():
    """Issue #14's bar: model.eval() around the inner loop is named, as PyTorch computes it (running statistics
    carried across tasks by the in-place updates, and the backward run with the final ones)."""
    bad = audit(conv_user.maml_bn_eval_inner, "maml", backend="torch", model=FACTORY)
    assert bad.status == "fail"
    assert bad.diagnosis is not None and bad.diagnosis.key == "bn_running_stats", bad.diagnosis
    assert bad.diagnosis.error <= bad.diagnosis.tolerance
    assert any("running statistics updated by the meta-gradient evaluation" in n for n in bad.notes)


@pytest.mark.slow
@pytest.mark.parametrize("fn, algorithm, key", [
    (conv_user.maml_bn_frozen, "maml", "bn_params_frozen"),
    (conv_user.anil_bn_adapted, "anil", "bn_params_adapted"),
])
def test_audit_names_batchnorm_parameters_adapted_or_not(fn, algorithm, key):
    bad = audit(fn, algorithm, backend="torch", model=FACTORY)
    assert bad.status == "fail"
    assert bad.diagnosis is not None and bad.diagnosis.key == key, bad.diagnosis


@pytest.mark.slow
def test_audit_passes_correct_anil_and_notes_the_leaked_running_statistics():
    ok = audit(conv_user.anil, "anil", backend="torch", model=FACTORY)
    assert ok.status == "pass", ok.reason
    assert any("running statistics updated by the meta-gradient evaluation" in n for n in ok.notes)


@pytest.mark.slow
def test_audit_names_batch_statistics_where_running_statistics_were_meant():
    model = FACTORY.replace("make_conv4:", "make_conv4_eval:")
    ok = audit(conv_user.maml_keep_mode, "maml", backend="torch", model=model)
    assert ok.status == "pass", ok.headline()
    bad = audit(conv_user.maml_train_mode, "maml", backend="torch", model=model)
    assert bad.status == "fail"
    assert bad.diagnosis is not None and bad.diagnosis.key == "bn_batch_stats", bad.diagnosis


def test_audit_protonet_on_the_users_feature_extractor_names_joint_normalisation():
    model = FACTORY.replace("make_conv4:", "make_features:")
    ok = audit(conv_user.protonet, "protonet", backend="torch", model=model)
    assert ok.status == "pass", ok.headline()
    bad = audit(conv_user.protonet_joint, "protonet", backend="torch", model=model)
    assert bad.status == "fail"
    assert bad.diagnosis is not None and bad.diagnosis.key == "bn_joint_batch", bad.diagnosis


def test_model_specs():
    net, params = network_from_spec("conv4:1x28x28:5:hidden=8")
    assert params is None and net.n_out == 5 and net.in_shape == (1, 28, 28) and net.shapes[0] == (8, 1, 3, 3)
    net, _ = network_from_spec("conv4:3x12x12:4")  # small images: ceil-mode pooling
    assert net.n_out == 4
    net, _ = network_from_spec("resnet12:3x84x84:5:widths=2-3-4-5")
    assert net.shapes[-2] == (5, 5 * 5 * 5)
    net, params = network_from_spec(FACTORY)
    assert net.param_names[0] == "features.0.weight" and len(params) == len(net.shapes)
    assert network_from_spec("mlp:1-4-1") is None
    with pytest.raises(InvalidInputError, match="CxHxW"):
        network_from_spec("conv4:28x28:5")
    with pytest.raises(InvalidInputError, match="unknown option"):
        network_from_spec("conv4:1x28x28:5:width=3")
