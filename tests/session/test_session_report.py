"""``obdask report SESSION`` (issue 12, item 7): the report of a real session's record,
written by the CLI and opened in headless Chromium."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from obdask.session.api import Session
from tests.session.scripted import FULL

pytest.importorskip("bokeh")


def _report(session_id: str, store: str, out) -> str:
    from obdask.cli import main

    done = CliRunner().invoke(main, ["report", session_id, "--store", store, "-o", str(out)])
    assert done.exit_code == 0, done.output
    assert done.output.strip() == str(out)
    return out.read_text()


def test_report_of_a_session_opens_in_chromium(cluster, model, tmp_path):
    from tests.browser import chromium, render

    s = Session.start(cluster, "Add a <b>--json</b> flag to the tool.")
    final = s.wait(timeout=60)
    assert final["state"] == "done" and final["flow_code"] == FULL, final
    record = s.record()
    out = tmp_path / "report.html"
    html = _report(s.id, str(tmp_path / "sessions"), out)
    assert "<script" in html and "cdn.bokeh.org" not in html  # Bokeh inlined: opens offline
    assert f"obdask session {s.id}" in html  # the page's title
    if chromium() is None:
        pytest.skip("no chromium")
    total = record.tokens_total()
    needles = [f"Session {s.id}", FULL, "status done", "15 processes",
               f"tokens {total['input']} in, {total['output']} out",
               "Add a <b>--json</b> flag",  # the prompt, shown as text, not markup
               "Tokens per process", "Duration per process (s)", "Harmonize",
               "Feedback on the work so far", "orch output for a question."]
    text = render(out.as_uri(), tmp_path, needles, tmp_path / "report.png")
    missing = [n for n in needles if n not in text]  # render fails on these too
    assert not missing, missing
    # the processes' table: every recorded process with its model
    for snap in record.snapshots:
        assert snap.position in text and snap.name in text, snap
    assert "coder:1b" in text and "res:1b" in text
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_report_of_a_failed_session_shows_its_errors(cluster, model, tmp_path):
    from bokeh.models import ColumnDataSource

    from obdask import report
    from obdask.session.store import SessionStore

    m, _ = model
    m.process_reply = lambda position: "```plan\n- [ ] id=a deps=nowhere payload=@cmd:true\n```" \
        if position == "S1P2" else None
    s = Session.start(cluster, "Fail at crawling.")
    final = s.wait(timeout=60)
    assert final["state"] == "failed", final
    html = _report(s.id, str(tmp_path / "sessions"), tmp_path / "failed.html")
    assert "status failed" in html and final["flow_code"] in html
    record = SessionStore(str(tmp_path / "sessions")).read(s.id)
    layout = report.session_layout(record)
    notes = next(m for m in layout.select({"name": "report_notes"}))
    data = notes.source.data
    assert isinstance(notes.source, ColumnDataSource)
    assert "process-error" in data["kind"] and any("does not compile" in t for t in data["text"])
