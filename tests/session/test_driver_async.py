"""Sessions from an asynchronous client (gen_cluster: scheduler and workers in the test's loop)."""

from __future__ import annotations

import asyncio
import tempfile

import dask
from distributed.utils_test import gen_cluster

from obdask.session.api import Session
from obdask.testing import OllamaTestServer
from tests.session.scripted import FULL, MODELS, Model


@gen_cluster(client=True, nthreads=[("127.0.0.1", 2)] * 2, timeout=120)
async def test_async_client_start_answer_wait(c, s, a, b):
    m = Model()
    with OllamaTestServer(models=list(MODELS.values()), replies=m) as server:
        models = {role: {"model": name, "gpu": 0, "vram": 0} for role, name in MODELS.items()}
        with dask.config.set({"obdask.llm.endpoints": [server.url],
                              "obdask.placement.models": models,
                              "obdask.sessions.store": tempfile.mkdtemp(),
                              "obdask.sessions.consultation-timeout": "30s"}):
            session = await Session.start_async(c, "prompt")
            for _ in range(600):
                if (await session.state_async())["state"] == "waiting":
                    break
                await asyncio.sleep(0.05)
            assert await session.answer_async("fine") == "0009-S3P3"
            final = await session.wait_async(timeout=60)
    assert final["state"] == "done" and final["flow_code"] == FULL
