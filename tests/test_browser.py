"""The evaluation report in a real browser: Debian's headless Chromium, driven over the DevTools protocol.

No browser download and no extra Python package: ``chromium --remote-debugging-pipe`` speaks the
Chrome DevTools Protocol (JSON messages ended by a NUL byte) on file descriptors 3 and 4. The
``Browser``/``Page`` helpers below are used here on a small report built from synthetic images
(seconds) and by ``tests/test_dvc_pipeline.py`` on the demo pipeline's ``eval/report.html`` and
``dvc_plots/index.html``. Tests skip with the reason when no Chromium is installed (``.ci/run``
installs Debian's ``chromium``; ``CHROMIUM=/path/to/chrome`` picks another binary).

Screenshots are kept under ``$MDA_TEST_ARTIFACTS`` (default: the system temporary folder,
``mda-test-artifacts/``); each test prints the path.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

#: Started as a trampoline: puts our pipe ends on fds 3 and 4, where Chromium expects them.
_TRAMPOLINE = (
    "import fcntl, os, sys\n"
    "r = fcntl.fcntl(int(sys.argv[1]), fcntl.F_DUPFD, 10)\n"
    "w = fcntl.fcntl(int(sys.argv[2]), fcntl.F_DUPFD, 10)\n"
    "os.dup2(r, 3); os.dup2(w, 4); os.close(r); os.close(w)\n"
    "os.execv(sys.argv[3], sys.argv[3:])\n"
)


def find_chromium() -> str | None:
    """``$CHROMIUM``, or the first of chromium, chromium-browser, google-chrome on ``PATH``."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def chromium_or_skip() -> str:
    exe = find_chromium()
    if exe is None:
        pytest.skip("no Chromium on this machine (CI installs Debian's 'chromium' in .ci/run: "
                    "apt-get install -y chromium; or set CHROMIUM=/path/to/chrome)")
    return exe


def artifact_dir() -> Path:
    """Where screenshots are kept after the test (printed by the tests)."""
    root = Path(os.environ.get("MDA_TEST_ARTIFACTS", Path(tempfile.gettempdir()) / "mda-test-artifacts"))
    root.mkdir(parents=True, exist_ok=True)
    return root


class BrowserError(RuntimeError):
    pass


