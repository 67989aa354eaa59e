"""Metrics (issue 12): worker samples, job and token records aggregated on the scheduler.

Real LocalCluster, real HTTP (the bundled Ollama test server and the
scheduler's ``/metrics``); nothing of Dask is mocked.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import tracemalloc
import urllib.request

import dask
import pytest
from click.testing import CliRunner

import obdask
from obdask import metrics
from obdask.plan import Plan
from obdask.server.worker import DASK_PROFILER
from obdask.testing import OllamaTestServer


def write_plan(folder, text):
    (folder / "plan.md").write_text(text)
    return Plan.from_file(folder / "plan.md")


@pytest.fixture(scope="module")
def cluster():
    """2 worker processes, dashboard on, samples every 200 ms, obdask installed."""
    from distributed import Client, LocalCluster

    with dask.config.set({"obdask.metrics.interval": "200ms"}):
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                          dashboard_address="127.0.0.1:0", silence_logs=logging.CRITICAL) as lc:
            with Client(lc) as client:
                from obdask.server import install

                install(client)
                yield lc, client


def wait_for(fetch, condition=bool, timeout=20.0):
    """``fetch()`` again until ``condition`` holds for what it returns; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if condition(value):
            return value
        assert time.monotonic() < deadline, f"condition not met in time: {value}"
        time.sleep(0.1)


def test_jobs_frame_one_row_per_job_with_worker_and_duration(tmp_path, cluster):
    _, client = cluster
    plan = write_plan(tmp_path, (
        "- [ ] id=a lane=1 payload=@cmd:sleep 0.3\n"
        "- [ ] id=b lane=2 payload=@cmd:echo hi\n"
        "- [ ] id=c lane=1 deps=a,b payload=@cmd:false\n"
    ))
    result = obdask.run(plan, client)
    ran = result.frame
    frame = wait_for(lambda: metrics.jobs(client),
                     lambda f: (f["run_id"] == result.run_id).sum() == 3)
    frame = frame[frame["run_id"] == result.run_id].set_index("step").sort_index()
    assert sorted(frame.index) == ["a", "b", "c"]
    for step in "abc":
        assert frame.loc[step, "worker"] == ran.loc[step, "worker"]
        assert frame.loc[step, "duration_s"] == pytest.approx(ran.loc[step, "duration_s"])
        assert frame.loc[step, "kind"] == "cmd"
        assert frame.loc[step, "attempts"] == 1
    assert frame.loc["a", "duration_s"] >= 0.3
    assert frame.loc["a", "lane"] == 1 and frame.loc["b", "lane"] == 2
    assert list(frame["status"]) == ["done", "done", "failed"]
    assert frame.loc["c", "exit_code"] == 1
    assert frame.loc["a", "job"] == f"{plan.plan_id}::a"

    def held(dask_scheduler):
        from obdask.server import extension

        return len(extension(dask_scheduler, "metrics")._attempts)

    # Attempt counters live only while the scheduler holds a job: none after the run.
    assert wait_for(lambda: client.run_on_scheduler(held), lambda n: n == 0) == 0

    def packed(dask_scheduler):
        from obdask.server import extension

        table = extension(dask_scheduler, "metrics").jobs
        return table.packed, len(table)

    # The workers' records came packed (obdask.server.jobtable), not one dict per job.
    got, held_records = client.run_on_scheduler(packed)
    assert got == held_records >= 3


