"""Scheduler and worker plugins that track where work is warm.

The scheduler side (:class:`ObdaskSchedulerPlugin`, name ``"obdask"``) keeps a
bounded record of which worker holds a warm git clone (``kind="clone"``) or a
loaded Ollama model (``kind="model"``), and answers queries for the runner.
Scheduler handlers it adds:

``obdask_locality_report(worker, kind, key=None, keys=None, replace=False)``
    record that ``worker`` is warm for ``key`` (or ``keys``); with
    ``replace=True`` the worker's previous keys of that kind are dropped.
    Also a stream handler, so workers report over their batched stream.
``obdask_locality_query(keys)``
    ``{key: [worker addresses]}``, most recent report first, live workers only.

It installs :class:`ObdaskWorkerPlugin` (name ``"obdask-worker"``) on every
current and future worker.  That plugin polls the worker's local Ollama
``GET /api/ps`` and reports the loaded models, gives a worker without any
``lane-N`` resource every lane, and enables :func:`report_warm`.

Client side: :func:`install` and :func:`warm_workers`.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import dask
from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin
from distributed.protocol.pickle import dumps
from distributed.worker import get_worker
from tornado.ioloop import PeriodicCallback

import obdask.config as config
from obdask.placement import model_key, worker_lanes
from obdask.resources import lane_resources, parse_lanes

logger = logging.getLogger(__name__)

PLUGIN_NAME = "obdask"
WORKER_PLUGIN_NAME = "obdask-worker"
REPORT_OP = "obdask_locality_report"
QUERY_OP = "obdask_locality_query"
KINDS = ("clone", "model")
#: Seconds an Ollama ``/api/ps`` poll may take.
OLLAMA_TIMEOUT = 2.0


class ObdaskSchedulerPlugin(SchedulerPlugin):
    """Record warm clones and loaded models per worker; see the module docstring.

    Parameters
    ----------
    max_records : int, optional
        Most ``(key, worker)`` records kept; the least recently reported keys
        are dropped first.  Default ``obdask.placement.max-locality-records``.
    """

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self, max_records: int | None = None) -> None:
        self.max_records = config.get_int("placement.max-locality-records", max_records,
                                          minimum=1)
        self.scheduler: Any = None
        # key -> {worker: (kind, time)}; ordered oldest report first
        self.records: OrderedDict[str, dict[str, tuple[str, float]]] = OrderedDict()
        self.by_worker: dict[str, set[str]] = {}
        self.count = 0

    async def start(self, scheduler: Any) -> None:
        """Register the handlers and the companion worker plugin."""
        self.scheduler = scheduler
        scheduler.handlers[REPORT_OP] = self.locality_report
        scheduler.handlers[QUERY_OP] = self.locality_query
        scheduler.stream_handlers[REPORT_OP] = self._stream_report
        await scheduler.register_worker_plugin(
            None, dumps(ObdaskWorkerPlugin()), name=WORKER_PLUGIN_NAME, idempotent=True
        )

    def locality_report(
        self,
        worker: str,
        kind: str,
        key: str | None = None,
        keys: Iterable[str] | None = None,
        replace: bool = False,
    ) -> str:
        """Record that ``worker`` is warm for ``key``/``keys``; never raises."""
        if kind not in KINDS or not isinstance(worker, str):
            logger.warning("obdask: ignored locality report %r from %s", kind, worker)
            return "ignored"
        new = [str(k) for k in (keys or ())] + ([str(key)] if key is not None else [])
        if replace:
            for old in list(self.by_worker.get(worker, ())):
                entry = self.records.get(old, {}).get(worker)
                if entry and entry[0] == kind and old not in new:
                    self._drop(old, worker)
        if self.scheduler is not None and worker not in self.scheduler.workers:
            return "unknown-worker"
        now = time.time()
        for k in new:
            holders = self.records.setdefault(k, {})
            if worker not in holders:
                self.count += 1
                self.by_worker.setdefault(worker, set()).add(k)
            holders[worker] = (kind, now)
            self.records.move_to_end(k)
        while self.count > self.max_records and self.records:
            oldest, holders = self.records.popitem(last=False)
            for w in holders:
                self.by_worker.get(w, set()).discard(oldest)
            self.count -= len(holders)
        return "OK"

    def _stream_report(self, **msg: Any) -> None:
        # An exception in a stream handler would close the worker's stream.
        try:
            self.locality_report(**msg)
        except Exception:
            logger.exception("obdask: bad locality report %r", msg)

    def _drop(self, key: str, worker: str) -> None:
        holders = self.records.get(key)
        if holders is not None and holders.pop(worker, None) is not None:
            self.count -= 1
            if not holders:
                del self.records[key]
        self.by_worker.get(worker, set()).discard(key)

    def locality_query(self, keys: Iterable[str]) -> dict[str, list[str]]:
        """``{key: [worker addresses]}`` of live workers, most recent report first."""
        alive = self.scheduler.workers if self.scheduler is not None else None
        out: dict[str, list[str]] = {}
        for k in keys:
            holders = self.records.get(k, {})
            ranked = sorted(holders, key=lambda w: holders[w][1], reverse=True)
            out[k] = [w for w in ranked if alive is None or w in alive]
        return out

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        """Forget everything ``worker`` reported."""
        for k in list(self.by_worker.pop(worker, ())):
            self._drop(k, worker)


def _normalise_endpoint(endpoint: str) -> str:
    endpoint = endpoint.strip().rstrip("/")
    if "://" not in endpoint:
        endpoint = "http://" + endpoint
    return endpoint


class ObdaskWorkerPlugin(WorkerPlugin):
    """Worker half of :class:`ObdaskSchedulerPlugin`.

    Parameters
    ----------
    endpoint : str, optional
        Local Ollama base URL.  Default: the worker preload's
        ``--ollama-endpoint``, else ``obdask.llm.local-endpoint``; unset: no polling.
    interval : float or str, optional
        Poll period; default ``obdask.placement.model-poll-interval``.
    """

    name = WORKER_PLUGIN_NAME
    idempotent = True

    def __init__(self, endpoint: str | None = None, interval: float | str | None = None) -> None:
        self.endpoint = endpoint
        self.interval = interval
        self.worker: Any = None
        self.models: list[str] | None = None
        self._http: Any = None
        self._polling = False

    async def setup(self, worker: Any) -> None:
        """Fill in lanes if the worker has none, then start polling Ollama."""
        self.worker = worker
        if not worker_lanes(worker.state.total_resources):
            lanes = parse_lanes(dask.config.get("obdask.placement.lanes", None))
            await worker.set_resources(**lane_resources(lanes))
        endpoint = (
            self.endpoint
            or getattr(worker, "obdask_ollama_endpoint", None)
            or dask.config.get("obdask.llm.local-endpoint", None)
        )
        if not endpoint:
            return
        try:
            import httpx
        except ImportError:
            logger.debug("httpx is not installed: not polling Ollama")
            return
        self.endpoint = _normalise_endpoint(endpoint)
        self._http = httpx.AsyncClient(base_url=self.endpoint, timeout=OLLAMA_TIMEOUT)
        period = config.get_seconds("placement.model-poll-interval", self.interval)
        pc = PeriodicCallback(self.poll, max(period, 0.01) * 1000)
        worker.periodic_callbacks["obdask-ollama-ps"] = pc
        pc.start()
        worker.loop.add_callback(self.poll)

    async def teardown(self, worker: Any) -> None:
        """Stop polling and close the HTTP client."""
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
            logger.debug("Ollama /api/ps at %s failed: %s", self.endpoint, exc)
            return None

    async def poll(self) -> None:
        """Report the loaded models when they changed since the last poll."""
        if self._polling or self.worker is None:
            return
        self._polling = True
        try:
            models = await self.loaded_models()
            current = [] if models is None else models
            if current != self.models:
                self.models = current
                _send(
                    self.worker,
                    {
                        "op": REPORT_OP,
                        "kind": "model",
                        "keys": [model_key(m) for m in current],
                        "replace": True,
                    },
                )
        finally:
            self._polling = False


def _send(worker: Any, msg: dict[str, Any]) -> None:
    """Send ``msg`` to the scheduler over the worker's batched stream (loop thread)."""
    try:
        worker.batched_stream.send(msg)
    except Exception as exc:  # closed stream while the worker shuts down
        logger.debug("obdask: could not send %s: %s", msg.get("op"), exc)


