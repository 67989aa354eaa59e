"""Scheduler extension for orchestration sessions: leases, shared state, events, answers.

One entry per session id (at most ``obdask.sessions.max-tracked``, oldest finished
ones dropped first) holds:

* the **lease**: which driver advances the session (``holder``: the worker address
  or client id, ``key``: the driver task) and the monotonic **epoch** (fencing
  token) handed to it.  A lease is released when its driver task leaves
  ``processing``, its worker is removed or its client goes; the session then shows
  as ``interrupted`` until a driver takes it again;
* the **shared state** any client reads at once: status, flow code, position,
  current process, waiting-for-human question and deadline, tokens;
* a human **answer** for the waiting driver, and a **cancel** flag.

Handlers (``client.scheduler.<op>(...)``; refusals are returned as
``{"ok": False, "error": ...}`` so the caller raises a clear exception):

``obdask_session_acquire(session, holder, key=None, at_least=0, takeover=False)``
``obdask_session_release(session, epoch)``
``obdask_session_update(session, epoch, state=None, events=None)`` (stale epoch: refused)
``obdask_session_get(session)``, ``obdask_session_list()``
``obdask_session_answer(session, answer)`` (refused when nothing was asked)
``obdask_session_wait_answer(session, consultation, timeout)`` (long poll, for drivers)
``obdask_session_cancel(session)``, ``obdask_session_publish(session, events)``

Events go to the ``obdask.sessions`` topic with a per-session ``seq`` and the
scheduler's ``time`` (:mod:`obdask.session.events`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any

import dask

from obdask.redact import redact_obj
from obdask.session.events import TOPIC

logger = logging.getLogger(__name__)

LIVE = ("running", "waiting", "submitted")
ENDED = ("done", "failed", "cancelled")
DEFAULT_MAX = 1000


def _entry(session: str) -> dict[str, Any]:
    return {"id": session, "state": "interrupted", "flow_code": "", "position": "start",
            "process": None, "epoch": 0, "holder": None, "key": None, "question": None,
            "tokens": {"input": 0, "output": 0}, "processes": 0, "prompt": None,
            "updated": time.time(), "seq": 0, "cancel": False, "answers": {}, "pending": None,
            "superseded": []}


class SessionsExtension:
    """Leases, shared state and events of sessions (see the module docstring)."""

    def __init__(self, scheduler: Any, max_sessions: int | None = None) -> None:
        self.scheduler = scheduler
        if max_sessions is None:
            max_sessions = int(dask.config.get("obdask.sessions.max-tracked", DEFAULT_MAX)
                               or DEFAULT_MAX)
        self.max_sessions = max(1, max_sessions)
        self.sessions: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.by_key: dict[str, str] = {}
        self._wake: dict[str, asyncio.Event] = {}

    @property
    def handlers(self) -> dict[str, Any]:
        return {
            "obdask_session_register": self.register,
            "obdask_session_acquire": self.acquire,
            "obdask_session_release": self.release,
            "obdask_session_update": self.update,
            "obdask_session_publish": self.publish_handler,
            "obdask_session_get": self.get,
            "obdask_session_list": self.list,
            "obdask_session_answer": self.answer,
            "obdask_session_wait_answer": self.wait_answer,
            "obdask_session_cancel": self.cancel,
        }

    # -- bookkeeping ---------------------------------------------------------------------
    def _get(self, session: str, create: bool = True) -> dict[str, Any] | None:
        entry = self.sessions.get(session)
        if entry is None and create:
            entry = self.sessions[session] = _entry(session)
            self._trim()
        return entry

    def _trim(self) -> None:
        while len(self.sessions) > self.max_sessions:
            victim = next((sid for sid, e in self.sessions.items() if e["state"] in ENDED),
                          None)
            if victim is None:
                victim = next((sid for sid, e in self.sessions.items() if e["holder"] is None),
                              None)
            if victim is None:
                return
            self._drop(victim)

    def _drop(self, session: str) -> None:
        entry = self.sessions.pop(session, None)
        if entry and entry["key"]:
            self.by_key.pop(entry["key"], None)
        self._wake.pop(session, None)

    def _publish(self, entry: dict[str, Any], events: list[dict[str, Any]]) -> None:
        for event in events:
            entry["seq"] += 1
            msg = {**event, "session": entry["id"], "seq": entry["seq"], "time": time.time()}
            self.scheduler.log_event(TOPIC, redact_obj(msg))  # events outlive the session

    def _wake_up(self, session: str) -> None:
        event = self._wake.pop(session, None)
        if event is not None:
            event.set()

    @staticmethod
    def _public(entry: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in entry.items() if k not in ("answers", "superseded")}
        out["live"] = entry["holder"] is not None
        return out

    # -- leases --------------------------------------------------------------------------
    def register(self, session: str, key: str, prompt: str | None = None) -> dict[str, Any]:
        """A driver task ``key`` was submitted: the session shows as ``submitted`` (not
        interrupted) until the driver takes the lease, or ``interrupted`` if it never does."""
        entry = self._get(session)
        if entry["holder"] is None:
            entry["state"] = "submitted"
        entry["pending"] = key
        if prompt is not None:
            entry["prompt"] = prompt
        self.by_key[key] = session
        self.sessions.move_to_end(session)
        return {"ok": True}

    def acquire(self, session: str, holder: str, key: str | None = None, at_least: int = 0,
                takeover: bool = False, prompt: str | None = None) -> dict[str, Any]:
        """Hand out the next epoch to ``holder``; refused while another driver holds it
        unless ``takeover`` (that driver's next write is then refused: LeaseLost)."""
        entry = self._get(session)
        if entry["holder"] is not None and not takeover:
            return {"ok": False, "held": True,
                    "error": f"session {session} is driven by epoch {entry['epoch']} on "
                             f"{entry['holder']}; resume with takeover to supersede it"}
        if entry["key"]:
            self.by_key.pop(entry["key"], None)
        if entry["pending"] == key:
            entry["pending"] = None
        entry["epoch"] = max(int(entry["epoch"]), int(at_least or 0)) + 1
        entry.update(holder=holder, key=key, state="running", updated=time.time())
        if prompt is not None:
            entry["prompt"] = prompt
        if key:
            self.by_key[key] = session
        self.sessions.move_to_end(session)
        return {"ok": True, "epoch": entry["epoch"]}

    def release(self, session: str, epoch: int | None = None) -> dict[str, Any]:
        """Release the lease (only the holder of ``epoch`` may; None: whoever holds it)."""
        entry = self._get(session, create=False)
        if entry is None or (epoch is not None and epoch != entry["epoch"]):
            return {"ok": False}
        self._release(entry, "released")
        return {"ok": True}

    def _rerun(self, key: str | None) -> bool:
        """Whether Dask will run the driver task ``key`` again (its worker was lost)."""
        ts = self.scheduler.tasks.get(key) if key else None
        return ts is not None and ts.state in ("released", "waiting", "no-worker",
                                               "queued", "processing")

    def _release(self, entry: dict[str, Any], why: str) -> None:
        if entry["holder"] is None:
            return
        key = entry["key"]
        if key:
            self.by_key.pop(key, None)
        entry["holder"] = entry["key"] = None
        if entry["state"] in LIVE:
            if self._rerun(key):  # Dask runs the driver again: it will take the lease
                entry["state"], entry["pending"] = "submitted", key
                self.by_key[key] = entry["id"]
                self._publish(entry, [{"kind": "driver-lost", "epoch": entry["epoch"],
                                       "why": why}])
            else:
                entry["state"] = "interrupted"
                self._publish(entry, [{"kind": "interrupted", "epoch": entry["epoch"],
                                       "why": why}])
        self._wake_up(entry["id"])

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        session = self.by_key.get(key) if isinstance(key, str) else None
        entry = self.sessions.get(session) if session is not None else None
        if entry is None or finish == "processing":
            return
        if entry["key"] == key and start == "processing":
            self._release(entry, f"driver task {finish}")
        elif entry["pending"] == key and finish in ("erred", "memory", "forgotten"):
            # the driver ended (or was given up) before taking the lease
            self.by_key.pop(key, None)
            entry["pending"] = None
            if entry["holder"] is None and entry["state"] == "submitted":
                entry["state"] = "interrupted"
                self._publish(entry, [{"kind": "interrupted", "epoch": entry["epoch"],
                                       "why": f"driver task {finish} before taking the lease"}])

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        for entry in list(self.sessions.values()):
            if entry["holder"] == worker:
                self._release(entry, f"worker {worker} removed")

    def remove_client(self, scheduler: Any, client: str) -> None:
        for entry in list(self.sessions.values()):
            if entry["holder"] == client:
                self._release(entry, f"client {client} removed")

    # -- state ---------------------------------------------------------------------------
    def _stale(self, entry: dict[str, Any], epoch: int) -> dict[str, Any] | None:
        if int(epoch) >= int(entry["epoch"]):
            return None
        if epoch not in entry["superseded"]:
            entry["superseded"].append(epoch)
            self._publish(entry, [{"kind": "driver-superseded", "epoch": epoch,
                                   "highest": entry["epoch"]}])
        return {"ok": False, "lost": True, "highest": entry["epoch"],
                "error": f"session {entry['id']}: epoch {epoch} was superseded by epoch "
                         f"{entry['epoch']} (another driver holds the session)"}

    def update(self, session: str, epoch: int, state: dict[str, Any] | None = None,
               events: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Set the shared state and publish events, for the driver holding ``epoch``."""
        entry = self._get(session)
        refused = self._stale(entry, epoch)
        if refused:
            return refused
        entry["epoch"] = max(entry["epoch"], int(epoch))
        for k, v in (state or {}).items():
            if k in ("state", "flow_code", "position", "process", "question", "tokens",
                     "processes", "prompt"):
                entry[k] = v
        entry["updated"] = time.time()
        if entry["state"] in ENDED and entry["holder"] is not None:
            if entry["key"]:
                self.by_key.pop(entry["key"], None)
            entry["holder"] = entry["key"] = None
        self._publish(entry, list(events or ()))
        return {"ok": True, "cancel": entry["cancel"]}

    def publish_handler(self, session: str, events: list[dict[str, Any]],
                        epoch: int | None = None) -> dict[str, Any]:
        """Publish events (``epoch`` given: only for the current driver)."""
        entry = self._get(session)
        if epoch is not None:
            refused = self._stale(entry, epoch)
            if refused:
                return refused
        self._publish(entry, list(events or ()))
        return {"ok": True}

    def get(self, session: str) -> dict[str, Any] | None:
        entry = self._get(session, create=False)
        return None if entry is None else self._public(entry)

    def list(self) -> list[dict[str, Any]]:
        return [self._public(e) for e in self.sessions.values()]

    # -- humans --------------------------------------------------------------------------
    def answer(self, session: str, answer: str) -> dict[str, Any]:
        """Keep a human answer for the waiting driver; refused when nothing was asked."""
        entry = self._get(session, create=False)
        if entry is None:
            return {"ok": False, "error": f"no live session {session!r} on this scheduler"}
        question = entry["question"]
        if not question:
            return {"ok": False, "error": f"session {session} asked nothing (state: "
                                          f"{entry['state']}, at {entry['position']})"}
        entry["answers"][question["id"]] = str(answer)
        self._wake_up(session)
        return {"ok": True, "consultation": question["id"]}

    async def wait_answer(self, session: str, consultation: str,
                          timeout: float) -> dict[str, Any]:
        """Wait up to ``timeout`` s for the answer to ``consultation`` (or a cancel)."""
        entry = self._get(session)
        deadline = time.monotonic() + max(0.0, float(timeout))
        while True:
            if consultation in entry["answers"]:
                return {"answer": entry["answers"][consultation], "cancel": entry["cancel"]}
            left = deadline - time.monotonic()
            if entry["cancel"] or left <= 0:
                return {"answer": None, "cancel": entry["cancel"]}
            event = self._wake.setdefault(session, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), left)
            except asyncio.TimeoutError:
                pass
            entry = self.sessions.get(session) or entry

    def cancel(self, session: str) -> dict[str, Any]:
        entry = self._get(session, create=False)
        if entry is None:
            return {"ok": False, "live": False}
        entry["cancel"] = True
        self._wake_up(session)
        return {"ok": True, "live": entry["holder"] is not None, "epoch": entry["epoch"]}
