"""Endpoint pool and call_model against real test servers, in and out of Dask."""

from __future__ import annotations

import logging
import threading
import time

import pytest

import obdask  # noqa: F401

pytest.importorskip("ollama")

import dask  # noqa: E402
from distributed import Client, LocalCluster, wait  # noqa: E402

from obdask.exceptions import ConfigError, ModelError  # noqa: E402
from obdask.llm import client as llm_client  # noqa: E402
from obdask.llm.client import call_model, token_records  # noqa: E402
from obdask.llm.pool import (  # noqa: E402
    endpoint_urls,
    get_pool,
    normalize_url,
    reset_pools,
    resolve_model,
    slots_for,
)
from obdask.testing import ModelSpec, OllamaTestServer  # noqa: E402

FAST = {"obdask.llm.backoff": "10ms", "obdask.llm.backoff-max": "50ms"}
SCHEMA = {
    "type": "object",
    "properties": {"summary": {"type": "string"}, "files": {"type": "array"}},
    "required": ["summary", "files"],
}


@pytest.fixture(autouse=True)
def _fresh_pools():
    reset_pools()
    with dask.config.set(FAST):
        yield
    reset_pools()


def _call_dask(url_list, model, i, job=None):
    reply = call_model(model, f"task {i}: fix the failing test", endpoints=url_list, job=job)
    return reply.endpoint, reply.prompt_eval_count, reply.eval_count, reply.attempts


