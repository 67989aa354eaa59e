"""Fixtures of the session tests on a cluster: one in-process LocalCluster (tcp, so a
subprocess client can reach it) per module and an Ollama-compatible test server per test
(replies: :class:`tests.session.scripted.Model`)."""

from __future__ import annotations

import logging

import dask
import pytest

from obdask.testing import OllamaTestServer
from tests.session.scripted import MODELS, Model


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=2, processes=False, protocol="tcp",
                      dashboard_address=":0", silence_logs=logging.CRITICAL) as cl:
        with Client(cl) as client:
            yield client


@pytest.fixture
def model(tmp_path):
    m = Model()
    with OllamaTestServer(models=list(MODELS.values()), replies=m) as server:
        models = {role: {"model": name, "gpu": 0, "vram": 0} for role, name in MODELS.items()}
        with dask.config.set({"obdask.llm.endpoints": [server.url],
                              "obdask.placement.models": models,
                              "obdask.sessions.store": str(tmp_path / "sessions"),
                              "obdask.sessions.consultation-timeout": "0.3s",
                              "obdask.llm.backoff": "0.01s"}):
            yield m, server
