"""The embedded cluster: a LocalCluster started for one run or one CLI call."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from obdask import config
from obdask.exceptions import ClusterUnreachable
from obdask.resources import host_resources

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def embedded_cluster(n_workers: int | None = None,
                     threads_per_worker: int | None = None) -> Iterator[Client]:
    """A ``LocalCluster`` of worker processes plus its client, closed on exit."""
    from distributed import Client, LocalCluster

    from obdask.dashboard import register

    n_workers = config.get_int("run.n-workers", n_workers, minimum=1)
    threads = config.get_int("run.threads-per-worker", threads_per_worker, minimum=1)
    register()  # obdask pages, before the scheduler starts its dashboard
    # The dashboard listens on localhost only: it is for the person at this machine.
    with LocalCluster(n_workers=0, threads_per_worker=threads, processes=True,
                      dashboard_address="127.0.0.1:0",
                      silence_logs=logging.CRITICAL) as cluster:
        # Each worker gets its share of this host (GPUs whole), declared at start
        # so the scheduler can place resource-restricted steps from the first task.
        for i, resources in enumerate(split_resources(host_resources(), n_workers)):
            spec = copy.deepcopy(cluster.new_spec)
            spec["options"]["resources"] = resources
            cluster.worker_spec[f"obdask-{i}"] = spec
        cluster.sync(cluster._correct_state)
        with Client(cluster) as client:
            client.wait_for_workers(n_workers, timeout=60)
            yield client


def split_resources(total: dict[str, float], n: int) -> list[dict[str, float]]:
    """Share a host's resources among ``n`` workers; GPUs are not split."""
    n = max(n, 1)
    gpus = int(total.get("GPU", 0))
    vram_per_gpu = total.get("VRAM", 0) / gpus if gpus else 0
    shares = []
    for i in range(n):
        mine = gpus // n + (1 if i < gpus % n else 0)
        shares.append({"CPU": total.get("CPU", 1) / n, "MEM": total.get("MEM", 0) / n,
                       "GPU": float(mine), "VRAM": mine * vram_per_gpu})
    return shares


@contextlib.contextmanager
def connect(scheduler: str | None = None, n_workers: int | None = None) -> Iterator[Client]:
    """A client of ``scheduler`` (address or scheduler file), else an embedded cluster."""
    if scheduler is None:
        with embedded_cluster(n_workers) as client:
            yield client
        return
    with _client(scheduler) as client:
        yield client


@contextlib.contextmanager
def _client(scheduler: str) -> Iterator[Client]:
    """``Client(scheduler)`` whose failures to connect are one clear error."""
    from distributed import Client

    by_file = scheduler.endswith(".json")
    timeout = config.get_seconds("run.connect-timeout")
    if by_file:
        address = _address_from_file(scheduler, timeout)
    else:
        address = scheduler
    try:
        client = Client(address, timeout=timeout)
    except ValueError as exc:  # e.g. "missing port number in address"
        raise ClusterUnreachable(
            f"scheduler {scheduler!r} is not a scheduler address ({exc}); use "
            "tcp://HOST:PORT or a scheduler file ending in .json") from None
    except (OSError, TimeoutError) as exc:
        what = f"the scheduler at {address}" + (f" (from {scheduler})" if by_file else "")
        raise ClusterUnreachable(
            f"cannot reach {what} within {timeout:g}s ({exc}); is `dask scheduler` running "
            "there? (wait longer with obdask.run.connect-timeout)") from None
    with client:
        yield client


def _address_from_file(path: str, timeout: float) -> str:
    """The address in a ``dask scheduler --scheduler-file``, waiting up to ``timeout``.

    Dask's own Client waits for a missing file without any limit; a scheduler
    that is starting writes it within seconds.
    """
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise ClusterUnreachable(
                f"scheduler file {path!r} does not exist (waited {timeout:g}s); start "
                f"`dask scheduler --scheduler-file {path}` or fix the path")
        time.sleep(0.1)
    try:
        with open(path) as f:
            address = json.load(f)["address"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ClusterUnreachable(
            f"scheduler file {path!r} is unreadable or has no 'address' ({exc!r}); it is "
            "written by `dask scheduler --scheduler-file`") from None
    if not isinstance(address, str):
        raise ClusterUnreachable(f"scheduler file {path!r}: 'address' is not a string")
    return address
