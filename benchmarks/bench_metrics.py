"""Scheduler CPU time with and without obdask's metrics extension (issue 12; target <= 1.05).

    python benchmarks/bench_metrics.py [--jobs 5000] [--sessions 20] [--repeat 3] [--json out.json]

Two clusters are up at once, each a ``SubprocessCluster`` (the scheduler in its own
process, ``--workers`` worker processes x ``--threads`` threads), both with obdask's
scheduler preload; the ``without`` one loads ``benchmarks/nometrics.py`` first, which
leaves the metrics extension out (as ``obdask.metrics.enabled: false`` does; a preload,
because one environment cannot set the switch differently for two clusters).  Workers
sample every 0.5 s where the extension is, so it sees job and token records, samples and
pressure checks as in production.  The runs alternate, ``repeat`` rounds of ``with``
then ``without``, so the machine's load hits both alike; the ratio is of medians.

Two halves, on the same two clusters:

* ``jobs``: a plan of ``--jobs`` independent ``@cmd:true`` jobs (sandbox off, fusion and
  batching on, as a user runs it): scheduler CPU per job.  ``batch-duration`` is set
  out of reach, so both sides submit the same graph: with the extension the runner
  sizes batches from the job durations it recorded (``obdask_metrics_jobs``, whose cost
  still counts), which made the ``with`` side run 2.5x as many Dask tasks as the
  ``without`` side, measuring the batching rather than the extension;
* ``sessions``: ``--sessions`` scripted sessions at once (``bench_sessions.reply``: the
  orchestrator takes the default moves) against the Ollama-compatible test server with
  ``--latency`` s before the first token: scheduler CPU per session.

Scheduler CPU is the scheduler process's own CPU clock, read in the scheduler through
``run_on_scheduler`` (:func:`scheduler_cpu_ns`): ``CLOCK_PROCESS_CPUTIME_ID``, every
thread, in nanoseconds on Linux (the scheduler's ``sum_exec_runtime``, the source of
``/proc/PID/schedstat``, summed over the thread group including threads that ended).
psutil's ``cpu_times``, used before, counts 10 ms clock ticks: 150 jobs x 267 us is 4
ticks, and both sides read exactly the same.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SIDES = ("with", "without")
#: Scheduler preloads per side (nometrics.py drops the extension before obdask's).
PRELOADS = {"with": ["obdask.preload.scheduler"],
            "without": [os.path.join(HERE, "nometrics.py"), "obdask.preload.scheduler"]}


def scheduler_cpu_ns(client: Any) -> int:
    """CPU time of ``client``'s scheduler process so far, in ns (all its threads).

    Read inside the scheduler (one ``run_on_scheduler`` round trip, the same on both
    sides of a comparison), so no clock-tick granularity and no Linux-only file.
    """
    return int(client.run_on_scheduler(time.process_time_ns))


def _extensions(dask_scheduler: Any) -> list[str]:
    host = dask_scheduler.extensions.get("obdask")
    return sorted(host.extensions) if host is not None else []


@contextlib.contextmanager
def clusters(workers: int, threads: int, env: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Both clusters and a client on each: ``{"with": client, "without": client}``.

    ``env`` is set while the processes start (they read their dask config from it).
    """
    from distributed import Client
    from distributed.deploy.subprocess import SubprocessCluster

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    out: dict[str, Any] = {}
    stack = contextlib.ExitStack()
    try:
        for side in SIDES:
            cluster = stack.enter_context(SubprocessCluster(
                n_workers=workers, threads_per_worker=threads, dashboard_address=None,
                silence_logs=logging.ERROR, scheduler_kwargs={"preload": PRELOADS[side]}))
            client = stack.enter_context(Client(cluster))
            client.wait_for_workers(workers, timeout=120)  # SubprocessCluster does not wait
            found = client.run_on_scheduler(_extensions)
            if ("metrics" in found) != (side == "with"):
                raise RuntimeError(f"the {side!r} scheduler has extensions {found}")
            out[side] = client
        yield out
    finally:
        stack.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def alternate(runs: dict[str, Callable[[], float]], repeat: int) -> dict[str, dict[str, Any]]:
    """One warm-up each, then ``repeat`` rounds of every side; median, min, max per side."""
    from benchmarks.common import interleave

    for run in runs.values():
        run()
    return interleave(runs, repeat)


