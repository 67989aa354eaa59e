"""The durable session record: layout, fencing, damaged files, consultations, tokens, list."""

from __future__ import annotations

import json
import os
import pickle
import time
import uuid

import pytest

from obdask.exceptions import (
    LeaseLost,
    SessionError,
    SessionExists,
    SnapshotConflict,
    UnknownSession,
)
from obdask.session.model import Move, SessionState
from obdask.session.store import SessionStore


@pytest.fixture(params=["memory", "local"])
def store(request, tmp_path):
    if request.param == "memory":
        url = f"memory://obdask-sessions-{uuid.uuid4().hex[:8]}"
    else:
        url = str(tmp_path / "sessions")
    store = SessionStore(url)
    yield store
    if request.param == "memory" and store.fs.exists(store.root):
        store.fs.rm(store.root, recursive=True)  # memory:// is one process-wide dict


def walk(*moves, state=None):
    """States after each move."""
    state = state or SessionState()
    out = []
    for text in moves:
        state = state.apply(Move.parse(text, "justified"))
        out.append(state)
    return out


def files(store, sid, folder):
    return store._ls(store._path(sid, folder))


def test_create_read_and_duplicate(store):
    record = store.create("s1", "write a parser", meta={"workspace": "/w"})
    assert record.id == "s1" and record.prompt == "write a parser"
    assert record.status == "running" and record.flow_code == "" and record.last is None
    assert record.next_index == 1 and record.state.position == "start"
    assert record.meta["workspace"] == "/w"
    with pytest.raises(SessionExists, match="s1.*already exists"):
        store.create("s1", "again")
    assert store.read("s1").prompt == "write a parser"  # never overwritten
    with pytest.raises(UnknownSession, match="nope"):
        store.read("nope")
    with pytest.raises(UnknownSession):
        store.append_process("nope", 0, walk("S1")[0])
    with pytest.raises(ValueError, match="session id"):
        store.create("../escape", "x")


def test_snapshots_layout_and_resume_point(store):
    store.create("s", "p")
    states = walk("S1", "P2", "P3", "S2", "P1")
    for i, st in enumerate(states):
        snap = store.append_process("s", 0, st, {"output": f"out {i}"}, started=1.0, ended=2.0)
        assert snap.index == i + 1
    assert files(store, "s", "processes") == [
        "0001-S1P1.json", "0002-S1P2.json", "0003-S1P3.json", "0004-S2P1.json",
        "0005-S2P1.json"]
    record = store.read("s")
    assert record.flow_code == "S1P123S2P11" == record.state.flow_code
    assert record.last.filename == "0005-S2P1.json" and record.next_index == 6
    assert record.last.payload == {"output": "out 4"}
    assert record.snapshots[0].name == "Research" and record.snapshots[3].name == "Brainstorm"
    assert json.loads(store._read_bytes(store._path("s", "meta.json")))["flow_code"] == \
        "S1P123S2P11"
    assert store._read_bytes(store._path("s", "flow_code")) == b"S1P123S2P11"
    record.check_resumable()
    # resume: continue after the last completed process
    nxt = record.state.apply(Move.to_process(2))
    assert store.append_process("s", 1, nxt).filename == "0006-S2P2.json"


def test_same_write_again_is_a_no_op_different_content_refused(store):
    store.create("s", "p")
    s1, s2 = walk("S1", "P2")
    store.append_process("s", 0, s1, {"a": 1})
    store.append_process("s", 0, s1, {"a": 1})  # a retried write
    with pytest.raises(SnapshotConflict, match="0001-S1P1.json is already recorded"):
        store.append_process("s", 0, s1, {"a": 2})
    store.append_process("s", 0, s2, {"b": 1})
    other = walk("P1", state=s1)[0]  # a different process at index 2, same epoch
    with pytest.raises(SnapshotConflict, match="0002-S1P2.json is already recorded"):
        store.append_process("s", 0, other, {})
    # A newer driver that read process 2 may not rewrite it either (it resumes after it).
    store.claim("s", 1)
    with pytest.raises(SnapshotConflict, match="a resume continues after"):
        store.append_process("s", 1, other, {})
    assert [n for n in files(store, "s", "processes")] == ["0001-S1P1.json", "0002-S1P2.json"]
    with pytest.raises(SnapshotConflict, match="does not extend"):
        store.append_process("s", 1, walk("S2", "P2")[1], {})
    with pytest.raises(SnapshotConflict, match="process 3 is not recorded"):
        store.append_process("s", 1, walk("P3", "P3", state=s2)[1], {})
    assert store.read("s").snapshots[0].payload == {"a": 1}


