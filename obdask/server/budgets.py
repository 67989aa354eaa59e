"""Scheduler extension: token budgets (:class:`BudgetExtension`).

The extension holds the cluster's :class:`~obdask.llm.budget.ledger.Ledger`,
answers the ``obdask_budget_*`` scheduler handlers (the pattern of
``distributed/semaphore.py``) and releases the reservations of tasks, workers
and clients that go away (hooks called by :class:`obdask.server.ObdaskPlugin`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Any

from obdask.llm.budget.ledger import (
    Ledger,
    configured_budgets,
    out_of_time,
    wait_time,
)

logger = logging.getLogger(__name__)


def _as_key(key: Any) -> Any:
    """msgpack turns tuple keys into lists; turn them back."""
    if isinstance(key, list):
        return tuple(_as_key(k) for k in key)
    return key


class BudgetExtension:
    """Scheduler extension holding the cluster's :class:`Ledger`.

    Answers these scheduler handlers:

    * ``obdask_budget_reserve`` (waits while a ``wait`` budget has no room)
    * ``obdask_budget_settle``, ``obdask_budget_release``
    * ``obdask_budget_state``, ``obdask_budget_set``, ``obdask_budget_remove``

    Budgets from the scheduler's ``obdask.llm.budgets`` are loaded at start.
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.ledger = Ledger(configured_budgets())
        self._changed = asyncio.Event()
        self._by_key: dict[Any, set[str]] = defaultdict(set)
        #: ``{task key: blocked answer}`` of reservations waiting for room now
        #: (read by ``obdask why``, :mod:`obdask.server.waiting`).
        self.blocked: dict[Any, dict[str, Any]] = {}

    @property
    def handlers(self) -> dict[str, Any]:
        """Scheduler handlers this extension answers."""
        return {
            "obdask_budget_reserve": self.reserve,
            "obdask_budget_settle": self.settle,
            "obdask_budget_release": self.release,
            "obdask_budget_state": self.state,
            "obdask_budget_set": self.set_budget,
            "obdask_budget_remove": self.remove_budget,
        }

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def _owner_alive(self, key: Any, worker: str | None, client: str | None) -> str:
        """Empty string if the caller still exists, else why not."""
        if worker is not None and worker not in self.scheduler.workers:
            return f"worker {worker} has left the cluster"
        if key is not None:
            ts = self.scheduler.tasks.get(key)
            if ts is None or ts.state != "processing":
                state = "forgotten" if ts is None else ts.state
                return f"task {key!r} is no longer running ({state})"
            on = ts.processing_on
            if worker is not None and on is not None and on.address != worker:
                return f"task {key!r} now runs on {on.address}, not on {worker}"
        elif client is not None and client not in self.scheduler.clients:
            return f"client {client} has disconnected"
        return ""

    async def reserve(
        self,
        id: str,  # noqa: A002
        amount: int,
        timeout: float | None = None,
        key: Any = None,
        worker: str | None = None,
        client: str | None = None,
        **attrs: Any,
    ) -> dict[str, Any]:
        """Handler ``obdask_budget_reserve``; see :meth:`Ledger.try_reserve`.

        ``timeout`` bounds the wait of ``wait`` budgets (None: forever, 0: no
        wait, answering ``"blocked"``).  Answers ``"cancelled"`` when the task
        or client that asked is gone by the time there is room.
        """
        key = _as_key(key)
        start = time.monotonic()
        owner = {"key": key, "worker": worker, "client": client}
        try:
            return await self._reserve(id, int(amount), timeout, key, owner, start, attrs)
        finally:
            if key is not None:
                self.blocked.pop(key, None)

    async def _reserve(self, rid: str, amount: int, timeout: float | None, key: Any,
                       owner: dict[str, Any], start: float, attrs: dict[str, Any]
                       ) -> dict[str, Any]:
        worker, client = owner["worker"], owner["client"]
        while True:
            gone = self._owner_alive(key, worker, client)
            if gone:
                return {"status": "cancelled", "message": gone}
            now = time.time()
            result = self.ledger.try_reserve(rid, amount, now, **owner, **attrs)
            if result["status"] == "ok":
                if key is not None and result["budgets"]:
                    self._by_key[key].add(rid)
                return result
            if result["status"] != "blocked":
                return result
            left = None if timeout is None else timeout - (time.monotonic() - start)
            if out_of_time(result, timeout, left):
                return result
            if key is not None:
                self.blocked[key] = result
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=wait_time(result, left, now))
            except asyncio.TimeoutError:
                pass

    def settle(self, id: str, tokens: int, key: Any = None, **attrs: Any) -> None:  # noqa: A002
        """Handler ``obdask_budget_settle``: charge the real token count."""
        self.ledger.settle(id, int(tokens), time.time(), **attrs)
        self._forget_id(_as_key(key), id)
        self._notify()

    def release(self, id: str, key: Any = None) -> bool:  # noqa: A002
        """Handler ``obdask_budget_release``: drop a reservation unspent."""
        done = self.ledger.release(id)
        self._forget_id(_as_key(key), id)
        self._notify()
        return done

    def _forget_id(self, key: Any, rid: str) -> None:
        if key is not None and key in self._by_key:
            self._by_key[key].discard(rid)
            if not self._by_key[key]:
                del self._by_key[key]

    def state(self) -> dict[str, Any]:
        """Handler ``obdask_budget_state``."""
        return self.ledger.state(time.time())

    def set_budget(self, budget: dict[str, Any]) -> dict[str, Any]:
        """Handler ``obdask_budget_set``: add or redefine one budget."""
        b = self.ledger.set_budget(budget)
        self._notify()
        return b.row(time.time())

    def remove_budget(self, name: str) -> bool:
        """Handler ``obdask_budget_remove``."""
        done = self.ledger.remove_budget(name)
        self._notify()
        return done

    # -- scheduler plugin hooks (forwarded by ObdaskPlugin) ---------------------
    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        """Release what a task reserved once it stops running (cancel, error, worker loss)."""
        if start == "processing" and finish != "processing" and key in self._by_key:
            ids = self._by_key.pop(key)
            for rid in ids:
                self.ledger.release(rid)
            logger.info("released %d token reservation(s) of task %r", len(ids), key)
            self._notify()

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        """Release every reservation made on ``worker``."""
        ids = self.ledger.release_where(worker=worker)
        if ids:
            logger.info("released %d token reservation(s) of lost worker %s", len(ids), worker)
            for rids in self._by_key.values():
                rids.difference_update(ids)
            self._notify()

    def remove_client(self, scheduler: Any, client: str) -> None:
        """Release reservations a client made outside any task."""
        ids = self.ledger.release_where(client=client, key=None)
        if ids:
            logger.info("released %d token reservation(s) of client %s", len(ids), client)
            self._notify()
