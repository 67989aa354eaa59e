"""A real ``dask scheduler`` (with the obdask preload) and its worker killed under a
running session; on a new cluster the session lists as interrupted and a resume (by a
client, or by the scheduler itself with ``obdask.sessions.auto-resume``) finishes it
from the durable store (a local folder, or ``s3://`` on the loopback S3 server) without
repeating a recorded process."""

from __future__ import annotations

import json
import time

import dask
import pytest

from obdask.session.api import Session
from obdask.session.store import SessionStore
from obdask.testing import OllamaTestServer
from tests.cluster_utils import ProcessCluster
from tests.session.scripted import FULL, MODELS, Model

pytestmark = pytest.mark.slow  # real scheduler and worker processes

ROLES = {role: {"model": name, "gpu": 0, "vram": 0} for role, name in MODELS.items()}


def _settings(server, store):
    return {"obdask.llm.endpoints": [server.url], "obdask.placement.models": ROLES,
            "obdask.sessions.store": store, "obdask.sessions.consultation-timeout": "0.3s"}


def _interrupted_session(tmp_path, m):
    """Start a session on a first cluster and kill it (SIGTERM, then SIGKILL) after
    a few processes; the session's id."""
    with ProcessCluster(tmp_path / "one") as pc:
        pc.add_worker("w1")
        pc.wait_for("w1")
        s = Session.start(pc.client, "prompt")
        deadline = time.monotonic() + 90
        while len(m.processes()) < 4:
            assert time.monotonic() < deadline, pc.logs()
            time.sleep(0.02)
    return s.id


def _check_finished(store, sid, m, options=None):
    record = SessionStore(store, options).read(sid)
    assert record.flow_code == FULL and record.state.finished
    assert [snap.index for snap in record.snapshots] == list(range(1, 16))
    assert record.epoch >= 2
    assert len(m.processes()) - 15 == record.respent <= 1


def test_scheduler_restart_then_resume(tmp_path):
    m = Model()
    store = str(tmp_path / "sessions")
    with OllamaTestServer(models=list(MODELS.values()), replies=m,
                          first_token_latency=0.05) as server:
        with dask.config.set(_settings(server, store)):
            sid = _interrupted_session(tmp_path, m)
            done_before = len(SessionStore(store).read(sid).snapshots)
            assert 3 <= done_before < 15
            with ProcessCluster(tmp_path / "two") as pc:
                pc.add_worker("w2")
                pc.wait_for("w2")
                listed = {x["id"]: x["state"] for x in Session.list(pc.client)}
                assert listed[sid] == "interrupted"
                r = Session.resume(pc.client, sid)
                final = r.wait(timeout=90)
                assert final["state"] == "done" and final["flow_code"] == FULL, pc.logs()
    _check_finished(store, sid, m)


def test_restarted_scheduler_auto_resumes_when_a_worker_arrives(tmp_path):
    m = Model()
    store = str(tmp_path / "sessions")
    with OllamaTestServer(models=list(MODELS.values()), replies=m,
                          first_token_latency=0.05) as server:
        settings = _settings(server, store)
        with dask.config.set(settings):
            sid = _interrupted_session(tmp_path, m)
            prefix = SessionStore(store).read(sid).flow_code
            config = tmp_path / "scheduler.yaml"  # the restarted scheduler's own config
            nested: dict = {}
            for key, value in {**settings, "obdask.sessions.auto-resume": True}.items():
                *path, last = key.split(".")
                node = nested
                for part in path:
                    node = node.setdefault(part, {})
                node[last] = value
            config.write_text(json.dumps(nested))
            with ProcessCluster(tmp_path / "two", {"DASK_CONFIG": str(config)}) as pc:
                # no worker yet: nothing resumed, the session shows as interrupted
                listed = {x["id"]: x["state"] for x in Session.list(pc.client)}
                assert listed[sid] == "interrupted"
                pc.add_worker("w2")
                deadline = time.monotonic() + 120
                while not SessionStore(store).read(sid, full=False).state.finished:
                    assert time.monotonic() < deadline, pc.logs()
                    time.sleep(0.2)
                starts = [e for e in Session(sid, pc.client).events()
                          if e["kind"] == "session-start"]
                assert [e["resumed"] for e in starts] == [True], starts  # by the scheduler
    assert FULL.startswith(prefix)
    _check_finished(store, sid, m)


def test_scheduler_restart_then_resume_from_an_s3_store(tmp_path, s3_bucket):
    name, _ = s3_bucket
    m = Model()
    store = f"s3://{name}/sessions"
    options = dask.config.get("obdask.storage-options")["s3"]
    with OllamaTestServer(models=list(MODELS.values()), replies=m,
                          first_token_latency=0.05) as server:
        with dask.config.set(_settings(server, store)):
            sid = _interrupted_session(tmp_path, m)
            before = SessionStore(store, options).read(sid)
            assert 3 <= len(before.snapshots) < 15
            with ProcessCluster(tmp_path / "two") as pc:
                pc.add_worker("w2")
                pc.wait_for("w2")
                listed = {x["id"]: x["state"] for x in Session.list(pc.client)}
                assert listed[sid] == "interrupted"
                final = Session.resume(pc.client, sid).wait(timeout=120)
                assert final["state"] == "done", pc.logs()
                assert final["flow_code"].startswith(before.flow_code)
    _check_finished(store, sid, m, options)
