"""Assemble the report's content (a list of :mod:`._document` blocks) from what the builder computed.

The same blocks are rendered to ``index.html`` and ``report.md``; figures are
referenced by name (``figures/<name>.png|svg``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from verify._verdict import combine_statuses
from verify.algorithms import ALGORITHMS
from verify.report._document import (Block, Code, Figure, Heading, Inline, Link, ListBlock, Math, MathBlock, Para,
                                     Pre, Status, Strong, Table, inline)
from verify.report._formulas import ENGINE_FORMULAS, NOTATION, TEXTS

__all__ = ["ReportData", "build_blocks", "fmt"]

UNSUPPORTED = "unsupported"


def fmt(x: Any) -> str:
    """A float in the report's short scientific format."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(f):
        return "-"
    if math.isinf(f):
        return "inf"
    return f"{f:.2e}"


def _ratio(error: float, tol: float) -> float:
    if math.isnan(error):
        return math.inf
    if tol > 0:
        return error / tol
    return math.inf if error > 0 else 0.0


def cell_error(cell: Any) -> tuple[float, float]:
    """``(error, tolerance)`` of the cell's worst relative-error check, over all its problems.

    Taylor-rate checks (``kind == "rate"``: a slope deficit, not a relative
    error) are left out, so the figure is always a relative error. NaN when the
    cell has no such check.
    """
    best: tuple[float, float] | None = None
    for case in getattr(cell, "cases", ()):
        for k in case.checks:
            if k.get("kind", "error") == "rate":
                continue
            e, t = float(k["error"]), float(k["tolerance"])
            if best is None or _ratio(e, t) > _ratio(*best):
                best = (e, t)
    return best if best is not None else (math.nan, math.nan)


@dataclass
class ReportData:
    """Everything the content needs; filled by :mod:`._build`."""

    title: str
    timestamp: str
    version: str
    command: list[str]
    seed: int
    examples: int
    quick: bool
    device: str
    algorithms: list[str]
    backends: list[str]
    dtypes: list[str]
    matrix: Any  # verify.matrix.MatrixResult
    environment: dict[str, Any]
    katex_version: str
    taylor: dict[str, Any] = field(default_factory=dict)  # algorithm -> TaylorData | error text
    fd: dict[str, Any] = field(default_factory=dict)  # algorithm -> FDCurves | error text
    symbolic: dict[str, dict[str, str] | None] = field(default_factory=dict)
    audits: list[dict[str, Any]] = field(default_factory=list)  # {"target", "result" | "error", "figure"}
    figures: set[str] = field(default_factory=set)  # names actually drawn
    figure_note: str = ""  # why figures are missing (matplotlib not installed)
    seconds: float = 0.0

    # -- verdicts -------------------------------------------------------------

    def taylor_status(self, algorithm: str) -> str | None:
        t = self.taylor.get(algorithm)
        if t is None:
            return None
        return "fail" if isinstance(t, str) else t.status

    def algorithm_status(self, algorithm: str) -> str:
        statuses = [c.status for c in self.matrix.cells if c.algorithm == algorithm and c.status != UNSUPPORTED]
        t = self.taylor_status(algorithm)
        if t:
            statuses.append(t)
        if not statuses:
            return UNSUPPORTED
        return combine_statuses(statuses)

    def audit_statuses(self) -> list[str]:
        return ["fail" if "error" in a else a["result"].status for a in self.audits]

    @property
    def status(self) -> str:
        ran = [c.status for c in self.matrix.cells if c.status != UNSUPPORTED]
        ran += [s for a in self.algorithms if (s := self.taylor_status(a))]
        ran += self.audit_statuses()
        return combine_statuses(ran) if ran else "inconclusive"

    def counts(self) -> dict[str, dict[str, int]]:
        states = ("pass", "fail", "inconclusive", UNSUPPORTED)
        cells = [c.status for c in self.matrix.cells]
        taylor = [s for a in self.algorithms if (s := self.taylor_status(a))]
        audits = self.audit_statuses()
        return {name: {s: items.count(s) for s in states}
                for name, items in (("cells", cells), ("taylor", taylor), ("audits", audits))}


