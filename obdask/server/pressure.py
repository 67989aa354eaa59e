"""Pressure events: a warning at 80 %, critical at 95 % of a configured limit.

:class:`Pressure` is held by :class:`~obdask.server.metrics.MetricsExtension`,
which calls it when records arrive (no timer of its own):

* a worker sample: that worker's memory and disk against its host's totals, and the
  cluster's (running sums over the latest sample of every worker, kept here);
* a token record: every token budget's use (spent in its window + reserved) against
  its tokens, and the tokens of the record's session (summed from its token records)
  against ``obdask.sessions.max-tokens``.

Each ``(scope, resource)`` publishes once per crossing, on the scheduler's event
bus under topic :data:`TOPIC` (so it is in ``obdask.metrics.events`` and on the
page): a ``warning`` when its ratio reaches ``obdask.metrics.pressure-warning``,
a ``critical`` when it reaches ``pressure-critical``, and again only after it
has fallen below the warning level.  The levels are kept per scope in a bounded
dict (workers that leave and finished sessions are forgotten).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import dask

logger = logging.getLogger(__name__)

TOPIC = "obdask.pressure"
LEVELS = ("ok", "warning", "critical")
#: ``(scope, resource)`` pairs whose level is remembered at most.
MAX_TRACKED = 10_000
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
        self.configure()

    def configure(self) -> None:
        """(Re)read the thresholds (``obdask.metrics``) and the session limit."""
        self.warning = float(dask.config.get("obdask.metrics.pressure-warning", 0.8))
        self.critical = float(dask.config.get("obdask.metrics.pressure-critical", 0.95))
        # the session budget of obdask.sessions (the driver stops a session there): warn before it
        limit = dask.config.get("obdask.sessions.max-tokens", None)
        self.session_tokens = int(limit) if limit else None

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
