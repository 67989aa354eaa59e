"""The session event bus: Dask structured events on the ``obdask.sessions`` topic.

Every event is a dict with ``session`` (the id), ``seq`` (1, 2, ... per session, so a
subscriber can detect a gap), ``time`` (the scheduler's clock: events of drivers on
many nodes order correctly) and ``kind``, one of :data:`KINDS`, plus the kind's fields:

``session-start``          prompt, epoch, resumed (bool), after (last recorded process)
``transition``             from, to (positions), process (name), index, duration (s),
                           tokens, respent
``default-move``           at, move, reasons (the orchestrator gave no valid choice)
``consultation-asked``     position, question, deadline (wall clock)
``consultation-answered``  position, answer
``consultation-timed-out`` position, substituted (the model-made answer)
``process-error``          position, error (an ``X`` was recorded)
``session-complete``       flow_code, duration (s), success, status
``driver-superseded``      epoch (the stale driver's), highest
``interrupted``            epoch (the driver left without finishing)
``driver-lost``            epoch (its worker was lost; Dask runs the driver again)
``driver-error``           epoch, error (the driver stopped on an error; then ``interrupted``)
``tokens``                 total (every 10 000 tokens)

The scheduler extension (:mod:`obdask.server.sessions`) numbers and stamps them and
calls ``scheduler.log_event``; read them with ``client.get_events(TOPIC)`` or
``client.subscribe_topic(TOPIC, handler)``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

TOPIC = "obdask.sessions"
KINDS = ("session-start", "transition", "default-move", "consultation-asked",
         "consultation-answered", "consultation-timed-out", "process-error",
         "session-complete", "driver-superseded", "interrupted", "driver-lost", "driver-error",
         "tokens")
#: Kinds after which a session's driver is gone (``watch`` stops there).
FINAL = ("session-complete", "interrupted")
TOKEN_STEP = 10_000


def format_event(event: dict[str, Any]) -> str:
    """One line for people: ``12:00:01.234 #3 transition S1P1 -> S1P2 (Crawl) 0.21s``."""
    t = dt.datetime.fromtimestamp(float(event.get("time") or 0)).strftime("%H:%M:%S.%f")[:-3]
    kind = event.get("kind")
    head = f"{t} #{event.get('seq')} {kind}"
    if kind == "transition":
        extra = (f" {event.get('from')} -> {event.get('to')} ({event.get('process')}) "
                 f"{float(event.get('duration') or 0):.2f}s {event.get('tokens', 0)} tokens"
                 + (" re-spent" if event.get("respent") else ""))
    elif kind == "session-start":
        extra = (f" epoch {event.get('epoch')}"
                 + (f" resumed after process {event.get('after')}" if event.get("resumed")
                    else ""))
    elif kind == "session-complete":
        extra = (f" {event.get('status')} flow code {event.get('flow_code')} in "
                 f"{float(event.get('duration') or 0):.1f}s")
    elif kind == "consultation-asked":
        extra = f" at {event.get('position')}: {event.get('question')}"
    elif kind == "consultation-answered":
        extra = f" at {event.get('position')}: {event.get('answer')}"
    elif kind == "consultation-timed-out":
        extra = f" at {event.get('position')}; substituted: {event.get('substituted')}"
    elif kind == "default-move":
        extra = f" at {event.get('at')}: {event.get('move')}"
    else:
        extra = "".join(f" {k}={v}" for k, v in event.items()
                        if k not in ("session", "seq", "time", "kind"))
    return head + extra