def _anchor(algorithm: str) -> str:
    return f"alg-{algorithm}"


def _counts_text(c: dict[str, int], noun: str) -> str:
    total = sum(c.values())
    parts = [f"{c['pass']} passed", f"{c['fail']} failed", f"{c['inconclusive']} inconclusive"]
    if c.get(UNSUPPORTED):
        parts.append(f"{c[UNSUPPORTED]} unsupported")
    return f"{', '.join(parts)} ({total} {noun}{'' if total == 1 else 's'})"


def _figure(data: ReportData, name: str, caption: Sequence[str | Inline], alt: str) -> list[Block]:
    if name not in data.figures:
        return []
    return [Figure(name, inline(*caption), alt)]


# ---------------------------------------------------------------------------
# sections


def _header(data: ReportData) -> list[Block]:
    blocks: list[Block] = [Heading(1, data.title, "top", data.status)]
    scope = (f"{len(data.algorithms)} algorithm(s) x backends {', '.join(data.backends)} x "
             f"{', '.join(data.dtypes)}; {data.examples} random problem(s) per cell; seed {data.seed}"
             + ("; quick mode" if data.quick else ""))
    blocks.append(Para(inline(f"Generated {data.timestamp} by metaverify {data.version}. ", scope, "."),
                       css="subtitle"))
    counts = data.counts()
    parts: list[str | Inline] = [Strong("Overall: "), Status(data.status), " ",
                                 "Check matrix: " + _counts_text(counts["cells"], "cell") + ". "]
    if data.taylor:
        parts.append("Taylor tests of the reference: " + _counts_text(counts["taylor"], "algorithm") + ". ")
    if data.audits:
        parts.append("Audits: " + _counts_text(counts["audits"], "audit") + ".")
    blocks.append(Para(inline(*parts), css="summary"))
    attention = []
    for c in data.matrix.cells:
        if c.status == "pass":
            continue
        bad = [f"{k['check']}: {k['status']} (error {fmt(k['error'])}, tolerance {fmt(k['tolerance'])})"
               for case in c.cases for k in case.checks if k["status"] != "pass"]
        what = (c.note.splitlines()[0] if c.note else "") if c.status == UNSUPPORTED else "; ".join(bad[:3])
        attention.append(inline(Status(c.status), " ", Link(f"{c.algorithm} / {c.backend} / {c.dtype}",
                                                              "#" + _anchor(c.algorithm)), ": " + what))
    for a in data.algorithms:
        t = data.taylor.get(a)
        if t is not None and (isinstance(t, str) or t.status != "pass"):
            why = t if isinstance(t, str) else "; ".join(r.reason for r in t.results if r.status != "pass")
            attention.append(inline(Status(data.taylor_status(a) or "fail"), " ",
                                    Link(f"{a}: Taylor test", "#" + _anchor(a)), ": " + why))
    for k, a in enumerate(data.audits):
        if "error" in a or a["result"].status != "pass":
            text = a["error"].splitlines()[0] if "error" in a else a["result"].headline()
            attention.append(inline(Status("fail"), " ", Link(f"audit of {a['target']}", f"#audit-{k + 1}"),
                                    ": " + text))
    if attention:
        blocks.append(Heading(3, "Needs attention", "attention"))
        blocks.append(ListBlock(tuple(attention)))
    else:
        blocks.append(Para(inline("Every check that ran passed: each meta-gradient agrees with the analytic "
                                  "reference and with finite differences within its tolerance, and every "
                                  "Taylor remainder converges at its expected rate.")))
    blocks += _figure(data, "heatmap", [
        "Every cell of the check matrix: the worst relative error over its problems (text) and that error "
        "divided by the cell's tolerance (colour, log scale: green is far below the tolerance, red above; "
        "grey: not run)."], "heatmap of worst errors by algorithm, backend and dtype")
    if data.figure_note:
        blocks.append(Para(inline(Strong("Figures: "), data.figure_note)))
    blocks.append(Heading(2, "Contents", "contents"))
    return blocks


