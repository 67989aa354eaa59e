"""Scheduler preload: ``dask scheduler --preload obdask.preload.scheduler``.

Installs :class:`obdask.server.ObdaskPlugin`, which hosts every obdask scheduler
extension (:data:`obdask.server.EXTENSIONS`) and installs the worker plugin.
Idempotent: a later :func:`obdask.server.install` from a client is a no-op.
With ``obdask.sessions.auto-resume`` it also resumes interrupted sessions
(:mod:`obdask.session.autoresume`).  Importing it also adds obdask's pages to the
scheduler's dashboard (:mod:`obdask.dashboard`): ``/obdask`` and ``/individual-obdask-*``.
"""

from __future__ import annotations

import logging
from typing import Any

from obdask import config
from obdask.dashboard import register
from obdask.server import ObdaskPlugin

logger = logging.getLogger(__name__)

# At import: the scheduler imports its preloads in its constructor, before it
# builds its dashboard from distributed.dashboard.scheduler.applications;
# dask_setup runs too late for that.
register()


async def dask_setup(scheduler: Any) -> None:
    """Install :class:`~obdask.server.ObdaskPlugin` on ``scheduler`` (runs its ``start``),
    and with ``obdask.sessions.auto-resume`` the plugin that resumes interrupted
    sessions when workers arrive (:mod:`obdask.session.autoresume`)."""
    from obdask.interpreter import guard_current_frames

    guard_current_frames()
    await scheduler.register_scheduler_plugin(ObdaskPlugin(), idempotent=True)
    logger.info("obdask: installed the scheduler plugin %r", ObdaskPlugin.name)
    if config.get_bool("sessions.auto-resume"):
        from obdask.session.autoresume import AutoResume

        await scheduler.register_scheduler_plugin(AutoResume(), idempotent=True)
        logger.info("obdask: interrupted sessions resume when workers arrive")
