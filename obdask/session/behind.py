"""Writes of a session record queued off the driver's critical path, in order.

The driver (:mod:`obdask.session.driver`) queues a process's durable writes (its tokens,
its snapshot, the shared state and events) here and goes on to ask the orchestrator for
the next move; before its next durable step it calls :meth:`WriteBehind.settle`, which
waits for the queue and raises the first write's error (``LeaseLost`` included).  One
thread per driver keeps the writes in the order they were queued, and a write queued
after a failed one is skipped, so the record never holds a later write without an
earlier one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["WriteBehind"]


class WriteBehind:
    """Writes queued to one thread, run in order; after the first error the rest are
    skipped, and :meth:`settle` waits for the queue and raises that error."""

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._queued: list[Future] = []
        self._error: BaseException | None = None

    def put(self, fn: Callable[[], Any]) -> None:
        self._queued.append(self._pool.submit(self._run, fn))

    def _run(self, fn: Callable[[], Any]) -> None:
        if self._error is None:  # a later write never lands after a failed one
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - raised in the driver by settle
                self._error = exc

    def settle(self) -> None:
        queued, self._queued = self._queued, []
        for future in queued:
            future.result()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        """Wait for what is queued (its errors are dropped: the driver is ending)."""
        self._pool.shutdown(wait=True)