def _methods(data: ReportData) -> list[Block]:
    from verify.tolerance import tolerance

    blocks: list[Block] = [Heading(2, "How the checks work", "methods")]
    blocks.append(Para(inline(
        "Each cell of the matrix runs seeded random problems of one algorithm on one backend and precision. "
        "The NumPy reference (float64) is checked against directional derivatives of its own meta-loss in "
        "random directions (complex step where the reference is analytic, Richardson extrapolation otherwise). "
        "A PyTorch or JAX backend is compared with the reference (meta-loss and meta-gradient, normwise "
        "relative error, the worst entry located), and in float64 also, independently, with directional "
        "derivatives of the reference meta-loss, so that a disagreement says which side is wrong. float32 "
        "cells use float32's tolerance, scaled by a condition estimate: how much the float64 reference "
        "gradient moves when its inputs are rounded to float32.")))
    blocks.append(Heading(3, "Notation", "notation"))
    blocks += [MathBlock(tex, label) for label, tex in NOTATION]
    blocks.append(Heading(3, "Estimators and verdicts", "estimators"))
    blocks += [MathBlock(tex, label) for label, tex in ENGINE_FORMULAS]
    rows = []
    for kind, what in (("gradient", "claimed gradient against directional derivatives, relative to ||g|| ||v||"),
                       ("reference_match", "backend against reference, normwise relative"),
                       ("roundoff", "Taylor remainders below this (relative to their magnitudes) are round-off")):
        rows.append((Code(kind), fmt(tolerance("float64", kind)), fmt(tolerance("float32", kind)), what))
    blocks.append(Para(inline("The tolerances (", Code("verify.tolerance"), "; all derived from the machine "
                              "epsilon of the precision):")))
    blocks.append(Table.of(("kind", "float64", "float32", "meaning"), rows, numeric=(1, 2)))
    first = next((a for a in data.algorithms if a in data.fd and not isinstance(data.fd[a], str)), None)
    if first:
        c = data.fd[first]
        blocks.append(Heading(3, "Finite differences against step size", "fd"))
        blocks.append(Para(inline(
            f"Why the checks use the complex step and Richardson extrapolation: the relative error of three "
            f"estimates of a directional derivative of {first}'s reference meta-loss, against the exact value "
            f"from the analytic gradient ({fmt(c.exact)}). A central difference loses to truncation for large "
            f"steps and to round-off for small ones (the V); Richardson extrapolation removes the truncation "
            f"terms; the complex step has no subtraction and stays at machine precision down to tiny steps.")))
        blocks += _figure(data, f"fd-{first}", [_fd_caption(c)], f"finite-difference error against step for {first}")
    return blocks


def _fd_caption(c: Any) -> str:
    parts = []
    for m, label in (("central", "central difference"), ("richardson", "Richardson"), ("complex", "complex step")):
        step, err = c.best(m)
        if math.isfinite(err):
            d = c.defaults.get(m)
            at_default = f"; at the default step {fmt(d['step'])}: {fmt(d['error'])}" if d else ""
            parts.append(f"{label} best {fmt(err)} at t = {fmt(step)}{at_default}")
        else:
            parts.append(f"{label}: the reference does not take complex input")
    return f"{c.algorithm}, problem: {c.problem}. Stars: the steps the engine picks by default. " + "; ".join(parts) + "."


