"""A workaround for a CPython 3.11 deadlock that Dask's profilers walk into.

``sys._current_frames()`` holds the runtime's thread-list lock while it creates frame
objects.  On CPython 3.11 that allocation can start the cyclic garbage collector, whose
callbacks and finalizers run Python code that lets the GIL go; a thread that starts or
ends meanwhile takes the GIL and then waits for the thread-list lock: each waits for the
other, for good (CPython gh-106883).  Dask calls ``sys._current_frames()`` every 10 ms
in every worker and scheduler process (its statistical profilers) and registers a GC
callback in them (``distributed.gc``), and obdask's drivers, writers and model calls
start and end threads: a test's in-process cluster hung so, every thread of the process
waiting for the GIL (seen with gdb on CPython 3.11.7, the interpreter CI runs).

CPython's fix pauses the collector during the call; :func:`guard_current_frames` does
the same from Python where the interpreter may lack it.  obdask's scheduler and worker
plugins and its preloads install it in their processes.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["guard_current_frames", "needs_guard"]

_lock = threading.RLock()  # re-entrant: a signal handler may dump stacks from inside
_original: Any = None


def needs_guard(version: tuple[int, ...] | None = None) -> bool:
    """Whether this interpreter can deadlock in ``sys._current_frames`` (CPython 3.11;
    3.12 runs the collector only between bytecodes, and its fix was backported late
    in 3.11's life, so every 3.11 is guarded: on a fixed one the guard costs a pair
    of ``gc`` calls per profile sample)."""
    version = tuple(sys.version_info[:2]) if version is None else tuple(version[:2])
    return sys.implementation.name == "cpython" and version == (3, 11)


def _current_frames() -> dict[int, FrameType]:
    """``sys._current_frames()`` with the cyclic collector paused (as CPython's fix).

    Serialised: a second caller must not switch the collector back on while the
    first is still inside.  Nothing in the call runs Python code once the collector
    is off, so the lock is held for microseconds.
    """
    with _lock:
        enabled = gc.isenabled()
        gc.disable()
        try:
            return _original()
        finally:
            if enabled:
                gc.enable()


def guard_current_frames() -> bool:
    """Install the guarded ``sys._current_frames`` where the interpreter needs it
    (idempotent); True when it is installed."""
    global _original
    if not needs_guard():
        return False
    with _lock:
        if _original is None:
            _original = sys._current_frames
            setattr(sys, "_current_frames", _current_frames)  # noqa: B010 - a module attribute
            logger.debug("obdask: sys._current_frames pauses the GC (CPython gh-106883)")
    return True
