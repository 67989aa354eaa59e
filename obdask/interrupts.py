"""Ctrl-C belongs to the client: an embedded cluster's workers never see it.

A terminal's Ctrl-C sends SIGINT to the whole foreground process group, which
holds the worker processes of the embedded ``LocalCluster`` too: each printed a
``KeyboardInterrupt`` traceback (while still importing, or from its event
loop) before the client's one-line message.  The client owns the cluster and
closes it when interrupted, so:

* :func:`sigint_ignored_by_children` ignores SIGINT while the cluster starts
  its worker processes, which inherit the ignored disposition (Python keeps
  an ignored SIGINT at start-up; neither a handler nor a blocked signal mask
  survives into a ``multiprocessing`` child).  A Ctrl-C in that window is
  seen by a sentinel ``sh`` in the same process group that traps SIGINT, and
  raised here as ``KeyboardInterrupt`` when the window closes;
* :func:`settle_worker` (the obdask worker plugin's setup) replaces that
  inherited ``SIG_IGN`` by a Python handler that ignores SIGINT: the worker
  still ignores Ctrl-C, and the commands it starts get the default SIGINT
  again after ``exec``.

Workers the user started (``dask worker`` in a terminal) have the default
SIGINT: nothing changes for them.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import threading
from collections.abc import Iterator

logger = logging.getLogger(__name__)


_SENTINEL = 'trap "exit 130" INT; read _'  # exits 130 on SIGINT, 0 on EOF of its stdin


@contextlib.contextmanager
def sigint_ignored_by_children() -> Iterator[None]:
    """Processes started in the block ignore SIGINT; a Ctrl-C meanwhile is raised after it.

    Main thread only (elsewhere a no-op).
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield
        return
    sentinel = None
    try:
        sentinel = subprocess.Popen(["/bin/sh", "-c", _SENTINEL], stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError as exc:
        logger.debug("no Ctrl-C sentinel (%s): a Ctrl-C while workers start is lost", exc)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
        if sentinel is not None and sentinel.stdin is not None:  # stdin is our pipe
            sentinel.stdin.close()
            if sentinel.wait() in (130, -signal.SIGINT):
                raise KeyboardInterrupt


def _ignored(signum: int, frame: object) -> None:
    logger.debug("SIGINT ignored: the client that owns this worker handles Ctrl-C")


def settle_worker() -> None:
    """In a worker started with SIGINT ignored: keep ignoring it, not in its commands."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, _ignored)  # a Python handler: exec resets it to default
