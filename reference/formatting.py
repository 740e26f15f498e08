"""One way to write numbers and values into messages (the reference's, the engine's, the audit's).

* :func:`short` is ``repr`` for messages: NumPy scalars read as the Python
  numbers they hold (``0.5``, not ``np.float64(0.5)``), everything cut at
  ``limit`` characters;
* :func:`number` writes a float with 6 significant digits, in scientific
  notation below ``1e-3``;
* :func:`article` puts "a" or "an" before a word ("an int", "a list").

It lives in :mod:`reference` because every package may import the reference
and the reference imports nothing of metaverify's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["article", "number", "short"]


def short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for a message: NumPy scalars as Python numbers, cut to ``limit`` characters."""
    if isinstance(value, np.generic) and not isinstance(value, (np.str_, np.bytes_, np.void)):
        value = value.item()
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def number(x: float) -> str:
    """A float with 6 significant digits (``1.5``, ``0.00123``), scientific below ``1e-3`` (``1.234e-05``)."""
    x = float(x)
    return f"{x:.6g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.3e}"


def article(word: str) -> str:
    """``"an int"``, ``"a list"``: the indefinite article by the first letter's sound (vowel letters)."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"
