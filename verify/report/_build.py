"""Build a report: run the checks, compute the report's figures, write every file, swap the folder into place.

Output folder (default ``reports/latest``)::

    index.html     one self-contained page (KaTeX, fonts and figures inlined)
    report.md      the same content as Markdown, figures referenced as files
    results.json   versioned schema (``verify._output.results_document``), deterministic but for ``generated``
    junit.xml      one test case per matrix cell, Taylor test and audited tensor
    figures/       <name>.png, <name>.svg and <name>.json (the data behind the figure)

Atomicity: everything is written into a fresh temporary folder next to the
target; only when every file is complete is the old folder renamed aside, the
new one renamed into place, and the old one deleted. A failed or interrupted
run removes its temporary folder and leaves the previous report untouched.
A target that exists but is not a metaverify report (and not empty) is never
replaced.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reference.errors import InvalidInputError, MetaverifyError
from verify._output import SCHEMA, junit_xml, results_document
from verify._verdict import jsonable
from verify.algorithms import ALGORITHMS, build_case, case_algorithms
from verify.report import _content, _figures, _formulas
from verify.report._html import render_html
from verify.report._katex import load_assets
from verify.report._markdown import render_markdown

__all__ = ["AuditRequest", "ReportConfig", "ReportResult", "build_report"]

#: The matrix's problem k of a cell is ``build_case(algorithm, seed=seed * CASE_SEED_STRIDE + k)``.
CASE_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class AuditRequest:
    """An implementation to audit.

    ``target`` is ``path/to/file.py:function`` or ``package.module:function``,
    or ``library`` names a ready adapter (``higher``, ``torchopt``,
    ``learn2learn``; :func:`verify.adapters.load_adapter`). ``options`` are
    keyword arguments of :func:`verify.audit` (``inner_lr``, ``model``, ...).
    """

    target: str
    algorithm: str
    backend: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    library: str | None = None

    @property
    def label(self) -> str:
        return f"{self.library} (library adapter)" if self.library else self.target


@dataclass
class ReportConfig:
    """What to check and where to write it (the ``metaverify report`` options)."""

    out: Path = Path("reports/latest")
    algorithms: list[str] = field(default_factory=lambda: list(case_algorithms()))
    backends: list[str] = field(default_factory=lambda: ["numpy"])
    dtypes: list[str] = field(default_factory=lambda: ["float64", "float32"])
    examples: int = 2
    seed: int = 0
    quick: bool = False
    title: str = "metaverify report"
    device: str = "cpu"
    audits: list[AuditRequest] = field(default_factory=list)
    command: list[str] = field(default_factory=lambda: ["metaverify", "report"])


@dataclass
class ReportResult:
    out: Path
    status: str
    counts: dict[str, dict[str, int]]
    files: dict[str, int]  # relative path -> bytes
    seconds: float


def _is_replaceable(out: Path) -> bool:
    """An existing ``out`` may be replaced only if it is empty or a previous report."""
    if not out.exists():
        return True
    if not out.is_dir():
        return False
    if not any(out.iterdir()):
        return True
    try:
        doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("schema") == SCHEMA and "report" in doc.get("result", {})


def check_output_folder(out: Path) -> Path:
    """Validate the target folder before any work is done (fail fast, not after minutes of checks)."""
    out = Path(out)
    if str(out) in ("", ".", "/") or out.resolve() == Path.cwd().resolve() or out.resolve() == Path.home():
        raise InvalidInputError(f"--out={str(out)!r} would replace a folder that is not a report; give a "
                                "dedicated folder such as reports/NAME")
    if not _is_replaceable(out):
        raise InvalidInputError(
            f"--out={str(out)!r} exists and is not a metaverify report (no results.json of schema {SCHEMA!r}); "
            "refusing to replace it: choose a new folder or remove it yourself")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInputError(f"--out={str(out)!r}: cannot create its parent folder: {exc.strerror}") from exc
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise InvalidInputError(f"--out={str(out)!r} cannot be written: no write permission in folder "
                                f"{str(out.parent)!r}")
    return out


def _timestamp() -> str:
    # SOURCE_DATE_EPOCH (reproducible-builds.org) pins the one volatile field, e.g. for the committed example.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (_dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc) if epoch and epoch.isdigit()
            else _dt.datetime.now(_dt.timezone.utc))
    return when.isoformat(timespec="seconds")


def _strip_seconds(cell: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cell.items() if k != "seconds"}


def _run_audit(req: AuditRequest, seed: int) -> dict[str, Any]:
    """Run one audit; a failure to run (bad target, the function raised) is recorded and shown, not raised."""
    entry: dict[str, Any] = {"target": req.label, "algorithm": req.algorithm}
    try:
        from verify.auditing import audit

        if req.library:
            from verify.adapters import load_adapter

            fn, backend = load_adapter(req.library, req.algorithm), "torch"
        else:
            from verify.commands.audit import load_target

            fn, backend = load_target(req.target), req.backend
        options = {"seed": seed, "title": req.label, **req.options}
        entry["result"] = audit(fn, req.algorithm, backend, **options)
    except (ImportError, MetaverifyError) as exc:
        entry["error"] = f"{type(exc).__name__}: {exc}"
    return entry


def build_report(config: ReportConfig, *, progress: Callable[[str], None] | None = None) -> ReportResult:
    """Run the checks of ``config`` and write the report atomically into ``config.out``.

    Returns a :class:`ReportResult` (overall status, counts, file sizes).

    Raises:
        InvalidInputError: bad options or an output folder that must not be replaced.
    """
    from verify.matrix import run_matrix

    t_start = time.perf_counter()
    step = progress or (lambda text: None)
    out = check_output_folder(Path(config.out))
    assets = load_assets()

    matrix = run_matrix(config.algorithms, config.backends, config.dtypes, examples=config.examples,
                        seed=config.seed, progress=step, device=config.device)

    data = _content.ReportData(
        title=config.title, timestamp=_timestamp(), version=_version(), command=list(config.command),
        seed=config.seed, examples=config.examples, quick=config.quick, device=config.device,
        algorithms=list(config.algorithms), backends=list(config.backends), dtypes=list(config.dtypes),
        matrix=matrix, environment={}, katex_version=assets.version)

    differentiable = [a for a in config.algorithms if ALGORITHMS[a].differentiable]
    # --quick: one finite-difference figure, on a meta-loss (MAML's) rather than the base model when possible
    showcase = [a for a in ("maml", *differentiable) if a in differentiable][:1]
    fd_algorithms = showcase if config.quick else differentiable
    for name in differentiable:
        step(f"Taylor test: {name}")
        data.taylor[name] = _guarded(lambda n=name: _numerics().taylor_data(_case(n, config.seed), seed=config.seed))
    for name in fd_algorithms:
        step(f"finite differences: {name}")
        data.fd[name] = _guarded(lambda n=name: _numerics().fd_curves(_case(n, config.seed), seed=config.seed))
    for name in config.algorithms:
        step(f"symbolic derivation: {name}")
        data.symbolic[name] = _formulas.symbolic_derivation(name)
    for req in config.audits:
        step(f"audit: {req.label}")
        data.audits.append(_run_audit(req, config.seed))

    from verify._output import environment

    data.environment = environment(device=config.device)
    step("figures")
    figures = _draw_figures(data)
    data.seconds = time.perf_counter() - t_start

    blocks, toc = _content.build_blocks(data)
    footer = _content.footer(data)
    images = {name: ("image/png", png, round(_figures.png_size(png)[0] * 100 / _figures.PNG_DPI))
              for name, (png, _, _) in figures.items()}
    html = render_html(config.title, blocks, toc, images, assets, footer=footer)
    markdown = render_markdown(config.title, blocks, toc, footer)
    document = _results_document(config, data)
    junit = junit_xml("metaverify report", _junit_cases(data))

    step("writing")
    files = {"index.html": html.encode("utf-8"), "report.md": markdown.encode("utf-8"),
             "results.json": (json.dumps(document, indent=2, allow_nan=False) + "\n").encode("utf-8"),
             "junit.xml": junit.encode("utf-8")}
    for name, (png, svg, raw) in figures.items():
        files[f"figures/{name}.png"] = png
        files[f"figures/{name}.svg"] = svg
        files[f"figures/{name}.json"] = (json.dumps(raw, indent=1, allow_nan=False) + "\n").encode("utf-8")
    _write_atomically(out, files)
    return ReportResult(out, data.status, data.counts(), {k: len(v) for k, v in files.items()},
                        time.perf_counter() - t_start)


def _version() -> str:
    from verify import __version__

    return __version__


def _numerics() -> Any:
    from verify.report import _numerics

    return _numerics


def _case(algorithm: str, seed: int) -> Any:
    return build_case(algorithm, seed=seed * CASE_SEED_STRIDE)


def _guarded(compute: Callable[[], Any]) -> Any:
    """The result, or the error as text: a report-only computation that breaks is shown, not fatal."""
    try:
        return compute()
    except Exception as exc:  # shown in the report as a failed check, with the traceback
        return f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"


def _draw_figures(data: _content.ReportData) -> dict[str, tuple[bytes, bytes, Any]]:
    """name -> (png, svg, raw data); empty (with ``data.figure_note``) when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        data.figure_note = ("not drawn: matplotlib is not installed (pip install 'metaverify[report]'); "
                            "the numbers behind them are in results.json")
        return {}
    out: dict[str, tuple[bytes, bytes, Any]] = {}
    keys = ("algorithm", "backend", "dtype", "status", "worst_error", "tolerance")
    out["heatmap"] = (*_figures.render(_figures.heatmap_figure, data.matrix),
                      [{k: c.to_dict()[k] for k in keys} for c in data.matrix.cells])
    for name, t in data.taylor.items():
        if not isinstance(t, str):
            out[f"taylor-{name}"] = (*_figures.render(_figures.taylor_figure, t), t.to_dict())
    for name, c in data.fd.items():
        if not isinstance(c, str):
            raw = jsonable({**c.__dict__})
            out[f"fd-{name}"] = (*_figures.render(_figures.fd_figure, c), raw)
    for k, a in enumerate(data.audits, 1):
        if "result" in a:
            r = a["result"]
            claimed, reference = getattr(r, "claimed_grads", None), getattr(r, "reference_grads", None)
            out[f"audit-{k}"] = (*_figures.render(_figures.audit_figure, r, claimed, reference),
                                 {"tensors": [t.to_dict() for t in r.tensors]})
    data.figures = set(out)
    return out


