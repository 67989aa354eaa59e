"""Reading session records back: one record, or every session with its state.

:class:`RecordReader` rebuilds a :class:`~obdask.session.record.SessionRecord` from the
files (the last valid snapshot's flow code, a trailing ``X`` or the finish from
``meta.json``), skipping void snapshots and reporting damaged files by name.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Collection, Iterator
from typing import Any

from obdask.exceptions import FlowCodeError, UnknownSession
from obdask.session.fencing import FencedFiles
from obdask.session.model import Move, SessionState
from obdask.session.record import (
    ID_RE,
    SNAPSHOT_RE,
    CallTicket,
    Consultation,
    ProcessSnapshot,
    SessionRecord,
    SessionSummary,
)

logger = logging.getLogger(__name__)

__all__ = ["RecordReader"]


class RecordReader(FencedFiles):
    """:class:`FencedFiles` plus reading records and listing sessions."""

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
        names = [n for n in self._ls(folder) if SNAPSHOT_RE.match(n)]
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
            if not ID_RE.match(name):
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