def _check_rows(cells: Sequence[Any]) -> list[tuple[Any, ...]]:
    """One row per (backend, dtype, check): the worst over the cell's problems."""
    rows = []
    for c in cells:
        if c.status == UNSUPPORTED:
            rows.append((c.backend, c.dtype, "-", inline(Status(UNSUPPORTED)), "-", "-", c.note.splitlines()[0]
                         if c.note else ""))
            continue
        worst: dict[str, dict[str, Any]] = {}
        for case in c.cases:
            for k in case.checks:
                ratio = _ratio(float(k["error"]), float(k["tolerance"]))
                prev = worst.get(k["check"])
                if prev is None or ratio > prev["_ratio"] or (k["status"] != "pass" and prev["status"] == "pass"):
                    worst[k["check"]] = dict(k, _ratio=ratio)
        for name, k in worst.items():
            detail = str(k.get("detail", "")).strip().splitlines()
            if k.get("kind") == "rate":  # a slope deficit against the allowed deficit, not a relative error
                err, tol = f"deficit {float(k['error']):.2f}", f"{float(k['tolerance']):.2f}"
            else:
                err, tol = fmt(k["error"]), fmt(k["tolerance"])
            rows.append((c.backend, c.dtype, name, inline(Status(k["status"])), err, tol, detail[0] if detail else ""))
    return rows


def _failure_text(cells: Sequence[Any]) -> str:
    out = []
    for c in cells:
        for r in c.cases:
            if r.status == "pass":
                continue
            out.append(f"{c.algorithm} / {c.backend} / {c.dtype}: {r.status.upper()}: {r.description}")
            for k in r.checks:
                if k["status"] != "pass":
                    out.append(f"  {k['check']}: {k['status']} error={fmt(k['error'])} tol={fmt(k['tolerance'])}")
                    out += ["    " + line for line in str(k["detail"]).splitlines()]
    return "\n".join(out)


