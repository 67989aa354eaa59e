"""CPU time per job in each process (client, scheduler, each worker), obdask vs raw Dask.

``python benchmarks/cpu_per_job.py`` — 500 independent ``@cmd:true`` jobs vs 500
``client.submit`` of the same shell call, 5 interleaved repeats on one LocalCluster
(2 worker processes x 1 thread); prints microseconds of user+system CPU per job for
every process, and the wall time per job.  The commands' own CPU (child processes) is
not counted.  Used to find where obdask's per-job cost went (docs/performance.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_run as b  # noqa: E402
from distributed import Client, LocalCluster  # noqa: E402


def cpu(pids: dict[str, int]) -> dict[str, float]:
    return {k: sum(psutil.Process(p).cpu_times()[:2]) for k, p in pids.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    jobs, repeat = args.jobs, args.repeat
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        folder = tempfile.mkdtemp()
        pids = {"client": os.getpid()}
        pids.update({f"worker{i}": p for i, p in enumerate(client.run(os.getpid).values())})
        pids["scheduler"] = client.run_on_scheduler(os.getpid)
        deps = b.shape_edges("independent", jobs)
        text = b.plan_text("@cmd:true", deps)
        b.run_raw(client, b.sh_true, deps)  # warm-up
        b.run_obdask(client, folder, "p", text)
        cases = {"raw": lambda: b.run_raw(client, b.sh_true, deps),
                 "obdask": lambda: b.run_obdask(client, folder, "p", text)}
        totals: dict[str, dict[str, float]] = {name: {} for name in cases}
        for _ in range(repeat):
            for name, run in cases.items():
                before, start = cpu(pids), time.perf_counter()
                run()
                wall, after = time.perf_counter() - start, cpu(pids)
                row = totals[name]
                for k in pids:
                    row[k] = row.get(k, 0.0) + (after[k] - before[k]) / repeat / jobs * 1e6
                row["wall"] = row.get("wall", 0.0) + wall / repeat / jobs * 1e6
    for name, row in totals.items():
        print(name, " ".join(f"{k}={v:.0f}us" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
