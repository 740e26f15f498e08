"""The report in a real browser: headless Chromium, networking disabled, driven over the DevTools protocol.

Checks that ``index.html`` opens offline with no console error, no failed or
blocked request and no network request at all; that every formula was
typeset by the bundled KaTeX (no raw TeX left, no KaTeX error, the KaTeX fonts
loaded from their data URIs); that every figure decoded (``naturalWidth >
0``); and that an injected ``<script>`` in user text does not run. Screenshots
are kept under ``test-artifacts/`` (git-ignored).

Chromium: Debian's ``chromium`` package (``scripts/install-browser.sh``). The
tests skip, saying so, only where no Chromium binary can be found.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _high_fd(fd: int) -> int:
    import fcntl

    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class Browser:
    """A headless Chromium with one page, spoken to over ``--remote-debugging-pipe`` (fds 3 and 4)."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
             # networking off: every proxied request goes to a closed port, every host name fails to resolve
             "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
             "--remote-debugging-pipe", "--window-size=1200,900"]

    def __init__(self, binary: str, *, timeout: float = 60.0):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="metaverify-chromium-")
        cmd_r, cmd_w = os.pipe()  # we write commands -> chromium reads fd 3
        ev_r, ev_w = os.pipe()  # chromium writes fd 4 -> we read
        # Move the child's ends above 9, then a tiny Python trampoline puts them on fds 3 and 4 and execs
        # Chromium (dash, Debian's /bin/sh, cannot redirect fds above 9).
        cmd_r, ev_w = (_high_fd(cmd_r), _high_fd(ev_w))
        trampoline = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
                      "os.close(int(sys.argv[1])); os.close(int(sys.argv[2])); os.execv(sys.argv[3], sys.argv[3:])")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", trampoline, str(cmd_r), str(ev_w), binary, *self.FLAGS,
             f"--user-data-dir={self.profile}"],
            pass_fds=(cmd_r, ev_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        os.close(cmd_r)
        os.close(ev_w)
        self._w = os.fdopen(cmd_w, "wb", buffering=0)
        self._r = os.fdopen(ev_r, "rb", buffering=0)
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=True)

    # -- protocol -------------------------------------------------------------

    def _read_message(self, deadline: float) -> dict[str, Any]:
        import select

        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = self._r.read(1 << 16)
            if not chunk:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"Chromium closed the DevTools pipe; stderr:\n{err[-3000:]}")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict[str, Any] | None = None, *, session: bool = False) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        self._w.write(json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> dict[str, Any]:
        for e in self.events:
            if e.get("method") == method:
                return e
        deadline = time.monotonic() + self.timeout
        while True:
            e = self._read_message(deadline)
            self.events.append(e)
            if e.get("method") == method:
                return e

    # -- page -----------------------------------------------------------------

    def open(self, path: Path) -> None:
        self.call("Page.navigate", {"url": path.resolve().as_uri()}, session=True)
        self.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        res = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                             "returnByValue": True}, session=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page script failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    def screenshot(self, path: Path, *, full_page: bool = False, width: int = 1200) -> Path:
        height = 900
        if full_page:
            metrics = self.call("Page.getLayoutMetrics", session=True)
            height = int(min(metrics["cssContentSize"]["height"], 16000))
        self.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False}, session=True)
        data = self.call("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions, error log entries, failed requests."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description", "")))
                                                                    for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                out.append("exception: " + json.dumps(p.get("exceptionDetails", {}))[:500])
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append("log: " + p["entry"].get("text", ""))
            elif m == "Network.loadingFailed":
                out.append(f"request failed: {p.get('errorText')} {p.get('blockedReason', '')}")
        return out

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def blocked(self) -> dict[str, str]:
        """URL -> Chromium's blockedReason, for requests stopped before they were sent."""
        urls = {e["params"]["requestId"]: e["params"]["request"]["url"]
                for e in self.events if e.get("method") == "Network.requestWillBeSent"}
        return {urls.get(e["params"]["requestId"], "?"): e["params"].get("blockedReason", "")
                for e in self.events if e.get("method") == "Network.loadingFailed"}

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for f in (self._w, self._r, self.proc.stderr):
            try:
                f.close()
            except Exception:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)