def test_stale_epoch_refused_before_writing(store):
    store.create("s", "p", epoch=1)
    s1, s2, s3 = walk("S1", "P2", "P3")
    store.append_process("s", 1, s1)
    store.claim("s", 2)  # a newer driver takes over
    with pytest.raises(LeaseLost) as info:
        store.append_process("s", 1, s2, {"stale": True})
    assert info.value.epoch == 1 and info.value.highest == 2 and info.value.kept is False
    assert "superseded by epoch 2" in str(info.value) and "0002-S1P2.json" in str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert files(store, "s", "processes") == ["0001-S1P1.json"]
    for call in (lambda: store.add_note("s", 1, "x"), lambda: store.update("s", 1, status="failed"),
                 lambda: store.set_resources("s", 1, {}), lambda: store.claim("s", 1),
                 lambda: store.ask("s", 1, 2, "S1P2", "q?"),
                 lambda: store.begin_call("s", 1, 2, "S1P2")):
        with pytest.raises(LeaseLost):
            call()
    assert store.read("s").stored_status == "running"
    store.append_process("s", 2, s2, {"new": True})
    assert store.read("s").epoch == 2
    e = pickle.loads(pickle.dumps(info.value))
    assert (e.session, e.epoch, e.highest, e.kept) == ("s", 1, 2, False)


def test_stale_write_landing_after_takeover_is_void_and_the_stale_driver_told(store,
                                                                            monkeypatch):
    store.create("s", "p", epoch=1)
    s1, s2 = walk("S1", "P2")
    store.append_process("s", 1, s1)
    stale = SessionStore(store.url)
    # The stale driver passed its fence check just before the takeover ...
    monkeypatch.setattr(stale, "_fence", lambda *a, **k: None)
    record = store.claim("s", 2)  # ... the new driver registers, reads (last = 1), seals
    assert record.last.index == 1
    with pytest.raises(LeaseLost) as info:  # ... and the stale write lands afterwards
        stale.append_process("s", 1, s2, {"stale": True})
    assert info.value.kept is False
    record = store.read("s")
    assert record.last.index == 1 and record.voided == ["0002-S1P2.json"]  # never durable
    # The new driver writes the same position: it replaces the void write.
    store.append_process("s", 2, s2, {"new": True})
    record = store.read("s")
    assert record.last.payload == {"new": True} and record.voided == []
    # A snapshot at the same index under another position is removed too.
    s3 = walk("P3", state=s2)[0]
    s3b = walk("P1", state=s2)[0]
    monkeypatch.setattr(stale, "_fence", lambda *a, **k: None)
    store.claim("s", 3)
    with pytest.raises(LeaseLost):
        stale.append_process("s", 2, s3b)
    store.append_process("s", 3, s3)
    assert files(store, "s", "processes")[-1] == "0003-S1P3.json"
    assert store.read("s").flow_code == "S1P123"


def test_stale_write_read_by_the_new_driver_is_kept(store, monkeypatch):
    store.create("s", "p", epoch=1)
    s1, s2 = walk("S1", "P2")
    store.append_process("s", 1, s1)
    store._create(store._path("s", "epochs", f"{2:012d}"), b"2")  # registered, not yet read
    stale = SessionStore(store.url)
    monkeypatch.setattr(stale, "_fence", lambda *a, **k: None)
    with pytest.raises(LeaseLost) as info:
        stale.append_process("s", 1, s2, {"stale": True})
    assert info.value.kept is None
    record = store.claim("s", 2)  # its read sees the write: nothing lost, nothing doubled
    assert record.last.index == 2 and record.last.payload == {"stale": True}


