"""Machine-readable outputs shared by ``check``, ``audit`` and ``report``.

* JSON results follow one versioned schema (:data:`SCHEMA`, :data:`SCHEMA_VERSION`):
  ``{"schema", "version", "command", "environment", "result", "generated": {"timestamp"}}``.
  Everything except ``generated`` is deterministic for a given seed and
  library versions (the report's byte-identical ``results.json`` relies on it).
* JUnit XML: one ``<testcase>`` per matrix cell / audited tensor, failures
  carrying the full verdict text, for CI dashboards.

Writes are atomic: a temporary file in the same folder, then ``os.replace``,
so a failed run never leaves a half-written file.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from reference.errors import InvalidInputError

SCHEMA = "metaverify.results"
SCHEMA_VERSION = 1


def environment(*, device: str = "cpu") -> dict[str, Any]:
    """Versions of Python and the numerical libraries (optional ones only if installed)."""
    import importlib.metadata as md

    versions: dict[str, Any] = {"python": platform.python_version()}
    for dist in ("numpy", "scipy", "sympy", "torch", "jax", "jaxlib", "hypothesis", "matplotlib"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    try:
        versions["metaverify"] = md.version("metaverify")
    except md.PackageNotFoundError:
        from verify import __version__

        versions["metaverify"] = __version__
    return {"versions": versions, "platform": platform.platform(terse=True), "machine": platform.machine(),
            "device": device}


def results_document(command: list[str], result: dict[str, Any], *, device: str = "cpu") -> dict[str, Any]:
    """Wrap a result dict in the versioned schema."""
    return {
        "schema": SCHEMA,
        "version": SCHEMA_VERSION,
        "command": ["metaverify", *command],
        "environment": environment(device=device),
        "result": result,
        "generated": {"timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
    }


def check_writable(path: str | os.PathLike[str], option: str) -> Path:
    """Fail before any work when ``path`` (the value of ``option``, e.g. ``--json``) cannot be written.

    The file itself is not created; its nearest existing ancestor must be a writable folder (missing
    folders below it are created at write time), and an existing ``path`` must be a writable file.

    Raises:
        InvalidInputError: ``path`` is a folder, lies below a file, or in a folder that cannot be written.
    """
    target = Path(path)
    if str(path) == "":
        raise InvalidInputError(f"{option}={str(path)!r} is empty; give a file path")
    if target.is_dir():
        raise InvalidInputError(f"{option}={str(target)!r} is a directory; give a file path, e.g. "
                                f"{str(target / ('results.xml' if option == '--junit' else 'results.json'))!r}")
    if target.exists() and not os.access(target, os.W_OK):
        raise InvalidInputError(f"{option}={str(target)!r} exists and is not writable; choose another path")
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InvalidInputError(f"{option}={str(target)!r} cannot be created: {str(ancestor)!r} is a file, not a "
                                "folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InvalidInputError(f"{option}={str(target)!r} cannot be written: no write permission in folder "
                                f"{str(ancestor)!r}")
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temp file + rename); parent folders are created."""
    target = Path(path)
    if target.exists() and target.is_dir():
        raise InvalidInputError(f"{str(target)!r} is a directory; give a file path")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInputError(f"cannot create the folder for {str(target)!r}: {exc.strerror}") from exc
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=str(target.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        # mkstemp creates 0600; an output file gets the mode any new file gets (0666 less the umask)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def write_json(path: str | os.PathLike[str], document: dict[str, Any]) -> Path:
    return atomic_write_text(path, json.dumps(document, indent=2, sort_keys=False, allow_nan=False) + "\n")


def junit_xml(suite: str, cases: Iterable[dict[str, Any]]) -> str:
    """A JUnit XML document. Each case: ``name``, ``classname``, ``status``, ``message``, ``detail``, ``seconds``."""
    cases = list(cases)
    failures = sum(c["status"] == "fail" for c in cases)
    skipped = sum(c["status"] not in ("pass", "fail") for c in cases)
    total_time = sum(float(c.get("seconds", 0.0)) for c in cases)
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f"<testsuites name={quoteattr(suite)} tests=\"{len(cases)}\" failures=\"{failures}\" skipped=\"{skipped}\">",
        f"  <testsuite name={quoteattr(suite)} tests=\"{len(cases)}\" failures=\"{failures}\" errors=\"0\" "
        f"skipped=\"{skipped}\" time=\"{total_time:.3f}\">",
    ]
    for c in cases:
        head = (f"    <testcase classname={quoteattr(c['classname'])} name={quoteattr(c['name'])} "
                f"time=\"{float(c.get('seconds', 0.0)):.3f}\"")
        if c["status"] == "pass":
            lines.append(head + "/>")
            continue
        lines.append(head + ">")
        tag = "failure" if c["status"] == "fail" else "skipped"
        lines.append(f"      <{tag} message={quoteattr(c.get('message', c['status']))}>"
                     f"{escape(c.get('detail', ''))}</{tag}>")
        lines.append("    </testcase>")
    lines += ["  </testsuite>", "</testsuites>", ""]
    return "\n".join(lines)


def write_junit(path: str | os.PathLike[str], suite: str, cases: Iterable[dict[str, Any]]) -> Path:
    return atomic_write_text(path, junit_xml(suite, cases))


class Progress:
    """A one-line progress bar on a terminal (stderr); silent when not a TTY."""

    def __init__(self, total: int, *, label: str = "", stream: Any = None, enabled: bool | None = None):
        self.total, self.done, self.label = max(int(total), 1), 0, label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled

    def step(self, text: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        width = 24
        filled = int(width * min(self.done, self.total) / self.total)
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(f"\r{self.label}[{bar}] {self.done}/{self.total} {text[:60]:<60}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 110 + "\r")
            self.stream.flush()


__all__ = ["Progress", "SCHEMA", "SCHEMA_VERSION", "atomic_write_text", "check_writable", "environment", "junit_xml",
           "results_document", "write_json", "write_junit"]
