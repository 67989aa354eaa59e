"""Preloads and plugins: in-process clusters, then real ``dask`` subprocesses (slow)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import dask
import pytest
from distributed import Client, Worker
from distributed.utils_test import gen_cluster

from obdask.interpreter import needs_guard
from obdask.placement import warm_workers
from obdask.preload.worker import dask_setup as worker_setup
from obdask.server import NAME as PLUGIN_NAME
from obdask.server import WORKER_PLUGIN_NAME, extension, install
from obdask.server.locality import LocalityExtension
from obdask.server.worker import DASK_PROFILER, report_warm, state_of
from tests.cluster_utils import kill, spawn


def lanes_of(resources):
    return sorted(k for k in resources if k.startswith("lane-"))


# ------------------------------------------------------------ worker preload


def test_worker_preload_options_parse():
    ctx = worker_setup.make_context("dask_setup", ["--lanes=2,3", "--ollama-endpoint", "h:1"])
    assert ctx.params["lanes"] == "2,3" and ctx.params["ollama_endpoint"] == "h:1"
    ctx = worker_setup.make_context("dask_setup", ["--preload-argv", "--lanes 2 --no-detect"])
    assert ctx.params["argv"] == "--lanes 2 --no-detect"


@gen_cluster(client=True, nthreads=[])
async def test_worker_preload_declares_before_registration(c, s):
    async with Worker(
        s.address,
        nthreads=1,
        resources={"CPU": 3, "FOO": 1},
        preload=["obdask.preload.worker"],
        preload_argv=["--lanes=2", "--ollama-endpoint", "127.0.0.1:9"],
    ) as w:
        res = s.workers[w.address].resources
        assert res["GPU"] == 0 and res["VRAM"] == 0 and res["MEM"] > 0
        assert res["CPU"] == 3 and res["FOO"] == 1
        assert lanes_of(res) == ["lane-2"]
        assert state_of(w).lanes == (2,) and state_of(w).local_endpoint == "127.0.0.1:9"
        assert w.state.available_resources == w.state.total_resources


@gen_cluster(client=True, nthreads=[])
async def test_worker_preload_compat_argv_and_no_detect(c, s):
    async with Worker(
        s.address,
        nthreads=1,
        preload=["obdask.preload.worker"],
        preload_argv=["--preload-argv", "--lanes 3-4 --no-detect"],
    ) as w:
        res = s.workers[w.address].resources
        assert res == {"lane-3": 1e6, "lane-4": 1e6}


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_configure_registered_worker_late(c, s, a):
    from obdask.preload.worker import configure_worker

    await configure_worker(a, lanes="1-3", detect=False)
    await configure_worker(a, lanes="3")
    res = s.workers[a.address].resources
    assert res["lane-3"] == 1e6 and res["lane-1"] == 0 and res["MEM"] > 0
    assert lanes_of({k: v for k, v in res.items() if v}) == ["lane-3"]


# ------------------------------------------------------- scheduler + plugins


@gen_cluster(client=True, scheduler_kwargs={"preload": ["obdask.preload.scheduler"]})
async def test_scheduler_preload_installs_plugins(c, s, a, b):
    assert PLUGIN_NAME in s.plugins and WORKER_PLUGIN_NAME in s.worker_plugins
    assert WORKER_PLUGIN_NAME in a.plugins and WORKER_PLUGIN_NAME in b.plugins
    await install(c)  # idempotent: same plugin object stays
    plugin = s.plugins[PLUGIN_NAME]
    await install(c)
    assert s.plugins[PLUGIN_NAME] is plugin
    # workers without lanes were given every lane
    assert lanes_of(s.workers[a.address].resources) == lanes_of(
        {f"lane-{i}": 1 for i in range(1, 17)}
    )


@gen_cluster(client=True)
async def test_report_warm_and_query(c, s, a, b):
    assert await warm_workers(c, ["git:/r"]) == {"git:/r": []}  # not installed yet
    assert await c.submit(report_warm, "clone", "git:/r", workers=[a.address]) is False
    await install(c)
    assert await c.submit(report_warm, "clone", "git:/r", workers=[a.address], pure=False)
    assert await c.submit(report_warm, "clone", "git:/r", workers=[b.address], pure=False)
    assert report_warm("clone", "git:/r") is False  # not on a worker
    with pytest.raises(ValueError, match="kind"):
        report_warm("disk", "x")
    for _ in range(100):
        got = await warm_workers(c, ["git:/r", "git:/other"])
        if len(got["git:/r"]) == 2:
            break
        await asyncio.sleep(0.02)
    assert set(got["git:/r"]) == {a.address, b.address} and got["git:/other"] == []
    await a.close()
    for _ in range(100):
        if a.address not in s.workers:
            break
        await asyncio.sleep(0.02)
    assert (await warm_workers(c, ["git:/r"]))["git:/r"] == [b.address]
    assert a.address not in extension(s, "locality").by_worker


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_bad_stream_report_does_not_kill_worker(c, s, a):
    await install(c)
    a.batched_stream.send({"op": "obdask_locality_report", "kind": "clone", "keys": 5})
    a.batched_stream.send({"op": "obdask_locality_report", "kind": "clone", "key": "git:/k"})
    for _ in range(100):
        if (await warm_workers(c, ["git:/k"]))["git:/k"]:
            break
        await asyncio.sleep(0.02)
    assert (await warm_workers(c, ["git:/k"]))["git:/k"] == [a.address]


def test_scheduler_records_are_bounded():
    plugin = LocalityExtension(None, max_records=3)
    for i in range(5):
        assert plugin.locality_report("tcp://w:1", "clone", key=f"k{i}") == "OK"
    assert list(plugin.records) == ["k2", "k3", "k4"] and plugin.count == 3
    plugin.locality_report("tcp://w:2", "clone", key="k2")
    assert plugin.count == 3 and list(plugin.records) == ["k4", "k2"]
    assert plugin.locality_report("tcp://w:1", "bogus", key="x") == "ignored"
    plugin.locality_report("tcp://w:1", "model", keys=["model:a:latest"], replace=True)
    plugin.locality_report("tcp://w:1", "model", keys=["model:b:latest"], replace=True)
    assert plugin.locality_query(["model:a:latest", "model:b:latest", "k4"]) == {
        "model:a:latest": [],
        "model:b:latest": ["tcp://w:1"],
        "k4": [],  # evicted
    }


class FakeOllama:
    """A loopback HTTP server answering ``GET /api/ps`` from ``self.models``."""

    def __init__(self):
        self.models: list[str] = []
        self.server = None

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            ok = head.startswith(b"GET /api/ps ")
            body = json.dumps(
                {"models": [{"name": m, "model": m, "size_vram": 1} for m in self.models]}
            ).encode()
            status = b"200 OK" if ok else b"404 Not Found"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
                b"Content-Length: "
                + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_worker_plugin_reports_loaded_models(c, s, a):
    async with FakeOllama() as ollama:
        ollama.models = ["llama3.2:3b"]
        with dask.config.set(
            {"obdask.llm.local-endpoint": ollama.url, "obdask.placement.model-poll-interval": 0.05}
        ):
            await install(c)

        async def wait_for(key, expected):
            for _ in range(200):
                got = (await warm_workers(c, [key]))[key]
                if got == expected:
                    return
                await asyncio.sleep(0.02)
            raise AssertionError(f"{key}: {got} != {expected}")

        await wait_for("model:llama3.2:3b", [a.address])
        ollama.models = ["qwen2.5-coder:14b"]
        await wait_for("model:qwen2.5-coder:14b", [a.address])
        await wait_for("model:llama3.2:3b", [])
    # server gone: the worker reports no models, silently
    await wait_for("model:qwen2.5-coder:14b", [])


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_worker_plugin_unreachable_endpoint_is_silent(c, s, a):
    with dask.config.set(
        {"obdask.llm.local-endpoint": "127.0.0.1:9", "obdask.placement.model-poll-interval": 0.05}
    ):
        await install(c)
    await asyncio.sleep(0.3)
    assert a.status.name == "running" and a.address in s.workers


# ------------------------------------------------------ real subprocesses


@pytest.fixture
def cli_cluster(tmp_path):
    procs: list[subprocess.Popen] = []
    sched_file = tmp_path / "scheduler.json"
    try:
        procs.append(
            spawn(
                [
                    "scheduler",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "0",
                    "--no-dashboard",
                    "--scheduler-file",
                    str(sched_file),
                    "--preload",
                    "obdask.preload.scheduler",
                ],
                tmp_path / "scheduler.log",
            )
        )
        deadline = time.monotonic() + 60
        while not sched_file.exists() or not sched_file.read_text().strip():
            assert procs[0].poll() is None, (tmp_path / "scheduler.log").read_text()
            assert time.monotonic() < deadline, "scheduler did not start"
            time.sleep(0.1)
        time.sleep(0.2)
        address = json.loads(sched_file.read_text())["address"]
        common = ["--host", "127.0.0.1", "--no-dashboard", "--nthreads", "1"]
        specs = {
            "wa": ["--resources", "CPU=3 GPU=1", "--preload", "obdask.preload.worker"],
            "wb": [
                "--resources",
                "MEM=1e9",
                "--preload",
                "obdask.preload.worker",
                "--lanes=2",
                "--ollama-endpoint",
                "http://127.0.0.1:9",
            ],
        }
        for name, extra in specs.items():
            local = tmp_path / name
            local.mkdir()
            args = [
                "worker",
                address,
                *common,
                "--name",
                name,
                "--local-directory",
                str(local),
                *extra,
            ]
            procs.append(spawn(args, tmp_path / f"{name}.log"))
        with Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=60)
            yield client
    finally:
        kill(procs)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_cli_cluster_resources_and_plugin(cli_cluster):
    client = cli_cluster
    workers = {w["name"]: w for w in client.scheduler_info()["workers"].values()}
    wa, wb = workers["wa"]["resources"], workers["wb"]["resources"]
    assert wa["GPU"] == 1 and wa["CPU"] == 3 and wa["VRAM"] == 0 and wa["MEM"] > 1e9
    assert wb["GPU"] == 0 and wb["VRAM"] == 0 and wb["MEM"] == 1e9 and wb["CPU"] >= 1
    assert lanes_of(wa) == sorted(f"lane-{i}" for i in range(1, 17))
    assert lanes_of(wb) == ["lane-2"]
    plugins = client.run_on_scheduler(
        lambda dask_scheduler: (list(dask_scheduler.plugins), list(dask_scheduler.worker_plugins))
    )
    assert PLUGIN_NAME in plugins[0] and WORKER_PLUGIN_NAME in plugins[1]
    settings = client.run(
        lambda dask_worker: (state_of(dask_worker).lanes, state_of(dask_worker).local_endpoint)
    )
    assert sorted(settings.values(), key=str) == sorted(
        [(None, None), ((2,), "http://127.0.0.1:9")], key=str
    )
    if needs_guard():  # CPython 3.11: the profilers' sys._current_frames is guarded
        def frames_module():
            return sys._current_frames.__module__

        assert set(client.run(frames_module).values()) == {"obdask.interpreter"}
        assert client.run_on_scheduler(frames_module) == "obdask.interpreter"
    # Dask's statistical profiler is off on obdask's workers (obdask.metrics.dask-profile)
    assert set(client.run(lambda dask_worker: DASK_PROFILER in dask_worker.periodic_callbacks)
               .values()) == {False}
    install(client)  # idempotent on a preloaded scheduler
    addr_b = next(a for a, w in client.scheduler_info()["workers"].items() if w["name"] == "wb")
    assert client.submit(report_warm, "clone", "git:/srv/r", workers=[addr_b]).result()
    for _ in range(100):
        if warm_workers(client, ["git:/srv/r"])["git:/srv/r"] == [addr_b]:
            break
        time.sleep(0.05)
    assert warm_workers(client, ["git:/srv/r"]) == {"git:/srv/r": [addr_b]}
