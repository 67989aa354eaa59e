"""``obdask run --dashboard``: the page URL is printed and serves until Ctrl-C (a subprocess)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("bokeh")


def read_until(stream, pattern, timeout=120.0):
    """Lines of ``stream`` until one matches ``pattern``; the match."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"{pattern!r} never printed; got {''.join(seen)!r}")


@pytest.mark.slow
def test_run_dashboard_serves_until_sigint(tmp_path):
    plan = tmp_path / "plan.md"
    plan.write_text("# Plan: dash\n- [ ] id=hello lane=1 payload=@cmd:echo hi\n")
    proc = subprocess.Popen([sys.executable, "-m", "obdask.cli", "run", str(plan), "--workers",
                             "1", "--dashboard"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        url = read_until(proc.stderr, r"dashboard: (http://\S+/obdask) \(Ctrl-C")[1]
        assert url.startswith("http://127.0.0.1:")  # localhost only
        with urllib.request.urlopen(url, timeout=30) as page:  # noqa: S310 (loopback)
            assert page.status == 200 and b"obdask" in page.read()
        assert proc.poll() is None  # still up, serving
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err  # the run's own status: it succeeded
    assert "dashboard closed" in err and "Traceback" not in err
    assert "done" in out  # the summary came before the wait
