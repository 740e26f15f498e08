"""The bundled math renderer: KaTeX 0.19.1 (MIT), inlined into one self-contained HTML page.

Files (package data under ``verify/report/katex/``, from the npm package
``katex@0.19.1``): ``katex.min.js``, ``katex.min.css``, the 20 ``fonts/*.woff2``
and ``katex.json`` (version, licence text, SHA-256 of every file, checked at
load so a corrupted install fails loudly instead of rendering garbage).

The page carries three pieces:

* the stylesheet with every ``@font-face`` rewritten to a single
  ``data:font/woff2;base64,...`` source (so no font request leaves the page);
* ``katex.min.js`` as an inline script;
* :data:`RENDER_SCRIPT`, which typesets exactly the elements the report marked
  with ``class="math"`` (their text is TeX; ``<div>`` = display style). User
  text never reaches KaTeX: a ``$`` in a title stays a dollar sign.

The Content-Security-Policy (:func:`content_security_policy`) allows only these
two scripts, by SHA-256 hash, and only ``data:`` images and fonts: no network
request can be made, and a script smuggled into user text would not run even
if escaping failed.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
from dataclasses import dataclass
from importlib import resources

__all__ = ["KatexAssets", "RENDER_SCRIPT", "content_security_policy", "load_assets"]

#: Typesets every ``.math`` element; a TeX error is reported on the console (the browser test fails on it)
#: and the element keeps its source text, marked ``math-error``.
RENDER_SCRIPT = """
(function () {
  "use strict";
  var nodes = document.querySelectorAll(".math");
  for (var i = 0; i < nodes.length; i++) {
    var el = nodes[i];
    try {
      katex.render(el.textContent, el, {displayMode: el.tagName === "DIV", throwOnError: true, trust: false,
                                        strict: "warn", output: "htmlAndMathml"});
    } catch (err) {
      el.classList.add("math-error");
      console.error("metaverify report: KaTeX could not typeset " + JSON.stringify(el.textContent) + ": " + err);
    }
  }
  document.documentElement.setAttribute("data-math", "done");
})();
""".strip()

_FONT_FACE = re.compile(r"src:url\(fonts/(?P<name>KaTeX_[A-Za-z0-9_-]+)\.woff2\) format\(\"woff2\"\)[^;}]*")


@dataclass(frozen=True)
class KatexAssets:
    """What the HTML page inlines."""

    version: str
    license_text: str
    css: str  # katex.min.css with the woff2 fonts as data URIs
    script: str  # katex.min.js

    @property
    def hashes(self) -> tuple[str, str]:
        """CSP source expressions of the two inline scripts."""
        return (_csp_hash(self.script), _csp_hash(RENDER_SCRIPT))


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


@functools.lru_cache(maxsize=1)
def load_assets() -> KatexAssets:
    """Read the bundled KaTeX files, verify their hashes, inline the fonts into the CSS."""
    root = resources.files("verify.report").joinpath("katex")
    manifest = json.loads(root.joinpath("katex.json").read_text(encoding="utf-8"))

    def read(name: str) -> bytes:
        data = root.joinpath(name).read_bytes()
        want = manifest["sha256"].get(name)
        if want is None or hashlib.sha256(data).hexdigest() != want:
            raise RuntimeError(  # an installation problem, not user input
                f"the bundled KaTeX file {name!r} does not match katex.json; reinstall metaverify")
        return data

    def font(match: re.Match[str]) -> str:
        data = base64.b64encode(read(f"fonts/{match['name']}.woff2")).decode("ascii")
        return f'src:url(data:font/woff2;base64,{data}) format("woff2")'

    css, n = _FONT_FACE.subn(font, read("katex.min.css").decode("utf-8"))
    if n != 20 or "url(fonts/" in css:
        raise RuntimeError(f"unexpected katex.min.css: rewrote {n} font sources; reinstall metaverify")
    script = read("katex.min.js").decode("utf-8")
    if "</script" in script.lower() or "</style" in css.lower():  # would end the inline element early
        raise RuntimeError("the bundled KaTeX files cannot be inlined; reinstall metaverify")
    return KatexAssets(manifest["version"], manifest["license_text"], css, script)


def content_security_policy(assets: KatexAssets) -> str:
    """Nothing but the two hashed scripts, inline styles, and data: images and fonts."""
    scripts = " ".join(assets.hashes)
    return (f"default-src 'none'; script-src {scripts}; style-src 'unsafe-inline'; img-src data:; "
            "font-src data:; base-uri 'none'; form-action 'none'")
