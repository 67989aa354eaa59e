"""Scheduler plugin: expected durations for obdask jobs Dask has never seen.

Dask learns a task's expected duration per *task prefix* (``key_split`` of
its key).  An obdask key ``{plan}::{id}`` is usually its own prefix, so
every job would start as an unknown task costed at
``distributed.scheduler.unknown-task-duration`` (0.5 s by default): worker
occupancy, work stealing and the dashboard then see a 2 ms ``@cmd:true``
job as a half-second one.

This plugin keeps a running average of finished obdask jobs' compute time per
plan (and across plans) and, in ``update_graph``, before the new tasks are
transitioned, gives each obdask prefix that has no estimate yet that average
(the plan's, else the overall one).  Dask's own learning then refines it as
usual.  Nothing is sent per job.

Dask never drops a task prefix (``Scheduler.task_prefixes``, about 1 KB
each), so a long-lived scheduler would keep one per obdask job key ever run.
Prefixes of forgotten obdask keys that no task group uses any more are
dropped at the next graph update (their estimate lives on here, per plan).

Scheduler handler: ``obdask_durations_query()`` returns
``{"plans": {plan: seconds}, "overall": seconds or None}``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from dask.utils import key_split
from distributed.diagnostics.plugin import SchedulerPlugin

logger = logging.getLogger(__name__)

PLUGIN_NAME = "obdask-durations"
QUERY_OP = "obdask_durations_query"
MAX_PLANS = 10_000
#: Weight of the newest observation in the running averages.
ALPHA = 0.2


class DurationsPlugin(SchedulerPlugin):
    """Seed Dask's duration estimate of new obdask jobs (see the module docstring)."""

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self, max_plans: int = MAX_PLANS) -> None:
        self.max_plans = max_plans
        self.scheduler: Any = None
        self.by_plan: OrderedDict[str, float] = OrderedDict()
        self.overall: float | None = None
        self.forgotten_prefixes: set[str] = set()

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        scheduler.handlers[QUERY_OP] = self.query

    def query(self) -> dict[str, Any]:
        """Current estimates in seconds."""
        return {"plans": dict(self.by_plan), "overall": self.overall}

    def estimate(self, plan: str) -> float | None:
        """Expected compute seconds of a job of ``plan`` (None: nothing seen yet)."""
        seen = self.by_plan.get(plan)
        return seen if seen is not None else self.overall

    def update_graph(self, scheduler: Any, *, tasks: Iterable[Any] = (), **kwargs: Any) -> None:
        self.drop_unused_prefixes()
        by_key = scheduler.tasks
        for key in tasks:
            if not isinstance(key, str) or "::" not in key:
                continue
            ts = by_key.get(key)
            if ts is None or ts.prefix is None or ts.prefix.duration_average >= 0:
                continue
            guess = self.estimate(key.split("::", 1)[0])
            if guess is not None:
                ts.prefix.duration_average = guess

    def drop_unused_prefixes(self) -> int:
        """Forget the task prefixes of forgotten obdask keys that no task group uses."""
        prefixes = self.scheduler.task_prefixes if self.scheduler is not None else {}
        dropped = 0
        for name in self.forgotten_prefixes:
            prefix = prefixes.get(name)
            if prefix is not None and not prefix.groups:
                del prefixes[name]
                dropped += 1
        self.forgotten_prefixes.clear()
        return dropped

    def transition(self, key: Any, start: str, finish: str, *args: Any,
                   startstops: Iterable[dict[str, Any]] | None = None, **kwargs: Any) -> None:
        if not isinstance(key, str) or "::" not in key:
            return
        if finish == "forgotten":
            # Its task group is removed only after this hook: drop the prefix later.
            self.forgotten_prefixes.add(key_split(key))
            return
        if finish != "memory" or start != "processing" or not startstops:
            return
        seconds = sum(s["stop"] - s["start"] for s in startstops if s.get("action") == "compute")
        if seconds <= 0:
            return
        plan = key.split("::", 1)[0]
        old = self.by_plan.pop(plan, None)
        self.by_plan[plan] = seconds if old is None else ALPHA * seconds + (1 - ALPHA) * old
        if len(self.by_plan) > self.max_plans:
            self.by_plan.popitem(last=False)
        self.overall = seconds if self.overall is None else (
            ALPHA * seconds + (1 - ALPHA) * self.overall)
