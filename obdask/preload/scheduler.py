"""Scheduler preload: ``dask scheduler --preload obdask.preload.scheduler``.

Installs every scheduler extension listed in :data:`EXTENSIONS` (idempotent:
a later :func:`obdask.diagnostics.plugin.install` from a client is a no-op).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from obdask.diagnostics.attempts import AttemptsPlugin
from obdask.diagnostics.durations import DurationsPlugin
from obdask.diagnostics.plugin import ObdaskSchedulerPlugin
from obdask.llm.budget import BudgetPlugin

logger = logging.getLogger(__name__)

#: Factories of the scheduler plugins to install, in order.  Append to extend.
EXTENSIONS: list[Callable[[], SchedulerPlugin]] = [
    ObdaskSchedulerPlugin, AttemptsPlugin, DurationsPlugin, BudgetPlugin,
]


async def dask_setup(scheduler: Any) -> None:
    """Install each plugin of :data:`EXTENSIONS` on ``scheduler`` (runs its ``start``)."""
    for factory in EXTENSIONS:
        plugin = factory()
        await scheduler.register_scheduler_plugin(plugin, idempotent=True)
        logger.info("obdask: installed scheduler plugin %r", getattr(plugin, "name", plugin))
