"""What Dask's statistical profiler costs a worker whose task threads wait, on and off.

obdask's task threads mostly wait: on a job's subprocess, on a model call's HTTP
reply, on a session's next model answer.  Dask's profiler samples the stack of
every busy task thread of a worker 100 times a second (``distributed.worker.profile``);
obdask's worker plugin takes it off unless ``obdask.metrics.dask-profile`` is true
(:func:`obdask.server.worker.pause_dask_profiler`).  For each thread count, one
LocalCluster worker process with that many threads runs that many tasks that wait
(``time.sleep`` at the bottom of a 40-frame stack, about a model call's depth)
while the worker's CPU time is read (``psutil``); rounds with the profiler on and
off alternate on the same worker, and the medians and their ratio are printed.

    python benchmarks/bench_profiler.py --threads 8,64 --seconds 3 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEPTH = 40


def wait_deep(i: int, seconds: float, depth: int = DEPTH) -> int:
    """Sleep ``seconds`` at the bottom of a ``depth``-frame stack."""
    if depth:
        return wait_deep(i, seconds, depth - 1)
    time.sleep(seconds)
    return i


def _profiler(on: bool, dask_worker: Any = None) -> bool:
    from obdask.server.worker import DASK_PROFILER, pause_dask_profiler, resume_dask_profiler

    if on:
        resume_dask_profiler(dask_worker)
    else:
        pause_dask_profiler(dask_worker)
    pc = dask_worker.periodic_callbacks.get(DASK_PROFILER)
    return pc is not None and pc.is_running()


def measure(threads: int, seconds: float, repeat: int) -> dict[str, Any]:
    """Worker CPU (ms per s) with ``threads`` waiting tasks, profiler on and off."""
    import psutil
    from distributed import Client, LocalCluster

    from obdask.server import install

    rates: dict[str, list[float]] = {"on": [], "off": []}
    with LocalCluster(n_workers=1, threads_per_worker=threads, processes=True,
                      dashboard_address=":0", silence_logs=logging.CRITICAL) as cluster, \
            Client(cluster) as client:
        install(client)  # obdask's plugins: the profiler goes off
        worker = psutil.Process(next(iter(client.run(os.getpid).values())))
        client.gather(client.map(wait_deep, range(threads), seconds=0.2, pure=False))
        for r in range(repeat):
            for side in ("on", "off"):
                running = client.run(_profiler, side == "on")
                assert set(running.values()) == {side == "on"}, running
                before, start = worker.cpu_times(), time.perf_counter()
                client.gather(client.map(wait_deep, range(threads), seconds=seconds,
                                         pure=False, key=[f"{side}-{r}-{i}"
                                                          for i in range(threads)]))
                after, wall = worker.cpu_times(), time.perf_counter() - start
                cpu = after.user + after.system - before.user - before.system
                rates[side].append(1e3 * cpu / wall)
                print(f"threads {threads:4d} profiler {side:3s}: worker CPU "
                      f"{rates[side][-1]:6.1f} ms/s over {wall:.1f} s", flush=True)
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    return {"threads": threads, "seconds": seconds, "repeat": repeat, "depth": DEPTH,
            "cpu_ms_per_s": rates, "median_on": on, "median_off": off, "on_over_off": on / off}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="8,64", help="comma-separated thread counts")
    parser.add_argument("--seconds", type=float, default=3.0, help="wait of each round")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    results = [measure(int(t), args.seconds, args.repeat) for t in args.threads.split(",")]
    print("| waiting threads | worker CPU, profiler on (ms/s) | off (ms/s) | on / off |")
    print("|---|---|---|---|")
    for res in results:
        print(f"| {res['threads']} | {res['median_on']:.1f} | {res['median_off']:.1f} | "
              f"{res['on_over_off']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
