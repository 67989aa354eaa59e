"""Headless Chromium driven over the DevTools protocol (tornado's websocket client).

Bokeh pages build their content after the page loads (models arrive over a
websocket, tables live in shadow DOM), so ``--screenshot``/``--dump-dom``
capture an empty page; :func:`render` waits until the page's text (shadow
roots included) holds what the test expects, then takes the screenshot.  A needle
still missing at the deadline fails the test (after the screenshot is saved, so
the page can be looked at).
Flags: ``--headless --no-sandbox --disable-gpu --disable-background-networking``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

#: Text of the page including shadow roots (Bokeh 3 renders into them).
TEXT_JS = """(function walk(n) {
  let t = '';
  if (n.shadowRoot) t += walk(n.shadowRoot);
  for (const c of n.childNodes) { t += c.nodeType === 3 ? c.textContent + ' ' : walk(c); }
  return t;
})(document.body)"""


def chromium() -> str | None:
    """Path of the Chromium binary, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(url: str, folder: Path, needles: list[str], screenshot: Path,
           timeout: float = 60.0, size: str = "1400,1000") -> str:
    """Open ``url``, wait until every needle is in its text, save a PNG; return the text.

    Raises
    ------
    AssertionError
        When a needle is not in the page's text by ``timeout`` s: the message names
        the missing needles, the URL and the screenshot (saved first).
    """
    profile = folder / "chromium-profile"
    proc = subprocess.Popen(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-dev-shm-usage",
         "--remote-debugging-port=0", f"--user-data-dir={profile}", f"--window-size={size}",
         url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, "chromium exited"
            assert time.monotonic() < deadline, "chromium did not start"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        text, png = asyncio.run(_drive(port, needles, deadline))
        screenshot.write_bytes(png)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    missing = [n for n in needles if n not in text]
    assert not missing, (f"{url}: not in the page after {timeout:g} s: {missing} "
                         f"(screenshot {screenshot}; page text: {text[:500]!r})")
    return text


async def _drive(port: int, needles: list[str], deadline: float) -> tuple[str, bytes]:
    from tornado.websocket import websocket_connect

    targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list",
                                                timeout=10).read())
    page = next(t for t in targets if t["type"] == "page")
    ws = await websocket_connect(page["webSocketDebuggerUrl"], max_message_size=64 << 20)
    ids = iter(range(1, 1_000_000))

    async def call(method: str, **params: object) -> dict:
        n = next(ids)
        ws.write_message(json.dumps({"id": n, "method": method, "params": params}))
        while True:
            msg = json.loads(await ws.read_message())
            if msg.get("id") == n:
                return msg.get("result", {})

    text = ""
    try:
        while time.monotonic() < deadline:
            result = await call("Runtime.evaluate", expression=TEXT_JS, returnByValue=True)
            text = result.get("result", {}).get("value") or ""
            if all(n in text for n in needles):
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(0.5)  # let the canvas paint
        shot = await call("Page.captureScreenshot", format="png")
        return text, base64.b64decode(shot["data"])
    finally:
        ws.close()
