"""Scheduler CPU time with and without obdask's metrics extension (issue 12; target <= 1.05).

    python benchmarks/bench_metrics.py [--jobs 5000] [--sessions 20] [--repeat 3] [--json out.json]

Two clusters are up at once, each a ``SubprocessCluster`` (the scheduler in its own
process, ``--workers`` worker processes x ``--threads`` threads), both with obdask's
scheduler preload; the ``without`` one loads ``benchmarks/nometrics.py`` first, which
leaves the metrics extension out (as ``obdask.metrics.enabled: false`` does; a preload,
because one environment cannot set the switch differently for two clusters).  Workers
sample their host every ``--interval`` where the extension is (default: obdask's
default, ``obdask.metrics.interval``, 5 s; ``0.5s`` is ten times the sample traffic),
so it sees job and token records, samples and pressure checks as in production.  The
runs alternate, ``repeat`` rounds of both sides, the first side of a round alternating
too (ABBA), so the machine's load and what one run leaves behind hit both alike; the
ratio is of medians.

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

Ratios (with / without, of medians): ``metrics on/off scheduler CPU`` (the whole run, the
issue's figure) and ``... above idle`` (the run's CPU less the idle scheduler's CPU per
second times the run's wall time: what the jobs or sessions themselves cost, without
the wall-time noise of a shared machine), each also for ``sessions``; and
``metrics on/off idle scheduler CPU`` (the extension's standing cost: worker samples).
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


#: Seconds of idle scheduler CPU measured before each run (its standing cost per second).
IDLE = 1.0


def compare(clients: dict[str, Any], work: Callable[[Any], None], per: int,
            repeat: int) -> dict[str, Any]:
    """``work(client)`` on both sides: one warm-up each, then ``repeat`` alternating rounds.

    Per run: the scheduler's CPU over the run divided by ``per`` (``cpu``), the wall
    time, the idle scheduler's CPU per second just before (``idle``: heartbeats,
    periodic callbacks, worker samples) and the CPU above that idle rate, per ``per``
    (``busy``).  On a loaded machine the wall time of a run varies 2x, and the idle
    part (some 30 ms/s here) with it, which is most of the noise of ``cpu``.
    """
    from benchmarks.common import stat

    got: dict[str, dict[str, list[float]]] = {
        side: {"cpu": [], "wall": [], "idle": [], "busy": []} for side in SIDES}
    for round_ in range(repeat + 1):
        # ABBA: the side that runs first in a round alternates, so what one run leaves
        # behind (the other cluster winding down, the page cache) falls on both alike
        for side in (SIDES if round_ % 2 else SIDES[::-1]):
            client = clients[side]
            start = scheduler_cpu_ns(client)
            time.sleep(IDLE)
            before = scheduler_cpu_ns(client)
            idle = (before - start) / IDLE
            started = time.perf_counter()
            work(client)
            wall = time.perf_counter() - started
            cpu = scheduler_cpu_ns(client) - before
            if round_:  # round 0 is the warm-up
                row = got[side]
                row["cpu"].append(cpu / per)
                row["wall"].append(wall)
                row["idle"].append(idle)
                row["busy"].append((cpu - idle * wall) / per)
    return {side: {k: stat(v) for k, v in row.items()} for side, row in got.items()}


def _print(what: str, got: dict[str, Any], scale: float, unit: str) -> None:
    for side in SIDES:
        cpu, busy = got[side]["cpu"], got[side]["busy"]
        print(f"  {what}, metrics {side:<7}: scheduler CPU {cpu['median'] / scale:.1f} {unit} "
              f"({cpu['min'] / scale:.1f}-{cpu['max'] / scale:.1f}), above idle "
              f"{busy['median'] / scale:.1f}, idle {got[side]['idle']['median'] / 1e6:.1f} "
              f"ms/s, wall {got[side]['wall']['median']:.1f} s", flush=True)


def jobs_half(clients: dict[str, Any], folder: str, n: int, repeat: int) -> dict[str, Any]:
    """Scheduler CPU per job (ns) of one plan of ``n`` independent ``@cmd:true`` jobs."""
    from benchmarks.common import NO_SANDBOX, OPTIMIZE_ON, plan_text, shape_edges, write_plan
    from benchmarks.suite import run_obdask

    # the same graph on both sides (module docstring)
    settings = {**NO_SANDBOX, **OPTIMIZE_ON, "obdask.optimize.batch-duration": "1h"}
    path = write_plan(folder, f"metrics-{n}", plan_text("@cmd:true",
                                                       shape_edges("independent", n)))
    got = compare(clients, lambda client: run_obdask(client, path, settings), n, repeat)
    _print(f"jobs: {n} jobs", got, 1e3, "us/job")
    return {"jobs": n, "scheduler_cpu_ns_per_job": got}


def sessions_half(clients: dict[str, Any], n: int, repeat: int) -> dict[str, Any]:
    """Scheduler CPU per session (ns) of ``n`` scripted sessions run at once."""
    from obdask.session.api import Session

    def work(client: Any) -> None:
        handles = [Session.start(client, f"session {i}") for i in range(n)]
        states = [h.wait(timeout=1200, poll=0.05)["state"] for h in handles]
        if states.count("done") != n:
            raise RuntimeError(f"sessions ended {states}")

    got = compare(clients, work, n, repeat)
    _print(f"sessions: {n} at once", got, 1e6, "ms/session")
    return {"sessions": n, "scheduler_cpu_ns_per_session": got}


def measure(jobs: int, sessions: int, repeat: int, workers: int = 2, threads: int = 4,
            latency: float = 0.05, parallel: int = 8, interval: str | None = None
            ) -> dict[str, Any]:
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
        env = {"DASK_DISTRIBUTED__LOGGING__DISTRIBUTED": "error",
               # the workers import benchmarks.* by name (cloudpickle by reference)
               "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH"))
                                             if p)}
        if interval is not None:
            env["DASK_OBDASK__METRICS__INTERVAL"] = interval
        with dask.config.set(settings), clusters(workers, threads, env) as clients:
            for client in clients.values():
                client.run(dask.config.set, settings)
            halves = []
            if jobs:
                halves.append(("", {"part": "jobs", **jobs_half(clients, folder, jobs, repeat)},
                               "scheduler_cpu_ns_per_job"))
            if sessions:
                halves.append((" sessions", {"part": "sessions", "latency_s": latency,
                                             **sessions_half(clients, sessions, repeat)},
                               "scheduler_cpu_ns_per_session"))
            for suffix, row, column in halves:
                out["rows"].append(row)
                got = row[column]
                for what, name in (("cpu", "metrics on/off scheduler CPU"),
                                   ("busy", "metrics on/off scheduler CPU above idle"),
                                   ("idle", "metrics on/off idle scheduler CPU")):
                    if what != "idle" or not suffix:  # the idle rate: once is enough
                        out["ratios"][name + suffix] = ratio(got["with"][what],
                                                             got["without"][what])
    for name, value in out["ratios"].items():
        print(f"  {name}: {value:.3f} (target <= 1.05)", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000, help="jobs of the plan (0: skip)")
    parser.add_argument("--sessions", type=int, default=20, help="sessions at once (0: skip)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of both sides")
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--interval", default=None,
                        help="workers' sampling interval (default: obdask.metrics.interval)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    out = measure(args.jobs, args.sessions, args.repeat, latency=args.latency,
                  interval=args.interval)
    out["interval"] = args.interval
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
