"""``obdask.Session``: start, watch, answer, resume, show, list and cancel sessions.

A session runs on the cluster: :meth:`Session.start` records it in the store
(``obdask.sessions.store``), submits one driver task (:func:`obdask.session.task.drive`,
fire-and-forget) and returns at once.  The shared state lives in the scheduler extension
(:mod:`obdask.server.sessions`), the durable record in the store.  The methods take a
synchronous ``distributed.Client``; for an asynchronous one use the ``*_async`` methods
(``start_async``, ``resume_async``, ``state_async``, ``answer_async``, ``wait_async``).

>>> s = Session.start(client, "Add a --json flag")          # doctest: +SKIP
>>> s.wait()["flow_code"]                                    # doctest: +SKIP
'S1P123S2P123S3P123S4P123S5P123'
"""

from __future__ import annotations

import asyncio
import builtins
import datetime as dt
import os
import queue
import secrets
import time
from collections.abc import Callable
from typing import Any

from obdask.exceptions import SessionError, UnknownSession
from obdask.session.events import FINAL, TOPIC, format_event
from obdask.session.store import SessionStore, open_store

__all__ = ["Session", "new_session_id"]

ENDED = ("done", "failed", "cancelled", "interrupted")


def new_session_id() -> str:
    """``20261129-120000-3fa2c1``."""
    return f"{dt.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def _rpc(client: Any, op: str, **kwargs: Any) -> Any:
    return client.sync(getattr(client.scheduler, op), **kwargs)


def _install(client: Any) -> None:
    from obdask.server import install

    install(client)


