"""The durable session record on any fsspec URL, fenced by epochs.

Layout under the store URL (spec section 6; ``docs/sessions.md``)::

    <id>/meta.json                    id, prompt, timestamps, status, flow code, highest epoch
    <id>/flow_code                    the flow code as text (a mirror for humans)
    <id>/processes/0001-S1P1.json     one snapshot per process run, write-once
    <id>/notes/<time>-<epoch>-<rand>.json      one note per file
    <id>/actions/<time>-<epoch>-<rand>.json    one action per file
    <id>/resources.json               resource statistics (latest wins)
    <id>/consultations/0009-S3P3.json question, wall-clock deadline, answer or timeout
    <id>/calls/0004-S2P1-1.json       "model call started" marks (re-spent detection)
    <id>/tokens/0004-S2P1-1.json      token usage of one call
    <id>/epochs/000000000003          write-once: epoch 3 was registered
    <id>/seals/000000000003-after-000012.json  write-once: epoch 3 took over after process 12

Fencing.  Every write carries an epoch (the lease's fencing token).  A write whose
epoch is lower than the highest registered is refused with
:class:`~obdask.exceptions.LeaseLost` before anything is written.  A driver takes a
session over with :meth:`SessionStore.claim`: it registers its epoch, reads the
record, and seals "epoch E continues after process N".  Readers void any snapshot
past N written by an epoch lower than E, so a superseded driver's write that lands
after the takeover never becomes part of the record; the superseded driver checks
the registered epochs after each write and raises ``LeaseLost`` (its ``kept``
attribute says whether the newer driver had already read that write).

Snapshots are created exclusively (``os.link`` on local disk, a lock in memory,
``If-None-Match`` on S3), and other files are written atomically where the
filesystem allows (a temporary file then a rename).  Damaged files are reported
with their name in :attr:`SessionRecord.damaged` and skipped.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import posixpath
import re
import secrets
import threading
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from obdask.exceptions import (
    FlowCodeError,
    LeaseLost,
    SessionError,
    SessionExists,
    SnapshotConflict,
    UnknownSession,
)
from obdask.session.model import PROCESSES, Move, SessionState

logger = logging.getLogger(__name__)

__all__ = [
    "open_store",
    "CallTicket",
    "Consultation",
    "ProcessSnapshot",
    "SessionRecord",
    "SessionStore",
    "SessionSummary",
    "STATUSES",
]

FORMAT = 1
STATUSES = ("running", "waiting", "interrupted", "done", "failed", "cancelled")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SNAPSHOT = re.compile(r"^(\d{4,})-S([1-5])P([1-3])\.json$")
_SEAL = re.compile(r"^(\d+)-after-(\d+)\.json$")
_MEMORY_LOCK = threading.Lock()


def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat()


def _dumps(data: Any) -> bytes:
    from obdask.redact import redact_obj

    # session records hold model replies and command results: no secret goes to storage
    return json.dumps(redact_obj(data), indent=1, sort_keys=True, default=str).encode()


def _check_epoch(epoch: Any) -> int:
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
        return max(0.0, self.deadline - (_now() if now is None else now))

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "id": self.id, "index": self.index,
                "position": self.position, "question": self.question, "asked": self.asked,
                "asked_at": _iso(self.asked), "deadline": self.deadline,
                "deadline_at": _iso(self.deadline), "epoch": self.epoch,
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


class SessionStore:
    """Session records under an fsspec URL (``memory://``, a local path, ``s3://``).

    Parameters
    ----------
    url
        Where records live; one folder per session id.
    storage_options
        fsspec options for the URL's protocol (e.g. ``obdask.config.storage_options(url)``).
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.storage_options = dict(storage_options or {})
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url, **self.storage_options)
        except (ImportError, ValueError) as exc:
            raise SessionError(f"session store {url!r}: {exc}") from exc
        self._local = isinstance(self.fs, LocalFileSystem)
        self._memory = isinstance(self.fs, MemoryFileSystem)
        self._written: dict[str, ProcessSnapshot] = {}  # last snapshot this store wrote

    def __reduce__(self):
        return (type(self), (self.url, self.storage_options))

    def __repr__(self) -> str:
        return f"SessionStore({self.url!r})"

    # -- paths and low-level io ----------------------------------------------------------
    def _dir(self, session_id: str) -> str:
        if not isinstance(session_id, str) or not _ID.match(session_id):
            raise ValueError(f"session id {session_id!r}: use letters, digits, '.', '_' or "
                             "'-' (at most 128, not starting with a punctuation mark)")
        return posixpath.join(self.root, session_id)

    def _path(self, session_id: str, *parts: str) -> str:
        return posixpath.join(self._dir(session_id), *parts)

    def _where(self, path: str) -> str:
        return f"{self.url.rstrip('/')}/{posixpath.relpath(path, self.root)}"

    def _makedirs(self, path: str) -> None:
        if not self._memory:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)

    def _write(self, path: str, data: bytes) -> None:
        """Replace ``path`` atomically where the filesystem allows."""
        try:
            self._makedirs(path)
            if self._local:
                tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            elif self._memory:
                with _MEMORY_LOCK:
                    self.fs.pipe_file(path, data)
            else:
                self.fs.pipe_file(path, data)
        except Exception as exc:  # noqa: BLE001  (botocore errors are not OSErrors)
            raise SessionError(f"cannot write {self._where(path)}: {exc}") from exc

    def _create(self, path: str, data: bytes) -> bool:
        """Create ``path`` only if absent (atomically where possible); False if it exists."""
        try:
            self._makedirs(path)
            if self._local:
                tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, path)  # fails if path exists: exclusive and never partial
                except FileExistsError:
                    return False
                finally:
                    os.unlink(tmp)
                return True
            if self._memory:
                with _MEMORY_LOCK:
                    if self.fs.exists(path):
                        return False
                    self.fs.pipe_file(path, data)
                return True
            try:
                self.fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                return False
            return True
        except Exception as exc:  # noqa: BLE001  (botocore errors are not OSErrors)
            raise SessionError(f"cannot write {self._where(path)}: {exc}") from exc

    def _read_bytes(self, path: str) -> bytes | None:
        try:
            if self._local:
                with open(path, "rb") as f:
                    return f.read()
            return bytes(self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001  (botocore errors are not OSErrors)
            raise SessionError(f"cannot read {self._where(path)}: {exc}") from exc

    def _read_json(self, path: str, damaged: list[tuple[str, str]] | None = None) -> Any:
        """Parsed JSON of ``path``; None when absent or damaged (then reported)."""
        data = self._read_bytes(path)
        if data is None:
            return None
        return self._parse(path, data, damaged)

    def _parse(self, path: str, data: bytes, damaged: list[tuple[str, str]] | None) -> Any:
        try:
            return json.loads(data)
        except ValueError as exc:
            why = f"damaged ({exc})"
            logger.warning("session store: skipping %s: %s", self._where(path), why)
            if damaged is not None:
                damaged.append((self._where(path), why))
            return None

    def _ls(self, path: str) -> list[str]:
        try:
            if self._local:
                return sorted(n for n in os.listdir(path) if not n.endswith(".tmp"))
            self.fs.invalidate_cache(path)
            names = self.fs.ls(path, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except Exception as exc:  # noqa: BLE001  (botocore errors are not OSErrors)
            raise SessionError(f"cannot list {self._where(path)}: {exc}") from exc
        return sorted(posixpath.basename(n.rstrip("/")) for n in names
                      if not n.endswith(".tmp"))

    def _exists(self, session_id: str) -> bool:
        return self._read_bytes(self._path(session_id, "meta.json")) is not None

    def _require(self, session_id: str) -> None:
        if not self._exists(session_id):
            raise UnknownSession(f"no session {session_id!r} in {self.url}")

    # -- fencing -------------------------------------------------------------------------
    def _epochs(self, session_id: str) -> list[int]:
        return sorted(int(n) for n in self._ls(self._path(session_id, "epochs")) if n.isdigit())

    def highest_epoch(self, session_id: str) -> int:
        """The highest epoch registered for the session (0 when none)."""
        epochs = self._epochs(session_id)
        return epochs[-1] if epochs else 0

    def _seals(self, session_id: str) -> dict[int, int]:
        """epoch -> the last process index that epoch found when it took over.

        The index is in the file name, so one listing reads every seal.
        """
        seals: dict[int, int] = {}
        for name in self._ls(self._path(session_id, "seals")):
            m = _SEAL.match(name)
            if m:
                epoch, after = int(m.group(1)), int(m.group(2))
                seals[epoch] = min(after, seals.get(epoch, after))
        return seals

    def _lost(self, session_id: str, epoch: int, highest: int, doing: str,
              kept: bool | None = None) -> LeaseLost:
        if kept is None:
            fate = "kept only if the newer driver read it"
        else:
            fate = "kept (the newer driver had read it)" if kept else "refused"
        return LeaseLost(
            f"session {session_id}: epoch {epoch} was superseded by epoch {highest} "
            f"(another driver holds the session); {doing}: {fate}",
            session=session_id, epoch=epoch, highest=highest, kept=kept)

    def _fence(self, session_id: str, epoch: int, doing: str) -> None:
        """Refuse a lower epoch; register (claim) a higher one."""
        epoch = _check_epoch(epoch)
        highest = self.highest_epoch(session_id)
        if epoch < highest:
            raise self._lost(session_id, epoch, highest, doing, kept=False)
        if epoch > highest:
            self.claim(session_id, epoch)

    def _verify(self, session_id: str, epoch: int, doing: str, index: int | None = None) -> None:
        """After a write: raise LeaseLost if a newer epoch registered meanwhile."""
        highest = self.highest_epoch(session_id)
        if highest <= epoch:
            return
        kept: bool | None = None
        if index is not None:
            seals = self._seals(session_id)
            newer = [e for e in self._epochs(session_id) if e > epoch]
            if any(seals[e] < index for e in newer if e in seals):
                kept = False  # void: a newer driver took over before this position
            elif all(e in seals for e in newer):
                kept = True  # every newer driver read it before taking over
        raise self._lost(session_id, epoch, highest, doing, kept=kept)

    def claim(self, session_id: str, epoch: int) -> SessionRecord:
        """Take the session over with ``epoch``: register it, read the record, seal.

        Snapshots past the record's last process written by lower epochs are void
        from now on.  Claiming again with the same epoch is harmless.

        Returns
        -------
        SessionRecord
            The record as this epoch found it (resume after ``record.last``).

        Raises
        ------
        LeaseLost
            A higher epoch is already registered.
        UnknownSession
        """
        epoch = _check_epoch(epoch)
        self._require(session_id)
        highest = self.highest_epoch(session_id)
        if epoch < highest:
            raise self._lost(session_id, epoch, highest, "claim", kept=False)
        self._create(self._path(session_id, "epochs", f"{epoch:012d}"), str(epoch).encode())
        record = self.read(session_id)
        last = record.last.index if record.last else 0
        if epoch not in self._seals(session_id):
            self._create(self._path(session_id, "seals", f"{epoch:012d}-after-{last:06d}.json"),
                         _dumps({"epoch": epoch, "after": last, "at": _now()}))
        self._verify(session_id, epoch, "claim")
        logger.debug("session %s: epoch %d took over after process %d", session_id, epoch, last)
        return record

    # -- creating and updating -----------------------------------------------------------
    def create(self, session_id: str, prompt: str, *, epoch: int = 0,
               meta: dict[str, Any] | None = None) -> SessionRecord:
        """Record a new session (status ``running``, nothing run yet).

        Raises
        ------
        SessionExists
            A session with this id is already recorded (never overwritten).
        """
        epoch = _check_epoch(epoch)
        now = _now()
        doc = {**(meta or {}), "format": FORMAT, "id": session_id, "prompt": prompt,
               "created": now, "created_at": _iso(now), "updated": now, "status": "running",
               "epoch": epoch, "flow_code": "", "position": "start", "finished": False,
               "justification": None, "processes": 0}
        if not self._create(self._path(session_id, "meta.json"), _dumps(doc)):
            raise SessionExists(f"session {session_id!r} already exists in {self.url}")
        self._write(self._path(session_id, "flow_code"), b"")
        self.claim(session_id, epoch)
        logger.info("session %s created in %s", session_id, self.url)
        return self.read(session_id)

    def _update_meta(self, session_id: str, epoch: int, **changes: Any) -> None:
        path = self._path(session_id, "meta.json")
        damaged: list[tuple[str, str]] = []
        meta = self._read_json(path, damaged) or {"format": FORMAT, "id": session_id}
        meta.update(changes)
        meta["epoch"] = max(int(meta.get("epoch") or 0), epoch)
        meta["updated"] = _now()
        self._write(path, _dumps(meta))
        if "flow_code" in changes:
            self._write(self._path(session_id, "flow_code"), str(changes["flow_code"]).encode())

    def append_process(self, session_id: str, epoch: int, state: SessionState,
                       payload: dict[str, Any] | None = None, *, started: float | None = None,
                       ended: float | None = None) -> ProcessSnapshot:
        """Record the process that brought the session to ``state`` (write-once).

        The snapshot goes to ``processes/<state.processes_run:04d>-<position>.json``.
        Writing the same content again is a no-op (a retried write).

        Raises
        ------
        LeaseLost
            A newer epoch holds the session (the write is refused, or void).
        SnapshotConflict
            Different content is already recorded there by this epoch, or the
            previous process is not recorded, or ``state`` does not extend it.
        """
        epoch = _check_epoch(epoch)
        if state.process is None or state.schedule is None or state.processes_run < 1:
            raise ValueError(f"session {session_id}: no process has run in state "
                             f"{state.describe()}; nothing to record")
        self._require(session_id)
        index = state.processes_run
        position = f"S{int(state.schedule)}P{int(state.process)}"
        snap = ProcessSnapshot(index, position, PROCESSES[(state.schedule, state.process)].name,
                               state.flow_code, epoch, dict(payload or {}), started, ended,
                               _now())
        doing = f"writing {snap.filename}"
        self._fence(session_id, epoch, doing)
        folder = self._path(session_id, "processes")
        names = self._ls(folder)
        previous: ProcessSnapshot | None = None
        if index > 1:
            mine = self._written.get(session_id)
            if (mine is not None and mine.index == index - 1 and mine.epoch == epoch
                    and mine.filename in names):
                # Written by this epoch, which the fence just found current: not void.
                present, previous = True, mine
            else:
                present, previous = self._find_snapshot(session_id, index - 1, names)
            if not present:
                raise SnapshotConflict(
                    f"session {session_id}: process {index - 1} is not recorded, so "
                    f"{snap.filename} cannot follow it; read the record and resume after "
                    "its last process")
            if previous is not None and not state.flow_code.startswith(previous.flow_code):
                raise SnapshotConflict(
                    f"session {session_id}: {snap.filename} flow code {state.flow_code!r} "
                    f"does not extend the recorded {previous.filename} "
                    f"({previous.flow_code!r})")
        data = _dumps(snap.to_dict())
        path = posixpath.join(folder, snap.filename)
        for attempt in range(2):
            for name, existing in self._all_at(session_id, index, None if attempt else names):
                if (existing is not None and name == snap.filename
                        and existing.same_content(snap)):
                    self._verify(session_id, epoch, doing, index)
                    return existing  # a retried write
                self._clear(session_id, epoch, snap, name, existing, doing)
            if self._create(path, data):
                break
            if attempt:  # lost the race for this name twice: report what is there
                raise SnapshotConflict(f"session {session_id}: {snap.filename} keeps being "
                                       "written by another driver")
        self._verify(session_id, epoch, doing, index)
        self._written[session_id] = snap
        self._update_meta(session_id, epoch, flow_code=state.flow_code, position=position,
                          processes=index)
        return snap

    def _clear(self, session_id: str, epoch: int, snap: ProcessSnapshot, name: str,
               existing: ProcessSnapshot | None, doing: str) -> None:
        """Make room at ``snap``'s index, or refuse: a snapshot already there is removed
        only when damaged or written by a lower epoch this epoch's takeover voided."""
        if existing is not None:
            if existing.epoch > epoch:
                raise self._lost(session_id, epoch, existing.epoch, doing, kept=False)
            sealed = self._seals(session_id).get(epoch)
            if existing.epoch == epoch or (sealed is not None and sealed >= existing.index):
                raise SnapshotConflict(
                    f"session {session_id}: {name} is already recorded (epoch "
                    f"{existing.epoch}, flow code {existing.flow_code!r}); refusing to "
                    f"overwrite it with {snap.filename} ({snap.flow_code!r}); a resume "
                    "continues after the last recorded process")
        logger.warning("session %s: removing %s (%s) before writing %s", session_id, name,
                       "damaged" if existing is None else
                       f"void write of superseded epoch {existing.epoch}", snap.filename)
        try:
            self.fs.rm_file(self._path(session_id, "processes", name))
        except FileNotFoundError:
            pass

    def _all_at(self, session_id: str, index: int, names: list[str] | None = None
                ) -> list[tuple[str, ProcessSnapshot | None]]:
        """Every snapshot file at ``index``: (name, snapshot or None when damaged)."""
        folder = self._path(session_id, "processes")
        out: list[tuple[str, ProcessSnapshot | None]] = []
        for name in self._ls(folder) if names is None else names:
            m = _SNAPSHOT.match(name)
            if m and int(m.group(1)) == index:
                data = self._read_json(posixpath.join(folder, name))
                try:
                    out.append((name, ProcessSnapshot.from_dict(data)))
                except (TypeError, KeyError, ValueError, AttributeError):
                    out.append((name, None))
        return out

    def _find_snapshot(self, session_id: str, index: int, names: list[str] | None = None
                       ) -> tuple[bool, ProcessSnapshot | None]:
        """(present, snapshot) at ``index``: (False, None) absent or void; (True, None)
        damaged; (True, snapshot) valid."""
        found = self._all_at(session_id, index, names)
        if not found:
            return False, None
        seals = self._seals(session_id)
        valid = [snap for _, snap in found if snap is not None and not any(
            e > snap.epoch and after < snap.index for e, after in seals.items())]
        if valid:
            return True, max(valid, key=lambda snap: snap.epoch)
        if any(snap is None for _, snap in found):
            return True, None
        return False, None

    def update(self, session_id: str, epoch: int, *, state: SessionState | None = None,
               status: str | None = None, **fields: Any) -> None:
        """Record the state (a trailing ``X``, the finish) and/or the status.

        ``status`` is one of :data:`STATUSES`; a finished ``state`` sets ``done``.
        Extra ``fields`` are kept in ``meta.json``.
        """
        epoch = _check_epoch(epoch)
        self._require(session_id)
        if status is not None and status not in STATUSES:
            raise ValueError(f"session status {status!r} is not one of {', '.join(STATUSES)}")
        self._fence(session_id, epoch, "updating meta.json")
        changes: dict[str, Any] = dict(fields)
        if state is not None:
            self._check_recorded(session_id, epoch, state)
            changes.update(flow_code=state.flow_code, position=state.position,
                           finished=state.finished, justification=state.justification)
            if state.finished:
                status = "done"
        if status is not None:
            changes["status"] = status
        self._update_meta(session_id, epoch, **changes)
        self._verify(session_id, epoch, "updating meta.json")

    def _check_recorded(self, session_id: str, epoch: int, state: SessionState) -> None:
        """``state`` must be the recorded one (plus error marks or the finish)."""
        index = state.processes_run
        mine = self._written.get(session_id)
        recorded: str | None
        if index == 0:
            recorded = ""
        elif mine is not None and mine.index == index and mine.epoch == epoch:
            recorded = mine.flow_code
        else:
            _, snap = self._find_snapshot(session_id, index)
            recorded = snap.flow_code if snap is not None else None
        if recorded is None or not state.flow_code.startswith(recorded):
            raise SnapshotConflict(
                f"session {session_id}: state {state.flow_code!r} does not match the "
                f"recorded process {index} ({recorded!r}); record each process with "
                "append_process first")

    def _append_item(self, session_id: str, epoch: int, folder: str,
                     item: dict[str, Any]) -> dict[str, Any]:
        epoch = _check_epoch(epoch)
        self._require(session_id)
        self._fence(session_id, epoch, f"writing {folder}")
        now = _now()
        doc = {**item, "epoch": epoch, "time": now}
        name = f"{time.time_ns():020d}-{epoch:06d}-{secrets.token_hex(3)}.json"
        self._write(self._path(session_id, folder, name), _dumps(doc))
        self._verify(session_id, epoch, f"writing {folder}")
        return doc

    def add_note(self, session_id: str, epoch: int, text: str, *, source: str = "orchestrator",
                 index: int | None = None, **extra: Any) -> dict[str, Any]:
        """Record a note (who wrote it: ``source``; at which process: ``index``)."""
        return self._append_item(session_id, epoch, "notes",
                                 {**extra, "text": text, "source": source, "index": index})

    def add_action(self, session_id: str, epoch: int, action: dict[str, Any], *,
                   index: int | None = None) -> dict[str, Any]:
        """Record an action taken (file written, command run, plan fragment job, ...)."""
        return self._append_item(session_id, epoch, "actions", {**action, "index": index})

    def set_resources(self, session_id: str, epoch: int, stats: dict[str, Any]) -> None:
        """Replace the resource statistics (memory, disk, tokens, time split)."""
        epoch = _check_epoch(epoch)
        self._require(session_id)
        self._fence(session_id, epoch, "writing resources.json")
        self._write(self._path(session_id, "resources.json"),
                    _dumps({**stats, "epoch": epoch, "time": _now()}))
        self._verify(session_id, epoch, "writing resources.json")

    # -- consultations -------------------------------------------------------------------
    def ask(self, session_id: str, epoch: int, index: int, position: str, question: str, *,
            timeout: float | None = None, deadline: float | None = None) -> Consultation:
        """Record a question asked during process ``index`` at ``position``.

        Asking again at the same process (a resumed driver) returns the recorded
        consultation with its original deadline.  ``deadline`` is wall-clock
        seconds since the epoch (default: now + ``timeout``, whose default is
        ``obdask.sessions.consultation-timeout``).
        """
        epoch = _check_epoch(epoch)
        if timeout is None and deadline is None:
            from obdask import config

            timeout = config.get_seconds("sessions.consultation-timeout")
        self._require(session_id)
        cid = f"{int(index):04d}-{position}"
        path = self._path(session_id, "consultations", f"{cid}.json")
        existing = self._read_json(path)
        if existing:
            return Consultation.from_dict(existing)
        self._fence(session_id, epoch, f"asking {cid}")
        now = _now()
        c = Consultation(cid, int(index), position, question, now,
                         now + float(timeout or 0) if deadline is None else float(deadline),
                         epoch)
        if not self._create(path, _dumps(c.to_dict())):
            return Consultation.from_dict(self._read_json(path))
        self._verify(session_id, epoch, f"asking {cid}")
        self._update_meta(session_id, epoch, status="waiting")
        return c

    def settle(self, session_id: str, epoch: int, consultation_id: str, answer: str | None, *,
               timed_out: bool = False, substituted: bool = False,
               source: str | None = None) -> Consultation:
        """Record how a question was settled: a human ``answer``, or a timeout
        (``timed_out=True``) with a model answer ``substituted``.

        Raises
        ------
        SessionError
            The session asked no such question, or it is already settled differently.
        """
        epoch = _check_epoch(epoch)
        self._require(session_id)
        path = self._path(session_id, "consultations", f"{consultation_id}.json")
        data = self._read_json(path)
        if not data:
            raise SessionError(f"session {session_id} asked no question {consultation_id!r}")
        c = Consultation.from_dict(data)
        settled = Consultation(c.id, c.index, c.position, c.question, c.asked, c.deadline,
                               c.epoch, answer, _now(), timed_out, substituted,
                               source or ("model" if substituted else "human"))
        if not c.open:
            if (c.answer, c.timed_out, c.substituted) == (answer, timed_out, substituted):
                return c
            raise SessionError(f"session {session_id}: question {consultation_id} was already "
                               f"settled ({'timed out' if c.timed_out else 'answered'})")
        self._fence(session_id, epoch, f"settling {consultation_id}")
        self._write(path, _dumps(settled.to_dict()))
        self._verify(session_id, epoch, f"settling {consultation_id}")
        self._update_meta(session_id, epoch, status="running")
        return settled

    # -- model calls and tokens ----------------------------------------------------------
    def begin_call(self, session_id: str, epoch: int, index: int, position: str) -> CallTicket:
        """Durably mark "the model call of process ``index`` starts now".

        A second mark for the same process (the first call was cut off by a crash)
        gives a ticket with ``respent`` True.

        Raises
        ------
        SnapshotConflict
            Process ``index`` is already recorded: its call is never made again.
        """
        epoch = _check_epoch(epoch)
        self._require(session_id)
        _, done = self._find_snapshot(session_id, index)
        if done is not None:
            raise SnapshotConflict(
                f"session {session_id}: process {index} ({done.position}) is already recorded "
                f"in {done.filename}; its model call is never made again")
        self._fence(session_id, epoch, f"starting the call of process {index}")
        folder = self._path(session_id, "calls")
        prefix = f"{int(index):04d}-{position}-"
        attempt = 1 + sum(1 for n in self._ls(folder) if n.startswith(prefix))
        while True:
            ticket = CallTicket(int(index), position, attempt, epoch)
            if self._create(posixpath.join(folder, f"{ticket.key}.json"),
                            _dumps({"index": index, "position": position, "attempt": attempt,
                                    "epoch": epoch, "time": _now()})):
                break
            attempt += 1
        self._verify(session_id, epoch, f"starting the call of process {index}")
        if ticket.respent:
            logger.info("session %s: the call of process %d is made again (attempt %d, "
                        "re-spent)", session_id, index, attempt)
        return ticket

    def record_tokens(self, session_id: str, epoch: int, ticket: CallTicket, *,
                      model: str | None, input_tokens: int, output_tokens: int,
                      role: str | None = None, **extra: Any) -> dict[str, Any]:
        """Record the token usage of the call ``ticket`` (labelled re-spent if it was)."""
        epoch = _check_epoch(epoch)
        self._require(session_id)
        self._fence(session_id, epoch, f"recording tokens of {ticket.key}")
        doc = {**extra, "index": ticket.index, "position": ticket.position,
               "attempt": ticket.attempt, "respent": ticket.respent, "model": model,
               "role": role, "input_tokens": int(input_tokens),
               "output_tokens": int(output_tokens), "epoch": epoch, "time": _now()}
        self._write(self._path(session_id, "tokens", f"{ticket.key}.json"), _dumps(doc))
        self._verify(session_id, epoch, f"recording tokens of {ticket.key}")
        return doc

    # -- reading -------------------------------------------------------------------------
    def exists(self, session_id: str) -> bool:
        """Whether a session with this id is recorded."""
        return self._exists(session_id)

    def _items(self, session_id: str, folder: str,
               damaged: list[tuple[str, str]]) -> Iterator[dict[str, Any]]:
        base = self._path(session_id, folder)
        for name in self._ls(base):
            if name.endswith(".json"):
                data = self._read_json(posixpath.join(base, name), damaged)
                if isinstance(data, dict):
                    yield data

    def read(self, session_id: str, *, full: bool = True) -> SessionRecord:
        """The session's record; damaged files are reported in ``damaged`` and skipped.

        ``full=False`` reads only what the state needs (meta, the last valid
        snapshot, consultations): ``snapshots`` then holds only the last one and
        notes, actions, resources, calls and tokens are left empty.

        Raises
        ------
        UnknownSession
        """
        damaged: list[tuple[str, str]] = []
        meta_path = self._path(session_id, "meta.json")
        raw = self._read_bytes(meta_path)
        if raw is None:
            raise UnknownSession(f"no session {session_id!r} in {self.url}")
        meta = self._parse(meta_path, raw, damaged)
        meta = meta if isinstance(meta, dict) else {}
        seals = self._seals(session_id)
        snapshots: dict[int, ProcessSnapshot] = {}
        voided: list[str] = []
        folder = self._path(session_id, "processes")
        names = [n for n in self._ls(folder) if _SNAPSHOT.match(n)]
        if not full:  # newest first, stop at the first valid one
            names.sort(key=lambda n: int(n.split("-", 1)[0]), reverse=True)
        for name in names:
            if not full and snapshots:
                break
            data = self._read_json(posixpath.join(folder, name), damaged)
            if data is None:
                continue
            try:
                snap = ProcessSnapshot.from_dict(data)
                if snap.filename != name:
                    raise ValueError(f"it describes {snap.filename}")
                SessionState.from_flow_code(snap.flow_code)
            except (TypeError, KeyError, ValueError, FlowCodeError) as exc:
                where = self._where(posixpath.join(folder, name))
                logger.warning("session store: skipping %s: damaged (%s)", where, exc)
                damaged.append((where, f"damaged ({exc})"))
                continue
            if any(e > snap.epoch and after < snap.index for e, after in seals.items()):
                voided.append(name)
                continue
            if snap.index not in snapshots or snap.epoch > snapshots[snap.index].epoch:
                snapshots[snap.index] = snap
        ordered = [snapshots[i] for i in sorted(snapshots)]
        state = SessionState()
        if ordered:
            state = SessionState.from_flow_code(ordered[-1].flow_code)
        recorded = meta.get("flow_code")
        if isinstance(recorded, str) and recorded.startswith(state.flow_code):
            try:
                longer = SessionState.from_flow_code(recorded)
            except FlowCodeError as exc:
                damaged.append((self._where(meta_path), f"flow code: {exc}"))
            else:
                if longer.processes_run == state.processes_run:
                    state = longer  # a trailing X recorded after the last snapshot
        if meta.get("finished") and not state.finished:
            try:
                state = state.apply(Move.finish(str(meta.get("justification") or "")))
            except ValueError as exc:
                damaged.append((self._where(meta_path), f"finish: {exc}"))
        resources = (self._read_json(self._path(session_id, "resources.json"), damaged)
                     if full else None)
        consultations = []
        for data in self._items(session_id, "consultations", damaged):
            try:
                consultations.append(Consultation.from_dict(data))
            except (TypeError, KeyError, ValueError) as exc:
                damaged.append((f"consultation {data.get('id')}", f"damaged ({exc})"))
        calls = []
        for data in self._items(session_id, "calls", damaged) if full else ():
            try:
                calls.append(CallTicket(int(data["index"]), str(data["position"]),
                                        int(data["attempt"]), int(data["epoch"])))
            except (TypeError, KeyError, ValueError) as exc:
                damaged.append((f"call {data}", f"damaged ({exc})"))
        stored_status = str(meta.get("status") or "running")
        return SessionRecord(
            id=session_id, prompt=meta.get("prompt"), created=meta.get("created"),
            updated=meta.get("updated"), stored_status=stored_status,
            epoch=max(self.highest_epoch(session_id), int(meta.get("epoch") or 0)),
            state=state, snapshots=ordered,
            notes=list(self._items(session_id, "notes", damaged)) if full else [],
            actions=list(self._items(session_id, "actions", damaged)) if full else [],
            resources=resources if isinstance(resources, dict) else {},
            consultations=sorted(consultations, key=lambda c: c.id),
            calls=sorted(calls, key=lambda c: c.key),
            tokens=list(self._items(session_id, "tokens", damaged)) if full else [],
            meta=meta, damaged=damaged, voided=voided)

    def list_sessions(self, live: Collection[str] | None = None) -> list[SessionSummary]:
        """Every recorded session, oldest first, with its state.

        ``live``: ids of sessions whose driver is known to run (e.g. from the
        shared state); a running or waiting session not in it shows as
        ``interrupted``.  None: the stored status as is.
        """
        out = []
        for name in self._ls(self.root):
            if not _ID.match(name):
                continue
            try:
                summary = self.read(name, full=False).summary()
            except UnknownSession:
                continue  # a folder without meta.json: not a session
            if (live is not None and summary.status in ("running", "waiting")
                    and name not in live):
                summary = SessionSummary(summary.id, "interrupted", summary.flow_code,
                                         summary.position, summary.prompt, summary.created,
                                         summary.updated, summary.epoch)
            out.append(summary)
        return sorted(out, key=lambda s: (s.created or 0, s.id))


def open_store(url: str | None = None, workspace: str | None = None) -> SessionStore:
    """The session store at ``url``, else ``obdask.sessions.store``, else
    ``<workspace>/.obdask/sessions`` (``workspace`` defaults to the current folder).

    fsspec options come from ``obdask.storage-options`` for the URL's protocol.
    """
    from obdask import config

    url = config.get("sessions.store", url)
    if url is None:
        url = os.path.join(os.path.abspath(workspace or os.getcwd()), ".obdask", "sessions")
    return SessionStore(url, config.storage_options(url))
