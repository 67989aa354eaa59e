"""The session record's pieces as read back from a store, and its naming rules.

:class:`ProcessSnapshot` (``processes/0001-S1P1.json``), :class:`Consultation`,
:class:`CallTicket`, :class:`SessionRecord` (everything read back) and
:class:`SessionSummary` (one line of ``obdask session list``).  Pure data, no I/O; the
layout is described in :mod:`obdask.session.store`.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from obdask.exceptions import SnapshotConflict
from obdask.session.model import PROCESSES, SessionState

__all__ = [
    "CallTicket",
    "Consultation",
    "ProcessSnapshot",
    "SessionRecord",
    "SessionSummary",
    "STATUSES",
]

FORMAT = 1
STATUSES = ("running", "waiting", "interrupted", "done", "failed", "cancelled")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SNAPSHOT_RE = re.compile(r"^(\d{4,})-S([1-5])P([1-3])\.json$")
SEAL_RE = re.compile(r"^(\d+)-after-(\d+)\.json$")


def wall_time() -> float:
    """Wall-clock seconds since the epoch (what the record stores)."""
    return time.time()


def iso(t: float) -> str:
    """``t`` as an ISO 8601 UTC timestamp."""
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat()


def dumps(data: Any) -> bytes:
    """The record's JSON encoding (stable key order, readable, secrets masked)."""
    from obdask.redact import redact_obj

    # session records hold model replies and command results: no secret goes to storage
    return json.dumps(redact_obj(data), indent=1, sort_keys=True, default=str).encode()


