"""What a session's model calls carry: the session id (``gen_ai.conversation.id``) and
the schedule and process in every token record."""

from __future__ import annotations

import time

from obdask import metrics
from obdask.session.api import Session
from tests.session.scripted import FULL


def _session_rows(client, sid, expected, timeout=10.0):
    """The token records of the calls of session ``sid`` (workers send them in batches)."""
    deadline = time.monotonic() + timeout
    while True:
        frame = metrics.tokens(client)
        rows = frame[frame["job"].fillna("").str.startswith(f"session:{sid}:")]
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def test_every_call_of_a_session_carries_its_id(cluster, model):
    s = Session.start(cluster, "Carry the conversation id.")
    final = s.wait(timeout=60)
    assert final["flow_code"] == FULL
    record = s.record()
    calls = len(record.tokens)  # the processes' calls; the orchestrator's come on top
    rows = _session_rows(cluster, s.id, calls + 15)
    assert len(rows) >= calls + 15
    assert (rows["session"] == s.id).all(), rows[["job", "session"]]
    processes = rows[~rows["job"].str.contains(":orchestrate-|:answer-")]
    assert len(processes) == calls == 15
    assert sorted(processes["schedule"] + processes["process"]) == sorted(
        snap.position for snap in record.snapshots)
    orchestrator = rows[rows["job"].str.contains(":orchestrate-")]
    assert orchestrator["process"].isna().all()  # between processes: none of them
