"""Time per job as plans grow: obdask must stay linear in the number of jobs.

Run:  python benchmarks/bench_scale.py [--sizes 2000,8000,50000] [--json out.json]
      python benchmarks/bench_scale.py --saturation 1.1,inf   # Dask's root-task queuing

Each size is a plan of independent ``@cmd:true`` jobs run by ``obdask.run`` on a
fresh ``LocalCluster`` (2 worker processes x 1 thread), measured in one process,
one after another.  Reports seconds per job at each size and the ratio of the
largest to the smallest (target: <= 1.5, docs/performance.md).  With
``--saturation`` each size runs once per value of
``distributed.scheduler.worker-saturation`` (1.1 is Dask's default: a plan's
jobs share one task group, so Dask queues them as root tasks; ``inf`` sends them
all to the workers at once).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

import dask

import obdask


def write_plan(folder: str, n: int) -> str:
    path = os.path.join(folder, f"scale-{n}.md")
    with open(path, "w") as f:
        f.write(f"# Plan: scale {n}\nplan_id=scale-{n}\n")
        f.writelines(f"- [ ] id=s{i} lane=1 payload=@cmd:true\n" for i in range(n))
    return path


def measure(n: int, saturation: str) -> dict[str, float]:
    from distributed import Client, LocalCluster

    folder = tempfile.mkdtemp(prefix="obdask-scale-")
    plan = write_plan(folder, n)
    value = float(saturation)
    with dask.config.set({"distributed.scheduler.worker-saturation": value}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                         dashboard_address=None, silence_logs=logging.CRITICAL) as cluster, \
            Client(cluster) as client:
        started = time.perf_counter()
        result = obdask.run(plan, client)
        seconds = time.perf_counter() - started
    if not result.ok:
        raise SystemExit(f"{n} jobs: the run failed: {result.summary['counts']}")
    return {"jobs": n, "saturation": saturation, "seconds": seconds,
            "ms_per_job": 1000 * seconds / n}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,8000,50000")
    parser.add_argument("--saturation", default="inf",
                        help="comma-separated values of worker-saturation (default inf)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for saturation in args.saturation.split(","):
        for n in sizes:
            row = measure(n, saturation)
            rows.append(row)
            print(f"saturation {saturation:>4}  {n:>6} jobs  {row['seconds']:8.1f} s  "
                  f"{row['ms_per_job']:6.2f} ms/job", flush=True)
    out: dict = {"rows": rows, "ratios": {}}
    for saturation in args.saturation.split(","):
        per_job = [r["ms_per_job"] for r in rows if r["saturation"] == saturation]
        ratio = max(per_job) / min(per_job)
        out["ratios"][saturation] = ratio
        print(f"saturation {saturation}: slowest / fastest time per job = {ratio:.2f} "
              "(target <= 1.5)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