def _algorithm(data: ReportData, name: str) -> list[Block]:
    spec = ALGORITHMS[name]
    text = TEXTS.get(name)
    title = f"{text.title} · {name}" if text else name
    blocks: list[Block] = [Heading(2, title, _anchor(name), data.algorithm_status(name))]
    if text:
        cite: list[str | Inline] = [Strong("Paper: "), text.paper]
        if text.arxiv:
            cite += [" (", Link(f"arXiv:{text.arxiv}", f"https://arxiv.org/abs/{text.arxiv}"), ")"]
        blocks.append(Para(inline(*cite, ". ", text.summary)))
        blocks.append(Heading(3, "Meta-objective" if name != "mlp" else "Model and loss", f"{name}-objective"))
        blocks += [MathBlock(tex, label) for label, tex in text.objective]
        heading = ("Gradient and Hessian-vector product" if name == "mlp" else
                   "Meta-gradient" if spec.differentiable else "Direction")
        blocks.append(Heading(3, heading, f"{name}-gradient"))
        blocks += [MathBlock(tex, label) for label, tex in text.gradient]
    else:
        blocks.append(Para(inline(Strong("Paper: "), spec.paper)))
    sym = data.symbolic.get(name)
    if sym:
        blocks.append(Heading(3, "Exact derivation on a toy problem (SymPy)", f"{name}-symbolic"))
        if "note" in sym:
            blocks.append(Para(inline("No symbolic derivation: ", sym["note"])))
        else:
            blocks.append(Para(inline(Strong(sym["title"] + ". "), sym["summary"], " Computed by ",
                                      Code(sym["call"]), ".")))
            blocks.append(MathBlock(sym["latex"]))

    cells = [c for c in data.matrix.cells if c.algorithm == name]
    blocks.append(Heading(3, "Checks", f"{name}-checks"))
    if cells:
        first = next((case for c in cells for case in c.cases), None)
        if first is not None:
            blocks.append(Para(inline(Strong("First problem: "), Code(first.description))))
        blocks.append(Table.of(
            ("backend", "dtype", "verdict", "worst error", "tolerance", "problems", "time"),
            [(c.backend, c.dtype, inline(Status(c.status)), fmt(cell_error(c)[0]), fmt(cell_error(c)[1]),
              str(len(c.cases)), f"{c.seconds:.1f} s") for c in cells],
            numeric=(3, 4, 5, 6)))
        blocks.append(Para(inline("Every check, worst over the problems of its cell:")))
        blocks.append(Table.of(("backend", "dtype", "check", "verdict", "error", "tolerance", "detail"),
                               _check_rows(cells), numeric=(4, 5)))
        failures = _failure_text(cells)
        if failures:
            blocks.append(Para(inline(Strong("Failures and inconclusive checks in full:"))))
            blocks.append(Pre(failures))
    else:
        blocks.append(Para(inline("Not in the check matrix of this report.")))

    t = data.taylor.get(name)
    if not spec.differentiable:
        blocks.append(Para(inline(Strong("Taylor test: "), f"not applicable: {name}'s direction is defined, not the "
                                  "gradient of a loss, so its remainder would not converge at rate 2 by design.")))
    elif isinstance(t, str):
        blocks.append(Heading(3, "Taylor test", f"{name}-taylor", "fail"))
        blocks.append(Pre(t))
    elif t is not None:
        blocks.append(Heading(3, "Taylor test", f"{name}-taylor", t.status))
        blocks.append(Para(inline(
            "The remainders of the reference meta-loss along a random unit direction, with no derivative, with "
            "the reference meta-gradient, and with the gradient and the Hessian-vector product (", t.hvp_method,
            "), must shrink at rates 1, 2 and 3; a wrong gradient would leave rate 1 in ", Math("r_1"), ".")))
        blocks += _figure(data, f"taylor-{name}", [
            f"Taylor remainders of {name}'s meta-loss. Filled markers: the steps the slope was fitted on (above "
            "the round-off floor, in the asymptotic range); dashed: the expected slopes through the fitted points."],
            f"Taylor remainder plot for {name}")
        blocks.append(Table.of(("remainder", "expected rate", "fitted slope", "verdict", "why"), [
            (inline(Math(f"r_{k}")), str(r.expected_rate), f"{r.slope:.3f}" if math.isfinite(r.slope) else "-",
             inline(Status(r.status)), r.reason) for k, r in enumerate(t.results)], numeric=(1, 2)))
    fd = data.fd.get(name)
    first_fd = next((a for a in data.algorithms if a in data.fd and not isinstance(data.fd[a], str)), None)
    if isinstance(fd, str):
        blocks.append(Para(inline(Strong("Finite-difference curves failed: "), fd)))
    elif fd is not None and name != first_fd:
        blocks.append(Heading(3, "Finite differences against step size", f"{name}-fd"))
        blocks += _figure(data, f"fd-{name}", [_fd_caption(fd)], f"finite-difference error against step for {name}")
    elif fd is not None:
        blocks.append(Para(inline("Finite differences against step size for this problem: ",
                                  Link("see How the checks work", "#fd"), ".")))
    return blocks


def _audits(data: ReportData) -> list[Block]:
    if not data.audits:
        return []
    blocks: list[Block] = [Heading(2, "Audits", "audits")]
    for k, a in enumerate(data.audits, 1):
        anchor = f"audit-{k}"
        if "error" in a:
            blocks.append(Heading(3, f"Audit {k}: {a['target']} · {a['algorithm']}", anchor, "fail"))
            blocks.append(Para(inline("The audit could not run:")))
            blocks.append(Pre(a["error"]))
            continue
        r = a["result"]
        blocks.append(Heading(3, f"Audit {k}: {a['target']} · {r.algorithm}, {r.backend}", anchor, r.status))
        blocks.append(Para(inline(Strong(r.headline()))))
        blocks.append(Para(inline(Strong("Problem: "), Code(r.problem))))
        blocks.append(Para(inline(Strong("Tolerance: "), f"{fmt(r.tolerance)} relative ({r.tolerance_reason}).")))
        if r.loss:
            L = r.loss
            blocks.append(Para(inline(Strong("Meta-loss: "), f"reference {L['reference']!r}, got {L['got']!r}, "
                                      f"relative error {fmt(L['error'])} ", Status(L["status"]))))
        blocks.append(Table.of(("tensor", "shape", "verdict", "worst error", "at", "reference", "claimed"), [
            (t.name, str(list(t.shape)), inline(Status(t.status)), fmt(t.error), t.where, f"{t.reference:.10g}",
             f"{t.got:.10g}" + (" (no gradient)" if t.missing else "")) for t in r.tensors], numeric=(3, 5, 6)))
        if r.independent:
            ind = r.independent
            blocks.append(Para(inline(Strong("Against finite differences of its own meta-loss "),
                                      f"({ind['method']}): ", Status(ind["status"]), " ",
                                      f"error {fmt(ind['error'])}, tolerance {fmt(ind['tolerance'])}: {ind['reason']}")))
        if r.which_side:
            blocks.append(Para(inline(Strong("Verdict: "), r.which_side)))
        if r.status != "pass":
            diagnosis = str(r.diagnosis) if r.diagnosis is not None else (
                "unexplained mismatch (no variant of the diagnosis catalogue matches within the tolerance)")
            blocks.append(Para(inline(Strong("Diagnosis:"))))
            blocks.append(Pre(diagnosis))
        blocks += _figure(data, f"audit-{k}", [
            f"Audit {k}: the claimed gradient against the reference, per tensor."], f"audit {k} gradient comparison")
        for note in r.notes:
            blocks.append(Para(inline(Strong("Note: "), note)))
    return blocks