def test_token_sums_equal_test_server_counts(tmp_path, cluster):
    _, client = cluster
    (tmp_path / "a.md").write_text("Summarise the design of the scheduler.")
    (tmp_path / "b.md").write_text("List three risks of the rollout plan, briefly.")
    (tmp_path / "c.md").write_text("Write a haiku about queues.")
    with OllamaTestServer(models=["llama3.2:3b", "qwen2.5-coder:7b"]) as server, \
            dask.config.set({"obdask.llm.endpoints": [server.url]}):
        plan = write_plan(tmp_path, (
            "- [ ] id=a lane=1 model=researcher payload=@file:a.md\n"
            "- [ ] id=b lane=1 model=researcher payload=@file:b.md\n"
            "- [ ] id=c lane=2 model=orchestrator payload=@file:c.md\n"
        ))
        result = obdask.run(plan, client)
        assert result.ok, result.frame[["status", "error"]]
        calls = {m: server.stats.calls_for(m) for m in ("llama3.2:3b", "qwen2.5-coder:7b")}
    assert [len(c) for c in calls.values()] == [2, 1]
    by_model = wait_for(lambda: metrics.tokens(client, by="model"),
                        lambda f: f["calls"].sum() >= 3)
    for model, served in calls.items():
        row = by_model.loc[model]
        assert row["input_tokens"] == sum(c["prompt_eval_count"] for c in served)
        assert row["output_tokens"] == sum(c["eval_count"] for c in served)
        assert row["calls"] == len(served)
    by_endpoint = metrics.tokens(client, by="endpoint")
    assert list(by_endpoint.index) == [server.url]
    assert by_endpoint["total_tokens"].sum() == by_model["total_tokens"].sum()
    by_job = metrics.tokens(client, by="job")
    assert by_job.loc[f"{plan.plan_id}::a", "calls"] == 1
    raw = metrics.tokens(client)
    assert set(raw["job"]) == {f"{plan.plan_id}::{s}" for s in "abc"}
    assert set(raw["worker"]) <= set(client.scheduler_info()["workers"])
    assert not raw["respent"].any()
    by_minute = metrics.tokens(client, by="time")
    assert by_minute["total_tokens"].sum() == by_model["total_tokens"].sum()
    # The job records of model steps name their model and kind (a job's record leaves
    # its worker after its calls' token records: maybe in a later batch).
    jobs = wait_for(lambda: metrics.jobs(client),
                    lambda f: (f["run_id"] == result.run_id).sum() == 3)
    mine = jobs[jobs["run_id"] == result.run_id].set_index("step")
    assert mine.loc["c", "model"] == "qwen2.5-coder:7b" and mine.loc["a", "kind"] == "model"


def test_workers_frame_has_samples_of_every_worker(cluster):
    _, client = cluster
    addresses = set(client.scheduler_info()["workers"])
    frame = wait_for(lambda: metrics.workers(client),
                     lambda f: set(f.index) == addresses and f["ts"].notna().all())
    for column in ("cpu_percent", "memory_used", "memory_total", "disk_used", "disk_total",
                   "gpus", "gpu_utilization", "vram_used", "vram_total", "ts"):
        assert column in frame.columns, column
    assert (frame["memory_total"] > 0).all()
    assert (frame["memory_used"] > 0).all()
    assert (frame["disk_total"] > 0).all()
    assert (frame["gpus"] == 0).all()  # no GPU on this machine: sampled cleanly as none
    assert (time.time() - frame["ts"] < 10).all()


def test_events_frame_lists_obdask_events(tmp_path, cluster):
    _, client = cluster
    plan = write_plan(tmp_path, "- [ ] id=x lane=1 payload=@cmd:false\n")
    obdask.run(plan, client)
    events = wait_for(lambda: metrics.events(client), lambda f: not f.empty)
    assert {"ts", "topic", "event"} <= set(events.columns)
    assert ((events["topic"] == "obdask-jobs") & (events["event"] == "failed")).any()


def test_budgets_frame(cluster):
    _, client = cluster
    from obdask.llm import budget

    budget.set_budget(client, "metrics-test", 10**9, window="1h")
    try:
        frame = metrics.budgets(client)
        assert frame.loc["metrics-test", "tokens"] == 10**9
    finally:
        budget.remove_budget(client, "metrics-test")


