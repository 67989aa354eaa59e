"""``obdask why``: each waiting cause set up for real on a LocalCluster (issue 12, item 3).

Nothing of Dask is mocked: tasks really wait on dependencies, resources, a
busy worker, a token budget and a per-model slot; sessions really hold leases
and questions in the sessions extension.
"""

from __future__ import annotations

import json
import logging
import time

import dask
import pytest
from click.testing import CliRunner

from obdask import metrics


@pytest.fixture(scope="module")
def cluster():
    """One worker with two threads (resource ``lane-1``), obdask installed."""
    from distributed import Client, LocalCluster

    with dask.config.set({"obdask.llm.slots": 1}):
        with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                          resources={"lane-1": 1}, dashboard_address=":0",
                          silence_logs=logging.CRITICAL) as lc:
            with Client(lc) as client:
                from obdask.server import install

                install(client)
                yield client


def wait_reason(client, key, cause, timeout=15.0):
    """``metrics.why`` until its first reason has ``cause``; return the answer."""
    deadline = time.monotonic() + timeout
    while True:
        answer = metrics.why(client, key)
        if answer["reasons"] and answer["reasons"][0]["cause"] == cause:
            return answer
        assert time.monotonic() < deadline, f"no {cause!r} reason in time: {answer}"
        time.sleep(0.1)


def hold(name):
    """A task that runs until the distributed Event ``name`` is set."""
    from distributed import Event

    Event(name).wait(60)
    return name


def test_waiting_on_dependencies(cluster):
    from distributed import Event

    client = cluster
    first = client.submit(hold, "dep-go", key=("why-plan", "why-plan::build"))
    second = client.submit(lambda x: x, first, key=("why-plan", "why-plan::test"))
    try:
        answer = wait_reason(client, "why-plan::test", "dependencies")
        reason = answer["reasons"][0]
        assert answer["what"] == "job" and answer["state"] == "waiting"
        assert reason["waiting_on"] == [{"key": "why-plan::build", "state": "processing"}]
        assert "why-plan::build (processing)" in reason["message"]
    finally:
        Event("dep-go").set()
        assert second.result() == "dep-go"


def test_no_worker_with_the_resource_or_lane(cluster):
    client = cluster
    fut = client.submit(lambda: 1, resources={"GPU": 1, "lane-1": 1},
                        key=("gpu-plan", "gpu-plan::train"))
    try:
        reason = wait_reason(client, "gpu-plan::train", "no-worker")["reasons"][0]
        assert reason["resources"] == {"GPU": 1}  # lane-1 exists: only GPU is missing
        assert "GPU=1 (no worker has it)" in reason["message"]
    finally:
        fut.cancel()


def test_warm_worker_busy(cluster):
    from distributed import Event

    client = cluster
    (addr,) = client.scheduler_info()["workers"]
    busy = [client.submit(hold, "warm-go", key=("w-plan", f"w-plan::long{i}")) for i in (1, 2)]
    routed = client.submit(lambda: 2, workers=[addr], allow_other_workers=True,
                           key=("w-plan", "w-plan::warm"))
    try:
        reason = wait_reason(client, "w-plan::warm", "warm-worker-busy")["reasons"][0]
        assert reason["worker"] == addr
        assert sorted(reason["running"]) == ["w-plan::long1", "w-plan::long2"]
    finally:
        Event("warm-go").set()
        assert routed.result() == 2 and client.gather(busy) == ["warm-go"] * 2


def test_budget_exhausted(cluster):
    from obdask.llm.budget import budgets, reservation, set_budget
    from obdask.llm.budget.client import remove_budget

    client = cluster
    set_budget(client, "why-small", 10, scope="model", match="why-model", window="1h",
               on_exhausted="wait")

    def spend():
        res = reservation.reserve(8, model="why-model", timeout=30)
        res.settle(8)
        return "spent"

    def reserve_more():
        res = reservation.reserve(5, model="why-model", timeout=60)
        res.release()
        return "reserved"

    try:
        assert client.submit(spend, key=("b-plan", "b-plan::first")).result() == "spent"
        fut = client.submit(reserve_more, key=("b-plan", "b-plan::second"))
        answer = wait_reason(client, "b-plan::second", "budget")
        reason = answer["reasons"][0]
        assert reason["budget"] == "why-small"
        assert 3590 < reason["wake_at"] - time.time() <= 3600  # its window frees in an hour
        assert "window frees tokens in" in reason["message"]
        assert budgets(client).loc["why-small", "used"] == 8
        fut.cancel()
    finally:
        remove_budget(client, "why-small")


