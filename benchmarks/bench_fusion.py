"""Chain fusion and batching, side by side: obdask with and without them, raw Dask, spawn floor.

Run:  python benchmarks/bench_fusion.py [--jobs 2000] [--repeat 1] [--json out.json]

For each sandbox mode (``obdask.cmd.sandbox.mode`` off and auto; one embedded-style
LocalCluster of 2 processes x 1 thread each, started with that mode) and each shape
(independent ``@cmd:true`` jobs; chains of 50), one run each of: obdask with
``obdask.optimize.fuse``/``batch`` on, the same with both off, and raw Dask
(``client.submit`` of ``sh -c true`` with the same dependencies).  The spawn floor is
the same number of ``sh -c true`` processes spawned directly from 2 processes.
Marginal cost per job = wall time / jobs; ratios are what to compare.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import dask

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_run import plan_text, run_obdask, run_raw, sh_true, shape_edges  # noqa: E402


def _spawn(n: int) -> None:
    for _ in range(n):
        subprocess.run(["/bin/sh", "-c", "true"], stdin=subprocess.DEVNULL, capture_output=True)


def spawn_floor(n: int) -> float:
    """Seconds to spawn ``n`` ``sh -c true`` processes from 2 processes."""
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_spawn, [1, 1]))  # warm the pool
        start = time.perf_counter()
        list(pool.map(_spawn, [n // 2, n - n // 2]))
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--sandbox", default="off,auto", help="sandbox modes, comma-separated")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    from distributed import Client, LocalCluster

    floor = statistics.median(spawn_floor(args.jobs) for _ in range(args.repeat))
    print(f"spawn floor: {args.jobs} x sh -c true from 2 processes: {floor:.3f} s "
          f"({floor / args.jobs * 1e3:.2f} ms/job)", flush=True)
    rows = []
    print(f"{'sandbox':<8}{'shape':<13}{'raw s':>8}{'fused s':>9}{'plain s':>9}"
          f"{'fused/raw':>10}{'plain/raw':>10}{'fused/floor':>12}", flush=True)
    for mode in args.sandbox.split(","):
        with dask.config.set({"obdask.cmd.sandbox.mode": mode}), \
                tempfile.TemporaryDirectory() as folder, \
                LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                             dashboard_address=":0", silence_logs=logging.CRITICAL) as cluster, \
                Client(cluster) as client:
            for shape in ("independent", "chain50"):
                deps = shape_edges(shape, args.jobs)
                text = plan_text("@cmd:true", deps)
                raw, fused, plain = [], [], []
                for i in range(args.repeat):
                    raw.append(run_raw(client, sh_true, deps))
                    fused.append(run_obdask(client, folder, f"f{shape}{i}", text))
                    with dask.config.set({"obdask.optimize.fuse": False,
                                          "obdask.optimize.batch": False}):
                        plain.append(run_obdask(client, folder, f"p{shape}{i}", text))
                row = {"sandbox": mode, "shape": shape, "jobs": args.jobs,
                       "raw_s": statistics.median(raw), "fused_s": statistics.median(fused),
                       "plain_s": statistics.median(plain), "floor_s": floor}
                row.update(fused_raw=row["fused_s"] / row["raw_s"],
                           plain_raw=row["plain_s"] / row["raw_s"],
                           fused_floor=row["fused_s"] / floor)
                rows.append(row)
                print(f"{mode:<8}{shape:<13}{row['raw_s']:>8.2f}{row['fused_s']:>9.2f}"
                      f"{row['plain_s']:>9.2f}{row['fused_raw']:>10.2f}{row['plain_raw']:>10.2f}"
                      f"{row['fused_floor']:>12.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"floor_s": floor, "runs": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
