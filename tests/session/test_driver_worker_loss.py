"""A worker process killed under a running session driver: Dask runs the driver again on
another worker, it takes a new epoch and continues from the store without repeating a
recorded process."""

from __future__ import annotations

import logging
import os
import signal
import time

import dask
import pytest

from obdask.session.api import Session
from obdask.session.store import SessionStore
from obdask.testing import OllamaTestServer
from tests.session.scripted import FULL, MODELS, Model

pytestmark = pytest.mark.slow  # a LocalCluster of worker processes


def test_worker_killed_under_the_driver(tmp_path):
    from distributed import Client, LocalCluster

    m = Model()
    # A killed worker's model-call slot (a distributed.Semaphore lease) is only freed
    # after distributed.scheduler.locks.lease-timeout (30 s): more slots than calls.
    with dask.config.set({"obdask.llm.slots": 8}), \
            OllamaTestServer(models=list(MODELS.values()), replies=m,
                             first_token_latency=0.05) as server, \
            LocalCluster(n_workers=2, threads_per_worker=2, processes=True,
                         dashboard_address=":0", silence_logs=logging.CRITICAL) as cl, \
            Client(cl) as client:
        models = {role: {"model": name, "gpu": 0, "vram": 0} for role, name in MODELS.items()}
        with dask.config.set({"obdask.llm.endpoints": [server.url],
                              "obdask.placement.models": models,
                              "obdask.sessions.store": str(tmp_path / "sessions"),
                              "obdask.sessions.consultation-timeout": "0.3s"}):
            s = Session.start(client, "prompt")
        deadline = time.monotonic() + 60
        while len(m.processes()) < 4:
            assert time.monotonic() < deadline, m.log
            time.sleep(0.02)
        key = s.future.key
        (worker,) = [w for w, keys in client.processing().items() if key in keys]
        pid = client.run(os.getpid, workers=[worker])[worker]
        os.kill(pid, signal.SIGKILL)  # the nanny starts a fresh worker
        final = s.wait(timeout=90)  # not "interrupted" meanwhile: the driver runs again
        assert final["state"] == "done", final
        kinds = [e["kind"] for e in s.events()]
        assert "driver-lost" in kinds and "interrupted" not in kinds
        assert final["flow_code"] == FULL
    record = SessionStore(str(tmp_path / "sessions")).read(s.id)
    assert [snap.index for snap in record.snapshots] == list(range(1, 16))
    assert record.epoch >= 2
    done = [snap.position for snap in record.snapshots]
    # every recorded process ran once; only a call cut off by the kill ran twice
    assert len(m.processes()) - len(done) == record.respent <= 1
