"""The embedded cluster: a LocalCluster started for one run or one CLI call."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from obdask import config

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def embedded_cluster(n_workers: int | None = None,
                     threads_per_worker: int | None = None) -> Iterator[Client]:
    """A ``LocalCluster`` of worker processes plus its client, closed on exit."""
    from distributed import Client, LocalCluster

    n_workers = int(config.get("run.n-workers", n_workers))
    threads = int(config.get("run.threads-per-worker", threads_per_worker))
    with LocalCluster(n_workers=n_workers, threads_per_worker=threads, processes=True,
                      dashboard_address=":0", silence_logs=logging.CRITICAL) as cluster:
        with Client(cluster) as client:
            yield client


@contextlib.contextmanager
def connect(scheduler: str | None = None, n_workers: int | None = None) -> Iterator[Client]:
    """A client of ``scheduler`` (address or scheduler file), else an embedded cluster."""
    if scheduler is None:
        with embedded_cluster(n_workers) as client:
            yield client
        return
    from distributed import Client

    kwargs = {"scheduler_file": scheduler} if scheduler.endswith(".json") else {
        "address": scheduler}
    with Client(timeout="30s", **kwargs) as client:
        yield client
