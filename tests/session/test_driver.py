"""Sessions on the cluster: the driver task, the lease, events, consultations, resume.

One in-process LocalCluster (tcp, so a subprocess client can reach it) per module and
one Ollama-compatible test server per test.  The scripted orchestrator answers with the
default move of the flow code it is shown (or with what a test scripts instead).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import dask
import pytest
from click.testing import CliRunner

from obdask.exceptions import LeaseLost, SessionError, SessionExists, UnknownSession
from obdask.session.api import Session
from obdask.session.model import SessionState
from obdask.session.store import SessionStore
from tests.session.scripted import FULL


def test_session_runs_to_the_end_on_the_cluster(cluster, model, tmp_path):
    m, _ = model
    t0 = time.monotonic()
    s = Session.start(cluster, "Add a --json flag to the tool.")
    assert time.monotonic() - t0 < 5  # returns at once with the id
    final = s.wait(timeout=60)
    assert final["state"] == "done", final
    assert final["flow_code"] == FULL
    record = SessionStore(str(tmp_path / "sessions")).read(s.id)
    assert record.state.finished and len(record.snapshots) == 15
    assert [snap.index for snap in record.snapshots] == list(range(1, 16))
    assert m.processes() == [snap.position for snap in record.snapshots]  # each once
    (feedback,) = record.consultations
    assert feedback.position == "S3P3" and feedback.timed_out and feedback.substituted
    assert record.tokens_total()["input"] > 0 and record.respent == 0
    shown = s.show()
    assert shown["flow_code"] == FULL and shown["state"] == "done"
    assert shown["tokens"]["output"] > 0
    kinds = [e["kind"] for e in s.events()]
    assert kinds[0] == "session-start" and kinds[-1] == "session-complete"
    assert kinds.count("transition") == 15
    assert "consultation-asked" in kinds and "consultation-timed-out" in kinds
    seqs = [e["seq"] for e in s.events()]
    assert seqs == list(range(1, len(seqs) + 1))
    done = s.events()[-1]
    assert done["flow_code"] == FULL and done["success"] is True and done["duration"] > 0
    with pytest.raises(SessionExists):
        Session.start(cluster, "again", session_id=s.id)
    with pytest.raises(SessionError, match="asked nothing"):
        s.answer("too late")


def test_invalid_orchestrator_choice_asked_again_then_default(cluster, model, tmp_path):
    m, _ = model
    m.orchestrator = lambda code, n: {"move": "P3", "justification": "skip"} \
        if code == "S1P1" else None
    with dask.config.set({"obdask.sessions.clarify": True}):  # also ask at Plan P2
        s = Session.start(cluster, "prompt")
    final = s.wait(timeout=60)
    assert final["flow_code"] == FULL, final  # the default P2 was taken at S1P1
    assert [c for mm, c in m.log if mm == "orch"].count("S1P1") == 2  # asked again once
    record = SessionStore(str(tmp_path / "sessions")).read(s.id)
    notes = [n for n in record.notes if n.get("kind") == "default-move"]
    assert len(notes) == 1 and notes[0]["move"] == "P2" and "S1P1" in notes[0]["text"]
    assert any(e["kind"] == "default-move" for e in s.events())
    assert [(c.position, c.timed_out) for c in record.consultations] == [
        ("S2P2", True), ("S3P3", True)]


def test_consultation_answered_by_a_human(cluster, model, tmp_path):
    with dask.config.set({"obdask.sessions.consultation-timeout": "30s"}):
        s = Session.start(cluster, "prompt")
    deadline = time.monotonic() + 60
    while s.state()["state"] != "waiting":
        assert time.monotonic() < deadline, s.state()
        time.sleep(0.05)
    question = s.state()["question"]
    assert question["position"] == "S3P3" and question["deadline"] > time.time() + 20
    s.answer("Looks good; rename the flag to --as-json.")
    assert s.wait(timeout=60)["state"] == "done"
    record = SessionStore(str(tmp_path / "sessions")).read(s.id)
    (c,) = record.consultations
    assert c.answer.startswith("Looks good") and c.source == "human" and not c.timed_out
    feedback = next(snap for snap in record.snapshots if snap.position == "S3P3")
    assert "rename the flag" in feedback.payload["consultation"]["answer"]
    kinds = [e["kind"] for e in s.events()]
    assert "consultation-answered" in kinds and "consultation-timed-out" not in kinds


def test_resume_after_a_crash_repeats_nothing_recorded(cluster, model, tmp_path):
    m, _ = model
    # The driver dies after the model call of process 5 returned, before its record.
    s = Session.start(cluster, "prompt", _crash={"index": 5, "at": "after-call"})
    state = s.wait(timeout=60)
    assert state["state"] == "interrupted", state
    listed = {x["id"]: x["state"] for x in Session.list(cluster)}
    assert listed[s.id] == "interrupted"
    (error,) = [e for e in s.events() if e["kind"] == "driver-error"]
    assert "InjectedCrash" in error["error"]
    assert "InjectedCrash" in s.record().meta["error"]
    assert m.processes() == ["S1P1", "S1P2", "S1P3", "S2P1", "S2P2"]
    r = Session.resume(cluster, s.id)
    final = r.wait(timeout=60)
    assert final["state"] == "done" and final["flow_code"] == FULL
    record = SessionStore(str(tmp_path / "sessions")).read(s.id)
    assert [snap.index for snap in record.snapshots] == list(range(1, 16))
    # S2P2's call was cut off: made again once, labelled re-spent; nothing else twice.
    assert m.processes().count("S2P2") == 2
    assert len(m.processes()) == 16
    assert record.respent == 1 and record.tokens_total()["respent"] > 0
    assert record.epoch >= 2


def test_stale_driver_is_told_and_its_write_is_not_kept(cluster, model, tmp_path):
    m, server = model
    server.token_latency = 0.01  # slow enough to take the session over mid-way
    s = Session.start(cluster, "prompt")
    deadline = time.monotonic() + 60
    while len(m.processes()) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    r = Session.resume(cluster, s.id, takeover=True)
    with pytest.raises(LeaseLost) as lost_info:
        s.future.result(timeout=60)
    assert lost_info.value.epoch == 1 and lost_info.value.highest == 2
    server.token_latency = 0.0
    final = r.wait(timeout=60)
    assert final["state"] == "done" and final["flow_code"] == FULL
    record = SessionStore(str(tmp_path / "sessions")).read(s.id)
    assert [snap.index for snap in record.snapshots] == list(range(1, 16))
    assert record.epoch == 2
    # no write of the stale driver past the takeover point is part of the record
    store = SessionStore(str(tmp_path / "sessions"))
    taken_after = store._seals(s.id)[2]
    assert all(snap.epoch == 2 for snap in record.snapshots if snap.index > taken_after)
    assert all(snap.epoch == 1 for snap in record.snapshots if snap.index <= taken_after)
    lost = [e for e in s.events() if e["kind"] == "driver-superseded"]
    assert lost and lost[0]["epoch"] == 1


def test_session_goes_on_when_the_starting_client_exits(cluster, model, tmp_path):
    address = cluster.scheduler.address
    code = (
        "import dask, json, sys\n"
        "from distributed import Client\n"
        "from obdask.session.api import Session\n"
        f"dask.config.update(dask.config.config, json.loads(sys.argv[1]), priority='new')\n"
        f"c = Client({address!r})\n"
        "print(Session.start(c, 'prompt').id)\n"
        "c.close()\n"
    )
    conf = {"obdask": {k: dask.config.get(f"obdask.{k}") for k in ("llm", "placement",
                                                                   "sessions")}}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(conf)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    sid = out.stdout.strip().splitlines()[-1]
    final = Session(sid, cluster).wait(timeout=60)
    assert final["state"] == "done" and final["flow_code"] == FULL


def test_two_subscribers_get_the_same_events_in_order(cluster, model):
    from distributed import Client

    seen: list[list[dict]] = [[], []]
    subs = [Client(cluster.scheduler.address) for _ in range(2)]
    try:
        for sub, out in zip(subs, seen, strict=False):
            sub.subscribe_topic("obdask.sessions", lambda ev, out=out: out.append(ev[1]))
        time.sleep(0.2)
        s = Session.start(cluster, "prompt")
        assert s.wait(timeout=60)["state"] == "done"
        deadline = time.monotonic() + 10
        while not all(any(e["kind"] == "session-complete" and e["session"] == s.id
                          for e in out) for out in seen):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        for sub in subs:
            sub.close()
    one, two = ([e for e in out if e["session"] == s.id] for out in seen)
    assert one == two
    assert [e["seq"] for e in one] == list(range(1, len(one) + 1))
    assert all(a["time"] <= b["time"] for a, b in zip(one, one[1:], strict=False))
    # watch after the end: the history, then it returns at once
    lines: list[str] = []
    Session(s.id, cluster).watch(out=lines.append, timeout=10)
    assert len(lines) == len(one) and "session-complete" in lines[-1]


def test_cli(cluster, model, tmp_path):
    from obdask.cli import main

    runner = CliRunner()
    addr = ["--scheduler", cluster.scheduler.address]
    res = runner.invoke(main, ["session", "start", "Do it", *addr, "--wait", "--json"])
    assert res.exit_code == 0, res.output
    started = json.loads(res.output)
    assert started["state"] == "done" and started["flow_code"] == FULL
    sid = started["id"]
    res = runner.invoke(main, ["session", "show", sid, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["flow_code"] == FULL
    res = runner.invoke(main, ["session", "list", "--json", *addr])
    assert sid in {s["id"] for s in json.loads(res.output)["sessions"]}
    res = runner.invoke(main, ["session", "watch", sid, *addr])
    assert res.exit_code == 0 and "session-complete" in res.output
    for args, message in (
            (["session", "show", "nope"], "no session 'nope'"),
            (["session", "answer", sid, "hi", *addr], "asked nothing"),
            (["session", "start", "x", "--id", sid, *addr], "already exists"),
            (["session", "start", "x", "--store", "/dev/null/x", *addr], "cannot write"),
            (["session", "answer", "nope", "hi", *addr], "no session 'nope'"),
    ):
        res = runner.invoke(main, args)
        assert res.exit_code == 2, res.output
        assert message in res.output and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1
    with pytest.raises(UnknownSession):
        Session("nope", cluster).show()


def test_consultation_deadline_holds_across_a_resume(cluster, model, tmp_path):
    with dask.config.set({"obdask.sessions.consultation-timeout": "3s"}):
        s = Session.start(cluster, "prompt", _crash={"index": 9, "at": "after-ask"})
        assert s.wait(timeout=60)["state"] == "interrupted"
        (asked,) = s.record().consultations
        assert asked.open and asked.position == "S3P3"
        time.sleep(1.0)
    with dask.config.set({"obdask.sessions.consultation-timeout": "30s"}):
        r = Session.resume(cluster, s.id)  # waits only for what is left of the 3 s
        assert r.wait(timeout=60)["state"] == "done"
    (c,) = r.record().consultations
    assert c.deadline == asked.deadline and c.timed_out and c.substituted
    assert c.answered - c.asked < 3 + 2  # not a fresh 30 s wait


def test_cancel_a_waiting_session(cluster, model, tmp_path):
    with dask.config.set({"obdask.sessions.consultation-timeout": "30s"}):
        s = Session.start(cluster, "prompt")
    deadline = time.monotonic() + 60
    while s.state()["state"] != "waiting":
        assert time.monotonic() < deadline, s.state()
        time.sleep(0.05)
    t0 = time.monotonic()
    assert s.cancel()["live"] is True
    final = s.wait(timeout=30)
    assert final["state"] == "cancelled" and time.monotonic() - t0 < 10
    assert s.record().status == "cancelled"
    done = [e for e in s.events() if e["kind"] == "session-complete"]
    assert done and done[-1]["success"] is False and done[-1]["status"] == "cancelled"
    with pytest.raises(SessionError, match="cancelled"):
        Session.resume(cluster, s.id)


def test_extension_leases_refusals_and_bound(cluster):
    from obdask.server import install

    install(cluster)

    def rpc(op, **kw):
        return cluster.sync(getattr(cluster.scheduler, op), **kw)

    first = rpc("obdask_session_acquire", session="lease-x", holder="a", at_least=4)
    assert first == {"ok": True, "epoch": 5}  # above the store's highest epoch
    held = rpc("obdask_session_acquire", session="lease-x", holder="b")
    assert not held["ok"] and "driven by epoch 5" in held["error"]
    second = rpc("obdask_session_acquire", session="lease-x", holder="b", takeover=True)
    assert second["epoch"] == 6
    stale = rpc("obdask_session_update", session="lease-x", epoch=5, state={"state": "done"})
    assert stale["lost"] and "superseded by epoch 6" in stale["error"]
    assert rpc("obdask_session_get", session="lease-x")["state"] == "running"
    nothing = rpc("obdask_session_answer", session="lease-x", answer="hi")
    assert not nothing["ok"] and "asked nothing" in nothing["error"]
    q = {"id": "0009-S3P3", "position": "S3P3", "question": "ok?", "deadline": 0}
    rpc("obdask_session_update", session="lease-x", epoch=6, state={"question": q})
    assert rpc("obdask_session_answer", session="lease-x", answer="yes")["ok"]
    got = rpc("obdask_session_wait_answer", session="lease-x", consultation=q["id"], timeout=5)
    assert got["answer"] == "yes"
    client_id = cluster.id
    rpc("obdask_session_acquire", session="lease-y", holder=client_id)
    assert rpc("obdask_session_get", session="lease-y")["live"]

    def shrink(dask_scheduler):
        ext = dask_scheduler.extensions["obdask"].extensions["sessions"]
        ext.max_sessions = len(ext.sessions)
        ext.remove_client(dask_scheduler, client_id)  # as when the client goes
        return len(ext.sessions)

    n = cluster.run_on_scheduler(shrink)
    y = rpc("obdask_session_get", session="lease-y")
    assert y["state"] == "interrupted" and not y["live"]
    for i in range(3):
        rpc("obdask_session_register", session=f"bound-{i}", key=f"k-{i}")
    assert len(rpc("obdask_session_list")) == n  # bounded: the oldest idle ones dropped
    assert rpc("obdask_session_get", session="lease-x") is not None  # held: kept


def test_resume_refuses_a_record_this_code_does_not_run(cluster, tmp_path):
    from obdask.exceptions import SnapshotConflict
    from obdask.session.model import Move

    store = SessionStore(str(tmp_path / "sessions"))
    store.create("changed", "prompt")
    store.claim("changed", 1)
    snap = store.append_process("changed", 1, SessionState().apply(Move.enter(1)))
    path = tmp_path / "sessions" / "changed" / "processes" / snap.filename
    path.write_text(path.read_text().replace('"Research"', '"Gather"'))
    with pytest.raises(SnapshotConflict, match="refusing to resume"):
        Session.resume(cluster, "changed", store=store)


def test_cancel_without_a_driver_is_recorded(cluster, tmp_path):
    store = SessionStore(str(tmp_path / "sessions"))
    store.create("idle", "prompt")
    assert Session("idle", cluster, store).cancel() == {"id": "idle", "cancelled": True,
                                                         "live": False}
    assert store.read("idle").status == "cancelled"
    with pytest.raises(SessionError, match="cancelled"):
        Session.resume(cluster, "idle", store=store)


def test_process_errors_are_recorded_then_the_session_fails(cluster, model, tmp_path):
    _, server = model
    server.remove_model("coder:1b")  # every coder process fails: 404 on every endpoint
    with dask.config.set({"obdask.sessions.max-errors": 1}):
        s = Session.start(cluster, "prompt")
    final = s.wait(timeout=60)
    assert final["state"] == "failed" and final["flow_code"] == "S1P123XX", final
    record = s.record()
    assert record.status == "failed" and len(record.snapshots) == 3
    assert sum(1 for n in record.notes if n.get("kind") == "process-error") == 2
    events = s.events()
    assert [e["kind"] for e in events].count("process-error") == 2
    assert events[-1]["kind"] == "session-complete" and events[-1]["success"] is False
