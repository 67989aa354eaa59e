"""Token budgets: the ledger, the scheduler extension and budgets under real model calls."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import obdask  # noqa: F401  (before distributed.utils_test snapshots the config)

pytest.importorskip("ollama")

import dask  # noqa: E402
from distributed import Event, Nanny, wait  # noqa: E402
from distributed.utils_test import gen_cluster  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from obdask.exceptions import BudgetExceeded, ConfigError  # noqa: E402
from obdask.llm import budget as B  # noqa: E402
from obdask.llm.client import call_model  # noqa: E402
from obdask.server import extension  # noqa: E402
from obdask.testing import OllamaTestServer  # noqa: E402

FAST = {"obdask.llm.backoff": "10ms", "obdask.llm.budget-timeout": "5s"}


pytestmark = pytest.mark.usefixtures("fresh_llm_state")


# -- the ledger --------------------------------------------------------------------


def test_parse_budget_errors():
    assert B.parse_budget({"name": "a", "tokens": 10, "window": "1h"}).window == 3600
    assert B.parse_budget({"name": "a", "tokens": 10, "on-exhausted": "fail"}).on_exhausted
    for bad in (
        {"tokens": 1},
        {"name": "a", "tokens": -1},
        {"name": "a", "tokens": 1, "scope": "galaxy"},
        {"name": "a", "tokens": 1, "window": "soon"},
        {"name": "a", "tokens": 1, "on_exhausted": "panic"},
    ):
        with pytest.raises(ConfigError):
            B.parse_budget(bad)


def test_ledger_reserve_settle_release_and_matching():
    ledger = B.Ledger(
        [
            {"name": "coder", "scope": "model", "match": "coder:*", "tokens": 100},
            {"name": "gpu1", "scope": "endpoint", "match": "http://gpu1:*", "tokens": 1000},
            {"name": "plan", "scope": "plan", "match": "p1", "tokens": 50, "on_exhausted": "fail"},
        ],
        default_mode="wait",
    )
    r = ledger.try_reserve("r1", 60, 0.0, model="coder:7b", endpoint="http://gpu1:11434")
    assert r == {"status": "ok", "budgets": ["coder", "gpu1"]}
    blocked = ledger.try_reserve("r2", 60, 0.0, model="coder:7b", endpoint="http://x:1")
    assert blocked["status"] == "blocked" and blocked["budget"] == "coder"
    assert "'coder'" in blocked["message"] and "40 tokens left" in blocked["message"]
    ledger.settle("r1", 30, 0.0, model="coder:7b")
    assert ledger.budgets["coder"].used(0.0) == 30 and ledger.budgets["coder"].reserved == 0
    assert ledger.try_reserve("r2", 60, 0.0, model="coder:7b")["status"] == "ok"
    assert ledger.release("r2") and not ledger.release("r2")
    assert ledger.try_reserve("r3", 60, 0.0, plan="p1")["status"] == "exhausted"  # > tokens
    assert ledger.try_reserve("r4", 40, 0.0, plan="p1")["status"] == "ok"
    assert ledger.try_reserve("r5", 20, 0.0, plan="p1")["status"] == "exhausted"  # fail mode
    assert ledger.try_reserve("r6", 5, 0.0, model="other")["budgets"] == []
    ledger.settle("gone", 7, 0.0, plan="p1")  # released earlier: still charged
    assert ledger.budgets["plan"].used(0.0) == 7
    rows = {row["name"]: row for row in ledger.state(0.0)["budgets"]}
    assert rows["plan"]["reserved"] == 40 and rows["plan"]["reservations"] == 1


def test_ledger_window_slides():
    ledger = B.Ledger([{"name": "w", "tokens": 10, "window": 60}], default_mode="wait")
    assert ledger.try_reserve("a", 8, 100.0)["status"] == "ok"
    ledger.settle("a", 8, 100.0)
    r = ledger.try_reserve("b", 5, 120.0)
    assert r["status"] == "blocked" and r["wake_at"] == 160.0
    assert ledger.try_reserve("b", 5, 161.0)["status"] == "ok"
    ledger.set_budget({"name": "w", "tokens": 20, "window": 60})  # redefine keeps usage
    assert ledger.budgets["w"].reserved == 5


def test_local_ledger_without_dask():
    with (
        OllamaTestServer(models=["m1"]) as srv,
        dask.config.set(
            {
                "obdask.llm.budgets": [{"name": "all", "tokens": 60}],
                "obdask.llm.on-exhausted": "fail",
                **FAST,
            }
        ),
    ):
        reply = call_model("m1", "one two three", endpoints=[srv.url], options={"num_predict": 5})
        frame = B.budgets()
        assert frame.loc["all", "used"] == reply.total_tokens and frame.loc["all", "reserved"] == 0
        with pytest.raises(BudgetExceeded, match="'all'"):
            call_model("m1", "x " * 50, endpoints=[srv.url], options={"num_predict": 5})
        assert srv.stats.total("/api/chat") == 1


# -- the scheduler extension -------------------------------------------------------


@gen_cluster(
    client=True, nthreads=[], config={"obdask.llm.budgets": [{"name": "cfg", "tokens": 5}]}
)
async def test_plugin_idempotent_and_set_from_client(c, s):
    await B.install(c)
    ext = extension(s, "budgets")
    await B.install(c)
    assert extension(s, "budgets") is ext
    for op in ("reserve", "settle", "release", "state"):
        assert f"obdask_budget_{op}" in s.handlers
    await B.set_budget(c, "daily", 1000, scope="model", match="m1", window="1d")
    frame = await B.budgets(c)
    assert sorted(frame.index) == ["cfg", "daily"]
    assert frame.loc["daily", "window"] == 86400 and frame.loc["daily", "available"] == 1000
    assert await B.remove_budget(c, "cfg") is True
    assert list((await B.budgets(c)).index) == ["daily"]


@gen_cluster(client=True, nthreads=[])
async def test_reserve_waits_until_settled(c, s):
    await B.set_budget(c, "tiny", 100)
    first = await s.handlers["obdask_budget_reserve"](id="a", amount=80, client=c.id, timeout=5)
    assert first["status"] == "ok"
    waiter = asyncio.ensure_future(
        s.handlers["obdask_budget_reserve"](id="b", amount=50, client=c.id, timeout=5)
    )
    await asyncio.sleep(0.1)
    assert not waiter.done()
    s.handlers["obdask_budget_settle"](id="a", tokens=40)
    assert (await waiter)["status"] == "ok"
    quick = await s.handlers["obdask_budget_reserve"](id="c", amount=20, client=c.id, timeout=0)
    assert quick["status"] == "blocked"
    late = await s.handlers["obdask_budget_reserve"](id="d", amount=20, client=c.id, timeout=0.2)
    assert late["status"] == "exhausted" and "waited" in late["message"]
    extension(s, "budgets").remove_client(s, c.id)
    assert (await B.budgets(c)).loc["tiny", "reserved"] == 0


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)], config=FAST)
async def test_budget_set_after_calls_without_extension_binds_next_call(c, s, a):
    # Regression: a worker that once found no BudgetExtension skipped reservations for
    # 30 s, so a budget set meanwhile was not enforced at all.
    assert extension(s, "budgets") is None
    with OllamaTestServer(models=["m1"], token_latency=0.001) as srv:
        first = await c.submit(_budgeted_call, srv.url, 3, 2, 5, 0, pure=False)
        assert first[0] == "ok"
        assert extension(s, "budgets") is not None  # installed by the first call, once
        await B.set_budget(c, "late", 10**6, scope="plan", match="p")
        before = sum(srv.stats.tokens("m1"))
        results = await c.gather([c.submit(_budgeted_call, srv.url, 3, 2, 5, i, pure=False)
                                  for i in range(1, 4)])
        spent = sum(srv.stats.tokens("m1")) - before
    frame = await B.budgets(c)
    assert [kind for kind, _ in results] == ["ok"] * 3
    assert frame.loc["late", "calls"] == 3
    assert frame.loc["late", "used"] == spent == sum(n for _, n in results)


async def _threads_done(worker, timeout=20):
    deadline = time.monotonic() + timeout
    while worker.active_threads:
        assert time.monotonic() < deadline, f"task threads still running: {worker.active_threads}"
        await asyncio.sleep(0.02)


def _blocking_call(url, event_name):
    from distributed import Event

    Event(event_name).set()  # the task runs
    return call_model(
        "m1", "hello world", endpoints=[url], job="cancel-me", options={"num_predict": 5}
    )


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)], config=FAST)
async def test_reservation_released_when_task_cancelled(c, s, a):
    await B.set_budget(c, "all", 10_000)
    with OllamaTestServer(models=["m1"]) as srv:
        srv.stall(30)
        fut = c.submit(_blocking_call, srv.url, "started", pure=False)
        await Event("started").wait(timeout=10)
        while (await B.budgets(c)).loc["all", "reserved"] == 0:
            await asyncio.sleep(0.02)
        assert len(await B.reservations(c)) == 1
        await fut.cancel()
        while (await B.budgets(c)).loc["all", "reserved"] != 0:
            await asyncio.sleep(0.02)
        srv.stop()  # lets the orphaned call in the worker thread finish
        await _threads_done(a)
    frame = await B.budgets(c)
    assert frame.loc["all", "used"] == 0 and frame.loc["all", "reservations"] == 0


@gen_cluster(
    client=True,
    nthreads=[("127.0.0.1", 1)] * 2,
    Worker=Nanny,
    config={**FAST, "obdask.llm.slots": 2},  # the killed worker's slot lease lingers 30s
)
async def test_reservation_released_when_worker_killed(c, s, *nannies):
    await B.set_budget(c, "all", 10_000)
    with OllamaTestServer(models=["m1"]) as srv:
        srv.stall(60)  # only the first request stalls; the rerun of the task goes through
        fut = c.submit(_blocking_call, srv.url, "started2", pure=False)
        await Event("started2").wait(timeout=20)
        while len(held := await B.reservations(c)) == 0:
            await asyncio.sleep(0.02)
        rid, addr = held.loc[0, "id"], held.loc[0, "worker"]
        assert held.loc[0, "key"] == fut.key and held.loc[0, "job"] == "cancel-me"
        victim = next(n for n in nannies if n.worker_address == addr)
        await victim.kill()
        while rid in set((await B.reservations(c)).get("id", [])):
            await asyncio.sleep(0.02)
        reply = await fut  # rescheduled on the other worker
        frame = await B.budgets(c)
        assert frame.loc["all", "reserved"] == 0
        assert frame.loc["all", "used"] == reply.total_tokens == sum(srv.stats.tokens("m1"))


# -- budgets under concurrent model calls --------------------------------------------

CALL = st.tuples(st.integers(1, 30), st.integers(0, 40), st.integers(1, 25))


def _budgeted_call(url, words, reply_words, num_predict, i):
    try:
        reply = call_model(
            "m1",
            " ".join(["w"] * words) + f" #{reply_words}",
            endpoints=[url],
            options={"num_predict": num_predict},
            job=f"job-{i}",
            plan="p",
        )
    except BudgetExceeded as exc:
        return ("exceeded", str(exc))
    return ("ok", reply.total_tokens)


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    calls=st.lists(CALL, min_size=8, max_size=8),
    tokens=st.integers(40, 400),
    mode=st.sampled_from(["wait", "fail"]),
)
def test_budget_never_exceeded(calls, tokens, mode):
    config = {**FAST, "obdask.llm.budget-timeout": "1s", "obdask.llm.slots": 8}

    @gen_cluster(client=True, nthreads=[("127.0.0.1", 4)] * 2, config=config)
    async def run(c, s, a, b):
        await B.set_budget(c, "plan-p", tokens, scope="plan", match="p", on_exhausted=mode)

        def replies(body):
            return "r " * int(body["messages"][-1]["content"].rsplit("#", 1)[1])

        with OllamaTestServer(
            models=["m1"], num_parallel=8, token_latency=0.002, replies=replies
        ) as srv:
            futs = [
                c.submit(_budgeted_call, srv.url, *call, i, pure=False)
                for i, call in enumerate(calls)
            ]
            await wait(futs)
            results = await c.gather(futs)
            prompt, output = srv.stats.tokens("m1")
        frame = await B.budgets(c)
        spent = sum(n for kind, n in results if kind == "ok")
        assert prompt + output == spent == frame.loc["plan-p", "used"]
        assert spent <= tokens
        assert frame.loc["plan-p", "reserved"] == 0
        for kind, msg in results:
            assert kind == "ok" or "'plan-p'" in msg

    run()


def test_budget_wait_from_threads_outside_dask():
    budgets = [{"name": "w", "tokens": 120, "on_exhausted": "wait"}]
    with (
        OllamaTestServer(models=["m1"], token_latency=0.005) as srv,
        dask.config.set(
            {
                "obdask.llm.budgets": budgets,
                **FAST,
                "obdask.llm.slots": 4,
                "obdask.llm.budget-timeout": "1s",
            }
        ),
    ):
        results: list = []

        def go():
            try:
                results.append(
                    call_model(
                        "m1", "a b", endpoints=[srv.url], options={"num_predict": 30}
                    ).total_tokens
                )
            except BudgetExceeded as exc:
                results.append(exc)

        threads = [threading.Thread(target=go) for _ in range(6)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ok = [r for r in results if isinstance(r, int)]
        assert sum(ok) <= 120 and sum(ok) == sum(srv.stats.tokens("m1"))
        assert time.monotonic() - t0 < 10