def test_per_model_concurrency_cap_full(cluster):
    from distributed import Event

    from obdask.llm.pool import EndpointPool

    client = cluster
    url = "http://127.0.0.1:9"

    def call(name):
        with EndpointPool([url]).acquire_slot([url], "why-model:1b", timeout=60):
            if name:
                Event(name).wait(60)
        return "called"

    holder = client.submit(call, "slot-go", key=("s-plan", "s-plan::holder"))
    try:
        wait_for_running(client, "s-plan::holder")
        waiter = client.submit(call, None, key=("s-plan", "s-plan::waiter"))
        answer = wait_reason(client, "s-plan::waiter", "slots")
        reason = answer["reasons"][0]
        assert reason["model"] == "why-model:1b"
        assert reason["holders"] == [{"key": "s-plan::holder", "url": url}]
        assert "held by s-plan::holder" in reason["message"]
    finally:
        Event("slot-go").set()
    assert holder.result() == "called" and waiter.result() == "called"


def wait_for_running(client, key, timeout=15.0):
    deadline = time.monotonic() + timeout
    while metrics.why(client, key)["reasons"][0]["cause"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_session_lease_held_by_another_driver(cluster):
    client = cluster
    sched = client.scheduler
    assert client.sync(sched.obdask_session_acquire, session="why-s1", holder="tcp://10.0.0.9:1",
                       key="driver-a")["ok"]
    client.sync(sched.obdask_session_register, session="why-s1", key="driver-b")
    answer = metrics.why(client, "why-s1")
    reason = answer["reasons"][0]
    assert answer["what"] == "session" and reason["cause"] == "lease"
    assert reason["holder"] == "tcp://10.0.0.9:1" and reason["driver"] == "driver-a"
    assert reason["epoch"] == 1


def test_session_waiting_for_a_human_answer(cluster):
    client = cluster
    sched = client.scheduler
    epoch = client.sync(sched.obdask_session_acquire, session="why-s2", holder="c",
                        key="driver-c")["epoch"]
    deadline = time.time() + 600
    client.sync(sched.obdask_session_update, session="why-s2", epoch=epoch, state={
        "state": "waiting", "question": {"id": "c1", "question": "Ship it?",
                                         "deadline": deadline}})
    reason = metrics.why(client, "why-s2")["reasons"][0]
    assert reason["cause"] == "human" and reason["question"] == "Ship it?"
    assert reason["deadline"] == deadline
    assert time.strftime("%H:%M:%S", time.gmtime(deadline)) in reason["message"]


def test_cli_why_json_and_unknown_key(cluster):
    from obdask.cli import main

    client = cluster
    addr = client.scheduler.address
    result = CliRunner().invoke(main, ["why", "why-s2", "--scheduler", addr, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["reasons"][0]["cause"] == "human"
    result = CliRunner().invoke(main, ["why", "nope::never", "--scheduler", addr])
    assert result.exit_code == 2
    assert "unknown: 'nope::never' is neither a job nor a session" in result.output


def test_dashboard_waiting_component_lists_the_reasons(cluster):
    pytest.importorskip("bokeh")
    client = cluster
    fut = client.submit(lambda: 1, resources={"TPU": 1}, key=("d-plan", "d-plan::tpu"))

    def table(dask_scheduler):
        from obdask.dashboard.components import Waiting

        comp = Waiting(dask_scheduler)
        comp.update()
        return dict(comp.source.data)

    try:
        wait_reason(client, "d-plan::tpu", "no-worker")
        data = client.run_on_scheduler(table)
        row = data["key"].index("d-plan::tpu")
        assert data["cause"][row] == "no-worker"
        assert "TPU=1" in data["message"][row]
        assert "human" in data["cause"]  # the session left waiting by an earlier test
    finally:
        fut.cancel()
