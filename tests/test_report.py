"""``metaverify report``: files, schema, determinism, atomicity, escaping, the bundled KaTeX, the CLI.

The browser test is in ``test_report_browser.py``, the report with audits of
PyTorch functions in ``test_report_audit.py``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reference.errors import InvalidInputError
from verify.cli import main
from verify.report import ReportConfig, build_report
from verify.report import _build
from verify.report._document import Code, Text
from verify.report._html import _inline as html_inline
from verify.report._katex import RENDER_SCRIPT, load_assets
from verify.report._markdown import _inline as md_inline
from verify.report._markdown import escape_markdown

SMALL = dict(algorithms=["maml", "reptile"], backends=["numpy"], dtypes=["float64"], examples=1, quick=True)
TINY = dict(SMALL, algorithms=["protonet"])  # a cheap complete report (no SymPy), for the atomicity tests


def _build_small(out: Path, **kw) -> Path:
    build_report(ReportConfig(out=out, **{**SMALL, **kw}))
    return out


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_small(tmp_path_factory.mktemp("report") / "r", title="Small <report> & $x$")


# ---------------------------------------------------------------------------
# the files


def test_report_writes_every_file(report: Path) -> None:
    names = {p.relative_to(report).as_posix() for p in report.rglob("*") if p.is_file()}
    assert {"index.html", "report.md", "results.json", "junit.xml"} <= names
    for fig in ("heatmap", "taylor-maml", "fd-maml"):
        assert {f"figures/{fig}.png", f"figures/{fig}.svg", f"figures/{fig}.json"} <= names
    # reptile is a defined direction, not a gradient: no Taylor figure for it
    assert "figures/taylor-reptile.png" not in names


def test_figures_are_valid_png_and_svg(report: Path) -> None:
    from PIL import Image

    for png in (report / "figures").glob("*.png"):
        with Image.open(png) as im:
            im.load()
            assert im.size[0] > 300 and im.size[1] > 150
    for svg in (report / "figures").glob("*.svg"):
        root = ET.parse(svg).getroot()
        assert root.tag.endswith("svg")


def test_results_json_schema_and_content(report: Path) -> None:
    doc = json.loads((report / "results.json").read_text())
    assert doc["schema"] == "metaverify.results" and doc["version"] == 1
    assert list(doc)[-1] == "generated"  # the volatile field comes last
    assert set(doc["generated"]) == {"timestamp", "seconds"}
    assert doc["command"][:2] == ["metaverify", "report"]
    res = doc["result"]
    assert res["report"]["status"] == "pass"
    cells = res["check"]["cells"]
    assert [(c["algorithm"], c["backend"]) for c in cells] == [("maml", "numpy"), ("reptile", "numpy")]
    assert all("seconds" not in c for c in cells)  # timings live in "generated"
    (taylor,) = res["taylor"]
    assert taylor["algorithm"] == "maml"
    assert [r["expected_rate"] for r in taylor["remainders"]] == [1, 2, 3]
    assert all(r["status"] == "pass" for r in taylor["remainders"])
    assert "reptile" in res["symbolic"] and "maml" in res["symbolic"]


def test_junit_has_a_case_per_cell_and_taylor_test(report: Path) -> None:
    root = ET.parse(report / "junit.xml").getroot()
    cases = root.findall(".//testcase")
    assert len(cases) == 2 + 3  # two matrix cells, three Taylor remainders of maml
    assert not root.findall(".//failure")


def test_html_is_self_contained_with_only_the_hashed_scripts(report: Path) -> None:
    html = (report / "index.html").read_text(encoding="utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    assert len(scripts) == 2 and scripts[1] == RENDER_SCRIPT
    assert len(re.findall(r"<script\b", html)) == 2
    csp = _unescape(re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', html).group(1))
    for body in scripts:  # the CSP allows exactly these two scripts, by hash
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp
    assert "default-src 'none'" in csp and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
    # nothing is fetched from anywhere: no external src resources, no url() outside data URIs (the
    # markup and styles; KaTeX's own source mentions src= for \includegraphics, which trust=false disables)
    markup = re.sub(r"<script>.*?</script>", "", html, flags=re.S)
    assert not re.search(r'\bsrc="(?!data:)', markup)
    assert not re.search(r"url\((?!data:)", markup)
    assert not re.search(r"<link\b|<iframe\b|<object\b|<embed\b", markup)
    imgs = re.findall(r'<img src="data:image/png;base64,([^"]+)"', html)
    assert len(imgs) == 3  # heatmap, finite differences, Taylor
    for b64 in imgs:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"


def test_html_and_markdown_carry_the_same_formulas(report: Path) -> None:
    html = (report / "index.html").read_text(encoding="utf-8")
    md = (report / "report.md").read_text(encoding="utf-8")
    display_html = [_unescape(t) for t in re.findall(r'<div class="math">(.*?)</div>', html, flags=re.S)]
    display_md = re.findall(r"```math\n(.*?)\n```", md, flags=re.S)
    assert len(display_html) >= 10 and display_html == display_md
    assert "$r_1$" in md
    for ref in re.findall(r"\]\((figures/[^)]+)\)", md):
        assert (report / ref).is_file(), ref


def _unescape(text: str) -> str:
    import html

    return html.unescape(text)


def test_user_title_is_escaped_everywhere(report: Path) -> None:
    html = (report / "index.html").read_text(encoding="utf-8")
    md = (report / "report.md").read_text(encoding="utf-8")
    assert "<report>" not in html and "Small &lt;report&gt; &amp; $x$" in html
    assert "<report>" not in md and r"Small &lt;report&gt; &amp; \$x\$" in md


# ---------------------------------------------------------------------------
# determinism and atomicity


def _without_generated(path: Path) -> bytes:
    data = path.read_bytes()
    cut = data.index(b'\n  "generated": ')
    return data[:cut]


def test_results_json_is_byte_identical_except_generated(report: Path, tmp_path: Path) -> None:
    again = _build_small(tmp_path / "again", title="Small <report> & $x$")
    assert _without_generated(again / "results.json") == _without_generated(report / "results.json")
    for name in ("taylor-maml.json", "fd-maml.json", "taylor-maml.png", "fd-maml.svg"):
        assert (again / "figures" / name).read_bytes() == (report / "figures" / name).read_bytes(), name


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture()
def previous(tmp_path: Path) -> Path:
    out = tmp_path / "rep"
    out.mkdir()  # a previous report (minimal but valid: results.json of the schema with a report section)
    (out / "results.json").write_text(json.dumps({"schema": "metaverify.results", "result": {"report": {}}}))
    (out / "index.html").write_text("previous report")
    return out


def test_failed_run_leaves_the_previous_report_untouched(previous: Path, monkeypatch) -> None:
    before = _snapshot(previous)

    def broken(*args, **kwargs):
        raise RuntimeError("figure drawing broke")

    monkeypatch.setattr(_build._figures, "render", broken)
    with pytest.raises(RuntimeError, match="figure drawing broke"):
        _build_small(previous, **TINY)
    assert _snapshot(previous) == before
    assert _leftovers(previous.parent) == []


def test_interrupted_write_leaves_the_previous_report_untouched(previous: Path, monkeypatch) -> None:
    before = _snapshot(previous)
    real = Path.write_bytes
    calls = []

    def interrupted(self: Path, data: bytes) -> int:
        calls.append(self)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _build_small(previous, **TINY)
    assert len(calls) == 3 and all(".rep.tmp-" in str(p) for p in calls)  # written beside, never into, rep/
    assert _snapshot(previous) == before
    assert _leftovers(previous.parent) == []


def test_refuses_to_replace_a_folder_that_is_not_a_report(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(InvalidInputError, match="not a metaverify report"):
        _build_small(out)
    assert (out / "thesis.tex").read_text() == "precious"
    assert main(["report", "--quick", "--backend", "numpy", "--algorithm", "mlp", "--out", str(out)]) == 2


# ---------------------------------------------------------------------------
# escaping (independent parsers: html.parser, markdown-it-py)


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.data: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.data.append(data)


# Arbitrary text, and text made of the characters Markdown and HTML care about (where the bugs would be).
_TEXT = st.one_of(st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=60),
                  st.text(st.sampled_from(list("\\`*_[]()#+-.!|$~<>&=:;/\"' \n\tab01")), max_size=40))


@given(_TEXT)
def test_html_text_runs_are_inert(text: str) -> None:
    p = _Collect()
    p.feed(html_inline([Text(text)]))
    p.close()
    assert p.tags == [] and "".join(p.data) == text


def _markdown_text(markdown: str) -> tuple[list[str], str]:
    md_it = pytest.importorskip("markdown_it", reason="markdown-it-py (a CommonMark parser) is not installed")
    rendered = md_it.MarkdownIt("commonmark").enable("table").render(markdown)
    p = _Collect()
    p.feed(rendered)
    p.close()
    return p.tags, "".join(p.data)


@given(_TEXT, st.booleans())
def test_markdown_text_runs_render_literally(text: str, block_start: bool) -> None:
    prefix = "" if block_start else "x "  # a run inside a paragraph, after other text
    tags, data = _markdown_text(prefix + escape_markdown(text, block_start=block_start))
    assert set(tags) <= {"p"}
    assert " ".join(data.split()) == " ".join((prefix + text).split())


@given(st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40))
def test_markdown_code_runs_render_literally(text: str) -> None:
    tags, data = _markdown_text("x " + md_inline([Code(text)]))
    assert set(tags) <= {"p", "code"}
    # CommonMark strips one space at each end of a code span and turns line ends into spaces
    assert " ".join(data[2:].split()) == " ".join(text.split())


# ---------------------------------------------------------------------------
# the bundled math renderer


def test_bundled_katex_assets_are_complete() -> None:
    assets = load_assets()
    fonts = re.findall(r"url\(data:font/woff2;base64,([A-Za-z0-9+/=]+)\)", assets.css)
    assert len(fonts) == 20
    assert all(base64.b64decode(f)[:4] == b"wOF2" for f in fonts)
    assert "url(fonts/" not in assets.css and "MIT" in assets.license_text
    assert assets.version == "0.19.1" and "katex" in assets.script[:400]


def _own_formulas() -> list[str]:
    from verify.report._formulas import ENGINE_FORMULAS, NOTATION, TEXTS

    out = [tex for _, tex in NOTATION + ENGINE_FORMULAS]
    for text in TEXTS.values():
        out += [tex for _, tex in text.objective + text.gradient]
    return out


def _symbolic_formulas() -> list[str]:
    from verify.report._formulas import SYMBOLIC_PROBLEMS, symbolic_derivation

    out = []
    for name in SYMBOLIC_PROBLEMS:
        sym = symbolic_derivation(name)
        if sym and "latex" in sym:
            out.append(sym["latex"])
    return out


def test_every_formula_of_the_report_is_valid_katex(tmp_path: Path) -> None:
    _katex_under_node(tmp_path, _own_formulas(), minimum=30)


@pytest.mark.slow  # the SymPy derivations take seconds; the browser test typesets two of them on every run
def test_every_symbolic_derivation_is_valid_katex(tmp_path: Path) -> None:
    _katex_under_node(tmp_path, _symbolic_formulas(), minimum=5)


def _katex_under_node(tmp_path: Path, formulas: list[str], minimum: int) -> None:
    """Render formulas with the bundled KaTeX under node, errors thrown (strict mode)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed; the browser test still typesets the formulas of its report")
    assets = load_assets()
    (tmp_path / "katex.js").write_text(assets.script, encoding="utf-8")
    (tmp_path / "formulas.json").write_text(json.dumps(formulas), encoding="utf-8")
    script = """
    const katex = require(process.argv[1] + "/katex.js");
    const formulas = JSON.parse(require("fs").readFileSync(process.argv[1] + "/formulas.json", "utf8"));
    const bad = [];
    for (const f of formulas) {
      try { katex.renderToString(f, {displayMode: true, throwOnError: true, strict: "error"}); }
      catch (e) { bad.push(String(e).slice(0, 300)); }
    }
    console.log(JSON.stringify({n: formulas.length, bad: bad}));
    """
    out = subprocess.run([node, "-e", script, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["n"] == len(formulas) >= minimum
    assert res["bad"] == []


# ---------------------------------------------------------------------------
# the report's own numerics, against independent values


def test_taylor_data_rates_and_hessian_vector_product() -> None:
    from reference.models import flatten
    from verify.algorithms import build_case, evaluate
    from verify.report._numerics import direction, hessian_vector_product, taylor_data

    case = build_case("maml", seed=3)
    data = taylor_data(case, seed=3)
    for expected, r in zip((1, 2, 3), data.results):
        assert r.status == "pass" and abs(r.slope - expected) < 0.25
    # HVP (complex step of the gradient) against a central difference of the gradient
    x, v = flatten(case.variables), direction(case, 3)
    hv, how = hessian_vector_product(case, x, v)
    assert how.startswith("complex step")
    t = 1e-5

    def grad(y):
        return flatten(evaluate(case, variables=[np.asarray(a) for a in _unflatten(case, y)])[1])

    central = (grad(x + t * v) - grad(x - t * v)) / (2 * t)
    assert np.max(np.abs(hv - central)) <= 1e-6 * np.max(np.abs(central))


def _unflatten(case, y):
    from reference.models import unflatten

    return unflatten(y, case.shapes)


def test_fd_curves_show_the_v_and_the_flat_complex_step() -> None:
    from verify.algorithms import build_case
    from verify.report._numerics import fd_curves

    c = fd_curves(build_case("anil", seed=1), seed=1)
    central = np.asarray(c.central)
    k = int(np.nanargmin(central))
    eps = np.finfo(float).eps
    # the V: truncation at the largest step, round-off at the smallest, both far above the best
    assert central[0] > 1e4 * central[k] and central[-1] > 1e4 * central[k]
    assert central[k] < 1e-8 and 1e-7 * eps ** (1 / 3) < c.steps[k] < 1e3 * eps ** (1 / 3)
    # Richardson beats the best central difference; the complex step is at machine precision for tiny h
    assert np.nanmin(c.richardson) < central[k]
    tiny = np.asarray(c.complex)[np.asarray(c.complex_steps) < 1e-12]
    assert np.all(tiny < 100 * eps)
    assert set(c.defaults) == {"central", "richardson", "complex"}
    assert c.defaults["complex"]["error"] < 100 * eps


# ---------------------------------------------------------------------------
# the command line


def test_cli_quick_report_replaces_the_previous_one(previous: Path, capsys) -> None:
    out = previous
    code = main(["report", "--quick", "--backend", "numpy", "--algorithm", "protonet", "--out", str(out),
                 "--title", "CLI test", "--seed", "5"])
    assert code == 0
    assert (out / "index.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert _leftovers(out.parent) == []
    printed = capsys.readouterr().out
    assert f"report written to {out}/" in printed and "PASS" in printed
    doc = json.loads((out / "results.json").read_text())
    assert doc["command"] == ["metaverify", "report", "--out", str(out), "--seed", "5", "--quick", "--backend",
                              "numpy", "--algorithm", "protonet", "--examples", "1", "--title", "CLI test"]
    assert doc["result"]["report"]["seed"] == 5


@pytest.mark.parametrize("argv, message", [
    (["--algorithm", "nope"], "unknown algorithm"),
    (["--audit", "x.py:f"], "exactly one --algorithm"),
    (["--audit", "x.py:f", "--audit-algorithm", "nope"], "is unknown"),
    (["--algorithm", "maml", "--audit", "x.py:f", "--audit-option", "bogus=1"], "not an audit option"),
    (["--algorithm", "maml", "--audit-option", "inner_lr=0.1"], "without --audit"),
    (["--audit-algorithm", "maml"], "without --audit"),
    (["--examples", "0"], "must be >= 1"),
    (["--title", "  "], "is empty"),
])
def test_cli_usage_errors_exit_2(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    assert main(["report", "--quick", "--backend", "numpy", "--out", str(tmp_path / "x"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_report_with_a_failed_audit_target_still_writes_and_exits_1(tmp_path: Path) -> None:
    """An audit that cannot run (the function raises) is a failure shown in the report (escaped), not a crash.
    (A target that does not exist is a usage error, exit 2 before any work: tests/test_cli_errors.py.)"""
    out = tmp_path / "audit"
    src = tmp_path / "<img src=x onerror=alert(1)>.py"
    src.write_text("def maml(model, tasks, inner_lr, inner_steps):\n    raise RuntimeError('boom <b>')\n")
    target = str(src) + ":maml"
    code = main(["report", "--quick", "--backend", "numpy", "--algorithm", "maml", "--out", str(out),
                 "--audit", target])
    assert code == 1
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;.py" in html
    doc = json.loads((out / "results.json").read_text())
    (audit,) = doc["result"]["audits"]
    assert audit["status"] == "fail" and "boom <b>" in audit["error"]
    assert "boom <b>" not in html and "boom &lt;b&gt;" in html
    assert doc["result"]["report"]["status"] == "fail"
    assert math.isfinite(doc["generated"]["seconds"]["total"])
