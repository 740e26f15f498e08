"""A tiny document model rendered twice: to HTML (:mod:`._html`) and to Markdown (:mod:`._markdown`).

The builder assembles the report once as blocks (headings, paragraphs,
display formulas, tables, figures, preformatted text) made of inline runs
(plain text, code, inline math, links, verdict badges). Both renderers walk
the same blocks, so ``index.html`` and ``report.md`` carry the same content,
and every run of plain text is escaped by the renderer (no caller ever writes
raw HTML or Markdown).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Union

__all__ = ["Block", "Code", "Figure", "Heading", "Inline", "Link", "ListBlock", "Math", "MathBlock", "Para", "Pre",
           "Status", "Strong", "Table", "Text", "inline"]


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Strong:
    text: str


@dataclass(frozen=True)
class Code:
    text: str


@dataclass(frozen=True)
class Math:
    """Inline TeX."""

    tex: str


@dataclass(frozen=True)
class Link:
    """``href`` is either ``#anchor`` (inside the report) or a URL the builder wrote (never user text)."""

    text: str
    href: str


@dataclass(frozen=True)
class Status:
    """A verdict badge: ``pass``, ``fail``, ``inconclusive``, ``unsupported``."""

    status: str


Inline = Union[Text, Strong, Code, Math, Link, Status]


def inline(*parts: str | Inline) -> tuple[Inline, ...]:
    """Strings become :class:`Text` runs."""
    return tuple(Text(p) if isinstance(p, str) else p for p in parts)


@dataclass(frozen=True)
class Heading:
    level: int
    text: str
    anchor: str
    status: str | None = None


@dataclass(frozen=True)
class Para:
    parts: tuple[Inline, ...]
    css: str = ""


@dataclass(frozen=True)
class MathBlock:
    """A display formula with an optional one-line label above it."""

    tex: str
    label: str = ""


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[tuple[Inline, ...], ...], ...]
    numeric: tuple[int, ...] = ()  # right-aligned columns

    @staticmethod
    def of(header: Iterable[str], rows: Iterable[Iterable[str | Inline | tuple[Inline, ...]]],
           numeric: Iterable[int] = ()) -> Table:
        def cell(c: str | Inline | tuple[Inline, ...]) -> tuple[Inline, ...]:
            return c if isinstance(c, tuple) else inline(c)

        return Table(tuple(header), tuple(tuple(cell(c) for c in r) for r in rows), tuple(numeric))


@dataclass(frozen=True)
class Figure:
    """A figure written as ``figures/<name>.png`` and ``.svg``; ``alt`` describes it for screen readers."""

    name: str
    caption: tuple[Inline, ...]
    alt: str


@dataclass(frozen=True)
class Pre:
    text: str


@dataclass(frozen=True)
class ListBlock:
    items: tuple[tuple[Inline, ...], ...] = field(default_factory=tuple)


Block = Union[Heading, Para, MathBlock, Table, Figure, Pre, ListBlock]
