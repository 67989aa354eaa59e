"""Auto-resume: a restarted scheduler continues the sessions a crash interrupted.

With ``obdask.sessions.auto-resume: true`` in the scheduler's configuration, the
scheduler preload (:mod:`obdask.preload.scheduler`) adds :class:`AutoResume`, a
scheduler plugin.  When the first worker arrives it lists the session store
(``obdask.sessions.store`` of the scheduler) and resumes every session that shows as
``interrupted`` (stored as running or waiting, with no driver on this scheduler, or
stored as interrupted) through :meth:`obdask.session.api.Session.resume_async`: an
asynchronous client of the scheduler itself submits each driver, fire-and-forget,
exactly as ``obdask session resume`` would.  It runs once per scheduler.

The drivers take the scheduler's configuration (endpoints, role -> model names,
consultation timeout), so set those on the scheduler.  This lives beside the sessions
rather than in :mod:`obdask.server` because it uses the client-side session API
(which installs the server plugin: a module of ``obdask.server`` importing it would
be an import cycle).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

logger = logging.getLogger(__name__)

__all__ = ["AutoResume", "resume_interrupted"]

NAME = "obdask-session-auto-resume"


async def resume_interrupted(client: Any, store: Any, live: set[str]) -> list[str]:
    """Resume every session of ``store`` that shows as interrupted; their ids.

    ``live``: sessions a driver holds (or was submitted for) on this scheduler.
    A session that cannot be resumed (a record this code does not run, ...) is
    logged and skipped.
    """
    from obdask.session.api import Session

    summaries = await asyncio.to_thread(store.list_sessions, live)
    resumed = []
    for summary in summaries:
        if summary.status != "interrupted":
            continue
        try:
            await Session.resume_async(client, summary.id, store=store)
        except Exception as exc:  # noqa: BLE001 - one bad record must not stop the others
            logger.warning("obdask: auto-resume of session %s refused: %s", summary.id, exc)
            continue
        resumed.append(summary.id)
    return resumed


class AutoResume(SchedulerPlugin):
    """Resume interrupted sessions when the first worker arrives (see the module
    docstring)."""

    name = NAME
    idempotent = True

    def __init__(self) -> None:
        self.scheduler: Any = None
        self.task: asyncio.Task | None = None
        self.resumed: list[str] = []

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def add_worker(self, scheduler: Any, worker: str) -> None:
        if self.task is None:  # once per scheduler: later workers find the drivers running
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        from distributed import Client

        from obdask.server import extension
        from obdask.session.store import open_store

        try:
            store = await asyncio.to_thread(open_store)
            sessions = extension(self.scheduler, "sessions")
            live = {sid for sid, e in getattr(sessions, "sessions", {}).items()
                    if e.get("holder") or e.get("state") == "submitted"}
            async with Client(self.scheduler.address, asynchronous=True,
                              security=getattr(self.scheduler, "security", None),
                              name="obdask-auto-resume") as client:
                self.resumed = await resume_interrupted(client, store, live)
            logger.info("obdask: auto-resumed %d session(s) from %s: %s", len(self.resumed),
                        store.url, ", ".join(self.resumed) or "-")
        except Exception:  # noqa: BLE001 - never into the scheduler
            logger.exception("obdask: auto-resume of interrupted sessions failed")