def _environment(data: ReportData) -> list[Block]:
    env = data.environment
    blocks: list[Block] = [Heading(2, "Environment and reproduction", "environment")]
    rows = [(k, str(v) if v is not None else "not installed") for k, v in env.get("versions", {}).items()]
    rows += [("platform", str(env.get("platform", ""))), ("machine", str(env.get("machine", ""))),
             ("device", data.device), ("dtypes", ", ".join(data.dtypes)), ("math renderer", f"KaTeX {data.katex_version}")]
    blocks.append(Table.of(("component", "version / value"), rows))
    blocks.append(Para(inline(
        Strong("Seeds: "), f"matrix seed {data.seed}; problem k of every cell is built by ",
        Code(f"verify.algorithms.build_case(algorithm, seed={data.seed} * 1000003 + k)"),
        "; the Taylor tests and finite-difference curves use problem 0 and a unit direction drawn from ",
        Code(f"numpy.random.default_rng([{data.seed}, 0x7A9])"), ".")))
    blocks.append(Para(inline(Strong("Reproduce this report:"))))
    blocks.append(Pre(" ".join(_quote(a) for a in data.command)))
    blocks.append(Para(inline("(or ", Code("python -m verify " + " ".join(_quote(a) for a in data.command[1:])),
                              " from a source checkout). Same seed and library versions give a byte-identical ",
                              Code("results.json"), " except its ", Code("generated"), " field (timestamp and "
                              "timings).")))
    blocks.append(Para(inline(Strong("Files: "), Code("index.html"), " (this page, self-contained), ",
                              Code("report.md"), ", ", Code("results.json"), " (schema ", Code("metaverify.results"),
                              "), ", Code("junit.xml"), ", ", Code("figures/"), " (PNG, SVG and the data behind "
                              "each figure as JSON).")))
    return blocks


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def build_blocks(data: ReportData) -> tuple[list[Block], list[tuple[str, str]]]:
    """The report's blocks and its table of contents."""
    blocks = _header(data)
    toc = [("methods", "How the checks work")]
    blocks += _methods(data)
    for name in data.algorithms:
        text = TEXTS.get(name)
        toc.append((_anchor(name), text.title if text else name))
        blocks += _algorithm(data, name)
    if data.audits:
        toc.append(("audits", "Audits"))
        blocks += _audits(data)
    toc.append(("environment", "Environment and reproduction"))
    blocks += _environment(data)
    return blocks, toc


def footer(data: ReportData) -> tuple[Inline, ...]:
    return inline(f"metaverify {data.version} · results.json schema metaverify.results · math typeset offline by "
                  f"KaTeX {data.katex_version} (MIT licence) · {data.seconds:.1f} s")
