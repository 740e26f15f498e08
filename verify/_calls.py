"""Calling audited code: its own output shown once, not on each of the ~140 finite-difference calls."""

from __future__ import annotations

import contextlib
import functools
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["OutputRecord", "print_once"]


@dataclass
class OutputRecord:
    """What the wrapped function printed: on how many calls, after the first, output was held back."""

    calls: int = 0
    quiet_calls_with_output: int = 0

    def note(self) -> str:
        """A one-line note for the report ('' when nothing was held back)."""
        if not self.quiet_calls_with_output:
            return ""
        return (f"the function's own output (print, stdout/stderr) is shown for its first call only; "
                f"{self.quiet_calls_with_output} of the {self.calls - 1} later calls printed too")


def print_once(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` whose stdout/stderr output is shown on the first call and held back on later ones.

    A later call that raises shows its held-back output first (it may explain the error). The
    wrapper keeps ``fn``'s signature (``functools.wraps``), so calling conventions inferred from it
    are unchanged; ``wrapper.output`` is the :class:`OutputRecord`.
    """
    record = OutputRecord()

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        record.calls += 1
        if record.calls == 1:
            return fn(*args, **kwargs)
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                return fn(*args, **kwargs)
        except BaseException:
            print(buf.getvalue(), end="")
            raise
        finally:
            if buf.getvalue():
                record.quiet_calls_with_output += 1

    wrapper.output = record  # type: ignore[attr-defined]
    return wrapper