class Browser:
    """One headless Chromium process, talked to over ``--remote-debugging-pipe``."""

    def __init__(self, exe: str | None = None, width: int = 1400, height: int = 1000, timeout: float = 60.0) -> None:
        self.exe = exe or chromium_or_skip()
        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="mda-chromium-")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        args = [
            self.exe, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
            "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--allow-file-access-from-files", "--hide-scrollbars", "--mute-audio",
            f"--window-size={width},{height}", f"--user-data-dir={self._profile}", "about:blank",
        ]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _TRAMPOLINE, str(to_chrome_r), str(from_chrome_w), *args],
            pass_fds=(to_chrome_r, from_chrome_w), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    # -- protocol -----------------------------------------------------------------------------
    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        """Send one command and wait for its answer (events seen meanwhile go to ``events``)."""
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        reply = self._wait(lambda m: m.get("id") == msg["id"], f"answer to {method}")
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str, session: str | None = None, since: int = 0) -> dict[str, Any]:
        """The first event ``method`` (of ``session``) from index ``since`` of ``events``, waiting for it."""
        for ev in self.events[since:]:
            if ev.get("method") == method and (session is None or ev.get("sessionId") == session):
                return ev
        return self._wait(lambda m: m.get("method") == method and (session is None or m.get("sessionId") == session),
                          f"event {method}")

    def _wait(self, match: Any, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" not in msg:
                    self.events.append(msg)
                if match(msg):
                    return msg
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"timed out after {self.timeout:.0f} s waiting for the {what}")
            ready, _, _ = select.select([self._from_chrome], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.stderr else ""
                    raise BrowserError(f"Chromium closed the pipe while waiting for the {what}:\n{err}")
                self._buf += chunk

    # -- pages --------------------------------------------------------------------------------
    def open(self, url: str) -> "Page":
        """A new tab showing ``url``, after its load event."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session, target)
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=session)
        page.goto(url)
        return page

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    os.write(self._to_chrome, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
                    self.proc.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    self.proc.kill()
                    self.proc.wait(timeout=10)
        finally:
            for fd in (self._to_chrome, self._from_chrome):
                try:
                    os.close(fd)
                except OSError:
                    pass
            if self.proc.stderr:
                self.proc.stderr.close()
            shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Page:
    """One tab: evaluate JavaScript, click, screenshot, and the console errors it logged."""

    def __init__(self, browser: Browser, session: str, target: str) -> None:
        self.browser, self.session, self.target = browser, session, target
        self._first_event = len(browser.events)

    def goto(self, url: str) -> None:
        mark = len(self.browser.events)
        self.browser.send("Page.navigate", {"url": url}, session=self.session)
        self.browser.wait_event("Page.loadEventFired", self.session, since=mark)

    def eval(self, expression: str) -> Any:
        """Value of a JavaScript expression (promises awaited; JSON-serialisable results)."""
        res = self.browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                     "awaitPromise": True}, session=self.session)
        if "exceptionDetails" in res:
            raise BrowserError(f"{expression[:80]}...: {res['exceptionDetails']}")
        return res["result"].get("value")

    def console_errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads the page reported so far."""
        errors = []
        for ev in self.browser.events[self._first_event:]:
            if ev.get("sessionId") != self.session:
                continue
            p = ev.get("params", {})
            if ev["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif ev["method"] == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                errors.append("exception: " + str(d.get("exception", {}).get("description") or d.get("text")))
            elif ev["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                e = p["entry"]
                errors.append(f"{e.get('source')}: {e.get('text')} {e.get('url', '')}".strip())
        return errors

    def screenshot(self, path: str | Path, full_page: bool = True) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.eval("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size[0], "height": min(size[1], 8000), "scale": 1})
        data = self.browser.send("Page.captureScreenshot", params, session=self.session)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path


#: JavaScript: every <img> of the page with its natural width (0: not loaded).
IMAGES_JS = "Array.from(document.images).map(i => ({src: i.src.slice(0, 80), w: i.naturalWidth, ok: i.complete}))"


def column_order(page: Page, table: str, column: int = 0) -> list[str]:
    """The text of cell ``column`` of each body row of ``table`` (a CSS selector), top to bottom."""
    return page.eval(f"Array.from(document.querySelector('{table}').tBodies[0].rows).map(r => r.cells[{column}].textContent)")


def column_values(page: Page, table: str, label: str) -> list[float]:
    """The numbers (``data-value``) of the column of ``table`` headed ``label``, top to bottom."""
    return page.eval(f"""(() => {{ const t = document.querySelector('{table}');
        const k = Array.from(t.tHead.rows[0].cells).findIndex(c => c.textContent.trim().startsWith('{label}'));
        return Array.from(t.tBodies[0].rows).map(r => parseFloat(r.cells[k].dataset.value)); }})()""")


def click_header(page: Page, table: str, label: str) -> list[str]:
    """Click the header cell of ``table`` whose text starts with ``label``; returns the row order after."""
    page.eval(f"""(() => {{ const th = Array.from(document.querySelector('{table}').tHead.rows[0].cells)
        .find(c => c.textContent.trim().startsWith('{label}'));
        if (!th) throw new Error('no header {label}'); th.click(); }})()""")
    return column_order(page, table, 0)


def check_report_page(page: Page, shot: Path) -> dict[str, Any]:
    """The checks of an ``eval/report.html`` page; returns what they saw (screenshot written to ``shot``)."""
    images = page.eval(IMAGES_JS)
    assert images, "the report has no images"
    broken = [i for i in images if not (i["ok"] and i["w"] > 0)]
    assert not broken, f"images that did not load: {broken[:5]}"

    # Sorting: VIF ascending, then descending, reorders the rows by their VIF cell.
    vif_col = page.eval("Array.from(document.querySelector('#pairs').tHead.rows[0].cells).findIndex(c => c.textContent.trim() === 'VIF')")
    assert vif_col > 0
    before = column_order(page, "#pairs", 0)
    up = click_header(page, "#pairs", "VIF")
    vif_up = column_values(page, "#pairs", "VIF")
    down = click_header(page, "#pairs", "VIF")
    vif_down = column_values(page, "#pairs", "VIF")
    assert vif_up == sorted(vif_up) and vif_down == sorted(vif_down, reverse=True), (vif_up, vif_down)
    assert sorted(up) == sorted(before) and len(up) == len(before)
    if len(set(vif_up)) > 1:
        assert up != down, "clicking the VIF header twice did not reorder the rows"
    by_name = click_header(page, "#pairs", "pair")
    assert by_name == sorted(before), by_name
    means_before = column_order(page, "#means", 0)
    click_header(page, "#means", "VIF")
    assert sorted(column_order(page, "#means", 0)) == sorted(means_before)
    means_vif = column_values(page, "#means", "VIF")
    assert means_vif == sorted(means_vif), means_vif

    # A click on a thumbnail shows the full-size image (a file beside the page).
    thumb = page.eval("(() => { const a = document.querySelector('#pairs a.full'); a.click(); return a.getAttribute('href'); })()")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        full = page.eval("(() => { const v = document.getElementById('viewer'); const i = document.getElementById('viewer-img');"
                         " return {hidden: v.hidden, w: i ? i.naturalWidth : 0, h: i ? i.naturalHeight : 0,"
                         " src: i ? i.getAttribute('src') : null, complete: !!i && i.complete}; })()")
        if full["complete"] and full["w"] > 0:
            break
        time.sleep(0.1)
    assert not full["hidden"] and full["w"] > 0 and full["src"] == thumb, f"full-size image {thumb} not shown: {full}"
    page.screenshot(shot.with_name(shot.stem + "-viewer.png"), full_page=False)
    page.eval("document.getElementById('viewer').click()")
    assert page.eval("document.getElementById('viewer').hidden") is True

    notes = page.eval("Array.from(document.querySelectorAll('#worst li')).map(li => li.textContent)")
    external = page.eval("Array.from(document.querySelectorAll('script[src], link[rel=stylesheet], img'))"
                         ".map(e => e.getAttribute('src') || e.getAttribute('href') || '').filter(s => /^(https?:)?\\/\\//.test(s))")
    assert not external, f"the report loads external resources: {external}"
    page.screenshot(shot)
    errors = page.console_errors()
    assert not errors, f"console errors: {errors}"
    return {"images": len(images), "rows": len(before), "full_size": full, "notes": notes}


# --------------------------------------------------------------------------------------------
# The report on synthetic images (no pipeline run)


def _synthetic_report(tmp_path: Path) -> Path:
    from pipeline.evaluate.metrics import METRICS
    from pipeline.evaluate.report import mean_per_method, write_visual_report

    out = tmp_path / "eval"
    rng = np.random.default_rng(0)
    pairs, per_image = [], []
    for k in range(5):
        name = f"pair_{k:02d}"
        ir = (rng.random((90, 120)) * 255).astype(np.uint8)
        vi = (rng.random((90, 120, 3)) * 255).astype(np.uint8)
        for folder, img in (("ir", ir), ("vi", vi)):
            (tmp_path / "src" / folder).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(tmp_path / "src" / folder / f"{name}.png"), img)
        pairs.append({"name": name, "ir": str(tmp_path / "src/ir" / f"{name}.png"), "vi": str(tmp_path / "src/vi" / f"{name}.png")})
        for j, method in enumerate(("average", "maximum", "ours")):
            (out / "fused" / method).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(out / "fused" / method / f"{name}.png"), vi // (j + 1))
            per_image.append({"method": method, "name": name, **{m: float(rng.random()) for m in METRICS}})
    per_image[-1]["CC"] = float("nan")
    means = mean_per_method(per_image, METRICS)
    write_visual_report(out, pairs, per_image, means, METRICS, {"official": "not configured"}, plot_pairs=["pair_00"])
    return out / "report.html"


def test_report_page_in_headless_chromium(tmp_path):
    exe = chromium_or_skip()
    report = _synthetic_report(tmp_path)
    shot = artifact_dir() / "report-synthetic.png"
    t0 = time.monotonic()
    with Browser(exe) as browser:
        page = browser.open(report.as_uri())
        seen = check_report_page(page, shot)
    print(f"\nscreenshot: {shot} ({time.monotonic() - t0:.1f} s in Chromium); {seen}")
    assert seen["rows"] == 5 and seen["images"] == 5 * 5
    assert len(seen["notes"]) == 3


def test_harness_reports_console_errors_and_broken_images(tmp_path):
    """The checks can fail: a page with a broken image and a script error is caught."""
    exe = chromium_or_skip()
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><title>x</title><link rel=icon href='data:,'><img src='missing.png'>"
                   "<script>console.error('boom'); undefinedFunction();</script>")
    with Browser(exe) as browser:
        page = browser.open(bad.as_uri())
        images = page.eval(IMAGES_JS)
        errors = page.console_errors()
    assert images and images[0]["w"] == 0
    assert any("boom" in e for e in errors) and any("undefinedFunction" in e for e in errors), errors
    assert any("missing.png" in e for e in errors), errors
