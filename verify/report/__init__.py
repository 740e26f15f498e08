"""``metaverify report``: an offline HTML report with typeset math and plots, plus Markdown, JSON and JUnit.

:func:`build_report` runs the check matrix, the Taylor tests and
finite-difference curves of the reference, the SymPy toy derivations and any
audits, and writes ``index.html`` (self-contained: KaTeX, fonts and figures
inlined, no network), ``report.md``, ``results.json``, ``junit.xml`` and
``figures/`` atomically into one folder. See ``docs/report.md``.
"""

from __future__ import annotations

from verify.report._build import AuditRequest, ReportConfig, ReportResult, build_report

__all__ = ["AuditRequest", "ReportConfig", "ReportResult", "build_report"]
