"""The embedded cluster: a LocalCluster started for one run or one CLI call."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from obdask import config
from obdask.exceptions import ClusterUnreachable
from obdask.resources import host_resources

if TYPE_CHECKING:
    from distributed import Client, Security

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def embedded_cluster(n_workers: int | None = None, threads_per_worker: int | None = None,
                     security: Security | None = None) -> Iterator[Client]:
    """A ``LocalCluster`` of worker processes plus its client, closed on exit.

    With ``security`` (:func:`obdask.security.load`) every connection is
    ``tls://`` on loopback with the scheduler, worker and client certificates.
    """
    from distributed import Client, LocalCluster

    from obdask.dashboard import register

    n_workers = config.get_int("run.n-workers", n_workers, minimum=1)
    threads = config.get_int("run.threads-per-worker", threads_per_worker, minimum=1)
    register()  # obdask pages, before the scheduler starts its dashboard
    ttl = config.get_seconds("run.worker-ttl")
    # the dashboard listens on loopback only (plain HTTP; see docs/security.md)
    tls = {} if security is None else {
        "security": security, "protocol": "tls://", "host": "127.0.0.1"}
    from obdask.interrupts import sigint_ignored_by_children

    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(LocalCluster(
            n_workers=0, threads_per_worker=threads, processes=True,
            # a frozen worker (SIGSTOP, swapped out) is removed and its jobs re-run
            scheduler_kwargs={"worker_ttl": f"{ttl}s" if ttl > 0 else None},
            dashboard_address="127.0.0.1:0",
            silence_logs=logging.CRITICAL, **tls))
        # Ctrl-C is this process's to handle: the workers start with SIGINT ignored
        # (obdask.interrupts), so a terminal's Ctrl-C does not print their tracebacks.
        with sigint_ignored_by_children():
            # Each worker gets its share of this host (GPUs whole), declared at start
            # so the scheduler can place resource-restricted steps from the first task.
            for i, resources in enumerate(split_resources(host_resources(), n_workers)):
                spec = copy.deepcopy(cluster.new_spec)
                spec["options"]["resources"] = resources
                cluster.worker_spec[f"obdask-{i}"] = spec
            cluster.sync(cluster._correct_state)
        client = stack.enter_context(Client(cluster, security=security))
        client.wait_for_workers(n_workers, timeout=60)
        from obdask.server import install

        install(client)
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


def configured_scheduler(explicit: str | None = None) -> tuple[str | None, str]:
    """The scheduler to use, in Dask's own order, and where it came from.

    An explicit address or scheduler file, else dask config ``scheduler-address``
    (``DASK_SCHEDULER_ADDRESS``), else the file of ``scheduler-file``
    (``DASK_SCHEDULER_FILE``); ``(None, "embedded")`` when none is set.
    """
    import dask

    if explicit:
        return explicit, "--scheduler"
    address = dask.config.get("scheduler-address", None)
    if address:
        return str(address), "dask config scheduler-address / DASK_SCHEDULER_ADDRESS"
    path = dask.config.get("scheduler-file", None)
    if path:
        return str(path), "dask config scheduler-file / DASK_SCHEDULER_FILE"
    return None, "embedded"


@contextlib.contextmanager
def connect(scheduler: str | None = None, n_workers: int | None = None,
            announce: Callable[[str], None] | None = None) -> Iterator[Client]:
    """A client of ``scheduler``, of the one Dask's config names, else an embedded cluster.

    Both use mutual TLS when ``obdask.security.tls`` names a certificate folder.

    Parameters
    ----------
    scheduler : str, optional
        Address or scheduler file (``.json``); default :func:`configured_scheduler`.
    announce : callable, optional
        Called with one line saying which cluster is used.
    """
    from obdask.security import from_config

    security = from_config()
    target, origin = configured_scheduler(scheduler)
    if target is None:
        with embedded_cluster(n_workers, security=security) as client:
            if announce is not None:
                from obdask.dashboard import dashboard_url

                workers = len(client.scheduler_info(n_workers=-1)["workers"])
                link = dashboard_url(client) or client.dashboard_link
                announce(f"cluster: embedded LocalCluster, {workers} workers, "
                         f"dashboard {link}")
            yield client
        return
    with _client(target, security) as client:
        if announce is not None:
            announce(f"cluster: {client.scheduler.address} (from {origin})")
        yield client


@contextlib.contextmanager
def _client(scheduler: str, security: Security | None = None) -> Iterator[Client]:
    """``Client(scheduler)`` whose failures to connect are one clear error."""
    from distributed import Client

    by_file = scheduler.endswith(".json")
    timeout = config.get_seconds("run.connect-timeout")
    if by_file:
        address = _address_from_file(scheduler, timeout)
    else:
        address = scheduler
    _refused_at_once(address, scheduler)
    try:
        client = Client(address, timeout=timeout, security=security)
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


def _refused_at_once(address: str, given: str) -> None:
    """Fail at once when nothing listens at ``address`` (Dask's Client retries a refused
    connection until its timeout); a slow or filtered host still gets the full timeout."""
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, location = parse_address(address)
        host, port = parse_host_port(location)
    except (ValueError, TypeError):
        return  # Client reports a malformed address with the usual message
    if scheme not in ("tcp", "tls") or not port:
        return
    try:
        socket.create_connection((host, port), timeout=1.0).close()
    except ConnectionRefusedError:
        what = address if address == given else f"{address} (from {given})"
        raise ClusterUnreachable(
            f"no scheduler at {what}: connection refused; is `dask scheduler` running "
            "there?") from None
    except OSError:
        return


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
