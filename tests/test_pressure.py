"""Pressure events (issue 12, item 6): warning at 80 %, critical at 95 % of a limit.

A real Scheduler with obdask's plugin takes records through its real stream
handler; the end-to-end test has real workers sampling their real host.
"""

from __future__ import annotations

import asyncio
import logging
import time

import dask
import pytest

from obdask import metrics

W1, W2 = "tcp://127.0.0.1:4101", "tcp://127.0.0.1:4102"


def with_scheduler(test, **config):
    from distributed import Scheduler

    from obdask.server import ObdaskPlugin, extension

    async def main():
        with dask.config.set({f"obdask.metrics.{k}": v for k, v in config.items()}):
            async with Scheduler(dashboard_address=":0", port=0) as s:
                await s.register_scheduler_plugin(ObdaskPlugin(), idempotent=True)
                return test(s, extension(s, "metrics"))

    return asyncio.run(main())


def pressure(ext):
    return [(e["level"], e["scope"], e["resource"]) for e in ext.events()
            if e["topic"] == "obdask.pressure"]


def sample(push, worker, used, total=100.0, disk=10.0):
    push(worker=worker, kind="sample", record={
        "memory_used": used, "memory_total": total, "disk_used": disk, "disk_total": 100.0})


def test_worker_memory_warning_critical_once_per_crossing():
    def test(s, ext):
        push = ext.stream_handlers["obdask_metrics_record"]
        for used in (50, 85, 90, 96, 97, 90, 50, 81):
            sample(push, W1, used)
        return pressure(ext)

    assert with_scheduler(test) == [
        ("warning", f"worker:{W1}", "memory"), ("warning", "cluster", "memory"),
        ("critical", f"worker:{W1}", "memory"), ("critical", "cluster", "memory"),
        # 90 after 97: still above the warning, no new event; 50 re-arms; 81 warns again
        ("warning", f"worker:{W1}", "memory"), ("warning", "cluster", "memory")]


def test_cluster_wide_is_the_sum_of_the_workers_and_thresholds_come_from_config():
    def test(s, ext):
        push = ext.stream_handlers["obdask_metrics_record"]
        sample(push, W1, 60)  # 60 %: a warning for W1 (and the cluster, W1 alone) at 0.5
        sample(push, W2, 20)  # cluster: 80 of 200 = 40 %, below again
        sample(push, W2, 45)  # cluster: 105 of 200 = 52.5 %: a second crossing
        return pressure(ext)

    assert with_scheduler(test, **{"pressure-warning": 0.5, "pressure-critical": 0.99}) == [
        ("warning", f"worker:{W1}", "memory"), ("warning", "cluster", "memory"),
        ("warning", "cluster", "memory")]


def test_a_worker_that_left_leaves_the_cluster_sums():
    def test(s, ext):
        push = ext.stream_handlers["obdask_metrics_record"]
        sample(push, W1, 10)
        sample(push, W2, 70)  # cluster 80 of 200: below the warning
        sample(push, W2, 60)  # replaces W2's 70: 70 of 200
        sums = list(ext.pressure.totals[:2])
        ext.remove_worker(s, W1)
        sample(push, W2, 85)  # W2 alone now: 85 of 100 warns for the cluster too
        return sums, pressure(ext)

    sums, events = with_scheduler(test)
    assert sums == [70.0, 200.0]
    assert events == [("warning", f"worker:{W2}", "memory"), ("warning", "cluster", "memory")]


def test_token_budget_and_session_limits():
    def test(s, ext):
        from obdask.server import extension

        budgets = extension(s, "budgets")
        budgets.set_budget({"name": "small", "tokens": 100})
        push = ext.stream_handlers["obdask_metrics_record"]
        for n in (40, 45, 12):  # the budget: 40, 85 (warning), 97 (critical) of 100
            budgets.settle(f"r{n}", n)  # charged like a model call whose reservation ended
            push(worker=W1, kind="tokens", record={
                "model": "m", "endpoint": "http://h:1", "session": "sess-1",
                "prompt_eval_count": n, "eval_count": 0, "ts": time.time()})
        return [e for e in ext.events() if e["topic"] == "obdask.pressure"]

    with dask.config.set({"obdask.sessions.max-tokens": 110}):
        events = with_scheduler(test)
    got = [(e["level"], e["scope"], e["resource"], e["used"], e["limit"]) for e in events]
    assert got == [("warning", "budget:small", "tokens", 85, 100),
                   ("critical", "budget:small", "tokens", 97, 100),
                   ("warning", "session:sess-1", "tokens", 97, 110)]
    assert events[2]["session"] == "sess-1" and events[0]["budget"] == "small"


@pytest.mark.slow
def test_real_worker_samples_publish_on_the_event_bus():
    from distributed import Client, LocalCluster

    # any real host uses more than 0.1 % of its memory and disk
    with dask.config.set({"obdask.metrics.interval": "200ms",
                          "obdask.metrics.pressure-warning": 0.001,
                          "obdask.metrics.pressure-critical": 0.002}):
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                          dashboard_address=":0", silence_logs=logging.CRITICAL) as lc:
            with Client(lc) as client:
                from obdask.server import install

                install(client)
                deadline = time.monotonic() + 20
                while len(client.get_events("obdask.pressure")) < 4:
                    assert time.monotonic() < deadline, client.get_events("obdask.pressure")
                    time.sleep(0.1)
                received = client.get_events("obdask.pressure")  # Dask's event bus
                frame = metrics.events(client)
    levels = {(msg["level"], msg["scope"].split(":")[0], msg["resource"])
              for _, msg in received}
    assert {("critical", "worker", "memory"), ("critical", "cluster", "memory"),
            ("critical", "worker", "disk")} <= levels
    assert "obdask.pressure" in set(frame["topic"])


def test_metrics_enabled_false_leaves_the_extension_out():
    def test(s, ext):
        from obdask.server import extension

        return ext, extension(s, "waiting") is not None, "obdask_metrics_jobs" in s.handlers

    ext, waiting, handler = with_scheduler(test, enabled=False)
    assert ext is None and not handler
    assert waiting  # the other extensions still run
