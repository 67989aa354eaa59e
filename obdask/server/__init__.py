"""Everything obdask runs inside the scheduler: one plugin hosting its extensions.

:class:`ObdaskPlugin` (name ``"obdask"``) is the one scheduler plugin obdask
installs.  Like ``distributed.scheduler.DEFAULT_EXTENSIONS``, :data:`EXTENSIONS`
lists the extensions it composes; each is a class taking the scheduler, with

* ``handlers`` (and optionally ``stream_handlers``): ``{op: callable}``, ops
  named ``obdask_<noun>_<verb>``, registered wrapped in ``log_errors``;
* any of the scheduler-plugin hooks ``transition``, ``update_graph``,
  ``remove_worker``, ``add_worker``, ``remove_client``, ``close``, forwarded to
  every extension that has it.

The plugin also installs the companion :class:`~obdask.server.worker.ObdaskWorkerPlugin`
on every current and future worker, which owns obdask's worker-side state.
Installed idempotently by the scheduler preload, the embedded cluster and
:func:`obdask.run` (:func:`install`).

Extension state lives in ``scheduler.extensions["obdask"]`` (this plugin);
``plugin.extensions[name]`` reaches one extension.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import dask
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol.pickle import dumps
from distributed.utils import log_errors

from obdask.llm.budget.ledger import configured_budgets
from obdask.server.budgets import BudgetExtension
from obdask.server.locality import LocalityExtension
from obdask.server.metrics import MetricsExtension
from obdask.server.runs import RunsExtension
from obdask.server.sessions import SessionsExtension
from obdask.server.slots import SlotsExtension
from obdask.server.waiting import WaitingExtension
from obdask.server.worker import NAME as WORKER_PLUGIN_NAME
from obdask.server.worker import ObdaskWorkerPlugin

logger = logging.getLogger(__name__)

NAME = "obdask"

#: The extensions :class:`ObdaskPlugin` composes, by name, in start order.  A
#: third party may add one before the plugin starts.
EXTENSIONS: dict[str, Callable[[Any], Any]] = {
    "locality": LocalityExtension,
    "runs": RunsExtension,
    "budgets": BudgetExtension,
    "sessions": SessionsExtension,
    "metrics": MetricsExtension,
    "waiting": WaitingExtension,
    "slots": SlotsExtension,
}

_HOOKS = ("transition", "update_graph", "add_worker", "remove_worker", "remove_client")


class ObdaskPlugin(SchedulerPlugin):
    """The obdask scheduler plugin: hosts :data:`EXTENSIONS` (see the module docstring).

    Parameters
    ----------
    budgets : list of mapping, optional
        Token budgets to define on start (existing usage kept).  Default: the
        installing process's ``obdask.llm.budgets``, so a client's config
        reaches a remote scheduler.  Validated here, on the installing side.
    """

    name = NAME
    idempotent = True

    def __init__(self, budgets: Iterable[Mapping[str, Any]] | None = None) -> None:
        self.budgets = configured_budgets(None if budgets is None else list(budgets))
        self.scheduler: Any = None
        self.extensions: dict[str, Any] = {}
        self._hooks: dict[str, list[Callable[..., Any]]] = {h: [] for h in _HOOKS}

    async def start(self, scheduler: Any) -> None:
        """Start every extension, register its handlers, install the worker plugin."""
        from obdask.interpreter import guard_current_frames

        guard_current_frames()  # the scheduler's profiler thread, on CPython 3.11
        self.scheduler = scheduler
        for name, factory in EXTENSIONS.items():
            if name == "metrics" and not dask.config.get("obdask.metrics.enabled", True):
                continue  # obdask.metrics.enabled: false (the benchmark's baseline)
            ext = self.extensions[name] = factory(scheduler)
            for op, handler in getattr(ext, "handlers", {}).items():
                scheduler.handlers[op] = log_errors(handler)
            for op, handler in getattr(ext, "stream_handlers", {}).items():
                scheduler.stream_handlers[op] = handler
            for hook in _HOOKS:
                if callable(getattr(ext, hook, None)):
                    self._hooks[hook].append(getattr(ext, hook))
        for budget in self.budgets:
            self.extensions["budgets"].set_budget(budget)
        scheduler.extensions[NAME] = self
        await scheduler.register_worker_plugin(
            None, dumps(ObdaskWorkerPlugin(metrics="metrics" in self.extensions)),
            name=WORKER_PLUGIN_NAME, idempotent=True
        )
        logger.info("obdask: scheduler extensions %s", ", ".join(self.extensions))

    # The hooks run inside the scheduler's transitions: an extension's error is
    # logged and never reaches the scheduler.
    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        for hook in self._hooks["transition"]:
            try:
                hook(key, start, finish, *args, **kwargs)
            except Exception:
                logger.exception("obdask: transition hook %r failed on %r", hook, key)

    def update_graph(self, scheduler: Any, **kwargs: Any) -> None:
        self._call("update_graph", scheduler, **kwargs)

    def add_worker(self, scheduler: Any, worker: str) -> None:
        self._call("add_worker", scheduler, worker)

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        self._call("remove_worker", scheduler, worker, **kwargs)

    def remove_client(self, scheduler: Any, client: str) -> None:
        self._call("remove_client", scheduler, client)

    def _call(self, hook: str, *args: Any, **kwargs: Any) -> None:
        for fn in self._hooks[hook]:
            try:
                fn(*args, **kwargs)
            except Exception:
                logger.exception("obdask: %s hook %r failed", hook, fn)


def extension(scheduler: Any, name: str) -> Any:
    """The obdask extension ``name`` on ``scheduler``, or None when not installed."""
    host = scheduler.extensions.get(NAME)
    return host.extensions.get(name) if isinstance(host, ObdaskPlugin) else None


def install(client: Any, budgets: Iterable[Mapping[str, Any]] | None = None) -> Any:
    """Install :class:`ObdaskPlugin` (and so the worker plugin) on ``client``'s cluster.

    Idempotent: a cluster that has it (preload, an earlier run) keeps it.
    Returns what ``client.register_plugin`` returns (an awaitable for an
    asynchronous client).
    """
    return client.register_plugin(ObdaskPlugin(budgets), name=NAME)
