"""``metaverify report --audit``: audited PyTorch functions in the report, with the verdict and the diagnosis."""

from __future__ import annotations

import json
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest.importorskip("torch")

from verify.cli import main  # noqa: E402

AUDITED = textwrap.dedent('''
    import torch
    from torch.func import functional_call


    def _meta_loss(model, tasks, inner_lr, inner_steps, create_graph):
        params = dict(model.named_parameters())
        losses = []
        for t in tasks:
            p = params
            for _ in range(inner_steps):
                support = torch.nn.functional.mse_loss(functional_call(model, p, (t.x_support,)), t.y_support)
                grads = torch.autograd.grad(support, list(p.values()), create_graph=create_graph)
                p = {k: v - inner_lr * g for (k, v), g in zip(p.items(), grads)}
            losses.append(torch.nn.functional.mse_loss(functional_call(model, p, (t.x_query,)), t.y_query))
        return torch.stack(losses).mean()


    def maml(model, tasks, inner_lr, inner_steps):
        return _meta_loss(model, tasks, inner_lr, inner_steps, create_graph=True)


    def maml_without_create_graph(model, tasks, inner_lr, inner_steps):
        return _meta_loss(model, tasks, inner_lr, inner_steps, create_graph=False)
''')


def test_report_shows_audits_with_verdicts_and_diagnosis(tmp_path: Path) -> None:
    source = tmp_path / "my_maml.py"
    source.write_text(AUDITED)
    out = tmp_path / "report"
    code = main(["report", "--quick", "--backend", "numpy", "--algorithm", "maml", "--out", str(out),
                 "--audit", f"{source}:maml", "--audit", f"{source}:maml_without_create_graph",
                 "--audit-option", "loss=mse", "--audit-option", "inner_steps=2"])
    assert code == 1  # the second implementation is wrong, so the report as a whole fails
    doc = json.loads((out / "results.json").read_text())
    good, bad = doc["result"]["audits"]
    assert good["status"] == "pass" and good["diagnosis"] is None
    assert bad["status"] == "fail"
    assert bad["diagnosis"]["key"] == "first_order"  # the catalogue names the missing create_graph
    assert "inner_steps=2" in good["problem"] and "loss='mse'" in good["problem"]  # --audit-option reached it
    html = (out / "index.html").read_text(encoding="utf-8")
    assert html.count('<h3 id="audit-') == 2 and "Diagnosis:" in html
    assert 'alt="audit 1 gradient comparison"' in html and 'alt="audit 2 gradient comparison"' in html
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "figures/audit-2.png" in md and (out / "figures" / "audit-2.png").is_file()
    junit = ET.parse(out / "junit.xml").getroot()
    audit_cases = [c for c in junit.iter("testcase") if c.get("classname", "").startswith("metaverify.audit")]
    assert audit_cases and any(c.find("failure") is not None for c in audit_cases)
