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


def test_job_elapsed_records_against_the_timeout_and_the_level_ends_with_the_job():
    def test(s, ext):
        push = ext.stream_handlers["obdask_metrics_record"]
        for elapsed in (50, 85, 90, 97):  # of a 100 s timeout
            push(worker=W1, kind="batch", records=[
                ["elapsed", {"job": "p::slow", "elapsed": elapsed, "timeout": 100.0}]])
        held = ("job:p::slow", "time") in ext.pressure.levels
        push(worker=W1, kind="batch", records=[["job", {"job": "p::slow", "status": "done"}]])
        return [e for e in ext.events() if e["topic"] == "obdask.pressure"], held, \
            ("job:p::slow", "time") in ext.pressure.levels, len(ext.jobs)

    events, held, still, stored = with_scheduler(test)
    assert [(e["level"], e["scope"], e["resource"], e["used"]) for e in events] == [
        ("warning", "job:p::slow", "time", 85), ("critical", "job:p::slow", "time", 97)]
    assert events[0]["worker"] == W1 and events[0]["job"] == "p::slow"
    assert held and not still  # the job's record ends its level
    assert stored == 1  # elapsed records feed pressure only; the job record is stored


def test_session_wall_time_against_max_time_on_the_scheduler_clock():
    """The default 80 % / 95 % levels of obdask.sessions.max-time, from a real registry."""
    from distributed import Scheduler

    from obdask.server import ObdaskPlugin, extension

    async def main():
        with dask.config.set({"obdask.sessions.max-time": "1s",
                              "obdask.metrics.pressure-interval": "20ms"}):
            async with Scheduler(dashboard_address=":0", port=0) as s:
                await s.register_scheduler_plugin(ObdaskPlugin(), idempotent=True)
                ext = extension(s, "metrics")
                s.handlers["obdask_session_register"](session="sess-t", key="driver-1")
                s.handlers["obdask_session_register"](session="sess-later", key="driver-2")
                await asyncio.sleep(0.6)  # sess-t: 60 %, no event yet
                early = pressure(ext)
                # sess-later ends: its clock stops and it never warns
                s.handlers["obdask_session_acquire"](session="sess-later", holder="w")
                s.handlers["obdask_session_update"](session="sess-later", epoch=1,
                                                    state={"state": "done"})
                await asyncio.sleep(0.7)  # sess-t: 130 %
                events = [e for e in ext.events() if e["topic"] == "obdask.pressure"]
                return early, events, dict(ext.pressure.session_seen)

    early, events, seen = asyncio.run(main())
    assert early == []
    assert [(e["level"], e["scope"], e["resource"]) for e in events] == [
        ("warning", "session:sess-t", "time"), ("critical", "session:sess-t", "time")]
    assert 0.8 <= events[0]["ratio"] < 0.95 <= events[1]["ratio"], events
    assert events[0]["limit"] == 1.0 and events[0]["session"] == "sess-t"
    assert set(seen) == {"sess-t"}


@pytest.mark.slow
def test_running_job_near_its_timeout_on_a_real_cluster(tmp_path):
    """A real worker reports its running job; the scheduler publishes both crossings."""
    from distributed import Client, LocalCluster

    import obdask

    (tmp_path / "plan.md").write_text(
        "# Plan: slow\nplan_id=slow\n"
        "- [ ] id=nap lane=1 timeout=10s payload=@cmd:sleep 5\n"
        "- [ ] id=quick lane=1 payload=@cmd:true\n")
    # 20 % and 40 % of 10 s: crossings 2 s apart, far wider than the 0.5 s report period
    with dask.config.set({"obdask.metrics.pressure-warning": 0.2,
                          "obdask.metrics.pressure-critical": 0.4}):
        with LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                          dashboard_address=":0", silence_logs=logging.CRITICAL) as lc:
            with Client(lc) as client:
                result = obdask.run(str(tmp_path / "plan.md"), client)
                assert result.ok, result.summary
                time.sleep(1.0)  # the job record's flush
                events = [msg for _, msg in client.get_events("obdask.pressure")]
                levels = client.run_on_scheduler(
                    lambda dask_scheduler: list(dask_scheduler.extensions["obdask"]
                                                .extensions["metrics"].pressure.levels))
    got = [(e["level"], e["scope"], e["resource"]) for e in events
           if e["scope"].startswith("job:")]
    assert got == [("warning", "job:slow::nap", "time"), ("critical", "job:slow::nap", "time")]
    warning, critical = (e for e in events if e["scope"] == "job:slow::nap")
    assert 2.0 <= warning["used"] < 4.0 <= critical["used"] < 5.5 and warning["limit"] == 10.0
    assert not any(scope.startswith("job:") for scope, _ in levels)  # ended with the job