def test_same_epoch_cannot_rewrite_and_higher_snapshot_wins(store, monkeypatch):
    store.create("s", "p", epoch=1)
    s1 = walk("S1")[0]
    store.append_process("s", 5, s1, {"v": 5})
    stale = SessionStore(store.url)
    monkeypatch.setattr(stale, "_fence", lambda *a, **k: None)
    with pytest.raises(LeaseLost) as info:
        stale.append_process("s", 4, s1, {"v": 4})
    assert info.value.highest == 5
    assert store.read("s").last.payload == {"v": 5}


def test_damaged_files_are_reported_and_skipped(store):
    store.create("s", "p")
    states = walk("S1", "P2", "P3")
    for st in states:
        store.append_process("s", 0, st)
    store.add_note("s", 0, "fine")
    store._write(store._path("s", "processes", "0003-S1P3.json"), b'{"index": 3, "posi')
    store._write(store._path("s", "notes", "zzz.json"), b"not json")
    record = store.read("s")
    names = [name for name, _ in record.damaged]
    assert any(n.endswith("0003-S1P3.json") for n in names)
    assert any(n.endswith("notes/zzz.json") for n in names)
    assert record.last.index == 2 and record.flow_code == "S1P12"
    assert [n["text"] for n in record.notes] == ["fine"]
    # The driver re-runs process 3 and may replace the damaged snapshot.
    store.append_process("s", 0, states[2], {"again": True})
    record = store.read("s")
    assert record.last.payload == {"again": True}
    assert [n for n, _ in record.damaged if "processes" in n] == []
    # A damaged meta.json: the record still reads (from the snapshots).
    store._write(store._path("s", "meta.json"), b"\x00garbage")
    record = store.read("s")
    assert record.flow_code == "S1P123" and record.prompt is None
    assert record.damaged[0][0].endswith("meta.json")


def test_error_mark_and_finish_are_recorded(store):
    store.create("s", "p")
    state = SessionState()
    for code in ("S1", "P2", "P3", "S2", "P2", "P3", "S3", "P2", "P3", "S4", "P2", "P3", "S5",
                 "P2", "P3"):
        state = state.apply(Move.parse(code))
        store.append_process("s", 0, state)
    state = state.error()
    store.update("s", 0, state=state)
    assert store.read("s").flow_code == "S1P123S2P123S3P123S4P123S5P123X"
    state = state.apply(Move.finish("all tests pass"))
    store.update("s", 0, state=state)
    record = store.read("s")
    assert record.status == "done" and record.state.finished
    assert record.state.justification == "all tests pass"
    assert record.to_dict()["flow_code"] == "S1P123S2P123S3P123S4P123S5P123X"
    with pytest.raises(ValueError, match="status"):
        store.update("s", 0, status="sleeping")


def test_notes_actions_resources(store):
    store.create("s", "p")
    store.add_note("s", 0, "first", source="human", index=1)
    store.add_note("s", 0, "second")
    store.add_action("s", 0, {"type": "edit_file", "path": "a.py"}, index=1)
    store.set_resources("s", 0, {"memory": {"peak": 10}, "time": {"agent": 1.5}})
    record = store.read("s")
    assert [n["text"] for n in record.notes] == ["first", "second"]
    assert record.notes[0]["source"] == "human" and record.notes[0]["epoch"] == 0
    assert record.actions[0]["path"] == "a.py"
    assert record.resources["memory"] == {"peak": 10}


