"""Pressure events: a warning at 80 %, critical at 95 % of a configured limit.

:class:`Pressure` is held by :class:`~obdask.server.metrics.MetricsExtension`,
which calls it when records arrive:

* a worker sample: that worker's memory and disk against its host's totals, and the
  cluster's (running sums over the latest sample of every worker, kept here);
* a token record: every token budget's use (spent in its window + reserved) against
  its tokens, and the tokens of the record's session (summed from its token records)
  against ``obdask.sessions.max-tokens``;
* an ``elapsed`` record: a running job's time against its timeout.

Time is the one limit no record announces, so it needs a clock, and each clock sits
where the facts are:

* **a job's timeout**: the worker running it knows when it started and its timeout
  (:func:`obdask.server.worker.track_running`); every record flush (0.5 s) it sends an
  ``elapsed`` record for each job past the warning fraction, so nothing is sent for
  the jobs that end in time and the scheduler keeps no per-job clock.  The level is
  dropped when the job's record arrives;
* **a session's wall time** against ``obdask.sessions.max-time``: the scheduler's
  session registry (:mod:`obdask.server.sessions`) is the only place that sees every
  session, so :meth:`Pressure.tick` runs every ``obdask.metrics.pressure-interval``
  (a ``PeriodicCallback`` of the metrics extension, in the scheduler's
  ``periodic_callbacks``) and visits the live sessions: bounded by
  ``obdask.sessions.max-tracked``.  The registry holds no creation time, so a session's
  time counts from when the scheduler first saw it live (this scheduler's first tick
  after it was registered): after a scheduler restart it undercounts, and the
  driver's own check against the record's creation is what stops the session.

Each ``(scope, resource)`` publishes once per crossing, on the scheduler's event
bus under topic :data:`TOPIC` (so it is in ``obdask.metrics.events`` and on the
page): a ``warning`` when its ratio reaches ``obdask.metrics.pressure-warning``,
a ``critical`` when it reaches ``pressure-critical``, and again only after it
has fallen below the warning level.  The levels are kept per scope in a bounded
dict (workers that leave, jobs that end and finished sessions are forgotten).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import dask
from dask.utils import parse_timedelta

logger = logging.getLogger(__name__)

TOPIC = "obdask.pressure"
LEVELS = ("ok", "warning", "critical")
#: ``(scope, resource)`` pairs whose level is remembered at most.
MAX_TRACKED = 10_000
#: Session states whose wall time counts (:mod:`obdask.server.sessions`).
LIVE_SESSIONS = ("submitted", "running", "waiting")
#: Host resources of a worker sample, each with ``<resource>_used`` and ``_total``.
RESOURCES = ("memory", "disk")
PAIR = ("used", "total")


class Pressure:
    """Levels per ``(scope, resource)`` and the events of their crossings."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.levels: OrderedDict[tuple[str, str], int] = OrderedDict()
        #: Tokens per session seen in token records (bounded, oldest dropped).
        self.session_used: OrderedDict[str, int] = OrderedDict()
        #: Latest (memory used, total, disk used, total) per worker, and their sums.
        self.hosts: dict[str, tuple[float, ...]] = {}
        self.totals = [0.0] * (2 * len(RESOURCES))
        #: When the scheduler first saw each live session (bounded, oldest dropped).
        self.session_seen: OrderedDict[str, float] = OrderedDict()
        self.configure()

    def configure(self) -> None:
        """(Re)read the thresholds (``obdask.metrics``) and the session limit."""
        self.warning = float(dask.config.get("obdask.metrics.pressure-warning", 0.8))
        self.critical = float(dask.config.get("obdask.metrics.pressure-critical", 0.95))
        # the session budget of obdask.sessions (the driver stops a session there): warn before it
        limit = dask.config.get("obdask.sessions.max-tokens", None)
        self.session_tokens = int(limit) if limit else None
        seconds = dask.config.get("obdask.sessions.max-time", None)
        self.session_time = parse_timedelta(seconds, default="s") if seconds else None

    def level(self, ratio: float) -> int:
        """0 (ok), 1 (warning) or 2 (critical) for ``used / limit``."""
        return 2 if ratio >= self.critical else 1 if ratio >= self.warning else 0

    def check(self, scope: str, resource: str, used: float | None, limit: float | None,
              **details: Any) -> dict[str, Any] | None:
        """Publish an event if ``used / limit`` crossed a level upwards; return it."""
        if used is None or not limit or limit <= 0:
            return None
        ratio = float(used) / float(limit)
        new = self.level(ratio)
        pair = (scope, resource)
        old = self.levels.get(pair, 0)
        if new == old or (new and new < old):
            return None  # no crossing (a drop from critical to warning re-arms nothing)
        if new == 0:
            self.levels.pop(pair, None)  # back below the warning: the next crossing counts
            return None
        self.levels[pair] = new
        self.levels.move_to_end(pair)
        while len(self.levels) > MAX_TRACKED:
            self.levels.popitem(last=False)
        event = {"level": LEVELS[new], "scope": scope, "resource": resource,
                 "used": used, "limit": limit, "ratio": round(ratio, 4),
                 "threshold": self.critical if new == 2 else self.warning, **details}
        self.scheduler.log_event(TOPIC, event)
        logger.log(logging.WARNING if new == 2 else logging.INFO,
                   "obdask pressure: %s %s of %s at %.0f%% (%s of %s)", LEVELS[new], resource,
                   scope, ratio * 100, used, limit)
        return event

    def forget(self, scope: str) -> None:
        """Drop the levels of a scope that went away (a worker, a session)."""
        for pair in [p for p in self.levels if p[0] == scope]:
            del self.levels[pair]
        if scope.startswith("worker:"):
            self._drop_host(scope[len("worker:"):])

    # -- what the metrics extension calls -----------------------------------------------
    def on_sample(self, worker: str, sample: dict[str, Any]) -> None:
        """Memory and disk of ``worker`` and of the whole cluster.

        The cluster's figures are running sums over the latest sample of every
        worker (this sample's values replace the worker's previous ones), so a
        sample costs the same with 1000 workers as with 2.
        """
        new = tuple(float(sample.get(f"{r}_{k}") or 0) for r in RESOURCES for k in PAIR)
        old = self.hosts.pop(worker, None)
        self.hosts[worker] = new
        for i, value in enumerate(new):
            self.totals[i] += value - (old[i] if old else 0.0)
        for j, resource in enumerate(RESOURCES):
            self.check(f"worker:{worker}", resource, sample.get(f"{resource}_used"),
                       sample.get(f"{resource}_total"), worker=worker)
            self.check("cluster", resource, self.totals[2 * j], self.totals[2 * j + 1])

    def _drop_host(self, worker: str) -> None:
        old = self.hosts.pop(worker, None)
        if old is not None:
            for i, value in enumerate(old):
                self.totals[i] -= value

    def on_tokens(self, record: dict[str, Any], now: float) -> None:
        """Token budgets, and the session of ``record`` against its limit."""
        # the host plugin's budgets (not obdask.server.extension: that import is a cycle)
        host = self.scheduler.extensions.get("obdask")
        budgets = getattr(host, "extensions", {}).get("budgets")
        for budget in list(getattr(getattr(budgets, "ledger", None), "budgets", {}).values()):
            self.check(f"budget:{budget.name}", "tokens", budget.used(now) + budget.reserved,
                       budget.tokens, budget=budget.name)
        session = record.get("session")
        if session and self.session_tokens:
            used = self.session_used.pop(session, 0) + int(record.get("prompt_eval_count") or 0) \
                + int(record.get("eval_count") or 0)
            self.session_used[session] = used
            while len(self.session_used) > MAX_TRACKED:
                self.session_used.popitem(last=False)
            self.check(f"session:{session}", "tokens", used, self.session_tokens,
                       session=session)

    def on_elapsed(self, record: dict[str, Any]) -> None:
        """A running job's elapsed time against its timeout (sent by its worker)."""
        job = record.get("job")
        if job:
            self.check(f"job:{job}", "time", round(float(record.get("elapsed") or 0), 3),
                       record.get("timeout"), job=job, worker=record.get("worker"))

    def job_ended(self, job: str) -> None:
        """Drop the time level of a job whose record arrived (no scan of the levels)."""
        self.levels.pop((f"job:{job}", "time"), None)

    def tick(self, now: float) -> None:
        """Every live session's wall time against ``obdask.sessions.max-time``."""
        if not self.session_time:
            return
        host = self.scheduler.extensions.get("obdask")
        sessions = getattr(getattr(host, "extensions", {}).get("sessions"), "sessions", None)
        live = set()
        for sid, entry in list((sessions or {}).items()):
            if entry.get("state") not in LIVE_SESSIONS:
                continue
            live.add(sid)
            seen = self.session_seen.setdefault(sid, now)
            self.check(f"session:{sid}", "time", round(now - seen, 3), self.session_time,
                       session=sid)
        for sid in [s for s in self.session_seen if s not in live]:  # ended or dropped
            del self.session_seen[sid]
            self.levels.pop((f"session:{sid}", "time"), None)
        while len(self.session_seen) > MAX_TRACKED:
            self.session_seen.popitem(last=False)
