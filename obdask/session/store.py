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

import logging
import os
import posixpath
import secrets
import time
from typing import Any

from obdask.exceptions import (
    LeaseLost,
    SessionError,
    SessionExists,
    SnapshotConflict,
)
from obdask.session.model import PROCESSES, SessionState
from obdask.session.reader import RecordReader
from obdask.session.record import (
    FORMAT,
    STATUSES,
    CallTicket,
    Consultation,
    ProcessSnapshot,
    SessionRecord,
    SessionSummary,
    check_epoch,
    dumps,
    iso,
    wall_time,
)

logger = logging.getLogger(__name__)

__all__ = [
    "open_store",
    "CallTicket",
    "Consultation",
    "LeaseLost",
    "ProcessSnapshot",
    "SessionRecord",
    "SessionStore",
    "SessionSummary",
    "STATUSES",
]


class SessionStore(RecordReader):
    """Session records under an fsspec URL (``memory://``, a local path, ``s3://``).

    Parameters
    ----------
    url
        Where records live; one folder per session id.
    storage_options
        fsspec options for the URL's protocol (e.g. ``obdask.config.storage_options(url)``).
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        super().__init__(url, storage_options)
        self._written: dict[str, ProcessSnapshot] = {}  # last snapshot this store wrote

    # -- taking over ---------------------------------------------------------------------
    def _fence(self, session_id: str, epoch: int, doing: str) -> None:
        """Refuse a lower epoch; register (claim) a higher one."""
        epoch = check_epoch(epoch)
        highest = self.highest_epoch(session_id)
        if epoch < highest:
            raise self._lost(session_id, epoch, highest, doing, kept=False)
        if epoch > highest:
            self.claim(session_id, epoch)

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
        epoch = check_epoch(epoch)
        self._require(session_id)
        highest = self.highest_epoch(session_id)
        if epoch < highest:
            raise self._lost(session_id, epoch, highest, "claim", kept=False)
        self._create(self._path(session_id, "epochs", f"{epoch:012d}"), str(epoch).encode())
        record = self.read(session_id)
        last = record.last.index if record.last else 0
        if epoch not in self._seals(session_id):
            self._create(self._path(session_id, "seals", f"{epoch:012d}-after-{last:06d}.json"),
                         dumps({"epoch": epoch, "after": last, "at": wall_time()}))
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
        epoch = check_epoch(epoch)
        now = wall_time()
        doc = {**(meta or {}), "format": FORMAT, "id": session_id, "prompt": prompt,
               "created": now, "created_at": iso(now), "updated": now, "status": "running",
               "epoch": epoch, "flow_code": "", "position": "start", "finished": False,
               "justification": None, "processes": 0}
        if not self._create(self._path(session_id, "meta.json"), dumps(doc)):
            raise SessionExists(f"session {session_id!r} already exists in {self.url}")
        self._write(self._path(session_id, "flow_code"), b"")
        self.claim(session_id, epoch)
        logger.info("session %s created in %s", session_id, self.url)
        return self.read(session_id)

    def _update_meta(self, session_id: str, epoch: int, **changes: Any) -> bool:
        """Apply ``changes`` to ``meta.json``; False (nothing written) when a newer
        driver has written it since this one passed its fence.

        Writing then would put this driver's status over the newer one's (a stale
        ``interrupted`` over ``running``). What the caller wrote before (a snapshot,
        a consultation) stays as the fencing rules say; its meta is the newer driver's.
        """
        path = self._path(session_id, "meta.json")
        damaged: list[tuple[str, str]] = []
        meta = self._read_json(path, damaged) or {"format": FORMAT, "id": session_id}
        recorded = int(meta.get("epoch") or 0)
        if recorded > epoch:
            logger.debug("session %s: meta.json is epoch %d's; epoch %d leaves it",
                         session_id, recorded, epoch)
            return False
        meta.update(changes)
        meta["epoch"] = epoch  # recorded <= epoch here
        meta["updated"] = wall_time()
        self._write(path, dumps(meta))
        if "flow_code" in changes:
            # a mirror for people (meta.json and the snapshots hold the flow code)
            self._write(self._path(session_id, "flow_code"), str(changes["flow_code"]).encode(),
                        durable=False)
        return True

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
        epoch = check_epoch(epoch)
        if state.process is None or state.schedule is None or state.processes_run < 1:
            raise ValueError(f"session {session_id}: no process has run in state "
                             f"{state.describe()}; nothing to record")
        self._require(session_id)
        index = state.processes_run
        position = f"S{int(state.schedule)}P{int(state.process)}"
        snap = ProcessSnapshot(index, position, PROCESSES[(state.schedule, state.process)].name,
                               state.flow_code, epoch, dict(payload or {}), started, ended,
                               wall_time())
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
        data = dumps(snap.to_dict())
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
    def update(self, session_id: str, epoch: int, *, state: SessionState | None = None,
               status: str | None = None, **fields: Any) -> None:
        """Record the state (a trailing ``X``, the finish) and/or the status.

        ``status`` is one of :data:`STATUSES`; a finished ``state`` sets ``done``.
        Extra ``fields`` are kept in ``meta.json``.
        """
        epoch = check_epoch(epoch)
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
        if not self._update_meta(session_id, epoch, **changes):
            highest = self.highest_epoch(session_id)
            raise self._lost(session_id, epoch, highest, "updating meta.json", kept=False)
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
        epoch = check_epoch(epoch)
        self._require(session_id)
        self._fence(session_id, epoch, f"writing {folder}")
        now = wall_time()
        doc = {**item, "epoch": epoch, "time": now}
        name = f"{time.time_ns():020d}-{epoch:06d}-{secrets.token_hex(3)}.json"
        self._write(self._path(session_id, folder, name), dumps(doc))
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
        epoch = check_epoch(epoch)
        self._require(session_id)
        self._fence(session_id, epoch, "writing resources.json")
        self._write(self._path(session_id, "resources.json"),
                    dumps({**stats, "epoch": epoch, "time": wall_time()}))
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
        epoch = check_epoch(epoch)
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
        now = wall_time()
        c = Consultation(cid, int(index), position, question, now,
                         now + float(timeout or 0) if deadline is None else float(deadline),
                         epoch)
        if not self._create(path, dumps(c.to_dict())):
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
        epoch = check_epoch(epoch)
        self._require(session_id)
        path = self._path(session_id, "consultations", f"{consultation_id}.json")
        data = self._read_json(path)
        if not data:
            raise SessionError(f"session {session_id} asked no question {consultation_id!r}")
        c = Consultation.from_dict(data)
        settled = Consultation(c.id, c.index, c.position, c.question, c.asked, c.deadline,
                               c.epoch, answer, wall_time(), timed_out, substituted,
                               source or ("model" if substituted else "human"))
        if not c.open:
            if (c.answer, c.timed_out, c.substituted) == (answer, timed_out, substituted):
                return c
            raise SessionError(f"session {session_id}: question {consultation_id} was already "
                               f"settled ({'timed out' if c.timed_out else 'answered'})")
        self._fence(session_id, epoch, f"settling {consultation_id}")
        self._write(path, dumps(settled.to_dict()))
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
        epoch = check_epoch(epoch)
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
                            dumps({"index": index, "position": position, "attempt": attempt,
                                    "epoch": epoch, "time": wall_time()})):
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
        epoch = check_epoch(epoch)
        self._require(session_id)
        self._fence(session_id, epoch, f"recording tokens of {ticket.key}")
        doc = {**extra, "index": ticket.index, "position": ticket.position,
               "attempt": ticket.attempt, "respent": ticket.respent, "model": model,
               "role": role, "input_tokens": int(input_tokens),
               "output_tokens": int(output_tokens), "epoch": epoch, "time": wall_time()}
        self._write(self._path(session_id, "tokens", f"{ticket.key}.json"), dumps(doc))
        self._verify(session_id, epoch, f"recording tokens of {ticket.key}")
        return doc


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
