"""Scheduler extension for obdask jobs: attempt history, jobs still held.

Dask already knows when a task starts on a worker (``processing``), when a
worker holding it is lost (``processing -> released``), when it errs and is
retried (``processing -> waiting``) and when work stealing merely moved it
before it ran (``processing -> released`` with a ``steal-`` stimulus).  This
extension keeps that history per obdask job (:mod:`obdask.keys`), bounded,
so the runner can report attempts and retry reasons without one extra
message per job.

Scheduler handlers: ``obdask_attempts_query(keys, forget=True)`` returns
``{key: [[worker, outcome], ...]}``; outcome is None while running, else the
state the task moved to (``memory``, ``erred``, ``waiting``, ``released``).
``obdask_jobs_held(keys)`` lists those job ids the scheduler still has
(another run of the same plan is in flight), without a pickled function.

Plan ids: ``obdask_plan_claim(plan_id, owner, client, label)`` records which
plan (``owner``: its file's absolute path, or a digest of a plan without a
file) holds a plan id while one of its runs is in flight, and returns the
``label`` of a *different* plan that holds it now (else None).  A claim ends
with ``obdask_plan_release(plan_id, owner, client)`` or when its client
disconnects.  Two plans named ``plan.md`` in two folders both get the id
``plan``: without this they would share Dask keys and run records.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from obdask.keys import dask_key_of, job_id_of

logger = logging.getLogger(__name__)

QUERY_OP = "obdask_attempts_query"
HELD_OP = "obdask_jobs_held"
CLAIM_OP = "obdask_plan_claim"
RELEASE_OP = "obdask_plan_release"
MAX_KEYS = 200_000


class RunsExtension:
    """Per-job attempt history of obdask jobs (see the module docstring)."""

    def __init__(self, scheduler: Any, max_keys: int = MAX_KEYS) -> None:
        self.max_keys = max_keys
        self.scheduler = scheduler
        self.history: OrderedDict[str, list[list[Any]]] = OrderedDict()
        # plan id -> {(owner, client): label}: the runs in flight that hold it
        self.claims: dict[str, dict[tuple[str, str], str]] = {}

    @property
    def handlers(self) -> dict[str, Any]:
        """Scheduler handlers this extension answers."""
        return {QUERY_OP: self.query, HELD_OP: self.held, CLAIM_OP: self.claim,
                RELEASE_OP: self.release}

    def claim(self, plan_id: str, owner: str, client: str, label: str) -> str | None:
        """Hold ``plan_id`` for ``owner``; the label of another plan holding it, if any."""
        held = self.claims.setdefault(plan_id, {})
        for (other, other_client), other_label in list(held.items()):
            if other_client not in self.scheduler.clients:  # its client is gone
                del held[other, other_client]
            elif other != owner:
                return other_label
        held[owner, client] = label
        return None

    def release(self, plan_id: str, owner: str, client: str) -> None:
        """End one claim of :meth:`claim` (a run of the plan is over)."""
        held = self.claims.get(plan_id, {})
        held.pop((owner, client), None)
        if not held:
            self.claims.pop(plan_id, None)

    def remove_client(self, scheduler: Any, client: str) -> None:
        for plan_id in list(self.claims):
            held = self.claims[plan_id]
            for claim in [c for c in held if c[1] == client]:
                del held[claim]
            if not held:
                del self.claims[plan_id]

    def transition(self, key: Any, start: str, finish: str, *args: Any,
                   stimulus_id: str = "", **kwargs: Any) -> None:
        jid = job_id_of(key)
        if jid is None:
            return
        if finish == "processing":
            ts = self.scheduler.tasks.get(key)
            worker = ts.processing_on.address if ts is not None and ts.processing_on else None
            self.history.setdefault(jid, []).append([worker, None])
            self.history.move_to_end(jid)
            if len(self.history) > self.max_keys:
                self.history.popitem(last=False)
        elif start == "processing":
            tries = self.history.get(jid)
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
        return [k for k in keys if dask_key_of(k) in tasks]
