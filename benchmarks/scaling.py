"""Scaling simulation on one machine: more workers, and a fleet of model endpoints.

* :func:`workers`: the same ``@cmd:true`` plan on 1, 2, 4, 8, 16 worker processes
  (1 thread each) of a ``LocalCluster``; the CPU per job of this process (client and
  scheduler: a LocalCluster's scheduler runs here) is measured next to the wall time.
  (A ``SubprocessCluster`` would measure the scheduler alone, but its workers did not
  start on the loaded development machine.)
  On a 2-core machine more workers cannot run more commands at once: the curve shows
  what the scheduler and the extra processes cost as a cluster grows, not a speed-up.
* :func:`fleet`: K Ollama test servers (``obdask.testing.OllamaTestServer``, one port
  each: K distinct endpoints), P slots each, a fixed latency L per call, and enough
  worker threads to keep K*P calls in flight; ``2*K*P`` ``call_model`` tasks per point.
  Reported: calls/s vs the limit K*P/L and scheduler CPU per call (the slot
  semaphores are Dask semaphores on the scheduler).  The servers run in a process
  of their own, so neither their CPU nor their threads' share of the GIL counts
  against the scheduler's process.
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any

import dask
import psutil

from benchmarks.common import NO_SANDBOX, OPTIMIZE_ON, plan_text, shape_edges, stat, write_plan
from benchmarks.suite import run_obdask

logger = logging.getLogger(__name__)


def workers(quick: bool, repeat: int) -> dict[str, Any]:
    """Wall and scheduler CPU per job of one plan on growing clusters."""
    from benchmarks.common import local_cluster

    counts, n = (1, 2, 4, 8, 16), (200 if quick else 1000)
    rows = []
    with tempfile.TemporaryDirectory(prefix="obdask-bench-") as folder:
        path = write_plan(folder, "workers", plan_text("@cmd:true", shape_edges("independent", n)))
        for k in counts:
            with local_cluster(k, 1) as client:
                sched = psutil.Process()  # the LocalCluster's scheduler runs in this process
                run_obdask(client, path, {**NO_SANDBOX, **OPTIMIZE_ON})  # warm-up
                walls, cpus = [], []
                for _ in range(repeat):
                    cpu0 = sum(sched.cpu_times()[:2])
                    walls.append(run_obdask(client, path, {**NO_SANDBOX, **OPTIMIZE_ON}) / n)
                    cpus.append((sum(sched.cpu_times()[:2]) - cpu0) / n)
            row = {"workers": k, "jobs": n, "wall_s_per_job": stat(walls),
                   "scheduler_cpu_s_per_job": stat(cpus)}
            rows.append(row)
            print(f"  {k:>2} workers: {1000 * row['wall_s_per_job']['median']:.2f} ms/job wall, "
                  f"client+scheduler CPU {1e6 * row['scheduler_cpu_s_per_job']['median']:.0f} "
                  "us/job",
                  flush=True)
    first, last = rows[0], rows[-1]
    return {"rows": rows, "ratios": {
        f"client+scheduler CPU/job {last['workers']}w/{first['workers']}w":
            last["scheduler_cpu_s_per_job"]["median"] / first["scheduler_cpu_s_per_job"]["median"]}}


def _call(i: int, endpoints: list[str]) -> float:
    from benchmarks.bench_llm import MODEL
    from obdask.llm.client import call_model

    start = time.perf_counter()
    call_model(MODEL, f"call {i}: say ok", endpoints=endpoints, plan="fleet",
               options={"num_predict": 2})
    return time.perf_counter() - start


def _import_llm() -> None:
    import ollama  # noqa: F401

    import obdask.llm.client  # noqa: F401


def _serve_fleet(n: int, slots: int, latency: float, conn: Any) -> None:
    """In a process of its own: ``n`` test servers; send their URLs, stop on any message."""
    from benchmarks.bench_llm import MODEL
    from obdask.testing import OllamaTestServer

    servers = [OllamaTestServer(models=[MODEL], num_parallel=slots, first_token_latency=latency,
                                reply_tokens=(2, 2)).start() for _ in range(n)]
    try:
        conn.send([s.url for s in servers])
        conn.recv()
    finally:
        for server in servers:
            server.stop()


class Fleet:
    """``n`` Ollama test servers in a separate process (``spawn``).

    Not in the process that holds the LocalCluster's scheduler: their request
    threads would compete with the scheduler for that process's GIL and count in
    its CPU, which is what the simulation measures per call.
    """

    def __init__(self, n: int, slots: int, latency: float) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve_fleet, args=(n, slots, latency, child),
                                   daemon=True)
        self.process.start()
        if not self._conn.poll(120):
            self.process.kill()
            raise RuntimeError("the fleet of test servers did not start within 120 s")
        self.urls: list[str] = self._conn.recv()
        self.ps = psutil.Process(self.process.pid)

    def cpu(self) -> float:
        """Seconds of CPU the servers' process has used."""
        return sum(self.ps.cpu_times()[:2])

    def stop(self) -> None:
        try:
            self._conn.send("stop")
        except OSError:
            pass
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()


def fleet(quick: bool, latency: float = 1.0, slots: int = 2) -> dict[str, Any]:
    """Model-call throughput and scheduler CPU per call as the fleet grows."""
    from benchmarks.common import local_cluster

    ks = (1, 8, 32) if quick else (1, 10, 50, 100, 200)
    servers = Fleet(max(ks), slots, latency)
    rows = []
    threads = max(ks) * slots // 2 + 1
    try:
        with dask.config.set({"obdask.llm.slots": slots, "obdask.llm.backoff": "0.05s",
                              "obdask.llm.slot-timeout": "600s"}), \
                local_cluster(2, threads) as client:
            proc = psutil.Process()  # the LocalCluster's scheduler runs in this process
            client.gather([client.submit(_call, -1, servers.urls[:1], pure=False)])  # warm-up
            client.run(_import_llm)  # a cold worker's first imports are not throughput
            for k in ks:
                urls = servers.urls[:k]
                calls = 2 * k * slots
                cpu0, served0 = sum(proc.cpu_times()[:2]), servers.cpu()
                start = time.perf_counter()
                futures = [client.submit(_call, i, urls, pure=False) for i in range(calls)]
                per_call = client.gather(futures)
                wall = time.perf_counter() - start
                cpu, served = sum(proc.cpu_times()[:2]) - cpu0, servers.cpu() - served0
                limit = k * slots / latency
                row = {"K": k, "P": slots, "L": latency, "calls": calls, "wall_s": wall,
                       "calls_per_s": calls / wall, "limit": limit,
                       "ratio": calls / wall / limit, "cpu_s_per_call": cpu / calls,
                       "servers_cpu_s_per_call": served / calls, "call_s": stat(per_call)}
                rows.append(row)
                print(f"  fleet K={k:>3} (P={slots}, L={latency}s): {row['calls_per_s']:.1f} "
                      f"calls/s of {limit:.0f} ({row['ratio']:.2f}), client+scheduler CPU "
                      f"{1000 * row['cpu_s_per_call']:.1f} ms/call (test servers "
                      f"{1000 * row['servers_cpu_s_per_call']:.1f})", flush=True)
    finally:
        servers.stop()
    return {"rows": rows, "ratios": {f"fleet K={rows[-1]['K']} calls/s / limit":
                                     rows[-1]["ratio"]}}
