"""``index.html``: one self-contained page (KaTeX, fonts and figures inlined; no network, no other script).

Every run of text goes through :func:`html.escape`; TeX goes into the text of
``<span class="math">`` / ``<div class="math">`` elements (escaped too; the
browser unescapes it into ``textContent`` which KaTeX reads). Figures are
``<img>`` elements with ``data:`` URIs (an SVG shown through ``<img>`` cannot
run script either).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from html import escape

from verify.report._document import (Block, Code, Figure, Heading, Inline, Link, ListBlock, Math, MathBlock, Para,
                                     Pre, Status, Strong, Table, Text)
from verify.report._katex import RENDER_SCRIPT, KatexAssets, content_security_policy

__all__ = ["STYLE", "render_html"]

STYLE = """
:root { --fg: #1d2330; --muted: #5b6474; --line: #d9dee7; --bg: #ffffff; --panel: #f6f8fb;
        --pass: #1a7f37; --fail: #c62828; --inconclusive: #9a6700; --unsupported: #6e7781; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
       font: 15px/1.55 -apple-system, "Segoe UI", "Helvetica Neue", Arial, "DejaVu Sans", sans-serif; }
main { max-width: 1040px; margin: 0 auto; padding: 28px 28px 80px; }
h1 { font-size: 28px; margin: 0 0 4px; line-height: 1.25; }
h2 { font-size: 22px; margin: 40px 0 10px; padding-top: 10px; border-top: 1px solid var(--line); }
h3 { font-size: 17px; margin: 24px 0 8px; }
h4 { font-size: 15px; margin: 18px 0 6px; color: var(--muted); }
p { margin: 8px 0; }
a { color: #0b5cad; text-decoration: none; } a:hover { text-decoration: underline; }
code, pre { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 13px; }
code { background: var(--panel); padding: 1px 4px; border-radius: 4px; overflow-wrap: anywhere; }
pre { background: var(--panel); border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px;
      overflow-x: auto; white-space: pre-wrap; word-break: break-word; }
table { border-collapse: collapse; margin: 10px 0 14px; font-size: 13.5px; width: auto; max-width: 100%; }
.table-wrap { overflow-x: auto; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 10px; text-align: left; vertical-align: top; }
th { background: var(--panel); font-weight: 600; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.badge { display: inline-block; padding: 0 8px; border-radius: 10px; font-size: 12px; font-weight: 600;
         line-height: 20px; color: #fff; text-transform: uppercase; letter-spacing: .03em; white-space: nowrap; }
.badge.pass { background: var(--pass); } .badge.fail { background: var(--fail); }
.badge.inconclusive { background: var(--inconclusive); } .badge.unsupported { background: var(--unsupported); }
h1 .badge, h2 .badge, h3 .badge { vertical-align: middle; margin-left: 8px; }
.subtitle { color: var(--muted); margin: 0 0 18px; }
.summary { font-size: 16px; }
.formula { margin: 10px 0 14px; }
.formula .label { color: var(--muted); font-size: 13.5px; margin-bottom: 2px; }
div.math { overflow-x: auto; overflow-y: hidden; padding: 4px 0; }
.math-error { color: var(--fail); font-family: monospace; }
figure { margin: 14px 0 20px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
figcaption { color: var(--muted); font-size: 13.5px; margin-top: 6px; }
nav.toc { background: var(--panel); border: 1px solid var(--line); border-radius: 6px; padding: 8px 16px;
          margin: 14px 0; columns: 2; font-size: 14px; }
nav.toc ul { margin: 4px 0; padding-left: 18px; }
ul.plain { padding-left: 20px; }
footer { color: var(--muted); font-size: 12.5px; margin-top: 48px; border-top: 1px solid var(--line);
         padding-top: 10px; }
""".strip()


def _inline(parts: Sequence[Inline]) -> str:
    out = []
    for p in parts:
        if isinstance(p, Text):
            out.append(escape(p.text))
        elif isinstance(p, Strong):
            out.append(f"<strong>{escape(p.text)}</strong>")
        elif isinstance(p, Code):
            out.append(f"<code>{escape(p.text)}</code>")
        elif isinstance(p, Math):
            out.append(f'<span class="math">{escape(p.tex)}</span>')
        elif isinstance(p, Link):
            out.append(f'<a href="{escape(p.href, quote=True)}">{escape(p.text)}</a>')
        elif isinstance(p, Status):
            out.append(f'<span class="badge {escape(p.status, quote=True)}">{escape(p.status)}</span>')
        else:  # pragma: no cover - the model is closed
            raise TypeError(f"unknown inline run {p!r}")
    return "".join(out)


def _block(b: Block, images: Mapping[str, tuple[str, bytes, int]]) -> str:
    if isinstance(b, Heading):
        badge = _inline([Status(b.status)]) if b.status else ""
        return f'<h{b.level} id="{escape(b.anchor, quote=True)}">{escape(b.text)}{badge}</h{b.level}>'
    if isinstance(b, Para):
        css = f' class="{escape(b.css, quote=True)}"' if b.css else ""
        return f"<p{css}>{_inline(b.parts)}</p>"
    if isinstance(b, MathBlock):
        label = f'<div class="label">{escape(b.label)}</div>' if b.label else ""
        return f'<div class="formula">{label}<div class="math">{escape(b.tex)}</div></div>'
    if isinstance(b, Table):
        head = "".join(f"<th>{escape(h)}</th>" for h in b.header)
        rows = []
        for r in b.rows:
            cells = "".join(f'<td class="num">{_inline(c)}</td>' if i in b.numeric else f"<td>{_inline(c)}</td>"
                            for i, c in enumerate(r))
            rows.append(f"<tr>{cells}</tr>")
        return (f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead><tbody>\n' + "\n".join(rows)
                + "\n</tbody></table></div>")
    if isinstance(b, Figure):
        mime, data, width = images[b.name]
        src = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
        return (f'<figure id="fig-{escape(b.name, quote=True)}"><img src="{src}" width="{int(width)}" '
                f'alt="{escape(b.alt, quote=True)}"><figcaption>{_inline(b.caption)}</figcaption></figure>')
    if isinstance(b, Pre):
        return f"<pre>{escape(b.text)}</pre>"
    if isinstance(b, ListBlock):
        return '<ul class="plain">' + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>"
    raise TypeError(f"unknown block {b!r}")  # pragma: no cover


def render_html(
    title: str,
    blocks: Sequence[Block],
    toc: Sequence[tuple[str, str]],
    images: Mapping[str, tuple[str, bytes, int]],
    assets: KatexAssets,
    *,
    footer: Sequence[Inline] = (),
) -> str:
    """The page.

    ``toc``: ``(anchor, text)`` entries, placed where the heading with anchor ``contents`` is;
    ``images``: figure name -> ``(mime type, bytes, display width in CSS pixels)``.
    """
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading) and b.anchor == "contents":
            items = "".join(f'<li><a href="#{escape(a, quote=True)}">{escape(t)}</a></li>' for a, t in toc)
            body.append(f'<nav class="toc" aria-label="contents"><strong>Contents</strong><ul>{items}</ul></nav>')
            continue
        body.append(_block(b, images))
    license_comment = assets.license_text.replace("--", "- -")
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{escape(content_security_policy(assets), quote=True)}">',
        '<meta name="referrer" content="no-referrer">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="generator" content="metaverify report">',
        f"<title>{escape(title)}</title>",
        f"<!-- Math typeset by KaTeX {escape(assets.version)} (https://katex.org), bundled under its licence:\n"
        f"{license_comment}-->",
        f"<style>{assets.css}</style>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        "<main>",
        *body,
        f"<footer>{_inline(footer)}</footer>" if footer else "",
        "</main>",
        f"<script>{assets.script}</script>",
        f"<script>{RENDER_SCRIPT}</script>",
        "</body>",
        "</html>",
        "",
    ])
