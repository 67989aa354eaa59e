"""A real ``dask scheduler`` (with the obdask preload) and its worker killed under a
running session; on a new cluster the session lists as interrupted and a resume
finishes it from the durable store without repeating a recorded process."""

from __future__ import annotations

import time

import dask
import pytest

from obdask.session.api import Session
from obdask.session.store import SessionStore
from obdask.testing import OllamaTestServer
from tests.cluster_utils import ProcessCluster
from tests.session.scripted import FULL, MODELS, Model

pytestmark = pytest.mark.slow  # real scheduler and worker processes


def test_scheduler_restart_then_resume(tmp_path):
    m = Model()
    store = str(tmp_path / "sessions")
    with OllamaTestServer(models=list(MODELS.values()), replies=m,
                          first_token_latency=0.05) as server:
        models = {role: {"model": name, "gpu": 0, "vram": 0} for role, name in MODELS.items()}
        with dask.config.set({"obdask.llm.endpoints": [server.url],
                              "obdask.placement.models": models,
                              "obdask.sessions.store": store,
                              "obdask.sessions.consultation-timeout": "0.3s"}):
            with ProcessCluster(tmp_path / "one") as pc:
                pc.add_worker("w1")
                pc.wait_for("w1")
                s = Session.start(pc.client, "prompt")
                deadline = time.monotonic() + 90
                while len(m.processes()) < 4:
                    assert time.monotonic() < deadline, pc.logs()
                    time.sleep(0.02)
            # scheduler and worker are gone (SIGTERM, then SIGKILL)
            done_before = len(SessionStore(store).read(s.id).snapshots)
            assert 3 <= done_before < 15
            with ProcessCluster(tmp_path / "two") as pc:
                pc.add_worker("w2")
                pc.wait_for("w2")
                listed = {x["id"]: x["state"] for x in Session.list(pc.client)}
                assert listed[s.id] == "interrupted"
                r = Session.resume(pc.client, s.id)
                final = r.wait(timeout=90)
                assert final["state"] == "done" and final["flow_code"] == FULL, pc.logs()
    record = SessionStore(store).read(s.id)
    assert [snap.index for snap in record.snapshots] == list(range(1, 16))
    assert record.epoch >= 2
    assert len(m.processes()) - 15 == record.respent <= 1
