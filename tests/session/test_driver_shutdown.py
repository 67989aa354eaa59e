"""A driver cut off by its cluster's shutdown ends quietly: no error logged, the session
recorded as interrupted, and another cluster resumes it to the end."""

from __future__ import annotations

import logging
import time

import dask

from obdask.session.api import Session
from obdask.session.store import SessionStore
from obdask.testing import OllamaTestServer
from tests.session.scripted import FULL, MODELS, Model


def _cluster():
    from distributed import LocalCluster

    return LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                        dashboard_address=":0", silence_logs=logging.CRITICAL)


def test_a_driver_cut_off_by_cluster_shutdown_ends_quietly(tmp_path, caplog):
    from distributed import Client

    m = Model()
    store = SessionStore(str(tmp_path / "sessions"))
    with OllamaTestServer(models=list(MODELS.values()), replies=m,
                          first_token_latency=0.1) as server:
        models = {role: {"model": name, "gpu": 0, "vram": 0} for role, name in MODELS.items()}
        with dask.config.set({"obdask.llm.endpoints": [server.url],
                              "obdask.placement.models": models,
                              "obdask.sessions.store": store.url,
                              "obdask.sessions.consultation-timeout": "0.3s"}):
            with caplog.at_level(logging.INFO, logger="obdask"):
                with _cluster() as cl, Client(cl) as client:
                    s = Session.start(client, "Cut me off.")
                    deadline = time.monotonic() + 60
                    while len(m.processes()) < 2:  # mid-session, a call in flight
                        assert time.monotonic() < deadline, m.log
                        time.sleep(0.02)
                # the driver's thread outlives its worker: wait for its last word
                deadline = time.monotonic() + 30
                while store.read(s.id, full=False).stored_status == "running":
                    assert time.monotonic() < deadline, "the driver recorded nothing"
                    time.sleep(0.05)
            record = store.read(s.id)
            assert record.stored_status == "interrupted"
            assert "NoneType" not in caplog.text
            errors = [r for r in caplog.records
                      if r.levelno >= logging.ERROR and r.name.startswith("obdask")]
            assert errors == [], [r.getMessage() for r in errors]
            assert any("cut off" in r.getMessage() for r in caplog.records)
            # resumable: a new cluster continues after the last recorded process
            with _cluster() as cl, Client(cl) as client:
                final = Session.resume(client, s.id).wait(timeout=90)
    assert (final["state"], final["flow_code"]) == ("done", FULL), final
    snaps = store.read(s.id).snapshots
    assert [snap.index for snap in snaps] == list(range(1, 16))
