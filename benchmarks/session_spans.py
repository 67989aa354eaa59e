"""Where one scripted session's time goes: timing spans of its driver's steps.

Runs the single session of ``bench_sessions.py`` (warm-up first) with every store
write, scheduler round trip of the driver and step of a model call wrapped in a timer
(count, total, mean per call), to find what sits on the critical path.  A profiling
aid, not a benchmark of record: the wrappers add a little time of their own.

    python benchmarks/session_spans.py --latency 0.3
"""

from __future__ import annotations

import argparse
import collections
import functools
import logging
import tempfile
import threading
import time
from typing import Any

import dask

SPANS: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
_LOCK = threading.Lock()


def _wrap(owner: Any, name: str, label: str, by_arg: bool = False) -> None:
    real = getattr(owner, name)

    @functools.wraps(real)
    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            key = f"{label}:{args[1]}" if by_arg and len(args) > 1 else label
            with _LOCK:
                span = SPANS[key]
                span[0] += 1
                span[1] += time.perf_counter() - t0

    setattr(owner, name, timed)


def instrument() -> None:
    """Wrap the driver's steps (in this process: use a ``processes=False`` cluster)."""
    import obdask.llm.client as llm_client
    import obdask.llm.pool as pool
    from obdask.session import driver
    from obdask.session.files import RecordFiles
    from obdask.session.store import SessionStore

    for name in ("begin_call", "record_tokens", "append_process", "update",
                 "set_resources", "claim", "add_note", "ask", "settle"):
        _wrap(SessionStore, name, f"store.{name}")
    for name in ("_write", "_create", "_ls", "_read_bytes"):
        _wrap(RecordFiles, name, f"files.{name}")
    _wrap(driver.Driver, "_rpc", "driver rpc", by_arg=True)
    _wrap(driver.Driver, "_model_task", "driver model call")
    _wrap(llm_client, "call_model", "llm call_model")
    _wrap(llm_client, "_request", "llm http request")
    _wrap(pool.EndpointPool, "acquire_slot", "llm slot acquire")
    _wrap(pool.SlotLease, "release", "llm slot release")
    _wrap(llm_client._budget, "reserve", "llm budget reserve")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.3)
    args = parser.parse_args(argv)

    from distributed import Client, LocalCluster

    from benchmarks.bench_sessions import reply
    from obdask.session.api import Session
    from obdask.testing import OllamaTestServer

    instrument()
    models = {r: {"model": "m:1b", "gpu": 0, "vram": 0}
              for r in ("orchestrator", "coder", "researcher")}
    with OllamaTestServer(models=["m:1b"], replies=reply, num_parallel=4,
                          first_token_latency=args.latency) as server, \
            LocalCluster(n_workers=2, threads_per_worker=4, processes=False,
                         dashboard_address=":0", silence_logs=logging.CRITICAL) as cluster, \
            Client(cluster) as client, \
            dask.config.set({"obdask.llm.endpoints": [server.url],
                             "obdask.placement.models": models, "obdask.llm.slots": 4,
                             "obdask.sessions.store": tempfile.mkdtemp(prefix="spans-"),
                             "obdask.sessions.consultation-timeout": "0s"}):
        Session.start(client, "warm up").wait(timeout=600, poll=0.01)
        SPANS.clear()
        n0 = len(server.stats.calls)
        t0 = time.perf_counter()
        Session.start(client, "one session").wait(timeout=600, poll=0.01)
        wall = time.perf_counter() - t0
        calls = len(server.stats.calls) - n0
    crit = calls * args.latency
    print(f"wall {wall:.2f}s, {calls} calls, critical path {crit:.2f}s: ratio "
          f"{wall / crit:.3f}, {(wall - crit) / calls * 1000:.1f} ms overhead per call")
    for key, (n, total) in sorted(SPANS.items(), key=lambda kv: -kv[1][1]):
        print(f"{key:40s} n={int(n):4d} total={total * 1000:9.1f} ms  "
              f"mean={total / n * 1000:7.2f} ms")
    return {"wall_s": wall, "calls": calls, "spans": dict(SPANS)}


if __name__ == "__main__":
    main()