def check_epoch(epoch: Any) -> int:
    """``epoch`` if it is a valid fencing epoch (an int >= 0), else ValueError."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"a fencing epoch is an int >= 0, not {epoch!r}")
    return epoch


@dataclass(frozen=True)
class ProcessSnapshot:
    """One process's durable snapshot (``processes/0001-S1P1.json``).

    Attributes
    ----------
    index
        1 for the first process of the session, 2 for the next, ...
    position, name
        ``"S1P1"`` and the process's name (``"Research"``).
    flow_code
        The session's flow code right after this process.
    epoch
        The epoch of the driver that wrote it.
    payload
        What the driver stored (output, plan fragment, job record ids, ...).
    started, ended
        Wall-clock times (seconds since the epoch) of the process, when given.
    """

    index: int
    position: str
    name: str
    flow_code: str
    epoch: int
    payload: dict[str, Any] = field(default_factory=dict)
    started: float | None = None
    ended: float | None = None
    written: float | None = None

    @property
    def filename(self) -> str:
        """``0001-S1P1.json``."""
        return f"{self.index:04d}-{self.position}.json"

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "index": self.index, "position": self.position,
                "name": self.name, "flow_code": self.flow_code, "epoch": self.epoch,
                "payload": self.payload, "started": self.started, "ended": self.ended,
                "written": self.written}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProcessSnapshot:
        return cls(index=int(data["index"]), position=str(data["position"]),
                   name=str(data.get("name") or ""), flow_code=str(data["flow_code"]),
                   epoch=int(data["epoch"]), payload=dict(data.get("payload") or {}),
                   started=data.get("started"), ended=data.get("ended"),
                   written=data.get("written"))

    def same_content(self, other: ProcessSnapshot) -> bool:
        """Equal but for the epoch and the write time (an idempotent re-write)."""
        return ((self.index, self.position, self.flow_code, self.payload)
                == (other.index, other.position, other.flow_code, other.payload))


@dataclass(frozen=True)
class Consultation:
    """A question to a human, its wall-clock deadline and how it was settled.

    ``deadline`` is seconds since the epoch, held in the record, so a resumed
    driver waits only for the time left.  ``substituted`` is True when a
    model-made answer replaced a missing human one.
    """

    id: str
    index: int
    position: str
    question: str
    asked: float
    deadline: float
    epoch: int
    answer: str | None = None
    answered: float | None = None
    timed_out: bool = False
    substituted: bool = False
    source: str | None = None

    @property
    def open(self) -> bool:
        """Asked and not yet answered nor timed out."""
        return self.answer is None and not self.timed_out

    def time_left(self, now: float | None = None) -> float:
        """Seconds until the deadline (0 when passed)."""
        return max(0.0, self.deadline - (wall_time() if now is None else now))

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "id": self.id, "index": self.index,
                "position": self.position, "question": self.question, "asked": self.asked,
                "asked_at": iso(self.asked), "deadline": self.deadline,
                "deadline_at": iso(self.deadline), "epoch": self.epoch,
                "answer": self.answer, "answered": self.answered,
                "timed_out": self.timed_out, "substituted": self.substituted,
                "source": self.source}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Consultation:
        return cls(id=str(data["id"]), index=int(data["index"]),
                   position=str(data["position"]), question=str(data["question"]),
                   asked=float(data["asked"]), deadline=float(data["deadline"]),
                   epoch=int(data["epoch"]), answer=data.get("answer"),
                   answered=data.get("answered"), timed_out=bool(data.get("timed_out")),
                   substituted=bool(data.get("substituted")), source=data.get("source"))


@dataclass(frozen=True)
class CallTicket:
    """A durable "model call started" mark for the process at ``index``.

    ``attempt`` counts the starts recorded for that process; a call started
    again after a crash (``attempt > 1``) is ``respent``.
    """

    index: int
    position: str
    attempt: int
    epoch: int

    @property
    def respent(self) -> bool:
        return self.attempt > 1

    @property
    def key(self) -> str:
        """``0004-S2P1-1``."""
        return f"{self.index:04d}-{self.position}-{self.attempt}"


@dataclass
class SessionRecord:
    """A session's record as read back from the store.

    ``state`` is rebuilt from the process snapshots (and the meta when it
    extends them, e.g. a trailing ``X`` or the finish); a driver resumes after
    :attr:`last` without repeating it.
    """

    id: str
    prompt: str | None
    created: float | None
    updated: float | None
    stored_status: str
    epoch: int
    state: SessionState
    snapshots: list[ProcessSnapshot] = field(default_factory=list)
    notes: list[dict[str, Any]] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    resources: dict[str, Any] = field(default_factory=dict)
    consultations: list[Consultation] = field(default_factory=list)
    calls: list[CallTicket] = field(default_factory=list)
    tokens: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    damaged: list[tuple[str, str]] = field(default_factory=list)
    voided: list[str] = field(default_factory=list)

    @property
    def flow_code(self) -> str:
        return self.state.flow_code

    @property
    def last(self) -> ProcessSnapshot | None:
        """The last completed process (None when none has completed)."""
        return self.snapshots[-1] if self.snapshots else None

    @property
    def next_index(self) -> int:
        """Index of the next process to run (``last.index + 1``)."""
        return self.last.index + 1 if self.last else 1

    @property
    def open_consultation(self) -> Consultation | None:
        """The question still waiting for an answer, if any."""
        for c in reversed(self.consultations):
            if c.open:
                return c
        return None

    @property
    def status(self) -> str:
        """``done`` (finished), ``waiting`` (an open question), else the stored status."""
        if self.state.finished:
            return "done"
        if self.stored_status in ("failed", "cancelled", "interrupted"):
            return self.stored_status
        if self.open_consultation is not None:
            return "waiting"
        return self.stored_status

    @property
    def respent(self) -> int:
        """Model calls started again after a crash cut them off."""
        return sum(1 for c in self.calls if c.respent)

    def tokens_total(self) -> dict[str, int]:
        """``{"input", "output", "respent"}`` token sums (respent: of re-made calls)."""
        out = {"input": 0, "output": 0, "respent": 0}
        for t in self.tokens:
            n_in, n_out = int(t.get("input_tokens") or 0), int(t.get("output_tokens") or 0)
            out["input"] += n_in
            out["output"] += n_out
            if t.get("respent"):
                out["respent"] += n_in + n_out
        return out

    def check_resumable(self) -> None:
        """Refuse a record whose processes differ from what this code runs there.

        Each snapshot's name must be the one this code has at its position and
        each flow code must extend the previous one.

        Raises
        ------
        SnapshotConflict
            Naming the snapshot file and the difference.
        """
        previous = ""
        for snap in self.snapshots:
            s, p = int(snap.position[1]), int(snap.position[3])
            expected = PROCESSES[(s, p)].name  # type: ignore[index]
            if snap.name != expected:
                raise SnapshotConflict(
                    f"session {self.id}: {snap.filename} records process {snap.name!r} at "
                    f"{snap.position} but this code runs {expected!r} there; refusing to resume")
            if not snap.flow_code.startswith(previous):
                raise SnapshotConflict(
                    f"session {self.id}: {snap.filename} flow code {snap.flow_code!r} does not "
                    f"extend the previous {previous!r}; refusing to resume")
            previous = snap.flow_code

    def summary(self) -> SessionSummary:
        return SessionSummary(self.id, self.status, self.flow_code, self.state.position,
                              self.prompt, self.created, self.updated, self.epoch)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready overview (``obdask session show --json``)."""
        return {"id": self.id, "state": self.status, "flow_code": self.flow_code,
                "position": self.state.position, "prompt": self.prompt,
                "created": self.created, "updated": self.updated, "epoch": self.epoch,
                "processes": len(self.snapshots), "finished": self.state.finished,
                "justification": self.state.justification, "tokens": self.tokens_total(),
                "respent_calls": self.respent,
                "waiting": (self.open_consultation.to_dict()
                            if self.open_consultation else None),
                "damaged": [f"{name}: {why}" for name, why in self.damaged]}


@dataclass(frozen=True)
class SessionSummary:
    """One line of :meth:`SessionStore.list_sessions`."""

    id: str
    status: str
    flow_code: str
    position: str
    prompt: str | None
    created: float | None
    updated: float | None
    epoch: int

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.status, "flow_code": self.flow_code,
                "position": self.position, "prompt": self.prompt, "created": self.created,
                "updated": self.updated, "epoch": self.epoch}