def _results_document(config: ReportConfig, data: _content.ReportData) -> dict[str, Any]:
    matrix = data.matrix.to_dict()
    timings = {f"{c['algorithm']}/{c['backend']}/{c['dtype']}": c.get("seconds", 0.0) for c in matrix["cells"]}
    matrix["cells"] = [_strip_seconds(c) for c in matrix["cells"]]
    audits = []
    for a in data.audits:
        if "result" in a:
            d = a["result"].to_dict()
            timings[f"audit:{a['target']}"] = d.pop("seconds", 0.0)
            audits.append({"target": a["target"], **d})
        else:
            audits.append({"target": a["target"], "algorithm": a["algorithm"], "status": "fail",
                           "error": a["error"].splitlines()[0]})
    result = {
        "report": {"title": config.title, "status": data.status, "counts": data.counts(), "quick": config.quick,
                   "algorithms": config.algorithms, "backends": config.backends, "dtypes": config.dtypes,
                   "examples": config.examples, "seed": config.seed, "device": config.device},
        "check": matrix,
        "taylor": [t.to_dict() if not isinstance(t, str) else {"algorithm": a, "status": "fail",
                                                                  "error": t.splitlines()[0]}
                   for a, t in data.taylor.items()],
        "finite_differences": [c.to_dict() if not isinstance(c, str) else {"algorithm": a, "error": c.splitlines()[0]}
                               for a, c in data.fd.items()],
        "symbolic": {a: (s if s is None or "note" in s else {"call": s["call"], "title": s["title"]})
                     for a, s in data.symbolic.items()},
        "audits": audits,
    }
    doc = results_document(config.command[1:], jsonable(result), device=config.device)
    doc["command"] = list(config.command)
    # Everything volatile lives in the one "generated" field, last in the file.
    doc["generated"] = {"timestamp": data.timestamp, "seconds": {"total": round(data.seconds, 3),
                                                                 **{k: round(float(v), 3) for k, v in timings.items()}}}
    return doc


def _junit_cases(data: _content.ReportData) -> list[dict[str, Any]]:
    from verify.commands.check import junit_cases

    cases = junit_cases(data.matrix)
    for name, t in data.taylor.items():
        if isinstance(t, str):
            cases.append({"classname": "metaverify.report.taylor", "name": name, "status": "fail",
                          "message": t.splitlines()[0], "detail": t})
            continue
        for k, r in enumerate(t.results):
            status = r.status if r.status in ("pass", "fail") else "skipped"
            cases.append({"classname": f"metaverify.report.taylor.{name}", "name": f"r{k} rate {r.expected_rate}",
                          "status": status, "message": f"{r.status}: slope {r.slope:.3f}", "detail": r.reason})
    for a in data.audits:
        if "error" in a:
            cases.append({"classname": "metaverify.report.audit", "name": a["target"], "status": "fail",
                          "message": a["error"].splitlines()[0], "detail": a["error"]})
        else:
            cases += a["result"].junit_cases()
    return cases


def _write_atomically(out: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` into a temporary sibling folder, then swap it with ``out``."""
    parent = out.resolve().parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    old: Path | None = None
    try:
        for rel, data in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; a report folder is an ordinary folder
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.rmdir(old)
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old, out)  # put the previous report back
                old = None
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