def jobs_half(clients: dict[str, Any], folder: str, n: int, repeat: int) -> dict[str, Any]:
    """Scheduler CPU per job (ns) of one plan of ``n`` independent ``@cmd:true`` jobs."""
    from benchmarks.common import NO_SANDBOX, OPTIMIZE_ON, plan_text, shape_edges, write_plan
    from benchmarks.suite import run_obdask

    # the same graph on both sides (module docstring)
    settings = {**NO_SANDBOX, **OPTIMIZE_ON, "obdask.optimize.batch-duration": "1h"}

    path = write_plan(folder, f"metrics-{n}", plan_text("@cmd:true",
                                                       shape_edges("independent", n)))
    walls: dict[str, list[float]] = {side: [] for side in SIDES}

    def one(side: str) -> float:
        client = clients[side]
        before = scheduler_cpu_ns(client)
        walls[side].append(run_obdask(client, path, settings))
        return (scheduler_cpu_ns(client) - before) / n

    cpu = alternate({side: (lambda side=side: one(side)) for side in SIDES}, repeat)
    for side in SIDES:
        print(f"  jobs: {n} jobs, metrics {side:<7}: scheduler CPU "
              f"{cpu[side]['median'] / 1e3:.0f} us/job (min {cpu[side]['min'] / 1e3:.0f}, "
              f"max {cpu[side]['max'] / 1e3:.0f}), wall {min(walls[side]):.1f} s", flush=True)
    return {"jobs": n, "scheduler_cpu_ns_per_job": cpu,
            "wall_s": {side: walls[side][1:] for side in SIDES}}


def sessions_half(clients: dict[str, Any], n: int, repeat: int) -> dict[str, Any]:
    """Scheduler CPU per session (ns) of ``n`` scripted sessions run at once."""
    from obdask.session.api import Session

    walls: dict[str, list[float]] = {side: [] for side in SIDES}
    done: dict[str, list[int]] = {side: [] for side in SIDES}

    def one(side: str) -> float:
        client = clients[side]
        before = scheduler_cpu_ns(client)
        started = time.perf_counter()
        handles = [Session.start(client, f"session {i}") for i in range(n)]
        states = [h.wait(timeout=1200, poll=0.05)["state"] for h in handles]
        walls[side].append(time.perf_counter() - started)
        done[side].append(states.count("done"))
        if states.count("done") != n:
            raise RuntimeError(f"{side}: sessions ended {states}")
        return (scheduler_cpu_ns(client) - before) / n

    cpu = alternate({side: (lambda side=side: one(side)) for side in SIDES}, repeat)
    for side in SIDES:
        print(f"  sessions: {n} at once, metrics {side:<7}: scheduler CPU "
              f"{cpu[side]['median'] / 1e6:.1f} ms/session (min {cpu[side]['min'] / 1e6:.1f}, "
              f"max {cpu[side]['max'] / 1e6:.1f}), wall {min(walls[side]):.1f} s", flush=True)
    return {"sessions": n, "scheduler_cpu_ns_per_session": cpu,
            "wall_s": {side: walls[side][1:] for side in SIDES}}


def measure(jobs: int, sessions: int, repeat: int, workers: int = 2, threads: int = 4,
            latency: float = 0.05, parallel: int = 8) -> dict[str, Any]:
    """Both halves (a half with 0 jobs or sessions is left out); rows and ratios."""
    import dask

    from benchmarks.bench_sessions import reply
    from benchmarks.common import ratio
    from obdask.testing import OllamaTestServer

    out: dict[str, Any] = {"rows": [], "ratios": {}}
    with tempfile.TemporaryDirectory(prefix="obdask-bench-metrics-") as folder, \
            OllamaTestServer(models=["m:1b"], replies=reply, num_parallel=parallel,
                             first_token_latency=latency) as server:
        models = {r: {"model": "m:1b", "gpu": 0, "vram": 0}
                  for r in ("orchestrator", "coder", "researcher")}
        settings = {"obdask.llm.endpoints": [server.url], "obdask.placement.models": models,
                    "obdask.llm.slots": parallel,
                    "obdask.sessions.store": os.path.join(folder, "sessions"),
                    "obdask.sessions.consultation-timeout": "0s"}
        env = {"DASK_OBDASK__METRICS__INTERVAL": "500ms",
               "DASK_DISTRIBUTED__LOGGING__DISTRIBUTED": "error",
               # the workers import benchmarks.* by name (cloudpickle by reference)
               "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH"))
                                             if p)}
        with dask.config.set(settings), clusters(workers, threads, env) as clients:
            for client in clients.values():
                client.run(dask.config.set, settings)
            if jobs:
                row = jobs_half(clients, folder, jobs, repeat)
                out["rows"].append({"part": "jobs", **row})
                cpu = row["scheduler_cpu_ns_per_job"]
                out["ratios"]["metrics on/off scheduler CPU"] = ratio(cpu["with"],
                                                                      cpu["without"])
            if sessions:
                row = sessions_half(clients, sessions, repeat)
                out["rows"].append({"part": "sessions", "latency_s": latency, **row})
                cpu = row["scheduler_cpu_ns_per_session"]
                out["ratios"]["metrics on/off scheduler CPU sessions"] = ratio(
                    cpu["with"], cpu["without"])
    for name, value in out["ratios"].items():
        print(f"  {name}: {value:.3f} (target <= 1.05)", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000, help="jobs of the plan (0: skip)")
    parser.add_argument("--sessions", type=int, default=20, help="sessions at once (0: skip)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of both sides")
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    out = measure(args.jobs, args.sessions, args.repeat, latency=args.latency)
    out["load_before"] = load
    out["load_after"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average before {load}, after {out['load_after']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return out


if __name__ == "__main__":
    sys.path.insert(0, ROOT)  # run as a script: benchmarks.* importable
    main(sys.argv[1:])
