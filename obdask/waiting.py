"""Tell the scheduler what a running task waits for or holds (for ``obdask why``).

A task blocked inside (a per-model concurrency slot) or holding something others
wait for (a slot) sends a note on its worker's batched stream (no round trip);
:class:`obdask.server.waiting.WaitingExtension` keeps it while the task runs.
Outside a Dask task, or on a scheduler without obdask, nothing is sent.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

NOTE_OP = "obdask_why_note"


def _current() -> tuple[Any, Any]:
    """``(worker, task key)`` of the task running this thread, or ``(None, None)``."""
    try:
        from distributed import get_worker
        from distributed.worker import thread_state

        return get_worker(), getattr(thread_state, "key", None)
    except (ImportError, ValueError):
        return None, None


def note(kind: str, value: dict[str, Any] | None) -> bool:
    """Set (``value``) or clear (None) this task's ``kind`` note (``waiting``/``holds``).

    Returns False when nothing was sent (not inside a Dask task).
    """
    worker, key = _current()
    if worker is None or key is None:
        return False
    # Only where obdask's scheduler plugin installed its worker plugin: a stream op the
    # scheduler does not know would close the worker's stream.
    if "obdask-worker" not in (getattr(worker, "plugins", None) or {}):
        return False
    stream = getattr(worker, "batched_stream", None)
    if stream is None:
        return False
    msg = {"op": NOTE_OP, "key": key, "kind": kind, "value": value}
    try:
        # BatchedSend is not thread-safe: hand the message to the worker's loop.
        worker.loop.add_callback(stream.send, msg)
    except Exception:  # a closing worker: the note does not matter any more
        logger.debug("obdask: could not send why note %r", msg, exc_info=True)
        return False
    return True
