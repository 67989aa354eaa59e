"""obdask pages in the scheduler's Bokeh dashboard: components, registration, serving."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest

pytest.importorskip("bokeh")

from obdask import dashboard  # noqa: E402
from obdask.dashboard import components  # noqa: E402

W1, W2 = "tcp://127.0.0.1:4001", "tcp://127.0.0.1:4002"


def feed(ext):
    """Records as workers send them: 2 workers, 2 models, 2 plans."""
    push = ext.stream_handlers["obdask_metrics_record"]
    now = time.time()
    for i, (model, endpoint, worker) in enumerate([
            ("llama3.2:3b", "http://h1:11434", W1), ("llama3.2:3b", "http://h1:11434", W2),
            ("qwen2.5-coder:7b", "http://h2:11434", W1)]):
        push(worker=worker, kind="tokens", record={
            "model": model, "endpoint": endpoint, "prompt_eval_count": 100 * (i + 1),
            "eval_count": 10 * (i + 1), "plan": "p1", "job": f"p1::s{i}", "ts": now - 5,
            "total_duration": 2_000_000_000})
    for plan, lane, status in [("p1", 1, "done"), ("p1", 1, "done"), ("p1", 2, "failed"),
                               ("p2", 1, "done")]:
        push(worker=W1, kind="job", record={"plan": plan, "lane": lane, "status": status,
                                            "job": f"{plan}::x", "kind": "cmd",
                                            "duration_s": 1.0, "finished": now})
    push(worker=W1, kind="sample", record={
        "ts": now, "cpu_percent": 50.0, "memory_used": 4e9, "memory_total": 16e9,
        "disk_used": 1e9, "disk_total": 1e10,
        "gpus": [{"index": 0, "name": "A", "utilization": 30, "memory_used": 2e9,
                  "memory_total": 8e9},
                 {"index": 1, "name": "A", "utilization": 90, "memory_used": 6e9,
                  "memory_total": 8e9}]})
    push(worker=W2, kind="sample", record={
        "ts": now, "cpu_percent": 10.0, "memory_used": 2e9, "memory_total": 16e9,
        "disk_used": 1e9, "disk_total": 1e10, "gpus": []})


def with_scheduler(test):
    """Run ``test(scheduler, ext)`` against a real Scheduler with obdask installed."""
    from distributed import Scheduler

    from obdask.server import ObdaskPlugin, extension

    async def main():
        async with Scheduler(dashboard_address="127.0.0.1:0", port=0) as s:
            await s.register_scheduler_plugin(ObdaskPlugin(), idempotent=True)
            ext = extension(s, "metrics")
            feed(ext)
            result = test(s, ext)
            if asyncio.iscoroutine(result):
                await result

    asyncio.run(main())


def test_tokens_per_minute_by_model_and_endpoint():
    def check(s, ext):
        comp = components.TokensPerMinute(s)
        comp.update()
        data = dict(zip(comp.source.data["series"], comp.source.data["tokens_per_min"],
                        strict=True))
        # 5 s old records in a 60 s window: tokens of the last minute.
        assert data == {"llama3.2:3b @ http://h1:11434": 330.0,
                        "qwen2.5-coder:7b @ http://h2:11434": 330.0}
        assert comp.root is not None
    with_scheduler(check)


def test_job_status_counts_per_plan_and_lane():
    def check(s, ext):
        comp = components.JobStatus(s)
        comp.update()
        rows = {(p, ln): (d, f) for p, ln, d, f in zip(
            comp.source.data["plan"], comp.source.data["lane"], comp.source.data["done"],
            comp.source.data["failed"], strict=True)}
        assert rows == {("p1", 1): (2, 0), ("p1", 2): (0, 1), ("p2", 1): (1, 0)}
    with_scheduler(check)


def test_workers_table_with_gpus_and_vram():
    def check(s, ext):
        comp = components.WorkerResources(s)
        comp.update()
        data = comp.source.data
        by_worker = {w: i for i, w in enumerate(data["worker"])}
        one, two = by_worker[W1], by_worker[W2]
        assert data["gpus"][one] == 2 and data["gpus"][two] == 0
        assert data["gpu_utilization"][one] == 60.0
        assert data["vram_used"][one] == 8e9 and data["vram_total"][one] == 16e9
        assert data["cpu_percent"][one] == 50.0 and data["memory_used"][two] == 2e9
    with_scheduler(check)


def test_budgets_use_against_limits():
    def check(s, ext):
        from obdask.server import extension

        budgets = extension(s, "budgets")
        budgets.set_budget({"name": "daily", "tokens": 1000, "window": "1h"})
        budgets.set_budget({"name": "coder-cap", "tokens": 200, "scope": "model",
                            "match": "qwen2.5-coder:7b"})
        budgets.settle("r1", 850, model="qwen2.5-coder:7b")  # both budgets match the call
        comp = components.Budgets(s)
        comp.update()
        rows = {name: i for i, name in enumerate(comp.source.data["name"])}
        data = comp.source.data
        daily, cap = rows["daily"], rows["coder-cap"]
        assert data["use_text"][daily] == "850 / 1,000 (85 %)"
        assert data["percent"][daily] == 85.0 and data["color"][daily] == "#ff7f0e"  # warning
        assert data["window"][daily] == "3600 s" and data["frees"][daily].startswith("in 3")
        assert data["covers"][cap] == "model qwen2.5-coder:7b" and data["window"][cap] == "all time"
        assert data["percent"][cap] == 100.0 and data["color"][cap] == "#d62728"  # over its limit
        assert list(comp.root.children[0].y_range.factors) == list(data["name"])
    with_scheduler(check)


def test_recent_events():
    def check(s, ext):
        s.log_event("obdask-jobs", {"key": "p::a", "event": "failed", "worker": W1})
        comp = components.RecentEvents(s)
        comp.update()
        assert comp.source.data["topic"][0] == "obdask-jobs"
        assert "failed" in comp.source.data["text"][0]
    with_scheduler(check)


def test_pages_registered_and_served():
    dashboard.register()
    from distributed.dashboard.scheduler import applications

    assert dashboard.PAGE in applications
    assert all(p in applications for p in dashboard.INDIVIDUAL)

    async def check(s, ext):
        base = f"http://127.0.0.1:{s.http_server.port}"

        def get(path):
            return urllib.request.urlopen(base + path, timeout=30).read().decode()

        loop = asyncio.get_running_loop()
        page = await loop.run_in_executor(None, get, dashboard.PAGE)
        assert "bokeh" in page.lower()
        plots = json.loads(await loop.run_in_executor(None, get, "/individual-plots.json"))
        assert set(dashboard.INDIVIDUAL) <= set(plots.values())
    with_scheduler(check)


def _start_scheduler(folder):
    """``dask scheduler --preload obdask.preload.scheduler`` with its dashboard on loopback."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from cluster_utils import spawn

    sched_file = folder / "scheduler.json"
    proc = spawn(["scheduler", "--host", "127.0.0.1", "--port", "0",
                  "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(sched_file),
                  "--preload", "obdask.preload.scheduler"], folder / "scheduler.log")
    deadline = time.monotonic() + 90
    while True:
        text = sched_file.read_text() if sched_file.exists() else ""
        try:
            info = json.loads(text)
            return proc, info["address"], f"http://127.0.0.1:{info['services']['dashboard']}"
        except (ValueError, KeyError):
            pass
        assert proc.poll() is None, (folder / "scheduler.log").read_text()
        assert time.monotonic() < deadline, "scheduler did not start"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def live_scheduler(tmp_path_factory):
    """A real scheduler process with the preload, a worker, and one plan run on it."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import dask
    from cluster_utils import kill, spawn
    from distributed import Client

    import obdask
    from obdask.testing import OllamaTestServer

    folder = tmp_path_factory.mktemp("live")
    proc, address, base = _start_scheduler(folder)
    worker = spawn(["worker", address, "--nthreads", "1", "--no-dashboard",
                    "--preload", "obdask.preload.worker"], folder / "worker.log")
    try:
        with Client(address, timeout=60) as client, \
                OllamaTestServer(models=["llama3.2:3b"]) as server, \
                dask.config.set({"obdask.llm.endpoints": [server.url]}):
            client.wait_for_workers(1, timeout=90)
            from obdask.llm import budget

            # charged by the model job below; on the page with its limit and window
            budget.set_budget(client, "page-budget", 1_234_567, window="1h")
            (folder / "spec.md").write_text("Name three queueing disciplines.")
            (folder / "plan.md").write_text(
                "- [ ] id=a lane=1 payload=@cmd:echo hi\n"
                "- [ ] id=b lane=1 deps=a payload=@cmd:false\n"
                "- [ ] id=c lane=2 model=researcher payload=@file:spec.md\n")
            obdask.run(str(folder / "plan.md"), client)
            yield folder, address, base
    finally:
        kill([worker, proc])


def test_preload_serves_the_pages(live_scheduler):
    _, _, base = live_scheduler
    plots = json.loads(urllib.request.urlopen(base + "/individual-plots.json", timeout=30).read())
    assert set(dashboard.INDIVIDUAL) <= set(plots.values())
    page = urllib.request.urlopen(base + dashboard.PAGE, timeout=30).read().decode()
    assert "data-root-id" in page  # the document is built (its models come over the websocket)


def test_page_in_headless_chromium(live_scheduler):
    """The page rendered by a real browser: screenshot saved, its text holds the data."""
    from browser import chromium, render

    if chromium() is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    folder, address, base = live_scheduler
    from distributed import Client

    with Client(address, timeout=30) as client:
        workers = list(client.scheduler_info()["workers"])
    shot = folder / "obdask-page.png"
    text = render(base + dashboard.PAGE, folder,
                  [workers[0], "obdask-jobs", "page-budget", "1,234,567"], shot)
    assert shot.stat().st_size > 20_000, shot
    assert workers[0] in text  # the workers table
    assert "obdask-jobs" in text and "failed" in text  # the recent events
    assert "obdask-tokens" in text and "llama3.2:3b" in text
    for header in ("plan", "lane", "done", "CPU %", "VRAM", "GPUs", "oldest spending leaves"):
        assert header in text, header
    import re

    charged = re.search(r"(\d+) / 1,234,567 \(0 %\)", text)  # the budget's use and limit
    assert charged and int(charged.group(1)) > 0, text  # the model job's tokens
    assert "3600 s" in text  # its window
    print(f"screenshot: {shot}")


def test_obdask_run_prints_the_dashboard_page(tmp_path):
    """The embedded cluster serves the page on localhost and `obdask run` prints its URL."""
    import re
    import subprocess
    import sys

    (tmp_path / "plan.md").write_text("- [ ] id=a lane=1 payload=@cmd:echo hi\n")
    result = subprocess.run([sys.executable, "-m", "obdask.cli", "run", "plan.md",
                             "--workers", "1"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr
    found = re.search(r"^cluster: embedded LocalCluster, 1 workers, "
                      r"dashboard (http://127\.0\.0\.1:\d+/obdask)$", result.stderr, re.M)
    assert found, result.stderr
