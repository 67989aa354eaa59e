"""The headless-Chromium helper of the page tests (tests/browser.py) fails on a missing needle.

A real page served over HTTP on loopback (the standard library's server in a thread).
"""

from __future__ import annotations

import functools
import http.server
import threading

import pytest
from browser import chromium, render

pytestmark = pytest.mark.skipif(chromium() is None, reason="chromium is not installed")


@pytest.fixture
def page(tmp_path):
    """URL of a small HTML page whose text is written by a script after load."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text(
        "<html><body><h1>static heading</h1><div id=late></div><script>"
        "setTimeout(() => { document.getElementById('late').textContent = 'late text'; }, 300);"
        "</script></body></html>")
    handler = functools.partial(_Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/index.html"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        pass


def test_render_waits_for_text_written_after_load(page, tmp_path):
    shot = tmp_path / "ok.png"
    text = render(page, tmp_path, ["static heading", "late text"], shot, timeout=30)
    assert "late text" in text and shot.stat().st_size > 1000


def test_render_fails_naming_the_missing_needle_and_url(page, tmp_path):
    shot = tmp_path / "missing.png"
    with pytest.raises(AssertionError) as info:
        render(page, tmp_path, ["static heading", "no such needle"], shot, timeout=5)
    message = str(info.value)
    assert "no such needle" in message and page in message, message
    assert "'static heading'" not in message.split("page text")[0], message  # only the missing
    assert shot.stat().st_size > 1000  # saved before failing, to be looked at
