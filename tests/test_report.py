"""``obdask report``: a standalone HTML report of a finished run, opened in headless Chromium."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("bokeh")


def obdask(*args, cwd):
    return subprocess.run([sys.executable, "-m", "obdask.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=240, env=dict(os.environ))


@pytest.mark.slow
def test_report_of_a_run_opens_in_chromium(tmp_path):
    from browser import chromium, render

    plan = tmp_path / "plan.md"
    plan.write_text("# Plan: rep\n"
                    "- [ ] id=hello lane=1 payload=@cmd:echo hi\n"
                    "- [ ] id=oops lane=1 payload=@cmd:exit 3\n")
    ran = obdask("run", plan, "--workers", "1", cwd=tmp_path)
    assert ran.returncode == 1, ran.stderr  # one job failed
    done = obdask("report", plan, "-o", tmp_path / "report.html", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    html = (tmp_path / "report.html").read_text()
    assert "<script" in html and "cdn.bokeh.org" not in html  # Bokeh inlined: opens offline
    if chromium() is None:
        pytest.skip("no chromium")
    text = render((tmp_path / "report.html").as_uri(), tmp_path,
                  ["2 jobs: 1 done, 1 failed", "hello", "oops"], tmp_path / "report.png")
    assert "obdask run plan 20" in text  # the title: plan id and run id
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_report_of_an_unknown_session_is_one_error_line(tmp_path):
    done = obdask("report", "no-such-session", "--store", tmp_path / "sessions", "-o",
                  tmp_path / "r.html", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("error: no session 'no-such-session'")
    assert "Traceback" not in done.stderr and not (tmp_path / "r.html").exists()
