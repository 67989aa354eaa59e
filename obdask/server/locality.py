"""Scheduler extension: where work is warm (git clones, loaded models).

:class:`LocalityExtension` keeps a bounded record of which worker holds a warm
git clone (``kind="clone"``) or a loaded Ollama model (``kind="model"``), as
workers report them (:func:`obdask.server.worker.report_warm`, the worker
plugin's ``/api/ps`` poll), and answers queries for placement.  Handlers:

``obdask_locality_report(worker, kind, key=None, keys=None, replace=False)``
    record that ``worker`` is warm for ``key`` (or ``keys``); with
    ``replace=True`` the worker's previous keys of that kind are dropped.
    Also a stream handler, so workers report over their batched stream.
``obdask_locality_query(keys)``
    ``{key: [worker addresses]}``, most recent report first, live workers only.

"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import obdask.config as config
from obdask.server.worker import KINDS, REPORT_OP

logger = logging.getLogger(__name__)

QUERY_OP = "obdask_locality_query"


class LocalityExtension:
    """Record warm clones and loaded models per worker; see the module docstring.

    Parameters
    ----------
    max_records : int, optional
        Most ``(key, worker)`` records kept; the least recently reported keys
        are dropped first.  Default ``obdask.placement.max-locality-records``.
    """

    def __init__(self, scheduler: Any, max_records: int | None = None) -> None:
        self.max_records = config.get_int("placement.max-locality-records", max_records,
                                          minimum=1)
        self.scheduler = scheduler
        # key -> {worker: (kind, time)}; ordered oldest report first
        self.records: OrderedDict[str, dict[str, tuple[str, float]]] = OrderedDict()
        self.by_worker: dict[str, set[str]] = {}
        self.count = 0

    @property
    def handlers(self) -> dict[str, Any]:
        """Scheduler handlers this extension answers."""
        return {REPORT_OP: self.locality_report, QUERY_OP: self.locality_query}

    @property
    def stream_handlers(self) -> dict[str, Any]:
        """Worker stream handlers (workers report over their batched stream)."""
        return {REPORT_OP: self._stream_report}

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