def report_warm(kind: str, key: str) -> bool:
    """From code running on a worker: tell the scheduler this worker is warm for ``key``.

    Cheap: one batched message, sent once per ``(kind, key)`` per worker.

    Parameters
    ----------
    kind : {"clone", "model"}
    key : str
        A locality key, e.g. ``"git:/srv/repo"`` (:func:`obdask.placement.locality_of`)
        or ``model_key(name)``.

    Returns
    -------
    bool
        False (and nothing sent) outside a worker or when the obdask plugin is
        not installed on the cluster.
    """
    if kind not in KINDS:
        raise ValueError(f"report_warm: kind must be one of {KINDS}, not {kind!r}")
    try:
        worker = get_worker()
    except ValueError:
        return False
    if WORKER_PLUGIN_NAME not in worker.plugins:
        return False
    sent = worker.__dict__.setdefault("_obdask_reported", set())
    if (kind, key) in sent:
        return True
    sent.add((kind, key))
    worker.loop.add_callback(_send, worker, {"op": REPORT_OP, "kind": kind, "key": key})
    return True


def install(client: Any) -> Any:
    """Install :class:`ObdaskSchedulerPlugin` (and so the worker plugin); idempotent.

    Returns what ``client.register_plugin`` returns (an awaitable for an
    asynchronous client).
    """
    return client.register_plugin(ObdaskSchedulerPlugin(), name=PLUGIN_NAME)


async def _warm_workers(client: Any, keys: list[str]) -> dict[str, list[str]]:
    try:
        found = await client.scheduler.obdask_locality_query(keys=keys)
    except Exception as exc:  # plugin not installed: the op is unknown
        logger.debug("obdask locality query failed (plugin not installed?): %s", exc)
        found = None
    if not isinstance(found, dict):  # an unknown op answers an error/None, not a dict
        found = {}
    return {k: list(found.get(k) or []) for k in keys}


def warm_workers(client: Any, keys: Iterable[str]) -> Any:
    """``{key: [worker addresses]}`` that reported being warm for each key.

    Empty lists when nobody is warm or the plugin is not installed.  Blocks
    for a synchronous client; returns an awaitable for an asynchronous one.
    """
    return client.sync(_warm_workers, client, list(keys))