#: Everything the test asserts about the page, gathered in one evaluation after typesetting.
INSPECT = r"""
(async () => {
  await document.fonts.ready;
  const imgs = Array.from(document.images);
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  const math = Array.from(document.querySelectorAll(".math"));
  const clone = document.body.cloneNode(true);
  clone.querySelectorAll(".katex-mathml, pre, code, script, style").forEach(e => e.remove());
  const text = clone.textContent;
  const fonts = Array.from(document.fonts);
  return {
    mathState: document.documentElement.getAttribute("data-math"),
    math: math.length,
    untypeset: math.filter(e => !e.querySelector(".katex")).map(e => e.textContent.slice(0, 80)),
    katexErrors: document.querySelectorAll(".math-error, .katex-error").length,
    rawTex: ["$$", "\\frac", "\\nabla", "\\begin{", "\\mathcal"].filter(s => text.includes(s)),
    images: imgs.map(i => ({alt: i.alt, w: i.naturalWidth, h: i.naturalHeight, shown: i.clientWidth})),
    fontsLoaded: fonts.filter(f => f.status === "loaded").map(f => f.family),
    fontsFailed: fonts.filter(f => f.status === "error").map(f => f.family),
    scripts: document.scripts.length,
    pwned: window.__pwned === true,
    title: document.title,
    h1: document.querySelector("h1").textContent,
  };
})()
"""


@pytest.fixture(scope="module")
def chromium() -> str:
    binary = find_chromium()
    if binary is None:
        pytest.skip("headless Chromium is not installed (install Debian's 'chromium' package: "
                    "bash scripts/install-browser.sh); the browser test cannot run")
    return binary


TITLE = 'Browser <script>window.__pwned = true</script> & "$x$" test'


@pytest.fixture(scope="module")
def small_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from verify.report import ReportConfig, build_report

    out = tmp_path_factory.mktemp("browser") / "report"
    build_report(ReportConfig(out=out, algorithms=["maml", "reptile"], backends=["numpy"], dtypes=["float64"],
                              examples=1, quick=True, title=TITLE))
    return out


@pytest.mark.browser
def test_report_renders_offline_in_chromium(chromium: str, small_report: Path) -> None:
    browser = Browser(chromium)
    try:
        browser.open(small_report / "index.html")
        page = browser.evaluate(INSPECT)
        ARTIFACTS.mkdir(exist_ok=True)
        browser.screenshot(ARTIFACTS / "report-top.png")
        browser.screenshot(ARTIFACTS / "report-full.png", full_page=True)
        problems = browser.problems()
        requests = [u for u in browser.requests() if not u.startswith(("file:", "data:"))]
    finally:
        browser.close()
    assert problems == [], problems
    assert requests == [], f"the page tried to reach the network: {requests}"
    # every formula typeset by KaTeX, nothing left as TeX
    assert page["mathState"] == "done"
    assert page["math"] >= 10
    assert page["untypeset"] == [] and page["katexErrors"] == 0, page
    assert page["rawTex"] == [], page["rawTex"]
    assert {"KaTeX_Main", "KaTeX_Math"} <= set(page["fontsLoaded"]) and page["fontsFailed"] == [], page
    # every figure decoded and shown
    names = [i["alt"] for i in page["images"]]
    assert any("heatmap" in n for n in names) and any("Taylor" in n for n in names), names
    assert all(i["w"] > 0 and i["h"] > 0 and i["shown"] > 0 for i in page["images"]), page["images"]
    # the title is shown literally and the injected script did not run
    assert page["pwned"] is False
    assert page["scripts"] == 2  # KaTeX and its render call, nothing else
    assert page["title"] == TITLE
    assert page["h1"].startswith(TITLE)
    assert (ARTIFACTS / "report-top.png").stat().st_size > 10_000


@pytest.mark.browser
def test_csp_blocks_a_script_that_slips_past_escaping(chromium: str, small_report: Path, tmp_path: Path) -> None:
    """Defence in depth: even a raw <script> in the page (escaping bypassed by hand) must not run."""
    html = (small_report / "index.html").read_text(encoding="utf-8")
    tampered = tmp_path / "index.html"
    tampered.write_text(html.replace("<main>", "<main><script>window.__pwned = true</script>"
                                                "<img src=\"https://example.invalid/x.png\" alt=\"x\">", 1),
                        encoding="utf-8")
    browser = Browser(chromium)
    try:
        browser.open(tampered)
        pwned = browser.evaluate("window.__pwned === true")
        typeset = browser.evaluate("document.querySelectorAll('.math .katex').length")
        requests = [u for u in browser.requests() if not u.startswith(("file:", "data:"))]
        blocked = browser.blocked()
    finally:
        browser.close()
    assert pwned is False
    assert typeset > 0  # the two hashed scripts still run
    # the CSP stops the image request before it is made
    assert requests == ["https://example.invalid/x.png"] and blocked[requests[0]] == "csp", blocked