def test_memory_bound_holds_after_200k_records():
    from distributed import Scheduler

    from obdask.server import ObdaskPlugin, extension

    async def main():
        async with Scheduler(dashboard_address=None, port=0) as s:
            await s.register_scheduler_plugin(ObdaskPlugin(), idempotent=True)
            ext = extension(s, "metrics")
            with dask.config.set({"obdask.metrics.max-records": 5000}):
                ext.configure()
            feed = ext.stream_handlers["obdask_metrics_record"]

            def push(i):
                feed(worker=f"tcp://10.0.0.{i % 7}:1",
                     kind="tokens", record={"model": f"m{i % 3}", "endpoint": "http://e:1",
                                            "prompt_eval_count": 10, "eval_count": 5,
                                            "job": f"p::s{i}", "plan": "p", "ts": float(i),
                                            "total_duration": 1_000_000})
                feed(worker=f"tcp://10.0.0.{i % 7}:1", kind="job",
                     record={"job": f"p::s{i}", "plan": "p", "step": f"s{i}", "status": "done",
                             "duration_s": 0.1, "lane": 1, "kind": "cmd", "finished": float(i)})
                feed(worker=f"tcp://10.0.0.{i % 7}:1", kind="sample",
                     record={"ts": float(i), "cpu_percent": 1.0, "gpus": []})

            for i in range(150_000):
                push(i)
            # Traced from here (tracing all 200k would take minutes on 2 cores): with
            # full buffers, 25k more records must not leave more memory than 25k before.
            tracemalloc.start()
            try:
                for i in range(150_000, 175_000):
                    push(i)
                at_175k = tracemalloc.get_traced_memory()[0]
                for i in range(175_000, 200_000):
                    push(i)
                at_200k = tracemalloc.get_traced_memory()[0]
            finally:
                tracemalloc.stop()
            grown = at_200k - at_175k
            assert len(ext.jobs) == 5000 and len(ext.tokens) == 5000
            assert len(ext.samples) <= 5000
            assert ext.jobs[-1]["job"] == "p::s199999"
            # Totals keep counting past the buffers, in bounded label sets.
            assert ext.token_totals[("m0", "http://e:1")]["calls"] == 66_667
            assert ext.job_totals["done"] == 200_000
            assert grown < 256_000, f"memory grew by {grown} bytes from 175k to 200k records"

    asyncio.run(main())


def test_jobs_handler_filters_by_plan_and_columns():
    """The newest N records of one plan, only the fields asked for (what a runner needs)."""
    from distributed import Scheduler

    from obdask.server import ObdaskPlugin, extension

    async def main():
        async with Scheduler(dashboard_address=None, port=0) as s:
            await s.register_scheduler_plugin(ObdaskPlugin(), idempotent=True)
            ext = extension(s, "metrics")
            feed = ext.stream_handlers["obdask_metrics_record"]
            feed(worker="tcp://10.0.0.1:1", kind="batch", records=[
                ["job", {"plan": "ab"[i % 2], "step": f"s{i}", "duration_s": i,
                         "finished": float(i), "status": "done"}] for i in range(10)])
            handler = s.handlers["obdask_metrics_jobs"]
            return (handler(plan="a", limit=3, columns=["step", "duration_s"]),
                    handler(limit=2), handler(limit=0), handler(plan="b", since=6.0))

    only_a, newest, none, since = asyncio.run(main())
    assert only_a == [{"step": "s4", "duration_s": 4}, {"step": "s6", "duration_s": 6},
                      {"step": "s8", "duration_s": 8}]
    assert [r["step"] for r in newest] == ["s8", "s9"] and newest[0]["worker"] == "tcp://10.0.0.1:1"
    assert none == []
    assert [r["step"] for r in since] == ["s7", "s9"]


