"""Helpers shared by the suite's sections: plans, statistics, clusters, memory.

Plans are written the way ``benchmarks/bench_run.py`` always wrote them (its
``shape_edges`` and ``plan_text`` are the ones used here), so figures from the
old scripts and from ``python -m benchmarks`` compare.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import psutil

from benchmarks.bench_run import plan_text, shape_edges

__all__ = ["plan_text", "shape_edges", "stat", "ratio", "local_cluster", "spawn_floor",
           "RssPeak", "write_plan"]

#: The modes that make the side-by-side obdask columns (dask.config overrides).
#: ``obdask.optimize.*`` are the chain-fusion and batching switches (issue 14 item 1);
#: before they exist the two columns run the same code, which the report shows.
OPTIMIZE_ON = {"obdask.optimize.fuse": True, "obdask.optimize.batch": True}
OPTIMIZE_OFF = {"obdask.optimize.fuse": False, "obdask.optimize.batch": False}
#: Like-for-like with a bare ``subprocess.run`` task: no bubblewrap around the command.
NO_SANDBOX = {"obdask.cmd.sandbox.mode": "off"}


def stat(values: list[float]) -> dict[str, Any]:
    """Median, min, max and count of ``values``."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values), "values": list(values)}


def ratio(a: dict[str, Any] | float, b: dict[str, Any] | float) -> float:
    """Ratio of two medians (or plain numbers); NaN when ``b`` is zero."""
    x = a["median"] if isinstance(a, dict) else a
    y = b["median"] if isinstance(b, dict) else b
    return x / y if y else float("nan")


@contextlib.contextmanager
def local_cluster(workers: int = 2, threads: int = 1, **kwargs: Any) -> Iterator[Any]:
    """A quiet ``LocalCluster`` of worker processes and a client on it."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                      dashboard_address=":0", silence_logs=logging.CRITICAL,
                      **kwargs) as cluster, Client(cluster) as client:
        yield client


def write_plan(folder: str, name: str, text: str) -> str:
    """Write ``text`` as ``<folder>/<name>.md`` with its own plan id; return the path."""
    path = os.path.join(folder, f"{name}.md")
    with open(path, "w") as f:
        f.write(f"# Plan: {name}\nplan_id={name}\n{text}")
    return path


def _spawn_true(n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        subprocess.run(["true"], stdin=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def _ready(_: int) -> int:
    return os.getpid()


class SpawnFloor:
    """Spawning ``true`` directly from 2 processes: the floor a ``@cmd:true`` job costs.

    The pool is started once and warmed, so the figure is the spawns alone.
    """

    def __init__(self, processes: int = 2) -> None:
        self.processes = processes
        # spawn, not fork: this process runs Dask's event loop thread.
        self.pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
        list(self.pool.map(_ready, range(processes)))

    def __call__(self, n: int) -> float:
        """Seconds to spawn ``n`` processes, split over the pool."""
        share = [n // self.processes + (i < n % self.processes) for i in range(self.processes)]
        start = time.perf_counter()
        list(self.pool.map(_spawn_true, share))
        return time.perf_counter() - start

    def close(self) -> None:
        self.pool.shutdown()


def spawn_floor(n: int, repeat: int) -> dict[str, Any]:
    """Median seconds to spawn ``n`` ``true`` processes from 2 processes."""
    floor = SpawnFloor()
    try:
        return stat([floor(n) for _ in range(repeat)])
    finally:
        floor.close()


class RssPeak:
    """Peak resident memory of this process while the block runs, sampled every 20 ms.

    ``grown`` is the peak minus the RSS on entry, in bytes: what the block needed
    beyond what the process already held.
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.proc = psutil.Process()
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> RssPeak:
        self.start = self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def grown(self) -> int:
        return self.peak - self.start


def interleave(cases: dict[str, Callable[[], float]], repeat: int) -> dict[str, dict[str, Any]]:
    """Run every case once per round, ``repeat`` rounds: drift hits all sides alike."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeat):
        for name, run in cases.items():
            times[name].append(run())
    return {name: stat(values) for name, values in times.items()}