@pytest.fixture(scope="module")
def llm_cluster():
    """Two worker processes x 4 threads; workers inherit the obdask.llm settings below."""
    settings = {**FAST, "obdask.llm.slots": 2, "obdask.llm.cool-off": "30s"}
    with (
        dask.config.set(settings),
        LocalCluster(
            n_workers=2,
            threads_per_worker=4,
            processes=True,
            dashboard_address=":0",
            silence_logs=logging.CRITICAL,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


# -- configuration -------------------------------------------------------------------


def test_endpoint_urls(monkeypatch):
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    assert endpoint_urls([]) == ["http://127.0.0.1:11434"]
    assert normalize_url("gpu1") == "http://gpu1:11434"
    assert normalize_url(":9") == "http://127.0.0.1:9"
    assert normalize_url("https://h/") == "https://h:443"
    with dask.config.set({"obdask.llm.endpoints": ["a:1", "b:2"]}):
        monkeypatch.setenv("OLLAMA_HOST", "c:3")
        assert endpoint_urls() == ["http://a:1", "http://b:2", "http://c:3"]
        assert endpoint_urls(local="b:2") == ["http://b:2", "http://a:1", "http://c:3"]
    with dask.config.set({"obdask.llm.local-endpoint": "http://z:1"}):
        assert endpoint_urls("x:1,y:1") == ["http://z:1", "http://x:1", "http://y:1"]


def test_a_call_over_many_endpoints_reads_the_slot_settings_once(monkeypatch):
    """Per call, the work over K endpoints is one pass: with K = 200 (the fleet
    simulation) reading ``obdask.llm.slots`` per endpoint, twice, and normalising and
    de-duplicating the URL list in O(K^2) cost a worker milliseconds a call."""
    from obdask.llm import pool as pool_mod

    urls = [f"http://127.0.0.1:{20000 + i}" for i in range(200)]
    assert endpoint_urls([*urls, *urls[:5]]) == urls  # duplicates dropped, order kept
    looked_up = []
    original = pool_mod.slots_for
    monkeypatch.setattr(pool_mod, "slots_for", lambda m: looked_up.append(m) or original(m))
    reset_pools()
    try:
        lease = get_pool(urls).acquire_slot(urls, "m1", timeout=5)  # process-local slots
        lease.release()
    finally:
        reset_pools()
    assert len(looked_up) == 1


def test_slots_and_roles():
    assert slots_for("m1") == 1
    with dask.config.set({"obdask.llm.slots": 3, "obdask.llm.model-slots": {"big:70b": 1}}):
        assert slots_for("m1") == 3 and slots_for("big:70b") == 1
        assert slots_for("m1:latest") == 3
    with dask.config.set({"obdask.llm.model-slots": {"small": 5}}):
        assert slots_for("small:latest") == 5 and slots_for("small") == 5
    with dask.config.set({"obdask.llm.slots": {"default": 2, "x:1b": 4}}):
        assert slots_for("m1") == 2 and slots_for("x:1b") == 4
    with dask.config.set({"obdask.llm.slots": 4}):
        assert slots_for("anything") == 4
    with dask.config.set({"obdask.llm.slots": 0}), pytest.raises(ConfigError, match="m1"):
        slots_for("m1")
    assert resolve_model("coder") == dask.config.get("obdask.placement.models.coder.model")
    assert resolve_model("llama3.2:3b") == "llama3.2:3b"
    with dask.config.set({"obdask.placement.models.ghost": {"vram": 0}}):
        with pytest.raises(ModelError, match="obdask.placement.models.ghost.model"):
            resolve_model("ghost")


# -- single process ------------------------------------------------------------------


def test_call_records_match_server_counts():
    with OllamaTestServer(models=["m1"]) as srv:
        before = len(token_records())
        replies = [
            call_model(
                "m1",
                [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": f"question {i}?"},
                ],
                endpoints=[srv.url],
                job=f"j{i}",
                plan="p",
            )
            for i in range(3)
        ]
        records = token_records()[before:]
        server = srv.stats.calls_for("m1")
        assert [(r["prompt_eval_count"], r["eval_count"]) for r in records] == [
            (c["prompt_eval_count"], c["eval_count"]) for c in server
        ]
        assert [r.record for r in replies] == records
        assert records[0]["job"] == "j0" and records[0]["plan"] == "p"
        assert records[0]["model"] == "m1:latest" and records[0]["endpoint"] == srv.url
        assert replies[0].durations["total_duration"] == server[0]["total_duration"]
        assert srv.stats.total("/api/tags") == 1  # cached for obdask.llm.tags-ttl


def test_model_errors_name_model_and_endpoint():
    vision = {"role": "user", "content": "look", "images": ["aGVsbG8="]}
    with OllamaTestServer(models=["m1"]) as srv:
        with pytest.raises(ModelError, match=r"'nope:1b'.*not available.*ollama pull nope:1b"):
            call_model("nope:1b", "hi", endpoints=[srv.url])
        with pytest.raises(ModelError, match=rf"'m1' on {srv.url}.*does not support vision"):
            call_model("m1", [vision], endpoints=[srv.url])
        call_model("m1", "warm the tag cache", endpoints=[srv.url])
        srv.remove_model("m1")  # still listed in the cached /api/tags
        with pytest.raises(ModelError, match=rf"'m1'.*{srv.url}: answered 404"):
            call_model("m1", "hi", endpoints=[srv.url])


def test_structured_output_retries_once():
    bad, good = '{"summary": 1}', '{"summary": "ok", "files": []}'
    with OllamaTestServer(models=["m1"], replies=[bad, good, "no json", "{}"]) as srv:
        reply = call_model("m1", "summarise", endpoints=[srv.url], fmt=SCHEMA)
        assert reply.data == {"summary": "ok", "files": []} and reply.attempts == 2
        with pytest.raises(ModelError, match="does not match the requested format 2 times"):
            call_model("m1", "summarise", endpoints=[srv.url], fmt=SCHEMA)
        assert srv.stats.total("/api/chat") == 4
        assert call_model("m1", "x", endpoints=[srv.url], fmt="json").data is not None


def test_timeout_cancels_generation_and_fails_over():
    with (
        OllamaTestServer(models=["m1"], token_latency=0.2) as slow,
        OllamaTestServer(models=["m1"]) as fast,
    ):
        t0 = time.monotonic()
        reply = call_model("m1", "hi", endpoints=[slow.url, fast.url], timeout=0.5)
        assert reply.endpoint == fast.url and reply.attempts == 2
        assert time.monotonic() - t0 < 3
        assert not get_pool([slow.url, fast.url]).healthy(slow.url)
        assert slow.stats.calls == []  # the slow generation never finished
        fast.stall(2, n=4)  # every attempt (obdask.llm.attempts) stalls
        with pytest.raises(ModelError, match="attempts failed.*timed out"):
            call_model("m1", "hi", endpoints=[fast.url], timeout=0.3)


def test_local_endpoint_preferred_and_local_cap():
    with (
        OllamaTestServer(models=["m1"]) as a,
        OllamaTestServer(models=[ModelSpec("m1", parallel=8)], token_latency=0.01) as b,
        dask.config.set({"obdask.llm.slots": 2}),
    ):
        assert (
            call_model("m1", "x", endpoints=[a.url, b.url], local_endpoint=b.url).endpoint == b.url
        )
        threads = [
            threading.Thread(target=call_model, args=("m1", f"q{i}"), kwargs={"endpoints": [b.url]})
            for i in range(6)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert b.stats.peak("m1") == 2 and len(b.stats.calls) == 7


def test_overload_503_does_not_lose_calls():
    with (
        OllamaTestServer(models=["m1"], num_parallel=1, max_queue=1, token_latency=0.01) as srv,
        dask.config.set({"obdask.llm.slots": 6, "obdask.llm.attempts": 20}),
    ):
        results: list = []
        threads = [
            threading.Thread(
                target=lambda i=i: results.append(call_model("m1", f"q{i}", endpoints=[srv.url]))
            )
            for i in range(6)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 6 and len(srv.stats.calls) == 6
        assert srv.stats.statuses[("/api/chat", 503)] >= 1
        assert any(r.attempts > 1 for r in results)
        assert get_pool([srv.url]).healthy(srv.url)  # busy is not down


# -- on a LocalCluster ---------------------------------------------------------------


def test_per_model_cap_across_workers(llm_cluster):
    client = llm_cluster
    with OllamaTestServer(models=[ModelSpec("capped", parallel=8)], token_latency=0.02) as srv:
        futs = [
            client.submit(_call_dask, [srv.url], "capped", i, f"job-{i}", pure=False)
            for i in range(8)
        ]
        results = client.gather(futs)
        assert srv.stats.peak("capped") == 2  # obdask.llm.slots is 2, cluster-wide
        assert len(srv.stats.calls) == 8
        events = [
            msg for _, msg in client.get_events("obdask-tokens") if msg["endpoint"] == srv.url
        ]
        assert len(events) == 8 and {e["worker"] for e in events} <= set(
            client.scheduler_info()["workers"]
        )
        server = sorted((c["prompt_eval_count"], c["eval_count"]) for c in srv.stats.calls)
        assert sorted((e["prompt_eval_count"], e["eval_count"]) for e in events) == server
        assert sorted((p, e) for _, p, e, _ in results) == server
        assert {e["job"] for e in events} == {f"job-{i}" for i in range(8)}


def test_failover_when_an_endpoint_stops_mid_run(llm_cluster):
    client = llm_cluster
    servers = [OllamaTestServer(models=["m1"], token_latency=0.01).start() for _ in range(3)]
    urls = [s.url for s in servers]
    try:
        futs = [client.submit(_call_dask, urls, "m1", i, pure=False) for i in range(24)]
        deadline = time.monotonic() + 20
        while len(servers[0].stats.calls) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        servers[0].stop()
        time.sleep(0.5)  # requests in flight at stop() may still finish (or be cut off)
        stopped_at = len(servers[0].stats.calls)
        wait(futs)
        results = client.gather(futs)
        assert len(results) == 24
        assert len(servers[0].stats.calls) == stopped_at  # nothing reached it once stopped
        assert {r[0] for r in results} <= set(urls)
        # Every call was answered exactly once: by the stopped server before it stopped
        # (a reply cut off mid-stream is retried elsewhere), or by the other two.
        answered_by_first = sum(r[0] == urls[0] for r in results)
        assert answered_by_first <= stopped_at
        assert answered_by_first + sum(len(s.stats.calls) for s in servers[1:]) == 24
        assert any(r[3] > 1 for r in results)  # some calls hit the stopped endpoint first
    finally:
        for s in servers:
            s.stop()


def _endpoint_of_call(urls):
    return call_model("m1", "which endpoint?", endpoints=urls).endpoint


def _set_local_endpoint(url, dask_worker=None):
    from obdask.server.worker import state_of

    state_of(dask_worker).local_endpoint = url  # what the preload's --ollama-endpoint sets


def test_worker_prefers_its_own_endpoint(llm_cluster):
    client = llm_cluster
    with OllamaTestServer(models=["m1"]) as one, OllamaTestServer(models=["m1"]) as two:
        client.run(_set_local_endpoint, two.url)
        try:
            for _ in range(3):  # one at a time: a busy local endpoint spills over to others
                fut = client.submit(_endpoint_of_call, [one.url, two.url], pure=False)
                assert fut.result() == two.url
        finally:
            client.run(_set_local_endpoint, None)
        assert one.stats.total("/api/chat") == 0


def test_module_reexport():
    import obdask.llm
    import obdask.testing

    assert obdask.llm.call_model is llm_client.call_model
    assert obdask.testing.OllamaTestServer is obdask.llm.OllamaTestServer


def test_backoff_has_jitter_within_bounds():
    from obdask.llm.client import backoff_delay

    delays = [backoff_delay(1.0, 10.0) for _ in range(200)]
    assert all(0.5 <= d <= 1.0 for d in delays) and len(set(delays)) > 100
    assert all(2.5 <= backoff_delay(8.0, 5.0) <= 5.0 for _ in range(50))


# -- many endpoints (issue 14: throughput fell as endpoints were added) --------------


def test_model_lists_asked_once_per_endpoint_by_concurrent_calls():
    servers = [OllamaTestServer(models=["m1"]).start() for _ in range(6)]
    urls = [s.url for s in servers]
    try:
        barrier = threading.Barrier(12)

        def call(i):
            barrier.wait()
            call_model("m1", f"q{i}", endpoints=urls)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # 12 threads starting together ask each endpoint for its model list once, not
        # 12 times (each asking built an HTTP client: threads x endpoints of them).
        assert [s.stats.total("/api/tags") for s in servers] == [1] * 6
        assert sum(len(s.stats.calls) for s in servers) == 12
    finally:
        for s in servers:
            s.stop()


def test_model_endpoint_clients_share_one_tls_context():
    from obdask.llm.auth import ollama_client

    def context(client):  # ollama.Client -> httpx.Client -> transport -> httpcore pool
        return client._client._transport._pool._ssl_context

    a, b = ollama_client("http://127.0.0.1:1", 5.0), ollama_client("http://127.0.0.1:2", 9.0)
    # Building one costs tens of ms of CPU; one per thread and endpoint was most of
    # a many-endpoint fleet's time.
    assert context(a) is context(b)


def test_threads_starting_together_build_one_tls_context(monkeypatch):
    """A worker's first burst of model calls (16 threads asking endpoints for their
    model lists at once) built a context per thread: about 60 ms of CPU each."""
    import threading

    import httpx

    from obdask.llm import auth

    auth._ssl_context_for.cache_clear()
    built = []
    create = httpx.create_ssl_context

    def slow_create(*args, **kwargs):
        built.append(1)
        time.sleep(0.05)  # the others arrive while this one builds
        return create(*args, **kwargs)

    monkeypatch.setattr(httpx, "create_ssl_context", slow_create)
    threads = [threading.Thread(target=auth._ssl_context) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    auth._ssl_context_for.cache_clear()
    assert len(built) == 1


def _busy_spans(servers):
    """Highest number of generations running at once over all ``servers``."""
    edges = []
    for s in servers:
        for c in s.stats.calls:
            edges += [(c["ts"] - c["total_duration"] / 1e9, 1), (c["ts"], -1)]
    running = peak = 0
    for _, step in sorted(edges):
        running += step
        peak = max(peak, running)
    return peak


def _import_llm():
    import ollama  # noqa: F401

    import obdask.llm.client  # noqa: F401


@pytest.mark.slow
def test_many_endpoints_run_every_slot_at_once():
    """N endpoints x P slots, N*P calls of latency L: all N*P run at the same time."""
    n, p, latency = 16, 2, 3.0
    servers = [OllamaTestServer(models=["m1"], num_parallel=p, first_token_latency=latency,
                                reply_tokens=(2, 2)).start() for _ in range(n)]
    urls = [s.url for s in servers]
    try:
        with (
            dask.config.set({**FAST, "obdask.llm.slots": p}),
            LocalCluster(n_workers=2, threads_per_worker=n * p // 2, processes=True,
                         dashboard_address=":0", silence_logs=logging.CRITICAL) as cluster,
            Client(cluster) as client,
        ):
            from obdask.server import install

            install(client)
            client.run(_import_llm)
            futs = [client.submit(_call_dask, urls, "m1", i, pure=False) for i in range(n * p)]
            results = client.gather(futs)
        assert len(results) == n * p
        assert [s.stats.peak_running("m1") for s in servers] == [p] * n
        assert _busy_spans(servers) == n * p
    finally:
        for s in servers:
            s.stop()


def test_free_slots_answered_by_the_scheduler_in_one_call(llm_cluster):
    from distributed import Semaphore

    from obdask.llm.pool import _free_slots
    from obdask.server import install

    client = llm_cluster
    install(client)
    sem = Semaphore(max_leases=3, name="obdask-test-free-slots")
    assert sem.acquire(timeout=5)
    try:
        assert _free_slots([sem.name, "obdask-never-registered"]) == [2, None]
    finally:
        sem.release()
    assert _free_slots([sem.name]) == [3]
    assert "obdask-never-registered" not in client.run_on_scheduler(
        lambda dask_scheduler: list(dask_scheduler.extensions["semaphores"].leases))


def test_one_thread_per_process_waits_on_the_scheduler_for_a_slot(llm_cluster):
    """distributed's semaphore wakes every waiter on each release (each then re-arms a
    timeout): with many threads of a process waiting there, the scheduler's CPU per
    model call grew with the queue.  The threads of one process wait in line locally;
    only the first of them waits on the scheduler, and every one gets a lease in turn."""
    import threading
    import time

    from obdask.llm.pool import _acquire, slot_semaphore

    client = llm_cluster
    with client.as_current():
        sem = slot_semaphore("http://127.0.0.1:9/funnel", "m", leases=1)
        name = sem.name
        assert _acquire(sem, "u", "m", 5)  # the only lease: everyone else waits
        got: list[int] = []

        def wait(i: int) -> None:
            with client.as_current():
                if _acquire(sem, "u", "m", 60):
                    got.append(i)
                    sem.release()

        threads = [threading.Thread(target=wait, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()

        def pending(dask_scheduler, name=name):
            return dask_scheduler.extensions["semaphores"].metrics["pending"][name]

        deadline = time.monotonic() + 10
        while client.run_on_scheduler(pending) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # time enough for every thread to reach the scheduler, were it so
        waiting = client.run_on_scheduler(pending)
        sem.release()
        for t in threads:
            t.join(30)
    assert waiting == 1
    assert sorted(got) == list(range(8))