def test_consultation_deadline_survives_a_resume(store):
    store.create("s", "p")
    before = time.time()
    c = store.ask("s", 0, 9, "S3P3", "ship it?", timeout=60)
    assert before + 59 < c.deadline <= time.time() + 60 and c.open
    assert store.read("s").status == "waiting"
    assert store.read("s").open_consultation.question == "ship it?"
    again = store.ask("s", 1, 9, "S3P3", "ship it?", timeout=60)  # a resumed driver
    assert again.deadline == c.deadline and again.time_left(c.deadline - 5) == 5
    done = store.settle("s", 1, c.id, "model says yes", timed_out=True, substituted=True)
    assert done.substituted and done.timed_out and done.source == "model"
    record = store.read("s")
    assert record.status == "running" and record.open_consultation is None
    assert record.consultations[0].answer == "model says yes"
    assert json.loads(store._read_bytes(store._path("s", "consultations", "0009-S3P3.json"))
                      )["deadline_at"].startswith("20")
    with pytest.raises(SessionError, match="already settled"):
        store.settle("s", 1, c.id, "human: no")
    with pytest.raises(SessionError, match="asked no question"):
        store.settle("s", 1, "0001-S1P1", "?")
    c2 = store.ask("s", 1, 5, "S2P2", "which db?", deadline=before + 1000)
    assert c2.deadline == before + 1000
    assert store.settle("s", 1, c2.id, "postgres").source == "human"


def test_calls_and_tokens_respent(store):
    store.create("s", "p")
    s1, s2 = walk("S1", "P2")
    t = store.begin_call("s", 0, 1, "S1P1")
    assert t.attempt == 1 and not t.respent
    store.record_tokens("s", 0, t, model="m", input_tokens=100, output_tokens=20, role="coder")
    store.append_process("s", 0, s1)
    with pytest.raises(SnapshotConflict, match="never made again"):
        store.begin_call("s", 1, 1, "S1P1")
    # Process 2: the first call is cut off by a crash, the resumed driver makes it again.
    store.begin_call("s", 0, 2, "S1P2")
    t2 = store.begin_call("s", 1, 2, "S1P2")
    assert t2.attempt == 2 and t2.respent
    store.record_tokens("s", 1, t2, model="m", input_tokens=50, output_tokens=5)
    store.append_process("s", 1, s2)
    record = store.read("s")
    assert record.respent == 1
    assert record.tokens_total() == {"input": 150, "output": 25, "respent": 55}
    assert [x["respent"] for x in record.tokens] == [False, True]
    assert files(store, "s", "tokens") == ["0001-S1P1-1.json", "0002-S1P2-2.json"]


def test_list_sessions_states(store):
    store.create("a", "pa")
    store.create("b", "pb")
    store.create("c", "pc")
    store.create("d", "pd")
    store.ask("b", 0, 1, "S2P2", "?")
    done = SessionState()
    for code in ("S1", "P2", "P3", "S2", "P2", "P3", "S3", "P2", "P3", "S4", "P2", "P3", "S5",
                 "P2", "P3"):
        done = done.apply(Move.parse(code))
        store.append_process("c", 0, done)
    store.update("c", 0, state=done.apply(Move.finish("ok")))
    store.update("d", 0, status="interrupted")
    listed = {s.id: s.status for s in store.list_sessions()}
    assert listed == {"a": "running", "b": "waiting", "c": "done", "d": "interrupted"}
    listed = {s.id: s.status for s in store.list_sessions(live={"b"})}
    assert listed == {"a": "interrupted", "b": "waiting", "c": "done", "d": "interrupted"}
    assert [s.id for s in store.list_sessions()] == ["a", "b", "c", "d"]
    assert store.list_sessions()[2].to_dict()["flow_code"] == "S1P123S2P123S3P123S4P123S5P123"
    assert SessionStore(store.url + "-empty").list_sessions() == []


def test_check_resumable_refuses_a_changed_process(store):
    store.create("s", "p")
    store.append_process("s", 0, walk("S1")[0])
    path = store._path("s", "processes", "0001-S1P1.json")
    data = json.loads(store._read_bytes(path))
    data["name"] = "Scrape"
    store._write(path, json.dumps(data).encode())
    with pytest.raises(SnapshotConflict, match="'Scrape'.*'Research'"):
        store.read("s").check_resumable()


