"""Scheduler plugin for obdask job keys: attempt history, keys still held.

Dask already knows when a task starts on a worker (``processing``), when a
worker holding it is lost (``processing -> released``), when it errs and is
retried (``processing -> waiting``) and when work stealing merely moved it
before it ran (``processing -> released`` with a ``steal-`` stimulus).  This
plugin keeps that history per obdask key (keys contain ``::``), bounded,
so the runner can report attempts and retry reasons without one extra
message per job.

Scheduler handlers: ``obdask_attempts_query(keys, forget=True)`` returns
``{key: [[worker, outcome], ...]}``; outcome is None while running, else the
state the task moved to (``memory``, ``erred``, ``waiting``, ``released``).
``obdask_keys_held(keys)`` lists those of ``keys`` the scheduler still has
(another run of the same plan is in flight), without a pickled function.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

logger = logging.getLogger(__name__)

PLUGIN_NAME = "obdask-attempts"
QUERY_OP = "obdask_attempts_query"
HELD_OP = "obdask_keys_held"
MAX_KEYS = 200_000


class AttemptsPlugin(SchedulerPlugin):
    """Per-key attempt history of obdask jobs (see the module docstring)."""

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self.max_keys = max_keys
        self.scheduler: Any = None
        self.history: OrderedDict[str, list[list[Any]]] = OrderedDict()

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        scheduler.handlers[QUERY_OP] = self.query
        scheduler.handlers[HELD_OP] = self.held

    def transition(self, key: Any, start: str, finish: str, *args: Any,
                   stimulus_id: str = "", **kwargs: Any) -> None:
        if not isinstance(key, str) or "::" not in key:
            return
        if finish == "processing":
            ts = self.scheduler.tasks.get(key)
            worker = ts.processing_on.address if ts is not None and ts.processing_on else None
            self.history.setdefault(key, []).append([worker, None])
            self.history.move_to_end(key)
            if len(self.history) > self.max_keys:
                self.history.popitem(last=False)
        elif start == "processing":
            tries = self.history.get(key)
            if not tries:
                return
            if finish == "released" and stimulus_id.startswith("steal-"):
                tries.pop()  # moved by work stealing before it ran: not an attempt
            else:
                tries[-1][1] = finish

    def query(self, keys: Iterable[str], forget: bool = True) -> dict[str, list[list[Any]]]:
        """Attempt history of ``keys`` (and forget it, by default)."""
        get = self.history.pop if forget else self.history.get
        return {k: tries for k in keys if (tries := get(k, None))}


    def held(self, keys: Iterable[str]) -> list[str]:
        """Those of ``keys`` the scheduler still holds."""
        tasks = self.scheduler.tasks
        return [k for k in keys if k in tasks]


def describe(tries: list[list[Any]], errors: dict[str, str]) -> list[str]:
    """Human reasons for every attempt but the last; ``errors`` maps worker -> error."""
    reasons = []
    for i, (worker, outcome) in enumerate(tries[:-1], start=1):
        if outcome in ("erred", "waiting"):
            reasons.append(f"attempt {i} failed on {worker}: {errors.get(worker, 'error')}")
        else:
            reasons.append(f"attempt {i}: worker {worker} lost")
    return reasons
