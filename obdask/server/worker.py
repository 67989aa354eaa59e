"""The worker half of obdask: :class:`ObdaskWorkerPlugin` and the state it owns.

Everything obdask keeps on a worker lives in one :class:`WorkerState`, stored in
Dask's own registry of worker extensions (``worker.extensions["obdask"]``):
the lanes the worker takes, the URL of its local Ollama endpoint (if it serves
models itself), the locality keys it reported warm (git clones), and the
models its endpoint has loaded.  The worker preload fills in the settings
before the worker registers; the plugin (installed on every worker by the
scheduler's :class:`~obdask.server.ObdaskPlugin`) creates the state if the
preload did not, gives a worker without ``lane-N`` resources every lane, and
polls the local endpoint's ``GET /api/ps``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import dask
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.worker import get_worker
from tornado.ioloop import PeriodicCallback

import obdask.config as config
from obdask.llm.pool import normalize_url
from obdask.resources import ENDPOINT_METRIC, lane_resources, model_key, parse_lanes, worker_lanes
from obdask.server.jobtable import pack_jobs

logger = logging.getLogger(__name__)

NAME = "obdask-worker"
EXTENSION = "obdask"
REPORT_OP = "obdask_locality_report"
#: Stream op of the scheduler's metrics extension (:mod:`obdask.server.metrics`).
METRICS_OP = "obdask_metrics_record"
KINDS = ("clone", "model")
#: Seconds between two sends of queued metrics records (one message each time).
FLUSH = 0.5
#: Seconds an Ollama ``/api/ps`` poll may take.
OLLAMA_TIMEOUT = 2.0


@dataclass
class WorkerState:
    """What obdask knows about one worker; one per worker, in ``worker.extensions``.

    Attributes
    ----------
    lanes
        Lanes given by the preload (None: every lane).
    local_endpoint
        This host's Ollama URL when the worker serves models itself, else None.
    reported
        ``(kind, key)`` pairs already reported warm to the scheduler.
    models
        Models the local endpoint has loaded (last poll); None before a poll.
    """

    lanes: tuple[int, ...] | None = None
    local_endpoint: str | None = None
    reported: set[tuple[str, str]] = field(default_factory=set)
    models: list[str] | None = None
    outbox: list[list[Any]] = field(default_factory=list)  # metrics records not yet sent
    #: Jobs with a timeout running here: ``job -> (started, timeout)`` (at most one per
    #: thread); each flush reports those past the warning fraction of their timeout.
    running: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: Dask's statistical profiler, taken off this worker (:func:`pause_dask_profiler`).
    dask_profiler: Any = None

    def warm_keys(self) -> set[str]:
        """Locality keys this worker is warm for (clones reported, models loaded)."""
        return {key for _, key in self.reported} | {model_key(m) for m in self.models or ()}


def state_of(worker: Any) -> WorkerState:
    """The :class:`WorkerState` of ``worker``, created on first use."""
    state = worker.extensions.get(EXTENSION)
    if not isinstance(state, WorkerState):
        state = worker.extensions[EXTENSION] = WorkerState()
    return state


#: Name of Dask's statistical profiler among a worker's periodic callbacks.
DASK_PROFILER = "profile"


def pause_dask_profiler(worker: Any) -> None:
    """Take Dask's statistical profiler off ``worker`` unless ``obdask.metrics.dask-profile``.

    It samples the stack of every busy task thread 100 times a second (Dask's
    dashboard "Profile" page).  obdask's task threads wait on subprocesses and model
    calls: sampling them cost a worker a quarter of a core with 8 waiting threads
    and three quarters with 64 (``benchmarks/bench_profiler.py``), and shows only
    obdask waiting.
    The callback is kept in the worker's state; :func:`resume_dask_profiler` puts it
    back.
    """
    if config.get_bool("metrics.dask-profile"):
        return
    # Out of the worker's table, not only stopped: Dask starts every callback of the
    # table that is not running when the worker registers.
    pc = worker.periodic_callbacks.pop(DASK_PROFILER, None)
    if pc is not None:
        pc.stop()
        state_of(worker).dask_profiler = pc
        logger.debug("obdask: Dask's statistical profiler is off on worker %s",
                     getattr(worker, "name", None))  # a preload's worker has no address yet


def resume_dask_profiler(worker: Any) -> None:
    """Put back and start the profiler :func:`pause_dask_profiler` took off."""
    state = state_of(worker)
    pc, state.dask_profiler = state.dask_profiler, None
    if pc is not None and DASK_PROFILER not in worker.periodic_callbacks:
        worker.periodic_callbacks[DASK_PROFILER] = pc
        pc.start()


def current_state() -> WorkerState | None:
    """The state of the worker running the calling task; None outside a worker."""
    try:
        return state_of(get_worker())
    except ValueError:
        return None


class ObdaskWorkerPlugin(WorkerPlugin):
    """Fill in lanes, poll the local Ollama endpoint, report loaded models.

    Parameters
    ----------
    interval : float or str, optional
        Poll period; default ``obdask.placement.model-poll-interval``.
    metrics : bool
        Whether the scheduler has the metrics extension: only then are resource
        samples and job/token records sent (an op the scheduler does not know
        would close the worker's stream).
    """

    name = NAME
    idempotent = True

    def __init__(self, interval: float | str | None = None, metrics: bool = True) -> None:
        self.interval = interval
        self.metrics = metrics
        self.worker: Any = None
        self._http: Any = None
        self._polling = False
        self._sampler: ResourceSampler | None = None

    @property
    def models(self) -> list[str] | None:
        """Models the local endpoint had loaded at the last poll."""
        return state_of(self.worker).models if self.worker is not None else None

    async def setup(self, worker: Any) -> None:
        """Give every lane to a worker without lanes, start sampling, poll Ollama."""
        self.worker = worker
        from obdask.interpreter import guard_current_frames
        from obdask.interrupts import settle_worker

        guard_current_frames()  # the worker's profilers, on CPython 3.11 (gh-106883)
        settle_worker()  # an embedded cluster's worker: Ctrl-C is the client's to handle
        pause_dask_profiler(worker)
        state = state_of(worker)
        if not worker_lanes(worker.state.total_resources):
            lanes = parse_lanes(dask.config.get("obdask.placement.lanes", None))
            await worker.set_resources(**lane_resources(lanes))
        self._start_sampling(worker)
        endpoint = state.local_endpoint or dask.config.get("obdask.llm.local-endpoint", None)
        if not endpoint:
            return
        import httpx

        state.local_endpoint = normalize_url(endpoint)
        advertise_endpoint(worker, state.local_endpoint)
        self._http = httpx.AsyncClient(base_url=state.local_endpoint, timeout=OLLAMA_TIMEOUT)
        period = config.get_seconds("placement.model-poll-interval", self.interval)
        pc = PeriodicCallback(self.poll, max(period, 0.01) * 1000)
        worker.periodic_callbacks["obdask-ollama-ps"] = pc
        pc.start()
        worker.loop.add_callback(self.poll)

    def _start_sampling(self, worker: Any) -> None:
        """Flush metrics records every :data:`FLUSH` s; sample every ``obdask.metrics.interval``."""
        if not self.metrics:
            return
        flush = PeriodicCallback(lambda: flush_records(worker), FLUSH * 1000)
        worker.periodic_callbacks["obdask-metrics-flush"] = flush
        flush.start()
        period = config.get_seconds("metrics.interval")
        if period <= 0:
            return
        self._sampler = ResourceSampler(worker.local_directory)
        pc = PeriodicCallback(self.sample, max(period, 0.05) * 1000)
        worker.periodic_callbacks["obdask-metrics-sample"] = pc
        pc.start()
        worker.loop.add_callback(self.sample)

    def sample(self) -> None:
        """Queue one resource sample (host CPU/RAM/disk, every GPU) for the scheduler.

        It leaves with the next flush of the job and token records (at most
        :data:`FLUSH` s later): one message on the stream, not one more per sample,
        since reading a message costs the scheduler more than storing its records.
        """
        if self.worker is None or self._sampler is None:
            return
        record = self._sampler.sample()
        state = state_of(self.worker)
        if state.models is not None:
            record["models"] = state.models
        state.outbox.append(["sample", record])

    async def teardown(self, worker: Any) -> None:
        """Stop sampling and polling, close the HTTP client, give Dask its profiler back."""
        resume_dask_profiler(worker)
        for name in ("obdask-metrics-sample", "obdask-metrics-flush"):
            pc = worker.periodic_callbacks.pop(name, None)
            if pc is not None:
                pc.stop()
        flush_records(worker)
        pc = worker.periodic_callbacks.pop("obdask-ollama-ps", None)
        if pc is not None:
            pc.stop()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def loaded_models(self) -> list[str] | None:
        """Names from the local ``GET /api/ps``; None when unreachable or malformed."""
        if self._http is None:
            return None
        try:
            response = await self._http.get("/api/ps")
            response.raise_for_status()
            models = response.json().get("models") or []
            return sorted({str(m.get("model") or m.get("name")) for m in models})
        except Exception as exc:  # unreachable, not Ollama, bad JSON: skip silently
            logger.debug("Ollama /api/ps at %s failed: %s", self._http.base_url, exc)
            return None

    async def poll(self) -> None:
        """Report the loaded models when they changed since the last poll."""
        if self._polling or self.worker is None:
            return
        self._polling = True
        try:
            models = await self.loaded_models()
            current = [] if models is None else models
            state = state_of(self.worker)
            if current != state.models:
                state.models = current
                send(self.worker, {"op": REPORT_OP, "kind": "model",
                                   "keys": [model_key(m) for m in current], "replace": True})
        finally:
            self._polling = False


def advertise_endpoint(worker: Any, url: str | None) -> None:
    """Put the worker's local endpoint in the metrics of its heartbeats (None: remove).

    Placement reads it from the scheduler's worker list: only where some worker
    serves models itself do model roles' GPU/VRAM needs bind Dask workers.
    """
    if url:
        worker.metrics[ENDPOINT_METRIC] = lambda _worker: url
    else:
        worker.metrics.pop(ENDPOINT_METRIC, None)


def send(worker: Any, msg: dict[str, Any]) -> None:
    """Send ``msg`` to the scheduler over the worker's batched stream (loop thread)."""
    try:
        worker.batched_stream.send(msg)
    except Exception as exc:  # closed stream while the worker shuts down
        logger.debug("obdask: could not send %s: %s", msg.get("op"), exc)


def send_record(kind: str, record: dict[str, Any], worker: Any = None) -> bool:
    """From any thread of a worker: send a metrics record to the scheduler.

    Queued and sent with the other records of the last :data:`FLUSH` seconds as
    one message on the worker's batched stream (no round trip, no extra message
    per job); the scheduler's :class:`~obdask.server.metrics.MetricsExtension`
    stores it.

    Parameters
    ----------
    kind : {"job", "tokens", "sample"}
    record : dict
        msgpack-friendly fields.
    worker : distributed.Worker, optional
        Default: the worker running the calling task.

    Returns
    -------
    bool
        False (nothing sent) outside a worker, without the obdask worker plugin,
        or when the scheduler has no metrics extension.
    """
    if worker is None:
        try:
            worker = get_worker()
        except ValueError:
            return False
    plugin = getattr(worker, "plugins", {}).get(NAME)
    if not getattr(plugin, "metrics", False):
        return False
    state_of(worker).outbox.append([kind, record])  # list.append: safe from any thread
    return True


def track_running(job: str, started: float, timeout: float | None,
                  worker: Any = None) -> dict[str, tuple[float, float]] | None:
    """Note a job with a timeout as running here; returns the table to pop it from.

    None (nothing noted) without a timeout, outside a worker or without the metrics
    extension.  :func:`flush_records` reports the jobs past the warning fraction of
    their timeout, so the scheduler's pressure events see a job's time run out.
    """
    if not timeout or timeout <= 0:
        return None
    if worker is None:
        try:
            worker = get_worker()
        except ValueError:
            return None
    if not getattr(getattr(worker, "plugins", {}).get(NAME), "metrics", False):
        return None
    state = state_of(worker)
    state.running[job] = (started, float(timeout))
    return state.running


def _elapsed_records(state: WorkerState) -> list[list[Any]]:
    """``elapsed`` records of the running jobs at or past the warning fraction."""
    now = time.time()
    warning = float(dask.config.get("obdask.metrics.pressure-warning", 0.8))
    return [["elapsed", {"job": job, "elapsed": now - started, "timeout": timeout,
                         "started": started}]
            for job, (started, timeout) in list(state.running.items())
            if now - started >= warning * timeout]


def flush_records(worker: Any) -> None:
    """Send the records :func:`send_record` queued, as one message (worker's loop)."""
    state = worker.extensions.get(EXTENSION)
    if not isinstance(state, WorkerState):
        return
    if state.running:
        state.outbox.extend(_elapsed_records(state))
    if not state.outbox:
        return
    records, state.outbox = state.outbox, []
    msg: dict[str, Any] = {"op": METRICS_OP, "kind": "batch"}
    # job records go packed (obdask.server.jobtable): the scheduler takes them in
    # without decoding one dict per job
    jobs = [record for kind, record in records if kind == "job"]
    if jobs:
        try:
            msg["jobs"] = pack_jobs(jobs)
            records = [item for item in records if item[0] != "job"]
        except Exception:  # an unpackable field: send them as plain records instead
            logger.debug("obdask: could not pack %d job records", len(jobs), exc_info=True)
    msg["records"] = records
    send(worker, msg)


class ResourceSampler:
    """Host facts Dask's heartbeat lacks: host CPU/RAM/disk and every GPU (NVML).

    Dask's heartbeat has the worker process's CPU and memory and, through its
    own NVML diagnostics, the first GPU only.  NVML is tried once; a machine
    without ``pynvml`` or a driver samples ``gpus: []`` from then on.
    """

    def __init__(self, path: str | None = None, nvml: Any | None = None) -> None:
        import os

        import psutil

        self.psutil = psutil
        self.path = path if path and os.path.isdir(path) else os.getcwd()
        self.nvml = nvml
        self.has_gpus: bool | None = None
        psutil.cpu_percent(None)  # the first call only starts the measurement

    def gpus(self) -> list[dict[str, Any]]:
        """Every GPU: index, name, utilization (%), memory used/total (bytes)."""
        if self.has_gpus is False:
            return []
        from obdask.resources import gpu_inventory

        try:
            found = gpu_inventory(self.nvml)
        except Exception as exc:  # a broken driver must not stop the sampling
            logger.debug("NVML sample failed: %s", exc)
            found = []
        if self.has_gpus is None:
            self.has_gpus = bool(found)
        return [{"index": g.index, "name": g.name, "utilization": g.utilization,
                 "memory_used": g.memory_used, "memory_total": g.memory_total} for g in found]

    def sample(self) -> dict[str, Any]:
        """One sample as a plain dict (``ts`` in seconds since the epoch)."""
        import os
        import time

        ps = self.psutil
        mem = ps.virtual_memory()
        disk = ps.disk_usage(self.path)
        record: dict[str, Any] = {
            "ts": time.time(), "cpu_percent": ps.cpu_percent(None), "cpus": ps.cpu_count(),
            "memory_used": int(mem.total - mem.available), "memory_total": int(mem.total),
            "disk_used": int(disk.used), "disk_total": int(disk.total),
            "gpus": self.gpus(),
        }
        if hasattr(os, "getloadavg"):
            record["load_1m"] = os.getloadavg()[0]
        return record


def report_warm(kind: str, key: str) -> bool:
    """From code running on a worker: tell the scheduler this worker is warm for ``key``.

    Cheap: one batched message, sent once per ``(kind, key)`` per worker.

    Parameters
    ----------
    kind : {"clone", "model"}
    key : str
        A locality key, e.g. ``"git:/srv/repo"`` or ``model_key(name)``.

    Returns
    -------
    bool
        False (and nothing sent) outside a worker or when the obdask worker
        plugin is not installed there.
    """
    if kind not in KINDS:
        raise ValueError(f"report_warm: kind must be one of {KINDS}, not {kind!r}")
    try:
        worker = get_worker()
    except ValueError:
        return False
    if NAME not in worker.plugins:
        return False
    state = state_of(worker)
    if (kind, key) in state.reported:
        return True
    state.reported.add((kind, key))
    worker.loop.add_callback(send, worker, {"op": REPORT_OP, "kind": kind, "key": key})
    return True