def test_local_writes_leave_no_temp_files(tmp_path):
    store = SessionStore(str(tmp_path))
    store.create("s", "p")
    for st in walk("S1", "P2"):
        store.append_process("s", 0, st)
    leftovers = [f for _, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".tmp")]
    assert leftovers == []
    assert pickle.loads(pickle.dumps(store)).read("s").flow_code == "S1P12"


def test_a_failed_local_write_leaves_no_temp_file(tmp_path):
    store = SessionStore(str(tmp_path))
    store.create("s", "p")
    path = store._path("s", "busy.json")
    os.makedirs(os.path.join(path, "inside"))  # a folder in the way: the rename fails
    with pytest.raises(SessionError, match="cannot write .*busy.json"):
        store._write(path, b"{}")
    leftovers = [f for _, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".tmp")]
    assert leftovers == []


def test_unreachable_store_is_a_clear_error():
    with pytest.raises(SessionError, match="session store 'nosuchproto://x'"):
        SessionStore("nosuchproto://x")


def test_s3_store(s3_bucket):
    bucket, _ = s3_bucket
    from obdask import config

    url = f"s3://{bucket}/sessions"
    store = SessionStore(url, config.storage_options(url))
    store.create("s", "p", epoch=1)
    s1, s2 = walk("S1", "P2")
    store.append_process("s", 1, s1)
    with pytest.raises(SessionExists):
        store.create("s", "p")
    store.claim("s", 2)
    with pytest.raises(LeaseLost):
        store.append_process("s", 1, s2)
    store.append_process("s", 2, s2)
    with pytest.raises(SnapshotConflict):
        store.append_process("s", 2, s2, {"other": 1})
    record = SessionStore(url, config.storage_options(url)).read("s")
    assert record.flow_code == "S1P12" and record.epoch == 2
    assert [s.status for s in store.list_sessions()] == ["running"]


def test_open_store_from_config(tmp_path):
    import dask

    from obdask.session.store import open_store

    store = open_store(workspace=str(tmp_path))
    assert store.url == str(tmp_path / ".obdask" / "sessions")
    with dask.config.set({"obdask.sessions.store": "memory://cfg-sessions",
                          "obdask.sessions.consultation-timeout": "5s"}):
        store = open_store()
        assert store.url == "memory://cfg-sessions"
        store.create("q", "p")
        c = store.ask("q", 0, 1, "S2P2", "?")
        assert 4 < c.deadline - c.asked <= 5
    assert open_store("memory://explicit").url == "memory://explicit"


def test_session_package_does_not_import_distributed():
    import subprocess
    import sys

    code = ("import sys, obdask.session, obdask.session.store; "
            "print('distributed' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_update_refuses_a_state_that_is_not_recorded(store):
    store.create("s", "p")
    s1, s2 = walk("S1", "P2")
    store.append_process("s", 0, s1)
    with pytest.raises(SnapshotConflict, match="append_process first"):
        store.update("s", 0, state=s2)
    store.update("s", 0, state=s1.error())
    assert SessionStore(store.url).read("s").flow_code == "S1P1X"
    fresh = SessionStore(store.url)  # no memory of its own writes
    fresh.update("s", 0, state=s1.error().error())
    assert fresh.read("s").flow_code == "S1P1XX"


def test_light_read_for_listing(store):
    store.create("s", "p")
    for st in walk("S1", "P2", "P3"):
        store.append_process("s", 0, st)
    store.add_note("s", 0, "n")
    store._write(store._path("s", "processes", "0003-S1P3.json"), b"{broken")
    light = store.read("s", full=False)
    assert light.flow_code == "S1P12" and [s.index for s in light.snapshots] == [2]
    assert light.notes == [] and light.damaged
    assert store.read("s").notes[0]["text"] == "n"


def test_unreachable_s3_store_is_a_one_line_session_error():
    pytest.importorskip("s3fs")
    store = SessionStore("s3://bucket1/sessions", {
        "endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s",
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}})
    with pytest.raises(SessionError, match=r"cannot .*s3://bucket1/sessions/a/meta.json") as e:
        store.create("a", "p")
    assert "\n" not in str(e.value)
