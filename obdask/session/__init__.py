"""Orchestration sessions: the 5x3 state machine and the durable session record.

``obdask.session.model`` is pure Python (schedules, processes, navigation rules,
flow codes); ``obdask.session.store`` keeps the record of section 6 of the spec
on any fsspec URL, fenced by epochs.  Neither imports Dask.
"""

from __future__ import annotations

from obdask.session.model import (
    Event,
    Move,
    MoveKind,
    Process,
    ProcessInfo,
    Schedule,
    SessionState,
    build_flow_code,
    parse_flow_code,
    process_info,
)
from obdask.session.store import (
    CallTicket,
    Consultation,
    ProcessSnapshot,
    SessionRecord,
    SessionStore,
    SessionSummary,
    open_store,
)

__all__ = [
    "CallTicket",
    "Consultation",
    "ProcessSnapshot",
    "SessionRecord",
    "SessionStore",
    "SessionSummary",
    "open_store",
    "Event",
    "Move",
    "MoveKind",
    "Process",
    "ProcessInfo",
    "Schedule",
    "SessionState",
    "build_flow_code",
    "parse_flow_code",
    "process_info",
]