def test_prometheus_series_on_scheduler_metrics(tmp_path, cluster):
    pytest.importorskip("prometheus_client")
    lc, client = cluster
    before = metrics.tokens(client)
    (tmp_path / "a.md").write_text("Explain backpressure in two lines.")
    with OllamaTestServer(models=["llama3.2:3b"]) as server, \
            dask.config.set({"obdask.llm.endpoints": [server.url]}):
        plan = write_plan(tmp_path, "- [ ] id=a lane=1 model=researcher payload=@file:a.md\n")
        result = obdask.run(plan, client)
        assert result.ok, result.frame[["status", "error"]].to_dict("records")
        served = server.stats.calls_for("llama3.2:3b")
    wait_for(lambda: metrics.tokens(client), lambda f: len(f) > len(before))
    # the job's record too (it may come in a later batch than its call's): /metrics and
    # the frame below must see the same records
    wait_for(lambda: metrics.jobs(client), lambda f: (f["run_id"] == result.run_id).any())
    url = lc.dashboard_link.replace("/status", "/metrics")
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    host, port = server.url.split("//")[1].split(":")

    def value(name, **labels):
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{name} {labels} not in /metrics:\n" + "\n".join(
            line for line in text.splitlines() if "gen_ai" in line or "obdask" in line))

    common = {"gen_ai_request_model": "llama3.2:3b", "server_address": host, "server_port": port}
    assert value("gen_ai_client_token_usage_sum", gen_ai_token_type="input",
                 **common) == sum(c["prompt_eval_count"] for c in served)
    assert value("gen_ai_client_token_usage_sum", gen_ai_token_type="output",
                 **common) == sum(c["eval_count"] for c in served)
    assert value("gen_ai_client_token_usage_count", gen_ai_token_type="input", **common) == 1
    assert value("gen_ai_client_operation_duration_seconds_count", **common) == 1
    jobs = metrics.jobs(client)
    assert value("obdask_jobs_total", status="done") == (jobs["status"] == "done").sum()
    assert re.search(r'^obdask_worker_memory_used_bytes\{worker="tcp://', text, re.M)


def test_cli_stats_prints_tables(cluster):
    lc, client = cluster
    from obdask.cli import main

    runner = CliRunner()
    out = runner.invoke(main, ["stats", "--scheduler", lc.scheduler_address, "--by", "model"])
    assert out.exit_code == 0, out.output
    assert "jobs" in out.output and "workers" in out.output and "tokens by model" in out.output
    for address in client.scheduler_info()["workers"]:
        assert address in out.output
    bad = runner.invoke(main, ["stats", "--scheduler", lc.scheduler_address, "--by", "colour"])
    assert bad.exit_code == 2


def test_scheduler_without_metrics_extension_gets_no_records(tmp_path, monkeypatch):
    """Workers send nothing the scheduler cannot handle (an unknown op closes their stream)."""
    from distributed import Client, LocalCluster

    from obdask import server

    monkeypatch.delitem(server.EXTENSIONS, "metrics")
    with dask.config.set({"obdask.metrics.interval": "100ms"}), \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                         dashboard_address=None, silence_logs=logging.CRITICAL) as lc, \
            Client(lc) as client:
        client.wait_for_workers(1, timeout=60)
        server.install(client)
        workers = set(client.scheduler_info()["workers"])
        plan = write_plan(tmp_path, "- [ ] id=a lane=1 payload=@cmd:echo hi\n")
        assert obdask.run(plan, client).ok
        time.sleep(1.0)  # several sample periods and flushes
        assert set(client.scheduler_info()["workers"]) == workers  # no worker was dropped
        with pytest.raises(RuntimeError, match="does not answer obdask_metrics_jobs"):
            metrics.jobs(client)


# ------------------------------------------------------------------ Dask's profiler
def _profiling(dask_worker):
    pc = dask_worker.periodic_callbacks.get(DASK_PROFILER)
    return pc is not None and pc.is_running()


def test_obdask_workers_run_without_dasks_statistical_profiler(cluster):
    """It samples every busy task thread 100 times a second: obdask's threads wait on
    subprocesses and model calls, and sampling them cost a worker a quarter of a core
    with 8 waiting threads and three quarters with 64 (benchmarks/bench_profiler.py)."""
    _, client = cluster
    assert set(client.run(_profiling).values()) == {False}
