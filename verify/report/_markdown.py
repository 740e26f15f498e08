"""``report.md``: the report's content as GitHub/GitLab-flavoured Markdown.

Inline math is ``$...$``, display math a fenced ```` ```math ```` block (both
render on GitHub and GitLab); figures are referenced as files
(``figures/<name>.png``, with a link to the SVG). Plain text is escaped: the
Markdown punctuation gets a backslash and ``<``, ``>``, ``&`` become entities,
so a title or an exception message can neither format the page nor inject
HTML.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from verify.report._document import (Block, Code, Figure, Heading, Inline, Link, ListBlock, Math, MathBlock, Para,
                                     Pre, Status, Strong, Table, Text)

__all__ = ["escape_markdown", "render_markdown"]

# Always special in inline Markdown (GFM); "_" only at a word boundary (intraword "_" never emphasises);
# "!" only before "["; "<", ">", "&" become entities first.
_SPECIAL = re.compile(r"([\\`*\[\]|$~]|(?<!\w)_|_(?!\w)|!(?=\[))")
# At the start of a block only: an ATX heading "# ", a list item "- " / "+ " / "1. " / "1) ", a thematic
# break "---". (Block quotes and HTML need "<" or ">", already entities; "*" and "_" are always escaped.)
_LINE_START = re.compile(r"^(#{1,6}(?=\s|$)|[-+](?=[\s-]|$)|\d{1,9}(?=[.)](?:\s|$)))")
_BADGE = {"pass": "✅ pass", "fail": "❌ FAIL", "inconclusive": "⚠️ inconclusive", "unsupported": "⏭️ unsupported"}


def escape_markdown(text: str, *, block_start: bool = True) -> str:
    """Escape ``text`` so that Markdown renders it literally, on one line.

    Line breaks become spaces. With ``block_start`` (the text begins a
    paragraph, list item or heading) leading blanks are dropped, since four of
    them would start a code block (HTML collapses them anyway), and a leading
    list, heading or rule marker is escaped.
    """
    text = " ".join(text.splitlines())
    if block_start:
        text = text.lstrip()
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = _SPECIAL.sub(r"\\\1", text)
    if not block_start:
        return text
    return _LINE_START.sub(lambda m: (m[1] + "\\") if m[1][0].isdigit() else ("\\" + m[1]), text, count=1)


def _code(text: str, in_table: bool = False) -> str:
    text = " ".join(text.splitlines())
    if in_table:  # GFM splits table cells at "|" even inside code spans, unless escaped
        text = text.replace("|", "\\|")
    run = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * (run + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or run else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _math_inline(tex: str) -> str:
    # GitHub needs no space right inside the dollars; "|" would split a table cell.
    return "$" + " ".join(tex.split()).replace("|", r"\vert ") + "$"


def _inline(parts: Sequence[Inline], in_table: bool = False) -> str:
    out = []
    for i, p in enumerate(parts):
        start = i == 0 and not in_table
        if isinstance(p, Text):
            out.append(escape_markdown(p.text, block_start=start))
        elif isinstance(p, Strong):
            # "**x **" does not close in CommonMark: keep the delimiters tight, the blanks outside
            core = p.text.strip()
            if core:
                lead = " " if p.text[:1].isspace() and not start else ""
                trail = " " if p.text[-1:].isspace() else ""
                out.append(f"{lead}**{escape_markdown(core, block_start=start)}**{trail}")
        elif isinstance(p, Code):
            out.append(_code(p.text, in_table))
        elif isinstance(p, Math):
            out.append(_math_inline(p.tex))
        elif isinstance(p, Link):
            out.append(f"[{escape_markdown(p.text)}]({p.href})")
        elif isinstance(p, Status):
            out.append(_BADGE.get(p.status, escape_markdown(p.status)))
        else:  # pragma: no cover
            raise TypeError(f"unknown inline run {p!r}")
    return "".join(out)


def _fence(text: str, info: str = "") -> str:
    run = max((len(m) for m in re.findall(r"`{3,}", text)), default=2)
    fence = "`" * (run + 1)
    return f"{fence}{info}\n{text.rstrip()}\n{fence}"


def _block(b: Block) -> str:
    if isinstance(b, Heading):
        badge = f" {_BADGE.get(b.status, '')}" if b.status else ""
        return f'<a id="{b.anchor}"></a>\n\n{"#" * b.level} {escape_markdown(b.text)}{badge}'
    if isinstance(b, Para):
        return _inline(b.parts)
    if isinstance(b, MathBlock):
        label = f"{escape_markdown(b.label)}\n\n" if b.label else ""
        return label + _fence(b.tex, "math")
    if isinstance(b, Table):
        head = "| " + " | ".join(escape_markdown(h) for h in b.header) + " |"
        sep = "|" + "|".join("---:" if i in b.numeric else "---" for i in range(len(b.header))) + "|"
        rows = ["| " + " | ".join(_inline(c, in_table=True) or " " for c in r) + " |" for r in b.rows]
        return "\n".join([head, sep, *rows])
    if isinstance(b, Figure):
        return (f"![{escape_markdown(b.alt)}](figures/{b.name}.png)\n\n*{_inline(b.caption)}* "
                f"([SVG](figures/{b.name}.svg))")
    if isinstance(b, Pre):
        return _fence(b.text, "text")
    if isinstance(b, ListBlock):
        return "\n".join(f"- {_inline(i)}" for i in b.items)
    raise TypeError(f"unknown block {b!r}")  # pragma: no cover


def render_markdown(title: str, blocks: Sequence[Block], toc: Sequence[tuple[str, str]],
                    footer: Sequence[Inline] = ()) -> str:
    """The whole Markdown document."""
    out = []
    for b in blocks:
        if isinstance(b, Heading) and b.anchor == "contents":
            out.append("**Contents**\n\n" + "\n".join(f"- [{escape_markdown(t)}](#{a})" for a, t in toc))
            continue
        out.append(_block(b))
    if footer:
        out.append("---\n\n" + _inline(footer))
    return "\n\n".join(out) + "\n"
