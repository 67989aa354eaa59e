"""Where the core time of one ``@cmd:true`` job goes, in every process, at the margin.

``python benchmarks/cpu_breakdown.py --jobs 2000 --shape independent --repeat 3``
runs an ``--jobs`` plan and a plan a tenth its size (at least 50 jobs) alternately
on one LocalCluster of 2 worker processes x 1 thread (sandbox off, fusion and
batching on: the suite's ``per-job`` settings), and reads the user+system CPU of
every process before and after each run (``psutil``: ``/proc/<pid>/stat``): the
process holding the client and the scheduler, each worker, each worker's reaped
children (the jobs' shells: their CPU lands there when the worker waits for them)
and each worker's live children (the watchdog).  It prints, per process, the slope
``(CPU(n) - CPU(n/10)) / (n - n/10)`` of the medians: core milliseconds per job,
without what a run costs once.  Then the same for the spawn floor
(:class:`benchmarks.common.SpawnFloor`: ``true`` spawned from 2 processes).

On a machine with 2 cores that the benchmark keeps busy, the marginal wall time per
job is about the total core time per job / 2 plus the serial work of the client
before the first job and after the last (see docs/performance.md).  ``--json``
writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import dask
import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (  # noqa: E402
    NO_SANDBOX,
    OPTIMIZE_ON,
    SpawnFloor,
    local_cluster,
    plan_text,
    shape_edges,
    write_plan,
)
from benchmarks.suite import run_obdask  # noqa: E402

SETTINGS = {**NO_SANDBOX, **OPTIMIZE_ON}


def cpu(procs: dict[str, psutil.Process]) -> dict[str, float]:
    """Seconds of CPU of each process, and of each one's reaped children (``name+``)."""
    out = {}
    for name, proc in procs.items():
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        out[name] = t.user + t.system
        out[f"{name} reaped children"] = t.children_user + t.children_system
    return out


def _cmdline(proc: psutil.Process) -> list[str]:
    """Its command line; empty for a child that ended since it was listed."""
    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return []


def cluster_processes(client: Any) -> dict[str, psutil.Process]:
    """This process (client + scheduler), the workers and their live children."""
    procs = {"client+scheduler": psutil.Process()}
    for i, pid in enumerate(sorted(client.run(os.getpid).values())):
        worker = psutil.Process(pid)
        procs[f"worker{i}"] = worker
        for child in worker.children():
            procs[f"worker{i} child {child.pid}"] = child
    return procs


def slope(big: list[dict[str, float]], small: list[dict[str, float]], key: str,
          jobs: int) -> float:
    """Milliseconds per job between the two sizes, from the medians."""
    b = statistics.median(r.get(key, 0.0) for r in big)
    s = statistics.median(r.get(key, 0.0) for r in small)
    return (b - s) / jobs * 1e3


def measure(jobs: int, shape: str, repeat: int) -> dict[str, Any]:
    small = max(50, jobs // 10 // 50 * 50)
    dask.config.set(SETTINGS)
    runs: dict[str, list[dict[str, float]]] = {"big": [], "small": []}
    with local_cluster(2, 1) as client, tempfile.TemporaryDirectory() as folder:
        paths = {"big": write_plan(folder, "big", plan_text("@cmd:true", shape_edges(shape, jobs))),
                 "small": write_plan(folder, "small",
                                     plan_text("@cmd:true", shape_edges(shape, small)))}
        warm = write_plan(folder, "warm", plan_text("@cmd:true", shape_edges(shape, 100)))
        run_obdask(client, warm, SETTINGS)  # imports, the watchdogs, the cgroup pools
        procs = cluster_processes(client)
        for _ in range(repeat):
            for size, path in paths.items():
                before, start = cpu(procs), time.perf_counter()
                run_obdask(client, path, SETTINGS)
                wall, after = time.perf_counter() - start, cpu(procs)
                runs[size].append({"wall": wall, **{k: after[k] - before[k] for k in after
                                                    if k in before}})
        floor = SpawnFloor()
        try:
            pool = {f"floor{i}": p for i, p in enumerate(psutil.Process().children())
                    if "multiprocessing" in " ".join(_cmdline(p))}
            floor_runs: dict[str, list[dict[str, float]]] = {"big": [], "small": []}
            for _ in range(repeat):
                for size, n in (("big", jobs), ("small", small)):
                    before = cpu(pool)
                    wall = floor(n)
                    after = cpu(pool)
                    floor_runs[size].append({"wall": wall, "cpu": sum(
                        after[k] - before[k] for k in after if k in before)})
        finally:
            floor.close()
    n = jobs - small
    per_process = {key: slope(runs["big"], runs["small"], key, n)
                   for key in runs["big"][0] if key != "wall"}
    return {
        "jobs": jobs, "small": small, "shape": shape, "repeat": repeat,
        "wall_ms_per_job": slope(runs["big"], runs["small"], "wall", n),
        # every process measured, even one whose slope is noise around zero (a short run's
        # client can come out at 0 or below); the printout leaves those out
        "cpu_ms_per_job": per_process,
        "cpu_total_ms_per_job": sum(per_process.values()),
        "floor_wall_ms_per_job": slope(floor_runs["big"], floor_runs["small"], "wall", n),
        "floor_cpu_ms_per_job": slope(floor_runs["big"], floor_runs["small"], "cpu", n),
        # each run's seconds (wall, and CPU per process / the floor's pool in all)
        "runs": runs, "floor_runs": floor_runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--shape", default="independent",
                        choices=["independent", "chain50", "fanout"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    res = measure(args.jobs, args.shape, args.repeat)
    print(f"{res['shape']}: {res['jobs']} vs {res['small']} jobs, {res['repeat']} repeats, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"  obdask marginal wall {res['wall_ms_per_job']:.3f} ms/job")
    for key, value in res["cpu_ms_per_job"].items():
        if abs(value) < 0.005:
            continue
        print(f"  {key:36s} {value:7.3f} core ms/job")
    total = res["cpu_total_ms_per_job"]
    print(f"  {'total':36s} {total:7.3f} core ms/job (/2 cores: {total / 2:.3f} ms)")
    print(f"  floor marginal wall {res['floor_wall_ms_per_job']:.3f} ms/job, "
          f"{res['floor_cpu_ms_per_job']:.3f} core ms/job; obdask/floor wall "
          f"{res['wall_ms_per_job'] / res['floor_wall_ms_per_job']:.2f}, core time "
          f"{total / res['floor_cpu_ms_per_job']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
