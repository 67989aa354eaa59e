"""What a session's model calls carry: the session id (``gen_ai.conversation.id``) and
the schedule and process in every token record."""

from __future__ import annotations

import time

import pytest

from obdask import metrics
from obdask.session.api import Session
from tests.session.scripted import FULL


def _session_rows(client, sid, complete, timeout=10.0):
    """The token records of the calls of session ``sid``, once ``complete(rows)`` holds
    (workers send them in batches: a count of all rows can be reached while one
    process's record is still on its way, when the orchestrator made a call more)."""
    deadline = time.monotonic() + timeout
    while True:
        frame = metrics.tokens(client)
        rows = frame[frame["job"].fillna("").str.startswith(f"session:{sid}:")]
        if complete(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def _processes(rows):
    return rows[~rows["job"].str.contains(":orchestrate-|:answer-")]


def test_every_call_of_a_session_carries_its_id(cluster, model):
    s = Session.start(cluster, "Carry the conversation id.")
    final = s.wait(timeout=60)
    assert final["flow_code"] == FULL
    record = s.record()
    calls = len(record.tokens)  # the processes' calls; the orchestrator's come on top
    rows = _session_rows(cluster, s.id,
                         lambda r: len(r) >= calls + 15 and len(_processes(r)) >= calls)
    assert len(rows) >= calls + 15
    assert (rows["session"] == s.id).all(), rows[["job", "session"]]
    processes = _processes(rows)
    assert len(processes) == calls == 15
    assert sorted(processes["schedule"] + processes["process"]) == sorted(
        snap.position for snap in record.snapshots)
    orchestrator = rows[rows["job"].str.contains(":orchestrate-")]
    assert orchestrator["process"].isna().all()  # between processes: none of them


FRAGMENT = """Here is the work as jobs:

```plan
- [ ] id=hello lane=1 payload=@cmd:echo hello from the fragment
- [ ] id=check lane=3 deps=hello payload=@cmd:test -d .
```
"""
BROKEN = """```plan
- [ ] id=hello lane=1 deps=nowhere payload=@cmd:echo hi
```
"""


def test_a_plan_fragment_runs_as_part_of_the_session(cluster, model, tmp_path):
    m, _ = model
    m.process_reply = lambda position: FRAGMENT if position == "S3P1" else None
    s = Session.start(cluster, "Run some jobs.", workspace=str(tmp_path))
    final = s.wait(timeout=90)
    assert final["flow_code"] == FULL, final
    record = s.record()
    (snap,) = [x for x in record.snapshots if x.position == "S3P1"]
    fragment = snap.payload["fragment"]
    assert fragment["ok"] is True and fragment["plan_id"] == f"{s.id}.{snap.index:04d}-S3P1"
    assert [(j["step"], j["status"]) for j in fragment["jobs"]] == [("hello", "done"),
                                                                  ("check", "done")]
    assert all((j["session"], j["schedule"], j["process"]) == (s.id, "S3", "P1")
               for j in fragment["jobs"])
    others = [x for x in record.snapshots if x.position != "S3P1"]
    assert all(x.payload["fragment"] is None for x in others)
    (action,) = [a for a in record.actions if a.get("kind") == "plan-fragment"]
    assert action["index"] == snap.index and action["run_id"] == fragment["run_id"]
    from obdask.records import read_run

    stored = read_run(fragment["records"], fragment["plan_id"],
                      fragment["run_id"])
    assert {r["step"] for r in stored if r.get("step")} >= {"hello", "check"}
    (event,) = [e for e in s.events() if e["kind"] == "plan-fragment"]
    assert event["ok"] is True and event["position"] == "S3P1"


def test_a_fragment_that_does_not_compile_is_an_x_of_its_process(cluster, model, tmp_path):
    m, _ = model
    m.process_reply = lambda position: BROKEN if position == "S3P1" else None
    s = Session.start(cluster, "Run broken jobs.", workspace=str(tmp_path))
    final = s.wait(timeout=90)
    # X where the session stood (an X does not move it); after max-errors (3) it fails
    assert (final["state"], final["flow_code"]) == ("failed", "S1P123S2P123XXXX"), final
    record = s.record()
    assert "S3P1" not in [x.position for x in record.snapshots]
    notes = [n for n in record.notes if n.get("kind") == "process-error"]
    assert len(notes) == 4
    assert "plan fragment of process 7 (S3P1) does not compile" in notes[0]["text"]
    assert "nowhere" in notes[0]["text"]  # the cause, from the plan parser
    errors = [e for e in s.events() if e["kind"] == "process-error"]
    assert errors and "does not compile" in errors[0]["error"]


def test_session_token_budget_spent_is_an_event_and_recorded(cluster, model):
    import dask

    with dask.config.set({"obdask.sessions.max-tokens": 1}):
        s = Session.start(cluster, "Spend a little.")
    final = s.wait(timeout=60)
    # checked before each move: after the first process the budget is spent
    assert (final["state"], final["flow_code"]) == ("failed", "S1P1"), final
    (event,) = [e for e in s.events() if e["kind"] == "budget-exhausted"]
    assert event["budget"] == "tokens" and event["limit"] == 1 and event["used"] > 1
    assert s.events()[-1]["kind"] == "session-complete"
    record = s.record()
    assert record.stored_status == "failed" and "max-tokens" in record.meta["error"]
    assert [n["budget"] for n in record.notes if n.get("kind") == "budget-exhausted"] == [
        "tokens"]


@pytest.mark.parametrize("budget", [1, None], ids=["budget-spent", "finished"])
def test_an_ended_state_shows_only_with_its_session_complete(cluster, model, monkeypatch,
                                                             budget):
    """The shared state turns ended in the update that publishes session-complete, so a
    client that saw it end finds every event. The window between the two once held the
    resources.json write: widened here by slowing the (real) write down."""
    import dask

    from obdask.session.store import SessionStore

    real = SessionStore.set_resources

    def slow(self, *args, **kwargs):
        time.sleep(0.5)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SessionStore, "set_resources", slow)
    with dask.config.set({"obdask.sessions.max-tokens": budget}):
        s = Session.start(cluster, "End cleanly.")
    final = s.wait(timeout=90, poll=0.05)
    events = s.events()
    assert events[-1]["kind"] == "session-complete", events[-1]
    assert events[-1]["status"] == final["state"] == ("failed" if budget else "done")
    if budget:
        assert events[-2]["kind"] == "budget-exhausted"


def test_a_call_refused_by_a_cluster_budget_is_a_session_event(cluster, model):
    from obdask.llm.budget import remove_budget, set_budget

    set_budget(cluster, "no-coders", 1, scope="model", match="coder:1b", on_exhausted="fail")
    try:
        s = Session.start(cluster, "Code without tokens.")
        final = s.wait(timeout=60)
    finally:
        remove_budget(cluster, "no-coders")
    # Knowledge runs on the researcher; the first coder process (Plan P1) is refused
    assert (final["state"], final["flow_code"]) == ("failed", "S1P123XXXX"), final
    refused = [e for e in s.events() if e["kind"] == "budget-refused"]
    assert len(refused) == 4 and {e["position"] for e in refused} == {"S2P1"}
    assert all(e["caller"] == "process" and "no-coders" in e["error"] for e in refused)
    notes = [n for n in s.record().notes if n.get("kind") == "budget-refused"]
    assert len(notes) == 4