class Session:
    """A handle on one session (by id).

    Parameters
    ----------
    session_id : str
    client : distributed.Client, optional
        Needed for the live state, answers, events and cancel; ``show`` works
        from the store alone.
    store : SessionStore or str, optional
        Default: :func:`~obdask.session.store.open_store` (``obdask.sessions.store``).
    """

    def __init__(self, session_id: str, client: Any = None,
                 store: SessionStore | str | None = None, workspace: str | None = None,
                 future: Any = None) -> None:
        self.id = session_id
        self.client = client
        self.store = store if isinstance(store, SessionStore) else open_store(store, workspace)
        self.future = future  # the driver task this handle submitted (None otherwise)
        # where the session's plan fragments run (None: the worker's current folder)
        self.workspace = os.path.abspath(workspace) if workspace else None

    def __repr__(self) -> str:
        return f"Session({self.id!r})"

    # -- starting ------------------------------------------------------------------------
    @classmethod
    def start(cls, client: Any, prompt: str, *, session_id: str | None = None,
              store: SessionStore | str | None = None, workspace: str | None = None,
              _crash: dict[str, Any] | None = None) -> Session:
        """Record a new session and submit its driver; returns at once.

        Raises
        ------
        SessionExists
            ``session_id`` is already recorded.
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise SessionError("a session needs a non-empty prompt")
        handle = cls(session_id or new_session_id(), client, store, workspace)
        handle.store.create(handle.id, prompt)
        handle._submit(crash=_crash)
        return handle

    @classmethod
    def resume(cls, client: Any, session_id: str, *, store: SessionStore | str | None = None,
               workspace: str | None = None, takeover: bool = False) -> Session:
        """Continue a session after its last recorded process (a new driver, a new epoch).

        ``takeover``: supersede a driver that still holds the session (its next
        write is refused and it stops with LeaseLost).

        Raises
        ------
        UnknownSession, SessionError
            Unknown id; the session finished; a live driver holds it (without takeover).
        """
        handle = cls(session_id, client, store, workspace)
        record = handle.store.read(session_id)
        if record.state.finished or record.stored_status in ("cancelled",):
            raise SessionError(f"session {session_id} is {record.status}; nothing to resume")
        record.check_resumable()  # SnapshotConflict: recorded processes this code differs from
        live = handle.live()
        if live and live.get("live") and not takeover:
            raise SessionError(f"session {session_id} is being driven (epoch {live['epoch']}); "
                               "resume --takeover to supersede that driver")
        handle._submit(takeover=takeover)
        return handle

    def _submit(self, **overrides: Any) -> None:
        from distributed import fire_and_forget

        from obdask.session.driver import Settings
        from obdask.session.task import drive

        _install(self.client)
        settings = Settings.from_config(self.store, **{"workspace": self.workspace,
                                                        **overrides})
        key = f"obdask-session-driver-{self.id}-{secrets.token_hex(4)}"
        prompt = self.store.read(self.id, full=False).prompt
        _rpc(self.client, "obdask_session_register", session=self.id, key=key, prompt=prompt)
        self.future = self.client.submit(drive, self.id, settings, key=key, pure=False)
        fire_and_forget(self.future)

    # -- asynchronous clients ------------------------------------------------------------
    @classmethod
    async def start_async(cls, client: Any, prompt: str, *, session_id: str | None = None,
                          store: SessionStore | str | None = None,
                          workspace: str | None = None) -> Session:
        """:meth:`start` for an asynchronous client (``await Session.start_async(...)``)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise SessionError("a session needs a non-empty prompt")
        handle = cls(session_id or new_session_id(), client, store, workspace)
        await asyncio.to_thread(handle.store.create, handle.id, prompt)
        await handle._submit_async()
        return handle

    @classmethod
    async def resume_async(cls, client: Any, session_id: str, *,
                           store: SessionStore | str | None = None,
                           workspace: str | None = None, takeover: bool = False) -> Session:
        """:meth:`resume` for an asynchronous client."""
        handle = cls(session_id, client, store, workspace)
        record = await asyncio.to_thread(handle.store.read, session_id)
        if record.state.finished or record.stored_status in ("cancelled",):
            raise SessionError(f"session {session_id} is {record.status}; nothing to resume")
        record.check_resumable()
        live = await handle.live_async()
        if live and live.get("live") and not takeover:
            raise SessionError(f"session {session_id} is being driven (epoch {live['epoch']}); "
                               "resume --takeover to supersede that driver")
        await handle._submit_async(takeover=takeover)
        return handle

    async def _submit_async(self, **overrides: Any) -> None:
        from distributed import fire_and_forget

        from obdask.server import install
        from obdask.session.driver import Settings
        from obdask.session.task import drive

        await install(self.client)
        settings = Settings.from_config(self.store, **{"workspace": self.workspace,
                                                        **overrides})
        key = f"obdask-session-driver-{self.id}-{secrets.token_hex(4)}"
        record = await asyncio.to_thread(self.store.read, self.id, full=False)
        await self.client.scheduler.obdask_session_register(session=self.id, key=key,
                                                            prompt=record.prompt)
        self.future = self.client.submit(drive, self.id, settings, key=key, pure=False)
        fire_and_forget(self.future)

    async def live_async(self) -> dict[str, Any] | None:
        """:meth:`live` for an asynchronous client."""
        from obdask.server import install

        await install(self.client)
        return await self.client.scheduler.obdask_session_get(session=self.id)

    async def state_async(self) -> dict[str, Any]:
        """:meth:`state` for an asynchronous client."""
        live = await self.live_async()
        if live is not None:
            return live
        out = (await asyncio.to_thread(self.store.read, self.id, full=False)).to_dict()
        if out["state"] in ("running", "waiting"):
            out["state"] = "interrupted"
        return out

    async def answer_async(self, text: str) -> str:
        """:meth:`answer` for an asynchronous client."""
        reply = await self.client.scheduler.obdask_session_answer(session=self.id, answer=text)
        if not reply.get("ok"):
            if not await asyncio.to_thread(self.store.exists, self.id):
                raise UnknownSession(f"no session {self.id!r} in {self.store.url}")
            raise SessionError(reply.get("error") or f"session {self.id} asked nothing")
        return reply["consultation"]

    async def wait_async(self, timeout: float | None = None,
                         poll: float = 0.1) -> dict[str, Any]:
        """:meth:`wait` for an asynchronous client."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = await self.state_async()
            if state["state"] in ENDED:
                return state
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"session {self.id} still {state['state']} at "
                                   f"{state.get('position')} after {timeout:g}s")
            await asyncio.sleep(poll)

    # -- reading -------------------------------------------------------------------------
    def live(self) -> dict[str, Any] | None:
        """The shared state on the scheduler (None: not known there, or no client)."""
        if self.client is None:
            return None
        _install(self.client)
        return _rpc(self.client, "obdask_session_get", session=self.id)

    def record(self):
        """The durable record (:class:`~obdask.session.store.SessionRecord`)."""
        return self.store.read(self.id)

    def state(self) -> dict[str, Any]:
        """The live state when the scheduler knows the session, else the stored one."""
        live = self.live()
        if live is not None:
            return live
        record = self.store.read(self.id, full=False)
        out = record.to_dict()
        if out["state"] in ("running", "waiting"):
            out["state"] = "interrupted"  # no driver known for it
        return out

    def show(self) -> dict[str, Any]:
        """Flow code, state, current process, tokens, consultation (store + live state)."""
        record = self.store.read(self.id)
        out = record.to_dict()
        out["process"] = record.state.info.name if record.state.info else None
        out["notes"] = len(record.notes)
        out["resources"] = record.resources
        live = self.live()
        if live is not None:
            out["state"] = live["state"] if not record.state.finished else "done"
            out["live"] = live.get("live")
            if live.get("question"):
                out["waiting"] = live["question"]
        elif out["state"] in ("running", "waiting"):
            out["state"] = "interrupted"
        return out

    @staticmethod
    def list(client: Any = None, store: SessionStore | str | None = None,
             workspace: str | None = None) -> builtins.list[dict[str, Any]]:
        """Every recorded session: running, waiting, interrupted, done, failed, cancelled."""
        st = store if isinstance(store, SessionStore) else open_store(store, workspace)
        live_ids = None
        states: dict[str, dict[str, Any]] = {}
        if client is not None:
            _install(client)
            states = {e["id"]: e for e in _rpc(client, "obdask_session_list")}
            live_ids = {sid for sid, e in states.items() if e.get("live")}
        out = []
        for summary in st.list_sessions(live=live_ids):
            row = summary.to_dict()
            if row["id"] in states and live_ids and row["id"] in live_ids:
                row["state"] = states[row["id"]]["state"]
                row["flow_code"] = states[row["id"]]["flow_code"] or row["flow_code"]
            out.append(row)
        return out

    def events(self) -> builtins.list[dict[str, Any]]:
        """This session's events so far, in order (the scheduler keeps the latest ones)."""
        return [msg for _, msg in self.client.get_events(TOPIC)
                if isinstance(msg, dict) and msg.get("session") == self.id]

    # -- acting --------------------------------------------------------------------------
    def answer(self, text: str) -> str:
        """Answer the session's open question; returns the consultation id.

        Raises
        ------
        SessionError
            The session asked nothing (or is not known to the scheduler).
        """
        _install(self.client)
        reply = _rpc(self.client, "obdask_session_answer", session=self.id, answer=text)
        if not reply.get("ok"):
            if not self.store.exists(self.id):
                raise UnknownSession(f"no session {self.id!r} in {self.store.url}")
            raise SessionError(reply.get("error") or f"session {self.id} asked nothing")
        return reply["consultation"]

    def cancel(self) -> dict[str, Any]:
        """Stop the session after its current step (or at once when no driver runs)."""
        _install(self.client)
        record = self.store.read(self.id, full=False)
        if record.state.finished:
            raise SessionError(f"session {self.id} is done; nothing to cancel")
        reply = _rpc(self.client, "obdask_session_cancel", session=self.id)
        if not reply.get("live"):  # no driver: record it ourselves with a fresh epoch
            epoch = self.store.highest_epoch(self.id) + 1
            self.store.update(self.id, epoch, status="cancelled")
        return {"id": self.id, "cancelled": True, "live": bool(reply.get("live"))}

    def wait(self, timeout: float | None = None, poll: float = 0.1) -> dict[str, Any]:
        """Block until the session is done, failed, cancelled or interrupted; its state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self.state()
            if state["state"] in ENDED:
                return state
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"session {self.id} still {state['state']} at "
                                   f"{state.get('position')} after {timeout:g}s")
            time.sleep(poll)

    def watch(self, out: Callable[[str], Any] = print, timeout: float | None = None,
              as_json: bool = False) -> None:
        """Print the events so far, then live ones, until the session ends."""
        import json

        q: queue.Queue = queue.Queue()
        # a client has one handler per topic: put back the caller's own afterwards
        previous = getattr(self.client, "_event_handlers", {}).get(TOPIC)
        self.client.subscribe_topic(TOPIC, q.put)
        try:
            last = 0

            def emit(msg: dict[str, Any]) -> bool:
                nonlocal last
                if msg.get("session") != self.id or int(msg.get("seq") or 0) <= last:
                    return False
                last = int(msg["seq"])
                out(json.dumps(msg, default=str) if as_json else format_event(msg))
                return msg.get("kind") in FINAL

            ended = False
            for msg in self.events():  # a resumed session's history has an earlier end
                if msg.get("kind") == "session-start" and msg.get("session") == self.id:
                    ended = False
                ended = emit(msg) or ended
            state = self.state()
            if ended or (state["state"] in ENDED and not state.get("live")):
                return
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError(f"session {self.id}: still running after {timeout:g}s")
                try:
                    _, msg = q.get(timeout=wait)
                except queue.Empty:
                    if self.state()["state"] in ENDED:
                        return
                    continue
                if isinstance(msg, dict) and emit(msg):
                    return
        finally:
            if previous is not None:
                self.client.subscribe_topic(TOPIC, previous)
            else:
                self.client.unsubscribe_topic(TOPIC)
